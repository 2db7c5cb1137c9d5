//! Timing shared by every peer: the measurement window, per-client tallies, and the figures
//! they merge into.

use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use serde::Serialize;

/// Sizes of one run.
#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    pub quick: bool,
    /// Load before the measured window (not counted).
    #[serde(serialize_with = "as_ms", rename = "warmup_ms")]
    pub warmup: Duration,
    /// The measured window of a throughput workload.
    #[serde(serialize_with = "as_ms", rename = "measure_ms")]
    pub measure: Duration,
    /// Events in the replayed stream.
    pub replay_events: u64,
    /// Longest time spent filling the replayed stream (a peer that fsyncs every event on a
    /// throttled disk replays what it stored by then).
    #[serde(serialize_with = "as_ms", rename = "replay_fill_limit_ms")]
    pub replay_fill_limit: Duration,
    /// How long the fan-out publisher runs at each rate.
    pub fanout_secs: f64,
    /// Subscribers in the fan-out workloads.
    pub subscribers: usize,
    /// Samples of the raw fdatasync floor at the start and the end of the run.
    pub floor_samples: usize,
    /// Samples of the floor taken before and after each workload on each server.
    pub floor_samples_per_cell: usize,
}

fn as_ms<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_millis() as u64)
}

impl Plan {
    pub fn new(quick: bool) -> Self {
        if quick {
            Plan {
                quick,
                warmup: Duration::from_millis(250),
                measure: Duration::from_millis(1000),
                replay_events: 20_000,
                replay_fill_limit: Duration::from_secs(10),
                fanout_secs: 1.0,
                subscribers: 100,
                floor_samples: 500,
                floor_samples_per_cell: 30,
            }
        } else {
            Plan {
                quick,
                warmup: Duration::from_millis(500),
                measure: Duration::from_secs(4),
                replay_events: 100_000,
                replay_fill_limit: Duration::from_secs(30),
                fanout_secs: 3.0,
                subscribers: 100,
                floor_samples: 2000,
                floor_samples_per_cell: 50,
            }
        }
    }
}

/// Size of every event body (Redis / NATS payload, eventqueue request JSON).
pub const EVENT_BYTES: usize = 300;
/// Streams the throughput workloads spread their events over.
pub const STREAMS: usize = 100;
/// Clients of the concurrent workloads.
pub const CLIENTS: usize = 8;
/// Requests in flight per client (pipeline depth, outstanding acks, batch size).
pub const DEPTH: usize = 16;

/// Microseconds since the harness started: a clock shared by publishers and subscribers of
/// this process, carried inside fan-out payloads.
pub fn now_us() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_micros() as u64
}

/// A 300-byte JSON object `{"sent_us":N,"pad":"xxx…"}`: the payload of Redis and NATS events.
pub fn payload(sent_us: u64) -> Vec<u8> {
    let head = format!("{{\"sent_us\":{sent_us},\"pad\":\"");
    let mut out = head.into_bytes();
    let pad = EVENT_BYTES.saturating_sub(out.len() + 2);
    out.extend(std::iter::repeat_n(b'x', pad));
    out.extend_from_slice(b"\"}");
    out
}

/// The `sent_us` number inside a payload or an event's JSON, if any.
pub fn sent_us(bytes: &[u8]) -> Option<u64> {
    const KEY: &[u8] = b"\"sent_us\":";
    let at = bytes.windows(KEY.len()).position(|w| w == KEY)? + KEY.len();
    let digits = bytes[at..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .count();
    std::str::from_utf8(&bytes[at..at + digits])
        .ok()?
        .parse()
        .ok()
}

/// The process whose CPU time the next measured window samples (the server under test; 0:
/// none). Set by the harness before each cell, read by [`Window::start`].
static SERVER_PID: AtomicU32 = AtomicU32::new(0);

/// The CPU sample of the last measured window: the server's CPU seconds between the end of the
/// warm-up and the deadline.
static WINDOW_CPU: Mutex<Option<tokio::task::JoinHandle<Option<f64>>>> = Mutex::new(None);

/// Sample the CPU time of process `pid` over the measured windows from now on.
pub fn watch_server_cpu(pid: u32) {
    SERVER_PID.store(pid, Ordering::SeqCst);
    if let Ok(mut slot) = WINDOW_CPU.lock() {
        *slot = None;
    }
}

/// The server's CPU seconds over the last measured window (waits for its end sample), or
/// `None` when no window ran since [`watch_server_cpu`] or `/proc` could not be read.
pub async fn window_cpu_secs() -> Option<f64> {
    let handle = WINDOW_CPU.lock().ok()?.take()?;
    handle.await.ok().flatten()
}

/// The measured window of a throughput workload: load from now, counting starts after the
/// warm-up, no new request after the deadline.
pub struct Window {
    pub warm_end: Instant,
    pub deadline: Instant,
}

impl Window {
    /// A window starting now. When a server is watched ([`watch_server_cpu`]), its CPU time
    /// (`/proc/PID/stat`, every thread) is sampled at the end of the warm-up and at the
    /// deadline — the same window whose acknowledgements are counted.
    pub fn start(plan: &Plan) -> Self {
        let now = Instant::now();
        let w = Window {
            warm_end: now + plan.warmup,
            deadline: now + plan.warmup + plan.measure,
        };
        let pid = SERVER_PID.load(Ordering::SeqCst);
        if pid != 0 {
            let (from, to) = (w.warm_end, w.deadline);
            let sample = tokio::spawn(async move {
                tokio::time::sleep_until(from.into()).await;
                let before = crate::servers::process_cpu_secs(pid)?;
                tokio::time::sleep_until(to.into()).await;
                let after = crate::servers::process_cpu_secs(pid)?;
                Some(after - before)
            });
            if let Ok(mut slot) = WINDOW_CPU.lock() {
                *slot = Some(sample);
            }
        }
        w
    }

    /// Whether a client may send another request.
    pub fn open(&self) -> bool {
        Instant::now() < self.deadline
    }
}

/// What one client saw.
pub struct Tally {
    hist: Histogram<u64>,
    /// Events acknowledged inside the measured window.
    events: u64,
}

impl Tally {
    pub fn new() -> Self {
        Tally {
            hist: histogram(),
            events: 0,
        }
    }

    /// `n` events sent at `start` were acknowledged now. Latency counts for requests started
    /// after the warm-up; throughput counts acks that land inside the window.
    pub fn ack(&mut self, w: &Window, start: Instant, n: u64) {
        let end = Instant::now();
        if start >= w.warm_end {
            record(&mut self.hist, (end - start).as_micros() as u64, n);
        }
        if end >= w.warm_end && end <= w.deadline {
            self.events += n;
        }
    }
}

pub fn histogram() -> Histogram<u64> {
    // Auto-resizing: a throttled disk may push latencies to seconds.
    Histogram::new(3).expect("3 significant figures is a valid precision")
}

pub fn record(h: &mut Histogram<u64>, micros: u64, n: u64) {
    // Cannot fail on an auto-resizing histogram.
    let _ = h.record_n(micros.max(1), n);
}

/// The figures of one workload on one peer.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Measure {
    /// Events counted (acknowledged in the window, replayed, or delivered).
    pub events: u64,
    pub secs: f64,
    pub events_per_s: f64,
    /// Ack latency (throughput workloads) or publish → subscriber latency (fan-out), ms.
    /// Absent for replay.
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// Fan-out: deliveries expected (published × subscribers) and missing at the end.
    pub expected: Option<u64>,
    pub lost: Option<u64>,
    /// Throughput workloads: the server process's CPU time (user + system, all threads, from
    /// `/proc/PID/stat`) over the measured window, and that per acknowledged event.
    pub server_cpu_secs: Option<f64>,
    pub server_cpu_us_per_event: Option<f64>,
}

impl Measure {
    pub fn from_tallies(tallies: Vec<Tally>, plan: &Plan) -> Self {
        let mut hist = histogram();
        let mut events = 0;
        for t in tallies {
            // Same precision, auto-resizing: cannot fail.
            let _ = hist.add(&t.hist);
            events += t.events;
        }
        let secs = plan.measure.as_secs_f64();
        Measure {
            events,
            secs,
            events_per_s: events as f64 / secs,
            p50_ms: Some(quantile_ms(&hist, 0.50)),
            p99_ms: Some(quantile_ms(&hist, 0.99)),
            expected: None,
            lost: None,
            server_cpu_secs: None,
            server_cpu_us_per_event: None,
        }
    }
}

pub fn quantile_ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

/// Runs one future per client and collects their tallies; the first error wins.
pub async fn join_clients<Fut>(futures: Vec<Fut>) -> Result<Vec<Tally>>
where
    Fut: Future<Output = Result<Tally>> + Send + 'static,
{
    let handles: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.context("a client task panicked")??);
    }
    Ok(out)
}

/// Fan-out bookkeeping shared by a peer's subscribers.
pub struct FanoutTally {
    pub hist: Histogram<u64>,
    pub received: u64,
}

impl FanoutTally {
    pub fn new() -> Self {
        FanoutTally {
            hist: histogram(),
            received: 0,
        }
    }

    /// One delivery of an event whose payload carries `sent_us`.
    pub fn deliver(&mut self, bytes: &[u8]) {
        if let Some(sent) = sent_us(bytes) {
            record(&mut self.hist, now_us().saturating_sub(sent), 1);
            self.received += 1;
        }
    }
}

/// Merges the subscribers' tallies of a fan-out run.
pub fn fanout_measure(subs: Vec<FanoutTally>, published: u64, secs: f64) -> Measure {
    let mut hist = histogram();
    let mut received = 0;
    let expected = published * subs.len() as u64;
    for s in subs {
        let _ = hist.add(&s.hist);
        received += s.received;
    }
    Measure {
        events: received,
        secs,
        events_per_s: received as f64 / secs,
        p50_ms: Some(quantile_ms(&hist, 0.50)),
        p99_ms: Some(quantile_ms(&hist, 0.99)),
        expected: Some(expected),
        lost: Some(expected.saturating_sub(received)),
        ..Default::default()
    }
}

/// The schedule of a paced publisher: `rate` events per second for `secs`; a late send goes
/// out at once.
pub struct Pacer {
    start: tokio::time::Instant,
    period: Duration,
    total: u64,
    next: u64,
}

impl Pacer {
    pub fn new(rate: u64, secs: f64) -> Self {
        Pacer {
            start: tokio::time::Instant::now(),
            period: Duration::from_secs_f64(1.0 / rate as f64),
            total: (rate as f64 * secs).round() as u64,
            next: 0,
        }
    }

    /// Sleeps until the next send is due; `None` when the schedule is done.
    pub async fn tick(&mut self) -> Option<u64> {
        if self.next >= self.total {
            return None;
        }
        tokio::time::sleep_until(self.start + self.period.mul_f64(self.next as f64)).await;
        self.next += 1;
        Some(self.next - 1)
    }

    pub fn published(&self) -> u64 {
        self.next
    }
}

/// Waits until `done()` or `limit` passes (subscribers draining after the publisher stops).
pub async fn settle(limit: Duration, done: impl Fn() -> bool) {
    let end = Instant::now() + limit;
    while !done() && Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The subscribers of one fan-out run: each task feeds its own tally and says when it is
/// subscribed.
pub struct Subscribers {
    tallies: Vec<std::sync::Arc<std::sync::Mutex<FanoutTally>>>,
    handles: Vec<tokio::task::JoinHandle<Result<()>>>,
    ready: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

pub type SharedTally = std::sync::Arc<std::sync::Mutex<FanoutTally>>;
pub type Ready = std::sync::Arc<std::sync::atomic::AtomicUsize>;

impl Subscribers {
    pub fn new() -> Self {
        Subscribers {
            tallies: Vec::new(),
            handles: Vec::new(),
            ready: Default::default(),
        }
    }

    /// Starts one subscriber; it must bump `ready` once subscribed.
    pub fn spawn<F, Fut>(&mut self, f: F)
    where
        F: FnOnce(SharedTally, Ready) -> Fut,
        Fut: Future<Output = Result<()>> + Send + 'static,
    {
        let tally = std::sync::Arc::new(std::sync::Mutex::new(FanoutTally::new()));
        self.tallies.push(tally.clone());
        self.handles
            .push(tokio::spawn(f(tally, self.ready.clone())));
    }

    /// Waits until every subscriber is subscribed (or one failed), then a little longer so
    /// their first read reaches the server.
    pub async fn wait_ready(&mut self, limit: Duration) -> Result<()> {
        let n = self.handles.len();
        let end = Instant::now() + limit;
        loop {
            if self.ready.load(std::sync::atomic::Ordering::SeqCst) >= n {
                break;
            }
            self.check_failed().await?;
            if Instant::now() > end {
                anyhow::bail!("subscribers not ready after {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        Ok(())
    }

    async fn check_failed(&mut self) -> Result<()> {
        for h in &mut self.handles {
            if h.is_finished() {
                h.await.context("a subscriber task panicked")??;
                anyhow::bail!("a subscriber ended early");
            }
        }
        Ok(())
    }

    pub fn all_received(&self, n: u64) -> bool {
        self.tallies
            .iter()
            .all(|t| t.lock().map(|t| t.received >= n).unwrap_or(true))
    }

    /// Stops the subscribers and merges what they received.
    pub async fn finish(mut self, published: u64, secs: f64) -> Result<Measure> {
        for h in &mut self.handles {
            if h.is_finished() {
                h.await.context("a subscriber task panicked")??;
            } else {
                h.abort();
                // Cancelled: the task is gone once this returns.
                let _ = h.await;
            }
        }
        let tallies = self
            .tallies
            .iter()
            .map(|t| match t.lock() {
                Ok(mut t) => std::mem::replace(&mut *t, FanoutTally::new()),
                Err(_) => FanoutTally::new(),
            })
            .collect();
        Ok(fanout_measure(tallies, published, secs))
    }
}
