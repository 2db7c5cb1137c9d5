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
//! A `connected` frame comes first, a `gap` frame reports dropped events, and a `: keepalive`
//! comment is sent every keepalive interval. The stream ends with the subscription (terminal
//! event, close, delete, expiry) or when the server shuts down. This module is the framing;
//! the body, its slot, keepalive, `Last-Event-ID` and shutdown are [`super::stream`]'s, which
//! frames the events that are ready together (replay, bursts) into one chunk, so a fast
//! subscriber costs one write per burst rather than per event.

use std::ops::ControlFlow;

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use bytes::{BufMut, BytesMut};
use serde::{Deserialize, Serialize};

use crate::server::AppState;
use crate::server::error::ApiError;
use crate::server::routes::{TaskPath, TaskRoute};
use crate::server::stream::{
    self, Framing, Keepalive, LastEventId, StreamBody, StreamSlot, preview,
};
use crate::server::tenant::Tenant;
use crate::{Delivery, Error, Result, TaskId, TenantId, Timestamp};

/// Query parameters of a stream request.
#[derive(Debug, Deserialize)]
pub(super) struct StreamParams {
    from_offset: Option<String>,
}

type QueryResult =
    std::result::Result<Query<StreamParams>, axum::extract::rejection::QueryRejection>;

/// `GET /events/workflows/{id}`.
pub(super) async fn workflow_stream(
    state: State<AppState>,
    tenant: Tenant,
    task: TaskPath,
    last_event_id: LastEventId,
    query: QueryResult,
) -> Result<Response, ApiError> {
    open(
        state,
        tenant,
        task,
        last_event_id,
        query,
        TaskRoute::Workflow,
    )
    .await
}

/// `GET /events/ingestion/{id}`.
pub(super) async fn ingestion_stream(
    state: State<AppState>,
    tenant: Tenant,
    task: TaskPath,
    last_event_id: LastEventId,
    query: QueryResult,
) -> Result<Response, ApiError> {
    open(
        state,
        tenant,
        task,
        last_event_id,
        query,
        TaskRoute::Ingestion,
    )
    .await
}

/// The resume point: `Last-Event-ID: N` → N + 1, which wins over `?from_offset=`; default 0.
fn resume_point(last_event_id: LastEventId, query: QueryResult) -> Result<u64, ApiError> {
    if let LastEventId(Some(from)) = last_event_id {
        return Ok(from);
    }
    let Query(params) = query
        .map_err(|e| ApiError::bad_request(format!("invalid query string: {}", e.body_text())))?;
    match params.from_offset {
        None => Ok(0),
        Some(text) => stream::parse_offset(&text).ok_or_else(|| {
            ApiError::bad_request(format!(
                "from_offset: must be a non-negative integer, got {}",
                preview(&text)
            ))
        }),
    }
}

async fn open(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    TaskPath(task): TaskPath,
    last_event_id: LastEventId,
    query: QueryResult,
    route: TaskRoute,
) -> Result<Response, ApiError> {
    let from = resume_point(last_event_id, query)?;
    if stream::shutting_down(&state) {
        return Err(ApiError::shutting_down());
    }
    let queue = state
        .manager()
        .find_queue(&tenant, &task)
        .await?
        .ok_or_else(|| route.not_found(&task))?;
    // A Durable Stream of other bytes than JSON holds no events: its messages are read
    // through its own protocol, never sent as if they were events.
    if let Some(ct) = queue.content_type()
        && !ct
            .split(';')
            .next()
            .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
    {
        return Err(ApiError::conflict(format!(
            "{task} is a Durable Stream of {ct}, not events: read it at /v1/stream/{task}"
        )));
    }
    // Nothing can come past the terminal event, or at or past the end of a closed queue: 204
    // tells a browser's EventSource to stop reconnecting.
    if queue.nothing_from(from) {
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    // From here the slot is given back when it drops, whatever happens.
    let slot = StreamSlot::take(&state, &tenant)?;
    let sub = queue.subscribe(from).map_err(|e| match e {
        Error::QueueNotFound { .. } => route.not_found(&task),
        other => other.into(),
    })?;
    if sub.is_ended() {
        // The terminal event or the close committed between the check above and the
        // subscription.
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    let connected = connected_frame(
        &task,
        &tenant,
        sub.first_offset(),
        sub.latest_offset_at_start(),
    );
    tracing::debug!(%tenant, %task, from, "stream opened");
    let keepalive = Keepalive::every(state.config().keepalive);
    Ok(StreamBody::new(&state, slot, connected, sub, SseFraming, keepalive).into_response())
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

/// Plain SSE framing: every delivery is a frame, the stream ends with the subscription.
struct SseFraming;

impl Framing for SseFraming {
    const PROTOCOL: &'static str = "SSE";

    #[inline]
    fn put_batch(&mut self, batch: &[Delivery], out: &mut BytesMut) -> ControlFlow<()> {
        // One allocation for the batch rather than growth per frame.
        out.reserve(batch.iter().map(frame_len).sum());
        for delivery in batch {
            put_frame(out, delivery);
        }
        ControlFlow::Continue(())
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
