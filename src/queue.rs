//! [`EventQueue`]: the handle producers and subscribers use for one `(tenant, task)` queue.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::engine::{Core, PreparedEvent, QueueState};
use crate::error::{Error, Result};
use crate::event::{Event, Received, Timestamp};
use crate::ids::{EventId, TaskId, TenantId};
use crate::subscription::Subscription;

pub use crate::engine::QueueKind;

/// Options for creating a queue; unset fields take the manager's defaults.
#[derive(Debug, Clone, Default)]
pub struct QueueOptions {
    /// Kind of the queue. Default [`QueueKind::Task`].
    pub kind: QueueKind,
    /// Idle time after which the queue expires. Default: the manager's (30 min).
    pub ttl: Option<Duration>,
    /// Most retained events. Default: the manager's (1000).
    pub max_buffer_size: Option<u64>,
    /// A stream's content type (kind [`QueueKind::Stream`], the Durable Streams protocol).
    pub content_type: Option<String>,
    /// A stream's absolute expiry (the protocol's `Stream-Expires-At`): it expires then
    /// whatever its activity, besides its idle TTL.
    pub expires_at: Option<Timestamp>,
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

impl QueueInfo {
    /// The info of a queue's published state.
    pub(crate) fn of(q: &QueueState) -> Self {
        let subscriber_count = q.subscribers();
        q.with_view(|st| QueueInfo {
            task_id: q.task_id().clone(),
            tenant_id: q.tenant_id().clone(),
            kind: q.kind(),
            event_count: st.next_offset - st.first_offset,
            subscriber_count,
            is_closed: st.closed,
            is_cancelled: st.cancel.is_some(),
            cancel_reason: st.cancel.as_ref().and_then(|c| c.reason.clone()),
            is_finished: st.finished_at.is_some(),
            created_at: q.created_at(),
            last_activity: st.last_activity,
            ttl_minutes: q.ttl().as_secs_f64() / 60.0,
            max_buffer_size: q.max_buffer_size(),
            first_offset: st.first_offset,
            latest_offset: st.next_offset,
        })
    }
}

/// A handle to one queue. Cheap to clone; all clones share the queue.
///
/// Handles stay usable after the queue is deleted or expires, but every operation then fails
/// with [`Error::QueueNotFound`] (subscriptions simply end).
#[derive(Clone)]
pub struct EventQueue {
    q: Arc<QueueState>,
    core: Arc<Core>,
}

impl std::fmt::Debug for EventQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventQueue")
            .field("tenant_id", self.q.tenant_id())
            .field("task_id", self.q.task_id())
            .finish()
    }
}

impl EventQueue {
    pub(crate) fn new(q: Arc<QueueState>, core: Arc<Core>) -> Self {
        EventQueue { q, core }
    }

    /// The engine this handle belongs to.
    pub(crate) fn core(&self) -> &Arc<Core> {
        &self.core
    }

    /// The queue's tenant.
    pub fn tenant_id(&self) -> &TenantId {
        self.q.tenant_id()
    }

    /// The queue's task.
    pub fn task_id(&self) -> &TaskId {
        self.q.task_id()
    }

    /// The queue's kind.
    pub fn kind(&self) -> QueueKind {
        self.q.kind()
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
            .ok_or_else(|| Error::internal("the writer returned no offset"))
    }

    /// Appends events atomically, in order: all are stored in one commit, or none is.
    /// Returns their offsets (an event already retained reports its stored offset).
    ///
    /// # Errors
    ///
    /// As [`EventQueue::enqueue`]; an invalid event rejects the whole batch.
    pub async fn enqueue_batch(&self, events: Vec<Event>) -> Result<Vec<u64>> {
        let prepared = events
            .iter()
            .map(|e| self.prepare(e).map(|()| PreparedEvent::new(e)))
            .collect::<Result<Vec<_>>>()?;
        self.append_prepared(prepared).await
    }

    /// [`EventQueue::enqueue_batch`] for events a producer sent, read for this queue by
    /// `event::ReceivedReader` (which checked them against the queue and validated them) and
    /// already rendered. Those that came without an `event_id` (the one they hold was
    /// generated on receipt and has been seen by nobody) get an id derived from their offset
    /// from a store that derives ids, which the idempotency index does not need to hold.
    #[cfg_attr(not(feature = "server"), allow(dead_code))]
    pub(crate) async fn enqueue_received(&self, events: Vec<Received>) -> Result<Vec<u64>> {
        let prepared = events.into_iter().map(PreparedEvent::received).collect();
        self.append_prepared(prepared).await
    }

    async fn append_prepared(&self, prepared: Vec<PreparedEvent>) -> Result<Vec<u64>> {
        if prepared.is_empty() {
            return Ok(Vec::new());
        }
        self.core.append(self.q.clone(), prepared).await
    }

    /// Appends Durable Streams messages (a queue of kind [`QueueKind::Stream`]) atomically, in
    /// order, each stored exactly as given. A message with an id (an idempotent producer's)
    /// that the queue still retains is not appended again: its stored offset is returned.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidEvent`] when the queue holds typed events; otherwise as
    /// [`EventQueue::enqueue`].
    #[cfg_attr(not(feature = "server"), allow(dead_code))]
    pub(crate) async fn append_messages(
        &self,
        messages: Vec<(&[u8], Option<EventId>)>,
    ) -> Result<Vec<u64>> {
        if self.q.kind() != QueueKind::Stream {
            return Err(Error::invalid_event(
                "kind",
                "messages go to streams only; this queue holds typed events",
            ));
        }
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        let prepared = messages
            .into_iter()
            .map(|(data, id)| PreparedEvent::message(data, id))
            .collect();
        self.core.append(self.q.clone(), prepared).await
    }

    /// A Durable Streams append to a stream (kind [`QueueKind::Stream`]): the idempotent
    /// producer's and `Stream-Seq`'s checks, the messages (each stored as given, with its id
    /// when it has one), the producer's new state and, with `close`, the close, in one commit
    /// (see `engine::StreamAppend`). Answers once durable.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidEvent`] when the queue holds typed events; [`Error::QueueNotFound`]
    /// once it was removed; storage errors. The protocol's refusals are answers, not errors.
    #[cfg_attr(not(feature = "server"), allow(dead_code))]
    pub(crate) async fn stream_append(
        &self,
        messages: Vec<(&[u8], Option<EventId>)>,
        producer: Option<crate::engine::ProducerClaim>,
        stream_seq: Option<String>,
        close: bool,
    ) -> Result<crate::engine::StreamAppended> {
        if self.q.kind() != QueueKind::Stream {
            return Err(Error::invalid_event(
                "kind",
                "messages go to streams only; this queue holds typed events",
            ));
        }
        let messages = messages
            .into_iter()
            .map(|(data, id)| PreparedEvent::message(data, id))
            .collect();
        self.core
            .stream_append(crate::engine::StreamAppend {
                queue: self.q.clone(),
                messages,
                producer,
                stream_seq,
                close,
            })
            .await
    }

    /// A stream's absolute expiry (the protocol's `Stream-Expires-At`), if it has one.
    pub fn expires_at(&self) -> Option<Timestamp> {
        self.q.expires_at()
    }

    /// A stream's content type (kind [`QueueKind::Stream`]); `None` for typed event queues.
    pub fn content_type(&self) -> Option<&str> {
        self.q.content_type()
    }

    /// Checks that `event` belongs to this queue and is valid.
    pub(crate) fn prepare(&self, event: &Event) -> Result<()> {
        if &event.task_id != self.q.task_id() {
            return Err(Error::invalid_event(
                "task_id",
                format!(
                    "does not match the queue (expected {}, got {})",
                    self.q.task_id(),
                    event.task_id
                ),
            ));
        }
        if &event.tenant_id != self.q.tenant_id() {
            return Err(Error::invalid_event(
                "tenant_id",
                format!(
                    "does not match the queue (expected {}, got {})",
                    self.q.tenant_id(),
                    event.tenant_id
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

    /// Starts a read of the stored events in `from..to` on the blocking pool, without a
    /// subscription (see `Storage::read_each` for `limit` and `max_bytes`): `each` gets every
    /// event's offset and JSON, lent from the store's read, with `state`, which the read then
    /// returns. For a reader that wants the stored bytes below a tail it took from
    /// [`EventQueue::latest_offset`] (published, so stored and synced) and nothing live, such
    /// as a Durable Streams catch-up read. Offsets missing were trimmed; no event at all means
    /// nothing of `from..to` is retained (or the queue was deleted).
    #[cfg_attr(not(feature = "server"), allow(dead_code))]
    pub(crate) fn spawn_read_each<S: Send + 'static>(
        &self,
        from: u64,
        to: u64,
        limit: usize,
        max_bytes: usize,
        mut state: S,
        each: fn(&mut S, u64, &[u8]),
    ) -> tokio::task::JoinHandle<Result<S>> {
        let (core, qid) = (self.core.clone(), self.q.id());
        tokio::spawn(async move {
            core.on_storage(move |storage| {
                storage.read_each(qid, from, to, limit, max_bytes, &mut |offset, json| {
                    each(&mut state, offset, json)
                })?;
                Ok(state)
            })
            .await
        })
    }

    /// One past the newest offset ever appended (dropped events included); 0 when empty.
    pub fn latest_offset(&self) -> u64 {
        self.q.with_view(|v| v.next_offset)
    }

    /// The oldest retained offset (equals [`EventQueue::latest_offset`] when none is retained).
    pub fn first_offset(&self) -> u64 {
        self.q.with_view(|v| v.first_offset)
    }

    /// The queue's info object.
    pub fn info(&self) -> QueueInfo {
        QueueInfo::of(&self.q)
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
        self.core.cancel(self.q.clone(), reason).await
    }

    /// The cancellation state (seed: `cancellation_token`).
    pub fn cancellation(&self) -> CancellationState {
        self.q.with_view(|st| match &st.cancel {
            Some(c) => CancellationState {
                is_cancelled: true,
                reason: c.reason.clone(),
                cancel_time: Some(c.time),
            },
            None => CancellationState::default(),
        })
    }

    /// A token that is cancelled when the task is; `token.cancelled().await` waits for it.
    pub fn cancellation_token(&self) -> CancellationToken {
        self.q.cancel_token().clone()
    }

    /// Whether cancellation was requested.
    pub fn is_cancelled(&self) -> bool {
        self.q.cancel_token().is_cancelled()
    }

    /// Closes the queue to producers; persisted and idempotent. Subscribers receive everything
    /// enqueued before the close, then end. The queue stays replayable until it expires or is
    /// deleted.
    ///
    /// # Errors
    ///
    /// [`Error::QueueNotFound`]; storage errors as for enqueue.
    pub async fn close(&self) -> Result<()> {
        self.core.close(self.q.clone()).await
    }

    /// Whether nothing can come from offset `from` on: past the terminal event, or at or past
    /// the end of a closed queue (a stream from there answers 204). For the server's routes.
    #[cfg_attr(not(feature = "server"), allow(dead_code))]
    pub(crate) fn nothing_from(&self, from: u64) -> bool {
        self.q.with_view(|v| v.nothing_from(from))
    }

    /// Whether the queue is closed.
    pub fn is_closed(&self) -> bool {
        self.q.with_view(|v| v.closed)
    }

    /// Whether a terminal event was enqueued.
    pub fn is_finished(&self) -> bool {
        self.q.with_view(|v| v.finished_at.is_some())
    }

    /// Offset of the first terminal event, if any.
    pub fn finished_at(&self) -> Option<u64> {
        self.q.with_view(|v| v.finished_at)
    }

    /// Whether the queue currently holds a live broadcast channel (it does only while it has
    /// subscribers).
    pub fn has_live_channel(&self) -> bool {
        self.q.has_live_channel()
    }
}
