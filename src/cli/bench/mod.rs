//! `eventqueue bench`: measures this machine's disk and CPU through the library, with a raw
//! append + fdatasync floor measured in the same run as the baseline.
//!
//! Every figure is a ratio-friendly pair: the raw floor and what eventqueue achieves on the
//! same disk at the same moment (the host may throttle the disk; compare within one run).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

pub mod http;
pub use http::{HttpEnqueueFigures, HttpFanoutFigures};

use crate::{
    Config, Delivery, Durability, Event, ProgressEvent, QueueManager, QueueOptions, TaskId,
    TenantId,
};

/// Called as each step starts: its number (from 1), the number of steps, a short description.
pub type Progress = Arc<dyn Fn(usize, usize, &str) + Send + Sync>;

/// What to run.
#[derive(Clone, Default)]
pub struct BenchOptions {
    /// Directory on the disk to measure; a temporary directory inside it is used and removed.
    pub data_dir: Option<PathBuf>,
    /// The store to measure (default: the embedded one, in `data_dir`). The raw fdatasync
    /// floor is always measured on `data_dir`'s disk.
    pub storage: crate::StorageBackend,
    /// Smaller sizes, for a run under a minute.
    pub quick: bool,
    /// Called with a short description as each step starts.
    pub progress: Option<Progress>,
    /// Run only the steps whose name contains one of these comma-separated words (steps:
    /// `raw`, `sequential`, `appends-immediate`, `appends-buffered`, `replay`, `fanout`,
    /// `reopen`, `idle`, `sweep`, `churn`, `http-enqueue`, `http-replay`, `http-fanout`).
    /// A word matches every step whose name contains it: `http` runs the three HTTP steps.
    /// An append step's measurements are named `<step>-<producers>`, so
    /// `appends-immediate-64` runs only that one.
    pub only: Option<String>,
    /// Seconds of the churn step (default 30; 5 with `quick`).
    pub churn_secs: Option<u64>,
    /// Queues the append steps spread their producers over (default 100).
    pub streams: Option<usize>,
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Latency {
    /// Median.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
}

impl Latency {
    fn of(mut samples: Vec<Duration>) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        samples.sort_unstable();
        let at = |q: f64| {
            let i = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1;
            samples[i].as_secs_f64() * 1e3
        };
        Self {
            p50_ms: at(0.50),
            p99_ms: at(0.99),
        }
    }
}

/// Durable appends with a number of concurrent producers, each with one enqueue in flight.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AppendFigures {
    /// Concurrent producers.
    pub producers: usize,
    /// `immediate` or `buffered`.
    pub durability: &'static str,
    /// Acknowledged events per second.
    pub events_per_sec: f64,
    /// Enqueue → acknowledgement.
    pub ack: Latency,
    /// Average events per commit.
    pub avg_batch: f64,
}

/// Fan-out figures.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FanoutFigures {
    /// Subscribers of the one queue.
    pub subscribers: usize,
    /// Events published, at 1000 events/s.
    pub events: u64,
    /// Deliveries missing at the end (must be 0).
    pub lost: u64,
    /// Enqueue start → delivery to a subscriber (includes the commit).
    pub latency: Latency,
}

/// Reopen figures.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ReopenFigures {
    /// Events stored.
    pub events: u64,
    /// Queues they are spread over.
    pub queues: u64,
    /// Time to reopen after a clean shutdown, ms.
    pub reopen_ms: f64,
}

/// The whole report (`--json` prints it as one object; skipped steps are `null`).
#[derive(Debug, Clone, Serialize, PartialEq, Default)]
pub struct BenchReport {
    /// Where it ran.
    pub data_dir: String,
    /// The store measured (`redb`, `memory`, `redis`).
    pub storage: String,
    /// Quick mode.
    pub quick: bool,
    /// 300-byte append + fdatasync on a plain file: the disk's floor.
    pub raw_fdatasync: Option<Latency>,
    /// One producer, sequential enqueues.
    pub sequential_ack: Option<Latency>,
    /// Sequential ack p50 divided by raw fdatasync p50.
    pub sequential_vs_raw_p50: Option<f64>,
    /// Concurrent producers, immediate and buffered durability.
    pub appends: Vec<AppendFigures>,
    /// Events replayed.
    pub replay_events: Option<u64>,
    /// Replay rate from the log (events/s).
    pub replay_events_per_sec: Option<f64>,
    /// In-process fan-out.
    pub fanout: Option<FanoutFigures>,
    /// Reopen after a clean shutdown.
    pub reopen: Option<ReopenFigures>,
    /// Idle queues created for the memory figure.
    pub idle_queues: Option<u64>,
    /// Resident memory added by them, MB (Linux only; 0 elsewhere).
    pub idle_queues_rss_mb: Option<f64>,
    /// Producer latency while an expiry sweep removes many events.
    pub sweep: Option<SweepFigures>,
    /// File size under steady churn.
    pub churn: Option<ChurnFigures>,
    /// Loopback HTTP enqueues (1 client × 1 event, 8 clients × 16 events per request).
    pub http_enqueue: Vec<HttpEnqueueFigures>,
    /// Events replayed over SSE to one client.
    pub http_replay_events: Option<u64>,
    /// SSE replay rate to one client (events/s).
    pub http_replay_events_per_sec: Option<f64>,
    /// Loopback SSE fan-out to 100 and 1000 clients.
    pub http_fanout: Vec<HttpFanoutFigures>,
}

/// An expiry sweep racing producers.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SweepFigures {
    /// Queues expired by the sweep.
    pub queues: u64,
    /// Events they held.
    pub events: u64,
    /// Concurrent producers (one enqueue in flight each).
    pub producers: usize,
    /// Producer acks with no sweep running.
    pub ack_without_sweep: Latency,
    /// Producer acks while the sweep and its purge ran.
    pub ack_during_sweep: Latency,
    /// Time until the sweep's events were all removed, ms.
    pub sweep_ms: f64,
}

/// Steady churn: queues written, then deleted, continuously.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ChurnFigures {
    /// Seconds the churn ran.
    pub seconds: u64,
    /// Events written (and removed again).
    pub events: u64,
    /// File size in MB, sampled once per tenth of the run.
    pub file_mb: Vec<f64>,
}

fn tenant() -> TenantId {
    TenantId::default_tenant()
}

fn task(name: String) -> crate::Result<TaskId> {
    TaskId::new(name)
}

/// ~300 bytes of JSON, like a typical progress event.
fn event(t: &TenantId, k: &TaskId, n: u64) -> Event {
    Event::new(
        t,
        k,
        ProgressEvent::new(n % 100, 100)
            .step("processing_video")
            .details(serde_json::json!({"video": "sample_video_0001.mp4", "stage": "embedding", "pad": "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"})),
    )
}

tokio::task_local! {
    /// The store the steps of one [`run`] measure ([`BenchOptions::storage`]).
    static STORAGE: crate::StorageBackend;
}

/// A step's configuration on `dir`, on the store under measurement (a Redis store gets a key
/// prefix of its own per step directory, so steps never see each other's queues).
fn bench_config(dir: &Path, durability: Durability) -> Config {
    let storage = STORAGE.try_with(|s| s.clone()).unwrap_or_default();
    let storage = match storage {
        crate::StorageBackend::Redis { url, prefix } => crate::StorageBackend::Redis {
            url,
            prefix: format!("{prefix}bench:{}:", dir.display()),
        },
        other => other,
    };
    Config {
        durability,
        max_buffer_size: 10_000_000,
        storage,
        ..Config::new(dir)
    }
}

/// Runs every measurement.
///
/// # Errors
///
/// Any storage error on the measured disk.
pub async fn run(opts: BenchOptions) -> crate::Result<BenchReport> {
    let storage = opts.storage.clone();
    STORAGE.scope(storage, run_steps(opts)).await
}

async fn run_steps(opts: BenchOptions) -> crate::Result<BenchReport> {
    let base = match &opts.data_dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir(),
    };
    std::fs::create_dir_all(&base).map_err(crate::Error::storage)?;
    let root = tempfile::Builder::new()
        .prefix("eventqueue-bench-")
        .tempdir_in(&base)
        .map_err(crate::Error::storage)?;
    let q = opts.quick;
    let step = |name: &str| root.path().join(name);

    let streams = opts.streams.unwrap_or(100).max(1);
    let want = |name: &str| {
        opts.only.as_deref().is_none_or(|o| {
            o.split(',')
                .any(|w| !w.is_empty() && name.contains(w.trim()))
        })
    };
    let total: usize = STEPS
        .iter()
        .filter(|(name, _)| want(name))
        .map(|(_, parts)| parts)
        .sum();
    let started = std::sync::atomic::AtomicUsize::new(0);
    let say = |s: &str| {
        let n = started.fetch_add(1, Ordering::Relaxed) + 1;
        if let Some(p) = &opts.progress {
            p(n, total, s)
        }
    };
    let mut report = BenchReport {
        data_dir: base.display().to_string(),
        storage: STORAGE
            .try_with(|s| s.name().to_string())
            .unwrap_or_default(),
        quick: q,
        ..BenchReport::default()
    };

    if want("raw") {
        say("raw append + fdatasync");
        report.raw_fdatasync = Some(raw_floor(step("raw"), if q { 500 } else { 2000 }).await?);
    }
    if want("sequential") {
        say("sequential enqueue (1 producer)");
        let n = if q { 500 } else { 2000 };
        let seq = appends(step("seq"), 1, n, Durability::Immediate, 1).await?;
        report.sequential_ack = Some(seq.ack);
        if let Some(raw) = report.raw_fdatasync.filter(|r| r.p50_ms > 0.0) {
            report.sequential_vs_raw_p50 = Some(seq.ack.p50_ms / raw.p50_ms);
        }
    }
    for (name, durability, counts) in [
        (
            "appends-immediate",
            Durability::Immediate,
            &[1usize, 8, 64, 256][..],
        ),
        (
            "appends-buffered",
            Durability::buffered(),
            &[1usize, 64][..],
        ),
    ] {
        if !counts.iter().any(|p| want(&format!("{name}-{p}"))) {
            continue;
        }
        for &producers in counts {
            // `--only appends-immediate-64` runs one count of the step.
            if !want(&format!("{name}-{producers}")) {
                continue;
            }
            say(&format!("{name}, {producers} producers"));
            let per = (if q { 3000 } else { 20_000 }) / producers + 20;
            let dir = step(&format!("{name}-{producers}"));
            report
                .appends
                .push(appends(dir, producers, per, durability, streams).await?);
        }
    }
    if want("replay") {
        let n = if q { 100_000 } else { 1_000_000 };
        say(&format!("replay of {n} events"));
        report.replay_events_per_sec = Some(replay(step("replay"), n).await?);
        report.replay_events = Some(n);
    }
    if want("fanout") {
        let (subs, n) = if q { (1000, 1000) } else { (1000, 5000) };
        say(&format!("fan-out to {subs} subscribers at 1000 events/s"));
        let (lost, latency) = fanout(step("fanout"), subs, n).await?;
        report.fanout = Some(FanoutFigures {
            subscribers: subs,
            events: n,
            lost,
            latency,
        });
    }
    // A store that keeps nothing across a reopen has no reopen to measure.
    if want("reopen") && opts.storage.persists() {
        let (events, queues) = if q {
            (100_000, 1000)
        } else {
            (1_000_000, 10_000)
        };
        say(&format!("reopen with {events} events in {queues} queues"));
        let reopen_ms = reopen(step("reopen"), events, queues).await?;
        report.reopen = Some(ReopenFigures {
            events,
            queues,
            reopen_ms,
        });
    }
    if want("idle") {
        say("10k idle queues");
        report.idle_queues = Some(10_000);
        report.idle_queues_rss_mb = Some(idle_rss(step("idle"), 10_000).await?);
    }
    if want("sweep") {
        let (queues, per) = if q { (1000, 100) } else { (10_000, 100) };
        say(&format!(
            "expiry sweep of {} events in {queues} queues, 8 producers",
            queues * per
        ));
        report.sweep = Some(sweep(step("sweep"), queues, per, 8).await?);
    }
    if want("churn") {
        let secs = opts.churn_secs.unwrap_or(if q { 5 } else { 30 });
        say(&format!("churn for {secs} s"));
        report.churn = Some(churn(step("churn"), secs).await?);
    }
    if want("http-enqueue") {
        let events = if q { 3000 } else { 40_000 };
        for (clients, batch) in [(1usize, 1usize), (8, 16)] {
            say(&format!(
                "HTTP enqueue, {clients} clients × {batch} events per request"
            ));
            let per_client = (events / (clients * batch)).max(20);
            let dir = step(&format!("http-enqueue-{clients}x{batch}"));
            report
                .http_enqueue
                .push(http::enqueue(&dir, clients, batch, per_client, streams).await?);
        }
    }
    if want("http-replay") {
        let n = if q { 20_000 } else { 100_000 };
        say(&format!("SSE replay of {n} events to one client"));
        report.http_replay_events_per_sec = Some(http::replay(&step("http-replay"), n).await?);
        report.http_replay_events = Some(n);
    }
    if want("http-fanout") {
        let n = if q { 1000 } else { 5000 };
        for clients in [100usize, 1000] {
            say(&format!(
                "SSE fan-out to {clients} clients at 1000 events/s"
            ));
            let dir = step(&format!("http-fanout-{clients}"));
            report
                .http_fanout
                .push(http::fanout(&dir, clients, n).await?);
        }
    }
    Ok(report)
}

/// Every step in the order it runs, with the number of measurements it makes.
const STEPS: [(&str, usize); 13] = [
    ("raw", 1),
    ("sequential", 1),
    ("appends-immediate", 4),
    ("appends-buffered", 2),
    ("replay", 1),
    ("fanout", 1),
    ("reopen", 1),
    ("idle", 1),
    ("sweep", 1),
    ("churn", 1),
    ("http-enqueue", 2),
    ("http-replay", 1),
    ("http-fanout", 2),
];

async fn raw_floor(dir: PathBuf, n: usize) -> crate::Result<Latency> {
    tokio::task::spawn_blocking(move || -> crate::Result<Latency> {
        std::fs::create_dir_all(&dir).map_err(crate::Error::storage)?;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("raw.log"))
            .map_err(crate::Error::storage)?;
        let rec = [b'x'; 300];
        let mut samples = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            f.write_all(&rec).map_err(crate::Error::storage)?;
            f.sync_data().map_err(crate::Error::storage)?;
            samples.push(t.elapsed());
        }
        Ok(Latency::of(samples))
    })
    .await
    .map_err(crate::Error::storage)?
}

async fn appends(
    dir: PathBuf,
    producers: usize,
    per_producer: usize,
    durability: Durability,
    streams: usize,
) -> crate::Result<AppendFigures> {
    let m = QueueManager::open(bench_config(&dir, durability)).await?;
    let t = tenant();
    let mut queues = Vec::new();
    // 100 streams, as in the comparison workloads; producers spread over them.
    for i in 0..producers.min(streams) {
        let k = task(format!("stream-{i}"))?;
        queues.push(m.create_queue(&t, &k, QueueOptions::default()).await?);
    }
    let (appended0, commits0) = (
        m.metrics().events_appended.load(Ordering::Relaxed),
        m.metrics().commits.load(Ordering::Relaxed),
    );
    let start = Instant::now();
    let mut handles = Vec::new();
    for p in 0..producers {
        let q = queues[p % queues.len()].clone();
        let t = t.clone();
        handles.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(per_producer);
            for n in 0..per_producer {
                let e = event(&t, q.task_id(), n as u64);
                let s = Instant::now();
                q.enqueue(e).await?;
                lat.push(s.elapsed());
            }
            crate::Result::Ok(lat)
        }));
    }
    let mut all = Vec::new();
    for h in handles {
        all.extend(h.await.map_err(crate::Error::storage)??);
    }
    let elapsed = start.elapsed().as_secs_f64();
    let appended = m.metrics().events_appended.load(Ordering::Relaxed) - appended0;
    let commits = (m.metrics().commits.load(Ordering::Relaxed) - commits0).max(1);
    m.shutdown().await?;
    Ok(AppendFigures {
        producers,
        durability: match durability {
            Durability::Immediate => "immediate",
            Durability::Buffered { .. } => "buffered",
        },
        events_per_sec: all.len() as f64 / elapsed,
        ack: Latency::of(all),
        avg_batch: appended as f64 / commits as f64,
    })
}

async fn replay(dir: PathBuf, n: u64) -> crate::Result<f64> {
    let m = QueueManager::open(bench_config(&dir, Durability::Immediate)).await?;
    let t = tenant();
    let k = task("replay".into())?;
    let q = m.create_queue(&t, &k, QueueOptions::default()).await?;
    let mut written = 0;
    while written < n {
        let batch: Vec<Event> = (0..1000.min(n - written))
            .map(|i| event(&t, &k, i))
            .collect();
        written += batch.len() as u64;
        q.enqueue_batch(batch).await?;
    }
    let mut sub = q.subscribe(0)?;
    let start = Instant::now();
    let mut got = 0;
    while got < n {
        match sub.next().await {
            Some(Ok(Delivery::Event(_))) => got += 1,
            Some(Ok(Delivery::Gap { .. })) => {}
            Some(Err(e)) => return Err(e),
            None => break,
        }
    }
    let rate = got as f64 / start.elapsed().as_secs_f64();
    drop(sub);
    m.shutdown().await?;
    Ok(rate)
}

async fn fanout(dir: PathBuf, subscribers: usize, n: u64) -> crate::Result<(u64, Latency)> {
    let m = QueueManager::open(bench_config(&dir, Durability::Immediate)).await?;
    let t = tenant();
    let k = task("fanout".into())?;
    let q = m.create_queue(&t, &k, QueueOptions::default()).await?;
    let origin = Instant::now();
    let sent: Arc<Vec<AtomicU64>> = Arc::new((0..n).map(|_| AtomicU64::new(0)).collect());
    let mut subs = Vec::new();
    for _ in 0..subscribers {
        let mut sub = q.subscribe(0)?;
        let sent = sent.clone();
        subs.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(n as usize);
            let mut got = 0u64;
            while got < n {
                match sub.next().await {
                    Some(Ok(Delivery::Event(e))) => {
                        let now = origin.elapsed().as_nanos() as u64;
                        let at = sent[e.offset() as usize].load(Ordering::Acquire);
                        lat.push(Duration::from_nanos(now.saturating_sub(at)));
                        got += 1;
                    }
                    Some(Ok(Delivery::Gap { .. })) => {}
                    _ => break,
                }
            }
            (got, lat)
        }));
    }
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for i in 0..n {
        tick.tick().await;
        sent[i as usize].store(origin.elapsed().as_nanos() as u64, Ordering::Release);
        q.enqueue(event(&t, &k, i)).await?;
    }
    let mut lost = 0;
    let mut all = Vec::new();
    for s in subs {
        let (got, lat) = s.await.map_err(crate::Error::storage)?;
        lost += n - got;
        all.extend(lat);
    }
    m.shutdown().await?;
    Ok((lost, Latency::of(all)))
}

async fn reopen(dir: PathBuf, events: u64, queues: u64) -> crate::Result<f64> {
    {
        let m = QueueManager::open(bench_config(&dir, Durability::Immediate)).await?;
        let t = tenant();
        let per = events / queues;
        let mut handles = Vec::new();
        for w in 0..16u64 {
            let (m, t) = (m.clone(), t.clone());
            handles.push(tokio::spawn(async move {
                let mut i = w;
                while i < queues {
                    let k = task(format!("q-{i}"))?;
                    let q = m.create_queue(&t, &k, QueueOptions::default()).await?;
                    let batch = (0..per).map(|n| event(&t, &k, n)).collect();
                    q.enqueue_batch(batch).await?;
                    i += 16;
                }
                crate::Result::Ok(())
            }));
        }
        for h in handles {
            h.await.map_err(crate::Error::storage)??;
        }
        m.shutdown().await?;
    }
    let start = Instant::now();
    let m = QueueManager::open(bench_config(&dir, Durability::Immediate)).await?;
    let ms = start.elapsed().as_secs_f64() * 1e3;
    if m.list_queues(None).len() as u64 != queues {
        return Err(crate::Error::storage("reopen lost queues"));
    }
    m.shutdown().await?;
    Ok(ms)
}

/// Runs `producers` sequential producers until `stop`, returning their ack latencies.
async fn produce_until(
    m: &QueueManager,
    producers: usize,
    stop: tokio_util::sync::CancellationToken,
) -> crate::Result<Vec<Duration>> {
    let t = tenant();
    let mut handles = Vec::new();
    for p in 0..producers {
        let k = task(format!("producer-{p}"))?;
        let q = m
            .get_or_create_queue(
                &t,
                &k,
                QueueOptions::default().with_ttl(Duration::from_secs(86_400)),
            )
            .await?;
        let (t, stop) = (t.clone(), stop.clone());
        handles.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut n = 0;
            while !stop.is_cancelled() {
                let e = event(&t, q.task_id(), n);
                let s = Instant::now();
                q.enqueue(e).await?;
                lat.push(s.elapsed());
                n += 1;
            }
            crate::Result::Ok(lat)
        }));
    }
    let mut all = Vec::new();
    for h in handles {
        all.extend(h.await.map_err(crate::Error::storage)??);
    }
    Ok(all)
}

async fn sweep(
    dir: PathBuf,
    queues: u64,
    per: u64,
    producers: usize,
) -> crate::Result<SweepFigures> {
    let m = QueueManager::open(bench_config(&dir, Durability::Immediate)).await?;
    let t = tenant();
    let mut handles = Vec::new();
    for w in 0..16u64 {
        let (m, t) = (m.clone(), t.clone());
        handles.push(tokio::spawn(async move {
            let mut i = w;
            while i < queues {
                let k = task(format!("old-{i}"))?;
                let opts = QueueOptions::default().with_ttl(Duration::from_secs(60));
                let q = m.create_queue(&t, &k, opts).await?;
                q.enqueue_batch((0..per).map(|n| event(&t, &k, n)).collect())
                    .await?;
                i += 16;
            }
            crate::Result::Ok(())
        }));
    }
    for h in handles {
        h.await.map_err(crate::Error::storage)??;
    }
    // Baseline: producers alone.
    let stop = tokio_util::sync::CancellationToken::new();
    let timer = {
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            stop.cancel();
        })
    };
    let without = produce_until(&m, producers, stop).await?;
    let _ = timer.await;
    // The same producers while every old queue expires and is purged.
    let stop = tokio_util::sync::CancellationToken::new();
    let during = {
        let (m2, stop2) = (m.clone(), stop.clone());
        let producing = tokio::spawn(async move { produce_until(&m2, producers, stop2).await });
        let started = Instant::now();
        let later = crate::Timestamp::now().saturating_add(Duration::from_secs(3600));
        m.expire_once(later).await?;
        while m.metrics().pending_purges.load(Ordering::Relaxed) > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let sweep_ms = started.elapsed().as_secs_f64() * 1e3;
        stop.cancel();
        let lat = producing.await.map_err(crate::Error::storage)??;
        (lat, sweep_ms)
    };
    m.shutdown().await?;
    Ok(SweepFigures {
        queues,
        events: queues * per,
        producers,
        ack_without_sweep: Latency::of(without),
        ack_during_sweep: Latency::of(during.0),
        sweep_ms: during.1,
    })
}

async fn churn(dir: PathBuf, secs: u64) -> crate::Result<ChurnFigures> {
    let m = QueueManager::open(bench_config(&dir, Durability::Immediate)).await?;
    let t = tenant();
    let started = Instant::now();
    let total = Duration::from_secs(secs);
    let mut samples = Vec::new();
    let mut next_sample = Duration::ZERO;
    let mut events = 0u64;
    let mut i = 0u64;
    let live = 20;
    while started.elapsed() < total {
        let k = task(format!("churn-{i}"))?;
        let q = m.create_queue(&t, &k, QueueOptions::default()).await?;
        q.enqueue_batch((0..200).map(|n| event(&t, &k, n)).collect())
            .await?;
        events += 200;
        if i >= live {
            m.delete_queue(&t, &task(format!("churn-{}", i - live))?)
                .await?;
        }
        i += 1;
        if started.elapsed() >= next_sample {
            samples.push(m.store_size_bytes() as f64 / (1 << 20) as f64);
            next_sample += total / 10;
        }
    }
    samples.push(m.store_size_bytes() as f64 / (1 << 20) as f64);
    m.shutdown().await?;
    Ok(ChurnFigures {
        seconds: secs,
        events,
        file_mb: samples,
    })
}

fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

async fn idle_rss(dir: PathBuf, n: u64) -> crate::Result<f64> {
    let m = QueueManager::open(bench_config(&dir, Durability::Immediate)).await?;
    let t = tenant();
    let before = rss_kb();
    let mut handles = Vec::new();
    for w in 0..64u64 {
        let (m, t) = (m.clone(), t.clone());
        handles.push(tokio::spawn(async move {
            let mut i = w;
            while i < n {
                m.create_queue(&t, &task(format!("idle-{i}"))?, QueueOptions::default())
                    .await?;
                i += 64;
            }
            crate::Result::Ok(())
        }));
    }
    for h in handles {
        h.await.map_err(crate::Error::storage)??;
    }
    let after = rss_kb();
    m.shutdown().await?;
    Ok(after.saturating_sub(before) as f64 / 1024.0)
}

impl BenchReport {
    /// The human table.
    pub fn to_table(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let quick = if self.quick { " (quick)" } else { "" };
        let _ = writeln!(
            s,
            "eventqueue bench — storage {}, data dir {}{quick}",
            self.storage, self.data_dir
        );
        let _ = writeln!(s, "\n| measurement | figure |\n|---|---|");
        if let Some(r) = self.raw_fdatasync {
            let _ = writeln!(
                s,
                "| raw 300 B append + fdatasync | p50 {:.3} ms, p99 {:.3} ms |",
                r.p50_ms, r.p99_ms
            );
        }
        if let Some(a) = self.sequential_ack {
            let ratio = self
                .sequential_vs_raw_p50
                .map(|r| format!(" ({r:.2}× raw p50)"))
                .unwrap_or_default();
            let _ = writeln!(
                s,
                "| 1 producer, sequential enqueue ack | p50 {:.3} ms, p99 {:.3} ms{ratio} |",
                a.p50_ms, a.p99_ms
            );
        }
        for a in &self.appends {
            let _ = writeln!(
                s,
                "| {} appends, {} producers | {:.0} events/s, ack p50 {:.2} ms p99 {:.2} ms, {:.1} events/commit |",
                a.durability,
                a.producers,
                a.events_per_sec,
                a.ack.p50_ms,
                a.ack.p99_ms,
                a.avg_batch
            );
        }
        if let (Some(n), Some(rate)) = (self.replay_events, self.replay_events_per_sec) {
            let _ = writeln!(s, "| replay of {n} events | {rate:.0} events/s |");
        }
        if let Some(f) = &self.fanout {
            let _ = writeln!(
                s,
                "| fan-out, {} subscribers × {} events at 1k/s | enqueue→delivery p50 {:.2} ms, p99 {:.2} ms, lost {} |",
                f.subscribers, f.events, f.latency.p50_ms, f.latency.p99_ms, f.lost
            );
        }
        if let Some(r) = &self.reopen {
            let _ = writeln!(
                s,
                "| reopen, {} events in {} queues | {:.1} ms |",
                r.events, r.queues, r.reopen_ms
            );
        }
        if let (Some(n), Some(mb)) = (self.idle_queues, self.idle_queues_rss_mb) {
            let _ = writeln!(s, "| {n} idle queues | +{mb:.1} MB RSS |");
        }
        if let Some(w) = &self.sweep {
            let _ = writeln!(
                s,
                "| expiry sweep of {} events in {} queues, {} producers | ack p99 {:.2} ms during vs {:.2} ms without (p50 {:.2} vs {:.2}); purged in {:.0} ms |",
                w.events,
                w.queues,
                w.producers,
                w.ack_during_sweep.p99_ms,
                w.ack_without_sweep.p99_ms,
                w.ack_during_sweep.p50_ms,
                w.ack_without_sweep.p50_ms,
                w.sweep_ms
            );
        }
        if let Some(c) = &self.churn {
            let sizes: Vec<String> = c.file_mb.iter().map(|m| format!("{m:.1}")).collect();
            let _ = writeln!(
                s,
                "| churn {} s, {} events written and deleted | file MB over time: {} |",
                c.seconds,
                c.events,
                sizes.join(" → ")
            );
        }
        for h in &self.http_enqueue {
            let _ = writeln!(
                s,
                "| HTTP enqueue, {} clients × {} events/request | {:.0} events/s, request p50 {:.2} ms p99 {:.2} ms |",
                h.clients, h.batch, h.events_per_sec, h.request.p50_ms, h.request.p99_ms
            );
        }
        if let (Some(n), Some(rate)) = (self.http_replay_events, self.http_replay_events_per_sec) {
            let _ = writeln!(
                s,
                "| SSE replay of {n} events, 1 client | {rate:.0} events/s |"
            );
        }
        for f in &self.http_fanout {
            let _ = writeln!(
                s,
                "| SSE fan-out, {} clients × {} events at 1k/s | enqueue→client p50 {:.2} ms, p99 {:.2} ms, lost {} |",
                f.clients, f.events, f.latency.p50_ms, f.latency.p99_ms, f.lost
            );
        }
        s
    }
}

/// Flags of `eventqueue bench`.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Directory on the disk to measure (a temporary directory is made inside it and removed)
    /// [default: the system temporary directory]
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// The store to measure, as `serve --storage` takes it: redb, memory, redis://…
    /// [default: redb]
    #[arg(long, value_name = "STORAGE")]
    storage: Option<String>,
    /// Smaller sizes: a run under a minute.
    #[arg(long)]
    quick: bool,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
    /// Run only the steps whose name contains one of these comma-separated words (steps: raw,
    /// sequential, appends-immediate, appends-buffered, replay, fanout, reopen, idle, sweep,
    /// churn, http-enqueue, http-replay, http-fanout; `http` runs the three over loopback
    /// HTTP; an append step's name with `-N` appended, e.g. appends-immediate-64, runs only its
    /// N-producer measurement).
    #[arg(long, value_name = "STEP")]
    only: Option<String>,
    /// Seconds of the churn step (file size under steady write-and-delete)
    /// [default: 30; 5 with --quick]
    #[arg(long, value_name = "SECS")]
    churn_secs: Option<u64>,
    /// Queues the append steps spread their producers over [default: 100]
    #[arg(long, value_name = "N")]
    streams: Option<usize>,
}

/// Runs `eventqueue bench`: a progress bar while it measures, then the table (or JSON).
pub(in crate::cli) async fn bench(args: BenchArgs) -> Result<(), String> {
    // A bar on a terminal (stderr); plain lines otherwise, so logs stay readable.
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed}] {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.enable_steady_tick(std::time::Duration::from_millis(250));
    let shown = !bar.is_hidden();
    let on_step = bar.clone();
    let progress: Progress = Arc::new(move |n: usize, total: usize, step: &str| {
        if shown {
            on_step.set_length(total as u64);
            on_step.set_position(n.saturating_sub(1) as u64);
            on_step.set_message(step.to_string());
        } else {
            eprintln!("… [{n}/{total}] {step}");
        }
    });
    let storage = match &args.storage {
        Some(s) => s.parse()?,
        None => crate::StorageBackend::default(),
    };
    let report = run(BenchOptions {
        data_dir: args.data_dir,
        storage,
        quick: args.quick,
        progress: Some(progress),
        only: args.only,
        churn_secs: args.churn_secs,
        streams: args.streams,
    })
    .await
    .map_err(|e| format!("bench failed: {e}"));
    bar.finish_and_clear();
    let report = report?;
    if args.json {
        let json = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
        println!("{json}");
    } else {
        println!("{}", report.to_table());
    }
    Ok(())
}
