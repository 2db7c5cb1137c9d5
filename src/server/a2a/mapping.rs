//! The event mapping: our events as A2A status and artifact updates, a task built from them,
//! and their JSON in the 1.0 and 0.3 shapes (see the table in the parent module's docs).

use std::collections::HashSet;

use serde_json::{Map, Value, json};

use crate::{Event, EventQueue, Payload, TaskId, TaskState, TenantId, Timestamp};

/// The protocol version a request speaks (from its method name) or a card is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Version {
    V1,
    V03,
}

/// An A2A task state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum A2aState {
    Submitted,
    Working,
    InputRequired,
    Completed,
    Failed,
    Canceled,
}

impl A2aState {
    /// Every state a task of ours can be in.
    pub(super) const ALL: [Self; 6] = [
        Self::Submitted,
        Self::Working,
        Self::InputRequired,
        Self::Completed,
        Self::Failed,
        Self::Canceled,
    ];

    pub(super) fn of(state: TaskState) -> Self {
        match state {
            TaskState::Pending => Self::Submitted,
            TaskState::Working => Self::Working,
            TaskState::InputRequired => Self::InputRequired,
            TaskState::Completed => Self::Completed,
            TaskState::Failed => Self::Failed,
            TaskState::Cancelled => Self::Canceled,
        }
    }

    pub(super) fn name(self, v: Version) -> &'static str {
        match (v, self) {
            (Version::V1, Self::Submitted) => "TASK_STATE_SUBMITTED",
            (Version::V1, Self::Working) => "TASK_STATE_WORKING",
            (Version::V1, Self::InputRequired) => "TASK_STATE_INPUT_REQUIRED",
            (Version::V1, Self::Completed) => "TASK_STATE_COMPLETED",
            (Version::V1, Self::Failed) => "TASK_STATE_FAILED",
            (Version::V1, Self::Canceled) => "TASK_STATE_CANCELED",
            (Version::V03, Self::Submitted) => "submitted",
            (Version::V03, Self::Working) => "working",
            (Version::V03, Self::InputRequired) => "input-required",
            (Version::V03, Self::Completed) => "completed",
            (Version::V03, Self::Failed) => "failed",
            (Version::V03, Self::Canceled) => "canceled",
        }
    }

    /// The state's number in the 1.0 `TaskState` enum (a proto enum may be sent as a number).
    pub(super) fn number(self) -> i64 {
        match self {
            Self::Submitted => 1,
            Self::Working => 2,
            Self::Completed => 3,
            Self::Failed => 4,
            Self::Canceled => 5,
            Self::InputRequired => 6,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub(super) enum Part {
    Text(String),
    Data(Value),
}

#[derive(Debug, Clone, PartialEq)]
pub(super) struct Message {
    id: String,
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq)]
pub(super) struct Status {
    state: A2aState,
    message: Option<Message>,
    timestamp: Timestamp,
}

#[derive(Debug, Clone, PartialEq)]
pub(super) struct Artifact {
    id: String,
    name: String,
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq)]
pub(super) enum Update {
    Status {
        status: Status,
        /// The event finishes the task (0.3 `final`).
        last: bool,
        metadata: Value,
    },
    Artifact {
        artifact: Artifact,
        append: bool,
        last_chunk: bool,
        metadata: Value,
    },
}

/// Maps events to A2A updates, in offset order. It remembers which artifacts have an open
/// (partial) chunk, to set `append` on the chunks that follow.
#[derive(Debug, Default)]
pub(super) struct Mapper {
    open_artifacts: HashSet<String>,
}

impl Mapper {
    pub(super) fn map(&mut self, event: &Event, offset: u64) -> Vec<Update> {
        let metadata = json!({
            "offset": offset,
            "event_id": event.event_id.as_str(),
            "event_type": event.event_type().as_str(),
        });
        let last = event.is_terminal();
        let message = |parts: Vec<Part>| {
            Some(Message {
                id: event.event_id.as_str().to_string(),
                parts,
            })
        };
        let status = |state: A2aState, parts: Vec<Part>| Status {
            state,
            message: message(parts),
            timestamp: event.timestamp,
        };
        match &event.payload {
            Payload::Status(s) => {
                let mut parts = Vec::with_capacity(2);
                if let Some(text) = &s.message {
                    parts.push(Part::Text(text.clone()));
                }
                parts.push(Part::Data(json!({"phase": s.phase, "message": s.message})));
                vec![Update::Status {
                    status: status(A2aState::of(s.state), parts),
                    last,
                    metadata,
                }]
            }
            Payload::Progress(p) => vec![Update::Status {
                status: status(
                    A2aState::Working,
                    vec![Part::Data(json!({
                        "current": p.current,
                        "total": p.total,
                        "percentage": p.percentage,
                        "step": p.step,
                        "details": p.details,
                    }))],
                ),
                last,
                metadata,
            }],
            Payload::Artifact(a) => {
                let append = if a.is_partial {
                    !self.open_artifacts.insert(a.artifact_id.clone())
                } else {
                    self.open_artifacts.remove(&a.artifact_id)
                };
                vec![Update::Artifact {
                    artifact: Artifact {
                        id: a.artifact_id.clone(),
                        name: a.artifact_type.clone(),
                        parts: vec![Part::Data(a.data.clone())],
                    },
                    append,
                    last_chunk: !a.is_partial,
                    metadata,
                }]
            }
            Payload::Error(e) => {
                let state = if e.recoverable {
                    A2aState::Working
                } else {
                    A2aState::Failed
                };
                let parts = vec![
                    Part::Text(e.error_message.clone()),
                    Part::Data(json!({
                        "error_type": e.error_type,
                        "error_message": e.error_message,
                        "error_code": e.error_code,
                        "context": e.context,
                        "recoverable": e.recoverable,
                    })),
                ];
                vec![Update::Status {
                    status: status(state, parts),
                    last,
                    metadata,
                }]
            }
            Payload::Complete(c) => {
                let mut parts = Vec::with_capacity(2);
                if let Some(summary) = &c.summary {
                    parts.push(Part::Text(summary.clone()));
                }
                parts.push(Part::Data(json!({
                    "summary": c.summary,
                    "execution_time_seconds": c.execution_time_seconds,
                })));
                vec![
                    Update::Artifact {
                        artifact: Artifact {
                            id: event.event_id.as_str().to_string(),
                            name: "result".to_string(),
                            parts: vec![Part::Data(c.result.clone())],
                        },
                        append: false,
                        last_chunk: true,
                        metadata: metadata.clone(),
                    },
                    Update::Status {
                        status: status(A2aState::Completed, parts),
                        last,
                        metadata,
                    },
                ]
            }
        }
    }
}

/// A task as the updates so far describe it.
#[derive(Debug)]
pub(super) struct TaskView {
    task_id: TaskId,
    tenant_id: TenantId,
    kind: &'static str,
    status: Status,
    artifacts: Vec<Artifact>,
    /// One past the last offset applied.
    pub(super) offset: u64,
}

impl TaskView {
    pub(super) fn new(queue: &EventQueue) -> Self {
        let info = queue.info();
        Self {
            task_id: queue.task_id().clone(),
            tenant_id: queue.tenant_id().clone(),
            kind: queue.kind().as_str(),
            status: Status {
                state: A2aState::Submitted,
                message: None,
                timestamp: info.created_at,
            },
            artifacts: Vec::new(),
            offset: info.first_offset,
        }
    }

    /// The task's current state.
    pub(super) fn state(&self) -> A2aState {
        self.status.state
    }

    /// When the task's status was last set: the timestamp of the event that set it, or the
    /// queue's creation while the task is SUBMITTED without events.
    pub(super) fn status_timestamp(&self) -> Timestamp {
        self.status.timestamp
    }

    pub(super) fn apply(&mut self, update: &Update) {
        match update {
            Update::Status { status, .. } => self.status = status.clone(),
            Update::Artifact {
                artifact, append, ..
            } => match self.artifacts.iter_mut().find(|a| a.id == artifact.id) {
                Some(known) if *append => known.parts.extend(artifact.parts.iter().cloned()),
                Some(known) => *known = artifact.clone(),
                None => self.artifacts.push(artifact.clone()),
            },
        }
    }
}

// ---------------------------------------------------------------------------------------------
// JSON shapes
// ---------------------------------------------------------------------------------------------

pub(super) fn part_json(part: &Part, v: Version) -> Value {
    match (v, part) {
        (Version::V1, Part::Text(t)) => json!({"text": t}),
        (Version::V1, Part::Data(d)) => json!({"data": d}),
        (Version::V03, Part::Text(t)) => json!({"kind": "text", "text": t}),
        (Version::V03, Part::Data(d)) => json!({"kind": "data", "data": d}),
    }
}

pub(super) fn parts_json(parts: &[Part], v: Version) -> Value {
    Value::Array(parts.iter().map(|p| part_json(p, v)).collect())
}

pub(super) fn status_json(status: &Status, task: &TaskId, v: Version) -> Value {
    let mut out = Map::new();
    out.insert("state".into(), status.state.name(v).into());
    if let Some(m) = &status.message {
        let mut msg = Map::new();
        if v == Version::V03 {
            msg.insert("kind".into(), "message".into());
        }
        msg.insert("messageId".into(), m.id.clone().into());
        msg.insert(
            "role".into(),
            match v {
                Version::V1 => "ROLE_AGENT",
                Version::V03 => "agent",
            }
            .into(),
        );
        msg.insert("parts".into(), parts_json(&m.parts, v));
        msg.insert("taskId".into(), task.as_str().into());
        msg.insert("contextId".into(), task.as_str().into());
        out.insert("message".into(), Value::Object(msg));
    }
    out.insert("timestamp".into(), status.timestamp.to_rfc3339().into());
    Value::Object(out)
}

pub(super) fn artifact_json(artifact: &Artifact, v: Version) -> Value {
    json!({
        "artifactId": artifact.id,
        "name": artifact.name,
        "parts": parts_json(&artifact.parts, v),
    })
}

pub(super) fn task_json(view: &TaskView, queue: &EventQueue, v: Version) -> Value {
    let cancel = queue.cancellation();
    let mut out = Map::new();
    if v == Version::V03 {
        out.insert("kind".into(), "task".into());
    }
    out.insert("id".into(), view.task_id.as_str().into());
    out.insert("contextId".into(), view.task_id.as_str().into());
    out.insert("status".into(), status_json(&view.status, &view.task_id, v));
    out.insert(
        "artifacts".into(),
        Value::Array(view.artifacts.iter().map(|a| artifact_json(a, v)).collect()),
    );
    out.insert(
        "metadata".into(),
        json!({
            "tenant_id": view.tenant_id.as_str(),
            "kind": view.kind,
            "offset": view.offset,
            "cancel_requested": cancel.is_cancelled,
            "cancel_reason": cancel.reason,
        }),
    );
    Value::Object(out)
}

/// One stream result: `{"statusUpdate": …}` / `{"artifactUpdate": …}` (1.0), or the event
/// object with its `kind` (0.3).
pub(super) fn update_json(update: &Update, task: &TaskId, v: Version) -> Value {
    let id = task.as_str();
    match (v, update) {
        (
            Version::V1,
            Update::Status {
                status, metadata, ..
            },
        ) => json!({"statusUpdate": {
            "taskId": id,
            "contextId": id,
            "status": status_json(status, task, v),
            "metadata": metadata,
        }}),
        (
            Version::V1,
            Update::Artifact {
                artifact,
                append,
                last_chunk,
                metadata,
            },
        ) => json!({"artifactUpdate": {
            "taskId": id,
            "contextId": id,
            "artifact": artifact_json(artifact, v),
            "append": append,
            "lastChunk": last_chunk,
            "metadata": metadata,
        }}),
        (
            Version::V03,
            Update::Status {
                status,
                last,
                metadata,
            },
        ) => json!({
            "kind": "status-update",
            "taskId": id,
            "contextId": id,
            "status": status_json(status, task, v),
            "final": last,
            "metadata": metadata,
        }),
        (
            Version::V03,
            Update::Artifact {
                artifact,
                append,
                last_chunk,
                metadata,
            },
        ) => json!({
            "kind": "artifact-update",
            "taskId": id,
            "contextId": id,
            "artifact": artifact_json(artifact, v),
            "append": append,
            "lastChunk": last_chunk,
            "metadata": metadata,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ArtifactEvent, CompleteEvent, ErrorEvent, ProgressEvent, StatusEvent};

    fn event(payload: impl Into<Payload>) -> Event {
        let tenant = TenantId::new("t").unwrap();
        let task = TaskId::new("job").unwrap();
        Event::new(&tenant, &task, payload)
    }

    #[test]
    fn partial_artifacts_append_after_their_first_chunk() {
        let mut m = Mapper::default();
        let chunk = |partial: bool| {
            let a = ArtifactEvent::new("rows", json!({"n": 1})).artifact_id("a1");
            event(if partial { a.partial() } else { a })
        };
        let flags: Vec<(bool, bool)> = [chunk(true), chunk(true), chunk(false), chunk(false)]
            .iter()
            .enumerate()
            .map(|(i, e)| match m.map(e, i as u64).as_slice() {
                [
                    Update::Artifact {
                        append, last_chunk, ..
                    },
                ] => (*append, *last_chunk),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            flags,
            [(false, false), (true, false), (true, true), (false, true)]
        );
    }

    #[test]
    fn every_state_and_error_maps_as_documented() {
        let mut m = Mapper::default();
        for (state, a2a) in [
            (TaskState::Pending, "TASK_STATE_SUBMITTED"),
            (TaskState::Working, "TASK_STATE_WORKING"),
            (TaskState::InputRequired, "TASK_STATE_INPUT_REQUIRED"),
            (TaskState::Completed, "TASK_STATE_COMPLETED"),
            (TaskState::Failed, "TASK_STATE_FAILED"),
            (TaskState::Cancelled, "TASK_STATE_CANCELED"),
        ] {
            let updates = m.map(&event(StatusEvent::new(state).phase("p")), 0);
            let [Update::Status { status, .. }] = updates.as_slice() else {
                panic!("not one status update: {updates:?}");
            };
            assert_eq!(status.state.name(Version::V1), a2a);
        }
        let state_of = |e: Event, m: &mut Mapper| match m.map(&e, 0).as_slice() {
            [Update::Status { status, last, .. }] => (status.state, *last),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            state_of(event(ErrorEvent::new("io", "retrying")), &mut m),
            (A2aState::Working, false)
        );
        assert_eq!(
            state_of(
                event(ErrorEvent::new("io", "gone").non_recoverable()),
                &mut m
            ),
            (A2aState::Failed, true)
        );
        assert_eq!(
            state_of(event(ProgressEvent::new(1, 4)), &mut m),
            (A2aState::Working, false)
        );
        let complete = m.map(&event(CompleteEvent::new(json!({"x": 1}))), 9);
        assert!(matches!(
            complete.as_slice(),
            [
                Update::Artifact {
                    last_chunk: true,
                    append: false,
                    ..
                },
                Update::Status {
                    status: Status {
                        state: A2aState::Completed,
                        ..
                    },
                    last: true,
                    ..
                },
            ]
        ));
    }
}
