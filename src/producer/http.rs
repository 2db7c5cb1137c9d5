//! [`HttpSink`]: a [`Reporter`]'s queue on an eventqueue server (feature `client`).

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use super::{Cancellation, EventSink, ProducerError, Reporter, Sent};
use crate::checkpoint::{Checkpoint, SavedCheckpoint};
use crate::client::{Client, ClientError, Pipeline, PublishOutcome};
use crate::event::{Event, Payload};
use crate::ids::{TaskId, TenantId};

/// Attempts of a send over HTTP that failed in a way worth retrying (a transport error, `408`,
/// `429`, `5xx`); the events keep their ids, so a retry never duplicates one.
const HTTP_SEND_ATTEMPTS: u32 = 4;

/// A queue on an eventqueue server, for producers in another process.
///
/// Sends go over the queue's pipelined producer connection ([`Client::pipeline`], a WebSocket
/// opened at the first send and shared by the sink's clones, so sends from concurrent tasks
/// are pipelined), or to `POST /events/queues/{task_id}/events` when the server does not offer
/// it or the connection was lost (retried with the same event ids after a transport error or
/// a retryable status: idempotent; [`Sent::cancelled`] carries the answer's cancel flag); a
/// lost connection is opened again at the next send. The boundary check reads `GET /events/queues/{task_id}` (one request per
/// check, which also gives the reason), checkpoints go to
/// `POST /events/workflows/{task_id}/checkpoints` (not retried: a save is not idempotent).
#[derive(Clone, Debug)]
pub struct HttpSink {
    client: Client,
    task: TaskId,
    pipe: Arc<tokio::sync::Mutex<Pipe>>,
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
        }
    }

    /// Sends `Authorization: Bearer <token>` (token mode; the token needs `publish`, and
    /// `subscribe` for the cancellation check's queue info).
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.client = self.client.with_token(token);
        self.pipe = Arc::default();
        self
    }

    /// Acts for `tenant` (open mode's `X-Tenant-ID`; an admin token's `?tenant_id=`).
    pub fn with_tenant(mut self, tenant: &TenantId) -> Self {
        self.client = self.client.with_tenant(tenant.as_str());
        self.pipe = Arc::default();
        self
    }

    /// Sends `events` over the pipelined connection, opening it if needed. `None`: no
    /// connection (refused, unreachable) or it was lost before the answer — the caller sends
    /// over HTTP (the events keep their ids, so a resend never duplicates one).
    async fn send_pipelined(
        &self,
        events: &[Value],
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

    /// The event JSON a server accepts from a producer: the event without its queue ids and
    /// offset (the server fills them in from the route and the caller's tenant).
    fn wire(&self, payload: Payload) -> Value {
        let event = Event::new(&TenantId::default_tenant(), &self.task, payload);
        let mut value: Value = serde_json::from_slice(&event.to_json()).unwrap_or(Value::Null);
        if let Value::Object(map) = &mut value {
            map.remove("tenant_id");
            map.remove("offset");
        }
        value
    }
}

impl EventSink for HttpSink {
    fn task_id(&self) -> &TaskId {
        &self.task
    }

    async fn send(&self, payloads: Vec<Payload>) -> Result<Sent, ProducerError> {
        let events: Vec<Value> = payloads.into_iter().map(|p| self.wire(p)).collect();
        if let Some(answer) = self.send_pipelined(&events).await {
            let outcome = answer?;
            return Ok(Sent {
                offsets: outcome.offsets,
                cancelled: outcome.cancelled,
            });
        }
        let mut attempt = 0;
        let outcome = loop {
            match self.client.publish_batch(self.task.as_str(), &events).await {
                Ok(outcome) => break outcome,
                Err(e) if e.is_retryable() && attempt + 1 < HTTP_SEND_ATTEMPTS => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
                }
                Err(e) => return Err(e.into()),
            }
        };
        Ok(Sent {
            offsets: outcome.offsets,
            cancelled: outcome.cancelled,
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
