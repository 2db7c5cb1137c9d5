//! Changes that are in the write-ahead log but not yet in redb.
//!
//! The writer logs every batch (the log record is what makes it durable) but applies batches
//! to redb only later, many at a time: redb copies and rewrites every B-tree page a
//! transaction touches, so a transaction per batch of a few events spread over many queues
//! costs a page copy per event and table, while one transaction for thousands of events
//! touches each page once. Until it is applied, a batch lives here, where readers and the
//! writer's idempotency check find it.
//!
//! Batches gather in the *active* generation. Once it holds `apply_bytes`, the writer freezes
//! it and hands it to the bulk-write thread, which writes it into redb while new batches
//! gather; at most one generation is frozen at a time. Checkpoints and direct writes (on the
//! writer thread) first take the same lock as the bulk write, and write in a frozen
//! generation the thread has not started on, so redb always receives batches in log order.
//!
//! # Why readers never miss an event
//!
//! Only the writer thread adds batches. It adds a batch here right after logging it
//! ([`super::RedbBatch`]'s commit), before the acknowledger publishes it, so every published
//! event is either pending or applied.
//! Writing a generation in commits the redb transaction first and only then drops the
//! generation from here. A reader looks here first (both generations, under one lock) and
//! reads redb afterwards, below the oldest offset it found here: whatever it did not find here
//! had been applied before it looked, and redb's later read transaction sees it. The writer
//! holds the read lock while it builds a batch, so a generation cannot vanish between its id
//! check here and its id check in redb.
//!
//! # The idempotency index
//!
//! Trims are applied to redb later too, so until then redb's id index may still name events
//! that are already trimmed. A claimed id therefore counts only if its offset is at or above
//! the queue's first retained offset; an older entry is stale and is overwritten.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLockReadGuard};

use bytes::Bytes;

use super::codec;
use super::derived_ids::{self, DERIVED_LEN, IdKey};
use super::wal::{self, WalOpRef};
use crate::error::Result;
use crate::ids::EventId;
use crate::storage::{QueueRecord, StoredEvent};

/// Logged batches not yet applied to redb: the batches gathering now, and the batches being
/// written into redb by the bulk-write thread (at most one such generation at a time).
///
/// The frozen generation is older than the active one: for a queue, its offsets are lower,
/// and the active generation's trims apply to it too.
#[derive(Default)]
pub(crate) struct Pending {
    pub(super) active: Generation,
    pub(super) frozen: Option<Arc<Generation>>,
}

/// Logged batches and indexes over them for readers.
#[derive(Default)]
pub(crate) struct Generation {
    /// The batches' log records, oldest first: `(lsn, payload)`.
    pub(super) records: Vec<(u64, Vec<u8>)>,
    /// Payload bytes in `records`.
    pub(super) bytes: usize,
    /// Events appended by `records` and not trimmed since: queue id → offset → event.
    events: HashMap<u64, BTreeMap<u64, StoredEvent>>,
    /// Id-index entries written by `records`: queue id → event id → offset.
    ids: HashMap<u64, HashMap<EventId, u64>>,
    /// Queues trimmed by `records`: queue id → first offset kept. redb may still hold the
    /// trimmed events; readers must not see them.
    trimmed: HashMap<u64, u64>,
}

impl Pending {
    /// Adds one logged batch to the active generation.
    pub(super) fn add(&mut self, lsn: u64, batch: BatchChanges) {
        self.active.add(lsn, batch);
    }

    fn generations(&self) -> impl Iterator<Item = &Generation> {
        self.frozen.as_deref().into_iter().chain([&self.active])
    }

    /// The offset a pending batch indexed `event_id` of `qid` at, newest first.
    fn id(&self, qid: u64, event_id: &str) -> Option<u64> {
        let find = |g: &Generation| g.ids.get(&qid).and_then(|m| m.get(event_id)).copied();
        find(&self.active).or_else(|| self.frozen.as_deref().and_then(find))
    }

    /// What a reader of `qid`'s offsets `from..to` (at most `limit`) finds here.
    pub(super) fn read(&self, qid: u64, from: u64, to: u64, limit: usize) -> PendingRead {
        let kept_from = self
            .generations()
            .filter_map(|g| g.trimmed.get(&qid).copied())
            .max()
            .unwrap_or(0);
        let start = from.max(kept_from);
        let mut events = Vec::new();
        let mut first = u64::MAX;
        // Oldest generation first: offsets come out in order.
        for g in self.generations() {
            let Some(queue) = g.events.get(&qid) else {
                continue;
            };
            if let Some((&o, _)) = queue.range(kept_from..).next() {
                first = first.min(o);
            }
            if start < to && events.len() < limit {
                let room = limit - events.len();
                events.extend(queue.range(start..to).take(room).map(|(_, e)| e.clone()));
            }
        }
        PendingRead {
            events,
            applied: kept_from..first,
        }
    }
}

impl Generation {
    /// Adds one logged batch.
    pub(super) fn add(&mut self, lsn: u64, batch: BatchChanges) {
        self.bytes += batch.payload.len();
        self.records.push((lsn, batch.payload));
        for (qid, ev) in batch.events {
            self.events.entry(qid).or_default().insert(ev.offset, ev);
        }
        for (qid, ids) in batch.ids {
            self.ids.entry(qid).or_default().extend(ids);
        }
        // A batch trims after it appends (see the writer), so applying trims last is its order.
        for (qid, to) in batch.trims {
            let kept = self.trimmed.entry(qid).or_default();
            *kept = (*kept).max(to);
            if let Some(events) = self.events.get_mut(&qid) {
                *events = events.split_off(&to);
                if events.is_empty() {
                    self.events.remove(&qid);
                }
            }
        }
        for qid in batch.removed {
            self.events.remove(&qid);
            self.ids.remove(&qid);
            self.trimmed.remove(&qid);
        }
    }

    /// Forgets the indexes once every record has been applied to redb.
    pub(super) fn clear_applied(&mut self) {
        debug_assert!(self.records.is_empty());
        self.events.clear();
        self.ids.clear();
        self.trimmed.clear();
        self.bytes = 0;
    }
}

/// A reader's share of [`Pending`] for one queue.
pub(super) struct PendingRead {
    /// The pending events asked for, in offset order.
    pub(super) events: Vec<StoredEvent>,
    /// The offsets whose retained events are in redb: below it they are trimmed (though redb
    /// may still hold them), above it they are pending.
    pub(super) applied: std::ops::Range<u64>,
}

/// What one batch adds to [`Pending`].
#[derive(Default)]
pub(super) struct BatchChanges {
    pub(super) payload: Vec<u8>,
    events: Vec<(u64, StoredEvent)>,
    ids: HashMap<u64, HashMap<EventId, u64>>,
    /// `(queue id, new first offset)`.
    trims: Vec<(u64, u64)>,
    removed: Vec<u64>,
}

/// Looks up what redb already holds: id-index entries, and the id of a stored event.
pub(super) trait AppliedIds {
    fn get(&mut self, qid: u64, event_id: &str) -> Result<Option<u64>>;
    fn stored_id(&mut self, qid: u64, offset: u64) -> Result<Option<String>>;
}

/// Builds one batch: encodes its log record and its pending changes. Nothing reaches redb or
/// the log until [`super::RedbBatch`] commits it. Holds the pending batches' read lock, so no
/// generation vanishes between a lookup here and the lookup in redb that follows it.
pub(super) struct BatchWriter<'a, A: AppliedIds> {
    pending: RwLockReadGuard<'a, Pending>,
    applied: A,
    id_key: IdKey,
    changes: BatchChanges,
}

impl<'a, A: AppliedIds> BatchWriter<'a, A> {
    pub(super) fn new(pending: RwLockReadGuard<'a, Pending>, applied: A, id_key: IdKey) -> Self {
        BatchWriter {
            pending,
            applied,
            id_key,
            changes: BatchChanges::default(),
        }
    }

    /// The id the store derives for the event at `offset` of queue `qid` (see
    /// [`derived_ids`]), if the offset has one.
    pub(super) fn derived_id(&self, qid: u64, offset: u64) -> Option<[u8; DERIVED_LEN]> {
        self.id_key.derive(qid, offset)
    }

    /// The batch's changes; releases the pending batches' lock.
    pub(super) fn into_changes(self) -> BatchChanges {
        self.changes
    }

    pub(super) fn record(&mut self, op: WalOpRef<'_>) -> Result<()> {
        wal::encode_op(&op, &mut self.changes.payload)
    }

    pub(super) fn set_next_queue_id(&mut self, id: u64) -> Result<()> {
        self.record(WalOpRef::SetNextQueueId(id))
    }

    pub(super) fn put_queue(
        &mut self,
        tenant: &str,
        task: &str,
        record: &QueueRecord,
    ) -> Result<()> {
        let bytes = codec::encode_queue(record)?;
        self.record(WalOpRef::PutQueue {
            tenant,
            task,
            record: &bytes,
        })
    }

    /// Removes queue `qid`'s record and marks its events for purge steps (queue ids are never
    /// reused, so the remaining events are unreachable meanwhile).
    pub(super) fn remove_queue(&mut self, qid: u64, tenant: &str, task: &str) -> Result<()> {
        self.changes.removed.push(qid);
        self.record(WalOpRef::RemoveQueue { tenant, task })?;
        self.record(WalOpRef::MarkPurge { qid })
    }

    /// The offset at which queue `qid` retains an event with id `event_id` (at or above
    /// `retained.start`): in this batch, pending, or in redb; or whose derived id it is.
    pub(super) fn find_event_id(
        &mut self,
        qid: u64,
        event_id: &str,
        retained: std::ops::Range<u64>,
    ) -> Result<Option<u64>> {
        let local = self
            .changes
            .ids
            .get(&qid)
            .and_then(|m| m.get(event_id))
            .copied();
        let found = match local {
            Some(o) => Some(o),
            None => match self.pending.id(qid, event_id) {
                Some(o) => Some(o),
                None => self.applied.get(qid, event_id)?,
            },
        };
        if let Some(stored) = found.filter(|&o| o >= retained.start) {
            return Ok(Some(stored));
        }
        self.derived_retained(qid, event_id, retained)
    }

    /// The offset of `qid` in `retained` whose derived id is `event_id`, if the event stored
    /// there has that id: in this batch, pending, or in redb.
    fn derived_retained(
        &mut self,
        qid: u64,
        event_id: &str,
        retained: std::ops::Range<u64>,
    ) -> Result<Option<u64>> {
        let Some(offset) = self
            .id_key
            .offset_of(qid, event_id)
            .filter(|o| retained.contains(o))
        else {
            return Ok(None);
        };
        let here = self
            .changes
            .events
            .iter()
            .rev()
            .find(|(q, e)| *q == qid && e.offset == offset)
            .map(|(_, e)| e.json.clone());
        let json = here.or_else(|| {
            let read = self.pending.read(qid, offset, offset + 1, 1);
            read.events.into_iter().next().map(|e| e.json)
        });
        let same = match json {
            Some(json) => derived_ids::json_event_id(&json) == Some(event_id),
            None => self.applied.stored_id(qid, offset)?.as_deref() == Some(event_id),
        };
        Ok(same.then_some(offset))
    }

    /// Stores one encoded record at `offset` of `qid` (its JSON from `json_at`), indexing
    /// `event_id` unless it is derived from the offset (`None`).
    pub(super) fn append(
        &mut self,
        qid: u64,
        offset: u64,
        event_id: Option<&EventId>,
        record: Bytes,
        json_at: usize,
        (event_type, terminal): (u8, bool),
    ) -> Result<()> {
        if let Some(id) = event_id {
            self.changes
                .ids
                .entry(qid)
                .or_default()
                .insert(id.clone(), offset);
        }
        self.record(WalOpRef::Append {
            qid,
            offset,
            event_id: event_id.map_or("", EventId::as_str),
            record: &record,
        })?;
        self.changes.events.push((
            qid,
            StoredEvent {
                offset,
                event_type,
                terminal,
                json: record.slice(json_at..),
            },
        ));
        Ok(())
    }

    /// Removes the events of `qid` with offsets in `from..to` and their id-index entries.
    /// Offsets are dense, so that is `to - from` events.
    pub(super) fn trim(&mut self, qid: u64, from: u64, to: u64) -> Result<u64> {
        self.changes.trims.push((qid, to));
        self.record(WalOpRef::Trim { qid, from, to })?;
        Ok(to.saturating_sub(from))
    }

    /// One purge step of a deleted queue: its offsets `from..to` go (a trim of redb: the
    /// queue's pending events were forgotten when it was removed), and with `last` its purge
    /// mark.
    pub(super) fn purge(&mut self, qid: u64, from: u64, to: u64, last: bool) -> Result<()> {
        if from < to {
            self.record(WalOpRef::Trim { qid, from, to })?;
        }
        if last {
            self.record(WalOpRef::EndPurge { qid })?;
        }
        Ok(())
    }
}
