//! [`Pipeline`]: the pipelined producer connection of one queue
//! (`GET /events/queues/{task_id}/events/ws`, a WebSocket).
//!
//! Over HTTP each publish waits for its answer before the next request is sent on that
//! connection; on a pipeline any number of frames (up to [`MAX_OUTSTANDING`]) travel at once
//! and the server puts the frames that arrive during a commit into the next one. Answers come
//! back in the order frames were sent; each one means what an HTTP answer means (the events
//! are durable when it arrives).

use std::collections::VecDeque;
use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use super::{Client, ClientError, PublishOutcome, events_path, json_bytes};

/// Frames a pipeline sends before it waits for answers (the server's default in-flight bound
/// is 256: more would only wait in its socket).
pub const MAX_OUTSTANDING: usize = 256;

type Answer = oneshot::Sender<Result<PublishOutcome, ClientError>>;

/// A pipelined producer connection to one queue. Cheap to clone: clones share the connection,
/// and publishes from many tasks are pipelined on it. The connection closes when every clone
/// is dropped (after the answers still due arrived).
#[derive(Clone, Debug)]
pub struct Pipeline {
    tx: mpsc::Sender<(Vec<u8>, Answer)>,
    base: String,
}

/// The answer to a frame sent with [`Pipeline::send`] or [`Pipeline::send_batch`].
#[derive(Debug)]
pub struct PendingAck {
    rx: oneshot::Receiver<Result<PublishOutcome, ClientError>>,
    base: String,
}

impl PendingAck {
    /// Waits for the server's answer.
    ///
    /// # Errors
    ///
    /// As [`Client::publish`]; [`ClientError::Transport`] when the connection ended before the
    /// answer arrived — the events may or may not be stored: publish them again with the same
    /// `event_id`s (over a new pipeline or HTTP), which never duplicates one.
    pub async fn outcome(self) -> Result<PublishOutcome, ClientError> {
        match self.rx.await {
            Ok(answer) => answer,
            Err(_) => Err(lost(&self.base)),
        }
    }
}

fn lost(base: &str) -> ClientError {
    ClientError::Transport {
        url: base.to_string(),
        reason: "the producer connection ended before the answer arrived (the events may be \
                 stored: retry with the same event_id)"
            .into(),
    }
}

impl Client {
    /// Opens the pipelined producer connection of queue `task_id` (a WebSocket on
    /// `/events/queues/{task_id}/events/ws`, with this client's token, tenant and TLS
    /// settings).
    ///
    /// # Errors
    ///
    /// [`ClientError::Api`] when the server refuses the handshake: `401`/`403` credentials,
    /// `404` unknown queue — or an older server without the endpoint (`404`/`405`: use
    /// [`Client::publish`] instead); [`ClientError::Transport`] / [`ClientError::Tls`] when it
    /// cannot be reached.
    pub async fn pipeline(&self, task_id: &str) -> Result<Pipeline, ClientError> {
        let path = format!("{}/ws", events_path(task_id)?);
        let invalid = |reason: String| ClientError::InvalidUrl {
            url: self.base.clone(),
            reason,
        };
        let mut url = reqwest::Url::parse(&format!("{}{path}", self.base))
            .map_err(|e| invalid(e.to_string()))?;
        let https = url.scheme() == "https";
        let host = url
            .host_str()
            .ok_or_else(|| invalid("no host".into()))?
            .to_string();
        let port = url
            .port_or_known_default()
            .ok_or_else(|| invalid("no port".into()))?;
        if let Some(tenant) = &self.tenant {
            url.query_pairs_mut().append_pair("tenant_id", tenant);
        }
        // The scheme only names the request's target here: the stream is opened below.
        url.set_scheme(if https { "wss" } else { "ws" })
            .map_err(|()| invalid("cannot make a WebSocket URL of it".into()))?;
        let mut request = url
            .as_str()
            .into_client_request()
            .map_err(|e| invalid(e.to_string()))?;
        let headers = request.headers_mut();
        if let Some(token) = &self.token {
            let value = format!("Bearer {token}")
                .parse()
                .map_err(|_| ClientError::InvalidInput("the token is not a header value".into()))?;
            headers.insert("authorization", value);
        }
        if let Some(tenant) = &self.tenant {
            let value = tenant.parse().map_err(|_| {
                ClientError::InvalidInput("the tenant is not a header value".into())
            })?;
            headers.insert("x-tenant-id", value);
        }
        let transport = |reason: String| ClientError::Transport {
            url: self.base.clone(),
            reason,
        };
        let tcp = tokio::time::timeout(
            super::CONNECT_TIMEOUT,
            tokio::net::TcpStream::connect((host.trim_matches(['[', ']']), port)),
        )
        .await
        .map_err(|_| transport("connection timed out".into()))?
        .map_err(|e| transport(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let (tx, rx) = mpsc::channel(MAX_OUTSTANDING);
        if https {
            let name = rustls::pki_types::ServerName::try_from(host.trim_matches(['[', ']']))
                .map_err(|e| invalid(e.to_string()))?
                .to_owned();
            let tls = tokio_rustls::TlsConnector::from(Arc::clone(&self.ws_tls))
                .connect(name, tcp)
                .await
                .map_err(|e| ClientError::Tls {
                    url: self.base.clone(),
                    kind: super::TlsFailure::Handshake,
                    reason: e.to_string(),
                })?;
            self.handshake(request, tls, rx).await?;
        } else {
            self.handshake(request, tcp, rx).await?;
        }
        Ok(Pipeline {
            tx,
            base: self.base.clone(),
        })
    }

    async fn handshake<S>(
        &self,
        request: tokio_tungstenite::tungstenite::handshake::client::Request,
        stream: S,
        rx: mpsc::Receiver<(Vec<u8>, Answer)>,
    ) -> Result<(), ClientError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        use tokio_tungstenite::tungstenite::Error as WsError;
        let (ws, _) = tokio::time::timeout(
            self.timeout,
            tokio_tungstenite::client_async_with_config(
                request,
                stream,
                // Acknowledgements are small: the default 128 KiB read buffer is zeroed
                // before every read, which costs more than the reads themselves.
                Some(WebSocketConfig::default().read_buffer_size(16 * 1024)),
            ),
        )
        .await
        .map_err(|_| ClientError::Transport {
            url: self.base.clone(),
            reason: "the WebSocket handshake timed out".into(),
        })?
        .map_err(|e| match e {
            WsError::Http(resp) => {
                let status = resp.status().as_u16();
                let body = resp.into_body().unwrap_or_default();
                let detail = serde_json::from_slice::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v.get("detail")?.as_str().map(str::to_string))
                    .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
                ClientError::Api { status, detail }
            }
            other => ClientError::Transport {
                url: self.base.clone(),
                reason: other.to_string(),
            },
        })?;
        tokio::spawn(drive(ws, rx, self.base.clone()));
        Ok(())
    }
}

impl Pipeline {
    /// Publishes one event (any JSON object the server accepts) and waits for its answer.
    ///
    /// # Errors
    ///
    /// As [`PendingAck::outcome`].
    pub async fn publish<T: Serialize + ?Sized>(
        &self,
        event: &T,
    ) -> Result<PublishOutcome, ClientError> {
        self.send(event).await?.outcome().await
    }

    /// Publishes `{"events": [...]}` (stored atomically) and waits for its answer.
    ///
    /// # Errors
    ///
    /// As [`PendingAck::outcome`].
    pub async fn publish_batch<T: Serialize>(
        &self,
        events: &[T],
    ) -> Result<PublishOutcome, ClientError> {
        self.send_batch(events).await?.outcome().await
    }

    /// Sends one event without waiting for its answer (waiting only while
    /// 256 frames (`MAX_OUTSTANDING`) are unanswered): one task can keep many in flight.
    ///
    /// # Errors
    ///
    /// [`ClientError::InvalidInput`] when `event` does not serialise;
    /// [`ClientError::Transport`] when the connection has ended.
    pub async fn send<T: Serialize + ?Sized>(&self, event: &T) -> Result<PendingAck, ClientError> {
        self.frame(json_bytes(event)?).await
    }

    /// [`Pipeline::send`] for `{"events": [...]}`.
    ///
    /// # Errors
    ///
    /// As [`Pipeline::send`].
    pub async fn send_batch<T: Serialize>(&self, events: &[T]) -> Result<PendingAck, ClientError> {
        #[derive(Serialize)]
        struct Batch<'a, T> {
            events: &'a [T],
        }
        self.frame(json_bytes(&Batch { events })?).await
    }

    async fn frame(&self, body: Vec<u8>) -> Result<PendingAck, ClientError> {
        let (answer, rx) = oneshot::channel();
        self.tx
            .send((body, answer))
            .await
            .map_err(|_| lost(&self.base))?;
        Ok(PendingAck {
            rx,
            base: self.base.clone(),
        })
    }
}

/// An answer frame: the outcome, or the frame's error.
#[derive(Deserialize)]
struct Reply {
    #[serde(flatten)]
    outcome: Option<PublishOutcome>,
    status: Option<u16>,
    detail: Option<String>,
}

/// Runs a connection: writes the frames handed over (several per flush when they queue up),
/// matches the answers to them in order, and fails the answers still due when the connection
/// ends.
async fn drive<S>(
    ws: tokio_tungstenite::WebSocketStream<S>,
    mut rx: mpsc::Receiver<(Vec<u8>, Answer)>,
    base: String,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut sink, mut stream) = ws.split();
    let mut due: VecDeque<Answer> = VecDeque::new();
    let mut open = true;
    loop {
        if !open && due.is_empty() {
            break;
        }
        tokio::select! {
            next = rx.recv(), if open && due.len() < MAX_OUTSTANDING => {
                let Some((body, answer)) = next else {
                    open = false;
                    continue;
                };
                let mut result = sink.feed(Message::Binary(body.into())).await;
                due.push_back(answer);
                while result.is_ok() && due.len() < MAX_OUTSTANDING {
                    let Ok((body, answer)) = rx.try_recv() else { break };
                    result = sink.feed(Message::Binary(body.into())).await;
                    due.push_back(answer);
                }
                if result.is_ok() {
                    result = sink.flush().await;
                }
                if result.is_err() {
                    break;
                }
            }
            msg = stream.next() => match msg {
                Some(Ok(Message::Text(text))) => {
                    let Some(answer) = due.pop_front() else { break };
                    let outcome = match serde_json::from_str::<Reply>(text.as_str()) {
                        Ok(Reply { status: Some(status), detail, .. }) => Err(ClientError::Api {
                            status,
                            detail: detail.unwrap_or_default(),
                        }),
                        Ok(Reply { outcome: Some(o), .. }) => Ok(o),
                        _ => Err(ClientError::Decode(format!(
                            "unexpected answer frame: {}",
                            text.as_str().chars().take(200).collect::<String>()
                        ))),
                    };
                    let _ = answer.send(outcome);
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Binary(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Close(_)) | Err(_)) | None => break,
            },
        }
    }
    // Whatever is still due gets the error from its sender being dropped.
    if !due.is_empty() {
        tracing::debug!(
            "producer connection to {base} ended with {} answers due",
            due.len()
        );
    }
    drop(due);
    rx.close();
    let _ = sink.close().await;
}
