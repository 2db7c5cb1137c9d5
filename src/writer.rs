//! The group-commit writer: the one owner of write transactions.
//!
//! A dedicated thread drains the command channel: it blocks for the first command, then takes
//! whatever else is already waiting (up to `max_commit_events` events), applies all of it in one
//! redb transaction, commits (fsync'd in immediate mode), and only then publishes to live
//! subscribers and acknowledges every caller. Throughput therefore grows with the number of
//! waiting callers while each acknowledgement still means "committed".
//!
//! Offsets are assigned inside the transaction from the queue's staged state; `max_buffer_size`
//! trimming happens in the same transaction, so the bound holds right after each commit.
//!
//! If a commit fails, every caller of that batch gets the error, nothing of the batch is
//! published, and the writer refuses all later writes with [`Error::StoreFailed`]: the in-memory
//! state was never advanced, and redb's state after a failed commit is only trustworthy after a
//! reopen.

use std::collections::HashMap;
use std::io::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use crate::clock::Clock;
use crate::error::{Error, Result};
use crate::event::{Event, EventType, RenderedEvent, Timestamp};
use crate::hub::Live;
use crate::ids::{TaskId, TenantId};
use crate::metrics::Metrics;
use crate::queue::{CancelInfo, QueueKind, QueueShared};
use crate::store::codec::{self, EventHeader, QueueRecord};
use crate::store::{Store, StoreWriter, SyncMode};
use crate::subscription::RecordedEvent;

/// Every live queue by `(tenant, task)`. Written only by the writer, after commits.
pub(crate) type Registry = RwLock<HashMap<(TenantId, TaskId), Arc<QueueShared>>>;

pub(crate) type Reply<T> = oneshot::Sender<Result<T>>;

/// An event validated and rendered by its producer, waiting for its offset.
#[derive(Debug)]
pub(crate) struct PreparedEvent {
    event_id: String,
    event_type: EventType,
    terminal: bool,
    timestamp_us: i64,
    rendered: RenderedEvent,
}

impl PreparedEvent {
    /// Renders `event` (on the caller's thread, so JSON encoding runs in parallel across
    /// producers; the writer only splices in the offset).
    pub(crate) fn new(event: &Event) -> Self {
        Self {
            event_id: event.event_id.as_str().to_string(),
            event_type: event.event_type(),
            terminal: event.is_terminal(),
            timestamp_us: event.timestamp.as_micros(),
            rendered: event.render(),
        }
    }

    /// The stored record (header + JSON with `offset`) and where its JSON starts.
    fn encode(&self, offset: u64) -> Result<(Vec<u8>, usize)> {
        let header = EventHeader {
            event_type: self.event_type.code(),
            terminal: self.terminal,
            timestamp_us: self.timestamp_us,
            event_id: self.event_id.clone(),
        };
        let r = &self.rendered;
        let (mut buf, start) = codec::encode_event(&header, r.prefix.len() + r.suffix.len() + 20)?;
        buf.extend_from_slice(&r.prefix);
        // Writing to a Vec cannot fail.
        let _ = write!(buf, "{offset}");
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
    /// fsync everything committed so far (the buffered-mode flush).
    Sync { reply: Option<Reply<()>> },
    /// Commit what is queued, sync, and stop.
    Shutdown { reply: Reply<()> },
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
    Done,
    Failed(Error),
}

/// A queue's state as the current transaction sees it.
struct Stage {
    q: Arc<QueueShared>,
    first: u64,
    next: u64,
    closed: bool,
    finished_at: Option<u64>,
    cancel: Option<CancelInfo>,
    last_activity: Timestamp,
    removed: bool,
    created: bool,
    dirty: bool,
    outbox: Vec<Live>,
    appended: u64,
}

impl Stage {
    fn of(q: &Arc<QueueShared>) -> Self {
        let st = q.lock();
        Stage {
            q: q.clone(),
            first: st.first_offset,
            next: st.next_offset,
            closed: st.closed,
            finished_at: st.finished_at,
            cancel: st.cancel.clone(),
            last_activity: st.last_activity,
            removed: st.removed,
            created: false,
            dirty: false,
            outbox: Vec::new(),
            appended: 0,
        }
    }

    fn record(&self) -> QueueRecord {
        let mut rec = self.q.record(&self.q.lock());
        rec.first_offset = self.first;
        rec.next_offset = self.next;
        rec.closed = self.closed;
        rec.finished_at = self.finished_at;
        rec.last_activity_us = self.last_activity.as_micros();
        rec.cancel = self.cancel.as_ref().map(|c| codec::CancelRecord {
            reason: c.reason.clone(),
            time_us: c.time.as_micros(),
        });
        rec
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

    fn created(&self, tenant: &TenantId, task: &TaskId) -> bool {
        self.stages
            .iter()
            .any(|s| s.created && &s.q.tenant_id == tenant && &s.q.task_id == task)
    }
}

pub(crate) struct Writer {
    pub store: Arc<Store>,
    pub registry: Arc<Registry>,
    pub clock: Arc<dyn Clock>,
    pub metrics: Arc<Metrics>,
    pub rx: mpsc::Receiver<Command>,
    pub mode: SyncMode,
    pub max_commit_events: usize,
    pub next_queue_id: u64,
    pub failed: Option<Arc<str>>,
    /// Set after a commit without fsync; cleared by the next fsync'd commit.
    pub unsynced: Arc<AtomicBool>,
}

impl Writer {
    /// Runs until a `Shutdown` command or until every sender is gone.
    pub(crate) fn run(mut self) {
        while let Some(first) = self.rx.blocking_recv() {
            let mut n = first.event_count();
            let mut cmds = vec![first];
            while n < self.max_commit_events {
                match self.rx.try_recv() {
                    Ok(cmd) => {
                        n += cmd.event_count();
                        cmds.push(cmd);
                    }
                    Err(_) => break,
                }
            }
            if self.process(cmds) {
                return;
            }
            if self.failed.is_none()
                && let Err(e) = self.store.maybe_checkpoint()
            {
                self.fail(&e);
            }
        }
        if self.failed.is_none()
            && let Err(e) = self.store.checkpoint()
        {
            self.fail(&e);
        }
    }

    fn fail(&mut self, e: &Error) {
        tracing::error!(error = %e, "storage failure; refusing further writes until reopen");
        self.failed = Some(Arc::from(e.to_string()));
    }

    /// Applies one batch. Returns true when a shutdown was processed.
    fn process(&mut self, cmds: Vec<Command>) -> bool {
        if let Some(msg) = &self.failed {
            let mut stop = false;
            for cmd in cmds {
                stop |= matches!(cmd, Command::Shutdown { .. });
                reply_err(cmd, Error::StoreFailed(msg.clone()));
            }
            return stop;
        }
        let wants_sync = cmds
            .iter()
            .any(|c| matches!(c, Command::Sync { .. } | Command::Shutdown { .. }));
        let mode = if wants_sync {
            SyncMode::Sync
        } else {
            self.mode
        };
        let now = self.clock.now();
        let started = Instant::now();
        let mut batch = Batch::default();
        let mut next_queue_id = self.next_queue_id;
        let registry = self.registry.clone();
        let result = self.store.write(mode, |w| {
            let mut outcomes = Vec::with_capacity(cmds.len());
            for cmd in &cmds {
                outcomes.push(apply(
                    w,
                    &mut batch,
                    &registry,
                    &mut next_queue_id,
                    cmd,
                    now,
                )?);
            }
            finish(w, &mut batch)?;
            Ok(outcomes)
        });
        let shutting_down = cmds.iter().any(|c| matches!(c, Command::Shutdown { .. }));
        // The last batch before a shutdown is followed by a durable checkpoint, so the log is
        // empty when the directory is closed; its callers are acknowledged after it.
        let result = match result {
            Ok(outcomes) if shutting_down => self.store.checkpoint().map(|()| outcomes),
            other => other,
        };
        match result {
            Ok(outcomes) => {
                let events: u64 = batch.stages.iter().map(|s| s.appended).sum();
                Metrics::add(&self.metrics.commits, 1);
                Metrics::add(&self.metrics.events_appended, events);
                self.metrics.batch_size.observe(events as f64);
                self.metrics
                    .commit_seconds
                    .observe(started.elapsed().as_secs_f64());
                self.next_queue_id = next_queue_id;
                self.unsynced
                    .store(mode == SyncMode::NoSync, Ordering::Release);
                publish(&self.registry, batch);
                let mut stop = false;
                for (cmd, outcome) in cmds.into_iter().zip(outcomes) {
                    stop |= matches!(cmd, Command::Shutdown { .. });
                    reply(cmd, outcome);
                }
                stop
            }
            Err(e) => {
                self.fail(&e);
                let mut stop = false;
                for cmd in cmds {
                    stop |= matches!(cmd, Command::Shutdown { .. });
                    reply_err(cmd, e.clone());
                }
                stop
            }
        }
    }
}

fn apply(
    w: &mut StoreWriter<'_>,
    batch: &mut Batch,
    registry: &Registry,
    next_queue_id: &mut u64,
    cmd: &Command,
    now: Timestamp,
) -> Result<Outcome> {
    Ok(match cmd {
        Command::Append { queue, events, .. } => {
            let stage = batch.stage(queue);
            if stage.removed {
                return Ok(Outcome::Failed(not_found(queue)));
            }
            if stage.closed {
                return Ok(Outcome::Failed(Error::QueueClosed {
                    task_id: queue.task_id.to_string(),
                }));
            }
            let mut offsets = Vec::with_capacity(events.len());
            for ev in events {
                if let Some(existing) = w.find_event_id(queue.id, &ev.event_id)? {
                    offsets.push(existing);
                    continue;
                }
                let offset = stage.next;
                let (record, json_at) = ev.encode(offset)?;
                w.append(queue.id, offset, &ev.event_id, &record)?;
                stage.next += 1;
                stage.appended += 1;
                if ev.terminal && stage.finished_at.is_none() {
                    stage.finished_at = Some(offset);
                }
                let json = Bytes::from(record).slice(json_at..);
                stage.outbox.push(Live::Event(Arc::new(RecordedEvent::new(
                    offset,
                    ev.event_type,
                    ev.terminal,
                    json,
                ))));
                offsets.push(offset);
            }
            if stage.appended > 0 {
                stage.last_activity = now;
                stage.dirty = true;
            }
            Outcome::Offsets(offsets)
        }
        Command::Create { spec, .. } => {
            let key = (spec.tenant.clone(), spec.task.clone());
            let exists = registry
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .contains_key(&key);
            if exists || batch.created(&spec.tenant, &spec.task) {
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
            let stage = batch.stage(&q);
            stage.created = true;
            stage.dirty = true;
            Outcome::Created(q)
        }
        Command::Close { queue, .. } => {
            let stage = batch.stage(queue);
            if stage.removed {
                return Ok(Outcome::Failed(not_found(queue)));
            }
            if !stage.closed {
                stage.closed = true;
                stage.dirty = true;
                let at = stage.next;
                stage.outbox.push(Live::Closed { at });
            }
            Outcome::Done
        }
        Command::Cancel { queue, reason, .. } => {
            let stage = batch.stage(queue);
            if stage.removed {
                return Ok(Outcome::Failed(not_found(queue)));
            }
            if stage.finished_at.is_some() {
                return Ok(Outcome::Failed(Error::TaskFinished {
                    task_id: queue.task_id.to_string(),
                }));
            }
            if stage.cancel.is_none() {
                stage.cancel = Some(CancelInfo {
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
            if stage.removed {
                return Ok(Outcome::Failed(not_found(queue)));
            }
            if let Some(now) = expire_at
                && stage.last_activity.saturating_add(queue.ttl) > *now
            {
                return Ok(Outcome::Removed(false));
            }
            stage.removed = true;
            stage.outbox.push(Live::Removed);
            Outcome::Removed(true)
        }
        Command::Sync { .. } | Command::Shutdown { .. } => Outcome::Done,
    })
}

/// Trims, persists queue records and removes deleted queues, all inside the transaction.
fn finish(w: &mut StoreWriter<'_>, batch: &mut Batch) -> Result<()> {
    for stage in &mut batch.stages {
        let q = stage.q.clone();
        if stage.removed {
            w.remove_queue(q.tenant_id.as_str(), q.task_id.as_str())?;
            w.purge(q.id)?;
            continue;
        }
        if !stage.dirty {
            continue;
        }
        let retained = stage.next - stage.first;
        if retained > q.max_buffer_size {
            let new_first = stage.next - q.max_buffer_size;
            w.trim(q.id, stage.first, new_first)?;
            stage.first = new_first;
        }
        w.put_queue(q.tenant_id.as_str(), q.task_id.as_str(), &stage.record())?;
    }
    Ok(())
}

/// Applies committed stages to the shared state and sends to live subscribers. Each queue's
/// state is advanced and its messages sent under that queue's lock (see `hub`).
fn publish(registry: &Registry, batch: Batch) {
    for stage in batch.stages {
        let q = stage.q;
        {
            let mut st = q.lock();
            st.first_offset = stage.first;
            st.next_offset = stage.next;
            st.closed = stage.closed;
            st.finished_at = stage.finished_at;
            st.last_activity = stage.last_activity;
            if stage.cancel.is_some() && st.cancel.is_none() {
                q.cancel_token.cancel();
            }
            st.cancel = stage.cancel;
            for msg in stage.outbox {
                st.hub.publish(msg);
            }
            if stage.removed {
                st.removed = true;
                st.hub.shut();
            }
        }
        let key = (q.tenant_id.clone(), q.task_id.clone());
        if stage.removed {
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
    }
}
