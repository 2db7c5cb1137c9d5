//! `eventqueue serve`: runs the HTTP server, with settings resolved from, in order of
//! precedence: a flag, an `EVENTQUEUE_*` environment variable, the TOML file given by
//! `--config`, the default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::ValueEnum;
use serde::Deserialize;

use super::LOG_TARGET;
use crate::server::{self, AppState, Auth, OpenBind, ServerConfig};
use crate::{Config, Durability, QueueManager, StorageBackend};

/// How long after the first shutdown signal the process exits regardless.
const HARD_EXIT: Duration = Duration::from_secs(5);

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
enum DurabilityArg {
    /// Acknowledge after an fsync'd commit.
    Immediate,
    /// Acknowledge after a commit; fsync at least every flush interval.
    Buffered,
}

/// Flags of `eventqueue serve`. Unset flags fall back to the environment, then the config
/// file, then the default.
#[derive(clap::Args, Debug, Default)]
pub struct ServeArgs {
    /// TOML file with any of the settings below (keys as the flags, with underscores).
    #[arg(long, env = "EVENTQUEUE_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Where queues are kept: `redb` (the embedded database in --data-dir), `memory`
    /// (nothing survives a restart), `redis://[:PASSWORD@]HOST:PORT[/DB][?prefix=P]`
    /// (`rediss://` with TLS), or a Redis Cluster:
    /// `redis-cluster://[:PASSWORD@]HOST:PORT[,HOST:PORT…][?prefix=P]`
    /// (`redis-cluster+tls://` with TLS). Password also from EVENTQUEUE_REDIS_PASSWORD; CA
    /// certificates for TLS from the PEM file EVENTQUEUE_REDIS_CA [default: redb]
    #[arg(long, env = "EVENTQUEUE_STORAGE", value_name = "STORAGE")]
    storage: Option<String>,
    /// With Redis: replicas that must confirm each batch (WAITAOF, or WAIT before Redis
    /// 7.2) before it is acknowledged; fewer within 1 s → the writers get a 503
    /// [default: 0]
    #[arg(long, env = "EVENTQUEUE_REDIS_WAIT_REPLICAS", value_name = "N")]
    redis_wait_replicas: Option<u32>,
    /// Directory of the database [default: ./data]
    #[arg(long, env = "EVENTQUEUE_DATA_DIR", value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:8000]
    #[arg(long, env = "EVENTQUEUE_BIND", value_name = "ADDR")]
    bind: Option<SocketAddr>,
    /// TTL of queues created without one, counted from their last activity [default: 30]
    #[arg(long, env = "EVENTQUEUE_DEFAULT_TTL_MINUTES", value_name = "MINUTES")]
    default_ttl_minutes: Option<f64>,
    /// Retained events per queue for queues created without a bound [default: 1000]
    #[arg(long, env = "EVENTQUEUE_MAX_BUFFER_SIZE", value_name = "N")]
    max_buffer_size: Option<u64>,
    /// Period of the expiry sweep [default: 60]
    #[arg(long, env = "EVENTQUEUE_CLEANUP_INTERVAL_SECS", value_name = "SECS")]
    cleanup_interval_secs: Option<u64>,
    /// Interval of keepalive comments on idle SSE streams [default: 15]
    #[arg(long, env = "EVENTQUEUE_KEEPALIVE_SECS", value_name = "SECS")]
    keepalive_secs: Option<u64>,
    /// When enqueues are acknowledged [default: immediate]
    #[arg(long, env = "EVENTQUEUE_DURABILITY", value_enum)]
    durability: Option<DurabilityArg>,
    /// In buffered durability, the longest time between a commit and its fsync; ignored with
    /// immediate durability [default: 100]
    #[arg(long, env = "EVENTQUEUE_FLUSH_INTERVAL_MS", value_name = "MS")]
    flush_interval_ms: Option<u64>,
    /// Free space kept on the data directory's filesystem, in MiB: below it, enqueues get 507
    /// while deletions still work; 0 turns the check off [default: 64, or a tenth of the
    /// filesystem if less]
    #[arg(long, env = "EVENTQUEUE_DISK_RESERVE_MB", value_name = "MIB")]
    disk_reserve_mb: Option<u64>,
    /// Page cache of the database in MiB: recently read and written pages, held in memory
    /// [default: 128]
    #[arg(long, env = "EVENTQUEUE_CACHE_MB", value_name = "MIB")]
    cache_mb: Option<u64>,
    /// Largest request body in bytes [default: 2097152]
    #[arg(long, env = "EVENTQUEUE_MAX_BODY_BYTES", value_name = "BYTES")]
    max_body_bytes: Option<usize>,
    /// Largest JSON of one event in bytes [default: 1048576]
    #[arg(long, env = "EVENTQUEUE_MAX_EVENT_BYTES", value_name = "BYTES")]
    max_event_bytes: Option<usize>,
    /// Most events in one enqueue request [default: 1000]
    #[arg(long, env = "EVENTQUEUE_MAX_BATCH_EVENTS", value_name = "N")]
    max_batch_events: Option<usize>,
    /// File holding the JWT secret (at least 32 bytes); turns on token mode. The secret itself
    /// may instead be in EVENTQUEUE_JWT_SECRET [default: none: open mode]
    #[arg(long, env = "EVENTQUEUE_JWT_SECRET_FILE", value_name = "FILE")]
    jwt_secret_file: Option<PathBuf>,
    /// In open mode (no secret), serve a non-loopback address anyway: anyone who can reach it
    /// reads and writes every tenant's queues.
    #[arg(long)]
    insecure_open: bool,
    /// Comma-separated origins allowed to call the API from a browser (CORS); `*` for any
    /// [default: none]
    #[arg(
        long,
        env = "EVENTQUEUE_CORS_ORIGINS",
        value_name = "ORIGINS",
        value_delimiter = ','
    )]
    cors_origins: Option<Vec<String>>,
    /// Most SSE streams open at once [default: 10000]
    #[arg(long, env = "EVENTQUEUE_MAX_SSE_STREAMS", value_name = "N")]
    max_sse_streams: Option<usize>,
    /// Most SSE streams open at once per tenant [default: 1000]
    #[arg(long, env = "EVENTQUEUE_MAX_SSE_STREAMS_PER_TENANT", value_name = "N")]
    max_sse_streams_per_tenant: Option<usize>,
    /// Memory in MiB that all SSE streams together may hold beyond each stream's own 64 KiB
    /// until their clients took it (events over 32 KiB, larger replay steps for clients that
    /// keep up); a stream that would need more for an event waits. 0: no limit [default: 64]
    #[arg(long, env = "EVENTQUEUE_STREAM_BUFFER_MB", value_name = "MIB")]
    stream_buffer_mb: Option<u64>,
    /// Most queues per tenant [default: 10000]
    #[arg(long, env = "EVENTQUEUE_MAX_QUEUES_PER_TENANT", value_name = "N")]
    max_queues_per_tenant: Option<usize>,
    /// Longest wait for a request head, and for the next one on an idle connection [default: 10]
    #[arg(long, env = "EVENTQUEUE_HEADER_READ_TIMEOUT_SECS", value_name = "SECS")]
    header_read_timeout_secs: Option<u64>,
    /// Longest wait for a request body [default: 30]
    #[arg(long, env = "EVENTQUEUE_BODY_READ_TIMEOUT_SECS", value_name = "SECS")]
    body_read_timeout_secs: Option<u64>,
    /// Name in the A2A agent card [default: eventqueue]
    #[arg(long, env = "EVENTQUEUE_A2A_NAME", value_name = "NAME")]
    a2a_name: Option<String>,
    /// Description in the A2A agent card (a note on resuming streams is appended)
    #[arg(long, env = "EVENTQUEUE_A2A_DESCRIPTION", value_name = "TEXT")]
    a2a_description: Option<String>,
    /// Version in the A2A agent card [default: this program's version]
    #[arg(long, env = "EVENTQUEUE_A2A_VERSION", value_name = "VERSION")]
    a2a_version: Option<String>,
    /// Public base URL of this server (e.g. https://events.example.com), from which the A2A
    /// agent card's JSON-RPC URL is built [default: http:// (https:// with TLS) + the
    /// request's host]
    #[arg(long, env = "EVENTQUEUE_A2A_PUBLIC_URL", value_name = "URL")]
    a2a_public_url: Option<String>,
    /// Most connections held at once; more are answered 503 and closed (lowered at start when
    /// the open-file limit is lower) [default: 16384]
    #[arg(long, env = "EVENTQUEUE_MAX_CONNECTIONS", value_name = "N")]
    max_connections: Option<usize>,
    /// Most connections from one client address (IPv6: one /64); behind a reverse proxy
    /// raise it to --max-connections [default: 1024]
    #[arg(long, env = "EVENTQUEUE_MAX_CONNECTIONS_PER_IP", value_name = "N")]
    max_connections_per_ip: Option<usize>,
    /// Most bytes of request bodies being received at once, server-wide; a body that does
    /// not fit gets 503 [default: 134217728]
    #[arg(
        long,
        env = "EVENTQUEUE_MAX_BODY_BYTES_IN_FLIGHT",
        value_name = "BYTES"
    )]
    max_body_bytes_in_flight: Option<usize>,
    /// Longest token lifetime accepted (exp − iat), e.g. 30d, 12h; longer tokens get 401
    /// [default: 30d]
    #[arg(long, env = "EVENTQUEUE_MAX_TOKEN_TTL", value_name = "DURATION")]
    max_token_ttl: Option<String>,
    /// How often token revocations are reloaded from the store (a revocation made through
    /// another node holds here within this interval) [default: 1000]
    #[arg(long, env = "EVENTQUEUE_REVOCATION_REFRESH_MS", value_name = "MS")]
    revocation_refresh_ms: Option<u64>,
    /// PEM file of the server's certificate chain: serve HTTPS (HTTP/2 and HTTP/1.1 by ALPN)
    /// instead of plain HTTP; needs --tls-key [default: none: plain HTTP]
    #[arg(
        long,
        env = "EVENTQUEUE_TLS_CERT",
        value_name = "FILE",
        requires = "tls_key"
    )]
    tls_cert: Option<PathBuf>,
    /// PEM file of the private key of --tls-cert (PKCS#8, PKCS#1 or SEC1)
    #[arg(
        long,
        env = "EVENTQUEUE_TLS_KEY",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    tls_key: Option<PathBuf>,
}

/// The `--config` file: the same settings as the flags.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct FileConfig {
    storage: Option<String>,
    redis_wait_replicas: Option<u32>,
    data_dir: Option<PathBuf>,
    bind: Option<SocketAddr>,
    default_ttl_minutes: Option<f64>,
    max_buffer_size: Option<u64>,
    cleanup_interval_secs: Option<u64>,
    keepalive_secs: Option<u64>,
    durability: Option<DurabilityArg>,
    flush_interval_ms: Option<u64>,
    disk_reserve_mb: Option<u64>,
    cache_mb: Option<u64>,
    max_body_bytes: Option<usize>,
    max_event_bytes: Option<usize>,
    max_batch_events: Option<usize>,
    pub(super) jwt_secret_file: Option<PathBuf>,
    cors_origins: Option<Vec<String>>,
    max_sse_streams: Option<usize>,
    max_sse_streams_per_tenant: Option<usize>,
    stream_buffer_mb: Option<u64>,
    max_queues_per_tenant: Option<usize>,
    header_read_timeout_secs: Option<u64>,
    body_read_timeout_secs: Option<u64>,
    a2a_name: Option<String>,
    a2a_description: Option<String>,
    a2a_version: Option<String>,
    a2a_public_url: Option<String>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    max_connections: Option<usize>,
    max_connections_per_ip: Option<usize>,
    max_body_bytes_in_flight: Option<usize>,
    pub(super) max_token_ttl: Option<String>,
    revocation_refresh_ms: Option<u64>,
}

/// Everything `serve` needs, resolved.
#[derive(Debug)]
struct Settings {
    bind: SocketAddr,
    store: Config,
    server: ServerConfig,
}

fn resolve(args: ServeArgs) -> Result<Settings, String> {
    let file = match &args.config {
        Some(path) => read_config(path)?,
        None => FileConfig::default(),
    };
    let mut server = ServerConfig::default();
    resolve_protection(&args, &file, &mut server)?;
    resolve_a2a(&args, &file, &mut server)?;
    server.tls = resolve_tls(&args, &file)?;
    let mut store = Config::new(
        args.data_dir
            .or(file.data_dir)
            .unwrap_or_else(|| PathBuf::from("./data")),
    );
    if let Some(storage) = args.storage.as_ref().or(file.storage.as_ref()) {
        store.storage = storage.parse()?;
    }
    if let StorageBackend::Redis { url, .. } = &mut store.storage
        && let Ok(password) = std::env::var("EVENTQUEUE_REDIS_PASSWORD")
        && !password.is_empty()
    {
        *url = with_password(url, &password)?;
    }
    if let Some(n) = args.redis_wait_replicas.or(file.redis_wait_replicas) {
        store.redis_wait_replicas = n;
    }
    if let Some(minutes) = args.default_ttl_minutes.or(file.default_ttl_minutes) {
        store.default_ttl = (minutes >= 0.0)
            .then(|| Duration::try_from_secs_f64(minutes * 60.0).ok())
            .flatten()
            .ok_or_else(|| format!("default_ttl_minutes must be >= 0, got {minutes}"))?;
    }
    if let Some(n) = args.max_buffer_size.or(file.max_buffer_size) {
        if n == 0 {
            return Err("max_buffer_size must be at least 1".into());
        }
        store.max_buffer_size = n;
    }
    let flush_ms = args.flush_interval_ms.or(file.flush_interval_ms);
    store.durability = match args.durability.or(file.durability) {
        // A flush interval means nothing when every commit is fsync'd; it is ignored.
        None | Some(DurabilityArg::Immediate) => Durability::Immediate,
        Some(DurabilityArg::Buffered) => Durability::Buffered {
            flush_interval: Duration::from_millis(flush_ms.unwrap_or(100).max(1)),
        },
    };
    if let Some(mb) = args.disk_reserve_mb.or(file.disk_reserve_mb) {
        store.disk_reserve = Some(mib("disk_reserve_mb", mb)?);
    }
    if let Some(mb) = args.cache_mb.or(file.cache_mb) {
        if mb == 0 {
            return Err("cache_mb must be at least 1".into());
        }
        store.cache_size_bytes = usize::try_from(mib("cache_mb", mb)?)
            .map_err(|_| format!("cache_mb is too large: {mb}"))?;
    }
    if let Some(secs) = args.cleanup_interval_secs.or(file.cleanup_interval_secs) {
        if secs == 0 {
            return Err("cleanup_interval_secs must be at least 1".into());
        }
        server.cleanup_interval = Some(Duration::from_secs(secs));
    }
    if let Some(secs) = args.keepalive_secs.or(file.keepalive_secs) {
        if secs == 0 {
            return Err("keepalive_secs must be at least 1".into());
        }
        server.keepalive = Duration::from_secs(secs);
    }
    if let Some(n) = args.max_body_bytes.or(file.max_body_bytes) {
        server.max_body_bytes = n;
    }
    if let Some(n) = args.max_event_bytes.or(file.max_event_bytes) {
        server.max_event_bytes = n;
    }
    if let Some(n) = args.max_batch_events.or(file.max_batch_events) {
        server.max_batch_events = n;
    }
    let bind = args
        .bind
        .or(file.bind)
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8000)));
    Ok(Settings {
        bind,
        store,
        server,
    })
}

/// A Redis URL with `password` (from `EVENTQUEUE_REDIS_PASSWORD`, so it stays out of process
/// listings) unless the URL carries credentials already, which win.
pub(super) fn with_password(url: &str, password: &str) -> Result<String, String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| format!("invalid redis URL {url:?}"))?;
    let authority_end = rest.find('/').unwrap_or(rest.len());
    if rest[..authority_end].contains('@') {
        return Ok(url.to_string());
    }
    // Userinfo takes percent-encoding: encode everything but unreserved characters.
    let encoded: String = password
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                char::from(b).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect();
    Ok(format!("{scheme}://:{encoded}@{rest}"))
}

/// Setting `key`, given in MiB, in bytes.
fn mib(key: &str, mb: u64) -> Result<u64, String> {
    mb.checked_mul(1 << 20)
        .ok_or_else(|| format!("{key} is too large: {mb}"))
}

/// The auth mode, CORS origins and limits of `serve` (issue 4's settings).
fn resolve_protection(
    args: &ServeArgs,
    file: &FileConfig,
    server: &mut ServerConfig,
) -> Result<(), String> {
    let keys = super::token::load_keys(
        args.jwt_secret_file.as_deref(),
        file.jwt_secret_file.as_deref(),
    )?;
    server.auth = match keys {
        Some(keys) => {
            if args.insecure_open {
                tracing::warn!(target: LOG_TARGET, "--insecure-open has no effect: a JWT secret is configured");
            }
            Auth::Token(keys)
        }
        None if args.insecure_open => Auth::Open(OpenBind::AnyAddress),
        None => Auth::Open(OpenBind::LoopbackOnly),
    };
    if let Some(origins) = args.cors_origins.as_ref().or(file.cors_origins.as_ref()) {
        server.cors_origins = origins
            .iter()
            .map(|o| o.trim())
            .filter(|o| !o.is_empty())
            .map(|o| {
                o.parse()
                    .map_err(|_| format!("cors_origins: {o:?} is not a valid origin"))
            })
            .collect::<Result<_, _>>()?;
    }
    fn at_least_one<T: PartialEq + Default>(name: &str, n: T) -> Result<T, String> {
        if n == T::default() {
            Err(format!("{name} must be at least 1"))
        } else {
            Ok(n)
        }
    }
    if let Some(n) = args.max_sse_streams.or(file.max_sse_streams) {
        server.max_sse_streams = at_least_one("max_sse_streams", n)?;
    }
    if let Some(n) = args
        .max_sse_streams_per_tenant
        .or(file.max_sse_streams_per_tenant)
    {
        server.max_sse_streams_per_tenant = at_least_one("max_sse_streams_per_tenant", n)?;
    }
    if let Some(mb) = args.stream_buffer_mb.or(file.stream_buffer_mb) {
        server.stream_buffer_bytes = usize::try_from(mib("stream_buffer_mb", mb)?)
            .map_err(|_| format!("stream_buffer_mb is too large: {mb}"))?;
    }
    if let Some(n) = args.max_queues_per_tenant.or(file.max_queues_per_tenant) {
        server.max_queues_per_tenant = at_least_one("max_queues_per_tenant", n)?;
    }
    if let Some(s) = args
        .header_read_timeout_secs
        .or(file.header_read_timeout_secs)
    {
        server.header_read_timeout =
            Duration::from_secs(at_least_one("header_read_timeout_secs", s)?);
    }
    if let Some(s) = args.body_read_timeout_secs.or(file.body_read_timeout_secs) {
        server.body_read_timeout = Duration::from_secs(at_least_one("body_read_timeout_secs", s)?);
    }
    if let Some(n) = args.max_connections.or(file.max_connections) {
        server.max_connections = at_least_one("max_connections", n)?;
    }
    if let Some(n) = args.max_connections_per_ip.or(file.max_connections_per_ip) {
        server.max_connections_per_ip = at_least_one("max_connections_per_ip", n)?;
    }
    if let Some(n) = args
        .max_body_bytes_in_flight
        .or(file.max_body_bytes_in_flight)
    {
        server.max_body_bytes_in_flight = at_least_one("max_body_bytes_in_flight", n)?;
    }
    server.max_token_ttl = max_token_ttl(args.max_token_ttl.as_deref(), file)?;
    if let Some(ms) = args.revocation_refresh_ms.or(file.revocation_refresh_ms) {
        server.revocation_refresh =
            Duration::from_millis(at_least_one("revocation_refresh_ms", ms)?);
    }
    Ok(())
}

/// The longest token lifetime: the flag (or `EVENTQUEUE_MAX_TOKEN_TTL`), else the file's
/// `max_token_ttl`, else the server's default. `eventqueue token` uses it too, so that it does
/// not mint what the server would refuse.
pub(super) fn max_token_ttl(flag: Option<&str>, file: &FileConfig) -> Result<Duration, String> {
    match flag.or(file.max_token_ttl.as_deref()) {
        Some(text) => {
            crate::server::auth::parse_ttl(text).map_err(|e| format!("max_token_ttl: {e}"))
        }
        None => Ok(ServerConfig::default().max_token_ttl),
    }
}

/// The A2A agent card's settings.
fn resolve_a2a(
    args: &ServeArgs,
    file: &FileConfig,
    server: &mut ServerConfig,
) -> Result<(), String> {
    if let Some(name) = args.a2a_name.as_ref().or(file.a2a_name.as_ref()) {
        server.a2a.name = name.clone();
    }
    if let Some(text) = args
        .a2a_description
        .as_ref()
        .or(file.a2a_description.as_ref())
    {
        server.a2a.description = text.clone();
    }
    if let Some(version) = args.a2a_version.as_ref().or(file.a2a_version.as_ref()) {
        server.a2a.version = version.clone();
    }
    if let Some(url) = args
        .a2a_public_url
        .as_ref()
        .or(file.a2a_public_url.as_ref())
    {
        server.a2a.public_url = Some(server::a2a::check_public_url(url)?);
    }
    Ok(())
}

/// The certificate and key to serve HTTPS with, read and checked now, so that a missing or
/// bad file stops `serve` at start with its name. Given both by flags (or the environment),
/// or both in the file; one without the other is an error.
fn resolve_tls(args: &ServeArgs, file: &FileConfig) -> Result<Option<server::TlsConfig>, String> {
    let (cert, key) = match (&args.tls_cert, &args.tls_key) {
        (None, None) => (file.tls_cert.as_ref(), file.tls_key.as_ref()),
        (cert, key) => (cert.as_ref(), key.as_ref()),
    };
    match (cert, key) {
        (None, None) => Ok(None),
        (Some(cert), Some(key)) => server::TlsConfig::from_pem_files(cert, key)
            .map(Some)
            .map_err(|e| e.to_string()),
        (Some(_), None) => Err("tls_cert is set but tls_key is not: give both".into()),
        (None, Some(_)) => Err("tls_key is set but tls_cert is not: give both".into()),
    }
}

pub(super) fn read_config(path: &Path) -> Result<FileConfig, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read config file {}: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| format!("invalid config file {}: {e}", path.display()))
}

/// Runs `eventqueue serve` until a shutdown signal.
pub(super) async fn serve(args: ServeArgs) -> Result<(), String> {
    let settings = resolve(args)?;
    server::check_bind(&settings.server.auth, settings.bind).map_err(|e| e.to_string())?;
    // Every connection and stream holds a descriptor: the soft limit (often 1024) goes up to
    // the hard one. `server::serve` warns if that is still short.
    match server::raise_open_file_limit() {
        Ok((Some(before), after)) if after != Some(before) => tracing::info!(
            target: LOG_TARGET,
            "open-file limit raised from {before} to {}",
            after.map_or_else(|| "unlimited".to_string(), |n| n.to_string())
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!(target: LOG_TARGET, "cannot raise the open-file limit: {e}"),
    }
    let listener = tokio::net::TcpListener::bind(settings.bind)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", settings.bind))?;
    let manager = QueueManager::open(settings.store)
        .await
        .map_err(|e| e.to_string())?;
    let state = AppState::new(manager, settings.server);
    server::serve(state, listener, shutdown_signal())
        .await
        .map_err(|e| e.to_string())?;
    tracing::info!(target: LOG_TARGET, "stopped");
    Ok(())
}

/// Resolves at the first SIGTERM or Ctrl-C. From then on, a second signal, or [`HARD_EXIT`]
/// passing, ends the process at once.
async fn shutdown_signal() {
    signal().await;
    tracing::info!(target: LOG_TARGET, "shutdown requested; a second signal exits at once");
    tokio::spawn(async {
        tokio::select! {
            () = signal() => tracing::warn!(target: LOG_TARGET, "second signal: exiting now"),
            () = tokio::time::sleep(HARD_EXIT) => tracing::warn!(target: LOG_TARGET, "shutdown took too long: exiting now"),
        }
        std::process::exit(130);
    });
}

async fn signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_the_config_file_which_wins_over_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("eq.toml");
        std::fs::write(
            &path,
            "bind = \"127.0.0.1:9000\"\nkeepalive_secs = 7\nmax_body_bytes = 10\n",
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(path),
            max_body_bytes: Some(20),
            ..ServeArgs::default()
        };
        let s = resolve(args).unwrap();
        assert_eq!(s.bind, "127.0.0.1:9000".parse().unwrap());
        assert_eq!(s.server.keepalive, Duration::from_secs(7));
        assert_eq!(s.server.max_body_bytes, 20);
        assert_eq!(s.server.max_event_bytes, 1 << 20);
        assert_eq!(s.store.data_dir, PathBuf::from("./data"));
    }

    #[test]
    fn the_storage_comes_from_the_flag_then_the_file_and_unknown_names_are_refused() {
        assert_eq!(
            resolve(ServeArgs::default()).unwrap().store.storage,
            StorageBackend::Redb
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("eq.toml");
        std::fs::write(&path, "storage = \"memory\"\n").unwrap();
        let from_file = ServeArgs {
            config: Some(path.clone()),
            ..ServeArgs::default()
        };
        assert_eq!(
            resolve(from_file).unwrap().store.storage,
            StorageBackend::Memory
        );
        let flag_wins = ServeArgs {
            config: Some(path),
            storage: Some("redb".into()),
            ..ServeArgs::default()
        };
        assert_eq!(
            resolve(flag_wins).unwrap().store.storage,
            StorageBackend::Redb
        );
        let err = resolve(ServeArgs {
            storage: Some("sqlite".into()),
            ..ServeArgs::default()
        })
        .unwrap_err();
        assert!(err.contains("unknown storage \"sqlite\""), "{err}");
    }

    #[test]
    fn the_redis_password_goes_into_the_url_unless_it_has_credentials() {
        assert_eq!(
            with_password("redis-cluster+tls://a:1,b:2", "pw").unwrap(),
            "redis-cluster+tls://:pw@a:1,b:2"
        );
        assert_eq!(
            with_password("redis://h:6379/2", "p@ss w").unwrap(),
            "redis://:p%40ss%20w@h:6379/2"
        );
        assert_eq!(
            with_password("redis://:own@h:1", "other").unwrap(),
            "redis://:own@h:1"
        );
    }

    #[test]
    fn the_disk_reserve_is_given_in_mib_and_defaults_to_automatic() {
        let s = resolve(ServeArgs::default()).unwrap();
        assert_eq!(s.store.disk_reserve, None);
        let s = resolve(ServeArgs {
            disk_reserve_mb: Some(3),
            ..ServeArgs::default()
        })
        .unwrap();
        assert_eq!(s.store.disk_reserve, Some(3 << 20));
        let err = resolve(ServeArgs {
            disk_reserve_mb: Some(u64::MAX),
            ..ServeArgs::default()
        })
        .unwrap_err();
        assert!(err.contains("disk_reserve_mb"), "{err}");
    }

    #[test]
    fn the_cache_is_given_in_mib() {
        let s = resolve(ServeArgs::default()).unwrap();
        assert_eq!(s.store.cache_size_bytes, 128 << 20);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("eq.toml");
        std::fs::write(&path, "cache_mb = 32\n").unwrap();
        let s = resolve(ServeArgs {
            config: Some(path.clone()),
            ..ServeArgs::default()
        })
        .unwrap();
        assert_eq!(s.store.cache_size_bytes, 32 << 20);
        let s = resolve(ServeArgs {
            config: Some(path),
            cache_mb: Some(512),
            ..ServeArgs::default()
        })
        .unwrap();
        assert_eq!(s.store.cache_size_bytes, 512 << 20);
        for bad in [0, u64::MAX] {
            let err = resolve(ServeArgs {
                cache_mb: Some(bad),
                ..ServeArgs::default()
            })
            .unwrap_err();
            assert!(err.contains("cache_mb"), "{err}");
        }
    }

    #[test]
    fn the_stream_buffer_budget_is_given_in_mib() {
        let s = resolve(ServeArgs::default()).unwrap();
        assert_eq!(s.server.stream_buffer_bytes, 64 << 20);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("eq.toml");
        std::fs::write(&path, "stream_buffer_mb = 8\n").unwrap();
        let s = resolve(ServeArgs {
            config: Some(path),
            ..ServeArgs::default()
        })
        .unwrap();
        assert_eq!(s.server.stream_buffer_bytes, 8 << 20);
        let s = resolve(ServeArgs {
            stream_buffer_mb: Some(0),
            ..ServeArgs::default()
        })
        .unwrap();
        assert_eq!(s.server.stream_buffer_bytes, 0);
        let err = resolve(ServeArgs {
            stream_buffer_mb: Some(u64::MAX),
            ..ServeArgs::default()
        })
        .unwrap_err();
        assert!(err.contains("stream_buffer_mb"), "{err}");
    }

    #[test]
    fn unknown_config_keys_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("eq.toml");
        std::fs::write(&path, "bnd = \"127.0.0.1:9000\"\n").unwrap();
        let err = resolve(ServeArgs {
            config: Some(path),
            ..ServeArgs::default()
        })
        .unwrap_err();
        assert!(err.contains("bnd"), "{err}");
    }

    #[test]
    fn a_secret_file_turns_on_token_mode_and_limits_come_from_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("jwt.secret");
        std::fs::write(&secret, "0123456789abcdef0123456789abcdef\n").unwrap();
        let path = dir.path().join("eq.toml");
        std::fs::write(
            &path,
            format!(
                "jwt_secret_file = {:?}\ncors_origins = [\"https://dash.example\"]\n\
                 max_sse_streams_per_tenant = 3\nmax_queues_per_tenant = 4\n\
                 header_read_timeout_secs = 2\n",
                secret.display().to_string()
            ),
        )
        .unwrap();
        let s = resolve(ServeArgs {
            config: Some(path),
            max_queues_per_tenant: Some(5),
            ..ServeArgs::default()
        })
        .unwrap();
        assert!(s.server.auth.is_token_mode());
        assert_eq!(s.server.cors_origins, ["https://dash.example"]);
        assert_eq!(s.server.max_sse_streams_per_tenant, 3);
        assert_eq!(s.server.max_queues_per_tenant, 5);
        assert_eq!(s.server.header_read_timeout, Duration::from_secs(2));
        // A secret too short to be safe is refused, not used.
        std::fs::write(&secret, "short").unwrap();
        let err = resolve(ServeArgs {
            jwt_secret_file: Some(secret),
            ..ServeArgs::default()
        })
        .unwrap_err();
        assert!(err.contains("32 bytes"), "{err}");
    }

    #[test]
    fn tls_files_are_checked_at_start_with_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let other = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let cert_pem = write("cert.pem", &cert.cert.pem());
        let key_pem = write("key.pem", &cert.signing_key.serialize_pem());
        let other_key = write("other.key", &other.signing_key.serialize_pem());
        let garbage = write("garbage.pem", "not pem");
        let missing = dir.path().join("missing.pem");
        let tls = |cert: &PathBuf, key: &PathBuf| {
            resolve(ServeArgs {
                tls_cert: Some(cert.clone()),
                tls_key: Some(key.clone()),
                ..ServeArgs::default()
            })
        };
        assert!(resolve(ServeArgs::default()).unwrap().server.tls.is_none());
        assert!(tls(&cert_pem, &key_pem).unwrap().server.tls.is_some());
        let err = tls(&missing, &key_pem).unwrap_err();
        assert!(
            err.contains("certificate") && err.contains("missing.pem"),
            "{err}"
        );
        let err = tls(&cert_pem, &garbage).unwrap_err();
        assert!(
            err.contains("no private key") && err.contains("garbage.pem"),
            "{err}"
        );
        let err = tls(&garbage, &key_pem).unwrap_err();
        assert!(err.contains("no certificate"), "{err}");
        let err = tls(&cert_pem, &other_key).unwrap_err();
        assert!(err.contains("refused"), "{err}");
        // From the config file too; one without the other is an error.
        let config = write(
            "eq.toml",
            &format!(
                "tls_cert = {:?}\ntls_key = {:?}\n",
                cert_pem.display().to_string(),
                key_pem.display().to_string()
            ),
        );
        let s = resolve(ServeArgs {
            config: Some(config),
            ..ServeArgs::default()
        })
        .unwrap();
        assert!(s.server.tls.is_some());
        let half = write(
            "half.toml",
            &format!("tls_cert = {:?}\n", cert_pem.display().to_string()),
        );
        let err = resolve(ServeArgs {
            config: Some(half),
            ..ServeArgs::default()
        })
        .unwrap_err();
        assert!(err.contains("tls_key"), "{err}");
    }

    #[test]
    fn a2a_card_settings_come_from_flags_and_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("eq.toml");
        std::fs::write(
            &path,
            "a2a_name = \"jobs\"\na2a_version = \"2.1\"\n\
             a2a_public_url = \"https://events.example.com/\"\n",
        )
        .unwrap();
        let s = resolve(ServeArgs {
            config: Some(path.clone()),
            a2a_version: Some("3.0".into()),
            ..ServeArgs::default()
        })
        .unwrap();
        assert_eq!(s.server.a2a.name, "jobs");
        assert_eq!(s.server.a2a.version, "3.0");
        assert_eq!(
            s.server.a2a.public_url.as_deref(),
            Some("https://events.example.com")
        );
        let err = resolve(ServeArgs {
            a2a_public_url: Some("events.example.com".into()),
            ..ServeArgs::default()
        })
        .unwrap_err();
        assert!(err.contains("a2a_public_url"), "{err}");
    }
}
