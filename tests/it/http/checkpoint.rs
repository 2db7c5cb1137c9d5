//! The checkpoint routes: `POST /events/workflows/{id}/checkpoints` (save),
//! `GET /events/workflows/{id}/checkpoints` (list) and
//! `GET /events/workflows/{id}/checkpoints/latest` — tenant-scoped, scope-checked, clear `400`s
//! for bad input, and the events a save emits reaching an SSE watcher.

use axum::http::StatusCode;
use serde_json::{Value, json};

use super::app::{App, token};
use crate::helpers::{self, SseReader, TestServer};

const SAVE: &str = "/events/workflows/wf-1/checkpoints";
const LATEST: &str = "/events/workflows/wf-1/checkpoints/latest";

fn body() -> String {
    json!({
        "status": "running",
        "current_phase": 1,
        "total_phases": 2,
        "tasks": [
            {"task_id": "search", "status": "completed", "result": {"hits": 3}},
            {"task_id": "summarise", "status": "pending"}
        ],
        "state": {"query": "cats"}
    })
    .to_string()
}

#[tokio::test]
async fn a_save_answers_201_and_latest_returns_it() {
    let app = App::token_mode().await;
    let acme = token("acme", "subscribe publish");
    app.create(&acme, "wf-1").await;
    let r = app.call(&acme, "POST", SAVE, Some(&body())).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.json());
    let saved = r.json();
    assert_eq!(saved["workflow_id"], "wf-1");
    assert_eq!(saved["seq"], 0);
    assert_eq!(
        (
            saved["status_offset"].clone(),
            saved["progress_offset"].clone()
        ),
        (json!(0), json!(1))
    );
    assert_eq!(saved["cancelled"], false);
    let id = saved["checkpoint_id"].as_str().unwrap().to_string();

    let r = app.call(&acme, "GET", LATEST, None).await;
    assert_eq!(r.status, StatusCode::OK);
    let latest = r.json();
    assert_eq!(latest["checkpoint_id"], id);
    assert_eq!(latest["tenant_id"], "acme");
    assert_eq!(latest["status"], "running");
    assert_eq!(
        latest["tasks"][0],
        json!({"task_id": "search", "status": "completed", "result": {"hits": 3}})
    );
    assert_eq!(latest["tasks"][1]["result"], Value::Null);
    assert_eq!(latest["state"], json!({"query": "cats"}));
    assert!(latest["created_at"].as_str().unwrap().ends_with('Z'));

    // The queue holds the two events; a cancel shows in the next save's answer.
    let r = app
        .call(&acme, "GET", "/events/queues/wf-1/offset", None)
        .await;
    assert_eq!(r.json()["offset"], 2);
    app.call(&acme, "POST", "/events/workflows/wf-1/cancel", None)
        .await;
    let r = app.call(&acme, "POST", SAVE, Some(&body())).await;
    assert_eq!(r.json()["cancelled"], true);
}

#[tokio::test]
async fn a_save_without_a_queue_is_201_and_latest_without_one_is_404() {
    let app = App::token_mode().await;
    let acme = token("acme", "subscribe publish");
    let r = app.call(&acme, "GET", LATEST, None).await;
    r.assert_error(
        StatusCode::NOT_FOUND,
        "No checkpoint found for workflow wf-1",
    );
    let r = app
        .call(&acme, "POST", SAVE, Some(r#"{"status": "pending"}"#))
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert_eq!(r.json()["status_offset"], Value::Null);
    assert!(app.state.manager().list_queues(None).is_empty());
    let r = app.call(&acme, "GET", LATEST, None).await;
    assert_eq!(r.json()["status"], "pending");
}

#[tokio::test]
async fn the_list_holds_every_save_oldest_first_and_only_the_tenants_own() {
    let app = App::token_mode().await;
    let acme = token("acme", "subscribe publish");
    let globex = token("globex", "subscribe");
    let r = app.call(&acme, "GET", SAVE, None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json(), json!({"workflow_id": "wf-1", "checkpoints": []}));
    app.create(&acme, "wf-1").await;
    let first = app.call(&acme, "POST", SAVE, Some(&body())).await.json();
    let second = app
        .call(&acme, "POST", SAVE, Some(r#"{"status": "completed"}"#))
        .await
        .json();
    let r = app.call(&acme, "GET", SAVE, None).await;
    assert_eq!(r.status, StatusCode::OK);
    let list = r.json();
    let listed: Vec<(Value, Value, Value)> = list["checkpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["checkpoint_id"].clone(),
                c["seq"].clone(),
                c["status"].clone(),
            )
        })
        .collect();
    assert_eq!(
        listed,
        vec![
            (first["checkpoint_id"].clone(), json!(0), json!("running")),
            (
                second["checkpoint_id"].clone(),
                json!(1),
                json!("completed")
            ),
        ]
    );
    assert_eq!(list["checkpoints"][0]["status_offset"], 0);
    // Another tenant sees none of them.
    let r = app.call(&globex, "GET", SAVE, None).await;
    assert_eq!(r.json()["checkpoints"], json!([]));
}

#[tokio::test]
async fn checkpoints_are_tenant_scoped() {
    let app = App::token_mode().await;
    let acme = token("acme", "subscribe publish");
    let globex = token("globex", "subscribe publish");
    app.create(&acme, "wf-1").await;
    let r = app.call(&acme, "POST", SAVE, Some(&body())).await;
    let acme_id = r.json()["checkpoint_id"].clone();

    // Another tenant cannot read it: the same 404 as a workflow without checkpoints.
    let r = app.call(&globex, "GET", LATEST, None).await;
    r.assert_error(
        StatusCode::NOT_FOUND,
        "No checkpoint found for workflow wf-1",
    );

    // Its own save of the same workflow id is its own: no events in acme's queue.
    let r = app.call(&globex, "POST", SAVE, Some(&body())).await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert_eq!(r.json()["status_offset"], Value::Null);
    let r = app
        .call(&acme, "GET", "/events/queues/wf-1/offset", None)
        .await;
    assert_eq!(r.json()["offset"], 2);
    assert_eq!(
        app.call(&acme, "GET", LATEST, None).await.json()["checkpoint_id"],
        acme_id
    );
    let theirs = app.call(&globex, "GET", LATEST, None).await.json();
    assert_ne!(theirs["checkpoint_id"], acme_id);
    assert_eq!(theirs["tenant_id"], "globex");
}

#[tokio::test]
async fn the_routes_need_credentials_and_their_scope() {
    let app = App::token_mode().await;
    let reader = token("acme", "subscribe");
    let writer = token("acme", "publish");
    let r = app
        .send(&super::app::Req::new("POST", SAVE).body(body()))
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let r = app.send(&super::app::Req::new("GET", LATEST)).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    app.call(&reader, "POST", SAVE, Some(&body()))
        .await
        .assert_error(StatusCode::FORBIDDEN, "publish");
    app.call(&writer, "GET", LATEST, None)
        .await
        .assert_error(StatusCode::FORBIDDEN, "subscribe");
    app.call(&writer, "GET", SAVE, None)
        .await
        .assert_error(StatusCode::FORBIDDEN, "subscribe");
    assert_eq!(
        app.call(&writer, "POST", SAVE, Some(&body())).await.status,
        StatusCode::CREATED
    );
    assert_eq!(
        app.call(&reader, "GET", LATEST, None).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn bad_input_is_400_naming_the_problem() {
    let app = App::token_mode().await;
    let acme = token("acme", "subscribe publish");
    app.create(&acme, "wf-1").await;
    let deep = format!(
        "{{\"status\":\"running\",\"state\":{}{}}}",
        "[".repeat(100),
        "]".repeat(100)
    );
    let cases: Vec<(String, &str)> = vec![
        ("{".into(), "invalid JSON"),
        ("[1]".into(), "checkpoint: must be a JSON object"),
        ("{}".into(), "status: is required"),
        (r#"{"status": 3}"#.into(), "status: must be a string"),
        (r#"{"status": ""}"#.into(), "status: must not be empty"),
        (
            r#"{"status": "running", "current_phase": 3, "total_phases": 2}"#.into(),
            "current_phase: must not exceed total_phases",
        ),
        (
            r#"{"status": "running", "current_phase": -1}"#.into(),
            "current_phase: must be an integer >= 0",
        ),
        (r#"{"status": "running", "tasks": {}}"#.into(), "tasks: must be an array"),
        (
            r#"{"status": "running", "tasks": [{"task_id": "a", "status": "done"}]}"#.into(),
            "tasks[0].status: must be one of pending, running, completed, failed, skipped",
        ),
        (
            r#"{"status": "running", "tasks": [{"status": "pending"}]}"#.into(),
            "tasks[0].task_id: is required",
        ),
        (
            r#"{"status": "running", "tasks": [{"task_id": "a", "status": "pending"}, {"task_id": "a", "status": "pending"}]}"#.into(),
            "tasks[1].task_id",
        ),
        (r#"{"status": "running", "state": 5}"#.into(), "state: must be a JSON object"),
        (r#"{"status": "running", "colour": "red"}"#.into(), "colour: unknown field"),
        (
            r#"{"status": "running", "workflow_id": "wf-2"}"#.into(),
            "workflow_id: does not match the route",
        ),
        (deep, "nest"),
    ];
    for (body, needle) in cases {
        let r = app.call(&acme, "POST", SAVE, Some(&body)).await;
        r.assert_error(StatusCode::BAD_REQUEST, needle);
    }
    let r = app
        .call(
            &acme,
            "POST",
            "/events/workflows/a%20b/checkpoints",
            Some(r#"{"status": "running"}"#),
        )
        .await;
    r.assert_error(StatusCode::BAD_REQUEST, "task_id");
    // Nothing was saved or emitted.
    app.call(&acme, "GET", LATEST, None)
        .await
        .assert_error(StatusCode::NOT_FOUND, "No checkpoint");
    let r = app
        .call(&acme, "GET", "/events/queues/wf-1/offset", None)
        .await;
    assert_eq!(r.json()["offset"], 0);
}

#[tokio::test]
async fn a_watcher_sees_the_status_then_the_progress_of_a_save() {
    let server = TestServer::start(helpers::server_config()).await;
    let client = helpers::client();
    let r = client
        .post(server.url("/events/queues"))
        .body(r#"{"task_id": "wf-1", "kind": "workflow"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let stream = client
        .get(server.url("/events/workflows/wf-1"))
        .send()
        .await
        .unwrap();
    let mut sse = SseReader::new(stream);
    assert_eq!(
        sse.next_event().await.unwrap().event.as_deref(),
        Some("connected")
    );
    let r = client
        .post(server.url(SAVE))
        .body(body())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let status = sse.next_event().await.unwrap();
    assert_eq!(
        (status.id.as_deref(), status.event.as_deref()),
        (Some("0"), Some("status"))
    );
    assert_eq!(status.json()["message"], "Checkpoint saved: running");
    let progress = sse.next_event().await.unwrap();
    assert_eq!(progress.event.as_deref(), Some("progress"));
    assert_eq!(
        (
            progress.json()["current"].clone(),
            progress.json()["total"].clone()
        ),
        (json!(1), json!(2))
    );
    // A final checkpoint with a terminal status ends the stream.
    let r = client
        .post(server.url(SAVE))
        .body(r#"{"status": "cancelled", "current_phase": 1, "total_phases": 2}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let last = sse.rest().await;
    assert_eq!(last.len(), 1, "{last:?}");
    assert_eq!(last[0].json()["state"], "cancelled");
    server.stop().await;
}
