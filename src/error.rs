//! Library errors. No HTTP types here: the server maps these to status codes.

use std::sync::Arc;

/// Everything eventqueue's library API can fail with.
///
/// Variants carry what a caller needs to explain the failure; [`Error::Storage`] carries the
/// underlying I/O or database error as text, because the same failure is returned to every
/// enqueue that shared the failed commit.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An id broke the id rule (1..=128 bytes of `[A-Za-z0-9._:@-]`, not starting with `.`).
    #[error("invalid {field}: {reason}")]
    InvalidId {
        /// The field holding the id (`task_id`, `tenant_id`, `event_id`).
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// An event failed validation; `field` names the offending field.
    #[error("invalid event: {field}: {reason}")]
    InvalidEvent {
        /// The offending field (`current`, `data`, `event_type`, …).
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A checkpoint failed validation; `field` names the offending field.
    #[error("invalid checkpoint: {field}: {reason}")]
    InvalidCheckpoint {
        /// The offending field (`current_phase`, `tasks[0].status`, `state`, …).
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// `create_queue` of a queue that already exists.
    #[error("Queue already exists: {task_id} (tenant {tenant_id})")]
    QueueExists {
        /// Tenant of the queue.
        tenant_id: String,
        /// Task of the queue.
        task_id: String,
    },
    /// The queue does not exist (never created, deleted or expired).
    #[error("No queue found for task {task_id}")]
    QueueNotFound {
        /// Task of the queue.
        task_id: String,
    },
    /// Enqueue on a closed queue.
    #[error("queue {task_id} is closed")]
    QueueClosed {
        /// Task of the queue.
        task_id: String,
    },
    /// Cancel of a task whose queue already holds a terminal event.
    #[error("task {task_id} has already finished")]
    TaskFinished {
        /// Task of the queue.
        task_id: String,
    },
    /// The data directory holds a file written by an incompatible version.
    #[error("unsupported on-disk format version {found} (this build reads version {expected})")]
    UnsupportedFormat {
        /// Version found in the file.
        found: u32,
        /// Version this build reads and writes.
        expected: u32,
    },
    /// Another process holds the database.
    #[error(
        "the database {path} is in use by another process (is an eventqueue server running on it?)"
    )]
    Locked {
        /// Path of the database file.
        path: String,
    },
    /// An I/O or database error. A failed commit is returned to every enqueue of its batch.
    #[error("storage error: {0}")]
    Storage(Arc<str>),
    /// A commit failed earlier; the store refuses writes until it is reopened, rather than
    /// pretend that later commits are fine.
    #[error("the store refuses writes after an earlier storage failure ({0}); reopen it")]
    StoreFailed(Arc<str>),
    /// The data directory's filesystem is (nearly) full: the write was refused and nothing
    /// of it was stored. Writes are taken again once space is freed (by deleting queues, or
    /// outside eventqueue); see [`crate::Config::disk_reserve`].
    #[error("disk full: {0}")]
    DiskFull(Arc<str>),
    /// The manager is shutting down or has shut down.
    #[error("the queue manager is shut down")]
    ShuttingDown,
}

impl Error {
    pub(crate) fn storage(err: impl std::fmt::Display) -> Self {
        Error::Storage(Arc::from(err.to_string()))
    }

    pub(crate) fn invalid_event(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidEvent {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
