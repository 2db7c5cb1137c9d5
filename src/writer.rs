//! The group-commit pipeline: the one owner of write transactions.
//!
//! Two threads, in a pipeline:
//!
//! 1. The **writer** drains the command channel: it blocks for the first command, then takes
//!    whatever else is already waiting (up to `max_commit_events` events), applies all of it
//!    as one batch, appends the batch's changes to the write-ahead log as one record, and hands
//!    the batch to the acknowledger. It then starts on the next batch at once. The store keeps
//!    logged batches in memory and writes them into redb in bulk between batches (see
//!    `store::pending`).
//! 2. The **acknowledger** takes every batch handed over so far, fsyncs the log once for all
//!    of them (in immediate durability), and only then publishes them to live subscribers and
//!    acknowledges their callers, in batch order.
//!
//! So throughput grows with the number of waiting callers, the fsync of one batch overlaps the
//! CPU work of the next, and each acknowledgement still means "durable".
//!
//! # Ordering
//!
//! Offsets are assigned inside the transaction from the writer's *committed* view of each
//! queue, which runs ahead of the *published* view while batches wait for their fsync.
//! Subscribers read the log only below the published offset, so they never see an event whose
//! log record is not yet durable. `max_buffer_size` trimming happens in the same transaction,
//! so the bound holds right after each commit.
//!
//! # Failure
//!
//! - A failed **log write** (a full disk, typically) whose partial record was cut off again
//!   fails only its batch: the redb transaction is dropped unapplied, the log ends where it
//!   ended before, and nothing of the batch is visible or acknowledged. The next batch is
//!   tried normally, so writes resume by themselves once space is freed — provided no
//!   checkpoint ran out of space meanwhile (below).
//! - A failed **commit** or **checkpoint** (a full disk included: redb writes its pages at
//!   checkpoints), a log write that could not be cut back, and any
//!   failed **fsync** are permanent: the batch's callers (and, for an fsync, every batch
//!   waiting for it) get the error, and the pipeline refuses all later writes with
//!   [`Error::StoreFailed`] until the store is reopened, rather than pretend later commits are
//!   fine. After a failed fsync the kernel may have dropped the unsynced pages, so nothing
//!   written since the last good sync can be trusted in place; after a failed redb write redb
//!   itself refuses further work until reopened.
//!
//! Recovery on reopen keeps exactly the log records that reached the disk (a caller that got
//! an error may find its event stored, as after a timeout; idempotent retries make that safe).

use std::collections::{HashMap, HashSet};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use crate::checkpoint::{PreparedSave, SavedCheckpoint};
use crate::clock::Clock;
use crate::error::{Error, Result};
use crate::event::{Event, EventType, RenderedEvent, Timestamp};
use crate::hub::Live;
use crate::ids::{EventId, TaskId, TenantId};
use crate::metrics::Metrics;
use crate::queue::{CancelInfo, QueueKind, QueueShared, View};
use crate::store::codec::{self, EventHeader, QueueRecord};
use crate::store::derived_ids::DERIVED_LEN;
use crate::store::space::SpaceCheck;
use crate::store::wal::WalSyncer;
use crate::store::{self, BatchWriter, Frozen, Store, StoreWriter, StoredEvent, WriteError};
use crate::subscription::RecordedEvent;

/// Every live queue by `(tenant, task)`. Written only by the writer, after commits.
pub(crate) type Registry = RwLock<HashMap<(TenantId, TaskId), Arc<QueueShared>>>;

pub(crate) type Reply<T> = oneshot::Sender<Result<T>>;

/// An event validated and rendered by its producer, waiting for its offset.
#[derive(Debug)]
pub(crate) struct PreparedEvent {
    event_id: EventId,
    event_type: EventType,
    terminal: bool,
    timestamp_us: i64,
    rendered: RenderedEvent,
    /// The producer gave no id: the store derives it from the offset at commit (see
    /// [`crate::store::derived_ids`]); `event_id` and the id in `rendered` are placeholders
    /// of the same length.
    derive_id: bool,
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
        }
    }

    /// As [`PreparedEvent::new`] for an event whose producer gave no id (its `event_id` was
    /// generated on receipt and nobody has seen it): the store replaces it with an id derived
    /// from the offset, which needs no idempotency-index entry.
    pub(crate) fn deriving_id(event: &Event) -> Self {
        let mut prepared = Self::new(event);
        let id = prepared.event_id.as_str().as_bytes();
        // Generated ids have the derived ids' length; anything else keeps its own id.
        prepared.derive_id = id.len() == DERIVED_LEN
            && prepared.rendered.prefix.get(..ID_AT) == Some(br#"{"event_id":""#.as_slice())
            && prepared.rendered.prefix.get(ID_AT..ID_AT + DERIVED_LEN) == Some(id);
        prepared
    }

    /// The id the store gives this event at `offset` of queue `qid`, when it derives it.
    fn derived_id(&self, w: &BatchWriter<'_>, qid: u64, offset: u64) -> Option<[u8; DERIVED_LEN]> {
        if self.derive_id {
            w.derived_id(qid, offset)
        } else {
            None
        }
    }

    /// The stored record (header + JSON with `offset`, and with `derived` as its id when
    /// given) and where its JSON starts.
    fn encode(&self, offset: u64, derived: Option<&[u8; DERIVED_LEN]>) -> Result<(Vec<u8>, usize)> {
        let event_id = match derived {
            // Derived ids are ASCII.
            Some(id) => std::str::from_utf8(id).map_err(Error::storage)?,
            None => self.event_id.as_str(),
        };
        let header = EventHeader {
            event_type: self.event_type.code(),
            terminal: self.terminal,
            timestamp_us: self.timestamp_us,
            event_id,
        };
        let r = &self.rendered;
        let (mut buf, start) = codec::encode_event(&header, r.prefix.len() + r.suffix.len() + 20)?;
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

/// Resolved creation parameters.
#[derive(Debug, Clone)]
pub(crate) struct NewQueue {
    pub tenant: TenantId,
    pub task: TaskId,
    pub kind: QueueKind,
    pub ttl: Duration,
    pub max_buffer_size: u64,
}

/// What the writer is asked to do.
pub(crate) enum Command {
    Append {
        queue: Arc<QueueShared>,
        events: Vec<PreparedEvent>,
        reply: Reply<Vec<u64>>,
    },
    Create {
        spec: NewQueue,
        reply: Reply<Arc<QueueShared>>,
    },
    Close {
        queue: Arc<QueueShared>,
        reply: Reply<()>,
    },
    Cancel {
        queue: Arc<QueueShared>,
        reason: Option<String>,
        reply: Reply<()>,
    },
    /// Removes the queue and its events. With `idle_since_before`, only if the queue's last
    /// activity plus its TTL is at or before that time (expiry); replies whether it was removed.
    Delete {
        queue: Arc<QueueShared>,
        expire_at: Option<Timestamp>,
        reply: Reply<bool>,
    },
    /// fsync everything committed so far (a flush in buffered mode).
    Sync { reply: Option<Reply<()>> },
    /// Saves a workflow checkpoint and appends its events in the same transaction.
    SaveCheckpoint {
        save: Box<PreparedSave>,
        reply: Reply<SavedCheckpoint>,
    },
    /// Commit what is queued, sync, and stop.
    Shutdown { reply: Reply<()> },
    /// Checkpoint and compact the database file in place (see [`Store::compact_in_place`]);
    /// replies with the file size before and after.
    Compact { reply: Reply<(u64, u64)> },
}

impl Command {
    fn event_count(&self) -> usize {
        match self {
            Command::Append { events, .. } => events.len(),
            _ => 1,
        }
    }
}

/// Result of applying one command inside the transaction.
enum Outcome {
    Offsets(Vec<u64>),
    Created(Arc<QueueShared>),
    Removed(bool),
    Saved(SavedCheckpoint),
    Done,
    Failed(Error),
}

/// A queue's state as the current transaction sees it.
struct Stage {
    q: Arc<QueueShared>,
    view: View,
    /// The queue was already removed before this batch.
    was_removed: bool,
    created: bool,
    dirty: bool,
    outbox: Vec<Live>,
    appended: u64,
    trimmed: u64,
}

impl Stage {
    /// Counts `ev`, just stored at `offset` (the view's next offset) with its JSON `json`:
    /// advances the view and queues the event for live subscribers.
    fn appended(&mut self, ev: &PreparedEvent, offset: u64, json: Bytes) {
        self.view.next_offset = offset + 1;
        self.appended += 1;
        if ev.terminal && self.view.finished_at.is_none() {
            self.view.finished_at = Some(offset);
        }
        self.outbox.push(Live::Event(Arc::new(RecordedEvent::new(
            offset,
            ev.event_type,
            ev.terminal,
            json,
        ))));
    }

    /// The first offset to keep so that the queue holds at most its `max_buffer_size` events,
    /// when that means trimming.
    fn trim_to(&self) -> Option<u64> {
        let (v, max) = (&self.view, self.q.max_buffer_size);
        (v.next_offset - v.first_offset > max).then(|| v.next_offset - max)
    }

    fn of(q: &Arc<QueueShared>) -> Self {
        let view = q.committed().clone();
        Stage {
            q: q.clone(),
            was_removed: view.removed,
            view,
            created: false,
            dirty: false,
            outbox: Vec::new(),
            appended: 0,
            trimmed: 0,
        }
    }
}

/// The staged changes of one batch.
#[derive(Default)]
struct Batch {
    stages: Vec<Stage>,
    index: HashMap<u64, usize>,
}

impl Batch {
    fn stage(&mut self, q: &Arc<QueueShared>) -> &mut Stage {
        let i = match self.index.get(&q.id) {
            Some(&i) => i,
            None => {
                self.stages.push(Stage::of(q));
                self.index.insert(q.id, self.stages.len() - 1);
                self.stages.len() - 1
            }
        };
        &mut self.stages[i]
    }
}

/// The first storage failure, shared by both pipeline threads.
#[derive(Default)]
pub(crate) struct Failure(Mutex<Option<Arc<str>>>);

impl Failure {
    fn get(&self) -> Option<Arc<str>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set(&self, e: &Error) {
        let mut slot = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            tracing::error!(error = %e, "storage failure; refusing further writes until reopen");
            *slot = Some(Arc::from(e.to_string()));
        }
    }
}

/// A committed batch waiting for its fsync.
struct Job {
    batch: Batch,
    cmds: Vec<Command>,
    outcomes: Vec<Outcome>,
    /// The batch wrote a log record.
    logged: bool,
    /// Acknowledge only after an fsync (immediate durability, flush, shutdown).
    needs_sync: bool,
    /// When the writer began the batch (for `Metrics::commit_seconds`).
    started: Instant,
}

pub(crate) struct Writer {
    pub store: Arc<Store>,
    pub registry: Arc<Registry>,
    pub clock: Arc<dyn Clock>,
    pub metrics: Arc<Metrics>,
    pub rx: mpsc::Receiver<Command>,
    /// `None` in immediate durability; the flush interval in buffered durability.
    pub flush_interval: Option<Duration>,
    pub max_commit_events: usize,
    pub next_queue_id: u64,
    /// Deleted queues whose events are still to be removed.
    pub pending_purges: Vec<u64>,
    /// Most events one purge step removes.
    pub purge_step: u64,
    /// The free-space reserve (see `store::space`).
    pub space: SpaceCheck,
}

/// While appends keep coming, one purge step runs at most this often, so a large deletion
/// never holds appends behind it.
const PURGE_PACE: Duration = Duration::from_millis(10);

/// After a purge step was refused (its log write failed: a full disk), idle retries wait this
/// long between attempts.
const PURGE_RETRY: Duration = Duration::from_millis(100);

impl Writer {
    /// Runs the pipeline until a `Shutdown` command or until every sender is gone.
    ///
    /// # Errors
    ///
    /// Only if the acknowledger thread cannot be started.
    pub(crate) fn run(self) -> Result<()> {
        let syncer = self.store.log_syncer()?;
        let failure = Arc::new(Failure::default());
        let (jobs_tx, jobs_rx) = std_mpsc::channel();
        let acker = Acknowledger {
            jobs: jobs_rx,
            syncer,
            registry: self.registry.clone(),
            metrics: self.metrics.clone(),
            failure: failure.clone(),
            flush_interval: self.flush_interval,
        };
        let handle = std::thread::Builder::new()
            .name("eventqueue-ack".into())
            .spawn(move || acker.run())
            .map_err(|e| Error::storage(format!("cannot start the acknowledger thread: {e}")))?;
        // The bulk-write thread: writes frozen generations of logged batches into redb while
        // the writer goes on (see `store::pending`).
        let (bulk_tx, bulk_rx) = std_mpsc::channel::<Frozen>();
        let bulk = {
            let (store, failure) = (self.store.clone(), failure.clone());
            std::thread::Builder::new()
                .name("eventqueue-bulk".into())
                .spawn(move || {
                    for frozen in bulk_rx {
                        if let Err(e) = store.apply_frozen(frozen) {
                            failure.set(&e);
                        }
                    }
                })
                .map_err(|e| Error::storage(format!("cannot start the bulk-write thread: {e}")))?
        };
        let keys = self
            .registry
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect();
        let purges = self.pending_purges.iter().copied().collect();
        let mut stage = WriterLoop {
            w: self,
            failure,
            jobs: jobs_tx,
            bulk: bulk_tx,
            keys,
            purges,
            last_purge: Instant::now(),
            purge_refused: false,
        };
        stage.run();
        drop(stage);
        let _ = handle.join();
        let _ = bulk.join();
        Ok(())
    }
}

struct WriterLoop {
    w: Writer,
    failure: Arc<Failure>,
    jobs: std_mpsc::Sender<Job>,
    /// Generations of logged batches for the bulk-write thread.
    bulk: std_mpsc::Sender<Frozen>,
    /// Queues that exist as of the latest commit (creates may not be published yet).
    keys: HashSet<(TenantId, TaskId)>,
    /// Deleted queues whose events are still to be removed, oldest deletion first.
    purges: std::collections::VecDeque<u64>,
    last_purge: Instant,
    /// The last purge step was refused (a full disk): idle retries back off.
    purge_refused: bool,
}

impl WriterLoop {
    fn run(&mut self) {
        loop {
            let first = if self.purges.is_empty() || self.failure.get().is_some() {
                match self.w.rx.blocking_recv() {
                    Some(cmd) => cmd,
                    None => break,
                }
            } else {
                // Idle with deletions pending: purge step by step, checking for commands
                // between steps.
                match self.w.rx.try_recv() {
                    Ok(cmd) => cmd,
                    Err(mpsc::error::TryRecvError::Empty) => {
                        if self.purge_refused {
                            // Do not spin on a full disk; commands still get through.
                            std::thread::sleep(PURGE_RETRY);
                        }
                        self.purge_step();
                        continue;
                    }
                    Err(mpsc::error::TryRecvError::Disconnected) => break,
                }
            };
            let mut n = first.event_count();
            let mut cmds = vec![first];
            while n < self.w.max_commit_events {
                match self.w.rx.try_recv() {
                    Ok(cmd) => {
                        n += cmd.event_count();
                        cmds.push(cmd);
                    }
                    Err(_) => break,
                }
            }
            if self.process_all(cmds) {
                return;
            }
            if !self.purges.is_empty() && self.last_purge.elapsed() >= PURGE_PACE {
                self.purge_step();
            }
            if self.failure.get().is_none() {
                let limit = self.checkpoint_limit();
                let started = Instant::now();
                match self.w.store.maybe_checkpoint(limit) {
                    Err(e) => {
                        self.failure.set(&e);
                        continue;
                    }
                    Ok(true) => {
                        let m = &self.w.metrics;
                        Metrics::add(&m.checkpoints, 1);
                        m.checkpoint_seconds
                            .observe(started.elapsed().as_secs_f64());
                    }
                    Ok(false) => {}
                }
                if let Some(frozen) = self.w.store.freeze() {
                    // Should the thread be gone, the next checkpoint writes it in.
                    let _ = self.bulk.send(frozen);
                }
            }
        }
        // Every handle is gone: leave a durable store behind.
        if self.failure.get().is_none()
            && let Err(e) = self.w.store.checkpoint()
        {
            self.failure.set(&e);
        }
    }

    /// The log size that makes a checkpoint due now (see [`store::checkpoint_limit`]).
    fn checkpoint_limit(&mut self) -> u64 {
        let reserve = self.w.space.reserve();
        let free = if reserve == 0 {
            None
        } else {
            self.w.space.free(Instant::now())
        };
        store::checkpoint_limit(reserve, free)
    }

    /// Removes one bounded step of the oldest pending deletion. Its log record needs no fsync
    /// of its own: if a crash loses it, the purge mark is still there and the step is redone.
    fn purge_step(&mut self) {
        self.last_purge = Instant::now();
        let Some(&qid) = self.purges.front() else {
            return;
        };
        if self.failure.get().is_some() {
            return;
        }
        let step = self.w.purge_step.max(1);
        match self.w.store.write(|w| w.purge_some(qid, step)) {
            Ok(((removed, done), _)) => {
                self.purge_refused = false;
                Metrics::add(&self.w.metrics.events_removed, removed);
                if done {
                    self.purges.pop_front();
                    self.compact_if_low();
                    self.w.metrics.pending_purges.store(
                        self.purges.len() as u64,
                        std::sync::atomic::Ordering::Relaxed,
                    );
                }
            }
            // The step is redone later (its purge mark is still there).
            Err(WriteError::Rejected(_)) => self.purge_refused = true,
            Err(WriteError::Fatal(e)) => self.failure.set(&e),
        }
    }

    /// After a deletion completed: on a nearly full disk (less than twice the reserve free),
    /// compacts the database so the deleted events' space goes back to the filesystem, where
    /// the log and new pages can use it; otherwise redb reuses it by itself.
    fn compact_if_low(&mut self) {
        if self.failure.get().is_some() || !self.w.space.below(2, Instant::now()) {
            return;
        }
        if let Ok((before, after)) = self.compact() {
            tracing::info!(
                bytes_before = before,
                bytes_after = after,
                "disk nearly full: compacted the database after a deletion"
            );
        }
    }

    /// Refuses the commands that add data while the disk is below its reserve (see
    /// `store::space`): they get [`Error::DiskFull`]; the others go on, so deletions,
    /// cancellations and closes still work on a full disk.
    fn admit(&mut self, cmds: Vec<Command>) -> Vec<Command> {
        let adds = |c: &Command| {
            matches!(
                c,
                Command::Append { .. } | Command::Create { .. } | Command::SaveCheckpoint { .. }
            )
        };
        if !cmds.iter().any(adds) {
            return cmds;
        }
        let Err(e) = self.w.space.admit(Instant::now()) else {
            return cmds;
        };
        let (refused, admitted): (Vec<_>, Vec<_>) = cmds.into_iter().partition(adds);
        for cmd in refused {
            reply_err(cmd, e.clone());
        }
        admitted
    }

    /// Processes what was collected: each checkpoint save as a batch of its own (it is
    /// written in a redb transaction of its own, see [`apply_checkpoint`]), then the rest as
    /// one batch. Returns true when a shutdown was processed.
    fn process_all(&mut self, cmds: Vec<Command>) -> bool {
        let mut compactions = Vec::new();
        let cmds = self
            .admit(cmds)
            .into_iter()
            .filter_map(|c| match c {
                Command::Compact { reply } => {
                    compactions.push(reply);
                    None
                }
                other => Some(other),
            })
            .collect();
        // A compaction changes no content: it runs after whatever was collected with it.
        let shutdown = self.process_saves_then_rest(cmds);
        for reply in compactions {
            let _ = reply.send(self.compact());
        }
        shutdown
    }

    /// Checkpoints and compacts the database in place; a failure stops writes, as for a
    /// failed checkpoint.
    fn compact(&mut self) -> Result<(u64, u64)> {
        if let Some(msg) = self.failure.get() {
            return Err(Error::StoreFailed(msg));
        }
        self.w
            .store
            .compact_in_place()
            .inspect_err(|e| self.failure.set(e))
    }

    fn process_saves_then_rest(&mut self, cmds: Vec<Command>) -> bool {
        let (saves, rest): (Vec<_>, Vec<_>) = cmds
            .into_iter()
            .partition(|c| matches!(c, Command::SaveCheckpoint { .. }));
        for save in saves {
            self.process(vec![save]);
        }
        !rest.is_empty() && self.process(rest)
    }

    /// Applies and commits one batch and hands it to the acknowledger. Returns true when a
    /// shutdown was processed.
    fn process(&mut self, cmds: Vec<Command>) -> bool {
        let shutdown = cmds.iter().any(|c| matches!(c, Command::Shutdown { .. }));
        if let Some(msg) = self.failure.get() {
            for cmd in cmds {
                reply_err(cmd, Error::StoreFailed(msg.clone()));
            }
            return shutdown;
        }
        let needs_sync = self.w.flush_interval.is_none()
            || cmds
                .iter()
                .any(|c| matches!(c, Command::Sync { .. } | Command::Shutdown { .. }));
        let now = self.w.clock.now();
        let started = Instant::now();
        let mut batch = Batch::default();
        let mut next_queue_id = self.w.next_queue_id;
        let keys = &mut self.keys;
        let result = if let [Command::SaveCheckpoint { save, .. }] = cmds.as_slice() {
            self.w.store.write(|w| {
                let outcome = apply_checkpoint(w, &mut batch, save, now)?;
                finish_checkpoint(w, &mut batch)?;
                Ok(vec![outcome])
            })
        } else {
            self.w.store.write_batch(|w| {
                let mut outcomes = Vec::with_capacity(cmds.len());
                for cmd in &cmds {
                    outcomes.push(apply(w, &mut batch, keys, &mut next_queue_id, cmd, now)?);
                }
                finish(w, &mut batch)?;
                Ok(outcomes)
            })
        };
        // The last batch before a shutdown is followed by a durable checkpoint, so the log is
        // empty when the directory is closed.
        let result = match result {
            Ok(ok) if shutdown => self
                .w
                .store
                .checkpoint()
                .map(|()| ok)
                .map_err(WriteError::Fatal),
            other => other,
        };
        match result {
            Ok((outcomes, logged)) => {
                let events: u64 = batch.stages.iter().map(|s| s.appended).sum();
                let m = &self.w.metrics;
                Metrics::add(&m.commits, 1);
                Metrics::add(&m.events_appended, events);
                Metrics::add(
                    &m.events_removed,
                    batch.stages.iter().map(|s| s.trimmed).sum(),
                );
                m.batch_size.observe(events as f64);
                self.w.next_queue_id = next_queue_id;
                for stage in &batch.stages {
                    *stage.q.committed() = stage.view.clone();
                    if stage.view.removed && !stage.was_removed {
                        self.purges.push_back(stage.q.id);
                    }
                }
                m.pending_purges.store(
                    self.purges.len() as u64,
                    std::sync::atomic::Ordering::Relaxed,
                );
                let job = Job {
                    batch,
                    cmds,
                    outcomes,
                    logged,
                    needs_sync,
                    started,
                };
                if let Err(std_mpsc::SendError(job)) = self.jobs.send(job) {
                    for cmd in job.cmds {
                        reply_err(cmd, Error::ShuttingDown);
                    }
                }
            }
            Err(failed) => {
                // Creates and removals of this batch were not committed.
                for stage in &batch.stages {
                    let key = (stage.q.tenant_id.clone(), stage.q.task_id.clone());
                    if stage.created {
                        self.keys.remove(&key);
                    } else if stage.view.removed && !stage.was_removed {
                        self.keys.insert(key);
                    }
                }
                // A rejected batch left the store as it was: only its callers fail (a full
                // disk: the next batch may fit). Anything else stops writes until reopen.
                if let WriteError::Fatal(e) = &failed {
                    self.failure.set(e);
                }
                let e = failed.error();
                for cmd in cmds {
                    reply_err(cmd, e.clone());
                }
            }
        }
        shutdown
    }
}

/// The second pipeline stage: fsync, then publish and acknowledge, in batch order.
struct Acknowledger {
    jobs: std_mpsc::Receiver<Job>,
    syncer: WalSyncer,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    failure: Arc<Failure>,
    flush_interval: Option<Duration>,
}

impl Acknowledger {
    fn run(self) {
        let mut unsynced = false;
        let mut last_sync = Instant::now();
        // In buffered durability, wake at least every flush interval to sync what is pending.
        let idle_wait = self.flush_interval.unwrap_or(Duration::from_secs(3600));
        loop {
            let mut jobs = match self.jobs.recv_timeout(idle_wait) {
                Ok(job) => vec![job],
                Err(std_mpsc::RecvTimeoutError::Timeout) => Vec::new(),
                Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
            };
            while let Ok(job) = self.jobs.try_recv() {
                jobs.push(job);
            }
            unsynced |= jobs.iter().any(|j| j.logged);
            let due = self
                .flush_interval
                .is_some_and(|every| last_sync.elapsed() >= every);
            if unsynced && (due || jobs.iter().any(|j| j.needs_sync)) {
                if let Err(e) = self.syncer.sync() {
                    self.failure.set(&e);
                    for job in jobs {
                        for cmd in job.cmds {
                            reply_err(cmd, e.clone());
                        }
                    }
                    continue;
                }
                unsynced = false;
                last_sync = Instant::now();
            }
            for job in jobs {
                // A batch committed after a failed fsync is not acknowledged as durable.
                if job.needs_sync
                    && let Some(msg) = self.failure.get()
                {
                    for cmd in job.cmds {
                        reply_err(cmd, Error::StoreFailed(msg.clone()));
                    }
                    continue;
                }
                self.metrics
                    .commit_seconds
                    .observe(job.started.elapsed().as_secs_f64());
                publish(&self.registry, job.batch);
                for (cmd, outcome) in job.cmds.into_iter().zip(job.outcomes) {
                    reply(cmd, outcome);
                }
            }
        }
    }
}

fn apply(
    w: &mut BatchWriter<'_>,
    batch: &mut Batch,
    keys: &mut HashSet<(TenantId, TaskId)>,
    next_queue_id: &mut u64,
    cmd: &Command,
    now: Timestamp,
) -> Result<Outcome> {
    Ok(match cmd {
        Command::Append { queue, events, .. } => {
            let stage = batch.stage(queue);
            if stage.view.removed {
                return Ok(Outcome::Failed(not_found(queue)));
            }
            if stage.view.closed {
                return Ok(Outcome::Failed(Error::QueueClosed {
                    task_id: queue.task_id.to_string(),
                }));
            }
            let mut offsets = Vec::with_capacity(events.len());
            for ev in events {
                let offset = stage.view.next_offset;
                let retained_from = stage.view.first_offset;
                // A derived id is new by construction (it names this offset): no index lookup.
                let derived = ev.derived_id(w, queue.id, offset);
                if derived.is_none()
                    && let Some(existing) =
                        w.claim_event_id(queue.id, &ev.event_id, offset, retained_from)?
                {
                    offsets.push(existing);
                    continue;
                }
                let (record, json_at) = ev.encode(offset, derived.as_ref())?;
                let record = Bytes::from(record);
                let json = record.slice(json_at..);
                w.append(
                    queue.id,
                    if derived.is_some() {
                        ""
                    } else {
                        ev.event_id.as_str()
                    },
                    &record,
                    StoredEvent {
                        offset,
                        event_type: ev.event_type.code(),
                        terminal: ev.terminal,
                        json: json.clone(),
                    },
                )?;
                stage.appended(ev, offset, json);
                offsets.push(offset);
            }
            if stage.appended > 0 {
                stage.view.last_activity = now;
                stage.dirty = true;
            }
            Outcome::Offsets(offsets)
        }
        Command::Create { spec, .. } => {
            let key = (spec.tenant.clone(), spec.task.clone());
            if keys.contains(&key) {
                return Ok(Outcome::Failed(Error::QueueExists {
                    tenant_id: spec.tenant.to_string(),
                    task_id: spec.task.to_string(),
                }));
            }
            let id = *next_queue_id;
            *next_queue_id += 1;
            w.set_next_queue_id(*next_queue_id)?;
            let record = QueueRecord {
                id,
                kind: spec.kind.code(),
                created_at_us: now.as_micros(),
                last_activity_us: now.as_micros(),
                ttl_ms: u64::try_from(spec.ttl.as_millis()).unwrap_or(u64::MAX),
                max_buffer_size: spec.max_buffer_size,
                first_offset: 0,
                next_offset: 0,
                closed: false,
                finished_at: None,
                cancel: None,
            };
            let q = Arc::new(QueueShared::from_record(
                spec.tenant.clone(),
                spec.task.clone(),
                &record,
            ));
            keys.insert(key);
            let stage = batch.stage(&q);
            stage.created = true;
            stage.dirty = true;
            Outcome::Created(q)
        }
        Command::Close { queue, .. } => {
            let stage = batch.stage(queue);
            if stage.view.removed {
                return Ok(Outcome::Failed(not_found(queue)));
            }
            if !stage.view.closed {
                stage.view.closed = true;
                stage.dirty = true;
                let at = stage.view.next_offset;
                stage.outbox.push(Live::Closed { at });
            }
            Outcome::Done
        }
        Command::Cancel { queue, reason, .. } => {
            let stage = batch.stage(queue);
            if stage.view.removed {
                return Ok(Outcome::Failed(not_found(queue)));
            }
            if stage.view.finished_at.is_some() {
                return Ok(Outcome::Failed(Error::TaskFinished {
                    task_id: queue.task_id.to_string(),
                }));
            }
            if stage.view.cancel.is_none() {
                stage.view.cancel = Some(CancelInfo {
                    reason: reason.clone(),
                    time: now,
                });
                stage.dirty = true;
            }
            Outcome::Done
        }
        Command::Delete {
            queue, expire_at, ..
        } => {
            let stage = batch.stage(queue);
            if stage.view.removed {
                return Ok(Outcome::Failed(not_found(queue)));
            }
            if let Some(now) = expire_at
                && stage.view.last_activity.saturating_add(queue.ttl) > *now
            {
                return Ok(Outcome::Removed(false));
            }
            stage.view.removed = true;
            stage.outbox.push(Live::Removed);
            keys.remove(&(queue.tenant_id.clone(), queue.task_id.clone()));
            Outcome::Removed(true)
        }
        // Never part of a batch (see `process_all`).
        Command::Sync { .. } | Command::Shutdown { .. } | Command::Compact { .. } => Outcome::Done,
        // Saves are batches of their own (`process_all`); never here.
        Command::SaveCheckpoint { .. } => {
            Outcome::Failed(Error::storage("internal: a checkpoint save in a log batch"))
        }
    })
}

/// Trims, persists queue records and removes deleted queues, all inside the transaction.
fn finish(w: &mut BatchWriter<'_>, batch: &mut Batch) -> Result<()> {
    for stage in &mut batch.stages {
        let q = stage.q.clone();
        if stage.was_removed {
            continue;
        }
        if stage.view.removed {
            w.remove_queue(q.id, q.tenant_id.as_str(), q.task_id.as_str())?;
            w.mark_purge(q.id)?;
            continue;
        }
        if !stage.dirty {
            continue;
        }
        if let Some(new_first) = stage.trim_to() {
            stage.trimmed = w.trim(q.id, stage.view.first_offset, new_first)?;
            stage.view.first_offset = new_first;
        }
        w.put_queue(
            q.tenant_id.as_str(),
            q.task_id.as_str(),
            &q.record(&stage.view),
        )?;
    }
    Ok(())
}

/// Applies durable stages to the published state and sends to live subscribers. Each queue's
/// state is advanced and its messages sent under that queue's lock (see `hub`).
fn publish(registry: &Registry, batch: Batch) {
    for stage in batch.stages {
        let q = stage.q;
        let removed = stage.view.removed;
        {
            let mut st = q.lock();
            if stage.view.cancel.is_some() && st.view.cancel.is_none() {
                q.cancel_token.cancel();
            }
            st.view = stage.view;
            for msg in stage.outbox {
                st.hub.publish(msg);
            }
            if removed {
                st.hub.shut();
            }
        }
        let key = (q.tenant_id.clone(), q.task_id.clone());
        if removed {
            let mut reg = registry.write().unwrap_or_else(|p| p.into_inner());
            if reg.get(&key).is_some_and(|cur| Arc::ptr_eq(cur, &q)) {
                reg.remove(&key);
            }
        } else if stage.created {
            registry
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .insert(key, q);
        }
    }
}

fn not_found(q: &QueueShared) -> Error {
    Error::QueueNotFound {
        task_id: q.task_id.to_string(),
    }
}

fn reply(cmd: Command, outcome: Outcome) {
    if let Outcome::Failed(e) = outcome {
        return reply_err(cmd, e);
    }
    match (cmd, outcome) {
        (Command::Append { reply, .. }, Outcome::Offsets(o)) => {
            let _ = reply.send(Ok(o));
        }
        (Command::Create { reply, .. }, Outcome::Created(q)) => {
            let _ = reply.send(Ok(q));
        }
        (Command::Delete { reply, .. }, Outcome::Removed(removed)) => {
            let _ = reply.send(Ok(removed));
        }
        (Command::SaveCheckpoint { reply, .. }, Outcome::Saved(saved)) => {
            let _ = reply.send(Ok(saved));
        }
        (
            Command::Close { reply, .. }
            | Command::Cancel { reply, .. }
            | Command::Shutdown { reply },
            _,
        ) => {
            let _ = reply.send(Ok(()));
        }
        (Command::Sync { reply }, _) => {
            if let Some(reply) = reply {
                let _ = reply.send(Ok(()));
            }
        }
        (cmd, _) => reply_err(cmd, Error::storage("internal: mismatched writer outcome")),
    }
}

fn reply_err(cmd: Command, e: Error) {
    match cmd {
        Command::Append { reply, .. } => {
            let _ = reply.send(Err(e));
        }
        Command::Create { reply, .. } => {
            let _ = reply.send(Err(e));
        }
        Command::Delete { reply, .. } => {
            let _ = reply.send(Err(e));
        }
        Command::SaveCheckpoint { reply, .. } => {
            let _ = reply.send(Err(e));
        }
        Command::Close { reply, .. }
        | Command::Cancel { reply, .. }
        | Command::Shutdown { reply } => {
            let _ = reply.send(Err(e));
        }
        Command::Sync { reply } => {
            if let Some(reply) = reply {
                let _ = reply.send(Err(e));
            }
        }
        Command::Compact { reply } => {
            let _ = reply.send(Err(e));
        }
    }
}

/// Applies a checkpoint save: the checkpoint row, then its events, in one redb write
/// transaction ([`Store::write`], which first writes every pending batch into redb, so the
/// reads here see everything logged before) whose changes are logged as one record.
///
/// Every check that can refuse the save runs before the first write, so a refusal
/// ([`Outcome::Failed`]) leaves the transaction untouched; an error after the first write
/// fails the whole transaction (and with it the batch), so the checkpoint and its events are
/// committed and logged together or not at all. The events' offsets are known before they are
/// appended (the next offsets of the queue: their ids are checked to be new), so the checkpoint
/// row records them.
fn apply_checkpoint(
    w: &mut StoreWriter<'_>,
    batch: &mut Batch,
    save: &PreparedSave,
    now: Timestamp,
) -> Result<Outcome> {
    if w.checkpoint_id_taken(save.tenant.as_str(), &save.checkpoint_id)? {
        return Ok(Outcome::Failed(Error::InvalidCheckpoint {
            field: "checkpoint_id".into(),
            reason: format!("{} already exists", save.checkpoint_id),
        }));
    }
    // A queue removed since the save was prepared is as no queue: the save goes ahead alone.
    let queue = save.queue.as_ref().filter(|q| !batch.stage(q).view.removed);
    let mut record = save.record.clone();
    record.created_at_us = now.as_micros();
    if let Some(q) = queue {
        if batch.stage(q).view.closed {
            return Ok(Outcome::Failed(Error::QueueClosed {
                task_id: q.task_id.to_string(),
            }));
        }
        let retained_from = batch.stage(q).view.first_offset;
        for ev in &save.events {
            if w.retained_event_id(q.id, ev.event_id.as_str())?
                .is_some_and(|at| at >= retained_from)
            {
                return Ok(Outcome::Failed(Error::invalid_event(
                    "event_id",
                    format!("{} is already used in the queue", ev.event_id),
                )));
            }
        }
        let next = batch.stage(q).view.next_offset;
        let mut offsets = (next..).take(save.events.len());
        record.status_offset = offsets.next();
        record.progress_offset = offsets.next();
    }
    let bytes = crate::store::checkpoints::encode_checkpoint(&record)?;
    let seq = w.put_checkpoint(
        save.tenant.as_str(),
        save.workflow.as_str(),
        &save.checkpoint_id,
        &bytes,
    )?;
    if let Some(e) = &save.inject {
        return Err(e.clone());
    }
    if let Some(q) = queue {
        let stage = batch.stage(q);
        for ev in &save.events {
            let offset = stage.view.next_offset;
            let (record, json_at) = ev.encode(offset, None)?;
            w.append_event(q.id, offset, ev.event_id.as_str(), &record)?;
            stage.appended(ev, offset, Bytes::from(record).slice(json_at..));
        }
        if !save.events.is_empty() {
            stage.view.last_activity = now;
            stage.dirty = true;
        }
    }
    Ok(Outcome::Saved(SavedCheckpoint {
        checkpoint_id: save.checkpoint_id.clone(),
        seq,
        status_offset: record.status_offset,
        progress_offset: record.progress_offset,
    }))
}

/// [`finish`] for a checkpoint save's transaction: trims the queue the save appended to beyond
/// its retention bound and persists its record.
fn finish_checkpoint(w: &mut StoreWriter<'_>, batch: &mut Batch) -> Result<()> {
    for stage in &mut batch.stages {
        if stage.was_removed || stage.view.removed || !stage.dirty {
            continue;
        }
        let q = stage.q.clone();
        if let Some(new_first) = stage.trim_to() {
            stage.trimmed = w.trim(q.id, stage.view.first_offset, new_first)?;
            stage.view.first_offset = new_first;
        }
        w.put_queue_record(
            q.tenant_id.as_str(),
            q.task_id.as_str(),
            &q.record(&stage.view),
        )?;
    }
    Ok(())
}
