//! A2A (Agent2Agent protocol) compatibility: an agent card and a JSON-RPC 2.0 endpoint through
//! which an unmodified A2A client follows and cancels our tasks.
//!
//! - `GET /.well-known/agent-card.json`: the A2A 1.0 agent card; `?version=0.3` gives the 0.3
//!   card (top-level `url`, which makes a client speak 0.3). The card names the full URL of
//!   `POST /a2a`, built from [`A2aConfig::public_url`] or else the request's `Host` header; a
//!   `?tenant_id=` on the card request is carried into that URL. The card holds no tenant data
//!   and needs no credentials, like `/healthz`.
//! - `POST /a2a`: `GetTask`, `SubscribeToTask`, `CancelTask`, `ListTasks` (1.0) and
//!   `tasks/get`, `tasks/resubscribe`, `tasks/cancel` (0.3, with `kind` discriminators,
//!   lowercase states and `final`; 0.3 has no JSON-RPC method for listing). Tenancy and
//!   credentials are resolved as on every other route ([`Caller`](crate::server::Caller));
//!   reading (listing too) needs `subscribe`, cancelling `subscribe` or `publish`. `ListTasks`
//!   pages with tokens that hold a sort key, not a position (`list`). JSON-RPC errors are answered with HTTP 200 (an A2A client loses the code of
//!   any other status).
//!
//! # Mapping
//!
//! Each of our events becomes one or two A2A stream results (`mapping`):
//!
//! | event | A2A |
//! |---|---|
//! | `status` | statusUpdate, state pending → SUBMITTED, working → WORKING, input-required → INPUT_REQUIRED, completed → COMPLETED, failed → FAILED, cancelled → CANCELED; the status message has a text part with `message` (when set) and a data part `{phase, message}` |
//! | `progress` | statusUpdate WORKING, data part `{current, total, percentage, step, details}` |
//! | `artifact` | artifactUpdate: `artifactId` = `artifact_id`, `name` = `artifact_type`, one data part with `data`; `lastChunk` = not `is_partial`, `append` = an earlier chunk of the same artifact was partial |
//! | `error` | recoverable: statusUpdate WORKING; non-recoverable: FAILED; text part `error_message`, data part `{error_type, error_message, error_code, context, recoverable}` |
//! | `complete` | artifactUpdate (`artifactId` = the event's `event_id`, `name` = `result`, data part `result`), then statusUpdate COMPLETED (text part `summary` when set, data part `{summary, execution_time_seconds}`) |
//!
//! Every update's `metadata` is `{offset, event_id, event_type}`; `contextId` is the task id.
//! A task is SUBMITTED until its first status-changing event.
//!
//! # Streams
//!
//! `SubscribeToTask` answers `text/event-stream` whose `data:` lines are JSON-RPC responses: the
//! task first (as of the resume point), then one result per mapped event. Frames carry no
//! `event:` name (an A2A client aborts on `event: error`); the frame completing an event carries
//! `id: <offset>`. The stream ends after the task's terminal event (or close, delete, expiry,
//! shutdown). A keepalive comment breaks every silence of [`A2A_KEEPALIVE_MAX`] (the A2A client
//! gives up after 5 s), or of [`ServerConfig::keepalive`] when that is shorter.
//!
//! Resume point: `Last-Event-ID: N` → N + 1, which wins over `params.metadata.from_offset`;
//! by default the queue's latest offset (the task, then what happens next). Subscribing to a
//! finished task (resume point past its terminal event) is error -32004.
//!
//! [`ServerConfig::keepalive`]: crate::server::ServerConfig::keepalive

mod card;
mod list;
mod mapping;
mod rpc;

use std::time::Duration;

pub(in crate::server) use card::agent_card;
pub(in crate::server) use rpc::rpc;

/// Longest silence on an A2A stream: a keepalive comment is sent at least this often.
pub const A2A_KEEPALIVE_MAX: Duration = Duration::from_secs(3);

/// Appended to the card's description: A2A has no standard cursor yet.
pub const RESUME_NOTE: &str = "Resume a SubscribeToTask stream with the Last-Event-ID header \
     (the offset of the last event received) or params.metadata.from_offset (the first offset \
     to receive); every update carries its offset in metadata.offset.";

/// Settings of the A2A agent card.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct A2aConfig {
    /// The card's `name`. Default `eventqueue`.
    pub name: String,
    /// The card's `description`; [`RESUME_NOTE`] is always appended. Default: a sentence on
    /// what this server does.
    pub description: String,
    /// The card's `version`. Default: this crate's version.
    pub version: String,
    /// The server's public base URL (`https://events.example.com`), from which the card's
    /// JSON-RPC URL is built as `{public_url}/a2a`. Default: none, the request's `Host` header
    /// (`http://{host}/a2a`).
    pub public_url: Option<String>,
}

impl Default for A2aConfig {
    fn default() -> Self {
        Self {
            name: "eventqueue".to_string(),
            description: "Durable event log of task progress: follow a task's status, progress \
                          and artifacts live, and cancel it."
                .to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            public_url: None,
        }
    }
}

/// Checks a public base URL for [`A2aConfig::public_url`]: `http://` or `https://`, a host,
/// no query or fragment. Returns it without a trailing `/`.
///
/// # Errors
///
/// A message naming what is wrong.
pub fn check_public_url(url: &str) -> Result<String, String> {
    let trimmed = url.trim().trim_end_matches('/');
    let bad = |why: &str| format!("a2a_public_url: {why}, got {url:?}");
    let uri: axum::http::Uri = trimmed.parse().map_err(|_| bad("not a valid URL"))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err(bad("must start with http:// or https://")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(bad("needs a host"));
    }
    if uri.query().is_some() || trimmed.contains('#') {
        return Err(bad("must not have a query or fragment"));
    }
    Ok(trimmed.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_urls_are_checked() {
        assert_eq!(
            check_public_url("https://events.example.com/").unwrap(),
            "https://events.example.com"
        );
        for bad in ["events.example.com", "ftp://x", "http://x/?a=1", "http://"] {
            assert!(check_public_url(bad).is_err(), "{bad}");
        }
    }
}
