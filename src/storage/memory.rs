//! The in-memory store: everything but restart survival.
//!
//! For single-process installs that need no durability, development and tests. It keeps
//! exactly what the engine keeps bounded (a queue's retained events, at most
//! `max_buffer_size`; deleted and expired queues go at once; [`KEEP_CHECKPOINTS`] per
//! workflow), so its memory is bounded as the embedded store's disk is.
//!
//! # How it meets the contract
//!
//! - **One writer, atomic batches.** A batch stages its changes in a list and applies them
//!   all under the state's write lock in [`WriteBatch::commit`], so readers see a batch
//!   wholly or not at all; a dropped batch never touched the state. Its lookups read the
//!   committed state plus the batch's own staged ids and checkpoints.
//! - **Durable when synced.** Nothing is ever durable: `sync` is a no-op, and a commit is as
//!   final as this process.
//! - **Readers** take the read lock for the length of one bounded read.

use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use bytes::Bytes;

use super::{
    BatchCheckpoints, CheckpointRecord, DERIVED_LEN, EventMeta, KEEP_CHECKPOINTS, LoadedCheckpoint,
    QueueRecord, Recovered, Storage, StoredEvent, WriteBatch, WriteError,
};
use crate::error::{Error, Result};
use crate::ids::EventId;

/// One retained event and the id it is found by.
struct MemEvent {
    event: StoredEvent,
    /// The id producers gave, indexed in [`MemQueue::ids`].
    id: Option<Box<str>>,
}

/// A queue's retained events: offsets `base..base + events.len()`, dense.
#[derive(Default)]
struct MemQueue {
    base: u64,
    events: VecDeque<MemEvent>,
    ids: HashMap<Box<str>, u64>,
}

impl MemQueue {
    /// Removes offsets below `to`; returns the bytes of JSON removed.
    fn trim(&mut self, to: u64) -> u64 {
        let mut removed = 0;
        while self.base < to {
            let Some(front) = self.events.pop_front() else {
                // Nothing stored below `to`: the queue continues from there.
                self.base = to;
                break;
            };
            if let Some(id) = front.id {
                self.ids.remove(&id);
            }
            self.base += 1;
            removed += front.event.json.len() as u64;
        }
        removed
    }
}

/// A workflow's retained checkpoints, oldest first, and the next sequence number.
#[derive(Default)]
struct Workflow {
    next_seq: u64,
    kept: VecDeque<(u64, CheckpointRecord)>,
}

#[derive(Default)]
struct State {
    queues: HashMap<u64, MemQueue>,
    workflows: HashMap<(String, String), Workflow>,
    /// `(tenant, checkpoint id)` → `(workflow, seq)`.
    checkpoint_ids: HashMap<(String, String), (String, u64)>,
    /// Bytes of event JSON retained, for [`Storage::size_bytes`].
    bytes: u64,
    /// Token revocations: tenant → not-before time in microseconds.
    revoked: HashMap<String, u64>,
}

/// A staged change of a batch, applied in order at commit.
enum Change {
    Append {
        qid: u64,
        offset: u64,
        id: Option<Box<str>>,
        event: StoredEvent,
    },
    Trim {
        qid: u64,
        to: u64,
    },
    RemoveQueue {
        qid: u64,
    },
    PutCheckpoint {
        tenant: String,
        workflow: String,
        seq: u64,
        record: CheckpointRecord,
    },
}

/// The in-memory store. See the module docs.
#[derive(Default)]
pub(crate) struct MemoryStore {
    state: RwLock<State>,
    closed: AtomicBool,
    #[cfg(feature = "failpoints")]
    faults: std::sync::Arc<super::redb::wal::Faults>,
}

impl MemoryStore {
    /// An empty store; nothing to recover.
    pub(crate) fn open() -> (MemoryStore, Recovered) {
        let store = MemoryStore {
            ..MemoryStore::default()
        };
        let recovered = Recovered {
            queues: Vec::new(),
            next_queue_id: 1,
            purges: Vec::new(),
        };
        (store, recovered)
    }

    fn read(&self) -> Result<RwLockReadGuard<'_, State>> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::ShuttingDown);
        }
        Ok(self.state.read().unwrap_or_else(|p| p.into_inner()))
    }

    fn write(&self) -> Result<RwLockWriteGuard<'_, State>> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::ShuttingDown);
        }
        Ok(self.state.write().unwrap_or_else(|p| p.into_inner()))
    }
}

fn loaded(workflow: &str, seq: u64, record: &CheckpointRecord) -> LoadedCheckpoint {
    LoadedCheckpoint {
        workflow: workflow.to_string(),
        seq,
        record: record.clone(),
    }
}

impl Storage for MemoryStore {
    fn begin(&self) -> Result<Box<dyn WriteBatch + '_>> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::ShuttingDown);
        }
        Ok(Box::new(MemoryBatch {
            store: self,
            changes: Vec::new(),
            ids: HashMap::new(),
            checkpoints: BatchCheckpoints::default(),
        }))
    }

    fn compact(&self) -> Result<(u64, u64)> {
        let size = self.size_bytes();
        Ok((size, size))
    }

    fn read_range(
        &self,
        qid: u64,
        from: u64,
        to: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<StoredEvent>> {
        let state = self.read()?;
        let Some(q) = state.queues.get(&qid) else {
            return Ok(Vec::new());
        };
        let start = from.max(q.base);
        let end = to.min(q.base + q.events.len() as u64);
        let mut out = Vec::new();
        let mut copied = 0;
        if start >= end {
            return Ok(out);
        }
        let skip = usize::try_from(start - q.base).unwrap_or(usize::MAX);
        let take = usize::try_from(end - start)
            .unwrap_or(usize::MAX)
            .min(limit);
        for e in q.events.iter().skip(skip).take(take) {
            copied += e.event.json.len();
            if copied > max_bytes && !out.is_empty() {
                break;
            }
            // Sharing the stored bytes: no copy.
            out.push(e.event.clone());
        }
        Ok(out)
    }

    fn latest_checkpoint(&self, tenant: &str, workflow: &str) -> Result<Option<LoadedCheckpoint>> {
        let state = self.read()?;
        let key = (tenant.to_string(), workflow.to_string());
        Ok(state
            .workflows
            .get(&key)
            .and_then(|w| w.kept.back())
            .map(|(seq, r)| loaded(workflow, *seq, r)))
    }

    fn checkpoint_by_id(
        &self,
        tenant: &str,
        checkpoint_id: &str,
    ) -> Result<Option<LoadedCheckpoint>> {
        let state = self.read()?;
        let key = (tenant.to_string(), checkpoint_id.to_string());
        let Some((workflow, seq)) = state.checkpoint_ids.get(&key) else {
            return Ok(None);
        };
        let wf = (tenant.to_string(), workflow.clone());
        Ok(state
            .workflows
            .get(&wf)
            .and_then(|w| w.kept.iter().find(|(s, _)| s == seq))
            .map(|(s, r)| loaded(workflow, *s, r)))
    }

    fn list_checkpoints(&self, tenant: &str, workflow: &str) -> Result<Vec<LoadedCheckpoint>> {
        let state = self.read()?;
        let key = (tenant.to_string(), workflow.to_string());
        Ok(state
            .workflows
            .get(&key)
            .map(|w| {
                w.kept
                    .iter()
                    .map(|(s, r)| loaded(workflow, *s, r))
                    .collect()
            })
            .unwrap_or_default())
    }

    fn put_revocation(&self, tenant: &str, not_before_us: u64) -> Result<()> {
        self.write()?
            .revoked
            .insert(tenant.to_owned(), not_before_us);
        Ok(())
    }

    fn revocations(&self) -> Result<Vec<(String, u64)>> {
        Ok(self
            .read()?
            .revoked
            .iter()
            .map(|(t, nb)| (t.clone(), *nb))
            .collect())
    }

    fn size_bytes(&self) -> u64 {
        self.state.read().unwrap_or_else(|p| p.into_inner()).bytes
    }

    fn describe(&self) -> String {
        "memory (nothing survives a restart)".to_string()
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
        *state = State::default();
    }

    #[cfg(feature = "failpoints")]
    fn faults(&self) -> std::sync::Arc<super::redb::wal::Faults> {
        self.faults.clone()
    }
}

/// A batch of the in-memory store: staged changes, applied at commit.
struct MemoryBatch<'s> {
    store: &'s MemoryStore,
    changes: Vec<Change>,
    /// Ids appended by this batch: `(qid, id)` → offset.
    ids: HashMap<(u64, Box<str>), u64>,
    checkpoints: BatchCheckpoints,
}

impl WriteBatch for MemoryBatch<'_> {
    fn derived_id(&self, _qid: u64, _offset: u64) -> Option<[u8; DERIVED_LEN]> {
        None
    }

    fn find_event_id(
        &mut self,
        qid: u64,
        event_id: &str,
        retained: Range<u64>,
    ) -> Result<Option<u64>> {
        if let Some(&at) = self.ids.get(&(qid, Box::from(event_id))) {
            return Ok(Some(at));
        }
        let state = self.store.read()?;
        Ok(state
            .queues
            .get(&qid)
            .and_then(|q| q.ids.get(event_id))
            .copied()
            .filter(|at| retained.contains(at)))
    }

    fn event_record(&self, _meta: &EventMeta<'_>, json_len: usize) -> Result<(Vec<u8>, usize)> {
        // No header: the record is the JSON.
        Ok((Vec::with_capacity(json_len), 0))
    }

    fn append(
        &mut self,
        qid: u64,
        offset: u64,
        event_id: Option<&EventId>,
        record: Bytes,
        json_at: usize,
        meta: (u8, bool),
    ) -> Result<()> {
        let id: Option<Box<str>> = event_id.map(|id| Box::from(id.as_str()));
        if let Some(id) = &id {
            self.ids.insert((qid, id.clone()), offset);
        }
        self.changes.push(Change::Append {
            qid,
            offset,
            id,
            event: StoredEvent {
                offset,
                event_type: meta.0,
                terminal: meta.1,
                json: record.slice(json_at..),
            },
        });
        Ok(())
    }

    fn trim(&mut self, qid: u64, from: u64, to: u64) -> Result<u64> {
        self.changes.push(Change::Trim { qid, to });
        Ok(to.saturating_sub(from))
    }

    fn put_queue(&mut self, _tenant: &str, _task: &str, _record: &QueueRecord) -> Result<()> {
        // The engine holds every queue's state; nothing reads it back from here.
        Ok(())
    }

    fn remove_queue(&mut self, qid: u64, _tenant: &str, _task: &str) -> Result<()> {
        self.changes.push(Change::RemoveQueue { qid });
        Ok(())
    }

    fn purge(&mut self, _qid: u64, _from: u64, _to: u64, _last: bool) -> Result<()> {
        // A removed queue's events went with its record.
        Ok(())
    }

    fn set_next_queue_id(&mut self, _id: u64) -> Result<()> {
        Ok(())
    }

    fn checkpoint_id_taken(&mut self, tenant: &str, checkpoint_id: &str) -> Result<bool> {
        self.checkpoints.taken(tenant, checkpoint_id, || {
            let key = (tenant.to_string(), checkpoint_id.to_string());
            Ok(self.store.read()?.checkpoint_ids.contains_key(&key))
        })
    }

    fn put_checkpoint(
        &mut self,
        tenant: &str,
        workflow: &str,
        record: &CheckpointRecord,
    ) -> Result<u64> {
        let seq = self.checkpoints.next_seq(tenant, workflow, || {
            let key = (tenant.to_string(), workflow.to_string());
            Ok(self
                .store
                .read()?
                .workflows
                .get(&key)
                .map_or(0, |w| w.next_seq))
        })?;
        self.checkpoints
            .saved(tenant, workflow, &record.checkpoint_id, seq);
        self.changes.push(Change::PutCheckpoint {
            tenant: tenant.to_string(),
            workflow: workflow.to_string(),
            seq,
            record: record.clone(),
        });
        Ok(seq)
    }

    fn commit(self: Box<Self>) -> Result<bool, WriteError> {
        let wrote = !self.changes.is_empty();
        let mut guard = self.store.write().map_err(WriteError::Rejected)?;
        let state = &mut *guard;
        for change in self.changes {
            match change {
                Change::Append {
                    qid,
                    offset,
                    id,
                    event,
                } => {
                    let q = state.queues.entry(qid).or_default();
                    if q.events.is_empty() {
                        q.base = offset;
                    }
                    if let Some(id) = &id {
                        q.ids.insert(id.clone(), offset);
                    }
                    state.bytes += event.json.len() as u64;
                    q.events.push_back(MemEvent { event, id });
                }
                Change::Trim { qid, to } => {
                    if let Some(q) = state.queues.get_mut(&qid) {
                        let removed = q.trim(to);
                        state.bytes = state.bytes.saturating_sub(removed);
                    }
                }
                Change::RemoveQueue { qid } => {
                    if let Some(q) = state.queues.remove(&qid) {
                        let bytes: u64 = q.events.iter().map(|e| e.event.json.len() as u64).sum();
                        state.bytes = state.bytes.saturating_sub(bytes);
                    }
                }
                Change::PutCheckpoint {
                    tenant,
                    workflow,
                    seq,
                    record,
                } => {
                    state.checkpoint_ids.insert(
                        (tenant.clone(), record.checkpoint_id.clone()),
                        (workflow.clone(), seq),
                    );
                    let wf = state
                        .workflows
                        .entry((tenant.clone(), workflow))
                        .or_default();
                    wf.next_seq = seq + 1;
                    wf.kept.push_back((seq, record));
                    while wf.kept.len() as u64 > KEEP_CHECKPOINTS {
                        if let Some((_, old)) = wf.kept.pop_front() {
                            state
                                .checkpoint_ids
                                .remove(&(tenant.clone(), old.checkpoint_id));
                        }
                    }
                }
            }
        }
        Ok(wrote)
    }
}
