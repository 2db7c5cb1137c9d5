//! Reading a stopped store out whole, for `eventqueue migrate` (`src/cli/migrate.rs`): every
//! retained event with the id and time its record holds, which [`Store::read_range`] leaves
//! out (replay needs only the JSON, and a stream message's id is nowhere in its bytes), and
//! every workflow that has checkpoints (a checkpoint may outlive its queue, or never have had
//! one).
//!
//! Both read what redb holds. Opening a store folds its log into redb, so on a store opened
//! for reading only (no batches committed since) that is everything it holds.

use bytes::Bytes;
use redb::ReadableTable;

use super::checkpoints::CHECKPOINTS;
use super::{Store, codec, st};
use crate::error::Result;

/// One stored event with everything its record holds.
#[derive(Debug, Clone)]
pub(crate) struct ExportedEvent {
    pub offset: u64,
    pub event_type: u8,
    pub terminal: bool,
    pub timestamp_us: i64,
    /// The id the event was stored with: its producer's, the generated one, or the one the
    /// store derived from its offset (also what the event's JSON holds, for a typed event).
    pub event_id: String,
    /// The stored bytes: the event's JSON with its offset, or a stream message as sent.
    pub json: Bytes,
}

impl Store {
    /// Up to `limit` events of queue `qid` with offsets in `from..to`, in offset order, as
    /// [`Store::read_range`] reads them (stopping after at least one event once they hold
    /// `max_bytes`), with their ids and times.
    ///
    /// # Errors
    ///
    /// Storage errors; a corrupt record.
    pub(crate) fn export_events(
        &self,
        qid: u64,
        from: u64,
        to: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<ExportedEvent>> {
        let mut out = Vec::new();
        if from >= to || limit == 0 {
            return Ok(out);
        }
        let mut bytes = 0;
        self.for_each_record(qid, from, to, |offset, record| {
            let (header, at) = codec::decode_event(record)?;
            let json = &record[at..];
            if !out.is_empty() && bytes + json.len() > max_bytes {
                return Ok(false);
            }
            bytes += json.len();
            out.push(ExportedEvent {
                offset,
                event_type: header.event_type,
                terminal: header.terminal,
                timestamp_us: header.timestamp_us,
                event_id: header.event_id.to_string(),
                json: Bytes::copy_from_slice(json),
            });
            Ok(out.len() < limit && bytes < max_bytes)
        })?;
        Ok(out)
    }

    /// Every `(tenant, workflow)` with retained checkpoints, sorted.
    ///
    /// # Errors
    ///
    /// Storage errors.
    pub(crate) fn checkpoint_workflows(&self) -> Result<Vec<(String, String)>> {
        let txn = self.begin_read()?;
        let table = txn.open_table(CHECKPOINTS).map_err(st)?;
        let mut out: Vec<(String, String)> = Vec::new();
        for row in table.iter().map_err(st)? {
            let (k, _) = row.map_err(st)?;
            let (tenant, workflow, _) = k.value();
            // Keys are sorted: a workflow's checkpoints are consecutive.
            if out.last().is_none_or(|(t, w)| t != tenant || w != workflow) {
                out.push((tenant.to_string(), workflow.to_string()));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{EventMeta, QueueRecord, Storage};
    use crate::{EventId, storage::redb::Options};

    fn record(id: u64) -> QueueRecord {
        QueueRecord {
            id,
            kind: 0,
            created_at_us: 1,
            last_activity_us: 1,
            ttl_ms: 60_000,
            max_buffer_size: 1000,
            first_offset: 0,
            next_offset: 0,
            closed: false,
            finished_at: None,
            cancel: None,
            content_type: Some("text/plain".into()),
            stream: None,
        }
    }

    /// Events come back with the id and time they were stored with, in bounded steps that
    /// resume where the last one stopped; workflows with checkpoints are listed once each.
    #[test]
    fn events_come_back_with_their_ids_in_bounded_steps() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path(), &Options::offline()).unwrap();
        let mut w = store.begin().unwrap();
        w.put_queue("t", "k", &record(1)).unwrap();
        for offset in 0..10u64 {
            let id = EventId::new(format!("id-{offset}")).unwrap();
            let meta = EventMeta {
                event_type: 5,
                terminal: false,
                timestamp_us: 100 + offset as i64,
                event_id: id.as_str(),
            };
            let (mut buf, at) = w.event_record(&meta, 4).unwrap();
            buf.extend_from_slice(format!("m{offset:03}").as_bytes());
            w.append(1, offset, Some(&id), Bytes::from(buf), at, (5, false))
                .unwrap();
        }
        for (workflow, id) in [("w1", "c1"), ("w1", "c2"), ("w2", "c3")] {
            let cp = crate::storage::CheckpointRecord {
                checkpoint_id: id.into(),
                status: "running".into(),
                current_phase: 0,
                total_phases: 1,
                tasks: Vec::new(),
                state_json: b"{}".to_vec(),
                created_at_us: 1,
                status_offset: None,
                progress_offset: None,
            };
            w.put_checkpoint("t", workflow, &cp).unwrap();
        }
        w.commit().map_err(|e| e.error()).unwrap();
        store.fold().unwrap();

        let mut seen = Vec::new();
        let mut from = 2;
        loop {
            let step = store.export_events(1, from, 10, 3, 1 << 20).unwrap();
            let Some(last) = step.last() else { break };
            assert!(step.len() <= 3);
            from = last.offset + 1;
            seen.extend(step);
        }
        let offsets: Vec<u64> = seen.iter().map(|e| e.offset).collect();
        assert_eq!(offsets, (2..10).collect::<Vec<_>>());
        assert_eq!(seen[0].event_id, "id-2");
        assert_eq!(seen[0].timestamp_us, 102);
        assert_eq!(&seen[0].json[..], b"m002");
        // A byte bound of one event's size reads one event per step.
        assert_eq!(store.export_events(1, 0, 10, 100, 4).unwrap().len(), 1);

        assert_eq!(
            store.checkpoint_workflows().unwrap(),
            vec![("t".into(), "w1".into()), ("t".into(), "w2".into())]
        );
    }
}
