//! Load figures for the HTTP server, over loopback, server and clients in one process (on two
//! separate runtimes).
//!
//! ```text
//! cargo run --release --example http_load -- fanout   --clients 1000 --rate 500 --secs 10
//! cargo run --release --example http_load -- saturate --clients 1000 --events 20000 --batch 100
//! cargo run --release --example http_load -- raw      --clients 1000 --events 20000
//! cargo run --release --example http_load -- enqueue  --clients 8 --batch 100 --secs 10
//! ```
//!
//! - `fanout`: one producer publishes `rate` events/s (one per request) to one queue watched by
//!   `clients` SSE streams; reports events lost and publish → client latency percentiles (the
//!   publish request starts before the commit, so this includes the fsync'd commit).
//! - `saturate`: the producer publishes `events` in batches as fast as it can; reports the total
//!   events/s delivered to all clients.
//! - `raw`: the same clients against a bare axum SSE broadcast of pre-rendered frames (no store,
//!   no subscriptions): the ceiling of this machine for the same client work.
//! - `enqueue`: `clients` producers each POST batches to their own queue; reports events/s.
//!
//! SSE clients are raw TCP readers that only pick out `id:` lines, so the client side costs
//! little next to the server.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::routing::get;
use clap::{Parser, Subcommand};
use eventqueue::bench::http::{SendTimes, sse_client};
use eventqueue::server::{self, AppState, ServerConfig};
use eventqueue::{Config, QueueManager};
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::sync::{Barrier, broadcast, oneshot};

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Rate-limited fan-out with latency.
    Fanout {
        #[arg(long, default_value_t = 1000)]
        clients: usize,
        #[arg(long, default_value_t = 500)]
        rate: u64,
        #[arg(long, default_value_t = 10)]
        secs: u64,
    },
    /// Fan-out at saturation.
    Saturate {
        #[arg(long, default_value_t = 1000)]
        clients: usize,
        #[arg(long, default_value_t = 20000)]
        events: u64,
        #[arg(long, default_value_t = 100)]
        batch: u64,
    },
    /// Bare axum SSE broadcast baseline.
    Raw {
        #[arg(long, default_value_t = 1000)]
        clients: usize,
        #[arg(long, default_value_t = 20000)]
        events: u64,
    },
    /// Batched HTTP enqueue.
    Enqueue {
        #[arg(long, default_value_t = 8)]
        clients: usize,
        #[arg(long, default_value_t = 100)]
        batch: u64,
        #[arg(long, default_value_t = 10)]
        secs: u64,
    },
}

fn runtime(threads: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .unwrap()
}

/// Starts the eventqueue server on its own runtime; returns its address and a stopper.
fn start_server(
    rt: &tokio::runtime::Runtime,
    dir: &std::path::Path,
) -> (SocketAddr, oneshot::Sender<()>) {
    let dir = dir.to_path_buf();
    rt.block_on(async move {
        let manager = QueueManager::open(Config::new(dir)).await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut config = ServerConfig::default();
        config.cleanup_interval = None;
        // Every client is on loopback: one address.
        config.max_connections_per_ip = config.max_connections;
        let (tx, rx) = oneshot::channel::<()>();
        tokio::spawn(server::serve(
            AppState::new(manager, config),
            listener,
            async move {
                let _ = rx.await;
            },
        ));
        (addr, tx)
    })
}

/// A bare SSE broadcast server: every frame sent on `tx` goes to every connected client.
fn start_raw_server(
    rt: &tokio::runtime::Runtime,
    capacity: usize,
) -> (SocketAddr, broadcast::Sender<Bytes>) {
    rt.block_on(async move {
        let (tx, _) = broadcast::channel::<Bytes>(capacity);
        let sender = tx.clone();
        let app = axum::Router::new().route(
            "/events/workflows/{id}",
            get(move || {
                let rx = sender.subscribe();
                async move {
                    let connected = futures_util::stream::once(async {
                        Ok::<_, std::convert::Infallible>(Bytes::from_static(
                            b"event: connected\ndata: {}\n\n",
                        ))
                    });
                    let frames = futures_util::stream::unfold(rx, |mut rx| async move {
                        loop {
                            match rx.recv().await {
                                Ok(frame) => return Some((Ok(frame), rx)),
                                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                                Err(broadcast::error::RecvError::Closed) => return None,
                            }
                        }
                    });
                    axum::response::Response::builder()
                        .header("content-type", "text/event-stream")
                        .body(Body::from_stream(connected.chain(frames)))
                        .unwrap()
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (addr, tx)
    })
}

/// What a client reports: events seen and, when timed, `(offset, receive time)` pairs.
type ClientResult = eventqueue::Result<(u64, Vec<(u64, u64)>)>;

async fn post(client: &reqwest::Client, url: &str, body: &Value) -> Value {
    let r = client.post(url).json(body).send().await.unwrap();
    assert!(
        r.status().is_success(),
        "{}: {}",
        r.status(),
        r.text().await.unwrap()
    );
    r.json().await.unwrap()
}

fn working(i: u64) -> Value {
    json!({"event_type": "progress", "current": i, "total": 1_000_000, "step": "load",
           "details": {"item": format!("item-{i}")}})
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

fn connect_all(
    crt: &tokio::runtime::Runtime,
    addr: SocketAddr,
    clients: usize,
    last: u64,
    times: Option<Arc<SendTimes>>,
) -> (Vec<tokio::task::JoinHandle<ClientResult>>, Arc<Barrier>) {
    let connected = Arc::new(Barrier::new(clients + 1));
    let handles = (0..clients)
        .map(|_| {
            crt.spawn(sse_client(
                addr,
                "/events/workflows/bench".into(),
                last,
                connected.clone(),
                times.clone(),
            ))
        })
        .collect();
    (handles, connected)
}

fn main() {
    let args = Args::parse();
    let srt = runtime(2);
    let crt = runtime(2);
    let dir = tempfile::tempdir().unwrap();
    match args.mode {
        Mode::Fanout {
            clients,
            rate,
            secs,
        } => {
            let (addr, stop) = start_server(&srt, dir.path());
            let total = rate * secs;
            let http = reqwest::Client::new();
            let base = format!("http://{addr}/events/queues");
            crt.block_on(post(
                &http,
                &base,
                &json!({"task_id": "bench", "max_buffer_size": total + 10}),
            ));
            let times = Arc::new(SendTimes {
                epoch: Instant::now(),
                at: (0..=total).map(|_| AtomicU64::new(0)).collect(),
            });
            let (handles, connected) = connect_all(&crt, addr, clients, total, Some(times.clone()));
            let url = format!("{base}/bench/events");
            let start = crt.block_on(async {
                connected.wait().await;
                let start = Instant::now();
                let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
                let mut posts = Vec::new();
                // One request per tick, without waiting for the previous one: the rate holds
                // whatever a request's latency.
                for i in 0..total {
                    tick.tick().await;
                    let (http, url, times) = (http.clone(), url.clone(), times.clone());
                    posts.push(tokio::spawn(async move {
                        let sent = times.epoch.elapsed().as_micros() as u64;
                        let reply = post(&http, &url, &working(i)).await;
                        let offset = reply["offsets"][0].as_u64().unwrap();
                        times.at[offset as usize].store(sent, Ordering::Release);
                    }));
                }
                for p in posts {
                    p.await.unwrap();
                }
                // The terminal event last, so that it is offset `total` and ends the streams.
                let sent = times.epoch.elapsed().as_micros() as u64;
                post(
                    &http,
                    &url,
                    &json!({"event_type": "complete", "result": {}}),
                )
                .await;
                times.at[total as usize].store(sent, Ordering::Release);
                start
            });
            let mut delivered = 0;
            let mut lat = Vec::new();
            for h in handles {
                let (n, received) = crt.block_on(h).unwrap().unwrap();
                delivered += n;
                lat.extend(received.into_iter().map(|(offset, at)| {
                    at.saturating_sub(times.at[offset as usize].load(Ordering::Acquire)) as u32
                }));
            }
            let elapsed = start.elapsed();
            lat.sort_unstable();
            let expected = (total + 1) * clients as u64;
            println!(
                "| fanout | {clients} clients | {rate} ev/s for {secs} s | delivered {delivered}/{expected} (lost {}) | publish→client p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms | {:.1} s |",
                expected - delivered,
                percentile(&lat, 0.5),
                percentile(&lat, 0.99),
                percentile(&lat, 1.0),
                elapsed.as_secs_f64()
            );
            let _ = stop.send(());
        }
        Mode::Saturate {
            clients,
            events,
            batch,
        } => {
            let (addr, stop) = start_server(&srt, dir.path());
            let http = reqwest::Client::new();
            let base = format!("http://{addr}/events/queues");
            crt.block_on(post(
                &http,
                &base,
                &json!({"task_id": "bench", "max_buffer_size": events + 10}),
            ));
            let last = events - 1;
            let (handles, connected) = connect_all(&crt, addr, clients, last, None);
            let url = format!("{base}/bench/events");
            let (start, published) = crt.block_on(async {
                connected.wait().await;
                let start = Instant::now();
                let mut i = 0;
                while i < events {
                    let n = batch.min(events - i);
                    let evs: Vec<Value> = (i..i + n).map(working).collect();
                    post(&http, &url, &json!({ "events": evs })).await;
                    i += n;
                }
                (start, start.elapsed())
            });
            let mut delivered = 0;
            for h in handles {
                delivered += crt.block_on(h).unwrap().unwrap().0;
            }
            let elapsed = start.elapsed();
            println!(
                "| saturate | {clients} clients | {events} events in batches of {batch} | published in {:.2} s ({:.0} ev/s) | delivered {delivered} in {:.2} s = {:.0} events/s |",
                published.as_secs_f64(),
                events as f64 / published.as_secs_f64(),
                elapsed.as_secs_f64(),
                delivered as f64 / elapsed.as_secs_f64()
            );
            let _ = stop.send(());
        }
        Mode::Raw { clients, events } => {
            let (addr, tx) = start_raw_server(&srt, events as usize + 16);
            let (handles, connected) = connect_all(&crt, addr, clients, events - 1, None);
            // Frames shaped like the eventqueue's, rendered once.
            let frames: Vec<Bytes> = (0..events)
                .map(|i| {
                    let mut ev = working(i);
                    ev["offset"] = json!(i);
                    Bytes::from(format!("id: {i}\nevent: progress\ndata: {ev}\n\n"))
                })
                .collect();
            let start = crt.block_on(async {
                connected.wait().await;
                let start = Instant::now();
                for f in frames {
                    let _ = tx.send(f);
                    tokio::task::yield_now().await;
                }
                start
            });
            let mut delivered = 0;
            for h in handles {
                delivered += crt.block_on(h).unwrap().unwrap().0;
            }
            let elapsed = start.elapsed();
            println!(
                "| raw axum broadcast | {clients} clients | {events} events | delivered {delivered} in {:.2} s = {:.0} events/s |",
                elapsed.as_secs_f64(),
                delivered as f64 / elapsed.as_secs_f64()
            );
        }
        Mode::Enqueue {
            clients,
            batch,
            secs,
        } => {
            let (addr, stop) = start_server(&srt, dir.path());
            let base = format!("http://{addr}/events/queues");
            let count = Arc::new(AtomicU64::new(0));
            let start = Instant::now();
            let deadline = start + Duration::from_secs(secs);
            let handles: Vec<_> = (0..clients)
                .map(|c| {
                    let base = base.clone();
                    let count = count.clone();
                    crt.spawn(async move {
                        let http = reqwest::Client::new();
                        let task = format!("producer-{c}");
                        post(&http, &base, &json!({"task_id": task})).await;
                        let url = format!("{base}/{task}/events");
                        let mut i = 0;
                        while Instant::now() < deadline {
                            let evs: Vec<Value> = (i..i + batch).map(working).collect();
                            post(&http, &url, &json!({ "events": evs })).await;
                            i += batch;
                            count.fetch_add(batch, Ordering::Relaxed);
                        }
                    })
                })
                .collect();
            for h in handles {
                crt.block_on(h).unwrap();
            }
            let elapsed = start.elapsed();
            let n = count.load(Ordering::Relaxed);
            println!(
                "| enqueue | {clients} clients | batches of {batch} | {n} events in {:.2} s = {:.0} events/s |",
                elapsed.as_secs_f64(),
                n as f64 / elapsed.as_secs_f64()
            );
            let _ = stop.send(());
        }
    }
    // Give the server a moment to shut down cleanly.
    srt.block_on(async { tokio::time::sleep(Duration::from_millis(200)).await });
}
