//! `--durable-streams`: the Durable Streams measurements of issue 23, in one run.
//!
//! eventqueue (`/v1/stream/{path}`) beside the two Rust Durable Streams servers on crates.io:
//! ElectricSQL's `durable-streams` 0.1.5 (binary from `EQ_DS_ELECTRIC`, streams at `/{path}`)
//! and `durable-streams-server` 0.3.0 (binary from `EQ_DS_DSS`, `/v1/stream/{path}`). A peer
//! whose variable is unset is skipped with a note. Every server fsyncs before the ack:
//! eventqueue `--durability immediate`, electric `--durability wal` (a group fdatasync of the
//! WAL before the ack), dss `DS_STORAGE__MODE=file-durable` (fdatasync per append).
//!
//! Workloads, each run on the three servers in turn:
//! 1. appends of one 256-byte `text/plain` message per POST, 1 / 8 / 64 writers (one request
//!    in flight each, a connection each) on ONE stream, for 3 s (`--quick` 1 s);
//! 2. catch-up: a stream of 100k (`--quick` 20k) 256-byte JSON messages, filled with arrays of
//!    500, read with GET from `-1` following `Stream-Next-Offset` until `Stream-Up-To-Date`,
//!    7 times (`--quick` 3): the median read's rate and the server's CPU per read; the body
//!    is counted as it streams in, never gathered;
//! 3. live tail: 100 and 1000 readers (`live=sse`) of one `text/plain` stream, one writer at
//!    200 messages/s for 3 s (`--quick` 1 s); latency from the append's send to each reader's
//!    receipt (the send time is the message's first 20 bytes); nothing may be lost.
//!
//! Messages of workloads 1 and 3 are fixed 256-byte records without newlines, so a reader
//! cuts its concatenated SSE `data` into records whatever batching the server does.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;

use crate::drive::{histogram, now_us, quantile_ms, record};
use crate::say;
use crate::servers::{Server, free_addr};

const MSG: usize = 256;
const BATCH: usize = 500;
const TAIL_RATE: u64 = 200;

pub struct DsPlan {
    pub warmup: Duration,
    pub window: Duration,
    pub catchup: usize,
    /// How many times the catch-up stream is read (the median read counts).
    pub catchup_reads: usize,
    pub tail_secs: f64,
}

impl DsPlan {
    pub fn new(quick: bool) -> Self {
        DsPlan {
            warmup: Duration::from_millis(if quick { 250 } else { 500 }),
            window: Duration::from_secs(if quick { 1 } else { 3 }),
            catchup: if quick { 20_000 } else { 100_000 },
            catchup_reads: if quick { 3 } else { 7 },
            tail_secs: if quick { 1.0 } else { 3.0 },
        }
    }
}

struct Target {
    name: &'static str,
    setting: String,
    /// URL prefix of stream paths, e.g. `http://127.0.0.1:1234/v1/stream`.
    base: String,
    server: Server,
}

#[derive(Clone, Debug, Default)]
struct Cell {
    rate: f64,
    p50: Option<f64>,
    p99: Option<f64>,
    lost: Option<u64>,
    cpu_us: Option<f64>,
    error: Option<String>,
}

fn client() -> Result<reqwest::Client> {
    reqwest::Client::builder()
        .no_proxy()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(2000)
        .build()
        .context("building an HTTP client")
}

/// A 256-byte text record: the send time in 20 digits, then padding.
fn record_msg(sent: u64) -> Bytes {
    let mut s = format!("{sent:020}");
    s.push_str(&"x".repeat(MSG - s.len()));
    Bytes::from(s)
}

fn start_eq(bin: &Path, dir: &Path) -> Result<Target> {
    let addr = free_addr()?;
    let mut cmd = Command::new(bin);
    cmd.arg("serve")
        .arg("--insecure-open")
        .arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--bind")
        .arg(addr.to_string())
        .args(["--durability", "immediate", "--max-buffer-size", "10000000"])
        .args([
            "--max-sse-streams",
            "5000",
            "--max-sse-streams-per-tenant",
            "5000",
        ])
        .args([
            "--max-connections",
            "10000",
            "--max-connections-per-ip",
            "10000",
        ]);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("EVENTQUEUE_") {
            cmd.env_remove(&key);
        }
    }
    cmd.env("RUST_LOG", "warn");
    let server = Server::spawn("eventqueue", cmd, addr, dir.join("server.log"))?;
    Ok(Target {
        name: "eventqueue",
        setting: "`--durability immediate` (fsync'd commit before the ack; default)".into(),
        base: format!("http://{addr}/v1/stream"),
        server,
    })
}

fn start_electric(bin: &Path, dir: &Path) -> Result<Target> {
    let addr = free_addr()?;
    let mut cmd = Command::new(bin);
    cmd.args(["--host", "127.0.0.1", "--port", &addr.port().to_string()])
        .arg("--data-dir")
        .arg(dir.join("data"))
        .args(["--durability", "wal"])
        .current_dir(dir);
    let server = Server::spawn(
        "electric durable-streams",
        cmd,
        addr,
        dir.join("server.log"),
    )?;
    Ok(Target {
        name: "electric 0.1.5",
        setting: "`--durability wal` (group fdatasync of the WAL before the ack; default)".into(),
        base: format!("http://{addr}"),
        server,
    })
}

fn start_dss(bin: &Path, dir: &Path) -> Result<Target> {
    let addr = free_addr()?;
    let mut cmd = Command::new(bin);
    cmd.arg("serve")
        .current_dir(dir)
        .env("DS_SERVER__BIND_ADDRESS", addr.to_string())
        .env("DS_STORAGE__MODE", "file-durable")
        .env("DS_STORAGE__DATA_DIR", dir.join("data"))
        .env("DS_LIMITS__MAX_STREAM_BYTES", "4294967296")
        .env("DS_LIMITS__MAX_MEMORY_BYTES", "8589934592")
        .env("DS_OBSERVABILITY__RUST_LOG", "warn")
        .env("RUST_LOG", "warn");
    let server = Server::spawn("durable-streams-server", cmd, addr, dir.join("server.log"))?;
    Ok(Target {
        name: "dss 0.3.0",
        setting: "`DS_STORAGE__MODE=file-durable` (fdatasync per append before the ack)".into(),
        base: format!("http://{addr}/v1/stream"),
        server,
    })
}

async fn create(http: &reqwest::Client, url: &str, ctype: &str) -> Result<()> {
    let r = http
        .put(url)
        .header("content-type", ctype)
        .send()
        .await
        .with_context(|| format!("PUT {url}"))?;
    if !r.status().is_success() {
        let s = r.status();
        bail!(
            "PUT {url} answered {s}: {}",
            r.text().await.unwrap_or_default()
        );
    }
    Ok(())
}

async fn append(http: &reqwest::Client, url: &str, ctype: &str, body: Bytes) -> Result<()> {
    let r = http
        .post(url)
        .header("content-type", ctype)
        .body(body)
        .send()
        .await
        .with_context(|| format!("POST {url}"))?;
    let s = r.status();
    let _ = r.bytes().await;
    if !s.is_success() {
        bail!("POST {url} answered {s}");
    }
    Ok(())
}

/// Workload 1: `writers` writers on one stream for the window.
async fn appends(t: &Target, plan: &DsPlan, writers: usize) -> Result<Cell> {
    let url = format!("{}/app{writers}", t.base);
    create(&client()?, &url, "text/plain").await?;
    let start = Instant::now();
    let from = start + plan.warmup;
    let end = from + plan.window;
    let cpu0 = Arc::new(std::sync::Mutex::new(None));
    {
        let pid = t.server.pid();
        let cpu0 = cpu0.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(from.into()).await;
            *cpu0.lock().unwrap() = crate::servers::process_cpu_secs(pid);
        });
    }
    let mut tasks = Vec::new();
    for _ in 0..writers {
        let url = url.clone();
        let http = client()?;
        tasks.push(tokio::spawn(async move {
            let mut h = histogram();
            let mut n = 0u64;
            loop {
                let t0 = Instant::now();
                if t0 >= end {
                    break;
                }
                append(&http, &url, "text/plain", record_msg(now_us())).await?;
                let done = Instant::now();
                if t0 >= from && done <= end {
                    record(&mut h, (done - t0).as_micros() as u64, 1);
                    n += 1;
                }
            }
            anyhow::Ok((h, n))
        }));
    }
    let mut h = histogram();
    let mut n = 0;
    for task in tasks {
        let (th, tn) = task.await.context("a writer panicked")??;
        let _ = h.add(&th);
        n += tn;
    }
    let cpu1 = crate::servers::process_cpu_secs(t.server.pid());
    let cpu0 = *cpu0.lock().unwrap();
    Ok(Cell {
        rate: n as f64 / plan.window.as_secs_f64(),
        p50: Some(quantile_ms(&h, 0.5)),
        p99: Some(quantile_ms(&h, 0.99)),
        cpu_us: match (cpu0, cpu1) {
            (Some(a), Some(b)) if n > 0 => Some((b - a) * 1e6 / n as f64),
            _ => None,
        },
        ..Cell::default()
    })
}

/// Workload 2: fill a JSON stream with `plan.catchup` messages, then read it from `-1`,
/// [`DsPlan::catchup_reads`] times: the rate is the median read's, the CPU the server's per read.
///
/// The body is counted as it streams in, chunk by chunk, and never gathered: gathering 25 MB
/// (`bytes()` grows one buffer and copies into it) cost the client more than the fastest
/// server spends sending it, so the client bounded the rate and hid the servers' differences.
/// Each server gets the same client; what the client still costs is the socket receive.
async fn catchup(t: &Target, plan: &DsPlan) -> Result<Cell> {
    let http = client()?;
    let url = format!("{}/catchup", t.base);
    create(&http, &url, "application/json").await?;
    // A message: a JSON string of 256 bytes with its quotes.
    let one = format!("\"{}\"", "y".repeat(MSG - 2));
    let mut left = plan.catchup;
    while left > 0 {
        let k = left.min(BATCH);
        let body = format!("[{}]", vec![one.as_str(); k].join(","));
        append(&http, &url, "application/json", Bytes::from(body)).await?;
        left -= k;
    }
    let cpu0 = crate::servers::process_cpu_secs(t.server.pid());
    let own0 = crate::servers::process_cpu_secs(std::process::id());
    let mut times = Vec::with_capacity(plan.catchup_reads);
    let mut reqs = 0usize;
    for _ in 0..plan.catchup_reads {
        let t0 = Instant::now();
        let (got, n) = read_all(&http, &url).await?;
        times.push(t0.elapsed().as_secs_f64());
        reqs = n;
        if got != plan.catchup {
            bail!(
                "catch-up read {got} messages of {} in {n} GETs",
                plan.catchup
            );
        }
    }
    let cpu1 = crate::servers::process_cpu_secs(t.server.pid());
    let own1 = crate::servers::process_cpu_secs(std::process::id());
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    // The client's own CPU per read: what no server can take below.
    let client_ms = match (own0, own1) {
        (Some(a), Some(b)) => format!("{:.1}", (b - a) * 1e3 / times.len() as f64),
        _ => "?".into(),
    };
    say(&format!(
        "  {} catch-up: {} messages in {reqs} GETs, {} reads: best {:.1} / median {:.1} ms; client CPU {client_ms} ms/read",
        t.name,
        plan.catchup,
        times.len(),
        times[0] * 1000.0,
        median * 1000.0,
    ));
    Ok(Cell {
        rate: plan.catchup as f64 / median,
        cpu_us: match (cpu0, cpu1) {
            (Some(a), Some(b)) => Some((b - a) * 1e6 / times.len() as f64),
            _ => None,
        },
        ..Cell::default()
    })
}

/// One catch-up read from `-1`: GETs following `Stream-Next-Offset` until `Stream-Up-To-Date`.
/// Returns the messages counted (each a JSON string: two quotes) and the GETs it took.
async fn read_all(http: &reqwest::Client, url: &str) -> Result<(usize, usize)> {
    let mut offset = "-1".to_string();
    let (mut quotes, mut reqs) = (0usize, 0usize);
    loop {
        let mut r = http
            .get(format!("{url}?offset={offset}"))
            .send()
            .await
            .context("catch-up GET")?;
        if !r.status().is_success() {
            bail!("catch-up GET answered {}", r.status());
        }
        let next = r
            .headers()
            .get("stream-next-offset")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .context("no Stream-Next-Offset")?;
        let up = r.headers().contains_key("stream-up-to-date");
        while let Some(chunk) = r.chunk().await.context("catch-up body")? {
            quotes += memchr::memchr_iter(b'"', &chunk).count();
        }
        reqs += 1;
        if up || next == offset {
            break;
        }
        offset = next;
    }
    Ok((quotes / 2, reqs))
}

/// Workload 3: `readers` SSE readers of one stream, one writer at [`TAIL_RATE`]/s.
async fn tail(t: &Target, plan: &DsPlan, readers: usize) -> Result<Cell> {
    let url = format!("{}/tail{readers}", t.base);
    let http = client()?;
    create(&http, &url, "text/plain").await?;
    let ready = Arc::new(AtomicU64::new(0));
    let received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(tokio::sync::Notify::new());
    let mut tasks = Vec::new();
    // Readers share a few clients (each request its own connection).
    let clients: Vec<reqwest::Client> = (0..8).map(|_| client()).collect::<Result<_>>()?;
    for i in 0..readers {
        let http = clients[i % clients.len()].clone();
        let url = format!("{url}?offset=-1&live=sse");
        let (ready, received, stop) = (ready.clone(), received.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut h = histogram();
            let mut r = http.get(&url).send().await.context("SSE GET")?;
            if !r.status().is_success() {
                bail!("SSE GET answered {}", r.status());
            }
            ready.fetch_add(1, Ordering::SeqCst);
            let mut buf: Vec<u8> = Vec::new(); // raw SSE text not yet parsed
            let mut data: Vec<u8> = Vec::new(); // concatenated message bytes
            let stopped = stop.notified();
            tokio::pin!(stopped);
            loop {
                let chunk = tokio::select! {
                    c = r.chunk() => c.context("SSE body")?,
                    _ = &mut stopped => break,
                };
                let Some(chunk) = chunk else { break };
                let now = now_us();
                buf.extend_from_slice(&chunk);
                // Complete events end with a blank line.
                while let Some(end) = memchr::memmem::find(&buf, b"\n\n") {
                    let ev: Vec<u8> = buf.drain(..end + 2).collect();
                    let mut kind: &[u8] = b"message";
                    let mut first = true;
                    let mut payload = Vec::new();
                    for line in ev.split(|b| *b == b'\n') {
                        if let Some(v) = line.strip_prefix(b"event:") {
                            kind = v.trim_ascii();
                        } else if let Some(v) = line.strip_prefix(b"data:") {
                            let v = v.strip_prefix(b" ").unwrap_or(v);
                            if !first {
                                payload.push(b'\n');
                            }
                            first = false;
                            payload.extend_from_slice(v);
                        }
                    }
                    if kind == b"data" || kind == b"message" {
                        data.extend_from_slice(&payload);
                    }
                }
                let whole = data.len() / MSG * MSG;
                for rec in data[..whole].chunks(MSG) {
                    let sent: u64 = std::str::from_utf8(&rec[..20])
                        .ok()
                        .and_then(|s| s.parse().ok())
                        .context("a record without its send time")?;
                    record(&mut h, now.saturating_sub(sent), 1);
                    received.fetch_add(1, Ordering::Relaxed);
                }
                data.drain(..whole);
            }
            anyhow::Ok(h)
        }));
    }
    let t0 = Instant::now();
    while (ready.load(Ordering::SeqCst) as usize) < readers {
        if t0.elapsed() > Duration::from_secs(30) {
            bail!(
                "{} of {readers} SSE readers connected after 30 s",
                ready.load(Ordering::SeqCst)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let total = (plan.tail_secs * TAIL_RATE as f64) as u64;
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / TAIL_RATE));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut published = 0u64;
    for _ in 0..total {
        tick.tick().await;
        append(&http, &url, "text/plain", record_msg(now_us())).await?;
        published += 1;
    }
    let expected = published * readers as u64;
    let end = Instant::now() + Duration::from_secs(15);
    while received.load(Ordering::Relaxed) < expected && Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.notify_waiters();
    let mut h = histogram();
    for task in tasks {
        match tokio::time::timeout(Duration::from_secs(5), task).await {
            Ok(Ok(Ok(th))) => {
                let _ = h.add(&th);
            }
            Ok(Ok(Err(e))) => bail!("a reader failed: {e:#}"),
            Ok(Err(e)) => bail!("a reader panicked: {e}"),
            Err(_) => bail!("a reader did not stop"),
        }
    }
    let got = received.load(Ordering::Relaxed);
    Ok(Cell {
        rate: got as f64 / plan.tail_secs,
        p50: Some(quantile_ms(&h, 0.5)),
        p99: Some(quantile_ms(&h, 0.99)),
        lost: Some(expected.saturating_sub(got)),
        ..Cell::default()
    })
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum W {
    Append(usize),
    Catchup,
    Tail(usize),
}

impl W {
    /// The row's name for `--workloads`.
    fn name(self) -> String {
        match self {
            W::Append(n) => format!("append{n}"),
            W::Catchup => "catchup".into(),
            W::Tail(n) => format!("tail{n}"),
        }
    }

    fn label(self, plan: &DsPlan) -> String {
        match self {
            W::Append(n) => format!(
                "append 256 B, {n} writer{} on one stream",
                if n > 1 { "s" } else { "" }
            ),
            W::Catchup => format!("catch-up read of {}k messages", plan.catchup / 1000),
            W::Tail(n) => format!("live SSE tail, {n} readers, 200 msg/s"),
        }
    }
}

const ALL: [W; 6] = [
    W::Append(1),
    W::Append(8),
    W::Append(64),
    W::Catchup,
    W::Tail(100),
    W::Tail(1000),
];

fn fmt_rate(v: f64) -> String {
    if v >= 10_000.0 {
        format!("{:.0}k", v / 1000.0)
    } else if v >= 1000.0 {
        format!("{:.1}k", v / 1000.0)
    } else {
        format!("{v:.0}")
    }
}

fn cell_text(w: W, c: &Cell) -> String {
    if let Some(e) = &c.error {
        let e: String = e.chars().take(80).collect();
        return format!("failed: {}", e.replace('|', "/").replace('\n', " "));
    }
    match w {
        W::Append(_) => format!(
            "{}/s, p50 {:.2} / p99 {:.2} ms{}",
            fmt_rate(c.rate),
            c.p50.unwrap_or(0.0),
            c.p99.unwrap_or(0.0),
            c.cpu_us
                .map(|u| format!(", {u:.0} µs CPU/msg"))
                .unwrap_or_default()
        ),
        W::Catchup => format!(
            "{}/s{}",
            fmt_rate(c.rate),
            c.cpu_us
                .map(|u| format!(", {:.1} ms CPU/read", u / 1000.0))
                .unwrap_or_default()
        ),
        W::Tail(_) => format!(
            "p50 {:.2} / p99 {:.2} ms, lost {}",
            c.p50.unwrap_or(0.0),
            c.p99.unwrap_or(0.0),
            c.lost.unwrap_or(0)
        ),
    }
}

/// Runs the comparison and returns the markdown report.
pub async fn run(
    eq_bin: &Path,
    work: &Path,
    quick: bool,
    workloads: Option<&[String]>,
) -> Result<String> {
    let plan = DsPlan::new(quick);
    let rows: Vec<W> = ALL
        .into_iter()
        .filter(|w| workloads.is_none_or(|l| l.iter().any(|n| n.eq_ignore_ascii_case(&w.name()))))
        .collect();
    if rows.is_empty() {
        bail!(
            "--workloads names none of the Durable Streams rows (append1, append8, append64, catchup, tail100, tail1000)"
        );
    }
    let load_start = crate::servers::load_average();
    let floor_start = crate::servers::disk_floor(work, if quick { 500 } else { 2000 })?;
    say(&format!(
        "disk floor (300-byte append + fdatasync): p50 {:.3} ms, p99 {:.3} ms",
        floor_start.p50_ms, floor_start.p99_ms
    ));
    let mut notes = Vec::new();
    let mut targets = Vec::new();
    let mkdir = |name: &str| -> Result<PathBuf> {
        Ok(tempfile::Builder::new()
            .prefix(name)
            .tempdir_in(work)
            .context("making a data directory")?
            .keep())
    };
    match start_eq(eq_bin, &mkdir("ds-eq-")?) {
        Ok(t) => targets.push(t),
        Err(e) => notes.push(format!("eventqueue could not start: {e:#}")),
    }
    for (var, name, f) in [
        (
            "EQ_DS_ELECTRIC",
            "electric durable-streams 0.1.5",
            start_electric as fn(&Path, &Path) -> Result<Target>,
        ),
        ("EQ_DS_DSS", "durable-streams-server 0.3.0", start_dss),
    ] {
        match std::env::var_os(var) {
            None => notes.push(format!("{name} skipped: `{var}` is unset")),
            Some(bin) => match f(Path::new(&bin), &mkdir("ds-peer-")?) {
                Ok(t) => targets.push(t),
                Err(e) => notes.push(format!("{name} could not start: {e:#}")),
            },
        }
    }
    for n in &notes {
        say(n);
    }
    let mut cells: Vec<Vec<Cell>> = vec![Vec::new(); targets.len()];
    for &w in &rows {
        for (i, t) in targets.iter().enumerate() {
            let r = match w {
                W::Append(n) => appends(t, &plan, n).await,
                W::Catchup => catchup(t, &plan).await,
                W::Tail(n) => tail(t, &plan, n).await,
            };
            let c = r.unwrap_or_else(|e| Cell {
                error: Some(format!("{e:#}")),
                ..Cell::default()
            });
            say(&format!(
                "{:<16} {:<40} {}",
                t.name,
                w.label(&plan),
                cell_text(w, &c)
            ));
            cells[i].push(c);
        }
    }
    let floor_end = crate::servers::disk_floor(work, if quick { 500 } else { 2000 })?;
    let load_end = crate::servers::load_average();
    for t in targets.iter_mut() {
        let _ = t.server.is_running();
    }

    let mut out = String::new();
    let _ = writeln!(
        out,
        "### Durable Streams: eventqueue against the Rust Durable Streams servers ({} run)\n",
        if quick { "quick" } else { "full" }
    );
    let _ = writeln!(
        out,
        "- Raw floor (300-byte append + fdatasync): start p50 {:.2} / p99 {:.2} ms, end p50 {:.2} / p99 {:.2} ms; load average {:.2} → {:.2}",
        floor_start.p50_ms,
        floor_start.p99_ms,
        floor_end.p50_ms,
        floor_end.p99_ms,
        load_start,
        load_end
    );
    for t in &targets {
        let _ = writeln!(out, "- {}: {}", t.name, t.setting);
    }
    for n in &notes {
        let _ = writeln!(out, "- {n}");
    }
    let _ = writeln!(out);
    let _ = write!(out, "| workload |");
    for t in &targets {
        let _ = write!(out, " {} |", t.name);
    }
    let _ = writeln!(out, " eventqueue ÷ best peer | goal |");
    let _ = write!(out, "|---|");
    for _ in &targets {
        let _ = write!(out, "---|");
    }
    let _ = writeln!(out, "---|---|");
    for (k, w) in rows.iter().enumerate() {
        let _ = write!(out, "| {} |", w.label(&plan));
        for c in &cells {
            let _ = write!(out, " {} |", cell_text(*w, &c[k]));
        }
        // Ratio against the better peer (columns after the first are peers).
        let eq = cells.first().map(|c| &c[k]).filter(|c| c.error.is_none());
        let peers: Vec<&Cell> = cells
            .iter()
            .skip(1)
            .map(|c| &c[k])
            .filter(|c| c.error.is_none())
            .collect();
        let (ratio, goal) = match (w, eq) {
            (W::Append(_) | W::Catchup, Some(e)) if !peers.is_empty() => {
                let best = peers.iter().map(|c| c.rate).fold(0.0, f64::max);
                let need = if *w == W::Catchup { 2.0 } else { 1.5 };
                let r = e.rate / best;
                (
                    format!("{r:.2}× throughput"),
                    format!("≥ {need}× — {}", if r >= need { "met" } else { "missed" }),
                )
            }
            (W::Tail(_), Some(e)) if !peers.is_empty() => {
                let best = peers
                    .iter()
                    .filter_map(|c| c.p99)
                    .fold(f64::INFINITY, f64::min);
                let r = e.p99.unwrap_or(f64::INFINITY) / best;
                (
                    format!("{r:.2}× p99"),
                    format!("p99 ≤ 1× — {}", if r <= 1.0 { "met" } else { "missed" }),
                )
            }
            _ => ("—".into(), "—".into()),
        };
        let _ = writeln!(out, " {ratio} | {goal} |");
    }
    for t in targets {
        let name = t.name;
        if let Err(e) = t.server.stop() {
            say(&format!("stopping {name}: {e:#}"));
        }
    }
    Ok(out)
}
