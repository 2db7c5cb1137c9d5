//! The web dashboard's page and assets: served without credentials even in token mode, with
//! the right content types and a strict Content-Security-Policy, while the API it calls still
//! needs a token. (The page itself is tested in a real browser by `tests/browser/`.)

use axum::http::StatusCode;

use super::app::{App, Req, token};

/// The dashboard's routes, their content types, and a string each body must contain.
const ASSETS: [(&str, &str, &str); 3] = [
    ("/", "text/html; charset=utf-8", "/dashboard/app.js"),
    (
        "/dashboard/app.js",
        "text/javascript; charset=utf-8",
        "new EventSource(",
    ),
    ("/dashboard/app.css", "text/css; charset=utf-8", ".timeline"),
];

#[tokio::test]
async fn assets_are_served_without_a_token_in_token_mode() {
    let app = App::token_mode().await;
    for (path, content_type, needle) in ASSETS {
        let reply = app.send(&Req::new("GET", path)).await;
        assert_eq!(reply.status, StatusCode::OK, "{path}");
        assert_eq!(reply.header("content-type").as_deref(), Some(content_type));
        let body = String::from_utf8(reply.body.clone()).expect("assets are UTF-8");
        assert!(body.contains(needle), "{path} lacks {needle:?}");
        let csp = reply
            .header("content-security-policy")
            .unwrap_or_else(|| panic!("{path} has no Content-Security-Policy"));
        assert!(csp.contains("script-src 'self'"), "{csp}");
        assert!(!csp.contains("unsafe-inline"), "{csp}");
        assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
        assert_eq!(
            reply.header("x-content-type-options").as_deref(),
            Some("nosniff")
        );
        assert_eq!(
            reply.header("referrer-policy").as_deref(),
            Some("no-referrer")
        );
    }
}

#[tokio::test]
async fn the_mode_route_says_open_or_token_without_credentials() {
    let token_app = App::token_mode().await;
    let reply = token_app.send(&Req::new("GET", "/dashboard/mode")).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json(), serde_json::json!({"mode": "token"}));
    let open_app = App::open_mode().await;
    let reply = open_app.send(&Req::new("GET", "/dashboard/mode")).await;
    assert_eq!(reply.json(), serde_json::json!({"mode": "open"}));
}

#[tokio::test]
async fn the_page_has_no_inline_script_or_style() {
    let app = App::open_mode().await;
    let reply = app.send(&Req::new("GET", "/")).await;
    assert_eq!(reply.status, StatusCode::OK);
    let html = String::from_utf8(reply.body).expect("UTF-8");
    // Under the CSP, inline code would not run: every script and style is a file.
    assert!(!html.contains("<script>"), "inline script");
    assert!(!html.contains("<style"), "inline style");
    assert!(!html.contains(" style="), "inline style attribute");
    assert!(
        !html
            .split_whitespace()
            .any(|w| w.starts_with("on") && w.contains('=')),
        "inline event handler"
    );
}

#[tokio::test]
async fn the_api_behind_the_dashboard_still_needs_a_token() {
    let app = App::token_mode().await;
    let anonymous = app.send(&Req::new("GET", "/events/queues")).await;
    anonymous.assert_error(StatusCode::UNAUTHORIZED, "");
    let t = token("acme", "subscribe");
    let allowed = app
        .send(&Req::new("GET", "/events/queues").bearer(&t))
        .await;
    assert_eq!(allowed.status, StatusCode::OK);
    // Assets under /dashboard/ that do not exist are 404, like any unknown path.
    let missing = app.send(&Req::new("GET", "/dashboard/nope.js")).await;
    missing.assert_error(StatusCode::NOT_FOUND, "not found");
}
