//! Simulated power loss at every sync of a workload (redb's crash-consistency method, applied
//! to redb and our log together): the N-th sync of the data directory never completes and
//! everything written since the previous sync is forgotten (the log may keep a torn prefix of
//! it). The directory reopened from that image must hold every acknowledged enqueue, create,
//! close, cancel and delete, with dense offsets, no duplicates, and offsets that continue.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eventqueue::{Config, Durability, PowerLoss, QueueManager, QueueOptions};

use super::*;

/// What the workload was told succeeded.
#[derive(Default, Debug, Clone)]
struct Told {
    created: BTreeSet<String>,
    closed: BTreeSet<String>,
    cancelled: BTreeSet<String>,
    deleted: BTreeSet<String>,
    /// Deletes tried: one that failed at the cut may still have reached the disk.
    delete_tried: BTreeSet<String>,
    events: BTreeMap<String, Acked>,
}

type Shared = Arc<Mutex<Told>>;

fn ack(told: &Shared, queue: &str, offset: u64, id: &str, sent: &eventqueue::Event) {
    let v = content(&sent.to_json());
    let mut told = told.lock().unwrap();
    let events = told.events.entry(queue.to_string()).or_default();
    match events.get(&offset) {
        // An idempotent retry: the first content stays.
        Some((prev_id, _)) => {
            assert_eq!(prev_id, id, "{queue}: offset {offset} acknowledged twice")
        }
        None => {
            events.insert(offset, (id.to_string(), v));
        }
    }
}

fn buffers(name: &str) -> u64 {
    match name {
        "b" => 5,
        _ => 1000,
    }
}

/// How often redb is made durable, and how much logged data is gathered before it is written
/// into redb (non-durably) in between.
#[derive(Debug, Clone, Copy)]
struct Setup {
    every: Duration,
    apply_bytes: usize,
    /// Buffered durability: only what was acknowledged before a completed `flush` must
    /// survive the cut.
    buffered: bool,
    /// Online compactions in the workload ([`QueueManager::compact`]).
    compact: bool,
}

fn config(dir: &std::path::Path, setup: Setup) -> Config {
    Config {
        cache_size_bytes: 1 << 20,
        fold_interval: setup.every,
        apply_bytes: setup.apply_bytes,
        durability: if setup.buffered {
            // Long enough that only explicit flushes sync within the workload.
            Durability::Buffered {
                flush_interval: Duration::from_secs(3600),
            }
        } else {
            Durability::Immediate
        },
        ..Config::new(dir)
    }
}

/// After each phase of the workload in buffered durability: flush, and once the flush
/// completed, remember what had been acknowledged by then as what must survive.
async fn flushed(m: &QueueManager, told: &Shared, durable: &Option<Shared>) {
    if let Some(durable) = durable {
        let snapshot = told.lock().unwrap().clone();
        if m.flush().await.is_ok() {
            *durable.lock().unwrap() = snapshot;
        }
    }
}

/// A small workload touching every kind of write. Keeps going after failures (which come only
/// after the cut); records only what was acknowledged.
async fn workload(m: &QueueManager, told: &Shared, durable: &Option<Shared>, compact: bool) {
    let t = tenant("t");
    let mut queues = BTreeMap::new();
    for name in ["a", "b", "c", "d"] {
        let opts = QueueOptions::default().with_max_buffer_size(buffers(name));
        if let Ok(q) = m.create_queue(&t, &task(name), opts).await {
            told.lock().unwrap().created.insert(name.to_string());
            queues.insert(name, q);
        }
    }
    flushed(m, told, durable).await;
    let Some(a) = queues.get("a").cloned() else {
        return;
    };
    for i in 0..6 {
        let id = format!("a-s{i}");
        let e = marked(&t, &task("a"), &id, i);
        if let Ok(off) = a.enqueue(e.clone()).await {
            ack(told, "a", off, &id, &e);
        }
    }
    if let Some(b) = queues.get("b") {
        let events: Vec<_> = (0..8)
            .map(|i| marked(&t, &task("b"), &format!("b-{i}"), i))
            .collect();
        if let Ok(offs) = b.enqueue_batch(events.clone()).await {
            for (off, e) in offs.into_iter().zip(&events) {
                ack(told, "b", off, e.event_id.as_str(), e);
            }
        }
        if b.close().await.is_ok() {
            told.lock().unwrap().closed.insert("b".into());
        }
    }
    flushed(m, told, durable).await;
    // Concurrent producers share group commits.
    let mut tasks = Vec::new();
    for p in 0..3u64 {
        let (name, q) = if p == 2 {
            ("c", queues.get("c").cloned())
        } else {
            ("a", Some(a.clone()))
        };
        let Some(q) = q else { continue };
        let (told, t) = (told.clone(), t.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..5 {
                let id = format!("{name}-p{p}-{i}");
                let e = marked(&t, &task(name), &id, i);
                if let Ok(off) = q.enqueue(e.clone()).await {
                    ack(&told, name, off, &id, &e);
                }
            }
        }));
    }
    for h in tasks {
        h.await.unwrap();
    }
    if compact {
        // Everything logged so far must reach redb durably before the log is emptied.
        let _ = m.compact().await;
    }
    flushed(m, told, durable).await;
    // An idempotent retry returns the stored offset and appends nothing.
    let e = marked(&t, &task("a"), "a-s0", 0);
    if let Ok(off) = a.enqueue(e.clone()).await {
        ack(told, "a", off, "a-s0", &e);
    }
    if let Some(c) = queues.get("c")
        && c.cancel(Some("stop")).await.is_ok()
    {
        told.lock().unwrap().cancelled.insert("c".into());
    }
    flushed(m, told, durable).await;
    if let Some(d) = queues.get("d") {
        for i in 0..3 {
            let id = format!("d-{i}");
            let e = marked(&t, &task("d"), &id, i);
            if let Ok(off) = d.enqueue(e.clone()).await {
                ack(told, "d", off, &id, &e);
            }
        }
        told.lock().unwrap().delete_tried.insert("d".into());
        if let Ok(true) = m.delete_queue(&t, &task("d")).await {
            told.lock().unwrap().deleted.insert("d".into());
        }
    }
    if compact {
        let _ = m.compact().await;
        for i in 0..3 {
            let id = format!("a-after-compact-{i}");
            let e = marked(&t, &task("a"), &id, i);
            if let Ok(off) = a.enqueue(e.clone()).await {
                ack(told, "a", off, &id, &e);
            }
        }
    }
    flushed(m, told, durable).await;
}

/// Reopens the image and checks it against what the workload was told.
async fn verify(dir: &std::path::Path, setup: Setup, told: &Told, label: &str) {
    let m = QueueManager::open(config(dir, setup))
        .await
        .unwrap_or_else(|e| panic!("{label}: the store does not open: {e}"));
    let t = tenant("t");
    for name in ["a", "b", "c", "d"] {
        let q = m.get_queue(&t, &task(name));
        if told.deleted.contains(name) {
            assert!(q.is_none(), "{label}: deleted queue {name} came back");
            continue;
        }
        let Some(q) = q else {
            assert!(
                !told.created.contains(name) || told.delete_tried.contains(name),
                "{label}: created queue {name} lost"
            );
            continue;
        };
        let stored = retained(&q).await;
        let acked = told.events.get(name).cloned().unwrap_or_default();
        let label = format!("{label} {name}");
        check_acked(
            &label,
            &acked,
            &stored,
            q.first_offset(),
            q.latest_offset(),
            buffers(name),
        );
        if told.closed.contains(name) {
            assert!(q.is_closed(), "{label}: acknowledged close lost");
        }
        if told.cancelled.contains(name) {
            assert!(q.is_cancelled(), "{label}: acknowledged cancel lost");
        }
        if !q.is_closed() {
            let latest = q.latest_offset();
            let e = marked(&t, &task(name), &format!("{name}-after"), 0);
            assert_eq!(
                q.enqueue(e).await.unwrap(),
                latest,
                "{label}: offsets do not continue"
            );
        }
    }
    m.shutdown().await.unwrap();
}

/// One run: cut at sync `cut` (never if `None`), keep `torn` bytes of the log's unsynced tail.
/// Returns the number of syncs the run attempted.
async fn run(cut: Option<u64>, torn: u64, setup: Setup) -> u64 {
    let dir = tempfile::tempdir().unwrap();
    let power = PowerLoss::new();
    if let Some(n) = cut {
        power.cut_at_sync(n);
    }
    let told: Shared = Arc::default();
    let durable: Option<Shared> = setup.buffered.then(Arc::default);
    let label = format!("cut at sync {cut:?} ({setup:?}, torn tail {torn})");
    match QueueManager::open_with_power_loss(config(dir.path(), setup), power.clone()).await {
        Ok(m) => {
            workload(&m, &told, &durable, setup.compact).await;
            if !power.is_cut() {
                // Nothing failed yet: the power goes off after the workload.
                power.cut_now();
            }
            let _ = m.shutdown().await;
        }
        // The cut hit the open itself: nothing was acknowledged.
        Err(e) => assert!(power.is_cut(), "{label}: open failed without a cut: {e}"),
    }
    let syncs = power.syncs();
    power.settle(dir.path(), torn).unwrap();
    let mut told = std::mem::take(&mut *told.lock().unwrap());
    if let Some(durable) = durable {
        // Only what a completed flush covered must be there; a delete tried later may have
        // reached the disk all the same.
        let tried = std::mem::take(&mut told.delete_tried);
        told = std::mem::take(&mut *durable.lock().unwrap());
        told.delete_tried = tried;
    }
    verify(dir.path(), setup, &told, &label).await;
    syncs
}

async fn sweep(setup: Setup) {
    let total = run(None, 0, setup).await;
    eprintln!("power-loss sweep: {total} syncs in the dry run ({setup:?})");
    assert!(total > 10, "the workload synced only {total} times");
    let mut rng = fastrand::Rng::with_seed(total);
    // Batching varies between runs, so sweep a little past the dry run's count.
    for n in 1..=total + 5 {
        let torn = if n % 2 == 0 { 0 } else { rng.u64(0..2048) };
        run(Some(n), torn, setup).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_loss_at_every_sync_with_a_checkpoint_after_each_batch() {
    sweep(Setup {
        every: Duration::ZERO,
        apply_bytes: Config::default().apply_bytes,
        buffered: false,
        compact: false,
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_loss_at_every_sync_with_everything_in_the_log() {
    sweep(Setup {
        every: Duration::from_secs(3600),
        apply_bytes: Config::default().apply_bytes,
        buffered: false,
        compact: false,
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_loss_at_every_sync_with_batches_written_into_redb_between_checkpoints() {
    // Every batch goes into redb right after it is logged, non-durably: a cut loses redb's
    // unsynced pages, and recovery must rebuild them from the log.
    sweep(Setup {
        every: Duration::from_secs(3600),
        apply_bytes: 1,
        buffered: false,
        compact: false,
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_loss_at_every_sync_in_buffered_durability_keeps_what_was_flushed() {
    for (every, apply_bytes) in [(Duration::ZERO, 1), (Duration::from_secs(3600), 1 << 20)] {
        sweep(Setup {
            every,
            apply_bytes,
            buffered: true,
            compact: false,
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_loss_at_every_sync_around_online_compactions() {
    // Batches reach redb only non-durably until a compaction checkpoints them and empties the
    // log; a cut anywhere in or after a compaction must lose nothing acknowledged.
    sweep(Setup {
        every: Duration::from_secs(3600),
        apply_bytes: 1,
        buffered: false,
        compact: true,
    })
    .await;
}
