//! The HTTP producer helpers and `eventqueue demo`, against a real server run in-process: a
//! reporter in another process has the same shape as one in process (emit, boundary check,
//! checkpoints, outcome), and the demo's ingestion job, cancelled mid-way, stops at a video
//! boundary with `status: cancelled`.

use std::sync::Arc;
use std::time::Duration;

use eventqueue::client::{Client, CreateQueue, Route};
use eventqueue::demo::{self, DemoOptions};
use eventqueue::producer::{HttpSink, Outcome, ProducerError, Reporter};
use eventqueue::{
    Checkpoint, CompleteEvent, Delivery, EventQueue, Subscription, TaskId, TaskStatus, TenantId,
    WorkflowStatus,
};
use serde_json::{Value, json};

use super::app::{token, token_config};
use crate::helpers::{self, HANG_GUARD, TestServer};

fn id(s: &str) -> TaskId {
    TaskId::new(s).unwrap()
}

fn acme() -> TenantId {
    TenantId::new("acme").unwrap()
}

async fn next_json(sub: &mut Subscription) -> Option<Value> {
    let item = tokio::time::timeout(HANG_GUARD, sub.next())
        .await
        .expect("subscription stalled")?;
    match item.unwrap() {
        Delivery::Event(e) => Some(serde_json::from_slice(e.json()).unwrap()),
        other => panic!("unexpected {other:?}"),
    }
}

/// Every event of `q` until its stream ends.
async fn all_json(q: &EventQueue) -> Vec<Value> {
    let mut sub = q.subscribe(0).unwrap();
    let mut out = Vec::new();
    while let Some(v) = next_json(&mut sub).await {
        out.push(v);
    }
    out
}

async fn create(client: &Client, task: &str, kind: &str) {
    let options = CreateQueue {
        kind: Some(kind.into()),
        ..CreateQueue::default()
    };
    client.create_queue(task, &options).await.unwrap();
}

#[tokio::test]
async fn an_http_reporter_emits_checks_cancellation_and_saves_checkpoints() {
    let server = TestServer::start(helpers::server_config()).await;
    let sink = HttpSink::new(&server.url(""), &id("wf"))
        .unwrap()
        .with_tenant(&acme());
    create(sink.client(), "wf", "workflow").await;
    let q = server.manager().get_queue(&acme(), &id("wf")).unwrap();
    let r = Reporter::new(sink.clone());
    assert_eq!(r.phase("planning").await.unwrap(), 0);
    assert_eq!(r.step(1, 2, "search").await.unwrap(), 1);
    assert_eq!(q.latest_offset(), 2);
    let c = Checkpoint::new(&id("wf"), WorkflowStatus::Running)
        .phase(1, 2)
        .task("search", TaskStatus::Completed)
        .task("report", TaskStatus::Pending)
        .state(json!({"cursor": 7}));
    let saved = r.checkpoint(c.clone()).await.unwrap();
    assert_eq!(
        (saved.status_offset, saved.progress_offset),
        (Some(2), Some(3))
    );
    let stored = server
        .manager()
        .checkpoints(&acme())
        .latest(&id("wf"))
        .await;
    assert_eq!(stored.unwrap().unwrap().to_checkpoint(), c);

    r.check_cancelled().await.unwrap();
    sink.client()
        .cancel(Route::Workflow, "wf", Some("stop"))
        .await
        .unwrap();
    let err = r.check_cancelled().await.unwrap_err();
    assert!(
        matches!(err, ProducerError::Cancelled { ref reason } if reason.as_deref() == Some("stop"))
    );
    let events = all_json(&q).await;
    assert_eq!(events.len(), 5);
    assert_eq!(events[4]["state"], "cancelled");
    assert_eq!(events[4]["message"], "Cancelled: stop");
    assert!(r.is_finished());
    server.stop().await;
}

#[tokio::test]
async fn an_http_reporter_works_in_token_mode_within_its_tenant() {
    let server = TestServer::start(token_config()).await;
    let sink = HttpSink::new(&server.url(""), &id("job"))
        .unwrap()
        .with_token(token("acme", "subscribe publish"));
    create(sink.client(), "job", "ingestion").await;
    let outcome = Reporter::new(sink)
        .run(|r| async move {
            r.phase("ingesting").await?;
            r.checkpoint(
                Checkpoint::new(&id("job"), WorkflowStatus::Running)
                    .task("v1", TaskStatus::Completed),
            )
            .await?;
            r.check_cancelled().await?;
            Ok(CompleteEvent::new(json!({"videos": 1})))
        })
        .await
        .unwrap();
    assert_eq!(outcome, Outcome::Completed { offset: Some(3) });
    let q = server.manager().get_queue(&acme(), &id("job")).unwrap();
    let events = all_json(&q).await;
    let types: Vec<&str> = events
        .iter()
        .map(|e| e["event_type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["status", "status", "progress", "complete"]);
    // The checkpoint is acme's, as the token says.
    let store = server.manager().checkpoints(&acme());
    assert!(store.latest(&id("job")).await.unwrap().is_some());

    // A token without `publish` cannot report.
    let reader = Reporter::new(
        HttpSink::new(&server.url(""), &id("job"))
            .unwrap()
            .with_token(token("acme", "subscribe")),
    );
    let err = reader.phase("x").await.unwrap_err();
    assert!(
        matches!(err, ProducerError::Http(ref e) if e.status() == Some(403)),
        "{err}"
    );
    reader.leave_running();
    assert_eq!(q.latest_offset(), 4);
    server.stop().await;
}

#[tokio::test]
async fn the_demo_workflow_runs_its_phases_with_checkpoints_to_complete() {
    let server = TestServer::start(helpers::server_config()).await;
    let mut options = DemoOptions::new(server.url("")).unwrap();
    options.delay = Duration::from_millis(1);
    options.videos = 2;
    options.tenant = Some(acme());
    let lines = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = lines.clone();
    let report = demo::run(&options, Arc::new(move |l| sink.lock().unwrap().push(l)))
        .await
        .unwrap();
    assert!(
        report.workflow.as_ref().unwrap().is_completed(),
        "{report:?}"
    );
    assert!(
        report.ingestion.as_ref().unwrap().is_completed(),
        "{report:?}"
    );
    let printed = lines.lock().unwrap().join("\n");
    assert!(
        printed.contains(&format!(
            "curl -N -H 'X-Tenant-ID: acme' {}/events/workflows/{}",
            server.url(""),
            options.workflow_id
        )),
        "{printed}"
    );
    assert!(
        printed.contains(&format!(
            "/events/ingestion/{}/cancel",
            options.ingestion_id
        )),
        "{printed}"
    );

    let q = server
        .manager()
        .get_queue(&acme(), &options.workflow_id)
        .unwrap();
    let events = all_json(&q).await;
    let phases: Vec<&str> = events
        .iter()
        .filter(|e| {
            e["event_type"] == "status" && !e["message"].as_str().unwrap().starts_with("Checkpoint")
        })
        .map(|e| e["phase"].as_str().unwrap())
        .collect();
    assert_eq!(phases, ["planning", "research", "analysis", "report"]);
    // The last checkpoint says completed, just before the complete event.
    let n = events.len();
    assert_eq!(events[n - 3]["state"], "completed");
    assert_eq!(
        (
            events[n - 2]["current"].clone(),
            events[n - 2]["total"].clone()
        ),
        (json!(5), json!(5))
    );
    assert_eq!(events[n - 1]["event_type"], "complete");
    let latest = server
        .manager()
        .checkpoints(&acme())
        .latest(&options.workflow_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((latest.status, latest.seq), (WorkflowStatus::Completed, 3));

    let job = server
        .manager()
        .get_queue(&acme(), &options.ingestion_id)
        .unwrap();
    let events = all_json(&job).await;
    let errors: Vec<&Value> = events
        .iter()
        .filter(|e| e["event_type"] == "error")
        .collect();
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0]["recoverable"], true);
    assert_eq!(events.last().unwrap()["result"]["videos_processed"], 2);
    server.stop().await;
}

#[tokio::test]
async fn the_demo_ingestion_cancelled_mid_way_stops_at_a_video_boundary() {
    let server = TestServer::start(helpers::server_config()).await;
    let mut options = DemoOptions::new(server.url("")).unwrap();
    options.workflow = false;
    // Far more videos than it gets through before the cancel lands.
    options.videos = 1000;
    options.delay = Duration::from_millis(5);
    let client = Client::new(server.url("")).unwrap();
    let job = options.ingestion_id.clone();
    create(&client, job.as_str(), "ingestion").await;
    let q = server
        .manager()
        .get_queue(&TenantId::default_tenant(), &job)
        .unwrap();
    let mut sub = q.subscribe(0).unwrap();
    let quiet: demo::Narrate = Arc::new(|_| {});
    let running = tokio::spawn({
        let options = options.clone();
        async move { demo::run(&options, quiet).await }
    });
    // Cancel once video 3 is done, as a user watching the stream would.
    let mut seen = Vec::new();
    loop {
        let e = next_json(&mut sub)
            .await
            .expect("the job ended before the cancel");
        let done = e["step"] == "done_video_3.mp4";
        seen.push(e);
        if done {
            break;
        }
    }
    client
        .cancel(Route::Ingestion, job.as_str(), Some("user pressed stop"))
        .await
        .unwrap();
    while let Some(e) = next_json(&mut sub).await {
        seen.push(e);
    }
    let report = tokio::time::timeout(HANG_GUARD, running)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        report.ingestion,
        Some(Outcome::Cancelled {
            reason: Some("user pressed stop".into())
        })
    );
    // The stream ended with status: cancelled, right after a finished video: every video
    // that started was finished, and the job stopped well before its end.
    let last = seen.last().unwrap();
    assert_eq!(
        (&last["event_type"], &last["state"]),
        (&json!("status"), &json!("cancelled"))
    );
    let before = &seen[seen.len() - 2];
    let step = before["step"].as_str().unwrap();
    assert!(
        step.starts_with("done_video_"),
        "stopped mid-video: {before}"
    );
    let started: Vec<&str> = seen
        .iter()
        .filter_map(|e| e["step"].as_str()?.strip_prefix("processing_"))
        .collect();
    let finished: Vec<&str> = seen
        .iter()
        .filter_map(|e| e["step"].as_str()?.strip_prefix("done_"))
        .collect();
    assert_eq!(started, finished);
    assert!(
        finished.len() >= 3 && finished.len() < 1000,
        "{}",
        finished.len()
    );
    assert_eq!(before["current"].as_u64(), Some(finished.len() as u64));
    assert_eq!(seen.iter().filter(|e| e["state"] == "cancelled").count(), 1);
    server.stop().await;
}

/// A progress payload that names its send and its place in it.
fn marked(send: u64, k: u64) -> eventqueue::Payload {
    eventqueue::ProgressEvent::new(k, 2)
        .details(json!({"send": send, "k": k}))
        .into()
}

#[tokio::test]
async fn concurrent_sends_through_one_sink_ride_in_one_batch_each_answered_with_its_own_offsets() {
    use eventqueue::producer::EventSink;
    let server = TestServer::start(helpers::server_config()).await;
    let sink = HttpSink::new(&server.url(""), &id("wf"))
        .unwrap()
        .with_tenant(&acme());
    create(sink.client(), "wf", "workflow").await;
    // Sixteen tasks send two events each at the same moment, through clones of one sink.
    let sends = (0..16u64).map(|i| {
        let sink = sink.clone();
        async move { (i, sink.send(vec![marked(i, 0), marked(i, 1)]).await) }
    });
    let answers = futures_util::future::join_all(sends).await;
    assert_eq!(
        sink.batches_sent(),
        1,
        "all sixteen sends rode in one batch"
    );
    sink.client().close_queue("wf").await.unwrap();
    let q = server.manager().get_queue(&acme(), &id("wf")).unwrap();
    let events = all_json(&q).await;
    assert_eq!(events.len(), 32);
    for (i, answer) in answers {
        let sent = answer.unwrap();
        // A send's events stay together and in order, at the offsets its answer gives.
        assert_eq!(sent.offsets.len(), 2);
        assert_eq!(sent.offsets[1], sent.offsets[0] + 1);
        for (k, offset) in sent.offsets.iter().enumerate() {
            let stored = &events[*offset as usize];
            assert_eq!(stored["details"], json!({"send": i, "k": k}));
        }
    }
    server.stop().await;
}

#[tokio::test]
async fn a_refused_send_in_a_batch_gets_its_own_refusal_and_the_others_are_stored() {
    use eventqueue::client::ClientError;
    use eventqueue::producer::EventSink;
    let server = TestServer::start(helpers::server_config()).await;
    let sink = HttpSink::new(&server.url(""), &id("wf"))
        .unwrap()
        .with_tenant(&acme());
    create(sink.client(), "wf", "workflow").await;
    // The middle send is invalid (current above total): the server refuses its batch whole.
    let invalid: eventqueue::Payload = eventqueue::ProgressEvent::new(5, 1).into();
    let (a, b, c) = tokio::join!(
        sink.send(vec![marked(0, 0)]),
        sink.send(vec![invalid]),
        sink.send(vec![marked(2, 0)]),
    );
    let err = b.unwrap_err();
    assert!(
        matches!(
            err,
            ProducerError::Http(ClientError::Api { status: 400, .. })
        ),
        "{err:?}"
    );
    let (a, c) = (a.unwrap(), c.unwrap());
    assert_eq!((a.offsets.len(), c.offsets.len()), (1, 1));
    // One batch, refused, then each send on its own.
    assert_eq!(sink.batches_sent(), 4);
    let q = server.manager().get_queue(&acme(), &id("wf")).unwrap();
    assert_eq!(q.latest_offset(), 2);
    server.stop().await;
}
