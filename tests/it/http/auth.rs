//! Token mode: the credentials matrix (401 / 403 / 404), admin reach, `?access_token=` on SSE,
//! the tenant header ignored, CORS, and the limits that answer 429.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::StatusCode;
use eventqueue::TenantId;
use eventqueue::server::{Scopes, TokenKeys};
use serde_json::{Value, json};

use super::app::{App, Req, keys, token, token_config};
use super::{complete, working};
use crate::helpers::{self, SseReader, TestServer};

/// Every route that touches a queue, on `wf-1`, with a body where it takes one.
fn queue_routes() -> Vec<(&'static str, &'static str, Option<String>)> {
    let ev = working(0).to_string();
    vec![
        ("GET", "/events/workflows/wf-1", None),
        ("GET", "/events/ingestion/wf-1", None),
        ("GET", "/events/queues/wf-1", None),
        ("GET", "/events/queues/wf-1/offset", None),
        ("POST", "/events/workflows/wf-1/cancel", None),
        ("POST", "/events/ingestion/wf-1/cancel", None),
        ("POST", "/events/queues/wf-1/events", Some(ev)),
        ("POST", "/events/queues/wf-1/close", None),
        ("DELETE", "/events/queues/wf-1", None),
        ("GET", "/events/queues", None),
        (
            "POST",
            "/events/queues",
            Some(r#"{"task_id":"wf-2"}"#.into()),
        ),
    ]
}

fn request(method: &str, uri: &str, body: &Option<String>) -> Req {
    let req = Req::new(method, uri);
    match body {
        Some(b) => req.body(b.clone()),
        None => req,
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// base64url without padding, for hand-made tokens.
fn b64url(data: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(ABC[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// A token with `header` and `claims` but the signature of `signed_by` (a real token): what
/// an attacker who edits a token's payload sends.
fn forge(header: &Value, claims: &Value, signed_by: &str) -> String {
    let sig = signed_by.rsplit('.').next().unwrap();
    format!(
        "{}.{}.{sig}",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes())
    )
}

/// Asserts that the queue `wf-1` of acme is untouched: no event, open, not cancelled.
async fn assert_untouched(app: &App) {
    let r = app
        .call(
            &token("acme", "subscribe"),
            "GET",
            "/events/queues/wf-1",
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let info = r.json();
    assert_eq!(info["latest_offset"], 0);
    assert_eq!(info["is_closed"], false);
    assert_eq!(info["is_cancelled"], false);
    assert_eq!(
        app.state
            .manager()
            .list_queues(None)
            .iter()
            .map(|q| q.task_id.to_string())
            .collect::<Vec<_>>(),
        ["wf-1"]
    );
}

async fn acme_app() -> App {
    let app = App::token_mode().await;
    app.create(&token("acme", "publish"), "wf-1").await;
    app
}

#[tokio::test]
async fn bad_credentials_are_401_with_a_bearer_challenge_on_every_queue_route() {
    let app = acme_app().await;
    let valid = token("acme", "subscribe publish");
    let other_secret = TokenKeys::from_secret(b"another-secret-another-secret-0123456789")
        .unwrap()
        .mint(
            &TenantId::new("acme").unwrap(),
            Scopes::ALL,
            Duration::from_secs(3600),
        )
        .unwrap();
    let expired = keys()
        .mint_at(
            &TenantId::new("acme").unwrap(),
            Scopes::ALL,
            now() - 3600,
            now() - 7200,
        )
        .unwrap();
    let hs = json!({"alg": "HS256", "typ": "JWT"});
    let tampered = forge(
        &hs,
        &json!({"tenant_id": "globex", "scope": "subscribe publish admin", "exp": now() + 3600}),
        &valid,
    );
    let alg_none = format!(
        "{}.{}.",
        b64url(json!({"alg": "none", "typ": "JWT"}).to_string().as_bytes()),
        b64url(
            json!({"tenant_id": "acme", "scope": "subscribe publish", "exp": now() + 3600})
                .to_string()
                .as_bytes()
        )
    );
    // Signed with the right secret but with claims the server must refuse.
    let mint_raw = |claims: Value| sign_claims(&claims);
    let no_exp = mint_raw(json!({"tenant_id": "acme", "scope": "subscribe publish"}));
    let no_tenant = mint_raw(json!({"scope": "subscribe publish", "exp": now() + 3600}));
    let no_scope = mint_raw(json!({"tenant_id": "acme", "exp": now() + 3600}));
    let bad_tenant =
        mint_raw(json!({"tenant_id": "../acme", "scope": "subscribe", "exp": now() + 3600}));
    let cases: Vec<(&str, Option<String>, &str)> = vec![
        ("no credentials", None, "missing credentials"),
        (
            "not a JWT",
            Some("Bearer not-a-jwt".into()),
            "malformed token",
        ),
        (
            "basic auth",
            Some("Basic YWNtZTpwdw==".into()),
            "Authorization",
        ),
        ("empty bearer", Some("Bearer ".into()), "Authorization"),
        (
            "wrong signature",
            Some(format!("Bearer {other_secret}")),
            "signature",
        ),
        ("expired", Some(format!("Bearer {expired}")), "expired"),
        (
            "tampered payload",
            Some(format!("Bearer {tampered}")),
            "signature",
        ),
        (
            "alg none",
            Some(format!("Bearer {alg_none}")),
            "unsupported token algorithm",
        ),
        ("no exp", Some(format!("Bearer {no_exp}")), "exp"),
        (
            "no tenant_id",
            Some(format!("Bearer {no_tenant}")),
            "tenant_id",
        ),
        ("no scope", Some(format!("Bearer {no_scope}")), "scope"),
        (
            "invalid tenant_id",
            Some(format!("Bearer {bad_tenant}")),
            "tenant_id",
        ),
    ];
    for (what, header, needle) in &cases {
        for (method, uri, body) in queue_routes() {
            let mut req = request(method, uri, &body);
            if let Some(value) = header {
                req = req.header("authorization", value);
            }
            let r = app.send(&req).await;
            r.assert_error(StatusCode::UNAUTHORIZED, needle);
            let challenge = r
                .header("www-authenticate")
                .unwrap_or_else(|| panic!("{what}: {method} {uri} without WWW-Authenticate"));
            assert!(challenge.starts_with("Bearer"), "{what}: {challenge}");
            // The token never comes back in the answer.
            if let Some(value) = header {
                let token = value.trim_start_matches("Bearer ").trim();
                if token.len() > 8 {
                    assert!(!String::from_utf8_lossy(&r.body).contains(token), "{what}");
                }
            }
        }
        // The same credentials in ?access_token= are refused alike.
        if let Some(value) = header
            && let Some(t) = value.strip_prefix("Bearer ")
            && !t.is_empty()
        {
            let r = app
                .send(&Req::new(
                    "GET",
                    &format!("/events/workflows/wf-1?access_token={t}"),
                ))
                .await;
            r.assert_error(StatusCode::UNAUTHORIZED, needle);
        }
    }
    assert_untouched(&app).await;
}

/// Signs arbitrary `claims` with the test secret (HS256), so tests can make tokens the minting
/// API would never produce.
fn sign_claims(claims: &Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(super::app::SECRET),
    )
    .unwrap()
}

#[tokio::test]
async fn a_hand_signed_token_with_good_claims_is_accepted() {
    // Guards the signer above: the refusals in the matrix must come from the claims.
    let app = acme_app().await;
    let t = sign_claims(&json!({"tenant_id": "acme", "scope": "subscribe", "exp": now() + 3600}));
    let r = app.call(&t, "GET", "/events/queues/wf-1", None).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.json());
}

#[tokio::test]
async fn health_and_metrics_need_no_token() {
    let app = App::token_mode().await;
    for uri in ["/healthz", "/metrics"] {
        let r = app.send(&Req::new("GET", uri)).await;
        assert_eq!(r.status, StatusCode::OK, "{uri}");
    }
}

#[tokio::test]
async fn a_missing_scope_is_403_naming_it() {
    let app = acme_app().await;
    let reader = token("acme", "subscribe");
    let writer = token("acme", "publish");
    for (method, uri, body) in queue_routes() {
        let is_cancel = uri.ends_with("/cancel");
        let is_read = method == "GET";
        for (tok, has) in [(&reader, "subscribe"), (&writer, "publish")] {
            let allowed = is_cancel || (is_read == (has == "subscribe"));
            if allowed {
                continue;
            }
            let r = app.send(&request(method, uri, &body).bearer(tok)).await;
            let need = if is_read { "subscribe" } else { "publish" };
            r.assert_error(StatusCode::FORBIDDEN, need);
            let challenge = r.header("www-authenticate").unwrap();
            assert!(
                challenge.contains("insufficient_scope") && challenge.contains(need),
                "{challenge}"
            );
        }
    }
    assert_untouched(&app).await;
    // Either scope may cancel, as the person watching a task may stop it.
    let r = app
        .call(&reader, "POST", "/events/workflows/wf-1/cancel", None)
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = app
        .call(&writer, "POST", "/events/ingestion/wf-1/cancel", None)
        .await;
    assert_eq!(r.status, StatusCode::OK);
    // A token whose scope claim names nothing known can do nothing.
    let nothing =
        sign_claims(&json!({"tenant_id": "acme", "scope": "read write", "exp": now() + 3600}));
    let r = app
        .call(&nothing, "POST", "/events/workflows/wf-1/cancel", None)
        .await;
    r.assert_error(StatusCode::FORBIDDEN, "none");
}

#[tokio::test]
async fn another_tenants_queue_is_404_on_every_route_and_absent_from_lists() {
    let app = acme_app().await;
    let globex = token("globex", "subscribe publish");
    for (method, uri, body) in queue_routes() {
        if uri == "/events/queues" {
            continue;
        }
        let r = app.send(&request(method, uri, &body).bearer(&globex)).await;
        assert_eq!(
            r.status,
            StatusCode::NOT_FOUND,
            "{method} {uri}: {:?}",
            String::from_utf8_lossy(&r.body)
        );
        // The same answer as for a queue that exists nowhere: existence never leaks.
        let missing = uri.replace("wf-1", "wf-9");
        let r2 = app
            .send(&request(method, &missing, &body).bearer(&globex))
            .await;
        assert_eq!(r2.status, r.status, "{method} {uri}");
        assert_eq!(r2.detail().replace("wf-9", "wf-1"), r.detail());
    }
    let list = app
        .call(&globex, "GET", "/events/queues", None)
        .await
        .json();
    assert_eq!(list, json!([]));
    assert_untouched(&app).await;
}

#[tokio::test]
async fn the_tenant_header_and_query_are_ignored_in_token_mode() {
    let app = App::token_mode().await;
    let acme = token("acme", "subscribe publish");
    let r = app
        .send(
            &Req::new("POST", "/events/queues?tenant_id=globex")
                .bearer(&acme)
                .header("x-tenant-id", "globex")
                .body(r#"{"task_id":"wf-1"}"#),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert_eq!(r.json()["tenant_id"], "acme");
    // Even an invalid tenant header is ignored rather than a way in.
    let r = app
        .send(
            &Req::new("GET", "/events/queues/wf-1?tenant_id=../x")
                .bearer(&acme)
                .header("x-tenant-id", "globex"),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["tenant_id"], "acme");
    // Globex, naming acme in header and query, still sees only its own tenant.
    let globex = token("globex", "subscribe publish");
    let r = app
        .send(
            &Req::new("GET", "/events/queues/wf-1?tenant_id=acme")
                .bearer(&globex)
                .header("x-tenant-id", "acme"),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = app
        .send(
            &Req::new("GET", "/events/queues?tenant_id=acme")
                .bearer(&globex)
                .header("x-tenant-id", "acme"),
        )
        .await;
    assert_eq!(r.json(), json!([]));
}

#[tokio::test]
async fn an_admin_acts_across_tenants() {
    let app = App::token_mode().await;
    app.create(&token("acme", "publish"), "wf-1").await;
    app.create(&token("globex", "publish"), "wf-2").await;
    let admin = token("ops", "admin");
    // No ?tenant_id=: every tenant's queues.
    let all = app.call(&admin, "GET", "/events/queues", None).await.json();
    let names: Vec<(String, String)> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|q| {
            (
                q["tenant_id"].as_str().unwrap().into(),
                q["task_id"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(
        names,
        [
            ("acme".to_string(), "wf-1".to_string()),
            ("globex".into(), "wf-2".into())
        ]
    );
    // ?tenant_id= narrows the list and reaches that tenant's queues.
    let list = app
        .call(&admin, "GET", "/events/queues?tenant_id=globex", None)
        .await
        .json();
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["task_id"], "wf-2");
    let r = app
        .call(
            &admin,
            "POST",
            "/events/queues/wf-1/events?tenant_id=acme",
            Some(&working(1).to_string()),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.json());
    let r = app
        .call(&admin, "GET", "/events/queues/wf-1?tenant_id=acme", None)
        .await;
    assert_eq!(r.json()["latest_offset"], 1);
    let r = app
        .send(&Req::new("GET", "/events/workflows/wf-1?tenant_id=acme").bearer(&admin))
        .await;
    assert_eq!(r.status, StatusCode::OK);
    // Without ?tenant_id= an admin acts as its own tenant.
    let r = app.call(&admin, "GET", "/events/queues/wf-1", None).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    // An invalid ?tenant_id= from an admin is a 400 naming it.
    let r = app
        .call(&admin, "GET", "/events/queues?tenant_id=..", None)
        .await;
    r.assert_error(StatusCode::BAD_REQUEST, "tenant_id");
    // The acme owner sees the admin's event.
    let r = app
        .call(
            &token("acme", "subscribe"),
            "GET",
            "/events/queues/wf-1/offset",
            None,
        )
        .await;
    assert_eq!(r.json()["offset"], 1);
}

/// A browser's EventSource cannot set headers: the token rides in `?access_token=`, over a
/// real socket.
#[tokio::test]
async fn an_event_source_streams_with_access_token() {
    let server = TestServer::start(token_config()).await;
    let acme = token("acme", "subscribe publish");
    let client = helpers::client();
    let r = client
        .post(server.url("/events/queues"))
        .bearer_auth(&acme)
        .json(&json!({"task_id": "wf-1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = client
        .post(server.url("/events/queues/wf-1/events"))
        .bearer_auth(&acme)
        .json(&json!({"events": [working(0), complete()]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    let reader = token("acme", "subscribe");
    let resp = client
        .get(server.url(&format!(
            "/events/workflows/wf-1?from_offset=0&access_token={reader}"
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut sse = SseReader::new(resp);
    let connected = sse.next_event().await.unwrap();
    assert_eq!(connected.json()["tenant_id"], "acme");
    let ids: Vec<String> = sse.rest().await.into_iter().filter_map(|f| f.id).collect();
    assert_eq!(ids, ["0", "1"]);

    // Without the token, or with another tenant's, the stream is refused.
    let r = client
        .get(server.url("/events/workflows/wf-1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let globex = token("globex", "subscribe");
    let r = client
        .get(server.url(&format!("/events/workflows/wf-1?access_token={globex}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    server.stop().await;
}

#[tokio::test]
async fn cors_preflight_allows_configured_origins_only() {
    let mut config = token_config();
    config.cors_origins = vec!["https://dash.example".parse().unwrap()];
    let app = App::with(config).await;
    let preflight = |origin: &str| {
        Req::new("OPTIONS", "/events/workflows/wf-1")
            .header("origin", origin)
            .header("access-control-request-method", "GET")
            .header(
                "access-control-request-headers",
                "authorization,last-event-id,content-type,x-tenant-id",
            )
    };
    let r = app.send(&preflight("https://dash.example")).await;
    assert!(r.status.is_success(), "{}", r.status);
    assert_eq!(
        r.header("access-control-allow-origin").as_deref(),
        Some("https://dash.example")
    );
    let allowed = r.header("access-control-allow-headers").unwrap();
    for h in [
        "authorization",
        "last-event-id",
        "content-type",
        "x-tenant-id",
    ] {
        assert!(allowed.contains(h), "{allowed} lacks {h}");
    }
    let r = app.send(&preflight("https://evil.example")).await;
    assert_eq!(r.header("access-control-allow-origin"), None);
    // An error answer carries the CORS header too, so a dashboard can read the 401.
    let r = app
        .send(&Req::new("GET", "/events/queues").header("origin", "https://dash.example"))
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        r.header("access-control-allow-origin").as_deref(),
        Some("https://dash.example")
    );

    // None configured (the default): no CORS headers at all.
    let app = App::token_mode().await;
    let r = app.send(&preflight("https://dash.example")).await;
    assert_eq!(r.header("access-control-allow-origin"), None);
}

#[tokio::test]
async fn streams_beyond_the_limits_are_429_with_retry_after() {
    let mut config = token_config();
    config.max_sse_streams = 3;
    config.max_sse_streams_per_tenant = 2;
    let app = App::with(config).await;
    let acme = token("acme", "subscribe publish");
    let globex = token("globex", "subscribe publish");
    app.create(&acme, "wf-1").await;
    app.create(&globex, "wf-1").await;
    let stream = |t: &str| Req::new("GET", "/events/workflows/wf-1").bearer(t);

    let a1 = app.open(&stream(&acme)).await;
    let a2 = app.open(&stream(&acme)).await;
    assert_eq!((a1.status(), a2.status()), (StatusCode::OK, StatusCode::OK));
    let r = app.send(&stream(&acme)).await;
    r.assert_error(StatusCode::TOO_MANY_REQUESTS, "acme");
    assert!(r.header("retry-after").unwrap().parse::<u64>().unwrap() > 0);
    let g1 = app.open(&stream(&globex)).await;
    assert_eq!(g1.status(), StatusCode::OK);
    // The server total (3) is reached although globex has one stream.
    let r = app.send(&stream(&globex)).await;
    r.assert_error(StatusCode::TOO_MANY_REQUESTS, "at most 3");
    assert_eq!(app.state.open_streams(), 3);
    // A stream that ends gives its slot back.
    drop(a1);
    assert_eq!(app.state.open_streams(), 2);
    let g2 = app.open(&stream(&globex)).await;
    assert_eq!(g2.status(), StatusCode::OK);
    drop((a2, g1, g2));
    assert_eq!(app.state.open_streams(), 0);
}

#[tokio::test]
async fn queues_beyond_the_per_tenant_limit_are_429_and_not_created() {
    let mut config = token_config();
    config.max_queues_per_tenant = 2;
    let app = App::with(config).await;
    let acme = token("acme", "subscribe publish");
    app.create(&acme, "q1").await;
    app.create(&acme, "q2").await;
    let r = app
        .call(&acme, "POST", "/events/queues", Some(r#"{"task_id":"q3"}"#))
        .await;
    r.assert_error(StatusCode::TOO_MANY_REQUESTS, "too many queues");
    assert!(r.header("retry-after").is_some());
    assert_eq!(app.state.manager().list_queues(None).len(), 2);
    // Another tenant has its own allowance.
    app.create(&token("globex", "publish"), "q1").await;
    // Deleting one frees a place.
    let r = app.call(&acme, "DELETE", "/events/queues/q1", None).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    app.create(&acme, "q3").await;
}

#[tokio::test]
async fn open_mode_refuses_a_public_address_unless_told() {
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let (manager, _dir) = helpers::manager().await;
    let state = eventqueue::server::AppState::new(manager, helpers::server_config());
    let err = eventqueue::server::serve(state, listener, async {})
        .await
        .unwrap_err();
    assert!(err.to_string().contains("loopback"), "{err}");
}
