//! The HTTP server (axum): SSE streams, producer endpoints, queue administration, health and
//! metrics. The routes, frames and status codes are the contract's "HTTP API" section.
//!
//! [`router`] builds the whole API over an [`AppState`] without touching a socket (tests drive it
//! with `tower::ServiceExt::oneshot`); [`serve`] runs it on a listener until a shutdown future
//! resolves, then shuts down gracefully:
//!
//! 1. stop accepting connections;
//! 2. end every SSE stream (they select on the state's shutdown token);
//! 3. let in-flight requests — enqueues included — finish, for at most
//!    [`ServerConfig::shutdown_grace`];
//! 4. shut the [`QueueManager`] down (commit, fsync, stop the writer).
//!
//! Who may do what is [`ServerConfig::auth`] (open or token mode, see [`auth`]); the limits
//! that protect the node (streams, queues, body and header read timeouts, JSON depth) are
//! fields of [`ServerConfig`] too. Connections are served over HTTP/1.1; a client that does
//! not send its request head within [`ServerConfig::header_read_timeout`] is disconnected,
//! which also closes idle keep-alive connections. With [`ServerConfig::tls`] set, connections
//! are HTTPS, over HTTP/2 or HTTP/1.1 as the client chooses by ALPN (see [`TlsConfig`]).
//!
//! ```no_run
//! use eventqueue::server::{self, AppState, ServerConfig};
//! use eventqueue::{Config, QueueManager};
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let manager = QueueManager::open(Config::new("./data")).await?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8000").await?;
//! let state = AppState::new(manager, ServerConfig::default());
//! server::serve(state, listener, async {
//!     let _ = tokio::signal::ctrl_c().await;
//! })
//! .await?;
//! # Ok(())
//! # }
//! ```

pub mod a2a;
pub mod auth;
mod conn;
mod dashboard;
mod durable_streams;
mod error;
mod limits;
mod metrics;
mod revoke;
mod routes;
mod sse;
mod stream;
mod tenant;
mod tls;
mod ws;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request};
use axum::http::{HeaderName, HeaderValue, Method, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::config::StorageBackend;
use crate::manager::QueueManager;

pub use a2a::A2aConfig;
pub use auth::{Auth, OpenBind, Scopes, TokenKeys};
pub use conn::{open_file_limit, raise_open_file_limit};
pub use error::ApiError;
pub use limits::RETRY_AFTER_SECS;
#[doc(hidden)]
pub use routes::enqueue_body_json;
pub use tenant::{ACCESS_TOKEN_PARAM, Caller, Need, Reach, TENANT_HEADER, Tenant};
pub use tls::{TlsConfig, TlsError};

/// Settings of the HTTP layer (the store's settings are [`crate::Config`]).
///
/// Construct with [`ServerConfig::default`] and assign the fields to change.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ServerConfig {
    /// Interval of `: keepalive` comments on idle SSE streams. Default 15 s.
    pub keepalive: Duration,
    /// Largest accepted request body; larger ones get `413` before being read whole.
    /// Default 2 MiB.
    pub max_body_bytes: usize,
    /// Largest accepted JSON of one event (compact form); larger ones get `413`. Default 1 MiB.
    pub max_event_bytes: usize,
    /// Most events in one enqueue request; more get `413`. Default 1000.
    pub max_batch_events: usize,
    /// Period of the manager's cleanup loop that [`serve`] starts; `None` starts none.
    /// Default 60 s.
    pub cleanup_interval: Option<Duration>,
    /// After shutdown begins, how long [`serve`] waits for in-flight requests before shutting
    /// the manager down regardless. Default 3 s.
    pub shutdown_grace: Duration,
    /// Open mode or token mode. Default: open mode, loopback only.
    pub auth: Auth,
    /// Origins allowed to call the API from a browser (CORS), e.g.
    /// `https://dashboard.example.com`; `*` allows any. Default: none (no CORS headers).
    pub cors_origins: Vec<HeaderValue>,
    /// Most SSE streams open at once on the server; more get `429`. Default 10 000.
    pub max_sse_streams: usize,
    /// Most SSE streams open at once for one tenant; more get `429`. Default 1000.
    pub max_sse_streams_per_tenant: usize,
    /// Bytes all streams together may hold beyond each stream's own 64 KiB until their
    /// clients took them: events larger than 32 KiB, and larger replay steps lent to streams
    /// while the budget has room. A stream that would need more for an event waits, holding
    /// nothing, until streams that drain give bytes back (see `server::stream`'s `# Memory`).
    /// Bounds what streams that stop reading can make the server hold. `0`: no budget (no
    /// bound, and no larger steps). Default 64 MiB.
    pub stream_buffer_bytes: usize,
    /// Most queues one tenant may have (closed ones included, until they expire or are
    /// deleted); creating more gets `429`. Default 10 000.
    pub max_queues_per_tenant: usize,
    /// Longest wait for a request head (and, on a keep-alive connection, for the next one);
    /// then the connection is closed. Applies to [`serve`]. Default 10 s.
    pub header_read_timeout: Duration,
    /// Longest wait for a whole request body; then `408`. Default 30 s.
    pub body_read_timeout: Duration,
    /// Deepest nesting of arrays and objects accepted in a JSON body; deeper gets `400`.
    /// Default 64.
    pub max_json_depth: usize,
    /// The A2A agent card's name, description, version and public URL (see [`a2a`]).
    pub a2a: A2aConfig,
    /// Most frames a WebSocket producer connection may have sent and not yet had
    /// acknowledged; beyond it the server stops reading that connection until it has answered
    /// (back-pressure; also at four request bodies' worth of bytes). Default 256.
    pub max_ws_in_flight: usize,
    /// Serve HTTPS with this certificate and key (HTTP/2 and HTTP/1.1 by ALPN) instead of
    /// plain HTTP. Applies to [`serve`]; the TLS handshake must finish within
    /// [`ServerConfig::header_read_timeout`]. Default: none (plain HTTP).
    pub tls: Option<TlsConfig>,
    /// Most connections [`serve`] holds at once; one more is answered `503` and closed (over
    /// TLS: closed). Lowered at start when the open-file limit would run out first. Default
    /// 16 384.
    pub max_connections: usize,
    /// Most connections from one client address (IPv6: one /64) at once; more are refused as
    /// over [`ServerConfig::max_connections`]. Behind a reverse proxy every connection comes
    /// from the proxy's address. Default 1024.
    pub max_connections_per_ip: usize,
    /// Most bytes of request bodies being received at once, server-wide: a body reserves its
    /// declared `Content-Length` (or [`ServerConfig::max_body_bytes`] when it declares none)
    /// while it is read; one that does not fit gets `503` at once. WebSocket producer frames
    /// count against the same budget from when they are read until they are answered; a frame
    /// that does not fit is answered `503` (nothing stored). Default 128 MiB.
    pub max_body_bytes_in_flight: usize,
    /// Longest lifetime of an accepted token: `exp − iat` (or `exp − now` when it has no
    /// `iat`); longer ones get `401`. Default 30 days.
    pub max_token_ttl: Duration,
    /// How often [`serve`] reloads token revocations from the store, so a revocation made
    /// through another node holds here within this interval. Default 1 s.
    pub revocation_refresh: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            keepalive: Duration::from_secs(15),
            max_body_bytes: 2 << 20,
            max_event_bytes: 1 << 20,
            max_batch_events: 1000,
            cleanup_interval: Some(Duration::from_secs(60)),
            shutdown_grace: Duration::from_secs(3),
            auth: Auth::default(),
            cors_origins: Vec::new(),
            max_sse_streams: 10_000,
            max_sse_streams_per_tenant: 1000,
            stream_buffer_bytes: 64 << 20,
            max_queues_per_tenant: 10_000,
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            max_json_depth: 64,
            a2a: A2aConfig::default(),
            max_ws_in_flight: 256,
            tls: None,
            max_connections: 16_384,
            max_connections_per_ip: 1024,
            max_body_bytes_in_flight: 128 << 20,
            max_token_ttl: Duration::from_secs(30 * 86_400),
            revocation_refresh: Duration::from_secs(1),
        }
    }
}

/// What every handler shares: the manager, the settings, and the shutdown token. Cheap to
/// clone.
#[derive(Clone, Debug)]
pub struct AppState {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    manager: QueueManager,
    config: ServerConfig,
    shutdown: CancellationToken,
    limits: limits::Limits,
    /// Room for request bodies being received and WebSocket frames being committed
    /// ([`ServerConfig::max_body_bytes_in_flight`]).
    bodies: limits::BodyBudget,
    /// Each tenant's token not-before time, as last loaded from the store.
    revocations: auth::Revocations,
    /// [`ServerConfig::stream_buffer_bytes`], in permits of one byte.
    stream_budget: Arc<tokio::sync::Semaphore>,
}

impl AppState {
    /// State serving `manager` with `config`.
    pub fn new(manager: QueueManager, config: ServerConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                manager,
                bodies: limits::BodyBudget::new(config.max_body_bytes_in_flight),
                stream_budget: Arc::new(tokio::sync::Semaphore::new(
                    config
                        .stream_buffer_bytes
                        .min(tokio::sync::Semaphore::MAX_PERMITS),
                )),
                config,
                shutdown: CancellationToken::new(),
                limits: limits::Limits::default(),
                revocations: auth::Revocations::default(),
            }),
        }
    }

    /// The queue manager.
    pub fn manager(&self) -> &QueueManager {
        &self.inner.manager
    }

    /// The HTTP settings.
    pub fn config(&self) -> &ServerConfig {
        &self.inner.config
    }

    /// The token whose cancellation ends every SSE stream and makes new requests for streams
    /// answer `503`. [`serve`] cancels it when its shutdown future resolves.
    pub fn shutdown_token(&self) -> &CancellationToken {
        &self.inner.shutdown
    }

    /// SSE streams currently open.
    pub fn open_streams(&self) -> u64 {
        self.inner.limits.open_streams() as u64
    }

    fn limits(&self) -> &limits::Limits {
        &self.inner.limits
    }

    fn bodies(&self) -> &limits::BodyBudget {
        &self.inner.bodies
    }

    fn revocations(&self) -> &auth::Revocations {
        &self.inner.revocations
    }

    /// Reloads token revocations from the store (see [`ServerConfig::revocation_refresh`]).
    ///
    /// # Errors
    ///
    /// The storage error; the revocations known before stay in force.
    pub async fn refresh_revocations(&self) -> crate::Result<()> {
        let _loading = self.revocations().loading.lock().await;
        let all = self.manager().token_revocations().await?;
        self.revocations().replace(all);
        Ok(())
    }

    /// The server-wide budget of stream buffers (see `stream::budgeted`).
    fn stream_budget(&self) -> &Arc<tokio::sync::Semaphore> {
        &self.inner.stream_budget
    }

    /// Bytes of [`ServerConfig::stream_buffer_bytes`] that streams hold right now.
    pub fn stream_buffer_bytes_held(&self) -> u64 {
        let total = self
            .config()
            .stream_buffer_bytes
            .min(tokio::sync::Semaphore::MAX_PERMITS);
        total.saturating_sub(self.inner.stream_budget.available_permits()) as u64
    }
}

/// The whole HTTP API over `state`, with the body limit, CORS and request logging applied.
pub fn router(state: AppState) -> Router {
    let max_body = state.config().max_body_bytes;
    let cors = cors_layer(&state.config().cors_origins);
    let router = Router::new()
        .route("/events/workflows/{id}", get(sse::workflow_stream))
        .route("/events/ingestion/{id}", get(sse::ingestion_stream))
        .route(
            "/events/workflows/{id}/cancel",
            post(routes::cancel_workflow),
        )
        .route(
            "/events/ingestion/{id}/cancel",
            post(routes::cancel_ingestion),
        )
        .route(
            "/events/workflows/{id}/checkpoints",
            post(routes::save_checkpoint).get(routes::list_checkpoints),
        )
        .route(
            "/events/workflows/{id}/checkpoints/latest",
            get(routes::latest_checkpoint),
        )
        .route(
            "/events/queues",
            get(routes::list_queues).post(routes::create_queue),
        )
        .route(
            "/events/queues/{task_id}",
            get(routes::queue_info).delete(routes::delete_queue),
        )
        .route("/events/queues/{task_id}/offset", get(routes::queue_offset))
        .route("/events/queues/{task_id}/events", post(routes::enqueue))
        .route("/events/queues/{task_id}/events/ws", get(ws::producer))
        .route("/events/queues/{task_id}/close", post(routes::close_queue))
        .route(
            "/events/admin/revocations",
            get(revoke::list).post(revoke::revoke),
        )
        .route("/healthz", get(routes::healthz))
        .route("/metrics", get(metrics::render))
        // The web dashboard's page and assets (no credentials: the page asks for them).
        .merge(dashboard::routes())
        .route("/.well-known/agent-card.json", get(a2a::agent_card))
        .route("/a2a", post(a2a::rpc))
        // The Durable Streams protocol under /v1/stream (docs/durable-streams.md).
        .merge(durable_streams::routes())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(state);
    // CORS outside everything else, so that errors (401, 429, …) carry its headers too and a
    // browser can read them; logging outermost.
    match cors {
        Some(cors) => router.layer(cors),
        None => router,
    }
    .layer(middleware::from_fn(log_request))
}

/// The CORS layer for `origins`, or none when no origin is allowed.
fn cors_layer(origins: &[HeaderValue]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().cloned())
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST, Method::DELETE])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                HeaderName::from_static("last-event-id"),
                HeaderName::from_static(TENANT_HEADER),
                HeaderName::from_static("a2a-version"),
            ])
            .expose_headers([header::RETRY_AFTER, header::WWW_AUTHENTICATE])
            .max_age(Duration::from_secs(600)),
    )
}

async fn not_found() -> ApiError {
    ApiError::not_found("Not Found")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        axum::http::StatusCode::METHOD_NOT_ALLOWED,
        "Method Not Allowed",
    )
}

/// One line per request at info: method, path, query string with credentials redacted
/// ([`redact_query`]), status and time to the response head. Bodies and headers are never
/// logged.
/// Logs each request: a success at `debug` (a line per request costs a busy server more than
/// the request itself), a client error at `info`, a server error at `warn`.
async fn log_request(req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let uri = req.uri().clone();
    let start = Instant::now();
    let response = next.run(req).await;
    let status = response.status();
    macro_rules! log {
        ($level:ident) => {
            tracing::$level!(
                %method,
                path = uri.path(),
                query = %uri.query().map(redact_query).unwrap_or_default(),
                status = status.as_u16(),
                micros = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX),
                "request"
            )
        };
    }
    if status.is_server_error() {
        log!(warn);
    } else if status.is_client_error() {
        log!(info);
    } else {
        log!(debug);
    }
    response
}

/// A query string fit for logs: the values of `from_offset` and `tenant_id` are kept, every
/// other value (`access_token` above all) is replaced by `REDACTED`.
pub fn redact_query(query: &str) -> String {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, _) = pair.split_once('=').unwrap_or((pair, ""));
            if key == "from_offset" || key == "tenant_id" {
                pair.to_string()
            } else {
                format!("{key}=REDACTED")
            }
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// Why [`serve`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// Open mode (no authentication) serves loopback addresses only.
    #[error(
        "open mode (no authentication) serves loopback only; bind to 127.0.0.1 or ::1, not {0} \
         (configure a JWT secret, or pass --insecure-open to accept the risk)"
    )]
    NotLoopback(std::net::SocketAddr),
    /// Accepting or serving connections failed.
    #[error("server I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// The final shutdown of the queue manager failed (its last sync).
    #[error("shutting down the store: {0}")]
    Store(#[from] crate::error::Error),
}

/// Checks that `auth` may serve on `addr`: open mode serves loopback only unless
/// [`OpenBind::AnyAddress`] was chosen.
///
/// # Errors
///
/// [`ServeError::NotLoopback`].
pub fn check_bind(auth: &Auth, addr: std::net::SocketAddr) -> Result<(), ServeError> {
    match auth {
        Auth::Open(OpenBind::LoopbackOnly) if !addr.ip().is_loopback() => {
            Err(ServeError::NotLoopback(addr))
        }
        _ => Ok(()),
    }
}

/// Serves the API on `listener` until `shutdown` resolves, then shuts down gracefully (see the
/// module docs) and returns once the manager is shut down. Starts the manager's cleanup loop
/// when [`ServerConfig::cleanup_interval`] is set.
///
/// # Errors
///
/// [`ServeError::NotLoopback`] when `listener` is bound to a non-loopback address in open mode
/// without [`OpenBind::AnyAddress`]; [`ServeError::Io`] when the listener has no address;
/// [`ServeError::Store`] when the manager's final sync fails.
pub async fn serve(
    state: AppState,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let addr = listener.local_addr()?;
    let config = state.config().clone();
    check_bind(&config.auth, addr)?;
    let manager = state.manager().clone();
    let scheme = if config.tls.is_some() {
        "https"
    } else {
        "http"
    };
    match &manager.config().storage {
        StorageBackend::Redb => tracing::info!(
            storage = "redb",
            data_dir = %manager.config().data_dir.display(),
            durability = ?manager.config().durability,
            "eventqueue listening on {scheme}://{addr}"
        ),
        StorageBackend::Redis { .. } => tracing::info!(
            storage = %manager.storage_description(),
            "eventqueue listening on {scheme}://{addr}"
        ),
        StorageBackend::Memory => {
            tracing::info!(
                storage = "memory",
                "eventqueue listening on {scheme}://{addr}"
            );
            tracing::warn!(
                "storage is memory: nothing survives a restart (use --storage redb or redis://… to keep events)"
            );
        }
    }
    match &config.auth {
        Auth::Token(_) => tracing::info!(
            "token mode: requests need an HS256 bearer token (Authorization: Bearer, or \
             ?access_token= for EventSource); the tenant comes from the token"
        ),
        Auth::Open(OpenBind::LoopbackOnly) => tracing::warn!(
            "OPEN MODE: no authentication; the tenant comes from X-Tenant-ID or ?tenant_id= \
             (default \"default\"); serving loopback only. Configure a JWT secret for \
             anything but local development"
        ),
        Auth::Open(OpenBind::AnyAddress) => tracing::warn!(
            "OPEN MODE ON {addr} (--insecure-open): NO AUTHENTICATION. Anyone who can reach \
             this port can read, write and delete every tenant's queues"
        ),
    }
    if !config.cors_origins.is_empty() {
        tracing::info!(origins = ?config.cors_origins, "CORS enabled");
    }
    if let Some(interval) = config.cleanup_interval {
        manager.start_cleanup_loop(interval);
    }
    let connections = Arc::new(conn::Connections::new(
        connection_limit(&config),
        config.max_connections_per_ip.max(1),
    ));
    let token = state.shutdown_token().clone();
    if config.auth.is_token_mode() {
        // Revocations hold from the first request on, then follow the store.
        if let Err(e) = state.refresh_revocations().await {
            tracing::error!(error = %e, "cannot load token revocations; retrying");
        }
        tokio::spawn(refresh_revocations(state.clone(), token.clone()));
    }
    let app = router(state);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout.max(Duration::from_millis(1)));
    let tls = config.tls.as_ref().map(|tls| {
        tls::TlsServe::new(
            tls,
            http.clone(),
            config.header_read_timeout.max(Duration::from_millis(1)),
        )
    });
    let graceful = GracefulShutdown::new();
    let trigger = async {
        tokio::select! {
            () = shutdown => {}
            () = token.cancelled() => {}
        }
    };
    let mut trigger = std::pin::pin!(trigger);
    loop {
        let accepted = tokio::select! {
            () = &mut trigger => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::error!(error = %e, "accept failed; retrying in 1 s");
                tokio::select! {
                    () = &mut trigger => break,
                    () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        let admitted = match connections.admit(peer.ip()) {
            Ok(admitted) => admitted,
            Err(why) => {
                tracing::debug!(%peer, reason = %why.detail(), "connection refused");
                if tls.is_none() {
                    connections.refuse(stream, &why);
                }
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        // The place goes with the requests: an upgraded connection keeps holding it.
        let service = conn::Placed::new(TowerToHyperService::new(app.clone()), admitted);
        if let Some(tls) = &tls {
            // The handshake runs on the connection's own task, never in this loop.
            let serve = tls
                .clone()
                .serve(stream, service, graceful.watcher(), token.clone());
            tokio::spawn(serve);
            continue;
        }
        let io = TokioIo::new(conn::HeadErrors::new(stream));
        let conn = http.serve_connection(io, service).with_upgrades();
        tokio::spawn(conn::serve_upgradeable(
            conn,
            graceful.watcher(),
            token.clone(),
        ));
    }
    drop(listener);
    tracing::info!("shutting down: closing streams, finishing in-flight requests");
    token.cancel();
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(config.shutdown_grace) => {
            tracing::warn!(
                grace = ?config.shutdown_grace,
                "requests still running after the grace period"
            );
        }
    }
    let stopped = manager.shutdown().await;
    tracing::info!("store shut down");
    stopped?;
    Ok(())
}

/// The connection limit [`serve`] applies: [`ServerConfig::max_connections`], lowered when
/// the process's open-file limit would run out first. Warns (one line) when that limit is
/// below the SSE stream limit plus a margin.
fn connection_limit(config: &ServerConfig) -> usize {
    let wanted = config.max_connections.max(1);
    let nofile = conn::open_file_limit();
    let capped = conn::capped_by_files(wanted, nofile);
    let streams_need = (config.max_sse_streams as u64).saturating_add(conn::FD_MARGIN);
    if let Some(limit) = nofile
        && (limit < streams_need || capped.is_some())
    {
        tracing::warn!(
            open_file_limit = limit,
            max_sse_streams = config.max_sse_streams,
            max_connections = capped.unwrap_or(wanted),
            "the open-file limit ({limit}) is below max_sse_streams + {} or max_connections; \
             connections are capped at {}; raise the hard limit (ulimit -Hn, systemd \
             LimitNOFILE=)",
            conn::FD_MARGIN,
            capped.unwrap_or(wanted)
        );
    }
    capped.unwrap_or(wanted)
}

/// Reloads token revocations every [`ServerConfig::revocation_refresh`] until `stop`.
async fn refresh_revocations(state: AppState, stop: CancellationToken) {
    let every = state
        .config()
        .revocation_refresh
        .max(Duration::from_millis(10));
    let mut failing = false;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        match state.refresh_revocations().await {
            Ok(()) if failing => {
                tracing::info!("token revocations reloaded again");
                failing = false;
            }
            Ok(()) => {}
            Err(e) if !failing => {
                tracing::error!(error = %e, "cannot reload token revocations; keeping the last ones");
                failing = true;
            }
            Err(_) => {}
        }
    }
}

/// Accept errors that concern one connection only (the peer went away before it was
/// accepted): the next accept is fine.
fn is_connection_error(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}

/// Renders a value as a `200 application/json` response.
fn json<T: serde::Serialize>(value: &T) -> Response {
    axum::Json(value).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_never_reach_the_log() {
        assert_eq!(
            redact_query("from_offset=3&access_token=eyJ.secret.sig&tenant_id=a"),
            "from_offset=3&access_token=REDACTED&tenant_id=a"
        );
        assert_eq!(redact_query("access%5Ftoken=x"), "access%5Ftoken=REDACTED");
        assert_eq!(redact_query("flag"), "flag=REDACTED");
    }

    #[test]
    fn open_mode_binds_loopback_unless_told_otherwise() {
        let public: std::net::SocketAddr = "0.0.0.0:8000".parse().unwrap();
        let local: std::net::SocketAddr = "127.0.0.1:8000".parse().unwrap();
        assert!(check_bind(&Auth::default(), public).is_err());
        assert!(check_bind(&Auth::default(), local).is_ok());
        assert!(check_bind(&Auth::Open(OpenBind::AnyAddress), public).is_ok());
        let keys = TokenKeys::from_secret(&[7; 32]).unwrap();
        assert!(check_bind(&Auth::Token(keys), public).is_ok());
    }
}
