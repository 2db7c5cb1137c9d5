//! [`QueueManager`]: opens a data directory, recovers every queue, and owns the writer thread
//! and the cleanup loop.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::clock::{Clock, SystemClock};
use crate::config::{Config, StorageBackend};
use crate::engine::{Core, NewQueue, Opened, QueueState};
use crate::error::{Error, Result};
use crate::expiry::{self, CleanupReport};
use crate::ids::{TaskId, TenantId};
use crate::listing::{self, PageRequest, QueuePage};
use crate::metrics::Metrics;
use crate::queue::{EventQueue, QueueInfo, QueueOptions};
use crate::storage::memory::MemoryStore;
use crate::storage::redb::{self, Store};
use crate::storage::redis::{RedisStore, Target as RedisTarget};

/// Manager-wide figures.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ManagerStats {
    /// Queues that exist.
    pub total_queues: usize,
    /// Queues not closed.
    pub active_queues: usize,
    /// Closed queues (still replayable).
    pub closed_queues: usize,
    /// Queues whose task finished.
    pub finished_queues: usize,
    /// Live subscriptions over all queues.
    pub subscribers: usize,
    /// Default TTL in minutes.
    pub default_ttl_minutes: f64,
    /// Default retention bound.
    pub max_buffer_size: u64,
}

/// Opens a data directory and manages its queues. Cheap to clone.
///
/// Dropping the last handle stops the writer after it finishes what it was given; call
/// [`QueueManager::shutdown`] to wait for that (for example before reopening the same
/// directory).
#[derive(Clone, Debug)]
pub struct QueueManager {
    core: Arc<Core>,
    cleanup: Arc<Mutex<Option<CancellationToken>>>,
}

impl QueueManager {
    /// Opens (or creates) the store in `config.data_dir` and restores every queue, offset,
    /// retained event, closed and cancelled state. Time comes from the system clock.
    ///
    /// # Errors
    ///
    /// [`Error::Locked`] if another process holds the database, [`Error::UnsupportedFormat`]
    /// for a file of another format version, [`Error::Storage`] for I/O errors.
    pub async fn open(config: Config) -> Result<Self> {
        Self::open_with_clock(config, Arc::new(SystemClock)).await
    }

    /// As [`QueueManager::open`], with an injected clock (used for activity, TTL and
    /// cancellation times).
    ///
    /// # Errors
    ///
    /// As [`QueueManager::open`].
    pub async fn open_with_clock(config: Config, clock: Arc<dyn Clock>) -> Result<Self> {
        Self::open_on(config, clock, None).await
    }

    /// Opens the store on a simulated machine whose power can be cut at its N-th sync (feature
    /// `failpoints`): see [`crate::PowerLoss`]. Shut the manager down after the cut, call
    /// [`crate::PowerLoss::settle`], then reopen the directory with [`QueueManager::open`].
    ///
    /// # Errors
    ///
    /// As [`QueueManager::open`].
    #[cfg(feature = "failpoints")]
    pub async fn open_with_power_loss(
        config: Config,
        power: Arc<crate::storage::redb::sim::PowerLoss>,
    ) -> Result<Self> {
        Self::open_on(config, Arc::new(SystemClock), Some(power)).await
    }

    async fn open_on(
        config: Config,
        clock: Arc<dyn Clock>,
        power: Option<redb::Power>,
    ) -> Result<Self> {
        let opened = match &config.storage {
            StorageBackend::Redb => {
                let dir = config.data_dir.clone();
                let options = redb::Options::of(&config);
                let (store, recovered) =
                    tokio::task::spawn_blocking(move || Store::open_on(&dir, &options, power))
                        .await
                        .map_err(|e| Error::internal(format!("open task failed: {e}")))??;
                Opened {
                    storage: Arc::new(store),
                    recovered,
                }
            }
            StorageBackend::Memory => {
                let (store, recovered) = MemoryStore::open();
                Opened {
                    storage: Arc::new(store),
                    recovered,
                }
            }
            StorageBackend::Redis { url, prefix } => {
                let target = RedisTarget {
                    url: url.clone(),
                    prefix: prefix.clone(),
                    wait_replicas: config.redis_wait_replicas,
                    wait_timeout: config.redis_wait_timeout,
                };
                let (store, recovered) =
                    tokio::task::spawn_blocking(move || RedisStore::open(&target))
                        .await
                        .map_err(|e| Error::internal(format!("open task failed: {e}")))??;
                Opened {
                    storage: Arc::new(store),
                    recovered,
                }
            }
        };
        Ok(Self {
            core: Arc::new(Core::start(opened, config, clock)?),
            cleanup: Arc::new(Mutex::new(None)),
        })
    }

    /// Whether the store can be reached now: always for the embedded and in-memory stores; a
    /// Redis store pings its server.
    ///
    /// # Errors
    ///
    /// The storage error that says why not.
    pub async fn check_storage(&self) -> Result<()> {
        self.core.check_storage().await
    }

    /// Revokes `tenant`'s tokens issued before `not_before` (the server refuses them with
    /// `401`): stored durably, and seen by every node sharing the store at its next reload
    /// of revocations. A later call replaces the time (an earlier one lifts part of a
    /// revocation).
    ///
    /// # Errors
    ///
    /// Storage errors.
    pub async fn revoke_tokens(
        &self,
        tenant: &TenantId,
        not_before: crate::event::Timestamp,
    ) -> Result<()> {
        let tenant = tenant.as_str().to_owned();
        let us = u64::try_from(not_before.as_micros()).unwrap_or(0);
        self.core
            .on_storage(move |s| s.put_revocation(&tenant, us))
            .await
    }

    /// Every tenant's token not-before time, microseconds since the Unix epoch (see
    /// [`QueueManager::revoke_tokens`]).
    ///
    /// # Errors
    ///
    /// Storage errors.
    pub async fn token_revocations(&self) -> Result<Vec<(String, u64)>> {
        self.core.on_storage(|s| s.revocations()).await
    }

    /// Where the queues are kept, for messages (a Redis URL without its password).
    pub fn storage_description(&self) -> String {
        self.core.describe_storage()
    }

    fn handle(&self, q: Arc<QueueState>) -> EventQueue {
        EventQueue::new(q, self.core.clone())
    }

    /// Creates a queue; it is durable when this returns.
    ///
    /// # Errors
    ///
    /// [`Error::QueueExists`]; [`Error::InvalidEvent`] naming `max_buffer_size` when it is 0;
    /// storage errors.
    pub async fn create_queue(
        &self,
        tenant: &TenantId,
        task: &TaskId,
        options: QueueOptions,
    ) -> Result<EventQueue> {
        let max_buffer_size = options
            .max_buffer_size
            .unwrap_or(self.core.config().max_buffer_size);
        if max_buffer_size == 0 {
            return Err(Error::invalid_event(
                "max_buffer_size",
                "must be at least 1",
            ));
        }
        let spec = NewQueue {
            tenant: tenant.clone(),
            task: task.clone(),
            kind: options.kind,
            ttl: options.ttl.unwrap_or(self.core.config().default_ttl),
            max_buffer_size,
            content_type: options.content_type.clone(),
            expires_at: options.expires_at,
        };
        let q = self.core.create(spec).await?;
        Ok(self.handle(q))
    }

    /// The existing queue, or a new one created with `options`.
    ///
    /// # Errors
    ///
    /// As [`QueueManager::create_queue`], except that an existing queue is not an error.
    pub async fn get_or_create_queue(
        &self,
        tenant: &TenantId,
        task: &TaskId,
        options: QueueOptions,
    ) -> Result<EventQueue> {
        loop {
            if let Some(q) = self.find_queue(tenant, task).await? {
                return Ok(q);
            }
            match self.create_queue(tenant, task, options.clone()).await {
                Err(Error::QueueExists { .. }) => continue,
                other => return other,
            }
        }
    }

    /// The queue, if this node knows it (closed queues included, until they expire). With a
    /// store other nodes share (Redis), a queue another node created moments ago may not be
    /// known here yet: [`find_queue`](Self::find_queue) also asks the store.
    pub fn get_queue(&self, tenant: &TenantId, task: &TaskId) -> Option<EventQueue> {
        self.core.lookup(tenant, task).map(|q| self.handle(q))
    }

    /// The queue, if it exists: as [`get_queue`](Self::get_queue), and with a store other
    /// nodes share, a queue this node has not heard of yet is looked up in the store.
    ///
    /// # Errors
    ///
    /// Storage errors of that lookup.
    pub async fn find_queue(&self, tenant: &TenantId, task: &TaskId) -> Result<Option<EventQueue>> {
        Ok(self.core.find(tenant, task).await?.map(|q| self.handle(q)))
    }

    /// The checkpoint store of `tenant`'s workflows (see [`crate::CheckpointStore`]).
    pub fn checkpoints(&self, tenant: &TenantId) -> crate::checkpoint::CheckpointStore {
        crate::checkpoint::CheckpointStore::new(self.core.clone(), tenant.clone())
    }

    /// Info of every queue of `tenant` (all tenants when `None`), sorted by tenant then task.
    pub fn list_queues(&self, tenant: Option<&TenantId>) -> Vec<QueueInfo> {
        let mut infos: Vec<QueueInfo> = self
            .core
            .queues(tenant)
            .iter()
            .map(|q| QueueInfo::of(q))
            .collect();
        infos.sort_by(|a, b| (&a.tenant_id, &a.task_id).cmp(&(&b.tenant_id, &b.task_id)));
        infos
    }

    /// One page of the queues of `tenant` (all tenants when `None`) that pass
    /// `request.filter`, newest activity first, with the cursor of the next page when more
    /// match. See [`crate::ListCursor`] for what a walk over the pages guarantees while queues
    /// change. Costs one pass over the tenant's queues (all queues' for `None`) plus the info of
    /// the page's queues.
    pub fn list_queues_page(&self, tenant: Option<&TenantId>, request: &PageRequest) -> QueuePage {
        listing::page(self.core.queues(tenant), request)
    }

    /// How many queues `tenant` has (closed ones included, until they expire).
    pub fn count_queues(&self, tenant: &TenantId) -> usize {
        self.core.count(tenant)
    }

    /// Closes a queue. Returns whether it existed.
    ///
    /// # Errors
    ///
    /// Storage errors.
    pub async fn close_queue(&self, tenant: &TenantId, task: &TaskId) -> Result<bool> {
        match self.find_queue(tenant, task).await? {
            Some(q) => missing_is_false(q.close().await.map(|()| true)),
            None => Ok(false),
        }
    }

    /// Deletes a queue and all its events; its subscribers end. Returns whether it existed.
    ///
    /// # Errors
    ///
    /// Storage errors.
    pub async fn delete_queue(&self, tenant: &TenantId, task: &TaskId) -> Result<bool> {
        let Some(q) = self.core.find(tenant, task).await? else {
            return Ok(false);
        };
        missing_is_false(self.core.delete(q).await)
    }

    /// Folds the log into the database and compacts the database file in place, so that space freed by deleted,
    /// expired and trimmed events goes back to the filesystem (the store otherwise reuses it
    /// but keeps it). Readers wait while each compaction step runs; appends wait for the
    /// whole compaction. The writer also does this by itself when a deletion completes on a
    /// nearly full disk (see [`Config::disk_reserve`]).
    ///
    /// # Errors
    ///
    /// Storage errors (permanent, as for a failed commit); [`Error::StoreFailed`] after an
    /// earlier failure.
    pub async fn compact(&self) -> Result<crate::expiry::CompactReport> {
        let (bytes_before, bytes_after) = self.core.compact().await?;
        Ok(crate::expiry::CompactReport {
            bytes_before,
            bytes_after,
        })
    }

    /// Cancels a task (see [`EventQueue::cancel`]). Returns whether the queue existed.
    ///
    /// # Errors
    ///
    /// [`Error::TaskFinished`] if the task already finished; storage errors.
    pub async fn cancel_task(
        &self,
        tenant: &TenantId,
        task: &TaskId,
        reason: Option<&str>,
    ) -> Result<bool> {
        match self.find_queue(tenant, task).await? {
            Some(q) => missing_is_false(q.cancel(reason).await.map(|()| true)),
            None => Ok(false),
        }
    }

    /// Manager-wide figures.
    pub fn stats(&self) -> ManagerStats {
        let queues = self.core.queues(None);
        let mut stats = ManagerStats {
            total_queues: queues.len(),
            active_queues: 0,
            closed_queues: 0,
            finished_queues: 0,
            subscribers: 0,
            default_ttl_minutes: self.core.config().default_ttl.as_secs_f64() / 60.0,
            max_buffer_size: self.core.config().max_buffer_size,
        };
        for q in queues {
            let (closed, finished) = q.with_view(|v| (v.closed, v.finished_at.is_some()));
            if closed {
                stats.closed_queues += 1;
            } else {
                stats.active_queues += 1;
            }
            if finished {
                stats.finished_queues += 1;
            }
            stats.subscribers += q.subscribers();
        }
        stats
    }

    /// The manager's counters and histograms.
    pub fn metrics(&self) -> &Metrics {
        self.core.metrics()
    }

    /// The configuration the manager was opened with.
    pub fn config(&self) -> &Config {
        self.core.config()
    }

    /// Fault injection for reliability tests (feature `failpoints`).
    #[cfg(feature = "failpoints")]
    pub fn faults(&self) -> std::sync::Arc<crate::storage::redb::wal::Faults> {
        self.core.faults()
    }

    /// Size of the database file in bytes.
    pub fn store_size_bytes(&self) -> u64 {
        self.core.store_size_bytes()
    }

    /// Removes every queue idle for at least its TTL at the clock's current time.
    ///
    /// # Errors
    ///
    /// Storage errors.
    pub async fn cleanup_expired(&self) -> Result<CleanupReport> {
        self.expire_once(self.core.clock().now()).await
    }

    /// Removes every queue idle for at least its TTL at `now` (one expiry sweep). Each removal
    /// is its own writer op, so appends interleave with the sweep; the removed queues' events
    /// are then purged in bounded steps.
    ///
    /// # Errors
    ///
    /// Storage errors.
    pub async fn expire_once(&self, now: crate::event::Timestamp) -> Result<CleanupReport> {
        expiry::expire_once(&self.core, now).await
    }

    /// Starts the background cleanup loop (idempotent: a running loop is kept).
    pub fn start_cleanup_loop(&self, interval: Duration) {
        let mut slot = self.cleanup.lock().unwrap_or_else(|p| p.into_inner());
        if slot.as_ref().is_some_and(|t| !t.is_cancelled()) {
            return;
        }
        let token = CancellationToken::new();
        *slot = Some(token.clone());
        tokio::spawn(expiry::cleanup_loop(
            Arc::downgrade(&self.core),
            interval,
            token,
        ));
    }

    /// Stops the cleanup loop, if running.
    pub fn stop_cleanup_loop(&self) {
        if let Some(token) = self
            .cleanup
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            token.cancel();
        }
    }

    /// Whether the cleanup loop is running.
    pub fn is_cleanup_running(&self) -> bool {
        self.cleanup
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|t| !t.is_cancelled())
    }

    /// Makes every commit so far durable (a no-op in immediate mode).
    ///
    /// # Errors
    ///
    /// Storage errors.
    pub async fn flush(&self) -> Result<()> {
        self.core.flush().await
    }

    /// Commits what was submitted, syncs, stops the writer, waits for it and closes the
    /// database file, so the directory can be reopened at once. Later operations on any handle
    /// fail with [`Error::ShuttingDown`]; open subscriptions end with that error if they need
    /// the log.
    ///
    /// # Errors
    ///
    /// A storage error from the final sync.
    pub async fn shutdown(&self) -> Result<()> {
        self.stop_cleanup_loop();
        self.core.shutdown().await
    }
}

fn missing_is_false<T: Into<bool>>(r: Result<T>) -> Result<bool> {
    match r {
        Ok(v) => Ok(v.into()),
        Err(Error::QueueNotFound { .. }) => Ok(false),
        Err(e) => Err(e),
    }
}
