//! What streams hold for slow clients (issue 26, item 1): replay steps bounded in bytes, one
//! chunk in flight per stream, and large events held against a server-wide budget. These
//! tests check what a client relies on under those bounds — every event, once, in order —
//! and that the budget is given back; the memory figures themselves are measured by
//! `scripts/hostile.sh`, not here.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};

use crate::helpers::{self, SseReader, TestServer};

/// A `status` event whose JSON is a little over `bytes` long.
fn sized(bytes: usize) -> Value {
    json!({"event_type": "status", "state": "working", "message": "x".repeat(bytes)})
}

async fn create(server: &TestServer, task: &str) {
    let r = helpers::client()
        .post(server.url("/events/queues"))
        .json(&json!({"task_id": task, "max_buffer_size": 100_000}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
}

async fn publish(server: &TestServer, task: &str, events: &[Value]) {
    for event in events {
        let r = helpers::client()
            .post(server.url(&format!("/events/queues/{task}/events")))
            .json(event)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{}", r.text().await.unwrap());
    }
}

/// Reads `task`'s stream to its end: the (offset, message length) of every event.
async fn read_all(server: &TestServer, task: &str) -> Vec<(u64, usize)> {
    let resp = helpers::client()
        .get(server.url(&format!("/events/workflows/{task}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut sse = SseReader::new(resp);
    let mut got = Vec::new();
    while let Some(frame) = sse.next_event().await {
        if let Some(id) = &frame.id {
            let json = frame.json();
            let len = json["message"].as_str().map_or(0, str::len);
            got.push((id.parse().unwrap(), len));
        } else {
            assert_eq!(frame.event.as_deref(), Some("connected"), "{frame:?}");
        }
    }
    got
}

/// Sizes of a queue that takes every path: small events batched together, events larger
/// than a replay step, than a stream's own share and than the whole budget, and a small
/// event right before a large one (a batch split before the event that needs the budget).
fn mixed_sizes() -> Vec<usize> {
    let mut sizes = Vec::new();
    for round in 0..3 {
        sizes.extend([100, 2_000, 40_000, 10, 90_000]);
        sizes.extend(std::iter::repeat_n(700, 60));
        sizes.extend([300_000 + round, 5, 150_000]);
    }
    sizes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_tiny_budget_many_streams_each_get_every_event_in_order() {
    let mut config = helpers::server_config();
    // Room for one large event's share at a time: the streams queue for it.
    config.stream_buffer_bytes = 100 << 10;
    let server = TestServer::start_tuned(
        tempfile::tempdir().unwrap(),
        // Small replay steps: most events take a step of their own, some several share one.
        |c| c.replay_bytes = 4 << 10,
        config,
    )
    .await;
    create(&server, "wf").await;
    let sizes = mixed_sizes();
    let (replayed, live) = sizes.split_at(sizes.len() / 2);
    let events: Vec<Value> = replayed.iter().map(|&n| sized(n)).collect();
    publish(&server, "wf", &events).await;

    let readers: Vec<_> = (0..12).map(|_| read_all(&server, "wf")).collect();
    let publishing = async {
        // The rest while the streams read: live events, and lag recovery from the log.
        let events: Vec<Value> = live.iter().map(|&n| sized(n)).collect();
        publish(&server, "wf", &events).await;
        let r = helpers::client()
            .post(server.url("/events/queues/wf/close"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    };
    let (results, ()) = tokio::join!(futures_util::future::join_all(readers), publishing);
    let want: Vec<(u64, usize)> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| (i as u64, n))
        .collect();
    for got in results {
        assert_eq!(got, want);
    }
    // Every chunk written, every share given back.
    let state = server.state.clone();
    until(
        || state.stream_buffer_bytes_held() == 0,
        "the budget was given back",
    )
    .await;
}

/// A client that sends its request and never reads; a small receive buffer so that the
/// server's socket fills soon.
async fn stalled_client(server: &TestServer, task: &str) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(server.addr).await.unwrap();
    let request = format!("GET /events/workflows/{task} HTTP/1.1\r\nHost: test\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    stream
}

/// Waits until `held()` is true, polling; only the hang guard bounds it.
async fn until(mut held: impl FnMut() -> bool, what: &str) {
    tokio::time::timeout(helpers::HANG_GUARD, async {
        while !held() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("never: {what}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_streams_hold_the_budget_only_until_they_go_and_never_block_small_events() {
    let mut config = helpers::server_config();
    let budget = 256 << 10;
    config.stream_buffer_bytes = budget;
    let server = TestServer::start(config).await;
    create(&server, "large").await;
    create(&server, "small").await;
    // More than the sockets' buffers take, so every stalled stream ends up holding a chunk.
    let large: Vec<Value> = (0..60).map(|_| sized(200_000)).collect();
    publish(&server, "large", &large).await;
    let small: Vec<Value> = (0..2000).map(|_| sized(300)).collect();
    publish(&server, "small", &small).await;
    for task in ["large", "small"] {
        let r = helpers::client()
            .post(server.url(&format!("/events/queues/{task}/close")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    }

    let stalled: Vec<TcpStream> =
        futures_util::future::join_all((0..4).map(|_| stalled_client(&server, "large"))).await;
    // Each stalled stream keeps one large event's share once its socket is full: together
    // they take the whole budget.
    let state = server.state.clone();
    until(
        || state.stream_buffer_bytes_held() as usize + 136_000 > budget,
        "stalled streams took the budget",
    )
    .await;
    // Small events never need the budget: their streams go on.
    let got = read_all(&server, "small").await;
    assert_eq!(got.len(), 2000);
    assert!(
        got.iter()
            .enumerate()
            .all(|(i, &(o, n))| o == i as u64 && n == 300)
    );

    // Gone clients give their share back, and a reader of the large events gets them all.
    drop(stalled);
    until(
        || state.stream_buffer_bytes_held() == 0,
        "the budget was given back",
    )
    .await;
    let got = read_all(&server, "large").await;
    let want: Vec<(u64, usize)> = (0..60).map(|i| (i, 200_000)).collect();
    assert_eq!(got, want);
}
