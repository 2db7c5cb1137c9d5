//! The loopback HTTP steps of `eventqueue bench`: the real server on `127.0.0.1`, in this
//! process, measured with clients that do little work of their own (SSE clients are raw TCP
//! readers that only pick out `id:` lines), so the figures are the server's.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Barrier, oneshot};

use super::{Latency, bench_config, event, task, tenant};
use crate::client::{Client, CreateQueue};
use crate::server::{self, AppState, ServerConfig};
use crate::{Durability, Error, QueueManager, QueueOptions, Result};

/// Enqueues over HTTP: `clients` each with one request in flight, `batch` events per request.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct HttpEnqueueFigures {
    /// Concurrent HTTP clients.
    pub clients: usize,
    /// Events per request.
    pub batch: usize,
    /// Acknowledged (durable) events per second.
    pub events_per_sec: f64,
    /// Request → response.
    pub request: Latency,
}

/// SSE fan-out over HTTP.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct HttpFanoutFigures {
    /// SSE clients of the one queue.
    pub clients: usize,
    /// Events published, at 1000 events/s.
    pub events: u64,
    /// Deliveries missing at the end (must be 0).
    pub lost: u64,
    /// Enqueue start → the client has read the frame (includes the fsync'd commit).
    pub latency: Latency,
}

/// A server on loopback and the manager behind it.
struct Running {
    addr: SocketAddr,
    manager: QueueManager,
    stop: oneshot::Sender<()>,
    served: tokio::task::JoinHandle<std::result::Result<(), server::ServeError>>,
}

impl Running {
    async fn start(dir: &Path, durability: Durability) -> Result<Self> {
        let manager = QueueManager::open(bench_config(dir, durability)).await?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(Error::storage)?;
        let addr = listener.local_addr().map_err(Error::storage)?;
        let config = ServerConfig {
            cleanup_interval: None,
            max_sse_streams: 20_000,
            max_sse_streams_per_tenant: 20_000,
            // Every client is on loopback: one address.
            max_connections: 24_000,
            max_connections_per_ip: 24_000,
            ..ServerConfig::default()
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let served = tokio::spawn(server::serve(
            AppState::new(manager.clone(), config),
            listener,
            async move {
                let _ = stopped.await;
            },
        ));
        Ok(Self {
            addr,
            manager,
            stop,
            served,
        })
    }

    fn client(&self) -> Result<Client> {
        Client::new(format!("http://{}", self.addr)).map_err(Error::storage)
    }

    async fn stop(self) -> Result<()> {
        let _ = self.stop.send(());
        self.served
            .await
            .map_err(Error::storage)?
            .map_err(Error::storage)
    }
}

/// A ~300-byte progress event as a producer posts it.
fn body(i: u64) -> Value {
    json!({"event_type": "progress", "current": i % 100, "total": 100, "step": "processing_video",
           "details": {"video": "sample_video_0001.mp4", "stage": "embedding",
                       "pad": "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}})
}

/// `clients` HTTP producers, each posting `per_client` requests of `batch` events, one in
/// flight, spread over `streams` queues.
pub(super) async fn enqueue(
    dir: &Path,
    clients: usize,
    batch: usize,
    per_client: usize,
    streams: usize,
) -> Result<HttpEnqueueFigures> {
    let server = Running::start(dir, Durability::Immediate).await?;
    let client = server.client()?;
    let queues = clients.min(streams).max(1);
    for i in 0..queues {
        client
            .create_queue(&format!("stream-{i}"), &CreateQueue::default())
            .await
            .map_err(Error::storage)?;
    }
    let start = Instant::now();
    let mut handles = Vec::new();
    for c in 0..clients {
        let client = client.clone();
        let task = format!("stream-{}", c % queues);
        handles.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(per_client);
            for r in 0..per_client {
                let events: Vec<Value> = (0..batch).map(|i| body((r * batch + i) as u64)).collect();
                let t = Instant::now();
                client
                    .publish_batch(&task, &events)
                    .await
                    .map_err(Error::storage)?;
                lat.push(t.elapsed());
            }
            Result::Ok(lat)
        }));
    }
    let mut all = Vec::new();
    for h in handles {
        all.extend(h.await.map_err(Error::storage)??);
    }
    let elapsed = start.elapsed().as_secs_f64();
    server.stop().await?;
    Ok(HttpEnqueueFigures {
        clients,
        batch,
        events_per_sec: (all.len() * batch) as f64 / elapsed,
        request: Latency::of(all),
    })
}

/// `n` events stored in one queue, then read over SSE by one client from offset 0: events/s.
pub(super) async fn replay(dir: &Path, n: u64) -> Result<f64> {
    let server = Running::start(dir, Durability::Immediate).await?;
    let (t, k) = (tenant(), task("replay".into())?);
    let q = server
        .manager
        .create_queue(&t, &k, QueueOptions::default())
        .await?;
    let mut written = 0;
    while written < n {
        let batch: Vec<_> = (0..1000.min(n - written))
            .map(|i| event(&t, &k, i))
            .collect();
        written += batch.len() as u64;
        q.enqueue_batch(batch).await?;
    }
    let connected = Arc::new(Barrier::new(1));
    let start = Instant::now();
    let (count, _) = sse_client(
        server.addr,
        "/events/workflows/replay".into(),
        n - 1,
        connected,
        None,
    )
    .await?;
    let rate = count as f64 / start.elapsed().as_secs_f64();
    server.stop().await?;
    if count < n {
        return Err(Error::storage(format!(
            "SSE replay delivered {count} of {n} events"
        )));
    }
    Ok(rate)
}

/// `clients` SSE clients of one queue while `n` events are published at 1000 events/s.
pub(super) async fn fanout(dir: &Path, clients: usize, n: u64) -> Result<HttpFanoutFigures> {
    let server = Running::start(dir, Durability::Immediate).await?;
    let (t, k) = (tenant(), task("fanout".into())?);
    let q = server
        .manager
        .create_queue(&t, &k, QueueOptions::default())
        .await?;
    let times = Arc::new(SendTimes {
        epoch: Instant::now(),
        at: (0..n).map(|_| AtomicU64::new(0)).collect(),
    });
    let connected = Arc::new(Barrier::new(clients + 1));
    let readers: Vec<_> = (0..clients)
        .map(|_| {
            tokio::spawn(sse_client(
                server.addr,
                "/events/workflows/fanout".into(),
                n - 1,
                connected.clone(),
                Some(times.clone()),
            ))
        })
        .collect();
    tokio::time::timeout(Duration::from_secs(60), connected.wait())
        .await
        .map_err(|_| Error::storage("SSE clients did not all connect within 60 s"))?;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for i in 0..n {
        tick.tick().await;
        let sent = times.epoch.elapsed().as_micros() as u64;
        times.at[i as usize].store(sent.max(1), Ordering::Relaxed);
        q.enqueue(event(&t, &k, i)).await?;
    }
    let mut lost = 0;
    let mut samples = Vec::with_capacity(clients * n as usize);
    for r in readers {
        let (count, received) = tokio::time::timeout(Duration::from_secs(60), r)
            .await
            .map_err(|_| Error::storage("an SSE client did not finish within 60 s"))?
            .map_err(Error::storage)??;
        lost += n.saturating_sub(count);
        for (offset, at) in received {
            if let Some(sent) = times.at.get(offset as usize) {
                let sent = sent.load(Ordering::Relaxed);
                samples.push(Duration::from_micros(at.saturating_sub(sent)));
            }
        }
    }
    server.stop().await?;
    Ok(HttpFanoutFigures {
        clients,
        events: n,
        lost,
        latency: Latency::of(samples),
    })
}

/// When each offset was published, in microseconds since `epoch` (0 = not yet).
#[derive(Debug)]
pub struct SendTimes {
    /// The clock's zero.
    pub epoch: Instant,
    /// Publish time of each offset.
    pub at: Vec<AtomicU64>,
}

/// Reads one SSE stream (`path`, e.g. `/events/workflows/t`) over a raw TCP connection until
/// it has seen offset `last`, picking out only `id:` lines, so that the client costs little
/// next to the server. Waits on `connected` once the server's `connected` frame arrived.
/// Returns how many events it read and, with `times`, when it read each (microseconds since
/// `times.epoch`).
///
/// # Errors
///
/// A failed connection or read, or a malformed `id:` line.
pub async fn sse_client(
    addr: SocketAddr,
    path: String,
    last: u64,
    connected: Arc<Barrier>,
    times: Option<Arc<SendTimes>>,
) -> Result<(u64, Vec<(u64, u64)>)> {
    let io = |e: std::io::Error| Error::storage(format!("SSE client: {e}"));
    let mut stream = TcpStream::connect(addr).await.map_err(io)?;
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: bench\r\nAccept: text/event-stream\r\n\r\n");
    stream.write_all(request.as_bytes()).await.map_err(io)?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut pending: Vec<u8> = Vec::with_capacity(128 * 1024);
    let mut seen_connected = false;
    let mut count = 0u64;
    let mut received = Vec::new();
    loop {
        let n = stream.read(&mut buf).await.map_err(io)?;
        if n == 0 {
            break;
        }
        pending.extend_from_slice(&buf[..n]);
        let Some(end) = pending.iter().rposition(|b| *b == b'\n') else {
            continue;
        };
        let mut done = false;
        for line in pending[..end].split(|b| *b == b'\n') {
            if let Some(id) = line.strip_prefix(b"id: ") {
                let offset: u64 = std::str::from_utf8(id)
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
                    .ok_or_else(|| Error::storage("SSE client: a bad id line"))?;
                count += 1;
                if let Some(t) = &times {
                    received.push((offset, t.epoch.elapsed().as_micros() as u64));
                }
                done |= offset == last;
            } else if !seen_connected && line.starts_with(b"event: connected") {
                seen_connected = true;
                connected.wait().await;
            }
        }
        pending.drain(..=end);
        if done {
            break;
        }
    }
    Ok((count, received))
}
