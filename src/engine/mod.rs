//! The engine: the shared state of every queue, the write operations, and the hand-off to
//! storage. The public front ends (`QueueManager`, `EventQueue`, `Subscription`,
//! `CheckpointStore`, expiry) are thin layers over [`Core`]; the engine knows nothing of them.
//!
//! ```text
//! front ends (manager, queue, subscription, checkpoint, expiry; server, cli)
//!     │  typed ops (ops.rs) and reads
//!     ▼
//! engine: Core ─ registry of QueueState (state.rs) ─ live hubs (hub.rs)
//!     │  one writer thread, group commit (pipeline.rs)
//!     ▼
//! storage: the Storage trait (storage/mod.rs); redb + write-ahead log (storage/redb)
//!     ▼
//! model: event, ids, error, config, clock
//! ```

mod follow;
pub(crate) mod hub;
pub(crate) mod ops;
mod pipeline;
mod registry;
pub(crate) mod state;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot};

use crate::clock::Clock;
use crate::config::{Config, Durability};
use crate::error::{Error, Result};
use crate::event::Timestamp;
use crate::ids::{TaskId, TenantId};
use crate::metrics::Metrics;
use crate::storage::{LoadedCheckpoint, Storage, StoredEvent};
pub(crate) use hub::Live;
pub use hub::RecordedEvent;
pub use ops::SavedCheckpoint;
pub(crate) use ops::{
    NewQueue, PreparedEvent, PreparedSave, ProducerClaim, StreamAppend, StreamAppended,
};
pub(crate) use pipeline::Registry;
use pipeline::{Poison, Request, Writer};
pub use state::QueueKind;
pub(crate) use state::{QueueState, SubscriberGuard};

/// Capacity of the writer's op channel; callers wait (asynchronously) beyond it.
const OP_CHANNEL: usize = 4096;

/// What every handle of one manager shares: the store, the registry of queues, the writer's
/// channel.
pub(crate) struct Core {
    storage: Arc<dyn Storage>,
    tx: mpsc::Sender<Request>,
    config: Config,
    metrics: Arc<Metrics>,
    registry: Arc<Registry>,
    clock: Arc<dyn Clock>,
    poison: Arc<Poison>,
    writer_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Whether other nodes write the store too (then a follower thread takes in their
    /// changes, and a queue this node does not know is looked up in the store).
    shared: bool,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("storage", &self.storage.describe())
            .finish()
    }
}

/// A store opened by a front end: the store and what it recovered.
pub(crate) struct Opened {
    pub storage: Arc<dyn Storage>,
    pub recovered: crate::storage::Recovered,
}

impl Core {
    /// Starts the engine over an opened store: restores every queue and starts the writer.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidId`] for a stored queue whose ids no longer pass validation;
    /// [`Error::Internal`] if the writer thread cannot be started.
    pub(crate) fn start(opened: Opened, config: Config, clock: Arc<dyn Clock>) -> Result<Self> {
        let Opened { storage, recovered } = opened;
        let mut map = registry::Queues::default();
        for lq in recovered.queues {
            let tenant = TenantId::new(&lq.tenant)?;
            let task = TaskId::new(&lq.task)?;
            let state = Arc::new(QueueState::from_record(
                tenant.clone(),
                task.clone(),
                &lq.record,
            ));
            map.insert((tenant, task), state);
        }
        let registry = Arc::new(Registry::new(map));
        let metrics = Arc::new(Metrics::default());
        metrics
            .pending_purges
            .store(recovered.purges.len() as u64, Ordering::Relaxed);
        let poison = Arc::new(Poison::default());
        let (tx, rx) = mpsc::channel(OP_CHANNEL);
        let (feed, follower) = follow::channel(&storage).unzip();
        let writer = Writer {
            storage: storage.clone(),
            registry: registry.clone(),
            clock: clock.clone(),
            metrics: metrics.clone(),
            poison: poison.clone(),
            rx,
            flush_interval: match config.durability {
                Durability::Immediate => None,
                Durability::Buffered { flush_interval } => Some(flush_interval),
            },
            max_commit_events: config.max_commit_events.max(1),
            next_queue_id: recovered.next_queue_id,
            purges: recovered.purges,
            purge_step: config.purge_step.max(1),
            feed,
        };
        let handle = std::thread::Builder::new()
            .name("eventqueue-writer".into())
            .spawn(move || {
                if let Err(e) = writer.run() {
                    tracing::error!(error = %e, "the writer could not start");
                }
            })
            .map_err(|e| Error::internal(format!("cannot start the writer thread: {e}")))?;
        let shared = follower
            .and_then(|f| follow::start(&storage, f, tx.clone(), config.replay_chunk))
            .is_some();
        Ok(Core {
            storage,
            tx,
            config,
            metrics,
            registry,
            clock,
            poison,
            writer_thread: Mutex::new(Some(handle)),
            shared,
        })
    }

    /// Sends a request to the writer and waits for its reply.
    async fn call<T>(&self, make: impl FnOnce(ops::Reply<T>) -> Request) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(make(ops::Reply::new(tx))).await.is_err() {
            return Err(self.poison.gone());
        }
        rx.await.map_err(|_| self.poison.gone())?
    }

    /// Sends an op to the writer and waits for its reply.
    async fn write<A, T>(&self, args: A, op: fn(ops::Call<A, T>) -> ops::Op) -> Result<T> {
        self.call(|reply| Request::Write(op(ops::Call::new(args, reply))))
            .await
    }

    /// The configuration the engine was started with.
    pub(crate) fn config(&self) -> &Config {
        &self.config
    }

    /// Counters and histograms.
    pub(crate) fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The clock for activity, TTL and cancellation times.
    pub(crate) fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// Whether the store can be reached now (see [`Storage::check`]).
    pub(crate) async fn check_storage(&self) -> Result<()> {
        let storage = self.storage.clone();
        tokio::task::spawn_blocking(move || storage.check())
            .await
            .map_err(|e| Error::internal(format!("storage check task failed: {e}")))?
    }

    /// Where the store lives, for messages.
    pub(crate) fn describe_storage(&self) -> String {
        self.storage.describe()
    }

    /// The store's size in bytes.
    pub(crate) fn store_size_bytes(&self) -> u64 {
        self.storage.size_bytes()
    }

    /// Fault injection of the store (feature `failpoints`).
    #[cfg(feature = "failpoints")]
    pub(crate) fn faults(&self) -> Arc<crate::storage::redb::wal::Faults> {
        self.storage.faults()
    }

    /// The queue, if it exists.
    pub(crate) fn lookup(&self, tenant: &TenantId, task: &TaskId) -> Option<Arc<QueueState>> {
        self.registry
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(tenant.clone(), task.clone()))
            .cloned()
    }

    /// The queue, if it exists: from this node's registry, or else (when other nodes share the
    /// store) from the store, for a queue another node created that this node has not heard
    /// of yet.
    ///
    /// # Errors
    ///
    /// Storage errors of the store's lookup.
    pub(crate) async fn find(
        &self,
        tenant: &TenantId,
        task: &TaskId,
    ) -> Result<Option<Arc<QueueState>>> {
        if let Some(q) = self.lookup(tenant, task) {
            return Ok(Some(q));
        }
        if !self.shared {
            return Ok(None);
        }
        self.call(|reply| Request::Load(ops::Call::new((tenant.clone(), task.clone()), reply)))
            .await
    }

    /// Every queue of `tenant` (all tenants when `None`), in no particular order.
    pub(crate) fn queues(&self, tenant: Option<&TenantId>) -> Vec<Arc<QueueState>> {
        self.registry
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .of(tenant)
    }

    /// How many queues `tenant` has (constant time).
    pub(crate) fn count(&self, tenant: &TenantId) -> usize {
        self.registry
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .count(tenant)
    }

    /// Appends events to a queue; returns their offsets once durable.
    pub(crate) async fn append(
        &self,
        queue: Arc<QueueState>,
        events: Vec<PreparedEvent>,
    ) -> Result<Vec<u64>> {
        self.write(ops::Append { queue, events }, ops::Op::Append)
            .await
    }

    /// A Durable Streams append (see [`StreamAppend`]); answers once durable.
    pub(crate) async fn stream_append(&self, args: StreamAppend) -> Result<StreamAppended> {
        self.write(args, ops::Op::StreamAppend).await
    }

    /// Creates a queue; it is durable when this returns.
    pub(crate) async fn create(&self, spec: NewQueue) -> Result<Arc<QueueState>> {
        self.write(spec, ops::Op::Create).await
    }

    /// Closes a queue to producers.
    pub(crate) async fn close(&self, queue: Arc<QueueState>) -> Result<()> {
        self.write(queue, ops::Op::Close).await
    }

    /// Cancels a task.
    pub(crate) async fn cancel(
        &self,
        queue: Arc<QueueState>,
        reason: Option<String>,
    ) -> Result<()> {
        self.write(ops::Cancel { queue, reason }, ops::Op::Cancel)
            .await
    }

    /// Deletes a queue and its events.
    pub(crate) async fn delete(&self, queue: Arc<QueueState>) -> Result<bool> {
        self.write(
            ops::Delete {
                queue,
                expire_at: None,
            },
            ops::Op::Delete,
        )
        .await
    }

    /// Deletes a queue if it was idle for at least its TTL at `now`; returns whether it did.
    pub(crate) async fn expire(&self, queue: Arc<QueueState>, now: Timestamp) -> Result<bool> {
        self.write(
            ops::Delete {
                queue,
                expire_at: Some(now),
            },
            ops::Op::Delete,
        )
        .await
    }

    /// Saves a workflow checkpoint with its events.
    pub(crate) async fn save_checkpoint(&self, save: PreparedSave) -> Result<SavedCheckpoint> {
        self.write(Box::new(save), ops::Op::SaveCheckpoint).await
    }

    /// Makes every commit so far durable.
    pub(crate) async fn flush(&self) -> Result<()> {
        self.write((), ops::Op::Flush).await
    }

    /// Compacts the store's file; returns its size before and after.
    pub(crate) async fn compact(&self) -> Result<(u64, u64)> {
        self.call(|reply| Request::Compact(ops::Call::new((), reply)))
            .await
    }

    /// Commits what was submitted, syncs, stops the writer, waits for it and closes the
    /// store.
    pub(crate) async fn shutdown(&self) -> Result<()> {
        let result = match self.write((), ops::Op::Shutdown).await {
            Err(Error::ShuttingDown) => Ok(()),
            other => other,
        };
        let handle = self
            .writer_thread
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(handle) = handle {
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
        let storage = self.storage.clone();
        let _ = tokio::task::spawn_blocking(move || storage.close()).await;
        result
    }

    /// Starts a read of a queue's events (see [`Storage::read_range`]) on the blocking pool.
    pub(crate) fn spawn_read(
        &self,
        qid: u64,
        from: u64,
        to: u64,
        limit: usize,
        max_bytes: usize,
    ) -> tokio::task::JoinHandle<Result<Vec<StoredEvent>>> {
        let storage = self.storage.clone();
        tokio::task::spawn_blocking(move || storage.read_range(qid, from, to, limit, max_bytes))
    }

    /// Runs `f` on the store on the blocking pool: for what the store keeps beside the
    /// queues (token revocations), outside the write path.
    pub(crate) async fn on_storage<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn Storage) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let storage = self.storage.clone();
        tokio::task::spawn_blocking(move || f(&*storage))
            .await
            .map_err(|e| Error::internal(format!("storage task failed: {e}")))?
    }

    /// Runs a checkpoint read on the blocking pool.
    pub(crate) async fn read_checkpoints<I>(
        &self,
        f: impl FnOnce(&dyn Storage) -> Result<I> + Send + 'static,
    ) -> Result<I>
    where
        I: IntoIterator<Item = LoadedCheckpoint> + Send + 'static,
    {
        let storage = self.storage.clone();
        tokio::task::spawn_blocking(move || f(&*storage))
            .await
            .map_err(|e| Error::internal(format!("checkpoint read task failed: {e}")))?
    }
}
