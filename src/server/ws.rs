//! The pipelined producer connection: `GET /events/queues/{task_id}/events/ws`, a WebSocket on
//! which a producer sends events for one queue without waiting for each answer, and receives
//! one acknowledgement per frame, in the order it sent them.
//!
//! One HTTP request per event pays the whole per-request path (HTTP parsing, a commit and its
//! thread hand-offs) for every event; a producer with events in flight on one connection lets
//! the server put every frame that arrived while a commit was running into the next commit,
//! as Redis pipelines and NATS publish windows do. The frame format is in `docs/http-api.md`.
//!
//! What a frame gets is what the same body posted to `POST …/events` gets:
//!
//! - **the same checks**: each frame is parsed and validated alone (an invalid frame is
//!   answered with its error and the connection goes on);
//! - **the same durability**: an acknowledgement is sent after the commit that stored the
//!   frame's events was synced — what an HTTP `201`/`200` means;
//! - **the same idempotency**: an event whose `event_id` the queue still retains is answered
//!   with its stored offset;
//! - **the same auth**: the handshake is a request that needs the `publish` scope (token mode)
//!   and acts for the caller's tenant; a refused handshake is an HTTP error, never an upgrade.
//!   A token is checked again for each frame, against its expiry and its tenant's revocation:
//!   a connection outliving its token gets `401` answers and stores nothing more.
//!
//! **Back-pressure.** At most [`ServerConfig::max_ws_in_flight`] frames (and four request
//! bodies' worth of bytes) are read and not yet acknowledged per connection; beyond that the
//! server stops reading the socket until acknowledgements are sent, so TCP flow control holds
//! the producer back. A producer that stops reading acknowledgements is held back the same
//! way, once the socket buffers are full.
//!
//! **The server-wide budget.** Each frame also holds its bytes of
//! [`ServerConfig::max_body_bytes_in_flight`] — the budget request bodies count against — from
//! when it is read until its answer is written. A frame that does not fit is answered `503`
//! (nothing of it stored; retry it, as a `503` to a `POST`), so many producer connections
//! together cannot make the server hold more frames than that budget, however many are open.
//!
//! **Ordering.** One commit per connection is in flight at a time; the frames read meanwhile
//! ride together in the next one (atomically, as one batch). So acknowledgements come in
//! frame order and the offsets of a connection's events increase in the order sent.
//!
//! [`ServerConfig::max_ws_in_flight`]: crate::server::ServerConfig::max_ws_in_flight
//! [`ServerConfig::max_body_bytes_in_flight`]: crate::server::ServerConfig::max_body_bytes_in_flight

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;

use axum::Extension;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::response::Response;
use bytes::Bytes;
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use serde::Serialize;
use tokio::sync::OwnedSemaphorePermit;

use crate::error::Result;
use crate::event::Received;
use crate::queue::EventQueue;
use crate::server::AppState;
use crate::server::auth::{Auth, Claims, LEEWAY, TokenError};
use crate::server::conn::Place;
use crate::server::error::ApiError;
use crate::server::limits::BodyBudget;
use crate::server::routes::{TaskPath, lookup, read_enqueue_body};
use crate::server::tenant::{Caller, Need, Tenant, bearer_token};

/// WebSocket close code sent when the server shuts down ("going away").
const CLOSE_GOING_AWAY: u16 = 1001;

/// The caller of the producer connection: its handshake is a `GET`, but what it opens is a
/// way to write, so it needs `publish`. In token mode, with the token's claims: a connection
/// lives longer than a request, and its frames are checked against them (see [`still_valid`]).
pub(super) struct Publisher(Tenant, Option<Claims>);

impl FromRequestParts<AppState> for Publisher {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let caller = Caller::resolve_for(parts, state, Need::Publish)?;
        let claims = match &state.config().auth {
            Auth::Token(keys) => Some(
                keys.verify(&bearer_token(parts)?)
                    .map_err(|e| ApiError::unauthorized(e.to_string(), Some("invalid_token")))?,
            ),
            Auth::Open(_) => None,
        };
        Ok(Self(Tenant(caller.tenant), claims))
    }
}

/// Whether the token a connection opened with still lets it publish: not expired (beyond the
/// leeway), not revoked since (revocations as the server holds them now).
fn still_valid(claims: &Claims, state: &AppState) -> Result<(), ApiError> {
    let invalid = |e: TokenError| ApiError::unauthorized(e.to_string(), Some("invalid_token"));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if now > claims.exp.saturating_add(LEEWAY.as_secs()) {
        return Err(invalid(TokenError::Expired));
    }
    claims
        .check_revocation(state.revocations().not_before(claims.tenant.as_str()))
        .map_err(invalid)
}

/// `GET /events/queues/{task_id}/events/ws`: checks the caller and the queue, then upgrades.
pub(super) async fn producer(
    State(state): State<AppState>,
    Publisher(tenant, claims): Publisher,
    TaskPath(task): TaskPath,
    place: Option<Extension<Place>>,
    upgrade: std::result::Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let queue = lookup(&state, &tenant, &task).await?;
    let upgrade = upgrade.map_err(|e| {
        ApiError::new(
            e.status(),
            format!(
                "this endpoint is a WebSocket (send `Connection: Upgrade`, `Upgrade: \
                 websocket`): {}",
                e.body_text()
            ),
        )
    })?;
    let config = state.config();
    let limits = Limits {
        max_frames: config.max_ws_in_flight.max(1),
        max_bytes: config.max_body_bytes.saturating_mul(4),
        max_batch_events: config.max_batch_events.max(1),
        budget: state.bodies().clone(),
    };
    Ok(upgrade
        .read_buffer_size(READ_BUFFER)
        .max_message_size(config.max_body_bytes)
        .max_frame_size(config.max_body_bytes)
        .on_upgrade(move |socket| async move {
            // The connection's place in the server's connection counts, held while it lasts.
            let _place = place;
            connection(state, tenant, claims, queue, limits, socket).await;
        }))
}

/// How much the WebSocket layer reads from the socket at a time. Its default (128 KiB) is
/// zeroed before every read, and a producer's window of frames is a few KiB: with the default
/// that zeroing alone was ~4 % of server CPU on the 8 × 16 WebSocket row (perf). Larger
/// frames take more than one read.
const READ_BUFFER: usize = 16 * 1024;

async fn connection(
    state: AppState,
    tenant: Tenant,
    claims: Option<Claims>,
    queue: EventQueue,
    limits: Limits,
    socket: WebSocket,
) {
    let (sink, source) = socket.split();
    let frames = source.filter_map(|m| async move {
        match m {
            Ok(Message::Text(text)) => Some(Ok(Incoming::Frame(Bytes::from(text)))),
            Ok(Message::Binary(bytes)) => Some(Ok(Incoming::Frame(bytes))),
            Ok(Message::Close(_)) => Some(Ok(Incoming::Close)),
            // Pings are answered by the WebSocket layer itself.
            Ok(Message::Ping(_) | Message::Pong(_)) => None,
            Err(e) => Some(Err(e.to_string())),
        }
    });
    let sink = sink.with(|out: Outgoing| async move {
        Ok::<_, axum::Error>(match out {
            Outgoing::Ack(text) => Message::Text(text.into()),
            Outgoing::Close(code, reason) => Message::Close(Some(CloseFrame {
                code,
                reason: reason.into(),
            })),
        })
    });
    let parse = {
        let (state, queue) = (state.clone(), queue.clone());
        move |body: &[u8]| -> Result<Vec<Received>, ApiError> {
            if let Some(claims) = &claims {
                still_valid(claims, &state)?;
            }
            // Checked against the queue and validated as it is read.
            read_enqueue_body(state.config(), &tenant, queue.task_id(), body)
        }
    };
    let submit = {
        let queue = queue.clone();
        move |events: Vec<Received>| -> Submitted {
            let queue = queue.clone();
            Box::pin(async move {
                let offsets = queue.enqueue_received(events).await?;
                Ok((offsets, queue.latest_offset(), queue.is_cancelled()))
            })
        }
    };
    let shutdown = state.shutdown_token().clone();
    if let Err(e) = pump(frames, sink, parse, submit, limits, shutdown.cancelled()).await {
        tracing::debug!("producer connection on {} ended: {e}", queue.task_id());
    }
}

/// A frame read from the producer, or its close.
pub(super) enum Incoming {
    Frame(Bytes),
    Close,
}

/// What the server writes: an acknowledgement (JSON text), or the close frame.
pub(super) enum Outgoing {
    Ack(String),
    Close(u16, String),
}

/// A commit in flight: the offsets of its events, then the queue's latest offset and
/// cancellation flag.
pub(super) type Submitted = Pin<Box<dyn Future<Output = Result<(Vec<u64>, u64, bool)>> + Send>>;

/// Bounds of one connection.
#[derive(Debug, Clone)]
pub(super) struct Limits {
    /// Frames read and not yet acknowledged.
    pub max_frames: usize,
    /// Bytes of those frames.
    pub max_bytes: usize,
    /// Events per commit (frames are not split: a commit holds whole frames).
    pub max_batch_events: usize,
    /// The server-wide budget of bytes in flight, shared with request bodies.
    pub budget: BodyBudget,
}

#[derive(Serialize)]
struct Ack<'a> {
    seq: u64,
    offsets: &'a [u64],
    latest_offset: u64,
    cancelled: bool,
}

#[derive(Serialize)]
struct Refusal<'a> {
    seq: u64,
    status: u16,
    detail: &'a str,
}

fn refusal(seq: u64, e: &ApiError) -> String {
    serde_json::to_string(&Refusal {
        seq,
        status: e.status().as_u16(),
        detail: e.detail(),
    })
    .unwrap_or_default()
}

/// Frames parsed and waiting for a commit: each frame's sequence number and events.
struct Waiting {
    frames: Vec<(u64, Vec<Received>)>,
    events: usize,
}

/// Runs one producer connection: reads frames from `source` while fewer than the limits are
/// unacknowledged, takes each frame's bytes from the server-wide budget until it is answered
/// (a frame that does not fit is answered `503` unparsed), parses each (`parse`: an error is
/// that frame's answer), commits the valid
/// frames (`submit`: one commit in flight, holding every frame that waited for it), and writes
/// the answers to `sink` in frame order. Ends when the producer closes the connection (after
/// answering every frame read) or `shutdown` resolves (stops reading, answers what was read,
/// and closes with 1001).
///
/// # Errors
///
/// A failed read or write of the socket (the producer went away): the frames not answered
/// yet may or may not be stored, as after an HTTP request whose answer was lost.
pub(super) async fn pump<Src, Snk, P, S, D>(
    source: Src,
    sink: Snk,
    parse: P,
    mut submit: S,
    limits: Limits,
    shutdown: D,
) -> std::result::Result<(), String>
where
    Src: Stream<Item = std::result::Result<Incoming, String>>,
    Snk: Sink<Outgoing>,
    Snk::Error: std::fmt::Display,
    P: Fn(&[u8]) -> Result<Vec<Received>, ApiError>,
    S: FnMut(Vec<Received>) -> Submitted,
    D: Future<Output = ()>,
{
    let mut source = std::pin::pin!(source);
    let mut sink = std::pin::pin!(sink);
    let mut shutdown = std::pin::pin!(shutdown);
    let write_err = |e: Snk::Error| format!("cannot write an acknowledgement: {e}");
    // Sequence numbers: of the next frame read, and of the next answer to write.
    let (mut next_seq, mut next_answer) = (0u64, 0u64);
    // Bytes of the frames read and not answered, by sequence number, with their room in the
    // server-wide budget (none for a frame refused for want of it).
    let mut sizes: BTreeMap<u64, (usize, Option<OwnedSemaphorePermit>)> = BTreeMap::new();
    let mut unanswered_bytes = 0usize;
    // Answers ready but waiting for an earlier one.
    let mut ready: BTreeMap<u64, String> = BTreeMap::new();
    let mut waiting = Waiting {
        frames: Vec::new(),
        events: 0,
    };
    // The commit in flight and the frames (sequence number, event count) it holds.
    let mut in_flight: Option<(Vec<(u64, usize)>, Submitted)> = None;
    let mut reading = true;
    let mut going_away = false;
    loop {
        if in_flight.is_none() && !waiting.frames.is_empty() {
            in_flight = Some(next_commit(
                &mut waiting,
                limits.max_batch_events,
                &mut submit,
            ));
        }
        // The answers of a commit go out in one write: one flush (a syscall) per answer was a
        // fifth of the server's CPU on this connection.
        let mut fed = false;
        while let Some(text) = ready.remove(&next_answer) {
            sink.feed(Outgoing::Ack(text)).await.map_err(write_err)?;
            // The frame's room in the budget goes back with its answer.
            unanswered_bytes -= sizes.remove(&next_answer).map_or(0, |(n, _)| n);
            next_answer += 1;
            fed = true;
        }
        if fed {
            sink.flush().await.map_err(write_err)?;
        }
        if !reading && in_flight.is_none() && waiting.frames.is_empty() {
            break;
        }
        let room = ((next_seq - next_answer) as usize) < limits.max_frames
            && unanswered_bytes < limits.max_bytes;
        tokio::select! {
            biased;
            result = async {
                match in_flight.as_mut() {
                    Some((_, commit)) => commit.await,
                    None => std::future::pending().await,
                }
            }, if in_flight.is_some() => {
                if let Some((frames, _)) = in_flight.take() {
                    answer(&mut ready, frames, result);
                }
            }
            () = &mut shutdown, if reading => {
                reading = false;
                going_away = true;
            }
            incoming = source.next(), if reading && room => match incoming {
                Some(Ok(Incoming::Frame(body))) => {
                    let seq = next_seq;
                    next_seq += 1;
                    unanswered_bytes += body.len();
                    let room = limits.budget.take(body.len());
                    let parsed = match &room {
                        Ok(_) => parse(&body),
                        // Not parsed: the budget is what a flood of frames would exhaust.
                        Err(e) => Err(e.clone()),
                    };
                    sizes.insert(seq, (body.len(), room.ok()));
                    match parsed {
                        Ok(events) if events.is_empty() => {
                            answer(&mut ready, vec![(seq, 0)], Ok((Vec::new(), 0, false)));
                        }
                        Ok(events) => {
                            waiting.events += events.len();
                            waiting.frames.push((seq, events));
                        }
                        Err(e) => {
                            ready.insert(seq, refusal(seq, &e));
                        }
                    }
                }
                Some(Ok(Incoming::Close)) | None => reading = false,
                Some(Err(e)) => return Err(format!("cannot read a frame: {e}")),
            },
        }
    }
    if going_away {
        sink.send(Outgoing::Close(
            CLOSE_GOING_AWAY,
            "the server is shutting down".into(),
        ))
        .await
        .map_err(write_err)?;
    }
    sink.close().await.map_err(write_err)
}

/// Takes whole frames, up to `max_events` events (at least one frame), into one commit.
fn next_commit<S>(
    waiting: &mut Waiting,
    max_events: usize,
    submit: &mut S,
) -> (Vec<(u64, usize)>, Submitted)
where
    S: FnMut(Vec<Received>) -> Submitted,
{
    let mut taken = 0;
    let mut events_taken = 0;
    for (_, events) in &waiting.frames {
        if taken > 0 && events_taken + events.len() > max_events {
            break;
        }
        events_taken += events.len();
        taken += 1;
    }
    let mut frames = Vec::with_capacity(taken);
    let events = if taken == 1 {
        // A frame alone (a producer waiting for each answer) keeps its own list.
        let (seq, evs) = waiting.frames.remove(0);
        frames.push((seq, evs.len()));
        evs
    } else {
        let mut events = Vec::with_capacity(events_taken);
        for (seq, evs) in waiting.frames.drain(..taken) {
            frames.push((seq, evs.len()));
            events.extend(evs);
        }
        events
    };
    waiting.events -= events_taken;
    (frames, submit(events))
}

/// Splits a commit's outcome into its frames' answers.
fn answer(
    ready: &mut BTreeMap<u64, String>,
    frames: Vec<(u64, usize)>,
    result: Result<(Vec<u64>, u64, bool)>,
) {
    match result {
        Ok((offsets, latest_offset, cancelled)) => {
            let mut at = 0;
            for (seq, n) in frames {
                let end = (at + n).min(offsets.len());
                let ack = Ack {
                    seq,
                    offsets: &offsets[at..end],
                    latest_offset,
                    cancelled,
                };
                ready.insert(seq, serde_json::to_string(&ack).unwrap_or_default());
                at = end;
            }
        }
        Err(e) => {
            let e = ApiError::from(e);
            for (seq, _) in frames {
                ready.insert(seq, refusal(seq, &e));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use futures_util::stream;
    use tokio::sync::{mpsc, oneshot};

    use super::*;
    use crate::ids::{TaskId, TenantId};
    use crate::server::{ServerConfig, Tenant};

    fn one_event(_: &[u8]) -> Result<Vec<Received>, ApiError> {
        let (tenant, task) = (TenantId::default_tenant(), TaskId::new("t").unwrap());
        read_enqueue_body(
            &ServerConfig::default(),
            &Tenant(tenant),
            &task,
            br#"{"event_type":"status","state":"working"}"#,
        )
    }

    /// Lets every task of this single-threaded runtime run until all wait.
    async fn settle() {
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn reading_stops_at_the_in_flight_bound_while_a_commit_is_pending() {
        // 100 frames offered, commits that finish only when the test says so, 4 frames
        // allowed unanswered: the connection reads 4 and waits.
        let pulled = Arc::new(AtomicUsize::new(0));
        let source = {
            let pulled = pulled.clone();
            stream::iter(0..100).map(move |_| {
                pulled.fetch_add(1, Ordering::SeqCst);
                Ok(Incoming::Frame(Bytes::from_static(b"{}")))
            })
        };
        let (acks_tx, mut acks) = mpsc::unbounded_channel::<Outgoing>();
        let sink = futures_util::sink::unfold(acks_tx, |tx, out: Outgoing| async move {
            tx.send(out).map_err(|_| "closed")?;
            Ok::<_, &str>(tx)
        });
        let (commits_tx, mut commits) = mpsc::unbounded_channel::<(usize, oneshot::Sender<()>)>();
        let next = Arc::new(AtomicUsize::new(0));
        let submit = move |events: Vec<Received>| -> Submitted {
            let (done, wait) = oneshot::channel();
            let n = events.len();
            let _ = commits_tx.send((n, done));
            let first = next.fetch_add(n, Ordering::SeqCst) as u64;
            Box::pin(async move {
                let _ = wait.await;
                Ok(((first..first + n as u64).collect(), first + n as u64, false))
            })
        };
        let limits = Limits {
            max_frames: 4,
            max_bytes: usize::MAX,
            max_batch_events: 1000,
            budget: BodyBudget::new(1 << 20),
        };
        let task = tokio::spawn(pump(
            source,
            sink,
            one_event,
            submit,
            limits,
            std::future::pending(),
        ));
        settle().await;
        assert_eq!(pulled.load(Ordering::SeqCst), 4);
        // The first frame went alone; the three read meanwhile wait for the next commit.
        let (n, done) = commits.recv().await.unwrap();
        assert_eq!(n, 1);
        assert!(commits.try_recv().is_err());
        done.send(()).unwrap();
        settle().await;
        // One answer out, so one more frame read; the three waiting went out as one commit.
        assert_eq!(pulled.load(Ordering::SeqCst), 5);
        let (n, done) = commits.recv().await.unwrap();
        assert_eq!(n, 3);
        let Some(Outgoing::Ack(first)) = acks.recv().await else {
            panic!("no first answer")
        };
        assert_eq!(
            first,
            r#"{"seq":0,"offsets":[0],"latest_offset":1,"cancelled":false}"#
        );
        done.send(()).unwrap();
        // From here on commits finish at once; every frame is answered, in order.
        let drain = tokio::spawn(async move {
            while let Some((_, done)) = commits.recv().await {
                let _ = done.send(());
            }
        });
        task.await.unwrap().unwrap();
        drain.abort();
        let mut seqs = Vec::new();
        while let Ok(out) = acks.try_recv() {
            if let Outgoing::Ack(text) = out {
                let v: serde_json::Value = serde_json::from_str(&text).unwrap();
                assert_eq!(v["offsets"][0], v["seq"]);
                seqs.push(v["seq"].as_u64().unwrap());
            }
        }
        assert_eq!(seqs, (1..100).collect::<Vec<_>>());
    }
    #[tokio::test(flavor = "current_thread")]
    async fn producers_together_hold_at_most_the_server_wide_budget() {
        // Four connections of ten 1500-byte frames (2 KiB of budget each) over a budget of
        // 8 KiB, with commits that finish only when the test says so: four frames in all get
        // room, every other frame is answered 503 unparsed, and the room comes back with the
        // answers.
        let budget = BodyBudget::new(8 << 10);
        let (commits_tx, mut commits) = mpsc::unbounded_channel::<oneshot::Sender<()>>();
        let parsed = Arc::new(AtomicUsize::new(0));
        let mut pumps = Vec::new();
        let mut answers = Vec::new();
        for _ in 0..4 {
            let source =
                stream::iter(0..10).map(|_| Ok(Incoming::Frame(Bytes::from(vec![b' '; 1500]))));
            let (acks_tx, acks) = mpsc::unbounded_channel::<Outgoing>();
            answers.push(acks);
            let sink = futures_util::sink::unfold(acks_tx, |tx, out: Outgoing| async move {
                tx.send(out).map_err(|_| "closed")?;
                Ok::<_, &str>(tx)
            });
            let commits_tx = commits_tx.clone();
            let submit = move |events: Vec<Received>| -> Submitted {
                let (done, wait) = oneshot::channel();
                let _ = commits_tx.send(done);
                let n = events.len() as u64;
                Box::pin(async move {
                    let _ = wait.await;
                    Ok(((0..n).collect(), n, false))
                })
            };
            let parse = {
                let parsed = parsed.clone();
                move |body: &[u8]| {
                    parsed.fetch_add(1, Ordering::SeqCst);
                    one_event(body)
                }
            };
            let limits = Limits {
                max_frames: 256,
                max_bytes: usize::MAX,
                max_batch_events: 1000,
                budget: budget.clone(),
            };
            pumps.push(tokio::spawn(pump(
                source,
                sink,
                parse,
                submit,
                limits,
                std::future::pending(),
            )));
        }
        settle().await;
        assert_eq!(budget.held_bytes(), 8 << 10);
        assert_eq!(
            parsed.load(Ordering::SeqCst),
            4,
            "only frames with room are parsed"
        );
        let release = tokio::spawn(async move {
            while let Some(done) = commits.recv().await {
                let _ = done.send(());
            }
        });
        for p in pumps {
            p.await.unwrap().unwrap();
        }
        drop(commits_tx);
        release.await.unwrap();
        assert_eq!(budget.held_bytes(), 0, "every frame's room came back");
        let (mut stored, mut refused) = (0, 0);
        for mut acks in answers {
            while let Ok(out) = acks.try_recv() {
                if let Outgoing::Ack(text) = out {
                    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
                    match v["status"].as_u64() {
                        None => stored += 1,
                        Some(503) => refused += 1,
                        Some(other) => panic!("unexpected answer {other}: {text}"),
                    }
                }
            }
        }
        assert_eq!((stored, refused), (4, 36));
    }
}
