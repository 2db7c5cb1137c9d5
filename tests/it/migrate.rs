//! `eventqueue migrate`: a single-node install's data copied into Redis, after which a server
//! on that Redis answers what the old node answered — the same queue infos, event lists at
//! the same offsets, gap notices, `Last-Event-ID` resumes, checkpoints, stream content types
//! and bytes — and recognises idempotent re-posts of events copied. A second migration
//! refuses, naming what the target holds, unless told to skip it.
//!
//! The old node runs in-process on a temporary directory; the migration runs the binary, as
//! an operator would; Redis is a `redis-server` the test starts (see `redis::RedisServer`).

use std::path::Path;
use std::process::{Command, Output};

use eventqueue::StorageBackend;
use serde_json::{Value, json};

use crate::helpers::{SseReader, TestServer, client, server_config};
use crate::redis::{RedisCluster, RedisServer};

/// `(tenant, task)` of every queue the test creates; `notes` is a Durable Streams stream.
const QUEUES: [(&str, &str); 4] = [
    ("acme", "wf-1"),
    ("beta", "trimmed"),
    ("gamma", "done"),
    ("gamma", "notes"),
];

async fn call(
    server: &TestServer,
    tenant: &str,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = client()
        .request(method.parse().unwrap(), server.url(path))
        .header("x-tenant-id", tenant);
    if let Some(body) = body {
        req = req.json(&body);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

async fn stream_post(server: &TestServer, path: &str, body: &str, producer: Option<(&str, &str)>) {
    let mut req = client()
        .post(server.url(path))
        .header("x-tenant-id", "gamma")
        .header("content-type", "text/plain")
        .body(body.to_string());
    if let Some((epoch, seq)) = producer {
        req = req
            .header("producer-id", "writer-1")
            .header("producer-epoch", epoch)
            .header("producer-seq", seq);
    }
    let status = req.send().await.unwrap().status();
    assert!(status.is_success(), "{path}: {status}");
}

/// Events with the given ids (status events).
fn events(task: &str, ids: &[&str]) -> Value {
    let events: Vec<Value> = ids
        .iter()
        .map(|id| json!({"event_id": id, "task_id": task, "event_type": "status", "state": "working"}))
        .collect();
    json!({ "events": events })
}

/// Fills the old node: a workflow with events and two checkpoints (acme), a queue trimmed
/// to its last 3 events and cancelled (beta), a finished and closed ingestion queue and a
/// text stream with an idempotent producer's messages, closed (gamma).
async fn fill(old: &TestServer) {
    let create = |tenant: &'static str, body: Value| async move {
        let (status, reply) = call(old, tenant, "POST", "/events/queues", Some(body)).await;
        assert_eq!(status, 201, "{reply}");
    };
    create("acme", json!({"task_id": "wf-1", "kind": "workflow"})).await;
    let (status, _) = call(
        old,
        "acme",
        "POST",
        "/events/queues/wf-1/events",
        Some(events("wf-1", &["acme-1", "acme-2"])),
    )
    .await;
    assert_eq!(status, 200);
    for status in ["running", "completed"] {
        let (code, reply) = call(
            old,
            "acme",
            "POST",
            "/events/workflows/wf-1/checkpoints",
            Some(json!({
                "status": status, "current_phase": 1, "total_phases": 2,
                "tasks": [{"task_id": "search", "status": "completed", "result": {"hits": 3}}],
                "state": {"query": "cats"}
            })),
        )
        .await;
        assert_eq!(code, 201, "{reply}");
    }

    create(
        "beta",
        json!({"task_id": "trimmed", "max_buffer_size": 3, "ttl_minutes": 90}),
    )
    .await;
    let ids: Vec<String> = (0..8).map(|i| format!("b-{i}")).collect();
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    let (status, _) = call(
        old,
        "beta",
        "POST",
        "/events/queues/trimmed/events",
        Some(events("trimmed", &ids)),
    )
    .await;
    assert_eq!(status, 200);
    let (status, _) = call(
        old,
        "beta",
        "POST",
        "/events/workflows/trimmed/cancel",
        Some(json!({"reason": "user pressed stop"})),
    )
    .await;
    assert_eq!(status, 200);

    create("gamma", json!({"task_id": "done", "kind": "ingestion"})).await;
    let (status, _) = call(
        old,
        "gamma",
        "POST",
        "/events/queues/done/events",
        Some(json!({"events": [
            {"event_id": "g-1", "event_type": "progress", "current": 1, "total": 2},
            {"event_type": "complete", "result": {"videos": 2}}
        ]})),
    )
    .await;
    assert_eq!(status, 200);
    let (status, _) = call(old, "gamma", "POST", "/events/queues/done/close", None).await;
    assert_eq!(status, 200);

    let put = client()
        .put(old.url("/v1/stream/notes"))
        .header("x-tenant-id", "gamma")
        .header("content-type", "text/plain")
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 201);
    stream_post(old, "/v1/stream/notes", "one ", None).await;
    stream_post(old, "/v1/stream/notes", "two ", Some(("0", "0"))).await;
    stream_post(old, "/v1/stream/notes", "three", Some(("0", "1"))).await;
}

/// Reads a stream's frames as `(id, event, data)`, the `connected` frame without its
/// timestamp: `n` frames, or all of them when `n` is `None` (a stream that ends).
async fn frames(
    server: &TestServer,
    tenant: &str,
    path: &str,
    last_event_id: Option<u64>,
    n: Option<usize>,
) -> Vec<Value> {
    let mut req = client().get(server.url(path)).header("x-tenant-id", tenant);
    if let Some(id) = last_event_id {
        req = req.header("last-event-id", id.to_string());
    }
    let r = req.send().await.unwrap();
    assert_eq!(r.status(), 200, "{path}");
    let mut sse = SseReader::new(r);
    let mut out = Vec::new();
    while n.is_none_or(|n| out.len() < n) {
        let Some(f) = sse.next_event().await else {
            break;
        };
        let mut data = f.json();
        if f.event.as_deref() == Some("connected")
            && let Some(obj) = data.as_object_mut()
        {
            obj.remove("timestamp");
        }
        out.push(json!([f.id, f.event, data]));
    }
    out
}

/// What the server answers about every queue: info (without the live subscriber count),
/// the whole event list with gap notices, a `Last-Event-ID` resume, the stream view of
/// each queue (content type, bytes, next offset, closure), and the workflow's checkpoints.
async fn snapshot(server: &TestServer) -> Value {
    let mut out = serde_json::Map::new();
    for (tenant, task) in QUEUES {
        let (status, mut info) = call(
            server,
            tenant,
            "GET",
            &format!("/events/queues/{task}"),
            None,
        )
        .await;
        assert_eq!(status, 200, "{tenant}/{task}: {info}");
        info.as_object_mut().unwrap().remove("subscriber_count");
        let latest = info["latest_offset"].as_u64().unwrap();
        let first = info["first_offset"].as_u64().unwrap();
        let retained = (latest - first) as usize;
        let gap = usize::from(first > 0);
        let finished = info["is_finished"].as_bool().unwrap();
        let sse_path = format!("/events/workflows/{task}?from_offset=0");
        let all = if task == "notes" {
            Value::Null
        } else {
            // connected, the gap notice, the events; a finished task's stream ends by itself.
            let n = (!finished).then_some(1 + gap + retained);
            json!(frames(server, tenant, &sse_path, None, n).await)
        };
        let resumed = if task == "notes" || latest < 2 {
            Value::Null
        } else {
            let n = (!finished).then_some(2);
            json!(frames(server, tenant, &sse_path, Some(latest - 2), n).await)
        };
        let stream = client()
            .get(server.url(&format!("/v1/stream/{task}?offset=-1")))
            .header("x-tenant-id", tenant)
            .send()
            .await
            .unwrap();
        let header = |name: &str| {
            stream
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let stream_meta = json!([
            header("content-type"),
            header("stream-next-offset"),
            header("stream-closed")
        ]);
        let body = stream.bytes().await.unwrap();
        let (_, checkpoints) = call(
            server,
            tenant,
            "GET",
            &format!("/events/workflows/{task}/checkpoints"),
            None,
        )
        .await;
        out.insert(
            format!("{tenant}/{task}"),
            json!({
                "info": info,
                "all": all,
                "resumed": resumed,
                "stream": stream_meta,
                "stream_body": String::from_utf8_lossy(&body),
                "checkpoints": checkpoints,
            }),
        );
    }
    Value::Object(out)
}

fn migrate(from: &Path, to: &str, more: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_eventqueue"))
        .args(["migrate", "--from"])
        .arg(from)
        .args(["--to", to])
        .args(more)
        .output()
        .expect("cannot run eventqueue migrate")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_node_install_moves_to_redis_and_serves_the_same() {
    let redis = RedisServer::start();
    let url = format!("redis://127.0.0.1:{}", redis.port);
    let old = TestServer::start(server_config()).await;
    fill(&old).await;
    let before = snapshot(&old).await;
    // Sanity of what is compared: the trimmed queue starts past 0 with a gap notice, and
    // the checkpoints are there.
    assert_eq!(before["beta/trimmed"]["info"]["first_offset"], 5);
    assert_eq!(before["beta/trimmed"]["all"][1][1], "gap");
    assert_eq!(
        before["acme/wf-1"]["checkpoints"]["checkpoints"]
            .as_array()
            .map(Vec::len),
        Some(2)
    );
    assert_eq!(before["gamma/notes"]["stream_body"], "one two three");

    // A running server's directory is refused.
    let busy = migrate(old.data_dir(), &url, &[]);
    assert!(!busy.status.success());
    assert!(
        text(&busy.stderr).contains("in use"),
        "{}",
        text(&busy.stderr)
    );

    let dir = old.stop().await;
    let done = migrate(dir.path(), &url, &[]);
    assert!(done.status.success(), "{}", text(&done.stderr));
    let summary = text(&done.stdout);
    assert!(
        summary.contains("migrated 4 queues (0 skipped), 14 events, 2 checkpoints"),
        "{summary}"
    );

    let on_redis = |dir| {
        let storage = StorageBackend::Redis {
            url: url.clone(),
            prefix: "eq:".into(),
        };
        TestServer::start_tuned(dir, move |c| c.storage = storage, server_config())
    };
    let new = on_redis(tempfile::tempdir().unwrap()).await;
    let after = snapshot(&new).await;
    assert_eq!(before, after);

    // Idempotency holds for ids copied: a re-post answers the stored offset and stores
    // nothing; a new event continues the offsets.
    let (status, reply) = call(
        &new,
        "beta",
        "POST",
        "/events/queues/trimmed/events",
        Some(events("trimmed", &["b-6", "b-8"])),
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["offsets"], json!([6, 8]));
    // An id the old store derived from the offset (the producer gave none) is found too.
    let derived = before["acme/wf-1"]["all"][3][2]["event_id"].clone();
    assert_eq!(before["acme/wf-1"]["all"][3][0], "2");
    let (_, reply) = call(
        &new,
        "acme",
        "POST",
        "/events/queues/wf-1/events",
        Some(json!({"event_id": derived, "event_type": "status", "state": "working"})),
    )
    .await;
    assert_eq!(reply["offsets"], json!([2]), "{reply}");
    assert_eq!(reply["latest_offset"], 6, "{reply}");
    // A closed queue stays closed.
    let (status, _) = call(
        &new,
        "gamma",
        "POST",
        "/events/queues/done/events",
        Some(json!({"event_type": "status", "state": "working"})),
    )
    .await;
    assert_eq!(status, 409);

    // A second migration refuses, naming what the target holds, and copies nothing.
    let again = migrate(dir.path(), &url, &[]);
    assert!(!again.status.success());
    let err = text(&again.stderr);
    assert!(err.contains("already holds 5"), "{err}");
    assert!(err.contains("queue beta/trimmed"), "{err}");
    assert!(err.contains("checkpoints of workflow acme/wf-1"), "{err}");

    // With --skip-existing, only what is new is copied; what the target holds stays.
    let old = TestServer::start_in(dir, server_config()).await;
    let (status, _) = call(
        &old,
        "delta",
        "POST",
        "/events/queues",
        Some(json!({"task_id": "extra"})),
    )
    .await;
    assert_eq!(status, 201);
    let dir = old.stop().await;
    let skipped = migrate(dir.path(), &url, &["--skip-existing"]);
    assert!(skipped.status.success(), "{}", text(&skipped.stderr));
    assert!(
        text(&skipped.stdout).contains("migrated 1 queues (5 skipped), 0 events, 0 checkpoints"),
        "{}",
        text(&skipped.stdout)
    );
    let (status, info) = call(&new, "delta", "GET", "/events/queues/extra", None).await;
    assert_eq!(status, 200, "{info}");
    let (_, info) = call(&new, "beta", "GET", "/events/queues/trimmed", None).await;
    assert_eq!(
        info["latest_offset"], 9,
        "the copy kept what was written since"
    );
}

/// The same install moved into a Redis Cluster (the queues land in several slots; a
/// workflow's checkpoints share its queue's slot): a server on the cluster answers what the
/// old node answered, recognises re-posts of copied ids, and a second migration refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_node_install_moves_into_a_redis_cluster_and_serves_the_same() {
    let cluster = RedisCluster::start();
    let url = cluster.url();
    let old = TestServer::start(server_config()).await;
    fill(&old).await;
    let before = snapshot(&old).await;
    let dir = old.stop().await;
    let done = migrate(dir.path(), &url, &[]);
    assert!(done.status.success(), "{}", text(&done.stderr));
    assert!(
        text(&done.stdout).contains("migrated 4 queues (0 skipped), 14 events, 2 checkpoints"),
        "{}",
        text(&done.stdout)
    );

    let storage = cluster.config().storage;
    let new = TestServer::start_tuned(
        tempfile::tempdir().unwrap(),
        move |c| c.storage = storage,
        server_config(),
    )
    .await;
    assert_eq!(before, snapshot(&new).await);
    let (status, reply) = call(
        &new,
        "beta",
        "POST",
        "/events/queues/trimmed/events",
        Some(events("trimmed", &["b-6", "b-8"])),
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["offsets"], json!([6, 8]));

    let again = migrate(dir.path(), &url, &[]);
    assert!(!again.status.success());
    let err = text(&again.stderr);
    assert!(err.contains("already holds 5"), "{err}");
    assert!(err.contains("checkpoints of workflow acme/wf-1"), "{err}");
    new.stop().await;
}
