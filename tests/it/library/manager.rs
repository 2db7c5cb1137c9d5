//! The manager: the seed's manager tests (19–34), TTL with an injected clock, the cleanup loop.

use std::sync::Arc;
use std::time::Duration;

use eventqueue::{Error, ManualClock, QueueKind, QueueManager, QueueOptions, Timestamp};

use super::*;

async fn open_with(dir: &std::path::Path, clock: Arc<ManualClock>) -> QueueManager {
    QueueManager::open_with_clock(config(dir), clock)
        .await
        .unwrap()
}

fn clock() -> Arc<ManualClock> {
    Arc::new(ManualClock::new(Timestamp::from_micros(
        1_800_000_000_000_000,
    )))
}

#[tokio::test]
async fn create_get_and_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let m = open(dir.path()).await;
    let (t, k) = (tenant("tenant1"), task("workflow_123"));
    let q = m
        .create_queue(&t, &k, QueueOptions::kind(QueueKind::Workflow))
        .await
        .unwrap();
    assert_eq!((q.task_id(), q.tenant_id()), (&k, &t));
    assert_eq!(q.kind(), QueueKind::Workflow);
    let err = m
        .create_queue(&t, &k, QueueOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::QueueExists { .. }));
    assert!(err.to_string().contains("Queue already exists"));
    assert!(m.get_queue(&t, &k).is_some());
    assert!(m.get_queue(&t, &task("nope")).is_none());
    // The same task id under another tenant is another queue.
    let other = m
        .create_queue(&tenant("tenant2"), &k, QueueOptions::default())
        .await
        .unwrap();
    other
        .enqueue(phase(&tenant("tenant2"), &k, 0))
        .await
        .unwrap();
    assert_eq!(q.latest_offset(), 0);
}

#[tokio::test]
async fn get_or_create_returns_the_same_queue() {
    let dir = tempfile::tempdir().unwrap();
    let m = open(dir.path()).await;
    let (t, k) = (tenant("t"), task("wf"));
    let a = m
        .get_or_create_queue(&t, &k, QueueOptions::default())
        .await
        .unwrap();
    a.enqueue(phase(&t, &k, 0)).await.unwrap();
    let b = m
        .get_or_create_queue(&t, &k, QueueOptions::default())
        .await
        .unwrap();
    assert_eq!(b.latest_offset(), 1);
    // Concurrent get_or_create of one id yields one queue.
    let k2 = task("race");
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (m, t, k2) = (m.clone(), t.clone(), k2.clone());
            tokio::spawn(async move {
                let q = m
                    .get_or_create_queue(&t, &k2, QueueOptions::default())
                    .await
                    .unwrap();
                q.enqueue(phase(&t, &k2, 0)).await.unwrap();
            })
        })
        .collect();
    for h in tasks {
        h.await.unwrap();
    }
    assert_eq!(m.get_queue(&t, &k2).unwrap().latest_offset(), 8);
}

#[tokio::test]
async fn close_queue_keeps_it_replayable_and_reports_existence() {
    let dir = tempfile::tempdir().unwrap();
    let m = open(dir.path()).await;
    let (t, k) = (tenant("t"), task("wf"));
    let q = m
        .create_queue(&t, &k, QueueOptions::default())
        .await
        .unwrap();
    q.enqueue(phase(&t, &k, 0)).await.unwrap();
    assert!(m.close_queue(&t, &k).await.unwrap());
    assert!(!m.close_queue(&t, &task("unknown")).await.unwrap());
    let stats = m.stats();
    assert_eq!(
        (stats.total_queues, stats.active_queues, stats.closed_queues),
        (1, 0, 1)
    );
    let mut sub = m.get_queue(&t, &k).unwrap().subscribe(0).unwrap();
    assert_eq!(event_offsets(&drain(&mut sub).await), vec![0]);
}

#[tokio::test]
async fn listing_is_per_tenant() {
    let dir = tempfile::tempdir().unwrap();
    let m = open(dir.path()).await;
    let (t1, t2) = (tenant("tenant1"), tenant("tenant2"));
    for (t, k) in [(&t1, "a"), (&t1, "b"), (&t2, "c")] {
        m.create_queue(t, &task(k), QueueOptions::default())
            .await
            .unwrap();
    }
    assert_eq!(m.list_queues(None).len(), 3);
    let l1 = m.list_queues(Some(&t1));
    assert_eq!(l1.len(), 2);
    assert!(l1.iter().all(|i| i.tenant_id == t1));
    let l2 = m.list_queues(Some(&t2));
    assert_eq!(l2.len(), 1);
    assert_eq!(l2[0].tenant_id, t2);
}

#[tokio::test]
async fn cancel_task_reports_existence() {
    let dir = tempfile::tempdir().unwrap();
    let m = open(dir.path()).await;
    let (t, k) = (tenant("t"), task("wf"));
    let q = m
        .create_queue(&t, &k, QueueOptions::default())
        .await
        .unwrap();
    assert!(m.cancel_task(&t, &k, Some("User requested")).await.unwrap());
    assert_eq!(q.cancellation().reason.as_deref(), Some("User requested"));
    assert!(!m.cancel_task(&t, &task("unknown"), None).await.unwrap());
    // Another tenant cannot cancel it.
    assert!(!m.cancel_task(&tenant("u"), &k, None).await.unwrap());
}

#[tokio::test]
async fn empty_manager_stats() {
    let dir = tempfile::tempdir().unwrap();
    let m = open(dir.path()).await;
    let s = m.stats();
    assert_eq!((s.total_queues, s.active_queues), (0, 0));
    assert_eq!(s.default_ttl_minutes, 30.0);
}

#[tokio::test]
async fn ttl_counts_from_last_activity() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let m = open_with(dir.path(), clock.clone()).await;
    let t = tenant("t");
    let (busy, idle) = (task("busy"), task("idle"));
    let ttl = QueueOptions::default().with_ttl(Duration::from_secs(60));
    let qb = m.create_queue(&t, &busy, ttl.clone()).await.unwrap();
    m.create_queue(&t, &idle, ttl).await.unwrap();
    clock.advance(Duration::from_secs(50));
    qb.enqueue(phase(&t, &busy, 0)).await.unwrap();
    clock.advance(Duration::from_secs(20)); // 70 s after creation, 20 s after busy's event
    let report = m.cleanup_expired().await.unwrap();
    assert_eq!(report.queues_expired, 1);
    assert!(m.get_queue(&t, &idle).is_none());
    assert!(m.get_queue(&t, &busy).is_some(), "activity extends the TTL");
    clock.advance(Duration::from_secs(40));
    let report = m.cleanup_expired().await.unwrap();
    assert_eq!((report.queues_expired, report.events_removed), (1, 1));
    assert!(m.list_queues(None).is_empty());
}

#[tokio::test]
async fn cleanup_loop_reaps_without_a_manual_call_and_starts_once() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let m = open_with(dir.path(), clock.clone()).await;
    let t = tenant("t");
    m.create_queue(
        &t,
        &task("short"),
        QueueOptions::default().with_ttl(Duration::from_secs(1)),
    )
    .await
    .unwrap();
    m.create_queue(&t, &task("long"), QueueOptions::default())
        .await
        .unwrap();
    clock.advance(Duration::from_secs(2));
    m.start_cleanup_loop(Duration::from_millis(10));
    m.start_cleanup_loop(Duration::from_millis(10));
    assert!(m.is_cleanup_running());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while m.get_queue(&t, &task("short")).is_some() {
        assert!(tokio::time::Instant::now() < deadline, "loop never reaped");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(m.get_queue(&t, &task("long")).is_some());
    m.stop_cleanup_loop();
    assert!(!m.is_cleanup_running());
    // Stopped: an expiring queue now stays until a manual sweep.
    m.create_queue(
        &t,
        &task("later"),
        QueueOptions::default().with_ttl(Duration::ZERO),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(m.get_queue(&t, &task("later")).is_some());
}

#[tokio::test]
async fn expiry_after_restart() {
    // A queue that expired while the server was down is gone after the first sweep.
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    {
        let m = QueueManager::open_with_clock(embedded::config(dir.path()), clock.clone())
            .await
            .unwrap();
        m.create_queue(&tenant("t"), &task("wf"), QueueOptions::default())
            .await
            .unwrap();
        m.shutdown().await.unwrap();
    }
    clock.advance(Duration::from_secs(31 * 60));
    let m = QueueManager::open_with_clock(embedded::config(dir.path()), clock)
        .await
        .unwrap();
    assert_eq!(m.list_queues(None).len(), 1);
    assert_eq!(m.cleanup_expired().await.unwrap().queues_expired, 1);
    assert!(m.list_queues(None).is_empty());
}

/// Every acknowledged commit is timed once (by the acknowledger, after its fsync), and each
/// periodic checkpoint is counted and timed.
#[tokio::test]
async fn commits_and_checkpoints_are_measured() {
    let dir = tempfile::tempdir().unwrap();
    let m = QueueManager::open(eventqueue::Config {
        fold_interval: Duration::from_millis(1),
        ..config(dir.path())
    })
    .await
    .unwrap();
    let (t, k) = (tenant("t"), task("measured"));
    let q = m
        .create_queue(&t, &k, QueueOptions::default())
        .await
        .unwrap();
    // Each enqueue finds the log's records older than the interval: a checkpoint follows it.
    for i in 0..10 {
        q.enqueue(phase(&t, &k, i)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    let metrics = m.metrics();
    // Every commit was acknowledged, and is timed before its acknowledgement.
    assert_eq!(
        metrics.commit_seconds.count(),
        eventqueue::Metrics::get(&metrics.commits)
    );
    assert!(metrics.commit_seconds.count() >= 11);
    if backend() != eventqueue::StorageBackend::Redb {
        // Only the embedded store folds a log.
        return;
    }
    // A checkpoint may still be running after the last acknowledgement.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let checkpoints = eventqueue::Metrics::get(&metrics.log_folds);
        if checkpoints >= 1 && metrics.log_fold_seconds.count() == checkpoints {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "checkpoints {checkpoints}, timed {}",
            metrics.log_fold_seconds.count()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A commit with nothing else waiting is synced, published and answered by the writer itself;
/// under concurrent load commits go to the acknowledger too. Either way every commit is
/// acknowledged exactly once, every caller gets its own offset, and a live subscriber sees
/// every event once, in offset order.
#[tokio::test]
async fn lone_and_concurrent_commits_are_acknowledged_once_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let m = open(dir.path()).await;
    let (t, k) = (tenant("t"), task("acks"));
    let q = m
        .create_queue(&t, &k, QueueOptions::default().with_max_buffer_size(10_000))
        .await
        .unwrap();
    let mut live = q.subscribe(0).unwrap();
    let metrics = m.metrics();
    for n in 0..20 {
        assert_eq!(q.enqueue(phase(&t, &k, n)).await.unwrap(), n);
    }
    assert!(
        eventqueue::Metrics::get(&metrics.writer_acks) >= 1,
        "20 sequential enqueues: none acknowledged by the writer itself"
    );
    let tasks: Vec<_> = (0..16u64)
        .map(|p| {
            let (q, t, k) = (q.clone(), t.clone(), k.clone());
            tokio::spawn(async move {
                let mut got = Vec::new();
                for n in 0..40 {
                    got.push(q.enqueue(phase(&t, &k, 1000 * (p + 1) + n)).await.unwrap());
                }
                got
            })
        })
        .collect();
    let mut acked = Vec::new();
    for task in tasks {
        let got = task.await.unwrap();
        assert!(
            got.windows(2).all(|w| w[0] < w[1]),
            "one producer's offsets rise"
        );
        acked.extend(got);
    }
    acked.sort_unstable();
    assert_eq!(acked, (20..20 + 16 * 40).collect::<Vec<u64>>());
    assert_eq!(
        offsets(&mut live, 20 + 16 * 40).await,
        (0..20 + 16 * 40).collect::<Vec<u64>>()
    );
    assert_eq!(
        metrics.commit_seconds.count(),
        eventqueue::Metrics::get(&metrics.commits)
    );
}

/// A small disk reserve on a disk with room does not shrink the log's checkpoint bound to a
/// quarter of the reserve (a checkpoint every 2 MiB here): ~4.5 MiB of log, no checkpoint.
#[tokio::test]
async fn a_small_reserve_on_a_roomy_disk_keeps_checkpoints_large() {
    let dir = tempfile::tempdir().unwrap();
    let m = QueueManager::open(eventqueue::Config {
        disk_reserve: Some(8 << 20),
        fold_interval: Duration::from_secs(3600),
        ..config(dir.path())
    })
    .await
    .unwrap();
    let (t, k) = (tenant("t"), task("roomy"));
    let q = m
        .create_queue(&t, &k, QueueOptions::default().with_max_buffer_size(10_000))
        .await
        .unwrap();
    let filler = "x".repeat(1000);
    for chunk in 0..8u64 {
        let batch = (0..500)
            .map(|i| {
                let status = eventqueue::StatusEvent::new(eventqueue::TaskState::Working)
                    .phase(format!("{}-{filler}", chunk * 500 + i));
                eventqueue::Event::new(&t, &k, status)
            })
            .collect();
        q.enqueue_batch(batch).await.unwrap();
    }
    assert_eq!(q.latest_offset(), 4000);
    assert_eq!(eventqueue::Metrics::get(&m.metrics().log_folds), 0);
}
