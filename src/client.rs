//! An async HTTP client for an eventqueue server: the producer and administration endpoints,
//! and SSE subscriptions that resume by themselves.
//!
//! ```no_run
//! use eventqueue::client::{Client, StreamItem, SubscribeOptions};
//! use serde_json::json;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), eventqueue::client::ClientError> {
//! let client = Client::new("http://127.0.0.1:8000")?.with_tenant("acme");
//! client.create_queue("workflow_123", &Default::default()).await?;
//! client
//!     .publish("workflow_123", &json!({"event_type": "status", "state": "working"}))
//!     .await?;
//!
//! let mut sub = client.subscribe("workflow_123", SubscribeOptions::default());
//! while let Some(item) = sub.next().await {
//!     match item? {
//!         StreamItem::Event(e) => println!("{} {}", e.offset, e.data),
//!         StreamItem::Reconnecting { error, delay, .. } => {
//!             eprintln!("connection lost ({error}); reconnecting in {delay:?}")
//!         }
//!         StreamItem::End(reason) => println!("stream ended: {reason:?}"),
//!         _ => {}
//!     }
//! }
//! # Ok(())
//! # }
//! ```
//!
//! ## Subscriptions and reconnection
//!
//! A [`Subscription`] reads the SSE frames of `GET /events/workflows/{id}` (or
//! `/events/ingestion/{id}`) and yields them as [`StreamItem`]s, in offset order. It remembers
//! the resume point (one past the last event, or the first available offset after a gap) and,
//! when the connection drops before the stream ended for good — a server restart, a network
//! failure, a server shutting down — it reconnects with exponential backoff, sending
//! `Last-Event-ID`, and reports each attempt as [`StreamItem::Reconnecting`] and each success
//! as [`StreamItem::Reconnected`]. Nothing is delivered twice: an event below the resume point
//! is dropped.
//!
//! A stream that ends without a terminal event is not necessarily over: the server also ends
//! streams when it shuts down. The subscription then asks for the queue's info: a closed queue
//! whose every event was delivered ends the subscription ([`EndReason::Closed`]), a queue that
//! no longer exists ends it ([`EndReason::QueueGone`]), anything else reconnects.
//!
//! ## HTTPS
//!
//! An `https://` URL is served over rustls, with HTTP/2 when the server offers it (ALPN) and
//! HTTP/1.1 otherwise. The server's certificate is checked against the system's trust store
//! (on Linux its CA bundle; `SSL_CERT_FILE` / `SSL_CERT_DIR` point elsewhere) and any CA added
//! with [`ClientBuilder::ca_cert_pem`] (a private CA, or a self-signed certificate).
//! A certificate the client rejects, or a server that does not speak TLS, is
//! [`ClientError::Tls`]: no retry can fix it, so subscriptions end with it at once instead of
//! reconnecting.
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let ca = std::fs::read("ca.pem")?;
//! let client = eventqueue::client::Client::builder("https://events.internal:8443")
//!     .ca_cert_pem(ca)
//!     .build()?;
//! # let _ = client;
//! # Ok(())
//! # }
//! ```
//!
//! ## Tenants and tokens
//!
//! [`Client::with_token`] sends `Authorization: Bearer <token>` (token mode: the tenant comes
//! from the token). [`Client::with_tenant`] sends `X-Tenant-ID` (open mode) and
//! `?tenant_id=` (which an `admin` token may use to act on another tenant; other tokens ignore
//! it).

mod coalesce;
mod pipeline;

pub use coalesce::{Coalescer, DEFAULT_MAX_EVENTS};
pub use pipeline::{PendingAck, Pipeline};

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use futures_util::StreamExt;
use reqwest::header::{HeaderMap, HeaderValue};
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use rustls::pki_types::CertificateDer;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The server address used when none is given (`eventqueue serve`'s default).
pub const DEFAULT_URL: &str = "http://127.0.0.1:8000";

/// Everything a [`Client`] call can fail with.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The base URL is not an `http://` or `https://` URL.
    #[error("invalid server URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The server could not be reached, or the connection failed mid-request.
    #[error("cannot reach the eventqueue server at {url}: {reason}")]
    Transport {
        /// The server's base URL.
        url: String,
        /// The underlying error.
        reason: String,
    },
    /// TLS with the server failed in a way no retry can fix: the client rejected the server's
    /// certificate (unknown issuer, wrong name, expired), the server does not speak TLS on
    /// that port, or the two share no protocol version; or, building the client, the system
    /// trust store held no certificate.
    #[error("TLS with the eventqueue server at {url} failed: {reason}")]
    Tls {
        /// The server's base URL.
        url: String,
        /// Which kind of failure.
        kind: TlsFailure,
        /// What failed, in words.
        reason: String,
    },
    /// A CA certificate given to [`ClientBuilder::ca_cert_pem`] could not be used.
    #[error("invalid CA certificate: {0}")]
    InvalidCaCert(String),
    /// The server answered with an error status; `detail` is its `{"detail": …}` message.
    #[error("{}", api_message(*status, detail))]
    Api {
        /// The HTTP status code.
        status: u16,
        /// The server's explanation (its `detail` field, else the body).
        detail: String,
    },
    /// The server's answer was not what this client expects (another service on that port,
    /// or an incompatible version).
    #[error("unexpected answer from the server: {0}")]
    Decode(String),
    /// An argument was refused before any request was sent.
    #[error("{0}")]
    InvalidInput(String),
}

/// What kind of TLS failure a [`ClientError::Tls`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TlsFailure {
    /// The client rejected the server's certificate (unknown issuer: a private CA needs
    /// [`ClientBuilder::ca_cert_pem`]; a name that does not match the URL; expired).
    Certificate,
    /// The server did not answer in TLS: an `https://` URL on a plain HTTP port.
    NotTls,
    /// The handshake failed otherwise: no common protocol version or cipher suite, or the
    /// server refused it.
    Handshake,
    /// No certificate to trust: the system's trust store is empty and no CA was given.
    NoTrustAnchors,
}

fn api_message(status: u16, detail: &str) -> String {
    let reason = StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("error");
    if detail.is_empty() {
        format!("server answered {status} {reason}")
    } else {
        format!("{detail} (HTTP {status} {reason})")
    }
}

impl ClientError {
    /// The HTTP status of an [`ClientError::Api`] error.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Whether the server answered `404` (unknown queue, or another tenant's).
    pub fn is_not_found(&self) -> bool {
        self.status() == Some(404)
    }

    /// Whether the failure was the connection, not an answer: worth retrying.
    pub fn is_transport(&self) -> bool {
        matches!(self, ClientError::Transport { .. })
    }

    /// Whether retrying the same request later may succeed: a transport failure, `408`, `429`,
    /// or a `5xx` other than `507` (disk full stays full until someone acts). A rejected
    /// certificate ([`ClientError::Tls`]) or a bad URL is not.
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Transport { .. } => true,
            ClientError::Api { status, .. } => {
                matches!(status, 408 | 429) || (*status >= 500 && *status != 507)
            }
            _ => false,
        }
    }
}

/// Which SSE / cancel route to call. Both serve any queue kind; they differ in the wording of
/// the server's messages (`No active workflow found …` / `No active ingestion job found …`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Route {
    /// `/events/workflows/{id}`.
    #[default]
    Workflow,
    /// `/events/ingestion/{id}`.
    Ingestion,
}

impl Route {
    fn prefix(self) -> &'static str {
        match self {
            Route::Workflow => "/events/workflows/",
            Route::Ingestion => "/events/ingestion/",
        }
    }
}

/// Options of [`Client::create_queue`]; unset fields take the server's defaults.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CreateQueue {
    /// `workflow`, `ingestion` or `task` (the server's default).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// TTL from the last activity, in minutes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttl_minutes: Option<f64>,
    /// Retained events.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_buffer_size: Option<u64>,
}

/// A queue's info as the server reports it (`GET /events/queues/{task_id}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RemoteQueueInfo {
    /// Task id.
    pub task_id: String,
    /// Tenant id.
    pub tenant_id: String,
    /// `workflow`, `ingestion` or `task`.
    pub kind: String,
    /// Retained events.
    pub event_count: u64,
    /// Live subscriptions.
    pub subscriber_count: u64,
    /// Closed to producers.
    pub is_closed: bool,
    /// Cancellation requested.
    pub is_cancelled: bool,
    /// Cancellation reason.
    pub cancel_reason: Option<String>,
    /// A terminal event was enqueued.
    pub is_finished: bool,
    /// Creation time (RFC 3339).
    pub created_at: String,
    /// Creation or last event (RFC 3339).
    pub last_activity: String,
    /// TTL in minutes.
    pub ttl_minutes: f64,
    /// Retention bound.
    pub max_buffer_size: u64,
    /// Oldest retained offset (= `latest_offset` when none is retained).
    pub first_offset: u64,
    /// One past the newest offset ever appended.
    pub latest_offset: u64,
}

/// Which queues [`Client::list_queues_matching`] and [`Client::list_queues_page`] return; the
/// default matches every queue. Values are sent as given, so the server names a wrong one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListFilter {
    /// Only these kinds (`workflow`, `ingestion`, `task`); empty: every kind.
    pub kinds: Vec<String>,
    /// Only these states (`running`, `closed`, `finished`, `cancelled`); empty: every state.
    pub states: Vec<String>,
    /// Only task ids starting with this text.
    pub task_id_prefix: Option<String>,
}

impl ListFilter {
    /// The filter's query parameters.
    fn pairs(&self) -> Vec<(&'static str, String)> {
        let mut pairs = Vec::new();
        if !self.kinds.is_empty() {
            pairs.push(("kind", self.kinds.join(",")));
        }
        if !self.states.is_empty() {
            pairs.push(("state", self.states.join(",")));
        }
        if let Some(prefix) = &self.task_id_prefix {
            pairs.push(("task_id_prefix", prefix.clone()));
        }
        pairs
    }
}

/// One page of `GET /events/queues` (see [`Client::list_queues_page`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RemoteQueuePage {
    /// The page's queues, newest activity first.
    pub queues: Vec<RemoteQueueInfo>,
    /// The `cursor` of the next page; `None` on the last page.
    pub next_cursor: Option<String>,
}

/// The answer to an enqueue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishOutcome {
    /// The offset of each event, in order (an event whose `event_id` the queue still retains
    /// gets its stored offset: retrying is safe).
    pub offsets: Vec<u64>,
    /// The queue's latest offset after the enqueue.
    pub latest_offset: u64,
    /// Whether the task was cancelled: a producer should stop and report `status: cancelled`.
    pub cancelled: bool,
}

/// The answer to a cancel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelOutcome {
    /// Task id.
    pub task_id: String,
    /// Always true in a successful answer.
    pub cancelled: bool,
    /// The server's message (`Workflow {id} cancellation requested`).
    pub message: String,
}

/// The answer to a token revocation ([`Client::revoke_tokens`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokedTokens {
    /// The tenant whose tokens were revoked.
    pub tenant_id: String,
    /// Its tokens issued before this time (RFC 3339) are refused.
    pub not_before: String,
}

/// An HTTP client for one eventqueue server. Cheap to clone (connections are pooled and
/// shared between clones).
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
    tenant: Option<String>,
    timeout: Duration,
    /// The TLS settings of `wss://` producer connections ([`Client::pipeline`]).
    ws_tls: Arc<rustls::ClientConfig>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The token is a credential: never printed.
        f.debug_struct("Client")
            .field("base", &self.base)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("tenant", &self.tenant)
            .finish()
    }
}

/// Default time limit of a request other than a stream.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Time limit for establishing a TCP connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Builds a [`Client`] whose connections need more than [`Client::new`] gives: a CA to trust
/// besides the system's.
#[derive(Clone)]
pub struct ClientBuilder {
    base_url: String,
    ca_pems: Vec<Vec<u8>>,
}

impl fmt::Debug for ClientBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientBuilder")
            .field("base_url", &self.base_url)
            .field("ca_certs", &self.ca_pems.len())
            .finish()
    }
}

impl ClientBuilder {
    /// Trusts the CA certificates in `pem` (one or more `BEGIN CERTIFICATE` blocks), in
    /// addition to the system's trust store: a private CA, or a server's self-signed
    /// certificate. Checked by [`ClientBuilder::build`].
    pub fn ca_cert_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.ca_pems.push(pem.into());
        self
    }

    /// The client. Loopback addresses are reached directly, never through a proxy from the
    /// environment.
    ///
    /// With an `https://` URL this reads the system's trust store (as reqwest's own
    /// `Client::new` does): a blocking read of some hundred kilobytes, once per client. In
    /// async code, build clients once (they are cheap to clone), or on a blocking thread.
    ///
    /// # Errors
    ///
    /// [`ClientError::InvalidUrl`] when the URL is not an `http://` / `https://` URL;
    /// [`ClientError::InvalidCaCert`] when a CA given holds no certificate or one rustls
    /// refuses; [`ClientError::Tls`] for an `https://` URL when no trusted certificate was
    /// found at all (an empty system store and no CA given).
    pub fn build(self) -> Result<Client, ClientError> {
        let raw = self.base_url.trim();
        let invalid = |reason: &str| ClientError::InvalidUrl {
            url: raw.to_string(),
            reason: reason.to_string(),
        };
        let url = reqwest::Url::parse(raw).map_err(|e| invalid(&e.to_string()))?;
        let https = match url.scheme() {
            "http" => false,
            "https" => true,
            _ => return Err(invalid("the scheme must be http or https")),
        };
        let Some(host) = url.host_str() else {
            return Err(invalid("no host"));
        };
        if url.query().is_some() || url.fragment().is_some() {
            return Err(invalid(
                "a query or fragment is not allowed in the base URL",
            ));
        }
        let loopback = host == "localhost"
            || host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        let mut extra_roots = Vec::new();
        for pem in &self.ca_pems {
            extra_roots.extend(parse_ca_pem(pem)?);
        }
        let base = raw.trim_end_matches('/').to_string();
        let tls = tls_config(https, extra_roots).map_err(|reason| ClientError::Tls {
            url: base.clone(),
            kind: TlsFailure::NoTrustAnchors,
            reason,
        })?;
        let mut ws_tls = tls.clone();
        // A WebSocket handshake is an HTTP/1.1 upgrade.
        ws_tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let mut builder = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .tls_backend_preconfigured(tls);
        if loopback {
            builder = builder.no_proxy();
        }
        let http = builder
            .build()
            .map_err(|e| invalid(&format!("cannot build an HTTP client: {e}")))?;
        Ok(Client {
            http,
            base,
            token: None,
            tenant: None,
            timeout: REQUEST_TIMEOUT,
            ws_tls: Arc::new(ws_tls),
        })
    }
}

/// The certificates of a PEM file.
fn parse_ca_pem(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, ClientError> {
    use rustls::pki_types::pem::PemObject;
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ClientError::InvalidCaCert(format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(ClientError::InvalidCaCert(
            "no certificate (-----BEGIN CERTIFICATE-----) in it".into(),
        ));
    }
    // A certificate webpki cannot use as a trust anchor is refused now, not at the first
    // connection.
    let mut store = rustls::RootCertStore::empty();
    for cert in &certs {
        store
            .add(cert.clone())
            .map_err(|e| ClientError::InvalidCaCert(e.to_string()))?;
    }
    Ok(certs)
}

/// The rustls settings of a client, with the aws-lc-rs provider (reqwest's own default),
/// handed to reqwest finished. Offers HTTP/2 and HTTP/1.1 by ALPN.
///
/// For `https://`, certificates are checked against the system's trust store and
/// `extra_roots` (rustls-platform-verifier, reqwest's own default). For `http://` the
/// settings only matter if a redirect leads to HTTPS: they trust `extra_roots` alone, which
/// spares reading the system store (and failing where it is empty) for plain HTTP.
fn tls_config(
    https: bool,
    extra_roots: Vec<CertificateDer<'static>>,
) -> Result<rustls::ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let mut config = if https {
        let verifier =
            rustls_platform_verifier::Verifier::new_with_extra_roots(extra_roots, provider)
                .map_err(|e| {
                    format!(
                        "{e} (install the system's CA certificates, set SSL_CERT_FILE, or \
                         give the server's CA)"
                    )
                })?;
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth()
    } else {
        let mut roots = rustls::RootCertStore::empty();
        roots.add_parsable_certificates(extra_roots);
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

impl Client {
    /// A client for the server at `base_url` (e.g. `http://127.0.0.1:8000`; a trailing `/` is
    /// ignored). Loopback addresses are reached directly, never through a proxy from the
    /// environment. The same as `Client::builder(base_url).build()`.
    ///
    /// # Errors
    ///
    /// As [`ClientBuilder::build`]: [`ClientError::InvalidUrl`] when `base_url` is not an
    /// `http://` / `https://` URL.
    pub fn new(base_url: impl AsRef<str>) -> Result<Self, ClientError> {
        Self::builder(base_url).build()
    }

    /// A builder for a client of the server at `base_url`, for settings of the connections
    /// themselves (a private CA: [`ClientBuilder::ca_cert_pem`]).
    pub fn builder(base_url: impl AsRef<str>) -> ClientBuilder {
        ClientBuilder {
            base_url: base_url.as_ref().to_string(),
            ca_pems: Vec::new(),
        }
    }

    /// Sends `Authorization: Bearer <token>` with every request (token mode).
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Acts for `tenant`: `X-Tenant-ID` (open mode) and `?tenant_id=` (an admin token).
    pub fn with_tenant(mut self, tenant: impl Into<String>) -> Self {
        self.tenant = Some(tenant.into());
        self
    }

    /// Time limit of each request other than a stream. Default: 30 s.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The server's base URL, without a trailing `/`.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// The tenant set with [`Client::with_tenant`].
    pub fn tenant(&self) -> Option<&str> {
        self.tenant.as_deref()
    }

    /// `GET /healthz`.
    ///
    /// # Errors
    ///
    /// [`ClientError::Transport`] if the server cannot be reached; [`ClientError::Api`] for an
    /// error status.
    pub async fn health(&self) -> Result<(), ClientError> {
        let resp = self.send(self.request(Method::GET, "/healthz")).await?;
        check(resp).await.map(drop)
    }

    /// `POST /events/queues`: creates a queue.
    ///
    /// # Errors
    ///
    /// [`ClientError::Api`] with `409` if the queue exists, `400` for a bad id or option;
    /// [`ClientError::Transport`] if the server cannot be reached.
    pub async fn create_queue(
        &self,
        task_id: &str,
        options: &CreateQueue,
    ) -> Result<RemoteQueueInfo, ClientError> {
        #[derive(Serialize)]
        struct Body<'a> {
            task_id: &'a str,
            #[serde(flatten)]
            options: &'a CreateQueue,
        }
        let body = json_bytes(&Body { task_id, options })?;
        self.call(Method::POST, "/events/queues".into(), Some(body))
            .await
    }

    /// `POST /events/queues/{task_id}/events` with one event (any JSON object the server
    /// accepts; `task_id` / `tenant_id` may be omitted).
    ///
    /// # Errors
    ///
    /// [`ClientError::Api`]: `404` unknown queue, `400` invalid event (the message names the
    /// field), `409` closed queue, `413` too large, `507` disk full; [`ClientError::Transport`].
    /// After a transport error or a timeout the event may be stored: retry it with the same
    /// `event_id`, which never creates a duplicate.
    pub async fn publish<T: Serialize + ?Sized>(
        &self,
        task_id: &str,
        event: &T,
    ) -> Result<PublishOutcome, ClientError> {
        let body = json_bytes(event)?;
        self.call(Method::POST, events_path(task_id)?, Some(body))
            .await
    }

    /// `POST /events/queues/{task_id}/events` with `{"events": [...]}`: stored atomically (one
    /// invalid event refuses the whole batch). The server takes at most 1000 events per batch
    /// by default.
    ///
    /// # Errors
    ///
    /// As [`Client::publish`].
    pub async fn publish_batch<T: Serialize>(
        &self,
        task_id: &str,
        events: &[T],
    ) -> Result<PublishOutcome, ClientError> {
        #[derive(Serialize)]
        struct Batch<'a, T> {
            events: &'a [T],
        }
        let body = json_bytes(&Batch { events })?;
        self.call(Method::POST, events_path(task_id)?, Some(body))
            .await
    }

    /// `GET /events/queues/{task_id}`.
    ///
    /// # Errors
    ///
    /// [`ClientError::Api`] with `404` for an unknown queue; [`ClientError::Transport`].
    pub async fn queue_info(&self, task_id: &str) -> Result<RemoteQueueInfo, ClientError> {
        self.call(Method::GET, queue_path(task_id)?, None).await
    }

    /// `GET /events/queues/{task_id}/offset`: the latest offset.
    ///
    /// # Errors
    ///
    /// As [`Client::queue_info`].
    pub async fn latest_offset(&self, task_id: &str) -> Result<u64, ClientError> {
        #[derive(Deserialize)]
        struct Offset {
            offset: u64,
        }
        let path = format!("{}/offset", queue_path(task_id)?);
        let o: Offset = self.call(Method::GET, path, None).await?;
        Ok(o.offset)
    }

    /// `GET /events/queues`: the tenant's queues (an admin token without a tenant: all).
    ///
    /// # Errors
    ///
    /// [`ClientError::Api`] (`401` / `403` in token mode); [`ClientError::Transport`].
    pub async fn list_queues(&self) -> Result<Vec<RemoteQueueInfo>, ClientError> {
        self.call(Method::GET, "/events/queues".into(), None).await
    }

    /// `GET /events/queues` with filters: every matching queue of the tenant, sorted by
    /// tenant then task, in one answer. For a tenant with many queues prefer
    /// [`Client::list_queues_page`].
    ///
    /// # Errors
    ///
    /// As [`Client::list_queues`]; `400` for an unknown kind or state.
    pub async fn list_queues_matching(
        &self,
        filter: &ListFilter,
    ) -> Result<Vec<RemoteQueueInfo>, ClientError> {
        let pairs = filter.pairs();
        let query: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (*k, v.as_str())).collect();
        self.call_with(Method::GET, "/events/queues", &query, None)
            .await
    }

    /// `GET /events/queues?limit=…`: one page of the matching queues, newest activity first.
    /// Pass the page's `next_cursor` back as `cursor` for the next page; it is `None` on the
    /// last one.
    ///
    /// # Errors
    ///
    /// As [`Client::list_queues_matching`]; `400` for a limit outside 1..=1000 or a cursor
    /// the server did not hand out.
    pub async fn list_queues_page(
        &self,
        filter: &ListFilter,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<RemoteQueuePage, ClientError> {
        let mut pairs = filter.pairs();
        pairs.push(("limit", limit.to_string()));
        if let Some(cursor) = cursor {
            pairs.push(("cursor", cursor.to_string()));
        }
        let query: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (*k, v.as_str())).collect();
        self.call_with(Method::GET, "/events/queues", &query, None)
            .await
    }

    /// `POST /events/{workflows|ingestion}/{task_id}/cancel`: asks the producer to stop.
    /// Appends no event and ends no stream.
    ///
    /// # Errors
    ///
    /// [`ClientError::Api`]: `404` unknown queue, `409` the task already finished;
    /// [`ClientError::Transport`].
    pub async fn cancel(
        &self,
        route: Route,
        task_id: &str,
        reason: Option<&str>,
    ) -> Result<CancelOutcome, ClientError> {
        let path = format!("{}{}/cancel", route.prefix(), encode_id(task_id)?);
        let body = match reason {
            Some(reason) => json_bytes(&serde_json::json!({ "reason": reason }))?,
            None => Vec::new(),
        };
        self.call(Method::POST, path, Some(body)).await
    }

    /// `POST /events/admin/revocations`: the server refuses `tenant_id`'s tokens issued before
    /// `not_before` (RFC 3339; `None`: now). Needs a token with the `admin` scope.
    ///
    /// # Errors
    ///
    /// [`ClientError::Api`]: `400` a bad tenant id or time, `401`/`403` no admin token;
    /// [`ClientError::Transport`].
    pub async fn revoke_tokens(
        &self,
        tenant_id: &str,
        not_before: Option<&str>,
    ) -> Result<RevokedTokens, ClientError> {
        let mut body = serde_json::json!({ "tenant_id": tenant_id });
        if let Some(time) = not_before {
            body["not_before"] = serde_json::Value::from(time);
        }
        let body = json_bytes(&body)?;
        self.call(
            Method::POST,
            "/events/admin/revocations".to_string(),
            Some(body),
        )
        .await
    }

    /// `POST /events/queues/{task_id}/close`: closes the queue to producers (it stays
    /// replayable).
    ///
    /// # Errors
    ///
    /// [`ClientError::Api`] with `404` for an unknown queue; [`ClientError::Transport`].
    pub async fn close_queue(&self, task_id: &str) -> Result<RemoteQueueInfo, ClientError> {
        let path = format!("{}/close", queue_path(task_id)?);
        self.call(Method::POST, path, Some(Vec::new())).await
    }

    /// `DELETE /events/queues/{task_id}`: removes the queue and its events.
    ///
    /// # Errors
    ///
    /// [`ClientError::Api`] with `404` for an unknown queue; [`ClientError::Transport`].
    pub async fn delete_queue(&self, task_id: &str) -> Result<(), ClientError> {
        let req = self.request(Method::DELETE, &queue_path(task_id)?);
        let resp = self.send(req.timeout(self.timeout)).await?;
        check(resp).await.map(drop)
    }

    /// Subscribes to a queue's SSE stream. Nothing is sent until the first
    /// [`Subscription::next`].
    pub fn subscribe(&self, task_id: &str, options: SubscribeOptions) -> Subscription {
        Subscription {
            client: self.clone(),
            task_id: task_id.to_string(),
            next_offset: options.from_offset,
            have_resume_point: options.from_offset > 0,
            options,
            state: SubState::Idle,
            attempt: 0,
            reconnecting: false,
            pending_end: None,
        }
    }

    fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.request_with(method, path, &[])
    }

    /// A request to `path` with the credentials, the tenant and `query` (values are
    /// percent-encoded).
    fn request_with(&self, method: Method, path: &str, query: &[(&str, &str)]) -> RequestBuilder {
        let url = format!("{}{path}", self.base);
        let mut req = match reqwest::Url::parse(&url) {
            Ok(mut url) => {
                {
                    let mut pairs = url.query_pairs_mut();
                    for (k, v) in query {
                        pairs.append_pair(k, v);
                    }
                    if let Some(tenant) = &self.tenant {
                        pairs.append_pair("tenant_id", tenant);
                    }
                }
                if url.query() == Some("") {
                    url.set_query(None);
                }
                self.http.request(method, url)
            }
            // The base was parsed in `new` and paths are built from validated ids; should
            // this still fail, reqwest reports it when the request is sent.
            Err(_) => self.http.request(method, url),
        };
        if let Some(token) = &self.token {
            req = req.bearer_auth(token);
        }
        if let Some(tenant) = &self.tenant {
            req = req.header("X-Tenant-ID", tenant);
        }
        req
    }

    async fn send(&self, req: RequestBuilder) -> Result<Response, ClientError> {
        req.send().await.map_err(|e| self.transport(&e))
    }

    /// A failed request as a [`ClientError`]: [`ClientError::Tls`] when TLS failed for good
    /// (see [`tls_failure`]), [`ClientError::InvalidUrl`] when reqwest refused the request
    /// itself, [`ClientError::Decode`] when the answer was not HTTP (an `http://` URL on a TLS
    /// port), else [`ClientError::Transport`] (worth retrying).
    pub(crate) fn transport(&self, e: &reqwest::Error) -> ClientError {
        if let Some((kind, reason)) = tls_failure(e) {
            return ClientError::Tls {
                url: self.base.clone(),
                kind,
                reason,
            };
        }
        if e.is_builder() {
            return ClientError::InvalidUrl {
                url: self.base.clone(),
                reason: error_chain(e),
            };
        }
        if not_http(e) {
            return ClientError::Decode(format!(
                "{} did not answer in HTTP ({}); is it serving HTTPS (an https:// URL)?",
                self.base,
                error_chain(e)
            ));
        }
        ClientError::Transport {
            url: self.base.clone(),
            reason: error_chain(e),
        }
    }

    /// The underlying reqwest client (shared with [`crate::producer::HttpSink`]).
    pub(crate) fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// The token set with [`Client::with_token`].
    pub(crate) fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// The time limit of each request other than a stream.
    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: String,
        body: Option<Vec<u8>>,
    ) -> Result<T, ClientError> {
        self.call_with(method, &path, &[], body).await
    }

    async fn call_with<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, &str)],
        body: Option<Vec<u8>>,
    ) -> Result<T, ClientError> {
        let mut req = self.request_with(method, path, query).timeout(self.timeout);
        if let Some(body) = body {
            if !body.is_empty() {
                req = req.header(reqwest::header::CONTENT_TYPE, "application/json");
            }
            req = req.body(body);
        }
        let resp = self.send(req).await?;
        let resp = check(resp).await?;
        let bytes = resp.bytes().await.map_err(|e| self.transport(&e))?;
        serde_json::from_slice(&bytes).map_err(|e| {
            ClientError::Decode(format!(
                "{e} in {}",
                String::from_utf8_lossy(preview(&bytes))
            ))
        })
    }
}

/// A short description of a reqwest error: its root cause (`Connection refused (os error
/// 111)`, `connection closed before message completed`), which says more than reqwest's own
/// "error sending request for url (…)"; a timeout is named as such.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut root = e;
    while let Some(source) = root.source() {
        root = source;
    }
    let text = root.to_string();
    if std::ptr::addr_eq(root, e) || text.is_empty() {
        e.to_string()
    } else {
        text
    }
}

/// The description of a TLS failure that no retry can fix, found in `e`'s chain of causes:
/// the server's certificate was rejected, the peer does not speak TLS (an `https://` URL on a
/// plain HTTP port), the two sides share no protocol, or the server refused the handshake.
/// `None` for everything else, a connection reset during the handshake included (a server
/// restarting): that is retried.
fn tls_failure(e: &(dyn std::error::Error + 'static)) -> Option<(TlsFailure, String)> {
    use rustls::{AlertDescription as A, Error as T};
    causes(e)
        .find_map(|c| c.downcast_ref::<T>())
        .and_then(|t| match t {
            T::InvalidCertificate(_) | T::NoCertificatesPresented => Some((
                TlsFailure::Certificate,
                format!("the server's certificate was rejected: {t}"),
            )),
            T::InvalidMessage(_) => Some((
                TlsFailure::NotTls,
                format!(
                    "the server did not answer in TLS ({t}); is it serving plain HTTP \
                         (an http:// URL)?"
                ),
            )),
            T::PeerIncompatible(_) | T::UnsupportedNameType => {
                Some((TlsFailure::Handshake, t.to_string()))
            }
            T::AlertReceived(
                A::HandshakeFailure
                | A::BadCertificate
                | A::UnsupportedCertificate
                | A::CertificateUnknown
                | A::UnknownCA
                | A::ProtocolVersion
                | A::InsufficientSecurity
                | A::NoApplicationProtocol
                | A::CertificateRequired,
            ) => Some((
                TlsFailure::Handshake,
                format!("the server refused the TLS handshake: {t}"),
            )),
            _ => None,
        })
}

/// `e` and its causes, outermost first. An I/O error hides the error it wraps from
/// `source()` (and the TLS connector wraps the handshake's I/O error in another), so the
/// walk looks inside I/O errors.
fn causes<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(e), |err| {
        match err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => err.source(),
        }
    })
}

/// Whether the server's answer was not HTTP at all (hyper could not parse it): another
/// protocol on that port, such as TLS on a port given with `http://`.
fn not_http(e: &(dyn std::error::Error + 'static)) -> bool {
    causes(e).any(|c| {
        c.downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_parse)
    })
}

fn preview(bytes: &[u8]) -> &[u8] {
    &bytes[..bytes.len().min(200)]
}

fn json_bytes<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, ClientError> {
    serde_json::to_vec(value)
        .map_err(|e| ClientError::InvalidInput(format!("cannot encode the request body: {e}")))
}

/// An id as a path segment. The server's id rule (`[A-Za-z0-9._:@-]`) needs no escaping; an
/// id outside it is refused here with the server's wording rather than sent mangled.
fn encode_id(id: &str) -> Result<&str, ClientError> {
    crate::ids::validate_id("task_id", id)
        .map(|()| id)
        .map_err(|e| ClientError::InvalidInput(e.to_string()))
}

fn queue_path(task_id: &str) -> Result<String, ClientError> {
    Ok(format!("/events/queues/{}", encode_id(task_id)?))
}

fn events_path(task_id: &str) -> Result<String, ClientError> {
    Ok(format!("{}/events", queue_path(task_id)?))
}

/// Turns an error status into [`ClientError::Api`] with the server's `detail`.
async fn check(resp: Response) -> Result<Response, ClientError> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    // The body of an error answer is best effort: a failure to read it leaves the status.
    let bytes = resp.bytes().await.unwrap_or_default();
    #[derive(Deserialize)]
    struct Detail {
        detail: Value,
    }
    let detail = match serde_json::from_slice::<Detail>(&bytes) {
        Ok(Detail {
            detail: Value::String(s),
        }) => s,
        Ok(Detail { detail }) => detail.to_string(),
        Err(_) => String::from_utf8_lossy(preview(&bytes)).trim().to_string(),
    };
    Err(ClientError::Api {
        status: status.as_u16(),
        detail,
    })
}

// ---------------------------------------------------------------------------------------------
// Subscriptions
// ---------------------------------------------------------------------------------------------

/// When and how often a [`Subscription`] reconnects.
#[derive(Debug, Clone, PartialEq)]
pub struct ReconnectPolicy {
    /// Wait before the first retry; doubled after each failed attempt. Default: 250 ms.
    pub initial_delay: Duration,
    /// Longest wait between attempts. Default: 10 s.
    pub max_delay: Duration,
    /// Failed attempts in a row after which the subscription gives up with the last error;
    /// `None` retries forever. A successful connection resets the count. Default: `None`.
    pub max_attempts: Option<u32>,
}

impl Default for ReconnectPolicy {
    fn default() -> Self {
        Self {
            initial_delay: Duration::from_millis(250),
            max_delay: Duration::from_secs(10),
            max_attempts: None,
        }
    }
}

impl ReconnectPolicy {
    /// Never reconnect: the first connection failure is returned as an error.
    pub fn never() -> Self {
        Self {
            max_attempts: Some(0),
            ..Self::default()
        }
    }

    /// The wait before retry number `attempt` (1-based).
    pub fn delay(&self, attempt: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempt.saturating_sub(1).min(16));
        self.initial_delay
            .saturating_mul(factor)
            .min(self.max_delay.max(self.initial_delay))
    }
}

/// Options of [`Client::subscribe`].
#[derive(Debug, Clone, PartialEq)]
pub struct SubscribeOptions {
    /// The stream route to read. Default: [`Route::Workflow`].
    pub route: Route,
    /// The first offset wanted (inclusive). Default: 0.
    pub from_offset: u64,
    /// Reconnection after a dropped connection.
    pub reconnect: ReconnectPolicy,
    /// A connection on which nothing (not even a keepalive comment) arrives for this long is
    /// considered dead and reconnected. Keep it above the server's keepalive interval
    /// (default 15 s). Default: 45 s.
    pub idle_timeout: Duration,
}

impl Default for SubscribeOptions {
    fn default() -> Self {
        Self {
            route: Route::Workflow,
            from_offset: 0,
            reconnect: ReconnectPolicy::default(),
            idle_timeout: Duration::from_secs(45),
        }
    }
}

/// The `connected` frame: the first frame of every (re)connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Connected {
    /// Task id.
    pub task_id: String,
    /// Tenant id.
    pub tenant_id: String,
    /// The first offset this connection will send.
    pub offset: u64,
    /// The queue's latest offset when the stream opened.
    pub latest_offset: u64,
}

/// One event of a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamEvent {
    /// The event's offset (the frame's `id:`).
    pub offset: u64,
    /// The event's type (the frame's `event:`): `status`, `progress`, `artifact`, `error` or
    /// `complete`.
    pub event_type: String,
    /// The event's JSON exactly as the server stored it (the frame's `data:`).
    pub data: String,
}

impl StreamEvent {
    /// The event's JSON, parsed.
    ///
    /// # Errors
    ///
    /// [`ClientError::Decode`] if the data is not JSON.
    pub fn json(&self) -> Result<Value, ClientError> {
        serde_json::from_str(&self.data)
            .map_err(|e| ClientError::Decode(format!("event {} is not JSON: {e}", self.offset)))
    }

    /// Whether this event finishes its task: `complete`, an `error` with
    /// `recoverable: false`, or a `status` with state `failed` or `cancelled`.
    pub fn is_terminal(&self) -> bool {
        match self.event_type.as_str() {
            "complete" => true,
            "error" | "status" => self.json().is_ok_and(|v| is_terminal_json(&v)),
            _ => false,
        }
    }
}

/// Whether an event's JSON is a terminal event (see [`StreamEvent::is_terminal`]).
pub fn is_terminal_json(event: &Value) -> bool {
    match event.get("event_type").and_then(Value::as_str) {
        Some("complete") => true,
        Some("error") => event.get("recoverable").and_then(Value::as_bool) == Some(false),
        Some("status") => matches!(
            event.get("state").and_then(Value::as_str),
            Some("failed" | "cancelled")
        ),
        _ => false,
    }
}

/// Why a subscription ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndReason {
    /// The terminal event at this offset was delivered.
    Finished {
        /// The terminal event's offset.
        offset: u64,
    },
    /// The resume point lies past the task's terminal event (the server answered
    /// `204 No Content`): the task finished before the first offset asked for.
    AlreadyFinished,
    /// The queue was closed and every event was delivered.
    Closed,
    /// The queue no longer exists (deleted or expired) after the subscription started.
    QueueGone,
}

/// What a [`Subscription`] yields.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum StreamItem {
    /// A connection was opened (first, and after each reconnection).
    Connected(Connected),
    /// An event, in offset order, never twice.
    Event(StreamEvent),
    /// Events below `first_available_offset` were dropped by retention before they could be
    /// delivered.
    Gap {
        /// The offset asked for.
        requested_offset: u64,
        /// Where the stream continues.
        first_available_offset: u64,
    },
    /// The connection dropped or could not be opened; the subscription waits `delay` and
    /// tries again (attempt `attempt`, 1-based), resuming at `resume_from`.
    Reconnecting {
        /// Attempt number since the last successful connection.
        attempt: u32,
        /// Wait before the attempt.
        delay: Duration,
        /// Why the previous connection ended.
        error: String,
        /// The offset the next connection starts at.
        resume_from: u64,
    },
    /// A reconnection succeeded; the stream continues at `resume_from`.
    Reconnected {
        /// The offset the stream continues at.
        resume_from: u64,
    },
    /// The stream is over; [`Subscription::next`] returns `None` from now on.
    End(EndReason),
}

enum SubState {
    /// Not connected; the next step connects (after `delay`, if any).
    Idle,
    Waiting(Duration),
    Open(Box<OpenStream>),
    Done,
}

struct OpenStream {
    body: futures_util::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buf: BytesMut,
    frame: Frame,
}

#[derive(Default)]
struct Frame {
    id: Option<String>,
    event: Option<String>,
    data: Option<String>,
}

/// A live SSE subscription; see the [module docs](self#subscriptions-and-reconnection).
pub struct Subscription {
    client: Client,
    task_id: String,
    options: SubscribeOptions,
    /// The resume point: the next offset wanted.
    next_offset: u64,
    /// Whether `next_offset` came from the stream or the caller (else: start at 0).
    have_resume_point: bool,
    state: SubState,
    /// Failed attempts in a row.
    attempt: u32,
    /// Whether the current connection attempt is a reconnection.
    reconnecting: bool,
    /// The end to report after the terminal event was yielded.
    pending_end: Option<EndReason>,
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("task_id", &self.task_id)
            .field("next_offset", &self.next_offset)
            .finish_non_exhaustive()
    }
}

/// What reading a connection produced.
enum Read {
    Item(StreamItem),
    /// The body ended cleanly.
    Eof,
    /// The connection failed.
    Failed(String),
}

impl Subscription {
    /// The offset the stream would resume at: one past the last delivered event (or where a
    /// gap notice said the stream continues).
    pub fn resume_offset(&self) -> u64 {
        self.next_offset
    }

    /// The task id subscribed to.
    pub fn task_id(&self) -> &str {
        &self.task_id
    }

    /// The subscription as a [`Stream`](futures_util::Stream) of what
    /// [`Subscription::next`] yields.
    pub fn into_stream(
        self,
    ) -> impl futures_util::Stream<Item = Result<StreamItem, ClientError>> + Send + 'static {
        futures_util::stream::unfold(self, |mut sub| async move {
            sub.next().await.map(|item| (item, sub))
        })
    }

    /// The next item, or `None` after [`StreamItem::End`] or an error.
    ///
    /// # Errors
    ///
    /// - [`ClientError::Api`] with `404` when the queue does not exist at the first
    ///   connection (a queue that disappears later ends the stream with
    ///   [`EndReason::QueueGone`]);
    /// - any other answer that retrying cannot change (`400`, `401`, `403`);
    /// - the last connection error once [`ReconnectPolicy::max_attempts`] is exhausted.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe while waiting for data: no event is lost if the future is dropped before
    /// it completes (a partly read frame stays buffered).
    pub async fn next(&mut self) -> Option<Result<StreamItem, ClientError>> {
        loop {
            match &mut self.state {
                SubState::Done => {
                    return self.pending_end.take().map(|r| Ok(StreamItem::End(r)));
                }
                SubState::Waiting(delay) => {
                    tokio::time::sleep(*delay).await;
                    self.state = SubState::Idle;
                }
                SubState::Idle => {
                    let connected = match self.connect_request() {
                        Ok(req) => open_stream(&self.client, req).await,
                        Err(e) => Err(e),
                    };
                    match connected {
                        Ok(Some(open)) => {
                            self.state = SubState::Open(Box::new(open));
                            if self.reconnecting {
                                self.reconnecting = false;
                                return Some(Ok(StreamItem::Reconnected {
                                    resume_from: self.next_offset,
                                }));
                            }
                        }
                        Ok(None) => {
                            self.state = SubState::Done;
                            return Some(Ok(StreamItem::End(EndReason::AlreadyFinished)));
                        }
                        Err(e) if e.is_not_found() && self.reconnecting => {
                            self.state = SubState::Done;
                            return Some(Ok(StreamItem::End(EndReason::QueueGone)));
                        }
                        Err(e) if e.is_retryable() => {
                            let reason = match e {
                                // The URL is the subscription's own: the cause is what matters.
                                ClientError::Transport { reason, .. } => reason,
                                e => e.to_string(),
                            };
                            return Some(self.schedule_retry(reason));
                        }
                        Err(e) => {
                            self.state = SubState::Done;
                            return Some(Err(e));
                        }
                    }
                }
                SubState::Open(open) => {
                    let read = tokio::time::timeout(self.options.idle_timeout, open.read())
                        .await
                        .unwrap_or_else(|_| {
                            Read::Failed(format!(
                                "nothing received for {:?}",
                                self.options.idle_timeout
                            ))
                        });
                    match read {
                        Read::Item(item) => {
                            if let Some(item) = self.accept(item) {
                                return Some(Ok(item));
                            }
                        }
                        Read::Failed(reason) => {
                            self.state = SubState::Idle;
                            return Some(self.schedule_retry(reason));
                        }
                        Read::Eof => {
                            self.state = SubState::Idle;
                            match ended_without_terminal(
                                &self.client,
                                &self.task_id,
                                self.next_offset,
                            )
                            .await
                            {
                                Ok(Some(reason)) => {
                                    self.state = SubState::Done;
                                    return Some(Ok(StreamItem::End(reason)));
                                }
                                Ok(None) => {
                                    let reason = "the server ended the stream".to_string();
                                    return Some(self.schedule_retry(reason));
                                }
                                Err(e) if e.is_retryable() => {
                                    let reason = "the server ended the stream".to_string();
                                    return Some(self.schedule_retry(reason));
                                }
                                Err(e) => {
                                    self.state = SubState::Done;
                                    return Some(Err(e));
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// Tracks the resume point and drops duplicates; `None` when the item is swallowed.
    fn accept(&mut self, item: StreamItem) -> Option<StreamItem> {
        match item {
            StreamItem::Event(ev) => {
                if self.have_resume_point && ev.offset < self.next_offset {
                    return None; // already delivered
                }
                self.next_offset = ev.offset + 1;
                self.have_resume_point = true;
                if ev.is_terminal() {
                    // Everything after this is Done; the event itself is yielded first.
                    self.state = SubState::Done;
                    self.pending_end = Some(EndReason::Finished { offset: ev.offset });
                }
                Some(StreamItem::Event(ev))
            }
            StreamItem::Gap {
                requested_offset,
                first_available_offset,
            } => {
                if first_available_offset > self.next_offset || !self.have_resume_point {
                    self.next_offset = first_available_offset;
                    self.have_resume_point = true;
                }
                Some(StreamItem::Gap {
                    requested_offset,
                    first_available_offset,
                })
            }
            StreamItem::Connected(c) => {
                self.attempt = 0;
                Some(StreamItem::Connected(c))
            }
            other => Some(other),
        }
    }

    /// Sets up the next attempt and returns its `Reconnecting` item, or the final error when
    /// attempts are exhausted.
    fn schedule_retry(&mut self, error: String) -> Result<StreamItem, ClientError> {
        self.attempt = self.attempt.saturating_add(1);
        if let Some(max) = self.options.reconnect.max_attempts
            && self.attempt > max
        {
            self.state = SubState::Done;
            return Err(ClientError::Transport {
                url: self.client.base.clone(),
                reason: error,
            });
        }
        let delay = self.options.reconnect.delay(self.attempt);
        self.state = SubState::Waiting(delay);
        self.reconnecting = true;
        Ok(StreamItem::Reconnecting {
            attempt: self.attempt,
            delay,
            error,
            resume_from: self.next_offset,
        })
    }

    /// The request that opens a connection at the resume point. (Built without awaiting, so
    /// that `next` borrows only the [`Client`] across awaits and its future is `Send`.)
    fn connect_request(&self) -> Result<RequestBuilder, ClientError> {
        let path = format!(
            "{}{}",
            self.options.route.prefix(),
            encode_id(&self.task_id)?
        );
        let resume = self.have_resume_point && self.next_offset > 0;
        let from = self.next_offset.to_string();
        let query: &[(&str, &str)] = if resume {
            &[]
        } else {
            &[("from_offset", &from)]
        };
        let mut req = self
            .client
            .request_with(Method::GET, &path, query)
            .header(reqwest::header::ACCEPT, "text/event-stream");
        if resume {
            req = req.header("Last-Event-ID", (self.next_offset - 1).to_string());
        }
        Ok(req)
    }
}

/// After a clean end without a terminal event: is the stream over for good?
async fn ended_without_terminal(
    client: &Client,
    task_id: &str,
    next_offset: u64,
) -> Result<Option<EndReason>, ClientError> {
    match client.queue_info(task_id).await {
        Ok(info) if info.is_closed && next_offset >= info.latest_offset => {
            Ok(Some(EndReason::Closed))
        }
        Ok(_) => Ok(None),
        Err(e) if e.is_not_found() => Ok(Some(EndReason::QueueGone)),
        Err(e) => Err(e),
    }
}

/// Sends a stream request; `None` for `204 No Content`.
async fn open_stream(
    client: &Client,
    req: RequestBuilder,
) -> Result<Option<OpenStream>, ClientError> {
    // A stream has no overall time limit; only the response head has one.
    let resp = tokio::time::timeout(client.timeout, client.send(req))
        .await
        .map_err(|_| ClientError::Transport {
            url: client.base.clone(),
            reason: format!("no answer within {:?}", client.timeout),
        })??;
    if resp.status() == StatusCode::NO_CONTENT {
        return Ok(None);
    }
    let resp = check(resp).await?;
    if !is_event_stream(resp.headers()) {
        return Err(ClientError::Decode(
            "the stream route did not answer with text/event-stream".into(),
        ));
    }
    Ok(Some(OpenStream {
        body: resp.bytes_stream().boxed(),
        buf: BytesMut::new(),
        frame: Frame::default(),
    }))
}

/// Longest SSE line accepted (an event's JSON is at most 1 MiB by default on the server); a
/// longer one means the peer is not an eventqueue server, and memory must stay bounded.
const MAX_LINE_BYTES: usize = 64 << 20;

fn is_event_stream(headers: &HeaderMap<HeaderValue>) -> bool {
    headers
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"))
}

impl OpenStream {
    /// Reads until one item is complete, the body ends, or it fails.
    async fn read(&mut self) -> Read {
        loop {
            while let Some(line) = self.take_line() {
                match self.frame.feed(&line) {
                    Ok(Some(item)) => return Read::Item(item),
                    Ok(None) => {}
                    Err(reason) => return Read::Failed(reason),
                }
            }
            if self.buf.len() > MAX_LINE_BYTES {
                return Read::Failed(format!(
                    "the server sent a line longer than {MAX_LINE_BYTES} bytes"
                ));
            }
            match self.body.next().await {
                Some(Ok(chunk)) => self.buf.extend_from_slice(&chunk),
                Some(Err(e)) => return Read::Failed(error_chain(&e)),
                None => return Read::Eof,
            }
        }
    }

    /// One line without its terminator (`\n`, `\r\n` or `\r`... the server sends `\n`).
    fn take_line(&mut self) -> Option<String> {
        let end = self.buf.iter().position(|&b| b == b'\n')?;
        let mut line = self.buf.split_to(end + 1);
        line.truncate(end);
        if line.last() == Some(&b'\r') {
            line.truncate(end - 1);
        }
        let text = String::from_utf8_lossy(line.chunk()).into_owned();
        Some(text)
    }
}

impl Frame {
    /// Feeds one line; a blank line completes a frame.
    fn feed(&mut self, line: &str) -> Result<Option<StreamItem>, String> {
        if line.is_empty() {
            let frame = std::mem::take(self);
            return frame.dispatch();
        }
        if line.starts_with(':') {
            return Ok(None); // comment (keepalive)
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "id" => self.id = Some(value.to_string()),
            "event" => self.event = Some(value.to_string()),
            "data" => match &mut self.data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => self.data = Some(value.to_string()),
            },
            _ => {} // unknown fields are ignored, as EventSource does
        }
        Ok(None)
    }

    fn dispatch(self) -> Result<Option<StreamItem>, String> {
        let Some(data) = self.data else {
            return Ok(None);
        };
        match self.event.as_deref() {
            Some("connected") => {
                let c: Connected = serde_json::from_str(&data)
                    .map_err(|e| format!("malformed connected frame: {e}"))?;
                Ok(Some(StreamItem::Connected(c)))
            }
            Some("gap") => {
                #[derive(Deserialize)]
                struct Gap {
                    requested_offset: u64,
                    first_available_offset: u64,
                }
                let g: Gap =
                    serde_json::from_str(&data).map_err(|e| format!("malformed gap frame: {e}"))?;
                Ok(Some(StreamItem::Gap {
                    requested_offset: g.requested_offset,
                    first_available_offset: g.first_available_offset,
                }))
            }
            event => {
                let offset = match self.id.as_deref().map(str::parse::<u64>) {
                    Some(Ok(n)) => n,
                    _ => return Err(format!("event frame without a numeric id: {:?}", self.id)),
                };
                Ok(Some(StreamItem::Event(StreamEvent {
                    offset,
                    event_type: event.unwrap_or("message").to_string(),
                    data,
                })))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Vec<StreamItem> {
        let mut frame = Frame::default();
        text.split('\n')
            .filter_map(|l| frame.feed(l).unwrap())
            .collect()
    }

    #[test]
    fn frames_are_parsed_and_keepalives_skipped() {
        let items = parse(
            "event: connected\ndata: {\"type\":\"connected\",\"task_id\":\"t\",\"tenant_id\":\"d\",\"offset\":0,\"latest_offset\":2,\"timestamp\":\"x\"}\n\n\
             : keepalive\n\n\
             id: 0\nevent: status\ndata: {\"event_type\":\"status\",\"state\":\"working\"}\n\n\
             event: gap\ndata: {\"type\":\"gap\",\"requested_offset\":1,\"first_available_offset\":5}\n\n",
        );
        assert_eq!(items.len(), 3, "{items:?}");
        assert!(matches!(&items[0], StreamItem::Connected(c) if c.latest_offset == 2));
        assert!(
            matches!(&items[1], StreamItem::Event(e) if e.offset == 0 && e.event_type == "status" && !e.is_terminal())
        );
        assert!(matches!(
            items[2],
            StreamItem::Gap {
                requested_offset: 1,
                first_available_offset: 5
            }
        ));
    }

    #[test]
    fn terminal_rule_matches_the_contract() {
        let cases = [
            (r#"{"event_type":"complete","result":{}}"#, true),
            (r#"{"event_type":"error","recoverable":false}"#, true),
            (r#"{"event_type":"error","recoverable":true}"#, false),
            (r#"{"event_type":"status","state":"failed"}"#, true),
            (r#"{"event_type":"status","state":"cancelled"}"#, true),
            (r#"{"event_type":"status","state":"completed"}"#, false),
            (r#"{"event_type":"progress","current":1,"total":2}"#, false),
        ];
        for (json, terminal) in cases {
            let v: Value = serde_json::from_str(json).unwrap();
            assert_eq!(is_terminal_json(&v), terminal, "{json}");
        }
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let p = ReconnectPolicy {
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(500),
            max_attempts: None,
        };
        let delays: Vec<_> = (1..=5).map(|a| p.delay(a).as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 500, 500]);
    }

    #[test]
    fn subscriptions_can_be_read_on_spawned_tasks() {
        fn send<T: Send>(_: &T) {}
        let client = Client::new("http://127.0.0.1:1").unwrap();
        let mut sub = client.subscribe("t", SubscribeOptions::default());
        send(&sub.next());
        send(&sub.into_stream());
    }

    #[test]
    fn bad_ca_certificates_are_refused_when_the_client_is_built() {
        for pem in [
            &b""[..],
            b"not a certificate",
            b"-----BEGIN CERTIFICATE-----\nAAAA\n",
        ] {
            let err = Client::builder("https://127.0.0.1:1")
                .ca_cert_pem(pem)
                .build()
                .unwrap_err();
            assert!(matches!(err, ClientError::InvalidCaCert(_)), "{err:?}");
            assert!(!err.is_retryable());
        }
    }

    #[test]
    fn rejected_certificates_are_not_retried_but_resets_are() {
        use rustls::{CertificateError, Error as T};
        let io = |e: T| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
        // As the TLS connector reports it: an I/O error around the handshake's I/O error.
        let rejected =
            std::io::Error::other(io(T::InvalidCertificate(CertificateError::UnknownIssuer)));
        assert!(matches!(
            tls_failure(&rejected),
            Some((TlsFailure::Certificate, r)) if r.contains("UnknownIssuer")
        ));
        let plain = io(T::InvalidMessage(
            rustls::InvalidMessage::InvalidContentType,
        ));
        assert!(matches!(
            tls_failure(&plain),
            Some((TlsFailure::NotTls, r)) if r.contains("plain HTTP")
        ));
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert_eq!(tls_failure(&reset), None);
        let closed = io(T::AlertReceived(rustls::AlertDescription::CloseNotify));
        assert_eq!(tls_failure(&closed), None);
    }

    #[test]
    fn bad_urls_and_ids_are_refused() {
        assert!(Client::new("ftp://x").is_err());
        assert!(Client::new("not a url").is_err());
        let c = Client::new("http://127.0.0.1:1/").unwrap();
        assert_eq!(c.base_url(), "http://127.0.0.1:1");
        assert!(matches!(
            queue_path("a/b"),
            Err(ClientError::InvalidInput(_))
        ));
    }
}
