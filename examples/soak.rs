//! Soak: a mixed workload against one store for a while, with a checker on every subscriber.
//!
//! ```text
//! cargo run --release --example soak -- [seconds=120]
//! ```
//!
//! - producers each run one task at a time: create a queue (random `max_buffer_size`, 2 s TTL),
//!   append single events and batches, then finish it (`complete`), or get it cancelled by a
//!   canceller and finish it with `status: cancelled`, and move on to a new queue;
//! - the cleanup loop expires finished queues 2 s after their last event;
//! - subscribers join every few milliseconds at a random offset of a random queue, read
//!   quickly or slowly (lagging the live channel, falling behind trimming), and leave early or
//!   at the end of the stream;
//! - the checker verifies each subscriber's sequence: offsets consecutive except right after a
//!   gap notice that names exactly the skipped range, and each event's id is the one its
//!   producer gave the event at that offset;
//! - every 5 s: RSS, database and log file sizes, queues, events, deliveries, gaps.
//!
//! Exits non-zero on any violation.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use eventqueue::{
    CompleteEvent, Config, Delivery, Event, EventId, ProgressEvent, QueueManager, QueueOptions,
    StatusEvent, TaskId, TaskState, TenantId,
};

#[derive(Default)]
struct Stats {
    appended: AtomicU64,
    queues: AtomicU64,
    cancelled: AtomicU64,
    subscribers: AtomicU64,
    active: AtomicU64,
    deliveries: AtomicU64,
    gaps: AtomicU64,
    ended: AtomicU64,
    violations: AtomicU64,
}

fn rss_mib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .unwrap_or(0)
        / 1024
}

fn size_mib(path: &std::path::Path) -> f64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0) as f64 / (1 << 20) as f64
}

/// Event `seq` of queue `name`: its id names the queue and its offset (one producer per queue,
/// sequential, so offset == seq).
fn event(t: &TenantId, k: &TaskId, seq: u64) -> Event {
    Event::new(
        t,
        k,
        ProgressEvent::new(seq, seq + 1)
            .step(format!("s{seq}"))
            .details(serde_json::json!({"pad": "x".repeat((seq % 5) as usize * 100)})),
    )
    .with_event_id(EventId::new(format!("{k}-{seq}")).unwrap())
}

async fn producer(m: QueueManager, p: u64, stop: Arc<AtomicBool>, stats: Arc<Stats>) {
    let t = TenantId::new("soak").unwrap();
    let mut rng = fastrand::Rng::with_seed(p);
    for round in 0u64.. {
        if stop.load(Relaxed) {
            return;
        }
        let k = TaskId::new(format!("p{p}-r{round}")).unwrap();
        let opts = QueueOptions::default()
            .with_max_buffer_size(rng.u64(50..2000))
            .with_ttl(Duration::from_secs(2));
        let q = m.create_queue(&t, &k, opts).await.expect("create");
        stats.queues.fetch_add(1, Relaxed);
        let mut seq = 0u64;
        let len = rng.u64(100..3000);
        while seq < len && !q.is_cancelled() && !stop.load(Relaxed) {
            if rng.u8(..4) == 0 {
                let n = rng.u64(2..50).min(len - seq);
                let batch = (seq..seq + n).map(|s| event(&t, &k, s)).collect();
                let offs = q.enqueue_batch(batch).await.expect("enqueue batch");
                assert_eq!(offs, (seq..seq + n).collect::<Vec<_>>());
                seq += n;
                stats.appended.fetch_add(n, Relaxed);
            } else {
                assert_eq!(q.enqueue(event(&t, &k, seq)).await.expect("enqueue"), seq);
                seq += 1;
                stats.appended.fetch_add(1, Relaxed);
            }
            if rng.u8(..20) == 0 {
                tokio::time::sleep(Duration::from_millis(rng.u64(1..5))).await;
            }
        }
        let last = if q.is_cancelled() {
            stats.cancelled.fetch_add(1, Relaxed);
            Event::new(&t, &k, StatusEvent::new(TaskState::Cancelled))
        } else {
            Event::new(&t, &k, CompleteEvent::new(serde_json::json!({"n": seq})))
        }
        .with_event_id(EventId::new(format!("{k}-{seq}")).unwrap());
        assert_eq!(q.enqueue(last).await.expect("terminal"), seq);
    }
}

async fn canceller(m: QueueManager, stop: Arc<AtomicBool>) {
    let t = TenantId::new("soak").unwrap();
    let mut rng = fastrand::Rng::with_seed(99);
    while !stop.load(Relaxed) {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let queues = m.list_queues(Some(&t));
        if queues.is_empty() {
            continue;
        }
        let info = &queues[rng.usize(..queues.len())];
        // A finished task refuses cancellation; a vanished one reports false.
        let _ = m.cancel_task(&t, &info.task_id, Some("soak")).await;
    }
}

async fn subscriber(m: QueueManager, seed: u64, stats: Arc<Stats>) {
    let t = TenantId::new("soak").unwrap();
    let mut rng = fastrand::Rng::with_seed(seed);
    let queues = m.list_queues(Some(&t));
    if queues.is_empty() {
        return;
    }
    let info = &queues[rng.usize(..queues.len())];
    let Some(q) = m.get_queue(&t, &info.task_id) else {
        return;
    };
    let latest = q.latest_offset();
    let from = match rng.u8(..3) {
        0 => 0,
        1 => latest,
        _ => rng.u64(0..=latest),
    };
    let Ok(mut sub) = q.subscribe(from) else {
        return;
    };
    stats.subscribers.fetch_add(1, Relaxed);
    stats.active.fetch_add(1, Relaxed);
    let slow = rng.u8(..4) == 0;
    let budget = rng.u64(10..5000);
    let mut next = from;
    let k = info.task_id.clone();
    for _ in 0..budget {
        let item = match tokio::time::timeout(Duration::from_secs(30), sub.next()).await {
            Ok(item) => item,
            Err(_) => {
                eprintln!("VIOLATION: subscriber of {k} stalled at {next}");
                stats.violations.fetch_add(1, Relaxed);
                break;
            }
        };
        match item {
            None => {
                stats.ended.fetch_add(1, Relaxed);
                break;
            }
            Some(Err(_)) => break,
            Some(Ok(Delivery::Gap {
                requested_offset,
                first_available_offset,
            })) => {
                stats.gaps.fetch_add(1, Relaxed);
                if requested_offset != next || first_available_offset <= next {
                    eprintln!(
                        "VIOLATION: {k}: gap {requested_offset}..{first_available_offset} at {next}"
                    );
                    stats.violations.fetch_add(1, Relaxed);
                }
                next = first_available_offset;
            }
            Some(Ok(Delivery::Event(e))) => {
                stats.deliveries.fetch_add(1, Relaxed);
                let id = e
                    .event()
                    .map(|ev| ev.event_id.to_string())
                    .unwrap_or_default();
                if e.offset() != next || id != format!("{k}-{next}") {
                    eprintln!(
                        "VIOLATION: {k}: expected offset {next}, got {} ({id})",
                        e.offset()
                    );
                    stats.violations.fetch_add(1, Relaxed);
                }
                next = e.offset() + 1;
                if slow {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
        }
    }
    stats.active.fetch_sub(1, Relaxed);
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let secs: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(120);
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        cache_size_bytes: 32 << 20,
        ..Config::new(dir.path())
    };
    let m = QueueManager::open(config).await.unwrap();
    m.start_cleanup_loop(Duration::from_millis(500));
    let stop = Arc::new(AtomicBool::new(false));
    let stats = Arc::new(Stats::default());
    let mut tasks = Vec::new();
    for p in 0..4 {
        tasks.push(tokio::spawn(producer(
            m.clone(),
            p,
            stop.clone(),
            stats.clone(),
        )));
    }
    tasks.push(tokio::spawn(canceller(m.clone(), stop.clone())));
    {
        let (m, stop, stats) = (m.clone(), stop.clone(), stats.clone());
        tasks.push(tokio::spawn(async move {
            let mut subs = tokio::task::JoinSet::new();
            for seed in 0u64.. {
                if stop.load(Relaxed) {
                    break;
                }
                subs.spawn(subscriber(m.clone(), seed, stats.clone()));
                while subs.try_join_next().is_some() {}
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            while subs.join_next().await.is_some() {}
        }));
    }
    let started = Instant::now();
    println!(
        "| t (s) | RSS (MiB) | db (MiB) | log (MiB) | live queues | queues made | events | subscribers (active) | deliveries | gaps | violations |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    while started.elapsed() < Duration::from_secs(secs) {
        tokio::time::sleep(Duration::from_secs(5)).await;
        println!(
            "| {} | {} | {:.1} | {:.1} | {} | {} | {} | {} ({}) | {} | {} | {} |",
            started.elapsed().as_secs(),
            rss_mib(),
            size_mib(&dir.path().join(eventqueue::DB_FILE)),
            size_mib(&dir.path().join("eventqueue.wal")),
            m.list_queues(None).len(),
            stats.queues.load(Relaxed),
            stats.appended.load(Relaxed),
            stats.subscribers.load(Relaxed),
            stats.active.load(Relaxed),
            stats.deliveries.load(Relaxed),
            stats.gaps.load(Relaxed),
            stats.violations.load(Relaxed),
        );
    }
    stop.store(true, Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    m.shutdown().await.unwrap();
    let v = stats.violations.load(Relaxed);
    println!(
        "soak: {} s, {} queues ({} cancelled), {} events, {} subscribers ({} reached the end), \
         {} deliveries, {} gap notices, {v} violations",
        started.elapsed().as_secs(),
        stats.queues.load(Relaxed),
        stats.cancelled.load(Relaxed),
        stats.appended.load(Relaxed),
        stats.subscribers.load(Relaxed),
        stats.ended.load(Relaxed),
        stats.deliveries.load(Relaxed),
        stats.gaps.load(Relaxed),
    );
    if v > 0 {
        std::process::exit(1);
    }
}
