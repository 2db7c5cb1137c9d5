//! The person-facing subcommands of the `eventqueue` binary: `watch`, `queues`, `info`,
//! `cancel`, `publish` (over HTTP, through [`crate::client`]) and `dump`, `inspect` (offline,
//! on a data directory no server holds).
//!
//! Each subcommand returns an [`Outcome`] or a [`CliError`] carrying its exit code; the binary
//! prints and exits. Exit codes: 0 success (for `watch`: the task completed), 1 failure (a
//! failed or cancelled task, a server or storage error), 2 usage errors and unknown queues.

mod offline;
mod remote;
mod render;
mod watch;

use std::fmt;
use std::process::ExitCode;

use crate::client::{Client, ClientError, DEFAULT_URL};

pub use offline::{DumpArgs, InspectArgs, dump, inspect};
pub use remote::{CancelArgs, InfoArgs, PublishArgs, QueuesArgs, cancel, info, publish, queues};
pub use watch::{WatchArgs, watch};

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
}

impl ConnArgs {
    /// The client these settings describe.
    ///
    /// # Errors
    ///
    /// A usage error (2) for an invalid URL or tenant id.
    pub fn client(&self) -> Result<Client, CliError> {
        let mut client = Client::new(&self.url).map_err(|e| CliError::usage(e.to_string()))?;
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

/// Maps a client error to the CLI's exit codes and wording: `404` is an unknown queue (2);
/// the rest are failures (1), with a hint for the common causes.
fn remote_error(e: ClientError, conn: &ConnArgs, task: Option<&str>) -> CliError {
    match (&e, task) {
        (ClientError::Api { status: 404, .. }, Some(task)) => CliError::usage(format!(
            "no queue {task:?} for {} at {} (create it first, or check --tenant / \
             EVENTQUEUE_TENANT)",
            conn.tenant_label(),
            conn.url
        )),
        (ClientError::Api { status: 401, .. }, _) => CliError::failure(format!(
            "{e}; pass a valid token with --token or EVENTQUEUE_TOKEN"
        )),
        (ClientError::Api { status: 403, .. }, _) => {
            CliError::failure(format!("{e}; the token lacks the scope this command needs"))
        }
        (ClientError::Transport { .. }, _) => CliError::failure(format!(
            "{e} (is `eventqueue serve` running there? set --url or EVENTQUEUE_URL)"
        )),
        (ClientError::InvalidInput(_), _) => CliError::usage(e.to_string()),
        _ => CliError::failure(e.to_string()),
    }
}
