//! Every JSON endpoint and error, through `router()` with `oneshot` (no sockets).

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use eventqueue::server::{AppState, ServerConfig, router};
use serde_json::{Value, json};
use tempfile::TempDir;
use tower::ServiceExt;

use super::{complete, working};
use crate::helpers;

struct App {
    router: Router,
    state: AppState,
    _dir: TempDir,
}

struct Reply {
    status: StatusCode,
    content_type: Option<String>,
    body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }

    fn detail(&self) -> String {
        self.json()["detail"]
            .as_str()
            .expect("error body without detail")
            .to_string()
    }
}

impl App {
    async fn new() -> Self {
        Self::with(helpers::server_config()).await
    }

    async fn with(config: ServerConfig) -> Self {
        let (manager, dir) = helpers::manager().await;
        let state = AppState::new(manager, config);
        Self {
            router: router(state.clone()),
            state,
            _dir: dir,
        }
    }

    async fn send(&self, req: Request<Body>) -> Reply {
        let resp = self.router.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let content_type = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_string());
        let body = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap()
            .to_vec();
        Reply {
            status,
            content_type,
            body,
        }
    }

    async fn call(&self, method: &str, uri: &str, body: Option<&str>) -> Reply {
        self.call_as(None, method, uri, body).await
    }

    async fn call_as(
        &self,
        tenant: Option<&str>,
        method: &str,
        uri: &str,
        body: Option<&str>,
    ) -> Reply {
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(t) = tenant {
            req = req.header("X-Tenant-ID", t);
        }
        let body = match body {
            Some(b) => Body::from(b.to_string()),
            None => Body::empty(),
        };
        self.send(req.body(body).unwrap()).await
    }

    async fn create(&self, task: &str) -> Value {
        let r = self
            .call(
                "POST",
                "/events/queues",
                Some(&json!({"task_id": task}).to_string()),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.json());
        r.json()
    }

    async fn publish(&self, task: &str, body: &Value) -> Reply {
        self.call(
            "POST",
            &format!("/events/queues/{task}/events"),
            Some(&body.to_string()),
        )
        .await
    }
}

fn assert_error(r: &Reply, status: StatusCode, needle: &str) {
    assert_eq!(r.status, status, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.content_type.as_deref(), Some("application/json"));
    let detail = r.detail();
    assert!(detail.contains(needle), "{detail:?} lacks {needle:?}");
}

#[tokio::test]
async fn healthz_answers_ok() {
    let app = App::new().await;
    let r = app.call("GET", "/healthz", None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json(), json!({"status": "ok"}));
}

#[tokio::test]
async fn unknown_routes_answer_json_404() {
    let app = App::new().await;
    let r = app.call("GET", "/nope", None).await;
    assert_error(&r, StatusCode::NOT_FOUND, "Not Found");
}

#[tokio::test]
async fn create_answers_201_with_queue_info() {
    let app = App::new().await;
    let r = app
        .call(
            "POST",
            "/events/queues",
            Some(r#"{"task_id":"wf-1","kind":"workflow","ttl_minutes":5,"max_buffer_size":7}"#),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let info = r.json();
    assert_eq!(info["task_id"], "wf-1");
    assert_eq!(info["tenant_id"], "default");
    assert_eq!(info["kind"], "workflow");
    assert_eq!(info["ttl_minutes"], 5.0);
    assert_eq!(info["max_buffer_size"], 7);
    assert_eq!(info["latest_offset"], 0);
    assert_eq!(info["is_closed"], false);
}

#[tokio::test]
async fn create_defaults_to_kind_task() {
    let app = App::new().await;
    let info = app.create("t1").await;
    assert_eq!(info["kind"], "task");
    assert_eq!(info["ttl_minutes"], 30.0);
    assert_eq!(info["max_buffer_size"], 1000);
}

#[tokio::test]
async fn create_of_an_existing_queue_is_409() {
    let app = App::new().await;
    app.create("t1").await;
    let r = app
        .call("POST", "/events/queues", Some(r#"{"task_id":"t1"}"#))
        .await;
    assert_error(&r, StatusCode::CONFLICT, "Queue already exists");
}

#[tokio::test]
async fn create_rejects_bad_input_naming_the_field() {
    let app = App::new().await;
    let cases = [
        (r#"{"task_id":".hidden"}"#, "task_id"),
        (r#"{"task_id":"a/b"}"#, "task_id"),
        (r#"{}"#, "task_id"),
        (r#"{"task_id":"t","kind":"job"}"#, "kind"),
        (r#"{"task_id":"t","ttl_minutes":-1}"#, "ttl_minutes"),
        (r#"{"task_id":"t","max_buffer_size":0}"#, "max_buffer_size"),
        (
            r#"{"task_id":"t","max_buffer_size":"x"}"#,
            "max_buffer_size",
        ),
        (r#"{"task_id":"t","colour":"red"}"#, "colour"),
        (r#"{"task_id":"#, "invalid JSON"),
        (r#"[1]"#, "JSON object"),
    ];
    for (body, needle) in cases {
        let r = app.call("POST", "/events/queues", Some(body)).await;
        assert_error(&r, StatusCode::BAD_REQUEST, needle);
    }
    let r = app.call("GET", "/events/queues", None).await;
    assert_eq!(r.json(), json!([]));
}

#[tokio::test]
async fn list_answers_the_tenants_queues() {
    let app = App::new().await;
    for (tenant, task) in [("t1", "a"), ("t1", "b"), ("t2", "a")] {
        let r = app
            .call_as(
                Some(tenant),
                "POST",
                "/events/queues",
                Some(&json!({"task_id": task}).to_string()),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED);
    }
    let by_header = app.call_as(Some("t1"), "GET", "/events/queues", None).await;
    let list = by_header.json();
    assert_eq!(list.as_array().unwrap().len(), 2);
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .all(|q| q["tenant_id"] == "t1")
    );
    let by_query = app.call("GET", "/events/queues?tenant_id=t2", None).await;
    let list = by_query.json();
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["tenant_id"], "t2");
    let default = app.call("GET", "/events/queues", None).await;
    assert_eq!(default.json(), json!([]));
}

#[tokio::test]
async fn the_header_names_the_tenant_before_the_query() {
    let app = App::new().await;
    app.call_as(
        Some("t1"),
        "POST",
        "/events/queues",
        Some(r#"{"task_id":"a"}"#),
    )
    .await;
    let r = app
        .call_as(Some("t1"), "GET", "/events/queues?tenant_id=t2", None)
        .await;
    assert_eq!(r.json().as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn an_invalid_tenant_is_400_naming_tenant_id() {
    let app = App::new().await;
    let r = app
        .call_as(Some("a b"), "GET", "/events/queues", None)
        .await;
    assert_error(&r, StatusCode::BAD_REQUEST, "tenant_id");
    let r = app.call("GET", "/events/queues?tenant_id=.x", None).await;
    assert_error(&r, StatusCode::BAD_REQUEST, "tenant_id");
}

/// Seed 55: queue info of a populated queue has the documented fields, in order.
#[tokio::test]
async fn queue_info_has_the_documented_fields() {
    let app = App::new().await;
    app.create("wf-1").await;
    app.publish("wf-1", &working(0)).await;
    app.publish("wf-1", &working(1)).await;
    let r = app.call("GET", "/events/queues/wf-1", None).await;
    assert_eq!(r.status, StatusCode::OK);
    let text = String::from_utf8(r.body.clone()).unwrap();
    let fields = [
        "task_id",
        "tenant_id",
        "kind",
        "event_count",
        "subscriber_count",
        "is_closed",
        "is_cancelled",
        "cancel_reason",
        "is_finished",
        "created_at",
        "last_activity",
        "ttl_minutes",
        "max_buffer_size",
        "first_offset",
        "latest_offset",
    ];
    let info = r.json();
    assert_eq!(info.as_object().unwrap().len(), fields.len(), "{info}");
    let positions: Vec<usize> = fields
        .iter()
        .map(|f| {
            text.find(&format!("\"{f}\":"))
                .unwrap_or_else(|| panic!("{f}"))
        })
        .collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "{text}");
    assert_eq!(info["event_count"], 2);
    assert_eq!(info["latest_offset"], 2);
    assert_eq!(info["first_offset"], 0);
    assert_eq!(info["cancel_reason"], Value::Null);
    assert!(info["created_at"].as_str().unwrap().ends_with('Z'));
}

/// Seed 56: a fresh queue's offset is 0.
#[tokio::test]
async fn offset_of_a_fresh_queue_is_zero_then_counts_events() {
    let app = App::new().await;
    app.create("t1").await;
    let r = app.call("GET", "/events/queues/t1/offset", None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json(), json!({"task_id": "t1", "offset": 0}));
    app.publish(
        "t1",
        &json!({"events": [working(0), working(1), working(2)]}),
    )
    .await;
    let r = app.call("GET", "/events/queues/t1/offset", None).await;
    assert_eq!(r.json(), json!({"task_id": "t1", "offset": 3}));
}

#[tokio::test]
async fn unknown_queues_are_404_with_the_seed_text() {
    let app = App::new().await;
    for (method, uri) in [
        ("GET", "/events/queues/ghost"),
        ("GET", "/events/queues/ghost/offset"),
        ("DELETE", "/events/queues/ghost"),
        ("POST", "/events/queues/ghost/close"),
    ] {
        let r = app.call(method, uri, None).await;
        assert_error(&r, StatusCode::NOT_FOUND, "No queue found for task ghost");
    }
    let r = app.publish("ghost", &working(0)).await;
    assert_error(&r, StatusCode::NOT_FOUND, "No queue found for task ghost");
}

#[tokio::test]
async fn bad_ids_in_paths_are_400_naming_the_field() {
    let app = App::new().await;
    for uri in [
        "/events/queues/.hidden",
        "/events/queues/a%20b",
        "/events/queues/a%2Fb/offset",
        "/events/workflows/.x",
        "/events/ingestion/%C3%A9/cancel",
    ] {
        let method = if uri.ends_with("cancel") {
            "POST"
        } else {
            "GET"
        };
        let r = app.call(method, uri, None).await;
        assert_error(&r, StatusCode::BAD_REQUEST, "task_id");
    }
    let long = "x".repeat(129);
    let r = app
        .call("GET", &format!("/events/queues/{long}"), None)
        .await;
    assert_error(&r, StatusCode::BAD_REQUEST, "task_id");
}

#[tokio::test]
async fn enqueue_one_event_or_a_batch() {
    let app = App::new().await;
    app.create("t1").await;
    let r = app.publish("t1", &working(0)).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        r.json(),
        json!({"offsets": [0], "latest_offset": 1, "cancelled": false})
    );
    let r = app
        .publish(
            "t1",
            &json!({"events": [working(1), working(2), complete()]}),
        )
        .await;
    assert_eq!(
        r.json(),
        json!({"offsets": [1, 2, 3], "latest_offset": 4, "cancelled": false})
    );
    let info = app.call("GET", "/events/queues/t1", None).await.json();
    assert_eq!(info["is_finished"], true);
}

#[tokio::test]
async fn enqueue_fills_in_ids_and_accepts_matching_ones() {
    let app = App::new().await;
    app.create("t1").await;
    let mut ev = working(0);
    ev["task_id"] = json!("t1");
    ev["tenant_id"] = json!("default");
    ev["event_id"] = json!("evt_mine");
    let r = app.publish("t1", &ev).await;
    assert_eq!(r.status, StatusCode::OK);
    // The same event id again appends nothing and answers the stored offset.
    let r = app.publish("t1", &ev).await;
    assert_eq!(r.json()["offsets"], json!([0]));
    assert_eq!(r.json()["latest_offset"], 1);
}

#[tokio::test]
async fn enqueue_reports_cancellation() {
    let app = App::new().await;
    app.create("wf-1").await;
    let r = app
        .call(
            "POST",
            "/events/workflows/wf-1/cancel",
            Some(r#"{"reason":"stop"}"#),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = app.publish("wf-1", &working(0)).await;
    assert_eq!(r.json()["cancelled"], true);
}

#[tokio::test]
async fn invalid_events_are_400_naming_the_field() {
    let app = App::new().await;
    app.create("t1").await;
    let cases = [
        (
            json!({"event_type": "progress", "current": 5, "total": 2}),
            "current",
        ),
        (json!({"event_type": "telemetry"}), "event_type"),
        (json!({"state": "working"}), "event_type"),
        (
            json!({"event_type": "artifact", "artifact_type": "x"}),
            "data",
        ),
        (
            json!({"event_type": "status", "state": "working", "task_id": "other"}),
            "task_id",
        ),
        (
            json!({"event_type": "status", "state": "working", "tenant_id": "other"}),
            "tenant_id",
        ),
        (
            json!({"event_type": "status", "state": "working", "event_id": "bad id"}),
            "event_id",
        ),
        (json!(42), "event"),
    ];
    for (ev, field) in cases {
        let r = app.publish("t1", &ev).await;
        assert_error(&r, StatusCode::BAD_REQUEST, field);
    }
    let r = app
        .call("POST", "/events/queues/t1/events", Some("{not json"))
        .await;
    assert_error(&r, StatusCode::BAD_REQUEST, "invalid JSON");
    let r = app.publish("t1", &json!({"events": 3})).await;
    assert_error(&r, StatusCode::BAD_REQUEST, "events");
    let r = app.call("GET", "/events/queues/t1/offset", None).await;
    assert_eq!(r.json()["offset"], 0);
}

#[tokio::test]
async fn a_batch_with_one_invalid_event_stores_none() {
    let app = App::new().await;
    app.create("t1").await;
    let bad = json!({"event_type": "progress", "current": 5, "total": 2});
    let r = app
        .publish("t1", &json!({"events": [working(0), bad, working(2)]}))
        .await;
    assert_error(&r, StatusCode::BAD_REQUEST, "events[1]");
    assert!(r.detail().contains("current"), "{}", r.detail());
    let r = app.call("GET", "/events/queues/t1/offset", None).await;
    assert_eq!(r.json()["offset"], 0);
}

#[tokio::test]
async fn an_oversized_body_is_413() {
    let mut config = helpers::server_config();
    config.max_body_bytes = 1024;
    let app = App::with(config).await;
    app.create("t1").await;
    let mut ev = working(0);
    ev["message"] = json!("x".repeat(2000));
    let r = app.publish("t1", &ev).await;
    assert_error(&r, StatusCode::PAYLOAD_TOO_LARGE, "1024");
    // Also when the length is not announced up front.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..10).map(|_| Ok(vec![b' '; 300])).collect();
    let req = Request::post("/events/queues/t1/events")
        .body(Body::from_stream(futures_util::stream::iter(chunks)))
        .unwrap();
    let r = app.send(req).await;
    assert_error(&r, StatusCode::PAYLOAD_TOO_LARGE, "1024");
}

#[tokio::test]
async fn an_oversized_event_is_413_and_stores_nothing() {
    let mut config = helpers::server_config();
    config.max_event_bytes = 300;
    let app = App::with(config).await;
    app.create("t1").await;
    let mut big = working(1);
    big["message"] = json!("x".repeat(400));
    let r = app.publish("t1", &big).await;
    assert_error(&r, StatusCode::PAYLOAD_TOO_LARGE, "300");
    let r = app
        .publish("t1", &json!({"events": [working(0), big]}))
        .await;
    assert_error(&r, StatusCode::PAYLOAD_TOO_LARGE, "events[1]");
    // Small events in a body larger than the event limit are fine.
    let r = app
        .publish(
            "t1",
            &json!({"events": [working(0), working(1), working(2), working(3)]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["offsets"], json!([0, 1, 2, 3]));
}

#[tokio::test]
async fn a_batch_over_the_event_count_limit_is_413() {
    let mut config = helpers::server_config();
    config.max_batch_events = 3;
    let app = App::with(config).await;
    app.create("t1").await;
    let events: Vec<Value> = (0..4).map(working).collect();
    let r = app.publish("t1", &json!({ "events": events })).await;
    assert_error(&r, StatusCode::PAYLOAD_TOO_LARGE, "at most 3");
}

#[tokio::test]
async fn close_answers_info_and_then_enqueue_is_409() {
    let app = App::new().await;
    app.create("t1").await;
    let r = app.call("POST", "/events/queues/t1/close", None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["is_closed"], true);
    assert_eq!(r.json()["task_id"], "t1");
    let again = app.call("POST", "/events/queues/t1/close", None).await;
    assert_eq!(again.status, StatusCode::OK);
    let r = app.publish("t1", &working(0)).await;
    assert_error(&r, StatusCode::CONFLICT, "closed");
}

#[tokio::test]
async fn delete_answers_204_then_the_queue_is_gone() {
    let app = App::new().await;
    app.create("t1").await;
    app.publish("t1", &working(0)).await;
    let r = app.call("DELETE", "/events/queues/t1", None).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert!(r.body.is_empty());
    let r = app.call("GET", "/events/queues/t1", None).await;
    assert_error(&r, StatusCode::NOT_FOUND, "No queue found for task t1");
    let r = app.call("DELETE", "/events/queues/t1", None).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}

/// Seed 51.
#[tokio::test]
async fn cancelling_a_workflow() {
    let app = App::new().await;
    app.create("workflow_123").await;
    let r = app
        .call(
            "POST",
            "/events/workflows/workflow_123/cancel",
            Some(r#"{"reason":"user asked"}"#),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        r.json(),
        json!({
            "task_id": "workflow_123",
            "cancelled": true,
            "message": "Workflow workflow_123 cancellation requested"
        })
    );
    let info = app
        .call("GET", "/events/queues/workflow_123", None)
        .await
        .json();
    assert_eq!(info["is_cancelled"], true);
    assert_eq!(info["cancel_reason"], "user asked");
}

/// Seed 52.
#[tokio::test]
async fn cancelling_an_ingestion_job_without_a_body() {
    let app = App::new().await;
    app.create("ingestion_456").await;
    let r = app
        .call("POST", "/events/ingestion/ingestion_456/cancel", None)
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        r.json(),
        json!({
            "task_id": "ingestion_456",
            "cancelled": true,
            "message": "Ingestion job ingestion_456 cancellation requested"
        })
    );
    let info = app
        .call("GET", "/events/queues/ingestion_456", None)
        .await
        .json();
    assert_eq!(info["is_cancelled"], true);
    assert_eq!(info["cancel_reason"], Value::Null);
}

/// Seeds 53 and 54.
#[tokio::test]
async fn cancelling_unknown_tasks_is_404_with_the_seed_texts() {
    let app = App::new().await;
    let r = app
        .call("POST", "/events/workflows/nope/cancel", None)
        .await;
    assert_error(
        &r,
        StatusCode::NOT_FOUND,
        "No active workflow found with ID nope",
    );
    let r = app
        .call("POST", "/events/ingestion/nope/cancel", None)
        .await;
    assert_error(
        &r,
        StatusCode::NOT_FOUND,
        "No active ingestion job found with ID nope",
    );
}

#[tokio::test]
async fn cancelling_a_finished_task_is_409() {
    let app = App::new().await;
    app.create("wf-1").await;
    app.publish("wf-1", &complete()).await;
    let r = app
        .call("POST", "/events/workflows/wf-1/cancel", None)
        .await;
    assert_error(&r, StatusCode::CONFLICT, "finished");
}

#[tokio::test]
async fn a_bad_cancel_body_is_400() {
    let app = App::new().await;
    app.create("wf-1").await;
    let r = app
        .call("POST", "/events/workflows/wf-1/cancel", Some("{oops"))
        .await;
    assert_error(&r, StatusCode::BAD_REQUEST, "invalid JSON");
    let r = app
        .call(
            "POST",
            "/events/workflows/wf-1/cancel",
            Some(r#"{"reason":3}"#),
        )
        .await;
    assert_error(&r, StatusCode::BAD_REQUEST, "reason");
}

/// Seed 47 (differs: 404 JSON instead of 200 with an error frame).
#[tokio::test]
async fn an_unknown_workflows_stream_is_404_json() {
    let app = App::new().await;
    let r = app.call("GET", "/events/workflows/ghost", None).await;
    assert_error(
        &r,
        StatusCode::NOT_FOUND,
        "No active workflow found with ID ghost",
    );
    let r = app.call("GET", "/events/ingestion/ghost", None).await;
    assert_error(
        &r,
        StatusCode::NOT_FOUND,
        "No active ingestion job found with ID ghost",
    );
}

#[tokio::test]
async fn invalid_resume_points_are_400() {
    let app = App::new().await;
    app.create("t1").await;
    let r = app
        .call("GET", "/events/workflows/t1?from_offset=-1", None)
        .await;
    assert_error(&r, StatusCode::BAD_REQUEST, "from_offset");
    let r = app
        .call("GET", "/events/workflows/t1?from_offset=abc", None)
        .await;
    assert_error(&r, StatusCode::BAD_REQUEST, "from_offset");
    for bad in ["x", "-3", "18446744073709551615"] {
        let req = Request::get("/events/workflows/t1")
            .header("Last-Event-ID", bad)
            .body(Body::empty())
            .unwrap();
        let r = app.send(req).await;
        assert_error(&r, StatusCode::BAD_REQUEST, "Last-Event-ID");
    }
}

#[tokio::test]
async fn a_resume_point_past_the_terminal_event_is_204() {
    let app = App::new().await;
    app.create("t1").await;
    app.publish(
        "t1",
        &json!({"events": [working(0), complete(), working(2)]}),
    )
    .await;
    let req = Request::get("/events/workflows/t1")
        .header("Last-Event-ID", "1")
        .body(Body::empty())
        .unwrap();
    assert_eq!(app.send(req).await.status, StatusCode::NO_CONTENT);
    let r = app
        .call("GET", "/events/ingestion/t1?from_offset=2", None)
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert!(r.body.is_empty());
}

#[tokio::test]
async fn a_resume_point_at_or_past_the_end_of_a_closed_queue_is_204() {
    let app = App::new().await;
    app.create("t1").await;
    app.publish("t1", &json!({"events": [working(0), working(1)]}))
        .await;
    let r = app.call("POST", "/events/queues/t1/close", None).await;
    assert_eq!(r.status, StatusCode::OK);
    let req = Request::get("/events/workflows/t1")
        .header("Last-Event-ID", "1")
        .body(Body::empty())
        .unwrap();
    assert_eq!(app.send(req).await.status, StatusCode::NO_CONTENT);
    for from in [2, 7] {
        let r = app
            .call(
                "GET",
                &format!("/events/ingestion/t1?from_offset={from}"),
                None,
            )
            .await;
        assert_eq!(r.status, StatusCode::NO_CONTENT, "from {from}");
        assert!(r.body.is_empty());
    }
    // Below the end the stream still replays what is there, then ends.
    let r = app
        .call("GET", "/events/workflows/t1?from_offset=1", None)
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(String::from_utf8_lossy(&r.body).contains("id: 1\n"));
}

#[tokio::test]
async fn another_tenants_queue_is_404_on_every_route() {
    let app = App::new().await;
    let r = app
        .call_as(
            Some("acme"),
            "POST",
            "/events/queues",
            Some(r#"{"task_id":"wf-1"}"#),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let ev = working(0).to_string();
    let routes: [(&str, &str, Option<&str>); 9] = [
        ("GET", "/events/queues/wf-1", None),
        ("GET", "/events/queues/wf-1/offset", None),
        ("POST", "/events/queues/wf-1/events", Some(&ev)),
        ("POST", "/events/queues/wf-1/close", None),
        ("DELETE", "/events/queues/wf-1", None),
        ("POST", "/events/workflows/wf-1/cancel", None),
        ("POST", "/events/ingestion/wf-1/cancel", None),
        ("GET", "/events/workflows/wf-1", None),
        ("GET", "/events/ingestion/wf-1", None),
    ];
    for tenant in [Some("globex"), None] {
        for (method, uri, body) in routes {
            let r = app.call_as(tenant, method, uri, body).await;
            assert_eq!(
                r.status,
                StatusCode::NOT_FOUND,
                "{method} {uri} as {tenant:?}"
            );
        }
        let list = app.call_as(tenant, "GET", "/events/queues", None).await;
        assert_eq!(list.json(), json!([]));
    }
    // Untouched for its owner.
    let info = app
        .call_as(Some("acme"), "GET", "/events/queues/wf-1", None)
        .await
        .json();
    assert_eq!(info["latest_offset"], 0);
    assert_eq!(info["is_closed"], false);
    assert_eq!(info["is_cancelled"], false);
}

/// Seed 57: end to end.
#[tokio::test]
async fn end_to_end_unknowns_and_listing() {
    let app = App::new().await;
    let r = app
        .call("POST", "/events/workflows/nope/cancel", None)
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = app.call("GET", "/events/queues/nope/offset", None).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = app.call("GET", "/events/queues", None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.json().is_array());
    let r = app.call("GET", "/events/queues/nope", None).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn after_manager_shutdown_writes_are_503() {
    let app = App::new().await;
    app.create("t1").await;
    app.state.manager().shutdown().await.unwrap();
    let r = app.publish("t1", &working(0)).await;
    assert_error(&r, StatusCode::SERVICE_UNAVAILABLE, "shutting down");
    let r = app
        .call("POST", "/events/queues", Some(r#"{"task_id":"t2"}"#))
        .await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn streams_after_shutdown_began_are_503() {
    let app = App::new().await;
    app.create("t1").await;
    app.state.shutdown_token().cancel();
    let r = app.call("GET", "/events/workflows/t1", None).await;
    assert_error(&r, StatusCode::SERVICE_UNAVAILABLE, "shutting down");
}

#[tokio::test]
async fn metrics_are_prometheus_text() {
    let app = App::new().await;
    app.create("t1").await;
    app.create("t2").await;
    app.publish("t1", &json!({"events": [working(0), working(1)]}))
        .await;
    app.call("POST", "/events/queues/t2/close", None).await;
    let r = app.call("GET", "/metrics", None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.content_type.unwrap().starts_with("text/plain"));
    let text = String::from_utf8(r.body).unwrap();
    for line in [
        "eventqueue_events_appended_total 2",
        "eventqueue_queues{state=\"open\"} 1",
        "eventqueue_queues{state=\"closed\"} 1",
        "eventqueue_subscribers 0",
        "eventqueue_sse_streams 0",
        "eventqueue_lag_recoveries_total 0",
        "eventqueue_gap_notices_total 0",
    ] {
        assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
    }
    for name in [
        "eventqueue_commits_total",
        "eventqueue_commit_batch_size_bucket",
        "eventqueue_commit_seconds_count",
        "eventqueue_log_folds_total",
        "eventqueue_log_fold_seconds_bucket",
        "eventqueue_store_size_bytes",
        "eventqueue_queues_finished",
    ] {
        assert!(text.contains(name), "{name} missing");
    }
    let size: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("eventqueue_store_size_bytes "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(size > 0);
}
