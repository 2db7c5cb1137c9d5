//! Token bounds and revocation (issue 26, item 5): tokens longer-lived than
//! `max_token_ttl`, without `exp` or issued in the future are `401`; a tenant's tokens issued
//! before its not-before time are `401` once an admin revoked them — on the node that took the
//! revocation at once, on another node over the same store within its refresh interval, and
//! after a restart.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::StatusCode;
use eventqueue::server::Scopes;
use eventqueue::{Config, QueueManager, StorageBackend, TenantId};
use serde_json::{Value, json};

use super::app::{App, Req, keys, token, token_config};
use crate::helpers::{self, HANG_GUARD, TestServer};

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Signs arbitrary `claims` with the test secret.
fn sign(claims: &Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(super::app::SECRET),
    )
    .unwrap()
}

/// A token of `tenant` with every scope but admin, issued at `iat`, valid for an hour.
fn issued_at(tenant: &str, iat: u64) -> String {
    keys()
        .mint_at(
            &TenantId::new(tenant).unwrap(),
            Scopes::SUBSCRIBE.union(Scopes::PUBLISH),
            iat + 3600,
            iat,
        )
        .unwrap()
}

const DAY: u64 = 86_400;

#[tokio::test]
async fn tokens_beyond_the_lifetime_bound_are_401_naming_why() {
    let app = App::token_mode().await;
    let acme = |claims: Value| {
        let mut c = json!({"tenant_id": "acme", "scope": "subscribe publish"});
        c.as_object_mut()
            .unwrap()
            .extend(claims.as_object().unwrap().clone());
        sign(&c)
    };
    let t = now();
    let refused = [
        (
            acme(json!({"iat": t, "exp": t + 31 * DAY})),
            "token lifetime too long: it is valid for 31d, this server accepts at most 30d",
        ),
        // Without iat the lifetime counts from now.
        (
            acme(json!({"exp": t + 40 * DAY})),
            "token lifetime too long",
        ),
        (
            acme(json!({"iat": t, "exp": u64::MAX})),
            "token lifetime too long",
        ),
        // An issue time in the future would escape the bound and revocations.
        (
            acme(json!({"iat": t + 10 * DAY, "exp": t + 10 * DAY + 60})),
            "iat is in the future",
        ),
        (acme(json!({"iat": t})), "exp"),
    ];
    for (tok, needle) in refused {
        let r = app.call(&tok, "GET", "/events/queues", None).await;
        r.assert_error(StatusCode::UNAUTHORIZED, needle);
        assert_eq!(
            r.header("www-authenticate").as_deref(),
            Some("Bearer realm=\"eventqueue\", error=\"invalid_token\"")
        );
    }
    // Within the bound: accepted, also without iat.
    for tok in [
        acme(json!({"iat": t, "exp": t + 30 * DAY})),
        acme(json!({"exp": t + 29 * DAY})),
    ] {
        let r = app.call(&tok, "GET", "/events/queues", None).await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.json());
    }

    // The bound is the server's setting.
    let mut config = token_config();
    config.max_token_ttl = Duration::from_secs(600);
    let strict = App::with(config).await;
    let r = strict
        .call(&token("acme", "subscribe"), "GET", "/events/queues", None)
        .await;
    r.assert_error(StatusCode::UNAUTHORIZED, "accepts at most 10m");
    let short = acme(json!({"iat": t, "exp": t + 300}));
    let r = strict.call(&short, "GET", "/events/queues", None).await;
    assert_eq!(r.status, StatusCode::OK);
}

/// `POST /events/admin/revocations` with `admin`, as `eventqueue revoke` sends it.
async fn revoke(app: &App, admin: &str, body: Value) -> super::app::Reply {
    app.call(
        admin,
        "POST",
        "/events/admin/revocations",
        Some(&body.to_string()),
    )
    .await
}

#[tokio::test]
async fn a_revocation_refuses_the_tenants_older_tokens_and_nothing_else() {
    let app = App::token_mode().await;
    let admin = token("ops", "admin");
    let old = issued_at("acme", now() - 60);
    let other = issued_at("globex", now() - 60);
    app.create(&old, "wf-1").await;

    // Only an admin token may revoke.
    let r = revoke(&app, &old, json!({"tenant_id": "acme"})).await;
    r.assert_error(StatusCode::FORBIDDEN, "needs the admin scope");
    let r = app
        .call(&old, "GET", "/events/admin/revocations", None)
        .await;
    r.assert_error(StatusCode::FORBIDDEN, "admin");
    // Bad requests name what is wrong and revoke nothing.
    let future = "2999-01-01T00:00:00Z";
    let r = revoke(
        &app,
        &admin,
        json!({"tenant_id": "acme", "not_before": future}),
    )
    .await;
    r.assert_error(StatusCode::BAD_REQUEST, "is in the future");
    let r = revoke(&app, &admin, json!({"tenant_id": "../acme"})).await;
    r.assert_error(StatusCode::BAD_REQUEST, "tenant_id");
    let r = revoke(&app, &admin, json!({"tenant": "acme"})).await;
    r.assert_error(StatusCode::BAD_REQUEST, "tenant_id");
    let r = app.call(&old, "GET", "/events/queues/wf-1", None).await;
    assert_eq!(r.status, StatusCode::OK);

    let r = revoke(&app, &admin, json!({"tenant_id": "acme"})).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.json());
    assert_eq!(r.json()["tenant_id"], "acme");
    let not_before = r.json()["not_before"].as_str().unwrap().to_string();

    // The old token is refused on every route, saying why; the query-string form too.
    let r = app.call(&old, "GET", "/events/queues/wf-1", None).await;
    r.assert_error(StatusCode::UNAUTHORIZED, "token revoked");
    assert!(r.detail().contains(&not_before), "{}", r.detail());
    let r = app
        .send(&Req::new(
            "GET",
            &format!("/events/workflows/wf-1?access_token={old}"),
        ))
        .await;
    r.assert_error(StatusCode::UNAUTHORIZED, "token revoked");
    let r = app
        .call(
            &old,
            "POST",
            "/events/queues/wf-1/events",
            Some(&super::working(0).to_string()),
        )
        .await;
    r.assert_error(StatusCode::UNAUTHORIZED, "token revoked");
    // A token without iat cannot show it is newer: refused too.
    let no_iat = sign(&json!({"tenant_id": "acme", "scope": "subscribe", "exp": now() + 600}));
    let r = app.call(&no_iat, "GET", "/events/queues", None).await;
    r.assert_error(StatusCode::UNAUTHORIZED, "token revoked");
    // Another tenant's tokens, and acme's newer ones, still work.
    let r = app.call(&other, "GET", "/events/queues", None).await;
    assert_eq!(r.status, StatusCode::OK);
    let newer = issued_at("acme", now() + 2);
    let r = app.call(&newer, "GET", "/events/queues/wf-1", None).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.json());

    // Listed; an earlier time replaces it and lifts part of the revocation.
    let r = app
        .call(&admin, "GET", "/events/admin/revocations", None)
        .await;
    assert_eq!(
        r.json()["revocations"],
        json!([{"tenant_id": "acme", "not_before": not_before}])
    );
    let r = revoke(
        &app,
        &admin,
        json!({"tenant_id": "acme", "not_before": "2020-01-01T00:00:00Z"}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = app.call(&old, "GET", "/events/queues/wf-1", None).await;
    assert_eq!(r.status, StatusCode::OK);
}

/// Waits (polling; the server's refresh interval is short) until `probe` answers `status`.
async fn until_status<F: Future<Output = StatusCode>>(status: StatusCode, probe: impl Fn() -> F) {
    tokio::time::timeout(HANG_GUARD, async {
        while probe().await != status {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("never answered {status}"));
}

#[tokio::test]
async fn a_revocation_holds_on_every_node_of_a_shared_store() {
    // Two servers over one (in-memory) store: a revocation through one holds on the other
    // once it reloaded, within its refresh interval.
    let mut store = Config::new("unused");
    store.storage = StorageBackend::Memory;
    let manager = QueueManager::open(store).await.unwrap();
    let mut config = token_config();
    config.revocation_refresh = Duration::from_millis(50);
    let start = |manager: QueueManager, config| async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = eventqueue::server::AppState::new(manager, config);
        let stop = state.shutdown_token().clone();
        tokio::spawn(eventqueue::server::serve(
            state,
            listener,
            std::future::pending(),
        ));
        (addr, stop)
    };
    let (a, stop_a) = start(manager.clone(), config.clone()).await;
    let (b, stop_b) = start(manager.clone(), config).await;
    let http = helpers::client();
    let old = issued_at("acme", now() - 60);
    let status = |addr: std::net::SocketAddr| {
        let http = http.clone();
        let old = old.clone();
        async move {
            http.get(format!("http://{addr}/events/queues"))
                .bearer_auth(&old)
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    assert_eq!(status(b).await, StatusCode::OK);
    let r = http
        .post(format!("http://{a}/events/admin/revocations"))
        .bearer_auth(token("ops", "admin"))
        .json(&json!({"tenant_id": "acme"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(status(a).await, StatusCode::UNAUTHORIZED);
    until_status(StatusCode::UNAUTHORIZED, || status(b)).await;
    stop_a.cancel();
    stop_b.cancel();
}

#[tokio::test]
async fn a_revocation_survives_a_restart() {
    let server = TestServer::start(token_config()).await;
    let http = helpers::client();
    let old = issued_at("acme", now() - 60);
    let r = http
        .post(server.url("/events/admin/revocations"))
        .bearer_auth(token("ops", "admin"))
        .json(&json!({"tenant_id": "acme"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let dir = server.stop().await;
    let server = TestServer::start_in(dir, token_config()).await;
    // Refused from the first request on: loaded before the server accepts connections.
    let r = http
        .get(server.url("/events/queues"))
        .bearer_auth(&old)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let detail = r.json::<Value>().await.unwrap()["detail"].to_string();
    assert!(detail.contains("token revoked"), "{detail}");
    drop(server.stop().await);
}
