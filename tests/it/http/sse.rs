//! SSE over real sockets: frames, headers, resume, gaps, keepalive, stream ends, tenancy.

use std::time::Duration;

use eventqueue::{TaskId, TenantId};
use reqwest::StatusCode;
use serde_json::{Value, json};

use super::{complete, working};
use crate::helpers::{self, Frame, SseReader, TestServer};

async fn create(server: &TestServer, body: Value) {
    let r = helpers::client()
        .post(server.url("/events/queues"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
}

async fn publish(server: &TestServer, task: &str, body: Value) -> Value {
    let r = helpers::client()
        .post(server.url(&format!("/events/queues/{task}/events")))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    r.json().await.unwrap()
}

async fn open(server: &TestServer, path: &str, last_event_id: Option<&str>) -> SseReader {
    let mut req = helpers::client().get(server.url(path));
    if let Some(id) = last_event_id {
        req = req.header("Last-Event-ID", id);
    }
    let resp = req.send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    SseReader::new(resp)
}

fn offsets(frames: &[Frame]) -> Vec<u64> {
    frames
        .iter()
        .filter_map(|f| f.id.as_ref().map(|id| id.parse().unwrap()))
        .collect()
}

/// Seed 48, plus the exact frame format and headers.
#[tokio::test]
async fn a_stream_sends_connected_then_events_and_ends_after_the_terminal_event() {
    let server = TestServer::start(helpers::server_config()).await;
    create(&server, json!({"task_id": "wf-1", "kind": "workflow"})).await;
    publish(&server, "wf-1", complete()).await;

    let resp = helpers::client()
        .get(server.url("/events/workflows/wf-1"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let h = resp.headers();
    assert_eq!(h["content-type"], "text/event-stream");
    assert_eq!(h["cache-control"], "no-cache");
    assert_eq!(h["x-accel-buffering"], "no");
    let mut sse = SseReader::new(resp);
    let frames = sse.rest().await;
    assert_eq!(frames.len(), 2, "{frames:?}");

    let connected = &frames[0];
    assert_eq!(connected.event.as_deref(), Some("connected"));
    assert_eq!(connected.id, None);
    let data = connected.json();
    assert_eq!(data["type"], "connected");
    assert_eq!(data["task_id"], "wf-1");
    assert_eq!(data["tenant_id"], "default");
    assert_eq!(data["offset"], 0);
    assert_eq!(data["latest_offset"], 1);
    assert!(data["timestamp"].as_str().unwrap().ends_with('Z'));

    let event = &frames[1];
    assert_eq!(event.id.as_deref(), Some("0"));
    assert_eq!(event.event.as_deref(), Some("complete"));
    assert_eq!(event.json()["offset"], 0);
    assert_eq!(event.json()["event_type"], "complete");

    // The data line is the stored JSON, byte for byte.
    let queue = server
        .manager()
        .get_queue(&TenantId::default_tenant(), &TaskId::new("wf-1").unwrap())
        .unwrap();
    let mut sub = queue.subscribe(0).unwrap();
    let stored = sub.next().await.unwrap().unwrap();
    let stored = std::str::from_utf8(stored.as_event().unwrap().json()).unwrap();
    assert_eq!(event.data.as_deref(), Some(stored));
    let raw = String::from_utf8(sse.raw.clone()).unwrap();
    assert!(
        raw.contains(&format!("id: 0\nevent: complete\ndata: {stored}\n\n")),
        "{raw}"
    );
    assert!(
        raw.starts_with("event: connected\ndata: {\"type\":\"connected\","),
        "{raw}"
    );
}

/// Seeds 49 and 50: `from_offset` is echoed in `connected`; the ingestion route has the same
/// shape.
#[tokio::test]
async fn from_offset_is_echoed_and_the_ingestion_route_streams_the_same_shape() {
    let server = TestServer::start(helpers::server_config()).await;
    create(&server, json!({"task_id": "job-1", "kind": "ingestion"})).await;
    publish(
        &server,
        "job-1",
        json!({"events": [working(0), working(1), working(2), complete()]}),
    )
    .await;
    for route in ["workflows", "ingestion"] {
        let mut sse = open(
            &server,
            &format!("/events/{route}/job-1?from_offset=1"),
            None,
        )
        .await;
        let frames = sse.rest().await;
        assert_eq!(frames[0].json()["offset"], 1);
        assert_eq!(frames[0].json()["latest_offset"], 4);
        assert_eq!(frames[1].json()["phase"], "phase_1");
        assert_eq!(offsets(&frames), vec![1, 2, 3]);
        assert_eq!(frames[3].event.as_deref(), Some("complete"));
    }
}

#[tokio::test]
async fn two_concurrent_subscribers_each_get_every_event_in_order() {
    let server = TestServer::start(helpers::server_config()).await;
    create(&server, json!({"task_id": "wf-1"})).await;
    let mut a = open(&server, "/events/workflows/wf-1", None).await;
    let mut b = open(&server, "/events/workflows/wf-1", None).await;
    assert_eq!(
        a.next_event().await.unwrap().event.as_deref(),
        Some("connected")
    );
    assert_eq!(
        b.next_event().await.unwrap().event.as_deref(),
        Some("connected")
    );
    for phase in 0..3 {
        publish(&server, "wf-1", working(phase)).await;
    }
    publish(&server, "wf-1", complete()).await;
    let (fa, fb) = (a.rest().await, b.rest().await);
    assert_eq!(offsets(&fa), vec![0, 1, 2, 3]);
    assert_eq!(fa, fb);
    let phases: Vec<Value> = fa
        .iter()
        .take(3)
        .map(|f| f.json()["phase"].clone())
        .collect();
    assert_eq!(phases, vec!["phase_0", "phase_1", "phase_2"]);
}

#[tokio::test]
async fn last_event_id_resumes_after_it_and_wins_over_from_offset() {
    let server = TestServer::start(helpers::server_config()).await;
    create(&server, json!({"task_id": "wf-1"})).await;
    let events: Vec<Value> = (0..5).map(working).chain([complete()]).collect();
    publish(&server, "wf-1", json!({ "events": events })).await;

    let mut sse = open(&server, "/events/workflows/wf-1?from_offset=0", Some("2")).await;
    let frames = sse.rest().await;
    assert_eq!(frames[0].json()["offset"], 3);
    assert_eq!(offsets(&frames), vec![3, 4, 5]);

    let mut sse = open(&server, "/events/workflows/wf-1?from_offset=4", None).await;
    assert_eq!(offsets(&sse.rest().await), vec![4, 5]);
}

#[tokio::test]
async fn a_reconnect_past_the_terminal_event_is_204() {
    let server = TestServer::start(helpers::server_config()).await;
    create(&server, json!({"task_id": "wf-1"})).await;
    publish(&server, "wf-1", json!({"events": [working(0), complete()]})).await;
    let resp = helpers::client()
        .get(server.url("/events/workflows/wf-1"))
        .header("Last-Event-ID", "1")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    // At the terminal event itself the stream still delivers it.
    let mut sse = open(&server, "/events/workflows/wf-1", Some("0")).await;
    assert_eq!(offsets(&sse.rest().await), vec![1]);
}

#[tokio::test]
async fn dropped_events_are_reported_by_a_gap_frame() {
    let server = TestServer::start(helpers::server_config()).await;
    create(&server, json!({"task_id": "wf-1", "max_buffer_size": 2})).await;
    let events: Vec<Value> = (0..5).map(working).collect();
    publish(&server, "wf-1", json!({ "events": events })).await;

    let mut sse = open(&server, "/events/workflows/wf-1?from_offset=0", None).await;
    let connected = sse.next_event().await.unwrap();
    assert_eq!(connected.json()["offset"], 3);
    assert_eq!(connected.json()["latest_offset"], 5);
    let gap = sse.next_event().await.unwrap();
    assert_eq!(gap.event.as_deref(), Some("gap"));
    assert_eq!(gap.id, None);
    assert_eq!(
        gap.json(),
        json!({"type": "gap", "requested_offset": 0, "first_available_offset": 3})
    );
    let close = helpers::client()
        .post(server.url("/events/queues/wf-1/close"))
        .send()
        .await
        .unwrap();
    assert_eq!(close.status(), StatusCode::OK);
    assert_eq!(offsets(&sse.rest().await), vec![3, 4]);
}

#[tokio::test]
async fn idle_streams_get_keepalive_comments() {
    let mut config = helpers::server_config();
    config.keepalive = Duration::from_millis(100);
    let server = TestServer::start(config).await;
    create(&server, json!({"task_id": "wf-1"})).await;
    let mut sse = open(&server, "/events/workflows/wf-1", None).await;
    assert_eq!(
        sse.next_frame().await.unwrap().event.as_deref(),
        Some("connected")
    );
    let frame = sse.next_frame().await.unwrap();
    assert!(frame.is_comment(), "{frame:?}");
    assert_eq!(frame.comment.as_deref(), Some("keepalive"));
    let raw = String::from_utf8(sse.raw.clone()).unwrap();
    assert!(raw.ends_with("\n\n: keepalive\n\n"), "{raw:?}");
    // Events still flow after keepalives.
    publish(&server, "wf-1", complete()).await;
    assert_eq!(offsets(&sse.rest().await), vec![0]);
}

#[tokio::test]
async fn a_stream_ends_when_its_queue_is_closed() {
    let server = TestServer::start(helpers::server_config()).await;
    create(&server, json!({"task_id": "wf-1"})).await;
    let mut sse = open(&server, "/events/workflows/wf-1", None).await;
    sse.next_event().await.unwrap();
    publish(&server, "wf-1", working(0)).await;
    assert_eq!(sse.next_event().await.unwrap().id.as_deref(), Some("0"));
    let r = helpers::client()
        .post(server.url("/events/queues/wf-1/close"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(sse.rest().await, vec![]);
}

#[tokio::test]
async fn a_stream_ends_when_its_queue_is_deleted() {
    let server = TestServer::start(helpers::server_config()).await;
    create(&server, json!({"task_id": "wf-1"})).await;
    let mut sse = open(&server, "/events/workflows/wf-1", None).await;
    sse.next_event().await.unwrap();
    let r = helpers::client()
        .delete(server.url("/events/queues/wf-1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(sse.rest().await, vec![]);
}

#[tokio::test]
async fn another_tenants_stream_is_404() {
    let server = TestServer::start(helpers::server_config()).await;
    let r = helpers::client()
        .post(server.url("/events/queues"))
        .header("X-Tenant-ID", "acme")
        .json(&json!({"task_id": "wf-1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    for url in [
        "/events/workflows/wf-1",
        "/events/workflows/wf-1?tenant_id=globex",
    ] {
        let r = helpers::client().get(server.url(url)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["detail"], "No active workflow found with ID wf-1");
    }
    let mut sse = open(&server, "/events/workflows/wf-1?tenant_id=acme", None).await;
    let connected = sse.next_event().await.unwrap();
    assert_eq!(connected.json()["tenant_id"], "acme");
}

#[tokio::test]
async fn the_open_stream_count_follows_clients() {
    let server = TestServer::start(helpers::server_config()).await;
    create(&server, json!({"task_id": "wf-1"})).await;
    let mut sse = open(&server, "/events/workflows/wf-1", None).await;
    sse.next_event().await.unwrap();
    assert_eq!(server.state.open_streams(), 1);
    let info: Value = server.get_json("/events/queues/wf-1").await;
    assert_eq!(info["subscriber_count"], 1);
    publish(&server, "wf-1", complete()).await;
    sse.rest().await;
}
