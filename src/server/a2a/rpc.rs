//! `POST /a2a`: JSON-RPC 2.0 requests, their errors, and the SubscribeToTask stream.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::{BufMut, BytesMut};
use serde_json::{Map, Value, json};

use super::A2A_KEEPALIVE_MAX;
use super::mapping::{Mapper, TaskView, Version, task_json, update_json};
use crate::server::AppState;
use crate::server::error::ApiError;
use crate::server::limits::check_json;
use crate::server::routes::RawBody;
use crate::server::stream::{self, Framing, Keepalive, LastEventId, StreamBody, StreamSlot};
use crate::server::tenant::{Caller, Need};
use crate::{Delivery, Error, EventQueue, RecordedEvent, Subscription, TaskId};

const PARSE_ERROR: i64 = -32700;
const INVALID_REQUEST: i64 = -32600;
const METHOD_NOT_FOUND: i64 = -32601;
pub(super) const INVALID_PARAMS: i64 = -32602;
const INTERNAL_ERROR: i64 = -32603;
const TASK_NOT_FOUND: i64 = -32001;
const TASK_NOT_CANCELABLE: i64 = -32002;
const PUSH_NOT_SUPPORTED: i64 = -32003;
const UNSUPPORTED_OPERATION: i64 = -32004;
const EXTENDED_CARD_NOT_CONFIGURED: i64 = -32007;

/// A JSON-RPC error answer (HTTP 200).
#[derive(Debug, Clone, PartialEq)]
pub(super) struct RpcError {
    id: Value,
    code: i64,
    message: String,
}

impl RpcError {
    pub(super) fn new(id: &Value, code: i64, message: impl Into<String>) -> Self {
        Self {
            id: id.clone(),
            code,
            message: message.into(),
        }
    }

    pub(super) fn internal(id: &Value, err: &Error) -> Self {
        tracing::error!(error = %err, "A2A request failed");
        Self::new(id, INTERNAL_ERROR, "internal error")
    }
}

impl IntoResponse for RpcError {
    fn into_response(self) -> Response {
        crate::server::json(&json!({
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
    /// `ListTasks` (1.0 only: 0.3 has no JSON-RPC method for it).
    List,
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
            "ListTasks" => Self::List,
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
            Self::Get(_) | Self::Subscribe(_) | Self::List => Need::Subscribe,
            Self::Cancel(_) | Self::Unsupported(..) => Need::Either,
        }
    }
}

/// A parsed request. `id` is `None` for a notification.
#[derive(Debug)]
pub(super) struct RpcRequest {
    id: Option<Value>,
    method: Method,
    pub(super) params: Value,
}

impl RpcRequest {
    /// The id to answer with (`null` for a notification, which gets no answer anyway).
    pub(super) fn reply_id(&self) -> Value {
        self.id.clone().unwrap_or(Value::Null)
    }
}

fn parse_request(body: &[u8], max_depth: usize) -> Result<RpcRequest, RpcError> {
    let null = Value::Null;
    check_json(body, max_depth)
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
    check_tenant(params, caller, &id)?;
    let metadata = match params.get("metadata") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(_) => return Err(invalid("params.metadata: must be an object".into())),
    };
    Ok(TaskParams { task, metadata })
}

/// Checks a 1.0 request's `params.tenant`. A request may name a tenant; the tenant comes from
/// the credentials or the tenant header / query, as on every route, so a different one is
/// refused rather than ignored.
pub(super) fn check_tenant(
    params: &Map<String, Value>,
    caller: &Caller,
    id: &Value,
) -> Result<(), RpcError> {
    let invalid = |msg: String| RpcError::new(id, INVALID_PARAMS, msg);
    match params.get("tenant").map(Value::as_str) {
        None | Some(Some("")) => Ok(()),
        Some(None) => Err(invalid("params.tenant: must be a string".into())),
        Some(Some(t)) if t == caller.tenant.as_str() => Ok(()),
        Some(Some(t)) => Err(invalid(format!(
            "params.tenant: this request acts for tenant {}, not {:?} (the tenant comes from the \
             token, X-Tenant-ID or ?tenant_id=)",
            caller.tenant,
            t.chars().take(60).collect::<String>()
        ))),
    }
}

async fn lookup(
    state: &AppState,
    caller: &Caller,
    task: &TaskId,
    id: &Value,
) -> Result<EventQueue, RpcError> {
    state
        .manager()
        .find_queue(&caller.tenant, task)
        .await
        .map_err(|e| RpcError::internal(id, &e))?
        .ok_or_else(|| RpcError::new(id, TASK_NOT_FOUND, format!("task not found: {task}")))
}

/// Resolves the caller before the body is read: every A2A method needs `subscribe` or
/// `publish`, so a caller with neither (or without valid credentials) is refused at once.
pub(in crate::server) struct Authenticated;

impl FromRequestParts<AppState> for Authenticated {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        Caller::resolve_for(parts, state, Need::Either).map(|_| Self)
    }
}

/// `POST /a2a`.
pub(in crate::server) async fn rpc(
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
        Method::List => super::list::list_tasks(&state, &caller, &req).await,
        Method::Unsupported(code, why) => Err(RpcError::new(&req.reply_id(), code, why)),
    };
    result.unwrap_or_else(IntoResponse::into_response)
}

pub(super) fn success(id: &Value, result: Value) -> Response {
    crate::server::json(&json!({"jsonrpc": "2.0", "id": id, "result": result}))
}

async fn get_task(
    state: &AppState,
    caller: &Caller,
    req: &RpcRequest,
    v: Version,
) -> Result<Response, RpcError> {
    let id = req.reply_id();
    let params = task_params(req, caller)?;
    let queue = lookup(state, caller, &params.task, &id).await?;
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
    let queue = lookup(state, caller, &params.task, &id).await?;
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
pub(super) struct Snapshot {
    pub(super) view: TaskView,
    mapper: Mapper,
    sub: Subscription,
    /// The first event at or past the offset, read while looking for the end.
    next: Option<Arc<RecordedEvent>>,
}

impl Snapshot {
    /// Reads `sub` (from the queue's first retained offset) up to `upto`, exclusive, never
    /// waiting for events past the queue's latest offset when `sub` started.
    pub(super) async fn read(
        queue: &EventQueue,
        mut sub: Subscription,
        upto: u64,
    ) -> crate::Result<Self> {
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
    match LastEventId::from_headers(headers) {
        Ok(LastEventId(Some(from))) => return Ok(Some(from)),
        Ok(LastEventId(None)) => {}
        Err(_) => return Err(invalid("Last-Event-ID: must be an event offset")),
    }
    match metadata.get("from_offset") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_u64()
            .map(Some)
            .ok_or_else(|| invalid("params.metadata.from_offset: must be a non-negative integer")),
        Some(Value::String(s)) => stream::parse_offset(s)
            .map(Some)
            .ok_or_else(|| invalid("params.metadata.from_offset: must be a non-negative integer")),
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
    if stream::shutting_down(state) {
        return Err(RpcError::new(
            &id,
            INTERNAL_ERROR,
            "the server is shutting down",
        ));
    }
    let queue = lookup(state, caller, &params.task, &id).await?;
    let sub = subscribe_from_start(&queue, &params.task, &id)?;
    let from = resume.unwrap_or_else(|| sub.latest_offset_at_start());
    if queue.nothing_from(from) {
        let why = if queue.is_finished() {
            "is finished: there is nothing to subscribe to"
        } else {
            "is closed: nothing more will come"
        };
        return Err(RpcError::new(
            &id,
            UNSUPPORTED_OPERATION,
            format!("task {} {why} (GetTask reads it)", params.task),
        ));
    }
    let slot = match StreamSlot::take(state, &caller.tenant) {
        Ok(slot) => slot,
        // An A2A client reads a JSON-RPC error, not an HTTP status: the limit's 429 detail
        // goes in one (HTTP 200).
        Err(e) => return Err(RpcError::new(&id, INTERNAL_ERROR, e.detail())),
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
    tracing::debug!(tenant = %caller.tenant, task = %params.task, from, "A2A stream opened");
    let mut framing = RpcFraming {
        mapper: snapshot.mapper,
        task: params.task,
        id,
        version: v,
        from,
    };
    // The event the snapshot read past its end is sent with the task.
    let flow = match &snapshot.next {
        Some(ev) => framing.put_event(ev, &mut first),
        None => ControlFlow::Continue(()),
    };
    let keepalive = Keepalive::after_silence(keepalive_period(state.config().keepalive));
    let body = StreamBody::new(
        state,
        slot,
        first.freeze(),
        snapshot.sub,
        framing,
        keepalive,
    );
    Ok(match flow {
        ControlFlow::Continue(()) => body,
        ControlFlow::Break(()) => body.end_after_opening(),
    }
    .into_response())
}

/// The keepalive interval of A2A streams: the server's, but at most [`A2A_KEEPALIVE_MAX`].
fn keepalive_period(configured: Duration) -> Duration {
    configured.min(A2A_KEEPALIVE_MAX)
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

/// The framing of a subscribe stream: each event becomes the JSON-RPC results it maps to.
struct RpcFraming {
    mapper: Mapper,
    task: TaskId,
    id: Value,
    version: Version,
    /// Events below this offset update the mapper but are not sent.
    from: u64,
}

impl RpcFraming {
    /// Appends the frames of `ev`'s results; `Break` when `ev` is unreadable, which ends the
    /// stream.
    fn put_event(&mut self, ev: &RecordedEvent, out: &mut BytesMut) -> ControlFlow<()> {
        let event = match ev.event() {
            Ok(event) => event,
            Err(e) => {
                tracing::error!(error = %e, offset = ev.offset(), "A2A stream: unreadable event");
                return ControlFlow::Break(());
            }
        };
        let updates = self.mapper.map(&event, ev.offset());
        if ev.offset() < self.from {
            return ControlFlow::Continue(());
        }
        let count = updates.len();
        for (i, update) in updates.iter().enumerate() {
            // The frame that completes the event carries its offset, for Last-Event-ID.
            let id = (i + 1 == count).then_some(ev.offset());
            put_frame(
                out,
                id,
                &json!({
                    "jsonrpc": "2.0",
                    "id": self.id,
                    "result": update_json(update, &self.task, self.version),
                }),
            );
        }
        ControlFlow::Continue(())
    }
}

impl Framing for RpcFraming {
    const PROTOCOL: &'static str = "A2A";

    /// Gap notices are not sent: A2A has no frame for them (the mapper sees the events that
    /// remain).
    fn put_batch(&mut self, batch: &[Delivery], out: &mut BytesMut) -> ControlFlow<()> {
        for delivery in batch {
            if let Delivery::Event(ev) = delivery {
                self.put_event(ev, out)?;
            }
        }
        ControlFlow::Continue(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a2a_streams_keep_alive_at_least_every_3_s() {
        assert_eq!(keepalive_period(Duration::from_secs(15)), A2A_KEEPALIVE_MAX);
        assert_eq!(A2A_KEEPALIVE_MAX, Duration::from_secs(3));
        assert_eq!(
            keepalive_period(Duration::from_millis(50)),
            Duration::from_millis(50)
        );
    }
}
