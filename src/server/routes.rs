//! The JSON endpoints: queue administration, enqueue, cancel, health.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Path, Request, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::error::Error;
use crate::event::{Event, ProducerContext};
use crate::ids::TaskId;
use crate::queue::{EventQueue, QueueKind, QueueOptions};
use crate::server::error::ApiError;
use crate::server::limits::check_json_depth;
use crate::server::tenant::{Caller, Reach, Tenant};
use crate::server::{AppState, json};

/// The task id of a route's one path parameter, validated (`400` naming `task_id` otherwise).
#[derive(Debug, Clone)]
pub(super) struct TaskPath(pub TaskId);

impl<S: Send + Sync> FromRequestParts<S> for TaskPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path(raw) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::bad_request(format!("invalid task_id: {}", e.body_text())))?;
        Ok(Self(TaskId::new(raw)?))
    }
}

/// A request body read whole, at most [`crate::server::ServerConfig::max_body_bytes`] long
/// (`413` as soon as it exceeds that, before the rest is read), within
/// [`crate::server::ServerConfig::body_read_timeout`] (`408` otherwise).
#[derive(Debug, Clone)]
pub(super) struct RawBody(pub Bytes);

impl FromRequest<AppState> for RawBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let limit = state.config().body_read_timeout;
        tokio::time::timeout(limit, Bytes::from_request(req, state))
            .await
            .map_err(|_| {
                ApiError::timeout(format!(
                    "request body not received within {} ms",
                    limit.as_millis()
                ))
            })?
            .map(Self)
            .map_err(|e| {
                if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::too_large(format!(
                        "request body exceeds the limit of {} bytes",
                        state.config().max_body_bytes
                    ))
                } else {
                    ApiError::new(
                        e.status(),
                        format!("cannot read request body: {}", e.body_text()),
                    )
                }
            })
    }
}

/// Parses a JSON body whose nesting is at most
/// [`crate::server::ServerConfig::max_json_depth`] deep.
pub(super) fn parse_json(state: &AppState, body: &[u8]) -> Result<Value, ApiError> {
    check_json_depth(body, state.config().max_json_depth)?;
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("invalid JSON: {e}")))
}

fn lookup(state: &AppState, tenant: &Tenant, task: &TaskId) -> Result<EventQueue, ApiError> {
    state
        .manager()
        .get_queue(&tenant.0, task)
        .ok_or_else(|| ApiError::no_queue(task))
}

/// `GET /healthz`.
pub(super) async fn healthz() -> Response {
    json(&serde_json::json!({ "status": "ok" }))
}

/// `GET /events/queues`: the caller's tenant's queues (an admin token without
/// `?tenant_id=`: every tenant's).
pub(super) async fn list_queues(State(state): State<AppState>, caller: Caller) -> Response {
    match caller.reach {
        Reach::OwnTenant => json(&state.manager().list_queues(Some(&caller.tenant))),
        Reach::AllTenants => json(&state.manager().list_queues(None)),
    }
}

/// `POST /events/queues` `{task_id, kind?, ttl_minutes?, max_buffer_size?}` → `201` info.
pub(super) async fn create_queue(
    State(state): State<AppState>,
    tenant: Tenant,
    RawBody(body): RawBody,
) -> Result<Response, ApiError> {
    let Value::Object(mut map) = parse_json(&state, &body)? else {
        return Err(ApiError::bad_request(
            "the body must be a JSON object {\"task_id\", \"kind\"?, \"ttl_minutes\"?, \"max_buffer_size\"?}",
        ));
    };
    let task_id = match map.remove("task_id") {
        Some(Value::String(s)) => TaskId::new(s)?,
        None | Some(Value::Null) => return Err(ApiError::bad_request("task_id: is required")),
        Some(_) => return Err(ApiError::bad_request("task_id: must be a string")),
    };
    let mut options = QueueOptions::default();
    match map.remove("kind") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => {
            options.kind = QueueKind::parse(&s).ok_or_else(|| {
                ApiError::bad_request(format!(
                    "kind: must be one of workflow, ingestion, task; got {s:?}"
                ))
            })?;
        }
        Some(_) => return Err(ApiError::bad_request("kind: must be a string")),
    }
    match map.remove("ttl_minutes") {
        None | Some(Value::Null) => {}
        Some(Value::Number(n)) => {
            let ttl = n
                .as_f64()
                .filter(|m| *m >= 0.0)
                .and_then(|m| std::time::Duration::try_from_secs_f64(m * 60.0).ok())
                .ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "ttl_minutes: must be a number of minutes >= 0, got {n}"
                    ))
                })?;
            options.ttl = Some(ttl);
        }
        Some(_) => return Err(ApiError::bad_request("ttl_minutes: must be a number")),
    }
    match map.remove("max_buffer_size") {
        None | Some(Value::Null) => {}
        Some(Value::Number(n)) => match n.as_u64() {
            Some(m) if m >= 1 => options.max_buffer_size = Some(m),
            _ => {
                return Err(ApiError::bad_request(format!(
                    "max_buffer_size: must be an integer >= 1, got {n}"
                )));
            }
        },
        Some(_) => {
            return Err(ApiError::bad_request(
                "max_buffer_size: must be an integer >= 1",
            ));
        }
    }
    if let Some(field) = map.keys().next() {
        return Err(ApiError::bad_request(format!(
            "{field}: unknown field (expected task_id, kind, ttl_minutes, max_buffer_size)"
        )));
    }
    let manager = state.manager();
    let limit = state.config().max_queues_per_tenant;
    let existing = || manager.list_queues(Some(&tenant.0)).len();
    let _reservation = state.limits().reserve_queue(&tenant.0, limit, existing)?;
    let queue = manager.create_queue(&tenant.0, &task_id, options).await?;
    Ok((StatusCode::CREATED, axum::Json(queue.info())).into_response())
}

/// `GET /events/queues/{task_id}`.
pub(super) async fn queue_info(
    State(state): State<AppState>,
    tenant: Tenant,
    TaskPath(task): TaskPath,
) -> Result<Response, ApiError> {
    Ok(json(&lookup(&state, &tenant, &task)?.info()))
}

/// `DELETE /events/queues/{task_id}` → `204`.
pub(super) async fn delete_queue(
    State(state): State<AppState>,
    tenant: Tenant,
    TaskPath(task): TaskPath,
) -> Result<StatusCode, ApiError> {
    if state.manager().delete_queue(&tenant.0, &task).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::no_queue(&task))
    }
}

#[derive(Serialize)]
struct OffsetBody<'a> {
    task_id: &'a TaskId,
    offset: u64,
}

/// `GET /events/queues/{task_id}/offset` → `{"task_id", "offset"}`.
pub(super) async fn queue_offset(
    State(state): State<AppState>,
    tenant: Tenant,
    TaskPath(task): TaskPath,
) -> Result<Response, ApiError> {
    let queue = lookup(&state, &tenant, &task)?;
    Ok(json(&OffsetBody {
        task_id: &task,
        offset: queue.latest_offset(),
    }))
}

/// `POST /events/queues/{task_id}/close` → `200` info.
pub(super) async fn close_queue(
    State(state): State<AppState>,
    tenant: Tenant,
    TaskPath(task): TaskPath,
) -> Result<Response, ApiError> {
    let queue = lookup(&state, &tenant, &task)?;
    queue.close().await?;
    Ok(json(&queue.info()))
}

#[derive(Serialize)]
struct EnqueueBody {
    offsets: Vec<u64>,
    latest_offset: u64,
    cancelled: bool,
}

/// `POST /events/queues/{task_id}/events`: one event object or `{"events": [...]}`. Every event
/// is parsed and validated before any is enqueued, and the batch is committed atomically: a
/// batch with one invalid event stores none.
pub(super) async fn enqueue(
    State(state): State<AppState>,
    tenant: Tenant,
    TaskPath(task): TaskPath,
    RawBody(body): RawBody,
) -> Result<Response, ApiError> {
    let queue = lookup(&state, &tenant, &task)?;
    let config = state.config();
    // An event's compact JSON is no longer than its text in the body, so only a body larger
    // than the event limit can hold an event over it.
    let event_limit = (body.len() > config.max_event_bytes).then_some(config.max_event_bytes);
    let ctx = ProducerContext {
        tenant_id: &tenant.0,
        task_id: &task,
    };
    let events = match parse_json(&state, &body)? {
        Value::Object(mut map) if map.contains_key("events") => {
            let items = map.remove("events");
            if let Some(field) = map.keys().next() {
                return Err(ApiError::bad_request(format!(
                    "{field}: unknown field; a batch is {{\"events\": [...]}}"
                )));
            }
            let Some(Value::Array(items)) = items else {
                return Err(ApiError::bad_request(
                    "events: must be an array of event objects",
                ));
            };
            if items.len() > config.max_batch_events {
                return Err(ApiError::too_large(format!(
                    "events: a batch holds at most {} events, got {}",
                    config.max_batch_events,
                    items.len()
                )));
            }
            items
                .into_iter()
                .enumerate()
                .map(|(i, v)| {
                    producer_event(v, &ctx, event_limit)
                        .map_err(|e| e.context(format!("events[{i}]")))
                })
                .collect::<Result<Vec<_>, _>>()?
        }
        value => vec![producer_event(value, &ctx, event_limit)?],
    };
    let offsets = queue.enqueue_received(events).await?;
    Ok(json(&EnqueueBody {
        offsets,
        latest_offset: queue.latest_offset(),
        cancelled: queue.is_cancelled(),
    }))
}

/// Parses one event of a request body; `true` with it when the producer gave no `event_id`
/// (the store then derives one from the offset).
fn producer_event(
    value: Value,
    ctx: &ProducerContext<'_>,
    limit: Option<usize>,
) -> Result<(Event, bool), ApiError> {
    if let Some(limit) = limit {
        let len = compact_len(&value);
        if len > limit {
            return Err(ApiError::too_large(format!(
                "event JSON of {len} bytes exceeds the limit of {limit} bytes"
            )));
        }
    }
    let no_id = matches!(value.get("event_id"), None | Some(Value::Null));
    Ok((Event::from_producer_json(value, ctx)?, no_id))
}

/// Length of a value's compact JSON, without building it.
fn compact_len(value: &Value) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    // Writing to a counter cannot fail, and a `Value` always serialises.
    let _ = serde_json::to_writer(&mut count, value);
    count.0
}

/// Which cancel route was called: it words the answers.
#[derive(Debug, Clone, Copy)]
pub(super) enum TaskRoute {
    Workflow,
    Ingestion,
}

impl TaskRoute {
    fn label(self) -> &'static str {
        match self {
            TaskRoute::Workflow => "Workflow",
            TaskRoute::Ingestion => "Ingestion job",
        }
    }

    /// The seed's 404 text for this route.
    pub(super) fn not_found(self, id: &TaskId) -> ApiError {
        ApiError::not_found(match self {
            TaskRoute::Workflow => format!("No active workflow found with ID {id}"),
            TaskRoute::Ingestion => format!("No active ingestion job found with ID {id}"),
        })
    }
}

#[derive(Serialize)]
struct CancelBody<'a> {
    task_id: &'a TaskId,
    cancelled: bool,
    message: String,
}

/// `POST /events/workflows/{id}/cancel`.
pub(super) async fn cancel_workflow(
    state: State<AppState>,
    tenant: Tenant,
    task: TaskPath,
    body: RawBody,
) -> Result<Response, ApiError> {
    cancel(state, tenant, task, body, TaskRoute::Workflow).await
}

/// `POST /events/ingestion/{id}/cancel`.
pub(super) async fn cancel_ingestion(
    state: State<AppState>,
    tenant: Tenant,
    task: TaskPath,
    body: RawBody,
) -> Result<Response, ApiError> {
    cancel(state, tenant, task, body, TaskRoute::Ingestion).await
}

async fn cancel(
    State(state): State<AppState>,
    tenant: Tenant,
    TaskPath(task): TaskPath,
    RawBody(body): RawBody,
    route: TaskRoute,
) -> Result<Response, ApiError> {
    let reason = cancel_reason(&state, &body)?;
    match state
        .manager()
        .cancel_task(&tenant.0, &task, reason.as_deref())
        .await
    {
        Ok(true) => Ok(json(&CancelBody {
            task_id: &task,
            cancelled: true,
            message: format!("{} {task} cancellation requested", route.label()),
        })),
        Ok(false) => Err(route.not_found(&task)),
        Err(Error::TaskFinished { .. }) => Err(ApiError::conflict(format!(
            "{} {task} has already finished",
            route.label()
        ))),
        Err(e) => Err(e.into()),
    }
}

/// The optional `{"reason": str}` of a cancel request; an empty body has none.
fn cancel_reason(state: &AppState, body: &[u8]) -> Result<Option<String>, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let Value::Object(map) = parse_json(state, body)? else {
        return Err(ApiError::bad_request(
            "the body must be a JSON object {\"reason\": str}",
        ));
    };
    reason_field(map)
}

fn reason_field(mut map: Map<String, Value>) -> Result<Option<String>, ApiError> {
    match map.remove("reason") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(ApiError::bad_request("reason: must be a string")),
    }
}

#[derive(Serialize)]
struct CheckpointSavedBody<'a> {
    workflow_id: &'a TaskId,
    #[serde(flatten)]
    saved: crate::checkpoint::SavedCheckpoint,
    /// Whether the workflow's queue is cancelled (false without a queue), so a producer in
    /// another process learns of a cancel from its save as from an enqueue.
    cancelled: bool,
}

/// `POST /events/workflows/{id}/checkpoints`: saves a checkpoint of the caller's tenant's
/// workflow and, when its queue exists, appends the status / progress events, atomically.
/// `201 {"workflow_id", "checkpoint_id", "seq", "status_offset", "progress_offset",
/// "cancelled"}`. A workflow without a queue is not an error: the checkpoint is saved alone.
pub(super) async fn save_checkpoint(
    State(state): State<AppState>,
    tenant: Tenant,
    TaskPath(workflow): TaskPath,
    RawBody(body): RawBody,
) -> Result<Response, ApiError> {
    let value = parse_json(&state, &body)?;
    let checkpoint = crate::checkpoint::Checkpoint::from_json(value, &workflow)?;
    let store = state.manager().checkpoints(&tenant.0);
    let saved = store.save(checkpoint).await?;
    let cancelled = store.queue(&workflow).is_some_and(|q| q.is_cancelled());
    Ok((
        StatusCode::CREATED,
        axum::Json(CheckpointSavedBody {
            workflow_id: &workflow,
            saved,
            cancelled,
        }),
    )
        .into_response())
}

/// `GET /events/workflows/{id}/checkpoints/latest`: the workflow's newest checkpoint, `404`
/// when it has none (or belongs to another tenant).
pub(super) async fn latest_checkpoint(
    State(state): State<AppState>,
    tenant: Tenant,
    TaskPath(workflow): TaskPath,
) -> Result<Response, ApiError> {
    match state
        .manager()
        .checkpoints(&tenant.0)
        .latest(&workflow)
        .await?
    {
        Some(checkpoint) => Ok(json(&checkpoint)),
        None => Err(ApiError::not_found(format!(
            "No checkpoint found for workflow {workflow}"
        ))),
    }
}

/// `GET /events/workflows/{id}/checkpoints`: the workflow's retained checkpoints (its newest
/// 100), oldest first: `{"workflow_id", "checkpoints": [...]}`; an empty list when it has none
/// (or they belong to another tenant).
pub(super) async fn list_checkpoints(
    State(state): State<AppState>,
    tenant: Tenant,
    TaskPath(workflow): TaskPath,
) -> Result<Response, ApiError> {
    let checkpoints = state
        .manager()
        .checkpoints(&tenant.0)
        .list(&workflow)
        .await?;
    Ok(json(&serde_json::json!({
        "workflow_id": workflow,
        "checkpoints": checkpoints,
    })))
}
