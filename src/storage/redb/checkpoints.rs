//! Workflow checkpoints, in the same database (and the same batches) as the events.
//!
//! Tables:
//! - `checkpoints`: `(tenant, workflow, seq) -> checkpoint record` (see [`CheckpointRecord`]);
//!   `seq` counts a workflow's saves from 0, so the last key of a workflow is its latest
//!   checkpoint.
//! - `checkpoint_ids`: `(tenant, checkpoint id) -> (workflow, seq)`, for lookups by id.
//!
//! A save is one `PutCheckpoint` op in the writer's batch, next to the appends of the events
//! it emits: the batch's log record holds both ops, so the batch is stored (and recovered)
//! with both or neither. A workflow keeps its newest [`KEEP_CHECKPOINTS`] checkpoints; older
//! ones are removed when the save that exceeds the bound is applied (a function of the op, so
//! replay removes exactly the same ones). A batch holding a save is written into redb as soon
//! as it is logged, so the reads here (and the next batch's sequence numbers) find it.

use redb::TableDefinition;

use super::{Store, StoreWriter, st};
use crate::error::{Error, Result};
use crate::storage::{CheckpointRecord, KEEP_CHECKPOINTS, LoadedCheckpoint};

pub(super) const CHECKPOINTS: TableDefinition<(&str, &str, u64), &[u8]> =
    TableDefinition::new("checkpoints");
pub(super) const CHECKPOINT_IDS: TableDefinition<(&str, &str), (&str, u64)> =
    TableDefinition::new("checkpoint_ids");

/// First byte of every checkpoint record.
const CHECKPOINT_RECORD_VERSION: u8 = 1;

pub(crate) fn encode_checkpoint(record: &CheckpointRecord) -> Result<Vec<u8>> {
    postcard::to_extend(record, vec![CHECKPOINT_RECORD_VERSION]).map_err(Error::storage)
}

pub(crate) fn decode_checkpoint(bytes: &[u8]) -> Result<CheckpointRecord> {
    match bytes.split_first() {
        Some((&CHECKPOINT_RECORD_VERSION, rest)) => postcard::from_bytes(rest)
            .map_err(|e| Error::storage(format!("corrupt checkpoint record: {e}"))),
        Some((v, _)) => Err(Error::storage(format!(
            "unknown checkpoint record version {v}"
        ))),
        None => Err(Error::storage("empty checkpoint record")),
    }
}

impl StoreWriter<'_> {
    /// Stores one encoded event record at `(qid, offset)` and indexes `event_id`; an empty
    /// `event_id` indexes nothing (the record's id is derived from its offset).
    pub(super) fn append_event(
        &mut self,
        qid: u64,
        offset: u64,
        event_id: &str,
        record: &[u8],
    ) -> Result<()> {
        self.put_block(qid, offset, &[event_id], &[record])
    }

    /// Inserts a checkpoint at `seq` and removes the workflow's checkpoints that fall out of
    /// the [`KEEP_CHECKPOINTS`] bound.
    pub(super) fn insert_checkpoint(
        &mut self,
        tenant: &str,
        workflow: &str,
        seq: u64,
        checkpoint_id: &str,
        record: &[u8],
    ) -> Result<()> {
        let mut table = self.txn.open_table(CHECKPOINTS).map_err(st)?;
        let mut ids = self.txn.open_table(CHECKPOINT_IDS).map_err(st)?;
        table.insert((tenant, workflow, seq), record).map_err(st)?;
        ids.insert((tenant, checkpoint_id), (workflow, seq))
            .map_err(st)?;
        if let Some(keep_from) = (seq + 1).checked_sub(KEEP_CHECKPOINTS) {
            let mut dropped = Vec::new();
            {
                let old = table
                    .extract_from_if(
                        (tenant, workflow, 0)..(tenant, workflow, keep_from),
                        |_, _| true,
                    )
                    .map_err(st)?;
                for row in old {
                    let (_, v) = row.map_err(st)?;
                    dropped.push(decode_checkpoint(v.value())?.checkpoint_id);
                }
            }
            for id in &dropped {
                ids.remove((tenant, id.as_str())).map_err(st)?;
            }
        }
        Ok(())
    }
}

impl Store {
    /// Whether `tenant` has a stored checkpoint with this id.
    pub(super) fn checkpoint_id_stored(&self, tenant: &str, checkpoint_id: &str) -> Result<bool> {
        let txn = self.begin_read()?;
        let ids = txn.open_table(CHECKPOINT_IDS).map_err(st)?;
        Ok(ids.get((tenant, checkpoint_id)).map_err(st)?.is_some())
    }

    /// The sequence number the workflow's next checkpoint gets, as redb holds it.
    pub(super) fn next_checkpoint_seq(&self, tenant: &str, workflow: &str) -> Result<u64> {
        Ok(self
            .latest_checkpoint(tenant, workflow)?
            .map_or(0, |c| c.seq + 1))
    }

    /// The newest checkpoint of `(tenant, workflow)`.
    pub(crate) fn latest_checkpoint(
        &self,
        tenant: &str,
        workflow: &str,
    ) -> Result<Option<LoadedCheckpoint>> {
        let txn = self.begin_read()?;
        let table = txn.open_table(CHECKPOINTS).map_err(st)?;
        let last = table
            .range((tenant, workflow, 0)..=(tenant, workflow, u64::MAX))
            .map_err(st)?
            .next_back()
            .transpose()
            .map_err(st)?;
        last.map(|(k, v)| {
            Ok(LoadedCheckpoint {
                workflow: workflow.to_string(),
                seq: k.value().2,
                record: decode_checkpoint(v.value())?,
            })
        })
        .transpose()
    }

    /// The checkpoint of `tenant` with this id.
    pub(crate) fn checkpoint_by_id(
        &self,
        tenant: &str,
        checkpoint_id: &str,
    ) -> Result<Option<LoadedCheckpoint>> {
        let txn = self.begin_read()?;
        let ids = txn.open_table(CHECKPOINT_IDS).map_err(st)?;
        let Some(at) = ids.get((tenant, checkpoint_id)).map_err(st)? else {
            return Ok(None);
        };
        let (workflow, seq) = at.value();
        let table = txn.open_table(CHECKPOINTS).map_err(st)?;
        let Some(v) = table.get((tenant, workflow, seq)).map_err(st)? else {
            return Err(Error::storage(format!(
                "checkpoint index points at a missing checkpoint {checkpoint_id}"
            )));
        };
        Ok(Some(LoadedCheckpoint {
            workflow: workflow.to_string(),
            seq,
            record: decode_checkpoint(v.value())?,
        }))
    }

    /// Every retained checkpoint of `(tenant, workflow)`, oldest first.
    pub(crate) fn list_checkpoints(
        &self,
        tenant: &str,
        workflow: &str,
    ) -> Result<Vec<LoadedCheckpoint>> {
        let txn = self.begin_read()?;
        let table = txn.open_table(CHECKPOINTS).map_err(st)?;
        let mut out = Vec::new();
        for row in table
            .range((tenant, workflow, 0)..=(tenant, workflow, u64::MAX))
            .map_err(st)?
        {
            let (k, v) = row.map_err(st)?;
            out.push(LoadedCheckpoint {
                workflow: workflow.to_string(),
                seq: k.value().2,
                record: decode_checkpoint(v.value())?,
            });
        }
        Ok(out)
    }
}

/// Opens (creates) the checkpoint tables in the transaction that sets a database up.
pub(super) fn create_tables(txn: &redb::WriteTransaction) -> Result<()> {
    txn.open_table(CHECKPOINTS).map_err(st)?;
    txn.open_table(CHECKPOINT_IDS).map_err(st)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::TaskRecord;

    #[test]
    fn checkpoint_record_round_trips() {
        let rec = CheckpointRecord {
            checkpoint_id: "ckpt_0123456789ab".into(),
            status: "running".into(),
            current_phase: 2,
            total_phases: 3,
            tasks: vec![TaskRecord {
                task_id: "search".into(),
                status: "completed".into(),
                result_json: Some(br#"{"hits":3}"#.to_vec()),
            }],
            state_json: br#"{"query":"cats"}"#.to_vec(),
            created_at_us: 42,
            status_offset: Some(7),
            progress_offset: Some(8),
        };
        let bytes = encode_checkpoint(&rec).unwrap();
        assert_eq!(decode_checkpoint(&bytes).unwrap(), rec);
        assert!(decode_checkpoint(&[9, 1, 2]).is_err());
        assert!(decode_checkpoint(&[]).is_err());
        assert!(decode_checkpoint(&bytes[..bytes.len() / 2]).is_err());
    }

    #[test]
    fn the_checkpoint_log_op_decodes_as_written() {
        use crate::storage::redb::wal::{WalOp, WalOpRef, decode_ops, encode_op};
        let mut payload = Vec::new();
        encode_op(&WalOpRef::MarkPurge { qid: 1 }, &mut payload).unwrap();
        encode_op(
            &WalOpRef::PutCheckpoint {
                tenant: "t",
                workflow: "wf",
                seq: 3,
                checkpoint_id: "ckpt_1",
                record: &[1, 2, 255],
            },
            &mut payload,
        )
        .unwrap();
        assert_eq!(
            decode_ops(&payload).unwrap(),
            vec![
                WalOp::MarkPurge { qid: 1 },
                WalOp::PutCheckpoint {
                    tenant: "t".into(),
                    workflow: "wf".into(),
                    seq: 3,
                    checkpoint_id: "ckpt_1".into(),
                    record: vec![1, 2, 255],
                },
            ]
        );
    }
}
