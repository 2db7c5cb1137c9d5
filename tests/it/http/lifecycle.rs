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
    let offset: Value = server.get_json("/events/queues/wf-1/offset").await;
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

/// The offsets a publish answered.
async fn offsets_of(r: reqwest::Response) -> Vec<u64> {
    assert_eq!(r.status(), StatusCode::OK);
    let v: Value = r.json().await.unwrap();
    v["offsets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_u64().unwrap())
        .collect()
}

/// The `event_id`s of offsets `0..n` of `task`, read over SSE.
async fn stored_ids(server: &TestServer, task: &str, n: usize) -> Vec<String> {
    let mut s = stream(server, &format!("/events/workflows/{task}"), None).await;
    let mut ids = Vec::new();
    while ids.len() < n {
        let frame = s.next_event().await.expect("the stream ended early");
        if frame.id.is_some() {
            ids.push(frame.json()["event_id"].as_str().unwrap().to_string());
        }
    }
    ids
}

/// Events sent without an `event_id` get one from the server (derived from their offset, so
/// not in the idempotency index); enqueueing an event with such an id again is idempotent
/// like any other: while the event is only in the log, after a restart, and not once it is
/// trimmed. The same id in another queue is a new event there.
#[tokio::test]
async fn ids_the_server_gave_are_idempotent_like_producers_ids() {
    let server = TestServer::start(helpers::server_config()).await;
    for task in ["wf-1", "wf-2"] {
        let body = json!({"task_id": task, "max_buffer_size": 6});
        assert_eq!(
            post(&server, "/events/queues", body).await.status(),
            StatusCode::CREATED
        );
    }
    let path = "/events/queues/wf-1/events";
    let mut mine = working(9);
    mine["event_id"] = json!("evt_mine");
    let batch = json!({"events": [working(0), working(1), mine, working(2)]});
    assert_eq!(
        offsets_of(post(&server, path, batch).await).await,
        [0, 1, 2, 3]
    );
    let ids = stored_ids(&server, "wf-1", 4).await;
    assert_eq!(ids[2], "evt_mine");
    let unique: std::collections::HashSet<_> = ids.iter().collect();
    assert_eq!(unique.len(), 4, "{ids:?}");
    for id in [&ids[0], &ids[1], &ids[3]] {
        assert!(
            id.len() == 16
                && id.starts_with("evt_")
                && id[4..]
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
            "{id}"
        );
    }

    // Just committed (still in the log, not in redb): a retry with the id the server gave.
    let mut again = working(5);
    again["event_id"] = json!(ids[1]);
    assert_eq!(
        offsets_of(post(&server, path, again.clone()).await).await,
        [1]
    );
    // In a batch, next to a new event and the producer's own id.
    let mut first = working(7);
    first["event_id"] = json!(ids[0]);
    let mut mine = working(8);
    mine["event_id"] = json!("evt_mine");
    let batch = json!({"events": [first, working(3), mine]});
    assert_eq!(
        offsets_of(post(&server, path, batch).await).await,
        [0, 4, 2]
    );
    // Another queue has its own ids: the same id there is a new event.
    assert_eq!(
        offsets_of(post(&server, "/events/queues/wf-2/events", again).await).await,
        [0]
    );

    // After a restart (the log checkpointed into redb).
    let dir = server.stop().await;
    let server = TestServer::start_in(dir, helpers::server_config()).await;
    let mut third = working(6);
    third["event_id"] = json!(ids[3]);
    assert_eq!(offsets_of(post(&server, path, third).await).await, [3]);
    let latest: Value = server.get_json("/events/queues/wf-1/offset").await;
    assert_eq!(latest["offset"], 5, "a retry appended");

    // Once trimmed (the queue keeps 6 events), the id is free again.
    let batch = json!({"events": [working(0), working(1), working(2)]});
    assert_eq!(
        offsets_of(post(&server, path, batch).await).await,
        [5, 6, 7]
    );
    let mut trimmed = working(4);
    trimmed["event_id"] = json!(ids[0]);
    assert_eq!(offsets_of(post(&server, path, trimmed).await).await, [8]);
    // An id of the generated shape that the queue never gave is a new event too.
    let mut unknown = working(4);
    unknown["event_id"] = json!("evt_0123456789ab");
    let got = offsets_of(post(&server, path, unknown.clone()).await).await;
    assert_eq!(got, [9]);
    assert_eq!(offsets_of(post(&server, path, unknown).await).await, [9]);
    server.stop().await;
}

/// Producers post events without ids to three queues while, for each queue, a reader follows
/// the stream and posts every event it sees again with the id the server gave it, racing the
/// producers and the batches' move from the log into redb (a bulk write every few KiB, a
/// checkpoint every 20 ms): every repost reports the offset it was read at, and no repost
/// appends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_ids_stay_idempotent_while_batches_move_into_redb() {
    const QUEUES: [&str; 3] = ["q0", "q1", "q2"];
    const PER_PRODUCER: usize = 150;
    let server = std::sync::Arc::new(
        TestServer::start_tuned(
            tempfile::tempdir().unwrap(),
            |c| {
                c.apply_bytes = 4 << 10;
                c.fold_interval = std::time::Duration::from_millis(20);
            },
            helpers::server_config(),
        )
        .await,
    );
    for task in QUEUES {
        let body = json!({"task_id": task, "max_buffer_size": 100_000});
        assert_eq!(
            post(&server, "/events/queues", body).await.status(),
            StatusCode::CREATED
        );
    }
    // Readers first: they follow each queue until its terminal event.
    let mut readers = Vec::new();
    for task in QUEUES {
        let mut s = stream(&server, &format!("/events/workflows/{task}"), None).await;
        let server = server.clone();
        readers.push(tokio::spawn(async move {
            let path = format!("/events/queues/{task}/events");
            let mut reposted = 0u64;
            while let Some(frame) = s.next_event().await {
                let Some(offset) = frame.id.as_deref() else {
                    continue;
                };
                let event = frame.json();
                if event["event_type"] == "complete" {
                    continue;
                }
                let mut again = working(99);
                again["event_id"] = event["event_id"].clone();
                let got = offsets_of(post(&server, &path, again).await).await;
                assert_eq!(got, [offset.parse::<u64>().unwrap()], "{task}");
                reposted += 1;
            }
            reposted
        }));
    }
    let mut producers = Vec::new();
    for p in 0..3usize {
        let server = server.clone();
        producers.push(tokio::spawn(async move {
            let mut sent = [0u64; 3];
            for i in 0..PER_PRODUCER {
                let q = (p + i) % QUEUES.len();
                let n = 1 + i % 4;
                let body = json!({"events": (0..n).map(working).collect::<Vec<_>>()});
                let path = format!("/events/queues/{}/events", QUEUES[q]);
                assert_eq!(offsets_of(post(&server, &path, body).await).await.len(), n);
                sent[q] += n as u64;
            }
            sent
        }));
    }
    let mut sent = [0u64; 3];
    for p in producers {
        for (total, n) in sent.iter_mut().zip(p.await.unwrap()) {
            *total += n;
        }
    }
    for task in QUEUES {
        let path = format!("/events/queues/{task}/events");
        assert_eq!(
            post(&server, &path, complete()).await.status(),
            StatusCode::OK
        );
    }
    for ((q, task), reader) in QUEUES.into_iter().enumerate().zip(readers) {
        assert_eq!(
            reader.await.unwrap(),
            sent[q],
            "{task}: events not reposted"
        );
        let latest: Value = server
            .get_json(&format!("/events/queues/{task}/offset"))
            .await;
        assert_eq!(latest["offset"], sent[q] + 1, "{task}: a repost appended");
    }
}
