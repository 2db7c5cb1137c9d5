//! Retention: deletions purged in bounded steps that interleave with appends (also across a
//! restart), offline compaction, expiry racing subscribers.

use std::sync::atomic::Ordering;
use std::time::Duration;

use eventqueue::{Config, Delivery, Error, QueueManager, QueueOptions, compact_offline};

use super::*;
// The embedded store's own behaviour: always on redb, whatever the suite runs against.
use super::embedded::{config, open};

fn small_steps(dir: &std::path::Path) -> Config {
    Config {
        purge_step: 50,
        ..config(dir)
    }
}

/// A purge step removes one stored value (events are stored in blocks of ~20).
async fn one_value_per_step(dir: &std::path::Path) -> QueueManager {
    QueueManager::open(Config {
        purge_step: 1,
        ..config(dir)
    })
    .await
    .unwrap()
}

async fn fill(m: &QueueManager, name: &str, n: u64) -> eventqueue::EventQueue {
    let (t, k) = (tenant("t"), task(name));
    let q = m
        .create_queue(&t, &k, QueueOptions::default().with_max_buffer_size(n))
        .await
        .unwrap();
    for chunk in 0..n / 500 {
        let batch = (0..500).map(|i| phase(&t, &k, chunk * 500 + i)).collect();
        q.enqueue_batch(batch).await.unwrap();
    }
    q
}

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn deletion_is_purged_in_steps_while_appends_continue() {
    let dir = tempfile::tempdir().unwrap();
    // Hundreds of steps, so the purge is still pending when the deletion returns.
    let m = one_value_per_step(dir.path()).await;
    fill(&m, "big", 10_000).await;
    let (t, k) = (tenant("t"), task("live"));
    let live = m
        .create_queue(&t, &k, QueueOptions::default())
        .await
        .unwrap();
    let removed_before = m.metrics().events_removed.load(Ordering::Relaxed);
    assert!(m.delete_queue(&t, &task("big")).await.unwrap());
    assert_eq!(m.metrics().pending_purges.load(Ordering::Relaxed), 1);
    // Appends proceed while the purge runs.
    for n in 0..20 {
        assert_eq!(live.enqueue(phase(&t, &k, n)).await.unwrap(), n);
    }
    wait_for("the purge", || {
        m.metrics().pending_purges.load(Ordering::Relaxed) == 0
    })
    .await;
    let removed = m.metrics().events_removed.load(Ordering::Relaxed) - removed_before;
    assert_eq!(removed, 10_000);
}

/// A deletion's purge cut short by a shutdown goes on after the reopen, and ends. Whether the
/// shutdown lands before the purge finished is up to the scheduler, so the scenario is run
/// until one does (it almost always does at once).
#[tokio::test]
async fn a_purge_interrupted_by_shutdown_resumes_after_reopen() {
    for _ in 0..20 {
        let dir = tempfile::tempdir().unwrap();
        {
            let m = one_value_per_step(dir.path()).await;
            fill(&m, "big", 2000).await;
            m.delete_queue(&tenant("t"), &task("big")).await.unwrap();
            m.shutdown().await.unwrap();
        }
        let m = QueueManager::open(small_steps(dir.path())).await.unwrap();
        assert!(m.get_queue(&tenant("t"), &task("big")).is_none());
        wait_for("the resumed purge", || {
            m.metrics().pending_purges.load(Ordering::Relaxed) == 0
        })
        .await;
        let removed = m.metrics().events_removed.load(Ordering::Relaxed);
        assert!(removed <= 2000, "{removed}");
        m.shutdown().await.unwrap();
        // Nothing is left to purge after another reopen.
        let m = open(dir.path()).await;
        assert_eq!(m.metrics().pending_purges.load(Ordering::Relaxed), 0);
        m.shutdown().await.unwrap();
        if removed > 0 {
            return;
        }
    }
    panic!("in 20 runs, the shutdown never came before the purge finished");
}

#[tokio::test]
async fn offline_compaction_shrinks_the_file_and_keeps_the_data() {
    let dir = tempfile::tempdir().unwrap();
    {
        let m = QueueManager::open(small_steps(dir.path())).await.unwrap();
        fill(&m, "big", 5000).await;
        let keep = fill(&m, "keep", 500).await;
        assert_eq!(keep.latest_offset(), 500);
        // While the directory is held, offline compaction refuses clearly.
        let dir2 = dir.path().to_path_buf();
        let err = tokio::task::spawn_blocking(move || compact_offline(&dir2))
            .await
            .unwrap()
            .unwrap_err();
        assert!(matches!(err, Error::Locked { .. }), "{err}");
        m.delete_queue(&tenant("t"), &task("big")).await.unwrap();
        wait_for("the purge", || {
            m.metrics().pending_purges.load(Ordering::Relaxed) == 0
        })
        .await;
        m.shutdown().await.unwrap();
    }
    let dir2 = dir.path().to_path_buf();
    let report = tokio::task::spawn_blocking(move || compact_offline(&dir2))
        .await
        .unwrap()
        .unwrap();
    assert!(
        report.bytes_after < report.bytes_before,
        "{report:?} did not shrink"
    );
    let m = open(dir.path()).await;
    let q = m.get_queue(&tenant("t"), &task("keep")).unwrap();
    let mut sub = q.subscribe(0).unwrap();
    assert_eq!(offsets(&mut sub, 500).await, (0..500).collect::<Vec<_>>());
}

#[tokio::test]
async fn expiry_during_a_replay_ends_it_without_holes() {
    let dir = tempfile::tempdir().unwrap();
    let m = QueueManager::open(Config {
        replay_chunk: 16,
        purge_step: 7,
        ..config(dir.path())
    })
    .await
    .unwrap();
    let q = fill(&m, "expiring", 2000).await;
    let mut sub = q.subscribe(0).unwrap();
    let reader = tokio::spawn(async move { drain(&mut sub).await });
    m.expire_once(eventqueue::Timestamp::from_micros(i64::MAX / 2))
        .await
        .unwrap();
    let got = reader.await.unwrap();
    let mut expected = 0;
    for d in got {
        match d {
            Delivery::Event(e) => {
                assert_eq!(e.offset(), expected, "a hole or a duplicate");
                expected += 1;
            }
            Delivery::Gap {
                requested_offset,
                first_available_offset,
            } => {
                assert_eq!(requested_offset, expected);
                expected = first_available_offset;
            }
        }
    }
    assert!(m.get_queue(&tenant("t"), &task("expiring")).is_none());
}

#[tokio::test]
async fn the_compact_command_refuses_a_held_directory_and_shrinks_a_free_one() {
    let dir = tempfile::tempdir().unwrap();
    let m = open(dir.path()).await;
    fill(&m, "q", 500).await;
    let run = |dir: std::path::PathBuf| {
        std::process::Command::new(env!("CARGO_BIN_EXE_eventqueue"))
            .args(["compact", "--data-dir"])
            .arg(dir)
            .output()
            .unwrap()
    };
    let d = dir.path().to_path_buf();
    let held = tokio::task::spawn_blocking(move || run(d)).await.unwrap();
    assert!(!held.status.success());
    let stderr = String::from_utf8_lossy(&held.stderr);
    assert!(stderr.contains("stop the server"), "{stderr}");
    m.shutdown().await.unwrap();
    let d = dir.path().to_path_buf();
    let free = tokio::task::spawn_blocking(move || run(d)).await.unwrap();
    assert!(
        free.status.success(),
        "{}",
        String::from_utf8_lossy(&free.stderr)
    );
    assert!(String::from_utf8_lossy(&free.stdout).contains("compacted"));
    let m = open(dir.path()).await;
    assert_eq!(
        m.get_queue(&tenant("t"), &task("q"))
            .unwrap()
            .latest_offset(),
        500
    );
}
