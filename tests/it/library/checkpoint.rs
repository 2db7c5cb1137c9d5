//! Checkpoints that emit events (seed tests 40–42, DESIGN.md "Checkpoints"): what a save emits,
//! saves without a queue, latest / by id / list / resume across a restart, validation, and the
//! atomicity of a checkpoint with its events — under an injected failure between the two
//! writes, a failed log write, and a power cut at every sync.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use eventqueue::{
    Checkpoint, Config, Error, Event, PowerLoss, QueueManager, QueueOptions, StoredCheckpoint,
    TaskState, TaskStatus, WorkflowStatus,
};
use serde_json::{Value, json};

use super::*;
use crate::helpers::{make_older_format, read_meta};

fn event_json(e: &eventqueue::RecordedEvent) -> Value {
    serde_json::from_slice(e.json()).unwrap()
}

/// Every retained event of a queue, parsed.
async fn events_of(q: &eventqueue::EventQueue) -> Vec<Value> {
    let mut sub = q.subscribe(q.first_offset()).unwrap();
    let mut out = Vec::new();
    for _ in q.first_offset()..q.latest_offset() {
        out.push(event_json(&*next_event(&mut sub).await));
    }
    out
}

fn running(wf: &TaskId, phase: u64, done: usize, tasks: usize) -> Checkpoint {
    let mut c = Checkpoint::new(wf, WorkflowStatus::Running).phase(phase, 3);
    for i in 0..tasks {
        let status = if i < done {
            TaskStatus::Completed
        } else {
            TaskStatus::Pending
        };
        c = c.task(format!("task_{i}"), status);
    }
    c.state(json!({"phase": phase}))
}

#[tokio::test]
async fn a_save_emits_status_then_progress_from_the_task_states() {
    // Seed 41: one completed task of one: status, then progress 1 of 1.
    let dir = tempfile::tempdir().unwrap();
    let m = open(dir.path()).await;
    let (t, wf) = (tenant("t"), task("wf"));
    let q = m
        .create_queue(&t, &wf, QueueOptions::kind(eventqueue::QueueKind::Workflow))
        .await
        .unwrap();
    let store = m.checkpoints(&t);
    let saved = store.save(running(&wf, 1, 1, 1)).await.unwrap();
    assert_eq!(
        (saved.status_offset, saved.progress_offset),
        (Some(0), Some(1))
    );
    assert_eq!(q.latest_offset(), 2);
    let events = events_of(&q).await;
    assert_eq!(events[0]["event_type"], "status");
    assert_eq!(events[0]["state"], "working");
    assert_eq!(events[0]["phase"], "phase_1");
    assert_eq!(events[0]["message"], "Checkpoint saved: running");
    assert_eq!(events[1]["event_type"], "progress");
    assert_eq!(
        (events[1]["current"].as_u64(), events[1]["total"].as_u64()),
        (Some(1), Some(1))
    );

    // Two of three tasks done, phase 2: current / total / step / details follow the checkpoint.
    let saved = store.save(running(&wf, 2, 2, 3)).await.unwrap();
    assert_eq!(
        (saved.status_offset, saved.progress_offset),
        (Some(2), Some(3))
    );
    let events = events_of(&q).await;
    let p = &events[3];
    assert_eq!(
        (p["current"].as_u64(), p["total"].as_u64()),
        (Some(2), Some(3))
    );
    assert_eq!(p["step"], "phase_2");
    assert_eq!(
        p["details"],
        json!({
            "checkpoint_id": saved.checkpoint_id,
            "workflow_status": "running",
            "current_phase": 2,
            "total_phases": 3,
        })
    );
    assert!((p["percentage"].as_f64().unwrap() - 200.0 / 3.0).abs() < 1e-9);

    // Without tasks, only the status event.
    let saved = store
        .save(Checkpoint::new(&wf, WorkflowStatus::Pending))
        .await
        .unwrap();
    assert_eq!(
        (saved.status_offset, saved.progress_offset),
        (Some(4), None)
    );
    assert_eq!(q.latest_offset(), 5);
}

#[tokio::test]
async fn the_status_event_maps_the_checkpoint_status() {
    let dir = tempfile::tempdir().unwrap();
    let m = open(dir.path()).await;
    let t = tenant("t");
    let cases = [
        ("pending", "pending", false),
        ("running", "working", false),
        ("completed", "completed", false),
        ("partially_completed", "working", false),
        ("waiting_for_review", "working", false),
        ("failed", "failed", true),
        ("cancelled", "cancelled", true),
    ];
    for (i, (status, state, terminal)) in cases.into_iter().enumerate() {
        let wf = task(&format!("wf{i}"));
        let q = m
            .create_queue(&t, &wf, QueueOptions::default())
            .await
            .unwrap();
        let mut sub = q.subscribe(0).unwrap();
        let c = Checkpoint::new(&wf, WorkflowStatus::parse(status).unwrap()).phase(2, 2);
        m.checkpoints(&t).save(c).await.unwrap();
        let e = next_event(&mut sub).await;
        let v = event_json(&e);
        assert_eq!(v["state"], state, "{status}");
        assert_eq!(v["message"], format!("Checkpoint saved: {status}"));
        assert_eq!(e.is_terminal(), terminal, "{status}");
        assert_eq!(q.is_finished(), terminal, "{status}");
    }
}

#[tokio::test]
async fn a_save_without_a_queue_returns_its_id() {
    // Seed 42.
    let dir = tempfile::tempdir().unwrap();
    let m = open(dir.path()).await;
    let (t, wf) = (tenant("t"), task("wf"));
    let store = m.checkpoints(&t);
    assert!(store.queue(&wf).is_none());
    let saved = store.save(running(&wf, 1, 1, 2)).await.unwrap();
    assert!(saved.checkpoint_id.starts_with("ckpt_"), "{saved:?}");
    assert_eq!(saved.checkpoint_id.len(), "ckpt_".len() + 12);
    assert_eq!((saved.status_offset, saved.progress_offset), (None, None));
    assert!(m.get_queue(&t, &wf).is_none(), "a save creates no queue");
    let latest = store.latest(&wf).await.unwrap().unwrap();
    assert_eq!(latest.checkpoint_id, saved.checkpoint_id);
    assert_eq!(latest.status_offset, None);
}

#[tokio::test]
async fn the_store_of_a_queue_emits_into_that_queue() {
    // Seed 40: a checkpoint store given a queue keeps it.
    let dir = tempfile::tempdir().unwrap();
    let m = open(dir.path()).await;
    let (t, wf) = (tenant("t"), task("wf"));
    let q = m
        .create_queue(&t, &wf, QueueOptions::default())
        .await
        .unwrap();
    let store = q.checkpoint_store();
    assert_eq!(store.tenant_id(), &t);
    let kept = store.queue(&wf).unwrap();
    assert_eq!((kept.tenant_id(), kept.task_id()), (&t, &wf));
    store.save(running(&wf, 1, 0, 1)).await.unwrap();
    assert_eq!(q.latest_offset(), 2);
}

fn same_content(a: &StoredCheckpoint, b: &Checkpoint) {
    assert_eq!(&a.to_checkpoint(), b);
}

#[tokio::test]
async fn latest_by_id_list_and_resume_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (t, wf) = (tenant("t"), task("wf"));
    let saved_ids;
    let last = Checkpoint::new(&wf, WorkflowStatus::PartiallyCompleted)
        .phase(2, 3)
        .task_with_result("search", TaskStatus::Completed, json!({"hits": [1, 2]}))
        .task("summarise", TaskStatus::Failed)
        .task("report", TaskStatus::Pending)
        .state(json!({"query": "cats", "nested": {"a": [1.5, null, "x"]}}));
    {
        let m = embedded::open(dir.path()).await;
        m.create_queue(&t, &wf, QueueOptions::default())
            .await
            .unwrap();
        let store = m.checkpoints(&t);
        let a = store.save(running(&wf, 1, 0, 3)).await.unwrap();
        let b = store.save(last.clone()).await.unwrap();
        assert_eq!((a.seq, b.seq), (0, 1));
        saved_ids = vec![a.checkpoint_id, b.checkpoint_id];
        m.shutdown().await.unwrap();
    }
    let m = embedded::open(dir.path()).await;
    let store = m.checkpoints(&t);
    let latest = store.latest(&wf).await.unwrap().unwrap();
    same_content(&latest, &last);
    assert_eq!(latest.checkpoint_id, saved_ids[1]);
    assert_eq!((latest.tenant_id.clone(), latest.seq), (t.clone(), 1));
    let first = store.get(&saved_ids[0]).await.unwrap().unwrap();
    same_content(&first, &running(&wf, 1, 0, 3));
    let listed: Vec<String> = store
        .list(&wf)
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.checkpoint_id)
        .collect();
    assert_eq!(listed, saved_ids);

    let resume = store.resume(&wf).await.unwrap().unwrap();
    assert!(!resume.is_finished());
    let pending: Vec<&str> = resume.pending_tasks().map(|t| t.task_id.as_str()).collect();
    assert_eq!(pending, ["summarise", "report"]);
    // The queue continues after the save's events.
    let q = resume.queue.unwrap();
    assert_eq!(q.latest_offset(), 4);
    assert_eq!(q.enqueue(phase(&t, &wf, 3)).await.unwrap(), 4);

    // Another tenant sees none of it; an unknown workflow has nothing to resume.
    let other = m.checkpoints(&tenant("other"));
    assert!(other.latest(&wf).await.unwrap().is_none());
    assert!(other.get(&saved_ids[0]).await.unwrap().is_none());
    assert!(other.list(&wf).await.unwrap().is_empty());
    assert!(store.resume(&task("nope")).await.unwrap().is_none());
}

#[tokio::test]
async fn invalid_checkpoints_are_refused_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let m = open(dir.path()).await;
    let (t, wf) = (tenant("t"), task("wf"));
    let q = m
        .create_queue(&t, &wf, QueueOptions::default())
        .await
        .unwrap();
    let store = m.checkpoints(&t);
    let cases = [
        (
            Checkpoint::new(&wf, WorkflowStatus::Running).phase(4, 3),
            "current_phase",
        ),
        (
            Checkpoint::new(&wf, WorkflowStatus::Running)
                .task("a", TaskStatus::Pending)
                .task("a", TaskStatus::Completed),
            "tasks[1].task_id",
        ),
        (
            Checkpoint::new(&wf, WorkflowStatus::Running).task("", TaskStatus::Pending),
            "tasks[0].task_id",
        ),
        (
            Checkpoint::new(&wf, WorkflowStatus::Running).state(json!([1])),
            "state",
        ),
        (
            Checkpoint::new(&wf, WorkflowStatus::Other(String::new())),
            "status",
        ),
    ];
    for (c, field) in cases {
        match store.save(c).await {
            Err(Error::InvalidCheckpoint { field: f, .. }) => assert_eq!(f, field),
            other => panic!("{field}: expected InvalidCheckpoint, got {other:?}"),
        }
    }
    assert!(store.latest(&wf).await.unwrap().is_none());
    assert_eq!(q.latest_offset(), 0);
}

#[tokio::test]
async fn a_closed_queue_refuses_the_save_and_its_events() {
    let dir = tempfile::tempdir().unwrap();
    let m = open(dir.path()).await;
    let (t, wf) = (tenant("t"), task("wf"));
    let q = m
        .create_queue(&t, &wf, QueueOptions::default())
        .await
        .unwrap();
    q.close().await.unwrap();
    let err = m
        .checkpoints(&t)
        .save(running(&wf, 1, 1, 1))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::QueueClosed { .. }), "{err}");
    assert!(m.checkpoints(&t).latest(&wf).await.unwrap().is_none());
    // A deleted queue is no queue: the save goes ahead alone.
    m.delete_queue(&t, &wf).await.unwrap();
    let saved = m.checkpoints(&t).save(running(&wf, 1, 1, 1)).await.unwrap();
    assert_eq!(saved.status_offset, None);
}

#[tokio::test]
async fn a_workflow_keeps_its_newest_hundred_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let m = open(dir.path()).await;
    let (t, wf) = (tenant("t"), task("wf"));
    let store = m.checkpoints(&t);
    let mut ids = Vec::new();
    for n in 0..105 {
        let c = Checkpoint::new(&wf, WorkflowStatus::Running).state(json!({ "n": n }));
        ids.push(store.save(c).await.unwrap().checkpoint_id);
    }
    let listed = store.list(&wf).await.unwrap();
    assert_eq!(listed.len(), 100);
    assert_eq!(listed[0].seq, 5);
    assert_eq!(listed[0].checkpoint_id, ids[5]);
    assert!(store.get(&ids[4]).await.unwrap().is_none());
    assert!(store.get(&ids[5]).await.unwrap().is_some());
    assert_eq!(
        store.latest(&wf).await.unwrap().unwrap().state,
        json!({"n": 104})
    );
    // Another workflow's history is its own.
    let other = task("wf2");
    assert_eq!(
        store
            .save(Checkpoint::new(&other, WorkflowStatus::Running))
            .await
            .unwrap()
            .seq,
        0
    );
}

/// A checkpoint's recorded offsets hold the events it emitted: the status event (with the
/// checkpoint's phase and status) and the progress event naming the checkpoint.
fn assert_agree(label: &str, c: &StoredCheckpoint, events: &[Value], first_offset: u64) {
    let at = |o: Option<u64>| {
        let o = o.unwrap_or_else(|| panic!("{label}: {} has no events", c.checkpoint_id));
        &events[(o - first_offset) as usize]
    };
    let status = at(c.status_offset);
    assert_eq!(status["event_type"], "status", "{label}");
    assert_eq!(
        status["phase"],
        format!("phase_{}", c.current_phase),
        "{label}"
    );
    assert_eq!(
        status["message"],
        format!("Checkpoint saved: {}", c.status),
        "{label}"
    );
    let progress = at(c.progress_offset);
    assert_eq!(
        progress["details"]["checkpoint_id"], c.checkpoint_id,
        "{label}"
    );
    assert_eq!(
        progress["current"].as_u64(),
        Some(
            c.tasks
                .iter()
                .filter(|t| t.status == TaskStatus::Completed)
                .count() as u64
        ),
        "{label}"
    );
}

#[tokio::test]
async fn a_failure_between_checkpoint_and_events_leaves_neither() {
    let dir = tempfile::tempdir().unwrap();
    let (t, wf) = (tenant("t"), task("wf"));
    {
        let m = embedded::open(dir.path()).await;
        let q = m
            .create_queue(&t, &wf, QueueOptions::default())
            .await
            .unwrap();
        let store = m.checkpoints(&t);
        store.save(running(&wf, 1, 1, 2)).await.unwrap();
        m.faults().fail_checkpoint_saves_after(0);
        let err = store.save(running(&wf, 2, 2, 2)).await.unwrap_err();
        assert!(err.to_string().contains("injected"), "{err}");
        // Neither the second checkpoint nor its events exist.
        assert_eq!(store.list(&wf).await.unwrap().len(), 1);
        assert_eq!(q.latest_offset(), 2);
        // The failure happened inside a transaction: the store refuses writes until reopened.
        assert!(matches!(
            q.enqueue(phase(&t, &wf, 9)).await,
            Err(Error::StoreFailed(_))
        ));
        let _ = m.shutdown().await;
    }
    let m = embedded::open(dir.path()).await;
    let store = m.checkpoints(&t);
    let q = m.get_queue(&t, &wf).unwrap();
    let listed = store.list(&wf).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(q.latest_offset(), 2);
    assert_agree("reopened", &listed[0], &events_of(&q).await, 0);
    // Saves go on at the next offsets.
    let saved = store.save(running(&wf, 2, 2, 2)).await.unwrap();
    assert_eq!((saved.seq, saved.status_offset), (1, Some(2)));
}

#[tokio::test]
async fn a_failed_log_write_stores_neither_and_the_next_save_works() {
    let dir = tempfile::tempdir().unwrap();
    let (t, wf) = (tenant("t"), task("wf"));
    {
        let m = embedded::open(dir.path()).await;
        let q = m
            .create_queue(&t, &wf, QueueOptions::default())
            .await
            .unwrap();
        let store = m.checkpoints(&t);
        m.faults().fail_appends_after(0);
        assert!(store.save(running(&wf, 1, 1, 1)).await.is_err());
        assert!(store.latest(&wf).await.unwrap().is_none());
        assert_eq!(q.latest_offset(), 0);
        m.faults().fail_appends_after(-1);
        let saved = store.save(running(&wf, 1, 1, 1)).await.unwrap();
        assert_eq!((saved.seq, saved.status_offset), (0, Some(0)));
        let _ = m.shutdown().await;
    }
    let m = embedded::open(dir.path()).await;
    assert_eq!(m.checkpoints(&t).list(&wf).await.unwrap().len(), 1);
    assert_eq!(m.get_queue(&t, &wf).unwrap().latest_offset(), 2);
}

/// What the power-loss workload was told succeeded.
#[derive(Default)]
struct Acked {
    saves: Vec<String>,
}

async fn save_workload(m: &QueueManager, acked: &Mutex<Acked>) {
    let (t, wf) = (tenant("t"), task("wf"));
    let Ok(q) = m.create_queue(&t, &wf, QueueOptions::default()).await else {
        return;
    };
    let store = m.checkpoints(&t);
    for n in 0..6u64 {
        // Plain events between the saves, so offsets of saves and events interleave.
        let _ = q
            .enqueue(Event::new(
                &t,
                &wf,
                eventqueue::StatusEvent::new(TaskState::Working),
            ))
            .await;
        if let Ok(saved) = store.save(running(&wf, n % 4, (n % 3) as usize, 2)).await {
            acked.lock().unwrap().saves.push(saved.checkpoint_id);
        }
    }
    // Saves sharing group commits with each other and with enqueues.
    let mut handles = Vec::new();
    for p in 0..3u64 {
        let (store, wf) = (store.clone(), wf.clone());
        handles.push(tokio::spawn(async move {
            store
                .save(running(&wf, p, 1, 2))
                .await
                .ok()
                .map(|s| s.checkpoint_id)
        }));
    }
    for h in handles {
        if let Some(id) = h.await.unwrap() {
            acked.lock().unwrap().saves.push(id);
        }
    }
}

/// After a power cut at any sync, the reopened directory holds every acknowledged save, and
/// every checkpoint and the queue's events agree: each checkpoint's recorded offsets hold its
/// events, and each progress event's checkpoint exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_power_cut_at_any_sync_checkpoints_and_events_agree() {
    let mut total = None;
    let mut n = 1;
    loop {
        let dir = tempfile::tempdir().unwrap();
        let power = PowerLoss::new();
        let cut = total.map(|_| n);
        if let Some(n) = cut {
            power.cut_at_sync(n);
        }
        let acked = Arc::new(Mutex::new(Acked::default()));
        let config = Config {
            cache_size_bytes: 1 << 20,
            fold_interval: if n % 2 == 0 {
                Duration::ZERO
            } else {
                Duration::from_secs(3600)
            },
            ..Config::new(dir.path())
        };
        if let Ok(m) = QueueManager::open_with_power_loss(config.clone(), power.clone()).await {
            save_workload(&m, &acked).await;
            if !power.is_cut() {
                power.cut_now();
            }
            let _ = m.shutdown().await;
        }
        let syncs = power.syncs();
        power
            .settle(dir.path(), if n % 3 == 0 { 700 } else { 0 })
            .unwrap();
        let label = format!("cut at sync {cut:?}");
        let m = QueueManager::open(Config::new(dir.path())).await.unwrap();
        let (t, wf) = (tenant("t"), task("wf"));
        let store = m.checkpoints(&t);
        let listed = store.list(&wf).await.unwrap();
        for id in &acked.lock().unwrap().saves {
            assert!(
                listed.iter().any(|c| &c.checkpoint_id == id),
                "{label}: acknowledged save {id} lost"
            );
        }
        if let Some(q) = m.get_queue(&t, &wf) {
            let events = events_of(&q).await;
            for c in &listed {
                assert_agree(&label, c, &events, q.first_offset());
            }
            for e in events.iter().filter(|e| e["event_type"] == "progress") {
                let id = e["details"]["checkpoint_id"].as_str().unwrap();
                assert!(
                    listed.iter().any(|c| c.checkpoint_id == id),
                    "{label}: progress event of a missing checkpoint {id}"
                );
            }
            let latest = store.latest(&wf).await.unwrap();
            assert_eq!(latest.as_ref(), listed.last(), "{label}");
        } else {
            assert!(
                listed.is_empty(),
                "{label}: checkpoints without their queue"
            );
        }
        m.shutdown().await.unwrap();
        match total {
            None => {
                assert!(syncs > 5, "the workload synced only {syncs} times");
                total = Some(syncs);
            }
            Some(total) if n > total + 3 => break,
            Some(_) => n += 1,
        }
    }
}

#[tokio::test]
async fn a_version_1_database_is_upgraded_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let (t, wf) = (tenant("t"), task("wf"));
    {
        let m = embedded::open(dir.path()).await;
        let q = m
            .create_queue(&t, &wf, QueueOptions::default())
            .await
            .unwrap();
        q.enqueue(phase(&t, &wf, 0)).await.unwrap();
        m.shutdown().await.unwrap();
    }
    // What version 1 wrote: no checkpoint tables (and no key of derived ids).
    make_older_format(dir.path(), 1, |txn| {
        let checkpoints = redb::TableDefinition::<(&str, &str, u64), &[u8]>::new("checkpoints");
        let ids = redb::TableDefinition::<(&str, &str), (&str, u64)>::new("checkpoint_ids");
        assert!(txn.delete_table(checkpoints).unwrap());
        assert!(txn.delete_table(ids).unwrap());
    });
    {
        let m = embedded::open(dir.path()).await;
        assert_eq!(m.get_queue(&t, &wf).unwrap().latest_offset(), 1);
        let saved = m.checkpoints(&t).save(running(&wf, 1, 1, 1)).await.unwrap();
        assert_eq!(saved.status_offset, Some(1));
        m.shutdown().await.unwrap();
    }
    assert_eq!(read_meta(dir.path(), "format_version"), Some(4));
}

/// Saves interleaved with concurrent enqueues (batches kept in memory and written into redb
/// later, saves written at once): offsets stay dense, every checkpoint's recorded offsets hold
/// its events, before and after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saves_racing_enqueues_keep_offsets_dense_and_agree_with_their_events() {
    let dir = tempfile::tempdir().unwrap();
    let (t, wf) = (tenant("t"), task("wf"));
    let check = |label: &'static str, m: QueueManager| async move {
        let q = m.get_queue(&tenant("t"), &task("wf")).unwrap();
        let events = events_of(&q).await;
        assert_eq!(events.len() as u64, q.latest_offset(), "{label}");
        for (i, e) in events.iter().enumerate() {
            assert_eq!(
                e["offset"].as_u64(),
                Some(i as u64),
                "{label}: offsets not dense"
            );
        }
        let listed = m.checkpoints(&tenant("t")).list(&task("wf")).await.unwrap();
        assert_eq!(listed.len(), 20, "{label}");
        for c in &listed {
            assert_agree(label, c, &events, 0);
        }
        m
    };
    let m = open(dir.path()).await;
    m.create_queue(
        &t,
        &wf,
        QueueOptions::default().with_max_buffer_size(100_000),
    )
    .await
    .unwrap();
    let mut handles = Vec::new();
    for p in 0..4u64 {
        let q = m.get_queue(&t, &wf).unwrap();
        let (t, wf) = (t.clone(), wf.clone());
        handles.push(tokio::spawn(async move {
            for n in 0..50 {
                q.enqueue(phase(&t, &wf, p * 100 + n)).await.unwrap();
            }
        }));
    }
    let store = m.checkpoints(&t);
    handles.push(tokio::spawn({
        let wf = wf.clone();
        async move {
            for n in 0..20u64 {
                store
                    .save(running(&wf, n % 4, (n % 3) as usize, 2))
                    .await
                    .unwrap();
            }
        }
    }));
    for h in handles {
        h.await.unwrap();
    }
    let m = check("live", m).await;
    m.shutdown().await.unwrap();
    if persists() {
        let m = check("reopened", open(dir.path()).await).await;
        m.shutdown().await.unwrap();
    }
}
