//! The Durable Streams protocol (ElectricSQL's `PROTOCOL.md`, draft 1.0) under
//! `/v1/stream/{path}`: `PUT` create, `POST` append (and close), `GET` catch-up, long-poll and
//! SSE reads, `HEAD`, `DELETE`.
//!
//! A stream is a queue of kind [`QueueKind::Stream`] in the same log as every other queue, so
//! it has the same durability (an append is answered after its fsync'd commit), TTL,
//! `max_buffer_size`, tenancy (the caller's tenant, from the token in token mode) and storage
//! backends. Its messages are stored exactly as given, beside the stream's content type; an
//! `application/json` body that is an array is split into one message per element. A typed
//! event queue (`/events/...`) with task id `T` reads as the `application/json` stream
//! `/v1/stream/T`, one message per event.
//!
//! Offsets are the queue's offsets, rendered as 20 zero-padded decimal digits so that they sort
//! as strings; `-1` is the start and `now` the tail. `Stream-Next-Offset` is the queue's latest
//! offset (one past the newest message).
//!
//! Idempotent producers (`Producer-Id` / `Producer-Epoch` / `Producer-Seq`) and `Stream-Seq`
//! are checked by the engine's writer against the stream's state kept in its queue record,
//! and that state is updated in the same commit as the messages (and the close, with
//! `Stream-Closed: true`): concurrent requests, or nodes sharing a Redis store, cannot both
//! pass a check, and a restart keeps the state. Each message of a producer's batch is also
//! stored with an id naming `(producer, epoch, seq, index)`, so a retry the queue still
//! retains is not stored twice even where the producer's state was forgotten (see
//! `docs/durable-streams.md`).

// The handlers' errors are whole HTTP answers (a `Response`, with the protocol's headers),
// made at most once per request and returned straight to axum: boxing them saves nothing.
#![allow(clippy::result_large_err)]

mod wire;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use std::ops::ControlFlow;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::put;
use bytes::BytesMut;
use futures_util::StreamExt;

use crate::engine::{ProducerClaim, StreamAppended};
use crate::error::Error;
use crate::ids::{EventId, TaskId, TenantId};
use crate::queue::{EventQueue, QueueKind, QueueOptions};
use crate::server::AppState;
use crate::server::error::ApiError;
use crate::server::stream::{self, Framing, Keepalive, StreamBody, StreamSlot};
use crate::server::tenant::Caller;
use crate::subscription::Delivery;

use wire::{ReadOffset, cursor, etag, format_offset, is_json, media_type, put_sse_data};

/// How long a long-poll read waits for new data before answering `204`.
const LONG_POLL: Duration = Duration::from_secs(3);
/// An SSE response ends after this long, so that clients reconnect (protocol §10.2).
const SSE_LIFETIME: Duration = Duration::from_secs(60);
/// Most messages one read answers.
const READ_MESSAGES: usize = 1000;
/// Most bytes of messages one read answers (at least one message is always sent).
const READ_BYTES: usize = 1 << 20;

/// The protocol's routes, to merge into the server's router.
pub(crate) fn routes() -> Router<AppState> {
    let streams = Streams::default();
    Router::new()
        .route(
            "/v1/stream/{*path}",
            put(create)
                .post(append)
                .get(read)
                .head(head)
                .delete(delete)
                .options(preflight),
        )
        .layer(axum::Extension(streams))
}

/// What this process keeps per stream besides the queue: when it was last read, and the
/// fork bookkeeping.
#[derive(Clone, Default)]
struct Streams {
    /// When each stream was last read or written through the protocol (µs since the epoch).
    touched: Arc<Mutex<HashMap<(TenantId, TaskId), i64>>>,
    forks: Arc<Mutex<ForkGraph>>,
}

type Key = (TenantId, TaskId);

/// Which stream each fork was made from, and the streams deleted while forks of them live:
/// those answer `410 Gone` (and block re-creation of their path with `409`) until their last
/// fork is deleted (protocol §5.4). A fork holds its own copy of what it inherited, so a
/// soft-deleted stream's messages are removed at once; only its name stays reserved.
#[derive(Default)]
struct ForkGraph {
    parent: HashMap<Key, Key>,
    /// Where each fork was made (`Stream-Fork-Offset`, `Stream-Fork-Sub-Offset`): a `PUT`
    /// again with other ones is a conflict.
    fork_point: HashMap<Key, (u64, u64)>,
    live_forks: HashMap<Key, usize>,
    soft_deleted: std::collections::HashSet<Key>,
}

impl ForkGraph {
    /// A stream's deletion leaves nothing behind it: the fork no longer counts for its source,
    /// which, if it was soft-deleted and this was its last fork, goes too (and so on up).
    fn release(&mut self, key: &Key) {
        self.fork_point.remove(key);
        let mut key = key.clone();
        while let Some(parent) = self.parent.remove(&key) {
            let n = self.live_forks.entry(parent.clone()).or_insert(1);
            *n = n.saturating_sub(1);
            if *n > 0 || !self.soft_deleted.remove(&parent) {
                if *n == 0 {
                    self.live_forks.remove(&parent);
                }
                return;
            }
            self.live_forks.remove(&parent);
            key = parent;
        }
    }
}

impl Streams {
    fn forget(&self, tenant: &TenantId, task: &TaskId) {
        let key = (tenant.clone(), task.clone());
        let mut touched = self.touched.lock().unwrap_or_else(|p| p.into_inner());
        touched.remove(&key);
    }

    fn graph(&self) -> std::sync::MutexGuard<'_, ForkGraph> {
        self.forks.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn soft_deleted(&self, tenant: &TenantId, task: &TaskId) -> bool {
        self.graph()
            .soft_deleted
            .contains(&(tenant.clone(), task.clone()))
    }

    fn forked(&self, source: Key, fork: Key, at: (u64, u64)) {
        let mut g = self.graph();
        g.fork_point.insert(fork.clone(), at);
        *g.live_forks.entry(source.clone()).or_insert(0) += 1;
        g.parent.insert(fork, source);
    }

    fn touch(&self, tenant: &TenantId, task: &TaskId) {
        let now = crate::event::Timestamp::now().as_micros();
        let mut touched = self.touched.lock().unwrap_or_else(|p| p.into_inner());
        touched.insert((tenant.clone(), task.clone()), now);
    }

    fn touched(&self, tenant: &TenantId, task: &TaskId) -> i64 {
        let touched = self.touched.lock().unwrap_or_else(|p| p.into_inner());
        touched
            .get(&(tenant.clone(), task.clone()))
            .copied()
            .unwrap_or(i64::MIN)
    }
}

/// The live queue behind a stream path: `None` when there is none, or when it has idled past
/// its TTL and only waits for the next expiry sweep (the protocol answers `404` at once).
/// With `touch`, the request counts as activity (reads and writes do, `HEAD` does not).
async fn find(
    state: &AppState,
    streams: &Streams,
    tenant: &TenantId,
    task: &TaskId,
    touch: bool,
) -> Result<Option<EventQueue>, Response> {
    // Also a stream another node sharing the store created a moment ago.
    let found = state
        .manager()
        .find_queue(tenant, task)
        .await
        .map_err(|e| api_error(e.into()))?;
    let Some(q) = found.filter(|q| !expired(q, streams)) else {
        return Ok(None);
    };
    if touch {
        streams.touch(tenant, task);
    }
    Ok(Some(q))
}

/// The task a request's path names, unless the protocol deleted it while forks of it live on
/// (`410`).
fn live_task(path: &str, streams: &Streams, caller: &Caller) -> Result<TaskId, Response> {
    let task = task_of(path).map_err(api_error)?;
    if streams.soft_deleted(&caller.tenant, &task) {
        return Err(gone());
    }
    Ok(task)
}

/// Whether the queue has idled for its TTL, or reached its absolute expiry
/// (`Stream-Expires-At`, which nothing extends); the expiry sweep removes it later. Reads
/// through the protocol count as activity here, beside the queue's own last write.
fn expired(q: &EventQueue, streams: &Streams) -> bool {
    if q.expires_at()
        .is_some_and(|at| at.as_micros() <= crate::event::Timestamp::now().as_micros())
    {
        return true;
    }
    let info = q.info();
    let last = info
        .last_activity
        .as_micros()
        .max(streams.touched(q.tenant_id(), q.task_id()));
    let idle_us = crate::event::Timestamp::now()
        .as_micros()
        .saturating_sub(last);
    let ttl_us = info.ttl_minutes * 60.0 * 1e6;
    idle_us as f64 >= ttl_us
}

/// Where a read of the stream ends: a typed task queue's stream ends after its terminal event
/// (its task finished; events stored after it are for the events API's replay only), any
/// queue's at its latest offset.
fn tail_of(q: &EventQueue) -> u64 {
    let latest = q.latest_offset();
    match q.finished_at() {
        Some(at) if q.kind() != QueueKind::Stream => latest.min(at + 1),
        _ => latest,
    }
}

/// Whether nothing more will come: the queue was closed, or its task finished.
fn ended(q: &EventQueue) -> bool {
    q.is_closed() || (q.kind() != QueueKind::Stream && q.is_finished())
}

/// The answer for a soft-deleted stream.
fn gone() -> Response {
    error(
        StatusCode::GONE,
        "the stream was deleted; forks of it still hold its data",
    )
}

/// The stream path as a task id.
fn task_of(path: &str) -> Result<TaskId, ApiError> {
    TaskId::new(path).map_err(|e| ApiError::bad_request(format!("stream path: {e}")))
}

/// Headers every answer of the protocol carries (protocol §12.7).
fn base(status: StatusCode) -> axum::http::response::Builder {
    Response::builder()
        .status(status)
        .header(header::X_CONTENT_TYPE_OPTIONS, "nosniff")
        .header("cross-origin-resource-policy", "cross-origin")
        .header(header::ACCESS_CONTROL_ALLOW_ORIGIN, "*")
        .header(header::ACCESS_CONTROL_EXPOSE_HEADERS, wire::EXPOSE)
}

fn finish(b: axum::http::response::Builder, body: Body) -> Response {
    b.body(body)
        .unwrap_or_else(|e| ApiError::from(Error::internal(e)).into_response())
}

/// An error answer with the protocol's security headers.
fn error(status: StatusCode, detail: &str) -> Response {
    let body = serde_json::json!({ "detail": detail }).to_string();
    finish(
        base(status).header(header::CONTENT_TYPE, "application/json"),
        Body::from(body),
    )
}

fn api_error(e: ApiError) -> Response {
    error(e.status(), e.detail())
}

/// The stream's content type: its own, or `application/json` for a typed event queue.
fn content_type_of(q: &EventQueue) -> String {
    q.content_type().unwrap_or("application/json").to_string()
}

/// Whether the `Stream-Closed` header says `true` (protocol §4.1: anything else is absent).
fn closed_header(h: &HeaderMap) -> bool {
    h.get("stream-closed")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
}

fn header_str<'h>(h: &'h HeaderMap, name: &str) -> Result<Option<&'h str>, Response> {
    match h.get(name) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .map(Some)
            .map_err(|_| error(StatusCode::BAD_REQUEST, &format!("{name}: not text"))),
    }
}

/// A non-negative decimal without sign, leading zeros, point or exponent.
fn strict_u64(s: &str) -> Option<u64> {
    let ok =
        !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'));
    if ok { s.parse().ok() } else { None }
}

/// Splits a body into messages: an `application/json` array into its elements (one level),
/// any other JSON value into one message, other content types into one message as given.
fn messages(
    content_type: &str,
    body: &[u8],
    allow_empty_array: bool,
) -> Result<Vec<Vec<u8>>, Response> {
    if !is_json(content_type) {
        return Ok(vec![body.to_vec()]);
    }
    let text = std::str::from_utf8(body).map_err(|_| {
        error(
            StatusCode::BAD_REQUEST,
            "the body is not valid JSON (UTF-8)",
        )
    })?;
    let trimmed = text.trim_start();
    if trimmed.starts_with('[') {
        let items: Vec<Box<serde_json::value::RawValue>> = serde_json::from_str(text)
            .map_err(|e| error(StatusCode::BAD_REQUEST, &format!("invalid JSON: {e}")))?;
        if items.is_empty() && !allow_empty_array {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "an empty JSON array appends nothing",
            ));
        }
        Ok(items
            .into_iter()
            .map(|m| m.get().as_bytes().to_vec())
            .collect())
    } else {
        let one: Box<serde_json::value::RawValue> = serde_json::from_str(text)
            .map_err(|e| error(StatusCode::BAD_REQUEST, &format!("invalid JSON: {e}")))?;
        Ok(vec![one.get().as_bytes().to_vec()])
    }
}

/// Most bytes of an over-long request body read (and discarded) before its `413`.
const DISCARD_BYTES: usize = 32 << 20;

/// A request body, at most `max_body_bytes` long, within `body_read_timeout` (`408`).
///
/// A longer one is `413`, but only after it was read and discarded (up to [`DISCARD_BYTES`],
/// within the same timeout): answering before the upload ends makes the server close a
/// connection the client is still writing to, and clients (Node's `fetch`) then often report
/// the reset rather than the `413`. Nothing of it is kept beyond the limit.
async fn read_body(state: &AppState, body: Body) -> Result<Bytes, Response> {
    let max = state.config().max_body_bytes;
    let limit = state.config().body_read_timeout;
    let mut data = body.into_data_stream();
    let mut kept = BytesMut::new();
    let mut seen = 0usize;
    let read = async {
        while let Some(chunk) = data.next().await {
            let chunk = chunk.map_err(|_| {
                error(
                    StatusCode::BAD_REQUEST,
                    "the request body could not be read",
                )
            })?;
            seen = seen.saturating_add(chunk.len());
            if seen <= max {
                kept.extend_from_slice(&chunk);
            } else {
                kept = BytesMut::new();
                if seen > DISCARD_BYTES {
                    break;
                }
            }
        }
        Ok::<_, Response>(())
    };
    match tokio::time::timeout(limit, read).await {
        Err(_) => Err(error(
            StatusCode::REQUEST_TIMEOUT,
            &format!("request body not received within {} ms", limit.as_millis()),
        )),
        Ok(Err(r)) => Err(r),
        Ok(Ok(())) if seen > max => Err(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("request body exceeds the limit of {max} bytes"),
        )),
        Ok(Ok(())) => Ok(kept.freeze()),
    }
}

/// `PUT`: creates the stream, or answers `200` when it exists with the same settings.
async fn create(
    State(state): State<AppState>,
    axum::Extension(streams): axum::Extension<Streams>,
    caller: Caller,
    Path(path): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let body = match read_body(&state, body).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    match create_inner(&state, &streams, &caller, &path, &headers, &body).await {
        Ok(r) | Err(r) => r,
    }
}

async fn create_inner(
    state: &AppState,
    streams: &Streams,
    caller: &Caller,
    path: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, Response> {
    let task = task_of(path).map_err(api_error)?;
    if streams.soft_deleted(&caller.tenant, &task) {
        return Err(error(
            StatusCode::CONFLICT,
            "the path belongs to a deleted stream whose forks still live",
        ));
    }
    if !headers.contains_key("stream-forked-from")
        && (headers.contains_key("stream-fork-offset")
            || headers.contains_key("stream-fork-sub-offset"))
    {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "Stream-Fork-Offset and Stream-Fork-Sub-Offset need Stream-Forked-From",
        ));
    }
    let fork = fork_of(state, streams, caller, headers).await?;
    let requested_type = match header_str(headers, "content-type")? {
        Some(ct) if !ct.trim().is_empty() => Some(ct.trim().to_string()),
        _ => None,
    };
    let content_type = match (&requested_type, &fork) {
        (Some(ct), _) => ct.clone(),
        (None, Some(f)) => content_type_of(&f.source),
        (None, None) => "application/octet-stream".to_string(),
    };
    let ttl = match header_str(headers, "stream-ttl")? {
        Some(v) => Some(strict_u64(v.trim()).ok_or_else(|| {
            error(
                StatusCode::BAD_REQUEST,
                "Stream-TTL: a non-negative whole number of seconds",
            )
        })?),
        None => None,
    };
    let expires_at = match header_str(headers, "stream-expires-at")? {
        Some(v) => Some(
            chrono::DateTime::parse_from_rfc3339(v.trim())
                .map_err(|_| error(StatusCode::BAD_REQUEST, "Stream-Expires-At: not RFC 3339"))?,
        ),
        None => None,
    };
    if ttl.is_some() && expires_at.is_some() {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "Stream-TTL and Stream-Expires-At exclude each other",
        ));
    }
    let close = closed_header(headers);
    let manager = state.manager();
    // An absolute expiry becomes the queue's TTL counted from now (queues expire after idling
    // for their TTL).
    let ttl_duration = match (ttl, expires_at) {
        (Some(s), _) => Some(Duration::from_secs(s)),
        (None, Some(at)) => {
            let left = at.with_timezone(&chrono::Utc) - chrono::Utc::now();
            Some(left.to_std().unwrap_or(Duration::ZERO))
        }
        // A fork without its own expiry keeps its source's TTL (protocol §4.2).
        (None, None) => fork.as_ref().and_then(|f| {
            let own = f.source.info().ttl_minutes * 60.0;
            let default = state.manager().config().default_ttl.as_secs_f64();
            ((own - default).abs() > 0.0005).then(|| Duration::from_secs_f64(own))
        }),
    };
    if let Some(f) = &fork
        && media_type(&content_type) != media_type(&content_type_of(&f.source))
    {
        return Err(error(
            StatusCode::CONFLICT,
            "a fork's Content-Type is its source's",
        ));
    }
    let current = manager
        .find_queue(&caller.tenant, &task)
        .await
        .map_err(|e| api_error(e.into()))?;
    if let Some(q) = current {
        if !expired(&q, streams) {
            same_fork(streams, caller, &task, fork.as_ref())?;
            return existing(&q, &content_type, ttl, close);
        }
        // Idle past its TTL: gone for the protocol, so the path may be created anew.
        manager
            .delete_queue(&caller.tenant, &task)
            .await
            .map_err(|e| api_error(e.into()))?;
    }
    let initial = if body.is_empty() {
        Vec::new()
    } else {
        messages(&content_type, body, true)?
    };
    let options = QueueOptions {
        kind: QueueKind::Stream,
        ttl: ttl_duration,
        max_buffer_size: None,
        content_type: Some(content_type.clone()),
        expires_at: expires_at
            .map(|at| crate::event::Timestamp::from_micros(at.timestamp_micros())),
    };
    let q = match manager.create_queue(&caller.tenant, &task, options).await {
        Ok(q) => q,
        Err(Error::QueueExists { .. }) => {
            let current = manager
                .find_queue(&caller.tenant, &task)
                .await
                .map_err(|e| api_error(e.into()))?;
            return match current {
                Some(q) => {
                    same_fork(streams, caller, &task, fork.as_ref())?;
                    existing(&q, &content_type, ttl, close)
                }
                None => Err(error(StatusCode::CONFLICT, "the stream was just deleted")),
            };
        }
        Err(e) => return Err(api_error(e.into())),
    };
    streams.forget(&caller.tenant, &task);
    if let Some(f) = &fork {
        copy_fork(f, &q, &content_type).await?;
        streams.forked(
            (caller.tenant.clone(), f.source.task_id().clone()),
            (caller.tenant.clone(), task.clone()),
            (f.upto, f.sub),
        );
    }
    if !initial.is_empty() || close {
        // The initial body and the close, in one commit.
        let batch = initial.iter().map(|m| (m.as_slice(), None)).collect();
        q.stream_append(batch, None, None, close)
            .await
            .map_err(|e| api_error(e.into()))?;
    }
    let host = header_str(headers, "host")?.unwrap_or("localhost");
    let scheme = if state.config().tls.is_some() {
        "https"
    } else {
        "http"
    };
    let mut b = base(StatusCode::CREATED)
        .header(header::CONTENT_TYPE, content_type)
        .header("stream-next-offset", format_offset(q.latest_offset()))
        .header(
            header::LOCATION,
            format!("{scheme}://{host}/v1/stream/{task}"),
        );
    if close {
        b = b.header("stream-closed", "true");
    }
    Ok(finish(b, Body::empty()))
}

/// A fork's source and what it inherits: the source's messages below `upto`, then `sub`
/// more messages (JSON) or bytes (other content types) of what follows.
struct Fork {
    source: EventQueue,
    upto: u64,
    sub: u64,
}

/// The fork a `PUT` asks for (`Stream-Forked-From`), if any.
async fn fork_of(
    state: &AppState,
    streams: &Streams,
    caller: &Caller,
    headers: &HeaderMap,
) -> Result<Option<Fork>, Response> {
    let Some(from) = header_str(headers, "stream-forked-from")? else {
        return Ok(None);
    };
    let path = from.trim();
    let path = path.strip_prefix("/v1/stream/").unwrap_or(path);
    let source_task = task_of(path).map_err(api_error)?;
    if streams.soft_deleted(&caller.tenant, &source_task) {
        return Err(error(StatusCode::CONFLICT, "the source stream was deleted"));
    }
    let Some(source) = find(state, streams, &caller.tenant, &source_task, false).await? else {
        return Err(error(StatusCode::NOT_FOUND, "no such source stream"));
    };
    let tail = source.latest_offset();
    let upto = match header_str(headers, "stream-fork-offset")? {
        None => tail,
        Some(v) => match ReadOffset::parse(v.trim()) {
            Some(ReadOffset::At(n)) => n,
            _ => {
                return Err(error(
                    StatusCode::BAD_REQUEST,
                    "Stream-Fork-Offset: not an offset",
                ));
            }
        },
    };
    if upto > tail {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "Stream-Fork-Offset is beyond the source's tail",
        ));
    }
    // A fork keeps its source's offsets: it can only start where the source still holds
    // everything from offset 0.
    if source.first_offset() > 0 {
        return Err(error(
            StatusCode::CONFLICT,
            "the source no longer retains its first messages",
        ));
    }
    let sub = match header_str(headers, "stream-fork-sub-offset")? {
        None => 0,
        Some(v) => strict_u64(v.trim()).ok_or_else(|| {
            error(
                StatusCode::BAD_REQUEST,
                "Stream-Fork-Sub-Offset: a non-negative integer",
            )
        })?,
    };
    if sub > 0 && upto >= tail {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "Stream-Fork-Sub-Offset is beyond the source's tail",
        ));
    }
    Ok(Some(Fork { source, upto, sub }))
}

/// Copies what a fork inherits into it (copy-on-fork: the fork is an independent queue with
/// the source's offsets, protocol §4.2).
async fn copy_fork(f: &Fork, fork: &EventQueue, content_type: &str) -> Result<(), Response> {
    let mut from = 0;
    while from < f.upto {
        let chunk = read_chunk(&f.source, from, f.upto).await?;
        if chunk.messages.is_empty() {
            break;
        }
        let batch = chunk.messages.iter().map(|m| (m.as_ref(), None)).collect();
        fork.append_messages(batch)
            .await
            .map_err(|e| api_error(e.into()))?;
        from = chunk.next;
    }
    if f.sub > 0 {
        let tail = f.source.latest_offset();
        let rest = read_chunk(&f.source, f.upto, tail).await?;
        let mut part: Vec<Vec<u8>> = Vec::new();
        if is_json(content_type) {
            let n = usize::try_from(f.sub).unwrap_or(usize::MAX);
            if n > rest.messages.len() {
                return Err(error(
                    StatusCode::BAD_REQUEST,
                    "Stream-Fork-Sub-Offset is beyond the source's tail",
                ));
            }
            part.extend(rest.messages.iter().take(n).map(|m| m.to_vec()));
        } else {
            let mut left = usize::try_from(f.sub).unwrap_or(usize::MAX);
            for m in &rest.messages {
                if left == 0 {
                    break;
                }
                let take = left.min(m.len());
                part.push(m[..take].to_vec());
                left -= take;
            }
            if left > 0 {
                return Err(error(
                    StatusCode::BAD_REQUEST,
                    "Stream-Fork-Sub-Offset is beyond the source's tail",
                ));
            }
        }
        let batch = part.iter().map(|m| (m.as_slice(), None)).collect();
        fork.append_messages(batch)
            .await
            .map_err(|e| api_error(e.into()))?;
    }
    Ok(())
}

/// A `PUT` again of a fork must name the fork point it was made at (`409` otherwise).
fn same_fork(
    streams: &Streams,
    caller: &Caller,
    task: &TaskId,
    fork: Option<&Fork>,
) -> Result<(), Response> {
    let Some(f) = fork else {
        return Ok(());
    };
    let key = (caller.tenant.clone(), task.clone());
    let at = streams.graph().fork_point.get(&key).copied();
    if at.is_some_and(|at| at != (f.upto, f.sub)) {
        return Err(error(
            StatusCode::CONFLICT,
            "the stream exists, forked at another offset",
        ));
    }
    Ok(())
}

/// `PUT` on an existing stream: `200` when content type, TTL and closure match, else `409`.
fn existing(
    q: &EventQueue,
    content_type: &str,
    ttl: Option<u64>,
    close: bool,
) -> Result<Response, Response> {
    let have = content_type_of(q);
    let same_type = media_type(&have) == media_type(content_type);
    let same_ttl = ttl.is_none_or(|s| q.info().ttl_minutes * 60.0 == s as f64);
    if !same_type || !same_ttl || q.is_closed() != close {
        return Err(error(
            StatusCode::CONFLICT,
            "the stream exists with other settings",
        ));
    }
    let mut b = base(StatusCode::OK)
        .header(header::CONTENT_TYPE, have)
        .header("stream-next-offset", format_offset(q.latest_offset()));
    if q.is_closed() {
        b = b.header("stream-closed", "true");
    }
    Ok(finish(b, Body::empty()))
}

/// The three producer headers, all or none.
struct Producer {
    id: String,
    epoch: u64,
    seq: u64,
}

impl Producer {
    fn claim(&self) -> ProducerClaim {
        ProducerClaim {
            id: self.id.clone(),
            epoch: self.epoch,
            seq: self.seq,
        }
    }
}

/// Longest `Producer-Id`: the stream's record keeps up to `MAX_PRODUCERS` of them and is
/// rewritten with each commit that changes it, so its size stays bounded.
const MAX_PRODUCER_ID: usize = 256;

/// Largest producer epoch or sequence number (2^53 - 1, for JavaScript clients).
const MAX_SAFE: u64 = (1 << 53) - 1;

fn producer_of(h: &HeaderMap) -> Result<Option<Producer>, Response> {
    let id = header_str(h, "producer-id")?;
    let epoch = header_str(h, "producer-epoch")?;
    let seq = header_str(h, "producer-seq")?;
    match (id, epoch, seq) {
        (None, None, None) => Ok(None),
        (Some(id), Some(epoch), Some(seq)) => {
            let bad = |what: &str| error(StatusCode::BAD_REQUEST, what);
            if id.is_empty() || id.len() > MAX_PRODUCER_ID {
                return Err(bad("Producer-Id: 1 to 256 bytes"));
            }
            let epoch = strict_u64(epoch.trim())
                .filter(|&e| e <= MAX_SAFE)
                .ok_or_else(|| bad("Producer-Epoch: a non-negative integer up to 2^53-1"))?;
            let seq = strict_u64(seq.trim())
                .filter(|&s| s <= MAX_SAFE)
                .ok_or_else(|| bad("Producer-Seq: a non-negative integer up to 2^53-1"))?;
            Ok(Some(Producer {
                id: id.to_string(),
                epoch,
                seq,
            }))
        }
        _ => Err(error(
            StatusCode::BAD_REQUEST,
            "Producer-Id, Producer-Epoch and Producer-Seq go together",
        )),
    }
}

/// A stable id for message `index` of a producer's batch: names the producer (by a hash of
/// its id), epoch and sequence number, within the event id alphabet.
fn producer_message_id(p: &Producer, index: usize) -> Option<EventId> {
    // FNV-1a: stable across processes and builds (the id must survive a restart).
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in p.id.as_bytes() {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    EventId::new(format!("ds-{hash:016x}-{}-{}-{index}", p.epoch, p.seq)).ok()
}

/// `POST`: appends (and with `Stream-Closed: true`, closes).
async fn append(
    State(state): State<AppState>,
    axum::Extension(streams): axum::Extension<Streams>,
    caller: Caller,
    Path(path): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let body = match read_body(&state, body).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    match append_inner(&state, &streams, &caller, &path, &headers, &body).await {
        Ok(r) | Err(r) => r,
    }
}

fn closed_conflict(next_offset: u64) -> Response {
    finish(
        base(StatusCode::CONFLICT)
            .header("stream-closed", "true")
            .header("stream-next-offset", format_offset(next_offset))
            .header(header::CONTENT_TYPE, "application/json"),
        Body::from(r#"{"detail":"the stream is closed"}"#),
    )
}

async fn append_inner(
    state: &AppState,
    streams: &Streams,
    caller: &Caller,
    path: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, Response> {
    let task = live_task(path, streams, caller)?;
    let Some(q) = find(state, streams, &caller.tenant, &task, true).await? else {
        return Err(error(StatusCode::NOT_FOUND, "no such stream"));
    };
    let close = closed_header(headers);
    let producer = producer_of(headers)?;
    let stream_seq = header_str(headers, "stream-seq")?.map(str::to_string);
    let is_stream = q.kind() == QueueKind::Stream;
    if body.is_empty() {
        if !close {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "an empty body appends nothing (close with Stream-Closed: true)",
            ));
        }
        if !is_stream {
            q.close().await.map_err(|e| api_error(e.into()))?;
            return Ok(finish(
                base(StatusCode::NO_CONTENT)
                    .header("stream-closed", "true")
                    .header("stream-next-offset", format_offset(q.latest_offset())),
                Body::empty(),
            ));
        }
        let claim = producer.as_ref().map(Producer::claim);
        let answer = q
            .stream_append(Vec::new(), claim, None, true)
            .await
            .map_err(|e| api_error(e.into()))?;
        // A close alone is `204` with or without a producer: it appended nothing.
        let mut r = answered(answer, producer.as_ref());
        if r.status() == StatusCode::OK {
            *r.status_mut() = StatusCode::NO_CONTENT;
        }
        return Ok(r);
    }
    // A closed stream answers that first (protocol §5.2: before a content type mismatch). The
    // engine tells a retry of the closing request (`204`) from any other append (`409`);
    // closed never reverts, so it stores nothing.
    if q.is_closed() {
        if !is_stream {
            return Err(closed_conflict(q.latest_offset()));
        }
        let claim = producer.as_ref().map(Producer::claim);
        let answer = q
            .stream_append(vec![(body, None)], claim, None, false)
            .await
            .map_err(|e| api_error(e.into()))?;
        return Ok(answered(answer, producer.as_ref()));
    }
    let have = content_type_of(&q);
    match header_str(headers, "content-type")? {
        None => {
            return Err(error(StatusCode::BAD_REQUEST, "Content-Type is required"));
        }
        Some(ct) if media_type(ct) != media_type(&have) => {
            return Err(error(
                StatusCode::CONFLICT,
                &format!("Content-Type {ct} does not match the stream's {have}"),
            ));
        }
        Some(_) => {}
    }
    let msgs = messages(&have, body, false)?;
    if !is_stream {
        return append_events(state, caller, task, &q, producer.is_some(), &msgs).await;
    }
    let batch = msgs
        .iter()
        .enumerate()
        .map(|(i, m)| {
            (
                m.as_slice(),
                producer.as_ref().and_then(|p| producer_message_id(p, i)),
            )
        })
        .collect();
    let claim = producer.as_ref().map(Producer::claim);
    let answer = q
        .stream_append(batch, claim, stream_seq, close)
        .await
        .map_err(|e| api_error(e.into()))?;
    Ok(answered(answer, producer.as_ref()))
}

/// The protocol's answer to what the engine did with an append.
fn answered(answer: StreamAppended, producer: Option<&Producer>) -> Response {
    let with_producer = |mut b: axum::http::response::Builder, seq: u64| {
        if let Some(p) = producer {
            b = b
                .header("producer-epoch", p.epoch.to_string())
                .header("producer-seq", seq.to_string());
        }
        b
    };
    match answer {
        StreamAppended::Appended {
            next_offset,
            closed,
        } => {
            let status = if producer.is_some() {
                StatusCode::OK
            } else {
                StatusCode::NO_CONTENT
            };
            let mut b = base(status).header("stream-next-offset", format_offset(next_offset));
            b = with_producer(b, producer.map_or(0, |p| p.seq));
            if closed {
                b = b.header("stream-closed", "true");
            }
            finish(b, Body::empty())
        }
        StreamAppended::Duplicate {
            next_offset,
            last_seq,
            closed,
        } => {
            let mut b = base(StatusCode::NO_CONTENT)
                .header("stream-next-offset", format_offset(next_offset));
            b = with_producer(b, last_seq);
            if closed {
                b = b.header("stream-closed", "true");
            }
            finish(b, Body::empty())
        }
        StreamAppended::StaleEpoch { current } => finish(
            base(StatusCode::FORBIDDEN)
                .header("producer-epoch", current.to_string())
                .header(header::CONTENT_TYPE, "application/json"),
            Body::from(r#"{"detail":"stale producer epoch"}"#),
        ),
        StreamAppended::SeqGap { expected } => finish(
            base(StatusCode::CONFLICT)
                .header("producer-expected-seq", expected.to_string())
                .header(
                    "producer-received-seq",
                    producer.map_or(0, |p| p.seq).to_string(),
                )
                .header(header::CONTENT_TYPE, "application/json"),
            Body::from(r#"{"detail":"producer sequence gap"}"#),
        ),
        StreamAppended::EpochStartsAtZero => error(
            StatusCode::BAD_REQUEST,
            "a new producer epoch starts at Producer-Seq 0",
        ),
        StreamAppended::StreamSeqRegression => {
            error(StatusCode::CONFLICT, "Stream-Seq must increase")
        }
        StreamAppended::Closed { next_offset } => closed_conflict(next_offset),
    }
}

/// An append to a typed event queue: each message is one event, validated as the events API
/// validates it (`400` naming the field), all stored in one commit or none.
async fn append_events(
    state: &AppState,
    caller: &Caller,
    task: TaskId,
    q: &EventQueue,
    producer: bool,
    msgs: &[Vec<u8>],
) -> Result<Response, Response> {
    if producer {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "idempotent producers write to streams; a task's events carry their own event_id",
        ));
    }
    let mut body = br#"{"events":["#.to_vec();
    for (i, m) in msgs.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(m);
    }
    body.extend_from_slice(b"]}");
    super::routes::enqueue_body(
        state,
        &crate::server::tenant::Tenant(caller.tenant.clone()),
        &task,
        q,
        &body,
    )
    .await
    .map_err(api_error)?;
    Ok(finish(
        base(StatusCode::NO_CONTENT).header("stream-next-offset", format_offset(q.latest_offset())),
        Body::empty(),
    ))
}

/// `HEAD`: the stream's metadata.
async fn head(
    State(state): State<AppState>,
    axum::Extension(streams): axum::Extension<Streams>,
    caller: Caller,
    Path(path): Path<String>,
) -> Response {
    let task = match live_task(&path, &streams, &caller) {
        Ok(t) => t,
        Err(r) => return r,
    };
    let q = match find(&state, &streams, &caller.tenant, &task, false).await {
        Ok(Some(q)) => q,
        Ok(None) => return error(StatusCode::NOT_FOUND, "no such stream"),
        Err(r) => return r,
    };
    let mut b = base(StatusCode::OK)
        .header(header::CONTENT_TYPE, content_type_of(&q))
        .header("stream-next-offset", format_offset(tail_of(&q)))
        .header(header::CACHE_CONTROL, "no-store");
    // A TTL the stream was created with (the server's default one is not the stream's own),
    // or its absolute expiry.
    let ttl = q.info().ttl_minutes * 60.0;
    if let Some(at) = q.expires_at() {
        if let Some(at) = chrono::DateTime::from_timestamp_micros(at.as_micros()) {
            b = b.header(
                "stream-expires-at",
                at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            );
        }
    } else if q.kind() == QueueKind::Stream
        && (ttl - state.manager().config().default_ttl.as_secs_f64()).abs() > 0.0005
    {
        b = b.header("stream-ttl", format!("{}", ttl.round() as u64));
    }
    if ended(&q) {
        b = b.header("stream-closed", "true");
    }
    finish(b, Body::empty())
}

/// `DELETE`: removes the stream and its messages.
async fn delete(
    State(state): State<AppState>,
    axum::Extension(streams): axum::Extension<Streams>,
    caller: Caller,
    Path(path): Path<String>,
) -> Response {
    let task = match live_task(&path, &streams, &caller) {
        Ok(t) => t,
        Err(r) => return r,
    };
    match state.manager().delete_queue(&caller.tenant, &task).await {
        Ok(true) => {
            streams.forget(&caller.tenant, &task);
            let key = (caller.tenant.clone(), task.clone());
            let mut g = streams.graph();
            if g.live_forks.get(&key).is_some_and(|&n| n > 0) {
                g.soft_deleted.insert(key);
            } else {
                g.release(&key);
            }
            drop(g);
            finish(base(StatusCode::NO_CONTENT), Body::empty())
        }
        Ok(false) => error(StatusCode::NOT_FOUND, "no such stream"),
        Err(e) => api_error(e.into()),
    }
}

/// CORS preflight: any origin may call the protocol (credentials travel as a bearer token,
/// never as cookies).
async fn preflight() -> Response {
    finish(
        base(StatusCode::NO_CONTENT)
            .header(
                header::ACCESS_CONTROL_ALLOW_METHODS,
                "GET, HEAD, POST, PUT, DELETE, OPTIONS",
            )
            .header(header::ACCESS_CONTROL_ALLOW_HEADERS, wire::ALLOW)
            .header(header::ACCESS_CONTROL_MAX_AGE, "86400"),
        Body::empty(),
    )
}

/// `GET`: catch-up, long-poll or SSE.
async fn read(
    State(state): State<AppState>,
    axum::Extension(streams): axum::Extension<Streams>,
    caller: Caller,
    Path(path): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    match read_inner(&state, &streams, &caller, &path, &query, &headers).await {
        Ok(r) | Err(r) => r,
    }
}

/// Messages read from `from`, up to the read limits and `until`.
struct Chunk {
    messages: Vec<Bytes>,
    /// The offset after the last message read.
    next: u64,
}

/// Reads what the queue holds from `from` (at most up to `until`), waiting for nothing.
async fn read_chunk(q: &EventQueue, from: u64, until: u64) -> Result<Chunk, Response> {
    let mut out = Chunk {
        messages: Vec::new(),
        next: from,
    };
    if from >= until {
        return Ok(out);
    }
    let mut sub = q.subscribe(from).map_err(|e| api_error(e.into()))?;
    let mut bytes = 0;
    while out.next < until && out.messages.len() < READ_MESSAGES && bytes < READ_BYTES {
        match sub.next().await {
            Some(Ok(Delivery::Event(e))) => {
                bytes += e.json().len();
                out.next = e.offset() + 1;
                out.messages.push(e.json().clone());
            }
            Some(Ok(Delivery::Gap {
                first_available_offset,
                ..
            })) => out.next = first_available_offset,
            Some(Err(e)) => return Err(api_error(e.into())),
            None => break,
        }
    }
    Ok(out)
}

async fn read_inner(
    state: &AppState,
    streams: &Streams,
    caller: &Caller,
    path: &str,
    query: &HashMap<String, String>,
    headers: &HeaderMap,
) -> Result<Response, Response> {
    let task = live_task(path, streams, caller)?;
    let Some(q) = find(state, streams, &caller.tenant, &task, true).await? else {
        return Err(error(StatusCode::NOT_FOUND, "no such stream"));
    };
    let live = match query.get("live").map(String::as_str) {
        None | Some("false") | Some("") => None,
        Some("long-poll") => Some(Live::LongPoll),
        Some("sse") => Some(Live::Sse),
        Some(other) => {
            return Err(error(
                StatusCode::BAD_REQUEST,
                &format!("live: {other} is not long-poll or sse"),
            ));
        }
    };
    let offset = match query.get("offset") {
        Some(s) => ReadOffset::parse(s)
            .ok_or_else(|| error(StatusCode::BAD_REQUEST, "offset: not an offset"))?,
        None if live.is_some() => {
            return Err(error(StatusCode::BAD_REQUEST, "live reads need an offset"));
        }
        None => ReadOffset::Start,
    };
    let tail = tail_of(&q);
    let first = q.first_offset();
    let from = match offset {
        ReadOffset::Start => first,
        ReadOffset::Now => tail,
        ReadOffset::At(n) => {
            if n < first {
                return Err(error(
                    StatusCode::GONE,
                    "the offset is below the oldest retained message",
                ));
            }
            if n > tail {
                return Err(error(
                    StatusCode::BAD_REQUEST,
                    "the offset is beyond the stream's tail",
                ));
            }
            n
        }
    };
    let client_cursor = query.get("cursor").map(String::as_str);
    let content_type = content_type_of(&q);
    match live {
        Some(Live::Sse) => sse(state, caller, q, from, content_type, client_cursor),
        Some(Live::LongPoll) => long_poll(q, from, &content_type, client_cursor).await,
        None => catch_up(q, from, &content_type, headers, offset).await,
    }
}

#[derive(Clone, Copy)]
enum Live {
    LongPoll,
    Sse,
}

/// The body of a read: a JSON array for JSON streams, the messages' bytes otherwise.
fn body_of<M: AsRef<[u8]>>(json: bool, messages: &[M]) -> Vec<u8> {
    let size: usize = messages.iter().map(|m| m.as_ref().len() + 1).sum();
    let mut out = Vec::with_capacity(size + 2);
    if json {
        out.push(b'[');
    }
    for (i, m) in messages.iter().enumerate() {
        if json && i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(m.as_ref());
    }
    if json {
        out.push(b']');
    }
    out
}

/// Most messages one catch-up read answers; a read of more ends there without
/// `Stream-Up-To-Date`, and the client goes on from its `Stream-Next-Offset`. Memory does not
/// depend on it (the body is streamed slice by slice): it only bounds how long one response
/// runs.
const CATCH_UP_MESSAGES: u64 = 1 << 20;
/// Most messages of one slice of a catch-up read: what is read from the store at once.
const SLICE_MESSAGES: usize = 8192;
/// Most bytes of messages of one slice (at least one message is always read). A streaming
/// read holds at most two slices: the one being sent and the one read ahead.
const SLICE_BYTES: usize = 512 << 10;

/// A catch-up `GET`: the stored messages from `from` up to the tail as it was when the request
/// came (at most [`CATCH_UP_MESSAGES`]), in one response.
///
/// The end is decided first, from the queue's published tail (everything below it is stored
/// and synced), so the headers (`Stream-Next-Offset`, `ETag`, `Stream-Up-To-Date`) are known
/// before any message is read, and an `If-None-Match` hit reads nothing. The messages then go
/// straight from the store to the body, read in slices on the blocking pool (the next slice
/// is read while the current one is sent) and written as they come: no subscription, no
/// decoding into events, one copy from the store's read into the body, and memory bounded by
/// two slices whatever the read's length. A read that fits one slice is answered whole, with
/// its length. Messages trimmed while the read runs are skipped, as a subscription skips a
/// gap; a storage error after the headers went out cuts the body short (the client sees an
/// incomplete response, never a wrong one).
async fn catch_up(
    q: EventQueue,
    from: u64,
    content_type: &str,
    headers: &HeaderMap,
    offset: ReadOffset,
) -> Result<Response, Response> {
    let tail = tail_of(&q);
    let closed = ended(&q);
    let end = tail.min(from.saturating_add(CATCH_UP_MESSAGES));
    let up_to_date = end >= tail;
    let tag = etag(from, end, closed && up_to_date);
    let not_modified = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == tag));
    let mut b = base(if not_modified {
        StatusCode::NOT_MODIFIED
    } else {
        StatusCode::OK
    })
    .header(header::CONTENT_TYPE, content_type)
    .header("stream-next-offset", format_offset(end))
    .header(header::ETAG, &tag);
    b = if matches!(offset, ReadOffset::Now) {
        b.header(header::CACHE_CONTROL, "no-store")
    } else {
        b.header(header::CACHE_CONTROL, "private, max-age=60")
    };
    if up_to_date {
        b = b.header("stream-up-to-date", "true");
    }
    if closed && up_to_date {
        b = b.header("stream-closed", "true");
    }
    if not_modified {
        return Ok(finish(b, Body::empty()));
    }
    let mut body = CatchUpBody {
        q,
        next: from,
        end,
        json: is_json(content_type),
        started: false,
        any: false,
        ahead: None,
    };
    // The first slice before the answer: a read that fits it is sent whole, and a failing
    // store is still an error status.
    let first = body.step().await.map_err(|e| api_error(e.into()))?;
    if body.finished() {
        return Ok(finish(b, Body::from(first)));
    }
    let rest = futures_util::stream::unfold(body, |mut body| async move {
        if body.finished() {
            return None;
        }
        let chunk = body.step().await.map_err(|e| {
            tracing::warn!(error = %e, "a Durable Streams catch-up read failed; its body is cut short");
            std::io::Error::other(e.to_string())
        });
        if chunk.is_err() {
            body.next = body.end;
        }
        Some((chunk, body))
    });
    let stream = futures_util::stream::once(async move { Ok(first) }).chain(rest);
    Ok(finish(b, Body::from_stream(stream)))
}

/// The state of a streamed catch-up read (see [`catch_up`]).
struct CatchUpBody {
    q: EventQueue,
    /// The next offset to read.
    next: u64,
    /// Where the read ends (exclusive): its `Stream-Next-Offset`.
    end: u64,
    /// A JSON stream's body is one array of the messages.
    json: bool,
    /// Whether the array's `[` went out.
    started: bool,
    /// Whether a message went out (the next one needs a `,` before it).
    any: bool,
    /// The read of the next slice, started while the current one is sent.
    ahead: Option<tokio::task::JoinHandle<crate::error::Result<Slice>>>,
}

/// One slice of a catch-up read: its messages framed for the body, as the store lends them.
struct Slice {
    out: BytesMut,
    json: bool,
    any: bool,
    last: Option<u64>,
}

impl Slice {
    fn put(&mut self, offset: u64, message: &[u8]) {
        if self.json && self.any {
            self.out.extend_from_slice(b",");
        }
        self.any = true;
        self.out.extend_from_slice(message);
        self.last = Some(offset);
    }
}

impl CatchUpBody {
    fn finished(&self) -> bool {
        self.next >= self.end && self.started
    }

    /// Starts reading the slice from `from`; `open` puts the array's `[` first, so that the
    /// first slice is not copied again behind it.
    fn read(
        &self,
        from: u64,
        any: bool,
        open: bool,
    ) -> tokio::task::JoinHandle<crate::error::Result<Slice>> {
        // A little more than a slice holds, so that its last message (and the array's `]`)
        // needs no regrowth.
        let mut out = BytesMut::with_capacity(SLICE_BYTES + SLICE_BYTES / 8);
        if open {
            out.extend_from_slice(b"[");
        }
        let slice = Slice {
            out,
            json: self.json,
            any,
            last: None,
        };
        self.q.spawn_read_each(
            from,
            self.end,
            SLICE_MESSAGES,
            SLICE_BYTES,
            slice,
            Slice::put,
        )
    }

    /// The body's next piece: the next slice of messages (framed), and at the end the
    /// array's close; starts the read of the slice after it.
    async fn step(&mut self) -> Result<Bytes, Error> {
        let open = self.json && !self.started;
        self.started = true;
        let mut out = if self.next < self.end {
            let read = match self.ahead.take() {
                Some(r) => r,
                None => self.read(self.next, self.any, open),
            };
            let slice = read
                .await
                .map_err(|e| Error::internal(format!("storage read task failed: {e}")))??;
            // No message: nothing retained in the rest of the range (trimmed, or deleted).
            self.next = slice.last.map_or(self.end, |last| last + 1);
            self.any = slice.any;
            if self.next < self.end {
                self.ahead = Some(self.read(self.next, self.any, false));
            }
            slice.out
        } else {
            let mut out = BytesMut::new();
            if open {
                out.extend_from_slice(b"[");
            }
            out
        };
        if self.json && self.next >= self.end {
            out.extend_from_slice(b"]");
        }
        Ok(out.freeze())
    }
}

async fn long_poll(
    q: EventQueue,
    from: u64,
    content_type: &str,
    client_cursor: Option<&str>,
) -> Result<Response, Response> {
    let tail = tail_of(&q);
    let mut chunk = read_chunk(&q, from, tail).await?;
    if chunk.messages.is_empty() && !ended(&q) {
        // Wait for the next message (or the close) from `from`.
        let mut sub = q.subscribe(from).map_err(|e| api_error(e.into()))?;
        if let Ok(Some(Ok(deliveries))) =
            tokio::time::timeout(LONG_POLL, sub.next_batch(READ_MESSAGES, READ_BYTES)).await
        {
            for d in deliveries {
                match d {
                    Delivery::Event(e) => {
                        chunk.next = e.offset() + 1;
                        chunk.messages.push(e.json().clone());
                    }
                    Delivery::Gap {
                        first_available_offset,
                        ..
                    } => chunk.next = first_available_offset,
                }
            }
        }
    }
    let tail = tail_of(&q);
    let closed = ended(&q);
    let up_to_date = chunk.next >= tail;
    let status = if chunk.messages.is_empty() {
        StatusCode::NO_CONTENT
    } else {
        StatusCode::OK
    };
    let mut b = base(status)
        .header("stream-next-offset", format_offset(chunk.next.max(from)))
        .header(header::CACHE_CONTROL, "private, max-age=60");
    if up_to_date {
        b = b.header("stream-up-to-date", "true");
    }
    if closed && up_to_date {
        b = b.header("stream-closed", "true");
    } else {
        b = b.header("stream-cursor", cursor(client_cursor));
    }
    if chunk.messages.is_empty() {
        return Ok(finish(b, Body::empty()));
    }
    b = b
        .header(header::CONTENT_TYPE, content_type)
        .header(header::ETAG, etag(from, chunk.next, closed && up_to_date));
    Ok(finish(
        b,
        Body::from(body_of(is_json(content_type), &chunk.messages)),
    ))
}

/// The `control` event after each batch: where to read next, and whether the stream is
/// closed (then no cursor) and the reader up to date. Written by hand, in place: every live
/// reader sends one per batch, and its values (an offset, a cursor: digits) need no escaping.
fn put_control(out: &mut BytesMut, next: u64, closed: bool, up_to_date: bool, cur: &str) {
    out.extend_from_slice(b"event: control\ndata:{\"streamNextOffset\":\"");
    out.extend_from_slice(format_offset(next).as_bytes());
    if closed {
        out.extend_from_slice(b"\",\"streamClosed\":true");
    } else {
        debug_assert!(cur.bytes().all(|b| b.is_ascii_digit()));
        out.extend_from_slice(b"\",\"streamCursor\":\"");
        out.extend_from_slice(cur.as_bytes());
        out.extend_from_slice(b"\"");
    }
    if up_to_date {
        out.extend_from_slice(b",\"upToDate\":true");
    }
    out.extend_from_slice(b"}\n\n");
}

/// The protocol's SSE framing of a subscription's batches: a `data` event with the batch's
/// messages, then a `control` event. The body around it is the one every event stream of
/// the server uses (`server::stream`), so these readers count in the same open-stream limits,
/// share the same memory budget, stop reading when their client stops, and end at shutdown.
struct SseFraming {
    q: EventQueue,
    /// A JSON stream: a batch is framed as one array.
    json: bool,
    base64: bool,
    client_cursor: Option<String>,
    next: u64,
}

impl Framing for SseFraming {
    const PROTOCOL: &'static str = "durable-streams";

    fn put_batch(&mut self, batch: &[Delivery], out: &mut BytesMut) -> ControlFlow<()> {
        let mut messages: Vec<&[u8]> = Vec::with_capacity(batch.len());
        for d in batch {
            match d {
                Delivery::Event(e) => {
                    self.next = e.offset() + 1;
                    messages.push(e.json().as_ref());
                }
                Delivery::Gap {
                    first_available_offset,
                    ..
                } => self.next = *first_available_offset,
            }
        }
        match messages.as_slice() {
            [] => {}
            // The common live case: one message of a text or binary stream, framed as it is.
            [one] if !self.json => put_sse_data(out, one, self.base64),
            many => put_sse_data(out, &body_of(self.json, many), self.base64),
        }
        let tail = tail_of(&self.q);
        let closed = ended(&self.q) && self.next >= tail;
        let cur = cursor(self.client_cursor.as_deref());
        put_control(out, self.next, closed, self.next >= tail, &cur);
        if closed {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    }

    fn put_end(&mut self, out: &mut BytesMut) {
        // The subscription ended at the close, everything delivered (a removal says nothing).
        if ended(&self.q) {
            let cur = cursor(self.client_cursor.as_deref());
            put_control(out, self.next, true, true, &cur);
        }
    }
}

/// An SSE read: `data` events with the messages, each batch followed by a `control` event;
/// ends at the close (after `streamClosed: true`), after [`SSE_LIFETIME`], at server shutdown,
/// or when the stream is deleted.
fn sse(
    state: &AppState,
    caller: &Caller,
    q: EventQueue,
    from: u64,
    content_type: String,
    client_cursor: Option<&str>,
) -> Result<Response, Response> {
    if stream::shutting_down(state) {
        return Err(api_error(ApiError::shutting_down()));
    }
    // Given back when the body drops, however the stream ends.
    let slot = StreamSlot::take(state, &caller.tenant).map_err(api_error)?;
    let base64 = !(is_json(&content_type) || media_type(&content_type).starts_with("text/"));
    let first_cursor = cursor(client_cursor);
    let sub = q.subscribe(from).map_err(|e| api_error(e.into()))?;
    let tail = tail_of(&q);
    // Nothing more can come: say so at once; at the tail, say the reader is up to date.
    let mut opening = BytesMut::new();
    let only_opening = ended(&q) && from >= tail;
    if from >= tail {
        put_control(&mut opening, from, only_opening, true, &first_cursor);
    }
    let framing = SseFraming {
        q,
        json: is_json(&content_type),
        base64,
        client_cursor: client_cursor.map(str::to_string),
        next: from,
    };
    let keepalive = Keepalive::every(state.config().keepalive);
    let mut body = StreamBody::new(state, slot, opening.freeze(), sub, framing, keepalive);
    if only_opening {
        body = body.end_after_opening();
    }
    let mut b = base(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .header(HeaderName::from_static("x-accel-buffering"), "no");
    if base64 {
        b = b.header(
            "stream-sse-data-encoding",
            HeaderValue::from_static("base64"),
        );
    }
    Ok(finish(
        b,
        Body::from_stream(body.take_until(tokio::time::sleep(SSE_LIFETIME))),
    ))
}
