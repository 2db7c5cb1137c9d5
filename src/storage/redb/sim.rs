//! Simulated power loss for the reliability tests (feature `failpoints`).
//!
//! A [`PowerLoss`] is one simulated machine: it counts every sync of the data directory — the
//! redb file's `sync_data` and the log's fdatasyncs alike — and "cuts the power" at the N-th.
//! That sync never completes, and every later write, resize or sync of either file fails, as
//! if the process had died there. What the disk holds afterwards is exactly what the syncs
//! before the cut made durable:
//!
//! - the redb file is opened through [`SimBackend`], which keeps every write since the last
//!   completed sync in a volatile overlay and applies it to the file only when a sync
//!   completes; at the cut the overlay is simply never applied;
//! - the log records the length each completed fdatasync made durable; after the store is
//!   shut down, [`PowerLoss::settle`] cuts the log file back to that length plus, optionally,
//!   a prefix of what followed (a torn tail: appended data may reach the disk without a sync).
//!
//! Reopening the directory with the ordinary file backend then recovers from that image.
//! Truncating the log (after a fold) counts as durable at once: the records it drops are
//! already durable in redb, so recovery comes to the same state either way.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

const PAGE: u64 = 4096;

fn lost() -> std::io::Error {
    std::io::Error::other("simulated power loss: the machine is off")
}

#[derive(Debug, Default)]
struct PowerState {
    syncs: u64,
    cut_at: Option<u64>,
    cut: bool,
    /// Length of the log file that completed fdatasyncs made durable.
    log_durable: u64,
}

/// A simulated machine whose power is cut at the N-th sync of its data directory.
#[derive(Debug, Default)]
pub struct PowerLoss {
    state: Mutex<PowerState>,
}

impl PowerLoss {
    /// A machine whose power stays on until [`PowerLoss::cut_at_sync`] or
    /// [`PowerLoss::cut_now`].
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn state(&self) -> std::sync::MutexGuard<'_, PowerState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Cuts the power at the `n`-th sync (1-based, counted from the start): that sync does
    /// not complete.
    pub fn cut_at_sync(&self, n: u64) {
        self.state().cut_at = Some(n);
    }

    /// Cuts the power now.
    pub fn cut_now(&self) {
        self.state().cut = true;
    }

    /// Syncs attempted so far, the one at the cut included.
    pub fn syncs(&self) -> u64 {
        self.state().syncs
    }

    /// Whether the power is off.
    pub fn is_cut(&self) -> bool {
        self.state().cut
    }

    /// Leaves the log in `data_dir` as the disk holds it after the cut: its durable length
    /// plus up to `torn_tail` bytes of what was appended after the last completed sync. Call
    /// after the store was shut down (its threads no longer touch the file).
    ///
    /// # Errors
    ///
    /// I/O errors of the real file.
    pub fn settle(&self, data_dir: &Path, torn_tail: u64) -> std::io::Result<()> {
        let durable = self.state().log_durable;
        let path = data_dir.join(super::WAL_FILE);
        let file = match OpenOptions::new().write(true).open(path) {
            Ok(file) => file,
            // The power went off before the log was created.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        let len = file.metadata()?.len();
        file.set_len(len.min(durable.saturating_add(torn_tail)))
    }

    /// Any write or resize: fails once the power is off.
    pub(crate) fn check(&self) -> std::io::Result<()> {
        if self.state().cut {
            Err(lost())
        } else {
            Ok(())
        }
    }

    /// A sync: counts it, and fails it (cutting the power) if it is the chosen one.
    fn sync_point(state: &mut PowerState) -> std::io::Result<()> {
        if state.cut {
            return Err(lost());
        }
        state.syncs += 1;
        if state.cut_at == Some(state.syncs) {
            state.cut = true;
            return Err(lost());
        }
        Ok(())
    }

    /// A sync of the redb file.
    fn sync_db(&self) -> std::io::Result<()> {
        Self::sync_point(&mut self.state())
    }

    /// A sync of the log: `len` (read under the machine's lock) becomes durable.
    pub(crate) fn sync_log(
        &self,
        len: impl FnOnce() -> std::io::Result<u64>,
    ) -> std::io::Result<()> {
        let mut state = self.state();
        Self::sync_point(&mut state)?;
        state.log_durable = len()?;
        Ok(())
    }

    /// The log was truncated to `len`.
    pub(crate) fn log_truncated(&self, len: u64) {
        let mut state = self.state();
        state.log_durable = state.log_durable.min(len);
    }
}

#[derive(Debug, Default)]
struct Overlay {
    /// The volatile length of the file.
    len: u64,
    /// Base-file bytes at or beyond this length read as zeros (a shrink not yet synced).
    base_valid: u64,
    /// Pages written since the last completed sync, by page index.
    pages: BTreeMap<u64, Box<[u8]>>,
}

/// A redb storage backend over a real file whose writes stay volatile until a sync completes.
#[derive(Debug)]
pub(crate) struct SimBackend {
    file: File,
    power: Arc<PowerLoss>,
    overlay: Mutex<Overlay>,
}

impl SimBackend {
    pub(crate) fn open(path: &Path, power: Arc<PowerLoss>) -> std::io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let len = file.metadata()?.len();
        Ok(Self {
            file,
            power,
            overlay: Mutex::new(Overlay {
                len,
                base_valid: len,
                pages: BTreeMap::new(),
            }),
        })
    }

    fn overlay(&self) -> std::sync::MutexGuard<'_, Overlay> {
        self.overlay.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads `out.len()` bytes at `offset` of the base file as the overlay sees it.
    fn read_base(&self, o: &Overlay, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        out.fill(0);
        if offset >= o.base_valid {
            return Ok(());
        }
        let n = usize::try_from((o.base_valid - offset).min(out.len() as u64)).unwrap_or(0);
        let mut done = 0;
        while done < n {
            match self.file.read_at(&mut out[done..n], offset + done as u64)? {
                0 => break,
                k => done += k,
            }
        }
        Ok(())
    }

    fn read_page(&self, o: &Overlay, page: u64, out: &mut [u8]) -> std::io::Result<()> {
        match o.pages.get(&page) {
            Some(p) => {
                out.copy_from_slice(p);
                Ok(())
            }
            None => self.read_base(o, page * PAGE, out),
        }
    }
}

impl redb::StorageBackend for SimBackend {
    fn len(&self) -> Result<u64, std::io::Error> {
        Ok(self.overlay().len)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
        let o = self.overlay();
        if offset + out.len() as u64 > o.len {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let mut page_buf = vec![0u8; PAGE as usize];
        let mut at = 0usize;
        while at < out.len() {
            let pos = offset + at as u64;
            let (page, within) = (pos / PAGE, (pos % PAGE) as usize);
            let n = (PAGE as usize - within).min(out.len() - at);
            self.read_page(&o, page, &mut page_buf)?;
            out[at..at + n].copy_from_slice(&page_buf[within..within + n]);
            at += n;
        }
        Ok(())
    }

    fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
        self.power.check()?;
        let mut o = self.overlay();
        if len < o.len {
            o.base_valid = o.base_valid.min(len);
            let keep = len.div_ceil(PAGE);
            o.pages.retain(|&p, _| p < keep);
            if !len.is_multiple_of(PAGE)
                && let Some(p) = o.pages.get_mut(&(len / PAGE))
            {
                p[(len % PAGE) as usize..].fill(0);
            }
        }
        o.len = len;
        Ok(())
    }

    fn sync_data(&self) -> Result<(), std::io::Error> {
        self.power.sync_db()?;
        let mut o = self.overlay();
        // The sync completed: the overlay is now on "disk". No real fsync is needed: the
        // simulated disk is the file's contents, which outlive this process anyway.
        self.file.set_len(o.base_valid)?;
        self.file.set_len(o.len)?;
        for (&page, bytes) in &o.pages {
            let start = page * PAGE;
            let end = (start + PAGE).min(o.len);
            if start < end {
                self.file
                    .write_all_at(&bytes[..(end - start) as usize], start)?;
            }
        }
        o.pages.clear();
        o.base_valid = o.len;
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
        self.power.check()?;
        let mut o = self.overlay();
        let end = offset + data.len() as u64;
        if end > o.len {
            o.len = end;
        }
        let mut at = 0usize;
        while at < data.len() {
            let pos = offset + at as u64;
            let (page, within) = (pos / PAGE, (pos % PAGE) as usize);
            let n = (PAGE as usize - within).min(data.len() - at);
            if !o.pages.contains_key(&page) {
                let mut buf = vec![0u8; PAGE as usize].into_boxed_slice();
                self.read_base(&o, page * PAGE, &mut buf)?;
                o.pages.insert(page, buf);
            }
            if let Some(p) = o.pages.get_mut(&page) {
                p[within..within + n].copy_from_slice(&data[at..at + n]);
            }
            at += n;
        }
        Ok(())
    }
}
