//! One queue's shared state: its settings, its *published* state (what callers and
//! subscribers see, with its live channel) and its *committed* state (the writer's, which runs
//! ahead of the published one while a batch waits for its sync).
//!
//! Fields are private to the engine. Front ends read through methods; only the pipeline
//! changes the state, after commits (committed) and after syncs (published).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use super::hub::{Hub, Live, RecordedEvent};
use crate::error::{Error, Result};
use crate::event::Timestamp;
use crate::ids::{TaskId, TenantId};
use crate::storage::{CancelRecord, Producers, QueueRecord, StoredEvent, StreamRecord};

/// What a queue is for. For display and filtering only: every route serves every kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueKind {
    /// An orchestrator workflow.
    Workflow,
    /// An ingestion job.
    Ingestion,
    /// Anything else. Default.
    #[default]
    Task,
    /// A Durable Streams stream: messages stored as given (bytes of the stream's content
    /// type), not typed events.
    Stream,
}

impl QueueKind {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            QueueKind::Workflow => "workflow",
            QueueKind::Ingestion => "ingestion",
            QueueKind::Task => "task",
            QueueKind::Stream => "stream",
        }
    }

    /// Parses a wire name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "workflow" => Some(QueueKind::Workflow),
            "ingestion" => Some(QueueKind::Ingestion),
            "task" => Some(QueueKind::Task),
            "stream" => Some(QueueKind::Stream),
            _ => None,
        }
    }

    pub(crate) fn code(self) -> u8 {
        match self {
            QueueKind::Workflow => 0,
            QueueKind::Ingestion => 1,
            QueueKind::Task => 2,
            QueueKind::Stream => 3,
        }
    }

    pub(crate) fn from_code(code: u8) -> Self {
        match code {
            0 => QueueKind::Workflow,
            1 => QueueKind::Ingestion,
            3 => QueueKind::Stream,
            _ => QueueKind::Task,
        }
    }
}

/// A persisted cancellation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CancelInfo {
    pub reason: Option<String>,
    pub time: Timestamp,
}

/// A queue's mutable state at one point of the commit pipeline.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct View {
    pub first_offset: u64,
    pub next_offset: u64,
    pub closed: bool,
    pub finished_at: Option<u64>,
    pub cancel: Option<CancelInfo>,
    pub last_activity: Timestamp,
    pub removed: bool,
    /// A stream's idempotent producers (`None` for typed event queues): shared between
    /// views until a batch changes it.
    pub producers: Option<Arc<Producers>>,
}

impl View {
    /// The state a stored record holds.
    pub(crate) fn of_record(rec: &QueueRecord) -> Self {
        View {
            first_offset: rec.first_offset,
            next_offset: rec.next_offset,
            closed: rec.closed,
            finished_at: rec.finished_at,
            cancel: rec.cancel.as_ref().map(|c| CancelInfo {
                reason: c.reason.clone(),
                time: Timestamp::from_micros(c.time_us),
            }),
            last_activity: Timestamp::from_micros(rec.last_activity_us),
            removed: false,
            producers: rec.stream.as_ref().map(|st| Arc::new(st.producers.clone())),
        }
    }

    /// Takes in a state `other` from elsewhere (a shared store's newer record, or a batch
    /// published after a newer record was): every field of a queue's state only ever moves
    /// one way — offsets and activity grow, closed / finished / cancelled / removed never
    /// revert — so keeping the further of each field gives the newest state whatever order
    /// the two arrive in.
    pub(crate) fn merge(&mut self, other: &View) {
        self.first_offset = self.first_offset.max(other.first_offset);
        self.next_offset = self.next_offset.max(other.next_offset);
        self.closed |= other.closed;
        if self.finished_at.is_none() {
            self.finished_at = other.finished_at;
        }
        if self.cancel.is_none() {
            self.cancel = other.cancel.clone();
        }
        self.last_activity = self.last_activity.max(other.last_activity);
        self.removed |= other.removed;
        match (&mut self.producers, &other.producers) {
            (_, None) => {}
            (None, Some(theirs)) => self.producers = Some(theirs.clone()),
            (Some(ours), Some(theirs)) => {
                if !Arc::ptr_eq(ours, theirs) && **ours != **theirs {
                    Arc::make_mut(ours).merge(theirs);
                }
            }
        }
    }

    /// Whether nothing can come from offset `from` on: it lies past the terminal event, or at
    /// or past the end of a closed queue.
    pub(crate) fn nothing_from(&self, from: u64) -> bool {
        self.finished_at.is_some_and(|f| from > f) || (self.closed && from >= self.next_offset)
    }
}

/// The published state and the live channel, under one lock (see `hub`).
#[derive(Debug)]
pub(super) struct Published {
    pub(super) view: View,
    pub(super) hub: Hub,
}

/// What every handle of one queue shares.
#[derive(Debug)]
pub(crate) struct QueueState {
    id: u64,
    tenant_id: TenantId,
    task_id: TaskId,
    kind: QueueKind,
    created_at: Timestamp,
    ttl: Duration,
    max_buffer_size: u64,
    published: Mutex<Published>,
    /// The state as of the writer's latest commit, which may run ahead of the published state
    /// while that commit's log record is being synced. Only the writer thread uses it.
    committed: Mutex<View>,
    cancel_token: CancellationToken,
    subscribers: AtomicUsize,
    /// A stream's content type (kind [`QueueKind::Stream`]); `None` for typed event queues.
    content_type: Option<Arc<str>>,
    /// A stream's absolute expiry (`Stream-Expires-At`), which activity does not extend.
    expires_at: Option<Timestamp>,
}

impl QueueState {
    pub(crate) fn from_record(tenant_id: TenantId, task_id: TaskId, rec: &QueueRecord) -> Self {
        let view = View::of_record(rec);
        let cancel_token = CancellationToken::new();
        if view.cancel.is_some() {
            cancel_token.cancel();
        }
        Self {
            id: rec.id,
            tenant_id,
            task_id,
            kind: QueueKind::from_code(rec.kind),
            created_at: Timestamp::from_micros(rec.created_at_us),
            ttl: Duration::from_millis(rec.ttl_ms),
            max_buffer_size: rec.max_buffer_size,
            published: Mutex::new(Published {
                view: view.clone(),
                hub: Hub::default(),
            }),
            committed: Mutex::new(view),
            cancel_token,
            subscribers: AtomicUsize::new(0),
            content_type: rec.content_type.as_deref().map(Arc::from),
            expires_at: rec
                .stream
                .as_ref()
                .and_then(|st| st.expires_at_us)
                .map(Timestamp::from_micros),
        }
    }

    /// Locks the published state. A panic while holding the lock cannot leave it half-updated
    /// (the pipeline assigns whole values), so a poisoned lock is recovered.
    pub(super) fn lock(&self) -> MutexGuard<'_, Published> {
        self.published.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The writer's view (see `committed`).
    pub(super) fn committed(&self) -> MutexGuard<'_, View> {
        self.committed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The queue was removed by another node: its subscribers end (as after a local delete).
    pub(super) fn removed_elsewhere(&self) {
        self.committed().removed = true;
        let mut st = self.lock();
        if !st.view.removed {
            st.view.removed = true;
            st.hub.publish(Live::Removed);
            st.hub.shut();
        }
    }

    /// Makes the published state follow `record`, another node's newer state of this queue in
    /// a shared store, and hands the events it appended to this node's live subscribers.
    ///
    /// With nobody listening the state is taken in at once (a subscriber that joins later
    /// reads everything below the new offset from the store). Otherwise the new events are
    /// read with `read(from, to)` — outside the lock, so the fan-out never waits on the
    /// store — and sent in offset order, each only if it is still at or past the published
    /// offset: this node's own publications may have moved the offset on meanwhile, and their
    /// subscribers read any range they skipped from the store (see `subscription`), so
    /// nothing is sent twice or out of order and nothing is missed. The flags (closed,
    /// finished, cancelled) are taken in once the events before them were sent, so a
    /// subscriber learns of a close only after the events it ends.
    ///
    /// # Errors
    ///
    /// A read's error: the state is left where delivery got to; the next change of the
    /// queue (or a reload) resumes from there.
    pub(crate) fn follow(
        &self,
        record: &QueueRecord,
        mut read: impl FnMut(u64, u64) -> Result<Vec<StoredEvent>>,
    ) -> Result<()> {
        let fresh = View::of_record(record);
        loop {
            let from = {
                let mut st = self.lock();
                if st.view.removed {
                    return Ok(());
                }
                if !st.hub.is_open() || st.view.next_offset >= fresh.next_offset {
                    let was = st.view.clone();
                    st.view.merge(&fresh);
                    if st.view.cancel.is_some() && was.cancel.is_none() {
                        self.cancel_token.cancel();
                    }
                    if st.view.closed && !was.closed {
                        let at = st.view.next_offset;
                        st.hub.publish(Live::Closed { at });
                    }
                    return Ok(());
                }
                st.view.next_offset
            };
            let events = read(from, fresh.next_offset)?;
            let mut st = self.lock();
            if events.is_empty() {
                // Trimmed away meanwhile: subscribers look for the range themselves (and say
                // the gap).
                st.view.first_offset = st.view.first_offset.max(fresh.first_offset);
                if fresh.next_offset > st.view.next_offset {
                    st.view.next_offset = fresh.next_offset;
                    st.hub.publish(Live::Advanced {
                        to: fresh.next_offset,
                    });
                }
                continue;
            }
            for e in events {
                if e.offset < st.view.next_offset || e.offset >= fresh.next_offset {
                    continue;
                }
                st.view.next_offset = e.offset + 1;
                let event = RecordedEvent::from_stored(e)?;
                st.hub.publish(Live::Event(Arc::new(event)));
            }
        }
    }

    /// The queue's record with the state `st`.
    pub(super) fn record(&self, st: &View) -> QueueRecord {
        QueueRecord {
            id: self.id,
            kind: self.kind.code(),
            created_at_us: self.created_at.as_micros(),
            last_activity_us: st.last_activity.as_micros(),
            ttl_ms: u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX),
            max_buffer_size: self.max_buffer_size,
            first_offset: st.first_offset,
            next_offset: st.next_offset,
            closed: st.closed,
            finished_at: st.finished_at,
            cancel: st.cancel.as_ref().map(|c| CancelRecord {
                reason: c.reason.clone(),
                time_us: c.time.as_micros(),
            }),
            content_type: self.content_type.as_deref().map(str::to_string),
            // A stream's own state, beside its content type (only streams have one).
            stream: self.content_type.as_ref().map(|_| StreamRecord {
                expires_at_us: self.expires_at.map(Timestamp::as_micros),
                producers: st.producers.as_deref().cloned().unwrap_or_default(),
            }),
        }
    }

    /// A stream's absolute expiry (`Stream-Expires-At`).
    pub(crate) fn expires_at(&self) -> Option<Timestamp> {
        self.expires_at
    }

    /// A stream's content type; `None` for typed event queues.
    pub(crate) fn content_type(&self) -> Option<&str> {
        self.content_type.as_deref()
    }

    /// The store's id of the queue.
    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    /// The queue's tenant.
    pub(crate) fn tenant_id(&self) -> &TenantId {
        &self.tenant_id
    }

    /// The queue's task.
    pub(crate) fn task_id(&self) -> &TaskId {
        &self.task_id
    }

    /// The queue's kind.
    pub(crate) fn kind(&self) -> QueueKind {
        self.kind
    }

    /// When the queue was created.
    pub(crate) fn created_at(&self) -> Timestamp {
        self.created_at
    }

    /// Idle time after which the queue expires.
    pub(crate) fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Most retained events.
    pub(crate) fn max_buffer_size(&self) -> u64 {
        self.max_buffer_size
    }

    /// Reads the published state without copying it.
    pub(crate) fn with_view<T>(&self, f: impl FnOnce(&View) -> T) -> T {
        f(&self.lock().view)
    }

    /// Whether the queue was idle for at least its TTL at `now`.
    pub(crate) fn is_expired_at(&self, now: Timestamp) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
            || self.with_view(|v| v.last_activity.saturating_add(self.ttl) <= now)
    }

    /// Joins the live channel (creating it if there is none) and reads the published state,
    /// in one critical section: every event at or past the returned `next_offset` reaches the
    /// receiver (or is reported to it as lag), every event below it is committed.
    ///
    /// # Errors
    ///
    /// [`Error::QueueNotFound`] once the queue is removed.
    pub(crate) fn join_live(&self, capacity: usize) -> Result<(broadcast::Receiver<Live>, View)> {
        match self.refresh(Some(capacity)) {
            Some((Some(rx), view)) => Ok((rx, view)),
            _ => Err(self.not_found()),
        }
    }

    /// Reads the published state; with `rejoin` (a channel capacity), also joins the live
    /// channel in the same critical section (a fresh receiver to replace a lagged one).
    /// `None` once the queue is removed.
    pub(crate) fn refresh(
        &self,
        rejoin: Option<usize>,
    ) -> Option<(Option<broadcast::Receiver<Live>>, View)> {
        let mut st = self.lock();
        if st.view.removed {
            return None;
        }
        let rx = rejoin.map(|capacity| st.hub.subscribe(capacity));
        Some((rx, st.view.clone()))
    }

    /// Whether the queue currently holds a live broadcast channel.
    pub(crate) fn has_live_channel(&self) -> bool {
        self.lock().hub.is_open()
    }

    /// The token cancelled when the task is.
    pub(crate) fn cancel_token(&self) -> &CancellationToken {
        &self.cancel_token
    }

    /// Live subscriptions.
    pub(crate) fn subscribers(&self) -> usize {
        self.subscribers.load(Ordering::Relaxed)
    }

    /// Counts a subscription until the guard is dropped.
    pub(crate) fn count_subscriber(self: &Arc<Self>) -> SubscriberGuard {
        self.subscribers.fetch_add(1, Ordering::Relaxed);
        SubscriberGuard(self.clone())
    }

    /// [`Error::QueueNotFound`] for this queue.
    pub(crate) fn not_found(&self) -> Error {
        Error::QueueNotFound {
            task_id: self.task_id.to_string(),
        }
    }
}

/// Counts one live subscription of a queue while it exists.
#[derive(Debug)]
pub(crate) struct SubscriberGuard(Arc<QueueState>);

impl Drop for SubscriberGuard {
    fn drop(&mut self) {
        self.0.subscribers.fetch_sub(1, Ordering::Relaxed);
    }
}
