//! The web dashboard: one HTML page, one script and one stylesheet, compiled into the binary
//! (no build step, no CDN, works offline) and served at `/`, `/dashboard/app.js` and
//! `/dashboard/app.css`.
//!
//! The assets need no credentials: they hold no tenant data. The page asks for a token (token
//! mode) or a tenant (open mode) and calls the API like any other client, so every call it
//! makes is authenticated and scoped as usual. `GET /dashboard/mode` tells the page which mode
//! the server runs in (`{"mode": "token"}` or `{"mode": "open"}`) — what any request's `401`
//! would tell anyway — so that it asks for a token before calling the API rather than after a
//! refused call.
//!
//! Every asset is sent with a strict `Content-Security-Policy` (scripts and styles from this
//! origin only, no inline code, API calls to this origin only, no framing), `nosniff` and
//! `no-referrer` (an `?access_token=` in a URL must not leak through a `Referer`).

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderName, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::server::{AppState, Auth};

const INDEX_HTML: &str = include_str!("dashboard/index.html");
const APP_JS: &str = include_str!("dashboard/app.js");
const APP_CSS: &str = include_str!("dashboard/app.css");

/// The page's Content-Security-Policy. `img-src data:` admits the page's empty inline icon
/// only (it stops the browser asking for `/favicon.ico`).
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// The dashboard's routes, merged into [`crate::server::router`].
pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(index))
        .route("/dashboard/app.js", get(app_js))
        .route("/dashboard/app.css", get(app_css))
        .route("/dashboard/mode", get(mode))
}

async fn mode(State(state): State<AppState>) -> Response {
    let mode = match state.config().auth {
        Auth::Open(_) => "open",
        Auth::Token(_) => "token",
    };
    let mut response = crate::server::json(&serde_json::json!({ "mode": mode }));
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

async fn app_js() -> Response {
    asset("text/javascript; charset=utf-8", APP_JS)
}

async fn app_css() -> Response {
    asset("text/css; charset=utf-8", APP_CSS)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(CONTENT_SECURITY_POLICY),
            ),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
            (
                header::REFERRER_POLICY,
                HeaderValue::from_static("no-referrer"),
            ),
            (
                HeaderName::from_static("x-frame-options"),
                HeaderValue::from_static("DENY"),
            ),
            // Always revalidated: a new binary serves a new page at once.
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        body,
    )
        .into_response()
}
