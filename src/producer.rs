//! Producer helpers: what code that runs a task (an orchestrator workflow, an ingestion job)
//! uses to report on it, so that every producer reports the same way and none forgets to end
//! its stream.
//!
//! A [`Reporter`] writes to an [`EventSink`]: an [`EventQueue`] in this process, or an
//! `HttpSink` for a queue on an eventqueue server (a producer in another process; feature
//! `client`). Both have the same shape:
//!
//! - typed emitters: [`Reporter::status`], [`Reporter::progress`], [`Reporter::artifact`],
//!   [`Reporter::error`], and the shortcuts [`Reporter::phase`] and [`Reporter::step`];
//! - [`Reporter::checkpoint`]: saves a workflow checkpoint, which emits its own status and
//!   progress events atomically with it (see [`crate::CheckpointStore`]);
//! - a **boundary check**, [`Reporter::check_cancelled`]: call it between phases or items.
//!   When the task was cancelled it emits `status: cancelled` and returns
//!   [`ProducerError::Cancelled`], so `?` stops the task at that boundary;
//! - **terminal helpers**: [`Reporter::complete`], [`Reporter::fail`], [`Reporter::cancelled`].
//!
//! # Ending the stream
//!
//! Subscribers' streams end only at a terminal event, so a producer that stops without one
//! leaves its watchers waiting. Two guards prevent that:
//!
//! - [`Reporter::run`] runs the task's body and always reports its outcome: `complete` with
//!   the body's result, `status: cancelled` when it stopped at a cancelled boundary, a
//!   non-recoverable `error` when it failed or panicked.
//! - When the last clone of a reporter that reported no terminal event is dropped (the task
//!   returned early, or its future was dropped), it emits `status: failed` ("the producer
//!   stopped without reporting an outcome") from a task spawned on the current Tokio runtime.
//!   This is a best-effort backstop: without a running runtime (the process is exiting) it
//!   can only log. [`Reporter::leave_running`] opts out, for a workflow that another process
//!   resumes from its checkpoint.
//!
//! ```
//! use eventqueue::producer::{ProducerError, Reporter};
//! use eventqueue::{CompleteEvent, Config, QueueManager, QueueOptions, TaskId, TenantId};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let manager = QueueManager::open(Config::new(dir.path())).await?;
//! let (tenant, job) = (TenantId::new("acme")?, TaskId::new("ingestion_1")?);
//! let queue = manager.create_queue(&tenant, &job, QueueOptions::default()).await?;
//!
//! let videos = ["a.mp4", "b.mp4"];
//! let outcome = Reporter::new(queue.clone())
//!     .run(|r| async move {
//!         r.phase("ingesting").await?;
//!         for (i, video) in videos.iter().enumerate() {
//!             r.check_cancelled().await?; // stops here, with `status: cancelled`, once cancelled
//!             r.step(i as u64 + 1, videos.len() as u64, *video).await?;
//!         }
//!         Ok::<_, ProducerError>(CompleteEvent::new(serde_json::json!({"videos": videos.len()})))
//!     })
//!     .await?;
//! assert!(outcome.is_completed());
//! assert!(queue.is_finished());
//! # Ok(())
//! # }
//! ```

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use futures_util::FutureExt;
use serde_json::json;

use crate::checkpoint::{Checkpoint, SavedCheckpoint};
#[cfg(feature = "client")]
use crate::client::ClientError;
use crate::error::Error;
use crate::event::{
    ArtifactEvent, CompleteEvent, ErrorEvent, Event, Payload, ProgressEvent, StatusEvent, TaskState,
};
use crate::ids::TaskId;
use crate::queue::EventQueue;

#[cfg(feature = "client")]
mod http;
#[cfg(feature = "client")]
pub use http::{HttpReporter, HttpSink};

/// Why a producer call failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ProducerError {
    /// The task was cancelled; `status: cancelled` was reported. Stop the task.
    #[error("the task was cancelled{}", reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default())]
    Cancelled {
        /// The reason given with the cancel, if any.
        reason: Option<String>,
    },
    /// The task itself failed; [`Reporter::run`] reports it as a non-recoverable error.
    #[error("{error_type}: {message}")]
    Failed {
        /// Kind of error (the event's `error_type`).
        error_type: String,
        /// What went wrong (the event's `error_message`).
        message: String,
    },
    /// The in-process queue refused (closed, deleted, storage error, invalid event).
    #[error(transparent)]
    Queue(#[from] Error),
    /// The server refused or could not be reached.
    #[cfg(feature = "client")]
    #[error(transparent)]
    Http(#[from] ClientError),
}

impl ProducerError {
    /// A failure of the task itself, reported as a non-recoverable `error` event of this type.
    pub fn failed(error_type: impl Into<String>, message: impl Into<String>) -> Self {
        ProducerError::Failed {
            error_type: error_type.into(),
            message: message.into(),
        }
    }

    /// Whether this is [`ProducerError::Cancelled`].
    pub fn is_cancelled(&self) -> bool {
        matches!(self, ProducerError::Cancelled { .. })
    }
}

/// What a send stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    /// The events' offsets, in order.
    pub offsets: Vec<u64>,
    /// Whether the task is cancelled (as the enqueue answer reports it).
    pub cancelled: bool,
}

/// A cancellation seen by a producer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cancellation {
    /// The reason given, if any.
    pub reason: Option<String>,
}

/// Where a [`Reporter`] writes: one task's queue.
pub trait EventSink: Clone + Send + Sync + 'static {
    /// The task whose queue this is.
    fn task_id(&self) -> &TaskId;

    /// Appends `payloads` as one atomic batch of new events.
    fn send(
        &self,
        payloads: Vec<Payload>,
    ) -> impl Future<Output = Result<Sent, ProducerError>> + Send;

    /// The task's cancellation, if it was cancelled.
    fn cancellation(
        &self,
    ) -> impl Future<Output = Result<Option<Cancellation>, ProducerError>> + Send;

    /// Saves a checkpoint of this task's workflow (which emits its events into this queue).
    fn save_checkpoint(
        &self,
        checkpoint: Checkpoint,
    ) -> impl Future<Output = Result<SavedCheckpoint, ProducerError>> + Send;
}

impl EventSink for EventQueue {
    fn task_id(&self) -> &TaskId {
        EventQueue::task_id(self)
    }

    async fn send(&self, payloads: Vec<Payload>) -> Result<Sent, ProducerError> {
        let (tenant, task) = (self.tenant_id(), EventQueue::task_id(self));
        let events = payloads
            .into_iter()
            .map(|p| Event::new(tenant, task, p))
            .collect();
        let offsets = self.enqueue_batch(events).await?;
        Ok(Sent {
            offsets,
            cancelled: self.is_cancelled(),
        })
    }

    async fn cancellation(&self) -> Result<Option<Cancellation>, ProducerError> {
        let state = EventQueue::cancellation(self);
        Ok(state.is_cancelled.then_some(Cancellation {
            reason: state.reason,
        }))
    }

    async fn save_checkpoint(
        &self,
        checkpoint: Checkpoint,
    ) -> Result<SavedCheckpoint, ProducerError> {
        if &checkpoint.workflow_id != EventQueue::task_id(self) {
            return Err(ProducerError::Queue(Error::InvalidCheckpoint {
                field: "workflow_id".into(),
                reason: format!(
                    "does not match the reporter's queue (expected {}, got {})",
                    EventQueue::task_id(self),
                    checkpoint.workflow_id
                ),
            }));
        }
        Ok(self.checkpoint_store().save(checkpoint).await?)
    }
}

/// How a task run by [`Reporter::run`] ended; each was reported with its terminal event.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The body returned its result and `complete` was reported.
    Completed {
        /// Offset of the `complete` event; `None` when the body had already reported a
        /// terminal event itself (then nothing more was emitted).
        offset: Option<u64>,
    },
    /// The task stopped at a boundary after a cancel; `status: cancelled` was reported.
    Cancelled {
        /// The reason given with the cancel, if any.
        reason: Option<String>,
    },
    /// The task failed or panicked; a non-recoverable `error` was reported.
    Failed {
        /// The error's message.
        message: String,
    },
}

impl Outcome {
    /// Whether the task completed.
    pub fn is_completed(&self) -> bool {
        matches!(self, Outcome::Completed { .. })
    }

    /// Whether the task was cancelled.
    pub fn is_cancelled(&self) -> bool {
        matches!(self, Outcome::Cancelled { .. })
    }
}

/// Reports one task's progress to its queue (see the module docs). Cheap to clone; clones
/// share the task's state (started, finished).
pub struct Reporter<S: EventSink = EventQueue> {
    inner: Arc<Inner<S>>,
}

impl<S: EventSink> Clone for Reporter<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<S: EventSink + std::fmt::Debug> std::fmt::Debug for Reporter<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reporter")
            .field("sink", &self.inner.sink)
            .field("finished", &self.is_finished())
            .finish()
    }
}

struct Inner<S: EventSink> {
    sink: S,
    started: Instant,
    /// A terminal event was reported (or the reporter was told to leave the task running).
    finished: AtomicBool,
}

impl<S: EventSink> Drop for Inner<S> {
    fn drop(&mut self) {
        if self.finished.load(Ordering::SeqCst) {
            return;
        }
        let task = self.sink.task_id().clone();
        let message = "the producer stopped without reporting an outcome";
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                tracing::warn!(task_id = %task, "{message}; reporting status: failed");
                let sink = self.sink.clone();
                handle.spawn(async move {
                    let failed = StatusEvent::new(TaskState::Failed).message(message);
                    if let Err(e) = sink.send(vec![failed.into()]).await {
                        tracing::warn!(task_id = %task, error = %e, "could not report the failure");
                    }
                });
            }
            Err(_) => tracing::warn!(
                task_id = %task,
                "{message}, and no runtime is left to report it"
            ),
        }
    }
}

impl<S: EventSink> Reporter<S> {
    /// A reporter for the task of `sink`.
    pub fn new(sink: S) -> Self {
        Self {
            inner: Arc::new(Inner {
                sink,
                started: Instant::now(),
                finished: AtomicBool::new(false),
            }),
        }
    }

    /// Where the events go.
    pub fn sink(&self) -> &S {
        &self.inner.sink
    }

    /// The task.
    pub fn task_id(&self) -> &TaskId {
        self.inner.sink.task_id()
    }

    /// Whether a terminal event was reported through this reporter.
    pub fn is_finished(&self) -> bool {
        self.inner.finished.load(Ordering::SeqCst)
    }

    /// Opts out of the drop guard: the task stays unfinished on purpose (another process
    /// resumes it from its checkpoint).
    pub fn leave_running(self) {
        self.inner.finished.store(true, Ordering::SeqCst);
    }

    /// Emits one event and returns its offset. A terminal payload finishes the task.
    ///
    /// # Errors
    ///
    /// As the sink's send (a closed or deleted queue, storage or HTTP errors).
    pub async fn emit(&self, payload: impl Into<Payload>) -> Result<u64, ProducerError> {
        let payload = payload.into();
        let terminal = is_terminal(&payload);
        let sent = self.inner.sink.send(vec![payload]).await?;
        if terminal {
            self.inner.finished.store(true, Ordering::SeqCst);
        }
        sent.offsets
            .first()
            .copied()
            .ok_or_else(|| ProducerError::Queue(Error::internal("the queue returned no offset")))
    }

    /// Emits a `status` event.
    ///
    /// # Errors
    ///
    /// As [`Reporter::emit`].
    pub async fn status(&self, status: StatusEvent) -> Result<u64, ProducerError> {
        self.emit(status).await
    }

    /// Emits `status: working` in `phase`.
    ///
    /// # Errors
    ///
    /// As [`Reporter::emit`].
    pub async fn phase(&self, phase: impl Into<String>) -> Result<u64, ProducerError> {
        self.emit(StatusEvent::new(TaskState::Working).phase(phase))
            .await
    }

    /// Emits a `progress` event.
    ///
    /// # Errors
    ///
    /// As [`Reporter::emit`]; an invalid event (current above total) is refused.
    pub async fn progress(&self, progress: ProgressEvent) -> Result<u64, ProducerError> {
        self.emit(progress).await
    }

    /// Emits `progress` `current` of `total` at `step`.
    ///
    /// # Errors
    ///
    /// As [`Reporter::progress`].
    pub async fn step(
        &self,
        current: u64,
        total: u64,
        step: impl Into<String>,
    ) -> Result<u64, ProducerError> {
        self.emit(ProgressEvent::new(current, total).step(step))
            .await
    }

    /// Emits an `artifact` event.
    ///
    /// # Errors
    ///
    /// As [`Reporter::emit`].
    pub async fn artifact(&self, artifact: ArtifactEvent) -> Result<u64, ProducerError> {
        self.emit(artifact).await
    }

    /// Emits an `error` event. A recoverable error (the default) lets the task go on; a
    /// non-recoverable one finishes it (prefer [`Reporter::fail`] for that).
    ///
    /// # Errors
    ///
    /// As [`Reporter::emit`].
    pub async fn error(&self, error: ErrorEvent) -> Result<u64, ProducerError> {
        self.emit(error).await
    }

    /// Saves a checkpoint of the task's workflow; the save emits its `status` and `progress`
    /// events atomically with it. A checkpoint whose status is failed or cancelled finishes
    /// the task (its status event is terminal).
    ///
    /// # Errors
    ///
    /// As the sink's save: an invalid checkpoint, a workflow id other than the reporter's
    /// task, a closed queue, storage or HTTP errors.
    pub async fn checkpoint(
        &self,
        checkpoint: Checkpoint,
    ) -> Result<SavedCheckpoint, ProducerError> {
        let terminal = ends_task(checkpoint.status.task_state());
        let saved = self.inner.sink.save_checkpoint(checkpoint).await?;
        if terminal && saved.status_offset.is_some() {
            self.inner.finished.store(true, Ordering::SeqCst);
        }
        Ok(saved)
    }

    /// Whether the task was cancelled (no event is emitted).
    ///
    /// # Errors
    ///
    /// As the sink's cancellation check (HTTP errors).
    pub async fn is_cancelled(&self) -> Result<bool, ProducerError> {
        Ok(self.inner.sink.cancellation().await?.is_some())
    }

    /// The boundary check: call it between phases or items. When the task was cancelled it
    /// emits `status: cancelled` (message `Cancelled: {reason}`) and returns
    /// [`ProducerError::Cancelled`], so `?` stops the task at this boundary.
    ///
    /// # Errors
    ///
    /// [`ProducerError::Cancelled`] after a cancel; the sink's errors.
    pub async fn check_cancelled(&self) -> Result<(), ProducerError> {
        match self.inner.sink.cancellation().await? {
            None => Ok(()),
            Some(c) => {
                self.cancelled(c.reason.as_deref()).await?;
                Err(ProducerError::Cancelled { reason: c.reason })
            }
        }
    }

    /// Reports `status: cancelled` (terminal), unless a terminal event was already reported.
    ///
    /// # Errors
    ///
    /// As [`Reporter::emit`].
    pub async fn cancelled(&self, reason: Option<&str>) -> Result<(), ProducerError> {
        if self.is_finished() {
            return Ok(());
        }
        let message = match reason {
            Some(r) => format!("Cancelled: {r}"),
            None => "Cancelled".to_string(),
        };
        self.emit(StatusEvent::new(TaskState::Cancelled).message(message))
            .await
            .map(drop)
    }

    /// Reports `complete` (terminal). Without an execution time, the time since the reporter
    /// was created is filled in.
    ///
    /// # Errors
    ///
    /// As [`Reporter::emit`].
    pub async fn complete(&self, mut complete: CompleteEvent) -> Result<u64, ProducerError> {
        if complete.execution_time_seconds.is_none() {
            complete.execution_time_seconds = Some(self.inner.started.elapsed().as_secs_f64());
        }
        self.emit(complete).await
    }

    /// Reports a non-recoverable `error` (terminal).
    ///
    /// # Errors
    ///
    /// As [`Reporter::emit`].
    pub async fn fail(&self, error: ErrorEvent) -> Result<u64, ProducerError> {
        self.emit(error.non_recoverable()).await
    }

    /// Runs a task and reports its outcome, whatever it is: `complete` with the body's
    /// result; `status: cancelled` if it stopped with [`ProducerError::Cancelled`] (already
    /// reported by [`Reporter::check_cancelled`]); a non-recoverable `error` if it failed with
    /// any other error or panicked (the panic is caught and reported, not resumed). If the body
    /// itself reported a terminal event, nothing more is emitted.
    ///
    /// # Errors
    ///
    /// Only when the outcome cannot be reported (the queue or server refused the terminal
    /// event).
    pub async fn run<F, Fut>(&self, body: F) -> Result<Outcome, ProducerError>
    where
        F: FnOnce(Reporter<S>) -> Fut,
        Fut: Future<Output = Result<CompleteEvent, ProducerError>>,
    {
        let result = std::panic::AssertUnwindSafe(body(self.clone()))
            .catch_unwind()
            .await;
        let failure = match result {
            Ok(Ok(complete)) => {
                if self.is_finished() {
                    return Ok(Outcome::Completed { offset: None });
                }
                let offset = self.complete(complete).await?;
                return Ok(Outcome::Completed {
                    offset: Some(offset),
                });
            }
            Ok(Err(ProducerError::Cancelled { reason })) => {
                self.cancelled(reason.as_deref()).await?;
                return Ok(Outcome::Cancelled { reason });
            }
            Ok(Err(ProducerError::Failed {
                error_type,
                message,
            })) => ErrorEvent::new(error_type, message.clone()).non_recoverable(),
            Ok(Err(e)) => ErrorEvent::new("ProducerError", e.to_string()).non_recoverable(),
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic".to_string());
                ErrorEvent::new("Panic", format!("the task panicked: {what}")).non_recoverable()
            }
        };
        let message = failure.error_message.clone();
        if !self.is_finished() {
            self.emit(failure.context(json!({"task_id": self.task_id()})))
                .await?;
        }
        Ok(Outcome::Failed { message })
    }
}

fn is_terminal(payload: &Payload) -> bool {
    match payload {
        Payload::Complete(_) => true,
        Payload::Error(e) => !e.recoverable,
        Payload::Status(s) => ends_task(s.state),
        Payload::Progress(_) | Payload::Artifact(_) => false,
    }
}

/// Whether a status with this state finishes its task.
fn ends_task(state: TaskState) -> bool {
    matches!(state, TaskState::Failed | TaskState::Cancelled)
}
