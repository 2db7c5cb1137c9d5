//! Who is calling: the one place a request's credentials, scope and tenant are resolved.
//!
//! Every handler that touches queues takes a [`Tenant`] (or a [`Caller`], which says a little
//! more); none reads tenant headers, query parameters or tokens itself.
//!
//! - **Open mode**: the tenant comes from the `X-Tenant-ID` header, else the `?tenant_id=`
//!   query parameter, else `default`. Every scope is granted.
//! - **Token mode**: the tenant comes from the token only (`Authorization: Bearer`, else
//!   `?access_token=`); `X-Tenant-ID` and `?tenant_id=` are ignored, except that an `admin`
//!   token may name another tenant with `?tenant_id=`. The scope a request needs follows from
//!   its method and route ([`Need::of`]): reading needs `subscribe`, writing `publish`, a
//!   cancel either; `/events/admin/…` needs `admin`. A request is refused with `401` (no,
//!   malformed, forged, expired, too long-lived or revoked token) or `403` (a valid token
//!   without the scope) before any handler runs.

use std::collections::HashMap;

use axum::extract::{FromRequestParts, MatchedPath, Query};
use axum::http::request::Parts;
use axum::http::{Method, header};

use crate::ids::TenantId;
use crate::server::AppState;
use crate::server::auth::{Auth, Scopes};
use crate::server::error::ApiError;

/// Header naming the tenant in open mode.
pub const TENANT_HEADER: &str = "x-tenant-id";

/// Query parameter carrying a token for clients that cannot set headers (`EventSource`).
pub const ACCESS_TOKEN_PARAM: &str = "access_token";

/// The tenant a request acts for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant(pub TenantId);

/// Which tenants a caller's list covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// Only [`Caller::tenant`].
    OwnTenant,
    /// Every tenant: an `admin` token that named no `?tenant_id=`.
    AllTenants,
}

/// A resolved request: its tenant, what it may do, and what a listing covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The tenant the request acts for.
    pub tenant: TenantId,
    /// The scopes granted (every scope in open mode).
    pub scopes: Scopes,
    /// What `GET /events/queues` lists.
    pub reach: Reach,
}

/// The scope a request needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Reading: streams, info, offsets, lists.
    Subscribe,
    /// Writing: create, enqueue, close, delete, checkpoints.
    Publish,
    /// Cancelling: `subscribe` or `publish`.
    Either,
    /// Administering the server: token revocations (`/events/admin/…`).
    Admin,
}

impl Need {
    /// The scope a request needs, from its method and matched route: `GET`/`HEAD` read, a
    /// `POST` to a `…/cancel` route cancels, anything else writes. Routes added later are
    /// covered without being listed here.
    pub fn of(parts: &Parts) -> Need {
        let route = parts
            .extensions
            .get::<MatchedPath>()
            .map_or(parts.uri.path(), MatchedPath::as_str);
        if route.starts_with("/events/admin/") {
            Need::Admin
        } else if parts.method == Method::GET || parts.method == Method::HEAD {
            Need::Subscribe
        } else if parts.method == Method::POST && route.ends_with("/cancel") {
            Need::Either
        } else {
            Need::Publish
        }
    }

    fn granted_by(self, scopes: Scopes) -> bool {
        match self {
            Need::Subscribe => scopes.grants(Scopes::SUBSCRIBE),
            Need::Publish => scopes.grants(Scopes::PUBLISH),
            Need::Either => scopes.grants(Scopes::SUBSCRIBE) || scopes.grants(Scopes::PUBLISH),
            Need::Admin => scopes.contains(Scopes::ADMIN),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Need::Subscribe => "subscribe",
            Need::Publish => "publish",
            Need::Either => "subscribe or publish",
            Need::Admin => "admin",
        }
    }
}

impl Caller {
    /// Resolves a request's caller: authenticates it (token mode), checks the scope its
    /// method and route need, and picks its tenant.
    ///
    /// # Errors
    ///
    /// `401` for missing, malformed, forged or expired credentials (token mode); `403` for a
    /// token without the needed scope; `400` for an invalid tenant id or query string.
    pub fn resolve(parts: &Parts, state: &AppState) -> Result<Self, ApiError> {
        Self::resolve_for(parts, state, Need::of(parts))
    }

    /// As [`Caller::resolve`], for a route whose needed scope depends on more than its method
    /// and path (the A2A endpoint, whose JSON-RPC method says it).
    ///
    /// # Errors
    ///
    /// As [`Caller::resolve`].
    pub fn resolve_for(parts: &Parts, state: &AppState, need: Need) -> Result<Self, ApiError> {
        match &state.config().auth {
            Auth::Open(_) => Ok(Self {
                tenant: open_mode_tenant(parts)?,
                scopes: Scopes::ALL,
                reach: Reach::OwnTenant,
            }),
            Auth::Token(keys) => {
                let token = bearer_token(parts)?;
                let invalid = |e: crate::server::auth::TokenError| {
                    ApiError::unauthorized(e.to_string(), Some("invalid_token"))
                };
                let claims = keys.verify(&token).map_err(invalid)?;
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                claims
                    .check_lifetime(state.config().max_token_ttl, now)
                    .map_err(invalid)?;
                claims
                    .check_revocation(state.revocations().not_before(claims.tenant.as_str()))
                    .map_err(invalid)?;
                if !need.granted_by(claims.scopes) {
                    let has = if claims.scopes == Scopes::NONE {
                        "none".to_string()
                    } else {
                        claims.scopes.to_string()
                    };
                    return Err(ApiError::forbidden(
                        format!(
                            "insufficient scope: {} {} needs the {} scope; the token has: {has}",
                            parts.method,
                            parts.uri.path(),
                            need.name()
                        ),
                        need.name(),
                    ));
                }
                if claims.scopes.contains(Scopes::ADMIN) {
                    return Ok(match query(parts)?.get("tenant_id") {
                        Some(t) => Self {
                            tenant: TenantId::new(t)?,
                            scopes: claims.scopes,
                            reach: Reach::OwnTenant,
                        },
                        None => Self {
                            tenant: claims.tenant,
                            scopes: claims.scopes,
                            reach: Reach::AllTenants,
                        },
                    });
                }
                Ok(Self {
                    tenant: claims.tenant,
                    scopes: claims.scopes,
                    reach: Reach::OwnTenant,
                })
            }
        }
    }
}

impl Tenant {
    /// Resolves the tenant of a request (see [`Caller::resolve`]).
    ///
    /// # Errors
    ///
    /// As [`Caller::resolve`].
    pub fn resolve(parts: &Parts, state: &AppState) -> Result<Self, ApiError> {
        Caller::resolve(parts, state).map(|c| Self(c.tenant))
    }
}

fn query(parts: &Parts) -> Result<HashMap<String, String>, ApiError> {
    Query::<HashMap<String, String>>::try_from_uri(&parts.uri)
        .map(|Query(q)| q)
        .map_err(|e| ApiError::bad_request(format!("invalid query string: {}", e.body_text())))
}

fn open_mode_tenant(parts: &Parts) -> Result<TenantId, ApiError> {
    if let Some(value) = parts.headers.get(TENANT_HEADER) {
        let value = value
            .to_str()
            .map_err(|_| ApiError::bad_request("invalid tenant_id: X-Tenant-ID is not ASCII"))?;
        return Ok(TenantId::new(value)?);
    }
    match query(parts)?.get("tenant_id") {
        Some(value) => Ok(TenantId::new(value)?),
        None => Ok(TenantId::default_tenant()),
    }
}

/// The token of a request: `Authorization: Bearer <token>`, else `?access_token=`.
pub(crate) fn bearer_token(parts: &Parts) -> Result<String, ApiError> {
    let malformed = || {
        ApiError::unauthorized(
            "malformed Authorization header: expected `Bearer <token>`",
            Some("invalid_request"),
        )
    };
    if let Some(value) = parts.headers.get(header::AUTHORIZATION) {
        let value = value.to_str().map_err(|_| malformed())?;
        let (scheme, token) = value.trim().split_once(' ').ok_or_else(malformed)?;
        let token = token.trim();
        if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
            return Err(malformed());
        }
        return Ok(token.to_owned());
    }
    match query(parts)?.remove(ACCESS_TOKEN_PARAM) {
        Some(token) if !token.trim().is_empty() => Ok(token.trim().to_owned()),
        Some(_) => Err(ApiError::unauthorized(
            "malformed credentials: access_token is empty",
            Some("invalid_request"),
        )),
        None => Err(ApiError::unauthorized(
            "missing credentials: send `Authorization: Bearer <token>` or `?access_token=<token>`",
            None,
        )),
    }
}

impl FromRequestParts<AppState> for Tenant {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        Self::resolve(parts, state)
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        Self::resolve(parts, state)
    }
}
