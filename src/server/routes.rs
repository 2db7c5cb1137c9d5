//! The JSON endpoints: queue administration, enqueue, cancel, health.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::cell::Cell;

use crate::error::Error;
use crate::event::{
    self, Failure, FieldError, FromFieldError, ObjectSeed, ProducerContext, ReadObject, Received,
    ReceivedReader,
};
use crate::ids::TaskId;
use crate::listing::{
    DEFAULT_PAGE_SIZE, ListCursor, MAX_PAGE_SIZE, PageRequest, QueueFilter, RunState,
};
use crate::queue::{EventQueue, QueueInfo, QueueKind, QueueOptions};
use crate::server::error::ApiError;
use crate::server::limits::check_json;
use crate::server::stream::preview;
use crate::server::tenant::{Caller, Reach, Tenant};
use crate::server::{AppState, ServerConfig, json};

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
/// (`413` before anything is read when its `Content-Length` says more, else as soon as it
/// exceeds that), within [`crate::server::ServerConfig::body_read_timeout`] (`408`
/// otherwise). While it is read it holds its share of
/// [`crate::server::ServerConfig::max_body_bytes_in_flight`] (`503` when that is taken).
#[derive(Debug, Clone)]
pub(super) struct RawBody(pub Bytes);

impl FromRequest<AppState> for RawBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let max = state.config().max_body_bytes;
        // hyper has checked that the header is one valid length.
        let declared = req
            .headers()
            .get(axum::http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if let Some(n) = declared
            && n > max as u64
        {
            return Err(ApiError::too_large(format!(
                "request body exceeds the limit of {max} bytes (Content-Length: {n})"
            )));
        }
        // A body without a declared length may grow to the limit: it reserves that much.
        let reserve = declared.map_or(max, |n| usize::try_from(n).unwrap_or(max));
        let _room = state.bodies().take(reserve)?;
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
    check_json(body, state.config().max_json_depth)?;
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("invalid JSON: {e}")))
}

/// An enqueue body's error: text that is not JSON is said so; anything else is about the event.
impl FromFieldError for ApiError {
    fn from_field_error(e: FieldError) -> Self {
        match e {
            FieldError::Syntax(_) => ApiError::bad_request(e.to_string()),
            e => Error::from_field_error(e).into(),
        }
    }
}

/// Reads a JSON body (nested at most [`crate::server::ServerConfig::max_json_depth`] deep)
/// into the request struct `T`; errors name the field. `shape` describes the object for a
/// body that is not one.
fn read_body<'b, T: Deserialize<'b>>(
    state: &AppState,
    body: &'b [u8],
    shape: &str,
) -> Result<T, ApiError> {
    check_json(body, state.config().max_json_depth)?;
    event::struct_from_slice(body).map_err(|e| match e {
        FieldError::NotObject(_) => {
            ApiError::bad_request(format!("the body must be a JSON object {shape}"))
        }
        e => ApiError::bad_request(e.to_string()),
    })
}

pub(super) async fn lookup(
    state: &AppState,
    tenant: &Tenant,
    task: &TaskId,
) -> Result<EventQueue, ApiError> {
    state
        .manager()
        .find_queue(&tenant.0, task)
        .await?
        .ok_or_else(|| ApiError::no_queue(task))
}

/// `GET /healthz`: 200 `{"status":"ok"}`, or 503 with the reason while the store cannot be
/// reached (a Redis server that is down), so a load balancer sends requests elsewhere.
pub(super) async fn healthz(State(state): State<AppState>) -> Response {
    match state.manager().check_storage().await {
        Ok(()) => json(&serde_json::json!({ "status": "ok" })),
        Err(e) => ApiError::from(e).into_response(),
    }
}

/// The query of `GET /events/queues`; other parameters (`tenant_id`, `access_token`) are the
/// caller's and are read elsewhere.
#[derive(Debug, Deserialize)]
pub(super) struct ListParams {
    limit: Option<String>,
    cursor: Option<String>,
    kind: Option<String>,
    state: Option<String>,
    task_id_prefix: Option<String>,
}

type ListQuery = Result<Query<ListParams>, axum::extract::rejection::QueryRejection>;

/// A page of `GET /events/queues`.
#[derive(Serialize)]
struct PageBody {
    queues: Vec<QueueInfo>,
    next_cursor: Option<String>,
}

/// `GET /events/queues`: the caller's tenant's queues (an admin token without `?tenant_id=`:
/// every tenant's), filtered by `kind`, `state` (comma-separated lists) and `task_id_prefix`.
///
/// With `limit` or `cursor` the answer is one page, newest activity first:
/// `{"queues": [...], "next_cursor": str|null}` (`cursor=` empty or absent: the first page;
/// `limit` default [`DEFAULT_PAGE_SIZE`], at most [`MAX_PAGE_SIZE`]). Without either it is the
/// plain array of every matching queue, sorted by tenant then task, as before paging existed.
pub(super) async fn list_queues(
    State(state): State<AppState>,
    caller: Caller,
    query: ListQuery,
) -> Result<Response, ApiError> {
    let Query(params) = query
        .map_err(|e| ApiError::bad_request(format!("invalid query string: {}", e.body_text())))?;
    let tenant = match caller.reach {
        Reach::OwnTenant => Some(&caller.tenant),
        Reach::AllTenants => None,
    };
    let filter = QueueFilter {
        kinds: parse_list(
            params.kind.as_deref(),
            "kind",
            QueueKind::parse,
            QueueKind::as_str,
            &[QueueKind::Workflow, QueueKind::Ingestion, QueueKind::Task],
        )?,
        states: parse_list(
            params.state.as_deref(),
            "state",
            RunState::parse,
            RunState::as_str,
            &RunState::ALL,
        )?,
        task_id_prefix: params.task_id_prefix.unwrap_or_default(),
    };
    if params.limit.is_none() && params.cursor.is_none() {
        let mut queues = state.manager().list_queues(tenant);
        queues.retain(|info| filter.matches(info));
        return Ok(json(&queues));
    }
    let limit = match params.limit.as_deref() {
        None => DEFAULT_PAGE_SIZE,
        Some(text) => text
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_PAGE_SIZE).contains(n))
            .ok_or_else(|| {
                ApiError::bad_request(format!(
                    "limit: must be an integer from 1 to {MAX_PAGE_SIZE}, got {}",
                    preview(text)
                ))
            })?,
    };
    let after = match params.cursor.as_deref() {
        None | Some("") => None,
        Some(text) => Some(ListCursor::decode(text).map_err(|_| {
            ApiError::bad_request(format!(
                "cursor: {} is not a next_cursor of this list; start again without a cursor",
                preview(text)
            ))
        })?),
    };
    let page = state.manager().list_queues_page(
        tenant,
        &PageRequest {
            filter,
            after,
            limit,
        },
    );
    Ok(json(&PageBody {
        queues: page.queues,
        next_cursor: page.next_cursor.map(|c| c.encode()),
    }))
}

/// A comma-separated list of `field`'s values (empty items skipped); `400` naming the field
/// and its choices on an unknown value.
fn parse_list<T: Copy>(
    text: Option<&str>,
    field: &str,
    parse: impl Fn(&str) -> Option<T>,
    name: impl Fn(T) -> &'static str,
    all: &[T],
) -> Result<Vec<T>, ApiError> {
    let mut values = Vec::new();
    for item in text.unwrap_or("").split(',').map(str::trim) {
        if item.is_empty() {
            continue;
        }
        let value = parse(item).ok_or_else(|| {
            let choices: Vec<&str> = all.iter().map(|v| name(*v)).collect();
            ApiError::bad_request(format!(
                "{field}: must be a comma-separated list of {}; got {}",
                choices.join(", "),
                preview(item)
            ))
        })?;
        values.push(value);
    }
    Ok(values)
}

/// The body of `POST /events/queues`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateQueueRequest {
    task_id: Option<String>,
    kind: Option<String>,
    ttl_minutes: Option<f64>,
    max_buffer_size: Option<u64>,
}

/// The longest `ttl_minutes` a queue is created with: 100 years of 365 days. The store keeps a
/// TTL in milliseconds and an expiry instant within year 9999; a longer one would be cut short
/// there without a word, so it is refused here instead.
const MAX_TTL_MINUTES: f64 = 100.0 * 365.0 * 24.0 * 60.0;

/// `POST /events/queues` `{task_id, kind?, ttl_minutes?, max_buffer_size?}` → `201` info.
pub(super) async fn create_queue(
    State(state): State<AppState>,
    tenant: Tenant,
    RawBody(body): RawBody,
) -> Result<Response, ApiError> {
    let request: CreateQueueRequest = read_body(
        &state,
        &body,
        "{\"task_id\", \"kind\"?, \"ttl_minutes\"?, \"max_buffer_size\"?}",
    )?;
    let task_id = match request.task_id {
        Some(s) => TaskId::new(s)?,
        None => return Err(ApiError::bad_request("task_id: is required")),
    };
    let mut options = QueueOptions::default();
    if let Some(s) = request.kind {
        options.kind = QueueKind::parse(&s).ok_or_else(|| {
            ApiError::bad_request(format!(
                "kind: must be one of workflow, ingestion, task; got {s:?}"
            ))
        })?;
    }
    if let Some(m) = request.ttl_minutes {
        let ttl = Some(m)
            .filter(|m| (0.0..=MAX_TTL_MINUTES).contains(m))
            .and_then(|m| std::time::Duration::try_from_secs_f64(m * 60.0).ok())
            .ok_or_else(|| {
                ApiError::bad_request(format!(
                    "ttl_minutes: must be a number of minutes from 0 to {MAX_TTL_MINUTES}, got {m}"
                ))
            })?;
        options.ttl = Some(ttl);
    }
    match request.max_buffer_size {
        None => {}
        Some(m) if m >= 1 => options.max_buffer_size = Some(m),
        Some(m) => {
            return Err(ApiError::bad_request(format!(
                "max_buffer_size: must be an integer >= 1, got {m}"
            )));
        }
    }
    let manager = state.manager();
    let limit = state.config().max_queues_per_tenant;
    let existing = || manager.count_queues(&tenant.0);
    let _reservation = match state.limits().reserve_queue(&tenant.0, limit, existing) {
        Ok(reservation) => reservation,
        Err(refused) => {
            // A client that keeps asking past the limit waits for its answers (see
            // `Limits::refusal_delay`), so it cannot take the CPU from other tenants.
            let delay = state.limits().refusal_delay(&tenant.0);
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            return Err(refused);
        }
    };
    let queue = manager.create_queue(&tenant.0, &task_id, options).await?;
    Ok((StatusCode::CREATED, axum::Json(queue.info())).into_response())
}

/// `GET /events/queues/{task_id}`.
pub(super) async fn queue_info(
    State(state): State<AppState>,
    tenant: Tenant,
    TaskPath(task): TaskPath,
) -> Result<Response, ApiError> {
    Ok(json(&lookup(&state, &tenant, &task).await?.info()))
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
    let queue = lookup(&state, &tenant, &task).await?;
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
    let queue = lookup(&state, &tenant, &task).await?;
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
    request: Request,
) -> Result<Response, ApiError> {
    // The queue first: a body for a queue that does not exist is never read.
    let queue = lookup(&state, &tenant, &task).await?;
    let RawBody(body) = RawBody::from_request(request, &state).await?;
    enqueue_body(&state, &tenant, &task, &queue, &body).await
}

/// Parses, validates and enqueues an enqueue request's body (see [`enqueue`]) into `queue`.
pub(super) async fn enqueue_body(
    state: &AppState,
    tenant: &Tenant,
    task: &TaskId,
    queue: &EventQueue,
    body: &[u8],
) -> Result<Response, ApiError> {
    let events = read_enqueue_body(state.config(), tenant, task, body)?;
    let offsets = queue.enqueue_received(events).await?;
    Ok(json(&EnqueueBody {
        offsets,
        latest_offset: queue.latest_offset(),
        cancelled: queue.is_cancelled(),
    }))
}

/// Parses and validates an enqueue body (one event object or `{"events": [...]}`) with the
/// limits of the server's configuration, straight into what the writer stores: the same
/// checks for `POST …/events` and for each frame of the WebSocket producer connection.
pub(super) fn read_enqueue_body(
    config: &ServerConfig,
    tenant: &Tenant,
    task: &TaskId,
    body: &[u8],
) -> Result<Vec<Received>, ApiError> {
    // An event's compact JSON is no longer than its text in the body, so only a body larger
    // than the event limit can hold an event over it.
    let event_limit = (body.len() > config.max_event_bytes).then_some(config.max_event_bytes);
    let ctx = ProducerContext {
        tenant_id: &tenant.0,
        task_id: task,
    };
    check_json(body, config.max_json_depth)?;
    if let Some(limit) = event_limit {
        check_event_sizes(body, limit)?;
    }
    event::read_slice(
        body,
        EnqueueRequest {
            ctx: &ctx,
            max_batch_events: config.max_batch_events,
        },
    )
}

/// The request path's own work on an enqueue body, without the HTTP layer and the writer:
/// parsed and validated as [`read_enqueue_body`] does, then each event's JSON as the writer
/// stores it, with offsets from `first_offset` spliced in. Not an API: `benches/request.rs`
/// measures that work with it, since it is the part of a request's CPU that grows with
/// the events it carries.
///
/// # Errors
///
/// The `400` / `413` an enqueue request with this body gets.
#[doc(hidden)]
pub fn enqueue_body_json(
    config: &ServerConfig,
    tenant: &Tenant,
    task: &TaskId,
    body: &[u8],
    first_offset: u64,
) -> Result<Vec<Vec<u8>>, ApiError> {
    let events = read_enqueue_body(config, tenant, task, body)?;
    Ok(events
        .iter()
        .zip(first_offset..)
        .map(|(event, offset)| event.rendered.with_offset(offset))
        .collect())
}

/// The body of `POST /events/queues/{task_id}/events`: one event object, or
/// `{"events": [...]}` with at most `max_batch_events` of them.
struct EnqueueRequest<'c> {
    ctx: &'c ProducerContext<'c>,
    max_batch_events: usize,
}

impl<'de> ReadObject<'de> for EnqueueRequest<'_> {
    type Value = Vec<Received>;
    type Error = ApiError;

    fn read<A: MapAccess<'de>>(
        self,
        mut map: A,
    ) -> Result<Self::Value, Failure<ApiError, A::Error>> {
        let first = event::next_key(&mut map).map_err(Failure::Json)?;
        if first.as_deref() != Some("events") {
            // One event; its first key is read already.
            return match event::read_received(map, first, self.ctx) {
                Ok(event) => Ok(vec![event]),
                Err(Failure::Json(e)) => Err(Failure::Json(e)),
                Err(Failure::Read(e)) => Err(Failure::Read(e.into())),
            };
        }
        let stash = Cell::new(None);
        let batch = Batch {
            ctx: self.ctx,
            max: self.max_batch_events,
            stash: &stash,
        };
        let events = map.next_value_seed(batch).map_err(|e| {
            // A syntax error is reported as such by `read_slice`.
            Failure::Read(stash.take().unwrap_or_else(|| {
                ApiError::bad_request(format!("events: must be an array of event objects ({e})"))
            }))
        })?;
        if let Some(field) = map.next_key::<String>().map_err(Failure::Json)? {
            return Err(Failure::Read(ApiError::bad_request(format!(
                "{}: unknown field; a batch is {{\"events\": [...]}}",
                field.chars().take(64).collect::<String>()
            ))));
        }
        Ok(events)
    }
}

/// The `events` array of a batch; an error is left in `stash`.
struct Batch<'a> {
    ctx: &'a ProducerContext<'a>,
    max: usize,
    stash: &'a Cell<Option<ApiError>>,
}

impl<'de> DeserializeSeed<'de> for Batch<'_> {
    type Value = Vec<Received>;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for Batch<'_> {
    type Value = Vec<Received>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an array of event objects")
    }

    fn visit_seq<S: SeqAccess<'de>>(self, mut seq: S) -> Result<Self::Value, S::Error> {
        let mut events = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(self.max));
        let event_stash = Cell::new(None);
        loop {
            if events.len() == self.max {
                let mut n = events.len();
                while seq.next_element::<IgnoredAny>()?.is_some() {
                    n += 1;
                }
                if n == events.len() {
                    return Ok(events);
                }
                self.stash.set(Some(ApiError::too_large(format!(
                    "events: a batch holds at most {} events, got {n}",
                    self.max
                ))));
                return Err(de::Error::custom("too many events"));
            }
            let reader = ReceivedReader { ctx: self.ctx };
            match seq.next_element_seed(ObjectSeed::new(reader, &event_stash)) {
                Ok(Some(event)) => events.push(event),
                Ok(None) => return Ok(events),
                Err(e) => {
                    if let Some(error) = event_stash.take() {
                        let at = format!("events[{}]", events.len());
                        self.stash.set(Some(ApiError::from(error).context(at)));
                    }
                    return Err(e);
                }
            }
        }
    }
}

/// For a body longer than the event limit `limit`: `413` when one of its events' compact
/// JSON exceeds it. (A body that is not JSON is left to the parser to report.)
fn check_event_sizes(body: &[u8], limit: usize) -> Result<(), ApiError> {
    let Ok(value) = serde_json::from_slice::<Value>(body) else {
        return Ok(());
    };
    let check = |value: &Value| {
        let len = compact_len(value);
        if len > limit {
            Err(ApiError::too_large(format!(
                "event JSON of {len} bytes exceeds the limit of {limit} bytes"
            )))
        } else {
            Ok(())
        }
    };
    match value.get("events") {
        Some(Value::Array(events)) => {
            for (i, event) in events.iter().enumerate() {
                check(event).map_err(|e| e.context(format!("events[{i}]")))?;
            }
            Ok(())
        }
        Some(_) => Ok(()),
        None => check(&value),
    }
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

/// The body of a cancel request; other fields are ignored.
#[derive(Deserialize)]
struct CancelRequest {
    reason: Option<String>,
}

/// The optional `{"reason": str}` of a cancel request; an empty body has none.
fn cancel_reason(state: &AppState, body: &[u8]) -> Result<Option<String>, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let request: CancelRequest = read_body(state, body, "{\"reason\": str}")?;
    Ok(request.reason)
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
