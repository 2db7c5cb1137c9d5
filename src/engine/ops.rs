//! The write operations, each with its own typed reply.
//!
//! A front end sends an [`Op`] to the writer thread (through [`super::Core`]'s methods). Each
//! variant is a [`Call`] of its arguments and a reply channel typed by what the operation
//! answers. When the writer applies an op it pairs that channel with the op's result in an
//! [`Answered`] of the same type, so a reply can only ever carry its own operation's kind of
//! result: nothing is matched back at run time.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::oneshot;

use super::state::{QueueKind, QueueState};
use crate::error::{Error, Result};
use crate::event::{Event, EventType, Received, RenderedEvent, Timestamp};
use crate::ids::{EventId, TaskId, TenantId};
use crate::storage::{CheckpointRecord, DERIVED_LEN, EventMeta, WriteBatch};

/// The channel an operation's caller waits on. Dropped unanswered while its thread panics
/// (a bug in the pipeline), it answers [`Error::Poisoned`] naming that thread, so the caller
/// learns why rather than meeting a closed channel.
pub(crate) struct Reply<T>(Option<oneshot::Sender<Result<T>>>);

impl<T> Reply<T> {
    pub(super) fn new(tx: oneshot::Sender<Result<T>>) -> Self {
        Reply(Some(tx))
    }

    pub(super) fn send(mut self, result: Result<T>) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(result);
        }
    }
}

impl<T> Drop for Reply<T> {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take()
            && std::thread::panicking()
        {
            let _ = tx.send(Err(Error::Poisoned(panicking_thread())));
        }
    }
}

/// The pipeline thread that is panicking, by role (its name without the crate's prefix).
pub(super) fn panicking_thread() -> std::sync::Arc<str> {
    let thread = std::thread::current();
    let name = thread.name().unwrap_or("worker");
    std::sync::Arc::from(name.strip_prefix("eventqueue-").unwrap_or(name))
}

/// An operation's arguments and its typed reply channel.
pub(crate) struct Call<A, T> {
    pub(super) args: A,
    pub(super) reply: Reply<T>,
}

impl<A, T> Call<A, T> {
    pub(super) fn new(args: A, reply: Reply<T>) -> Self {
        Call { args, reply }
    }

    /// Answers with an error without applying the operation.
    pub(super) fn refuse(self, e: Error) {
        self.reply.send(Err(e));
    }
}

/// What the writer is asked to do.
pub(crate) enum Op {
    /// Appends events to a queue; answers their offsets.
    Append(Call<Append, Vec<u64>>),
    /// A Durable Streams append: producer check, messages and close in one commit.
    StreamAppend(Call<StreamAppend, StreamAppended>),
    /// Creates a queue.
    Create(Call<NewQueue, Arc<QueueState>>),
    /// Closes a queue to producers.
    Close(Call<Arc<QueueState>, ()>),
    /// Cancels a task.
    Cancel(Call<Cancel, ()>),
    /// Removes a queue and its events; answers whether it was removed.
    Delete(Call<Delete, bool>),
    /// Saves a workflow checkpoint and appends its events, atomically.
    SaveCheckpoint(Call<Box<PreparedSave>, SavedCheckpoint>),
    /// Syncs everything committed so far (a flush in buffered durability).
    Flush(Call<(), ()>),
    /// Commits what is queued, syncs, and stops.
    Shutdown(Call<(), ()>),
}

impl Op {
    /// Events the op appends (for the size of a group commit).
    pub(super) fn event_count(&self) -> usize {
        match self {
            Op::Append(call) => call.args.events.len(),
            Op::StreamAppend(call) => call.args.messages.len().max(1),
            _ => 1,
        }
    }

    /// Whether the op adds data (refused while the store is short of room).
    pub(super) fn adds_data(&self) -> bool {
        matches!(
            self,
            Op::Append(_) | Op::StreamAppend(_) | Op::Create(_) | Op::SaveCheckpoint(_)
        )
    }

    /// Answers with an error without applying the op.
    pub(super) fn refuse(self, e: Error) {
        match self {
            Op::Append(c) => c.refuse(e),
            Op::StreamAppend(c) => c.refuse(e),
            Op::Create(c) => c.refuse(e),
            Op::Close(c) => c.refuse(e),
            Op::Cancel(c) => c.refuse(e),
            Op::Delete(c) => c.refuse(e),
            Op::SaveCheckpoint(c) => c.refuse(e),
            Op::Flush(c) => c.refuse(e),
            Op::Shutdown(c) => c.refuse(e),
        }
    }
}

/// [`Op::Append`]'s arguments.
pub(crate) struct Append {
    pub queue: Arc<QueueState>,
    pub events: Vec<PreparedEvent>,
}

/// [`Op::StreamAppend`]'s arguments. The writer checks the producer (and `Stream-Seq`)
/// against the stream's committed state, appends and updates that state in the same batch:
/// two requests racing, or two nodes over one shared store, cannot both pass the check, and
/// a crash keeps both the data and the state that recognises its retry, or neither.
pub(crate) struct StreamAppend {
    pub queue: Arc<QueueState>,
    /// The messages; none for a close alone.
    pub messages: Vec<PreparedEvent>,
    /// `Producer-Id` / `Producer-Epoch` / `Producer-Seq`.
    pub producer: Option<ProducerClaim>,
    /// `Stream-Seq`: must exceed the last one (compared as bytes).
    pub stream_seq: Option<String>,
    /// `Stream-Closed: true`: the stream closes in the same commit as the messages.
    pub close: bool,
}

/// An idempotent producer's claim on a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ProducerClaim {
    pub id: String,
    pub epoch: u64,
    pub seq: u64,
}

/// What a [`StreamAppend`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StreamAppended {
    /// Stored (a close alone stores only the close); the stream's next offset after it and
    /// whether it is now closed.
    Appended { next_offset: u64, closed: bool },
    /// The producer's request was stored before: nothing stored now. `last_seq` is the
    /// producer's newest accepted sequence number.
    Duplicate {
        next_offset: u64,
        last_seq: u64,
        closed: bool,
    },
    /// The producer's epoch is older than the stream's `current` one for it.
    StaleEpoch { current: u64 },
    /// A sequence number was skipped: `expected` comes next.
    SeqGap { expected: u64 },
    /// A new epoch must start at sequence number 0.
    EpochStartsAtZero,
    /// `Stream-Seq` did not increase.
    StreamSeqRegression,
    /// The stream is closed; its final next offset.
    Closed { next_offset: u64 },
}

/// [`Op::Cancel`]'s arguments.
pub(crate) struct Cancel {
    pub queue: Arc<QueueState>,
    pub reason: Option<String>,
}

/// [`Op::Delete`]'s arguments.
pub(crate) struct Delete {
    pub queue: Arc<QueueState>,
    /// Expiry: remove only if the queue's last activity plus its TTL is at or before this
    /// time (checked again in the batch, so an event that arrived meanwhile keeps the queue).
    pub expire_at: Option<Timestamp>,
}

/// Resolved creation parameters ([`Op::Create`]).
#[derive(Debug, Clone)]
pub(crate) struct NewQueue {
    pub tenant: TenantId,
    pub task: TaskId,
    pub kind: QueueKind,
    pub ttl: Duration,
    pub max_buffer_size: u64,
    /// A stream's content type ([`QueueKind::Stream`]).
    pub content_type: Option<String>,
    /// A stream's absolute expiry (`Stream-Expires-At`), which activity does not extend.
    pub expires_at: Option<Timestamp>,
}

/// A checkpoint save, prepared by its caller ([`Op::SaveCheckpoint`]).
pub(crate) struct PreparedSave {
    pub tenant: TenantId,
    pub workflow: TaskId,
    pub record: CheckpointRecord,
    /// The workflow's queue as found when the save was prepared. If it is gone by the time
    /// the writer applies the save, the save goes ahead without events.
    pub queue: Option<Arc<QueueState>>,
    pub events: Vec<PreparedEvent>,
    /// Fault injection: fail between the checkpoint's write and the events' append.
    pub inject: Option<Error>,
}

/// What a save stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct SavedCheckpoint {
    /// The new checkpoint's id, `ckpt_` + 12 lowercase hex chars.
    pub checkpoint_id: String,
    /// Its position in the workflow's history (0 for the first save).
    pub seq: u64,
    /// Offset of the `status` event it emitted (`None` without a queue).
    pub status_offset: Option<u64>,
    /// Offset of the `progress` event it emitted (`None` without a queue or without tasks).
    pub progress_offset: Option<u64>,
}

/// An applied operation: its call (arguments and reply channel) with its result, sent once
/// the batch is acknowledged. It keeps its arguments so that a batch a shared store refused
/// as stale can be applied again ([`Answer::into_op`]).
pub(super) struct Answered<A, T> {
    call: Call<A, T>,
    result: Result<T>,
}

/// Every kind of [`Answered`], one per [`Op`] variant; each pairs a reply with a result of its
/// own type.
pub(super) enum Answer {
    Append(Answered<Append, Vec<u64>>),
    StreamAppend(Answered<StreamAppend, StreamAppended>),
    Create(Answered<NewQueue, Arc<QueueState>>),
    Close(Answered<Arc<QueueState>, ()>),
    Cancel(Answered<Cancel, ()>),
    Delete(Answered<Delete, bool>),
    Save(Answered<Box<PreparedSave>, SavedCheckpoint>),
    Flush(Answered<(), ()>),
    Shutdown(Answered<(), ()>),
}

impl<A, T> Answered<A, T> {
    /// Pairs `call` with `result`: the op's own result, or the error that failed the batch.
    pub(super) fn new(call: Call<A, T>, result: Result<T>) -> Self {
        Answered { call, result }
    }

    fn send(self) {
        self.call.reply.send(self.result);
    }

    fn fail(self, e: Error) {
        self.call.reply.send(Err(e));
    }
}

/// Runs `$body` on the [`Answered`] inside whichever variant `$answer` is.
macro_rules! each_answer {
    ($answer:expr, $a:ident => $body:expr) => {
        match $answer {
            Answer::Append($a) => $body,
            Answer::StreamAppend($a) => $body,
            Answer::Create($a) => $body,
            Answer::Close($a) => $body,
            Answer::Cancel($a) => $body,
            Answer::Delete($a) => $body,
            Answer::Save($a) => $body,
            Answer::Flush($a) => $body,
            Answer::Shutdown($a) => $body,
        }
    };
}

impl Answer {
    /// Sends the result (the batch was committed and, where required, synced).
    pub(super) fn send(self) {
        each_answer!(self, a => a.send())
    }

    /// Sends `e` instead (the batch failed).
    pub(super) fn fail(self, e: Error) {
        each_answer!(self, a => a.fail(e))
    }

    /// The op again, its result dropped (its batch was not stored and is rebuilt).
    pub(super) fn into_op(self) -> Op {
        match self {
            Answer::Append(a) => Op::Append(a.call),
            Answer::StreamAppend(a) => Op::StreamAppend(a.call),
            Answer::Create(a) => Op::Create(a.call),
            Answer::Close(a) => Op::Close(a.call),
            Answer::Cancel(a) => Op::Cancel(a.call),
            Answer::Delete(a) => Op::Delete(a.call),
            Answer::Save(a) => Op::SaveCheckpoint(a.call),
            Answer::Flush(a) => Op::Flush(a.call),
            Answer::Shutdown(a) => Op::Shutdown(a.call),
        }
    }
}

/// An event validated and rendered by its producer, waiting for its offset.
#[derive(Debug)]
pub(crate) struct PreparedEvent {
    pub(super) event_id: EventId,
    pub(super) event_type: EventType,
    pub(super) terminal: bool,
    timestamp_us: i64,
    rendered: RenderedEvent,
    /// The producer gave no id: the store may derive it from the offset at commit (see
    /// [`WriteBatch::derived_id`]); `event_id` and the id in `rendered` are placeholders of
    /// the same length.
    derive_id: bool,
    /// A stream message stored as given: `rendered.prefix` is the whole payload, with no
    /// offset spliced in and no id inside it.
    raw: bool,
}

/// Where the id sits in a rendered event: `{"event_id":"` comes first.
const ID_AT: usize = br#"{"event_id":""#.len();

impl PreparedEvent {
    /// Renders `event` (on the caller's thread, so JSON encoding runs in parallel across
    /// producers; the writer only splices in the offset).
    pub(crate) fn new(event: &Event) -> Self {
        Self {
            event_id: event.event_id.clone(),
            event_type: event.event_type(),
            terminal: event.is_terminal(),
            timestamp_us: event.timestamp.as_micros(),
            rendered: event.render(),
            derive_id: false,
            raw: false,
        }
    }

    /// A Durable Streams message (a queue of kind `stream`), stored exactly as given. With
    /// `event_id` (an idempotent producer's) it is indexed like an event's id, so a repeat is
    /// found; without, it gets an id derived from its offset where the store derives ids.
    pub(crate) fn message(data: &[u8], event_id: Option<EventId>) -> Self {
        let derive_id = event_id.is_none();
        Self {
            event_id: event_id.unwrap_or_else(EventId::generate),
            event_type: EventType::Message,
            terminal: false,
            timestamp_us: Timestamp::now().as_micros(),
            rendered: RenderedEvent {
                prefix: data.to_vec(),
                suffix: Vec::new(),
            },
            derive_id,
            raw: true,
        }
    }

    /// An event a producer sent, parsed and rendered on receipt (no [`Event`] in between).
    /// When the producer gave no id (its `event_id` was generated on receipt and nobody has
    /// seen it), a store that derives ids replaces it with one derived from the offset, which
    /// needs no idempotency-index entry.
    #[cfg_attr(not(feature = "server"), allow(dead_code))]
    pub(crate) fn received(event: Received) -> Self {
        let mut prepared = Self {
            event_id: event.event_id,
            event_type: event.event_type,
            terminal: event.terminal,
            timestamp_us: event.timestamp.as_micros(),
            rendered: event.rendered,
            derive_id: false,
            raw: false,
        };
        let id = prepared.event_id.as_str().as_bytes();
        // Generated ids have the derived ids' length; anything else keeps its own id.
        prepared.derive_id = event.generated_id
            && id.len() == DERIVED_LEN
            && prepared.rendered.prefix.get(..ID_AT) == Some(br#"{"event_id":""#.as_slice())
            && prepared.rendered.prefix.get(ID_AT..ID_AT + DERIVED_LEN) == Some(id);
        prepared
    }

    /// Whether the event's id was generated on receipt (its producer gave none): nobody has
    /// seen it, so no stored event can have been sent with it, and it needs no idempotency
    /// lookup. (Were a random id ever to equal a stored one, the event would be stored beside
    /// it rather than taken for a repeat: nothing is lost.)
    pub(super) fn id_is_generated(&self) -> bool {
        self.derive_id
    }

    /// The id the store gives this event at `offset` of queue `qid`, when it derives it.
    pub(super) fn derived_id(
        &self,
        w: &dyn WriteBatch,
        qid: u64,
        offset: u64,
    ) -> Option<[u8; DERIVED_LEN]> {
        if self.derive_id {
            w.derived_id(qid, offset)
        } else {
            None
        }
    }

    /// The stored record (the store's header, then the JSON with `offset`, and with
    /// `derived` as its id when given) and where its JSON starts.
    pub(super) fn encode(
        &self,
        w: &dyn WriteBatch,
        offset: u64,
        derived: Option<&[u8; DERIVED_LEN]>,
    ) -> Result<(Vec<u8>, usize)> {
        let event_id = match derived {
            // Derived ids are ASCII.
            Some(id) => std::str::from_utf8(id).map_err(Error::internal)?,
            None => self.event_id.as_str(),
        };
        let meta = EventMeta {
            event_type: self.event_type.code(),
            terminal: self.terminal,
            timestamp_us: self.timestamp_us,
            event_id,
        };
        let r = &self.rendered;
        if self.raw {
            let (mut buf, start) = w.event_record(&meta, r.prefix.len())?;
            buf.extend_from_slice(&r.prefix);
            return Ok((buf, start));
        }
        let (mut buf, start) = w.event_record(&meta, r.prefix.len() + r.suffix.len() + 20)?;
        buf.extend_from_slice(&r.prefix);
        if let Some(id) = derived {
            // `deriving_id` checked that the placeholder sits there, with this length.
            buf[start + ID_AT..start + ID_AT + DERIVED_LEN].copy_from_slice(id);
        }
        let mut digits = [0u8; 20];
        buf.extend_from_slice(crate::event::decimal(offset, &mut digits));
        buf.extend_from_slice(&r.suffix);
        Ok((buf, start))
    }
}
