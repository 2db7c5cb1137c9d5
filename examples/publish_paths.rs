//! One-event publishes from many tasks of one program, four ways through the Rust client,
//! against an in-process server (its own runtime, default durability: fsync before the ack):
//! `Client::publish` (one request per event), `Client::coalescer` (concurrent publishes to a
//! queue share batch requests), `Client::pipeline` (the WebSocket producer connection) and
//! the producer helpers' `HttpSink` (one sink per queue shared by its tasks, as reporters of
//! parallel steps share it).
//!
//! ```text
//! cargo run --release --example publish_paths -- [CLIENTS] [TASKS_PER_CLIENT] [SECS]
//! ```
//!
//! Each client publishes to its own queue from `TASKS_PER_CLIENT` tasks, each awaiting its
//! event's answer before the next (defaults: 8 clients × 16 tasks, 3 s per way). Prints
//! events/s, the process's CPU per event (server and clients: one process), and for the
//! coalescer the events per request. `EQ_LINGER_US` sets the coalescer's and the sink's linger
//! (default 0). `EQ_WAYS` picks ways by name (e.g. `Sink,Coalesced`; default all four).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use eventqueue::client::Client;
use eventqueue::producer::{EventSink, HttpSink};
use eventqueue::server::{self, AppState, ServerConfig};
use eventqueue::{Config, QueueManager};
use serde_json::json;

fn event(i: u64) -> serde_json::Value {
    json!({"event_type": "progress", "current": 1, "total": 100, "step": "s",
           "details": {"i": i, "pad": "x".repeat(200)}})
}

/// The same event as [`event`], as a producer helper's payload.
fn payload(i: u64) -> eventqueue::Payload {
    eventqueue::ProgressEvent::new(1, 100)
        .step("s")
        .details(json!({"i": i, "pad": "x".repeat(200)}))
        .into()
}

#[derive(Clone, Copy, Debug)]
enum Way {
    Requests,
    Coalesced,
    Pipelined,
    Sink,
}

fn main() {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("numbers: CLIENTS TASKS SECS"))
        .collect();
    let clients = args.first().copied().unwrap_or(8);
    let tasks = args.get(1).copied().unwrap_or(16);
    let secs = args.get(2).copied().unwrap_or(3);
    let dir = tempfile::tempdir().unwrap();
    let srt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let crt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let path = dir.path().to_path_buf();
    let addr = srt.block_on(async move {
        let manager = QueueManager::open(Config::new(path)).await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut config = ServerConfig::default();
        config.cleanup_interval = None;
        config.max_connections_per_ip = config.max_connections;
        tokio::spawn(server::serve(
            AppState::new(manager, config),
            listener,
            std::future::pending(),
        ));
        addr
    });
    let ways = std::env::var("EQ_WAYS").unwrap_or_default();
    for (round, way) in [Way::Requests, Way::Coalesced, Way::Pipelined, Way::Sink]
        .into_iter()
        .enumerate()
        .filter(|(_, w)| ways.is_empty() || ways.split(',').any(|n| n == format!("{w:?}")))
    {
        crt.block_on(run(addr, way, round, clients, tasks, secs));
    }
}

async fn run(
    addr: std::net::SocketAddr,
    way: Way,
    round: usize,
    clients: u64,
    tasks: u64,
    secs: u64,
) {
    let client = Client::new(format!("http://{addr}")).unwrap();
    let done = Arc::new(AtomicU64::new(0));
    let mut handles = Vec::new();
    let mut coalescers = Vec::new();
    let mut sinks = Vec::new();
    let end = Instant::now() + Duration::from_secs(secs);
    for c in 0..clients {
        let task = format!("q{round}-{c}");
        client
            .create_queue(&task, &Default::default())
            .await
            .unwrap();
        let coalescer = client
            .coalescer(&task)
            .unwrap()
            .with_linger(Duration::from_micros(linger_us()));
        coalescers.push(coalescer.clone());
        let pipeline = match way {
            Way::Pipelined => Some(client.pipeline(&task).await.unwrap()),
            _ => None,
        };
        let sink = HttpSink::from_client(client.clone(), &eventqueue::TaskId::new(&task).unwrap())
            .with_linger(Duration::from_micros(linger_us()));
        sinks.push(sink.clone());
        for _ in 0..tasks {
            let (client, task, done) = (client.clone(), task.clone(), done.clone());
            let (coalescer, pipeline, sink) = (coalescer.clone(), pipeline.clone(), sink.clone());
            handles.push(tokio::spawn(async move {
                let mut i = 0;
                while Instant::now() < end {
                    let e = event(i);
                    match (way, &pipeline) {
                        (Way::Requests, _) => drop(client.publish(&task, &e).await.unwrap()),
                        (Way::Coalesced, _) => drop(coalescer.publish(&e).await.unwrap()),
                        (Way::Pipelined, Some(p)) => drop(p.publish(&e).await.unwrap()),
                        (Way::Pipelined, None) => unreachable!(),
                        (Way::Sink, _) => drop(sink.send(vec![payload(i)]).await.unwrap()),
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                }
            }));
        }
    }
    let start = Instant::now();
    let cpu0 = cpu_us();
    for h in handles {
        h.await.unwrap();
    }
    let elapsed = start.elapsed().as_secs_f64();
    let cpu = cpu_us().saturating_sub(cpu0);
    let events = done.load(Ordering::Relaxed);
    let requests: u64 = match way {
        Way::Sink => sinks.iter().map(|s| s.batches_sent()).sum(),
        _ => coalescers.iter().map(|c| c.requests()).sum(),
    };
    let per_request = match way {
        Way::Coalesced | Way::Sink if requests > 0 => {
            format!(", {:.1} events/request", events as f64 / requests as f64)
        }
        _ => String::new(),
    };
    println!(
        "{way:?}: {clients} clients x {tasks} tasks: {:.0} events/s, {:.1} µs CPU/event \
         (server + client){per_request}",
        events as f64 / elapsed,
        cpu as f64 / events.max(1) as f64
    );
}

/// The coalescer's linger, from `EQ_LINGER_US` (default 0).
fn linger_us() -> u64 {
    std::env::var("EQ_LINGER_US")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// CPU time of this process so far (user + system), in µs, from `/proc/self/stat`.
fn cpu_us() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let tck = 100; // USER_HZ on Linux
    (ticks(11) + ticks(12)) * 1_000_000 / tck
}
