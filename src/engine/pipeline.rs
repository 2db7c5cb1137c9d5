//! The group-commit pipeline: the one writer of the store.
//!
//! Three threads:
//!
//! 1. The **writer** drains the op channel: it blocks for the first op, then takes whatever
//!    else is already waiting (up to `max_commit_events` events), applies all of it as one
//!    batch ([`Storage::begin`] → [`WriteBatch`]), commits the batch to the store and hands
//!    it to the acknowledger. It then starts on the next batch at once. Between batches it
//!    lets the store do its housekeeping ([`Storage::maintain`]) and runs purge steps.
//! 2. The **acknowledger** takes every batch handed over so far, syncs the store once for all
//!    of them ([`Storage::sync`], in immediate durability), and only then publishes them to
//!    live subscribers and answers their callers, in batch order. When it has nothing in
//!    hand and no other op waits, the writer does this for its batch itself, which spares a
//!    lone request one thread wake-up (see `Acks`).
//! 3. The **background** thread runs work the store hands off between batches
//!    ([`Storage::background`]: for the embedded store, writing logged batches into redb).
//!
//! So throughput grows with the number of waiting callers, the sync of one batch overlaps the
//! CPU work of the next, and each acknowledgement still means "durable".
//!
//! # Ordering
//!
//! This is the write path's ordering argument; the store's half (what a commit does, and why
//! its readers never miss a committed batch) is in `storage::redb`'s module docs.
//!
//! - Offsets are assigned while the batch is built, from the writer's *committed* view of each
//!   queue. The writer is the only thread that builds batches and the only one that changes
//!   committed views (right after a successful commit), so offsets are dense and never reused.
//! - The committed view runs ahead of the *published* view while batches wait for their
//!   sync. The acknowledger publishes a batch (advances the published view and sends its live
//!   messages, under the queue's lock) only after the sync that covers it, and batches in
//!   commit order. Subscribers read the store only below the published offset, so they never
//!   see an event before it is durable, and the store holds every event below it.
//! - A queue's retention bound (`max_buffer_size`) is applied in the same batch as the appends
//!   that exceed it, so the bound holds right after each commit. Idempotency lookups, closed /
//!   cancelled / finished checks and expiry checks all run against the committed view inside
//!   the batch, so two ops in one batch see each other.
//!
//! # Failure
//!
//! - A commit the store **rejected** (a full disk, typically: nothing of the batch stored)
//!   fails only its batch's callers. The next batch is tried normally, so writes resume by
//!   themselves once space is freed.
//! - Any other failure — a failed commit the store could not undo, a failed sync, a failed
//!   fold or background write — is permanent: the batch's callers (and, for a sync, every
//!   batch waiting for it) get the error, and the pipeline refuses all later writes with
//!   [`Error::StoreFailed`] until the store is reopened, rather than pretend later commits
//!   are fine. After a failed fsync the kernel may have dropped the unsynced pages, so
//!   nothing written since the last good sync can be trusted in place.
//! - A **panic** on any of the three threads (a bug) poisons the engine: callers get
//!   [`Error::Poisoned`] naming the thread, and writes stop.
//!
//! Recovery on reopen keeps exactly the batches that reached stable storage (a caller that
//! got an error may find its event stored, as after a timeout; idempotent retries make that
//! safe).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc;

use super::hub::{Live, RecordedEvent};
use super::ops::{
    Answer, Answered, Append, Call, Cancel, Delete, NewQueue, Op, PreparedEvent, PreparedSave,
    SavedCheckpoint, StreamAppend, StreamAppended,
};
use super::state::{CancelInfo, QueueState, View};
use crate::clock::Clock;
use crate::error::{Error, Result, StorageError};
use crate::event::Timestamp;
use crate::ids::{TaskId, TenantId};
use crate::metrics::Metrics;
use crate::storage::{PendingPurge, QueueRecord, RemoteQueue, Storage, WriteBatch, WriteError};

/// Every live queue by `(tenant, task)`. Written only by the pipeline, after commits.
pub(crate) type Registry = RwLock<super::registry::Queues>;

/// What the writer's channel carries: an op to batch, or a compaction (which runs between
/// batches, after whatever was collected with it).
pub(crate) enum Request {
    Write(Op),
    Compact(Call<(), (u64, u64)>),
    /// Other nodes' changes of a shared store's queues (see `follow`): answers the queues
    /// whose published state should follow, with their new records.
    Remote(Call<Remote, Vec<(Arc<QueueState>, QueueRecord)>>),
    /// A queue this node does not know, to be loaded from a shared store if it holds it.
    Load(Call<(TenantId, TaskId), Option<Arc<QueueState>>>),
}

/// Changes a shared store announced (or, after a reload, everything it holds).
pub(crate) struct Remote {
    pub changes: Vec<RemoteQueue>,
    /// `changes` is every queue the store holds: a queue this node knows that is not among
    /// them may have been removed (checked with the store before it is forgotten).
    pub complete: bool,
    /// Records of queues whose published state may be behind them although this node's
    /// writer has seen them (see [`Notice::Behind`](crate::storage::Notice::Behind)): taken in
    /// as changes, and followed even when not new to the writer.
    pub behind: Vec<RemoteQueue>,
}

/// The first storage failure, shared by the pipeline's threads.
#[derive(Default)]
struct Failure(Mutex<Option<StorageError>>);

impl Failure {
    fn get(&self) -> Option<StorageError> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set(&self, e: &Error) {
        let mut slot = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            tracing::error!(error = %e, "storage failure; refusing further writes until reopen");
            *slot = Some(match e {
                Error::Storage(se) | Error::StoreFailed(se) => se.clone(),
                other => StorageError::msg(other),
            });
        }
    }
}

/// Set when one of the pipeline's threads panicked (see [`Error::Poisoned`]).
#[derive(Debug, Default)]
pub(crate) struct Poison(Mutex<Option<Arc<str>>>);

impl Poison {
    /// The thread that panicked, if one did.
    pub(crate) fn get(&self) -> Option<Arc<str>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The error a caller gets when the pipeline is gone: [`Error::Poisoned`] after a panic,
    /// [`Error::ShuttingDown`] otherwise.
    pub(crate) fn gone(&self) -> Error {
        match self.get() {
            Some(thread) => Error::Poisoned(thread),
            None => Error::ShuttingDown,
        }
    }
}

/// Marks the engine poisoned if the thread holding it unwinds from a panic.
struct PoisonGuard {
    poison: Arc<Poison>,
    thread: &'static str,
}

impl Drop for PoisonGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            tracing::error!(
                thread = self.thread,
                "a worker thread panicked; writes stop"
            );
            let mut slot = self.poison.0.lock().unwrap_or_else(|p| p.into_inner());
            slot.get_or_insert_with(|| Arc::from(self.thread));
        }
    }
}

/// A queue's state as the current batch sees it.
struct Stage {
    q: Arc<QueueState>,
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
    fn of(q: &Arc<QueueState>) -> Self {
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

    /// Appends `ev` at the view's next offset (with `derived` as its id when the store
    /// derives one): stores it in the batch, advances the view and queues the event for
    /// live subscribers. Returns the offset.
    fn append(
        &mut self,
        w: &mut dyn WriteBatch,
        ev: &PreparedEvent,
        derived: Option<&[u8; crate::storage::DERIVED_LEN]>,
    ) -> Result<u64> {
        let offset = self.view.next_offset;
        let (record, json_at) = ev.encode(w, offset, derived)?;
        let record = Bytes::from(record);
        let json = record.slice(json_at..);
        let id = derived.is_none().then_some(&ev.event_id);
        w.append(
            self.q.id(),
            offset,
            id,
            record,
            json_at,
            (ev.event_type.code(), ev.terminal),
        )?;
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
        Ok(offset)
    }

    /// The first offset to keep so that the queue holds at most its `max_buffer_size` events,
    /// when that means trimming.
    fn trim_to(&self) -> Option<u64> {
        let (v, max) = (&self.view, self.q.max_buffer_size());
        (v.next_offset - v.first_offset > max).then(|| v.next_offset - max)
    }

    fn touched(&mut self, now: Timestamp) {
        if self.appended > 0 {
            self.view.last_activity = now;
            self.dirty = true;
        }
    }
}

/// The staged changes of one batch.
#[derive(Default)]
struct Batch {
    stages: Vec<Stage>,
    /// Where each queue's stage is, once the batch has more than [`LINEAR_STAGES`].
    index: HashMap<u64, usize>,
}

/// Up to this many queues in a batch, a queue's stage is found by looking at each: most
/// batches touch one or a few queues, and an index would be an allocation per batch.
const LINEAR_STAGES: usize = 8;

impl Batch {
    fn stage(&mut self, q: &Arc<QueueState>) -> &mut Stage {
        let id = q.id();
        let found = if self.index.is_empty() {
            self.stages.iter().position(|s| s.q.id() == id)
        } else {
            self.index.get(&id).copied()
        };
        let i = match found {
            Some(i) => i,
            None => {
                self.stages.push(Stage::of(q));
                let i = self.stages.len() - 1;
                if !self.index.is_empty() {
                    self.index.insert(id, i);
                } else if self.stages.len() > LINEAR_STAGES {
                    self.index = (self.stages.iter().enumerate())
                        .map(|(i, s)| (s.q.id(), i))
                        .collect();
                }
                i
            }
        };
        &mut self.stages[i]
    }
}

/// A committed batch waiting for its sync.
struct Job {
    batch: Batch,
    answers: Vec<Answer>,
    /// The batch wrote something to the store.
    logged: bool,
    /// Answer only after a sync (immediate durability, flush, shutdown).
    needs_sync: bool,
    /// When the writer began the batch (for `Metrics::commit_seconds`).
    started: Instant,
}

/// The writer's settings and shared state.
pub(crate) struct Writer {
    pub storage: Arc<dyn Storage>,
    pub registry: Arc<Registry>,
    pub clock: Arc<dyn Clock>,
    pub metrics: Arc<Metrics>,
    pub poison: Arc<Poison>,
    pub rx: mpsc::Receiver<Request>,
    /// `None` in immediate durability; the flush interval in buffered durability.
    pub flush_interval: Option<Duration>,
    pub max_commit_events: usize,
    pub next_queue_id: u64,
    /// Deleted queues whose events are still to be removed.
    pub purges: Vec<PendingPurge>,
    /// Most events one purge step removes.
    pub purge_step: u64,
    /// A shared store's follower, told of queues whose published state no notice will bring
    /// up to date (see `process`); `None` for a store only this process writes.
    pub feed: Option<super::follow::Feed>,
}

/// While appends keep coming, one purge step runs at most this often, so a large deletion
/// never holds appends behind it.
const PURGE_PACE: Duration = Duration::from_millis(10);

/// A failure before a batch's commit (nothing of it was stored): a networked store that
/// could not be reached takes the next batch normally, any other store error stops writes
/// as a failed commit does.
fn unstored(e: Error) -> WriteError {
    match &e {
        Error::Storage(se) if se.is_unavailable() => WriteError::Rejected(e),
        _ => WriteError::Fatal(e),
    }
}

/// Most times one batch is rebuilt after a shared store found it stale (other nodes kept
/// writing the same queues); then its callers get a storage error and may retry.
const MAX_REBUILDS: u32 = 32;

/// The random wait before a rebuild grows by up to this per round (see `process`)…
const REBUILD_BACKOFF: Duration = Duration::from_micros(200);
/// …up to this.
const MAX_BACKOFF: Duration = Duration::from_millis(5);

/// After a purge step was refused (its commit was rejected: a full disk), idle retries wait
/// this long between attempts.
const PURGE_RETRY: Duration = Duration::from_millis(100);

impl Writer {
    /// Runs the pipeline until a shutdown op or until every sender is gone.
    ///
    /// # Errors
    ///
    /// Only if a helper thread cannot be started.
    pub(crate) fn run(self) -> Result<()> {
        let failure = Arc::new(Failure::default());
        let (jobs_tx, jobs_rx) = std_mpsc::channel();
        let acks = Arc::new(Acks {
            storage: self.storage.clone(),
            registry: self.registry.clone(),
            metrics: self.metrics.clone(),
            failure: failure.clone(),
            flush_interval: self.flush_interval,
            outstanding: AtomicUsize::new(0),
            sync: Mutex::new(SyncState {
                unsynced: false,
                last_sync: Instant::now(),
            }),
        });
        let acker = Acknowledger {
            jobs: jobs_rx,
            acks: acks.clone(),
        };
        let poison = self.poison.clone();
        let ack = std::thread::Builder::new()
            .name("eventqueue-ack".into())
            .spawn(move || {
                let _guard = PoisonGuard {
                    poison,
                    thread: "acknowledger",
                };
                acker.run();
            })
            .map_err(|e| Error::internal(format!("cannot start the acknowledger thread: {e}")))?;
        let (bg_tx, bg_rx) = std_mpsc::channel::<crate::storage::Handoff>();
        let background = {
            let (storage, failure, poison) =
                (self.storage.clone(), failure.clone(), self.poison.clone());
            std::thread::Builder::new()
                .name("eventqueue-bulk".into())
                .spawn(move || {
                    let _guard = PoisonGuard {
                        poison,
                        thread: "background",
                    };
                    for work in bg_rx {
                        if let Err(e) = storage.background(work) {
                            failure.set(&e);
                        }
                    }
                })
                .map_err(|e| Error::internal(format!("cannot start the background thread: {e}")))?
        };
        let keys = self
            .registry
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|((t, k), _)| (t.clone(), k.clone()))
            .collect();
        let purges = self.purges.iter().cloned().collect();
        let poison = self.poison.clone();
        let mut stage = WriterLoop {
            w: self,
            failure,
            jobs: jobs_tx,
            acks,
            background: bg_tx,
            keys,
            purges,
            last_purge: Instant::now(),
            purge_refused: false,
            own: Vec::with_capacity(1),
        };
        {
            // Declared after `stage`, so dropped before it while unwinding: the engine is
            // marked poisoned before the op channel closes.
            let _guard = PoisonGuard {
                poison,
                thread: "writer",
            };
            stage.run();
        }
        drop(stage);
        let _ = ack.join();
        let _ = background.join();
        Ok(())
    }
}

struct WriterLoop {
    w: Writer,
    failure: Arc<Failure>,
    jobs: std_mpsc::Sender<Job>,
    /// The acknowledger's shared half (see [`Acks`]).
    acks: Arc<Acks>,
    /// Work for the background thread.
    background: std_mpsc::Sender<crate::storage::Handoff>,
    /// Queues that exist as of the latest commit (creates may not be published yet).
    keys: HashSet<(TenantId, TaskId)>,
    /// Deleted queues whose events are still to be removed, oldest deletion first; the front
    /// one's range shrinks as steps remove it.
    purges: VecDeque<PendingPurge>,
    last_purge: Instant,
    /// The last purge step was refused (a full disk): idle retries back off.
    purge_refused: bool,
    /// The batch the writer acknowledges itself (see `hand_over`), in a list kept between
    /// batches so that doing so allocates nothing.
    own: Vec<Job>,
}

impl WriterLoop {
    fn run(&mut self) {
        loop {
            let first = if self.purges.is_empty() || self.failure.get().is_some() {
                match self.w.rx.blocking_recv() {
                    Some(req) => req,
                    None => break,
                }
            } else {
                // Idle with deletions pending: purge step by step, checking for ops between
                // steps.
                match self.w.rx.try_recv() {
                    Ok(req) => req,
                    Err(mpsc::error::TryRecvError::Empty) => {
                        if self.purge_refused {
                            // Do not spin on a full disk; ops still get through.
                            std::thread::sleep(PURGE_RETRY);
                        }
                        self.purge_step();
                        continue;
                    }
                    Err(mpsc::error::TryRecvError::Disconnected) => break,
                }
            };
            let mut ops = Vec::new();
            let mut compactions = Vec::new();
            let mut n = 0;
            let mut next = Some(first);
            while let Some(req) = next.take() {
                match req {
                    Request::Write(op) => {
                        n += op.event_count();
                        ops.push(op);
                    }
                    Request::Compact(call) => compactions.push(call),
                    Request::Remote(call) => {
                        let accepted = self.remote(call.args);
                        call.reply.send(Ok(accepted));
                    }
                    Request::Load(call) => {
                        let (tenant, task) = &call.args;
                        let result = self.load(tenant, task);
                        call.reply.send(result);
                    }
                }
                if n < self.w.max_commit_events {
                    next = self.w.rx.try_recv().ok();
                }
            }
            let ops = self.admit(ops);
            let shutdown = !ops.is_empty() && self.process(ops);
            // A compaction changes no content: it runs after whatever was collected with it.
            for call in compactions {
                let result = self.compact();
                call.reply.send(result);
            }
            if shutdown {
                return;
            }
            if !self.purges.is_empty() && self.last_purge.elapsed() >= PURGE_PACE {
                self.purge_step();
            }
            self.maintain();
        }
        // Every handle is gone: leave a durable store behind.
        if self.failure.get().is_none()
            && let Err(e) = self.w.storage.fold()
        {
            self.failure.set(&e);
        }
    }

    /// The store's housekeeping between batches (see [`Storage::maintain`]).
    fn maintain(&mut self) {
        if self.failure.get().is_some() {
            return;
        }
        let started = Instant::now();
        match self.w.storage.maintain() {
            Err(e) => self.failure.set(&e),
            Ok(done) => {
                if done.folded {
                    let m = &self.w.metrics;
                    Metrics::add(&m.log_folds, 1);
                    m.log_fold_seconds.observe(started.elapsed().as_secs_f64());
                }
                if let Some(work) = done.handoff {
                    // Should the thread be gone, the next fold does the work.
                    let _ = self.background.send(work);
                }
            }
        }
    }

    /// Removes one bounded step of the oldest pending deletion, as a batch of its own. It
    /// needs no sync of its own: if a crash loses it, the queue's purge mark is still stored
    /// and the step is redone after reopen.
    fn purge_step(&mut self) {
        self.last_purge = Instant::now();
        if self.failure.get().is_some() {
            return;
        }
        let Some(purge) = self.purges.front() else {
            return;
        };
        let (qid, from, end) = (purge.qid, purge.offsets.start, purge.offsets.end);
        let to = from.saturating_add(self.w.purge_step.max(1)).min(end);
        let last = to >= end;
        let result = self
            .w
            .storage
            .begin()
            .map_err(unstored)
            .and_then(|mut batch| {
                batch.purge(qid, from, to, last)?;
                batch.commit()
            });
        match result {
            Ok(_) => {
                self.purge_refused = false;
                Metrics::add(&self.w.metrics.events_removed, to.saturating_sub(from));
                if last {
                    self.purges.pop_front();
                    self.reclaim();
                } else if let Some(front) = self.purges.front_mut() {
                    front.offsets.start = to;
                }
                self.w.metrics.pending_purges.store(
                    self.purges.len() as u64,
                    std::sync::atomic::Ordering::Relaxed,
                );
            }
            // The step is redone later.
            Err(WriteError::Rejected(_) | WriteError::Stale(_)) => self.purge_refused = true,
            Err(WriteError::Fatal(e)) => self.failure.set(&e),
        }
    }

    /// After a deletion completed: lets the store give the space back when room is short.
    fn reclaim(&mut self) {
        if self.failure.get().is_some() {
            return;
        }
        match self.w.storage.reclaim_if_low() {
            Ok(Some((before, after))) => tracing::info!(
                bytes_before = before,
                bytes_after = after,
                "disk nearly full: compacted the database after a deletion"
            ),
            Ok(None) => {}
            Err(e) => self.failure.set(&e),
        }
    }

    /// Refuses the ops that add data while the store is short of room: they get
    /// [`Error::DiskFull`]; the others go on, so deletions, cancellations and closes still
    /// work on a full disk.
    fn admit(&mut self, ops: Vec<Op>) -> Vec<Op> {
        if !ops.iter().any(Op::adds_data) {
            return ops;
        }
        let Err(e) = self.w.storage.admit() else {
            return ops;
        };
        let (refused, admitted): (Vec<_>, Vec<_>) = ops.into_iter().partition(Op::adds_data);
        for op in refused {
            op.refuse(e.clone());
        }
        admitted
    }

    /// Compacts the store's file; a failure stops writes, as for a failed fold.
    fn compact(&mut self) -> Result<(u64, u64)> {
        if let Some(e) = self.failure.get() {
            return Err(Error::StoreFailed(e));
        }
        self.w
            .storage
            .compact()
            .inspect_err(|e| self.failure.set(e))
    }

    /// Applies and commits one batch and hands it to the acknowledger. Returns true when a
    /// shutdown was processed.
    fn process(&mut self, ops: Vec<Op>) -> bool {
        #[cfg(feature = "failpoints")]
        if self.w.storage.faults().writer_panic() {
            panic!("injected panic of the writer thread");
        }
        let shutdown = ops.iter().any(|op| matches!(op, Op::Shutdown(_)));
        if let Some(e) = self.failure.get() {
            for op in ops {
                op.refuse(Error::StoreFailed(e.clone()));
            }
            return shutdown;
        }
        let needs_sync = self.w.flush_interval.is_none()
            || ops
                .iter()
                .any(|op| matches!(op, Op::Flush(_) | Op::Shutdown(_)));
        let now = self.w.clock.now();
        let started = Instant::now();
        let mut ops = ops;
        let mut rebuilds = 0;
        // Newer states of queues taken in from stale rounds (see the end).
        let mut absorbed: Vec<(u64, RemoteQueue)> = Vec::new();
        let (batch, answers, next_queue_id, result) = loop {
            let (batch, answers, next_queue_id, result) = self.build(ops, now);
            match result {
                // Nothing was stored: take in the newer state, then apply the same ops again
                // (or, after too many rounds, fail them; the newer state is taken in either
                // way, so the next batch builds on it).
                Err(WriteError::Stale(fresh)) => {
                    self.undo_keys(&batch);
                    self.absorb(&batch, &fresh, &mut absorbed);
                    if rebuilds < MAX_REBUILDS {
                        rebuilds += 1;
                        Metrics::add(&self.w.metrics.batch_rebuilds, 1);
                        // Nodes writing one queue in step would keep overtaking each other:
                        // after the first rebuild, wait a random while, growing with the
                        // rounds, so one of them gets through.
                        if rebuilds > 1 {
                            let most = REBUILD_BACKOFF.saturating_mul(rebuilds).min(MAX_BACKOFF);
                            std::thread::sleep(most.mul_f64(fastrand::f64()));
                        }
                        ops = answers.into_iter().map(Answer::into_op).collect();
                        continue;
                    }
                    let e = Error::Storage(StorageError::io(
                        "storing a batch",
                        std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!(
                                "other nodes kept changing its queues; gave up after \
                                 {MAX_REBUILDS} rebuilds"
                            ),
                        ),
                    ));
                    // Its creates and removals are undone already: an empty batch.
                    break (
                        Batch::default(),
                        answers,
                        next_queue_id,
                        Err(WriteError::Rejected(e)),
                    );
                }
                other => break (batch, answers, next_queue_id, other),
            }
        };
        // The last batch before a shutdown is followed by a fold, so the store is wholly
        // durable in its own form when it is closed.
        let result = match result {
            Ok(logged) if shutdown => self
                .w
                .storage
                .fold()
                .map(|()| logged)
                .map_err(WriteError::Fatal),
            other => other,
        };
        self.tell_behind(&batch, result.is_ok(), absorbed);
        match result {
            Ok(logged) => {
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
                        self.purges.push_back(PendingPurge {
                            qid: stage.q.id(),
                            offsets: stage.view.first_offset..stage.view.next_offset,
                        });
                    }
                }
                m.pending_purges.store(
                    self.purges.len() as u64,
                    std::sync::atomic::Ordering::Relaxed,
                );
                self.hand_over(Job {
                    batch,
                    answers,
                    logged,
                    needs_sync,
                    started,
                });
            }
            Err(failed) => {
                self.undo_keys(&batch);
                // A rejected batch left the store as it was: only its callers fail (a full
                // disk: the next batch may fit). Anything else stops writes until reopen.
                if let WriteError::Fatal(e) = &failed {
                    self.failure.set(e);
                }
                let e = failed.error();
                for answer in answers {
                    answer.fail(e.clone());
                }
            }
        }
        shutdown
    }

    /// Has a committed batch synced (as its durability asks), published and answered.
    ///
    /// The writer does it itself when the acknowledger has nothing in hand (so the batch is
    /// next in commit order, see [`Acks`]) and no op is waiting to be batched: a lone
    /// request is then answered without waking another thread. Otherwise the acknowledger
    /// does it, so the sync, publication and answers of this batch overlap the building and
    /// commit of the next (under load the writer's own CPU is what bounds throughput, even
    /// when no sync is needed).
    fn hand_over(&mut self, job: Job) {
        let acks = &self.acks;
        if acks.outstanding.load(Ordering::Acquire) == 0 && self.w.rx.is_empty() {
            let mut st = acks.sync_state();
            self.own.push(job);
            acks.acknowledge(&mut st, &mut self.own);
            Metrics::add(&self.w.metrics.writer_acks, 1);
            return;
        }
        acks.outstanding.fetch_add(1, Ordering::Relaxed);
        if let Err(std_mpsc::SendError(job)) = self.jobs.send(job) {
            // The acknowledger ends only when this sender is gone: it panicked.
            acks.outstanding.fetch_sub(1, Ordering::Relaxed);
            let e = Error::Poisoned(Arc::from("acknowledger"));
            for answer in job.answers {
                answer.fail(e.clone());
            }
        }
    }

    /// Applies `ops` as one batch and commits it. Returns the batch, the ops' answers (every
    /// op's, unless an op failed the batch: the ops after it were refused), the next queue id
    /// after the batch, and the commit's result.
    fn build(
        &mut self,
        ops: Vec<Op>,
        now: Timestamp,
    ) -> (Batch, Vec<Answer>, u64, Result<bool, WriteError>) {
        let mut batch = Batch::default();
        let mut next_queue_id = self.w.next_queue_id;
        let mut answers = Vec::with_capacity(ops.len());
        let result = match self.w.storage.begin() {
            Err(e) => {
                for op in ops {
                    op.refuse(e.clone());
                }
                Err(unstored(e))
            }
            Ok(mut w) => {
                let mut fatal = None;
                let mut ops = ops.into_iter();
                for op in ops.by_ref() {
                    let (answer, failed) = apply(
                        &mut *w,
                        &mut batch,
                        &self.w.registry,
                        &mut self.keys,
                        &mut next_queue_id,
                        op,
                        now,
                    );
                    answers.push(answer);
                    if failed.is_some() {
                        fatal = failed;
                        break;
                    }
                }
                match fatal {
                    Some(e) => {
                        // Dropping the batch uncommitted leaves nothing of it stored.
                        for op in ops {
                            op.refuse(e.clone());
                        }
                        Err(unstored(e))
                    }
                    None => finish(&mut *w, &mut batch)
                        .map_err(unstored)
                        .and_then(|()| w.commit()),
                }
            }
        };
        (batch, answers, next_queue_id, result)
    }

    /// Forgets the creates and removals of a batch that was not committed, latest first (a
    /// batch that deletes a queue and creates it again ends with it existing).
    fn undo_keys(&mut self, batch: &Batch) {
        for stage in batch.stages.iter().rev() {
            let key = (stage.q.tenant_id().clone(), stage.q.task_id().clone());
            if stage.created {
                self.keys.remove(&key);
            } else if stage.view.removed && !stage.was_removed {
                self.keys.insert(key);
            }
        }
    }

    /// Takes in other nodes' changes (see `follow`), in the order the store applied them:
    /// a change older than what this node saw of a queue (by the store's revision) is old
    /// news, or about a former queue of the same name, and is skipped. Queues new to this
    /// node are adopted; removed ones forgotten. Returns the queues whose published state
    /// should follow their new records.
    ///
    /// Only the committed views change here (the writer's own), so the next batch builds on
    /// the newest state; the published side is the follower's, which reads the events.
    fn remote(&mut self, remote: Remote) -> Vec<(Arc<QueueState>, QueueRecord)> {
        let mut accepted = Vec::new();
        let mut seen = HashSet::new();
        let announced = remote.changes.len();
        let changes = remote.changes.into_iter().chain(remote.behind);
        for (i, change) in changes.enumerate() {
            // Followed even when seen already (see `Remote::behind`).
            let behind = i >= announced;
            let follow_seen = remote.complete || behind;
            let (Ok(tenant), Ok(task)) = (TenantId::new(&change.tenant), TaskId::new(&change.task))
            else {
                continue;
            };
            let key = (tenant, task);
            if remote.complete && !behind {
                seen.insert(key.clone());
            }
            let current = self
                .w
                .registry
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .get(&key)
                .cloned();
            match (current, &change.record) {
                // Deleted here, not yet published: nothing to take in (the store's state of
                // that id is gone).
                (Some(q), Some(_)) if q.committed().removed => {}
                // A record the writer took in earlier (it carries the queue's id here), of a
                // queue since deleted and created again under the name: not this one's.
                (Some(q), Some(record)) if behind && record.id != 0 && record.id != q.id() => {}
                (Some(q), Some(record)) => {
                    if self
                        .w
                        .storage
                        .revision(q.id())
                        .is_some_and(|known| known >= change.rev)
                    {
                        // Seen already; after a reload the published side may still be
                        // behind it (a delivery that could not read): follow again.
                        if follow_seen {
                            accepted.push((q, record.clone()));
                        }
                        continue;
                    }
                    q.committed().merge(&View::of_record(record));
                    self.w.storage.adopt(q.id(), &change);
                    accepted.push((q, record.clone()));
                }
                // Gone from the store after a batch of this node's failed (a delete that
                // was stored after all): forgotten if the store still has no such queue now
                // that every batch this node committed is in it.
                (Some(q), None) if behind => self.forget_if_gone(&q),
                (Some(q), None) => {
                    if self
                        .w
                        .storage
                        .revision(q.id())
                        .is_some_and(|known| known > change.rev)
                    {
                        continue;
                    }
                    self.forget(&q);
                }
                (None, Some(_)) => {
                    // New to this node — or removed here since the change was announced
                    // (this node's delete came after it): only the store's current record
                    // can tell, so the queue is loaded afresh (after every batch this node
                    // committed). Not published yet but committed here: this node's own.
                    if !self.keys.contains(&key)
                        && let Err(e) = self.load(&key.0, &key.1)
                    {
                        tracing::debug!(error = %e, "cannot load a queue another node created");
                    }
                }
                (None, None) => {}
            }
        }
        if remote.complete {
            let missing: Vec<_> = self
                .w
                .registry
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .filter(|((t, k), _)| !seen.contains(&((*t).clone(), (*k).clone())))
                .map(|(_, q)| q.clone())
                .collect();
            // Created here after the reload's read, or really removed: ask again.
            for q in missing {
                self.forget_if_gone(&q);
            }
        }
        accepted
    }

    /// Forgets `q` if the store holds no queue of its name now — asked on the writer's
    /// thread, so after every batch this node committed (a queue it created meanwhile is
    /// there).
    fn forget_if_gone(&mut self, q: &Arc<QueueState>) {
        let (tenant, task) = (q.tenant_id().as_str(), q.task_id().as_str());
        if let Ok(None) = self.w.storage.load_queue(tenant, task) {
            self.forget(q);
        }
    }

    /// A queue another node created, known to this node from now on by a new id.
    fn adopt(
        &mut self,
        key: &(TenantId, TaskId),
        change: &RemoteQueue,
        record: &QueueRecord,
    ) -> Arc<QueueState> {
        let id = self.w.next_queue_id;
        self.w.next_queue_id += 1;
        let record = QueueRecord {
            id,
            ..record.clone()
        };
        let q = Arc::new(QueueState::from_record(
            key.0.clone(),
            key.1.clone(),
            &record,
        ));
        self.w.storage.adopt(id, change);
        self.keys.insert(key.clone());
        self.w
            .registry
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.clone(), q.clone());
        q
    }

    /// A queue another node removed: its subscribers end and this node forgets it.
    fn forget(&mut self, q: &Arc<QueueState>) {
        q.removed_elsewhere();
        let key = (q.tenant_id().clone(), q.task_id().clone());
        let mut reg = self.w.registry.write().unwrap_or_else(|p| p.into_inner());
        // Unless the name is another queue's by now (a newer one of the same task).
        if reg.get(&key).is_none_or(|cur| Arc::ptr_eq(cur, q)) {
            reg.remove(&key);
            self.keys.remove(&key);
        }
        self.w.storage.forget(q.id());
    }

    /// The queue, loaded from a shared store if this node does not know it yet.
    fn load(&mut self, tenant: &TenantId, task: &TaskId) -> Result<Option<Arc<QueueState>>> {
        let key = (tenant.clone(), task.clone());
        if let Some(q) = self
            .w
            .registry
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
        {
            return Ok(Some(q.clone()));
        }
        // Created here but not published yet: not there for callers yet either.
        if self.keys.contains(&key) {
            return Ok(None);
        }
        let Some(change) = self.w.storage.load_queue(tenant.as_str(), task.as_str())? else {
            return Ok(None);
        };
        let Some(record) = change.record.clone() else {
            return Ok(None);
        };
        Ok(Some(self.adopt(&key, &change, &record)))
    }

    /// Tells a shared store's follower which queues of a batch may have a published state
    /// behind the store that no notice will bring up to date:
    ///
    /// - the newer states `absorbed` from stale rounds: the notices of those writes are old
    ///   news to the writer when they come. A queue `batch` commits is published with them
    ///   (see `publish`); any other — the batch failed, or none of its ops kept the queue —
    ///   is followed;
    /// - every queue of a batch that failed (`committed` false): a shared store's rejection
    ///   may leave it stored (see [`WriteError::Rejected`]), and a node skips its own notices.
    fn tell_behind(&self, batch: &Batch, committed: bool, absorbed: Vec<(u64, RemoteQueue)>) {
        let Some(feed) = &self.w.feed else { return };
        let known: Vec<RemoteQueue> = absorbed
            .into_iter()
            .filter(|(qid, _)| !committed || !batch.stages.iter().any(|s| s.q.id() == *qid))
            .map(|(_, q)| q)
            .collect();
        let load = if committed {
            Vec::new()
        } else {
            batch
                .stages
                .iter()
                .map(|s| {
                    let (t, k) = (s.q.tenant_id(), s.q.task_id());
                    (t.as_str().to_string(), k.as_str().to_string())
                })
                .collect()
        };
        feed.behind(known, load);
    }

    /// Takes in the newer state a shared store answered a stale batch with (and adds each
    /// record of a queue this node had to `absorbed`).
    fn absorb(
        &mut self,
        batch: &Batch,
        fresh: &[crate::storage::Fresh],
        absorbed: &mut Vec<(u64, RemoteQueue)>,
    ) {
        for f in fresh {
            let Some(stage) = batch.stages.iter().find(|s| s.q.id() == f.qid) else {
                continue;
            };
            let q = &stage.q;
            if stage.created {
                // Created elsewhere meanwhile: that queue is the one that exists; the rebuilt
                // create answers that it exists.
                if let Some(record) = &f.record {
                    // It keeps the id the failed create gave it (the store knows it by that
                    // id now): never hand that id out again.
                    self.w.next_queue_id = self.w.next_queue_id.max(f.qid + 1);
                    let existing = Arc::new(QueueState::from_record(
                        q.tenant_id().clone(),
                        q.task_id().clone(),
                        record,
                    ));
                    let key = (q.tenant_id().clone(), q.task_id().clone());
                    self.keys.insert(key.clone());
                    self.w
                        .registry
                        .write()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(key, existing);
                }
                continue;
            }
            match &f.record {
                Some(record) => {
                    q.committed().merge(&View::of_record(record));
                    absorbed.retain(|(qid, _)| *qid != f.qid);
                    absorbed.push((
                        f.qid,
                        RemoteQueue {
                            tenant: q.tenant_id().as_str().to_string(),
                            task: q.task_id().as_str().to_string(),
                            rev: f.rev,
                            record: Some(record.clone()),
                        },
                    ));
                }
                None => self.forget(q),
            }
        }
    }
}

/// The second pipeline stage: sync, then publish and answer, in batch order.
///
/// Its work ([`Acks::acknowledge`]) runs on the acknowledger thread, or on the writer itself
/// when nothing is waiting for the acknowledger (see [`WriterLoop::hand_over`]): a thread
/// woken on this kind of machine starts 13–50 µs later, and a lone request pays two such
/// wake-ups on top of the one that brings it to the writer.
///
/// # Ordering
///
/// Batches are published and answered in commit order whoever does it: the writer
/// acknowledges a batch itself only when `outstanding` is 0, that is when every batch it
/// handed over earlier has been published and answered (the acknowledger lowers the count,
/// with release ordering, only after it has done so; the writer reads it with acquire
/// ordering). While the writer acknowledges, it hands nothing over, so the acknowledger has
/// no batch to publish before or beside it. `sync` (the flush state) is a mutex because
/// both threads may sync: a buffered store's periodic sync runs on the acknowledger's timer.
struct Acks {
    storage: Arc<dyn Storage>,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    failure: Arc<Failure>,
    flush_interval: Option<Duration>,
    /// Batches handed to the acknowledger thread and not yet published and answered.
    outstanding: AtomicUsize,
    sync: Mutex<SyncState>,
}

/// Whether the store holds commits not yet synced, and when it was last synced.
struct SyncState {
    unsynced: bool,
    last_sync: Instant,
}

impl Acks {
    fn sync_state(&self) -> std::sync::MutexGuard<'_, SyncState> {
        self.sync.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Syncs the store if `jobs` (or, in buffered durability, the flush interval) ask for
    /// it, then publishes the batches and answers their callers, in order. Leaves `jobs`
    /// empty (its room is kept for the next ones).
    fn acknowledge(&self, st: &mut SyncState, jobs: &mut Vec<Job>) {
        st.unsynced |= jobs.iter().any(|j| j.logged);
        let due = self
            .flush_interval
            .is_some_and(|every| st.last_sync.elapsed() >= every);
        if st.unsynced && (due || jobs.iter().any(|j| j.needs_sync)) {
            if let Err(e) = self.storage.sync() {
                self.failure.set(&e);
                for job in jobs.drain(..) {
                    for answer in job.answers {
                        answer.fail(e.clone());
                    }
                }
                return;
            }
            st.unsynced = false;
            st.last_sync = Instant::now();
        }
        for job in jobs.drain(..) {
            // A batch committed after a failed sync is not answered as durable.
            if job.needs_sync
                && let Some(e) = self.failure.get()
            {
                for answer in job.answers {
                    answer.fail(Error::StoreFailed(e.clone()));
                }
                continue;
            }
            self.metrics
                .commit_seconds
                .observe(job.started.elapsed().as_secs_f64());
            publish(&self.registry, job.batch);
            for answer in job.answers {
                answer.send();
            }
        }
    }
}

/// The acknowledger thread: acknowledges what the writer hands over, and in buffered
/// durability syncs the store at least every flush interval.
struct Acknowledger {
    jobs: std_mpsc::Receiver<Job>,
    acks: Arc<Acks>,
}

impl Acknowledger {
    fn run(self) {
        // Long enough to mean "only when handed a batch" in immediate durability.
        const IDLE: Duration = Duration::from_secs(3600);
        let mut jobs = Vec::new();
        loop {
            // In buffered durability, wake when the pending commits' sync falls due, or
            // after one flush interval (commits the writer acknowledged itself meanwhile
            // set `unsynced` without waking this thread), so no commit waits longer than
            // one interval for its sync.
            let wait = match self.acks.flush_interval {
                None => IDLE,
                Some(every) => {
                    let st = self.acks.sync_state();
                    // After a failed sync, retry once per interval, not in a spin.
                    if st.unsynced && self.acks.failure.get().is_none() {
                        every.saturating_sub(st.last_sync.elapsed())
                    } else {
                        every
                    }
                }
            };
            match self.jobs.recv_timeout(wait) {
                Ok(job) => jobs.push(job),
                Err(std_mpsc::RecvTimeoutError::Timeout) => {}
                Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
            }
            while let Ok(job) = self.jobs.try_recv() {
                jobs.push(job);
            }
            let n = jobs.len();
            let mut st = self.acks.sync_state();
            self.acks.acknowledge(&mut st, &mut jobs);
            // Only now may the writer acknowledge a later batch itself.
            self.acks.outstanding.fetch_sub(n, Ordering::Release);
        }
    }
}

/// An op's answer from its result: `Ok(result)` is the op's own (a refusal included),
/// `Err(e)` a failure of the whole batch, returned as well.
fn settle<A, T>(
    call: Call<A, T>,
    result: Result<Result<T>>,
    wrap: fn(Answered<A, T>) -> Answer,
) -> (Answer, Option<Error>) {
    match result {
        Ok(own) => (wrap(Answered::new(call, own)), None),
        Err(e) => (wrap(Answered::new(call, Err(e.clone()))), Some(e)),
    }
}

/// Applies one op to the batch.
fn apply(
    w: &mut dyn WriteBatch,
    batch: &mut Batch,
    registry: &Registry,
    keys: &mut HashSet<(TenantId, TaskId)>,
    next_queue_id: &mut u64,
    op: Op,
    now: Timestamp,
) -> (Answer, Option<Error>) {
    match op {
        Op::Append(call) => {
            let result = append(w, batch, &call.args, now);
            settle(call, result, Answer::Append)
        }
        Op::StreamAppend(call) => {
            let result = stream_append(w, batch, &call.args, now);
            settle(call, result, Answer::StreamAppend)
        }
        Op::Create(call) => {
            let result = create(w, batch, registry, keys, next_queue_id, &call.args, now);
            settle(call, result, Answer::Create)
        }
        Op::Close(call) => {
            let result = close(w, batch, &call.args);
            settle(call, Ok(result), Answer::Close)
        }
        Op::Cancel(call) => {
            let result = cancel(w, batch, &call.args, now);
            settle(call, Ok(result), Answer::Cancel)
        }
        Op::Delete(call) => {
            let result = delete(batch, keys, &call.args);
            settle(call, Ok(result), Answer::Delete)
        }
        Op::SaveCheckpoint(call) => {
            let result = save_checkpoint(w, batch, &call.args, now);
            settle(call, result, Answer::Save)
        }
        Op::Flush(call) => settle(call, Ok(Ok(())), Answer::Flush),
        Op::Shutdown(call) => settle(call, Ok(Ok(())), Answer::Shutdown),
    }
}

fn append(
    w: &mut dyn WriteBatch,
    batch: &mut Batch,
    op: &Append,
    now: Timestamp,
) -> Result<Result<Vec<u64>>> {
    let queue = &op.queue;
    let stage = batch.stage(queue);
    if stage.view.removed {
        return Ok(Err(queue.not_found()));
    }
    if stage.view.closed {
        return Ok(Err(Error::QueueClosed {
            task_id: queue.task_id().to_string(),
        }));
    }
    let mut offsets = Vec::with_capacity(op.events.len());
    for ev in &op.events {
        let next = stage.view.next_offset;
        // A derived id is new by construction (it names this offset), and so is one
        // generated on receipt: no lookup.
        let derived = ev.derived_id(w, queue.id(), next);
        if derived.is_none()
            && !ev.id_is_generated()
            && let Some(existing) = w.find_event_id(
                queue.id(),
                ev.event_id.as_str(),
                stage.view.first_offset..next,
            )?
        {
            offsets.push(existing);
            continue;
        }
        offsets.push(stage.append(w, ev, derived.as_ref())?);
    }
    stage.touched(now);
    Ok(Ok(offsets))
}

/// A Durable Streams append: the producer's and `Stream-Seq`'s checks against the stream's
/// committed state, then the messages, the new state and the close, all staged in this batch
/// (so stored together or not at all; see [`StreamAppend`]). Every refusal comes before the
/// first change.
fn stream_append(
    w: &mut dyn WriteBatch,
    batch: &mut Batch,
    op: &StreamAppend,
    now: Timestamp,
) -> Result<Result<StreamAppended>> {
    let queue = &op.queue;
    let stage = batch.stage(queue);
    if stage.view.removed {
        return Ok(Err(queue.not_found()));
    }
    let producers = stage.view.producers.clone().unwrap_or_default();
    // An answer decided on the producer state alone (a refusal, or a duplicate, which a
    // newer epoch would fence instead) has the store confirm that state: on a store shared
    // by several nodes this node's view may trail another node's append of the same
    // producer, and a stale view makes the batch stale (decided again on fresh state)
    // instead of answering a spurious refusal.
    let decided = |w: &mut dyn WriteBatch, answer| {
        w.check(queue.id());
        Ok(Ok(answer))
    };
    let claim = op.producer.as_ref().map(|p| (p.id.clone(), p.epoch, p.seq));
    if stage.view.closed {
        let next_offset = stage.view.next_offset;
        // The request that closed the stream, again: a duplicate. A close alone is
        // idempotent too.
        if op.messages.is_empty() || (claim.is_some() && claim == producers.closed_by) {
            return Ok(Ok(StreamAppended::Duplicate {
                next_offset,
                last_seq: op.producer.as_ref().map_or(0, |p| p.seq),
                closed: true,
            }));
        }
        return Ok(Ok(StreamAppended::Closed { next_offset }));
    }
    // A close alone records its producer without a check (it appends nothing to repeat).
    if let (Some(p), false) = (&op.producer, op.messages.is_empty()) {
        match producers.by_id.get(&p.id) {
            Some(prev) if p.epoch < prev.epoch => {
                return decided(
                    w,
                    StreamAppended::StaleEpoch {
                        current: prev.epoch,
                    },
                );
            }
            Some(prev) if p.epoch == prev.epoch => {
                if p.seq <= prev.last_seq {
                    return decided(
                        w,
                        StreamAppended::Duplicate {
                            next_offset: stage.view.next_offset,
                            last_seq: prev.last_seq,
                            closed: false,
                        },
                    );
                }
                if p.seq > prev.last_seq + 1 {
                    return decided(
                        w,
                        StreamAppended::SeqGap {
                            expected: prev.last_seq + 1,
                        },
                    );
                }
            }
            Some(_) if p.seq != 0 => return decided(w, StreamAppended::EpochStartsAtZero),
            None if p.seq != 0 => return decided(w, StreamAppended::SeqGap { expected: 0 }),
            _ => {}
        }
    }
    if let (Some(seq), Some(last)) = (&op.stream_seq, &producers.last_stream_seq)
        && seq.as_bytes() <= last.as_bytes()
    {
        return decided(w, StreamAppended::StreamSeqRegression);
    }
    for ev in &op.messages {
        let next = stage.view.next_offset;
        let derived = ev.derived_id(w, queue.id(), next);
        // A producer's message carries an id naming (producer, epoch, seq, index): one the
        // stream still holds is not stored twice, even where the producer's state was lost.
        if derived.is_none()
            && !ev.id_is_generated()
            && w.find_event_id(
                queue.id(),
                ev.event_id.as_str(),
                stage.view.first_offset..next,
            )?
            .is_some()
        {
            continue;
        }
        stage.append(w, ev, derived.as_ref())?;
    }
    stage.touched(now);
    let changed = op.producer.is_some() || op.stream_seq.is_some() || op.close;
    if changed {
        let state = Arc::make_mut(stage.view.producers.get_or_insert_with(Default::default));
        if let Some(p) = &op.producer {
            state.by_id.insert(
                p.id.clone(),
                crate::storage::ProducerState {
                    epoch: p.epoch,
                    last_seq: p.seq,
                    at: stage.view.next_offset,
                },
            );
            state.bound();
        }
        if let Some(seq) = &op.stream_seq {
            state.last_stream_seq = Some(seq.clone());
        }
        if op.close {
            state.closed_by = claim;
            stage.view.closed = true;
            let at = stage.view.next_offset;
            stage.outbox.push(Live::Closed { at });
        }
        stage.dirty = true;
    }
    Ok(Ok(StreamAppended::Appended {
        next_offset: stage.view.next_offset,
        closed: stage.view.closed,
    }))
}

fn create(
    w: &mut dyn WriteBatch,
    batch: &mut Batch,
    registry: &Registry,
    keys: &mut HashSet<(TenantId, TaskId)>,
    next_queue_id: &mut u64,
    spec: &NewQueue,
    now: Timestamp,
) -> Result<Result<Arc<QueueState>>> {
    let key = (spec.tenant.clone(), spec.task.clone());
    if keys.contains(&key) {
        // "Exists" decided on this node's view has the store confirm the queue: on a store
        // shared by several nodes another node may have deleted it a moment ago (its notice
        // still on the way), and a stale view makes the batch stale (decided again on fresh
        // state) instead of answering a spurious conflict. A queue created earlier in this
        // batch is not published yet, and needs no check: this node made it.
        // (Staged unchanged, so that a stale answer's fresh state reaches its view.)
        let known = registry
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .cloned();
        if let Some(q) = known {
            batch.stage(&q);
            w.check(q.id());
        }
        return Ok(Err(Error::QueueExists {
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
        content_type: spec.content_type.clone(),
        stream: spec
            .content_type
            .as_ref()
            .map(|_| crate::storage::StreamRecord {
                expires_at_us: spec.expires_at.map(Timestamp::as_micros),
                producers: crate::storage::Producers::default(),
            }),
    };
    let q = Arc::new(QueueState::from_record(
        spec.tenant.clone(),
        spec.task.clone(),
        &record,
    ));
    keys.insert(key);
    let stage = batch.stage(&q);
    stage.created = true;
    stage.dirty = true;
    Ok(Ok(q))
}

/// Closes the queue; a queue closed already is answered from its state, which the store
/// confirms (`WriteBatch::check`: a close repeated after one refused for want of replicas
/// waits for them too).
fn close(w: &mut dyn WriteBatch, batch: &mut Batch, queue: &Arc<QueueState>) -> Result<()> {
    let stage = batch.stage(queue);
    if stage.view.removed {
        return Err(queue.not_found());
    }
    if stage.view.closed {
        w.check(queue.id());
    } else {
        stage.view.closed = true;
        stage.dirty = true;
        let at = stage.view.next_offset;
        stage.outbox.push(Live::Closed { at });
    }
    Ok(())
}

/// Cancels the task; one cancelled already is answered from its state, confirmed as in
/// [`close`].
fn cancel(w: &mut dyn WriteBatch, batch: &mut Batch, op: &Cancel, now: Timestamp) -> Result<()> {
    let stage = batch.stage(&op.queue);
    if stage.view.removed {
        return Err(op.queue.not_found());
    }
    if stage.view.finished_at.is_some() {
        return Err(Error::TaskFinished {
            task_id: op.queue.task_id().to_string(),
        });
    }
    if stage.view.cancel.is_some() {
        w.check(op.queue.id());
    } else {
        stage.view.cancel = Some(CancelInfo {
            reason: op.reason.clone(),
            time: now,
        });
        stage.dirty = true;
    }
    Ok(())
}

fn delete(batch: &mut Batch, keys: &mut HashSet<(TenantId, TaskId)>, op: &Delete) -> Result<bool> {
    let queue = &op.queue;
    let stage = batch.stage(queue);
    if stage.view.removed {
        return Err(queue.not_found());
    }
    if let Some(now) = op.expire_at
        && stage.view.last_activity.saturating_add(queue.ttl()) > now
        && queue.expires_at().is_none_or(|at| at > now)
    {
        return Ok(false);
    }
    stage.view.removed = true;
    stage.outbox.push(Live::Removed);
    keys.remove(&(queue.tenant_id().clone(), queue.task_id().clone()));
    Ok(true)
}

/// A checkpoint save: the checkpoint, then its events, in the batch.
///
/// Every check that can refuse the save runs before its first change, so a refusal leaves the
/// batch untouched; an error after the first change fails the whole batch (it is dropped
/// uncommitted), so the checkpoint and its events are stored together or not at all. The
/// events' offsets are known before they are appended (the next offsets of the queue: their
/// ids are checked to be new), so the checkpoint records them.
fn save_checkpoint(
    w: &mut dyn WriteBatch,
    batch: &mut Batch,
    save: &PreparedSave,
    now: Timestamp,
) -> Result<Result<SavedCheckpoint>> {
    let checkpoint_id = &save.record.checkpoint_id;
    if w.checkpoint_id_taken(save.tenant.as_str(), checkpoint_id)? {
        return Ok(Err(Error::InvalidCheckpoint {
            field: "checkpoint_id".into(),
            reason: format!("{checkpoint_id} already exists"),
        }));
    }
    // A queue removed since the save was prepared is as no queue: the save goes ahead alone.
    let queue = save.queue.as_ref().filter(|q| !batch.stage(q).view.removed);
    let mut record = save.record.clone();
    record.created_at_us = now.as_micros();
    if let Some(q) = queue {
        let stage = batch.stage(q);
        if stage.view.closed {
            return Ok(Err(Error::QueueClosed {
                task_id: q.task_id().to_string(),
            }));
        }
        let (retained_from, next) = (stage.view.first_offset, stage.view.next_offset);
        for ev in &save.events {
            if w.find_event_id(q.id(), ev.event_id.as_str(), retained_from..next)?
                .is_some()
            {
                return Ok(Err(Error::invalid_event(
                    "event_id",
                    format!("{} is already used in the queue", ev.event_id),
                )));
            }
        }
        let mut offsets = (next..).take(save.events.len());
        record.status_offset = offsets.next();
        record.progress_offset = offsets.next();
    }
    let seq = w.put_checkpoint(save.tenant.as_str(), save.workflow.as_str(), &record)?;
    if let Some(e) = &save.inject {
        return Err(e.clone());
    }
    if let Some(q) = queue {
        let stage = batch.stage(q);
        for ev in &save.events {
            stage.append(w, ev, None)?;
        }
        stage.touched(now);
    }
    Ok(Ok(SavedCheckpoint {
        checkpoint_id: checkpoint_id.clone(),
        seq,
        status_offset: record.status_offset,
        progress_offset: record.progress_offset,
    }))
}

/// Trims, stores queue records and removes deleted queues, in the batch.
fn finish(w: &mut dyn WriteBatch, batch: &mut Batch) -> Result<()> {
    for stage in &mut batch.stages {
        let q = stage.q.clone();
        if stage.was_removed {
            continue;
        }
        if stage.view.removed {
            w.remove_queue(q.id(), q.tenant_id().as_str(), q.task_id().as_str())?;
            continue;
        }
        if !stage.dirty {
            continue;
        }
        if let Some(new_first) = stage.trim_to() {
            stage.trimmed = w.trim(q.id(), stage.view.first_offset, new_first)?;
            stage.view.first_offset = new_first;
        }
        w.put_queue(
            q.tenant_id().as_str(),
            q.task_id().as_str(),
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
                q.cancel_token().cancel();
            }
            // A shared store's newer state may have been taken in meanwhile (see
            // `WriterLoop::absorb`, `QueueState::follow`): never move the published state
            // back.
            let (was_next, was_closed) = (st.view.next_offset, st.view.closed);
            st.view.merge(&stage.view);
            // Another node's writes this batch's stale rounds took in are published with it
            // (the notices of those writes are old news to the writer when they come, and a
            // follow of them then finds nothing to tell): subscribers read the events before
            // the batch's own from the store, and hear of a close.
            let own_from = stage.outbox.iter().find_map(|m| match m {
                Live::Event(e) => Some(e.offset()),
                _ => None,
            });
            let taken_in_to = own_from.unwrap_or(st.view.next_offset);
            if taken_in_to > was_next {
                st.hub.publish(Live::Advanced { to: taken_in_to });
            }
            let mut closed_said = false;
            for msg in stage.outbox {
                closed_said |= matches!(msg, Live::Closed { .. });
                st.hub.publish(msg);
            }
            if st.view.closed && !was_closed && !closed_said {
                let at = st.view.next_offset;
                st.hub.publish(Live::Closed { at });
            }
            if removed {
                st.hub.shut();
            }
        }
        let key = (q.tenant_id().clone(), q.task_id().clone());
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
