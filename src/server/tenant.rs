//! Who is calling: the one place a request's tenant is resolved.
//!
//! Every handler that touches queues takes a [`Tenant`]; none reads tenant headers or query
//! parameters itself. In open mode (no auth secret) the tenant comes from the `X-Tenant-ID`
//! header, else the `?tenant_id=` query parameter, else `default`. Token mode replaces the body
//! of [`Tenant::resolve`] (tenant from the token, `?tenant_id=` only for admins) without
//! touching a handler.

use std::collections::HashMap;

use axum::extract::{FromRequestParts, Query};
use axum::http::request::Parts;

use crate::ids::TenantId;
use crate::server::AppState;
use crate::server::error::ApiError;

/// Header naming the tenant in open mode.
pub const TENANT_HEADER: &str = "x-tenant-id";

/// The tenant a request acts for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant(pub TenantId);

impl Tenant {
    /// Resolves the tenant of a request.
    ///
    /// # Errors
    ///
    /// `400` when the header is not UTF-8, the query string is malformed, or the id breaks the
    /// id rule.
    pub fn resolve(parts: &Parts, _state: &AppState) -> Result<Self, ApiError> {
        if let Some(value) = parts.headers.get(TENANT_HEADER) {
            let value = value.to_str().map_err(|_| {
                ApiError::bad_request("invalid tenant_id: X-Tenant-ID is not ASCII")
            })?;
            return Ok(Self(TenantId::new(value)?));
        }
        let query = Query::<HashMap<String, String>>::try_from_uri(&parts.uri)
            .map_err(|e| ApiError::bad_request(format!("invalid query string: {e}")))?;
        match query.get("tenant_id") {
            Some(value) => Ok(Self(TenantId::new(value)?)),
            None => Ok(Self(TenantId::default_tenant())),
        }
    }
}

impl FromRequestParts<AppState> for Tenant {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        Self::resolve(parts, state)
    }
}
