//! `eventqueue revoke`: revokes a tenant's tokens on a running server (through its admin
//! endpoint, with an `admin` token), for a leaked token or a tenant that must lose access.

use crate::cli::{CliError, ConnArgs, Outcome, remote_error};
use crate::client::DEFAULT_URL;

/// Flags of `eventqueue revoke`.
#[derive(clap::Args, Debug, Clone)]
#[command(after_help = "Examples:
  eventqueue revoke --tenant acme --token \"$ADMIN_TOKEN\"
  eventqueue revoke --tenant acme --before 2026-12-01T00:00:00Z")]
pub struct RevokeArgs {
    /// Tenant whose tokens to revoke.
    #[arg(long, value_name = "TENANT")]
    pub tenant: String,
    /// Revoke the tokens issued before this time (RFC 3339, not in the future) [default: now]
    #[arg(long, value_name = "TIME")]
    pub before: Option<String>,
    /// Base URL of the eventqueue server.
    #[arg(long, env = "EVENTQUEUE_URL", value_name = "URL", default_value = DEFAULT_URL)]
    pub url: String,
    /// Bearer token with the admin scope (mint one with `eventqueue token --scope admin`).
    #[arg(
        long,
        env = "EVENTQUEUE_TOKEN",
        value_name = "JWT",
        hide_env_values = true
    )]
    pub token: Option<String>,
    /// PEM file of a CA certificate to trust for an https:// URL, besides the system's
    #[arg(long, env = "EVENTQUEUE_CA_CERT", value_name = "FILE")]
    pub ca_cert: Option<std::path::PathBuf>,
}

/// Runs `eventqueue revoke`.
///
/// # Errors
///
/// A bad tenant id or time (2); no admin token, an unreachable server or an error answer (1).
pub async fn revoke(args: RevokeArgs) -> Result<Outcome, CliError> {
    crate::ids::validate_id("tenant_id", &args.tenant)
        .map_err(|e| CliError::usage(format!("--tenant: {e}")))?;
    let conn = ConnArgs {
        url: args.url,
        token: args.token,
        tenant: None,
        ca_cert: args.ca_cert,
    };
    let client = conn.client().await?;
    match client
        .revoke_tokens(&args.tenant, args.before.as_deref())
        .await
    {
        Ok(done) => {
            println!(
                "tokens of tenant {} issued before {} are revoked",
                done.tenant_id, done.not_before
            );
            Ok(Outcome::Success)
        }
        Err(crate::client::ClientError::Api {
            status: 400,
            detail,
        }) => Err(CliError::usage(detail)),
        Err(e) => Err(remote_error(e, &conn, None)),
    }
}
