//! [`EventQueue`]: the handle producers and subscribers use for one `(tenant, task)` queue.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::event::{Event, Timestamp};
use crate::hub::Hub;
use crate::ids::{TaskId, TenantId};
use crate::manager::Core;
use crate::store::codec::{CancelRecord, QueueRecord};
use crate::subscription::Subscription;
use crate::writer::{Command, PreparedEvent};

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
}

impl QueueKind {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            QueueKind::Workflow => "workflow",
            QueueKind::Ingestion => "ingestion",
            QueueKind::Task => "task",
        }
    }

    /// Parses a wire name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "workflow" => Some(QueueKind::Workflow),
            "ingestion" => Some(QueueKind::Ingestion),
            "task" => Some(QueueKind::Task),
            _ => None,
        }
    }

    pub(crate) fn code(self) -> u8 {
        match self {
            QueueKind::Workflow => 0,
            QueueKind::Ingestion => 1,
            QueueKind::Task => 2,
        }
    }

    pub(crate) fn from_code(code: u8) -> Self {
        match code {
            0 => QueueKind::Workflow,
            1 => QueueKind::Ingestion,
            _ => QueueKind::Task,
        }
    }
}

/// Options for creating a queue; unset fields take the manager's defaults.
#[derive(Debug, Clone, Default)]
pub struct QueueOptions {
    /// Kind of the queue. Default [`QueueKind::Task`].
    pub kind: QueueKind,
    /// Idle time after which the queue expires. Default: the manager's (30 min).
    pub ttl: Option<Duration>,
    /// Most retained events. Default: the manager's (1000).
    pub max_buffer_size: Option<u64>,
}

impl QueueOptions {
    /// Options of the given kind, everything else default.
    pub fn kind(kind: QueueKind) -> Self {
        Self {
            kind,
            ..Self::default()
        }
    }

    /// Sets the TTL.
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// Sets the retention bound.
    pub fn with_max_buffer_size(mut self, n: u64) -> Self {
        self.max_buffer_size = Some(n);
        self
    }
}

/// A queue's cancellation state, as the seed's `cancellation_token`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CancellationState {
    /// Whether the task was cancelled.
    pub is_cancelled: bool,
    /// The reason given, if any.
    pub reason: Option<String>,
    /// When it was cancelled.
    pub cancel_time: Option<Timestamp>,
}

/// Queue info, with the contract's field names and order.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QueueInfo {
    /// Task id.
    pub task_id: TaskId,
    /// Tenant id.
    pub tenant_id: TenantId,
    /// Kind.
    pub kind: QueueKind,
    /// Retained events.
    pub event_count: u64,
    /// Live subscriptions.
    pub subscriber_count: usize,
    /// Closed to producers.
    pub is_closed: bool,
    /// Cancellation requested.
    pub is_cancelled: bool,
    /// Cancellation reason.
    pub cancel_reason: Option<String>,
    /// A terminal event was enqueued.
    pub is_finished: bool,
    /// Creation time.
    pub created_at: Timestamp,
    /// Creation or last event.
    pub last_activity: Timestamp,
    /// TTL in minutes.
    pub ttl_minutes: f64,
    /// Retention bound.
    pub max_buffer_size: u64,
    /// Oldest retained offset (= `latest_offset` when none is retained).
    pub first_offset: u64,
    /// One past the newest offset ever appended.
    pub latest_offset: u64,
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
}

/// The published state of a queue: what callers and subscribers see. It is advanced only
/// after the changes are durable, together with the live channel (see `hub`).
#[derive(Debug)]
pub(crate) struct QueueState {
    pub view: View,
    pub hub: Hub,
}

impl std::ops::Deref for QueueState {
    type Target = View;
    fn deref(&self) -> &View {
        &self.view
    }
}

/// What every handle of one queue shares.
#[derive(Debug)]
pub(crate) struct QueueShared {
    pub id: u64,
    pub tenant_id: TenantId,
    pub task_id: TaskId,
    pub kind: QueueKind,
    pub created_at: Timestamp,
    pub ttl: Duration,
    pub max_buffer_size: u64,
    pub state: Mutex<QueueState>,
    /// The state as of the writer's latest commit, which may run ahead of the published state
    /// while that commit's log record is being fsync'd. Only the writer thread uses it.
    pub committed: Mutex<View>,
    pub cancel_token: CancellationToken,
    pub subscribers: AtomicUsize,
}

impl QueueShared {
    pub(crate) fn from_record(tenant_id: TenantId, task_id: TaskId, rec: &QueueRecord) -> Self {
        let cancel = rec.cancel.as_ref().map(|c| CancelInfo {
            reason: c.reason.clone(),
            time: Timestamp::from_micros(c.time_us),
        });
        let cancel_token = CancellationToken::new();
        if cancel.is_some() {
            cancel_token.cancel();
        }
        let view = View {
            first_offset: rec.first_offset,
            next_offset: rec.next_offset,
            closed: rec.closed,
            finished_at: rec.finished_at,
            cancel,
            last_activity: Timestamp::from_micros(rec.last_activity_us),
            removed: false,
        };
        Self {
            id: rec.id,
            tenant_id,
            task_id,
            kind: QueueKind::from_code(rec.kind),
            created_at: Timestamp::from_micros(rec.created_at_us),
            ttl: Duration::from_millis(rec.ttl_ms),
            max_buffer_size: rec.max_buffer_size,
            state: Mutex::new(QueueState {
                view: view.clone(),
                hub: Hub::default(),
            }),
            committed: Mutex::new(view),
            cancel_token,
            subscribers: AtomicUsize::new(0),
        }
    }

    /// Locks the state. A panic while holding the lock cannot leave it half-updated (the writer
    /// assigns whole values), so a poisoned lock is recovered.
    pub(crate) fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The writer's view (see `committed`).
    pub(crate) fn committed(&self) -> MutexGuard<'_, View> {
        self.committed.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn record(&self, st: &View) -> QueueRecord {
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
        }
    }

    pub(crate) fn info(&self) -> QueueInfo {
        let st = self.lock();
        QueueInfo {
            task_id: self.task_id.clone(),
            tenant_id: self.tenant_id.clone(),
            kind: self.kind,
            event_count: st.next_offset - st.first_offset,
            subscriber_count: self.subscribers.load(Ordering::Relaxed),
            is_closed: st.closed,
            is_cancelled: st.cancel.is_some(),
            cancel_reason: st.cancel.as_ref().and_then(|c| c.reason.clone()),
            is_finished: st.finished_at.is_some(),
            created_at: self.created_at,
            last_activity: st.last_activity,
            ttl_minutes: self.ttl.as_secs_f64() / 60.0,
            max_buffer_size: self.max_buffer_size,
            first_offset: st.first_offset,
            latest_offset: st.next_offset,
        }
    }
}

/// A handle to one queue. Cheap to clone; all clones share the queue.
///
/// Handles stay usable after the queue is deleted or expires, but every operation then fails
/// with [`Error::QueueNotFound`] (subscriptions simply end).
#[derive(Clone)]
pub struct EventQueue {
    pub(crate) q: Arc<QueueShared>,
    pub(crate) core: Arc<Core>,
}

impl std::fmt::Debug for EventQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventQueue")
            .field("tenant_id", &self.q.tenant_id)
            .field("task_id", &self.q.task_id)
            .finish()
    }
}

impl EventQueue {
    /// The queue's tenant.
    pub fn tenant_id(&self) -> &TenantId {
        &self.q.tenant_id
    }

    /// The queue's task.
    pub fn task_id(&self) -> &TaskId {
        &self.q.task_id
    }

    /// The queue's kind.
    pub fn kind(&self) -> QueueKind {
        self.q.kind
    }

    /// Appends one event and returns its offset once it is durable (see [`crate::Durability`]).
    ///
    /// If the queue still retains an event with the same `event_id`, nothing is appended and
    /// the stored event's offset is returned, so a retry after a timeout creates no duplicate.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidEvent`] / [`Error::InvalidId`] for an invalid event or one whose
    /// `task_id` / `tenant_id` differ from the queue's; [`Error::QueueClosed`];
    /// [`Error::QueueNotFound`] after delete or expiry; [`Error::Storage`] when the commit failed
    /// and [`Error::StoreFailed`] after an earlier failure.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future after it was first polled may still append the event; retry with
    /// the same `event_id` to learn its offset.
    pub async fn enqueue(&self, event: Event) -> Result<u64> {
        let offsets = self.enqueue_batch(vec![event]).await?;
        offsets
            .into_iter()
            .next()
            .ok_or_else(|| Error::storage("writer returned no offset"))
    }

    /// Appends events atomically, in order: all are stored in one commit, or none is.
    /// Returns their offsets (an event already retained reports its stored offset).
    ///
    /// # Errors
    ///
    /// As [`EventQueue::enqueue`]; an invalid event rejects the whole batch.
    pub async fn enqueue_batch(&self, events: Vec<Event>) -> Result<Vec<u64>> {
        self.enqueue_received(events.into_iter().map(|e| (e, false)).collect())
            .await
    }

    /// [`EventQueue::enqueue_batch`] for events received from producers; those flagged `true`
    /// came without an `event_id` (the one they hold was generated on receipt and has been
    /// seen by nobody), so the store gives them an id derived from their offset instead,
    /// which the idempotency index does not need to hold (see
    /// [`crate::store::derived_ids`]).
    pub(crate) async fn enqueue_received(&self, events: Vec<(Event, bool)>) -> Result<Vec<u64>> {
        let prepared = events
            .iter()
            .map(|(e, derive_id)| {
                self.prepare(e).map(|()| {
                    if *derive_id {
                        PreparedEvent::deriving_id(e)
                    } else {
                        PreparedEvent::new(e)
                    }
                })
            })
            .collect::<Result<Vec<_>>>()?;
        if prepared.is_empty() {
            return Ok(Vec::new());
        }
        self.core
            .call(|reply| Command::Append {
                queue: self.q.clone(),
                events: prepared,
                reply,
            })
            .await
    }

    /// Checks that `event` belongs to this queue and is valid.
    fn prepare(&self, event: &Event) -> Result<()> {
        if event.task_id != self.q.task_id {
            return Err(Error::invalid_event(
                "task_id",
                format!(
                    "does not match the queue (expected {}, got {})",
                    self.q.task_id, event.task_id
                ),
            ));
        }
        if event.tenant_id != self.q.tenant_id {
            return Err(Error::invalid_event(
                "tenant_id",
                format!(
                    "does not match the queue (expected {}, got {})",
                    self.q.tenant_id, event.tenant_id
                ),
            ));
        }
        event.validate()
    }

    /// Subscribes from `from_offset` (inclusive). See [`Subscription`] for what it yields.
    ///
    /// # Errors
    ///
    /// [`Error::QueueNotFound`] if the queue was deleted or expired.
    pub fn subscribe(&self, from_offset: u64) -> Result<Subscription> {
        Subscription::new(self.q.clone(), self.core.clone(), from_offset)
    }

    /// One past the newest offset ever appended (dropped events included); 0 when empty.
    pub fn latest_offset(&self) -> u64 {
        self.q.lock().next_offset
    }

    /// The oldest retained offset (equals [`EventQueue::latest_offset`] when none is retained).
    pub fn first_offset(&self) -> u64 {
        self.q.lock().first_offset
    }

    /// The queue's info object.
    pub fn info(&self) -> QueueInfo {
        self.q.info()
    }

    /// Requests cancellation; persisted. Appends no event and ends no stream: the producer
    /// sees the token and emits `status: cancelled` itself. Cancelling twice keeps the first
    /// reason.
    ///
    /// # Errors
    ///
    /// [`Error::TaskFinished`] if a terminal event was enqueued; [`Error::QueueNotFound`];
    /// storage errors as for enqueue.
    pub async fn cancel(&self, reason: Option<&str>) -> Result<()> {
        let reason = reason.map(str::to_string);
        self.core
            .call(|reply| Command::Cancel {
                queue: self.q.clone(),
                reason,
                reply,
            })
            .await
    }

    /// The cancellation state (seed: `cancellation_token`).
    pub fn cancellation(&self) -> CancellationState {
        let st = self.q.lock();
        match &st.cancel {
            Some(c) => CancellationState {
                is_cancelled: true,
                reason: c.reason.clone(),
                cancel_time: Some(c.time),
            },
            None => CancellationState::default(),
        }
    }

    /// A token that is cancelled when the task is; `token.cancelled().await` waits for it.
    pub fn cancellation_token(&self) -> CancellationToken {
        self.q.cancel_token.clone()
    }

    /// Whether cancellation was requested.
    pub fn is_cancelled(&self) -> bool {
        self.q.cancel_token.is_cancelled()
    }

    /// Closes the queue to producers; persisted and idempotent. Subscribers receive everything
    /// enqueued before the close, then end. The queue stays replayable until it expires or is
    /// deleted.
    ///
    /// # Errors
    ///
    /// [`Error::QueueNotFound`]; storage errors as for enqueue.
    pub async fn close(&self) -> Result<()> {
        self.core
            .call(|reply| Command::Close {
                queue: self.q.clone(),
                reply,
            })
            .await
    }

    /// Whether the queue is closed.
    pub fn is_closed(&self) -> bool {
        self.q.lock().closed
    }

    /// Whether a terminal event was enqueued.
    pub fn is_finished(&self) -> bool {
        self.q.lock().finished_at.is_some()
    }

    /// Offset of the first terminal event, if any.
    pub fn finished_at(&self) -> Option<u64> {
        self.q.lock().finished_at
    }

    /// Whether the queue currently holds a live broadcast channel (it does only while it has
    /// subscribers).
    pub fn has_live_channel(&self) -> bool {
        self.q.lock().hub.is_open()
    }
}
