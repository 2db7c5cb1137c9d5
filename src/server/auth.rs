//! Authentication modes and bearer tokens (the contract's "Tenancy and auth").
//!
//! - **Open mode** ([`Auth::Open`]): no credentials; the tenant comes from `X-Tenant-ID` or
//!   `?tenant_id=`. For local development: [`crate::server::serve`] refuses a non-loopback
//!   address unless [`OpenBind::AnyAddress`] was chosen explicitly.
//! - **Token mode** ([`Auth::Token`]): every request that touches queues carries an HS256 JWT,
//!   in `Authorization: Bearer <token>` or, for a browser's `EventSource` (which cannot set
//!   headers), in `?access_token=<token>`. Its claims are `tenant_id`, `scope` (space-separated
//!   [`Scopes`]) and `exp`, all required; `nbf` is honoured when present. Clocks may disagree by
//!   [`LEEWAY`].
//!
//! [`TokenKeys`] both verifies tokens (the server) and mints them (`eventqueue token`).

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::ids::TenantId;

/// Clock skew tolerated when checking `exp` and `nbf`.
pub const LEEWAY: Duration = Duration::from_secs(30);

/// How the server authenticates requests. Default: open mode, loopback only.
#[derive(Debug, Clone)]
pub enum Auth {
    /// No credentials; the tenant is whatever the request names. See [`OpenBind`].
    Open(OpenBind),
    /// HS256 bearer tokens verified with these keys; the tenant comes from the token.
    Token(TokenKeys),
}

impl Default for Auth {
    fn default() -> Self {
        Auth::Open(OpenBind::LoopbackOnly)
    }
}

impl Auth {
    /// Whether requests must carry a token.
    pub fn is_token_mode(&self) -> bool {
        matches!(self, Auth::Token(_))
    }
}

/// Which addresses an open-mode server may listen on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OpenBind {
    /// Loopback addresses only (the default): nobody else can reach an unauthenticated server.
    #[default]
    LoopbackOnly,
    /// Any address (`--insecure-open`): anyone who can reach the port reads and writes every
    /// tenant's queues. The server logs a warning at start.
    AnyAddress,
}

/// A set of token scopes: `subscribe` (read), `publish` (write), `admin` (any tenant, and every
/// other scope).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Scopes(u8);

impl Scopes {
    /// No scope.
    pub const NONE: Scopes = Scopes(0);
    /// Read streams, queue info, offsets and lists.
    pub const SUBSCRIBE: Scopes = Scopes(1);
    /// Create, enqueue, close, delete, checkpoints.
    pub const PUBLISH: Scopes = Scopes(2);
    /// Act on any tenant through `?tenant_id=`; implies the other scopes.
    pub const ADMIN: Scopes = Scopes(4);
    /// Every scope (what open mode grants).
    pub const ALL: Scopes = Scopes(7);

    const NAMES: [(&'static str, Scopes); 3] = [
        ("subscribe", Scopes::SUBSCRIBE),
        ("publish", Scopes::PUBLISH),
        ("admin", Scopes::ADMIN),
    ];

    /// Parses a space-separated scope list, rejecting unknown words (for minting).
    ///
    /// # Errors
    ///
    /// A message naming the unknown word, or saying the list is empty.
    pub fn parse_strict(text: &str) -> Result<Scopes, String> {
        let mut scopes = Scopes::NONE;
        for word in text.split_whitespace() {
            match Self::NAMES.iter().find(|(name, _)| *name == word) {
                Some((_, s)) => scopes = scopes.union(*s),
                None => {
                    return Err(format!(
                        "unknown scope {word:?}; scopes are subscribe, publish, admin"
                    ));
                }
            }
        }
        if scopes == Scopes::NONE {
            return Err("no scope given; scopes are subscribe, publish, admin".into());
        }
        Ok(scopes)
    }

    /// Parses a token's `scope` claim; unknown words grant nothing and are ignored.
    pub fn parse_lenient(text: &str) -> Scopes {
        text.split_whitespace()
            .filter_map(|w| Self::NAMES.iter().find(|(name, _)| *name == w))
            .fold(Scopes::NONE, |acc, (_, s)| acc.union(*s))
    }

    /// Both sets.
    pub const fn union(self, other: Scopes) -> Scopes {
        Scopes(self.0 | other.0)
    }

    /// Whether every scope of `other` is in `self`.
    pub const fn contains(self, other: Scopes) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether `self` grants `scope`: holds it, or holds `admin`.
    pub const fn grants(self, scope: Scopes) -> bool {
        self.contains(scope) || self.contains(Scopes::ADMIN)
    }
}

impl fmt::Display for Scopes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for (name, s) in Self::NAMES {
            if self.contains(s) {
                if !first {
                    f.write_str(" ")?;
                }
                f.write_str(name)?;
                first = false;
            }
        }
        Ok(())
    }
}

/// The claims of a token as signed.
#[derive(Debug, Serialize, Deserialize)]
struct RawClaims {
    tenant_id: String,
    scope: String,
    exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iat: Option<u64>,
}

/// What a verified token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// The tenant the token acts for.
    pub tenant: TenantId,
    /// What it may do.
    pub scopes: Scopes,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// Issue time, seconds since the Unix epoch, when the token says.
    pub iat: Option<u64>,
}

impl Claims {
    /// Checks what the signature alone does not bound, at `now` (seconds since the Unix
    /// epoch): the token's lifetime (`exp − iat`, or `exp − now` without `iat`) is at most
    /// `max_ttl`, and `iat` is not in the future (beyond [`LEEWAY`]) — such a token would
    /// escape both the lifetime bound and revocation.
    ///
    /// # Errors
    ///
    /// [`TokenError::TooLong`] or [`TokenError::IssuedInFuture`].
    pub fn check_lifetime(&self, max_ttl: Duration, now: u64) -> Result<(), TokenError> {
        if let Some(iat) = self.iat
            && iat > now.saturating_add(LEEWAY.as_secs())
        {
            return Err(TokenError::IssuedInFuture);
        }
        let from = self.iat.unwrap_or(now);
        let lifetime = self.exp.saturating_sub(from);
        if lifetime > max_ttl.as_secs() {
            return Err(TokenError::TooLong {
                lifetime: format_secs(lifetime),
                max: format_secs(max_ttl.as_secs()),
            });
        }
        Ok(())
    }

    /// Checks the token against its tenant's revocation: a token issued (`iat`) before the
    /// tenant's not-before time `not_before_us` (microseconds since the Unix epoch) is
    /// revoked, and so is one without `iat`, which cannot show when it was issued.
    ///
    /// # Errors
    ///
    /// [`TokenError::Revoked`].
    pub fn check_revocation(&self, not_before_us: Option<u64>) -> Result<(), TokenError> {
        let Some(not_before_us) = not_before_us else {
            return Ok(());
        };
        let issued_us = self.iat.map(|iat| iat.saturating_mul(1_000_000));
        if issued_us.is_none_or(|issued| issued < not_before_us) {
            return Err(TokenError::Revoked {
                tenant: self.tenant.to_string(),
                not_before: crate::event::Timestamp::from_micros(
                    i64::try_from(not_before_us).unwrap_or(i64::MAX),
                )
                .to_rfc3339(),
            });
        }
        Ok(())
    }
}

/// `secs` as people write durations: `30d`, `12h`, `90m`, else seconds.
pub fn format_secs(secs: u64) -> String {
    match secs {
        0 => "0s".into(),
        s if s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// Each tenant's token not-before time, microseconds since the Unix epoch, as last loaded
/// from the store (the server's cache of the revocations it keeps).
#[derive(Debug, Default)]
pub(crate) struct Revocations {
    by_tenant: RwLock<HashMap<String, u64>>,
    /// Held across a load and its replacement of the cache, so that a revocation made
    /// through this node is never undone here by a load that read the store before it.
    pub(crate) loading: tokio::sync::Mutex<()>,
}

impl Revocations {
    /// Puts `all` in place of what is known.
    pub(crate) fn replace(&self, all: Vec<(String, u64)>) {
        let map: HashMap<String, u64> = all.into_iter().collect();
        *self.by_tenant.write().unwrap_or_else(|p| p.into_inner()) = map;
    }

    /// The not-before time of `tenant`'s tokens, if it has one.
    pub(crate) fn not_before(&self, tenant: &str) -> Option<u64> {
        let map = self.by_tenant.read().unwrap_or_else(|p| p.into_inner());
        if map.is_empty() {
            return None;
        }
        map.get(tenant).copied()
    }
}

/// Why a token was refused. The `Display` text is safe to send back: it never contains the
/// token or the secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// Not three base64url parts with JSON header and claims.
    #[error("malformed token: {0}")]
    Malformed(String),
    /// The header names another algorithm than HS256.
    #[error("invalid token: unsupported token algorithm (tokens are signed with HS256)")]
    Algorithm,
    /// The signature does not match the server's secret.
    #[error("invalid token: the signature does not verify")]
    Signature,
    /// `exp` is in the past (beyond the leeway).
    #[error("token expired")]
    Expired,
    /// `nbf` is in the future (beyond the leeway).
    #[error("token not yet valid (nbf is in the future)")]
    NotYetValid,
    /// A required claim is missing or has the wrong type or value.
    #[error("invalid token claims: {0}")]
    Claims(String),
    /// `exp − iat` (or `exp − now`) is longer than the server accepts.
    #[error(
        "token lifetime too long: it is valid for {lifetime}, this server accepts at most \
         {max} (max_token_ttl); mint a shorter one"
    )]
    TooLong {
        /// The token's lifetime, e.g. `365d`.
        lifetime: String,
        /// The server's maximum, e.g. `30d`.
        max: String,
    },
    /// `iat` is in the future (beyond the leeway).
    #[error("invalid token claims: iat is in the future")]
    IssuedInFuture,
    /// The tenant's tokens issued before a time were revoked, and this is one of them.
    #[error(
        "token revoked: tokens of tenant {tenant} issued before {not_before} are no longer \
         accepted; mint a new one"
    )]
    Revoked {
        /// The token's tenant.
        tenant: String,
        /// The tenant's not-before time, RFC 3339.
        not_before: String,
    },
}

/// Why a secret cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SecretError {
    /// Shorter than [`TokenKeys::MIN_SECRET_BYTES`].
    #[error(
        "the JWT secret must be at least {min} bytes (got {got}); generate one with \
         `head -c 32 /dev/urandom | base64`"
    )]
    TooShort {
        /// Bytes given.
        got: usize,
        /// Bytes required.
        min: usize,
    },
}

/// The HS256 keys derived from the server's secret: verify tokens, mint tokens. Cheap to
/// clone.
#[derive(Clone)]
pub struct TokenKeys {
    inner: Arc<KeysInner>,
}

struct KeysInner {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
}

impl fmt::Debug for TokenKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The secret is never printed.
        f.write_str("TokenKeys { .. }")
    }
}

impl TokenKeys {
    /// Shortest accepted secret: 256 bits, the HS256 key size.
    pub const MIN_SECRET_BYTES: usize = 32;

    /// Keys from a shared secret. Surrounding whitespace (a file's trailing newline) is not
    /// part of the secret.
    ///
    /// # Errors
    ///
    /// [`SecretError::TooShort`] when the secret is shorter than [`Self::MIN_SECRET_BYTES`].
    pub fn from_secret(secret: &[u8]) -> Result<Self, SecretError> {
        let secret = secret.trim_ascii();
        if secret.len() < Self::MIN_SECRET_BYTES {
            return Err(SecretError::TooShort {
                got: secret.len(),
                min: Self::MIN_SECRET_BYTES,
            });
        }
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = LEEWAY.as_secs();
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.validate_aud = false;
        validation.set_required_spec_claims(&["exp"]);
        Ok(Self {
            inner: Arc::new(KeysInner {
                encoding: EncodingKey::from_secret(secret),
                decoding: DecodingKey::from_secret(secret),
                validation,
            }),
        })
    }

    /// A token for `tenant` with `scopes`, expiring `ttl` from now.
    ///
    /// # Errors
    ///
    /// A message when signing fails (it does not for HS256 keys).
    pub fn mint(&self, tenant: &TenantId, scopes: Scopes, ttl: Duration) -> Result<String, String> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.mint_at(tenant, scopes, now.saturating_add(ttl.as_secs()), now)
    }

    /// A token with an explicit expiry and issue time (seconds since the Unix epoch); tests use
    /// it to make expired tokens.
    ///
    /// # Errors
    ///
    /// A message when signing fails (it does not for HS256 keys).
    pub fn mint_at(
        &self,
        tenant: &TenantId,
        scopes: Scopes,
        exp: u64,
        iat: u64,
    ) -> Result<String, String> {
        let claims = RawClaims {
            tenant_id: tenant.as_str().to_owned(),
            scope: scopes.to_string(),
            exp,
            iat: Some(iat),
        };
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &self.inner.encoding,
        )
        .map_err(|e| format!("cannot sign the token: {e}"))
    }

    /// Verifies a token and returns its claims.
    ///
    /// # Errors
    ///
    /// [`TokenError`] saying why the token is refused.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        let data =
            jsonwebtoken::decode::<RawClaims>(token, &self.inner.decoding, &self.inner.validation)
                .map_err(|e| match e.into_kind() {
                    ErrorKind::InvalidSignature => TokenError::Signature,
                    ErrorKind::ExpiredSignature => TokenError::Expired,
                    ErrorKind::ImmatureSignature => TokenError::NotYetValid,
                    ErrorKind::InvalidAlgorithm
                    | ErrorKind::InvalidAlgorithmName
                    | ErrorKind::UnsupportedAlgorithm => TokenError::Algorithm,
                    ErrorKind::MissingRequiredClaim(c) => {
                        TokenError::Claims(format!("{c} is required"))
                    }
                    ErrorKind::InvalidClaimFormat(c) => {
                        TokenError::Claims(format!("{c} has the wrong type"))
                    }
                    // A header the library cannot read names an algorithm it does not know
                    // (`none`); its message would list the library's algorithms.
                    ErrorKind::Json(_) if jsonwebtoken::decode_header(token).is_err() => {
                        TokenError::Algorithm
                    }
                    ErrorKind::Json(e) => {
                        TokenError::Claims(format!("tenant_id, scope and exp are required ({e})"))
                    }
                    ErrorKind::Base64(_) => TokenError::Malformed("a part is not base64url".into()),
                    ErrorKind::Utf8(_) => TokenError::Malformed("a part is not UTF-8".into()),
                    _ => TokenError::Malformed("expected header.claims.signature".into()),
                })?;
        let tenant = TenantId::new(&data.claims.tenant_id)
            .map_err(|e| TokenError::Claims(format!("tenant_id: {e}")))?;
        Ok(Claims {
            tenant,
            scopes: Scopes::parse_lenient(&data.claims.scope),
            exp: data.claims.exp,
            iat: data.claims.iat,
        })
    }
}

/// Parses a duration such as `90s`, `15m`, `1h`, `7d` or a plain number of seconds.
///
/// # Errors
///
/// A message naming the accepted forms.
pub fn parse_ttl(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let n: u64 = number
        .parse()
        .map_err(|_| format!("invalid duration {text:?}: use e.g. 90s, 15m, 1h, 7d"))?;
    let unit_secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => {
            return Err(format!(
                "invalid duration {text:?}: use e.g. 90s, 15m, 1h, 7d"
            ));
        }
    };
    n.checked_mul(unit_secs)
        .filter(|s| *s > 0)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("invalid duration {text:?}: must be > 0 and not absurdly long"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> TokenKeys {
        TokenKeys::from_secret(b"0123456789abcdef0123456789abcdef\n").unwrap()
    }

    #[test]
    fn a_minted_token_verifies_with_its_claims() {
        let keys = keys();
        let tenant = TenantId::new("acme").unwrap();
        let token = keys
            .mint(
                &tenant,
                Scopes::SUBSCRIBE.union(Scopes::PUBLISH),
                Duration::from_secs(60),
            )
            .unwrap();
        let claims = keys.verify(&token).unwrap();
        assert_eq!(claims.tenant, tenant);
        assert!(claims.scopes.contains(Scopes::SUBSCRIBE));
        assert!(claims.scopes.contains(Scopes::PUBLISH));
        assert!(!claims.scopes.contains(Scopes::ADMIN));
    }

    #[test]
    fn short_secrets_are_refused() {
        assert!(matches!(
            TokenKeys::from_secret(b"short"),
            Err(SecretError::TooShort { got: 5, .. })
        ));
    }

    #[test]
    fn expiry_allows_the_leeway_and_no_more() {
        let keys = keys();
        let tenant = TenantId::new("acme").unwrap();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let within = keys
            .mint_at(&tenant, Scopes::ALL, now - 5, now - 100)
            .unwrap();
        assert!(keys.verify(&within).is_ok());
        let past = keys
            .mint_at(&tenant, Scopes::ALL, now - 3600, now - 7200)
            .unwrap();
        assert_eq!(keys.verify(&past), Err(TokenError::Expired));
    }

    #[test]
    fn scopes_parse_and_print() {
        assert_eq!(
            Scopes::parse_strict("publish  subscribe")
                .unwrap()
                .to_string(),
            "subscribe publish"
        );
        assert!(Scopes::parse_strict("read").is_err());
        assert!(Scopes::parse_strict("  ").is_err());
        assert_eq!(Scopes::parse_lenient("read publish"), Scopes::PUBLISH);
        assert!(Scopes::ADMIN.grants(Scopes::PUBLISH));
        assert!(!Scopes::SUBSCRIBE.grants(Scopes::PUBLISH));
    }

    #[test]
    fn ttls_parse() {
        assert_eq!(parse_ttl("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_ttl("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_ttl("15m"), Ok(Duration::from_secs(900)));
        assert!(parse_ttl("0s").is_err());
        assert!(parse_ttl("1w").is_err());
        assert!(parse_ttl("-1h").is_err());
        assert!(parse_ttl("99999999999999999999d").is_err());
    }
}
