//! Several `eventqueue serve` processes over one Redis, as a multi-node install runs them:
//! queues created on different nodes, producers spread over the nodes, SSE subscribers on
//! every node for every queue, and one node SIGKILLed mid-run. The killed node's producers
//! retry their request in flight on another node with the same event id; its subscribers
//! reconnect to another node with `Last-Event-ID`. At the end every subscriber's sequence is
//! dense and complete (no hole, no duplicate, across the reconnect) and every acknowledged
//! event is stored at the offset it was acknowledged with.
//!
//! The test starts its own `redis-server` (AOF `always`, see `redis::RedisServer`) on a free
//! loopback port; `.ci/run` installs it when missing.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};

const NODES: usize = 3;
const QUEUES: usize = 4;
const PRODUCERS: usize = 6;
/// Longest wait for anything expected; only guards against hangs.
const HANG_GUARD: Duration = Duration::from_secs(30);

struct Node {
    child: Child,
    base: String,
}

impl Node {
    /// Starts `eventqueue serve` over the Redis on a port the system picks, and reads the
    /// address from the line it logs once it listens.
    fn start(dir: &Path, n: usize, redis_port: u16) -> Node {
        let log_path = dir.join(format!("node{n}.log"));
        let log = std::fs::File::create(&log_path).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_eventqueue"))
            .arg("serve")
            .arg("--storage")
            .arg(format!("redis://127.0.0.1:{redis_port}"))
            .arg("--data-dir")
            .arg(dir.join(format!("node{n}")))
            .arg("--bind")
            .arg("127.0.0.1:0")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("cannot start eventqueue serve");
        // Owned (killed and reaped on drop) before anything can fail.
        let mut node = Node {
            child,
            base: String::new(),
        };
        let deadline = Instant::now() + HANG_GUARD;
        loop {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            if let Some(base) = text.lines().find_map(|l| {
                let (_, rest) = l.split_once("eventqueue listening on ")?;
                rest.split_whitespace().next().map(str::to_owned)
            }) {
                node.base = base;
                return node;
            }
            assert!(Instant::now() < deadline, "node {n} did not start:\n{text}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

fn task(q: usize) -> String {
    format!("shared-{q}")
}

/// The nodes' base URLs and which are alive.
#[derive(Clone)]
struct Cluster {
    bases: Arc<Vec<String>>,
    dead: Arc<Vec<AtomicBool>>,
}

impl Cluster {
    /// The first live node at or after `n`.
    fn pick(&self, n: usize) -> (usize, &str) {
        for i in 0..self.bases.len() {
            let k = (n + i) % self.bases.len();
            if !self.dead[k].load(Ordering::Acquire) {
                return (k, &self.bases[k]);
            }
        }
        panic!("every node is down");
    }
}

/// Posts events `p{p}-{n}` to queue `q` one request at a time on node `node`, moving to the
/// next live node (and retrying the same event) when a request fails, until `stop`.
async fn produce(
    cluster: Cluster,
    p: usize,
    node: usize,
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<(usize, String, u64)>>>,
) {
    let http = reqwest::Client::new();
    let q = p % QUEUES;
    let mut node = node;
    let mut n = 0u64;
    while !stop.load(Ordering::Acquire) {
        let id = format!("p{p}-{n}");
        let started = Instant::now();
        let offset = loop {
            let (k, base) = cluster.pick(node);
            node = k;
            let sent = http
                .post(format!("{base}/events/queues/{}/events", task(q)))
                .json(&json!({"event_type": "progress", "event_id": id, "current": n, "total": 1_000_000_000u64}))
                .timeout(Duration::from_secs(5))
                .send()
                .await;
            match sent {
                Ok(r) if r.status() == 200 => {
                    let body: Value = r.json().await.unwrap();
                    break body["offsets"][0].as_u64().unwrap();
                }
                Ok(r) if r.status().is_server_error() => {}
                Ok(r) => panic!("{id} on {base}: {} {}", r.status(), r.text().await.unwrap()),
                // The node is gone (or going): another one takes the same event.
                Err(_) => node += 1,
            }
            assert!(
                started.elapsed() < HANG_GUARD,
                "{id} was never acknowledged"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        acked.lock().unwrap().push((q, id, offset));
        n += 1;
    }
}

/// Follows queue `q` over SSE from node `node` until it has received offsets `0..target`
/// (set when producers stop), reconnecting to the next live node with `Last-Event-ID` when
/// its stream breaks. Returns every (offset, event id) received, in order.
async fn subscribe(
    cluster: Cluster,
    q: usize,
    node: usize,
    targets: Arc<Vec<AtomicU64>>,
) -> Vec<(u64, String)> {
    let http = reqwest::Client::new();
    let mut got: Vec<(u64, String)> = Vec::new();
    let mut node = node;
    let started = Instant::now();
    loop {
        let done = |got: &Vec<(u64, String)>| {
            let t = targets[q].load(Ordering::Acquire);
            t != u64::MAX && got.last().is_some_and(|(o, _)| *o + 1 >= t)
        };
        if done(&got) {
            return got;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "subscriber of {q} stuck at {:?}",
            got.last()
        );
        let (k, base) = cluster.pick(node);
        node = k;
        let mut req = http.get(format!("{base}/events/workflows/{}", task(q)));
        if let Some((last, _)) = got.last() {
            req = req.header("Last-Event-ID", last.to_string());
        }
        let Ok(resp) = req.send().await else {
            node += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        assert_eq!(resp.status(), 200, "stream of {q} on {base}");
        let mut body = resp.bytes_stream();
        let mut buf = Vec::new();
        loop {
            if done(&got) {
                return got;
            }
            // Waking now and then to see whether the target is reached.
            let chunk = match tokio::time::timeout(Duration::from_millis(500), body.next()).await {
                Err(_) => continue,
                Ok(Some(Ok(c))) => c,
                Ok(_) => break,
            };
            buf.extend_from_slice(&chunk);
            while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
                let frame: Vec<u8> = buf.drain(..end + 2).collect();
                let frame = String::from_utf8_lossy(&frame);
                let mut id = None;
                let mut data = None;
                for line in frame.lines() {
                    if let Some(v) = line.strip_prefix("id: ") {
                        id = v.parse::<u64>().ok();
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data = Some(v.to_string());
                    }
                }
                if let (Some(offset), Some(data)) = (id, data) {
                    let v: Value = serde_json::from_str(&data).unwrap();
                    let event_id = v["event_id"].as_str().unwrap_or_default().to_string();
                    got.push((offset, event_id));
                }
            }
        }
        // The stream broke (its node was killed): resume elsewhere.
        node += 1;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_over_one_redis_lose_nothing_when_one_is_killed() {
    let dir = tempfile::tempdir().unwrap();
    let redis = crate::redis::RedisServer::start();
    let mut nodes: Vec<Node> = (0..NODES)
        .map(|n| Node::start(dir.path(), n, redis.port))
        .collect();
    let cluster = Cluster {
        bases: Arc::new(nodes.iter().map(|n| n.base.clone()).collect()),
        dead: Arc::new((0..NODES).map(|_| AtomicBool::new(false)).collect()),
    };
    let http = reqwest::Client::new();
    // Each queue created on a different node; every node finds every queue at once.
    for q in 0..QUEUES {
        let r = http
            .post(format!("{}/events/queues", cluster.bases[q % NODES]))
            .json(&json!({"task_id": task(q), "kind": "workflow", "max_buffer_size": 1_000_000}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        for base in cluster.bases.iter() {
            let info = http
                .get(format!("{base}/events/queues/{}", task(q)))
                .send()
                .await
                .unwrap();
            assert_eq!(info.status(), 200, "{base} does not know queue {q}");
        }
    }
    let targets: Arc<Vec<AtomicU64>> =
        Arc::new((0..QUEUES).map(|_| AtomicU64::new(u64::MAX)).collect());
    let mut subscribers = Vec::new();
    for q in 0..QUEUES {
        for node in 0..NODES {
            subscribers.push((
                q,
                node,
                tokio::spawn(subscribe(cluster.clone(), q, node, targets.clone())),
            ));
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::new()));
    let producers: Vec<_> = (0..PRODUCERS)
        .map(|p| {
            tokio::spawn(produce(
                cluster.clone(),
                p,
                p % NODES,
                stop.clone(),
                acked.clone(),
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    cluster.dead[1].store(true, Ordering::Release);
    nodes[1].kill();
    let at_kill = acked.lock().unwrap().len();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Release);
    for p in producers {
        p.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > at_kill && at_kill > 0,
        "events were acknowledged before and after the kill: {at_kill} then {}",
        acked.len()
    );
    // Every queue's end, once the surviving nodes agree on it: a node learns of another's
    // last batch from its notice, a moment after that batch's acknowledgement.
    let mut ends = Vec::new();
    for _ in 0..100 {
        let mut seen = Vec::new();
        for (n, base) in cluster.bases.iter().enumerate() {
            if n == 1 {
                continue;
            }
            let mut node_ends = Vec::new();
            for q in 0..QUEUES {
                let info: Value = http
                    .get(format!("{base}/events/queues/{}", task(q)))
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                node_ends.push(info["latest_offset"].as_u64().unwrap());
            }
            seen.push(node_ends);
        }
        let agreed = seen.windows(2).all(|w| w[0] == w[1]);
        ends = seen.swap_remove(0);
        if agreed {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Subscribers stop once they have everything below their queue's end.
    for (q, end) in ends.iter().enumerate() {
        targets[q].store(*end, Ordering::Release);
    }
    let mut streams: BTreeMap<(usize, usize), Vec<(u64, String)>> = BTreeMap::new();
    for (q, node, handle) in subscribers {
        let got = tokio::time::timeout(Duration::from_secs(150), handle)
            .await
            .expect("a subscriber did not finish")
            .unwrap();
        streams.insert((q, node), got);
    }
    for ((q, node), got) in &streams {
        let offsets: Vec<u64> = got.iter().map(|(o, _)| *o).collect();
        assert_eq!(
            offsets,
            (0..ends[*q]).collect::<Vec<_>>(),
            "the subscriber of queue {q} that started on node {node}: dense, complete, once"
        );
    }
    // Every acknowledged event is stored at its offset (as every subscriber saw it).
    for (q, id, offset) in &acked {
        let seen: HashMap<u64, &str> = streams[&(*q, 0)]
            .iter()
            .map(|(o, i)| (*o, i.as_str()))
            .collect();
        assert_eq!(
            seen.get(offset),
            Some(&id.as_str()),
            "{id} acknowledged at {offset}"
        );
    }
}
