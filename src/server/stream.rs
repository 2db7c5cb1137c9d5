//! What every event stream shares, whatever its protocol: the plain SSE streams
//! (`GET /events/...`, [`super::sse`]), A2A's `SubscribeToTask` ([`super::a2a`]) and the
//! Durable Streams protocol's `live=sse` reads ([`super::durable_streams`]).
//!
//! - [`StreamSlot`]: the stream's place under the open-stream limits
//!   ([`ServerConfig::max_sse_streams`], [`ServerConfig::max_sse_streams_per_tenant`]).
//! - [`LastEventId`]: the `Last-Event-ID` header, parsed once, as the offset to resume at.
//! - [`Keepalive`]: the `: keepalive` comment and when it is sent.
//! - [`StreamBody`]: the response body, driven by a [`Subscription`]'s batches, with the SSE
//!   response headers ([`StreamBody::into_response`]). It ends with the subscription, when
//!   the protocol says so, or when the server shuts down.
//!
//! A protocol supplies only its framing, a [`Framing`]: how a batch of deliveries becomes
//! frame bytes, and whether the stream ends there. It writes into the chunk the body is
//! building, so the framing of a replay costs one buffer reservation per batch, not one
//! allocation per event.
//!
//! # Memory
//!
//! A client that stops reading must not make the server hold more for it. A body frames one
//! batch of deliveries into a chunk (at most [`BATCH_BYTES`] of event JSON, or one larger
//! event) and frames the next only once the connection has written the last one to its
//! socket: while the socket is full nothing is framed, and the subscription reads nothing
//! from the log (it reads only when asked for more, see [`Subscription`]'s `# Memory`).
//! A stream that is not draining so holds one chunk and one replay step
//! ([`crate::Config::replay_bytes`]), about 64 KiB, beyond its socket buffers.
//!
//! A stream whose subscription is about to read the log takes a larger replay step (512 KiB)
//! when the server-wide budget below has that room free right now, holding the extra bytes
//! against the budget until the step's chunk is written: a client that keeps up gets fewer,
//! larger reads and writes, and one that stops holds at most the budget's share. It never
//! waits for that room.
//!
//! Larger events are held against a server-wide budget ([`ServerConfig::stream_buffer_bytes`]):
//! the part of a batch beyond [`OWN_BYTES`] needs that many bytes of the budget until the
//! chunk is written. A stream that finds the budget spent gives the events back to its
//! subscription (which reads them again later, exactly in order) and waits for the budget
//! before it reads them again, so it waits holding nothing rather than allocating past the
//! budget. Streams of small events never touch the budget, so streams stalled on large events
//! cannot hold up the others.
//!
//! # Why a slot is released on drop
//!
//! A stream can end in many ways: the subscription ends, the protocol ends it, the client
//! goes away (the body is then dropped without being polled again), the handler fails after
//! taking the slot, the server shuts down. Every one of them drops the body, and the slot is
//! inside the body, so [`StreamSlot`]'s `Drop` is the one place that gives the slot back. A
//! count decremented "at the end of the stream" would leak a slot per disconnected client
//! until the limits refused everyone.
//!
//! # Shutdown
//!
//! [`serve`](super::serve) cancels the state's [shutdown token](AppState::shutdown_token)
//! when its shutdown future resolves. A request for a new stream is refused from then on
//! ([`shutting_down`]; each protocol answers it its own way), and every open body waits on
//! the token: its cancellation wakes the body, which ends its response at that poll (after
//! the opening frames, if they were not sent yet). The connections then close, and the
//! server's graceful shutdown is not held up by streams that would otherwise never end.
//!
//! [`ServerConfig::max_sse_streams`]: super::ServerConfig::max_sse_streams
//! [`ServerConfig::stream_buffer_bytes`]: super::ServerConfig::stream_buffer_bytes
//! [`ServerConfig::max_sse_streams_per_tenant`]: super::ServerConfig::max_sse_streams_per_tenant

use std::convert::Infallible;
use std::future::Future;
use std::ops::ControlFlow;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use bytes::BytesMut;
use futures_util::task::AtomicWaker;
use futures_util::{Stream, StreamExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Interval, MissedTickBehavior};
use tokio_util::sync::WaitForCancellationFutureOwned;

use crate::server::AppState;
use crate::server::error::ApiError;
use crate::{Delivery, Subscription, TenantId};

/// A batch taken from the subscription stops once its events hold this many bytes of JSON
/// (so it holds at most this plus one event). One replay step of the default size is one
/// batch, framed into one chunk and written with one system call.
pub(super) const BATCH_BYTES: usize = 32 * 1024;

/// Bytes of event JSON a batch may hold on the stream's own account; beyond this (a batch
/// with an event larger than [`BATCH_BYTES`]) it draws on the server-wide stream budget.
pub(super) const OWN_BYTES: usize = 2 * BATCH_BYTES;

/// Deliveries taken from the subscription at a time (a batch also stops at [`BATCH_BYTES`]).
const BATCH: usize = 256;

/// Bytes a replay step may read beyond [`BATCH_BYTES`] when the server-wide budget has them
/// free; held against the budget until the step's chunk is written (see the module docs).
const FAST_EXTRA: u32 = 480 * 1024;

/// Deliveries of such a step taken at once: at least a whole step of small events
/// ([`crate::Config::replay_chunk`] by default), so that none of it stays behind unbudgeted.
const FAST_BATCH: usize = 1024;

/// The comment sent on a silent stream.
const KEEPALIVE: &[u8] = b": keepalive\n\n";

/// Whether the server is shutting down: new streams are refused then (see the module docs).
pub(super) fn shutting_down(state: &AppState) -> bool {
    state.shutdown_token().is_cancelled()
}

/// One open stream's place under the open-stream limits, given back when this is dropped
/// (see the module docs for why on drop).
#[derive(Debug)]
pub(super) struct StreamSlot {
    state: AppState,
    tenant: TenantId,
}

impl StreamSlot {
    /// Takes a slot for a stream of `tenant`.
    ///
    /// # Errors
    ///
    /// `429` with `Retry-After` when the server or the tenant has as many streams open as
    /// its limit allows.
    pub(super) fn take(state: &AppState, tenant: &TenantId) -> Result<Self, ApiError> {
        let config = state.config();
        state.limits().open_stream(
            tenant,
            config.max_sse_streams,
            config.max_sse_streams_per_tenant,
        )?;
        Ok(Self {
            state: state.clone(),
            tenant: tenant.clone(),
        })
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.state.limits().close_stream(&self.tenant);
    }
}

/// The `Last-Event-ID` header as a resume point: `Last-Event-ID: N` → N + 1, the first
/// offset the client has not received. `None` without the header, or with an empty one
/// (EventSource sends none for an empty id; an empty one counts as absent).
///
/// As an extractor it rejects a bad header with the HTTP API's `400`; a protocol with errors
/// of its own reads it with [`LastEventId::from_headers`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct LastEventId(pub(super) Option<u64>);

/// Why a `Last-Event-ID` header is not an event offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum BadLastEventId {
    /// The value is not visible ASCII.
    NotAscii,
    /// The value is not a non-negative integer below `u64::MAX`; it is quoted (cut short) here.
    NotAnOffset(String),
}

impl LastEventId {
    /// Reads the header from `headers`.
    ///
    /// # Errors
    ///
    /// When the header is there but not an event offset.
    pub(super) fn from_headers(headers: &HeaderMap) -> Result<Self, BadLastEventId> {
        let Some(value) = headers.get("last-event-id") else {
            return Ok(Self(None));
        };
        let text = value.to_str().map_err(|_| BadLastEventId::NotAscii)?.trim();
        if text.is_empty() {
            return Ok(Self(None));
        }
        parse_offset(text)
            .and_then(|n| n.checked_add(1))
            .map(|next| Self(Some(next)))
            .ok_or_else(|| BadLastEventId::NotAnOffset(preview(text)))
    }
}

/// An event offset as a client writes it: plain ASCII digits. `str::parse` would also take a
/// sign (`+5`), and a query's `%20` would decode to a space before it; an offset is neither.
pub(super) fn parse_offset(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

impl<S: Sync> FromRequestParts<S> for LastEventId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        Self::from_headers(&parts.headers).map_err(ApiError::from)
    }
}

impl From<BadLastEventId> for ApiError {
    fn from(bad: BadLastEventId) -> Self {
        match bad {
            BadLastEventId::NotAscii => {
                ApiError::bad_request("Last-Event-ID: must be ASCII digits")
            }
            BadLastEventId::NotAnOffset(quoted) => ApiError::bad_request(format!(
                "Last-Event-ID: must be an event offset (a non-negative integer), got {quoted}"
            )),
        }
    }
}

/// A client's value quoted for an error message, cut to 40 characters (a hostile header can
/// be kilobytes long).
pub(super) fn preview(text: &str) -> String {
    const MAX: usize = 40;
    if text.chars().count() <= MAX {
        format!("{text:?}")
    } else {
        let head: String = text.chars().take(MAX).collect();
        format!("{head:?}… ({} bytes)", text.len())
    }
}

/// When a stream sends its `: keepalive` comment. The first is due one period after the
/// stream opens; a period shorter than 1 ms counts as 1 ms.
#[derive(Debug)]
pub(super) struct Keepalive {
    ticker: Interval,
    /// Whether sending frames starts the period again.
    after_silence: bool,
}

impl Keepalive {
    /// A comment every `period`, sent when the stream has nothing else ready: amid a steady
    /// flow of events too, at most one per period.
    pub(super) fn every(period: Duration) -> Self {
        Self::new(period, false)
    }

    /// A comment after every `period` without frames: no silence lasts longer.
    pub(super) fn after_silence(period: Duration) -> Self {
        Self::new(period, true)
    }

    fn new(period: Duration, after_silence: bool) -> Self {
        let period = period.max(Duration::from_millis(1));
        let mut ticker = tokio::time::interval_at(Instant::now() + period, period);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Self {
            ticker,
            after_silence,
        }
    }

    /// Frames were sent.
    fn sent(&mut self) {
        if self.after_silence {
            self.ticker.reset();
        }
    }
}

/// A protocol's framing of the deliveries a [`StreamBody`] takes from its subscription.
pub(super) trait Framing: Send + Unpin + 'static {
    /// Names the protocol in logs.
    const PROTOCOL: &'static str;

    /// Appends the frames of `batch` (in offset order, at least one delivery) to `out`.
    /// `Break` ends the stream once what was appended is sent.
    fn put_batch(&mut self, batch: &[Delivery], out: &mut BytesMut) -> ControlFlow<()>;

    /// Appends the frames that end the stream when the subscription ends (the queue was
    /// closed and everything delivered, or it was removed); none by default.
    fn put_end(&mut self, _out: &mut BytesMut) {}
}

/// A batch of deliveries and the stream budget it holds (see the module docs' `# Memory`).
type Budgeted = (Vec<Delivery>, Option<OwnedSemaphorePermit>);

type Batches = Pin<Box<dyn Stream<Item = crate::Result<Budgeted>> + Send>>;

/// The bytes of event JSON in `batch` beyond [`OWN_BYTES`], in permits of `budget`: what the
/// batch needs of the server-wide budget. At most the whole budget, so that an event larger
/// than the budget can still be sent (alone).
fn excess(batch: &[Delivery], total: usize) -> u32 {
    let bytes: usize = batch
        .iter()
        .filter_map(Delivery::as_event)
        .map(|ev| ev.json().len())
        .sum();
    u32::try_from(bytes.saturating_sub(OWN_BYTES).min(total)).unwrap_or(u32::MAX)
}

/// `sub`'s batches, each with the part of `budget` it needs (see the module docs' `# Memory`).
///
/// A batch that needs more of the budget than is free is split before the event that takes
/// it past [`OWN_BYTES`]: what comes before goes out at once, the rest is given back to the
/// subscription ([`Subscription::rewind`]), and the next batch is read only once the budget
/// that event needs was acquired. A batch the subscription cannot take back (it ended the
/// stream: its terminal event is in it) waits for the budget as it is.
fn budgeted(
    sub: Subscription,
    budget: Arc<Semaphore>,
    total: usize,
    flight: Arc<Flight>,
) -> impl Stream<Item = crate::Result<Budgeted>> + Send + 'static {
    // (subscription, budget acquired before the read it is for, budget to acquire first)
    let state = (sub, None::<OwnedSemaphorePermit>, 0u32);
    futures_util::stream::unfold(state, move |(mut sub, mut held, mut wait)| {
        let budget = budget.clone();
        let flight = flight.clone();
        async move {
            loop {
                if wait > 0 {
                    // The semaphore is never closed; acquiring fails only if it were.
                    held = budget.clone().acquire_many_owned(wait).await.ok();
                }
                // A replay step that the budget has room for is read large: a reader that
                // keeps up gets fewer, larger reads and writes. Never waited for.
                // Not before the connection has taken a chunk (see `Flight`): a consumer that
                // keeps chunks would keep the share.
                let mut step = (BATCH, BATCH_BYTES);
                if held.is_none() && total > 0 && flight.armed() && sub.will_read() {
                    held = budget.clone().try_acquire_many_owned(FAST_EXTRA).ok();
                    if held.is_some() {
                        step = (FAST_BATCH, BATCH_BYTES + FAST_EXTRA as usize);
                    }
                }
                sub.set_step_bytes(step.1);
                let mut batch = match sub.next_batch(step.0, step.1).await? {
                    Ok(batch) => batch,
                    Err(e) => return Some((Err(e), (sub, held, 0))),
                };
                let need = excess(&batch, total);
                if need == 0 {
                    return Some((Ok((batch, None)), (sub, None, 0)));
                }
                let permit = match held.take() {
                    Some(mut p) if p.num_permits() < need as usize => {
                        match budget
                            .clone()
                            .try_acquire_many_owned(need - p.num_permits() as u32)
                        {
                            Ok(more) => {
                                p.merge(more);
                                Some(p)
                            }
                            Err(_) => None,
                        }
                    }
                    Some(p) => Some(p),
                    None => budget.clone().try_acquire_many_owned(need).ok(),
                };
                if let Some(p) = permit {
                    return Some((Ok((batch, Some(p))), (sub, None, 0)));
                }
                // The budget is spent: keep what fits on the stream's own account, give the
                // rest back, and wait for the budget its first event needs.
                let split = split_point(&batch);
                let Some(Delivery::Event(over)) = batch.get(split) else {
                    // Not reached: the batch needs budget, so some event takes it past.
                    return Some((Ok((batch, None)), (sub, None, 0)));
                };
                let (at, over_need) = (
                    over.offset(),
                    excess(std::slice::from_ref(&batch[split]), total),
                );
                if !sub.rewind(at) {
                    let p = budget.clone().acquire_many_owned(need).await.ok();
                    return Some((Ok((batch, p)), (sub, None, 0)));
                }
                batch.truncate(split);
                if !batch.is_empty() {
                    return Some((Ok((batch, None)), (sub, None, over_need)));
                }
                // `held` (too little) was given back above; wait for what the event needs.
                wait = over_need;
            }
        }
    })
}

/// The index of the first delivery of `batch` that takes its event JSON past [`OWN_BYTES`].
fn split_point(batch: &[Delivery]) -> usize {
    let mut bytes = 0;
    batch
        .iter()
        .position(|d| {
            bytes += d.as_event().map_or(0, |ev| ev.json().len());
            bytes > OWN_BYTES
        })
        .unwrap_or(batch.len())
}

/// The chunks of one body on their way to the socket: the connection drops a chunk once it
/// has written it, and the body frames nothing new while one is on its way.
#[derive(Debug, Default)]
struct Flight {
    unsent: AtomicUsize,
    /// Whether the connection has dropped a chunk yet. Until then the body does not wait for
    /// chunks to be written, nor takes larger replay steps: a consumer that keeps every chunk
    /// until the stream ends (a test collecting a response body, a buffering layer) would
    /// otherwise wait on the body while the body waits on it. A connection writes the opening
    /// frames at once, so on a real socket this is set after the first chunk. (Events over
    /// 32 KiB use the budget either way: such a consumer holds their shares until it is done.)
    armed: AtomicBool,
    waker: AtomicWaker,
}

impl Flight {
    fn armed(&self) -> bool {
        self.armed.load(Ordering::Acquire)
    }
}

/// A chunk handed to the connection, with the stream budget it holds; dropping it (written,
/// or the connection gone) tells its body, which may then frame the next one.
struct Sending {
    frames: Bytes,
    flight: Arc<Flight>,
    _budget: Option<OwnedSemaphorePermit>,
}

impl AsRef<[u8]> for Sending {
    fn as_ref(&self) -> &[u8] {
        &self.frames
    }
}

impl Drop for Sending {
    fn drop(&mut self) {
        self.flight.armed.store(true, Ordering::Release);
        self.flight.unsent.fetch_sub(1, Ordering::AcqRel);
        self.flight.waker.wake();
    }
}

/// The body of a stream response: the opening frames, then the framing of the
/// subscription's batches — the batches ready together framed into one chunk, so that a fast
/// reader costs one write per burst rather than per event — with keepalive comments in the
/// silences.
pub(super) struct StreamBody<F> {
    opening: Option<Bytes>,
    batches: Batches,
    flight: Arc<Flight>,
    framing: F,
    keepalive: Keepalive,
    shutdown: Pin<Box<WaitForCancellationFutureOwned>>,
    done: bool,
    _slot: StreamSlot,
}

impl<F: Framing> StreamBody<F> {
    /// A body that sends `opening` (frames made when the stream opened), then the frames
    /// `framing` makes of `sub`'s deliveries, until `sub` ends, `framing` ends the stream or
    /// `state`'s server shuts down. It holds `slot` until it is dropped.
    pub(super) fn new(
        state: &AppState,
        slot: StreamSlot,
        opening: Bytes,
        sub: Subscription,
        framing: F,
        keepalive: Keepalive,
    ) -> Self {
        let budget = state.stream_budget();
        let flight = Arc::<Flight>::default();
        Self {
            opening: Some(opening),
            batches: Box::pin(budgeted(
                sub,
                budget.clone(),
                state.config().stream_buffer_bytes,
                flight.clone(),
            )),
            flight,
            framing,
            keepalive,
            shutdown: Box::pin(state.shutdown_token().clone().cancelled_owned()),
            done: false,
            _slot: slot,
        }
    }

    /// Ends the stream after its opening frames.
    pub(super) fn end_after_opening(mut self) -> Self {
        self.done = true;
        self
    }

    /// The `200` response: `text/event-stream`, not to be cached nor buffered by a proxy.
    pub(super) fn into_response(self) -> Response {
        (
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
            Body::from_stream(self),
        )
            .into_response()
    }
}

impl<F: Framing> Stream for StreamBody<F> {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if let Some(frames) = this.opening.take() {
            // Tracked like every chunk: its being written arms the flight (see `Flight`).
            this.flight.unsent.fetch_add(1, Ordering::AcqRel);
            let chunk = Sending {
                frames,
                flight: this.flight.clone(),
                _budget: None,
            };
            return Poll::Ready(Some(Ok(Bytes::from_owner(chunk))));
        }
        if this.done {
            return Poll::Ready(None);
        }
        if this.shutdown.as_mut().poll(cx).is_ready() {
            this.done = true;
            return Poll::Ready(None);
        }
        // Nothing new is framed (nor read) while the last chunk is not written yet: a client
        // that stops reading stops the stream here.
        if this.flight.armed() && this.flight.unsent.load(Ordering::Acquire) > 0 {
            this.flight.waker.register(cx.waker());
            if this.flight.unsent.load(Ordering::Acquire) > 0 {
                return Poll::Pending;
            }
        }
        // One batch a chunk: the frame being built is bounded by the batch.
        let mut out = BytesMut::new();
        let mut budget = None;
        while out.is_empty() && !this.done {
            match this.batches.poll_next_unpin(cx) {
                Poll::Ready(Some(Ok((batch, permit)))) => {
                    budget = permit;
                    if this.framing.put_batch(&batch, &mut out).is_break() {
                        this.done = true;
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    tracing::error!(error = %e, protocol = F::PROTOCOL, "stream ended by a read error");
                    this.done = true;
                }
                Poll::Ready(None) => {
                    this.framing.put_end(&mut out);
                    this.done = true;
                }
                Poll::Pending => break,
            }
        }
        if !out.is_empty() {
            this.keepalive.sent();
            this.flight.unsent.fetch_add(1, Ordering::AcqRel);
            let chunk = Sending {
                frames: out.freeze(),
                flight: this.flight.clone(),
                _budget: budget,
            };
            return Poll::Ready(Some(Ok(Bytes::from_owner(chunk))));
        }
        if this.done {
            return Poll::Ready(None);
        }
        if this.keepalive.ticker.poll_tick(cx).is_ready() {
            return Poll::Ready(Some(Ok(Bytes::from_static(KEEPALIVE))));
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(value: &[u8]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            "last-event-id",
            HeaderValue::from_bytes(value).expect("a header value"),
        );
        headers
    }

    #[test]
    fn last_event_id_is_the_offset_before_the_resume_point() {
        let read = |value: &[u8]| LastEventId::from_headers(&headers(value));
        assert_eq!(
            LastEventId::from_headers(&HeaderMap::new()),
            Ok(LastEventId(None))
        );
        assert_eq!(read(b""), Ok(LastEventId(None)));
        assert_eq!(read(b"  "), Ok(LastEventId(None)));
        assert_eq!(read(b" 41 "), Ok(LastEventId(Some(42))));
        assert_eq!(read(b"0"), Ok(LastEventId(Some(1))));
        assert_eq!(read("é".as_bytes()), Err(BadLastEventId::NotAscii));
        assert_eq!(
            read(b"-5"),
            Err(BadLastEventId::NotAnOffset("\"-5\"".into()))
        );
        // u64::MAX has no offset after it.
        assert!(matches!(
            read(b"18446744073709551615"),
            Err(BadLastEventId::NotAnOffset(_))
        ));
        let Err(BadLastEventId::NotAnOffset(quoted)) = read("9".repeat(1000).as_bytes()) else {
            panic!("a long number is no offset");
        };
        assert!(quoted.ends_with("… (1000 bytes)"), "{quoted}");
    }
}
