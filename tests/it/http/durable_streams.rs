//! The Durable Streams protocol under `/v1/stream` (issue 23), through `router()`: what a
//! protocol client relies on beyond the official conformance suite (tests/durable-streams/),
//! which cannot see eventqueue's own guarantees: tenancy, restarts, typed queues as streams.

use axum::http::StatusCode;
use eventqueue::{Config, QueueManager};
use serde_json::json;

use super::app::{App, Req, token};
use super::working;
use crate::helpers;

fn put(path: &str, content_type: &str) -> Req {
    Req::new("PUT", path).header("content-type", content_type)
}

fn post(path: &str, content_type: &str, body: &str) -> Req {
    Req::new("POST", path)
        .header("content-type", content_type)
        .body(body.as_bytes().to_vec())
}

#[tokio::test]
async fn json_arrays_split_into_messages_read_back_from_any_offset() {
    let app = App::open_mode().await;
    let created = app.send(&put("/v1/stream/chat", "application/json")).await;
    assert_eq!(created.status, StatusCode::CREATED);
    let empty_tail = created.header("stream-next-offset").unwrap();

    let r = app
        .send(&post(
            "/v1/stream/chat",
            "application/json",
            r#"[{"a":1}, {"b": [2, 3]}]"#,
        ))
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let after_two = r.header("stream-next-offset").unwrap();
    let r = app
        .send(&post("/v1/stream/chat", "application/json", r#"{"c":3}"#))
        .await;
    let after_three = r.header("stream-next-offset").unwrap();
    // Opaque offsets that sort as strings in stream order.
    assert!(empty_tail < after_two && after_two < after_three);

    let all = app
        .send(&Req::new("GET", "/v1/stream/chat?offset=-1"))
        .await;
    assert_eq!(all.status, StatusCode::OK);
    // Each message exactly as sent (the array's elements keep their own spacing).
    assert_eq!(
        String::from_utf8(all.body.clone()).unwrap(),
        r#"[{"a":1},{"b": [2, 3]},{"c":3}]"#
    );
    assert_eq!(all.header("stream-up-to-date").as_deref(), Some("true"));
    assert_eq!(all.header("stream-next-offset").unwrap(), after_three);

    let rest = app
        .send(&Req::new(
            "GET",
            &format!("/v1/stream/chat?offset={after_two}"),
        ))
        .await;
    assert_eq!(rest.json(), json!([{"c": 3}]));

    // `now` skips what is there.
    let now = app
        .send(&Req::new("GET", "/v1/stream/chat?offset=now"))
        .await;
    assert_eq!(now.json(), json!([]));
    assert_eq!(now.header("stream-next-offset").unwrap(), after_three);
}

#[tokio::test]
async fn streams_belong_to_the_token_tenant_and_writes_need_publish() {
    let app = App::token_mode().await;
    let acme = token("acme", "subscribe publish");
    let globex = token("globex", "subscribe publish");
    let reader = token("acme", "subscribe");

    let r = app
        .send(&put("/v1/stream/log", "text/plain").bearer(&acme))
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let r = app
        .send(&post("/v1/stream/log", "text/plain", "hello").bearer(&acme))
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);

    // Another tenant's stream does not exist for this one; the same path is its own stream.
    let r = app
        .send(&Req::new("GET", "/v1/stream/log").bearer(&globex))
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = app
        .send(&put("/v1/stream/log", "text/plain").bearer(&globex))
        .await;
    assert_eq!(r.status, StatusCode::CREATED);

    // Reading needs subscribe, writing publish.
    let r = app
        .send(&Req::new("GET", "/v1/stream/log").bearer(&reader))
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body, b"hello");
    let r = app
        .send(&post("/v1/stream/log", "text/plain", "more").bearer(&reader))
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = app.send(&Req::new("GET", "/v1/stream/log")).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn a_typed_task_queue_reads_as_a_json_stream_of_its_events() {
    let app = App::open_mode().await;
    let r = app
        .send(
            &Req::new("POST", "/events/queues")
                .header("content-type", "application/json")
                .body(json!({"task_id": "wf-1", "kind": "workflow"}).to_string()),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let r = app
        .send(
            &Req::new("POST", "/events/queues/wf-1/events")
                .header("content-type", "application/json")
                .body(json!({"events": [working(1), working(2)]}).to_string()),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);

    let head = app.send(&Req::new("HEAD", "/v1/stream/wf-1")).await;
    assert_eq!(head.status, StatusCode::OK);
    assert_eq!(
        head.header("content-type").as_deref(),
        Some("application/json")
    );
    let read = app
        .send(&Req::new("GET", "/v1/stream/wf-1?offset=-1"))
        .await;
    let events = read.json();
    let events = events.as_array().unwrap();
    assert_eq!(events.len(), 2);
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e["offset"], json!(i));
        assert_eq!(e["event_type"], json!("status"));
        assert_eq!(e["phase"], json!(format!("phase_{}", i + 1)));
    }
    // Appends through the protocol are events, validated as the events API validates them.
    let r = app
        .send(&post(
            "/v1/stream/wf-1",
            "application/json",
            r#"[{"event_type": "progress", "current": 1, "total": 2}]"#,
        ))
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let r = app
        .send(&post(
            "/v1/stream/wf-1",
            "application/json",
            r#"{"event_type": "progress", "current": 3, "total": 2}"#,
        ))
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.detail().contains("current"), "{}", r.detail());
    let read = app
        .send(&Req::new("GET", "/v1/stream/wf-1?offset=-1"))
        .await;
    let events = read.json();
    assert_eq!(events.as_array().unwrap().len(), 3);
    assert_eq!(events[2]["event_type"], json!("progress"));
    assert_eq!(events[2]["task_id"], json!("wf-1"));
    // The task's terminal event ends its stream: closed for a Durable Streams reader.
    let r = app
        .send(&post(
            "/v1/stream/wf-1",
            "application/json",
            r#"{"event_type": "complete", "result": {"ok": true}}"#,
        ))
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let tail = r.header("stream-next-offset").unwrap();
    let head = app.send(&Req::new("HEAD", "/v1/stream/wf-1")).await;
    assert_eq!(head.header("stream-closed").as_deref(), Some("true"));
    let eof = app
        .send(&Req::new("GET", &format!("/v1/stream/wf-1?offset={tail}")))
        .await;
    assert_eq!(eof.json(), json!([]));
    assert_eq!(eof.header("stream-closed").as_deref(), Some("true"));
}

#[tokio::test]
async fn idempotent_producers_store_a_retry_once_and_fence_stale_epochs() {
    let app = App::open_mode().await;
    app.send(&put("/v1/stream/p", "text/plain")).await;
    let send = |epoch: &str, seq: &str, body: &str| {
        post("/v1/stream/p", "text/plain", body)
            .header("producer-id", "writer-1")
            .header("producer-epoch", epoch)
            .header("producer-seq", seq)
    };
    assert_eq!(app.send(&send("0", "0", "a")).await.status, StatusCode::OK);
    assert_eq!(app.send(&send("0", "1", "b")).await.status, StatusCode::OK);
    // A retry: acknowledged, not stored again.
    let retry = app.send(&send("0", "1", "b")).await;
    assert_eq!(retry.status, StatusCode::NO_CONTENT);
    // A gap names what was expected.
    let gap = app.send(&send("0", "5", "x")).await;
    assert_eq!(gap.status, StatusCode::CONFLICT);
    assert_eq!(gap.header("producer-expected-seq").as_deref(), Some("2"));
    // A new epoch fences the old one.
    assert_eq!(app.send(&send("1", "0", "c")).await.status, StatusCode::OK);
    let zombie = app.send(&send("0", "2", "z")).await;
    assert_eq!(zombie.status, StatusCode::FORBIDDEN);
    assert_eq!(zombie.header("producer-epoch").as_deref(), Some("1"));

    let all = app.send(&Req::new("GET", "/v1/stream/p")).await;
    assert_eq!(all.body, b"abc");
}

#[tokio::test]
async fn a_stream_its_content_type_and_closure_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let tail = {
        let manager = QueueManager::open(Config::new(dir.path())).await.unwrap();
        let app = App::over(
            manager.clone(),
            tempfile::tempdir().unwrap(),
            helpers::server_config(),
        );
        app.send(&put("/v1/stream/bin", "application/x-thing"))
            .await;
        app.send(&post("/v1/stream/bin", "application/x-thing", "one"))
            .await;
        let r = app
            .send(
                &post("/v1/stream/bin", "application/x-thing", "two")
                    .header("stream-closed", "true"),
            )
            .await;
        assert_eq!(r.header("stream-closed").as_deref(), Some("true"));
        manager.shutdown().await.unwrap();
        r.header("stream-next-offset").unwrap()
    };
    let manager = QueueManager::open(Config::new(dir.path())).await.unwrap();
    let app = App::over(
        manager,
        tempfile::tempdir().unwrap(),
        helpers::server_config(),
    );
    let head = app.send(&Req::new("HEAD", "/v1/stream/bin")).await;
    assert_eq!(
        head.header("content-type").as_deref(),
        Some("application/x-thing")
    );
    assert_eq!(head.header("stream-closed").as_deref(), Some("true"));
    assert_eq!(head.header("stream-next-offset").unwrap(), tail);
    let all = app.send(&Req::new("GET", "/v1/stream/bin?offset=-1")).await;
    assert_eq!(all.body, b"onetwo");
    // Closed: appends are refused with the final offset.
    let r = app
        .send(&post("/v1/stream/bin", "application/x-thing", "three"))
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    assert_eq!(r.header("stream-next-offset").unwrap(), tail);
}

#[tokio::test]
async fn a_fork_holds_its_source_up_to_the_fork_point_at_the_same_offsets() {
    let app = App::open_mode().await;
    app.send(&put("/v1/stream/src", "application/json")).await;
    let first = app
        .send(&post("/v1/stream/src", "application/json", r#"[1, 2]"#))
        .await
        .header("stream-next-offset")
        .unwrap();
    app.send(&post("/v1/stream/src", "application/json", r#"[3, 4, 5]"#))
        .await;

    // Inherit the first append and one message of the second (a JSON sub-offset counts
    // messages); the content type is the source's.
    let r = app
        .send(
            &Req::new("PUT", "/v1/stream/fork")
                .header("stream-forked-from", "/v1/stream/src")
                .header("stream-fork-offset", &first)
                .header("stream-fork-sub-offset", "1"),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    app.send(&post("/v1/stream/fork", "application/json", "6"))
        .await;
    let fork = app
        .send(&Req::new("GET", "/v1/stream/fork?offset=-1"))
        .await;
    assert_eq!(fork.json(), json!([1, 2, 3, 6]));
    // Same offsets as the source up to the fork point.
    let tail = app
        .send(&Req::new("GET", &format!("/v1/stream/fork?offset={first}")))
        .await;
    assert_eq!(tail.json(), json!([3, 6]));
    let src = app.send(&Req::new("GET", "/v1/stream/src?offset=-1")).await;
    assert_eq!(src.json(), json!([1, 2, 3, 4, 5]));

    // Deleting the source while the fork lives: gone (410), its path reserved (409), the fork
    // unharmed; deleting the fork then frees the path.
    let r = app.send(&Req::new("DELETE", "/v1/stream/src")).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let r = app.send(&Req::new("GET", "/v1/stream/src")).await;
    assert_eq!(r.status, StatusCode::GONE);
    let r = app.send(&put("/v1/stream/src", "application/json")).await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    let fork = app
        .send(&Req::new("GET", "/v1/stream/fork?offset=-1"))
        .await;
    assert_eq!(fork.json(), json!([1, 2, 3, 6]));
    let r = app.send(&Req::new("DELETE", "/v1/stream/fork")).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let r = app.send(&Req::new("GET", "/v1/stream/src")).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = app.send(&put("/v1/stream/src", "application/json")).await;
    assert_eq!(r.status, StatusCode::CREATED);
}

#[tokio::test]
async fn a_binary_fork_sub_offset_counts_bytes_into_the_next_append() {
    let app = App::open_mode().await;
    let created = app
        .send(&put("/v1/stream/bytes", "application/octet-stream").body(b"ab".to_vec()))
        .await;
    let after_ab = created.header("stream-next-offset").unwrap();
    app.send(&post(
        "/v1/stream/bytes",
        "application/octet-stream",
        "cdef",
    ))
    .await;
    let r = app
        .send(
            &Req::new("PUT", "/v1/stream/bytes-fork")
                .header("stream-forked-from", "/v1/stream/bytes")
                .header("stream-fork-offset", &after_ab)
                .header("stream-fork-sub-offset", "3"),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let fork = app
        .send(&Req::new("GET", "/v1/stream/bytes-fork?offset=-1"))
        .await;
    assert_eq!(fork.body, b"abcde");
    // Past the source's bytes: refused.
    let r = app
        .send(
            &Req::new("PUT", "/v1/stream/bytes-fork-2")
                .header("stream-forked-from", "/v1/stream/bytes")
                .header("stream-fork-offset", &after_ab)
                .header("stream-fork-sub-offset", "5"),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
}

/// A producer request with its three headers.
fn produced(path: &str, body: &str, id: &str, epoch: u64, seq: u64) -> Req {
    post(path, "text/plain", body)
        .header("producer-id", id)
        .header("producer-epoch", &epoch.to_string())
        .header("producer-seq", &seq.to_string())
}

#[tokio::test]
async fn a_producer_continues_its_sequence_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let open = |dir: &std::path::Path| {
        let dir = dir.to_path_buf();
        async move {
            let manager = QueueManager::open(Config::new(&dir)).await.unwrap();
            let app = App::over(
                manager.clone(),
                tempfile::tempdir().unwrap(),
                helpers::server_config(),
            );
            (manager, app)
        }
    };
    {
        let (manager, app) = open(dir.path()).await;
        app.send(&put("/v1/stream/r", "text/plain")).await;
        for (seq, body) in ["a", "b"].into_iter().enumerate() {
            let r = app
                .send(&produced("/v1/stream/r", body, "w", 3, seq as u64))
                .await;
            assert_eq!(r.status, StatusCode::OK);
        }
        manager.shutdown().await.unwrap();
    }
    let (manager, app) = open(dir.path()).await;
    // The producer's state was committed with its data: seq 2 follows, a retry of seq 1 is
    // a duplicate, a gap names what comes next, an older epoch is fenced.
    let next = app.send(&produced("/v1/stream/r", "c", "w", 3, 2)).await;
    assert_eq!(next.status, StatusCode::OK, "seq n+1 after a restart");
    let retry = app.send(&produced("/v1/stream/r", "b", "w", 3, 1)).await;
    assert_eq!(retry.status, StatusCode::NO_CONTENT);
    assert_eq!(retry.header("producer-seq").as_deref(), Some("2"));
    let gap = app.send(&produced("/v1/stream/r", "z", "w", 3, 9)).await;
    assert_eq!(gap.status, StatusCode::CONFLICT);
    assert_eq!(gap.header("producer-expected-seq").as_deref(), Some("3"));
    let zombie = app.send(&produced("/v1/stream/r", "z", "w", 2, 0)).await;
    assert_eq!(zombie.status, StatusCode::FORBIDDEN);
    assert_eq!(zombie.header("producer-epoch").as_deref(), Some("3"));
    // The close of a producer's final append, and its retry after another restart.
    let last = app
        .send(&produced("/v1/stream/r", "d", "w", 3, 3).header("stream-closed", "true"))
        .await;
    assert_eq!(last.status, StatusCode::OK);
    assert_eq!(last.header("stream-closed").as_deref(), Some("true"));
    manager.shutdown().await.unwrap();
    drop(app);
    let (_manager, app) = open(dir.path()).await;
    let retry = app
        .send(&produced("/v1/stream/r", "d", "w", 3, 3).header("stream-closed", "true"))
        .await;
    assert_eq!(
        retry.status,
        StatusCode::NO_CONTENT,
        "the closing request again"
    );
    assert_eq!(retry.header("stream-closed").as_deref(), Some("true"));
    let other = app.send(&produced("/v1/stream/r", "e", "w", 3, 4)).await;
    assert_eq!(other.status, StatusCode::CONFLICT);
    assert_eq!(other.header("stream-closed").as_deref(), Some("true"));
    let all = app.send(&Req::new("GET", "/v1/stream/r?offset=-1")).await;
    assert_eq!(all.body, b"abcd");
}

#[tokio::test]
async fn concurrent_copies_of_a_producer_request_store_it_once() {
    let app = App::open_mode().await;
    app.send(&put("/v1/stream/dup", "text/plain")).await;
    for seq in 0..4u64 {
        let body = format!("m{seq};");
        let req = produced("/v1/stream/dup", &body, "p", 0, seq);
        let answers = futures_util::future::join_all((0..16).map(|_| app.send(&req))).await;
        let stored = answers
            .iter()
            .filter(|r| r.status == StatusCode::OK)
            .count();
        let repeats = answers
            .iter()
            .filter(|r| r.status == StatusCode::NO_CONTENT)
            .count();
        assert_eq!((stored, repeats), (1, 15), "seq {seq}");
    }
    let all = app.send(&Req::new("GET", "/v1/stream/dup?offset=-1")).await;
    assert_eq!(all.body, b"m0;m1;m2;m3;");
}

#[tokio::test]
async fn a_final_append_and_its_close_are_one_commit() {
    let app = App::open_mode().await;
    app.send(&put("/v1/stream/fin", "text/plain")).await;
    // Appenders race a final append with `Stream-Closed: true`: each is either stored before
    // the close (and acknowledged) or refused as closed, and the final data is the last.
    let appends = (0..32).map(|i| {
        let req = post("/v1/stream/fin", "text/plain", &format!("<{i}>"));
        let app = &app;
        async move { (i, app.send(&req).await) }
    });
    let close = async {
        tokio::task::yield_now().await;
        app.send(&post("/v1/stream/fin", "text/plain", "<end>").header("stream-closed", "true"))
            .await
    };
    let (answers, closed) = tokio::join!(futures_util::future::join_all(appends), close);
    assert_eq!(closed.status, StatusCode::NO_CONTENT);
    assert_eq!(closed.header("stream-closed").as_deref(), Some("true"));
    let all = app.send(&Req::new("GET", "/v1/stream/fin?offset=-1")).await;
    assert_eq!(all.header("stream-closed").as_deref(), Some("true"));
    let text = String::from_utf8(all.body).unwrap();
    assert!(text.ends_with("<end>"), "the final append is last: {text}");
    assert_eq!(text.matches("<end>").count(), 1);
    for (i, r) in answers {
        let stored = text.contains(&format!("<{i}>"));
        match r.status {
            StatusCode::NO_CONTENT => assert!(stored, "acknowledged append {i} is stored"),
            StatusCode::CONFLICT => {
                assert!(!stored, "refused append {i} is not stored");
                assert_eq!(r.header("stream-closed").as_deref(), Some("true"));
                assert_eq!(
                    r.header("stream-next-offset"),
                    closed.header("stream-next-offset")
                );
            }
            other => panic!("append {i}: {other}"),
        }
    }
}

#[tokio::test]
async fn two_nodes_over_one_redis_store_a_producer_request_once() {
    let redis = crate::redis::RedisServer::start();
    let config = || Config {
        storage: eventqueue::StorageBackend::Redis {
            url: format!("redis://127.0.0.1:{}", redis.port),
            prefix: "ds:".into(),
        },
        ..Config::new(std::path::PathBuf::from("unused"))
    };
    let nodes = [
        App::over(
            QueueManager::open(config()).await.unwrap(),
            tempfile::tempdir().unwrap(),
            helpers::server_config(),
        ),
        App::over(
            QueueManager::open(config()).await.unwrap(),
            tempfile::tempdir().unwrap(),
            helpers::server_config(),
        ),
    ];
    let created = nodes[0].send(&put("/v1/stream/both", "text/plain")).await;
    assert_eq!(created.status, StatusCode::CREATED);
    for seq in 0..3u64 {
        let body = format!("m{seq};");
        let req = produced("/v1/stream/both", &body, "p", 0, seq);
        // Copies of one request on both nodes at once.
        let answers = futures_util::future::join_all((0..8).map(|i| nodes[i % 2].send(&req))).await;
        let stored = answers
            .iter()
            .filter(|r| r.status == StatusCode::OK)
            .count();
        let repeats = answers
            .iter()
            .filter(|r| r.status == StatusCode::NO_CONTENT)
            .count();
        assert_eq!((stored, repeats), (1, 7), "seq {seq}");
    }
    for node in &nodes {
        let all = node
            .send(&Req::new("GET", "/v1/stream/both?offset=-1"))
            .await;
        assert_eq!(all.body, b"m0;m1;m2;");
    }
    // Either node continues the sequence the other stored.
    let next = nodes[1]
        .send(&produced("/v1/stream/both", "m3;", "p", 0, 3))
        .await;
    assert_eq!(next.status, StatusCode::OK);
    // A refusal is decided on the node's own view, which takes in the other node's append
    // from its notice, a moment after that append's answer (a known limit, in
    // docs/durable-streams.md): the gap is asked once node 0 has the append.
    let tail = next.header("stream-next-offset");
    for _ in 0..100 {
        let head = nodes[0].send(&Req::new("HEAD", "/v1/stream/both")).await;
        if head.header("stream-next-offset") == tail {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let gap = nodes[0]
        .send(&produced("/v1/stream/both", "x", "p", 0, 9))
        .await;
    assert_eq!(gap.header("producer-expected-seq").as_deref(), Some("4"));
}

#[tokio::test]
async fn sse_readers_count_in_the_stream_limits_as_events_streams_do() {
    let mut config = helpers::server_config();
    config.max_sse_streams = 10;
    config.max_sse_streams_per_tenant = 2;
    let app = App::with(config).await;
    app.send(&put("/v1/stream/live", "application/json")).await;
    app.send(&post("/v1/stream/live", "application/json", "[1]"))
        .await;
    let events = app
        .send(
            &Req::new("POST", "/events/queues")
                .header("content-type", "application/json")
                .body(br#"{"task_id":"t1"}"#.to_vec()),
        )
        .await;
    assert_eq!(events.status, StatusCode::CREATED);
    let live = Req::new("GET", "/v1/stream/live?offset=-1&live=sse");
    let first = app.open(&live).await;
    assert_eq!(first.status(), StatusCode::OK);
    let plain = app.open(&Req::new("GET", "/events/workflows/t1")).await;
    assert_eq!(plain.status(), StatusCode::OK);
    assert_eq!(app.state.open_streams(), 2);
    // The tenant's two slots are taken, one by each protocol.
    let refused = app.send(&live).await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    drop(first);
    assert_eq!(app.state.open_streams(), 1);
    assert_eq!(app.open(&live).await.status(), StatusCode::OK);
}

#[tokio::test]
async fn an_events_stream_of_a_binary_stream_is_refused_not_sent_as_events() {
    let app = App::open_mode().await;
    app.send(&put("/v1/stream/bin", "application/octet-stream"))
        .await;
    app.send(&post(
        "/v1/stream/bin",
        "application/octet-stream",
        "\u{1}raw",
    ))
    .await;
    let r = app.send(&Req::new("GET", "/events/workflows/bin")).await;
    r.assert_error(StatusCode::CONFLICT, "/v1/stream/bin");
    // A JSON stream's messages are JSON: its events stream sends them.
    app.send(&put("/v1/stream/js", "application/json")).await;
    let r = app.open(&Req::new("GET", "/events/ingestion/js")).await;
    assert_eq!(r.status(), StatusCode::OK);
}

#[tokio::test]
async fn an_append_over_the_body_limit_is_413_and_stores_nothing() {
    let mut config = helpers::server_config();
    config.max_body_bytes = 1024;
    let app = App::with(config).await;
    app.send(&put("/v1/stream/big", "application/octet-stream"))
        .await;
    let big = "x".repeat(5000);
    let r = app
        .send(&post("/v1/stream/big", "application/octet-stream", &big))
        .await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    let fits = app
        .send(&post("/v1/stream/big", "application/octet-stream", "ok"))
        .await;
    assert_eq!(fits.status, StatusCode::NO_CONTENT);
    let all = app.send(&Req::new("GET", "/v1/stream/big?offset=-1")).await;
    assert_eq!(all.body, b"ok");
}

/// A catch-up read answers everything up to the tail in one response, however many slices
/// of the store it is streamed in (512 KiB each): in order, as one JSON array, nothing
/// repeated or lost, retention respected, `Stream-Next-Offset` the tail.
#[tokio::test]
async fn a_catch_up_read_streams_everything_to_the_tail_in_one_response() {
    let app = App::open_mode().await;
    app.send(&put("/v1/stream/big", "application/json")).await;
    // 1200 messages of ~1 KiB (2.4 slices) into a stream retaining 1000 (the default).
    let pad = "p".repeat(1000);
    let mut tails = Vec::new();
    for batch in 0..12 {
        let items: Vec<String> = (0..100)
            .map(|i| format!(r#"{{"i":{},"pad":"{pad}"}}"#, batch * 100 + i))
            .collect();
        let r = app
            .send(&post(
                "/v1/stream/big",
                "application/json",
                &format!("[{}]", items.join(",")),
            ))
            .await;
        assert_eq!(r.status, StatusCode::NO_CONTENT);
        tails.push(r.header("stream-next-offset").unwrap());
    }
    let indexes = |r: &super::app::Reply| -> Vec<u64> {
        r.json()
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["i"].as_u64().unwrap())
            .collect()
    };
    let all = app.send(&Req::new("GET", "/v1/stream/big?offset=-1")).await;
    assert_eq!(all.status, StatusCode::OK);
    assert_eq!(indexes(&all), (200..1200).collect::<Vec<_>>());
    assert_eq!(all.header("stream-next-offset").as_ref(), tails.last());
    assert_eq!(all.header("stream-up-to-date").as_deref(), Some("true"));
    // From an offset a response gave: the rest, in one response again.
    let rest = app
        .send(&Req::new(
            "GET",
            &format!("/v1/stream/big?offset={}", tails[5]),
        ))
        .await;
    assert_eq!(indexes(&rest), (600..1200).collect::<Vec<_>>());
    assert_eq!(rest.header("stream-next-offset").as_ref(), tails.last());
    // Below retention: gone.
    let gone = app
        .send(&Req::new(
            "GET",
            &format!("/v1/stream/big?offset={}", tails[0]),
        ))
        .await;
    assert_eq!(gone.status, StatusCode::GONE);
    // The same read again is the same ETag, and `If-None-Match` with it reads nothing.
    let etag = all.header("etag").unwrap();
    let cached = app
        .send(&Req::new("GET", "/v1/stream/big?offset=-1").header("if-none-match", &etag))
        .await;
    assert_eq!(cached.status, StatusCode::NOT_MODIFIED);
    assert!(cached.body.is_empty());

    // A binary stream's read is its messages' bytes, back to back, across slices too.
    app.send(&put("/v1/stream/bytes", "application/octet-stream"))
        .await;
    let mut sent = Vec::new();
    for k in 0..3u8 {
        let chunk = vec![b'a' + k; 300 << 10];
        let r = app
            .send(
                &Req::new("POST", "/v1/stream/bytes")
                    .header("content-type", "application/octet-stream")
                    .body(chunk.clone()),
            )
            .await;
        assert_eq!(r.status, StatusCode::NO_CONTENT);
        sent.extend_from_slice(&chunk);
    }
    let read = app
        .send(&Req::new("GET", "/v1/stream/bytes?offset=-1"))
        .await;
    assert_eq!(read.body.len(), sent.len());
    assert!(read.body == sent);
}
