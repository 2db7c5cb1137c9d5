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

mod error;
mod metrics;
mod routes;
mod sse;
mod tenant;

use std::future::{Future, IntoFuture};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::manager::QueueManager;

pub use error::ApiError;
pub use tenant::{TENANT_HEADER, Tenant};

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
    sse_streams: AtomicU64,
}

impl AppState {
    /// State serving `manager` with `config`.
    pub fn new(manager: QueueManager, config: ServerConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                manager,
                config,
                shutdown: CancellationToken::new(),
                sse_streams: AtomicU64::new(0),
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
        self.inner
            .sse_streams
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    fn sse_counter(&self) -> &AtomicU64 {
        &self.inner.sse_streams
    }
}

/// The whole HTTP API over `state`, with the body limit and request logging applied.
pub fn router(state: AppState) -> Router {
    let max_body = state.config().max_body_bytes;
    Router::new()
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
            "/events/queues",
            get(routes::list_queues).post(routes::create_queue),
        )
        .route(
            "/events/queues/{task_id}",
            get(routes::queue_info).delete(routes::delete_queue),
        )
        .route("/events/queues/{task_id}/offset", get(routes::queue_offset))
        .route("/events/queues/{task_id}/events", post(routes::enqueue))
        .route("/events/queues/{task_id}/close", post(routes::close_queue))
        .route("/healthz", get(routes::healthz))
        .route("/metrics", get(metrics::render))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body))
        .layer(middleware::from_fn(log_request))
        .with_state(state)
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

/// One line per request at info: method, path (no query string: it may carry credentials),
/// status and time to the response head. Bodies are never logged.
async fn log_request(req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let start = Instant::now();
    let response = next.run(req).await;
    tracing::info!(
        %method,
        %path,
        status = response.status().as_u16(),
        micros = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX),
        "request"
    );
    response
}

/// Why [`serve`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// Open mode (no authentication) serves loopback addresses only.
    #[error(
        "open mode (no authentication) serves loopback only; bind to 127.0.0.1 or ::1, not {0}"
    )]
    NotLoopback(std::net::SocketAddr),
    /// Accepting or serving connections failed.
    #[error("server I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// The final shutdown of the queue manager failed (its last sync).
    #[error("shutting down the store: {0}")]
    Store(#[from] crate::error::Error),
}

/// Serves the API on `listener` until `shutdown` resolves, then shuts down gracefully (see the
/// module docs) and returns once the manager is shut down. Starts the manager's cleanup loop
/// when [`ServerConfig::cleanup_interval`] is set.
///
/// # Errors
///
/// [`ServeError::NotLoopback`] when `listener` is bound to a non-loopback address (open mode);
/// [`ServeError::Io`] when serving fails; [`ServeError::Store`] when the manager's final sync
/// fails.
pub async fn serve(
    state: AppState,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let addr = listener.local_addr()?;
    if !addr.ip().is_loopback() {
        return Err(ServeError::NotLoopback(addr));
    }
    let manager = state.manager().clone();
    tracing::info!(
        data_dir = %manager.config().data_dir.display(),
        durability = ?manager.config().durability,
        "eventqueue listening on http://{addr}"
    );
    tracing::info!(
        "open mode: no authentication; the tenant comes from X-Tenant-ID or ?tenant_id= \
         (default \"default\"); serving loopback only"
    );
    if let Some(interval) = state.config().cleanup_interval {
        manager.start_cleanup_loop(interval);
    }
    let token = state.shutdown_token().clone();
    let grace = state.config().shutdown_grace;
    let server = axum::serve(listener, router(state))
        .with_graceful_shutdown(token.clone().cancelled_owned())
        .into_future();
    let mut server = std::pin::pin!(server);
    let trigger = async {
        tokio::select! {
            () = shutdown => {}
            () = token.cancelled() => {}
        }
    };
    let served = tokio::select! {
        result = &mut server => result,
        () = trigger => {
            tracing::info!("shutting down: closing streams, finishing in-flight requests");
            token.cancel();
            tokio::select! {
                result = &mut server => result,
                () = tokio::time::sleep(grace) => {
                    tracing::warn!(?grace, "requests still running after the grace period");
                    Ok(())
                }
            }
        }
    };
    token.cancel();
    let stopped = manager.shutdown().await;
    tracing::info!("store shut down");
    served?;
    stopped?;
    Ok(())
}

/// Renders a value as a `200 application/json` response.
fn json<T: serde::Serialize>(value: &T) -> Response {
    axum::Json(value).into_response()
}
