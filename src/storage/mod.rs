//! The storage seam: everything the engine needs from a store, as one trait ([`Storage`]) and
//! the plain types it speaks in. No backend's types appear here; [`redb`] (the embedded
//! database plus a write-ahead log) is the first implementation.
//!
//! # The contract
//!
//! The engine (`crate::engine`) owns the rules: it assigns offsets, checks closed / cancelled
//! / finished states, decides trims, and builds each group commit as one batch through
//! [`Storage::begin`] → [`WriteBatch`] → [`WriteBatch::commit`]. A store keeps the data and
//! answers the lookups a batch needs. What every store must guarantee:
//!
//! - **One writer.** The engine builds at most one batch at a time, on its writer thread.
//!   Lookups on a batch ([`WriteBatch::find_event_id`], [`WriteBatch::checkpoint_id_taken`],
//!   the sequence number [`WriteBatch::put_checkpoint`] returns) see every batch committed
//!   before it and the batch's own earlier changes.
//! - **Atomic batches.** [`WriteBatch::commit`] stores all of a batch's changes or none. A
//!   batch dropped without a commit leaves nothing behind. A workflow checkpoint and the events
//!   it emits are changes of one batch, so they are stored together or not at all.
//! - **Durable when synced.** After `commit` returns, the batch survives a process kill once
//!   [`Storage::sync`] returns (called by the engine's acknowledging thread, which may run
//!   while the next batch is built and committed). A store whose commits are durable by
//!   themselves (or never, as in memory) makes `sync` a no-op. Nothing is acknowledged to a
//!   caller before the sync that covers its batch (in immediate durability).
//! - **Readers.** [`Storage::read_range`] and the checkpoint reads see every committed batch
//!   (they may see a batch before it is synced: the engine publishes offsets to subscribers
//!   only after the sync, and subscribers read only below the published offset). Reads never
//!   block a commit for long and may run on any blocking thread.
//! - **Shared stores.** A store several processes write to (Redis) checks, in the same atomic
//!   step as the commit, that each queue the batch changes is still in the state the batch
//!   was built on, and otherwise stores nothing and answers [`WriteError::Stale`] with those
//!   queues' current records. The engine takes them in and rebuilds the batch from the same
//!   operations; only it assigns offsets and applies the rules, always against the newest
//!   state.
//! - **Failures.** [`WriteError::Rejected`]: nothing of the batch was stored and the store can
//!   take the next batch (a full disk); on a shared store, possibly stored but not confirmed
//!   (see there). [`WriteError::Fatal`]: the store may no longer match
//!   what callers were told; the engine refuses writes until it is reopened, where recovery
//!   keeps exactly the batches that reached stable storage.
//!
//! Opening is each store's own constructor (its settings differ): it recovers what the store
//! holds and returns the store with a [`Recovered`] — every queue's record, the next queue id,
//! and the deletions still to purge — from which the engine rebuilds its state.
//!
//! Every method may block (on disk or network I/O): the engine calls them from its own
//! threads or `spawn_blocking`, never on an async worker. A networked store blocks on its own
//! client runtime there.

pub(crate) mod memory;
pub(crate) mod redb;
pub(crate) mod redis;

use std::any::Any;
use std::collections::{HashMap, HashSet};
use std::ops::Range;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::ids::EventId;

/// Length of an event id a store derives from the offset (see [`WriteBatch::derived_id`]).
pub(crate) const DERIVED_LEN: usize = 16;

/// One stored event, as read back for replay.
#[derive(Debug, Clone)]
pub(crate) struct StoredEvent {
    pub offset: u64,
    pub event_type: u8,
    pub terminal: bool,
    /// The event's JSON, offset included.
    pub json: Bytes,
}

/// A queue's durable record: its settings and the state of its offsets and lifecycle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct QueueRecord {
    pub id: u64,
    pub kind: u8,
    pub created_at_us: i64,
    pub last_activity_us: i64,
    pub ttl_ms: u64,
    pub max_buffer_size: u64,
    pub first_offset: u64,
    pub next_offset: u64,
    pub closed: bool,
    pub finished_at: Option<u64>,
    pub cancel: Option<CancelRecord>,
    /// A Durable Streams stream's content type (`None` for typed event queues). Not part of
    /// the serde encoding: a store keeps it beside the record (redb: after it, so records of
    /// typed queues keep their bytes and older records still decode).
    #[serde(skip)]
    pub content_type: Option<String>,
    /// A Durable Streams stream's own state (absolute expiry, idempotent producers): kept
    /// beside the record as the content type is, and committed with the batch that changes
    /// it, so a producer's check and its data are one commit. `None` for typed event queues.
    #[serde(skip)]
    pub stream: Option<StreamRecord>,
}

/// Most idempotent producers a stream remembers. A producer drops out only after this many
/// others wrote to the stream more recently; its state then starts afresh, which stays safe:
/// a retry with a sequence number past 0 is a gap (`409`, nothing stored), and a retry the
/// stream still retains is recognised by its messages' ids (see `durable_streams`). Keeps the
/// record, rewritten with every commit that changes it, bounded.
pub(crate) const MAX_PRODUCERS: usize = 1024;

/// A stream's state beside its queue record (see [`QueueRecord::stream`]).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub(crate) struct StreamRecord {
    /// `Stream-Expires-At`: when the stream expires whatever its activity (µs since the
    /// epoch).
    pub expires_at_us: Option<i64>,
    /// The idempotent producers' state.
    pub producers: Producers,
}

/// What a stream's idempotent producers (`Producer-Id` / `Producer-Epoch` / `Producer-Seq`)
/// and `Stream-Seq` writers last did.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub(crate) struct Producers {
    /// Each producer's epoch, last sequence number and when it last wrote (the stream's next
    /// offset then, for [`MAX_PRODUCERS`]).
    pub by_id: std::collections::BTreeMap<String, ProducerState>,
    /// The producer request (`id`, epoch, seq) that closed the stream: its retry is a
    /// duplicate.
    pub closed_by: Option<(String, u64, u64)>,
    /// The last `Stream-Seq` appended with.
    pub last_stream_seq: Option<String>,
}

/// One producer's state (see [`Producers`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ProducerState {
    pub epoch: u64,
    pub last_seq: u64,
    /// The stream's next offset after the producer's last write.
    pub at: u64,
}

impl Producers {
    /// Takes in `other` (a newer record of the same stream from a shared store, or a batch's):
    /// each producer's state only moves forward (epoch, then sequence number), so keeping the
    /// further of each gives the newest whatever the order.
    pub(crate) fn merge(&mut self, other: &Producers) {
        for (id, theirs) in &other.by_id {
            match self.by_id.get_mut(id) {
                Some(ours) => {
                    if (theirs.epoch, theirs.last_seq, theirs.at)
                        > (ours.epoch, ours.last_seq, ours.at)
                    {
                        *ours = *theirs;
                    }
                }
                None => {
                    self.by_id.insert(id.clone(), *theirs);
                }
            }
        }
        if self.closed_by.is_none() {
            self.closed_by.clone_from(&other.closed_by);
        }
        if other.last_stream_seq.as_deref().map(str::as_bytes)
            > self.last_stream_seq.as_deref().map(str::as_bytes)
        {
            self.last_stream_seq.clone_from(&other.last_stream_seq);
        }
        self.bound();
    }

    /// Forgets the producers that wrote least recently beyond [`MAX_PRODUCERS`].
    pub(crate) fn bound(&mut self) {
        while self.by_id.len() > MAX_PRODUCERS {
            let Some(oldest) = self
                .by_id
                .iter()
                .min_by_key(|(_, p)| p.at)
                .map(|(id, _)| id.clone())
            else {
                return;
            };
            self.by_id.remove(&oldest);
        }
    }
}

/// A persisted cancellation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct CancelRecord {
    pub reason: Option<String>,
    pub time_us: i64,
}

/// A stored workflow checkpoint. Free-form JSON (the workflow's state, task results) is kept
/// as JSON text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct CheckpointRecord {
    pub checkpoint_id: String,
    pub status: String,
    pub current_phase: u64,
    pub total_phases: u64,
    pub tasks: Vec<TaskRecord>,
    pub state_json: Vec<u8>,
    pub created_at_us: i64,
    /// Offsets of the `status` and `progress` events the save appended, if it had a queue.
    pub status_offset: Option<u64>,
    pub progress_offset: Option<u64>,
}

/// One task's state inside a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct TaskRecord {
    pub task_id: String,
    pub status: String,
    pub result_json: Option<Vec<u8>>,
}

/// Checkpoints kept per workflow; a save beyond it removes the oldest (in the same batch).
pub(crate) const KEEP_CHECKPOINTS: u64 = 100;

/// The checkpoints a batch saved so far, for the lookups the batch answers before it is
/// stored (see [`WriteBatch::checkpoint_id_taken`], [`WriteBatch::put_checkpoint`]): every
/// store keeps this beside its own staged changes.
#[derive(Debug, Default)]
pub(crate) struct BatchCheckpoints {
    /// `(tenant, checkpoint id)` of each save.
    ids: HashSet<(String, String)>,
    /// The next sequence number of each `(tenant, workflow)` saved.
    seqs: HashMap<(String, String), u64>,
}

impl BatchCheckpoints {
    /// Whether the batch saved `checkpoint_id` for `tenant`, or else whether `stored` says the
    /// store holds it.
    pub(crate) fn taken(
        &self,
        tenant: &str,
        checkpoint_id: &str,
        stored: impl FnOnce() -> Result<bool>,
    ) -> Result<bool> {
        if self
            .ids
            .contains(&(tenant.to_string(), checkpoint_id.to_string()))
        {
            return Ok(true);
        }
        stored()
    }

    /// The sequence number the workflow's next save gets: after the batch's own saves, else
    /// what `stored` says comes next.
    pub(crate) fn next_seq(
        &self,
        tenant: &str,
        workflow: &str,
        stored: impl FnOnce() -> Result<u64>,
    ) -> Result<u64> {
        match self.seqs.get(&(tenant.to_string(), workflow.to_string())) {
            Some(&seq) => Ok(seq),
            None => stored(),
        }
    }

    /// Records a save staged at `seq`.
    pub(crate) fn saved(&mut self, tenant: &str, workflow: &str, checkpoint_id: &str, seq: u64) {
        self.seqs
            .insert((tenant.to_string(), workflow.to_string()), seq + 1);
        self.ids
            .insert((tenant.to_string(), checkpoint_id.to_string()));
    }

    /// Whether the batch saved no checkpoint.
    pub(crate) fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }
}

/// A checkpoint as read back: its position in the workflow's history and its record.
#[derive(Debug, Clone)]
pub(crate) struct LoadedCheckpoint {
    pub workflow: String,
    pub seq: u64,
    pub record: CheckpointRecord,
}

/// A queue as found on open.
#[derive(Debug, Clone)]
pub(crate) struct LoadedQueue {
    pub tenant: String,
    pub task: String,
    pub record: QueueRecord,
}

/// A deleted queue whose events are still to be removed: offsets `offsets` of queue `qid`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PendingPurge {
    pub qid: u64,
    pub offsets: Range<u64>,
}

/// Everything a store recovers on open.
#[derive(Debug)]
pub(crate) struct Recovered {
    pub queues: Vec<LoadedQueue>,
    pub next_queue_id: u64,
    /// Deleted queues whose events are still to be removed, oldest deletion first.
    pub purges: Vec<PendingPurge>,
}

/// An event on its way into a batch: what a store keeps besides its JSON.
#[derive(Debug, Clone, Copy)]
pub(crate) struct EventMeta<'a> {
    pub event_type: u8,
    pub terminal: bool,
    pub timestamp_us: i64,
    /// The id as the event's JSON holds it.
    pub event_id: &'a str,
}

/// How a commit failed.
#[derive(Debug)]
pub(crate) enum WriteError {
    /// Nothing of the batch was stored: the store is exactly as before and can take the next
    /// batch. A shared store also answers this when it may hold the batch (or part of it) but
    /// cannot confirm it — a reply lost with the connection, replicas that did not confirm
    /// in time, a batch over several cluster slots stored in part: the callers get the error
    /// (a retry by `event_id` finds what was stored), and the engine has the batch's queues'
    /// published state follow the store's records ([`Notice::Behind`]), as no notice of a
    /// node's own write reaches it.
    Rejected(Error),
    /// The store may no longer match what its users were told: refuse writes until reopen.
    Fatal(Error),
    /// Nothing of the batch was stored because a shared store holds newer state of some of
    /// its queues than the batch was built on (another node wrote to them): their current
    /// records, for the engine to take in before it rebuilds the batch.
    Stale(Vec<Fresh>),
}

/// A queue's current state in a shared store (see [`WriteError::Stale`]).
#[derive(Debug, Clone)]
pub(crate) struct Fresh {
    /// The queue's id in this process.
    pub qid: u64,
    /// Its record; `None` when it was removed.
    pub record: Option<QueueRecord>,
    /// The store's revision of that record (0 for a removal).
    pub rev: u64,
}

impl WriteError {
    /// The underlying error.
    pub(crate) fn error(&self) -> Error {
        match self {
            WriteError::Rejected(e) | WriteError::Fatal(e) => e.clone(),
            WriteError::Stale(_) => Error::storage(
                "the batch kept meeting newer state written by other nodes; try again",
            ),
        }
    }
}

impl From<Error> for WriteError {
    fn from(e: Error) -> Self {
        WriteError::Fatal(e)
    }
}

/// A queue as a shared store holds it, written by another node (see [`Storage::notices`]).
#[derive(Debug, Clone)]
pub(crate) struct RemoteQueue {
    pub tenant: String,
    pub task: String,
    /// The store's revision of the queue (see [`Storage::revision`]); for a removal, the last
    /// revision of the queue removed.
    pub rev: u64,
    /// Its record (`id` 0: the node gives it its own id); `None` when it was removed.
    pub record: Option<QueueRecord>,
}

/// What a shared store tells a node about the writes of other nodes, in the order the store
/// applied them.
#[derive(Debug)]
pub(crate) enum Notice {
    /// These queues changed.
    Changed(Vec<RemoteQueue>),
    /// Notices may have been lost (the feed reconnected): the node should reload what the
    /// store holds.
    Resync,
    /// Sent by the node's own writer, not the store: these queues' published state may be
    /// behind what the store holds although no notice will say so — a batch met another
    /// node's write of them (the writer took the newer state in, and the notice of it is then
    /// old news), or a batch failed after it may have been stored (the node skips its own
    /// notices). The follower makes their published state follow the records `known`, and
    /// the current records of the queues in `load`, read from the store.
    Behind {
        known: Vec<RemoteQueue>,
        load: Vec<(String, String)>,
    },
}

/// Work a store hands from the writer's thread to the engine's background thread (see
/// [`Storage::maintain`]); opaque to the engine.
pub(crate) struct Handoff(pub(crate) Box<dyn Any + Send>);

/// What [`Storage::maintain`] did.
#[derive(Default)]
pub(crate) struct Maintenance {
    /// The store folded its log into its durable state (a redb checkpoint).
    pub folded: bool,
    /// Work for [`Storage::background`], on the engine's background thread.
    pub handoff: Option<Handoff>,
}

/// A store the engine keeps its queues in. See the module docs for the contract. The
/// housekeeping methods default to doing nothing, as a store without a log, files or a disk
/// (memory, a networked server) needs.
pub(crate) trait Storage: Send + Sync + 'static {
    /// Starts the next batch. The engine builds one batch at a time and either commits it or
    /// drops it.
    ///
    /// # Errors
    ///
    /// Storage errors; [`Error::ShuttingDown`] after [`Storage::close`].
    fn begin(&self) -> Result<Box<dyn WriteBatch + '_>>;

    /// Makes every committed batch durable. Runs on the acknowledging thread, concurrently
    /// with the next batch's build and commit.
    ///
    /// # Errors
    ///
    /// Storage errors; after one, nothing committed since the last good sync may be trusted.
    fn sync(&self) -> Result<()> {
        Ok(())
    }

    /// Refuses batches that add data while the store is short of room ([`Error::DiskFull`]);
    /// removals and state changes are always admitted.
    ///
    /// # Errors
    ///
    /// [`Error::DiskFull`].
    fn admit(&self) -> Result<()> {
        Ok(())
    }

    /// Housekeeping between batches on the writer's thread (a log fold when due, handing
    /// applied batches to the background thread).
    ///
    /// # Errors
    ///
    /// Storage errors: permanent, as a failed commit.
    fn maintain(&self) -> Result<Maintenance> {
        Ok(Maintenance::default())
    }

    /// Runs work [`Storage::maintain`] handed over, on the engine's background thread.
    ///
    /// # Errors
    ///
    /// Storage errors: permanent, as a failed commit.
    fn background(&self, _work: Handoff) -> Result<()> {
        Ok(())
    }

    /// Makes everything committed durable in the store's own form and empties its log (at
    /// shutdown). Stores without a log do nothing.
    ///
    /// # Errors
    ///
    /// Storage errors.
    fn fold(&self) -> Result<()> {
        Ok(())
    }

    /// Returns the space of removed events to the filesystem (compacts the file in place).
    /// Returns the size before and after, bytes.
    ///
    /// # Errors
    ///
    /// Storage errors: permanent, as a failed commit.
    fn compact(&self) -> Result<(u64, u64)>;

    /// After a deletion was purged: compacts when room is short, so the space goes back to
    /// where new data can use it. Returns the size before and after, if it compacted.
    ///
    /// # Errors
    ///
    /// As [`Storage::compact`].
    fn reclaim_if_low(&self) -> Result<Option<(u64, u64)>> {
        Ok(None)
    }

    /// Up to `limit` events of queue `qid` with offsets in `from..to`, in offset order.
    /// Offsets missing from the result were trimmed or purged. The read stops early, after at
    /// least one event, once the events it returns hold `max_bytes` of JSON, so that what a
    /// reader holds is bounded (a single larger event is read alone); a read from the last
    /// offset + 1 goes on.
    ///
    /// # Errors
    ///
    /// Storage errors.
    fn read_range(
        &self,
        qid: u64,
        from: u64,
        to: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<StoredEvent>>;

    /// What [`Storage::read_range`] reads, handed to `each` as it is read (offset and JSON, in
    /// offset order) instead of collected into [`StoredEvent`]s: for a reader that only copies
    /// the bytes on (a Durable Streams catch-up read), so a store can lend them straight from
    /// its read. The same events, limits and stopping rule as `read_range`; the default reads
    /// through it.
    ///
    /// # Errors
    ///
    /// Storage errors (`each` may have seen some events by then).
    fn read_each(
        &self,
        qid: u64,
        from: u64,
        to: u64,
        limit: usize,
        max_bytes: usize,
        each: &mut dyn FnMut(u64, &[u8]),
    ) -> Result<()> {
        for e in self.read_range(qid, from, to, limit, max_bytes)? {
            each(e.offset, &e.json);
        }
        Ok(())
    }

    /// The workflow's newest checkpoint.
    ///
    /// # Errors
    ///
    /// Storage errors.
    fn latest_checkpoint(&self, tenant: &str, workflow: &str) -> Result<Option<LoadedCheckpoint>>;

    /// A tenant's checkpoint by id, if retained.
    ///
    /// # Errors
    ///
    /// Storage errors.
    fn checkpoint_by_id(
        &self,
        tenant: &str,
        checkpoint_id: &str,
    ) -> Result<Option<LoadedCheckpoint>>;

    /// The workflow's retained checkpoints, oldest first.
    ///
    /// # Errors
    ///
    /// Storage errors.
    fn list_checkpoints(&self, tenant: &str, workflow: &str) -> Result<Vec<LoadedCheckpoint>>;

    /// Sets `tenant`'s token not-before time (microseconds since the Unix epoch): the server
    /// refuses the tenant's tokens issued before it. Durable when it returns, and seen by
    /// every node sharing the store. Outside the write path: a revocation is no queue data.
    ///
    /// # Errors
    ///
    /// Storage errors.
    fn put_revocation(&self, tenant: &str, not_before_us: u64) -> Result<()>;

    /// Every tenant's token not-before time (see [`Storage::put_revocation`]).
    ///
    /// # Errors
    ///
    /// Storage errors.
    fn revocations(&self) -> Result<Vec<(String, u64)>>;

    /// Whether the store can be reached now (a networked store pings its server). Embedded
    /// stores are always there.
    ///
    /// # Errors
    ///
    /// The storage error that says why not.
    fn check(&self) -> Result<()> {
        Ok(())
    }

    /// A store several nodes share: starts the feed of other nodes' changes into `to` (called
    /// once by the engine at start; the engine's writer sends into the same channel, see
    /// [`Notice::Behind`]). `false` for a store only this process writes.
    fn notices(&self, _to: std::sync::mpsc::SyncSender<Notice>) -> bool {
        false
    }

    /// A shared store's current record of a queue this node does not know yet (created by
    /// another node); `None` when it has none. Stores only this process writes answer `None`.
    ///
    /// # Errors
    ///
    /// Storage errors.
    fn load_queue(&self, _tenant: &str, _task: &str) -> Result<Option<RemoteQueue>> {
        Ok(None)
    }

    /// Every queue a shared store holds now (for [`Notice::Resync`]).
    ///
    /// # Errors
    ///
    /// Storage errors.
    fn load_all(&self) -> Result<Vec<RemoteQueue>> {
        Ok(Vec::new())
    }

    /// Knows queue `queue` (another node's) by id `qid` from now on, at revision `queue.rev`
    /// or newer: later batches of it are checked against the newest revision the node saw.
    fn adopt(&self, _qid: u64, _queue: &RemoteQueue) {}

    /// The newest revision of queue `qid` this node saw in a shared store (from its own
    /// commits, loads and notices); `None` when unknown. A notice about an older revision is
    /// old news (or about a former queue of the same name) and is ignored.
    fn revision(&self, _qid: u64) -> Option<u64> {
        None
    }

    /// Forgets queue `qid`, removed by another node.
    fn forget(&self, _qid: u64) {}

    /// Bytes the store occupies (0 when it has no files).
    fn size_bytes(&self) -> u64;

    /// Where the store lives, for messages.
    fn describe(&self) -> String;

    /// Releases the store's files; later calls fail with [`Error::ShuttingDown`].
    fn close(&self);

    /// Fault injection of this store (feature `failpoints`).
    #[cfg(feature = "failpoints")]
    fn faults(&self) -> std::sync::Arc<redb::wal::Faults>;
}

/// One batch being built. Changes are staged in order; nothing is visible to readers or
/// durable before [`WriteBatch::commit`].
pub(crate) trait WriteBatch {
    /// The id the store gives the event at `offset` of queue `qid` when its producer gave
    /// none, if the store derives ids (then the id needs no idempotency lookup: it names the
    /// offset). `None`: the event keeps the id it was given.
    fn derived_id(&self, qid: u64, offset: u64) -> Option<[u8; DERIVED_LEN]>;

    /// The offset in `retained` at which queue `qid` holds an event with this id: from earlier
    /// batches or this one.
    ///
    /// # Errors
    ///
    /// Storage errors.
    fn find_event_id(
        &mut self,
        qid: u64,
        event_id: &str,
        retained: Range<u64>,
    ) -> Result<Option<u64>>;

    /// The store's record buffer for an event: the store's own header, after which the
    /// caller writes the event's JSON (returned: the buffer and where the JSON starts).
    ///
    /// # Errors
    ///
    /// Encoding errors.
    fn event_record(&self, meta: &EventMeta<'_>, json_len: usize) -> Result<(Vec<u8>, usize)>;

    /// Appends an event at `offset` of `qid` (the queue's next offset): `record` from
    /// [`WriteBatch::event_record`], its JSON starting at `json_at`. `event_id` is indexed for
    /// [`WriteBatch::find_event_id`] unless it is derived (`None`).
    ///
    /// # Errors
    ///
    /// Encoding errors.
    fn append(
        &mut self,
        qid: u64,
        offset: u64,
        event_id: Option<&EventId>,
        record: Bytes,
        json_at: usize,
        meta: (u8, bool),
    ) -> Result<()>;

    /// Removes queue `qid`'s events with offsets in `from..to` (and their ids). Returns how
    /// many offsets that covers.
    ///
    /// # Errors
    ///
    /// Encoding errors.
    fn trim(&mut self, qid: u64, from: u64, to: u64) -> Result<u64>;

    /// Stores a queue's record (creation and every change).
    ///
    /// # Errors
    ///
    /// Encoding errors.
    fn put_queue(&mut self, tenant: &str, task: &str, record: &QueueRecord) -> Result<()>;

    /// Removes a queue's record; its events become unreachable at once (queue ids are never
    /// reused) and are removed by later [`WriteBatch::purge`] steps.
    ///
    /// # Errors
    ///
    /// Encoding errors.
    fn remove_queue(&mut self, qid: u64, tenant: &str, task: &str) -> Result<()>;

    /// One bounded step of removing a deleted queue's events: offsets `from..to`; `last`
    /// when nothing of the queue remains after it.
    ///
    /// # Errors
    ///
    /// Encoding errors.
    fn purge(&mut self, qid: u64, from: u64, to: u64, last: bool) -> Result<()>;

    /// Records the next queue id to assign.
    ///
    /// # Errors
    ///
    /// Encoding errors.
    fn set_next_queue_id(&mut self, id: u64) -> Result<()>;

    /// Whether `tenant` has a checkpoint with this id (stored, or in this batch).
    ///
    /// # Errors
    ///
    /// Storage errors.
    fn checkpoint_id_taken(&mut self, tenant: &str, checkpoint_id: &str) -> Result<bool>;

    /// Stores a checkpoint as its workflow's newest (removing the oldest beyond
    /// [`KEEP_CHECKPOINTS`]); returns its sequence number within the workflow.
    ///
    /// # Errors
    ///
    /// Storage and encoding errors.
    fn put_checkpoint(
        &mut self,
        tenant: &str,
        workflow: &str,
        record: &CheckpointRecord,
    ) -> Result<u64>;

    /// Has the commit confirm that queue `qid` is still as this batch found it, although the
    /// batch may write nothing to it: an answer decided on the queue's state alone (a Durable
    /// Streams producer refusal) then rests on current state, not on a view that trails
    /// another node's write. A store shared by several nodes makes a batch whose queue
    /// changed meanwhile stale ([`WriteError::Stale`]: rebuilt on fresh state); a store that
    /// is its data's only writer has nothing to confirm (the default).
    fn check(&mut self, _qid: u64) {}

    /// Stores the batch: all of it or nothing. Returns whether anything was written.
    ///
    /// # Errors
    ///
    /// See [`WriteError`].
    fn commit(self: Box<Self>) -> Result<bool, WriteError>;
}
