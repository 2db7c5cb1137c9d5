//! The free-space reserve of the data directory.
//!
//! redb does not survive running out of space in the middle of a write: a failed page write
//! or file extension latches it into refusing all further work until it is reopened. And
//! deleting a queue frees pages inside the database file, not on the filesystem. So the
//! writer keeps a reserve: while the filesystem has less than the reserve free, commands that
//! add data (appends, queue creation, checkpoint saves) are refused with
//! [`Error::DiskFull`], and the writes that free space — deletions, expiry, folds of the
//! log into redb, and the compaction that follows a deletion on a nearly full disk
//! ([`super::Store::compact_in_place`]) — always find room.
//!
//! The reserve holds against eventqueue's own writes. Another process that fills the
//! filesystem to the last byte can still make a fold fail; the log then stays the
//! durable copy and a restart (with space freed) recovers it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::Error;

/// The automatic reserve: this much, or a tenth of the filesystem if that is less.
pub(crate) const AUTO_RESERVE_MAX: u64 = 64 << 20;

/// While at least this many times the reserve is free, the filesystem is asked again at most
/// every [`RECHECK`]; closer to the reserve, before every batch that adds data.
const ROOMY: u64 = 4;
const RECHECK: Duration = Duration::from_millis(50);

/// Sizes of a filesystem, bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FsSpace {
    /// Free to unprivileged users (what a write can use).
    pub available: u64,
    /// Size of the filesystem.
    pub total: u64,
}

/// Asks the filesystem holding `path`.
pub(crate) fn fs_space(path: &Path) -> std::io::Result<FsSpace> {
    let s = rustix::fs::statvfs(path)?;
    Ok(FsSpace {
        available: s.f_bavail.saturating_mul(s.f_frsize),
        total: s.f_blocks.saturating_mul(s.f_frsize),
    })
}

/// The reserve for `configured` ([`crate::Config::disk_reserve`]) on a filesystem of
/// `total` bytes.
pub(crate) fn resolve_reserve(configured: Option<u64>, total: u64) -> u64 {
    configured.unwrap_or(AUTO_RESERVE_MAX.min(total / 10))
}

type Probe = Box<dyn Fn() -> std::io::Result<FsSpace> + Send>;

/// The writer's view of the free space (see the module docs).
pub(crate) struct SpaceCheck {
    reserve: u64,
    probe: Probe,
    /// When the filesystem was last asked, and what it said.
    last: Option<(Instant, u64)>,
    low: bool,
}

impl SpaceCheck {
    /// A check of the filesystem holding `dir`.
    pub(crate) fn on_dir(dir: PathBuf, configured: Option<u64>) -> Self {
        let total = match fs_space(&dir) {
            Ok(s) => s.total,
            Err(e) => {
                tracing::warn!(error = %e, dir = %dir.display(), "cannot query the free space of the data directory");
                u64::MAX
            }
        };
        let reserve = resolve_reserve(configured, total);
        Self::with_probe(reserve, Box::new(move || fs_space(&dir)))
    }

    pub(crate) fn with_probe(reserve: u64, probe: Probe) -> Self {
        Self {
            reserve,
            probe,
            last: None,
            low: false,
        }
    }

    /// The reserve in bytes (0: no check).
    pub(crate) fn reserve(&self) -> u64 {
        self.reserve
    }

    /// Free bytes as of now (asking the filesystem unless it was asked within [`RECHECK`]
    /// and had plenty of room then). `None` when the filesystem cannot be asked: then the
    /// check does not refuse anything, and only a failing write reports a full disk.
    pub(crate) fn free(&mut self, now: Instant) -> Option<u64> {
        if let Some((at, free)) = self.last
            && free / ROOMY >= self.reserve
            && now.saturating_duration_since(at) < RECHECK
        {
            return Some(free);
        }
        match (self.probe)() {
            Ok(s) => {
                self.last = Some((now, s.available));
                Some(s.available)
            }
            Err(e) => {
                tracing::debug!(error = %e, "cannot query the free space of the data directory");
                self.last = None;
                None
            }
        }
    }

    /// Whether a command that adds data may run now.
    ///
    /// # Errors
    ///
    /// [`Error::DiskFull`] while less than the reserve is free.
    pub(crate) fn admit(&mut self, now: Instant) -> Result<(), Error> {
        if self.reserve == 0 {
            return Ok(());
        }
        let free = self.free(now);
        let low = free.is_some_and(|f| f < self.reserve);
        if low != self.low {
            self.low = low;
            if low {
                tracing::warn!(
                    free = free.unwrap_or(0),
                    reserve = self.reserve,
                    "the data directory's filesystem is nearly full: refusing new events until space is freed"
                );
            } else {
                tracing::info!(free = ?free, "free space is back above the reserve: taking new events again");
            }
        }
        if low {
            return Err(Error::DiskFull(
                format!(
                    "less than the reserve of {} MiB is free on the data volume; \
                     delete queues or free space on the disk",
                    self.reserve.div_ceil(1 << 20)
                )
                .into(),
            ));
        }
        Ok(())
    }

    /// Whether the free space was below `times` × the reserve at the last look (asking again).
    pub(crate) fn below(&mut self, times: u64, now: Instant) -> bool {
        self.reserve > 0
            && self
                .free(now)
                .is_some_and(|f| f < self.reserve.saturating_mul(times))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

    fn fake(reserve: u64) -> (SpaceCheck, Arc<AtomicU64>, Arc<AtomicUsize>) {
        let free = Arc::new(AtomicU64::new(100 * reserve));
        let asked = Arc::new(AtomicUsize::new(0));
        let (f, a) = (free.clone(), asked.clone());
        let check = SpaceCheck::with_probe(
            reserve,
            Box::new(move || {
                a.fetch_add(1, Ordering::SeqCst);
                Ok(FsSpace {
                    available: f.load(Ordering::SeqCst),
                    total: u64::MAX,
                })
            }),
        );
        (check, free, asked)
    }

    #[test]
    fn refuses_below_the_reserve_and_admits_again_once_space_is_back() {
        let (mut check, free, _) = fake(1000);
        let t0 = Instant::now();
        assert!(check.admit(t0).is_ok());
        // Near the reserve the filesystem is asked every time, so the drop is seen at once.
        free.store(3000, Ordering::SeqCst);
        let t1 = t0 + RECHECK;
        assert!(check.admit(t1).is_ok());
        free.store(999, Ordering::SeqCst);
        match check.admit(t1) {
            Err(Error::DiskFull(msg)) => assert!(msg.contains("reserve"), "{msg}"),
            other => panic!("{other:?}"),
        }
        free.store(1000, Ordering::SeqCst);
        assert!(check.admit(t1).is_ok());
    }

    #[test]
    fn a_roomy_filesystem_is_asked_at_most_every_recheck_interval() {
        let (mut check, free, asked) = fake(1000);
        let t0 = Instant::now();
        for _ in 0..10 {
            assert!(check.admit(t0).is_ok());
        }
        assert_eq!(asked.load(Ordering::SeqCst), 1);
        // A sudden drop is seen at the next interval.
        free.store(10, Ordering::SeqCst);
        assert!(check.admit(t0 + RECHECK / 2).is_ok());
        assert!(check.admit(t0 + RECHECK).is_err());
        assert_eq!(asked.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn a_zero_reserve_never_refuses_nor_asks() {
        let (mut check, free, asked) = fake(0);
        free.store(0, Ordering::SeqCst);
        assert!(check.admit(Instant::now()).is_ok());
        assert!(!check.below(2, Instant::now()));
        assert_eq!(asked.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn the_automatic_reserve_is_64_mib_or_a_tenth_of_a_small_filesystem() {
        assert_eq!(resolve_reserve(None, 10 << 30), 64 << 20);
        assert_eq!(resolve_reserve(None, 100 << 20), 10 << 20);
        assert_eq!(resolve_reserve(Some(5), 10 << 30), 5);
        assert_eq!(resolve_reserve(Some(0), 10 << 30), 0);
    }

    #[test]
    fn asks_the_real_filesystem() {
        let dir = tempfile::tempdir().unwrap();
        let s = fs_space(dir.path()).unwrap();
        assert!(s.total > 0 && s.available <= s.total, "{s:?}");
    }
}
