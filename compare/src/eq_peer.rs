//! eventqueue over its HTTP API (open mode on loopback): `POST /events/queues/{task}/events`
//! to append, SSE `GET /events/workflows/{task}?from_offset=0` to replay and follow.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use bytes::{Bytes, BytesMut};

use crate::drive::{self, CLIENTS, DEPTH, Measure, Plan, STREAMS, Subscribers, Tally, Window};
use crate::servers::{Server, free_addr};

/// Queues are created with room for every event of the run: nothing is trimmed, as in the
/// peers' unbounded streams.
const MAX_BUFFER: u64 = 10_000_000;

pub struct Eventqueue {
    pub(crate) addr: std::net::SocketAddr,
    base: String,
    pub(crate) tasks: Vec<String>,
    /// Every node serving these queues (`addr` first): several `serve` processes over one
    /// Redis (`scale.rs`). Throughput clients and fan-out subscribers are spread over them.
    nodes: Vec<std::net::SocketAddr>,
}

/// A progress event of [`drive::EVENT_BYTES`] bytes whose details carry `sent_us`.
pub fn event_json(sent_us: u64) -> String {
    let head = format!(
        "{{\"event_type\":\"progress\",\"current\":1,\"total\":100,\"step\":\"processing_video\",\
         \"details\":{{\"sent_us\":{sent_us},\"pad\":\""
    );
    let pad = drive::EVENT_BYTES.saturating_sub(head.len() + 3);
    format!("{head}{}\"}}}}", "x".repeat(pad))
}

fn batch_json(n: usize) -> String {
    let events: Vec<String> = (0..n).map(|_| event_json(0)).collect();
    format!("{{\"events\":[{}]}}", events.join(","))
}

/// A client with its own connection pool: one "client" of a workload.
fn http_client() -> Result<reqwest::Client> {
    reqwest::Client::builder()
        .no_proxy()
        .tcp_nodelay(true)
        .build()
        .context("building an HTTP client")
}

/// Starts `eventqueue serve` in `durability` (`immediate` / `buffered`) on a fresh data
/// directory, open mode (no JWT secret), request logging off (`RUST_LOG=warn`), and creates
/// the 100 queues.
pub async fn start(bin: &Path, dir: &Path, durability: &str) -> Result<(Server, Eventqueue)> {
    let name = format!("eventqueue ({durability})");
    start_with(bin, dir, &name, &["--durability", durability], true).await
}

/// [`start`] with other `serve` flags (`--storage …`); `create`: create the 100 queues (not
/// on a further node over a store that has them).
pub async fn start_with(
    bin: &Path,
    dir: &Path,
    name: &str,
    flags: &[&str],
    create: bool,
) -> Result<(Server, Eventqueue)> {
    let addr = free_addr()?;
    let mut cmd = Command::new(bin);
    cmd.arg("serve")
        .arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--bind")
        .arg(addr.to_string())
        .args(flags);
    // Settings come from the flags above only: no token mode, no config file from the caller.
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("EVENTQUEUE_") {
            cmd.env_remove(&key);
        }
    }
    cmd.env("RUST_LOG", "warn");
    let server = Server::spawn(name, cmd, addr, dir.join("server.log"))?;
    let eq = Eventqueue {
        addr,
        base: format!("http://{addr}"),
        tasks: (0..STREAMS).map(|i| format!("bench_s{i}")).collect(),
        nodes: vec![addr],
    };
    let http = http_client()?;
    let health = http
        .get(format!("{}/healthz", eq.base))
        .send()
        .await
        .context("GET /healthz")?;
    if !health.status().is_success() {
        bail!("GET /healthz answered {}", health.status());
    }
    if create {
        for t in &eq.tasks {
            eq.create(&http, t).await?;
        }
    }
    Ok((server, eq))
}

/// POSTs `body` as JSON to `url` (setup requests; the timed ones go through [`Conn`]).
async fn post(http: &reqwest::Client, url: &str, body: Bytes) -> Result<()> {
    let resp = http
        .post(url)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .with_context(|| format!("POST {url}"))?;
    let status = resp.status();
    let text = resp.bytes().await.with_context(|| format!("POST {url}"))?;
    if !status.is_success() {
        bail!(
            "POST {url} answered {status}: {}",
            String::from_utf8_lossy(&text)
        );
    }
    Ok(())
}

impl Eventqueue {
    /// The same queues served by `other` too (another node over the same store).
    pub fn and_node(mut self, other: &Eventqueue) -> Self {
        self.nodes.push(other.addr);
        self
    }

    /// The base URL of node `i` (round robin).
    fn node_base(&self, i: usize) -> String {
        format!("http://{}", self.nodes[i % self.nodes.len()])
    }

    async fn create(&self, http: &reqwest::Client, task: &str) -> Result<()> {
        let body = format!("{{\"task_id\":\"{task}\",\"max_buffer_size\":{MAX_BUFFER}}}");
        post(http, &format!("{}/events/queues", self.base), body.into()).await
    }

    /// The enqueue path of every queue, parsed once (not per request).
    fn paths(&self) -> Result<Vec<hyper::Uri>> {
        self.tasks
            .iter()
            .map(|t| {
                let path = format!("/events/queues/{t}/events");
                path.parse().with_context(|| format!("parsing {path}"))
            })
            .collect()
    }

    /// `clients` HTTP clients, each with one request in flight, one event per request
    /// (`depth` = 1), or `depth` concurrent requests per client.
    pub async fn requests(&self, plan: &Plan, clients: usize, depth: usize) -> Result<Measure> {
        let body = Bytes::from(event_json(0));
        self.drive(plan, clients, depth, body, 1).await
    }

    /// 8 clients, each sending batches of 16 events, one request in flight.
    pub async fn batches(&self, plan: &Plan) -> Result<Measure> {
        let body = Bytes::from(batch_json(DEPTH));
        self.drive(plan, CLIENTS, 1, body, DEPTH as u64).await
    }

    /// 8 clients, each a WebSocket producer connection to one queue
    /// (`GET /events/queues/{task}/events/ws`) with 16 one-event frames unacknowledged: a
    /// sliding window, a new frame sent as each acknowledgement arrives.
    pub async fn websockets(&self, plan: &Plan) -> Result<Measure> {
        use futures_util::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::Message;
        let body: tokio_tungstenite::tungstenite::Utf8Bytes = event_json(0).into();
        let mut sockets = Vec::new();
        for c in 0..CLIENTS {
            let url = format!(
                "ws://{}/events/queues/{}/events/ws",
                self.addr,
                self.tasks[(c * 13) % STREAMS]
            );
            let (ws, _) = tokio_tungstenite::connect_async_with_config(&url, None, true)
                .await
                .with_context(|| format!("connecting to {url}"))?;
            sockets.push(ws);
        }
        let w = std::sync::Arc::new(Window::start(plan));
        let mut futures = Vec::new();
        for ws in sockets {
            let (w, body) = (w.clone(), body.clone());
            futures.push(async move {
                let (mut tx, mut rx) = ws.split();
                let mut t = Tally::new();
                let mut sent = std::collections::VecDeque::with_capacity(DEPTH);
                for _ in 0..DEPTH {
                    tx.feed(Message::Text(body.clone())).await?;
                    sent.push_back(Instant::now());
                }
                tx.flush().await?;
                while let Some(&start) = sent.front() {
                    let msg = rx
                        .next()
                        .await
                        .ok_or_else(|| anyhow!("the server closed the connection"))??;
                    let Message::Text(text) = msg else { continue };
                    if !text.as_str().contains("\"offsets\"") {
                        bail!("refused frame: {}", text.as_str());
                    }
                    sent.pop_front();
                    t.ack(&w, start, 1);
                    if w.open() {
                        tx.send(Message::Text(body.clone())).await?;
                        sent.push_back(Instant::now());
                    }
                }
                let _ = tx.close().await;
                Ok(t)
            });
        }
        Ok(Measure::from_tallies(
            drive::join_clients(futures).await?,
            plan,
        ))
    }

    async fn drive(
        &self,
        plan: &Plan,
        clients: usize,
        depth: usize,
        body: Bytes,
        per_request: u64,
    ) -> Result<Measure> {
        // Every request in flight has its own keep-alive connection, opened before the clock
        // starts.
        let mut conns = Vec::new();
        // On several nodes, connection `i` goes to node `i % n` and writes only the queues
        // `q` with `q % n` equal to it: each queue's producers stay on one node, as a load
        // balancer that routes a task's requests by its id keeps them (producers of one
        // queue on several nodes contend for its turn in Redis).
        let n = self.nodes.len();
        for c in 0..clients {
            for d in 0..depth {
                let node = (c * depth + d) % n;
                conns.push((c, d, node, Conn::open(self.nodes[node]).await?));
            }
        }
        let paths = self.paths()?;
        let w = std::sync::Arc::new(Window::start(plan));
        let mut futures = Vec::new();
        for (c, d, node, mut conn) in conns {
            let (w, paths, body) = (w.clone(), paths.clone(), body.clone());
            futures.push(async move {
                let mut t = Tally::new();
                let mut k = c * 37 + d * 7;
                while w.open() {
                    let start = Instant::now();
                    // One node: `k % STREAMS`, as before.
                    let q = (k * n + node) % STREAMS;
                    conn.post(&paths[q], body.clone()).await?;
                    t.ack(&w, start, per_request);
                    k += 1;
                }
                Ok(t)
            });
        }
        Ok(Measure::from_tallies(
            drive::join_clients(futures).await?,
            plan,
        ))
    }

    /// Fills queue `bench_replay` with `n` events (batches of 1000), then reads them back
    /// over one SSE stream from offset 0.
    pub async fn replay(&self, n: u64) -> Result<Measure> {
        let http = http_client()?;
        let task = "bench_replay";
        self.create(&http, task).await?;
        let url = format!("{}/events/queues/{task}/events", self.base);
        let mut left = n;
        while left > 0 {
            let k = left.min(1000);
            post(&http, &url, batch_json(k as usize).into()).await?;
            left -= k;
        }
        let start = Instant::now();
        let mut sse = Sse::open(
            &http,
            // The last node: on several nodes, one that did not write the events.
            &format!(
                "{}/events/workflows/{task}?from_offset=0",
                self.node_base(self.nodes.len() - 1)
            ),
        )
        .await?;
        let read = sse.count_events(n, Duration::from_secs(30)).await?;
        if read < n {
            bail!("the replay stream ended after {read} of {n} events");
        }
        let secs = start.elapsed().as_secs_f64();
        Ok(Measure {
            events: read,
            secs,
            events_per_s: read as f64 / secs,
            ..Default::default()
        })
    }

    /// One publisher (one event per request, on schedule) and `plan.subscribers` SSE streams
    /// on the same queue.
    pub async fn fanout(&self, plan: &Plan, rate: u64) -> Result<Measure> {
        let http = http_client()?;
        // A queue of its own per run, so a workload measured several times on one server
        // does not find the last run's queue.
        static RUNS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let run = RUNS.fetch_add(1, Ordering::Relaxed);
        let task = format!("bench_fanout{rate}_{run}");
        self.create(&http, &task).await?;
        let stream_path = format!("/events/workflows/{task}?from_offset=0");
        let mut subs = Subscribers::new();
        let sub_http = http_client()?;
        for i in 0..plan.subscribers {
            let (http, url) = (sub_http.clone(), self.node_base(i) + &stream_path);
            subs.spawn(|tally, ready| async move {
                let mut sse = Sse::open(&http, &url).await?;
                while let Some(frame) = sse.next_frame().await? {
                    if frame.starts_with(b"event: connected") {
                        ready.fetch_add(1, Ordering::SeqCst);
                    } else if frame.starts_with(b"id: ") {
                        tally
                            .lock()
                            .map_err(|_| anyhow!("poisoned"))?
                            .deliver(&frame);
                    }
                }
                Ok(())
            });
        }
        subs.wait_ready(Duration::from_secs(60)).await?;
        let path: hyper::Uri = format!("/events/queues/{task}/events")
            .parse()
            .context("parsing the enqueue path")?;
        let mut conn = Conn::open(self.addr).await?;
        let mut pacer = drive::Pacer::new(rate, plan.fanout_secs);
        while pacer.tick().await.is_some() {
            conn.post(&path, event_json(drive::now_us()).into()).await?;
        }
        let published = pacer.published();
        drive::settle(Duration::from_secs(5), || subs.all_received(published)).await;
        subs.finish(published, plan.fanout_secs).await
    }
}

/// One keep-alive HTTP/1.1 connection of a throughput workload: hyper's connection-level
/// client, whose connection runs in its own task fed by a channel (as a redis-rs multiplexed
/// connection does), with no pool or URL parsing per request.
pub(crate) struct Conn {
    send: hyper::client::conn::http1::SendRequest<http_body_util::Full<Bytes>>,
    host: hyper::header::HeaderValue,
}

impl Conn {
    pub(crate) async fn open(addr: std::net::SocketAddr) -> Result<Self> {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        tcp.set_nodelay(true).context("TCP_NODELAY")?;
        let (send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .context("HTTP/1.1 handshake")?;
        tokio::spawn(async move {
            // Ends when the connection is dropped; an error shows up in the next request.
            let _ = conn.await;
        });
        let host =
            hyper::header::HeaderValue::from_str(&addr.to_string()).context("host header")?;
        Ok(Conn { send, host })
    }

    /// POSTs `body` as JSON to `path` and reads the whole answer; fails unless it is a 2xx.
    pub(crate) async fn post(&mut self, path: &hyper::Uri, body: Bytes) -> Result<()> {
        use http_body_util::BodyExt;
        self.send.ready().await.context("connection closed")?;
        let req = hyper::Request::post(path.clone())
            .header(hyper::header::HOST, self.host.clone())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(http_body_util::Full::new(body))
            .context("building a request")?;
        let resp = self
            .send
            .send_request(req)
            .await
            .with_context(|| format!("POST {path}"))?;
        let status = resp.status();
        let text = resp
            .into_body()
            .collect()
            .await
            .with_context(|| format!("POST {path}"))?
            .to_bytes();
        if !status.is_success() {
            bail!(
                "POST {path} answered {status}: {}",
                String::from_utf8_lossy(&text)
            );
        }
        Ok(())
    }
}

/// Splits an SSE body into frames (text up to a blank line).
struct Sse {
    resp: reqwest::Response,
    buf: BytesMut,
    /// Where the search for the next blank line resumes (the bytes before it hold none).
    scanned: usize,
    blank_line: memchr::memmem::Finder<'static>,
}

impl Sse {
    async fn open(http: &reqwest::Client, url: &str) -> Result<Self> {
        let resp = http
            .get(url)
            .send()
            .await
            .with_context(|| format!("GET {url}"))?;
        if !resp.status().is_success() {
            bail!("GET {url} answered {}", resp.status());
        }
        Ok(Sse {
            resp,
            buf: BytesMut::new(),
            scanned: 0,
            blank_line: memchr::memmem::Finder::new(b"\n\n"),
        })
    }

    /// Appends the next chunk of the body; false at its end.
    async fn fill(&mut self) -> Result<bool> {
        match self.resp.chunk().await.context("reading an SSE stream")? {
            Some(chunk) => {
                self.buf.extend_from_slice(&chunk);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    async fn next_frame(&mut self) -> Result<Option<Bytes>> {
        loop {
            if let Some(pos) = self.blank_line.find(&self.buf[self.scanned..]) {
                let frame = self.buf.split_to(self.scanned + pos + 2).freeze();
                self.scanned = 0;
                return Ok(Some(frame));
            }
            self.scanned = self.buf.len().saturating_sub(1);
            if !self.fill().await? {
                return Ok(None);
            }
        }
    }

    /// Reads until `n` event frames (`id: …` first) have arrived or the stream ends, without
    /// copying frames out; returns how many arrived. Fails when no byte comes for `stall`.
    async fn count_events(&mut self, n: u64, stall: Duration) -> Result<u64> {
        let mut read = 0u64;
        loop {
            let mut start = 0;
            let mut from = self.scanned;
            while read < n {
                let Some(pos) = self.blank_line.find(&self.buf[from..]) else {
                    break;
                };
                let end = from + pos + 2;
                if self.buf[start..end].starts_with(b"id: ") {
                    read += 1;
                }
                start = end;
                from = end;
            }
            let _ = self.buf.split_to(start);
            self.scanned = self.buf.len().saturating_sub(1);
            if read >= n {
                return Ok(read);
            }
            match tokio::time::timeout(stall, self.fill()).await {
                Ok(Ok(true)) => {}
                Ok(Ok(false)) => return Ok(read),
                Ok(Err(e)) => return Err(e),
                Err(_) => bail!("replay stalled after {read} of {n} events"),
            }
        }
    }
}
