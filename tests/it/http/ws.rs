//! The pipelined producer connection (`GET /events/queues/{task_id}/events/ws`): acks in
//! order with offsets, per-frame errors, idempotent retries, auth at the handshake and per
//! frame (a revoked token), a producer
//! that sends far more than the in-flight bound without reading, the connection limits, and
//! shutdown.

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use super::app::{token, token_config};
use super::working;
use crate::helpers::{HANG_GUARD, SseReader, TestServer, client, server_config};

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn create(server: &TestServer, task: &str, bearer: Option<&str>) {
    let mut req = client()
        .post(server.url("/events/queues"))
        .json(&json!({ "task_id": task }));
    if let Some(t) = bearer {
        req = req.bearer_auth(t);
    }
    let r = req.send().await.unwrap();
    assert_eq!(r.status().as_u16(), 201, "{}", r.text().await.unwrap());
}

/// Opens the producer connection of `task`, with a bearer token if given.
async fn connect(server: &TestServer, task: &str, bearer: Option<&str>) -> Result<Socket, WsError> {
    let url = format!("ws://{}/events/queues/{task}/events/ws", server.addr);
    let mut req = url.into_client_request().unwrap();
    if let Some(t) = bearer {
        req.headers_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    tokio_tungstenite::connect_async(req).await.map(|(s, _)| s)
}

/// The next answer frame as JSON.
async fn next_ack(ws: &mut Socket) -> Value {
    loop {
        let msg = tokio::time::timeout(HANG_GUARD, ws.next())
            .await
            .expect("no answer frame")
            .expect("the connection ended")
            .unwrap();
        match msg {
            Message::Text(t) => return serde_json::from_str(&t).unwrap(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected frame {other:?}"),
        }
    }
}

async fn send(ws: &mut Socket, v: &Value) {
    ws.send(Message::text(v.to_string())).await.unwrap();
}

/// The HTTP status of a refused handshake.
fn refused_status(e: WsError) -> u16 {
    match e {
        WsError::Http(resp) => resp.status().as_u16(),
        other => panic!("expected an HTTP refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn frames_sent_without_waiting_are_acknowledged_in_order_with_their_offsets() {
    let server = TestServer::start(server_config()).await;
    create(&server, "wf-1", None).await;
    let mut ws = connect(&server, "wf-1", None).await.unwrap();
    for i in 0..50 {
        send(&mut ws, &working(i)).await;
    }
    send(
        &mut ws,
        &json!({"events": [working(50), working(51), working(52)]}),
    )
    .await;
    for seq in 0..50u64 {
        let ack = next_ack(&mut ws).await;
        assert_eq!(ack["seq"], seq, "{ack}");
        assert_eq!(ack["offsets"], json!([seq]), "{ack}");
        assert!(ack["latest_offset"].as_u64().unwrap() > seq, "{ack}");
        assert_eq!(ack["cancelled"], false);
    }
    let ack = next_ack(&mut ws).await;
    assert_eq!(ack["seq"], 50);
    assert_eq!(ack["offsets"], json!([50, 51, 52]));
    assert_eq!(ack["latest_offset"], 53);
    // Stored in the order sent.
    let resp = client()
        .get(server.url("/events/workflows/wf-1?from_offset=0"))
        .send()
        .await
        .unwrap();
    let mut sse = SseReader::new(resp);
    assert_eq!(sse.next_event().await.unwrap().json()["type"], "connected");
    for i in 0..53 {
        let frame = sse.next_event().await.unwrap();
        assert_eq!(frame.json()["phase"], format!("phase_{i}"));
        assert_eq!(frame.json()["offset"], i);
    }
    ws.close(None).await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn an_invalid_frame_is_answered_with_its_error_and_the_connection_goes_on() {
    let server = TestServer::start(server_config()).await;
    create(&server, "wf-1", None).await;
    let mut ws = connect(&server, "wf-1", None).await.unwrap();
    send(&mut ws, &working(0)).await;
    ws.send(Message::text("{not json")).await.unwrap();
    send(
        &mut ws,
        &json!({"event_type": "progress", "current": 5, "total": 2}),
    )
    .await;
    send(
        &mut ws,
        &json!({"event_type": "status", "state": "working", "task_id": "other"}),
    )
    .await;
    send(&mut ws, &working(1)).await;
    let mut answers = Vec::new();
    for _ in 0..5 {
        answers.push(next_ack(&mut ws).await);
    }
    assert_eq!(answers[0]["offsets"], json!([0]));
    for (i, a) in answers[1..4].iter().enumerate() {
        assert_eq!(a["seq"], i as u64 + 1, "{a}");
        assert_eq!(a["status"], 400, "{a}");
        assert!(a.get("offsets").is_none(), "{a}");
    }
    assert!(
        answers[1]["detail"].as_str().unwrap().contains("JSON"),
        "{}",
        answers[1]
    );
    assert!(
        answers[2]["detail"].as_str().unwrap().contains("current"),
        "{}",
        answers[2]
    );
    assert!(
        answers[3]["detail"].as_str().unwrap().contains("task_id"),
        "{}",
        answers[3]
    );
    // The invalid frames stored nothing; the next valid one took the next offset.
    assert_eq!(answers[4]["seq"], 4);
    assert_eq!(answers[4]["offsets"], json!([1]));
    server.stop().await;
}

#[tokio::test]
async fn a_retried_event_id_gets_its_stored_offset_on_any_connection() {
    let server = TestServer::start(server_config()).await;
    create(&server, "wf-1", None).await;
    let event = json!({"event_id": "evt-once", "event_type": "status", "state": "working"});
    let mut ws = connect(&server, "wf-1", None).await.unwrap();
    send(&mut ws, &working(0)).await;
    send(&mut ws, &event).await;
    send(&mut ws, &event).await;
    let acks = [
        next_ack(&mut ws).await,
        next_ack(&mut ws).await,
        next_ack(&mut ws).await,
    ];
    assert_eq!(acks[1]["offsets"], json!([1]));
    assert_eq!(acks[2]["offsets"], json!([1]), "{}", acks[2]);
    drop(ws);
    // A new connection (the producer reconnected after losing its answers).
    let mut ws = connect(&server, "wf-1", None).await.unwrap();
    send(&mut ws, &event).await;
    let again = next_ack(&mut ws).await;
    assert_eq!(again["seq"], 0);
    assert_eq!(again["offsets"], json!([1]));
    assert_eq!(again["latest_offset"], 2);
    server.stop().await;
}

#[tokio::test]
async fn the_handshake_needs_the_publish_scope_of_the_queues_tenant() {
    let server = TestServer::start(token_config()).await;
    let publisher = token("acme", "publish");
    create(&server, "wf-1", Some(&publisher)).await;
    assert_eq!(
        refused_status(connect(&server, "wf-1", None).await.unwrap_err()),
        401
    );
    let subscriber = token("acme", "subscribe");
    assert_eq!(
        refused_status(
            connect(&server, "wf-1", Some(&subscriber))
                .await
                .unwrap_err()
        ),
        403
    );
    // Another tenant's queue does not exist for this caller.
    let other = token("globex", "publish");
    assert_eq!(
        refused_status(connect(&server, "wf-1", Some(&other)).await.unwrap_err()),
        404
    );
    assert_eq!(
        refused_status(
            connect(&server, "wf-9", Some(&publisher))
                .await
                .unwrap_err()
        ),
        404
    );
    let mut ws = connect(&server, "wf-1", Some(&publisher)).await.unwrap();
    send(&mut ws, &working(0)).await;
    assert_eq!(next_ack(&mut ws).await["offsets"], json!([0]));
    // The events landed in the token's tenant.
    let info = client()
        .get(server.url("/events/queues/wf-1"))
        .bearer_auth(token("acme", "subscribe"))
        .send()
        .await
        .unwrap();
    let info: Value = info.json().await.unwrap();
    assert_eq!(info["tenant_id"], "acme");
    assert_eq!(info["latest_offset"], 1);
    server.stop().await;
}

#[tokio::test]
async fn a_connection_whose_token_is_revoked_stores_nothing_more() {
    let server = TestServer::start(token_config()).await;
    // Issued a minute ago: a revocation "now" covers it.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let publisher = super::app::keys()
        .mint_at(
            &eventqueue::TenantId::new("acme").unwrap(),
            eventqueue::server::Scopes::parse_strict("publish subscribe").unwrap(),
            now + 3600,
            now - 60,
        )
        .unwrap();
    create(&server, "wf-1", Some(&publisher)).await;
    let mut ws = connect(&server, "wf-1", Some(&publisher)).await.unwrap();
    send(&mut ws, &working(0)).await;
    assert_eq!(next_ack(&mut ws).await["offsets"], json!([0]));

    let r = client()
        .post(server.url("/events/admin/revocations"))
        .bearer_auth(token("ops", "admin"))
        .json(&json!({ "tenant_id": "acme" }))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());

    send(&mut ws, &working(1)).await;
    let ack = next_ack(&mut ws).await;
    assert_eq!(ack["status"], 401, "{ack}");
    assert!(
        ack["detail"].as_str().unwrap().contains("token revoked"),
        "{ack}"
    );
    // Nothing of it was stored (an admin looks: acme's tokens of this second are revoked).
    let info: Value = client()
        .get(server.url("/events/queues/wf-1?tenant_id=acme"))
        .bearer_auth(token("ops", "admin"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(info["latest_offset"], 1, "{info}");
    server.stop().await;
}

#[tokio::test]
async fn a_plain_get_of_the_endpoint_is_an_error_in_the_apis_shape() {
    let server = TestServer::start(server_config()).await;
    create(&server, "wf-1", None).await;
    let r = client()
        .get(server.url("/events/queues/wf-1/events/ws"))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_client_error(), "{}", r.status());
    let body: Value = r.json().await.unwrap();
    assert!(
        body["detail"].as_str().unwrap().contains("WebSocket"),
        "{body}"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_producer_far_ahead_of_the_in_flight_bound_loses_nothing() {
    // The server stops reading at 4 unanswered frames; the producer writes 400 without
    // reading a single answer, then reads them all.
    let mut config = server_config();
    config.max_ws_in_flight = 4;
    let server = TestServer::start(config).await;
    create(&server, "wf-1", None).await;
    let ws = connect(&server, "wf-1", None).await.unwrap();
    let (mut tx, mut rx) = ws.split();
    let writer = tokio::spawn(async move {
        for i in 0..400 {
            tx.send(Message::text(working(i).to_string()))
                .await
                .unwrap();
        }
        tx
    });
    for seq in 0..400u64 {
        let msg = tokio::time::timeout(HANG_GUARD, rx.next())
            .await
            .expect("no answer")
            .unwrap()
            .unwrap();
        let ack: Value = serde_json::from_str(msg.to_text().unwrap()).unwrap();
        assert_eq!(ack["seq"], seq, "{ack}");
        assert_eq!(ack["offsets"], json!([seq]), "{ack}");
    }
    let _sink = writer.await.unwrap();
    server.stop().await;
}

/// Whether a new plain connection from this address gets an answer (`true`) or the
/// connection limit's `503` (`false`).
async fn admitted(server: &TestServer) -> bool {
    let mut s = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(HANG_GUARD, s.read_to_end(&mut answer))
        .await
        .expect("no answer")
        .unwrap();
    match &answer[..answer.len().min(12)] {
        b"HTTP/1.1 200" => true,
        b"HTTP/1.1 503" => false,
        other => panic!("answered {:?}", String::from_utf8_lossy(other)),
    }
}

#[tokio::test]
async fn an_open_producer_connection_holds_its_place_in_the_connection_limits() {
    // An upgraded connection leaves HTTP, not the server's connection counts: a client
    // cannot open WebSockets past its per-address limit.
    let mut config = server_config();
    config.max_connections_per_ip = 2;
    let server = TestServer::start(config).await;
    create(&server, "wf-1", None).await;
    let mut first = connect(&server, "wf-1", None).await.unwrap();
    // The creating request's connection is given back once the server sees it closed.
    let mut second = tokio::time::timeout(HANG_GUARD, async {
        loop {
            if let Ok(ws) = connect(&server, "wf-1", None).await {
                break ws;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the second place never came");
    assert!(!admitted(&server).await, "a third connection got in");
    // Both producer connections work.
    send(&mut first, &working(0)).await;
    assert_eq!(next_ack(&mut first).await["offsets"], json!([0]));
    send(&mut second, &working(1)).await;
    assert_eq!(next_ack(&mut second).await["offsets"], json!([1]));
    // Closing one gives its place back.
    first.close(None).await.unwrap();
    drop(first);
    tokio::time::timeout(HANG_GUARD, async {
        while !admitted(&server).await {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the place never came back");
    server.stop().await;
}

#[tokio::test]
async fn shutdown_answers_what_was_read_then_closes_with_going_away() {
    let server = TestServer::start(server_config()).await;
    create(&server, "wf-1", None).await;
    let mut ws = connect(&server, "wf-1", None).await.unwrap();
    send(&mut ws, &working(0)).await;
    assert_eq!(next_ack(&mut ws).await["offsets"], json!([0]));
    server.state.shutdown_token().cancel();
    let close = loop {
        match tokio::time::timeout(HANG_GUARD, ws.next())
            .await
            .expect("no close frame")
        {
            Some(Ok(Message::Close(frame))) => break frame,
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    assert_eq!(u16::from(close.unwrap().code), 1001);
    server.stop().await;
}

#[tokio::test]
async fn the_clients_pipeline_answers_concurrent_publishes_each_with_its_own_offset() {
    let server = TestServer::start(server_config()).await;
    create(&server, "wf-1", None).await;
    let http = eventqueue::client::Client::new(server.url("")).unwrap();
    let pipeline = http.pipeline("wf-1").await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..50 {
        let p = pipeline.clone();
        tasks.push(tokio::spawn(async move { p.publish(&working(i)).await }));
    }
    let mut offsets = Vec::new();
    for t in tasks {
        let outcome = t.await.unwrap().unwrap();
        assert_eq!(outcome.offsets.len(), 1);
        offsets.push(outcome.offsets[0]);
    }
    offsets.sort_unstable();
    assert_eq!(offsets, (0..50).collect::<Vec<u64>>());
    // An invalid event is that publish's error; the pipeline goes on.
    let err = pipeline
        .publish(&json!({"event_type": "progress", "current": 3, "total": 1}))
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(400), "{err}");
    let batch = pipeline
        .publish_batch(&[working(50), working(51)])
        .await
        .unwrap();
    assert_eq!(batch.offsets, vec![50, 51]);
    assert_eq!(batch.latest_offset, 52);
    // An unknown queue is refused at the handshake, as over HTTP.
    let err = http.pipeline("wf-9").await.unwrap_err();
    assert!(err.is_not_found(), "{err}");
    drop(pipeline);
    server.stop().await;
}

#[tokio::test]
async fn frames_count_against_the_server_wide_budget_that_request_bodies_take() {
    let mut config = server_config();
    config.max_body_bytes_in_flight = 64 << 10;
    config.body_read_timeout = std::time::Duration::from_secs(600);
    let server = TestServer::start(config).await;
    create(&server, "wf-1", None).await;
    let mut ws = connect(&server, "wf-1", None).await.unwrap();
    let big = json!({"event_type": "progress", "current": 1, "total": 2,
                     "details": {"pad": "x".repeat(8000)}});
    // An HTTP client declares a 60 000-byte body and sends none of it: while the server waits
    // for it, it holds 59 of the budget's 64 KiB, and an 8 KB frame does not fit.
    let mut holding = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    holding
        .write_all(
            b"POST /events/queues/wf-1/events HTTP/1.1\r\nHost: x\r\n\
              Content-Type: application/json\r\nContent-Length: 60000\r\n\r\n{",
        )
        .await
        .unwrap();
    // (Until the server has read that request's head, the frame still fits: it is stored,
    // and sent again.)
    let refused = tokio::time::timeout(HANG_GUARD, async {
        loop {
            send(&mut ws, &big).await;
            let ack = next_ack(&mut ws).await;
            if ack["status"] == 503 {
                return ack;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the frame was never refused");
    assert!(
        refused["detail"]
            .as_str()
            .unwrap()
            .starts_with("too many request bodies being received"),
        "{refused}"
    );
    let stored_before = refused["seq"].as_u64().unwrap();
    // A frame that fits in what is left is stored; the refused one stored nothing.
    send(&mut ws, &working(0)).await;
    let ack = next_ack(&mut ws).await;
    assert_eq!(ack["offsets"], json!([stored_before]), "{ack}");
    // The held share comes back when that client goes away; the big frame then fits.
    drop(holding);
    tokio::time::timeout(HANG_GUARD, async {
        loop {
            send(&mut ws, &big).await;
            if next_ack(&mut ws).await["offsets"].is_array() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the budget never came back");
}
