//! The Redis store against a real `redis-server` the tests start themselves (on a free
//! loopback port, in a temporary directory, AOF `always`), for what a shared server adds to
//! the library suite (which `.ci/run` also runs against Redis): several nodes over one Redis,
//! Redis going away and coming back, and a Redis restart losing nothing acknowledged.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use eventqueue::{
    Config, Error, QueueManager, QueueOptions, StatusEvent, StorageBackend, TaskState,
};
use serde_json::json;
use tempfile::TempDir;

use crate::helpers::{TestServer, client, server_config};
use crate::library::{task, tenant};

/// A `redis-server` child process; killed when dropped.
pub(crate) struct RedisServer {
    pub(crate) port: u16,
    dir: TempDir,
    child: Option<Child>,
    /// More `redis-server` arguments (a replica's `--replicaof`).
    extra: Vec<String>,
}

impl RedisServer {
    pub(crate) fn start() -> Self {
        Self::start_with(&[])
    }

    /// A server with more arguments.
    pub(crate) fn start_with(extra: &[&str]) -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut server = RedisServer {
            port,
            dir: tempfile::tempdir().unwrap(),
            child: None,
            extra: extra.iter().map(|a| a.to_string()).collect(),
        };
        server.restart();
        server
    }

    /// Starts (again) on the same port and directory: AOF `always`, so a restart keeps every
    /// write Redis acknowledged.
    fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--dir", &self.dir.path().display().to_string()])
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "redis-server not found: the Redis tests start their own server \
                 (apt-get install redis-server, as .ci/run does)",
            );
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            // Up: it answers (with a password set, that it wants it).
            if let Ok(client) = redis::Client::open(self.url())
                && let Ok(mut conn) = client.get_connection_with_timeout(Duration::from_secs(1))
                && redis::cmd("PING")
                    .query::<String>(&mut conn)
                    .map_or_else(|e| e.code() == Some("NOAUTH"), |_| true)
            {
                return;
            }
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL: nothing gets a chance to be written after it.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn storage(&self) -> StorageBackend {
        StorageBackend::Redis {
            url: self.url(),
            prefix: "eq:".into(),
        }
    }

    fn config(&self) -> Config {
        Config {
            storage: self.storage(),
            ..Config::new(PathBuf::from("unused"))
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A free loopback port, never one handed out before in this process: tests run in
/// parallel, and a port is free only until a server binds it, so two servers must not be
/// given the same one (a cluster test alone takes up to 24).
fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// A Redis Cluster of three masters (with `replicas` replicas each) on loopback, each node a
/// `redis-server` child with AOF `always` in a directory of its own; killed when dropped.
pub(crate) struct RedisCluster {
    /// Every node's port.
    pub(crate) ports: Vec<u16>,
    /// Each node's cluster bus port and directory, to start it again as it was.
    nodes: Vec<(u16, PathBuf)>,
    _dir: TempDir,
    children: Vec<Child>,
}

impl RedisCluster {
    pub(crate) fn start() -> Self {
        Self::start_with_replicas(0)
    }

    /// Three masters and `replicas` replicas of each.
    pub(crate) fn start_with_replicas(replicas: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut cluster = RedisCluster {
            ports: Vec::new(),
            nodes: Vec::new(),
            _dir: tempfile::tempdir().unwrap(),
            children: Vec::new(),
        };
        for i in 0..3 * (1 + replicas) {
            let node_dir = dir.path().join(format!("node{i}"));
            std::fs::create_dir_all(&node_dir).unwrap();
            cluster.ports.push(free_port());
            cluster.nodes.push((free_port(), node_dir));
        }
        cluster._dir = dir;
        cluster.spawn();
        let nodes: Vec<String> = cluster
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        let created = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&nodes)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("redis-cli not found");
        assert!(created.success(), "redis-cli --cluster create failed");
        cluster.wait_until_ok();
        cluster
    }

    /// Starts every node (again: a node restarted keeps its cluster config and its AOF).
    /// On the first start, a node that exits at once (its port or bus port was taken
    /// meanwhile by some other process) is started again on new ports.
    fn spawn(&mut self) {
        // A node started before has written its cluster config.
        let first = !self.nodes[0].1.join("nodes.conf").exists();
        for i in 0..self.ports.len() {
            let mut attempts = 0;
            loop {
                let mut child = self.spawn_node(i);
                if wait_for_ping_unless_exited(self.ports[i], &mut child) {
                    self.children.push(child);
                    break;
                }
                attempts += 1;
                assert!(
                    first && attempts < 5,
                    "redis-server did not start at port {}",
                    self.ports[i]
                );
                self.ports[i] = free_port();
                self.nodes[i].0 = free_port();
            }
        }
    }

    fn spawn_node(&self, i: usize) -> Child {
        let (port, (bus, node_dir)) = (self.ports[i], &self.nodes[i]);
        Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--cluster-enabled",
                "yes",
                "--cluster-port",
                &bus.to_string(),
            ])
            .args(["--cluster-config-file", "nodes.conf"])
            .args(["--dir", &node_dir.display().to_string()])
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server not found (apt-get install redis-server)")
    }

    /// Waits until every node says the cluster is ok and every replica is in sync.
    fn wait_until_ok(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        for &port in &self.ports {
            let mut conn = redis::Client::open(format!("redis://127.0.0.1:{port}"))
                .unwrap()
                .get_connection()
                .unwrap();
            loop {
                let info: String = redis::cmd("CLUSTER").arg("INFO").query(&mut conn).unwrap();
                let replication: String = redis::cmd("INFO")
                    .arg("replication")
                    .query(&mut conn)
                    .unwrap();
                if info.contains("cluster_state:ok")
                    && (replication.contains("role:master")
                        || replication.contains("master_link_status:up"))
                {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "the cluster did not come up: {info}{replication}"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// SIGKILL of every node.
    fn kill_all(&mut self) {
        for mut child in self.children.drain(..) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Every node started again after [`RedisCluster::kill_all`]; returns once the cluster
    /// is ok.
    fn restart_all(&mut self) {
        self.spawn();
        self.wait_until_ok();
    }

    /// The seed URL: two of the three nodes (the third is learnt from them).
    pub(crate) fn url(&self) -> String {
        format!(
            "redis-cluster://127.0.0.1:{},127.0.0.1:{}",
            self.ports[0], self.ports[1]
        )
    }

    pub(crate) fn config(&self) -> Config {
        Config {
            storage: StorageBackend::Redis {
                url: self.url(),
                prefix: "eq:".into(),
            },
            ..Config::new(PathBuf::from("unused"))
        }
    }

    /// Everything the nodes logged to their AOF so far.
    fn aof(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (_, node_dir) in &self.nodes {
            let Ok(files) = std::fs::read_dir(node_dir.join("appendonlydir")) else {
                continue;
            };
            for file in files {
                out.extend(std::fs::read(file.unwrap().path()).unwrap());
            }
        }
        out
    }

    /// How many queue records (`eq:q:*`) each master holds.
    fn queues_per_master(&self) -> Vec<usize> {
        self.ports
            .iter()
            .map(|port| {
                let mut conn = redis::Client::open(format!("redis://127.0.0.1:{port}"))
                    .unwrap()
                    .get_connection()
                    .unwrap();
                let keys: Vec<String> = redis::cmd("KEYS").arg("eq:q:*").query(&mut conn).unwrap();
                keys.len()
            })
            .collect()
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Waits until the server on `port` answers PING (true), or its process has exited (false).
fn wait_for_ping_unless_exited(port: u16, child: &mut Child) -> bool {
    let url = format!("redis://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(client) = redis::Client::open(url.as_str())
            && let Ok(mut conn) = client.get_connection_with_timeout(Duration::from_secs(1))
            && redis::cmd("PING").query::<String>(&mut conn).is_ok()
        {
            return true;
        }
        if matches!(child.try_wait(), Ok(Some(_))) {
            return false;
        }
        assert!(
            Instant::now() < deadline,
            "redis-server did not start at {url}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn working() -> StatusEvent {
    StatusEvent::new(TaskState::Working)
}

/// Reads `n` deliveries, which must all be events, and returns their offsets.
async fn offsets(sub: &mut eventqueue::Subscription, n: usize) -> Vec<u64> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let next = tokio::time::timeout(Duration::from_secs(20), sub.next())
            .await
            .expect("a delivery within 20 s")
            .expect("the stream goes on")
            .unwrap();
        match next {
            eventqueue::Delivery::Event(e) => out.push(e.offset()),
            other => panic!("expected an event, got {other:?}"),
        }
    }
    out
}

/// Queue `name` of tenant `t`, created on `m` with `n` events in one batch.
async fn queue_with_events(m: &QueueManager, name: &str, n: usize) -> eventqueue::EventQueue {
    let (t, k) = (tenant("t"), task(name));
    let q = m
        .create_queue(&t, &k, QueueOptions::default())
        .await
        .unwrap();
    q.enqueue_batch(
        (0..n)
            .map(|_| eventqueue::Event::new(&t, &k, working()))
            .collect(),
    )
    .await
    .unwrap();
    q
}

/// Queue `name` of tenant `t` on node `m`, once the notice of its creation elsewhere reached it.
async fn known_on(m: &QueueManager, name: &str) -> eventqueue::EventQueue {
    let (t, k) = (tenant("t"), task(name));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(q) = m.get_queue(&t, &k) {
            return q;
        }
        assert!(Instant::now() < deadline, "the node never learnt of {name}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A replay of `q` from offset 0 delivers offsets `0..n`, each once, in order.
async fn assert_replays(q: &eventqueue::EventQueue, n: usize) {
    let mut sub = q.subscribe(0).unwrap();
    let all: Vec<u64> = (0..n as u64).collect();
    assert_eq!(offsets(&mut sub, n).await, all);
}

/// The events a batch appends to a queue are one stream entry per run of up to 128 (named
/// after its last offset); a trim inside an entry keeps the entry, but no node delivers or
/// recognises the events before the queue's first offset, and both still read every event
/// after it, from any offset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_one_entry_and_a_trim_within_one_hides_what_it_trimmed() {
    let redis = RedisServer::start();
    let a = QueueManager::open(redis.config()).await.unwrap();
    let mut con = redis::Client::open(redis.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let mut entry_ids = |key: &str| -> Vec<String> {
        let entries: Vec<StreamEntry> = redis::cmd("XRANGE")
            .arg(key)
            .arg("-")
            .arg("+")
            .query(&mut con)
            .unwrap();
        entries.into_iter().map(|(id, _)| id).collect()
    };
    let q = queue_with_events(&a, "runs", 300).await;
    assert_eq!(entry_ids("eq:e:{t/runs}"), ["0-128", "0-256", "0-300"]);
    assert_replays(&q, 300).await;
    // From within an entry, on a node that did not write the queue.
    let b = QueueManager::open(redis.config()).await.unwrap();
    let qb = b
        .find_queue(q.tenant_id(), q.task_id())
        .await
        .unwrap()
        .unwrap();
    let mut sub = qb.subscribe(200).unwrap();
    assert_eq!(
        offsets(&mut sub, 100).await,
        (200..300).collect::<Vec<u64>>()
    );

    // 150 events, 100 kept: offsets 50..150 stay, in the entries of 0..=127 and 128..=149.
    let (t, k) = (tenant("t"), task("trimmed"));
    let q = a
        .create_queue(&t, &k, QueueOptions::default().with_max_buffer_size(100))
        .await
        .unwrap();
    let events = (0..150)
        .map(|i| {
            eventqueue::Event::new(&t, &k, working())
                .with_event_id(eventqueue::EventId::new(format!("e{i}")).unwrap())
        })
        .collect();
    assert_eq!(
        q.enqueue_batch(events).await.unwrap(),
        (0..150).collect::<Vec<u64>>()
    );
    assert_eq!(entry_ids("eq:e:{t/trimmed}"), ["0-128", "0-150"]);
    let qb = b.find_queue(&t, &k).await.unwrap().unwrap();
    for q in [&q, &qb] {
        let mut sub = q.subscribe(0).unwrap();
        let gap = tokio::time::timeout(Duration::from_secs(20), sub.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(
            matches!(
                gap,
                eventqueue::Delivery::Gap {
                    requested_offset: 0,
                    first_available_offset: 50
                }
            ),
            "{gap:?}"
        );
        assert_eq!(
            offsets(&mut sub, 100).await,
            (50..150).collect::<Vec<u64>>()
        );
    }
    // The id of an event trimmed (still in the entry) is a new event; one retained is not.
    let again = |id: &str| {
        eventqueue::Event::new(&t, &k, working())
            .with_event_id(eventqueue::EventId::new(id).unwrap())
    };
    assert_eq!(qb.enqueue(again("e10")).await.unwrap(), 150);
    assert_eq!(q.enqueue(again("e60")).await.unwrap(), 60);
}

/// Two nodes over one Redis: a queue created on one is found on the other at once (before
/// any notice could arrive, it is looked up in Redis); producers on both nodes get dense,
/// distinct offsets; subscribers on both nodes, from the start and live, get every event
/// once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_share_queues_offsets_and_live_streams() {
    let redis = RedisServer::start();
    two_nodes_share_queues_offsets_and_live_streams_on(redis.config()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_two_nodes_share_queues_offsets_and_live_streams() {
    let cluster = RedisCluster::start();
    two_nodes_share_queues_offsets_and_live_streams_on(cluster.config()).await;
}

async fn two_nodes_share_queues_offsets_and_live_streams_on(config: Config) {
    let a = QueueManager::open(config.clone()).await.unwrap();
    let b = QueueManager::open(config).await.unwrap();
    let (t, k) = (tenant("t"), task("shared"));
    let qa = a
        .create_queue(
            &t,
            &k,
            QueueOptions::default().with_max_buffer_size(100_000),
        )
        .await
        .unwrap();
    let qb = b
        .find_queue(&t, &k)
        .await
        .unwrap()
        .expect("node B finds the queue node A created");
    let mut subs = vec![qa.subscribe(0).unwrap(), qb.subscribe(0).unwrap()];
    const EACH: usize = 150;
    let mut producers = Vec::new();
    for (node, q) in [(0, qa.clone()), (1, qb.clone())] {
        producers.push(tokio::spawn(async move {
            let mut got = Vec::new();
            for i in 0..EACH {
                let id = eventqueue::EventId::new(format!("n{node}-{i}")).unwrap();
                let e =
                    eventqueue::Event::new(q.tenant_id(), q.task_id(), working()).with_event_id(id);
                got.push(q.enqueue(e).await.unwrap());
            }
            got
        }));
    }
    let mut acked = Vec::new();
    for p in producers {
        acked.extend(p.await.unwrap());
    }
    acked.sort_unstable();
    let all: Vec<u64> = (0..2 * EACH as u64).collect();
    assert_eq!(acked, all, "offsets are dense and never given twice");
    for sub in &mut subs {
        assert_eq!(offsets(sub, 2 * EACH).await, all);
    }
    // A subscriber that joins on B later reads the same from Redis, then goes live.
    let mut late = qb.subscribe(0).unwrap();
    assert_eq!(offsets(&mut late, 2 * EACH).await, all);
    let last = qa
        .enqueue(eventqueue::Event::new(&t, &k, working()))
        .await
        .unwrap();
    assert_eq!(last, 2 * EACH as u64);
    assert_eq!(offsets(&mut late, 1).await, vec![last]);
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

/// Idempotency, cancellation, close and deletion hold across nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_cancel_close_and_delete_reach_every_node() {
    let redis = RedisServer::start();
    idempotency_cancel_close_and_delete_reach_every_node_on(redis.config()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_idempotency_cancel_close_and_delete_reach_every_node() {
    let cluster = RedisCluster::start();
    idempotency_cancel_close_and_delete_reach_every_node_on(cluster.config()).await;
}

async fn idempotency_cancel_close_and_delete_reach_every_node_on(config: Config) {
    let a = QueueManager::open(config.clone()).await.unwrap();
    let b = QueueManager::open(config).await.unwrap();
    let t = tenant("t");
    let k = task("job");
    let qa = a
        .create_queue(&t, &k, QueueOptions::default())
        .await
        .unwrap();
    let qb = b.find_queue(&t, &k).await.unwrap().unwrap();
    let id = eventqueue::EventId::new("once").unwrap();
    let first = qa
        .enqueue(eventqueue::Event::new(&t, &k, working()).with_event_id(id.clone()))
        .await
        .unwrap();
    let again = qb
        .enqueue(eventqueue::Event::new(&t, &k, working()).with_event_id(id))
        .await
        .unwrap();
    assert_eq!(
        again, first,
        "the same event_id on another node is the same event"
    );

    // Cancel on A: B's next enqueue answer says so.
    qa.cancel(Some("stop")).await.unwrap();
    qb.enqueue(eventqueue::Event::new(&t, &k, working()))
        .await
        .unwrap();
    assert!(qb.is_cancelled(), "B's producer sees the cancellation");

    // Close on B ends A's live stream after the events before it.
    let mut sub = qa.subscribe(0).unwrap();
    assert_eq!(offsets(&mut sub, 2).await, vec![0, 1]);
    qb.close().await.unwrap();
    let end = tokio::time::timeout(Duration::from_secs(20), sub.next())
        .await
        .expect("A's stream ends within 20 s");
    assert!(end.is_none(), "{end:?}");
    let err = qa
        .enqueue(eventqueue::Event::new(&t, &k, working()))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::QueueClosed { .. }), "{err}");

    // Delete on A ends B's streams; B forgets the queue; the name can be used again.
    let k2 = task("deleted");
    let qa2 = a
        .create_queue(&t, &k2, QueueOptions::default())
        .await
        .unwrap();
    let qb2 = b.find_queue(&t, &k2).await.unwrap().unwrap();
    let mut sub = qb2.subscribe(0).unwrap();
    assert!(a.delete_queue(&t, &k2).await.unwrap());
    let end = tokio::time::timeout(Duration::from_secs(20), sub.next())
        .await
        .expect("B's stream ends within 20 s");
    assert!(end.is_none(), "{end:?}");
    let err = qb2
        .enqueue(eventqueue::Event::new(&t, &k2, working()))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::QueueNotFound { .. }), "{err}");
    drop(qa2);
    let fresh = b
        .create_queue(&t, &k2, QueueOptions::default())
        .await
        .unwrap();
    assert_eq!(
        fresh
            .enqueue(eventqueue::Event::new(&t, &k2, working()))
            .await
            .unwrap(),
        0,
        "a queue created again starts at offset 0"
    );
    let on_a = a
        .find_queue(&t, &k2)
        .await
        .unwrap()
        .expect("A finds the new queue");
    let mut sub = on_a.subscribe(0).unwrap();
    assert_eq!(offsets(&mut sub, 1).await, vec![0]);
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

/// A queue deleted on one node can be created again on another at once: the second node's
/// view may still hold the queue (the deletion's notice is on its way), and a create it
/// refuses as "exists" on that view alone would be a spurious 409.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_deleted_on_one_node_is_created_again_on_another_at_once() {
    let redis = RedisServer::start();
    let config = redis.config();
    let a = QueueManager::open(config.clone()).await.unwrap();
    let b = QueueManager::open(config).await.unwrap();
    let t = tenant("t");
    for round in 0..40 {
        let k = task(&format!("again-{round}"));
        a.create_queue(&t, &k, QueueOptions::default())
            .await
            .unwrap();
        assert!(b.find_queue(&t, &k).await.unwrap().is_some());
        let created = tokio::time::Instant::now();
        // A knows the queue too (it created it); B deletes it, A creates it again at once.
        assert!(b.delete_queue(&t, &k).await.unwrap());
        let again = a.create_queue(&t, &k, QueueOptions::default()).await;
        assert!(
            again.is_ok(),
            "round {round}: created again on the other node {:?} after the delete: {:?}",
            created.elapsed(),
            again.err()
        );
        let q = again.unwrap();
        assert_eq!(
            q.enqueue(eventqueue::Event::new(&t, &k, working()))
                .await
                .unwrap(),
            0,
            "round {round}: the new queue starts at offset 0"
        );
    }
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

/// Checkpoint saves of one workflow from two nodes at once: every save stored, numbered
/// without collisions, each with its events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_saves_from_two_nodes_never_collide() {
    let redis = RedisServer::start();
    checkpoint_saves_from_two_nodes_never_collide_on(redis.config()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_checkpoint_saves_from_two_nodes_never_collide() {
    let cluster = RedisCluster::start();
    checkpoint_saves_from_two_nodes_never_collide_on(cluster.config()).await;
}

async fn checkpoint_saves_from_two_nodes_never_collide_on(config: Config) {
    let a = QueueManager::open(config.clone()).await.unwrap();
    let b = QueueManager::open(config).await.unwrap();
    let t = tenant("t");
    let w = task("wf");
    a.create_queue(&t, &w, QueueOptions::kind(eventqueue::QueueKind::Workflow))
        .await
        .unwrap();
    let mut saves = Vec::new();
    for (node, m) in [(0, a.clone()), (1, b.clone())] {
        let w = w.clone();
        let store = m.checkpoints(&t);
        saves.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..20u64 {
                let cp = eventqueue::Checkpoint::new(&w, eventqueue::WorkflowStatus::Running)
                    .phase(i, 100)
                    .state(json!({"node": node, "i": i}));
                let saved = store.save(cp).await.unwrap();
                ids.push((
                    saved.checkpoint_id,
                    saved.status_offset,
                    saved.progress_offset,
                ));
            }
            ids
        }));
    }
    let mut saved = Vec::new();
    for s in saves {
        saved.extend(s.await.unwrap());
    }
    let mut ids: Vec<String> = saved.iter().map(|s| s.0.clone()).collect();
    // The events the saves appended: each at its own offset, together dense from 0.
    let mut emitted: Vec<u64> = saved.iter().flat_map(|s| [s.1, s.2]).flatten().collect();
    emitted.sort_unstable();
    let n = emitted.len() as u64;
    assert!(n >= 40, "every save appended its status event");
    assert_eq!(emitted, (0..n).collect::<Vec<_>>());
    let listed = a.checkpoints(&t).list(&w).await.unwrap();
    assert_eq!(listed.len(), 40, "every save is stored");
    let mut listed_ids: Vec<_> = listed.iter().map(|c| c.checkpoint_id.clone()).collect();
    listed_ids.sort();
    ids.sort();
    assert_eq!(listed_ids, ids);
    // Another node reads them all.
    let q = b.find_queue(&t, &w).await.unwrap().unwrap();
    let mut sub = q.subscribe(0).unwrap();
    assert_eq!(offsets(&mut sub, n as usize).await, emitted);
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

/// The TTL sweep on every node at once: the idle queue is removed once, without errors, and
/// every node forgets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ttl_sweep_runs_on_every_node_at_once() {
    let redis = RedisServer::start();
    the_ttl_sweep_runs_on_every_node_at_once_on(redis.config()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_the_ttl_sweep_runs_on_every_node_at_once() {
    let cluster = RedisCluster::start();
    the_ttl_sweep_runs_on_every_node_at_once_on(cluster.config()).await;
}

async fn the_ttl_sweep_runs_on_every_node_at_once_on(config: Config) {
    let a = QueueManager::open(config.clone()).await.unwrap();
    let b = QueueManager::open(config).await.unwrap();
    let t = tenant("t");
    let idle = task("idle");
    let q = a
        .create_queue(
            &t,
            &idle,
            QueueOptions::default().with_ttl(Duration::from_millis(1)),
        )
        .await
        .unwrap();
    q.enqueue(eventqueue::Event::new(&t, &idle, working()))
        .await
        .unwrap();
    b.find_queue(&t, &idle).await.unwrap().unwrap();
    let busy = task("busy");
    a.create_queue(&t, &busy, QueueOptions::default())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let (ra, rb) = tokio::join!(a.cleanup_expired(), b.cleanup_expired());
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert_eq!(
        ra.queues_expired + rb.queues_expired,
        1,
        "removed once: {ra:?} {rb:?}"
    );
    for m in [&a, &b] {
        let deadline = Instant::now() + Duration::from_secs(20);
        while m.get_queue(&t, &idle).is_some() {
            assert!(Instant::now() < deadline, "a node kept the expired queue");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(m.find_queue(&t, &idle).await.unwrap().is_none());
        assert!(m.find_queue(&t, &busy).await.unwrap().is_some());
    }
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

#[tokio::test]
async fn redis_without_persistence_is_reported_at_start() {
    let redis = RedisServer::start();
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_connection()
        .unwrap();
    // As started: AOF on, so nothing to say.
    assert_eq!(eventqueue::redis_persistence_warning(&redis.url()), None);
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("appendonly")
        .arg("no")
        .query(&mut conn)
        .unwrap();
    assert_eq!(
        eventqueue::redis_persistence_warning(&redis.url()),
        Some("Redis persistence is off")
    );
}

/// A Redis that a test takes down and brings back.
trait Outage {
    /// The storage backend over it.
    fn storage(&self) -> StorageBackend;
    /// What a 503's detail names it by.
    fn shown(&self) -> String;
    /// Every server SIGKILLed.
    fn down(&mut self);
    /// Every server started again on its data; returns once it serves.
    fn up(&mut self);
}

impl Outage for RedisServer {
    fn storage(&self) -> StorageBackend {
        RedisServer::storage(self)
    }
    fn shown(&self) -> String {
        self.url()
    }
    fn down(&mut self) {
        self.kill();
    }
    fn up(&mut self) {
        self.restart();
    }
}

impl Outage for RedisCluster {
    fn storage(&self) -> StorageBackend {
        self.config().storage
    }
    fn shown(&self) -> String {
        self.url()
    }
    fn down(&mut self) {
        self.kill_all();
    }
    fn up(&mut self) {
        self.restart_all();
    }
}

#[tokio::test]
async fn redis_down_answers_503_naming_it_and_the_node_recovers_by_itself() {
    redis_down_on(RedisServer::start()).await;
}

#[tokio::test]
async fn cluster_down_answers_503_naming_it_and_the_node_recovers_by_itself() {
    redis_down_on(RedisCluster::start()).await;
}

async fn redis_down_on(mut redis: impl Outage) {
    let storage = redis.storage();
    let server = TestServer::start_tuned(
        tempfile::tempdir().unwrap(),
        move |c| c.storage = storage,
        server_config(),
    )
    .await;
    let http = client();
    let created = http
        .post(server.url("/events/queues"))
        .json(&json!({"task_id": "job"}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let publish = || {
        http.post(server.url("/events/queues/job/events"))
            .json(&json!({"event_type": "status", "state": "working"}))
            .send()
    };
    assert_eq!(publish().await.unwrap().status(), 200);

    redis.down();
    let down = publish().await.unwrap();
    assert_eq!(down.status(), 503);
    let body: serde_json::Value = down.json().await.unwrap();
    let detail = body["detail"].as_str().unwrap();
    assert!(
        detail.contains(&format!("redis at {}", redis.shown())),
        "{detail}"
    );
    let health = http.get(server.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 503);

    redis.up();
    let deadline = Instant::now() + Duration::from_secs(20);
    while http
        .get(server.url("/healthz"))
        .send()
        .await
        .unwrap()
        .status()
        != 200
    {
        assert!(Instant::now() < deadline, "/healthz stayed 503");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Writes work again, on the offsets that follow what was stored before (a cluster's
    // client may need a moment to find its nodes again: a 503 meanwhile is retried).
    let deadline = Instant::now() + Duration::from_secs(20);
    let again = loop {
        let answer = publish().await.unwrap();
        if answer.status() != 503 || Instant::now() > deadline {
            break answer;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(again.status(), 200);
    let body: serde_json::Value = again.json().await.unwrap();
    assert_eq!(body["offsets"], json!([1]), "{body}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_loses_no_acknowledged_event() {
    let mut redis = RedisServer::start();
    let m = QueueManager::open(redis.config()).await.unwrap();
    let t = tenant("t");
    let names: Vec<_> = (0..4).map(|i| task(&format!("q{i}"))).collect();
    for k in &names {
        m.create_queue(
            &t,
            k,
            QueueOptions::default().with_max_buffer_size(1_000_000),
        )
        .await
        .unwrap();
    }
    let acked = Arc::new(std::sync::Mutex::new(Vec::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut producers = Vec::new();
    for (p, k) in names.iter().enumerate() {
        let q = m.get_queue(&t, k).unwrap();
        let (acked, stop) = (acked.clone(), stop.clone());
        producers.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                let id = format!("p{p}-{n}");
                let event = eventqueue::Event::new(q.tenant_id(), q.task_id(), working())
                    .with_event_id(eventqueue::EventId::new(&id).unwrap());
                if let Ok(offset) = q.enqueue(event).await {
                    acked.lock().unwrap().push((p, id, offset));
                }
                n += 1;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    redis.kill();
    tokio::time::sleep(Duration::from_millis(200)).await;
    redis.restart();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Release);
    for p in producers {
        p.await.unwrap();
    }
    // The node writes again by itself after the restart.
    let q = m.get_queue(&t, &names[0]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while q
        .enqueue(eventqueue::Event::new(&t, &names[0], working()))
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "writes did not resume");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    m.shutdown().await.unwrap();

    // A new node over the restarted Redis finds every acknowledged event at its offset.
    let m = QueueManager::open(redis.config()).await.unwrap();
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > 10,
        "too few events were acknowledged: {}",
        acked.len()
    );
    for (p, k) in names.iter().enumerate() {
        let q = m.get_queue(&t, k).unwrap();
        let latest = q.latest_offset();
        let mut sub = q.subscribe(0).unwrap();
        let mut stored = std::collections::HashMap::new();
        for _ in 0..latest {
            let e = crate::library::next_event(&mut sub).await;
            let v: serde_json::Value = serde_json::from_slice(e.json()).unwrap();
            stored.insert(v["event_id"].as_str().unwrap().to_string(), e.offset());
        }
        for (_, id, offset) in acked.iter().filter(|(pp, _, _)| *pp == p) {
            assert_eq!(
                stored.get(id),
                Some(offset),
                "acknowledged {id} at {offset}"
            );
        }
    }
    m.shutdown().await.unwrap();
}

/// A token revocation is kept by Redis (a hash `{prefix}revoked`): the next node on the same
/// Redis and prefix finds it, another prefix does not.
#[tokio::test]
async fn a_token_revocation_is_kept_by_redis_for_the_next_node() {
    let redis = RedisServer::start();
    let first = QueueManager::open(redis.config()).await.unwrap();
    let when = eventqueue::Timestamp::from_micros(1_700_000_000_000_000);
    first.revoke_tokens(&tenant("acme"), when).await.unwrap();
    first.shutdown().await.unwrap();
    let second = QueueManager::open(redis.config()).await.unwrap();
    assert_eq!(
        second.token_revocations().await.unwrap(),
        [("acme".to_string(), 1_700_000_000_000_000)]
    );
    second.shutdown().await.unwrap();
    let other = QueueManager::open(Config {
        storage: StorageBackend::Redis {
            url: redis.url(),
            prefix: "other:".into(),
        },
        ..redis.config()
    })
    .await
    .unwrap();
    assert!(other.token_revocations().await.unwrap().is_empty());
    other.shutdown().await.unwrap();
}

/// Two nodes writing many queues at once over one Redis: every group commit spans many
/// queues, with the other node writing the same queues meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_writing_many_queues_at_once_keep_every_queue_dense() {
    let redis = RedisServer::start();
    two_nodes_write_many_queues_on(redis.config(), || ()).await;
}

/// A Redis Cluster: queues land in slots of every master; a node that starts later finds all
/// of them (each master scanned); producers on two nodes writing many queues at once (group
/// commits over several slots: each slot's checks, then each slot's writes) get dense offsets
/// on every queue, and subscribers on the other node get every event in order. The claims
/// those checks take (and the turns of rebuilt batches) never reach the AOF: taking one costs
/// no fsync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_queues_spread_over_the_masters_and_batches_over_slots_stay_dense() {
    let cluster = RedisCluster::start();
    two_nodes_write_many_queues_on(cluster.config(), || {
        let spread = cluster.queues_per_master();
        assert_eq!(spread.iter().sum::<usize>(), QUEUES, "{spread:?}");
        assert!(
            spread.iter().filter(|&&n| n > 0).count() >= 2,
            "queues on at least two masters: {spread:?}"
        );
    })
    .await;
    let aof = cluster.aof();
    assert!(
        aof.windows(b"XADD".len()).any(|w| w == b"XADD"),
        "the events are in the AOF"
    );
    for field in [&b"\r\n$4\r\nturn\r\n"[..], b"\r\n$4\r\ntill\r\n"] {
        assert!(
            !aof.windows(field.len()).any(|w| w == field),
            "a claim or turn reached the AOF"
        );
    }
}

const QUEUES: usize = 24;

/// Node A creates [`QUEUES`] queues (then `created` runs); node B, opened after, loads them
/// all; producers on both nodes write every queue at once; subscribers on B get every event.
async fn two_nodes_write_many_queues_on(config: Config, created: impl FnOnce()) {
    let a = QueueManager::open(config.clone()).await.unwrap();
    let t = tenant("t");
    let names: Vec<_> = (0..QUEUES).map(|i| task(&format!("q{i}"))).collect();
    for k in &names {
        a.create_queue(&t, k, QueueOptions::default().with_max_buffer_size(10_000))
            .await
            .unwrap();
    }
    created();
    let b = QueueManager::open(config).await.unwrap();
    assert_eq!(
        b.list_queues(Some(&t)).len(),
        names.len(),
        "a node started later loads every queue"
    );
    let mut subs = Vec::new();
    for k in &names {
        subs.push(b.get_queue(&t, k).unwrap().subscribe(0).unwrap());
    }
    const EACH: u64 = 20;
    let mut producers = Vec::new();
    for (node, m) in [(0, a.clone()), (1, b.clone())] {
        for k in &names {
            let q = m.get_queue(&t, k).unwrap();
            producers.push(tokio::spawn(async move {
                let mut got = Vec::new();
                for i in 0..EACH {
                    let id = eventqueue::EventId::new(format!("n{node}-{i}")).unwrap();
                    // Two nodes writing the same queues in step can keep finding each
                    // other's newer state until the node gives up with a 503-class error;
                    // a producer then retries with the same event id, as real ones do.
                    let mut attempts = 0;
                    let offset = loop {
                        let e = eventqueue::Event::new(q.tenant_id(), q.task_id(), working())
                            .with_event_id(id.clone());
                        match q.enqueue(e).await {
                            Ok(offset) => break offset,
                            Err(Error::Storage(e)) if e.is_unavailable() && attempts < 10 => {
                                attempts += 1;
                            }
                            Err(e) => panic!("enqueue failed: {e}"),
                        }
                    };
                    got.push(offset);
                }
                got
            }));
        }
    }
    let mut acked = vec![Vec::new(); names.len()];
    for (i, p) in producers.into_iter().enumerate() {
        acked[i % names.len()].extend(p.await.unwrap());
    }
    let all: Vec<u64> = (0..2 * EACH).collect();
    for (k, mut got) in names.iter().zip(acked) {
        got.sort_unstable();
        assert_eq!(got, all, "dense offsets on {k}");
    }
    for sub in &mut subs {
        assert_eq!(offsets(sub, all.len()).await, all);
    }
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

/// Runs `openssl` with `args` in `dir`.
fn openssl(dir: &std::path::Path, args: &[&str]) {
    let status = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("openssl not found (apt-get install openssl)");
    assert!(status.success(), "openssl {args:?} failed");
}

/// A `redis-server` with TLS only (`--port 0`) and a password, its certificate for
/// `localhost` signed by a CA made here (`ca.crt` in `dir`); killed when dropped.
struct TlsRedis {
    port: u16,
    child: Child,
}

const TLS_PASSWORD: &str = "s3cret-Pw";

impl TlsRedis {
    fn start(dir: &std::path::Path) -> TlsRedis {
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
                "-days",
                "2",
                "-subj",
                "/CN=eventqueue test CA",
            ],
        );
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
                "-subj",
                "/CN=localhost",
            ],
        );
        std::fs::write(
            dir.join("ext.cnf"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
        )
        .unwrap();
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "server.crt",
                "-days",
                "2",
                "-extfile",
                "ext.cnf",
            ],
        );
        let port = free_port();
        let child = Command::new("redis-server")
            .args(["--port", "0", "--tls-port", &port.to_string()])
            .args(["--bind", "127.0.0.1", "--dir", &dir.display().to_string()])
            .args([
                "--tls-cert-file",
                "server.crt",
                "--tls-key-file",
                "server.key",
            ])
            .args(["--tls-ca-cert-file", "ca.crt", "--tls-auth-clients", "no"])
            .args([
                "--requirepass",
                TLS_PASSWORD,
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server not found");
        let server = TlsRedis { port, child };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = Command::new("redis-cli")
                .args(["--tls", "--cacert", "ca.crt", "-p", &port.to_string()])
                .args(["--no-auth-warning", "-a", TLS_PASSWORD, "ping"])
                .current_dir(dir)
                .output()
                .expect("redis-cli not found");
            if String::from_utf8_lossy(&out.stdout).contains("PONG") {
                return server;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server with TLS did not start (is it built with TLS?)"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `eventqueue serve --storage STORAGE` with `env`, until it listens (`Ok`: its base
/// URL) or exits (`Err`: its log).
fn serve(
    dir: &std::path::Path,
    name: &str,
    storage: &str,
    env: &[(&str, &str)],
) -> (Child, Result<String, String>) {
    let log_path = dir.join(format!("{name}.log"));
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_eventqueue"))
        .args(["serve", "--storage", storage, "--bind", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir.join(name))
        .env("RUST_LOG", "info")
        .env_remove("EVENTQUEUE_REDIS_PASSWORD")
        .env_remove("EVENTQUEUE_REDIS_CA")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("cannot start eventqueue serve");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        if let Some(base) = text.lines().find_map(|l| {
            let (_, rest) = l.split_once("eventqueue listening on ")?;
            rest.split_whitespace().next().map(str::to_owned)
        }) {
            return (child, Ok(base));
        }
        if let Ok(Some(_)) = child.try_wait() {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            return (child, Err(text));
        }
        assert!(
            Instant::now() < deadline,
            "serve neither listened nor exited:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `rediss://` with the password from `EVENTQUEUE_REDIS_PASSWORD` and the CA from
/// `EVENTQUEUE_REDIS_CA`: events go to Redis over TLS. Without the CA the server's
/// certificate is refused; with a wrong password the node does not start; the password is in
/// no log line.
#[tokio::test]
async fn tls_and_a_password_from_the_environment_reach_redis_and_stay_out_of_logs() {
    let dir = tempfile::tempdir().unwrap();
    let redis = TlsRedis::start(dir.path());
    let storage = format!("rediss://localhost:{}", redis.port);
    let ca = dir.path().join("ca.crt").display().to_string();

    let (mut node, listening) = serve(
        dir.path(),
        "good",
        &storage,
        &[
            ("EVENTQUEUE_REDIS_PASSWORD", TLS_PASSWORD),
            ("EVENTQUEUE_REDIS_CA", &ca),
        ],
    );
    let base = listening.unwrap_or_else(|log| panic!("serve did not start:\n{log}"));
    let http = client();
    let created = http
        .post(format!("{base}/events/queues"))
        .json(&json!({"task_id": "job"}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    for expected in 0..2 {
        let published = http
            .post(format!("{base}/events/queues/job/events"))
            .json(&json!({"event_type": "status", "state": "working"}))
            .send()
            .await
            .unwrap();
        assert_eq!(published.status(), 200);
        let body: serde_json::Value = published.json().await.unwrap();
        assert_eq!(body["offsets"], json!([expected]), "{body}");
    }
    let _ = node.kill();
    let _ = node.wait();
    let len = Command::new("redis-cli")
        .args(["--tls", "--cacert", &ca, "-p", &redis.port.to_string()])
        .args(["--no-auth-warning", "-a", TLS_PASSWORD])
        .args(["XLEN", "eq:e:{default/job}"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&len.stdout).trim(), "2");

    // The system's roots do not include the test CA: refused.
    let (_node, refused) = serve(
        dir.path(),
        "no-ca",
        &storage,
        &[("EVENTQUEUE_REDIS_PASSWORD", TLS_PASSWORD)],
    );
    let log = refused.expect_err("a certificate from an unknown CA is refused");
    assert!(log.to_lowercase().contains("certificate"), "{log}");

    // A wrong password: the node says so and does not start, without printing it.
    let (_node, refused) = serve(
        dir.path(),
        "wrong",
        &format!("rediss://:Wr0ng-pw@localhost:{}", redis.port),
        &[("EVENTQUEUE_REDIS_CA", &ca)],
    );
    let log = refused.expect_err("a wrong password is refused");
    assert!(!log.contains("Wr0ng-pw"), "{log}");
    assert!(log.contains(&format!("localhost:{}", redis.port)), "{log}");
    for name in ["good", "no-ca", "wrong"] {
        let log = std::fs::read_to_string(dir.path().join(format!("{name}.log"))).unwrap();
        assert!(
            !log.contains(TLS_PASSWORD),
            "the password is in {name}.log:\n{log}"
        );
    }
}

/// A password and a database in a `redis://` URL (`--requirepass`, `/2`): stores write and
/// replay there (a replay reads on connections of its own, which log in and select the
/// database too); a wrong password fails to open with an error that names the server but
/// not the password.
#[tokio::test]
async fn a_password_in_the_url_opens_the_store_and_a_wrong_one_is_not_shown() {
    let redis = RedisServer::start_with(&["--requirepass", "url-Pw-1"]);
    let with = |password: &str| Config {
        storage: StorageBackend::Redis {
            url: format!("redis://:{password}@127.0.0.1:{}/2", redis.port),
            prefix: "eq:".into(),
        },
        ..Config::new(PathBuf::from("unused"))
    };
    let m = QueueManager::open(with("url-Pw-1")).await.unwrap();
    let (t, k) = (tenant("t"), task("job"));
    let q = m
        .create_queue(&t, &k, QueueOptions::default())
        .await
        .unwrap();
    assert_eq!(
        q.enqueue(eventqueue::Event::new(&t, &k, working()))
            .await
            .unwrap(),
        0
    );
    q.enqueue_batch(
        (0..4)
            .map(|_| eventqueue::Event::new(&t, &k, working()))
            .collect(),
    )
    .await
    .unwrap();
    let mut sub = q.subscribe(0).unwrap();
    assert_eq!(offsets(&mut sub, 5).await, [0, 1, 2, 3, 4]);
    m.shutdown().await.unwrap();
    let keys = |db: u8| -> Vec<String> {
        let url = format!("redis://:url-Pw-1@127.0.0.1:{}/{db}", redis.port);
        let mut c = redis::Client::open(url).unwrap().get_connection().unwrap();
        redis::cmd("KEYS").arg("eq:e:*").query(&mut c).unwrap()
    };
    assert_eq!(keys(2), ["eq:e:{t/job}"]);
    assert!(keys(0).is_empty(), "{:?}", keys(0));
    let Err(err) = QueueManager::open(with("not-it-9")).await else {
        panic!("a wrong password is refused");
    };
    let shown = format!("{err} {err:?}");
    assert!(!shown.contains("not-it-9"), "{shown}");
    assert!(
        shown.contains(&format!("127.0.0.1:{}", redis.port)),
        "{shown}"
    );
}

/// `result` is the refusal of a write no replica confirmed (with one wanted).
fn refused_for_want_of_replicas<T: std::fmt::Debug>(result: eventqueue::Result<T>, what: &str) {
    match result {
        Err(Error::Storage(e)) => assert!(e.to_string().contains("0 of 1 replicas"), "{what}: {e}"),
        other => panic!("{what}: expected the replica wait to fail, got {other:?}"),
    }
}

/// A replica of `primary`, once in sync, and a connection to it.
fn replica_of(primary: &RedisServer) -> (RedisServer, redis::Connection) {
    let replica = RedisServer::start_with(&["--replicaof", "127.0.0.1", &primary.port.to_string()]);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut conn = redis::Client::open(replica.url())
        .unwrap()
        .get_connection()
        .unwrap();
    loop {
        let info: String = redis::cmd("INFO")
            .arg("replication")
            .query(&mut conn)
            .unwrap();
        if info.contains("master_link_status:up") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the replica did not sync: {info}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Synced is not yet acknowledging: the primary counts the replica for `WAIT` once it has
    // acknowledged an offset. A loaded machine may take a while to get there.
    let mut on_primary = redis::Client::open(primary.url())
        .unwrap()
        .get_connection()
        .unwrap();
    loop {
        let acked: u64 = redis::cmd("WAIT")
            .arg(1)
            .arg(1000)
            .query(&mut on_primary)
            .unwrap();
        if acked >= 1 {
            return (replica, conn);
        }
        assert!(
            Instant::now() < deadline,
            "the replica never acknowledged the primary's writes"
        );
    }
}

/// An event refused for want of replicas (so stored on the primary alone) and sent again with
/// its `event_id` is acknowledged only once a replica has it: refused again while none does,
/// then acknowledged with the offset it was stored at, once a replica is back. A close
/// repeated the same way likewise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_sent_again_is_acknowledged_only_once_a_replica_has_it() {
    let primary = RedisServer::start();
    let (t, k, closing) = (tenant("t"), task("job"), task("closing"));
    let other = QueueManager::open(primary.config()).await.unwrap();
    for k in [&k, &closing] {
        other
            .create_queue(&t, k, QueueOptions::default())
            .await
            .unwrap();
    }
    // Long enough for a loaded machine's replica to acknowledge once it is there (each refusal
    // below waits it out).
    let node = QueueManager::open(Config {
        redis_wait_replicas: 1,
        redis_wait_timeout: Duration::from_secs(1),
        ..primary.config()
    })
    .await
    .unwrap();
    let q = node.get_queue(&t, &k).unwrap();
    let event = eventqueue::Event::new(&t, &k, working());
    for attempt in 0..2 {
        refused_for_want_of_replicas(q.enqueue(event.clone()).await, &format!("send {attempt}"));
    }
    let to_close = node.get_queue(&t, &closing).unwrap();
    for attempt in 0..2 {
        refused_for_want_of_replicas(to_close.close().await, &format!("close {attempt}"));
    }
    let (_replica, mut conn) = replica_of(&primary);
    to_close.close().await.unwrap();
    assert_eq!(q.enqueue(event.clone()).await.unwrap(), 0);
    let len: u64 = redis::cmd("XLEN")
        .arg("eq:e:{t/job}")
        .query(&mut conn)
        .unwrap();
    assert_eq!(len, 1, "the replica has the event, once");
    node.shutdown().await.unwrap();
    other.shutdown().await.unwrap();
}

/// `--redis-wait-replicas`: with one replica attached, N = 1 acknowledges (and the replica
/// has the events); N = 2 cannot be met: the write answers 503 naming the storage and the
/// replicas reached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_for_replicas_acknowledges_when_they_confirm_and_answers_503_when_not() {
    let primary = RedisServer::start();
    let (_replica, mut conn) = replica_of(&primary);

    let one = QueueManager::open(Config {
        redis_wait_replicas: 1,
        ..primary.config()
    })
    .await
    .unwrap();
    // The tenant of requests without a token, for the HTTP part below.
    let (t, k) = (tenant("default"), task("job"));
    let q = one
        .create_queue(&t, &k, QueueOptions::default())
        .await
        .unwrap();
    for expected in 0..3 {
        assert_eq!(
            q.enqueue(eventqueue::Event::new(&t, &k, working()))
                .await
                .unwrap(),
            expected
        );
    }
    let len: u64 = redis::cmd("XLEN")
        .arg("eq:e:{default/job}")
        .query(&mut conn)
        .unwrap();
    assert_eq!(len, 3, "the replica had every acknowledged event");
    one.shutdown().await.unwrap();

    let storage = primary.storage();
    let server = TestServer::start_tuned(
        tempfile::tempdir().unwrap(),
        move |c| {
            c.storage = storage;
            c.redis_wait_replicas = 2;
            c.redis_wait_timeout = Duration::from_millis(100);
        },
        server_config(),
    )
    .await;
    let refused = client()
        .post(server.url("/events/queues/job/events"))
        .json(&json!({"event_type": "status", "state": "working"}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 503);
    let body: serde_json::Value = refused.json().await.unwrap();
    let detail = body["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains(&format!("redis at redis://127.0.0.1:{}", primary.port))
            && detail.contains("1 of 2 replicas"),
        "{body}"
    );
    server.stop().await;
}

/// Two nodes over `redis` and a queue `job` with two events written on the first (`other`);
/// the second (`node`) wants one replica that Redis does not have, so each write it makes is
/// stored, then refused. Both nodes' live streams of the queue from offset 2 (the node's has
/// delivered the first two events).
struct RefusingNode {
    other: QueueManager,
    node: QueueManager,
    q: eventqueue::EventQueue,
    live: eventqueue::Subscription,
    live_on_other: eventqueue::Subscription,
}

impl RefusingNode {
    async fn start(redis: &RedisServer) -> Self {
        let other = QueueManager::open(redis.config()).await.unwrap();
        let on_other = queue_with_events(&other, "job", 2).await;
        let node = QueueManager::open(Config {
            redis_wait_replicas: 1,
            redis_wait_timeout: Duration::from_millis(100),
            ..redis.config()
        })
        .await
        .unwrap();
        let q = known_on(&node, "job").await;
        let mut live = q.subscribe(0).unwrap();
        assert_eq!(offsets(&mut live, 2).await, vec![0, 1]);
        let live_on_other = on_other.subscribe(2).unwrap();
        Self {
            other,
            node,
            q,
            live,
            live_on_other,
        }
    }
}

/// A write refused after Redis stored it (no replica confirmed it in time) is in the queue
/// for everyone: the node that wrote it, which is told of no write of its own, still
/// delivers it to its live subscribers, as the other node does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_refused_after_it_was_stored_reaches_the_writing_nodes_subscribers() {
    let redis = RedisServer::start();
    let mut n = RefusingNode::start(&redis).await;
    let (t, k) = (tenant("t"), task("job"));
    refused_for_want_of_replicas(
        n.q.enqueue(eventqueue::Event::new(&t, &k, working())).await,
        "the enqueue",
    );
    assert_eq!(offsets(&mut n.live, 1).await, vec![2]);
    assert_eq!(offsets(&mut n.live_on_other, 1).await, vec![2]);
    n.node.shutdown().await.unwrap();
    n.other.shutdown().await.unwrap();
}

/// A delete that Redis stored but whose node answered an error (no replica confirmed it in
/// time): the queue is gone from the store, so the node that tried must forget it as every
/// other node does — its streams end, its enqueues answer "not found", and the name is free
/// for a queue created again (which that node then follows from offset 0).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_refused_after_it_was_stored_ends_the_queue_on_the_writing_node() {
    let redis = RedisServer::start();
    let RefusingNode {
        other,
        node,
        q,
        mut live,
        mut live_on_other,
    } = RefusingNode::start(&redis).await;
    let (t, k) = (tenant("t"), task("job"));
    refused_for_want_of_replicas(node.delete_queue(&t, &k).await, "the delete");
    for (name, stream) in [
        ("the node", &mut live),
        ("the other node", &mut live_on_other),
    ] {
        let end = tokio::time::timeout(Duration::from_secs(20), stream.next())
            .await
            .unwrap_or_else(|_| panic!("the stream on {name} did not end"));
        assert!(end.is_none(), "{name}: {end:?}");
    }
    let err = q
        .enqueue(eventqueue::Event::new(&t, &k, working()))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::QueueNotFound { .. }), "{err}");
    // (The writer forgets the queue right after ending its streams.)
    let deadline = Instant::now() + Duration::from_secs(5);
    while node.get_queue(&t, &k).is_some() {
        assert!(Instant::now() < deadline, "the node still holds the queue");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The name is free: created again on the other node, this node follows the new queue.
    let fresh = queue_with_events(&other, "job", 1).await;
    let again = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if let Some(q) = node.find_queue(&t, &k).await.unwrap() {
                return q;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the node finds the queue created again");
    let mut live = again.subscribe(0).unwrap();
    assert_eq!(offsets(&mut live, 1).await, vec![0]);
    drop(fresh);
    node.shutdown().await.unwrap();
    other.shutdown().await.unwrap();
}

/// A close on one node racing an enqueue on the other: when the enqueue's batch meets the
/// close (its node takes the newer state in and refuses the event), the notice of the close
/// is old news to that node's writer when it comes, and nothing of its own is published;
/// its subscribers must still see the queue closed. Many rounds, so that some meet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_met_by_another_nodes_enqueue_ends_that_nodes_streams() {
    let redis = RedisServer::start();
    let a = QueueManager::open(redis.config()).await.unwrap();
    let b = QueueManager::open(redis.config()).await.unwrap();
    let t = tenant("t");
    let mut refused = 0;
    for round in 0..40 {
        let name = format!("race{round}");
        let k = task(&name);
        let qa = queue_with_events(&a, &name, 1).await;
        let qb = known_on(&b, &name).await;
        let mut live = qb.subscribe(0).unwrap();
        assert_eq!(offsets(&mut live, 1).await, vec![0]);
        let (closed, sent) = tokio::join!(
            qa.close(),
            qb.enqueue(eventqueue::Event::new(&t, &k, working()))
        );
        closed.unwrap();
        let expected = match &sent {
            Ok(offset) => vec![*offset],
            Err(Error::QueueClosed { .. }) => {
                refused += 1;
                vec![]
            }
            Err(e) => panic!("round {round}: {e}"),
        };
        let mut got = Vec::new();
        loop {
            let next = tokio::time::timeout(Duration::from_secs(10), live.next())
                .await
                .unwrap_or_else(|_| {
                    panic!("round {round}: the stream on b did not end ({sent:?}, {got:?})")
                });
            match next {
                None => break,
                Some(Ok(eventqueue::Delivery::Event(e))) => got.push(e.offset()),
                Some(other) => panic!("round {round}: {other:?}"),
            }
        }
        assert_eq!(got, expected, "round {round}");
    }
    eprintln!("{refused} of 40 enqueues met the close");
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

/// Durable Streams producers over two nodes: a producer that sends each append to the other
/// node, without waiting, is never refused a valid sequence. Each node decides a refusal (a
/// gap, an epoch that does not start at 0, a `Stream-Seq` regression) on its own view of the
/// stream, which takes in the other node's append only when that append's notice arrives; a
/// refusal therefore has Redis confirm the view it was decided on, and a stale view is
/// refreshed and the append decided again instead of being answered 409.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_alternating_nodes_is_never_refused_a_valid_sequence() {
    let redis = RedisServer::start();
    a_producer_alternating_nodes_on(redis.storage()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_a_producer_alternating_nodes_is_never_refused_a_valid_sequence() {
    let cluster = RedisCluster::start();
    a_producer_alternating_nodes_on(cluster.config().storage).await;
}

/// Two `eventqueue serve` nodes over one store.
async fn two_servers(storage: &StorageBackend) -> Vec<TestServer> {
    let mut nodes = Vec::new();
    for _ in 0..2 {
        let storage = storage.clone();
        nodes.push(
            TestServer::start_tuned(
                tempfile::tempdir().unwrap(),
                move |c| c.storage = storage,
                server_config(),
            )
            .await,
        );
    }
    nodes
}

async fn a_producer_alternating_nodes_on(storage: StorageBackend) {
    let nodes = two_servers(&storage).await;
    let http = client();
    let created = http
        .put(nodes[0].url("/v1/stream/alt"))
        .header("content-type", "text/plain")
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    // Epoch 0 for the first half, then the producer restarts with epoch 1 (from seq 0);
    // `Stream-Seq` grows throughout.
    const APPENDS: usize = 60;
    let mut expected = String::new();
    for i in 0..APPENDS {
        let (epoch, seq) = if i < APPENDS / 2 {
            (0, i)
        } else {
            (1, i - APPENDS / 2)
        };
        let body = format!("m{i};");
        let answer = http
            .post(nodes[i % 2].url("/v1/stream/alt"))
            .header("content-type", "text/plain")
            .header("producer-id", "p")
            .header("producer-epoch", epoch.to_string())
            .header("producer-seq", seq.to_string())
            .header("stream-seq", format!("{i:06}"))
            .body(body.clone())
            .send()
            .await
            .unwrap();
        let status = answer.status();
        let headers = format!("{:?}", answer.headers());
        assert_eq!(
            status,
            200,
            "append {i} (epoch {epoch}, seq {seq}) on node {}: {headers}",
            i % 2
        );
        expected.push_str(&body);
    }
    // A real gap is still refused, on either node, naming the seq that comes next.
    for node in &nodes {
        let gap = http
            .post(node.url("/v1/stream/alt"))
            .header("content-type", "text/plain")
            .header("producer-id", "p")
            .header("producer-epoch", "1")
            .header("producer-seq", "99")
            .body("x")
            .send()
            .await
            .unwrap();
        assert_eq!(gap.status(), 409);
        assert_eq!(
            gap.headers()
                .get("producer-expected-seq")
                .and_then(|v| v.to_str().ok()),
            Some((APPENDS / 2).to_string().as_str())
        );
    }
    for node in &nodes {
        let all = http
            .get(node.url("/v1/stream/alt?offset=-1"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert_eq!(all, expected);
    }
    for node in nodes {
        node.stop().await;
    }
}

/// `--redis-wait-replicas` on a Redis Cluster with one replica per master: N = 1
/// acknowledges once the replica of the queue's master has the events; N = 2 cannot be met
/// and the write fails as unavailable, naming the storage and the replicas reached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_waiting_for_replicas_acknowledges_when_they_confirm_and_fails_when_not() {
    let cluster = RedisCluster::start_with_replicas(1);
    let one = QueueManager::open(Config {
        redis_wait_replicas: 1,
        ..cluster.config()
    })
    .await
    .unwrap();
    let (t, k) = (tenant("t"), task("job"));
    let q = one
        .create_queue(&t, &k, QueueOptions::default())
        .await
        .unwrap();
    for expected in 0..3 {
        assert_eq!(
            q.enqueue(eventqueue::Event::new(&t, &k, working()))
                .await
                .unwrap(),
            expected
        );
    }
    // The replica of the queue's master answers for its slot once told to read.
    let on_replicas: Vec<u64> = cluster
        .ports
        .iter()
        .filter_map(|port| {
            let mut conn = redis::Client::open(format!("redis://127.0.0.1:{port}"))
                .ok()?
                .get_connection()
                .ok()?;
            let role: String = redis::cmd("INFO")
                .arg("replication")
                .query(&mut conn)
                .ok()?;
            if !role.contains("role:slave") {
                return None;
            }
            redis::cmd("READONLY").query::<()>(&mut conn).ok()?;
            redis::cmd("XLEN").arg("eq:e:{t/job}").query(&mut conn).ok()
        })
        .collect();
    assert_eq!(
        on_replicas,
        vec![3],
        "one replica serves the slot and had every acknowledged event"
    );
    one.shutdown().await.unwrap();

    let two = QueueManager::open(Config {
        redis_wait_replicas: 2,
        redis_wait_timeout: Duration::from_millis(100),
        ..cluster.config()
    })
    .await
    .unwrap();
    let q = two.get_queue(&t, &k).unwrap();
    match q.enqueue(eventqueue::Event::new(&t, &k, working())).await {
        Err(Error::Storage(e)) => {
            let text = e.to_string();
            assert!(e.is_unavailable(), "{text}");
            assert!(
                text.contains(&format!("redis at {}", cluster.url()))
                    && text.contains("1 of 2 replicas"),
                "{text}"
            );
        }
        other => panic!("expected the replica wait to fail, got {other:?}"),
    }
    two.shutdown().await.unwrap();
}

/// A stream entry as `XRANGE` answers it: its id and its fields.
type StreamEntry = (String, Vec<(String, Vec<u8>)>);

/// Ids the server gives events sent without one are derived from their offsets: every node
/// derives the same, stores them without an idempotency-index entry, and recognises one
/// sent back explicitly (on any node) as the stored event; a queue deleted and created
/// again derives other ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_derived_from_offsets_are_shared_by_every_node() {
    let redis = RedisServer::start();
    let nodes = two_servers(&redis.storage()).await;
    let http = client();
    let post = |node: usize, path: &str, body: serde_json::Value| {
        http.post(nodes[node].url(path)).json(&body).send()
    };
    let status = json!({"event_type": "status", "state": "working"});
    let mut con = redis::Client::open(redis.url())
        .unwrap()
        .get_connection()
        .unwrap();
    // The ids of the events stored, and how many the index holds.
    let mut stored = || {
        let entries: Vec<StreamEntry> = redis::cmd("XRANGE")
            .arg("eq:e:{default/job}")
            .arg("-")
            .arg("+")
            .query(&mut con)
            .unwrap();
        let ids: Vec<String> = entries
            .iter()
            .map(|(_, fields)| {
                let rec = &fields[0].1;
                let json = 4 + usize::from(u16::from_be_bytes([rec[2], rec[3]]));
                let event: serde_json::Value = serde_json::from_slice(&rec[json..]).unwrap();
                event["event_id"].as_str().unwrap().to_string()
            })
            .collect();
        let indexed: usize = redis::cmd("HLEN")
            .arg("eq:i:{default/job}")
            .query(&mut con)
            .unwrap();
        (ids, indexed)
    };
    let created = post(0, "/events/queues", json!({"task_id": "job"}))
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    // Sent to both nodes, without ids.
    for node in [0, 1, 0] {
        let answer: serde_json::Value = post(node, "/events/queues/job/events", status.clone())
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert!(answer["offsets"].is_array(), "{answer}");
    }
    let (ids, indexed) = stored();
    assert_eq!(ids.len(), 3);
    assert_eq!(indexed, 0, "derived ids need no index entry");
    for id in &ids {
        assert!(
            id.len() == 16
                && id.starts_with("evt_")
                && id[4..].bytes().all(|b| b.is_ascii_hexdigit()),
            "{id}"
        );
    }
    assert!(ids[0] != ids[1] && ids[1] != ids[2] && ids[0] != ids[2]);
    // Each id sent again, on either node, is the event stored: nothing appended.
    for (offset, id) in ids.iter().enumerate() {
        for node in [0, 1] {
            let mut event = status.clone();
            event["event_id"] = json!(id);
            let answer: serde_json::Value = post(node, "/events/queues/job/events", event)
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            assert_eq!(answer["offsets"], json!([offset]), "{id} on node {node}");
            assert_eq!(answer["latest_offset"], json!(3));
        }
    }
    // Deleted and created again: other ids, and an old one is new (on the other node, once
    // it knows the new queue).
    let deleted = http
        .delete(nodes[1].url("/events/queues/job"))
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 204);
    let created = post(1, "/events/queues", json!({"task_id": "job"}))
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    for _ in 0..2 {
        let answer = post(1, "/events/queues/job/events", status.clone())
            .await
            .unwrap();
        assert_eq!(answer.status(), 200);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while nodes[0].get_json("/events/queues/job").await["latest_offset"] != json!(2) {
        assert!(Instant::now() < deadline, "node A learns of the new queue");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (again, _) = stored();
    assert_eq!(again.len(), 2);
    assert!(
        again.iter().all(|id| !ids.contains(id)),
        "{ids:?} {again:?}"
    );
    let mut old = status.clone();
    old["event_id"] = json!(ids[1]);
    let answer: serde_json::Value = post(0, "/events/queues/job/events", old)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["offsets"], json!([2]), "{answer}");
    for node in nodes {
        node.stop().await;
    }
}

/// A replay of many chunks from Redis gets every event once, in order, while producers
/// append and trimming drops the oldest: a gap notice where events went, never a repeat or a
/// hole after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_of_many_chunks_is_dense_while_appends_trim_it() {
    let redis = RedisServer::start();
    let config = Config {
        replay_chunk: 64,
        ..redis.config()
    };
    let m = QueueManager::open(config).await.unwrap();
    let (t, k) = (tenant("t"), task("long"));
    let q = m
        .create_queue(&t, &k, QueueOptions::default().with_max_buffer_size(3000))
        .await
        .unwrap();
    let batch = |n: usize| {
        (0..n)
            .map(|_| eventqueue::Event::new(&t, &k, working()))
            .collect::<Vec<_>>()
    };
    for _ in 0..20 {
        q.enqueue_batch(batch(100)).await.unwrap();
    }
    // Whole: 2000 events, 32 chunks.
    let mut sub = q.subscribe(0).unwrap();
    let all: Vec<u64> = (0..2000).collect();
    assert_eq!(offsets(&mut sub, 2000).await, all);
    drop(sub);
    // Read slowly from the start while 3000 more are appended: the first 2000 are trimmed
    // meanwhile (3000 retained).
    let mut sub = q.subscribe(0).unwrap();
    let producer = {
        let q = q.clone();
        let events: Vec<_> = (0..30).map(|_| batch(100)).collect();
        tokio::spawn(async move {
            for b in events {
                q.enqueue_batch(b).await.unwrap();
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    let mut next = 0;
    while next < 5000 {
        let d = tokio::time::timeout(Duration::from_secs(20), sub.next())
            .await
            .expect("a delivery within 20 s")
            .expect("the stream goes on")
            .unwrap();
        match d {
            eventqueue::Delivery::Event(e) => {
                assert_eq!(e.offset(), next, "no repeat, no hole");
                next += 1;
            }
            eventqueue::Delivery::Gap {
                requested_offset,
                first_available_offset,
            } => {
                assert_eq!(requested_offset, next);
                assert!(first_available_offset > next && first_available_offset <= 2000);
                next = first_available_offset;
            }
        }
        if next % 500 == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    producer.await.unwrap();
    m.shutdown().await.unwrap();
}

/// A replay right after Redis restarted: the node's idle read connections broke with it,
/// and the read is retried on a new one instead of failing the stream.
#[tokio::test]
async fn a_replay_after_a_redis_restart_reads_on_a_new_connection() {
    let mut redis = RedisServer::start();
    let m = QueueManager::open(redis.config()).await.unwrap();
    let q = queue_with_events(&m, "again", 20).await;
    assert_replays(&q, 20).await;
    redis.kill();
    redis.restart();
    assert_replays(&q, 20).await;
    m.shutdown().await.unwrap();
}

/// A queue's slot moved to another master after the node learnt the cluster's masters:
/// the node's next replay meets the redirection and still reads every event (and so do
/// later ones, and writes).
#[tokio::test]
async fn cluster_a_replay_follows_its_queue_to_another_master() {
    let cluster = RedisCluster::start();
    let m = QueueManager::open(cluster.config()).await.unwrap();
    let q = queue_with_events(&m, "moving", 30).await;
    assert_replays(&q, 30).await;

    // Move the queue's slot from its master to another, as `redis-cli --cluster reshard`
    // does: IMPORTING / MIGRATING, MIGRATE its keys, then every master is told the owner.
    let conn = |port: u16| {
        redis::Client::open(format!("redis://127.0.0.1:{port}"))
            .unwrap()
            .get_connection()
            .unwrap()
    };
    let mut any = conn(cluster.ports[0]);
    let slot: i64 = redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg("eq:e:{t/moving}")
        .query(&mut any)
        .unwrap();
    let count = |port: u16| -> i64 {
        redis::cmd("CLUSTER")
            .arg("COUNTKEYSINSLOT")
            .arg(slot)
            .query(&mut conn(port))
            .unwrap()
    };
    let from = *cluster.ports.iter().find(|&&p| count(p) > 0).unwrap();
    let to = *cluster.ports.iter().find(|&&p| p != from).unwrap();
    let id = |port: u16| -> String {
        redis::cmd("CLUSTER")
            .arg("MYID")
            .query(&mut conn(port))
            .unwrap()
    };
    let (from_id, to_id) = (id(from), id(to));
    let setslot = |port: u16, how: &str, node: &str| {
        let () = redis::cmd("CLUSTER")
            .arg("SETSLOT")
            .arg(slot)
            .arg(how)
            .arg(node)
            .query(&mut conn(port))
            .unwrap();
    };
    setslot(to, "IMPORTING", &from_id);
    setslot(from, "MIGRATING", &to_id);
    let keys: Vec<String> = redis::cmd("CLUSTER")
        .arg("GETKEYSINSLOT")
        .arg(slot)
        .arg(100)
        .query(&mut conn(from))
        .unwrap();
    assert!(keys.contains(&"eq:e:{t/moving}".to_string()), "{keys:?}");
    let () = redis::cmd("MIGRATE")
        .arg("127.0.0.1")
        .arg(to)
        .arg("")
        .arg(0)
        .arg(5000)
        .arg("KEYS")
        .arg(&keys)
        .query(&mut conn(from))
        .unwrap();
    for &port in &cluster.ports {
        setslot(port, "NODE", &to_id);
    }
    assert_eq!(count(from), 0);

    for _ in 0..2 {
        assert_replays(&q, 30).await;
    }
    let (t, k) = (tenant("t"), task("moving"));
    assert_eq!(
        q.enqueue(eventqueue::Event::new(&t, &k, working()))
            .await
            .unwrap(),
        30
    );
    m.shutdown().await.unwrap();
}

impl RedisCluster {
    /// The master serving `key`'s slot and its replica: (index of the master, index of the
    /// replica) into `ports`.
    fn master_and_replica_of(&self, key: &str) -> (usize, usize) {
        let mut conn = redis::Client::open(format!("redis://127.0.0.1:{}", self.ports[0]))
            .unwrap()
            .get_connection()
            .unwrap();
        let slot: u16 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query(&mut conn)
            .unwrap();
        // CLUSTER NODES: `id ip:port@bus flags master-id ping pong epoch state slots…`.
        let nodes: String = redis::cmd("CLUSTER").arg("NODES").query(&mut conn).unwrap();
        let port_of = |addr: &str| -> u16 {
            addr.split('@')
                .next()
                .unwrap()
                .rsplit(':')
                .next()
                .unwrap()
                .parse()
                .unwrap()
        };
        let lines: Vec<Vec<&str>> = nodes.lines().map(|l| l.split(' ').collect()).collect();
        let master = lines
            .iter()
            .find(|f| {
                f[2].contains("master")
                    && f[8..].iter().any(|r| {
                        let (lo, hi) = r.split_once('-').unwrap_or((r, r));
                        matches!((lo.parse::<u16>(), hi.parse::<u16>()),
                            (Ok(lo), Ok(hi)) if lo <= slot && slot <= hi)
                    })
            })
            .expect("a master serves the slot");
        let replica = lines
            .iter()
            .find(|f| f[3] == master[0])
            .expect("the master has a replica");
        let index = |port: u16| self.ports.iter().position(|&p| p == port).unwrap();
        (index(port_of(master[1])), index(port_of(replica[1])))
    }

    /// SIGKILL of node `i`.
    fn kill(&mut self, i: usize) {
        let _ = self.children[i].kill();
        let _ = self.children[i].wait();
    }

    /// Node `i` started again after [`RedisCluster::kill`] (with its cluster config and AOF).
    fn start_again(&mut self, i: usize) {
        let mut child = self.spawn_node(i);
        assert!(
            wait_for_ping_unless_exited(self.ports[i], &mut child),
            "redis-server did not start again at port {}",
            self.ports[i]
        );
        self.children[i] = child;
    }
}

/// A failover in a Redis Cluster: the master of a queue's slot is killed, its replica takes
/// over (`CLUSTER FAILOVER TAKEOVER`) and the old master comes back as its replica. Every
/// event acknowledged with `--redis-wait-replicas 1` before is still there; the nodes find
/// the new master for their writes and replica waits by themselves; a producer sending each
/// new event (same `event_id`) until it is acknowledged, alternating nodes, gets the next
/// offsets, once each — although the first tries are refused after they were stored (the
/// new master's replica is not back in time), which no notice tells the writing node of; a
/// node whose reader followed the old master keeps its live subscriber going (each event
/// once, in order, the ones it wrote itself included); new replays on both nodes read every
/// event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_failover_keeps_every_acknowledged_event_and_live_streams_go_on() {
    let mut cluster = RedisCluster::start_with_replicas(1);
    let config = Config {
        redis_wait_replicas: 1,
        redis_wait_timeout: Duration::from_millis(500),
        ..cluster.config()
    };
    let a = QueueManager::open(config.clone()).await.unwrap();
    let b = QueueManager::open(config).await.unwrap();
    let (t, k) = (tenant("t"), task("job"));
    let qa = queue_with_events(&a, "job", 30).await;
    let qb = known_on(&b, "job").await;
    let mut live = qb.subscribe(0).unwrap();
    assert_eq!(offsets(&mut live, 30).await, (0..30).collect::<Vec<u64>>());

    let (master, replica) = cluster.master_and_replica_of("eq:e:{t/job}");
    cluster.kill(master);
    let mut conn = redis::Client::open(format!("redis://127.0.0.1:{}", cluster.ports[replica]))
        .unwrap()
        .get_connection()
        .unwrap();
    redis::cmd("CLUSTER")
        .arg("FAILOVER")
        .arg("TAKEOVER")
        .query::<()>(&mut conn)
        .unwrap();
    cluster.start_again(master);

    // Writes are refused until the nodes find the new master and it has a replica again; the
    // producer sends the same event again until it is acknowledged.
    let deadline = Instant::now() + Duration::from_secs(30);
    for expected in 30..36u64 {
        let q = if expected % 2 == 0 { &qa } else { &qb };
        let event = eventqueue::Event::new(&t, &k, working());
        loop {
            match q.enqueue(event.clone()).await {
                Ok(offset) => {
                    assert_eq!(offset, expected, "offsets go on densely after the failover");
                    break;
                }
                Err(e) => {
                    assert!(Instant::now() < deadline, "writes did not resume: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
    assert_eq!(offsets(&mut live, 6).await, (30..36).collect::<Vec<u64>>());
    for q in [&qa, &qb] {
        assert_replays(q, 36).await;
    }
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}
