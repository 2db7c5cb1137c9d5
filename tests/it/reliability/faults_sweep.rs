//! Injected I/O faults swept over every operation of a workload (raft-engine's failpoint
//! method): log writes failing after N, and log fsyncs failing after N.
//!
//! A failed log write is cut back and fails only its batch (nothing of it is stored), so later
//! writes go through once the log accepts writes again. A failed fsync is permanent: the store
//! refuses writes until reopened. Either way nothing acknowledged is lost, and the reopened
//! store has dense offsets, no duplicates, and continues at the next offset.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eventqueue::{Config, Error, QueueManager, QueueOptions};

use super::*;

const PRODUCERS: u64 = 3;
const EACH: u64 = 8;

fn config(dir: &std::path::Path) -> Config {
    Config {
        cache_size_bytes: 1 << 20,
        // A checkpoint after every batch, so faults also meet log resets.
        fold_interval: Duration::ZERO,
        ..Config::new(dir)
    }
}

#[derive(Default)]
struct Outcome {
    acked: Acked,
    failed: BTreeSet<String>,
}

/// Concurrent producers on one queue; returns what was acknowledged and what failed.
async fn produce(q: &eventqueue::EventQueue) -> Outcome {
    let out = Arc::new(Mutex::new(Outcome::default()));
    let mut tasks = Vec::new();
    for p in 0..PRODUCERS {
        let (q, out) = (q.clone(), out.clone());
        tasks.push(tokio::spawn(async move {
            let (t, k) = (q.tenant_id().clone(), q.task_id().clone());
            for i in 0..EACH {
                let id = format!("p{p}-{i}");
                let e = marked(&t, &k, &id, i);
                let sent = content(&e.to_json());
                match q.enqueue(e).await {
                    Ok(off) => {
                        let prev = out.lock().unwrap().acked.insert(off, (id, sent));
                        assert!(prev.is_none(), "offset {off} acknowledged twice");
                    }
                    Err(Error::Storage(cause) | Error::StoreFailed(cause)) => {
                        assert!(cause.to_string().contains("injected"), "{cause}");
                        out.lock().unwrap().failed.insert(id);
                    }
                    Err(e) => panic!("unexpected error {e}"),
                }
            }
        }));
    }
    for h in tasks {
        h.await.unwrap();
    }
    std::mem::take(&mut *out.lock().unwrap())
}

async fn check_reopened(dir: &std::path::Path, out: &Outcome, label: &str) -> Acked {
    let m = QueueManager::open(config(dir)).await.unwrap();
    let (t, k) = (tenant("t"), task("q"));
    let q = m.get_queue(&t, &k).unwrap();
    let stored = retained(&q).await;
    check_acked(
        label,
        &out.acked,
        &stored,
        q.first_offset(),
        q.latest_offset(),
        100_000,
    );
    for (off, (id, _)) in &stored {
        assert!(
            out.acked.get(off).is_some_and(|(a, _)| a == id) || out.failed.contains(id),
            "{label}: {id} at {off} was never sent"
        );
    }
    let latest = q.latest_offset();
    assert_eq!(
        q.enqueue(marked(&t, &k, "after", 0)).await.unwrap(),
        latest,
        "{label}"
    );
    m.shutdown().await.unwrap();
    stored
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_writes_failing_after_n_fail_only_their_batches() {
    let (t, k) = (tenant("t"), task("q"));
    for n in 0..=(PRODUCERS * EACH) as i64 {
        let label = format!("appends fail after {n}");
        let dir = tempfile::tempdir().unwrap();
        let m = QueueManager::open(config(dir.path())).await.unwrap();
        let q = m
            .create_queue(
                &t,
                &k,
                QueueOptions::default().with_max_buffer_size(100_000),
            )
            .await
            .unwrap();
        m.faults().fail_appends_after(n);
        let out = produce(&q).await;
        // The failures were per batch: the log takes writes again as soon as it can.
        m.faults().fail_appends_after(-1);
        let e = marked(&t, &k, "resumed", 0);
        let sent = content(&e.to_json());
        let off = q.enqueue(e).await.unwrap();
        assert_eq!(
            off,
            out.acked.len() as u64,
            "{label}: a failed batch left a trace"
        );
        let mut out = out;
        out.acked.insert(off, ("resumed".into(), sent));
        // What readers see is exactly what was acknowledged.
        let live = retained(&q).await;
        assert_eq!(live.len(), out.acked.len(), "{label}");
        m.shutdown().await.unwrap();
        let stored = check_reopened(dir.path(), &out, &label).await;
        // A rejected batch is never stored, not even after a reopen.
        for id in &out.failed {
            assert!(
                stored.values().all(|(s, _)| s != id),
                "{label}: failed {id} was stored"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_fsyncs_failing_after_n_stop_writes_until_reopen() {
    let (t, k) = (tenant("t"), task("q"));
    for n in 0..=(PRODUCERS * EACH) as i64 {
        let label = format!("fsyncs fail after {n}");
        let dir = tempfile::tempdir().unwrap();
        let m = QueueManager::open(config(dir.path())).await.unwrap();
        let q = m
            .create_queue(
                &t,
                &k,
                QueueOptions::default().with_max_buffer_size(100_000),
            )
            .await
            .unwrap();
        m.faults().fail_syncs_after(n);
        let out = produce(&q).await;
        let failed = !out.failed.is_empty();
        // Healing the disk does not heal the store: an fsync failure is permanent.
        m.faults().fail_syncs_after(-1);
        let after = q.enqueue(marked(&t, &k, "refused", 0)).await;
        if failed {
            assert!(
                matches!(after, Err(Error::StoreFailed(_))),
                "{label}: {after:?}"
            );
            // Readers see exactly what was acknowledged.
            assert_eq!(q.latest_offset(), out.acked.len() as u64, "{label}");
            assert_eq!(retained(&q).await.len(), out.acked.len(), "{label}");
        } else {
            after.unwrap();
        }
        let _ = m.shutdown().await;
        let mut out = out;
        out.failed.insert("refused".into());
        check_reopened(dir.path(), &out, &label).await;
    }
}
