//! Stress: producers and subscribers joining at random moments, with a live channel of
//! capacity 2 so that lag recovery runs constantly. Every subscriber must see a dense, ordered
//! sequence — or, where retention dropped events, a gap notice that exactly covers the hole.

use std::sync::Arc;

use eventqueue::{Config, Delivery, QueueManager, Subscription};

use super::*;

/// With `apply_bytes` 1, every batch is written into redb right after it is logged, so
/// subscribers' reads race the hand-over from memory to redb all the time.
async fn manager(dir: &std::path::Path, apply_bytes: usize) -> QueueManager {
    QueueManager::open(Config {
        broadcast_capacity: 2,
        replay_chunk: 7,
        apply_bytes,
        ..config(dir)
    })
    .await
    .unwrap()
}

/// Reads a subscription to its end and checks the sequence: each event is the expected
/// offset, or follows a gap notice from the expected offset to it. Returns (first, end, gaps).
async fn check(mut sub: Subscription, from: u64) -> (u64, u64, usize) {
    let mut expected = from;
    let mut gaps = 0;
    let mut pending_gap: Option<u64> = None;
    while let Some(d) = next(&mut sub).await {
        match d {
            Delivery::Gap {
                requested_offset,
                first_available_offset,
            } => {
                assert_eq!(requested_offset, expected, "gap must start where we were");
                assert!(first_available_offset > expected);
                assert!(pending_gap.is_none(), "two gap notices in a row");
                pending_gap = Some(first_available_offset);
                gaps += 1;
            }
            Delivery::Event(e) => {
                if let Some(f) = pending_gap.take() {
                    expected = f;
                }
                assert_eq!(e.offset(), expected, "hole or duplicate");
                expected += 1;
            }
        }
    }
    if let Some(f) = pending_gap {
        expected = f;
    }
    (from, expected, gaps)
}

async fn run(
    max_buffer: u64,
    producers: usize,
    per_producer: u64,
    subscribers: usize,
    apply_bytes: usize,
) {
    let dir = tempfile::tempdir().unwrap();
    let m = manager(dir.path(), apply_bytes).await;
    let (t, k) = (tenant("t"), task("stress"));
    let q = m
        .create_queue(&t, &k, with_buffer(max_buffer))
        .await
        .unwrap();
    let total = producers as u64 * per_producer;
    let mut prod = Vec::new();
    for p in 0..producers {
        let (q, t, k) = (q.clone(), t.clone(), k.clone());
        prod.push(tokio::spawn(async move {
            for i in 0..per_producer {
                if (i + p as u64).is_multiple_of(3) {
                    let batch = vec![phase(&t, &k, i), phase(&t, &k, i)];
                    q.enqueue_batch(batch).await.unwrap();
                } else {
                    q.enqueue(phase(&t, &k, i)).await.unwrap();
                }
                if i.is_multiple_of(16) {
                    tokio::task::yield_now().await;
                }
            }
        }));
    }
    let latest = Arc::new(q.clone());
    let mut subs = Vec::new();
    for s in 0..subscribers {
        let q = latest.clone();
        subs.push(tokio::spawn(async move {
            // Join at a pseudo-random moment, from a pseudo-random offset at or below latest.
            for _ in 0..(s * 7 % 13) {
                tokio::task::yield_now().await;
            }
            let now = q.latest_offset();
            let from = if s.is_multiple_of(3) {
                0
            } else {
                now.saturating_sub((s as u64 * 37) % 50)
            };
            let sub = q.subscribe(from).unwrap();
            check(sub, from).await
        }));
    }
    for p in prod {
        p.await.unwrap();
    }
    q.close().await.unwrap();
    let written = q.latest_offset();
    assert!(written >= total);
    for s in subs {
        let (from, end, _gaps) = s.await.unwrap();
        assert_eq!(
            end,
            written.max(from),
            "subscriber from {from} stopped early"
        );
    }
    m.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn capacity_two_loses_nothing_that_is_retained() {
    // Retention large enough that nothing is trimmed: no gaps allowed at all.
    let dir = tempfile::tempdir().unwrap();
    let m = manager(dir.path(), Config::default().apply_bytes).await;
    let (t, k) = (tenant("t"), task("dense"));
    let q = m.create_queue(&t, &k, with_buffer(100_000)).await.unwrap();
    let mut subs = Vec::new();
    for _ in 0..8 {
        subs.push(tokio::spawn(check(q.subscribe(0).unwrap(), 0)));
    }
    let mut prod = Vec::new();
    for _ in 0..4 {
        let (q, t, k) = (q.clone(), t.clone(), k.clone());
        prod.push(tokio::spawn(async move {
            for i in 0..200 {
                q.enqueue(phase(&t, &k, i)).await.unwrap();
            }
        }));
    }
    for p in prod {
        p.await.unwrap();
    }
    q.close().await.unwrap();
    for s in subs {
        assert_eq!(s.await.unwrap(), (0, 800, 0));
    }
    m.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn random_joiners_see_dense_sequences() {
    run(100_000, 4, 150, 24, Config::default().apply_bytes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn random_joiners_under_trimming_see_gaps_never_holes() {
    run(20, 4, 150, 24, Config::default().apply_bytes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn random_joiners_see_dense_sequences_while_batches_move_to_redb() {
    run(100_000, 4, 150, 24, 1).await;
    run(100_000, 4, 150, 24, 2000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn random_joiners_under_trimming_while_batches_move_to_redb() {
    run(20, 4, 150, 24, 1).await;
    run(20, 4, 150, 24, 2000).await;
}

/// Online compaction (which holds the database exclusively for each step) racing producers,
/// subscribers joining at random moments, and deletions whose freed pages it moves: every
/// subscriber sees the whole dense sequence, a restart finds the same bytes, and the file
/// shrinks.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn online_compaction_racing_producers_subscribers_and_deletions_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // Compaction is the embedded store's.
    let m = QueueManager::open(Config {
        broadcast_capacity: 2,
        replay_chunk: 7,
        ..super::embedded::config(dir.path())
    })
    .await
    .unwrap();
    let t = tenant("t");
    let mut victims = Vec::new();
    for v in 0..4 {
        let k = task(&format!("victim{v}"));
        let q = m.create_queue(&t, &k, with_buffer(100_000)).await.unwrap();
        for c in 0..4 {
            let batch = (0..500).map(|i| phase(&t, &k, c * 500 + i)).collect();
            q.enqueue_batch(batch).await.unwrap();
        }
        victims.push(k);
    }
    m.compact().await.unwrap();
    let peak = std::fs::metadata(dir.path().join("eventqueue.redb"))
        .unwrap()
        .len();
    let k = task("main");
    let q = m.create_queue(&t, &k, with_buffer(100_000)).await.unwrap();
    let (producers, per_producer) = (4, 300u64);
    let total = producers * per_producer;
    // One subscriber from the start keeps every event's bytes, to compare after a restart.
    let mut first = q.subscribe(0).unwrap();
    let keeper = tokio::spawn(async move {
        let mut kept = Vec::new();
        while let Some(d) = next(&mut first).await {
            match d {
                Delivery::Event(e) => {
                    assert_eq!(e.offset(), kept.len() as u64, "hole or duplicate");
                    kept.push(e.json().clone());
                }
                Delivery::Gap { .. } => panic!("nothing is trimmed: no gap"),
            }
        }
        kept
    });
    let mut prod = Vec::new();
    for _ in 0..producers {
        let (q, t, k) = (q.clone(), t.clone(), k.clone());
        prod.push(tokio::spawn(async move {
            for i in 0..per_producer {
                q.enqueue(phase(&t, &k, i)).await.unwrap();
            }
        }));
    }
    let mut subs = Vec::new();
    for s in 0..12u64 {
        let q = q.clone();
        subs.push(tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(s * 3)).await;
            let from = q.latest_offset().saturating_sub(s * 17);
            check(q.subscribe(from).unwrap(), from).await
        }));
    }
    // Deletions and compactions while all of that runs.
    let compactor = {
        let m = m.clone();
        let t = t.clone();
        tokio::spawn(async move {
            let mut steps = 0;
            for k in victims {
                assert!(m.delete_queue(&t, &k).await.unwrap());
                m.compact().await.unwrap();
                steps += 1;
                tokio::task::yield_now().await;
            }
            steps
        })
    };
    for p in prod {
        p.await.unwrap();
    }
    assert_eq!(compactor.await.unwrap(), 4);
    q.close().await.unwrap();
    assert_eq!(q.latest_offset(), total);
    for s in subs {
        let (from, end, gaps) = s.await.unwrap();
        assert_eq!((end, gaps), (total, 0), "subscriber from {from}");
    }
    let kept = keeper.await.unwrap();
    assert_eq!(kept.len() as u64, total);
    // Once the deletions are purged, a compaction gives their space back.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while m
        .metrics()
        .pending_purges
        .load(std::sync::atomic::Ordering::Relaxed)
        > 0
    {
        assert!(tokio::time::Instant::now() < deadline, "purges never ended");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let report = m.compact().await.unwrap();
    assert!(
        report.bytes_after < peak,
        "{report:?}, {peak} bytes before the deletions"
    );
    m.shutdown().await.unwrap();

    // Compaction is the embedded store's.
    let m = QueueManager::open(Config {
        broadcast_capacity: 2,
        replay_chunk: 7,
        ..super::embedded::config(dir.path())
    })
    .await
    .unwrap();
    let q = m.get_queue(&t, &k).unwrap();
    let mut sub = q.subscribe(0).unwrap();
    for (off, bytes) in kept.iter().enumerate() {
        let e = next_event(&mut sub).await;
        assert_eq!(e.offset(), off as u64);
        assert_eq!(
            e.json(),
            bytes,
            "offset {off} changed across compaction and restart"
        );
    }
    m.shutdown().await.unwrap();
}
