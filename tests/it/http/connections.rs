//! The connection layer under hostile load (issue 26, item 3), over real sockets: connection
//! limits in total and per client address with a clean `503`, `413` before a body declared too
//! large is sent, the queue looked up before an enqueue body is read, the budget of bodies in
//! flight, and a JSON `detail` on answers to request heads hyper cannot parse.

use std::time::Duration;

use axum::http::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::working;
use crate::helpers::{self, HANG_GUARD, TestServer};

/// A server whose read timeouts are far beyond [`HANG_GUARD`]: an answer a test reads came
/// from the limit under test, never from a timeout.
fn patient() -> eventqueue::server::ServerConfig {
    let mut config = helpers::server_config();
    config.header_read_timeout = Duration::from_secs(600);
    config.body_read_timeout = Duration::from_secs(600);
    config
}

/// Reads one answer from `stream`: its head, then as many body bytes as its
/// `content-length` says. Returns the status and the body as JSON.
async fn answer(stream: &mut TcpStream) -> (u16, Value) {
    let read = async {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .map_or(0, |v| v.trim().parse().unwrap());
                if buf.len() >= end + 4 + len {
                    let status = head[9..12].parse().unwrap();
                    let body = &buf[end + 4..end + 4 + len];
                    let json = serde_json::from_slice(body).unwrap_or(Value::Null);
                    return (status, json);
                }
            }
            let n = stream.read(&mut chunk).await.unwrap();
            assert!(
                n > 0,
                "connection closed after {:?}",
                String::from_utf8_lossy(&buf)
            );
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(HANG_GUARD, read)
        .await
        .expect("no answer")
}

/// Sends `head` (CRLFs added) and `body` on a new connection.
async fn send(server: &TestServer, head: &str, body: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    let head = head.replace('\n', "\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(b"\r\n\r\n").await.unwrap();
    stream.write_all(body).await.unwrap();
    stream
}

async fn create_queue(server: &TestServer, task: &str) {
    let r = helpers::client()
        .post(server.url("/events/queues"))
        .json(&json!({ "task_id": task }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
}

#[tokio::test]
async fn a_body_declared_over_the_limit_is_413_before_it_is_sent() {
    let server = TestServer::start(patient()).await;
    create_queue(&server, "wf-1").await;
    // 3 MB declared, 2 bytes sent: answered now, not after the body timeout.
    let mut s = send(
        &server,
        "POST /events/queues/wf-1/events HTTP/1.1\nHost: x\nContent-Type: application/json\n\
         Content-Length: 3000000",
        b"{}",
    )
    .await;
    let (status, body) = answer(&mut s).await;
    assert_eq!(status, 413);
    assert_eq!(
        body["detail"],
        "request body exceeds the limit of 2097152 bytes (Content-Length: 3000000)"
    );
    // Every route that reads a body does the same.
    let mut s = send(
        &server,
        "POST /events/queues HTTP/1.1\nHost: x\nContent-Length: 2097153",
        b"",
    )
    .await;
    assert_eq!(answer(&mut s).await.0, 413);
    // At the limit, the body is read.
    let mut s = send(
        &server,
        "POST /events/queues/wf-1/events HTTP/1.1\nHost: x\nContent-Length: 2097152",
        b"{",
    )
    .await;
    let pending = tokio::time::timeout(Duration::from_millis(200), answer(&mut s)).await;
    assert!(pending.is_err(), "answered before the body: {pending:?}");
}

#[tokio::test]
async fn an_enqueue_to_an_unknown_queue_is_404_before_its_body_is_read() {
    let server = TestServer::start(patient()).await;
    let mut s = send(
        &server,
        "POST /events/queues/nope/events HTTP/1.1\nHost: x\nContent-Type: application/json\n\
         Content-Length: 1000000",
        b"{\"event_type\":",
    )
    .await;
    let (status, body) = answer(&mut s).await;
    assert_eq!(status, 404);
    assert_eq!(body["detail"], "No queue found for task nope");
}

#[tokio::test]
async fn connections_over_the_per_address_limit_get_503_and_the_place_comes_back() {
    let mut config = patient();
    config.max_connections_per_ip = 3;
    let server = TestServer::start(config).await;
    // Three idle connections hold the address's places (counted at accept, before any
    // request).
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(TcpStream::connect(server.addr).await.unwrap());
    }
    let mut fourth = send(&server, "GET /healthz HTTP/1.1\nHost: x", b"").await;
    let (status, body) = answer(&mut fourth).await;
    assert_eq!(status, 503);
    let detail = body["detail"].as_str().unwrap();
    assert!(
        detail.contains("too many connections from 127.0.0.1: at most 3 per client address"),
        "{detail}"
    );
    // The refused connection is closed.
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(HANG_GUARD, fourth.read_to_end(&mut rest)).await;
    assert!(matches!(closed, Ok(Ok(0))), "{closed:?}");

    // One place given back: a new connection gets in once the server saw the close.
    drop(idle.pop());
    tokio::time::timeout(HANG_GUARD, async {
        loop {
            let mut s = send(&server, "GET /healthz HTTP/1.1\nHost: x", b"").await;
            match answer(&mut s).await.0 {
                200 => break,
                503 => tokio::time::sleep(Duration::from_millis(10)).await,
                other => panic!("answered {other}"),
            }
        }
    })
    .await
    .expect("the place never came back");

    // A keep-alive connection is one place, whatever number of requests it carries.
    drop(idle);
    let mut config = patient();
    config.max_connections_per_ip = 1;
    let single = TestServer::start(config).await;
    let mut s = TcpStream::connect(single.addr).await.unwrap();
    for _ in 0..5 {
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(answer(&mut s).await, (200, json!({"status": "ok"})));
    }
}

#[tokio::test]
async fn connections_over_the_total_limit_get_503() {
    let mut config = patient();
    config.max_connections = 2;
    let server = TestServer::start(config).await;
    let _a = TcpStream::connect(server.addr).await.unwrap();
    let _b = TcpStream::connect(server.addr).await.unwrap();
    let mut c = send(&server, "GET /healthz HTTP/1.1\nHost: x", b"").await;
    let (status, body) = answer(&mut c).await;
    assert_eq!(status, 503);
    assert_eq!(
        body["detail"],
        "too many connections: the server holds at most 2; retry later"
    );
}

#[tokio::test]
async fn bodies_beyond_the_budget_in_flight_get_503_until_it_frees() {
    let mut config = patient();
    config.max_body_bytes_in_flight = 3 << 20;
    let server = TestServer::start(config).await;
    create_queue(&server, "wf-1").await;
    let head = |len: usize| {
        format!(
            "POST /events/queues/wf-1/events HTTP/1.1\nHost: x\n\
             Content-Type: application/json\nContent-Length: {len}"
        )
    };
    // A client sends 2 MB bodies but not their last bytes: the first holds 2 MB of the
    // budget, the second does not fit and is refused at once.
    let holding = send(&server, &head(2_000_000), b"{\"event_type\":").await;
    // (Until the server has taken the first one's share, a second one is let in and waits
    // for its body: it is dropped, giving its share back, and asked again.)
    let refused = tokio::time::timeout(HANG_GUARD, async {
        loop {
            let mut s = send(&server, &head(2_000_000), b"").await;
            if let Ok((503, body)) =
                tokio::time::timeout(Duration::from_millis(100), answer(&mut s)).await
            {
                return body;
            }
        }
    })
    .await
    .expect("never refused");
    assert!(
        refused["detail"]
            .as_str()
            .unwrap()
            .starts_with("too many request bodies being received"),
        "{refused}"
    );
    // A small body still fits.
    let event = working(0).to_string();
    let mut small = send(&server, &head(event.len()), event.as_bytes()).await;
    assert_eq!(answer(&mut small).await.0, 200);
    // The held share comes back when that client goes away.
    drop(holding);
    let big = json!({"events": [working(1)], "pad": "x".repeat(1_900_000)}).to_string();
    tokio::time::timeout(HANG_GUARD, async {
        loop {
            let mut s = send(&server, &head(big.len()), big.as_bytes()).await;
            match answer(&mut s).await.0 {
                503 => tokio::time::sleep(Duration::from_millis(10)).await,
                // Read whole and judged (its unknown field is a 400): no longer refused.
                _ => break,
            }
        }
    })
    .await
    .expect("the budget never came back");
}

#[tokio::test]
async fn unparseable_request_heads_are_answered_with_a_json_detail() {
    let server = TestServer::start(patient()).await;
    let many: String = (0..120).map(|i| format!("X-H{i}: v\n")).collect();
    let cases = [
        (
            format!("GET /healthz HTTP/1.1\nHost: x\n{}", many.trim_end()),
            431,
            "request head too large",
        ),
        (
            format!("GET /{} HTTP/1.1\nHost: x", "a".repeat(70_000)),
            414,
            "request URI too long",
        ),
        (
            "GET /healthz HTTP/1.1\nHo st: x".to_string(),
            400,
            "malformed request head",
        ),
    ];
    for (head, code, needle) in cases {
        let mut s = send(&server, &head, b"").await;
        let (status, body) = answer(&mut s).await;
        assert_eq!(status, code, "{body}");
        let detail = body["detail"].as_str().unwrap_or_default();
        assert!(detail.contains(needle), "{code}: {body}");
    }
    // Answers of the API itself are untouched, a bodiless one to HEAD included.
    let mut s = send(&server, "HEAD /events/queues/nope HTTP/1.1\nHost: x", b"").await;
    let mut head = vec![0u8; 1024];
    let n = tokio::time::timeout(HANG_GUARD, s.read(&mut head))
        .await
        .unwrap()
        .unwrap();
    let head = String::from_utf8_lossy(&head[..n]).to_lowercase();
    assert!(head.starts_with("http/1.1 404"), "{head}");
    assert!(
        head.ends_with("\r\n\r\n"),
        "a HEAD answer has no body: {head:?}"
    );
}
