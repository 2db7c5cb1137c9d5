//! Producer helpers in process (seed tests 35–39): a reporter emits and the offset advances,
//! the boundary check follows `cancel` and reports `status: cancelled`, several subscribers
//! see the phases in order, a reconnect resumes at an offset, and a producer cannot leave its
//! stream without a terminal event (`run`, and the drop guard).

use eventqueue::producer::{Outcome, ProducerError, Reporter};
use eventqueue::{
    ArtifactEvent, Checkpoint, CompleteEvent, ErrorEvent, EventQueue, QueueManager, TaskStatus,
    WorkflowStatus,
};
use serde_json::{Value, json};

use super::*;

async fn queue(m: &QueueManager, name: &str) -> EventQueue {
    m.create_queue(&tenant("t"), &task(name), QueueOptions::default())
        .await
        .unwrap()
}

async fn next_json(sub: &mut eventqueue::Subscription) -> Value {
    serde_json::from_slice(next_event(sub).await.json()).unwrap()
}

/// Every event until the subscription ends, parsed.
async fn all_json(sub: &mut eventqueue::Subscription) -> Vec<Value> {
    drain(sub)
        .await
        .iter()
        .filter_map(|d| d.as_event())
        .map(|e| serde_json::from_slice(e.json()).unwrap())
        .collect()
}

#[tokio::test]
async fn a_reporter_emits_and_the_offset_advances() {
    // Seeds 35, 36.
    let dir = tempfile::tempdir().unwrap();
    let m = open(dir.path()).await;
    let q = queue(&m, "ingestion_1").await;
    let r = Reporter::new(q.clone());
    assert_eq!(r.phase("starting").await.unwrap(), 0);
    assert_eq!(q.latest_offset(), 1);
    assert_eq!(r.step(1, 4, "video_1.mp4").await.unwrap(), 1);
    let a = ArtifactEvent::new("embeddings", json!({"video": "video_1.mp4"}));
    assert_eq!(r.artifact(a).await.unwrap(), 2);
    assert_eq!(
        r.error(ErrorEvent::new("Warn", "slow disk")).await.unwrap(),
        3
    );
    assert_eq!(q.latest_offset(), 4);
    assert!(
        !q.is_finished(),
        "a recoverable error does not finish the task"
    );
    // Invalid events are refused before anything is stored.
    assert!(matches!(
        r.step(5, 4, "x").await,
        Err(ProducerError::Queue(eventqueue::Error::InvalidEvent { .. }))
    ));
    let offset = r
        .complete(CompleteEvent::new(json!({"ok": true})))
        .await
        .unwrap();
    assert_eq!(offset, 4);
    assert!(r.is_finished() && q.is_finished());
    let mut sub = q.subscribe(4).unwrap();
    let done = next_json(&mut sub).await;
    assert!(done["execution_time_seconds"].as_f64().unwrap() >= 0.0);
}

#[tokio::test]
async fn the_boundary_check_follows_cancel_and_reports_it() {
    // Seed 37.
    let dir = tempfile::tempdir().unwrap();
    let m = open(dir.path()).await;
    let q = queue(&m, "wf").await;
    let r = Reporter::new(q.clone());
    assert!(!r.is_cancelled().await.unwrap());
    r.check_cancelled().await.unwrap();
    assert_eq!(q.latest_offset(), 0, "a passing check emits nothing");
    m.cancel_task(&tenant("t"), &task("wf"), Some("user pressed stop"))
        .await
        .unwrap();
    assert!(r.is_cancelled().await.unwrap());
    match r.check_cancelled().await {
        Err(ProducerError::Cancelled { reason }) => {
            assert_eq!(reason.as_deref(), Some("user pressed stop"))
        }
        other => panic!("expected Cancelled, got {other:?}"),
    }
    let mut sub = q.subscribe(0).unwrap();
    let events = all_json(&mut sub).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["state"], "cancelled");
    assert_eq!(events[0]["message"], "Cancelled: user pressed stop");
    assert!(r.is_finished() && q.is_finished());
    // A second check reports nothing more.
    assert!(r.check_cancelled().await.unwrap_err().is_cancelled());
    assert_eq!(q.latest_offset(), 1);
}

#[tokio::test]
async fn dashboard_and_cli_subscribers_get_the_phases_in_order_and_a_reconnect_resumes() {
    // Seeds 38, 39.
    let dir = tempfile::tempdir().unwrap();
    let m = open(dir.path()).await;
    let q = queue(&m, "wf").await;
    let mut dashboard = q.subscribe(0).unwrap();
    let mut cli = q.subscribe(0).unwrap();
    let r = Reporter::new(q.clone());
    let outcome = r
        .run(|r| async move {
            for n in 0..5 {
                r.check_cancelled().await?;
                r.phase(format!("phase_{n}")).await?;
            }
            Ok(CompleteEvent::new(json!({"phases": 5})))
        })
        .await
        .unwrap();
    assert_eq!(outcome, Outcome::Completed { offset: Some(5) });
    let phases = |events: &[Value]| -> Vec<String> {
        events
            .iter()
            .filter_map(|e| e["phase"].as_str().map(str::to_string))
            .collect()
    };
    let want: Vec<String> = (0..5).map(|n| format!("phase_{n}")).collect();
    let d = all_json(&mut dashboard).await;
    let c = all_json(&mut cli).await;
    assert_eq!(phases(&d), want);
    assert_eq!(
        d, c,
        "both subscribers get the same events in the same order"
    );
    assert_eq!(d.last().unwrap()["event_type"], "complete");

    // Read two, disconnect, reconnect at offset 2: phases 2..4 follow.
    let mut first = q.subscribe(0).unwrap();
    assert_eq!(offsets(&mut first, 2).await, vec![0, 1]);
    drop(first);
    let mut again = q.subscribe(2).unwrap();
    let rest = all_json(&mut again).await;
    assert_eq!(phases(&rest), want[2..]);
}

#[tokio::test]
async fn run_reports_cancellation_at_the_next_boundary() {
    let dir = tempfile::tempdir().unwrap();
    let m = open(dir.path()).await;
    let q = queue(&m, "ingestion").await;
    let r = Reporter::new(q.clone());
    let canceller = q.clone();
    let outcome = r
        .run(|r| async move {
            for video in 1..=10u64 {
                r.check_cancelled().await?;
                r.step(video - 1, 10, format!("processing video_{video}"))
                    .await?;
                if video == 3 {
                    // A cancel arrives while video 3 is being processed.
                    canceller.cancel(Some("enough")).await.unwrap();
                }
                r.step(video, 10, format!("video_{video} done")).await?;
            }
            Ok(CompleteEvent::new(json!({})))
        })
        .await
        .unwrap();
    assert_eq!(
        outcome,
        Outcome::Cancelled {
            reason: Some("enough".into())
        }
    );
    let events = all_json(&mut q.subscribe(0).unwrap()).await;
    // Video 3 was finished, video 4 never started; then status: cancelled, and nothing else.
    let steps: Vec<&str> = events.iter().filter_map(|e| e["step"].as_str()).collect();
    assert_eq!(steps.last(), Some(&"video_3 done"));
    assert!(!steps.iter().any(|s| s.contains("video_4")));
    assert_eq!(events.last().unwrap()["state"], "cancelled");
    assert_eq!(
        events.iter().filter(|e| e["state"] == "cancelled").count(),
        1
    );
}

#[tokio::test]
async fn run_reports_failures_and_panics_as_non_recoverable_errors() {
    let dir = tempfile::tempdir().unwrap();
    let m = open(dir.path()).await;

    let q = queue(&m, "fails").await;
    let outcome = Reporter::new(q.clone())
        .run(|r| async move {
            r.phase("loading").await?;
            Err(ProducerError::failed("ValidationError", "bad input file"))
        })
        .await
        .unwrap();
    assert!(matches!(outcome, Outcome::Failed { ref message } if message == "bad input file"));
    let events = all_json(&mut q.subscribe(0).unwrap()).await;
    let last = events.last().unwrap();
    assert_eq!(
        (
            &last["event_type"],
            &last["error_type"],
            &last["recoverable"]
        ),
        (&json!("error"), &json!("ValidationError"), &json!(false))
    );

    let q = queue(&m, "panics").await;
    let outcome = Reporter::new(q.clone())
        .run(|_r| async move {
            if q_is_ready() {
                panic!("index out of range");
            }
            Ok(CompleteEvent::new(json!({})))
        })
        .await
        .unwrap();
    assert!(
        matches!(outcome, Outcome::Failed { ref message } if message.contains("index out of range"))
    );
    let events = all_json(&mut q.subscribe(0).unwrap()).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["error_type"], "Panic");
}

fn q_is_ready() -> bool {
    true
}

#[tokio::test]
async fn a_reporter_dropped_without_an_outcome_reports_failed() {
    let dir = tempfile::tempdir().unwrap();
    let m = open(dir.path()).await;
    let q = queue(&m, "forgotten").await;
    let mut sub = q.subscribe(0).unwrap();
    {
        let r = Reporter::new(q.clone());
        let clone = r.clone();
        r.phase("working").await.unwrap();
        drop(r);
        // The last clone ends the task.
        clone.step(1, 2, "half").await.unwrap();
    }
    let events = all_json(&mut sub).await;
    assert_eq!(events.len(), 3, "{events:?}");
    assert_eq!(events[2]["state"], "failed");
    assert_eq!(
        events[2]["message"],
        "the producer stopped without reporting an outcome"
    );

    // Opting out leaves the task running.
    let q = queue(&m, "handed-over").await;
    let r = Reporter::new(q.clone());
    let last = r.clone();
    r.phase("working").await.unwrap();
    r.leave_running();
    assert!(last.is_finished(), "the guard is disarmed for every clone");
    drop(last);
    q.enqueue(phase(&tenant("t"), &task("handed-over"), 1))
        .await
        .unwrap();
    m.flush().await.unwrap();
    assert_eq!(q.latest_offset(), 2);
    assert!(!q.is_finished());
}

#[tokio::test]
async fn a_reporter_saves_checkpoints_of_its_workflow() {
    let dir = tempfile::tempdir().unwrap();
    let m = open(dir.path()).await;
    let q = queue(&m, "wf").await;
    let r = Reporter::new(q.clone());
    let c = Checkpoint::new(&task("wf"), WorkflowStatus::Running)
        .phase(1, 2)
        .task("plan", TaskStatus::Completed)
        .task("search", TaskStatus::Running);
    let saved = r.checkpoint(c).await.unwrap();
    assert_eq!(
        (saved.status_offset, saved.progress_offset),
        (Some(0), Some(1))
    );
    assert!(!r.is_finished());
    let other = Checkpoint::new(&task("other"), WorkflowStatus::Running);
    assert!(matches!(
        r.checkpoint(other).await,
        Err(ProducerError::Queue(
            eventqueue::Error::InvalidCheckpoint { .. }
        ))
    ));
    // A cancelled checkpoint is terminal: the task is finished, the guard stays quiet.
    let c = Checkpoint::new(&task("wf"), WorkflowStatus::Cancelled).phase(1, 2);
    r.checkpoint(c).await.unwrap();
    assert!(r.is_finished() && q.is_finished());
}
