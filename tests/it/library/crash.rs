//! A process that aborts mid-write (no shutdown, no checkpoint) loses no acknowledged event:
//! the test re-runs its own binary as a child that enqueues from several producers, prints
//! each acknowledgement, and calls `abort()`; the parent reopens the directory and checks.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use eventqueue::{Delivery, EventId, QueueManager, QueueOptions};

use super::*;
// The embedded store's own behaviour: always on redb, whatever the suite runs against.
use super::embedded::{config, open};

const CHILD_ENV: &str = "EVENTQUEUE_CRASH_CHILD_DIR";
const TEST_NAME: &str = "library::crash::acknowledged_events_survive_abort";

fn child(dir: &str) -> ! {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let m = QueueManager::open(config(std::path::Path::new(dir)))
            .await
            .unwrap();
        let t = tenant("t");
        let mut handles = Vec::new();
        for p in 0..8u64 {
            let k = task(&format!("q{}", p % 3));
            let q = m
                .get_or_create_queue(
                    &t,
                    &k,
                    QueueOptions::default().with_max_buffer_size(100_000),
                )
                .await
                .unwrap();
            let t = t.clone();
            handles.push(tokio::spawn(async move {
                for i in 0..u64::MAX {
                    let id = format!("p{p}-{i}");
                    let e = phase(&t, &k, i).with_event_id(EventId::new(&id).unwrap());
                    let off = q.enqueue(e).await.unwrap();
                    println!("ACK {k} {off} {id}");
                    if i == 50 {
                        // Let a checkpoint happen in the middle of the run.
                        tokio::time::sleep(Duration::from_millis(300)).await;
                    }
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(700)).await;
        std::process::abort();
    })
}

#[test]
fn acknowledged_events_survive_abort() {
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        child(&dir);
    }
    for round in 0..3 {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(std::env::current_exe().unwrap())
            .args([TEST_NAME, "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, dir.path())
            .output()
            .unwrap();
        assert!(!out.status.success(), "the child must die by abort");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let mut acked: BTreeMap<(String, u64), String> = BTreeMap::new();
        for line in stdout.lines().filter(|l| l.starts_with("ACK ")) {
            let parts: Vec<&str> = line.split(' ').collect();
            if parts.len() == 4 {
                acked.insert(
                    (parts[1].to_string(), parts[2].parse().unwrap()),
                    parts[3].into(),
                );
            }
        }
        assert!(
            acked.len() > 100,
            "round {round}: child acknowledged too little"
        );
        let wal = std::fs::metadata(dir.path().join("eventqueue.wal"))
            .unwrap()
            .len();
        assert!(wal > 0, "the abort must leave log records to recover from");
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let m = open(dir.path()).await;
            let t = tenant("t");
            for name in ["q0", "q1", "q2"] {
                let q = m.get_queue(&t, &task(name)).unwrap();
                let latest = q.latest_offset();
                let mut sub = q.subscribe(0).unwrap();
                let mut seen = BTreeMap::new();
                for expected in 0..latest {
                    let Some(Delivery::Event(e)) = next(&mut sub).await else {
                        panic!("round {round}: {name} has a hole at {expected}")
                    };
                    assert_eq!(e.offset(), expected);
                    let id = e.event().unwrap().event_id.to_string();
                    assert!(seen.insert(id, expected).is_none(), "duplicate id");
                }
                for ((qn, off), id) in
                    acked.range((name.to_string(), 0)..=(name.to_string(), u64::MAX))
                {
                    assert_eq!(qn, name);
                    assert_eq!(
                        seen.get(id),
                        Some(off),
                        "round {round}: acked {id} at {off} lost"
                    );
                }
                // Producers can continue at the next offset.
                let next_off = q.enqueue(phase(&t, &task(name), 0)).await.unwrap();
                assert_eq!(next_off, latest);
            }
            m.shutdown().await.unwrap();
        });
    }
}
