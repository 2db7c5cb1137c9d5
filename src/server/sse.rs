//! SSE streams: `GET /events/workflows/{id}` and `GET /events/ingestion/{id}` (both serve any
//! queue kind).
//!
//! The body is a raw stream of frames. Each event's stored JSON bytes are written as they are —
//! never re-encoded — framed as
//!
//! ```text
//! id: <offset>
//! event: <event_type>
//! data: <event JSON>
//! ```
//!
//! Events that are ready together (replay, bursts) are framed into one chunk, so a fast
//! subscriber costs one write per burst rather than per event. A `connected` frame comes first,
//! a `gap` frame reports dropped events, and a `: keepalive` comment is sent every keepalive
//! interval. The stream ends with the subscription (terminal event, close, delete,
//! expiry) or when the server shuts down.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::{BufMut, BytesMut};
use futures_util::Stream;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::time::{Instant, Interval, MissedTickBehavior};
use tokio_util::sync::WaitForCancellationFutureOwned;

use crate::error::Result;
use crate::event::Timestamp;
use crate::ids::{TaskId, TenantId};
use crate::server::AppState;
use crate::server::error::ApiError;
use crate::server::routes::{TaskPath, TaskRoute};
use crate::server::tenant::Tenant;
use crate::subscription::Delivery;

/// Coalescing stops once a chunk holds this many bytes.
const CHUNK_BYTES: usize = 64 * 1024;

/// Deliveries taken from the subscription at a time. A batch also stops once its events hold
/// `CHUNK_BYTES` of JSON, so a chunk stays under about twice `CHUNK_BYTES` plus one event.
const BATCH: usize = 64;

const KEEPALIVE: &[u8] = b": keepalive\n\n";

/// Query parameters of a stream request.
#[derive(Debug, Deserialize)]
pub(super) struct StreamParams {
    from_offset: Option<String>,
}

/// `GET /events/workflows/{id}`.
pub(super) async fn workflow_stream(
    state: State<AppState>,
    tenant: Tenant,
    task: TaskPath,
    headers: HeaderMap,
    query: Result<Query<StreamParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    stream(state, tenant, task, headers, query, TaskRoute::Workflow)
}

/// `GET /events/ingestion/{id}`.
pub(super) async fn ingestion_stream(
    state: State<AppState>,
    tenant: Tenant,
    task: TaskPath,
    headers: HeaderMap,
    query: Result<Query<StreamParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    stream(state, tenant, task, headers, query, TaskRoute::Ingestion)
}

/// The resume point: `Last-Event-ID: N` → N + 1, which wins over `?from_offset=`; default 0.
fn resume_point(
    headers: &HeaderMap,
    query: Result<Query<StreamParams>, axum::extract::rejection::QueryRejection>,
) -> Result<u64, ApiError> {
    if let Some(value) = headers.get("last-event-id") {
        let text = value
            .to_str()
            .map_err(|_| ApiError::bad_request("Last-Event-ID: must be ASCII digits"))?
            .trim();
        // EventSource sends no header for an empty id; treat an empty one as absent.
        if !text.is_empty() {
            return text
                .parse::<u64>()
                .ok()
                .and_then(|n| n.checked_add(1))
                .ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "Last-Event-ID: must be an event offset (a non-negative integer), got {}",
                        preview(text)
                    ))
                });
        }
    }
    let Query(params) = query
        .map_err(|e| ApiError::bad_request(format!("invalid query string: {}", e.body_text())))?;
    match params.from_offset {
        None => Ok(0),
        Some(text) => text.trim().parse::<u64>().map_err(|_| {
            ApiError::bad_request(format!(
                "from_offset: must be a non-negative integer, got {}",
                preview(&text)
            ))
        }),
    }
}

/// A client's value quoted for an error message, cut to 40 characters (a hostile header can
/// be kilobytes long).
fn preview(text: &str) -> String {
    const MAX: usize = 40;
    if text.chars().count() <= MAX {
        format!("{text:?}")
    } else {
        let head: String = text.chars().take(MAX).collect();
        format!("{head:?}… ({} bytes)", text.len())
    }
}

fn stream(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    TaskPath(task): TaskPath,
    headers: HeaderMap,
    query: Result<Query<StreamParams>, axum::extract::rejection::QueryRejection>,
    route: TaskRoute,
) -> Result<Response, ApiError> {
    let from = resume_point(&headers, query)?;
    let shutdown = state.shutdown_token().clone();
    if shutdown.is_cancelled() {
        return Err(ApiError::shutting_down());
    }
    let queue = state
        .manager()
        .get_queue(&tenant, &task)
        .ok_or_else(|| route.not_found(&task))?;
    if queue.finished_at().is_some_and(|f| from > f) {
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    let config = state.config();
    state.limits().open_stream(
        &tenant,
        config.max_sse_streams,
        config.max_sse_streams_per_tenant,
    )?;
    // From here the slot is given back when the guard drops, whatever happens.
    let guard = StreamGuard {
        state: state.clone(),
        tenant: tenant.clone(),
    };
    let sub = queue.subscribe(from).map_err(|e| match e {
        crate::error::Error::QueueNotFound { .. } => route.not_found(&task),
        other => other.into(),
    })?;
    if sub.is_ended() {
        // The terminal event committed between the check above and the subscription.
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    let connected = connected_frame(
        &task,
        &tenant,
        sub.first_offset(),
        sub.latest_offset_at_start(),
    );
    let keepalive = state
        .config()
        .keepalive
        .max(std::time::Duration::from_millis(1));
    let mut ticker = tokio::time::interval_at(Instant::now() + keepalive, keepalive);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    tracing::debug!(%tenant, %task, from, "stream opened");
    let body = SseBody {
        connected: Some(connected),
        events: Box::pin(sub.into_batches(BATCH, CHUNK_BYTES)),
        shutdown: Box::pin(shutdown.cancelled_owned()),
        keepalive: ticker,
        done: false,
        _guard: guard,
    };
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

#[derive(Serialize)]
struct Connected<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    task_id: &'a TaskId,
    tenant_id: &'a TenantId,
    offset: u64,
    latest_offset: u64,
    timestamp: Timestamp,
}

fn connected_frame(task: &TaskId, tenant: &TenantId, offset: u64, latest: u64) -> Bytes {
    let data = Connected {
        kind: "connected",
        task_id: task,
        tenant_id: tenant,
        offset,
        latest_offset: latest,
        timestamp: Timestamp::now(),
    };
    let mut out = BytesMut::with_capacity(192);
    out.put_slice(b"event: connected\ndata: ");
    // Serialising plain strings and integers into memory cannot fail.
    let _ = serde_json::to_writer((&mut out).writer(), &data);
    out.put_slice(b"\n\n");
    out.freeze()
}

/// At least what [`put_frame`] appends for a delivery.
fn frame_len(delivery: &Delivery) -> usize {
    match delivery {
        Delivery::Event(ev) => {
            ev.json().len() + ev.event_type().as_str().len() + ID_DIGITS + FRAME_SYNTAX
        }
        Delivery::Gap { .. } => 160,
    }
}

/// The most digits of an offset.
const ID_DIGITS: usize = 20;
/// `id: `, `\nevent: `, `\ndata: `, `\n\n`.
const FRAME_SYNTAX: usize = 4 + 8 + 7 + 2;

/// Appends one delivery's frame; the caller has reserved [`frame_len`] for it. Formatting
/// machinery is avoided on the per-event path: a replay frames thousands of events per chunk.
fn put_frame(out: &mut BytesMut, delivery: &Delivery) {
    use std::io::Write;
    match delivery {
        Delivery::Event(ev) => {
            let json = ev.json();
            let event_type = ev.event_type().as_str().as_bytes();
            let mut digits = [0u8; 20];
            let offset = crate::event::decimal(ev.offset(), &mut digits);
            out.put_slice(b"id: ");
            out.put_slice(offset);
            out.put_slice(b"\nevent: ");
            out.put_slice(event_type);
            out.put_slice(b"\ndata: ");
            out.put_slice(json);
            out.put_slice(b"\n\n");
        }
        Delivery::Gap {
            requested_offset,
            first_available_offset,
        } => {
            let _ = write!(
                (&mut *out).writer(),
                "event: gap\ndata: {{\"type\":\"gap\",\"requested_offset\":{requested_offset},\"first_available_offset\":{first_available_offset}}}\n\n"
            );
        }
    }
}

/// Gives a stream's slot back (open-stream counts) when its body is dropped.
struct StreamGuard {
    state: AppState,
    tenant: TenantId,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.state.limits().close_stream(&self.tenant);
    }
}

type Deliveries = Pin<Box<dyn Stream<Item = Result<Vec<Delivery>>> + Send>>;

/// The body of one SSE response.
struct SseBody {
    connected: Option<Bytes>,
    events: Deliveries,
    shutdown: Pin<Box<WaitForCancellationFutureOwned>>,
    keepalive: Interval,
    done: bool,
    _guard: StreamGuard,
}

impl Stream for SseBody {
    type Item = std::result::Result<Bytes, Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if let Some(frame) = this.connected.take() {
            return Poll::Ready(Some(Ok(frame)));
        }
        if this.done {
            return Poll::Ready(None);
        }
        if this.shutdown.as_mut().poll(cx).is_ready() {
            this.done = true;
            return Poll::Ready(None);
        }
        let mut out = BytesMut::new();
        while out.len() < CHUNK_BYTES {
            match this.events.poll_next_unpin(cx) {
                Poll::Ready(Some(Ok(batch))) => {
                    // One allocation for the batch rather than growth per frame.
                    out.reserve(batch.iter().map(frame_len).sum());
                    for delivery in &batch {
                        put_frame(&mut out, delivery);
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    tracing::error!(error = %e, "stream ended by a read error");
                    this.done = true;
                    break;
                }
                Poll::Ready(None) => {
                    this.done = true;
                    break;
                }
                Poll::Pending => break,
            }
        }
        if !out.is_empty() {
            return Poll::Ready(Some(Ok(out.freeze())));
        }
        if this.done {
            return Poll::Ready(None);
        }
        if this.keepalive.poll_tick(cx).is_ready() {
            return Poll::Ready(Some(Ok(Bytes::from_static(KEEPALIVE))));
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use crate::event::decimal;

    #[test]
    fn decimal_writes_every_u64() {
        let mut buf = [0u8; 20];
        assert_eq!(decimal(0, &mut buf), b"0");
        assert_eq!(decimal(1907, &mut buf), b"1907");
        assert_eq!(decimal(u64::MAX, &mut buf), u64::MAX.to_string().as_bytes());
    }
}
