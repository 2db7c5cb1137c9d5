//! The Redis store against a real `redis-server` the tests start themselves (on a free
//! loopback port, in a temporary directory, AOF `always`), for what a shared server adds to
//! the library suite (which `.ci/run` also runs against Redis): the lease of the writing node,
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
struct RedisServer {
    port: u16,
    dir: TempDir,
    child: Option<Child>,
}

impl RedisServer {
    fn start() -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut server = RedisServer {
            port,
            dir: tempfile::tempdir().unwrap(),
            child: None,
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
            if let Ok(client) = redis::Client::open(self.url())
                && let Ok(mut conn) = client.get_connection_with_timeout(Duration::from_secs(1))
                && redis::cmd("PING").query::<String>(&mut conn).is_ok()
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

fn working() -> StatusEvent {
    StatusEvent::new(TaskState::Working)
}

#[tokio::test]
async fn a_second_node_on_one_redis_is_refused_until_the_first_shuts_down() {
    let redis = RedisServer::start();
    let first = QueueManager::open(redis.config()).await.unwrap();
    let err = QueueManager::open(redis.config()).await.unwrap_err();
    assert!(
        matches!(&err, Error::Storage(_)) && err.to_string().contains("another eventqueue node"),
        "{err}"
    );
    // Another prefix is another install: it opens.
    let other = QueueManager::open(Config {
        storage: StorageBackend::Redis {
            url: redis.url(),
            prefix: "other:".into(),
        },
        ..redis.config()
    })
    .await
    .unwrap();
    other.shutdown().await.unwrap();
    let (t, k) = (tenant("t"), task("kept"));
    let q = first
        .create_queue(&t, &k, QueueOptions::default())
        .await
        .unwrap();
    q.enqueue(eventqueue::Event::new(&t, &k, working()))
        .await
        .unwrap();
    first.shutdown().await.unwrap();
    // The lease went back at shutdown: the next node opens at once and finds the queue.
    let second = QueueManager::open(redis.config()).await.unwrap();
    let q = second
        .get_queue(&t, &k)
        .expect("the queue survives the node");
    assert_eq!(q.latest_offset(), 1);
    second.shutdown().await.unwrap();
}

/// Redis away for longer than the lease's TTL loses the key (here: removed by hand, as its
/// expiry would): writes are refused as unavailable, nothing is stored, and the node takes the
/// lease again by itself and writes on — no restart. A lease another node holds stops it.
#[tokio::test]
async fn a_lease_that_expired_is_taken_again_and_one_taken_by_another_stops_writes() {
    let redis = RedisServer::start();
    let m = QueueManager::open(redis.config()).await.unwrap();
    let (t, k) = (tenant("t"), task("lease"));
    let q = m
        .create_queue(&t, &k, QueueOptions::default())
        .await
        .unwrap();
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let _: () = redis::cmd("DEL").arg("eq:lease").query(&mut conn).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let offset = loop {
        match q.enqueue(eventqueue::Event::new(&t, &k, working())).await {
            Ok(offset) => break offset,
            Err(Error::Storage(e)) => assert!(e.is_unavailable(), "{e}"),
            Err(other) => panic!("{other}"),
        }
        assert!(Instant::now() < deadline, "the lease was not taken again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(offset, 0, "nothing was stored while the lease was away");
    // Another node's token: this node stops writing, and says why.
    let _: () = redis::cmd("SET")
        .arg("eq:lease")
        .arg("someone-else")
        .query(&mut conn)
        .unwrap();
    let err = q
        .enqueue(eventqueue::Event::new(&t, &k, working()))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("another node holds"), "{err}");
    let _ = m.shutdown().await;
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

#[tokio::test]
async fn redis_down_answers_503_naming_it_and_the_node_recovers_by_itself() {
    let mut redis = RedisServer::start();
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

    redis.kill();
    let down = publish().await.unwrap();
    assert_eq!(down.status(), 503);
    let body: serde_json::Value = down.json().await.unwrap();
    let detail = body["detail"].as_str().unwrap();
    assert!(
        detail.contains(&format!("redis at redis://127.0.0.1:{}", redis.port)),
        "{detail}"
    );
    let health = http.get(server.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 503);

    redis.restart();
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
    // Writes work again, on the offsets that follow what was stored before.
    let again = publish().await.unwrap();
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
