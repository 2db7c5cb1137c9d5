//! Every command of the `eventqueue` binary (feature `cli`): [`run`] parses the command line,
//! installs the logger and runs the command; `src/main.rs` only picks the allocator and calls
//! it. Being the process's entry point, this is the one module of the library that installs a
//! logger and may end the process (a second shutdown signal during `serve`).
//!
//! - `serve`, `token`, `revoke`, `compact`: the server, its tokens and its data directory;
//! - `watch`, `queues`, `info`, `cancel`, `publish`: person-facing commands over HTTP, through
//!   [`crate::client`];
//! - `dump`, `inspect`, `migrate`: offline, on a data directory no server holds;
//! - `bench` ([`mod@bench`]) and `demo` ([`mod@demo`]): also library modules, for tests and
//!   examples.
//!
//! Each person-facing subcommand returns an [`Outcome`] or a [`CliError`] carrying its exit
//! code; [`exit_code`] prints and maps it. Exit codes: 0 success (for `watch`: the task
//! completed), 1 failure (a failed or cancelled task, a server or storage error), 2 usage
//! errors, unknown queues, and what no retry can fix (a bad URL, a certificate refused). The other commands exit 1 on any error, which they log.

pub mod bench;
mod compact;
pub mod demo;
mod migrate;
mod offline;
mod remote;
mod render;
mod revoke;
mod serve;
mod token;
mod watch;

use std::fmt;
use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use crate::client::{Client, ClientError, DEFAULT_URL, TlsFailure};

pub use offline::{DumpArgs, InspectArgs, dump, inspect};
pub use remote::{CancelArgs, InfoArgs, PublishArgs, QueuesArgs, cancel, info, publish, queues};
pub use revoke::{RevokeArgs, revoke};
pub use watch::{WatchArgs, watch};

/// The target of the commands' own log lines: the binary's name, as when they lived in
/// `main.rs`, so `RUST_LOG` filters and the lines people read stay the same.
const LOG_TARGET: &str = "eventqueue";

#[derive(Parser, Debug)]
#[command(
    name = "eventqueue",
    version,
    about = "A durable, embedded event log for task progress"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once per process: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
enum Command {
    /// Serve the HTTP API (SSE streams, producer endpoints, metrics).
    Serve(serve::ServeArgs),
    /// Measure this machine's disk and CPU through eventqueue, against a raw fdatasync floor
    /// measured in the same run.
    ///
    /// Example: `eventqueue bench --quick --data-dir /var/lib/eventqueue`
    Bench(bench::BenchArgs),
    /// Mint a bearer token with the configured JWT secret (token mode).
    ///
    /// Example: `eventqueue token --tenant acme --scope "subscribe publish" --ttl 1h`
    Token(token::TokenArgs),
    /// Revoke a tenant's tokens issued before a time (default now) on a running server;
    /// needs an admin token. Every node sharing the store refuses them within its refresh
    /// interval.
    ///
    /// Example: `eventqueue revoke --tenant acme --token "$ADMIN_TOKEN"`
    Revoke(RevokeArgs),
    /// Shrink the database file of a stopped server's data directory (offline).
    ///
    /// A running server reuses the space of removed events but never returns it to the
    /// filesystem; this does. Example: `eventqueue compact --data-dir ./data`
    Compact(compact::CompactArgs),
    /// Copy a stopped single-node install's queues, events (at their offsets, with their
    /// ids), checkpoints and token revocations into Redis (or another data directory), so
    /// nodes started on it serve the same (offline).
    ///
    /// Example: `eventqueue migrate --from ./data --to redis://127.0.0.1:6379`
    Migrate(migrate::MigrateArgs),
    /// Follow a task live: state, phase, a progress bar per phase (or for the task), artifacts,
    /// errors, the result. Reconnects by itself (resuming with Last-Event-ID) when the
    /// connection drops; with --wait, waits for the queue to be created.
    ///
    /// Example: `eventqueue watch workflow_123`
    Watch(WatchArgs),
    /// List the queues of your tenant.
    ///
    /// Example: `eventqueue queues`
    Queues(QueuesArgs),
    /// Show one queue's info.
    ///
    /// Example: `eventqueue info workflow_123`
    Info(InfoArgs),
    /// Ask a task's producer to stop.
    ///
    /// Example: `eventqueue cancel workflow_123 --reason "user pressed stop"`
    Cancel(CancelArgs),
    /// Publish events to a queue: one (--event), a file of JSON lines, or JSON lines from stdin.
    ///
    /// Example: `producer | eventqueue publish workflow_123 -`
    Publish(PublishArgs),
    /// Print a stopped server's stored events as JSON lines, with filters (offline).
    ///
    /// Example: `eventqueue dump --data-dir ./data --task workflow_123 --type status,error`
    Dump(DumpArgs),
    /// Summarise a stopped server's store: format version, sizes, queues and events per
    /// tenant, oldest and newest event (offline).
    ///
    /// Example: `eventqueue inspect --data-dir ./data`
    Inspect(InspectArgs),
    /// Publish a simulated workflow and ingestion job to a running server, to watch and cancel.
    ///
    /// Start `eventqueue serve` first; the demo prints the commands that watch and cancel its
    /// tasks. Example: `eventqueue demo --videos 20 --delay-ms 500`
    Demo(demo::DemoArgs),
}

/// The `eventqueue` binary: parses the command line (flags, then `EVENTQUEUE_*` variables),
/// installs the logger on stderr (`RUST_LOG`; by default `info` for `serve`, `warn` for the
/// rest) and runs the command on a Tokio runtime.
///
/// Call it only from a program's `main`: it installs the global logger (a second call panics)
/// and exits the process when `--help` or a usage error is printed.
pub fn run() -> ExitCode {
    let cli = Cli::parse();
    // The server logs at `info`; other commands print their own output and log only problems
    // (the bench's in-process servers would otherwise interleave their lines with its report).
    // The certificate checker logs a rejected certificate as an error of its own; the
    // command reports it (once, with a hint), so its line would only repeat it.
    let default_level = match cli.command {
        Command::Serve(_) => "info",
        _ => "warn,rustls_platform_verifier=off",
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level)),
        )
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(target: LOG_TARGET, "cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Serve(args) => runtime.block_on(serve::serve(args)),
        Command::Bench(args) => runtime.block_on(bench::bench(args)),
        Command::Token(args) => token::token(args),
        Command::Compact(args) => compact::compact(args),
        Command::Migrate(args) => migrate::migrate(args),
        Command::Watch(args) => return exit_code(runtime.block_on(watch(args))),
        Command::Queues(args) => return exit_code(runtime.block_on(queues(args))),
        Command::Info(args) => return exit_code(runtime.block_on(info(args))),
        Command::Cancel(args) => return exit_code(runtime.block_on(cancel(args))),
        Command::Revoke(args) => return exit_code(runtime.block_on(revoke(args))),
        Command::Publish(args) => return exit_code(runtime.block_on(publish(args))),
        Command::Dump(args) => return exit_code(dump(args)),
        Command::Inspect(args) => return exit_code(inspect(args)),
        Command::Demo(args) => runtime.block_on(demo::demo(args)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(target: LOG_TARGET, "{e}");
            ExitCode::FAILURE
        }
    }
}

/// A failed subcommand: what to tell the user, and the exit code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CliError {
    /// The process exit code (1 or 2).
    pub code: u8,
    /// The message, printed on stderr.
    pub message: String,
}

impl CliError {
    /// Exit code 1: the operation failed.
    pub fn failure(message: impl Into<String>) -> Self {
        Self {
            code: 1,
            message: message.into(),
        }
    }

    /// Exit code 2: a usage error or an unknown queue.
    pub fn usage(message: impl Into<String>) -> Self {
        Self {
            code: 2,
            message: message.into(),
        }
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for CliError {}

/// What a successful subcommand asks the binary to exit with (`watch` exits 1 for a failed
/// task without that being an error of the command).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Exit 0.
    Success,
    /// Exit 1: the watched task failed or was cancelled (already reported).
    TaskFailed,
}

/// Prints an error (if any) on stderr and turns the result into the process exit code.
pub fn exit_code(result: Result<Outcome, CliError>) -> ExitCode {
    match result {
        Ok(Outcome::Success) => ExitCode::SUCCESS,
        Ok(Outcome::TaskFailed) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {}", e.message);
            ExitCode::from(e.code)
        }
    }
}

/// Where the server is and who is calling: flags, else `EVENTQUEUE_*` environment variables.
#[derive(clap::Args, Debug, Clone)]
pub struct ConnArgs {
    /// Base URL of the eventqueue server.
    #[arg(long, env = "EVENTQUEUE_URL", value_name = "URL", default_value = DEFAULT_URL)]
    pub url: String,
    /// Bearer token (token mode; mint one with `eventqueue token`).
    #[arg(
        long,
        env = "EVENTQUEUE_TOKEN",
        value_name = "JWT",
        hide_env_values = true
    )]
    pub token: Option<String>,
    /// Tenant to act for (open mode: sent as X-Tenant-ID; an admin token: ?tenant_id=)
    /// [default: the server's: `default`, or the token's]
    #[arg(long, env = "EVENTQUEUE_TENANT", value_name = "TENANT")]
    pub tenant: Option<String>,
    /// PEM file of a CA certificate to trust for an https:// URL, besides the system's (a
    /// private CA, or the server's self-signed certificate)
    #[arg(long, env = "EVENTQUEUE_CA_CERT", value_name = "FILE")]
    pub ca_cert: Option<std::path::PathBuf>,
}

impl ConnArgs {
    /// The client these settings describe.
    ///
    /// # Errors
    ///
    /// A usage error (2) for an invalid URL or tenant id, an unreadable or invalid
    /// `--ca-cert`, or an https:// URL with no CA to trust.
    pub async fn client(&self) -> Result<Client, CliError> {
        let mut builder = Client::builder(&self.url);
        if let Some(path) = &self.ca_cert {
            let pem = tokio::fs::read(path).await.map_err(|e| {
                CliError::usage(format!("--ca-cert: cannot read {}: {e}", path.display()))
            })?;
            builder = builder.ca_cert_pem(pem);
        }
        // An https:// client reads the system's trust store: not on an async worker thread.
        let built = tokio::task::spawn_blocking(move || builder.build())
            .await
            .map_err(|e| CliError::failure(format!("building the HTTP client: {e}")))?;
        let mut client = built.map_err(|e| match (&e, &self.ca_cert) {
            (ClientError::InvalidCaCert(_), Some(path)) => {
                CliError::usage(format!("--ca-cert {}: {e}", path.display()))
            }
            _ => CliError::usage(e.to_string()),
        })?;
        if let Some(token) = self.token.as_deref().filter(|t| !t.trim().is_empty()) {
            client = client.with_token(token.trim());
        }
        if let Some(tenant) = self.tenant.as_deref().filter(|t| !t.is_empty()) {
            crate::ids::validate_id("tenant_id", tenant)
                .map_err(|e| CliError::usage(format!("--tenant / EVENTQUEUE_TENANT: {e}")))?;
            client = client.with_tenant(tenant);
        }
        Ok(client)
    }

    /// A short description of the tenant for messages.
    fn tenant_label(&self) -> String {
        match self.tenant.as_deref().filter(|t| !t.is_empty()) {
            Some(t) => format!("tenant {t}"),
            None if self.token.is_some() => "the token's tenant".to_string(),
            None => "tenant default".to_string(),
        }
    }
}

/// Validates a task id argument (usage error otherwise).
fn task_arg(task: &str) -> Result<(), CliError> {
    crate::ids::validate_id("task_id", task).map_err(|e| CliError::usage(e.to_string()))
}

/// An unknown queue (2), with what to check.
fn unknown_queue(conn: &ConnArgs, task: &str) -> CliError {
    CliError::usage(format!(
        "no queue {task:?} for {} at {} (create it first, or check --tenant / \
         EVENTQUEUE_TENANT)",
        conn.tenant_label(),
        conn.url
    ))
}

/// Maps a client error to the CLI's exit codes and wording: `404` is an unknown queue (2);
/// the rest are failures (1), with a hint for the common causes.
fn remote_error(e: ClientError, conn: &ConnArgs, task: Option<&str>) -> CliError {
    match (&e, task) {
        (ClientError::Api { status: 404, .. }, Some(task)) => unknown_queue(conn, task),
        (ClientError::Api { status: 401, .. }, _) => CliError::failure(format!(
            "{e}; pass a valid token with --token or EVENTQUEUE_TOKEN"
        )),
        (ClientError::Api { status: 403, .. }, _) => {
            CliError::failure(format!("{e}; the token lacks the scope this command needs"))
        }
        (ClientError::Transport { .. }, _) => CliError::failure(format!(
            "{e} (is `eventqueue serve` running there? set --url or EVENTQUEUE_URL)"
        )),
        // Nothing a retry could fix: said once, as a usage error.
        (
            ClientError::Tls {
                kind: TlsFailure::Certificate | TlsFailure::NoTrustAnchors,
                ..
            },
            _,
        ) => CliError::usage(format!(
            "{e}; for a private CA or a self-signed certificate, pass its certificate with \
                 --ca-cert or EVENTQUEUE_CA_CERT"
        )),
        (
            ClientError::Tls { .. }
            | ClientError::InvalidUrl { .. }
            | ClientError::InvalidCaCert(_)
            | ClientError::InvalidInput(_)
            | ClientError::Decode(_),
            _,
        ) => CliError::usage(e.to_string()),
        _ => CliError::failure(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_parses() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
