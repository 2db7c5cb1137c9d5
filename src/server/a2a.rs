//! A2A (Agent2Agent protocol) compatibility: an agent card and a JSON-RPC 2.0 endpoint through
//! which an unmodified A2A client follows and cancels our tasks.
//!
//! - `GET /.well-known/agent-card.json`: the A2A 1.0 agent card; `?version=0.3` gives the 0.3
//!   card (top-level `url`, which makes a client speak 0.3). The card names the full URL of
//!   `POST /a2a`, built from [`A2aConfig::public_url`] or else the request's `Host` header; a
//!   `?tenant_id=` on the card request is carried into that URL. The card holds no tenant data
//!   and needs no credentials, like `/healthz`.
//! - `POST /a2a`: `GetTask`, `SubscribeToTask`, `CancelTask` (1.0) and `tasks/get`,
//!   `tasks/resubscribe`, `tasks/cancel` (0.3, with `kind` discriminators, lowercase states and
//!   `final`). Tenancy and credentials are resolved as on every other route ([`Caller`]);
//!   reading needs `subscribe`, cancelling `subscribe` or `publish`. JSON-RPC errors are
//!   answered with HTTP 200 (an A2A client loses the code of any other status).
//!
//! # Mapping
//!
//! Each of our events becomes one or two A2A stream results:
//!
//! | event | A2A |
//! |---|---|
//! | `status` | statusUpdate, state pending → SUBMITTED, working → WORKING, input-required → INPUT_REQUIRED, completed → COMPLETED, failed → FAILED, cancelled → CANCELED; the status message has a text part with `message` (when set) and a data part `{phase, message}` |
//! | `progress` | statusUpdate WORKING, data part `{current, total, percentage, step, details}` |
//! | `artifact` | artifactUpdate: `artifactId` = `artifact_id`, `name` = `artifact_type`, one data part with `data`; `lastChunk` = not `is_partial`, `append` = an earlier chunk of the same artifact was partial |
//! | `error` | recoverable: statusUpdate WORKING; non-recoverable: FAILED; text part `error_message`, data part `{error_type, error_message, error_code, context, recoverable}` |
//! | `complete` | artifactUpdate (`artifactId` = the event's `event_id`, `name` = `result`, data part `result`), then statusUpdate COMPLETED (text part `summary` when set, data part `{summary, execution_time_seconds}`) |
//!
//! Every update's `metadata` is `{offset, event_id, event_type}`; `contextId` is the task id.
//! A task is SUBMITTED until its first status-changing event.
//!
//! # Streams
//!
//! `SubscribeToTask` answers `text/event-stream` whose `data:` lines are JSON-RPC responses: the
//! task first (as of the resume point), then one result per mapped event. Frames carry no
//! `event:` name (an A2A client aborts on `event: error`); the frame completing an event carries
//! `id: <offset>`. The stream ends after the task's terminal event (or close, delete, expiry,
//! shutdown). A keepalive comment breaks every silence of [`A2A_KEEPALIVE_MAX`] (the A2A client
//! gives up after 5 s), or of [`ServerConfig::keepalive`] when that is shorter.
//!
//! Resume point: `Last-Event-ID: N` → N + 1, which wins over `params.metadata.from_offset`;
//! by default the queue's latest offset (the task, then what happens next). Subscribing to a
//! finished task (resume point past its terminal event) is error -32004.
//!
//! [`ServerConfig::keepalive`]: crate::server::ServerConfig::keepalive

use std::collections::HashSet;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequestParts, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::{BufMut, BytesMut};
use futures_util::Stream;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use tokio::time::{Instant, Interval, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::error::Error;
use crate::event::{Event, Payload, TaskState, Timestamp};
use crate::ids::{TaskId, TenantId};
use crate::queue::EventQueue;
use crate::server::AppState;
use crate::server::error::ApiError;
use crate::server::limits::check_json_depth;
use crate::server::routes::RawBody;
use crate::server::tenant::{Caller, Need};
use crate::subscription::{Delivery, RecordedEvent, Subscription};

/// Longest silence on an A2A stream: a keepalive comment is sent at least this often.
pub const A2A_KEEPALIVE_MAX: Duration = Duration::from_secs(3);

/// Appended to the card's description: A2A has no standard cursor yet.
pub const RESUME_NOTE: &str = "Resume a SubscribeToTask stream with the Last-Event-ID header \
     (the offset of the last event received) or params.metadata.from_offset (the first offset \
     to receive); every update carries its offset in metadata.offset.";

const KEEPALIVE: &[u8] = b": keepalive\n\n";

/// Settings of the A2A agent card.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct A2aConfig {
    /// The card's `name`. Default `eventqueue`.
    pub name: String,
    /// The card's `description`; [`RESUME_NOTE`] is always appended. Default: a sentence on
    /// what this server does.
    pub description: String,
    /// The card's `version`. Default: this crate's version.
    pub version: String,
    /// The server's public base URL (`https://events.example.com`), from which the card's
    /// JSON-RPC URL is built as `{public_url}/a2a`. Default: none, the request's `Host` header
    /// (`http://{host}/a2a`).
    pub public_url: Option<String>,
}

impl Default for A2aConfig {
    fn default() -> Self {
        Self {
            name: "eventqueue".to_string(),
            description: "Durable event log of task progress: follow a task's status, progress \
                          and artifacts live, and cancel it."
                .to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            public_url: None,
        }
    }
}

/// Checks a public base URL for [`A2aConfig::public_url`]: `http://` or `https://`, a host,
/// no query or fragment. Returns it without a trailing `/`.
///
/// # Errors
///
/// A message naming what is wrong.
pub fn check_public_url(url: &str) -> Result<String, String> {
    let trimmed = url.trim().trim_end_matches('/');
    let bad = |why: &str| format!("a2a_public_url: {why}, got {url:?}");
    let uri: axum::http::Uri = trimmed.parse().map_err(|_| bad("not a valid URL"))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err(bad("must start with http:// or https://")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(bad("needs a host"));
    }
    if uri.query().is_some() || trimmed.contains('#') {
        return Err(bad("must not have a query or fragment"));
    }
    Ok(trimmed.to_string())
}

// ---------------------------------------------------------------------------------------------
// Protocol versions and the version-neutral model
// ---------------------------------------------------------------------------------------------

/// The protocol version a request speaks (from its method name) or a card is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Version {
    V1,
    V03,
}

/// An A2A task state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum A2aState {
    Submitted,
    Working,
    InputRequired,
    Completed,
    Failed,
    Canceled,
}

impl A2aState {
    fn of(state: TaskState) -> Self {
        match state {
            TaskState::Pending => Self::Submitted,
            TaskState::Working => Self::Working,
            TaskState::InputRequired => Self::InputRequired,
            TaskState::Completed => Self::Completed,
            TaskState::Failed => Self::Failed,
            TaskState::Cancelled => Self::Canceled,
        }
    }

    fn name(self, v: Version) -> &'static str {
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
}

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Text(String),
    Data(Value),
}

#[derive(Debug, Clone, PartialEq)]
struct Message {
    id: String,
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq)]
struct Status {
    state: A2aState,
    message: Option<Message>,
    timestamp: Timestamp,
}

#[derive(Debug, Clone, PartialEq)]
struct Artifact {
    id: String,
    name: String,
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq)]
enum Update {
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
struct Mapper {
    open_artifacts: HashSet<String>,
}

impl Mapper {
    fn map(&mut self, event: &Event, offset: u64) -> Vec<Update> {
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
struct TaskView {
    task_id: TaskId,
    tenant_id: TenantId,
    kind: &'static str,
    status: Status,
    artifacts: Vec<Artifact>,
    /// One past the last offset applied.
    offset: u64,
}

impl TaskView {
    fn new(queue: &EventQueue) -> Self {
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

    fn apply(&mut self, update: &Update) {
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

fn part_json(part: &Part, v: Version) -> Value {
    match (v, part) {
        (Version::V1, Part::Text(t)) => json!({"text": t}),
        (Version::V1, Part::Data(d)) => json!({"data": d}),
        (Version::V03, Part::Text(t)) => json!({"kind": "text", "text": t}),
        (Version::V03, Part::Data(d)) => json!({"kind": "data", "data": d}),
    }
}

fn parts_json(parts: &[Part], v: Version) -> Value {
    Value::Array(parts.iter().map(|p| part_json(p, v)).collect())
}

fn status_json(status: &Status, task: &TaskId, v: Version) -> Value {
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

fn artifact_json(artifact: &Artifact, v: Version) -> Value {
    json!({
        "artifactId": artifact.id,
        "name": artifact.name,
        "parts": parts_json(&artifact.parts, v),
    })
}

fn task_json(view: &TaskView, queue: &EventQueue, v: Version) -> Value {
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
fn update_json(update: &Update, task: &TaskId, v: Version) -> Value {
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

// ---------------------------------------------------------------------------------------------
// Agent card
// ---------------------------------------------------------------------------------------------

/// Query parameters of the card.
#[derive(Debug, Deserialize)]
pub(super) struct CardParams {
    version: Option<String>,
    tenant_id: Option<String>,
}

/// `GET /.well-known/agent-card.json`.
pub(super) async fn agent_card(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<CardParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(params) = query
        .map_err(|e| ApiError::bad_request(format!("invalid query string: {}", e.body_text())))?;
    let version = match params.version.as_deref().map(str::trim) {
        None | Some("1.0" | "1" | "") => Version::V1,
        Some("0.3" | "0.3.0") => Version::V03,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "version: expected 1.0 or 0.3, got {:?}",
                other.chars().take(40).collect::<String>()
            )));
        }
    };
    let mut url = format!("{}/a2a", base_url(&state, &headers)?);
    if let Some(tenant) = params.tenant_id {
        let tenant = TenantId::new(tenant)?;
        url.push_str("?tenant_id=");
        url.push_str(tenant.as_str());
    }
    Ok(super::json(&card(&state, version, &url)))
}

/// `{public_url}` without a trailing `/`, else `http://{Host}`.
fn base_url(state: &AppState, headers: &HeaderMap) -> Result<String, ApiError> {
    if let Some(url) = &state.config().a2a.public_url {
        return Ok(url.trim_end_matches('/').to_string());
    }
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.parse::<axum::http::uri::Authority>().ok())
        .ok_or_else(|| {
            ApiError::bad_request(
                "the agent card needs a valid Host header, or a configured a2a_public_url",
            )
        })?;
    Ok(format!("http://{host}"))
}

fn card(state: &AppState, v: Version, url: &str) -> Value {
    let config = &state.config().a2a;
    let description = if config.description.trim().is_empty() {
        RESUME_NOTE.to_string()
    } else {
        format!("{} {RESUME_NOTE}", config.description.trim_end())
    };
    let skill = json!({
        "id": "task-progress",
        "name": "Task progress",
        "description": "Follow a task's status, progress, artifacts and result (GetTask, \
                        SubscribeToTask), and ask its producer to stop (CancelTask). The task \
                        id is the eventqueue task id.",
        "tags": ["progress", "events", "tasks"],
    });
    let token_mode = state.config().auth.is_token_mode();
    let mut out = Map::new();
    out.insert("name".into(), config.name.clone().into());
    out.insert("description".into(), description.into());
    out.insert("version".into(), config.version.clone().into());
    match v {
        Version::V1 => {
            out.insert(
                "supportedInterfaces".into(),
                json!([{"url": url, "protocolBinding": "JSONRPC", "protocolVersion": "1.0"}]),
            );
        }
        Version::V03 => {
            out.insert("url".into(), url.into());
            out.insert("preferredTransport".into(), "JSONRPC".into());
            out.insert("protocolVersion".into(), "0.3.0".into());
        }
    }
    out.insert(
        "capabilities".into(),
        json!({"streaming": true, "pushNotifications": false}),
    );
    out.insert("defaultInputModes".into(), json!(["application/json"]));
    out.insert("defaultOutputModes".into(), json!(["application/json"]));
    out.insert("skills".into(), json!([skill]));
    if token_mode {
        let description = "HS256 JWT with the claims tenant_id, scope (subscribe, publish) and exp";
        match v {
            Version::V1 => {
                out.insert(
                    "securitySchemes".into(),
                    json!({"bearer": {"httpAuthSecurityScheme": {
                        "scheme": "Bearer", "bearerFormat": "JWT", "description": description,
                    }}}),
                );
                out.insert(
                    "securityRequirements".into(),
                    json!([{"schemes": {"bearer": {"list": []}}}]),
                );
            }
            Version::V03 => {
                out.insert(
                    "securitySchemes".into(),
                    json!({"bearer": {
                        "type": "http", "scheme": "bearer", "bearerFormat": "JWT",
                        "description": description,
                    }}),
                );
                out.insert("security".into(), json!([{"bearer": []}]));
            }
        }
    }
    Value::Object(out)
}

// ---------------------------------------------------------------------------------------------
// JSON-RPC
// ---------------------------------------------------------------------------------------------

const PARSE_ERROR: i64 = -32700;
const INVALID_REQUEST: i64 = -32600;
const METHOD_NOT_FOUND: i64 = -32601;
const INVALID_PARAMS: i64 = -32602;
const INTERNAL_ERROR: i64 = -32603;
const TASK_NOT_FOUND: i64 = -32001;
const TASK_NOT_CANCELABLE: i64 = -32002;
const PUSH_NOT_SUPPORTED: i64 = -32003;
const UNSUPPORTED_OPERATION: i64 = -32004;
const EXTENDED_CARD_NOT_CONFIGURED: i64 = -32007;

/// A JSON-RPC error answer (HTTP 200).
#[derive(Debug, Clone, PartialEq)]
struct RpcError {
    id: Value,
    code: i64,
    message: String,
}

impl RpcError {
    fn new(id: &Value, code: i64, message: impl Into<String>) -> Self {
        Self {
            id: id.clone(),
            code,
            message: message.into(),
        }
    }

    fn internal(id: &Value, err: &Error) -> Self {
        tracing::error!(error = %err, "A2A request failed");
        Self::new(id, INTERNAL_ERROR, "internal error")
    }
}

impl IntoResponse for RpcError {
    fn into_response(self) -> Response {
        super::json(&json!({
            "jsonrpc": "2.0",
            "id": self.id,
            "error": {"code": self.code, "message": self.message},
        }))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    Get(Version),
    Subscribe(Version),
    Cancel(Version),
    /// A method of the protocol this server does not offer: its error code and why.
    Unsupported(i64, &'static str),
}

impl Method {
    fn parse(name: &str) -> Option<Self> {
        const NO_MESSAGES: &str =
            "this agent follows tasks that producers run; it does not take messages";
        const NO_PUSH: &str = "push notifications are not supported; use SubscribeToTask";
        Some(match name {
            "GetTask" => Self::Get(Version::V1),
            "SubscribeToTask" => Self::Subscribe(Version::V1),
            "CancelTask" => Self::Cancel(Version::V1),
            "tasks/get" => Self::Get(Version::V03),
            "tasks/resubscribe" => Self::Subscribe(Version::V03),
            "tasks/cancel" => Self::Cancel(Version::V03),
            "SendMessage" | "SendStreamingMessage" | "message/send" | "message/stream" => {
                Self::Unsupported(UNSUPPORTED_OPERATION, NO_MESSAGES)
            }
            "ListTasks" => Self::Unsupported(
                UNSUPPORTED_OPERATION,
                "ListTasks is not supported; list queues with GET /events/queues",
            ),
            "GetExtendedAgentCard" | "agent/getAuthenticatedExtendedCard" => Self::Unsupported(
                EXTENDED_CARD_NOT_CONFIGURED,
                "there is no extended agent card",
            ),
            "CreateTaskPushNotificationConfig"
            | "GetTaskPushNotificationConfig"
            | "ListTaskPushNotificationConfigs"
            | "DeleteTaskPushNotificationConfig"
            | "tasks/pushNotificationConfig/set"
            | "tasks/pushNotificationConfig/get"
            | "tasks/pushNotificationConfig/list"
            | "tasks/pushNotificationConfig/delete" => {
                Self::Unsupported(PUSH_NOT_SUPPORTED, NO_PUSH)
            }
            _ => return None,
        })
    }

    fn need(self) -> Need {
        match self {
            Self::Get(_) | Self::Subscribe(_) => Need::Subscribe,
            Self::Cancel(_) | Self::Unsupported(..) => Need::Either,
        }
    }
}

/// A parsed request. `id` is `None` for a notification.
#[derive(Debug)]
struct RpcRequest {
    id: Option<Value>,
    method: Method,
    params: Value,
}

impl RpcRequest {
    /// The id to answer with (`null` for a notification, which gets no answer anyway).
    fn reply_id(&self) -> Value {
        self.id.clone().unwrap_or(Value::Null)
    }
}

fn parse_request(body: &[u8], max_depth: usize) -> Result<RpcRequest, RpcError> {
    let null = Value::Null;
    check_json_depth(body, max_depth)
        .map_err(|e| RpcError::new(&null, PARSE_ERROR, e.detail().to_string()))?;
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| RpcError::new(&null, PARSE_ERROR, format!("invalid JSON: {e}")))?;
    let mut object = match value {
        Value::Object(o) => o,
        Value::Array(_) => {
            return Err(RpcError::new(
                &null,
                INVALID_REQUEST,
                "batch requests are not supported",
            ));
        }
        _ => {
            return Err(RpcError::new(
                &null,
                INVALID_REQUEST,
                "a request must be a JSON object",
            ));
        }
    };
    let id = match object.remove("id") {
        None => None,
        Some(id @ (Value::String(_) | Value::Number(_) | Value::Null)) => Some(id),
        Some(_) => {
            return Err(RpcError::new(
                &null,
                INVALID_REQUEST,
                "id: must be a string, a number or null",
            ));
        }
    };
    let reply_id = id.clone().unwrap_or(Value::Null);
    if object.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return Err(RpcError::new(
            &reply_id,
            INVALID_REQUEST,
            "jsonrpc: must be \"2.0\"",
        ));
    }
    let name = match object.get("method") {
        Some(Value::String(name)) => name,
        _ => {
            return Err(RpcError::new(
                &reply_id,
                INVALID_REQUEST,
                "method: must be a string",
            ));
        }
    };
    let method = Method::parse(name).ok_or_else(|| {
        RpcError::new(
            &reply_id,
            METHOD_NOT_FOUND,
            format!(
                "method not found: {:?}",
                name.chars().take(60).collect::<String>()
            ),
        )
    })?;
    let params = object.remove("params").unwrap_or(Value::Null);
    Ok(RpcRequest { id, method, params })
}

/// The task id and the parameters of a task method, validated.
struct TaskParams {
    task: TaskId,
    metadata: Map<String, Value>,
}

fn task_params(req: &RpcRequest, caller: &Caller) -> Result<TaskParams, RpcError> {
    let id = req.reply_id();
    let invalid = |msg: String| RpcError::new(&id, INVALID_PARAMS, msg);
    let Value::Object(params) = &req.params else {
        return Err(invalid("params: must be an object with the task id".into()));
    };
    let task = match params.get("id") {
        Some(Value::String(s)) => TaskId::new(s).map_err(|e| invalid(format!("params.id: {e}")))?,
        _ => {
            return Err(invalid(
                "params.id: the task id (a string) is required".into(),
            ));
        }
    };
    // A 1.0 request may name a tenant; the tenant comes from the credentials or the tenant
    // header / query, as on every route, so a different one is refused rather than ignored.
    if let Some(tenant) = params.get("tenant") {
        match tenant.as_str() {
            None => return Err(invalid("params.tenant: must be a string".into())),
            Some("") => {}
            Some(t) if t == caller.tenant.as_str() => {}
            Some(t) => {
                return Err(invalid(format!(
                    "params.tenant: this request acts for tenant {}, not {:?} (the tenant comes \
                     from the token, X-Tenant-ID or ?tenant_id=)",
                    caller.tenant,
                    t.chars().take(60).collect::<String>()
                )));
            }
        }
    }
    let metadata = match params.get("metadata") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(_) => return Err(invalid("params.metadata: must be an object".into())),
    };
    Ok(TaskParams { task, metadata })
}

fn lookup(
    state: &AppState,
    caller: &Caller,
    task: &TaskId,
    id: &Value,
) -> Result<EventQueue, RpcError> {
    state
        .manager()
        .get_queue(&caller.tenant, task)
        .ok_or_else(|| RpcError::new(id, TASK_NOT_FOUND, format!("task not found: {task}")))
}

/// Resolves the caller before the body is read: every A2A method needs `subscribe` or
/// `publish`, so a caller with neither (or without valid credentials) is refused at once.
pub(super) struct Authenticated;

impl FromRequestParts<AppState> for Authenticated {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        Caller::resolve_for(parts, state, Need::Either).map(|_| Self)
    }
}

/// `POST /a2a`.
pub(super) async fn rpc(
    State(state): State<AppState>,
    _auth: Authenticated,
    parts: Parts,
    RawBody(body): RawBody,
) -> Response {
    let req = match parse_request(&body, state.config().max_json_depth) {
        Ok(req) => req,
        Err(e) => return e.into_response(),
    };
    // The scope the method needs (GetTask reads; CancelTask needs either scope).
    let caller = match Caller::resolve_for(&parts, &state, req.method.need()) {
        Ok(caller) => caller,
        Err(e) => return e.into_response(),
    };
    if req.id.is_none() {
        // A notification gets no answer; every method here answers, so none is carried out.
        return StatusCode::NO_CONTENT.into_response();
    }
    let result = match req.method {
        Method::Get(v) => get_task(&state, &caller, &req, v).await,
        Method::Cancel(v) => cancel_task(&state, &caller, &req, v).await,
        Method::Subscribe(v) => subscribe(&state, &caller, &parts.headers, &req, v).await,
        Method::Unsupported(code, why) => Err(RpcError::new(&req.reply_id(), code, why)),
    };
    result.unwrap_or_else(IntoResponse::into_response)
}

fn success(id: &Value, result: Value) -> Response {
    super::json(&json!({"jsonrpc": "2.0", "id": id, "result": result}))
}

async fn get_task(
    state: &AppState,
    caller: &Caller,
    req: &RpcRequest,
    v: Version,
) -> Result<Response, RpcError> {
    let id = req.reply_id();
    let params = task_params(req, caller)?;
    let queue = lookup(state, caller, &params.task, &id)?;
    let task = current_task(&queue, &params.task, &id, v).await?;
    Ok(success(&id, task))
}

async fn cancel_task(
    state: &AppState,
    caller: &Caller,
    req: &RpcRequest,
    v: Version,
) -> Result<Response, RpcError> {
    let id = req.reply_id();
    let params = task_params(req, caller)?;
    let queue = lookup(state, caller, &params.task, &id)?;
    let reason = match params.metadata.get("reason") {
        None | Some(Value::Null) => None,
        Some(Value::String(r)) => Some(r.clone()),
        Some(_) => {
            return Err(RpcError::new(
                &id,
                INVALID_PARAMS,
                "params.metadata.reason: must be a string",
            ));
        }
    };
    match queue.cancel(reason.as_deref()).await {
        Ok(()) => {}
        Err(Error::TaskFinished { .. }) => {
            return Err(RpcError::new(
                &id,
                TASK_NOT_CANCELABLE,
                format!("task {} is finished and cannot be canceled", params.task),
            ));
        }
        Err(Error::QueueNotFound { .. }) => {
            return Err(RpcError::new(
                &id,
                TASK_NOT_FOUND,
                format!("task not found: {}", params.task),
            ));
        }
        Err(e) => return Err(RpcError::internal(&id, &e)),
    }
    tracing::info!(tenant = %caller.tenant, task = %params.task, "A2A cancel requested");
    let task = current_task(&queue, &params.task, &id, v).await?;
    Ok(success(&id, task))
}

/// The task as of now, in `v`'s shape.
async fn current_task(
    queue: &EventQueue,
    task: &TaskId,
    id: &Value,
    v: Version,
) -> Result<Value, RpcError> {
    let sub = subscribe_from_start(queue, task, id)?;
    let upto = sub.latest_offset_at_start();
    let snapshot = Snapshot::read(queue, sub, upto)
        .await
        .map_err(|e| RpcError::internal(id, &e))?;
    Ok(task_json(&snapshot.view, queue, v))
}

fn subscribe_from_start(
    queue: &EventQueue,
    task: &TaskId,
    id: &Value,
) -> Result<Subscription, RpcError> {
    queue.subscribe(queue.first_offset()).map_err(|e| match e {
        Error::QueueNotFound { .. } => {
            RpcError::new(id, TASK_NOT_FOUND, format!("task not found: {task}"))
        }
        other => RpcError::internal(id, &other),
    })
}

/// A task read from the start of its retained events up to an offset, with the subscription
/// that continues after it.
struct Snapshot {
    view: TaskView,
    mapper: Mapper,
    sub: Subscription,
    /// The first event at or past the offset, read while looking for the end.
    next: Option<Arc<RecordedEvent>>,
}

impl Snapshot {
    /// Reads `sub` (from the queue's first retained offset) up to `upto`, exclusive, never
    /// waiting for events past the queue's latest offset when `sub` started.
    async fn read(queue: &EventQueue, mut sub: Subscription, upto: u64) -> crate::Result<Self> {
        let mut view = TaskView::new(queue);
        let mut mapper = Mapper::default();
        let end = upto.min(sub.latest_offset_at_start());
        let mut next = None;
        if sub.first_offset() < end {
            while let Some(delivery) = sub.next().await {
                let Delivery::Event(ev) = delivery? else {
                    continue;
                };
                if ev.offset() >= end {
                    next = Some(ev);
                    break;
                }
                for update in mapper.map(&ev.event()?, ev.offset()) {
                    view.apply(&update);
                }
                view.offset = ev.offset() + 1;
                if view.offset >= end {
                    break;
                }
            }
        }
        Ok(Self {
            view,
            mapper,
            sub,
            next,
        })
    }
}

/// The resume point of a subscribe request: `Last-Event-ID: N` → N + 1, else
/// `params.metadata.from_offset`, else `None` (the latest offset).
fn resume_point(
    headers: &HeaderMap,
    metadata: &Map<String, Value>,
    id: &Value,
) -> Result<Option<u64>, RpcError> {
    let invalid = |msg: &str| RpcError::new(id, INVALID_PARAMS, msg);
    if let Some(value) = headers.get("last-event-id") {
        let text = value
            .to_str()
            .map_err(|_| invalid("Last-Event-ID: must be an event offset"))?
            .trim();
        if !text.is_empty() {
            return text
                .parse::<u64>()
                .ok()
                .and_then(|n| n.checked_add(1))
                .map(Some)
                .ok_or_else(|| invalid("Last-Event-ID: must be an event offset"));
        }
    }
    match metadata.get("from_offset") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_u64()
            .map(Some)
            .ok_or_else(|| invalid("params.metadata.from_offset: must be a non-negative integer")),
        Some(Value::String(s)) => s
            .trim()
            .parse::<u64>()
            .map(Some)
            .map_err(|_| invalid("params.metadata.from_offset: must be a non-negative integer")),
        Some(_) => Err(invalid(
            "params.metadata.from_offset: must be a non-negative integer",
        )),
    }
}

async fn subscribe(
    state: &AppState,
    caller: &Caller,
    headers: &HeaderMap,
    req: &RpcRequest,
    v: Version,
) -> Result<Response, RpcError> {
    let id = req.reply_id();
    let params = task_params(req, caller)?;
    let resume = resume_point(headers, &params.metadata, &id)?;
    let shutdown = state.shutdown_token().clone();
    if shutdown.is_cancelled() {
        return Err(RpcError::new(
            &id,
            INTERNAL_ERROR,
            "the server is shutting down",
        ));
    }
    let queue = lookup(state, caller, &params.task, &id)?;
    let sub = subscribe_from_start(&queue, &params.task, &id)?;
    let from = resume.unwrap_or_else(|| sub.latest_offset_at_start());
    if queue.finished_at().is_some_and(|f| from > f) {
        return Err(RpcError::new(
            &id,
            UNSUPPORTED_OPERATION,
            format!(
                "task {} is finished: there is nothing to subscribe to (GetTask reads it)",
                params.task
            ),
        ));
    }
    let config = state.config();
    if let Err(e) = state.limits().open_stream(
        &caller.tenant,
        config.max_sse_streams,
        config.max_sse_streams_per_tenant,
    ) {
        return Ok(e.into_response());
    }
    let guard = StreamGuard {
        state: state.clone(),
        tenant: caller.tenant.clone(),
    };
    let snapshot = Snapshot::read(&queue, sub, from)
        .await
        .map_err(|e| RpcError::internal(&id, &e))?;
    let mut first = BytesMut::new();
    put_frame(
        &mut first,
        None,
        &json!({
            "jsonrpc": "2.0",
            "id": id,
            "result": match v {
                Version::V1 => json!({"task": task_json(&snapshot.view, &queue, v)}),
                Version::V03 => task_json(&snapshot.view, &queue, v),
            },
        }),
    );
    let period = keepalive_period(config.keepalive);
    let mut keepalive = tokio::time::interval_at(Instant::now() + period, period);
    keepalive.set_missed_tick_behavior(MissedTickBehavior::Delay);
    tracing::debug!(tenant = %caller.tenant, task = %params.task, from, "A2A stream opened");
    let live = LiveStream {
        sub: snapshot.sub,
        next: snapshot.next,
        mapper: snapshot.mapper,
        task: params.task,
        id,
        version: v,
        from,
        keepalive,
        shutdown,
        _guard: guard,
    };
    let body = futures_util::StreamExt::chain(
        futures_util::stream::once(std::future::ready(Ok::<_, Infallible>(first.freeze()))),
        live.into_stream(),
    );
    Ok((
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (
                header::HeaderName::from_static("x-accel-buffering"),
                HeaderValue::from_static("no"),
            ),
        ],
        Body::from_stream(body),
    )
        .into_response())
}

/// The keepalive interval of A2A streams: the server's, but at most [`A2A_KEEPALIVE_MAX`].
fn keepalive_period(configured: Duration) -> Duration {
    configured
        .min(A2A_KEEPALIVE_MAX)
        .max(Duration::from_millis(1))
}

/// Appends one SSE frame: an optional `id:` line and one `data:` line (compact JSON has no
/// line breaks). No `event:` name: an A2A client aborts on `event: error`.
fn put_frame(out: &mut BytesMut, id: Option<u64>, data: &Value) {
    use std::io::Write;
    if let Some(id) = id {
        let _ = writeln!((&mut *out).writer(), "id: {id}");
    }
    out.put_slice(b"data: ");
    // Serialising a JSON value into memory cannot fail.
    let _ = serde_json::to_writer((&mut *out).writer(), data);
    out.put_slice(b"\n\n");
}

/// Gives a stream's slot back when its body is dropped.
struct StreamGuard {
    state: AppState,
    tenant: TenantId,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.state.limits().close_stream(&self.tenant);
    }
}

/// The live part of a subscribe stream.
struct LiveStream {
    sub: Subscription,
    next: Option<Arc<RecordedEvent>>,
    mapper: Mapper,
    task: TaskId,
    id: Value,
    version: Version,
    /// Events below this offset update the mapper but are not sent.
    from: u64,
    keepalive: Interval,
    shutdown: CancellationToken,
    _guard: StreamGuard,
}

enum Step {
    Send(Bytes),
    Skip,
    End,
}

impl LiveStream {
    fn into_stream(self) -> impl Stream<Item = Result<Bytes, Infallible>> + Send + 'static {
        futures_util::stream::unfold(self, |mut st| async move {
            loop {
                let delivery = match st.next.take() {
                    Some(ev) => Some(Ok(Delivery::Event(ev))),
                    None => tokio::select! {
                        biased;
                        () = st.shutdown.cancelled() => return None,
                        delivery = st.sub.next() => delivery,
                        _ = st.keepalive.tick() => {
                            return Some((Ok(Bytes::from_static(KEEPALIVE)), st));
                        }
                    },
                };
                match st.step(delivery) {
                    Step::Send(bytes) => {
                        st.keepalive.reset();
                        return Some((Ok(bytes), st));
                    }
                    Step::Skip => {}
                    Step::End => return None,
                }
            }
        })
    }

    fn step(&mut self, delivery: Option<crate::Result<Delivery>>) -> Step {
        let ev = match delivery {
            None => return Step::End,
            Some(Err(e)) => {
                tracing::error!(error = %e, "A2A stream ended by a read error");
                return Step::End;
            }
            Some(Ok(Delivery::Gap { .. })) => return Step::Skip,
            Some(Ok(Delivery::Event(ev))) => ev,
        };
        let event = match ev.event() {
            Ok(event) => event,
            Err(e) => {
                tracing::error!(error = %e, offset = ev.offset(), "A2A stream: unreadable event");
                return Step::End;
            }
        };
        let updates = self.mapper.map(&event, ev.offset());
        if ev.offset() < self.from {
            return Step::Skip;
        }
        let mut out = BytesMut::new();
        let count = updates.len();
        for (i, update) in updates.iter().enumerate() {
            // The frame that completes the event carries its offset, for Last-Event-ID.
            let id = (i + 1 == count).then_some(ev.offset());
            put_frame(
                &mut out,
                id,
                &json!({
                    "jsonrpc": "2.0",
                    "id": self.id,
                    "result": update_json(update, &self.task, self.version),
                }),
            );
        }
        Step::Send(out.freeze())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{ArtifactEvent, CompleteEvent, ErrorEvent, ProgressEvent, StatusEvent};

    fn event(payload: impl Into<Payload>) -> Event {
        let tenant = TenantId::new("t").unwrap();
        let task = TaskId::new("job").unwrap();
        Event::new(&tenant, &task, payload)
    }

    #[test]
    fn a2a_streams_keep_alive_at_least_every_3_s() {
        assert_eq!(keepalive_period(Duration::from_secs(15)), A2A_KEEPALIVE_MAX);
        assert_eq!(A2A_KEEPALIVE_MAX, Duration::from_secs(3));
        assert_eq!(
            keepalive_period(Duration::from_millis(50)),
            Duration::from_millis(50)
        );
    }

    #[test]
    fn public_urls_are_checked() {
        assert_eq!(
            check_public_url("https://events.example.com/").unwrap(),
            "https://events.example.com"
        );
        for bad in ["events.example.com", "ftp://x", "http://x/?a=1", "http://"] {
            assert!(check_public_url(bad).is_err(), "{bad}");
        }
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
