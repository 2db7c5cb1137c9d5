//! Server lifecycle: graceful shutdown with connected clients, and a restart mid-stream.

use reqwest::StatusCode;
use serde_json::{Value, json};

use super::{complete, working};
use crate::helpers::{self, SseReader, TestServer};

async fn post(server: &TestServer, path: &str, body: Value) -> reqwest::Response {
    helpers::client()
        .post(server.url(path))
        .json(&body)
        .send()
        .await
        .unwrap()
}

async fn stream(server: &TestServer, path: &str, last_event_id: Option<u64>) -> SseReader {
    let mut req = helpers::client().get(server.url(path));
    if let Some(id) = last_event_id {
        req = req.header("Last-Event-ID", id.to_string());
    }
    let resp = req.send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    SseReader::new(resp)
}

#[tokio::test]
async fn graceful_shutdown_ends_streams_and_returns() {
    let server = TestServer::start(helpers::server_config()).await;
    let r = post(&server, "/events/queues", json!({"task_id": "wf-1"})).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let mut a = stream(&server, "/events/workflows/wf-1", None).await;
    let mut b = stream(&server, "/events/ingestion/wf-1", None).await;
    a.next_event().await.unwrap();
    b.next_event().await.unwrap();
    let r = post(&server, "/events/queues/wf-1/events", working(0)).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(a.next_event().await.unwrap().id.as_deref(), Some("0"));

    let addr = server.addr;
    // `stop` asserts that `serve` returned Ok.
    let dir = server.stop().await;
    assert_eq!(a.rest().await.len(), 0);
    assert_eq!(b.rest().await.len(), 1);
    // Nothing listens any more.
    assert!(
        helpers::client()
            .get(format!("http://{addr}/healthz"))
            .send()
            .await
            .is_err()
    );
    // What was acknowledged before the shutdown is there after a restart.
    let server = TestServer::start_in(dir, helpers::server_config()).await;
    let offset: Value = helpers::client()
        .get(server.url("/events/queues/wf-1/offset"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(offset["offset"], 1);
    server.stop().await;
}

/// A client streaming through a server restart resumes with `Last-Event-ID` and gets every
/// event exactly once, in order.
#[tokio::test]
async fn a_client_resumes_across_a_restart_and_gets_every_event_once() {
    let server = TestServer::start(helpers::server_config()).await;
    post(&server, "/events/queues", json!({"task_id": "wf-1"})).await;
    let first: Vec<Value> = (0..5).map(working).collect();
    post(
        &server,
        "/events/queues/wf-1/events",
        json!({ "events": first }),
    )
    .await;

    let mut seen: Vec<u64> = Vec::new();
    let mut sse = stream(&server, "/events/workflows/wf-1", None).await;
    assert_eq!(
        sse.next_event().await.unwrap().event.as_deref(),
        Some("connected")
    );
    for _ in 0..3 {
        let f = sse.next_event().await.unwrap();
        seen.push(f.id.unwrap().parse().unwrap());
    }
    // The server goes away mid-stream; the client keeps what it read.
    let dir = server.stop().await;
    while let Some(f) = sse.next_event().await {
        seen.push(f.id.unwrap().parse().unwrap());
    }

    let server = TestServer::start_in(dir, helpers::server_config()).await;
    let more: Vec<Value> = (5..8).map(working).chain([complete()]).collect();
    let r = post(
        &server,
        "/events/queues/wf-1/events",
        json!({ "events": more }),
    )
    .await;
    let reply: Value = r.json().await.unwrap();
    assert_eq!(reply["offsets"], json!([5, 6, 7, 8]));

    let last = *seen.last().unwrap();
    let mut sse = stream(&server, "/events/workflows/wf-1", Some(last)).await;
    let connected = sse.next_event().await.unwrap();
    assert_eq!(connected.json()["offset"], last + 1);
    for f in sse.rest().await {
        seen.push(f.id.unwrap().parse().unwrap());
    }
    assert_eq!(seen, (0..=8).collect::<Vec<u64>>());
    server.stop().await;
}
