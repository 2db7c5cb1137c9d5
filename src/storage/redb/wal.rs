//! The write-ahead log that makes group commits cheap to fsync.
//!
//! A durable redb commit rewrites every B-tree page on the path of each change plus its own
//! allocator and table-root pages, then fsyncs them: about twenty scattered page writes per
//! commit, measured at ~0.9 ms per commit on this kind of virtual disk against ~0.18 ms for a
//! 300-byte append + fdatasync. So each group commit is one record appended to this log,
//! fdatasync'd before anyone is acknowledged, and redb receives the changes later, many
//! batches at a time and non-durably; a periodic *fold* makes redb durable with one
//! `Durability::Immediate` commit and empties the log. The order of those steps, and why
//! readers never miss an event, is written once, in the parent module's docs (`The write
//! path`) and in [`super::pending`].
//!
//! # Recovery
//!
//! On open, redb comes back at its last durable commit, whose `applied_lsn` tells which log
//! records it already contains (every transaction that writes logged batches into redb records
//! the last one's sequence number). Every later record is re-applied in order, then the log is
//! folded. Records carry a CRC-32C of their content: a torn record at the tail (a crash during
//! the append, before its fsync, so never acknowledged) ends the replay.
//!
//! Record layout: `len: u32 LE | crc32: u32 LE | lsn: u64 LE | payload (len bytes)`, where the
//! payload is a sequence of postcard-encoded [`WalOp`]s.
//!
//! # Preallocation
//!
//! An fdatasync after an append that grows the file must also commit the file's new size to
//! the filesystem journal; after a write into blocks that already hold (synced) data it only
//! writes the data. On this project's virtual disk that is ~0.2 ms against ~0.1 ms per sync
//! (6 KB records), and the sync is what every durable acknowledgement waits for. So the log
//! keeps zeros written ahead of its end ([`Wal::preallocate`], in steps, each made durable by
//! the next sync, long before records reach it).
//!
//! Past the log's end the file holds only zeros: reading stops there as at a torn record
//! (a zero header is no intact record), open keeps an all-zero tail and cuts anything else
//! past the last intact record as before (a torn record, possibly followed by intact records
//! that were never synced and so never acknowledged), a failed append cuts the file back to
//! the log's end, and a fold truncates the file before preallocating again. So no
//! record that recovery must not replay can ever sit past the log's end, to be read later
//! as one following a newer record.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

pub use super::WAL_FILE;

const HEADER: usize = 16;

/// One physical change, replayed exactly as it was first applied.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) enum WalOp {
    SetNextQueueId(u64),
    PutQueue {
        tenant: String,
        task: String,
        #[serde(deserialize_with = "byte_buf::deserialize")]
        record: Vec<u8>,
    },
    RemoveQueue {
        tenant: String,
        task: String,
    },
    Append {
        qid: u64,
        offset: u64,
        event_id: String,
        #[serde(deserialize_with = "byte_buf::deserialize")]
        record: Vec<u8>,
    },
    Trim {
        qid: u64,
        from: u64,
        to: u64,
    },
    /// Remove `max` of the queue's events (oldest first, whole stored values, so a block may
    /// take it past `max`) and their index entries; forget the queue's purge mark once none
    /// remain.
    Purge {
        qid: u64,
        max: u64,
    },
    /// The queue was deleted: its events are to be purged in bounded steps.
    MarkPurge {
        qid: u64,
    },
    /// A workflow checkpoint stored at `seq`, with the removal of the workflow's checkpoints
    /// beyond the retention bound (format version 2; added last so older records decode).
    PutCheckpoint {
        tenant: String,
        workflow: String,
        seq: u64,
        checkpoint_id: String,
        #[serde(deserialize_with = "byte_buf::deserialize")]
        record: Vec<u8>,
    },
    /// A deleted queue's events are all removed (its purge steps are `Trim`s): forget its
    /// purge mark and any id-index entry left. Added last so older records decode.
    EndPurge {
        qid: u64,
    },
}

impl WalOp {
    /// The queue whose rows alone the op touches (its events, id-index entries and purge
    /// mark, all keyed by the queue's id), if any.
    pub(crate) fn queue(&self) -> Option<u64> {
        match self {
            WalOp::Append { qid, .. }
            | WalOp::Trim { qid, .. }
            | WalOp::Purge { qid, .. }
            | WalOp::MarkPurge { qid }
            | WalOp::EndPurge { qid } => Some(*qid),
            WalOp::SetNextQueueId(_)
            | WalOp::PutQueue { .. }
            | WalOp::RemoveQueue { .. }
            | WalOp::PutCheckpoint { .. } => None,
        }
    }
}

/// [`WalOp`] with borrowed fields, for encoding without copies. Same variants in the same
/// order, so it encodes to exactly the bytes a [`WalOp`] decodes from.
#[derive(Debug, Clone, Serialize)]
pub(crate) enum WalOpRef<'a> {
    SetNextQueueId(u64),
    PutQueue {
        tenant: &'a str,
        task: &'a str,
        #[serde(with = "serde_bytes_compat")]
        record: &'a [u8],
    },
    RemoveQueue {
        tenant: &'a str,
        task: &'a str,
    },
    Append {
        qid: u64,
        offset: u64,
        event_id: &'a str,
        #[serde(with = "serde_bytes_compat")]
        record: &'a [u8],
    },
    Trim {
        qid: u64,
        from: u64,
        to: u64,
    },
    /// Written by earlier builds only (purge steps are `Trim`s and `EndPurge` now); kept so
    /// that the encoding stays aligned with [`WalOp`] and its test covers the variant.
    #[cfg_attr(not(test), allow(dead_code))]
    Purge {
        qid: u64,
        max: u64,
    },
    MarkPurge {
        qid: u64,
    },
    PutCheckpoint {
        tenant: &'a str,
        workflow: &'a str,
        seq: u64,
        checkpoint_id: &'a str,
        #[serde(with = "serde_bytes_compat")]
        record: &'a [u8],
    },
    EndPurge {
        qid: u64,
    },
}

/// Serialises a byte slice the way `Vec<u8>` (de)serialises in postcard: a varint length and
/// the bytes (postcard encodes a byte string and a sequence of `u8` identically), in one call
/// rather than one per byte.
mod serde_bytes_compat {
    use serde::Serializer;

    pub(super) fn serialize<S: Serializer>(bytes: &&[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(bytes)
    }
}

/// Deserialises a `Vec<u8>` as a byte string (one copy) rather than element by element; the
/// encoding is the same in postcard.
mod byte_buf {
    use serde::Deserializer;
    use serde::de::{SeqAccess, Visitor};

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct Bytes;
        impl<'de> Visitor<'de> for Bytes {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 16));
                while let Some(b) = seq.next_element()? {
                    out.push(b);
                }
                Ok(out)
            }
        }
        d.deserialize_byte_buf(Bytes)
    }
}

/// Encodes one op onto the end of a payload buffer.
pub(crate) fn encode_op(op: &WalOpRef<'_>, payload: &mut Vec<u8>) -> Result<()> {
    let buf = std::mem::take(payload);
    *payload = postcard::to_extend(op, buf).map_err(Error::storage)?;
    Ok(())
}

/// Decodes every op of a payload.
pub(crate) fn decode_ops(mut payload: &[u8]) -> Result<Vec<WalOp>> {
    let mut ops = Vec::new();
    while !payload.is_empty() {
        let (op, rest) = postcard::take_from_bytes::<WalOp>(payload)
            .map_err(|e| Error::storage(format!("corrupt log record: {e}")))?;
        ops.push(op);
        payload = rest;
    }
    Ok(ops)
}

/// Injected I/O faults (feature `failpoints`): each counter is the number of operations that
/// still succeed; a negative value means never fail.
#[derive(Debug)]
pub struct Faults {
    appends_left: std::sync::atomic::AtomicI64,
    syncs_left: std::sync::atomic::AtomicI64,
    /// Checkpoint saves: fail between writing the checkpoint and appending its events.
    checkpoint_saves_left: std::sync::atomic::AtomicI64,
    /// Batches the writer thread processes before it panics (a bug, simulated).
    writer_batches_left: std::sync::atomic::AtomicI64,
    /// Simulated power loss shared with the redb backend.
    #[cfg(feature = "failpoints")]
    power: Option<std::sync::Arc<super::sim::PowerLoss>>,
}

impl Default for Faults {
    fn default() -> Self {
        Self {
            appends_left: std::sync::atomic::AtomicI64::new(-1),
            syncs_left: std::sync::atomic::AtomicI64::new(-1),
            checkpoint_saves_left: std::sync::atomic::AtomicI64::new(-1),
            writer_batches_left: std::sync::atomic::AtomicI64::new(-1),
            #[cfg(feature = "failpoints")]
            power: None,
        }
    }
}

#[cfg_attr(not(feature = "failpoints"), allow(dead_code))]
impl Faults {
    /// Log appends fail after `n` more succeed.
    pub fn fail_appends_after(&self, n: i64) {
        self.appends_left
            .store(n, std::sync::atomic::Ordering::SeqCst);
    }

    /// Log fsyncs fail after `n` more succeed.
    pub fn fail_syncs_after(&self, n: i64) {
        self.syncs_left
            .store(n, std::sync::atomic::Ordering::SeqCst);
    }

    /// Checkpoint saves fail after `n` more succeed: the failing save has written its
    /// checkpoint into the batch's transaction but not yet appended its events.
    pub fn fail_checkpoint_saves_after(&self, n: i64) {
        self.checkpoint_saves_left
            .store(n, std::sync::atomic::Ordering::SeqCst);
    }

    /// The writer thread panics after `n` more batches (to test how a bug surfaces).
    pub fn panic_writer_after(&self, n: i64) {
        self.writer_batches_left
            .store(n, std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether the writer thread is to panic now.
    pub(crate) fn writer_panic(&self) -> bool {
        Self::hit(&self.writer_batches_left, "writer").is_err()
    }

    /// The failpoint between a checkpoint's write and its events' append.
    pub(crate) fn checkpoint_save(&self) -> Result<()> {
        Self::hit(&self.checkpoint_saves_left, "checkpoint save")
            .map_err(|e| Error::storage(format!("saving a checkpoint: {e}")))
    }

    fn hit(counter: &std::sync::atomic::AtomicI64, what: &str) -> std::io::Result<()> {
        if !cfg!(feature = "failpoints") {
            return Ok(());
        }
        let left = counter.load(std::sync::atomic::Ordering::SeqCst);
        if left < 0 {
            return Ok(());
        }
        if left == 0 {
            return Err(std::io::Error::other(format!("injected {what} failure")));
        }
        counter.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    /// A write or resize of the log: fails once the simulated power is off.
    fn power_check(&self) -> std::io::Result<()> {
        #[cfg(feature = "failpoints")]
        if let Some(p) = &self.power {
            return p.check();
        }
        Ok(())
    }

    /// An fdatasync of the log. Under simulated power loss it is a sync point of the machine
    /// (no real fsync: the simulated disk is the file); otherwise `sync` runs.
    /// `end` is where the log ends (the file may extend past it: see the module docs).
    fn power_sync(
        &self,
        end: &AtomicU64,
        sync: impl FnOnce() -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        #[cfg(feature = "failpoints")]
        if let Some(p) = &self.power {
            return p.sync_log(|| Ok(end.load(Ordering::Acquire)));
        }
        let _ = end;
        sync()
    }

    /// The log was truncated to `len`.
    fn power_truncated(&self, len: u64) {
        #[cfg(feature = "failpoints")]
        if let Some(p) = &self.power {
            p.log_truncated(len);
        }
        let _ = len;
    }
}

/// fsyncs the log from the thread that acknowledges commits. An fdatasync started after a
/// record's `write` returned makes that record durable.
#[derive(Debug)]
pub(crate) struct WalSyncer {
    file: File,
    path: PathBuf,
    faults: std::sync::Arc<Faults>,
    /// Where the log ends.
    end: Arc<AtomicU64>,
}

impl WalSyncer {
    /// fdatasync the log file.
    pub(crate) fn sync(&self) -> Result<()> {
        Faults::hit(&self.faults.syncs_left, "fsync")
            .and_then(|()| self.faults.power_sync(&self.end, || self.file.sync_data()))
            .map_err(|e| io("syncing", &self.path, e))
    }
}

/// How a log append failed.
#[derive(Debug)]
pub(crate) enum AppendError {
    /// Nothing of the record remains in the log: the log can take the next append.
    RolledBack(Error),
    /// A partial record may remain: the log must not be appended to until it is reopened.
    Broken(Error),
}

/// An intact record read back on open: its LSN and payload.
pub(crate) type LoggedRecord = (u64, Vec<u8>);

/// Every intact record at the start of `bytes`, and where they end.
fn parse(bytes: &[u8]) -> (Vec<LoggedRecord>, usize) {
    let mut records = Vec::new();
    let mut at = 0usize;
    while bytes.len() - at >= HEADER {
        let h = &bytes[at..at + HEADER];
        let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
        let crc = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
        let mut lsn_bytes = [0u8; 8];
        lsn_bytes.copy_from_slice(&h[8..16]);
        let end = at + HEADER + len;
        if end > bytes.len() {
            break;
        }
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&lsn_bytes);
        hasher.update(&bytes[at + HEADER..end]);
        if hasher.finalize() != crc {
            break;
        }
        records.push((
            u64::from_le_bytes(lsn_bytes),
            bytes[at + HEADER..end].to_vec(),
        ));
        at = end;
    }
    (records, at)
}

/// Zeros are kept written at least this far past the log's end.
const AHEAD: u64 = 1 << 20;

/// Zeros are written this much at a time. The first sync after a step writes it out (a few
/// milliseconds once per megabyte of log); larger steps measured no faster at 64 producers
/// and hold more of a nearly full disk.
const STEP: u64 = 1 << 20;

/// Written by preallocation, a piece at a time.
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

/// The open log file.
#[derive(Debug)]
pub(crate) struct Wal {
    file: File,
    path: PathBuf,
    /// Where the log ends: the next record goes here.
    len: u64,
    /// The file's length: past `len` it holds zeros.
    cap: u64,
    /// `len`, for the syncer (the simulated disk counts what a sync made durable).
    end: Arc<AtomicU64>,
    /// Preallocation failed (a full disk): not tried again until the next reset, so that a
    /// nearly full disk does not cost every append a failed write of zeros.
    prealloc_failed: bool,
    buf: Vec<u8>,
    pub(crate) faults: std::sync::Arc<Faults>,
}

fn io(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::Storage(crate::error::StorageError::io(
        format_args!("{what} {}", path.display()),
        e,
    ))
}

impl Wal {
    /// Opens the log and returns it with every intact record (lsn, payload), in order. A torn
    /// or corrupt tail is cut off.
    pub(crate) fn open(dir: &Path) -> Result<(Self, Vec<LoggedRecord>)> {
        let path = dir.join(WAL_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| io("opening", &path, e))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .map_err(|e| io("reading", &path, e))?;
        let (records, at) = parse(&bytes);
        // A tail of zeros is preallocated room; anything else past the last record is cut.
        let cap = if bytes[at..].iter().all(|&b| b == 0) {
            bytes.len()
        } else {
            tracing::warn!(
                valid = at,
                total = bytes.len(),
                "cutting a torn record off the end of the log (it was never acknowledged)"
            );
            file.set_len(at as u64)
                .map_err(|e| io("truncating", &path, e))?;
            at
        };
        file.seek(SeekFrom::Start(at as u64))
            .map_err(|e| io("seeking", &path, e))?;
        Ok((
            Self {
                file,
                path,
                len: at as u64,
                cap: cap as u64,
                end: Arc::new(AtomicU64::new(at as u64)),
                prealloc_failed: false,
                buf: Vec::new(),
                faults: Default::default(),
            },
            records,
        ))
    }

    /// Appends one record (not yet synced).
    ///
    /// # Errors
    ///
    /// [`AppendError::RolledBack`] when the write failed and the log was cut back to its
    /// previous end (nothing of the record remains), [`AppendError::Broken`] when that cut
    /// failed as well.
    pub(crate) fn append(&mut self, lsn: u64, payload: &[u8]) -> Result<(), AppendError> {
        let len = u32::try_from(payload.len())
            .map_err(|_| AppendError::RolledBack(Error::storage("log record larger than 4 GiB")))?;
        let lsn_bytes = lsn.to_le_bytes();
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&lsn_bytes);
        hasher.update(payload);
        self.buf.clear();
        self.buf.extend_from_slice(&len.to_le_bytes());
        self.buf.extend_from_slice(&hasher.finalize().to_le_bytes());
        self.buf.extend_from_slice(&lsn_bytes);
        self.buf.extend_from_slice(payload);
        let written = Faults::hit(&self.faults.appends_left, "log write")
            .and_then(|()| self.faults.power_check())
            .and_then(|()| self.file.write_all(&self.buf));
        if let Err(e) = written {
            // Leave no partial record behind for the next append to follow. If that fails
            // too, the log's end is unknown and the store must stop writing.
            let err = if e.kind() == std::io::ErrorKind::StorageFull {
                tracing::warn!(path = %self.path.display(), "log write refused: no space left on the device");
                Error::DiskFull(
                    "the data volume is full; delete queues or free space on the disk".into(),
                )
            } else {
                io("appending to", &self.path, e)
            };
            let rolled_back = self
                .faults
                .power_check()
                .and_then(|()| self.file.set_len(self.len))
                .and_then(|()| self.file.seek(SeekFrom::Start(self.len)));
            if rolled_back.is_ok() {
                self.cap = self.len;
            }
            return Err(match rolled_back {
                Ok(_) => AppendError::RolledBack(err),
                Err(e2) => AppendError::Broken(Error::storage(format!(
                    "{err}; then cutting the partial record off failed: {e2}"
                ))),
            });
        }
        self.len += self.buf.len() as u64;
        self.cap = self.cap.max(self.len);
        self.end.store(self.len, Ordering::Release);
        self.preallocate();
        Ok(())
    }

    /// Keeps at least [`AHEAD`] bytes of zeros written past the log's end, so that records
    /// overwrite blocks the file already has (see the module docs). Best effort: on a failure
    /// (a full disk) the partial step is cut off again and the log simply grows by appends
    /// until the next reset. The zeros reach the disk with the next sync of the log.
    fn preallocate(&mut self) {
        while !self.prealloc_failed && self.cap < self.len + AHEAD {
            let from = self.cap;
            let mut at = from;
            let mut written = Ok(());
            while at < from + STEP && written.is_ok() {
                written = self
                    .faults
                    .power_check()
                    .and_then(|()| self.file.write_all_at(&ZEROS, at));
                at += ZEROS.len() as u64;
            }
            if let Err(e) = written {
                tracing::debug!(error = %e, "cannot preallocate the log");
                let _ = self
                    .faults
                    .power_check()
                    .and_then(|()| self.file.set_len(from));
                self.prealloc_failed = true;
                return;
            }
            self.cap = at;
        }
    }

    /// fdatasync: every appended record is durable when this returns.
    #[cfg(test)]
    pub(crate) fn sync(&mut self) -> Result<()> {
        self.file
            .sync_data()
            .map_err(|e| io("syncing", &self.path, e))
    }

    /// A second handle on the same file for fsyncing from another thread.
    pub(crate) fn syncer(&self) -> Result<WalSyncer> {
        Ok(WalSyncer {
            file: self
                .file
                .try_clone()
                .map_err(|e| io("duplicating the handle of", &self.path, e))?,
            path: self.path.clone(),
            faults: self.faults.clone(),
            end: self.end.clone(),
        })
    }

    /// Empties the log (after a fold made its records redundant) and writes
    /// zeros ahead again. An empty log (nothing logged since the last reset or open) is all
    /// zeros already and keeps them.
    pub(crate) fn reset(&mut self) -> Result<()> {
        if self.len > 0 {
            self.faults
                .power_check()
                .and_then(|()| self.file.set_len(0))
                .map_err(|e| io("truncating", &self.path, e))?;
            self.cap = 0;
        }
        self.faults.power_truncated(0);
        self.len = 0;
        self.end.store(0, Ordering::Release);
        self.file
            .seek(SeekFrom::Start(0))
            .map_err(|e| io("seeking", &self.path, e))?;
        self.prealloc_failed = false;
        self.preallocate();
        self.faults
            .power_sync(&self.end, || self.file.sync_all())
            .map_err(|e| io("syncing", &self.path, e))?;
        Ok(())
    }

    /// Shares a simulated machine with the redb backend (before any syncer is made).
    #[cfg(feature = "failpoints")]
    pub(crate) fn simulate_power(&mut self, power: std::sync::Arc<super::sim::PowerLoss>) {
        self.faults = std::sync::Arc::new(Faults {
            power: Some(power),
            ..Faults::default()
        });
    }

    /// Current size in bytes.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn borrowed_ops_encode_as_owned_ops_decode() {
        let ops = [
            (WalOpRef::SetNextQueueId(7), WalOp::SetNextQueueId(7)),
            (
                WalOpRef::PutQueue {
                    tenant: "t",
                    task: "k",
                    record: &[1, 2, 255],
                },
                WalOp::PutQueue {
                    tenant: "t".into(),
                    task: "k".into(),
                    record: vec![1, 2, 255],
                },
            ),
            (
                WalOpRef::RemoveQueue {
                    tenant: "t",
                    task: "k",
                },
                WalOp::RemoveQueue {
                    tenant: "t".into(),
                    task: "k".into(),
                },
            ),
            (
                WalOpRef::Append {
                    qid: 3,
                    offset: 9,
                    event_id: "e",
                    record: &[0; 300],
                },
                WalOp::Append {
                    qid: 3,
                    offset: 9,
                    event_id: "e".into(),
                    record: vec![0; 300],
                },
            ),
            (
                WalOpRef::Trim {
                    qid: 1,
                    from: 2,
                    to: 3,
                },
                WalOp::Trim {
                    qid: 1,
                    from: 2,
                    to: 3,
                },
            ),
            (
                WalOpRef::Purge { qid: 4, max: 10 },
                WalOp::Purge { qid: 4, max: 10 },
            ),
            (WalOpRef::MarkPurge { qid: 5 }, WalOp::MarkPurge { qid: 5 }),
            (WalOpRef::EndPurge { qid: 6 }, WalOp::EndPurge { qid: 6 }),
        ];
        let mut payload = Vec::new();
        for (r, _) in &ops {
            encode_op(r, &mut payload).unwrap();
        }
        let owned: Vec<WalOp> = ops.into_iter().map(|(_, o)| o).collect();
        assert_eq!(decode_ops(&payload).unwrap(), owned);
    }

    fn op_ref(n: u64, record: &[u8], id: &str) -> Vec<u8> {
        let mut payload = Vec::new();
        encode_op(
            &WalOpRef::Append {
                qid: 1,
                offset: n,
                event_id: id,
                record,
            },
            &mut payload,
        )
        .unwrap();
        payload
    }

    fn op(n: u64) -> WalOp {
        WalOp::Append {
            qid: 1,
            offset: n,
            event_id: format!("evt_{n}"),
            record: vec![n as u8; 40],
        }
    }

    #[test]
    fn records_round_trip_and_a_torn_tail_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let len = {
            let (mut wal, recs) = Wal::open(dir.path()).unwrap();
            assert!(recs.is_empty());
            for lsn in 1..=3 {
                let mut payload = op_ref(lsn, &[lsn as u8; 40], &format!("evt_{lsn}"));
                encode_op(
                    &WalOpRef::Trim {
                        qid: 1,
                        from: 0,
                        to: lsn,
                    },
                    &mut payload,
                )
                .unwrap();
                wal.append(lsn, &payload).unwrap();
            }
            wal.sync().unwrap();
            wal.len()
        };
        // Tear the last record.
        let path = dir.path().join(WAL_FILE);
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(len - 3).unwrap();
        let (mut wal, recs) = Wal::open(dir.path()).unwrap();
        assert_eq!(recs.iter().map(|r| r.0).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(
            decode_ops(&recs[1].1).unwrap(),
            vec![
                op(2),
                WalOp::Trim {
                    qid: 1,
                    from: 0,
                    to: 2
                }
            ]
        );
        // Appending after the cut continues cleanly.
        let payload = op_ref(9, &[9; 40], "evt_9");
        wal.append(3, &payload).unwrap();
        drop(wal);
        let (_, recs) = Wal::open(dir.path()).unwrap();
        assert_eq!(recs.iter().map(|r| r.0).collect::<Vec<_>>(), vec![1, 2, 3]);
    }

    #[test]
    fn a_flipped_byte_ends_the_replay_there() {
        let dir = tempfile::tempdir().unwrap();
        let len = {
            let (mut wal, _) = Wal::open(dir.path()).unwrap();
            for lsn in 1..=3 {
                let payload = op_ref(lsn, &[lsn as u8; 40], &format!("evt_{lsn}"));
                wal.append(lsn, &payload).unwrap();
            }
            wal.len() as usize
        };
        let path = dir.path().join(WAL_FILE);
        let mut bytes = std::fs::read(&path).unwrap();
        let second = len / 3 + 20;
        bytes[second] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let (_, recs) = Wal::open(dir.path()).unwrap();
        assert_eq!(recs.len(), 1);
        // Everything past the first record is cut: the intact third record too, so that it can
        // never be read as a later record.
        assert_eq!(
            std::fs::metadata(&path).unwrap().len() as usize,
            len / 3,
            "the file is cut after the last intact record"
        );
    }

    /// Records of equal size, so that a record written after a reset lands exactly over an old
    /// one and the next old record starts where it ends.
    fn same_size(lsn: u64) -> Vec<u8> {
        op_ref(lsn, &[lsn as u8; 40], &format!("evt_{:04}", lsn % 10_000))
    }

    #[test]
    fn zeros_are_kept_written_ahead_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(WAL_FILE);
        {
            let (mut wal, _) = Wal::open(dir.path()).unwrap();
            for lsn in 1..=3 {
                wal.append(lsn, &same_size(lsn)).unwrap();
            }
            let file_len = std::fs::metadata(&path).unwrap().len();
            assert!(
                file_len >= wal.len() + AHEAD,
                "{file_len} for {}",
                wal.len()
            );
        }
        let before = std::fs::metadata(&path).unwrap().len();
        let (mut wal, recs) = Wal::open(dir.path()).unwrap();
        assert_eq!(recs.iter().map(|r| r.0).collect::<Vec<_>>(), vec![1, 2, 3]);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), before);
        // The next record follows the last one, not the end of the file.
        wal.append(4, &same_size(4)).unwrap();
        drop(wal);
        let (_, recs) = Wal::open(dir.path()).unwrap();
        assert_eq!(
            recs.iter().map(|r| r.0).collect::<Vec<_>>(),
            vec![1, 2, 3, 4]
        );
    }

    #[test]
    fn a_reset_leaves_no_record_past_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(WAL_FILE);
        {
            let (mut wal, _) = Wal::open(dir.path()).unwrap();
            for lsn in 1..=5 {
                wal.append(lsn, &same_size(lsn)).unwrap();
            }
            // A fold applied 1..=5; record 6 goes to offset 0.
            wal.reset().unwrap();
            wal.append(6, &same_size(6)).unwrap();
        }
        // Had the file kept records 2..=5 right after 6, a recovery would read them as
        // records that follow 6.
        let (_, recs) = Wal::open(dir.path()).unwrap();
        assert_eq!(recs.iter().map(|r| r.0).collect::<Vec<_>>(), vec![6]);
        let bytes = std::fs::read(&path).unwrap();
        let first = same_size(6).len() + HEADER;
        assert!(bytes[first..].iter().all(|&b| b == 0));
        assert!(bytes.len() as u64 >= first as u64 + AHEAD);
    }
}
