//! `eventqueue token`: mints a bearer token with the server's secret, and the secret lookup
//! that `serve` shares.
//!
//! The secret comes from, in order: `--jwt-secret-file` (or `EVENTQUEUE_JWT_SECRET_FILE`), the
//! `EVENTQUEUE_JWT_SECRET` environment variable (the secret itself), the `jwt_secret_file` key
//! of the `--config` file. None of them set means open mode.

use std::path::{Path, PathBuf};

use crate::TenantId;
use crate::server::auth::{Scopes, TokenKeys, format_secs, parse_ttl};

/// Environment variable holding the secret itself.
pub const SECRET_ENV: &str = "EVENTQUEUE_JWT_SECRET";

/// Flags of `eventqueue token`.
#[derive(clap::Args, Debug)]
pub struct TokenArgs {
    /// Tenant the token acts for.
    #[arg(long, value_name = "TENANT")]
    tenant: String,
    /// Space-separated scopes: subscribe (read), publish (write), admin (any tenant).
    #[arg(long, value_name = "SCOPES", default_value = "subscribe")]
    scope: String,
    /// Lifetime: e.g. 90s, 15m, 1h, 7d; at most the servers' max_token_ttl (30d unless
    /// EVENTQUEUE_MAX_TOKEN_TTL or the --config file says otherwise).
    #[arg(long, value_name = "DURATION", default_value = "1h")]
    ttl: String,
    /// TOML config file (its `jwt_secret_file` key is used).
    #[arg(long, env = "EVENTQUEUE_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// File holding the JWT secret (at least 32 bytes).
    #[arg(long, env = "EVENTQUEUE_JWT_SECRET_FILE", value_name = "FILE")]
    jwt_secret_file: Option<PathBuf>,
}

/// The token keys from the first secret source that is set (see the module docs), or `None`
/// (open mode).
///
/// # Errors
///
/// A message when the secret file cannot be read or the secret is too short.
pub(super) fn load_keys(
    flag_file: Option<&Path>,
    config_file: Option<&Path>,
) -> Result<Option<TokenKeys>, String> {
    let secret = if let Some(path) = flag_file {
        Some(read_secret(path)?)
    } else if let Some(secret) = std::env::var_os(SECRET_ENV).filter(|s| !s.is_empty()) {
        Some(secret.into_encoded_bytes())
    } else if let Some(path) = config_file {
        Some(read_secret(path)?)
    } else {
        None
    };
    secret
        .map(|s| TokenKeys::from_secret(&s).map_err(|e| e.to_string()))
        .transpose()
}

fn read_secret(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read JWT secret file {}: {e}", path.display()))
}

/// Prints a token minted with the configured secret.
///
/// # Errors
///
/// A message when no secret is configured or an argument is invalid.
pub(super) fn token(args: TokenArgs) -> Result<(), String> {
    let file = match &args.config {
        Some(path) => super::serve::read_config(path)?,
        None => super::serve::FileConfig::default(),
    };
    let keys = load_keys(
        args.jwt_secret_file.as_deref(),
        file.jwt_secret_file.as_deref(),
    )?
    .ok_or_else(|| {
        format!(
            "no JWT secret configured: pass --jwt-secret-file, set {SECRET_ENV}, or set \
                 jwt_secret_file in the --config file"
        )
    })?;
    let tenant = TenantId::new(&args.tenant).map_err(|e| format!("--tenant: {e}"))?;
    let scopes = Scopes::parse_strict(&args.scope).map_err(|e| format!("--scope: {e}"))?;
    let ttl = parse_ttl(&args.ttl).map_err(|e| format!("--ttl: {e}"))?;
    let from_env = std::env::var("EVENTQUEUE_MAX_TOKEN_TTL").ok();
    let max = super::serve::max_token_ttl(from_env.as_deref().filter(|t| !t.is_empty()), &file)?;
    if ttl > max {
        return Err(format!(
            "--ttl {}: longer than the longest token lifetime servers accept, {} \
             (max_token_ttl, from EVENTQUEUE_MAX_TOKEN_TTL or the --config file); mint a \
             shorter token",
            args.ttl.trim(),
            format_secs(max.as_secs())
        ));
    }
    let token = keys.mint(&tenant, scopes, ttl)?;
    println!("{token}");
    Ok(())
}
