//! A2A compatibility: the agent card, the event mapping on GetTask and SubscribeToTask (1.0
//! and 0.3 shapes), resume, keepalive, cancel, and the JSON-RPC error cases.

use std::time::Duration;

use eventqueue::server::{Auth, ServerConfig, TokenKeys};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{self, Frame, SseReader, TestServer};

fn config() -> ServerConfig {
    let mut config = helpers::server_config();
    // Short, so that a test sees keepalives without waiting.
    config.keepalive = Duration::from_millis(50);
    config
}

async fn create(server: &TestServer, task: &str) {
    let r = helpers::client()
        .post(server.url("/events/queues"))
        .json(&json!({"task_id": task}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
}

async fn publish(server: &TestServer, task: &str, events: Value) {
    let r = helpers::client()
        .post(server.url(&format!("/events/queues/{task}/events")))
        .json(&json!({ "events": events }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK, "{}", r.text().await.unwrap());
}

/// Posts a raw body to `/a2a`; returns the HTTP status and the parsed answer.
async fn post_raw(server: &TestServer, body: &str) -> (StatusCode, Value) {
    let r = helpers::client()
        .post(server.url("/a2a"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = r.status();
    let text = r.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

async fn call(server: &TestServer, method: &str, params: Value) -> Value {
    let body = json!({"jsonrpc": "2.0", "id": "r1", "method": method, "params": params});
    let (status, answer) = post_raw(server, &body.to_string()).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["jsonrpc"], "2.0");
    assert_eq!(answer["id"], "r1");
    answer
}

fn error_code(answer: &Value) -> i64 {
    answer["error"]["code"]
        .as_i64()
        .unwrap_or_else(|| panic!("not an error: {answer}"))
}

/// Opens a subscribe stream; asserts it is SSE.
async fn subscribe(
    server: &TestServer,
    method: &str,
    params: Value,
    last_event_id: Option<&str>,
) -> SseReader {
    let mut req = helpers::client()
        .post(server.url("/a2a"))
        .header("accept", "text/event-stream")
        .json(&json!({"jsonrpc": "2.0", "id": 7, "method": method, "params": params}));
    if let Some(id) = last_event_id {
        req = req.header("last-event-id", id);
    }
    let resp = req.send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let ctype = resp.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ctype.contains("text/event-stream"), "{ctype}");
    SseReader::new(resp)
}

/// Every JSON-RPC result until the stream ends; checks that no frame is named and every one
/// answers request 7.
async fn results(reader: &mut SseReader) -> Vec<(Option<String>, Value)> {
    let mut out = Vec::new();
    for frame in reader.rest().await {
        let Frame { id, event, .. } = &frame;
        assert_eq!(event, &None, "A2A frames carry no event name");
        let json = frame.json();
        assert_eq!(json["jsonrpc"], "2.0");
        assert_eq!(json["id"], 7);
        out.push((id.clone(), json["result"].clone()));
    }
    out
}

/// One event of each kind, in the order of a workflow (offsets 0..=7).
fn workflow() -> Value {
    json!([
        {"event_type": "status", "state": "pending"},
        {"event_type": "status", "state": "working", "phase": "plan", "message": "planning"},
        {"event_type": "progress", "current": 1, "total": 4, "step": "fetch", "details": {"k": 1}},
        {"event_type": "artifact", "artifact_type": "rows", "artifact_id": "a1",
         "data": {"r": 1}, "is_partial": true},
        {"event_type": "artifact", "artifact_type": "rows", "artifact_id": "a1", "data": {"r": 2}},
        {"event_type": "error", "error_type": "Timeout", "error_message": "retrying",
         "error_code": "E1"},
        {"event_type": "status", "state": "input-required"},
        {"event_type": "complete", "event_id": "evt_done", "result": {"answer": 42},
         "summary": "done", "execution_time_seconds": 2.0},
    ])
}

fn status_of(result: &Value) -> (&str, &Value) {
    let u = &result["statusUpdate"];
    (
        u["status"]["state"].as_str().unwrap(),
        &u["status"]["message"]["parts"],
    )
}

#[tokio::test]
async fn the_agent_card_points_at_the_jsonrpc_endpoint_of_this_server() {
    let server = TestServer::start(config()).await;
    let card: Value = server.get_json("/.well-known/agent-card.json").await;
    assert_eq!(card["name"], "eventqueue");
    assert_eq!(card["capabilities"]["streaming"], true);
    assert_eq!(
        card["supportedInterfaces"],
        json!([{"url": server.url("/a2a"), "protocolBinding": "JSONRPC", "protocolVersion": "1.0"}])
    );
    assert!(card.get("url").is_none(), "a 1.0 card has no top-level url");
    assert!(
        card["description"]
            .as_str()
            .unwrap()
            .contains("Last-Event-ID")
    );
    assert!(
        card.get("securitySchemes").is_none(),
        "open mode needs no credentials"
    );

    let old: Value = server
        .get_json("/.well-known/agent-card.json?version=0.3&tenant_id=acme")
        .await;
    assert_eq!(old["url"], server.url("/a2a?tenant_id=acme"));
    assert_eq!(old["protocolVersion"], "0.3.0");
    assert_eq!(old["preferredTransport"], "JSONRPC");
    assert!(old.get("supportedInterfaces").is_none());

    let r = helpers::client()
        .get(server.url("/.well-known/agent-card.json?version=2"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn the_card_uses_the_configured_name_and_public_url() {
    let mut config = config();
    config.a2a.name = "progress".into();
    config.a2a.description = "Our jobs.".into();
    config.a2a.version = "9.9".into();
    config.a2a.public_url = Some("https://events.example.com/base".into());
    config.auth = Auth::Token(TokenKeys::from_secret(&[7; 32]).unwrap());
    let server = TestServer::start(config).await;
    let card: Value = server.get_json("/.well-known/agent-card.json").await;
    assert_eq!(card["name"], "progress");
    assert_eq!(card["version"], "9.9");
    assert!(
        card["description"]
            .as_str()
            .unwrap()
            .starts_with("Our jobs. ")
    );
    assert_eq!(
        card["supportedInterfaces"][0]["url"],
        "https://events.example.com/base/a2a"
    );
    assert_eq!(
        card["securitySchemes"]["bearer"]["httpAuthSecurityScheme"]["scheme"],
        "Bearer"
    );
    // Token mode: the endpoint wants credentials like every other route.
    let (status, _) = post_raw(
        &server,
        r#"{"jsonrpc":"2.0","id":1,"method":"GetTask","params":{"id":"x"}}"#,
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn get_task_maps_every_event_kind_into_one_task() {
    let server = TestServer::start(config()).await;
    create(&server, "wf").await;
    // Before any event: submitted.
    let answer = call(&server, "GetTask", json!({"id": "wf"})).await;
    assert_eq!(answer["result"]["status"]["state"], "TASK_STATE_SUBMITTED");
    let events = workflow();
    let events = events.as_array().unwrap();
    publish(&server, "wf", Value::Array(events[..7].to_vec())).await;

    let task = call(&server, "GetTask", json!({"id": "wf"})).await["result"].clone();
    assert_eq!(task["id"], "wf");
    assert_eq!(task["contextId"], "wf");
    assert_eq!(task["status"]["state"], "TASK_STATE_INPUT_REQUIRED");
    assert_eq!(task["status"]["message"]["role"], "ROLE_AGENT");
    assert_eq!(
        task["artifacts"],
        json!([{"artifactId": "a1", "name": "rows", "parts": [{"data": {"r": 1}}, {"data": {"r": 2}}]}])
    );
    assert_eq!(task["metadata"]["offset"], 7);
    assert_eq!(task["metadata"]["cancel_requested"], false);

    publish(&server, "wf", json!([events[7].clone()])).await;
    let old = call(&server, "tasks/get", json!({"id": "wf"})).await["result"].clone();
    assert_eq!(old["kind"], "task");
    assert_eq!(old["status"]["state"], "completed");
    assert_eq!(old["status"]["message"]["kind"], "message");
    assert_eq!(old["status"]["message"]["role"], "agent");
    assert_eq!(
        old["status"]["message"]["parts"],
        json!([{"kind": "text", "text": "done"},
               {"kind": "data", "data": {"summary": "done", "execution_time_seconds": 2.0}}])
    );
    assert_eq!(old["artifacts"][1]["artifactId"], "evt_done");
    assert_eq!(
        old["artifacts"][1]["parts"],
        json!([{"kind": "data", "data": {"answer": 42}}])
    );
}

#[tokio::test]
async fn a_replayed_stream_sends_the_task_then_the_mapped_events_and_ends() {
    let server = TestServer::start(config()).await;
    create(&server, "wf").await;
    publish(&server, "wf", workflow()).await;
    let mut reader = subscribe(
        &server,
        "SubscribeToTask",
        json!({"id": "wf", "metadata": {"from_offset": 0}}),
        None,
    )
    .await;
    let got = results(&mut reader).await;
    // The task as of the resume point (nothing yet), then one result per event, two for
    // `complete`.
    assert_eq!(got[0].0, None);
    assert_eq!(got[0].1["task"]["status"]["state"], "TASK_STATE_SUBMITTED");
    let r: Vec<&Value> = got[1..].iter().map(|(_, r)| r).collect();
    assert_eq!(r.len(), 9);
    assert_eq!(status_of(r[0]).0, "TASK_STATE_SUBMITTED");
    assert_eq!(
        status_of(r[1]),
        (
            "TASK_STATE_WORKING",
            &json!([{"text": "planning"}, {"data": {"phase": "plan", "message": "planning"}}])
        )
    );
    assert_eq!(
        status_of(r[2]),
        (
            "TASK_STATE_WORKING",
            &json!([{"data": {"current": 1, "total": 4, "percentage": 25.0, "step": "fetch",
                              "details": {"k": 1}}}])
        )
    );
    let a = &r[3]["artifactUpdate"];
    assert_eq!(
        (
            a["artifact"]["artifactId"].clone(),
            a["artifact"]["name"].clone()
        ),
        (json!("a1"), json!("rows"))
    );
    assert_eq!(a["artifact"]["parts"], json!([{"data": {"r": 1}}]));
    assert_eq!(
        (a["append"].clone(), a["lastChunk"].clone()),
        (json!(false), json!(false))
    );
    let a = &r[4]["artifactUpdate"];
    assert_eq!(
        (a["append"].clone(), a["lastChunk"].clone()),
        (json!(true), json!(true))
    );
    assert_eq!(
        status_of(r[5]),
        (
            "TASK_STATE_WORKING",
            &json!([{"text": "retrying"},
                    {"data": {"error_type": "Timeout", "error_message": "retrying",
                              "error_code": "E1", "context": {}, "recoverable": true}}])
        )
    );
    assert_eq!(status_of(r[6]).0, "TASK_STATE_INPUT_REQUIRED");
    let result = &r[7]["artifactUpdate"];
    assert_eq!(result["artifact"]["artifactId"], "evt_done");
    assert_eq!(result["artifact"]["name"], "result");
    assert_eq!(
        result["artifact"]["parts"],
        json!([{"data": {"answer": 42}}])
    );
    assert_eq!(status_of(r[8]).0, "TASK_STATE_COMPLETED");
    // Each update carries its event's offset; the frame that completes an event has `id:`.
    let offsets: Vec<u64> = r
        .iter()
        .map(|u| {
            let inner = u.get("statusUpdate").or(u.get("artifactUpdate")).unwrap();
            inner["metadata"]["offset"].as_u64().unwrap()
        })
        .collect();
    assert_eq!(offsets, [0, 1, 2, 3, 4, 5, 6, 7, 7]);
    let ids: Vec<Option<&str>> = got[1..].iter().map(|(id, _)| id.as_deref()).collect();
    assert_eq!(
        ids,
        [
            Some("0"),
            Some("1"),
            Some("2"),
            Some("3"),
            Some("4"),
            Some("5"),
            Some("6"),
            None,
            Some("7")
        ]
    );
    assert_eq!(r[0]["statusUpdate"]["metadata"]["event_type"], "status");
    assert_eq!(r[7]["artifactUpdate"]["metadata"]["event_id"], "evt_done");
}

#[tokio::test]
async fn a_0_3_stream_has_kinds_lowercase_states_and_final() {
    let server = TestServer::start(config()).await;
    create(&server, "wf").await;
    publish(&server, "wf", workflow()).await;
    let mut reader = subscribe(
        &server,
        "tasks/resubscribe",
        json!({"id": "wf", "metadata": {"from_offset": "5"}}),
        None,
    )
    .await;
    let got = results(&mut reader).await;
    let r: Vec<&Value> = got.iter().map(|(_, r)| r).collect();
    assert_eq!(r[0]["kind"], "task");
    assert_eq!(r[0]["status"]["state"], "working");
    let summary: Vec<(String, String, Value)> = r[1..]
        .iter()
        .map(|u| {
            (
                u["kind"].as_str().unwrap().to_string(),
                u["status"]["state"]
                    .as_str()
                    .or(u["artifact"]["artifactId"].as_str())
                    .unwrap()
                    .to_string(),
                u.get("final").cloned().unwrap_or(u["lastChunk"].clone()),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("status-update".into(), "working".into(), json!(false)),
            (
                "status-update".into(),
                "input-required".into(),
                json!(false)
            ),
            ("artifact-update".into(), "evt_done".into(), json!(true)),
            ("status-update".into(), "completed".into(), json!(true)),
        ]
    );
    assert_eq!(
        r[1]["status"]["message"]["parts"][1],
        json!({"kind": "data", "data": {"error_type": "Timeout", "error_message": "retrying",
                                        "error_code": "E1", "context": {}, "recoverable": true}})
    );
}

#[tokio::test]
async fn a_live_stream_starts_with_the_current_task_keeps_alive_and_ends_at_the_terminal_event() {
    let server = TestServer::start(config()).await;
    create(&server, "live").await;
    publish(
        &server,
        "live",
        json!([{"event_type": "status", "state": "working", "phase": "p1"}]),
    )
    .await;
    let mut reader = subscribe(&server, "SubscribeToTask", json!({"id": "live"}), None).await;
    let first = reader.next_event().await.unwrap().json();
    assert_eq!(
        first["result"]["task"]["status"]["state"],
        "TASK_STATE_WORKING"
    );
    assert_eq!(first["result"]["task"]["metadata"]["offset"], 1);
    // Idle: keepalive comments (50 ms here; never more than 3 s apart).
    let frame = reader.next_frame().await.unwrap();
    assert!(frame.is_comment(), "{frame:?}");
    publish(
        &server,
        "live",
        json!([{"event_type": "progress", "current": 3, "total": 3},
               {"event_type": "error", "error_type": "Crash", "error_message": "gone",
                "recoverable": false},
               {"event_type": "status", "state": "working"}]),
    )
    .await;
    let rest = results(&mut reader).await;
    let states: Vec<&str> = rest.iter().map(|(_, r)| status_of(r).0).collect();
    // The non-recoverable error finishes the task; what follows it is not sent.
    assert_eq!(states, ["TASK_STATE_WORKING", "TASK_STATE_FAILED"]);
    // The stream slot is given back (when the server drops the body, just after its end).
    tokio::time::timeout(helpers::HANG_GUARD, async {
        while server.state.open_streams() != 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the stream slot was not given back");
}

#[tokio::test]
async fn last_event_id_resumes_after_that_offset_with_the_task_as_of_there() {
    let server = TestServer::start(config()).await;
    create(&server, "wf").await;
    publish(&server, "wf", workflow()).await;
    // Last-Event-ID wins over metadata.from_offset.
    let mut reader = subscribe(
        &server,
        "SubscribeToTask",
        json!({"id": "wf", "metadata": {"from_offset": 0}}),
        Some("4"),
    )
    .await;
    let got = results(&mut reader).await;
    let task = &got[0].1["task"];
    assert_eq!(task["metadata"]["offset"], 5);
    assert_eq!(task["status"]["state"], "TASK_STATE_WORKING");
    assert_eq!(task["artifacts"][0]["parts"].as_array().unwrap().len(), 2);
    let first = &got[1].1["statusUpdate"];
    assert_eq!(first["metadata"]["offset"], 5);
    assert_eq!(got.len(), 1 + 4);
}

#[tokio::test]
async fn cancel_task_sets_the_token_and_answers_the_task() {
    let server = TestServer::start(config()).await;
    create(&server, "job").await;
    publish(
        &server,
        "job",
        json!([{"event_type": "status", "state": "working"}]),
    )
    .await;
    let answer = call(
        &server,
        "CancelTask",
        json!({"id": "job", "metadata": {"reason": "user pressed stop"}}),
    )
    .await;
    let task = &answer["result"];
    assert_eq!(task["id"], "job");
    assert_eq!(task["status"]["state"], "TASK_STATE_WORKING");
    assert_eq!(task["metadata"]["cancel_requested"], true);
    assert_eq!(task["metadata"]["cancel_reason"], "user pressed stop");
    let queue = server
        .manager()
        .get_queue(
            &eventqueue::TenantId::default_tenant(),
            &eventqueue::TaskId::new("job").unwrap(),
        )
        .unwrap();
    assert!(queue.is_cancelled());

    // Once finished, a task cannot be cancelled (0.3 name, same code).
    publish(
        &server,
        "job",
        json!([{"event_type": "status", "state": "cancelled"}]),
    )
    .await;
    let answer = call(&server, "tasks/cancel", json!({"id": "job"})).await;
    assert_eq!(error_code(&answer), -32002);
    let answer = call(&server, "tasks/get", json!({"id": "job"})).await;
    assert_eq!(answer["result"]["status"]["state"], "canceled");
}

#[tokio::test]
async fn errors_are_jsonrpc_answers_with_http_200() {
    let server = TestServer::start(config()).await;
    create(&server, "done").await;
    publish(
        &server,
        "done",
        json!([{"event_type": "complete", "result": {}}]),
    )
    .await;
    // Another tenant's task does not exist for this caller.
    let r = helpers::client()
        .post(server.url("/events/queues"))
        .header("x-tenant-id", "other")
        .json(&json!({"task_id": "theirs"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);

    let cases: Vec<(&str, Value)> = vec![
        ("GetTask", json!({"id": "nope"})),
        ("GetTask", json!({"id": "theirs"})),
        ("CancelTask", json!({"id": "nope"})),
        ("tasks/get", json!({"id": "nope"})),
    ];
    for (method, params) in cases {
        let answer = call(&server, method, params.clone()).await;
        assert_eq!(error_code(&answer), -32001, "{method} {params}");
    }
    // A closed task (not finished) with nothing more to come.
    create(&server, "shut").await;
    publish(
        &server,
        "shut",
        json!([{"event_type": "status", "state": "working"}]),
    )
    .await;
    let r = helpers::client()
        .post(server.url("/events/queues/shut/close"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // Subscribing to a finished task, or at the end of a closed one: -32004, as JSON (not a
    // stream).
    for method in ["SubscribeToTask", "tasks/resubscribe"] {
        let answer = call(&server, method, json!({"id": "done"})).await;
        assert_eq!(error_code(&answer), -32004, "{method}");
        let answer = call(&server, method, json!({"id": "shut"})).await;
        assert_eq!(error_code(&answer), -32004, "{method}");
        let answer = call(&server, method, json!({"id": "nope"})).await;
        assert_eq!(error_code(&answer), -32001, "{method}");
    }
    for (params, code) in [
        (json!({}), -32602),
        (json!({"id": 5}), -32602),
        (json!({"id": "bad id!"}), -32602),
        (json!(["done"]), -32602),
        (json!({"id": "done", "tenant": "other"}), -32602),
    ] {
        let answer = call(&server, "GetTask", params.clone()).await;
        assert_eq!(error_code(&answer), code, "{params}");
    }
    let answer = call(
        &server,
        "SubscribeToTask",
        json!({"id": "done", "metadata": {"from_offset": -1}}),
    )
    .await;
    assert_eq!(error_code(&answer), -32602);
    assert_eq!(
        error_code(&call(&server, "SendMessage", json!({})).await),
        -32004
    );
    assert_eq!(
        error_code(&call(&server, "tasks/pushNotificationConfig/set", json!({})).await),
        -32003
    );
    assert_eq!(
        error_code(&call(&server, "NoSuchMethod", json!({})).await),
        -32601
    );
    for (body, code) in [
        ("{not json", -32700),
        ("[]", -32600),
        ("\"x\"", -32600),
        (
            r#"{"id":1,"method":"GetTask","params":{"id":"done"}}"#,
            -32600,
        ),
        (r#"{"jsonrpc":"2.0","id":1,"method":5}"#, -32600),
        (r#"{"jsonrpc":"2.0","id":{},"method":"GetTask"}"#, -32600),
    ] {
        let (status, answer) = post_raw(&server, body).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(error_code(&answer), code, "{body}: {answer}");
    }
    // A notification (no id) gets no answer.
    let r = helpers::client()
        .post(server.url("/a2a"))
        .json(&json!({"jsonrpc": "2.0", "method": "GetTask", "params": {"id": "done"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn a2a_requests_need_the_scope_of_what_they_do() {
    let secret = *b"a2a-test-secret-a2a-test-secret-0123";
    let keys = TokenKeys::from_secret(&secret).unwrap();
    let mut config = config();
    config.auth = Auth::Token(keys.clone());
    let server = TestServer::start(config).await;
    let token = |scope: &str| {
        keys.mint(
            &eventqueue::TenantId::new("acme").unwrap(),
            eventqueue::server::Scopes::parse_strict(scope).unwrap(),
            Duration::from_secs(600),
        )
        .unwrap()
    };
    let publisher = token("publish");
    let r = helpers::client()
        .post(server.url("/events/queues"))
        .bearer_auth(&publisher)
        .json(&json!({"task_id": "j"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let rpc = |token: String, method: &'static str| {
        let server_url = server.url("/a2a");
        async move {
            helpers::client()
                .post(server_url)
                .bearer_auth(token)
                .json(&json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": {"id": "j"}}))
                .send()
                .await
                .unwrap()
        }
    };
    // Reading needs `subscribe`; cancelling either scope.
    assert_eq!(
        rpc(publisher.clone(), "GetTask").await.status(),
        StatusCode::FORBIDDEN
    );
    let r = rpc(token("subscribe"), "GetTask").await;
    assert_eq!(r.status(), StatusCode::OK);
    let answer: Value = r.json().await.unwrap();
    assert_eq!(answer["result"]["metadata"]["tenant_id"], "acme");
    let answer: Value = rpc(publisher, "CancelTask").await.json().await.unwrap();
    assert_eq!(answer["result"]["metadata"]["cancel_requested"], true);
}

// ---------------------------------------------------------------------------------------------
// ListTasks
// ---------------------------------------------------------------------------------------------

/// Creates `task` for `tenant` (open mode: `X-Tenant-ID`) and publishes `events` to it.
async fn task_of(server: &TestServer, tenant: &str, task: &str, events: Value) {
    let r = helpers::client()
        .post(server.url("/events/queues"))
        .header("x-tenant-id", tenant)
        .json(&json!({"task_id": task}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    if events.as_array().is_some_and(|e| !e.is_empty()) {
        let r = helpers::client()
            .post(server.url(&format!("/events/queues/{task}/events")))
            .header("x-tenant-id", tenant)
            .json(&json!({ "events": events }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{}", r.text().await.unwrap());
    }
}

/// A `working` status event at `at`.
fn working_at(at: &str) -> Value {
    json!({"event_type": "status", "state": "working", "timestamp": at})
}

/// `ListTasks` as `tenant`; the result (panics on an error answer).
async fn list_as(server: &TestServer, tenant: &str, params: Value) -> Value {
    let r = helpers::client()
        .post(server.url("/a2a"))
        .header("x-tenant-id", tenant)
        .json(&json!({"jsonrpc": "2.0", "id": "l", "method": "ListTasks", "params": params}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let answer: Value = r.json().await.unwrap();
    assert!(answer.get("error").is_none(), "{params}: {answer}");
    answer["result"].clone()
}

async fn list(server: &TestServer, params: Value) -> Value {
    list_as(server, "default", params).await
}

/// The ids of a ListTasks result, in order.
fn ids(result: &Value) -> Vec<&str> {
    result["tasks"]
        .as_array()
        .unwrap_or_else(|| panic!("no tasks: {result}"))
        .iter()
        .map(|t| t["id"].as_str().unwrap())
        .collect()
}

#[tokio::test]
async fn list_tasks_pages_newest_status_first_and_a_token_survives_new_tasks() {
    let server = TestServer::start(config()).await;
    for i in 0..5 {
        let at = format!("2020-01-01T00:00:0{i}Z");
        task_of(
            &server,
            "default",
            &format!("t{i}"),
            json!([working_at(&at)]),
        )
        .await;
    }
    let first = list(&server, json!({"pageSize": 2})).await;
    assert_eq!(ids(&first), ["t4", "t3"]);
    assert_eq!(first["totalSize"], 5);
    assert_eq!(first["pageSize"], 2);
    let task = &first["tasks"][0];
    assert_eq!(task["contextId"], "t4");
    assert_eq!(task["status"]["state"], "TASK_STATE_WORKING");
    assert_eq!(task["status"]["timestamp"], "2020-01-01T00:00:04.000000Z");
    assert_eq!(task["metadata"]["tenant_id"], "default");
    assert_eq!(task["metadata"]["offset"], 1);
    assert!(
        task.get("artifacts").is_none(),
        "without includeArtifacts the field is left out: {task}"
    );
    let token = first["nextPageToken"].as_str().unwrap().to_string();
    assert!(!token.is_empty());

    // While the client pages: a task that sorts first, one that sorts last, and an update of
    // a task already seen. The token names a position in the order, not an index, so the
    // next pages neither repeat nor skip anything that stayed put.
    task_of(
        &server,
        "default",
        "newest",
        json!([working_at("2021-01-01T00:00:00Z")]),
    )
    .await;
    task_of(
        &server,
        "default",
        "oldest",
        json!([working_at("2019-01-01T00:00:00Z")]),
    )
    .await;
    publish(&server, "t3", json!([working_at("2022-01-01T00:00:00Z")])).await;

    let second = list(&server, json!({"pageSize": 2, "pageToken": token})).await;
    assert_eq!(ids(&second), ["t2", "t1"]);
    assert_eq!(
        second["totalSize"], 7,
        "the total counts every match, all pages"
    );
    let third = list(
        &server,
        json!({"pageSize": 2, "pageToken": second["nextPageToken"]}),
    )
    .await;
    assert_eq!(ids(&third), ["t0", "oldest"]);
    assert_eq!(
        third["nextPageToken"], "",
        "the last page has an empty token"
    );

    // Without a page size: 50 at most, all of these; the updated task first.
    let all = list(&server, Value::Null).await;
    assert_eq!(all["pageSize"], 50);
    assert_eq!(
        ids(&all),
        ["t3", "newest", "t4", "t2", "t1", "t0", "oldest"]
    );
    assert_eq!(all["nextPageToken"], "");
    // A token stays valid for as long as the client keeps it, also after its task is gone.
    let r = helpers::client()
        .delete(server.url("/events/queues/t4"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let again = list(&server, json!({"pageSize": 2, "page_token": token})).await;
    assert_eq!(ids(&again), ["t2", "t1"], "proto field names work too");
}

#[tokio::test]
async fn list_tasks_filters_by_state_context_and_status_time_and_agrees_with_get_task() {
    let server = TestServer::start(config()).await;
    task_of(&server, "default", "fresh", json!([])).await;
    task_of(
        &server,
        "default",
        "work",
        json!([working_at("2020-01-01T00:00:01Z")]),
    )
    .await;
    task_of(
        &server,
        "default",
        "prog",
        json!([{"event_type": "progress", "current": 1, "total": 2,
                "timestamp": "2020-01-01T00:00:02Z"}]),
    )
    .await;
    task_of(
        &server,
        "default",
        "done",
        json!([{"event_type": "complete", "result": {"n": 1},
                "timestamp": "2020-01-02T00:00:00Z"}]),
    )
    .await;
    // A status, then more artifacts than the first read from the end covers: artifacts set no
    // status, so the task is INPUT_REQUIRED as of 2020-01-03.
    let mut arts = vec![json!({"event_type": "status", "state": "input-required",
                               "timestamp": "2020-01-03T00:00:00Z"})];
    for i in 0..40 {
        arts.push(json!({"event_type": "artifact", "artifact_type": "rows",
                         "artifact_id": format!("a{i}"), "data": {"i": i},
                         "timestamp": "2020-01-04T00:00:00Z"}));
    }
    task_of(&server, "default", "arts", Value::Array(arts)).await;
    // An event after the terminal one is not part of the task (as for GetTask).
    task_of(
        &server,
        "default",
        "ended",
        json!([{"event_type": "complete", "result": {}, "timestamp": "2020-01-05T00:00:00Z"},
               working_at("2020-01-06T00:00:00Z")]),
    )
    .await;

    let all = list(&server, json!({})).await;
    assert_eq!(
        ids(&all),
        ["fresh", "ended", "arts", "done", "prog", "work"],
        "a task without events is SUBMITTED since its creation, which is now"
    );
    let with_state = |state: Value| {
        let server = &server;
        async move { list(server, json!({"status": state})).await }
    };
    assert_eq!(
        ids(&with_state(json!("TASK_STATE_WORKING")).await),
        ["prog", "work"]
    );
    assert_eq!(ids(&with_state(json!(3)).await), ["ended", "done"]);
    assert_eq!(
        ids(&with_state(json!("TASK_STATE_INPUT_REQUIRED")).await),
        ["arts"]
    );
    assert_eq!(
        ids(&with_state(json!("TASK_STATE_SUBMITTED")).await),
        ["fresh"]
    );
    let rejected = with_state(json!("TASK_STATE_REJECTED")).await;
    assert_eq!(
        (ids(&rejected).len(), &rejected["totalSize"]),
        (0, &json!(0))
    );
    assert_eq!(
        ids(&with_state(json!("TASK_STATE_UNSPECIFIED")).await).len(),
        6
    );

    // A task's context is the task itself.
    assert_eq!(
        ids(&list(&server, json!({"contextId": "done"})).await),
        ["done"]
    );
    for context in ["nope", "not an id!"] {
        let none = list(&server, json!({"contextId": context})).await;
        assert_eq!((ids(&none).len(), &none["nextPageToken"]), (0, &json!("")));
    }

    // statusTimestampAfter is inclusive; it combines with the other filters.
    let recent = list(
        &server,
        json!({"statusTimestampAfter": "2020-01-03T00:00:00Z"}),
    )
    .await;
    assert_eq!(ids(&recent), ["fresh", "ended", "arts"]);
    let recent_done = list(
        &server,
        json!({"statusTimestampAfter": "2020-01-02T01:00:00+01:00",
               "status": "TASK_STATE_COMPLETED"}),
    )
    .await;
    assert_eq!(
        ids(&recent_done),
        ["ended", "done"],
        "an offset is honoured"
    );

    // With includeArtifacts each task is exactly what GetTask answers.
    let full = list(
        &server,
        json!({"includeArtifacts": true, "historyLength": 3}),
    )
    .await;
    for task in full["tasks"].as_array().unwrap() {
        let got = call(&server, "GetTask", json!({"id": task["id"]})).await;
        assert_eq!(task, &got["result"], "ListTasks and GetTask disagree");
    }
    let arts = &full["tasks"][2];
    assert_eq!(arts["status"]["state"], "TASK_STATE_INPUT_REQUIRED");
    assert_eq!(arts["artifacts"].as_array().unwrap().len(), 40);
    assert_eq!(full["tasks"][0]["artifacts"], json!([]));
}

#[tokio::test]
async fn list_tasks_answers_bad_params_with_a_clear_invalid_params_error() {
    let server = TestServer::start(config()).await;
    task_of(
        &server,
        "default",
        "t",
        json!([working_at("2020-01-01T00:00:00Z")]),
    )
    .await;
    let hex = |s: &str| s.bytes().map(|b| format!("{b:02x}")).collect::<String>();
    for (params, needle) in [
        (json!([]), "params"),
        (json!({"pageSize": 0}), "pageSize"),
        (json!({"pageSize": 101}), "pageSize"),
        (json!({"pageSize": -1}), "pageSize"),
        (json!({"pageSize": "ten"}), "pageSize"),
        (json!({"pageToken": "garbage"}), "pageToken"),
        (json!({"pageToken": "zz"}), "pageToken"),
        (json!({"pageToken": hex("9.1.t")}), "pageToken"),
        (json!({"pageToken": hex("1.1.bad id")}), "pageToken"),
        (json!({"pageToken": 5}), "pageToken"),
        (json!({"status": "working"}), "status"),
        (json!({"status": 42}), "status"),
        (json!({"historyLength": -1}), "historyLength"),
        (
            json!({"statusTimestampAfter": "yesterday"}),
            "statusTimestampAfter",
        ),
        (json!({"includeArtifacts": "yes"}), "includeArtifacts"),
        (json!({"contextId": 7}), "contextId"),
        (json!({"tenant": "other"}), "tenant"),
    ] {
        let answer = call(&server, "ListTasks", params.clone()).await;
        assert_eq!(error_code(&answer), -32602, "{params}: {answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.contains(needle), "{params}: {message}");
    }
    let answer = call(&server, "ListTasks", json!({"pageToken": "garbage"})).await;
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("nextPageToken"),
        "the message says what a token is: {answer}"
    );
    // The bounds themselves are fine, and so is a request without params.
    for params in [
        json!({"pageSize": 1}),
        json!({"pageSize": "100"}),
        Value::Null,
    ] {
        let answer = call(&server, "ListTasks", params.clone()).await;
        assert_eq!(ids(&answer["result"]), ["t"], "{params}");
    }
}

#[tokio::test]
async fn list_tasks_shows_only_the_callers_tenant() {
    let server = TestServer::start(config()).await;
    for task in ["a", "b", "c"] {
        task_of(
            &server,
            "default",
            task,
            json!([working_at("2020-01-01T00:00:00Z")]),
        )
        .await;
    }
    // The other tenant has a task of the same name, and newer ones.
    for task in ["a", "x", "y"] {
        task_of(
            &server,
            "other",
            task,
            json!([working_at("2021-01-01T00:00:00Z")]),
        )
        .await;
    }
    let mine = list(&server, json!({"pageSize": 2})).await;
    assert_eq!(mine["totalSize"], 3);
    let rest = list(
        &server,
        json!({"pageSize": 2, "pageToken": mine["nextPageToken"]}),
    )
    .await;
    let seen: Vec<&str> = ids(&mine).into_iter().chain(ids(&rest)).collect();
    assert_eq!(seen, ["c", "b", "a"]);
    for task in mine["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .chain(rest["tasks"].as_array().unwrap())
    {
        assert_eq!(task["metadata"]["tenant_id"], "default");
    }
    assert_eq!(
        ids(&list(&server, json!({"contextId": "x"})).await).len(),
        0
    );

    let theirs = list_as(&server, "other", json!({})).await;
    assert_eq!(ids(&theirs), ["y", "x", "a"]);
    assert!(
        theirs["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["metadata"]["tenant_id"] == "other")
    );
    // The tenant of ?tenant_id= (as the card's URL carries it) works the same way.
    let r = helpers::client()
        .post(server.url("/a2a?tenant_id=other"))
        .json(&json!({"jsonrpc": "2.0", "id": 1, "method": "ListTasks", "params": {"tenant": "other"}}))
        .send()
        .await
        .unwrap();
    let answer: Value = r.json().await.unwrap();
    assert_eq!(ids(&answer["result"]), ["y", "x", "a"]);
}

#[tokio::test]
async fn list_tasks_in_token_mode_lists_the_tokens_tenant_and_needs_subscribe() {
    let secret = *b"a2a-test-secret-a2a-test-secret-0123";
    let keys = TokenKeys::from_secret(&secret).unwrap();
    let mut config = config();
    config.auth = Auth::Token(keys.clone());
    let server = TestServer::start(config).await;
    let token = |tenant: &str, scope: &str| {
        keys.mint(
            &eventqueue::TenantId::new(tenant).unwrap(),
            eventqueue::server::Scopes::parse_strict(scope).unwrap(),
            Duration::from_secs(600),
        )
        .unwrap()
    };
    for (tenant, task) in [("acme", "mine"), ("globex", "theirs")] {
        let r = helpers::client()
            .post(server.url("/events/queues"))
            .bearer_auth(token(tenant, "publish"))
            .json(&json!({"task_id": task}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
    }
    let list_with = |token: String| {
        let url = server.url("/a2a");
        async move {
            helpers::client()
                .post(url)
                .bearer_auth(token)
                .header("x-tenant-id", "globex")
                .json(&json!({"jsonrpc": "2.0", "id": 1, "method": "ListTasks"}))
                .send()
                .await
                .unwrap()
        }
    };
    assert_eq!(
        list_with(token("acme", "publish")).await.status(),
        StatusCode::FORBIDDEN,
        "listing reads: it needs subscribe"
    );
    let r = list_with(token("acme", "subscribe")).await;
    assert_eq!(r.status(), StatusCode::OK);
    let answer: Value = r.json().await.unwrap();
    assert_eq!(
        ids(&answer["result"]),
        ["mine"],
        "the token's tenant, not the header's"
    );
}

/// An A2A client reads JSON-RPC errors: a subscribe over the stream limits is one (HTTP 200),
/// not an HTTP 429 it would not understand.
#[tokio::test]
async fn subscribe_over_the_stream_limit_is_a_json_rpc_error() {
    let mut config = config();
    config.max_sse_streams = 0;
    config.max_sse_streams_per_tenant = 0;
    let server = TestServer::start(config).await;
    create(&server, "job").await;
    publish(
        &server,
        "job",
        json!([{"event_type": "status", "state": "working"}]),
    )
    .await;
    let answer = call(&server, "SubscribeToTask", json!({"id": "job"})).await;
    assert_eq!(answer["error"]["code"], -32603, "{answer}");
    let message = answer["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("stream"), "{answer}");
}
