//! The embedded store: redb plus a write-ahead log. The only module that imports redb.
//!
//! Tables:
//! - `meta`: `&str -> u64` — `format_version`, `next_queue_id`, `applied_lsn`, and the two
//!   halves of the key of derived event ids (see [`derived_ids`]).
//! - `queues`: `(tenant, task) -> QueueRecord` (postcard).
//! - `events`: `(queue id, offset) -> event record` (see [`codec`]).
//! - `event_ids`: `(queue id, event id) -> offset`, the idempotency index of the ids producers
//!   chose; written and trimmed in the same transaction as the events it points at (an entry
//!   below its queue's first retained offset is stale: see [`pending`]). Ids the store derived
//!   from the offset are not indexed (see [`derived_ids`]).
//! - `checkpoints`, `checkpoint_ids`: workflow checkpoints (see [`checkpoints`]).
//! - `purge`: deleted queues whose events are still being removed.
//!
//! # The write path
//!
//! Every change — appends, queue records, trims, deletions and their purge steps, workflow
//! checkpoints — takes one path. The engine builds a batch through [`Store::begin`] (a
//! [`RedbBatch`]), which only encodes the batch's changes as one log record and indexes them
//! for lookups; nothing touches redb yet. [`WriteBatch::commit`] then, with the log locked:
//!
//! 1. appends the record to the write-ahead log ([`wal`]); if that fails the record is cut off
//!    again and nothing of the batch exists ([`WriteError::Rejected`]);
//! 2. adds the batch to the pending batches ([`pending`]), where readers and later batches'
//!    lookups find it at once;
//! 3. returns. The engine's acknowledging thread fsyncs the log ([`Storage::sync`]) and only
//!    then publishes the batch to subscribers and answers its callers.
//!
//! Pending batches reach redb later, many at a time, in log order: the background thread
//! writes a *frozen* generation once enough has gathered ([`Storage::maintain`],
//! [`Storage::background`]), and a *fold* ([`Store::fold`]) writes the rest in one durable
//! redb commit and empties the log — when the log outgrows [`fold_limit`], when its oldest
//! record is older than the fold interval, and at shutdown. A batch that saves a workflow
//! checkpoint is written into redb right after it is logged (step 2), because checkpoint
//! reads and lookups read redb only.
//!
//! Recovery on open re-applies every log record redb does not hold yet (redb's `meta`
//! records the last applied sequence number in the same transaction as the changes), then
//! folds. A torn record at the log's tail was never synced, so never acknowledged.
//!
//! Queue ids are numeric and never reused, so the events of a deleted queue can never be read as
//! another queue's. Every function here is synchronous: callers run them on the engine's
//! threads or in `spawn_blocking`, never on an async worker.

pub(crate) mod checkpoints;
pub(crate) mod codec;
pub(crate) mod derived_ids;
// Reading a stopped store out whole (`eventqueue migrate`, so only with the CLI).
#[cfg(feature = "cli")]
pub(crate) mod export;
mod pending;
#[cfg(feature = "failpoints")]
pub mod sim;
pub(crate) mod space;
pub mod wal;

use crate::storage::BatchCheckpoints;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
};

use crate::error::{Error, Result, StorageError};
use crate::ids::EventId;
use crate::storage::{
    CheckpointRecord, DERIVED_LEN, EventMeta, Handoff, LoadedCheckpoint, LoadedQueue, Maintenance,
    PendingPurge, QueueRecord, Recovered, Storage, StoredEvent, WriteBatch, WriteError,
};
use codec::FORMAT_VERSION;
use derived_ids::IdKey;
use pending::{AppliedIds, BatchWriter, Pending};
use space::SpaceCheck;
use wal::{AppendError, Wal, WalOp, WalOpRef};

/// A simulated machine to open the store on (feature `failpoints`); uninhabited otherwise.
#[cfg(feature = "failpoints")]
pub(crate) type Power = std::sync::Arc<sim::PowerLoss>;
/// A simulated machine to open the store on (feature `failpoints`); uninhabited otherwise.
#[cfg(not(feature = "failpoints"))]
pub(crate) type Power = std::convert::Infallible;

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const QUEUES: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("queues");
const EVENTS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("events");
const EVENT_IDS: TableDefinition<(u64, &str), u64> = TableDefinition::new("event_ids");
/// Deleted queues whose events are still being removed, in bounded steps.
const PURGE: TableDefinition<u64, ()> = TableDefinition::new("purge");
/// Token revocations: tenant → not-before time in microseconds (written directly, not
/// through the log: they are no queue data, and each is its own durable transaction).
const REVOKED: TableDefinition<&str, u64> = TableDefinition::new("revoked");

const KEY_FORMAT: &str = "format_version";
const KEY_NEXT_QUEUE_ID: &str = "next_queue_id";
const KEY_APPLIED_LSN: &str = "applied_lsn";
const KEY_ID_KEY_0: &str = "derived_id_key_0";
const KEY_ID_KEY_1: &str = "derived_id_key_1";

/// A fold runs when the log grows past [`fold_limit`], or when it holds records older than
/// the configured fold interval. Without a disk reserve the limit is this.
const FOLD_BYTES: u64 = 64 << 20;

/// With a disk reserve, the most the log grows to while the disk has room: a quarter of the
/// default reserve. Each fold costs ~17 ms plus ~1 ms per MiB of log on this project's
/// machine, so much smaller folds cost more in all (at 2 MiB: 15 % fewer events/s and a
/// p99 of 9 ms instead of 1.5 ms), and larger ones hold the writer longer each time.
const ROOMY_FOLD_BYTES: u64 = 16 << 20;

/// The log size that makes a fold due, given the disk reserve (0: no check) and the
/// free space (`None`: unknown).
///
/// A fold writes about the log's size in redb pages, and a fold that meets a full
/// disk stops writes until a restart. So with a reserve the log stays under a quarter of the
/// free space above the reserve, up to [`ROOMY_FOLD_BYTES`]: the pages fit in that room
/// four times over. It may always grow to a quarter of the reserve (at least 64 KiB, at most
/// [`FOLD_BYTES`]), which the reserve itself holds four times over: writes are refused
/// once less than the reserve is free (see [`space`]).
pub(crate) fn fold_limit(reserve: u64, free: Option<u64>) -> u64 {
    if reserve == 0 {
        return FOLD_BYTES;
    }
    let floor = (reserve / 4).clamp(64 << 10, FOLD_BYTES);
    let room = free.map_or(0, |f| f.saturating_sub(reserve) / 4);
    room.min(ROOMY_FOLD_BYTES).max(floor)
}

/// How the store is opened.
#[derive(Debug, Clone)]
pub(crate) struct Options {
    /// redb's page cache, bytes.
    pub cache_bytes: usize,
    /// Longest time a record stays in the log before a fold.
    pub fold_interval: Duration,
    /// See [`crate::Config::apply_bytes`].
    pub apply_bytes: usize,
    /// See [`crate::Config::disk_reserve`].
    pub disk_reserve: Option<u64>,
}

impl Options {
    /// The store's part of a manager's configuration.
    pub(crate) fn of(config: &crate::config::Config) -> Self {
        Options {
            cache_bytes: config.cache_size_bytes,
            fold_interval: config.fold_interval,
            apply_bytes: config.apply_bytes,
            disk_reserve: config.disk_reserve,
        }
    }

    /// For offline tools: a small cache, nothing else matters.
    pub(crate) fn offline() -> Self {
        Options {
            cache_bytes: 16 << 20,
            fold_interval: Duration::from_secs(1),
            apply_bytes: 256 << 10,
            disk_reserve: Some(0),
        }
    }
}

/// How long [`Store::compact_in_place`] keeps retrying while readers hold transactions.
const COMPACT_PATIENCE: Duration = Duration::from_secs(5);

/// When the batches gathering in memory reach this many times `apply_bytes` while a bulk
/// write is still running, the writer writes them in itself.
const BACKLOG: usize = 8;

/// A generation of logged batches handed to the background thread ([`Store::freeze`]).
struct Frozen(Arc<pending::Generation>);

/// Name of the database file inside the data directory.
pub const DB_FILE: &str = "eventqueue.redb";

/// Name of the write-ahead log file inside the data directory.
pub const WAL_FILE: &str = "eventqueue.wal";

/// The log and its bookkeeping; only the writer thread uses it.
#[derive(Debug)]
struct LogState {
    wal: Wal,
    next_lsn: u64,
    oldest_unfolded: Option<Instant>,
}

impl LogState {
    /// Appends the record `lsn` (the next one) to the log.
    fn append(&mut self, lsn: u64, payload: &[u8]) -> Result<(), WriteError> {
        match self.wal.append(lsn, payload) {
            Ok(()) => {}
            Err(AppendError::RolledBack(e)) => return Err(WriteError::Rejected(e)),
            Err(AppendError::Broken(e)) => return Err(WriteError::Fatal(e)),
        }
        self.next_lsn += 1;
        self.oldest_unfolded.get_or_insert_with(Instant::now);
        Ok(())
    }
}

/// The database handle. `close` releases the file (and its lock) even while other parts of
/// the process still hold the `Store`; they then get [`Error::ShuttingDown`].
pub(crate) struct Store {
    db: RwLock<Option<Database>>,
    log: Mutex<LogState>,
    /// Logged batches not yet applied to redb (see [`pending`]).
    pending: RwLock<Pending>,
    /// Held while batches are written into redb, by the bulk-write thread or the writer.
    applying: Mutex<()>,
    /// Pending batches are applied once their records hold this many bytes (or at the next
    /// fold): large enough that one transaction touches each B-tree page for many
    /// events, small enough that applying them is a short pause of the writer.
    apply_bytes: usize,
    path: PathBuf,
    fold_interval: Duration,
    /// The key of derived event ids (read from `meta` on open).
    id_key: IdKey,
    /// fsyncs the log from the acknowledging thread.
    syncer: wal::WalSyncer,
    /// The free-space reserve (see [`space`]).
    space: Mutex<SpaceCheck>,
}

/// A failure of redb, keeping it as the cause (and the kind of an I/O failure inside it).
fn st(e: impl Into<redb::Error>) -> Error {
    st_at("", e)
}

/// As [`st`], saying what was being done.
fn st_at(context: impl std::fmt::Display, e: impl Into<redb::Error>) -> Error {
    let e: redb::Error = e.into();
    let kind = match &e {
        redb::Error::Io(io) => io.kind(),
        _ => std::io::ErrorKind::Other,
    };
    Error::Storage(StorageError::caused(context, kind, e))
}

impl Store {
    /// Opens (or creates) `data_dir/eventqueue.redb`, checks the format version and loads every
    /// queue record. Cost is proportional to the number of queues, not of events.
    pub(crate) fn open(data_dir: &Path, options: &Options) -> Result<(Store, Recovered)> {
        Self::open_on(data_dir, options, None)
    }

    /// As [`Store::open`]; with `power`, both files live on that simulated machine.
    pub(crate) fn open_on(
        data_dir: &Path,
        options: &Options,
        power: Option<Power>,
    ) -> Result<(Store, Recovered)> {
        let cache_bytes = options.cache_bytes;
        std::fs::create_dir_all(data_dir).map_err(|e| {
            Error::Storage(StorageError::io(
                format_args!("cannot create data directory {}", data_dir.display()),
                e,
            ))
        })?;
        let path = data_dir.join(DB_FILE);
        if !path.exists() {
            Self::create_fresh(data_dir, &path, power.as_ref())?;
        }
        let created = Self::open_db(&path, cache_bytes, power.as_ref());
        let db = match created {
            Ok(db) => db,
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                return Err(Error::Locked {
                    path: path.display().to_string(),
                });
            }
            Err(e) => return Err(st_at(format_args!("opening {}", path.display()), e)),
        };
        #[cfg_attr(not(feature = "failpoints"), allow(unused_mut))]
        let (mut wal, records) = Wal::open(data_dir)?;
        #[cfg(feature = "failpoints")]
        if let Some(power) = power {
            wal.simulate_power(power);
        }
        let syncer = wal.syncer()?;
        let mut store = Store {
            db: RwLock::new(Some(db)),
            log: Mutex::new(LogState {
                wal,
                next_lsn: 1,
                oldest_unfolded: None,
            }),
            pending: RwLock::new(Pending::default()),
            applying: Mutex::new(()),
            apply_bytes: options.apply_bytes,
            path,
            fold_interval: options.fold_interval,
            id_key: IdKey::from_parts(0, 0),
            syncer,
            space: Mutex::new(SpaceCheck::on_dir(
                data_dir.to_path_buf(),
                options.disk_reserve,
            )),
        };
        let recovered = store.init_and_load(records)?;
        Ok((store, recovered))
    }

    fn open_db(
        path: &Path,
        cache_bytes: usize,
        power: Option<&Power>,
    ) -> Result<Database, redb::DatabaseError> {
        let mut builder = redb::Builder::new();
        builder.set_cache_size(cache_bytes);
        match power {
            None => builder.create(path),
            #[cfg(feature = "failpoints")]
            Some(power) => {
                let backend = sim::SimBackend::open(path, power.clone())?;
                builder.create_with_backend(backend)
            }
            #[cfg(not(feature = "failpoints"))]
            Some(never) => match *never {},
        }
    }

    /// Creates the database file atomically: a crash while redb creates a file can leave one
    /// without its header, which redb then refuses to open ("not a redb database"). So the file
    /// is created under a temporary name, stamped with the format version in a durable commit,
    /// and only then renamed into place (and the directory synced). A leftover temporary file
    /// is from such a crash: nothing in it was ever acknowledged.
    fn create_fresh(data_dir: &Path, path: &Path, power: Option<&Power>) -> Result<()> {
        let tmp = data_dir.join(format!("{DB_FILE}.new"));
        let fail = |what: &str, e: redb::Error| st_at(format_args!("{what} {}", tmp.display()), e);
        match std::fs::remove_file(&tmp) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(fail("removing", e.into())),
        }
        {
            let db = match Self::open_db(&tmp, 1 << 20, power) {
                Ok(db) => db,
                Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                    return Err(Error::Locked {
                        path: tmp.display().to_string(),
                    });
                }
                Err(e) => return Err(fail("creating", e.into())),
            };
            let mut txn = db.begin_write().map_err(|e| fail("creating", e.into()))?;
            txn.set_durability(Durability::Immediate)
                .map_err(|e| fail("creating", e.into()))?;
            {
                let mut meta = txn
                    .open_table(META)
                    .map_err(|e| fail("creating", e.into()))?;
                meta.insert(KEY_FORMAT, u64::from(FORMAT_VERSION))
                    .map_err(|e| fail("creating", e.into()))?;
            }
            txn.commit().map_err(|e| fail("creating", e.into()))?;
        }
        #[cfg(feature = "failpoints")]
        if let Some(power) = power {
            power.check().map_err(|e| fail("renaming", e.into()))?;
        }
        std::fs::rename(&tmp, path).map_err(|e| fail("renaming", e.into()))?;
        std::fs::File::open(data_dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| fail("syncing the directory of", e.into()))
    }

    fn begin_write(&self) -> Result<redb::WriteTransaction> {
        let guard = self.db.read().unwrap_or_else(|p| p.into_inner());
        guard
            .as_ref()
            .ok_or(Error::ShuttingDown)?
            .begin_write()
            .map_err(st)
    }

    fn begin_read(&self) -> Result<redb::ReadTransaction> {
        let guard = self.db.read().unwrap_or_else(|p| p.into_inner());
        guard
            .as_ref()
            .ok_or(Error::ShuttingDown)?
            .begin_read()
            .map_err(st)
    }

    /// Opens the directory (recovering the log), then rewrites the file to release the space
    /// of freed pages, which redb otherwise reuses but never returns to the filesystem.
    /// Needs exclusive access: fails with [`Error::Locked`] while a server holds the file.
    /// Returns the file size before and after.
    pub(crate) fn compact_offline(data_dir: &Path) -> Result<(u64, u64)> {
        let (store, _) = Store::open(
            data_dir,
            &Options {
                cache_bytes: 64 << 20,
                ..Options::offline()
            },
        )?;
        let before = store.file_size();
        let db = store.db.write().unwrap_or_else(|p| p.into_inner()).take();
        let Some(mut db) = db else {
            return Err(Error::ShuttingDown);
        };
        while db.compact().map_err(st)? {}
        drop(db);
        Ok((before, store.file_size()))
    }

    /// Closes the database file. Later operations fail with [`Error::ShuttingDown`].
    pub(crate) fn close(&self) {
        let db = self.db.write().unwrap_or_else(|p| p.into_inner()).take();
        drop(db);
    }

    fn log(&self) -> std::sync::MutexGuard<'_, LogState> {
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Checks the format, re-applies log records redb does not hold yet, folds, and
    /// loads every queue record.
    fn init_and_load(&mut self, records: Vec<wal::LoggedRecord>) -> Result<Recovered> {
        let mut txn = self.begin_write()?;
        txn.set_durability(Durability::Immediate).map_err(st)?;
        let (applied, id_key) = {
            let mut meta = txn.open_table(META).map_err(st)?;
            let found = meta.get(KEY_FORMAT).map_err(st)?.map(|v| v.value());
            match found {
                Some(v) if v == u64::from(FORMAT_VERSION) => {}
                // Version 1 lacks the checkpoint tables (created below) and the log op that
                // writes them, version 2 the key of derived ids (created below, and with it
                // events whose ids are not indexed), version 3 blocks of events (its
                // one-record values are still valid): upgraded in place, so that older builds
                // refuse the file instead of meeting what they cannot read.
                Some(1..=3) => {
                    meta.insert(KEY_FORMAT, u64::from(FORMAT_VERSION))
                        .map_err(st)?;
                }
                Some(v) => {
                    return Err(Error::UnsupportedFormat {
                        found: u32::try_from(v).unwrap_or(u32::MAX),
                        expected: FORMAT_VERSION,
                    });
                }
                None => {
                    meta.insert(KEY_FORMAT, u64::from(FORMAT_VERSION))
                        .map_err(st)?;
                }
            }
            let applied = meta
                .get(KEY_APPLIED_LSN)
                .map_err(st)?
                .map(|v| v.value())
                .unwrap_or(0);
            let k0 = meta.get(KEY_ID_KEY_0).map_err(st)?.map(|v| v.value());
            let k1 = meta.get(KEY_ID_KEY_1).map_err(st)?.map(|v| v.value());
            let id_key = match (k0, k1) {
                (Some(k0), Some(k1)) => IdKey::from_parts(k0, k1),
                _ => {
                    let key = IdKey::random();
                    let (k0, k1) = key.parts();
                    meta.insert(KEY_ID_KEY_0, k0).map_err(st)?;
                    meta.insert(KEY_ID_KEY_1, k1).map_err(st)?;
                    key
                }
            };
            txn.open_table(EVENTS).map_err(st)?;
            txn.open_table(EVENT_IDS).map_err(st)?;
            txn.open_table(QUEUES).map_err(st)?;
            txn.open_table(PURGE).map_err(st)?;
            checkpoints::create_tables(&txn)?;
            (applied, id_key)
        };
        txn.commit().map_err(st)?;
        self.id_key = id_key;

        let mut last = applied;
        let mut replayed = 0usize;
        for (lsn, payload) in records {
            if lsn <= last {
                continue;
            }
            if lsn != last + 1 {
                return Err(Error::storage(format!(
                    "log record {lsn} follows {last}: the log does not belong to this database"
                )));
            }
            let ops = wal::decode_ops(&payload)?;
            {
                let guard = self.db.read().unwrap_or_else(|p| p.into_inner());
                let db = guard.as_ref().ok_or(Error::ShuttingDown)?;
                Self::apply_replayed(db, self.id_key, lsn, ops)?;
            }
            last = lsn;
            replayed += 1;
        }
        if replayed > 0 {
            tracing::info!(
                records = replayed,
                "re-applied log records after an unclean stop"
            );
        }
        {
            let mut log = self.log();
            log.next_lsn = last + 1;
        }
        // Make everything durable in redb and start with an empty log.
        self.fold()?;

        let txn = self.begin_read()?;
        let (queues, next_id) = {
            let meta = txn.open_table(META).map_err(st)?;
            let next_id = meta
                .get(KEY_NEXT_QUEUE_ID)
                .map_err(st)?
                .map(|v| v.value())
                .unwrap_or(1);
            let table = txn.open_table(QUEUES).map_err(st)?;
            let mut queues = Vec::with_capacity(table.len().map_err(st)? as usize);
            for row in table.iter().map_err(st)? {
                let (k, v) = row.map_err(st)?;
                let (tenant, task) = k.value();
                queues.push(LoadedQueue {
                    tenant: tenant.to_string(),
                    task: task.to_string(),
                    record: codec::decode_queue(v.value())?,
                });
            }
            (queues, next_id)
        };
        let mut purges = Vec::new();
        let events = txn.open_table(EVENTS).map_err(st)?;
        for row in txn.open_table(PURGE).map_err(st)?.iter().map_err(st)? {
            let qid = row.map_err(st)?.0.value();
            purges.push(PendingPurge {
                qid,
                offsets: stored_offsets(&events, qid)?,
            });
        }
        Ok(Recovered {
            queues,
            next_queue_id: next_id,
            purges,
        })
    }

    fn apply_replayed(db: &Database, id_key: IdKey, lsn: u64, ops: Vec<WalOp>) -> Result<()> {
        let mut txn = db.begin_write().map_err(st)?;
        txn.set_durability(Durability::None).map_err(st)?;
        {
            let mut w = StoreWriter::open(&txn, id_key)?;
            for op in ops {
                w.apply_op(op)?;
            }
            w.meta.insert(KEY_APPLIED_LSN, lsn).map_err(st)?;
        }
        txn.commit().map_err(st)?;
        Ok(())
    }

    fn pending(&self) -> std::sync::RwLockReadGuard<'_, Pending> {
        self.pending.read().unwrap_or_else(|p| p.into_inner())
    }

    fn pending_mut(&self) -> std::sync::RwLockWriteGuard<'_, Pending> {
        self.pending.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes `records` (logged batches, oldest first) into redb in one transaction with the
    /// given durability, and records the last one's sequence number as applied.
    fn apply_records(&self, records: &[(u64, Vec<u8>)], durability: Durability) -> Result<()> {
        let mut txn = self.begin_write()?;
        txn.set_durability(durability).map_err(st)?;
        {
            let mut ops = Vec::new();
            for (_, payload) in records {
                ops.extend(wal::decode_ops(payload)?);
            }
            // A queue record is rewritten by every batch that touches the queue; only its
            // last write (or its removal) needs to reach redb.
            let mut last_write = std::collections::HashMap::new();
            for (i, op) in ops.iter().enumerate() {
                if let WalOp::PutQueue { tenant, task, .. } | WalOp::RemoveQueue { tenant, task } =
                    op
                {
                    last_write.insert((tenant.as_str(), task.as_str()), i);
                }
            }
            let keep: Vec<bool> = ops
                .iter()
                .enumerate()
                .map(|(i, op)| match op {
                    WalOp::PutQueue { tenant, task, .. } => {
                        last_write.get(&(tenant.as_str(), task.as_str())) == Some(&i)
                    }
                    _ => true,
                })
                .collect();
            drop(last_write);
            // Each queue's ops keep their order. Ops of different queues touch different keys
            // and commute, and the rest (queue records, meta, workflow checkpoints) touch
            // other tables: so each queue's ops can be applied together, and its runs of
            // appends stored as blocks (see `codec`).
            let (mut scoped, rest): (Vec<_>, Vec<_>) = ops
                .into_iter()
                .zip(keep)
                .filter_map(|(op, keep)| keep.then_some(op))
                .partition(|op| op.queue().is_some());
            scoped.sort_by_key(WalOp::queue);
            let mut w = StoreWriter::open(&txn, self.id_key)?;
            for op in rest {
                w.apply_op(op)?;
            }
            let mut run = Run::default();
            for op in scoped {
                match op {
                    WalOp::Append {
                        qid,
                        offset,
                        event_id,
                        record,
                    } => {
                        if !run.continues(qid, offset, record.len()) {
                            run.store(&mut w)?;
                            run.start(qid, offset);
                        }
                        run.push(event_id, record);
                    }
                    other => {
                        run.store(&mut w)?;
                        w.apply_op(other)?;
                    }
                }
            }
            run.store(&mut w)?;
            if let Some((lsn, _)) = records.last() {
                w.meta.insert(KEY_APPLIED_LSN, *lsn).map_err(st)?;
            }
        }
        txn.commit().map_err(st)
    }

    /// Applies every logged batch that redb does not hold yet, in one transaction with the
    /// given durability (an empty durable transaction when none is pending), after waiting
    /// for a bulk write in progress. Only the writer thread calls this, with the log locked,
    /// so no batch is added meanwhile.
    fn apply_pending(&self, durability: Durability) -> Result<()> {
        let _applying = self.applying.lock().unwrap_or_else(|p| p.into_inner());
        // A frozen generation still here was handed to the bulk-write thread, which has not
        // started on it: write it in first (the thread then finds it gone and skips it).
        let frozen = self.pending().frozen.clone();
        if let Some(frozen) = frozen {
            self.apply_records(&frozen.records, Durability::None)?;
            self.pending_mut().frozen = None;
        }
        let records = std::mem::take(&mut self.pending_mut().active.records);
        if records.is_empty() && matches!(durability, Durability::None) {
            return Ok(());
        }
        let applied = self.apply_records(&records, durability);
        let mut pending = self.pending_mut();
        match applied {
            // Readers found these batches here until now; from now on redb has them.
            Ok(()) => pending.active.clear_applied(),
            // Still only in the log: keep serving them from here (writes stop after this).
            Err(_) => pending.active.records = records,
        }
        applied
    }

    /// Hands the batches gathered so far to the bulk-write thread when they reach
    /// `apply_bytes` and no other bulk write is in progress: they become the frozen
    /// generation, still served from memory until [`Store::apply_frozen`] has written them.
    fn freeze(&self) -> Option<Frozen> {
        let mut pending = self.pending_mut();
        if pending.frozen.is_some() || pending.active.bytes < self.apply_bytes {
            return None;
        }
        let generation = Arc::new(std::mem::take(&mut pending.active));
        pending.frozen = Some(generation.clone());
        Some(Frozen(generation))
    }

    /// Writes a frozen generation into redb (non-durably), then forgets it: readers find its
    /// batches in redb from then on. Runs on the bulk-write thread, while the writer goes on
    /// logging batches; folds and checkpoint batches wait for it.
    ///
    /// # Errors
    ///
    /// Storage errors; the generation then stays in memory and the caller must stop writes.
    fn apply_frozen(&self, frozen: Frozen) -> Result<()> {
        let _applying = self.applying.lock().unwrap_or_else(|p| p.into_inner());
        let current = |pending: &Pending| {
            pending
                .frozen
                .as_ref()
                .is_some_and(|f| Arc::ptr_eq(f, &frozen.0))
        };
        if !current(&self.pending()) {
            // The writer wrote it in already (a fold or a checkpoint batch came first).
            return Ok(());
        }
        self.apply_records(&frozen.0.records, Durability::None)?;
        let mut pending = self.pending_mut();
        if current(&pending) {
            pending.frozen = None;
        }
        Ok(())
    }

    /// Folds the log: makes every commit so far durable in redb with one fsync'd commit and
    /// empties the log.
    ///
    /// # Errors
    ///
    /// Storage errors, a full disk included. After a failed redb write redb refuses further
    /// work until reopened, so every failure here is permanent for this handle.
    pub(crate) fn fold(&self) -> Result<()> {
        self.fold_locked(&mut self.log())
    }

    /// [`Store::fold`] with the log already locked by the caller.
    fn fold_locked(&self, log: &mut LogState) -> Result<()> {
        // Every logged batch goes into this durable commit before the log is emptied.
        self.apply_pending(Durability::Immediate)?;
        log.wal.reset()?;
        log.oldest_unfolded = None;
        Ok(())
    }

    /// Folds when the log holds more than `limit` bytes (see [`fold_limit`]) or records
    /// older than the fold interval; called by the writer between batches. Returns whether it
    /// folded.
    ///
    /// # Errors
    ///
    /// As [`Store::fold`].
    fn maybe_fold(&self, limit: u64) -> Result<bool> {
        let due = {
            let log = self.log();
            log.wal.len() > limit
                || log
                    .oldest_unfolded
                    .is_some_and(|t| t.elapsed() >= self.fold_interval)
        };
        if due {
            self.fold()?;
        } else if self.pending().active.bytes >= self.apply_bytes.saturating_mul(BACKLOG) {
            // The bulk-write thread falls behind: write in here, bounding memory.
            self.apply_pending(Durability::None)?;
        }
        Ok(due)
    }

    /// Folds the log, then rewrites the database file in place so that the pages freed by
    /// deletions go back to the filesystem (redb otherwise only reuses them). The writer calls
    /// it when a deletion completes on a nearly full disk. Returns the file size before and
    /// after.
    ///
    /// Readers wait while a compaction step runs: each step holds the database exclusively
    /// (redb's `compact` needs that), and steps are retried while a reader's transaction is
    /// still open, for up to [`COMPACT_PATIENCE`]; after that the file stays as it is (not an
    /// error: it is retried at the next deletion).
    ///
    /// # Errors
    ///
    /// Storage errors of the fold or of a compaction step: permanent, as for
    /// [`Store::fold`].
    pub(crate) fn compact_in_place(&self) -> Result<(u64, u64)> {
        let before = self.file_size();
        // Everything logged goes into redb, durably, and the log is emptied: compaction then
        // works on the whole database, and the log's space is free too. The log stays locked
        // and the bulk-write thread idle (nothing is pending), so only readers compete.
        let mut log = self.log();
        self.fold_locked(&mut log)?;
        let _applying = self.applying.lock().unwrap_or_else(|p| p.into_inner());
        let started = Instant::now();
        loop {
            let step = {
                let mut guard = self.db.write().unwrap_or_else(|p| p.into_inner());
                let db = guard.as_mut().ok_or(Error::ShuttingDown)?;
                db.compact()
            };
            match step {
                Ok(true) => {}
                Ok(false) => break,
                Err(redb::CompactionError::TransactionInProgress) => {
                    if started.elapsed() >= COMPACT_PATIENCE {
                        tracing::warn!("compaction gave up: readers kept transactions open");
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(e) => return Err(st_at(format_args!("compacting {}", self.path.display()), e)),
            }
        }
        Ok((before, self.file_size()))
    }

    /// Reads up to `limit` events of queue `qid` with offsets in `from..to`, in offset order.
    /// Offsets missing from the result were trimmed or purged. The read also stops before an
    /// event that would take its JSON past `max_bytes` (a first event larger than that is
    /// read alone), so a step over large events stays small; the result then ends below `to`,
    /// and a read from its last offset + 1 goes on from there.
    pub(crate) fn read_range(
        &self,
        qid: u64,
        from: u64,
        to: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<StoredEvent>> {
        if from >= to || limit == 0 {
            return Ok(Vec::new());
        }
        // Pending first, redb second (see [`pending`] for why nothing falls in between).
        let pending = self.pending().read(qid, from, to, limit);
        let (start, end) = (from.max(pending.applied.start), to.min(pending.applied.end));
        let mut out = Vec::with_capacity(limit.min((to - from) as usize));
        let full = start < end && self.read_applied(qid, start, end, limit, max_bytes, &mut out)?;
        // A read of redb cut short must not go on with pending events: they come after what
        // it left out.
        if !full {
            let room = limit - out.len();
            let mut bytes: usize = out.iter().map(|e| e.json.len()).sum();
            for e in pending.events.into_iter().take(room) {
                bytes += e.json.len();
                if bytes > max_bytes && !out.is_empty() {
                    break;
                }
                out.push(e);
            }
        }
        Ok(out)
    }

    /// [`Store::read_range`] of what redb holds. True when it stopped before `to`: at `limit`
    /// events or at `max_bytes`.
    fn read_applied(
        &self,
        qid: u64,
        from: u64,
        to: u64,
        limit: usize,
        max_bytes: usize,
        out: &mut Vec<StoredEvent>,
    ) -> Result<bool> {
        /// Events' JSON is copied into shared buffers of about this size, one allocation for
        /// many events (an event kept alive keeps its buffer). Small enough to come from the
        /// allocator's free lists: 256 KiB buffers were mapped fresh each time, and a replay
        /// spent a fifth of its CPU in page faults filling them (with 1024-event steps, 32 KiB
        /// buffers cut the server's CPU per 100k-event SSE replay from ~60 to ~42 ms).
        const SHARED: usize = 32 << 10;
        // (offset, type, terminal, JSON range in `buf`) of the events since the last flush.
        let mut metas: Vec<(u64, u8, bool, std::ops::Range<usize>)> = Vec::new();
        let mut buf: Vec<u8> = Vec::new();
        let flush = |metas: &mut Vec<(u64, u8, bool, std::ops::Range<usize>)>,
                     buf: &mut Vec<u8>,
                     out: &mut Vec<StoredEvent>| {
            let shared = Bytes::from(std::mem::take(buf));
            out.extend(
                metas
                    .drain(..)
                    .map(|(offset, event_type, terminal, at)| StoredEvent {
                        offset,
                        event_type,
                        terminal,
                        json: shared.slice(at),
                    }),
            );
        };
        let mut taken = out.len();
        let (mut copied, mut full) = (0, false);
        self.for_each_record(qid, from, to, |offset, record| {
            let (header, at) = codec::decode_event(record)?;
            if taken > 0 && copied + (record.len() - at) > max_bytes {
                full = true;
                return Ok(false);
            }
            if buf.is_empty() {
                buf.reserve(SHARED.max(record.len()));
            } else if buf.len() + record.len() > buf.capacity() {
                flush(&mut metas, &mut buf, out);
                buf.reserve(SHARED.max(record.len()));
            }
            let start = buf.len();
            buf.extend_from_slice(&record[at..]);
            metas.push((offset, header.event_type, header.terminal, start..buf.len()));
            taken += 1;
            copied += buf.len() - start;
            full = taken >= limit || copied >= max_bytes;
            Ok(!full)
        })?;
        flush(&mut metas, &mut buf, out);
        Ok(full)
    }

    /// Hands `each` every record redb holds for queue `qid` in `from..to`, in offset order,
    /// until `each` answers `false`. The one walk of the events table that every read shares:
    /// a value may hold a block of records, the first of which may lie before `from`.
    fn for_each_record(
        &self,
        qid: u64,
        from: u64,
        to: u64,
        mut each: impl FnMut(u64, &[u8]) -> Result<bool>,
    ) -> Result<()> {
        let txn = self.begin_read()?;
        let table = txn.open_table(EVENTS).map_err(st)?;
        let start = row_at(&table, qid, from)?.map_or(from, |(first, _)| first);
        for row in table.range((qid, start)..(qid, to)).map_err(st)? {
            let (k, v) = row.map_err(st)?;
            for (offset, record) in (k.value().1..).zip(codec::records(v.value())) {
                if offset < from {
                    continue;
                }
                if offset >= to || !each(offset, record?)? {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// [`Storage::read_each`]: [`Store::read_range`]'s events, each JSON lent to `each`
    /// straight from redb's value (or the pending batch) rather than copied into a
    /// [`StoredEvent`], and the record header skipped rather than decoded. For readers that
    /// copy the bytes on: a catch-up read of many small messages spent a third of its CPU on
    /// those copies and decodes.
    pub(crate) fn read_each(
        &self,
        qid: u64,
        from: u64,
        to: u64,
        limit: usize,
        max_bytes: usize,
        each: &mut dyn FnMut(u64, &[u8]),
    ) -> Result<()> {
        if from >= to || limit == 0 {
            return Ok(());
        }
        // Pending first, redb second, as in `read_range`.
        let pending = self.pending().read(qid, from, to, limit);
        let (start, end) = (from.max(pending.applied.start), to.min(pending.applied.end));
        let (mut taken, mut bytes, mut full) = (0usize, 0usize, false);
        if start < end {
            self.for_each_record(qid, start, end, |offset, record| {
                let json = &record[codec::json_start(record)?..];
                if taken > 0 && bytes + json.len() > max_bytes {
                    full = true;
                    return Ok(false);
                }
                each(offset, json);
                taken += 1;
                bytes += json.len();
                full = taken >= limit || bytes >= max_bytes;
                Ok(!full)
            })?;
        }
        // A read of redb cut short must not go on with pending events.
        if !full {
            for e in pending.events.into_iter().take(limit - taken) {
                if taken > 0 && bytes + e.json.len() > max_bytes {
                    break;
                }
                each(e.offset, &e.json);
                taken += 1;
                bytes += e.json.len();
            }
        }
        Ok(())
    }

    /// Size of the database file in bytes.
    pub(crate) fn file_size(&self) -> u64 {
        std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0)
    }
}

/// One batch of the embedded store: its changes encoded as one log record (see the module
/// docs' write path). Holds the log's lock from [`Storage::begin`] to the commit, so batches
/// are built and logged one at a time, in log order.
pub(crate) struct RedbBatch<'s> {
    store: &'s Store,
    log: MutexGuard<'s, LogState>,
    w: BatchWriter<'s, AppliedIndex<'s>>,
    /// The checkpoints this batch saved.
    checkpoints: BatchCheckpoints,
}

impl WriteBatch for RedbBatch<'_> {
    fn derived_id(&self, qid: u64, offset: u64) -> Option<[u8; DERIVED_LEN]> {
        self.w.derived_id(qid, offset)
    }

    fn find_event_id(
        &mut self,
        qid: u64,
        event_id: &str,
        retained: std::ops::Range<u64>,
    ) -> Result<Option<u64>> {
        self.w.find_event_id(qid, event_id, retained)
    }

    fn event_record(&self, meta: &EventMeta<'_>, json_len: usize) -> Result<(Vec<u8>, usize)> {
        let header = codec::EventHeader {
            event_type: meta.event_type,
            terminal: meta.terminal,
            timestamp_us: meta.timestamp_us,
            event_id: meta.event_id,
        };
        codec::encode_event(&header, json_len)
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
        self.w.append(qid, offset, event_id, record, json_at, meta)
    }

    fn trim(&mut self, qid: u64, from: u64, to: u64) -> Result<u64> {
        self.w.trim(qid, from, to)
    }

    fn put_queue(&mut self, tenant: &str, task: &str, record: &QueueRecord) -> Result<()> {
        self.w.put_queue(tenant, task, record)
    }

    fn remove_queue(&mut self, qid: u64, tenant: &str, task: &str) -> Result<()> {
        self.w.remove_queue(qid, tenant, task)
    }

    fn purge(&mut self, qid: u64, from: u64, to: u64, last: bool) -> Result<()> {
        self.w.purge(qid, from, to, last)
    }

    fn set_next_queue_id(&mut self, id: u64) -> Result<()> {
        self.w.set_next_queue_id(id)
    }

    fn checkpoint_id_taken(&mut self, tenant: &str, checkpoint_id: &str) -> Result<bool> {
        self.checkpoints.taken(tenant, checkpoint_id, || {
            self.store.checkpoint_id_stored(tenant, checkpoint_id)
        })
    }

    fn put_checkpoint(
        &mut self,
        tenant: &str,
        workflow: &str,
        record: &CheckpointRecord,
    ) -> Result<u64> {
        let seq = self.checkpoints.next_seq(tenant, workflow, || {
            self.store.next_checkpoint_seq(tenant, workflow)
        })?;
        let bytes = checkpoints::encode_checkpoint(record)?;
        self.w.record(WalOpRef::PutCheckpoint {
            tenant,
            workflow,
            seq,
            checkpoint_id: &record.checkpoint_id,
            record: &bytes,
        })?;
        self.checkpoints
            .saved(tenant, workflow, &record.checkpoint_id, seq);
        Ok(seq)
    }

    fn commit(self: Box<Self>) -> Result<bool, WriteError> {
        let RedbBatch {
            store,
            mut log,
            w,
            checkpoints,
            ..
        } = *self;
        // Releases the pending batches' read lock before they take this one.
        let changes = w.into_changes();
        if changes.payload.is_empty() {
            return Ok(false);
        }
        let lsn = log.next_lsn;
        // On failure the record is cut off again: nothing of the batch exists.
        log.append(lsn, &changes.payload)?;
        store.pending_mut().add(lsn, changes);
        if !checkpoints.is_empty() {
            // Checkpoint reads and lookups read redb only (see `checkpoints`).
            store.apply_pending(Durability::None)?;
        }
        Ok(true)
    }
}

impl Storage for Store {
    fn begin(&self) -> Result<Box<dyn WriteBatch + '_>> {
        let log = self.log();
        let applied = AppliedIndex {
            store: self,
            table: None,
        };
        let w = BatchWriter::new(self.pending(), applied, self.id_key);
        Ok(Box::new(RedbBatch {
            store: self,
            log,
            w,
            checkpoints: BatchCheckpoints::default(),
        }))
    }

    fn sync(&self) -> Result<()> {
        self.syncer.sync()
    }

    fn admit(&self) -> Result<()> {
        self.space
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .admit(Instant::now())
    }

    fn maintain(&self) -> Result<Maintenance> {
        let limit = {
            let mut space = self.space.lock().unwrap_or_else(|p| p.into_inner());
            let reserve = space.reserve();
            let free = if reserve == 0 {
                None
            } else {
                space.free(Instant::now())
            };
            fold_limit(reserve, free)
        };
        let folded = self.maybe_fold(limit)?;
        let handoff = self.freeze().map(|frozen| Handoff(Box::new(frozen)));
        Ok(Maintenance { folded, handoff })
    }

    fn background(&self, work: Handoff) -> Result<()> {
        match work.0.downcast::<Frozen>() {
            Ok(frozen) => self.apply_frozen(*frozen),
            Err(_) => Err(Error::internal("work of another store handed to redb")),
        }
    }

    fn fold(&self) -> Result<()> {
        Store::fold(self)
    }

    fn compact(&self) -> Result<(u64, u64)> {
        self.compact_in_place()
    }

    fn reclaim_if_low(&self) -> Result<Option<(u64, u64)>> {
        let low = self
            .space
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .below(2, Instant::now());
        if low {
            self.compact_in_place().map(Some)
        } else {
            Ok(None)
        }
    }

    fn read_range(
        &self,
        qid: u64,
        from: u64,
        to: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<StoredEvent>> {
        Store::read_range(self, qid, from, to, limit, max_bytes)
    }

    fn read_each(
        &self,
        qid: u64,
        from: u64,
        to: u64,
        limit: usize,
        max_bytes: usize,
        each: &mut dyn FnMut(u64, &[u8]),
    ) -> Result<()> {
        Store::read_each(self, qid, from, to, limit, max_bytes, each)
    }

    fn latest_checkpoint(&self, tenant: &str, workflow: &str) -> Result<Option<LoadedCheckpoint>> {
        Store::latest_checkpoint(self, tenant, workflow)
    }

    fn checkpoint_by_id(
        &self,
        tenant: &str,
        checkpoint_id: &str,
    ) -> Result<Option<LoadedCheckpoint>> {
        Store::checkpoint_by_id(self, tenant, checkpoint_id)
    }

    fn list_checkpoints(&self, tenant: &str, workflow: &str) -> Result<Vec<LoadedCheckpoint>> {
        Store::list_checkpoints(self, tenant, workflow)
    }

    fn put_revocation(&self, tenant: &str, not_before_us: u64) -> Result<()> {
        let mut txn = self.begin_write()?;
        txn.set_durability(Durability::Immediate).map_err(st)?;
        txn.open_table(REVOKED)
            .map_err(st)?
            .insert(tenant, not_before_us)
            .map_err(st)?;
        txn.commit().map_err(st)
    }

    fn revocations(&self) -> Result<Vec<(String, u64)>> {
        let txn = self.begin_read()?;
        let table = match txn.open_table(REVOKED) {
            Ok(table) => table,
            // No revocation was ever made.
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(st(e)),
        };
        table
            .iter()
            .map_err(st)?
            .map(|row| {
                let (k, v) = row.map_err(st)?;
                Ok((k.value().to_owned(), v.value()))
            })
            .collect()
    }

    fn size_bytes(&self) -> u64 {
        self.file_size()
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    fn close(&self) {
        Store::close(self);
    }

    #[cfg(feature = "failpoints")]
    fn faults(&self) -> Arc<wal::Faults> {
        self.log().wal.faults.clone()
    }
}

/// The id index as redb holds it, opened on first use by a batch.
struct AppliedIndex<'s> {
    store: &'s Store,
    table: Option<redb::ReadOnlyTable<(u64, &'static str), u64>>,
}

impl AppliedIds for AppliedIndex<'_> {
    fn get(&mut self, qid: u64, event_id: &str) -> Result<Option<u64>> {
        let table = match &mut self.table {
            Some(t) => t,
            None => {
                let txn = self.store.begin_read()?;
                self.table.insert(txn.open_table(EVENT_IDS).map_err(st)?)
            }
        };
        Ok(table.get((qid, event_id)).map_err(st)?.map(|v| v.value()))
    }

    fn stored_id(&mut self, qid: u64, offset: u64) -> Result<Option<String>> {
        let txn = self.store.begin_read()?;
        stored_event_id(&txn.open_table(EVENTS).map_err(st)?, qid, offset)
    }
}

/// Appends of one queue at consecutive offsets, gathered to be stored as one block.
#[derive(Default)]
struct Run {
    qid: u64,
    first: u64,
    bytes: usize,
    ids: Vec<String>,
    records: Vec<Vec<u8>>,
}

impl Run {
    /// Whether an append at `offset` of `qid` extends this run (an empty run takes nothing:
    /// [`Run::start`] comes first).
    fn continues(&self, qid: u64, offset: u64, len: usize) -> bool {
        !self.records.is_empty()
            && self.qid == qid
            && self.first + self.records.len() as u64 == offset
            && self.bytes + len <= codec::BLOCK_BYTES
    }

    fn start(&mut self, qid: u64, first: u64) {
        self.qid = qid;
        self.first = first;
    }

    fn push(&mut self, event_id: String, record: Vec<u8>) {
        self.bytes += record.len();
        self.ids.push(event_id);
        self.records.push(record);
    }

    /// Stores the run (if any) and empties it.
    fn store(&mut self, w: &mut StoreWriter<'_>) -> Result<()> {
        w.put_block(self.qid, self.first, &self.ids, &self.records)?;
        self.bytes = 0;
        self.ids.clear();
        self.records.clear();
        Ok(())
    }
}

/// An `events` value and the offset of its first event.
type Row<'t> = (u64, redb::AccessGuard<'t, &'static [u8]>);

/// The last `events` row of queue `qid` at or before `offset`: the value that holds `offset`
/// if any does (values hold consecutive offsets from their key).
fn row_at<'t>(
    events: &'t impl ReadableTable<(u64, u64), &'static [u8]>,
    qid: u64,
    offset: u64,
) -> Result<Option<Row<'t>>> {
    match events
        .range((qid, 0)..=(qid, offset))
        .map_err(st)?
        .next_back()
    {
        Some(row) => {
            let (k, v) = row.map_err(st)?;
            Ok(Some((k.value().1, v)))
        }
        None => Ok(None),
    }
}

/// The offsets from queue `qid`'s first stored event to one past its last (empty when it has
/// none).
fn stored_offsets(
    events: &impl ReadableTable<(u64, u64), &'static [u8]>,
    qid: u64,
) -> Result<std::ops::Range<u64>> {
    // One past the last offset a value holds (values hold consecutive offsets from their key).
    let end = |(k, v): (
        redb::AccessGuard<'_, (u64, u64)>,
        redb::AccessGuard<'_, &[u8]>,
    )| { k.value().1 + codec::records(v.value()).count() as u64 };
    let mut rows = events.range((qid, 0)..=(qid, u64::MAX)).map_err(st)?;
    let Some(first) = rows.next().transpose().map_err(st)? else {
        return Ok(0..0);
    };
    let from = first.0.value().1;
    let to = match rows.next_back().transpose().map_err(st)? {
        Some(last) => end(last),
        // The first value is the only one.
        None => end(first),
    };
    Ok(from..to)
}

/// The id under which the event `record`, stored at `offset` of queue `qid`, is in the id
/// index: `None` when its id is derived from the offset (not indexed).
fn indexed_id(id_key: IdKey, qid: u64, offset: u64, record: &[u8]) -> Result<Option<&str>> {
    let id = codec::decode_event(record)?.0.event_id;
    Ok((!id_key.is_derived(qid, offset, id)).then_some(id))
}

/// The id of the event stored at `offset` of queue `qid` in `events`, if there is one.
fn stored_event_id(
    events: &impl ReadableTable<(u64, u64), &'static [u8]>,
    qid: u64,
    offset: u64,
) -> Result<Option<String>> {
    let Some((first, value)) = row_at(events, qid, offset)? else {
        return Ok(None);
    };
    let nth = usize::try_from(offset - first).unwrap_or(usize::MAX);
    match codec::records(value.value()).nth(nth) {
        Some(record) => Ok(Some(codec::decode_event(record?)?.0.event_id.to_string())),
        None => Ok(None),
    }
}

/// The tables of one open write transaction, for applying logged changes to redb (pending
/// batches, and log records at recovery). Changes are made here only as the log describes
/// them: the log is the truth.
pub(crate) struct StoreWriter<'t> {
    meta: redb::Table<'t, &'static str, u64>,
    queues: redb::Table<'t, (&'static str, &'static str), &'static [u8]>,
    events: redb::Table<'t, (u64, u64), &'static [u8]>,
    ids: redb::Table<'t, (u64, &'static str), u64>,
    purge: redb::Table<'t, u64, ()>,
    /// For tables opened only when needed (checkpoints).
    txn: &'t redb::WriteTransaction,
    id_key: IdKey,
}

impl<'t> StoreWriter<'t> {
    fn open(txn: &'t redb::WriteTransaction, id_key: IdKey) -> Result<Self> {
        Ok(StoreWriter {
            meta: txn.open_table(META).map_err(st)?,
            queues: txn.open_table(QUEUES).map_err(st)?,
            events: txn.open_table(EVENTS).map_err(st)?,
            ids: txn.open_table(EVENT_IDS).map_err(st)?,
            purge: txn.open_table(PURGE).map_err(st)?,
            txn,
            id_key,
        })
    }
}

impl StoreWriter<'_> {
    /// Applies one logged op (recovery, and pending batches). The log is the truth: an
    /// append indexes its id at its offset unconditionally.
    fn apply_op(&mut self, op: WalOp) -> Result<()> {
        match op {
            WalOp::SetNextQueueId(id) => self.set_next_queue_id(id),
            WalOp::PutQueue {
                tenant,
                task,
                record,
            } => self.put_queue_bytes(&tenant, &task, &record),
            WalOp::RemoveQueue { tenant, task } => self.remove_queue(&tenant, &task),
            WalOp::Append {
                qid,
                offset,
                event_id,
                record,
            } => self.append_event(qid, offset, &event_id, &record),
            WalOp::Trim { qid, from, to } => self.trim(qid, from, to).map(|_| ()),
            WalOp::Purge { qid, max } => self.purge_some(qid, max).map(|_| ()),
            WalOp::MarkPurge { qid } => self.mark_purge(qid),
            WalOp::EndPurge { qid } => self.end_purge(qid),
            WalOp::PutCheckpoint {
                tenant,
                workflow,
                seq,
                checkpoint_id,
                record,
            } => self.insert_checkpoint(&tenant, &workflow, seq, &checkpoint_id, &record),
        }
    }

    fn set_next_queue_id(&mut self, id: u64) -> Result<()> {
        self.meta.insert(KEY_NEXT_QUEUE_ID, id).map_err(st)?;
        Ok(())
    }

    fn put_queue_bytes(&mut self, tenant: &str, task: &str, bytes: &[u8]) -> Result<()> {
        self.queues.insert((tenant, task), bytes).map_err(st)?;
        Ok(())
    }

    fn remove_queue(&mut self, tenant: &str, task: &str) -> Result<()> {
        self.queues.remove((tenant, task)).map_err(st)?;
        Ok(())
    }

    /// Removes the events of `qid` with offsets in `from..to` and their id-index entries.
    /// Returns how many events were removed.
    fn trim(&mut self, qid: u64, from: u64, to: u64) -> Result<u64> {
        let mut removed = 0;
        if from < to {
            // The values holding offsets in `from..to`; the first may start before `from`
            // and the last end at or after `to` (blocks): what they hold outside the range
            // is stored again, under its first offset.
            let start = row_at(&self.events, qid, from)?.map_or(from, |(first, _)| first);
            let keys = self
                .events
                .range((qid, start)..(qid, to))
                .map_err(st)?
                .map(|row| row.map(|(k, _)| k.value().1).map_err(st))
                .collect::<Result<Vec<u64>>>()?;
            for first in keys {
                let (mut before, mut after, mut ids) = (Vec::new(), Vec::new(), Vec::new());
                if let Some(value) = self.events.remove((qid, first)).map_err(st)? {
                    for (offset, record) in (first..).zip(codec::records(value.value())) {
                        let record = record?;
                        if offset < from {
                            before.push(record.to_vec());
                        } else if offset >= to {
                            after.push(record.to_vec());
                        } else {
                            if let Some(id) = indexed_id(self.id_key, qid, offset, record)? {
                                ids.push(id.to_string());
                            }
                            removed += 1;
                        }
                    }
                }
                for id in &ids {
                    self.ids.remove((qid, id.as_str())).map_err(st)?;
                }
                self.put_value(qid, first, &before)?;
                self.put_value(qid, to, &after)?;
            }
        }
        Ok(removed)
    }

    /// Stores `records` (consecutive offsets from `first`) as one value, if there are any.
    fn put_value<R: AsRef<[u8]>>(&mut self, qid: u64, first: u64, records: &[R]) -> Result<()> {
        if let Some(value) = codec::encode_value(records) {
            self.events
                .insert((qid, first), value.as_ref())
                .map_err(st)?;
        }
        Ok(())
    }

    /// Stores events of `qid` at consecutive offsets from `first` as one value and indexes
    /// their ids (an empty id is derived from the offset: not indexed). Not logged itself:
    /// [`StoreWriter::append_event`] logs, and applying logged runs of appends calls it
    /// directly.
    fn put_block<I: AsRef<str>, R: AsRef<[u8]>>(
        &mut self,
        qid: u64,
        first: u64,
        ids: &[I],
        records: &[R],
    ) -> Result<()> {
        for (offset, id) in (first..).zip(ids) {
            let id = id.as_ref();
            if !id.is_empty() {
                self.ids.insert((qid, id), offset).map_err(st)?;
            }
        }
        self.put_value(qid, first, records)
    }

    /// Marks a deleted queue's events for removal by [`StoreWriter::purge_some`]. Queue ids
    /// are never reused, so the remaining events are unreachable meanwhile.
    fn mark_purge(&mut self, qid: u64) -> Result<()> {
        self.purge.insert(qid, ()).map_err(st)?;
        Ok(())
    }

    /// Removes `max` of `qid`'s events (or all that remain, if fewer), oldest first, with
    /// their index entries; whole values go, so a block may take a step past `max`. Clears the
    /// purge mark when none remain. Returns how many events were removed and whether the queue
    /// is now empty. Only for log records of earlier builds, whose purge steps were logged
    /// this way; purge steps are trims now, ended by [`StoreWriter::end_purge`].
    fn purge_some(&mut self, qid: u64, max: u64) -> Result<(u64, bool)> {
        let mut ids = Vec::new();
        let mut removed = 0u64;
        let mut done = false;
        {
            let mut extracted = self
                .events
                .extract_from_if((qid, 0)..=(qid, u64::MAX), |_, _| true)
                .map_err(st)?;
            while removed < max {
                let Some(row) = extracted.next() else {
                    done = true;
                    break;
                };
                let (k, v) = row.map_err(st)?;
                for (offset, record) in (k.value().1..).zip(codec::records(v.value())) {
                    if let Some(id) = indexed_id(self.id_key, qid, offset, record?)? {
                        ids.push(id.to_string());
                    }
                    removed += 1;
                }
            }
        }
        for id in &ids {
            self.ids.remove((qid, id.as_str())).map_err(st)?;
        }
        if done {
            // Index entries whose events were trimmed concurrently cannot exist (they are
            // removed together), but clear the range anyway so nothing of the queue remains.
            self.ids
                .retain_in((qid, "")..(qid + 1, ""), |_, _| false)
                .map_err(st)?;
            self.purge.remove(qid).map_err(st)?;
        }
        Ok((removed, done))
    }

    /// Forgets a deleted queue whose events are all removed: its purge mark, and any id-index
    /// entry left (none should be: entries go with their events).
    fn end_purge(&mut self, qid: u64) -> Result<()> {
        self.ids
            .retain_in((qid, "")..(qid + 1, ""), |_, _| false)
            .map_err(st)?;
        self.purge.remove(qid).map_err(st)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn without_a_reserve_the_log_grows_to_the_usual_limit() {
        assert_eq!(fold_limit(0, None), FOLD_BYTES);
        assert_eq!(fold_limit(0, Some(1 << 40)), FOLD_BYTES);
    }

    #[test]
    fn the_default_reserve_keeps_its_quarter() {
        // 64 MiB reserve: 16 MiB, whatever the free space.
        for free in [None, Some(0), Some(65 * MIB), Some(1 << 40)] {
            assert_eq!(fold_limit(64 * MIB, free), 16 * MIB, "{free:?}");
        }
        // A larger reserve: its quarter, up to the usual limit.
        assert_eq!(fold_limit(128 * MIB, Some(1 << 40)), 32 * MIB);
        assert_eq!(fold_limit(1 << 40, Some(1 << 41)), FOLD_BYTES);
    }

    #[test]
    fn a_small_reserve_allows_a_quarter_of_the_room_above_it() {
        // 8 MiB reserve (a tenth of an 80 MiB filesystem).
        assert_eq!(fold_limit(8 * MIB, Some(1 << 40)), 16 * MIB);
        assert_eq!(fold_limit(8 * MIB, Some(48 * MIB)), 10 * MIB);
        // Near the reserve, or the free space unknown: a quarter of the reserve.
        assert_eq!(fold_limit(8 * MIB, Some(12 * MIB)), 2 * MIB);
        assert_eq!(fold_limit(8 * MIB, Some(MIB)), 2 * MIB);
        assert_eq!(fold_limit(8 * MIB, None), 2 * MIB);
        // Never below 64 KiB.
        assert_eq!(fold_limit(4096, Some(4096)), 64 << 10);
    }
}
