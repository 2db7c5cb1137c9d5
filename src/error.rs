//! Library errors. No HTTP types here: the server maps these to status codes.

use std::sync::Arc;

/// Everything eventqueue's library API can fail with.
///
/// Variants carry what a caller needs to explain the failure. Errors are cheap to clone: the
/// same failure is returned to every enqueue that shared a failed commit, so
/// [`Error::Storage`] shares its cause ([`StorageError`]) rather than flattening it to text.
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
    Storage(StorageError),
    /// A commit failed earlier; the store refuses writes until it is reopened, rather than
    /// pretend that later commits are fine. Holds that first failure.
    #[error("the store refuses writes after an earlier storage failure ({0}); reopen it")]
    StoreFailed(StorageError),
    /// The data directory's filesystem is (nearly) full: the write was refused and nothing
    /// of it was stored. Writes are taken again once space is freed (by deleting queues, or
    /// outside eventqueue); see [`crate::Config::disk_reserve`].
    #[error("disk full: {0}")]
    DiskFull(Arc<str>),
    /// The manager is shutting down or has shut down.
    #[error("the queue manager is shut down")]
    ShuttingDown,
    /// One of the manager's worker threads panicked (a bug): the manager refuses further
    /// writes; reopen it. Names the thread.
    #[error("the queue manager's {0} thread panicked; reopen the store")]
    Poisoned(Arc<str>),
    /// A bug in eventqueue: an internal invariant did not hold. Not a storage failure.
    #[error("internal error: {0}")]
    Internal(Arc<str>),
}

/// A storage failure with its cause: what was being done, the kind of I/O failure (for
/// example [`std::io::ErrorKind::StorageFull`] for a full disk; [`std::io::ErrorKind::Other`]
/// when the cause is not an I/O error), and the underlying error as
/// [`std::error::Error::source`].
#[derive(Debug, Clone)]
pub struct StorageError {
    context: Arc<str>,
    kind: std::io::ErrorKind,
    source: Option<Arc<dyn std::error::Error + Send + Sync>>,
}

impl StorageError {
    /// A failure described by `context` alone (no underlying error).
    pub(crate) fn msg(context: impl std::fmt::Display) -> Self {
        StorageError {
            context: Arc::from(context.to_string()),
            kind: std::io::ErrorKind::Other,
            source: None,
        }
    }

    /// An I/O failure while doing `context`; keeps its kind.
    pub(crate) fn io(context: impl std::fmt::Display, err: std::io::Error) -> Self {
        StorageError {
            context: Arc::from(context.to_string()),
            kind: err.kind(),
            source: Some(Arc::new(err)),
        }
    }

    /// A failure caused by `source`, of the given I/O kind.
    pub(crate) fn caused(
        context: impl std::fmt::Display,
        kind: std::io::ErrorKind,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        StorageError {
            context: Arc::from(context.to_string()),
            kind,
            source: Some(Arc::new(source)),
        }
    }

    /// The kind of I/O failure underneath ([`std::io::ErrorKind::Other`] when there is none).
    pub fn kind(&self) -> std::io::ErrorKind {
        self.kind
    }

    /// Whether the store could not be reached (a networked store's connection was refused,
    /// reset or timed out): a retry may succeed.
    pub fn is_unavailable(&self) -> bool {
        use std::io::ErrorKind as K;
        matches!(
            self.kind,
            K::ConnectionRefused
                | K::ConnectionReset
                | K::ConnectionAborted
                | K::NotConnected
                | K::TimedOut
        )
    }

    /// Whether the storage ran out of space (`ENOSPC`, or a quota).
    pub fn is_storage_full(&self) -> bool {
        matches!(
            self.kind,
            std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
        )
    }
}

impl std::fmt::Display for StorageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.source {
            Some(source) if self.context.is_empty() => write!(f, "{source}"),
            Some(source) => write!(f, "{}: {source}", self.context),
            None => f.write_str(&self.context),
        }
    }
}

impl std::error::Error for StorageError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl Error {
    /// A storage failure described by text alone.
    pub(crate) fn storage(err: impl std::fmt::Display) -> Self {
        Error::Storage(StorageError::msg(err))
    }

    /// A bug: an internal invariant did not hold.
    pub(crate) fn internal(what: impl std::fmt::Display) -> Self {
        Error::Internal(Arc::from(what.to_string()))
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
