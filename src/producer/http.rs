//! [`HttpSink`]: a [`Reporter`]'s queue on an eventqueue server (feature `client`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;
use serde_json::value::RawValue;
use tokio::sync::{Notify, oneshot};

use super::{Cancellation, EventSink, ProducerError, Reporter, Sent};
use crate::checkpoint::{Checkpoint, SavedCheckpoint};
use crate::client::{Client, ClientError, DEFAULT_MAX_EVENTS, Pipeline, PublishOutcome};
use crate::event::{Event, Payload};
use crate::ids::{TaskId, TenantId};

/// Attempts of a send over HTTP that failed in a way worth retrying (a transport error, `408`,
/// `429`, `5xx`); the events keep their ids, so a retry never duplicates one.
const HTTP_SEND_ATTEMPTS: u32 = 4;

/// Most bytes of events per batch: half the server's default body and frame limit (2 MiB).
const MAX_BATCH_BYTES: usize = 1 << 20;

/// A queue on an eventqueue server, for producers in another process.
///
/// **Coalescing.** Sends from concurrent tasks through one sink (its clones share this) ride
/// together in batches: while a batch is on its way, the sends made meanwhile wait and go as
/// the next batch (up to 100 events or 1 MiB), each send's events kept together and in order.
/// A lone send goes at once, with no added delay: the [linger](HttpSink::with_linger), how
/// long the first send of a batch waits for others, defaults to **zero**. A batch is one
/// frame (or request) and one answer whatever its size, instead of one per send (figures in
/// `docs/producers.md`).
/// What a send's answer means does not change: `Ok` = its events are stored (durably, with the
/// server's `immediate` durability) at the offsets given. A batch is stored atomically; when
/// the server refuses one (an invalid event, a closed queue), each send in it is sent again on
/// its own, so each gets its own answer. Events carry their ids from the start, so a resend
/// never stores one twice. A send whose caller stops waiting is still delivered.
///
/// **Transport.** Batches go over the queue's pipelined producer connection
/// ([`Client::pipeline`], a WebSocket opened at the first send), or to
/// `POST /events/queues/{task_id}/events` when the server does not offer it or the connection
/// was lost (opened again at the next send). A transport error or a retryable status (`408`,
/// `429`, `5xx`, on either) is retried with the same event ids (idempotent);
/// [`Sent::cancelled`] carries the answer's cancel flag. The boundary check reads
/// `GET /events/queues/{task_id}` (one request per check, which also gives the reason),
/// checkpoints go to `POST /events/workflows/{task_id}/checkpoints` (not retried, not
/// coalesced: a save is not idempotent).
#[derive(Clone, Debug)]
pub struct HttpSink {
    client: Client,
    task: TaskId,
    pipe: Arc<tokio::sync::Mutex<Pipe>>,
    batches: Arc<Batches>,
}

/// The sends of a sink (and its clones) waiting for their batch.
#[derive(Debug, Default)]
struct Batches {
    linger: Duration,
    state: Mutex<Gathering>,
    /// Wakes a lingering sender when a batch is full.
    full: Notify,
    /// Batches sent (refused batches' resends included).
    sent: AtomicU64,
}

#[derive(Debug, Default)]
struct Gathering {
    waiting: Vec<Waiting>,
    events: usize,
    bytes: usize,
    /// A sender task runs (lingering, or sending a batch).
    sending: bool,
}

/// One send waiting: its events (kept together, in order) and where its answer goes.
#[derive(Debug)]
struct Waiting {
    events: Vec<Box<RawValue>>,
    bytes: usize,
    answer: oneshot::Sender<Result<Sent, ProducerError>>,
}

impl Batches {
    fn with_linger(linger: Duration) -> Arc<Self> {
        Arc::new(Self {
            linger,
            ..Self::default()
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, Gathering> {
        // Every update leaves the state whole: a panic elsewhere cannot corrupt it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn is_full(state: &Gathering) -> bool {
        state.events >= DEFAULT_MAX_EVENTS || state.bytes >= MAX_BATCH_BYTES
    }

    /// Takes whole sends, up to the batch bounds (at least one send), off the front.
    fn take(&self) -> Option<Vec<Waiting>> {
        let mut state = self.state();
        if state.waiting.is_empty() {
            state.sending = false;
            return None;
        }
        let (mut n, mut events, mut bytes) = (0, 0, 0);
        for w in &state.waiting {
            if n > 0
                && (events + w.events.len() > DEFAULT_MAX_EVENTS
                    || bytes + w.bytes > MAX_BATCH_BYTES)
            {
                break;
            }
            events += w.events.len();
            bytes += w.bytes;
            n += 1;
        }
        state.events -= events;
        state.bytes -= bytes;
        Some(state.waiting.drain(..n).collect())
    }
}

/// The sink's pipelined connection.
#[derive(Debug, Default)]
enum Pipe {
    /// Not opened yet, or lost: the next send opens it.
    #[default]
    Closed,
    Open(Pipeline),
    /// The server refused it (an older server, or one that answers the handshake with an
    /// error): sends go over HTTP.
    Unavailable,
}

impl HttpSink {
    /// A sink for queue `task` on the server at `base_url` (e.g. `http://127.0.0.1:8000`).
    ///
    /// # Errors
    ///
    /// As [`Client::new`]: [`ClientError::InvalidUrl`] for a URL that is not `http://` /
    /// `https://`.
    pub fn new(base_url: &str, task: &TaskId) -> Result<Self, ClientError> {
        Ok(Self::from_client(Client::new(base_url)?, task))
    }

    /// A sink for queue `task` through `client` (its server, connections and TLS settings,
    /// token and tenant).
    pub fn from_client(client: Client, task: &TaskId) -> Self {
        Self {
            client,
            task: task.clone(),
            pipe: Arc::default(),
            batches: Arc::default(),
        }
    }

    /// How long the first send of a batch waits for other sends before the batch goes
    /// (default zero: at once; sends still gather while a batch is on its way). A linger adds
    /// up to that much to each send's latency, and saves frames and commits when sends come
    /// close together but not at the same moment. Set it before the first send (it applies
    /// to this sink and the clones made from it afterwards).
    #[must_use]
    pub fn with_linger(mut self, linger: Duration) -> Self {
        self.batches = Batches::with_linger(linger);
        self
    }

    /// Batches sent so far (frames or requests; a refused batch's sends sent again count
    /// too): with the number of sends, how well they coalesce.
    pub fn batches_sent(&self) -> u64 {
        self.batches.sent.load(Ordering::Relaxed)
    }

    /// Sends `Authorization: Bearer <token>` (token mode; the token needs `publish`, and
    /// `subscribe` for the cancellation check's queue info).
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.client = self.client.with_token(token);
        self.pipe = Arc::default();
        self.batches = Batches::with_linger(self.batches.linger);
        self
    }

    /// Acts for `tenant` (open mode's `X-Tenant-ID`; an admin token's `?tenant_id=`).
    pub fn with_tenant(mut self, tenant: &TenantId) -> Self {
        self.client = self.client.with_tenant(tenant.as_str());
        self.pipe = Arc::default();
        self.batches = Batches::with_linger(self.batches.linger);
        self
    }

    /// Sends `events` over the pipelined connection, opening it if needed. `None`: no
    /// connection (refused, unreachable) or it was lost before the answer — the caller sends
    /// over HTTP (the events keep their ids, so a resend never duplicates one).
    async fn send_pipelined<T: Serialize>(
        &self,
        events: &[T],
    ) -> Option<Result<PublishOutcome, ClientError>> {
        let pipeline = {
            let mut pipe = self.pipe.lock().await;
            if matches!(*pipe, Pipe::Closed) {
                *pipe = match self.client.pipeline(self.task.as_str()).await {
                    Ok(p) => Pipe::Open(p),
                    Err(ClientError::Api { .. }) => Pipe::Unavailable,
                    // Unreachable now: HTTP says why, and the next send tries again.
                    Err(_) => return None,
                };
            }
            match &*pipe {
                Pipe::Open(p) => p.clone(),
                _ => return None,
            }
        };
        match pipeline.publish_batch(events).await {
            Err(e) if e.is_transport() => {
                let mut pipe = self.pipe.lock().await;
                *pipe = Pipe::Closed;
                None
            }
            other => Some(other),
        }
    }

    /// The underlying client (queue creation, info, cancel, streams).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The event JSON a server accepts from a producer: the event without its tenant (the
    /// server fills it in from the caller's tenant). Its `"offset": null` stays: a server
    /// ignores a producer's offset.
    fn wire(&self, payload: Payload) -> Result<Box<RawValue>, ProducerError> {
        let encode = |e: serde_json::Error| {
            ProducerError::Http(ClientError::InvalidInput(format!(
                "cannot encode the event: {e}"
            )))
        };
        let event = Event::new(&TenantId::default_tenant(), &self.task, payload);
        let json = String::from_utf8(event.to_json()).map_err(|e| {
            ProducerError::Http(ClientError::InvalidInput(format!("event JSON: {e}")))
        })?;
        // The head is rendered first, in a fixed field order (`event_id`, `task_id`,
        // `tenant_id`, …), so the first match is the tenant field itself. Cut out of the text
        // rather than parsed and rendered again: this runs for every event a producer sends.
        let tenant = concat!(",\"tenant_id\":\"", "default", "\"");
        match json.find(tenant) {
            Some(at) => {
                let mut json = json;
                json.replace_range(at..at + tenant.len(), "");
                RawValue::from_string(json).map_err(encode)
            }
            None => {
                let mut value: Value = serde_json::from_str(&json).map_err(encode)?;
                if let Value::Object(map) = &mut value {
                    map.remove("tenant_id");
                }
                serde_json::value::to_raw_value(&value).map_err(encode)
            }
        }
    }

    /// Sends batches until no send waits.
    async fn send_batches(self) {
        loop {
            let full = Batches::is_full(&self.batches.state());
            if !self.batches.linger.is_zero() && !full {
                tokio::select! {
                    () = tokio::time::sleep(self.batches.linger) => {}
                    () = self.batches.full.notified() => {}
                }
            }
            let Some(batch) = self.batches.take() else {
                return;
            };
            self.send_batch(batch).await;
        }
    }

    /// Sends one batch and answers each send in it.
    async fn send_batch(&self, mut batch: Vec<Waiting>) {
        if batch.len() == 1 {
            let w = batch.remove(0);
            let answer = self.transmit(&w.events).await;
            let _ = w.answer.send(answer);
            return;
        }
        let events: Vec<&RawValue> = batch.iter().flat_map(|w| &w.events).map(|e| &**e).collect();
        match self.transmit(&events).await {
            Ok(sent) if sent.offsets.len() == events.len() => {
                let mut offsets = sent.offsets.into_iter();
                for w in batch {
                    let _ = w.answer.send(Ok(Sent {
                        offsets: offsets.by_ref().take(w.events.len()).collect(),
                        cancelled: sent.cancelled,
                    }));
                }
            }
            Ok(sent) => {
                let e = ProducerError::Http(ClientError::Decode(format!(
                    "{} offsets for a batch of {} events",
                    sent.offsets.len(),
                    events.len()
                )));
                for w in batch {
                    let _ = w.answer.send(Err(e.clone()));
                }
            }
            // Refused as a whole, nothing stored: each send on its own gets its own answer.
            Err(ProducerError::Http(e @ ClientError::Api { .. })) if !e.is_retryable() => {
                for w in batch {
                    let answer = self.transmit(&w.events).await;
                    let _ = w.answer.send(answer);
                }
            }
            Err(e) => {
                for w in batch {
                    let _ = w.answer.send(Err(e.clone()));
                }
            }
        }
    }

    /// Sends `events` as one batch: over the pipelined connection when there is one, else
    /// over HTTP; retried with the same ids after a transport error or a retryable status.
    async fn transmit<T: Serialize>(&self, events: &[T]) -> Result<Sent, ProducerError> {
        self.batches.sent.fetch_add(1, Ordering::Relaxed);
        let mut attempt = 0;
        loop {
            let answer = match self.send_pipelined(events).await {
                Some(answer) => answer,
                None => self.client.publish_batch(self.task.as_str(), events).await,
            };
            match answer {
                Ok(outcome) => {
                    return Ok(Sent {
                        offsets: outcome.offsets,
                        cancelled: outcome.cancelled,
                    });
                }
                Err(e) if e.is_retryable() && attempt + 1 < HTTP_SEND_ATTEMPTS => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl EventSink for HttpSink {
    fn task_id(&self) -> &TaskId {
        &self.task
    }

    async fn send(&self, payloads: Vec<Payload>) -> Result<Sent, ProducerError> {
        let events = payloads
            .into_iter()
            .map(|p| self.wire(p))
            .collect::<Result<Vec<_>, _>>()?;
        if events.is_empty() {
            // Nothing to gather; the answer still carries the cancel flag.
            return self.transmit(&events).await;
        }
        let bytes = events.iter().map(|e| e.get().len()).sum();
        let (answer, answered) = oneshot::channel();
        let (start, full) = {
            let mut state = self.batches.state();
            state.events += events.len();
            state.bytes += bytes;
            state.waiting.push(Waiting {
                events,
                bytes,
                answer,
            });
            let start = !std::mem::replace(&mut state.sending, true);
            (start, Batches::is_full(&state))
        };
        if start {
            // A task of its own: a caller that stops waiting does not strand the others.
            tokio::spawn(self.clone().send_batches());
        } else if full {
            self.batches.full.notify_one();
        }
        answered.await.unwrap_or_else(|_| {
            Err(ClientError::Transport {
                url: self.client.base_url().to_string(),
                reason: "the batch sender ended before answering (runtime shutting down)".into(),
            }
            .into())
        })
    }

    async fn cancellation(&self) -> Result<Option<Cancellation>, ProducerError> {
        // One request per boundary: the info carries the reason as well.
        let info = self.client.queue_info(self.task.as_str()).await?;
        if info.is_cancelled {
            return Ok(Some(Cancellation {
                reason: info.cancel_reason,
            }));
        }
        Ok(None)
    }

    async fn save_checkpoint(
        &self,
        checkpoint: Checkpoint,
    ) -> Result<SavedCheckpoint, ProducerError> {
        #[derive(serde::Deserialize)]
        struct Answer {
            #[serde(flatten)]
            saved: SavedCheckpoint,
        }
        // Ids are made of URL-safe characters only: no encoding needed in the path.
        let url = format!(
            "{}/events/workflows/{}/checkpoints",
            self.client.base_url(),
            checkpoint.workflow_id
        );
        let mut url = reqwest::Url::parse(&url).map_err(|e| ClientError::InvalidUrl {
            url: url.clone(),
            reason: e.to_string(),
        })?;
        if let Some(tenant) = self.client.tenant() {
            url.query_pairs_mut().append_pair("tenant_id", tenant);
        }
        let body = serde_json::to_vec(&checkpoint.to_json())
            .map_err(|e| ClientError::InvalidInput(format!("checkpoint JSON: {e}")))?;
        let mut req = self
            .client
            .http()
            .post(url)
            .timeout(self.client.timeout())
            .header("Content-Type", "application/json")
            .body(body);
        if let Some(token) = self.client.token() {
            req = req.bearer_auth(token);
        }
        if let Some(tenant) = self.client.tenant() {
            req = req.header("X-Tenant-ID", tenant);
        }
        let transport = |e: reqwest::Error| self.client.transport(&e);
        let resp = req.send().await.map_err(transport)?;
        let status = resp.status();
        let body = resp.bytes().await.map_err(transport)?;
        if !status.is_success() {
            let detail = serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|v| v.get("detail").and_then(Value::as_str).map(str::to_string))
                .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
            return Err(ClientError::Api {
                status: status.as_u16(),
                detail,
            }
            .into());
        }
        let answer: Answer = serde_json::from_slice(&body)
            .map_err(|e| ClientError::Decode(format!("checkpoint answer: {e}")))?;
        Ok(answer.saved)
    }
}

/// A reporter over an [`HttpSink`].
pub type HttpReporter = Reporter<HttpSink>;
