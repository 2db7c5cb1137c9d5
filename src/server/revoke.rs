//! `/events/admin/revocations`: revoking a tenant's tokens by a not-before time (tokens issued
//! before it get `401`), for tokens that leaked or people who left. Needs the `admin` scope.
//!
//! A revocation is kept by the store (redb, memory or Redis), so it survives a restart and
//! holds on every node sharing the store: each node reloads the revocations every
//! [`super::ServerConfig::revocation_refresh`]; the node that took the request applies it
//! before answering.

use axum::extract::State;
use axum::response::Response;
use serde::{Deserialize, Serialize};

use crate::event::Timestamp;
use crate::ids::TenantId;
use crate::server::auth::LEEWAY;
use crate::server::error::ApiError;
use crate::server::routes::{RawBody, parse_json};
use crate::server::tenant::Caller;
use crate::server::{AppState, json};

/// The body of `POST /events/admin/revocations`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeRequest {
    tenant_id: String,
    /// RFC 3339; default now.
    #[serde(default)]
    not_before: Option<String>,
}

/// One tenant's revocation, as answered.
#[derive(Serialize)]
struct Revocation {
    tenant_id: String,
    not_before: String,
}

/// `POST /events/admin/revocations` `{"tenant_id", "not_before"?}`: the tenant's tokens issued
/// before `not_before` (default: now) get `401` from now on, on this node at once and on the
/// others within their refresh interval. A time in the future is refused (it would also
/// refuse tokens not minted yet); an earlier time than a previous revocation replaces it.
pub(super) async fn revoke(
    State(state): State<AppState>,
    _admin: Caller,
    RawBody(body): RawBody,
) -> Result<Response, ApiError> {
    let value = parse_json(&state, &body)?;
    let request: RevokeRequest = serde_json::from_value(value).map_err(|e| {
        ApiError::bad_request(format!(
            "the body must be {{\"tenant_id\": str, \"not_before\"?: RFC 3339 time}}: {e}"
        ))
    })?;
    let tenant = TenantId::new(&request.tenant_id)?;
    let now = Timestamp::now();
    let not_before = match &request.not_before {
        None => now,
        Some(text) => Timestamp::parse_rfc3339(text)
            .map_err(|e| ApiError::bad_request(format!("not_before: {e}")))?,
    };
    let leeway = i64::try_from(LEEWAY.as_micros()).unwrap_or(i64::MAX);
    if not_before.as_micros() > now.as_micros().saturating_add(leeway) {
        return Err(ApiError::bad_request(format!(
            "not_before: {} is in the future; a revocation applies to tokens already issued",
            not_before.to_rfc3339()
        )));
    }
    if not_before.as_micros() < 0 {
        return Err(ApiError::bad_request("not_before: before 1970"));
    }
    {
        // Under the cache's lock: a reload that read the store before this write cannot
        // replace the cache after it.
        let _loading = state.revocations().loading.lock().await;
        state.manager().revoke_tokens(&tenant, not_before).await?;
        let all = state.manager().token_revocations().await?;
        state.revocations().replace(all);
    }
    tracing::warn!(
        tenant = %tenant,
        not_before = %not_before.to_rfc3339(),
        "tokens revoked"
    );
    Ok(json(&Revocation {
        tenant_id: tenant.to_string(),
        not_before: not_before.to_rfc3339(),
    }))
}

/// `GET /events/admin/revocations`: `{"revocations": [{"tenant_id", "not_before"}]}`, every
/// tenant's not-before time as stored, by tenant id.
pub(super) async fn list(
    State(state): State<AppState>,
    _admin: Caller,
) -> Result<Response, ApiError> {
    let mut all = state.manager().token_revocations().await?;
    all.sort();
    let revocations: Vec<Revocation> = all
        .into_iter()
        .map(|(tenant_id, us)| Revocation {
            tenant_id,
            not_before: Timestamp::from_micros(i64::try_from(us).unwrap_or(i64::MAX)).to_rfc3339(),
        })
        .collect();
    Ok(json(&serde_json::json!({ "revocations": revocations })))
}
