//! Hostile input: every malformed request gets a clear `{"detail": …}` and changes nothing;
//! slow clients are cut off. After all of it the server is up and its data intact.

use std::time::Duration;

use axum::http::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::app::{App, Reply, Req};
use super::{complete, working};
use crate::helpers::{self, SseReader, TestServer};

/// What the store holds, as the API shows it: every queue's info (minus times) and every
/// event of every queue.
async fn snapshot(app: &App) -> Value {
    let mut queues = Vec::new();
    for info in app.state.manager().list_queues(None) {
        let queue = app
            .state
            .manager()
            .get_queue(&info.tenant_id, &info.task_id)
            .unwrap();
        let latest = queue.latest_offset();
        let mut events = Vec::new();
        if latest > 0 {
            let mut sub = queue.subscribe(0).unwrap();
            for _ in 0..latest {
                let delivery = tokio::time::timeout(helpers::HANG_GUARD, sub.next())
                    .await
                    .unwrap()
                    .unwrap()
                    .unwrap();
                match delivery {
                    eventqueue::Delivery::Event(ev) => {
                        events.push(serde_json::from_slice::<Value>(ev.json()).unwrap());
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
        }
        let mut info = serde_json::to_value(&info).unwrap();
        info.as_object_mut().unwrap().remove("last_activity");
        queues.push(json!({"info": info, "events": events}));
    }
    json!(queues)
}

async fn populated() -> App {
    let app = App::open_mode().await;
    let r = app
        .send(&Req::new("POST", "/events/queues").body(r#"{"task_id":"wf-1"}"#))
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let r = app
        .send(
            &Req::new("POST", "/events/queues/wf-1/events")
                .body(json!({"events": [working(0), working(1)]}).to_string()),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    app
}

fn post(uri: &str, body: impl Into<Vec<u8>>) -> Req {
    Req::new("POST", uri).body(body)
}

fn nested(depth: usize) -> String {
    format!("{}{}", "[".repeat(depth), "]".repeat(depth))
}

#[tokio::test]
async fn hostile_requests_are_refused_clearly_and_store_nothing() {
    let app = populated().await;
    let before = snapshot(&app).await;
    let long_id = "a".repeat(129);
    let ev = |v: Value| v.to_string();
    let huge_number = format!(
        r#"{{"event_type":"progress","current":1{},"total":2}}"#,
        "0".repeat(400)
    );
    let deep_details = format!(
        r#"{{"event_type":"progress","current":1,"total":2,"details":{{"a":{}}}}}"#,
        nested(80)
    );
    let many: Vec<Value> = (0..1001).map(working).collect();
    let too_big = format!(
        r#"{{"event_type":"status","state":"working","message":"{}"}}"#,
        "x".repeat(2 << 20)
    );
    let cases: Vec<(Req, StatusCode, &str)> = vec![
        // Ids: separators, traversal, NUL, non-ASCII, too long.
        (
            Req::new("GET", "/events/queues/a%2Fb"),
            StatusCode::BAD_REQUEST,
            "task_id",
        ),
        (
            Req::new("GET", "/events/queues/.."),
            StatusCode::BAD_REQUEST,
            "task_id",
        ),
        (
            Req::new("GET", "/events/queues/%2E%2E"),
            StatusCode::BAD_REQUEST,
            "task_id",
        ),
        (
            Req::new("GET", "/events/queues/..%2F..%2Fetc"),
            StatusCode::BAD_REQUEST,
            "task_id",
        ),
        (
            Req::new("GET", "/events/queues/a%00b"),
            StatusCode::BAD_REQUEST,
            "task_id",
        ),
        (
            Req::new("GET", "/events/queues/%C3%A9t%C3%A9"),
            StatusCode::BAD_REQUEST,
            "task_id",
        ),
        (
            Req::new("GET", "/events/queues/%F0%9F%92%A3"),
            StatusCode::BAD_REQUEST,
            "task_id",
        ),
        (
            Req::new("GET", "/events/queues/%FF%FE"),
            StatusCode::BAD_REQUEST,
            "task_id",
        ),
        (
            Req::new("GET", &format!("/events/queues/{long_id}")),
            StatusCode::BAD_REQUEST,
            "128",
        ),
        (
            Req::new("GET", &format!("/events/workflows/{long_id}")),
            StatusCode::BAD_REQUEST,
            "128",
        ),
        (
            Req::new("GET", "/events/queues/a/b/c"),
            StatusCode::NOT_FOUND,
            "Not Found",
        ),
        (
            post("/events/queues/a%2Fb/events", ev(working(0))),
            StatusCode::BAD_REQUEST,
            "task_id",
        ),
        (
            post("/events/workflows/..%2Fx/cancel", ""),
            StatusCode::BAD_REQUEST,
            "task_id",
        ),
        (
            post("/events/queues", r#"{"task_id":"a/b"}"#),
            StatusCode::BAD_REQUEST,
            "task_id",
        ),
        (
            post("/events/queues", r#"{"task_id":".."}"#),
            StatusCode::BAD_REQUEST,
            "task_id",
        ),
        (
            post("/events/queues", r#"{"task_id":"a\u0000b"}"#),
            StatusCode::BAD_REQUEST,
            "task_id",
        ),
        (
            post("/events/queues", r#"{"task_id":"été"}"#),
            StatusCode::BAD_REQUEST,
            "task_id",
        ),
        (
            post("/events/queues", format!(r#"{{"task_id":"{long_id}"}}"#)),
            StatusCode::BAD_REQUEST,
            "128",
        ),
        (
            post("/events/queues", r#"{"task_id":""}"#),
            StatusCode::BAD_REQUEST,
            "task_id",
        ),
        (
            post("/events/queues", r#"{"task_id":7}"#),
            StatusCode::BAD_REQUEST,
            "task_id",
        ),
        (
            Req::new("GET", "/events/queues").header("x-tenant-id", "../other"),
            StatusCode::BAD_REQUEST,
            "tenant_id",
        ),
        (
            Req::new("GET", "/events/queues?tenant_id=a%00"),
            StatusCode::BAD_REQUEST,
            "tenant_id",
        ),
        (
            post(
                "/events/queues/wf-1/events",
                ev(json!({"event_type":"status","state":"working","event_id":"../x"})),
            ),
            StatusCode::BAD_REQUEST,
            "event_id",
        ),
        // Malformed JSON.
        (
            post("/events/queues/wf-1/events", "{"),
            StatusCode::BAD_REQUEST,
            "invalid JSON",
        ),
        (
            post("/events/queues/wf-1/events", "nope"),
            StatusCode::BAD_REQUEST,
            "invalid JSON",
        ),
        (
            post("/events/queues/wf-1/events", ""),
            StatusCode::BAD_REQUEST,
            "invalid JSON",
        ),
        (
            post("/events/queues/wf-1/events", r#"{"event_type":"status",}"#),
            StatusCode::BAD_REQUEST,
            "invalid JSON",
        ),
        (
            post("/events/queues/wf-1/events", vec![0xff, 0xfe, b'{']),
            StatusCode::BAD_REQUEST,
            "invalid JSON",
        ),
        (
            post("/events/queues/wf-1/events", "[]"),
            StatusCode::BAD_REQUEST,
            "event",
        ),
        (
            post("/events/queues/wf-1/events", "null"),
            StatusCode::BAD_REQUEST,
            "event",
        ),
        (
            post("/events/queues", "{"),
            StatusCode::BAD_REQUEST,
            "invalid JSON",
        ),
        (
            post("/events/workflows/wf-1/cancel", "{\"reason\":"),
            StatusCode::BAD_REQUEST,
            "invalid JSON",
        ),
        // Deeply nested JSON, at the top and inside a free-form field.
        (
            post("/events/queues/wf-1/events", nested(100_000)),
            StatusCode::BAD_REQUEST,
            "nest deeper than 64",
        ),
        (
            post("/events/queues/wf-1/events", deep_details),
            StatusCode::BAD_REQUEST,
            "nest deeper than 64",
        ),
        (
            post("/events/queues", nested(65)),
            StatusCode::BAD_REQUEST,
            "nest deeper",
        ),
        (
            post("/events/workflows/wf-1/cancel", nested(1000)),
            StatusCode::BAD_REQUEST,
            "nest deeper",
        ),
        // Unknown event types and fields, wrong field types.
        (
            post(
                "/events/queues/wf-1/events",
                ev(json!({"event_type":"explode"})),
            ),
            StatusCode::BAD_REQUEST,
            "event_type",
        ),
        (
            post("/events/queues/wf-1/events", ev(json!({"event_type":7}))),
            StatusCode::BAD_REQUEST,
            "event_type",
        ),
        (
            post("/events/queues/wf-1/events", ev(json!({"state":"working"}))),
            StatusCode::BAD_REQUEST,
            "event_type",
        ),
        (
            post(
                "/events/queues/wf-1/events",
                ev(json!({"event_type":"status","state":"working","evil":1})),
            ),
            StatusCode::BAD_REQUEST,
            "evil",
        ),
        (
            post(
                "/events/queues/wf-1/events",
                ev(json!({"event_type":"status","state":"exploded"})),
            ),
            StatusCode::BAD_REQUEST,
            "state",
        ),
        (
            post(
                "/events/queues/wf-1/events",
                ev(json!({"event_type":"progress","current":"1","total":2})),
            ),
            StatusCode::BAD_REQUEST,
            "current",
        ),
        (
            post(
                "/events/queues/wf-1/events",
                ev(json!({"event_type":"progress","current":-1,"total":2})),
            ),
            StatusCode::BAD_REQUEST,
            "current",
        ),
        (
            post(
                "/events/queues/wf-1/events",
                ev(json!({"event_type":"progress","current":1.5,"total":2})),
            ),
            StatusCode::BAD_REQUEST,
            "current",
        ),
        (
            post("/events/queues/wf-1/events", huge_number),
            StatusCode::BAD_REQUEST,
            "out of range",
        ),
        (
            post(
                "/events/queues/wf-1/events",
                ev(json!({"event_type":"artifact","artifact_type":"x","data":[1]})),
            ),
            StatusCode::BAD_REQUEST,
            "data",
        ),
        (
            post(
                "/events/queues/wf-1/events",
                ev(json!({"event_type":"complete","result":"ok"})),
            ),
            StatusCode::BAD_REQUEST,
            "result",
        ),
        (
            post(
                "/events/queues/wf-1/events",
                ev(json!({"event_type":"complete","result":{},"execution_time_seconds":-1})),
            ),
            StatusCode::BAD_REQUEST,
            "execution_time_seconds",
        ),
        (
            post(
                "/events/queues/wf-1/events",
                ev(json!({"event_type":"status","state":"working","timestamp":"yesterday"})),
            ),
            StatusCode::BAD_REQUEST,
            "timestamp",
        ),
        (
            post(
                "/events/queues/wf-1/events",
                ev(json!({"event_type":"status","state":"working","tenant_id":"other"})),
            ),
            StatusCode::BAD_REQUEST,
            "tenant_id",
        ),
        (
            post("/events/queues/wf-1/events", ev(json!({"events": "all"}))),
            StatusCode::BAD_REQUEST,
            "events",
        ),
        (
            post(
                "/events/queues",
                ev(json!({"task_id":"ok","ttl_minutes":"soon"})),
            ),
            StatusCode::BAD_REQUEST,
            "ttl_minutes",
        ),
        (
            post(
                "/events/queues",
                ev(json!({"task_id":"ok","max_buffer_size":-1})),
            ),
            StatusCode::BAD_REQUEST,
            "max_buffer_size",
        ),
        (
            post("/events/workflows/wf-1/cancel", ev(json!({"reason": 5}))),
            StatusCode::BAD_REQUEST,
            "reason",
        ),
        // Progress over 100 %.
        (
            post(
                "/events/queues/wf-1/events",
                ev(json!({"event_type":"progress","current":1,"total":2,"percentage":150})),
            ),
            StatusCode::BAD_REQUEST,
            "percentage",
        ),
        (
            post(
                "/events/queues/wf-1/events",
                ev(json!({"event_type":"progress","current":3,"total":2})),
            ),
            StatusCode::BAD_REQUEST,
            "current",
        ),
        // A batch with one bad event stores none of it.
        (
            post(
                "/events/queues/wf-1/events",
                ev(json!({"events": [working(5), {"event_type":"nope"}]})),
            ),
            StatusCode::BAD_REQUEST,
            "events[1]",
        ),
        // Negative, non-numeric and huge resume points.
        (
            Req::new("GET", "/events/workflows/wf-1?from_offset=-1"),
            StatusCode::BAD_REQUEST,
            "from_offset",
        ),
        (
            Req::new("GET", "/events/workflows/wf-1?from_offset=1e3"),
            StatusCode::BAD_REQUEST,
            "from_offset",
        ),
        (
            Req::new("GET", "/events/workflows/wf-1").header("last-event-id", "-5"),
            StatusCode::BAD_REQUEST,
            "Last-Event-ID",
        ),
        (
            Req::new("GET", "/events/workflows/wf-1").header("last-event-id", &"9".repeat(60_000)),
            StatusCode::BAD_REQUEST,
            "Last-Event-ID",
        ),
        (
            Req::new("GET", "/events/workflows/wf-1")
                .header("last-event-id", "18446744073709551615"),
            StatusCode::BAD_REQUEST,
            "Last-Event-ID",
        ),
        (
            Req::new(
                "GET",
                &format!("/events/workflows/wf-1?from_offset={}", "9".repeat(10_000)),
            ),
            StatusCode::BAD_REQUEST,
            "from_offset",
        ),
        // Offsets are plain digits: no sign, no space.
        (
            Req::new("GET", "/events/workflows/wf-1?from_offset=+5"),
            StatusCode::BAD_REQUEST,
            "from_offset",
        ),
        (
            Req::new("GET", "/events/workflows/wf-1?from_offset=%205"),
            StatusCode::BAD_REQUEST,
            "from_offset",
        ),
        (
            Req::new("GET", "/events/workflows/wf-1").header("last-event-id", "+5"),
            StatusCode::BAD_REQUEST,
            "Last-Event-ID",
        ),
        // A key twice in one object, at any depth, in every body.
        (
            post(
                "/events/queues/wf-1/events",
                r#"{"event_type":"status","state":"working","state":"failed"}"#,
            ),
            StatusCode::BAD_REQUEST,
            r#"duplicate key "state""#,
        ),
        (
            post(
                "/events/queues/wf-1/events",
                r#"{"events":[{"event_type":"status","state":"working","metadata":{"k":1,"k":2}}]}"#,
            ),
            StatusCode::BAD_REQUEST,
            r#"duplicate key "k" in events[0].metadata"#,
        ),
        (
            post("/events/queues", r#"{"task_id":"wf-2","task_id":"wf-3"}"#),
            StatusCode::BAD_REQUEST,
            r#"duplicate key "task_id""#,
        ),
        (
            post(
                "/events/workflows/wf-1/cancel",
                r#"{"reason":"a","reason":"b"}"#,
            ),
            StatusCode::BAD_REQUEST,
            r#"duplicate key "reason""#,
        ),
        (
            post(
                "/events/workflows/wf-1/checkpoints",
                r#"{"state":{"step":1,"step":2}}"#,
            ),
            StatusCode::BAD_REQUEST,
            r#"duplicate key "step" in state"#,
        ),
        // A TTL the store cannot keep is refused, naming the maximum (100 years).
        (
            post("/events/queues", r#"{"task_id":"wf-2","ttl_minutes":1e15}"#),
            StatusCode::BAD_REQUEST,
            "from 0 to 52560000",
        ),
        // Over the limits: events per batch, body size.
        (
            post("/events/queues/wf-1/events", ev(json!({"events": many}))),
            StatusCode::PAYLOAD_TOO_LARGE,
            "at most 1000",
        ),
        (
            post("/events/queues/wf-1/events", too_big),
            StatusCode::PAYLOAD_TOO_LARGE,
            "limit",
        ),
        (
            post("/events/queues", vec![b' '; (2 << 20) + 1]),
            StatusCode::PAYLOAD_TOO_LARGE,
            "limit",
        ),
        // Wrong methods.
        (
            Req::new("PUT", "/events/queues/wf-1"),
            StatusCode::METHOD_NOT_ALLOWED,
            "Method Not Allowed",
        ),
    ];
    for (req, status, needle) in &cases {
        let r: Reply = app.send(req).await;
        let what = format!("{} {}", req.method, truncate(&req.uri));
        assert_eq!(
            r.status,
            *status,
            "{what}: {}",
            truncate(&String::from_utf8_lossy(&r.body))
        );
        let detail = r.detail();
        assert!(
            detail.to_lowercase().contains(&needle.to_lowercase()),
            "{what}: {detail:?} lacks {needle:?}"
        );
        // A detail names the problem; it never echoes a huge input back.
        assert!(
            detail.len() < 400,
            "{what}: detail of {} bytes",
            detail.len()
        );
    }
    // Nothing was stored, the server still answers, and the data is as it was.
    assert_eq!(snapshot(&app).await, before);
    let r = app.send(&Req::new("GET", "/healthz")).await;
    assert_eq!(r.status, StatusCode::OK);
    let r = app
        .send(&post("/events/queues/wf-1/events", complete().to_string()))
        .await;
    assert_eq!(r.json()["offsets"], json!([2]));
}

fn truncate(s: &str) -> String {
    s.chars().take(120).collect()
}

/// A 128-byte id of every allowed character is fine: the limit is exact.
#[tokio::test]
async fn the_longest_valid_id_is_accepted() {
    let app = App::open_mode().await;
    let id: String = "aZ09._:@-".chars().cycle().take(128).collect();
    let r = app
        .send(&post("/events/queues", json!({"task_id": id}).to_string()))
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.json());
    let r = app
        .send(&Req::new("GET", &format!("/events/queues/{id}/offset")))
        .await;
    assert_eq!(r.json()["offset"], 0);
    let nested_ok = format!(
        r#"{{"event_type":"progress","current":1,"total":2,"details":{{"a":{}}}}}"#,
        nested(60)
    );
    let r = app
        .send(&post(&format!("/events/queues/{id}/events"), nested_ok))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.json());
}

async fn read_to_end(stream: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    tokio::time::timeout(helpers::HANG_GUARD, stream.read_to_end(&mut out))
        .await
        .expect("the server did not close the connection")
        .ok();
    out
}

/// A client that sends half a request head and then nothing is disconnected; one that
/// sends its head but not its body gets `408`. Neither pins the server, which keeps serving
/// and keeps its data.
#[tokio::test]
async fn slow_clients_are_cut_off_and_the_server_stays_up() {
    let mut config = helpers::server_config();
    config.header_read_timeout = Duration::from_millis(200);
    config.body_read_timeout = Duration::from_millis(200);
    let server = TestServer::start(config).await;
    let client = helpers::client();
    let r = client
        .post(server.url("/events/queues"))
        .json(&json!({"task_id": "wf-1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = client
        .post(server.url("/events/queues/wf-1/events"))
        .json(&working(0))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    // Slow head: a few header bytes, then silence. The server hangs up.
    let mut slow_head = TcpStream::connect(server.addr).await.unwrap();
    slow_head
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await
        .unwrap();
    let answer = read_to_end(&mut slow_head).await;
    assert!(
        !answer.starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&answer)
    );
    // A connection that sends nothing at all is closed too.
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    assert!(read_to_end(&mut silent).await.is_empty());

    // Slow body: the head promises 100 bytes, 10 come. The answer is 408 with a detail.
    let mut slow_body = TcpStream::connect(server.addr).await.unwrap();
    slow_body
        .write_all(
            b"POST /events/queues/wf-1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"event_ty",
        )
        .await
        .unwrap();
    let answer = String::from_utf8_lossy(&read_to_end(&mut slow_body).await).into_owned();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    assert!(answer.contains("\"detail\""), "{answer:?}");

    // The server is up, and holds exactly what it acknowledged.
    let r = client.get(server.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let offset: Value = client
        .get(server.url("/events/queues/wf-1/offset"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(offset["offset"], 1);
    // A stream is not a slow client: it outlives the header timeout while it is read.
    let resp = client
        .get(server.url("/events/workflows/wf-1"))
        .send()
        .await
        .unwrap();
    let mut sse = SseReader::new(resp);
    assert_eq!(
        sse.next_event().await.unwrap().event.as_deref(),
        Some("connected")
    );
    assert_eq!(sse.next_event().await.unwrap().id.as_deref(), Some("0"));
    // Longer than the header timeout, with nothing on the wire.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let r = client
        .post(server.url("/events/queues/wf-1/events"))
        .json(&complete())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(sse.next_event().await.unwrap().id.as_deref(), Some("1"));
    server.stop().await;
}
