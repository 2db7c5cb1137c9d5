//! Process kill: the real `eventqueue serve` binary under concurrent HTTP producers is killed
//! with SIGKILL at a random moment, restarted on the same data directory, and must hold every
//! acknowledged event at its offset with the content that was sent, with dense offsets and no
//! duplicates (apache/iggy's crash-durability method). The requests in flight at the kill are
//! then retried with the same event ids: each gets an offset, none creates a duplicate.
//! One producer sends its events without ids (the server derives them from the offsets, and
//! indexes nothing): after each restart, posting such a stored event again with the id the
//! server gave it must report its offset and append nothing.
//!
//! 3 kill cycles by default; `EVENTQUEUE_KILL_CYCLES=n` runs more, `EVENTQUEUE_KILL_SEED=s`
//! replays a run (the seed is printed).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const QUEUES: [&str; 3] = ["kq0", "kq1", "kq2"];
const PRODUCERS: u64 = 6;
/// Longest wait for anything expected; only guards against hangs.
const HANG_GUARD: Duration = Duration::from_secs(20);

/// What the server acknowledged: (queue, offset) → (event id, event JSON as sent).
type Acked = BTreeMap<(String, u64), (String, Value)>;

/// A request: its queue and events.
type Request = (String, Vec<Value>);

struct Server {
    child: Child,
    base: String,
}

impl Server {
    /// Starts `eventqueue serve` on a port the system picks (`--bind 127.0.0.1:0`, so no other
    /// process can take it between a probe and the bind) and reads the address from the line
    /// the server logs once it listens.
    async fn start(dir: &Path) -> Server {
        let log_path = dir.join("server.log");
        // The log is appended across restarts: this start's lines begin here.
        let from = std::fs::metadata(&log_path).map_or(0, |m| m.len() as usize);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_eventqueue"))
            .arg("serve")
            .arg("--data-dir")
            .arg(dir.join("data"))
            .arg("--bind")
            .arg("127.0.0.1:0")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("cannot start eventqueue serve");
        let mut server = Server {
            child,
            base: String::new(),
        };
        let started = Instant::now();
        let log_text = || {
            let text = std::fs::read(&log_path).unwrap_or_default();
            String::from_utf8_lossy(text.get(from..).unwrap_or_default()).into_owned()
        };
        loop {
            let listening = log_text().lines().find_map(|l| {
                let (_, rest) = l.split_once("eventqueue listening on ")?;
                rest.split_whitespace().next().map(str::to_owned)
            });
            if let Some(base) = listening {
                server.base = base;
                break;
            }
            assert!(
                started.elapsed() < HANG_GUARD,
                "the server did not log its address; log:\n{}",
                log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        loop {
            if let Ok(r) = client().get(server.url("/healthz")).send().await
                && r.status().is_success()
            {
                return server;
            }
            assert!(
                started.elapsed() < HANG_GUARD,
                "the server did not come up; log:\n{}",
                log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// SIGKILL (what `Child::kill` sends on Unix), then reap.
    fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(HANG_GUARD)
        .build()
        .unwrap()
}

/// The producer that sends its events without `event_id`.
const NO_IDS: u64 = 0;

/// A progress event whose every field is chosen by the producer (timestamp included), so the
/// stored JSON must equal it field by field. `id` is also in `details.id`, which tracks the
/// event when the server chooses its `event_id` (see [`without_id`]).
fn event(id: &str, n: u64) -> Value {
    json!({
        "event_id": id,
        "event_type": "progress",
        "timestamp": format!("2026-11-28T02:31:45.{:06}Z", n % 1_000_000),
        "current": n % 1000,
        "total": 1000,
        "percentage": (n % 1000) as f64 / 10.0,
        "step": format!("step_{id}"),
        "details": {"id": id, "n": n, "pad": "x".repeat((n % 9) as usize * 50)},
    })
}

/// `ev` without its `event_id`: the server then derives one from the offset.
fn without_id(mut ev: Value) -> Value {
    ev.as_object_mut().unwrap().remove("event_id");
    ev
}

/// Posts `events` to `queue`; their offsets if the server acknowledged them.
async fn post(
    http: &reqwest::Client,
    base: &str,
    queue: &str,
    events: &[Value],
) -> Option<Vec<u64>> {
    let body = if events.len() == 1 {
        events[0].clone()
    } else {
        json!({ "events": events })
    };
    let r = http
        .post(format!("{base}/events/queues/{queue}/events"))
        .json(&body)
        .send()
        .await
        .ok()?;
    if !r.status().is_success() {
        return None;
    }
    let v: Value = r.json().await.ok()?;
    let offsets: Vec<u64> = v["offsets"]
        .as_array()?
        .iter()
        .map(|o| o.as_u64().unwrap())
        .collect();
    assert_eq!(offsets.len(), events.len(), "one offset per event");
    Some(offsets)
}

fn record(acked: &Mutex<Acked>, queue: &str, offsets: &[u64], events: &[Value]) {
    let mut acked = acked.lock().unwrap();
    for (off, ev) in offsets.iter().zip(events) {
        let id = ev["details"]["id"].as_str().unwrap().to_string();
        let key = (queue.to_string(), *off);
        if let Some((prev, _)) = acked.get(&key) {
            assert_eq!(
                prev, &id,
                "{queue}: offset {off} acknowledged for two events"
            );
        } else {
            acked.insert(key, (id, ev.clone()));
        }
    }
}

/// Reads every event of `queue` over SSE: offset → stored JSON.
async fn read_all(server: &Server, queue: &str) -> BTreeMap<u64, Value> {
    let http = client();
    let latest = http
        .get(server.url(&format!("/events/queues/{queue}/offset")))
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap()["offset"]
        .as_u64()
        .unwrap();
    let mut out = BTreeMap::new();
    if latest == 0 {
        return out;
    }
    let mut resp = http
        .get(server.url(&format!("/events/workflows/{queue}?from_offset=0")))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{}", resp.status());
    let mut buf: Vec<u8> = Vec::new();
    while (out.len() as u64) < latest {
        let chunk = tokio::time::timeout(HANG_GUARD, resp.chunk())
            .await
            .expect("the stream stalled")
            .unwrap()
            .expect("the stream ended early");
        buf.extend_from_slice(&chunk);
        while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
            let frame: Vec<u8> = buf.drain(..end + 2).collect();
            let text = String::from_utf8(frame).unwrap();
            let (mut id, mut data, mut kind) = (None, None, None);
            for line in text.lines() {
                if let Some(v) = line.strip_prefix("id: ") {
                    id = Some(v.parse::<u64>().unwrap());
                } else if let Some(v) = line.strip_prefix("data: ") {
                    data = Some(v.to_string());
                } else if let Some(v) = line.strip_prefix("event: ") {
                    kind = Some(v.to_string());
                }
            }
            match (id, data) {
                (Some(id), Some(data)) => {
                    let v: Value = serde_json::from_str(&data).unwrap();
                    assert_eq!(v["offset"].as_u64(), Some(id));
                    assert!(
                        out.insert(id, v).is_none(),
                        "{queue}: offset {id} sent twice"
                    );
                }
                _ => assert_ne!(kind.as_deref(), Some("gap"), "{queue}: a gap in {text}"),
            }
        }
    }
    out
}

/// Every acknowledged event present and identical, offsets dense, no id twice.
async fn verify(server: &Server, acked: &Acked, cycle: u64) -> HashMap<String, u64> {
    let mut latest = HashMap::new();
    for queue in QUEUES {
        let stored = read_all(server, queue).await;
        let n = stored.len() as u64;
        assert_eq!(
            stored.keys().copied().collect::<Vec<_>>(),
            (0..n).collect::<Vec<_>>(),
            "cycle {cycle}: {queue}: offsets are not dense"
        );
        let mut ids = HashSet::new();
        for v in stored.values() {
            let id = v["event_id"].as_str().unwrap();
            assert!(
                ids.insert(id.to_string()),
                "cycle {cycle}: {queue}: {id} stored twice"
            );
        }
        for ((q, off), (id, sent)) in
            acked.range((queue.to_string(), 0)..=(queue.to_string(), u64::MAX))
        {
            let Some(got) = stored.get(off) else {
                panic!("cycle {cycle}: {q}: acknowledged {id} at {off} is lost ({n} stored)");
            };
            for (field, value) in sent.as_object().unwrap() {
                assert_eq!(
                    &got[field], value,
                    "cycle {cycle}: {q}: {id} at {off}: field {field} differs"
                );
            }
        }
        latest.insert(queue.to_string(), n);
    }
    latest
}

/// Posts acknowledged events that were sent without an id again, each with the `event_id` the
/// server stored for it: every one reports its offset, and nothing is appended.
async fn repost_server_ids(server: &Server, acked: &Acked, cycle: u64) {
    let http = client();
    let mut reposted = 0;
    for queue in QUEUES {
        let stored = read_all(server, queue).await;
        let latest = stored.len() as u64;
        // The newest 100 such events of the queue: the ones the kill was closest to.
        let without_ids: Vec<_> = acked
            .range((queue.to_string(), 0)..=(queue.to_string(), u64::MAX))
            .filter(|(_, (_, sent))| sent.get("event_id").is_none())
            .collect();
        for ((_, off), (_, sent)) in without_ids.into_iter().rev().take(100) {
            let mut again = sent.clone();
            again["event_id"] = stored[off]["event_id"].clone();
            let offsets = post(&http, &server.base, queue, &[again])
                .await
                .expect("a repost failed");
            assert_eq!(
                offsets,
                vec![*off],
                "cycle {cycle}: {queue}: the server's id of offset {off} was not recognised"
            );
            reposted += 1;
        }
        assert_eq!(
            read_all(server, queue).await.len() as u64,
            latest,
            "cycle {cycle}: {queue}: a repost appended"
        );
    }
    assert!(
        reposted > 0,
        "cycle {cycle}: no event was sent without an id"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_events_survive_sigkill_of_the_server() {
    let cycles: u64 = std::env::var("EVENTQUEUE_KILL_CYCLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let seed: u64 = std::env::var("EVENTQUEUE_KILL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    println!("kill test: {cycles} cycles, EVENTQUEUE_KILL_SEED={seed}");
    let mut rng = fastrand::Rng::with_seed(seed);
    let dir = tempfile::tempdir().unwrap();
    let acked: Arc<Mutex<Acked>> = Arc::default();
    let mut server = Server::start(dir.path()).await;
    for queue in QUEUES {
        let r = client()
            .post(server.url("/events/queues"))
            .json(&json!({"task_id": queue, "max_buffer_size": 1_000_000, "ttl_minutes": 600}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 201, "{}", r.text().await.unwrap());
    }
    let mut total_killed_in_flight = 0usize;
    for cycle in 0..cycles {
        // Requests in flight at the kill: retried after the restart.
        let in_flight: Arc<Mutex<Vec<Request>>> = Arc::default();
        let mut producers = Vec::new();
        for p in 0..PRODUCERS {
            let (acked, in_flight) = (acked.clone(), in_flight.clone());
            let base = server.base.clone();
            let mut prng = fastrand::Rng::with_seed(rng.u64(..));
            producers.push(tokio::spawn(async move {
                let http = client();
                for i in 0u64.. {
                    let queue = QUEUES[prng.usize(..QUEUES.len())];
                    let size = prng.usize(1..=8);
                    let events: Vec<Value> = (0..size as u64)
                        .map(|j| event(&format!("c{cycle}-p{p}-{i}-{j}"), i * 8 + j))
                        .map(|ev| if p == NO_IDS { without_id(ev) } else { ev })
                        .collect();
                    match post(&http, &base, queue, &events).await {
                        Some(offsets) => record(&acked, queue, &offsets, &events),
                        None => {
                            // Without ids a retry is a new event: only the others retry.
                            if p != NO_IDS {
                                in_flight.lock().unwrap().push((queue.to_string(), events));
                            }
                            return;
                        }
                    }
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(rng.u64(100..700))).await;
        server.kill();
        for p in producers {
            p.await.unwrap();
        }
        let before = acked.lock().unwrap().len();
        server = Server::start(dir.path()).await;
        let snapshot = acked.lock().unwrap().clone();
        verify(&server, &snapshot, cycle).await;
        repost_server_ids(&server, &snapshot, cycle).await;
        // Retrying what was in flight never duplicates: an event that reached the log
        // reports its stored offset.
        let http = client();
        let retries = std::mem::take(&mut *in_flight.lock().unwrap());
        total_killed_in_flight += retries.len();
        for (queue, events) in retries {
            let offsets = post(&http, &server.base, &queue, &events)
                .await
                .expect("a retry after the restart failed");
            record(&acked, &queue, &offsets, &events);
        }
        let snapshot = acked.lock().unwrap().clone();
        let latest = verify(&server, &snapshot, cycle).await;
        println!(
            "cycle {cycle}: {before} events acknowledged before the kill, latest offsets {latest:?}"
        );
        assert!(before > 0, "cycle {cycle}: nothing was acknowledged");
    }
    assert!(
        total_killed_in_flight > 0,
        "no request was ever in flight at a kill"
    );
    // Producers continue at the next offset.
    let snapshot = acked.lock().unwrap().clone();
    let latest = verify(&server, &snapshot, cycles).await;
    let offsets = post(&client(), &server.base, QUEUES[0], &[event("final", 1)])
        .await
        .unwrap();
    assert_eq!(offsets, vec![latest[QUEUES[0]]]);
    server.kill();
}
