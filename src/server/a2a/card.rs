//! `GET /.well-known/agent-card.json`: the 1.0 card, or the 0.3 one with `?version=0.3`.

use axum::extract::{Query, State};
use axum::http::{HeaderMap, Uri, header};
use axum::response::Response;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::RESUME_NOTE;
use super::mapping::Version;
use crate::TenantId;
use crate::server::AppState;
use crate::server::error::ApiError;

/// Query parameters of the card.
#[derive(Debug, Deserialize)]
pub(in crate::server) struct CardParams {
    version: Option<String>,
    tenant_id: Option<String>,
}

/// `GET /.well-known/agent-card.json`.
pub(in crate::server) async fn agent_card(
    State(state): State<AppState>,
    headers: HeaderMap,
    uri: Uri,
    query: Result<Query<CardParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(params) = query
        .map_err(|e| ApiError::bad_request(format!("invalid query string: {}", e.body_text())))?;
    let version = match params.version.as_deref().map(str::trim) {
        None | Some("1.0" | "1" | "") => Version::V1,
        Some("0.3" | "0.3.0") => Version::V03,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "version: expected 1.0 or 0.3, got {:?}",
                other.chars().take(40).collect::<String>()
            )));
        }
    };
    let mut url = format!("{}/a2a", base_url(&state, &headers, &uri)?);
    if let Some(tenant) = params.tenant_id {
        let tenant = TenantId::new(tenant)?;
        url.push_str("?tenant_id=");
        url.push_str(tenant.as_str());
    }
    Ok(crate::server::json(&card(&state, version, &url)))
}

/// `{public_url}` without a trailing `/`, else `http://{Host}` (`https://` when the server
/// serves TLS; over HTTP/2 the host is the request's `:authority`, as there is no `Host`).
fn base_url(state: &AppState, headers: &HeaderMap, uri: &Uri) -> Result<String, ApiError> {
    if let Some(url) = &state.config().a2a.public_url {
        return Ok(url.trim_end_matches('/').to_string());
    }
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.parse::<axum::http::uri::Authority>().ok())
        .or_else(|| uri.authority().cloned())
        .ok_or_else(|| {
            ApiError::bad_request(
                "the agent card needs a valid Host header, or a configured a2a_public_url",
            )
        })?;
    let scheme = if state.config().tls.is_some() {
        "https"
    } else {
        "http"
    };
    Ok(format!("{scheme}://{host}"))
}

fn card(state: &AppState, v: Version, url: &str) -> Value {
    let config = &state.config().a2a;
    let description = if config.description.trim().is_empty() {
        RESUME_NOTE.to_string()
    } else {
        format!("{} {RESUME_NOTE}", config.description.trim_end())
    };
    let skill = json!({
        "id": "task-progress",
        "name": "Task progress",
        "description": "List tasks (ListTasks), follow a task's status, progress, artifacts \
                        and result (GetTask, SubscribeToTask), and ask its producer to stop \
                        (CancelTask). The task id is the eventqueue task id.",
        "tags": ["progress", "events", "tasks"],
    });
    let token_mode = state.config().auth.is_token_mode();
    let mut out = Map::new();
    out.insert("name".into(), config.name.clone().into());
    out.insert("description".into(), description.into());
    out.insert("version".into(), config.version.clone().into());
    match v {
        Version::V1 => {
            out.insert(
                "supportedInterfaces".into(),
                json!([{"url": url, "protocolBinding": "JSONRPC", "protocolVersion": "1.0"}]),
            );
        }
        Version::V03 => {
            out.insert("url".into(), url.into());
            out.insert("preferredTransport".into(), "JSONRPC".into());
            out.insert("protocolVersion".into(), "0.3.0".into());
        }
    }
    out.insert(
        "capabilities".into(),
        json!({"streaming": true, "pushNotifications": false}),
    );
    out.insert("defaultInputModes".into(), json!(["application/json"]));
    out.insert("defaultOutputModes".into(), json!(["application/json"]));
    out.insert("skills".into(), json!([skill]));
    if token_mode {
        let description = "HS256 JWT with the claims tenant_id, scope (subscribe, publish) and exp";
        match v {
            Version::V1 => {
                out.insert(
                    "securitySchemes".into(),
                    json!({"bearer": {"httpAuthSecurityScheme": {
                        "scheme": "Bearer", "bearerFormat": "JWT", "description": description,
                    }}}),
                );
                out.insert(
                    "securityRequirements".into(),
                    json!([{"schemes": {"bearer": {"list": []}}}]),
                );
            }
            Version::V03 => {
                out.insert(
                    "securitySchemes".into(),
                    json!({"bearer": {
                        "type": "http", "scheme": "bearer", "bearerFormat": "JWT",
                        "description": description,
                    }}),
                );
                out.insert("security".into(), json!([{"bearer": []}]));
            }
        }
    }
    Value::Object(out)
}
