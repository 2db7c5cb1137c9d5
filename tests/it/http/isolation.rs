//! Tenant isolation as a property: whatever tenant A sends — any route, any scope, naming
//! tenant B in the header or the query, guessing B's queue names — no answer carries a byte of
//! B's events or queue names, B's queues never answer differently from queues that do not
//! exist, and B's data never changes.

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use eventqueue::{TaskId, TenantId};
use futures_util::StreamExt;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{Value, json};
use tower::ServiceExt;

use super::app::{App, Req, token};
use super::{complete, working};

/// B's secret in every event it publishes.
const MARKER: &str = "SECRET-OF-GLOBEX";
/// B's queues that A never names.
const HIDDEN: [&str; 2] = ["b-hidden-1", "b-hidden-2"];
/// B's queues that A guesses.
const SHARED: [&str; 2] = ["shared-1", "shared-2"];
/// Names A uses.
const NAMES: [&str; 5] = ["a-1", "a-2", "shared-1", "shared-2", "nobody"];

#[derive(Debug, Clone)]
struct Attempt {
    route: usize,
    name: usize,
    scopes: usize,
    token_in_query: bool,
    header_b: bool,
    query_b: bool,
    from_offset: Option<u64>,
}

fn attempt() -> impl Strategy<Value = Attempt> {
    (
        0..10usize,
        0..NAMES.len(),
        0..3usize,
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        proptest::option::of(0..4u64),
    )
        .prop_map(
            |(route, name, scopes, token_in_query, header_b, query_b, from_offset)| Attempt {
                route,
                name,
                scopes,
                token_in_query,
                header_b,
                query_b,
                from_offset,
            },
        )
}

impl Attempt {
    fn name(&self) -> &'static str {
        NAMES[self.name]
    }

    /// Whether the route names a queue (everything but list and create).
    fn names_a_queue(&self) -> bool {
        !matches!(self.route, 8 | 9)
    }

    fn request(&self) -> Req {
        let n = self.name();
        let (method, path, body): (&str, String, Option<String>) = match self.route {
            0 => ("GET", format!("/events/workflows/{n}"), None),
            1 => ("GET", format!("/events/ingestion/{n}"), None),
            2 => ("GET", format!("/events/queues/{n}"), None),
            3 => ("GET", format!("/events/queues/{n}/offset"), None),
            4 => (
                "POST",
                format!("/events/queues/{n}/events"),
                Some(working(1).to_string()),
            ),
            5 => ("POST", format!("/events/queues/{n}/close"), None),
            6 => ("DELETE", format!("/events/queues/{n}"), None),
            7 => (
                "POST",
                format!("/events/workflows/{n}/cancel"),
                Some(r#"{"reason":"probe"}"#.into()),
            ),
            8 => ("GET", "/events/queues".into(), None),
            _ => (
                "POST",
                "/events/queues".into(),
                Some(json!({ "task_id": n }).to_string()),
            ),
        };
        let scopes = ["subscribe", "publish", "subscribe publish"][self.scopes];
        let tok = token("acme", scopes);
        let mut query = Vec::new();
        if self.query_b {
            query.push("tenant_id=globex".to_string());
        }
        if let Some(o) = self.from_offset {
            query.push(format!("from_offset={o}"));
        }
        if self.token_in_query {
            query.push(format!("access_token={tok}"));
        }
        let uri = if query.is_empty() {
            path
        } else {
            format!("{path}?{}", query.join("&"))
        };
        let mut req = Req::new(method, &uri);
        if !self.token_in_query {
            req = req.bearer(&tok);
        }
        if self.header_b {
            req = req.header("x-tenant-id", "globex");
        }
        if let Some(b) = body {
            req = req.body(b);
        }
        req
    }
}

/// Sends `req`; reads the whole body, or for a stream every chunk until it ends or stays
/// quiet for a moment (a replay arrives at once; this only bounds open streams).
async fn send_reading_streams(app: &App, req: &Req) -> (StatusCode, Vec<u8>) {
    let mut builder = Request::builder()
        .method(req.method.as_str())
        .uri(req.uri.as_str());
    for (k, v) in &req.headers {
        builder = builder.header(k.as_str(), v.as_str());
    }
    let request = builder
        .body(req.body.clone().map_or_else(Body::empty, Body::from))
        .unwrap();
    let resp = app.router.clone().oneshot(request).await.unwrap();
    let status = resp.status();
    let mut body = resp.into_body().into_data_stream();
    let mut out = Vec::new();
    while let Ok(Some(chunk)) = tokio::time::timeout(Duration::from_millis(50), body.next()).await {
        out.extend_from_slice(&chunk.unwrap());
    }
    (status, out)
}

/// B's queues as the manager holds them, times excluded.
fn b_state(app: &App) -> Vec<Value> {
    let globex = TenantId::new("globex").unwrap();
    app.state
        .manager()
        .list_queues(Some(&globex))
        .into_iter()
        .map(|info| {
            let mut v = serde_json::to_value(&info).unwrap();
            v.as_object_mut().unwrap().remove("last_activity");
            v
        })
        .collect()
}

async fn setup() -> App {
    let app = App::token_mode().await;
    let b = token("globex", "subscribe publish");
    for name in HIDDEN.iter().chain(&SHARED) {
        app.create(&b, name).await;
        let events = json!({"events": [
            {"event_type": "status", "state": "working", "message": MARKER, "phase": name},
            {"event_type": "artifact", "artifact_type": MARKER, "data": {"secret": MARKER}},
        ]});
        let r = app
            .call(
                &b,
                "POST",
                &format!("/events/queues/{name}/events"),
                Some(&events.to_string()),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK);
    }
    // One of B's queues is finished and one closed, so that "finished" and "closed" answers
    // (204, 409) would show if they leaked.
    let r = app
        .call(
            &b,
            "POST",
            "/events/queues/shared-2/events",
            Some(&complete().to_string()),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = app
        .call(&b, "POST", "/events/queues/shared-1/close", None)
        .await;
    assert_eq!(r.status, StatusCode::OK);
    app
}

#[test]
fn tenant_a_never_sees_tenant_b() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let app = rt.block_on(setup());
    let before = b_state(&app);
    let acme = TenantId::new("acme").unwrap();
    let mut runner = TestRunner::new(Config {
        cases: 48,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&proptest::collection::vec(attempt(), 1..10), |attempts| {
            rt.block_on(async {
                for a in &attempts {
                    let task = TaskId::new(a.name()).unwrap();
                    let owned = app.state.manager().get_queue(&acme, &task).is_some();
                    let req = a.request();
                    let (status, body) = send_reading_streams(&app, &req).await;
                    let text = String::from_utf8_lossy(&body);
                    for secret in [MARKER, "globex", HIDDEN[0], HIDDEN[1]] {
                        assert!(
                            !text.contains(secret),
                            "{a:?} → {status}: {secret} leaked in {text}"
                        );
                    }
                    if a.names_a_queue() && !owned {
                        // B's queue (or none at all): refused for scope, or not found.
                        assert!(
                            status == StatusCode::NOT_FOUND || status == StatusCode::FORBIDDEN,
                            "{a:?} → {status}: {text}"
                        );
                    }
                    if a.route == 9 && a.scopes != 0 && !owned {
                        // B's queue of the same name is no obstacle: A gets its own.
                        assert_eq!(status, StatusCode::CREATED, "{a:?}: {text}");
                        assert!(app.state.manager().get_queue(&acme, &task).is_some());
                    }
                    assert_eq!(b_state(&app), before, "{a:?} changed B's queues");
                }
            });
            Ok(())
        })
        .unwrap();
    // B still reads all of its events.
    rt.block_on(async {
        let b = token("globex", "subscribe");
        for name in HIDDEN.iter().chain(&SHARED) {
            let r = app
                .call(&b, "GET", &format!("/events/queues/{name}"), None)
                .await;
            assert_eq!(r.status, StatusCode::OK);
            assert!(r.json()["event_count"].as_u64().unwrap() >= 2);
        }
    });
}
