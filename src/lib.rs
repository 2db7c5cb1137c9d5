//! # eventqueue
//!
//! A durable, embedded event log for task progress. Producers (workflows, ingestion jobs)
//! append status / progress / artifact / error / complete events to per-task queues;
//! subscribers replay from any offset and then follow live, across disconnects and restarts.
//!
//! Guarantees:
//! - an `enqueue` that returned `Ok` survives `kill -9` and a restart (fsync'd group commit);
//! - offsets are per queue, dense, 0-based and never reused;
//! - a subscription delivers in offset order with no duplicates and no holes; events dropped
//!   by retention are reported as a gap, never skipped silently;
//! - a slow subscriber never blocks producers or other subscribers;
//! - a workflow checkpoint ([`CheckpointStore`]) and the status / progress events it emits are
//!   committed together or not at all.
//!
//! Producers report through [`producer::Reporter`] (typed emitters, a cancellation boundary
//! check, and an outcome that is always reported), in process or over HTTP.
//!
//! # Features
//!
//! `server`, `client` and `cli` are on by default; an application that only embeds the log
//! depends on the crate with `default-features = false` and compiles no HTTP or command-line
//! crate.
//!
//! - `server`: the HTTP server, `server`, over HTTP or HTTPS (axum, hyper, tower-http,
//!   jsonwebtoken, rustls);
//! - `client`: the HTTP client, `client`, and `producer::HttpSink` (reqwest, rustls);
//! - `cli`: the `eventqueue` binary's commands, `cli`, with `bench` and `demo`; implies
//!   `server` and `client` (clap, indicatif, toml, tracing-subscriber, mimalloc);
//! - `failpoints` (off by default): fault injection for the reliability tests.
//!
//! ```
//! use eventqueue::{Config, Delivery, Event, QueueManager, QueueOptions, StatusEvent, TaskId,
//!                  TaskState, TenantId};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> eventqueue::Result<()> {
//! let dir = tempfile::tempdir().unwrap();
//! let manager = QueueManager::open(Config::new(dir.path())).await?;
//! let (tenant, task) = (TenantId::new("acme")?, TaskId::new("workflow_123")?);
//! let queue = manager.create_queue(&tenant, &task, QueueOptions::default()).await?;
//!
//! let status = StatusEvent::new(TaskState::Working).phase("planning");
//! let offset = queue.enqueue(Event::new(&tenant, &task, status)).await?;
//! assert_eq!(offset, 0);
//!
//! let mut sub = queue.subscribe(0)?;
//! let Some(Ok(Delivery::Event(ev))) = sub.next().await else { panic!() };
//! assert_eq!(ev.offset(), 0);
//! assert!(std::str::from_utf8(ev.json()).unwrap().contains(r#""phase":"planning""#));
//! manager.shutdown().await?;
//! # Ok(())
//! # }
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs)]

// The model: no I/O.
mod clock;
mod config;
mod error;
mod event;
mod ids;
mod metrics;
// Storage: the trait every store keeps, and the stores.
mod storage;
// The engine: shared queue state, typed write operations, the group-commit pipeline.
mod engine;
// Front ends over the engine.
mod checkpoint;
mod expiry;
mod listing;
mod manager;
mod queue;
mod reader;
mod subscription;

#[cfg(feature = "cli")]
pub mod cli;
#[cfg(feature = "client")]
pub mod client;
pub mod producer;
#[cfg(feature = "server")]
pub mod server;

#[cfg(feature = "cli")]
pub use cli::{bench, demo};

pub use checkpoint::{
    Checkpoint, CheckpointStore, Resume, SavedCheckpoint, StoredCheckpoint, TaskCheckpoint,
    TaskStatus, WorkflowStatus,
};
pub use clock::{Clock, ManualClock, SystemClock};
pub use config::{Config, DEFAULT_REDIS_PREFIX, Durability, StorageBackend};
pub use error::{Error, Result, StorageError};
pub use event::{
    ArtifactEvent, CompleteEvent, ErrorEvent, Event, EventType, Payload, ProducerContext,
    ProgressEvent, RenderedEvent, StatusEvent, TaskState, Timestamp,
};
pub use expiry::{CleanupReport, CompactReport, compact_offline};
pub use ids::{EventId, MAX_ID_LEN, TaskId, TenantId, validate_id};
pub use listing::{
    DEFAULT_PAGE_SIZE, InvalidCursor, ListCursor, MAX_PAGE_SIZE, PageRequest, QueueFilter,
    QueuePage, RunState,
};
pub use manager::{ManagerStats, QueueManager};
pub use metrics::{Histogram, Metrics};
pub use queue::{CancellationState, EventQueue, QueueInfo, QueueKind, QueueOptions};
pub use reader::LogReader;
pub use storage::redb::DB_FILE;
#[cfg(feature = "failpoints")]
pub use storage::redb::sim::PowerLoss;
#[cfg(feature = "failpoints")]
pub use storage::redb::wal::Faults;
pub use storage::redis::redis_persistence_warning;
pub use subscription::{Delivery, RecordedEvent, Subscription};
