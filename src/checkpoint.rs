//! Workflow checkpoints that emit their events: crash recovery and notification from one
//! write.
//!
//! A [`Checkpoint`] records where a workflow is (status, current phase of total phases, each
//! task's state, free-form JSON state). [`CheckpointStore::save`] stores it in the same redb
//! database as the events and, when the workflow's queue `(tenant, workflow_id)` exists,
//! appends the events the contract derives from it (DESIGN.md, "Checkpoints"):
//!
//! 1. a `status` event: state from the checkpoint's status (pending→pending, running→working,
//!    completed→completed, failed→failed, cancelled→cancelled, partially_completed and any
//!    other status→working), `phase = "phase_{current_phase}"`,
//!    `message = "Checkpoint saved: {status}"`;
//! 2. when the checkpoint has tasks, a `progress` event: `current` = completed tasks,
//!    `total` = tasks, `step = "phase_{current_phase}"`,
//!    `details = {checkpoint_id, workflow_status, current_phase, total_phases}`.
//!
//! Without a queue the save still succeeds and returns its checkpoint id.
//!
//! # Atomicity
//!
//! A save is one operation of the engine's group commit: the checkpoint and the event appends
//! are changes of the same batch, which the store keeps whole or not at all (the storage
//! contract). Every check that can refuse the save (queue closed, id taken) runs before
//! anything is staged, and any failure after that fails the whole batch, which is then
//! dropped uncommitted. After a crash or restart the latest checkpoint and the queue's events
//! therefore agree: the checkpoint's recorded event offsets hold the events it emitted, and
//! every emitted event's checkpoint exists.
//!
//! A reader may see a checkpoint whose save is committed but not yet acknowledged (its batch
//! is being synced), as the writer's commit runs ahead of the sync. Its events become visible
//! to subscribers once they are durable.
//!
//! # Retention
//!
//! Checkpoints do not expire with their workflow's queue: they are for crash recovery, and a
//! workflow can be resumed after its queue is gone. Each workflow keeps its newest 100
//! checkpoints; a save beyond that removes the oldest in the same transaction.

use std::sync::Arc;

use serde::Serialize;
use serde_json::{Map, Value};

use crate::engine::{Core, PreparedEvent, PreparedSave};
use crate::error::{Error, Result};
use crate::event::{Event, ProgressEvent, StatusEvent, TaskState, Timestamp};
use crate::ids::{TaskId, TenantId};
use crate::queue::EventQueue;
use crate::storage::{CheckpointRecord, LoadedCheckpoint, Storage, TaskRecord};

pub use crate::engine::SavedCheckpoint;

/// Longest accepted task id inside a checkpoint, and longest workflow status, in bytes.
const MAX_NAME_LEN: usize = 256;

/// A workflow's overall status, as saved in a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum WorkflowStatus {
    /// `pending`
    Pending,
    /// `running`
    Running,
    /// `completed`
    Completed,
    /// `failed`
    Failed,
    /// `cancelled`
    Cancelled,
    /// `partially_completed`
    PartiallyCompleted,
    /// Any other non-empty status name; reported as `working`.
    Other(String),
}

impl WorkflowStatus {
    /// The status name.
    pub fn as_str(&self) -> &str {
        match self {
            WorkflowStatus::Pending => "pending",
            WorkflowStatus::Running => "running",
            WorkflowStatus::Completed => "completed",
            WorkflowStatus::Failed => "failed",
            WorkflowStatus::Cancelled => "cancelled",
            WorkflowStatus::PartiallyCompleted => "partially_completed",
            WorkflowStatus::Other(s) => s,
        }
    }

    /// Parses a status name; names other than the known ones become [`WorkflowStatus::Other`].
    ///
    /// # Errors
    ///
    /// [`Error::InvalidCheckpoint`] naming `status` when the name is empty or longer than 256
    /// bytes.
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "pending" => WorkflowStatus::Pending,
            "running" => WorkflowStatus::Running,
            "completed" => WorkflowStatus::Completed,
            "failed" => WorkflowStatus::Failed,
            "cancelled" => WorkflowStatus::Cancelled,
            "partially_completed" => WorkflowStatus::PartiallyCompleted,
            other => {
                check_name("status", other)?;
                WorkflowStatus::Other(other.to_string())
            }
        })
    }

    /// The state of the `status` event a save emits.
    pub fn task_state(&self) -> TaskState {
        match self {
            WorkflowStatus::Pending => TaskState::Pending,
            WorkflowStatus::Completed => TaskState::Completed,
            WorkflowStatus::Failed => TaskState::Failed,
            WorkflowStatus::Cancelled => TaskState::Cancelled,
            WorkflowStatus::Running
            | WorkflowStatus::PartiallyCompleted
            | WorkflowStatus::Other(_) => TaskState::Working,
        }
    }

    /// Whether the workflow ended (completed, failed or cancelled): nothing to resume.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            WorkflowStatus::Completed | WorkflowStatus::Failed | WorkflowStatus::Cancelled
        )
    }
}

impl std::fmt::Display for WorkflowStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for WorkflowStatus {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// One task's state inside a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskStatus {
    /// `pending`: not started.
    Pending,
    /// `running`
    Running,
    /// `completed`: counts towards the checkpoint's progress.
    Completed,
    /// `failed`
    Failed,
    /// `skipped`
    Skipped,
}

impl TaskStatus {
    /// Every status, in wire order.
    pub const ALL: [TaskStatus; 5] = [
        TaskStatus::Pending,
        TaskStatus::Running,
        TaskStatus::Completed,
        TaskStatus::Failed,
        TaskStatus::Skipped,
    ];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Pending => "pending",
            TaskStatus::Running => "running",
            TaskStatus::Completed => "completed",
            TaskStatus::Failed => "failed",
            TaskStatus::Skipped => "skipped",
        }
    }

    /// Parses a wire name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

/// A task of a checkpointed workflow.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TaskCheckpoint {
    /// The task's name, unique within the checkpoint (1..=256 bytes).
    pub task_id: String,
    /// Its state.
    pub status: TaskStatus,
    /// Its result so far, any JSON (`null` when none).
    pub result: Value,
}

/// A workflow checkpoint to save.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    /// The workflow; its queue is `(tenant, workflow_id)`.
    pub workflow_id: TaskId,
    /// The workflow's status.
    pub status: WorkflowStatus,
    /// The phase reached, `0..=total_phases` (0: not started).
    pub current_phase: u64,
    /// Number of phases.
    pub total_phases: u64,
    /// Per-task states.
    pub tasks: Vec<TaskCheckpoint>,
    /// Free-form state to resume from; a JSON object.
    pub state: Value,
}

impl Checkpoint {
    /// A checkpoint at phase 0 of 0, with no tasks and empty state.
    pub fn new(workflow_id: &TaskId, status: WorkflowStatus) -> Self {
        Self {
            workflow_id: workflow_id.clone(),
            status,
            current_phase: 0,
            total_phases: 0,
            tasks: Vec::new(),
            state: Value::Object(Map::new()),
        }
    }

    /// Sets the current phase and the number of phases.
    pub fn phase(mut self, current: u64, total: u64) -> Self {
        self.current_phase = current;
        self.total_phases = total;
        self
    }

    /// Adds a task without a result.
    pub fn task(mut self, task_id: impl Into<String>, status: TaskStatus) -> Self {
        self.tasks.push(TaskCheckpoint {
            task_id: task_id.into(),
            status,
            result: Value::Null,
        });
        self
    }

    /// Adds a task with a result.
    pub fn task_with_result(
        mut self,
        task_id: impl Into<String>,
        status: TaskStatus,
        result: Value,
    ) -> Self {
        self.tasks.push(TaskCheckpoint {
            task_id: task_id.into(),
            status,
            result,
        });
        self
    }

    /// Sets the free-form state (must be a JSON object to validate).
    pub fn state(mut self, state: Value) -> Self {
        self.state = state;
        self
    }

    /// Tasks whose status is `completed`.
    pub fn completed_tasks(&self) -> u64 {
        self.tasks
            .iter()
            .filter(|t| t.status == TaskStatus::Completed)
            .count() as u64
    }

    /// Checks what the types do not guarantee.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidCheckpoint`] naming the offending field: `current_phase` above
    /// `total_phases`, an empty, over-long or repeated task id, a status name that is empty or
    /// too long, a `state` that is not a JSON object.
    pub fn validate(&self) -> Result<()> {
        if let WorkflowStatus::Other(s) = &self.status {
            check_name("status", s)?;
        }
        if self.current_phase > self.total_phases {
            return Err(invalid(
                "current_phase",
                format!(
                    "must not exceed total_phases ({}), got {}",
                    self.total_phases, self.current_phase
                ),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, t) in self.tasks.iter().enumerate() {
            check_name(&format!("tasks[{i}].task_id"), &t.task_id)?;
            if !seen.insert(t.task_id.as_str()) {
                return Err(invalid(
                    format!("tasks[{i}].task_id"),
                    format!("{:?} appears more than once", t.task_id),
                ));
            }
        }
        if !self.state.is_object() {
            return Err(invalid("state", "must be a JSON object"));
        }
        Ok(())
    }

    /// Parses a checkpoint sent over HTTP for `workflow_id`:
    /// `{"status", "current_phase"?, "total_phases"?, "tasks"?: [{"task_id", "status",
    /// "result"?}], "state"?, "workflow_id"?}` (a given `workflow_id` must match). The result is
    /// [validated](Self::validate).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidCheckpoint`] naming the offending field.
    pub fn from_json(value: Value, workflow_id: &TaskId) -> Result<Self> {
        let Value::Object(mut map) = value else {
            return Err(invalid(
                "checkpoint",
                "must be a JSON object {\"status\", \"current_phase\", \"total_phases\", \
                 \"tasks\", \"state\"}",
            ));
        };
        match map.remove("workflow_id") {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) if s == workflow_id.as_str() => {}
            Some(Value::String(s)) => {
                return Err(invalid(
                    "workflow_id",
                    format!("does not match the route (expected {workflow_id}, got {s:?})"),
                ));
            }
            Some(_) => return Err(invalid("workflow_id", "must be a string")),
        }
        let status = match map.remove("status") {
            Some(Value::String(s)) => WorkflowStatus::parse(&s)?,
            None | Some(Value::Null) => return Err(invalid("status", "is required")),
            Some(_) => return Err(invalid("status", "must be a string")),
        };
        let current_phase = count_field(&mut map, "current_phase")?;
        let total_phases = count_field(&mut map, "total_phases")?;
        let tasks = match map.remove("tasks") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => items
                .into_iter()
                .enumerate()
                .map(|(i, v)| task_from_json(v, i))
                .collect::<Result<Vec<_>>>()?,
            Some(_) => return Err(invalid("tasks", "must be an array of task objects")),
        };
        let state = match map.remove("state") {
            None | Some(Value::Null) => Value::Object(Map::new()),
            Some(v) => v,
        };
        if let Some(field) = map.keys().next() {
            return Err(invalid(
                field.clone(),
                "unknown field (expected status, current_phase, total_phases, tasks, state, \
                 workflow_id)",
            ));
        }
        let checkpoint = Checkpoint {
            workflow_id: workflow_id.clone(),
            status,
            current_phase,
            total_phases,
            tasks,
            state,
        };
        checkpoint.validate()?;
        Ok(checkpoint)
    }

    /// The JSON that [`Checkpoint::from_json`] reads (the body of
    /// `POST /events/workflows/{id}/checkpoints`).
    pub fn to_json(&self) -> Value {
        serde_json::json!({
            "workflow_id": self.workflow_id,
            "status": self.status,
            "current_phase": self.current_phase,
            "total_phases": self.total_phases,
            "tasks": self.tasks,
            "state": self.state,
        })
    }

    /// The events a save emits when the workflow's queue exists: `status`, then `progress`
    /// when the checkpoint has tasks.
    fn events(&self, tenant: &TenantId, checkpoint_id: &str) -> Vec<Event> {
        let phase = format!("phase_{}", self.current_phase);
        let mut events = vec![Event::new(
            tenant,
            &self.workflow_id,
            StatusEvent::new(self.status.task_state())
                .phase(phase.clone())
                .message(format!("Checkpoint saved: {}", self.status)),
        )];
        if !self.tasks.is_empty() {
            let details = serde_json::json!({
                "checkpoint_id": checkpoint_id,
                "workflow_status": self.status.as_str(),
                "current_phase": self.current_phase,
                "total_phases": self.total_phases,
            });
            events.push(Event::new(
                tenant,
                &self.workflow_id,
                ProgressEvent::new(self.completed_tasks(), self.tasks.len() as u64)
                    .step(phase)
                    .details(details),
            ));
        }
        events
    }

    fn to_record(&self, checkpoint_id: &str) -> Result<CheckpointRecord> {
        Ok(CheckpointRecord {
            checkpoint_id: checkpoint_id.to_string(),
            status: self.status.as_str().to_string(),
            current_phase: self.current_phase,
            total_phases: self.total_phases,
            tasks: self
                .tasks
                .iter()
                .map(|t| {
                    Ok(TaskRecord {
                        task_id: t.task_id.clone(),
                        status: t.status.as_str().to_string(),
                        result_json: if t.result.is_null() {
                            None
                        } else {
                            Some(serde_json::to_vec(&t.result).map_err(Error::internal)?)
                        },
                    })
                })
                .collect::<Result<Vec<_>>>()?,
            state_json: serde_json::to_vec(&self.state).map_err(Error::internal)?,
            // Set by the writer, which knows the commit time and the offsets.
            created_at_us: 0,
            status_offset: None,
            progress_offset: None,
        })
    }
}

fn task_from_json(value: Value, i: usize) -> Result<TaskCheckpoint> {
    let Value::Object(mut map) = value else {
        return Err(invalid(
            format!("tasks[{i}]"),
            "must be an object {\"task_id\", \"status\", \"result\"?}",
        ));
    };
    let task_id = match map.remove("task_id") {
        Some(Value::String(s)) => s,
        None | Some(Value::Null) => {
            return Err(invalid(format!("tasks[{i}].task_id"), "is required"));
        }
        Some(_) => return Err(invalid(format!("tasks[{i}].task_id"), "must be a string")),
    };
    let status = match map.remove("status") {
        Some(Value::String(s)) => TaskStatus::parse(&s).ok_or_else(|| {
            invalid(
                format!("tasks[{i}].status"),
                format!(
                    "must be one of {}; got {s:?}",
                    TaskStatus::ALL.map(TaskStatus::as_str).join(", ")
                ),
            )
        })?,
        None | Some(Value::Null) => {
            return Err(invalid(format!("tasks[{i}].status"), "is required"));
        }
        Some(_) => return Err(invalid(format!("tasks[{i}].status"), "must be a string")),
    };
    let result = map.remove("result").unwrap_or(Value::Null);
    if let Some(field) = map.keys().next() {
        return Err(invalid(
            format!("tasks[{i}].{field}"),
            "unknown field (expected task_id, status, result)",
        ));
    }
    Ok(TaskCheckpoint {
        task_id,
        status,
        result,
    })
}

fn count_field(map: &mut Map<String, Value>, field: &str) -> Result<u64> {
    match map.remove(field) {
        None | Some(Value::Null) => Ok(0),
        Some(Value::Number(n)) => n
            .as_u64()
            .ok_or_else(|| invalid(field, format!("must be an integer >= 0, got {n}"))),
        Some(_) => Err(invalid(field, "must be an integer >= 0")),
    }
}

fn check_name(field: &str, value: &str) -> Result<()> {
    if value.is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    if value.len() > MAX_NAME_LEN {
        return Err(invalid(
            field,
            format!("must be at most {MAX_NAME_LEN} bytes (got {})", value.len()),
        ));
    }
    Ok(())
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Error {
    Error::InvalidCheckpoint {
        field: field.into(),
        reason: reason.into(),
    }
}

/// A saved checkpoint, as read back.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StoredCheckpoint {
    /// The checkpoint's id.
    pub checkpoint_id: String,
    /// The workflow.
    pub workflow_id: TaskId,
    /// The tenant.
    pub tenant_id: TenantId,
    /// Position in the workflow's history (0 for the first save).
    pub seq: u64,
    /// When it was saved.
    pub created_at: Timestamp,
    /// The workflow's status.
    pub status: WorkflowStatus,
    /// Phase reached.
    pub current_phase: u64,
    /// Number of phases.
    pub total_phases: u64,
    /// Per-task states.
    pub tasks: Vec<TaskCheckpoint>,
    /// Free-form state.
    pub state: Value,
    /// Offset of the `status` event the save emitted, if the workflow had a queue.
    pub status_offset: Option<u64>,
    /// Offset of the `progress` event the save emitted, if any.
    pub progress_offset: Option<u64>,
}

impl StoredCheckpoint {
    fn from_loaded(tenant: &TenantId, loaded: LoadedCheckpoint) -> Result<Self> {
        let r = loaded.record;
        let corrupt = |what: &str| Error::storage(format!("corrupt checkpoint record: {what}"));
        let json = |bytes: &[u8]| -> Result<Value> {
            serde_json::from_slice(bytes).map_err(|e| corrupt(&e.to_string()))
        };
        let tasks = r
            .tasks
            .iter()
            .map(|t| {
                Ok(TaskCheckpoint {
                    task_id: t.task_id.clone(),
                    status: TaskStatus::parse(&t.status).ok_or_else(|| corrupt("task status"))?,
                    result: match &t.result_json {
                        Some(bytes) => json(bytes)?,
                        None => Value::Null,
                    },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            checkpoint_id: r.checkpoint_id,
            workflow_id: TaskId::new(&loaded.workflow)?,
            tenant_id: tenant.clone(),
            seq: loaded.seq,
            created_at: Timestamp::from_micros(r.created_at_us),
            status: WorkflowStatus::parse(&r.status)?,
            current_phase: r.current_phase,
            total_phases: r.total_phases,
            tasks,
            state: json(&r.state_json)?,
            status_offset: r.status_offset,
            progress_offset: r.progress_offset,
        })
    }

    /// The checkpoint's content, to save again (for example with updated tasks).
    pub fn to_checkpoint(&self) -> Checkpoint {
        Checkpoint {
            workflow_id: self.workflow_id.clone(),
            status: self.status.clone(),
            current_phase: self.current_phase,
            total_phases: self.total_phases,
            tasks: self.tasks.clone(),
            state: self.state.clone(),
        }
    }
}

/// Where to pick a workflow up after a restart: its latest checkpoint and its queue.
#[derive(Debug, Clone)]
pub struct Resume {
    /// The latest checkpoint.
    pub checkpoint: StoredCheckpoint,
    /// The workflow's queue, if it still exists; new events continue at its latest offset.
    pub queue: Option<EventQueue>,
}

impl Resume {
    /// Whether the workflow already ended (its latest checkpoint is completed, failed or
    /// cancelled).
    pub fn is_finished(&self) -> bool {
        self.checkpoint.status.is_final()
    }

    /// The tasks still to do: those not `completed` or `skipped`.
    pub fn pending_tasks(&self) -> impl Iterator<Item = &TaskCheckpoint> {
        self.checkpoint
            .tasks
            .iter()
            .filter(|t| !matches!(t.status, TaskStatus::Completed | TaskStatus::Skipped))
    }
}

/// The checkpoints of one tenant's workflows. Cheap to clone.
///
/// Get one with [`crate::QueueManager::checkpoints`] or [`EventQueue::checkpoint_store`].
#[derive(Clone)]
pub struct CheckpointStore {
    core: Arc<Core>,
    tenant: TenantId,
}

impl std::fmt::Debug for CheckpointStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointStore")
            .field("tenant_id", &self.tenant)
            .finish()
    }
}

impl EventQueue {
    /// The checkpoint store of this queue's tenant; checkpoints of the workflow named like
    /// this queue's task emit their events into this queue.
    pub fn checkpoint_store(&self) -> CheckpointStore {
        CheckpointStore::new(self.core().clone(), self.tenant_id().clone())
    }
}

impl CheckpointStore {
    pub(crate) fn new(core: Arc<Core>, tenant: TenantId) -> Self {
        CheckpointStore { core, tenant }
    }

    /// The tenant whose checkpoints these are.
    pub fn tenant_id(&self) -> &TenantId {
        &self.tenant
    }

    /// The queue a save of `workflow_id` emits its events into, if it exists.
    pub fn queue(&self, workflow_id: &TaskId) -> Option<EventQueue> {
        self.core
            .lookup(&self.tenant, workflow_id)
            .map(|q| EventQueue::new(q, self.core.clone()))
    }

    /// Saves a checkpoint as the workflow's latest and, when the workflow's queue exists,
    /// appends its `status` and `progress` events, atomically (see the module docs). Returns
    /// once the save is durable, like an enqueue.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidCheckpoint`] for an invalid checkpoint; [`Error::QueueClosed`] when the
    /// workflow's queue is closed (nothing is saved: a save and its events go together);
    /// [`Error::Storage`] / [`Error::StoreFailed`] as for an enqueue, with nothing saved
    /// unless the error came after the commit (then retry: a save that got an error may be
    /// stored, as after a timeout).
    ///
    /// # Cancel safety
    ///
    /// Dropping the future after it was first polled may still save the checkpoint.
    pub async fn save(&self, checkpoint: Checkpoint) -> Result<SavedCheckpoint> {
        checkpoint.validate()?;
        let checkpoint_id = format!("ckpt_{:012x}", fastrand::u64(..1 << 48));
        let queue = self
            .core
            .find(&self.tenant, &checkpoint.workflow_id)
            .await?;
        let events = match &queue {
            Some(_) => checkpoint
                .events(&self.tenant, &checkpoint_id)
                .iter()
                .map(|e| {
                    e.validate()?;
                    Ok(PreparedEvent::new(e))
                })
                .collect::<Result<Vec<_>>>()?,
            None => Vec::new(),
        };
        #[cfg(feature = "failpoints")]
        let inject = self.core.faults().checkpoint_save().err();
        #[cfg(not(feature = "failpoints"))]
        let inject = None;
        let save = PreparedSave {
            tenant: self.tenant.clone(),
            workflow: checkpoint.workflow_id.clone(),
            record: checkpoint.to_record(&checkpoint_id)?,
            queue,
            events,
            inject,
        };
        self.core.save_checkpoint(save).await
    }

    /// The workflow's newest checkpoint, if any.
    ///
    /// # Errors
    ///
    /// Storage errors.
    pub async fn latest(&self, workflow_id: &TaskId) -> Result<Option<StoredCheckpoint>> {
        let (tenant, workflow) = (self.tenant.clone(), workflow_id.clone());
        self.read(move |store| store.latest_checkpoint(tenant.as_str(), workflow.as_str()))
            .await
            .map(|found| found.into_iter().next())
    }

    /// The checkpoint with this id, if it belongs to this tenant and is still retained.
    ///
    /// # Errors
    ///
    /// Storage errors.
    pub async fn get(&self, checkpoint_id: &str) -> Result<Option<StoredCheckpoint>> {
        let (tenant, id) = (self.tenant.clone(), checkpoint_id.to_string());
        self.read(move |store| store.checkpoint_by_id(tenant.as_str(), &id))
            .await
            .map(|found| found.into_iter().next())
    }

    /// The workflow's retained checkpoints, oldest first.
    ///
    /// # Errors
    ///
    /// Storage errors.
    pub async fn list(&self, workflow_id: &TaskId) -> Result<Vec<StoredCheckpoint>> {
        let (tenant, workflow) = (self.tenant.clone(), workflow_id.clone());
        self.read(move |store| store.list_checkpoints(tenant.as_str(), workflow.as_str()))
            .await
    }

    /// Where to resume the workflow: its latest checkpoint and its queue (`None` when it has
    /// no checkpoint).
    ///
    /// # Errors
    ///
    /// Storage errors.
    pub async fn resume(&self, workflow_id: &TaskId) -> Result<Option<Resume>> {
        Ok(self.latest(workflow_id).await?.map(|checkpoint| Resume {
            checkpoint,
            queue: self.queue(workflow_id),
        }))
    }

    /// Runs a read on the blocking pool (store reads never run on async workers).
    async fn read<I>(
        &self,
        f: impl FnOnce(&dyn Storage) -> Result<I> + Send + 'static,
    ) -> Result<Vec<StoredCheckpoint>>
    where
        I: IntoIterator<Item = LoadedCheckpoint> + Send + 'static,
    {
        self.core
            .read_checkpoints(f)
            .await?
            .into_iter()
            .map(|l| StoredCheckpoint::from_loaded(&self.tenant, l))
            .collect()
    }
}
