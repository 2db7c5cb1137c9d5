//! [`LogReader`]: a read-only open of a data directory, for offline tools (`eventqueue dump`,
//! `eventqueue inspect`) and applications that read a stopped server's events.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::engine::{QueueState, RecordedEvent};
use crate::error::{Error, Result};
use crate::ids::{TaskId, TenantId};
use crate::queue::QueueInfo;
use crate::storage::Storage;
use crate::storage::redb::{self, Store};

/// JSON bytes of one [`LogReader::read`], at most (a first larger event is read alone): a
/// step of a dump or an inspection, made of many events or of one large one.
const READ_BYTES: usize = 1 << 20;

/// A data directory opened for reading only: its queues and their retained events, with no
/// writer, no expiry and no live subscriptions. Blocking: use it from a plain thread or
/// `spawn_blocking`.
///
/// Opening takes the database's lock, as a server does, so it fails with [`Error::Locked`]
/// while a server holds the directory; and like a server's open it first recovers a log
/// left by an unclean stop. After that nothing is written.
pub struct LogReader {
    store: Store,
    dir: PathBuf,
    queues: HashMap<(TenantId, TaskId), Arc<QueueState>>,
}

impl std::fmt::Debug for LogReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogReader").field("dir", &self.dir).finish()
    }
}

impl LogReader {
    /// The on-disk format version this build reads and writes.
    pub const FORMAT_VERSION: u32 = redb::codec::FORMAT_VERSION;

    /// Opens `data_dir` for reading.
    ///
    /// # Errors
    ///
    /// [`Error::Locked`] while a server holds the database; [`Error::UnsupportedFormat`] for
    /// a file of another format version; [`Error::Storage`] for I/O errors (a directory
    /// without a database is created empty, as a server would: check first if that matters).
    pub fn open(data_dir: &Path) -> Result<Self> {
        let (store, recovered) = Store::open(data_dir, &redb::Options::offline())?;
        let mut queues = HashMap::with_capacity(recovered.queues.len());
        for lq in recovered.queues {
            let (tenant, task) = (TenantId::new(&lq.tenant)?, TaskId::new(&lq.task)?);
            let state = QueueState::from_record(tenant.clone(), task.clone(), &lq.record);
            queues.insert((tenant, task), Arc::new(state));
        }
        Ok(LogReader {
            store,
            dir: data_dir.to_path_buf(),
            queues,
        })
    }

    /// Every queue, sorted by tenant then task.
    pub fn queues(&self) -> Vec<QueueInfo> {
        let mut infos: Vec<QueueInfo> = self.queues.values().map(|q| QueueInfo::of(q)).collect();
        infos.sort_by(|a, b| (&a.tenant_id, &a.task_id).cmp(&(&b.tenant_id, &b.task_id)));
        infos
    }

    /// Up to `limit` retained events of the queue from offset `from` on, in offset order
    /// (offsets below the queue's first retained one are skipped; empty past its end). A
    /// read may return fewer to bound its size: read on from the last offset + 1.
    ///
    /// # Errors
    ///
    /// [`Error::QueueNotFound`]; storage errors.
    pub fn read(
        &self,
        tenant: &TenantId,
        task: &TaskId,
        from: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>> {
        let q = self
            .queues
            .get(&(tenant.clone(), task.clone()))
            .ok_or_else(|| Error::QueueNotFound {
                task_id: task.to_string(),
            })?;
        let (first, next) = q.with_view(|v| (v.first_offset, v.next_offset));
        self.store
            .read_range(q.id(), from.max(first), next, limit, READ_BYTES)?
            .into_iter()
            .map(RecordedEvent::from_stored)
            .collect()
    }

    /// Bytes of the database file and of the log, as they are now.
    pub fn file_sizes(&self) -> (u64, u64) {
        let size = |name: &str| {
            std::fs::metadata(self.dir.join(name))
                .map(|m| m.len())
                .unwrap_or(0)
        };
        (size(redb::DB_FILE), size(redb::WAL_FILE))
    }

    /// Releases the database (also done on drop).
    pub fn close(self) {
        Storage::close(&self.store);
    }
}

impl Drop for LogReader {
    fn drop(&mut self) {
        Storage::close(&self.store);
    }
}
