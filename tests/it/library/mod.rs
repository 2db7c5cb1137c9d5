//! Library tests: queues, manager, restart, idempotency, model-based properties, stress.

mod bench;
mod checkpoint;
mod compaction;
mod crash;
mod faults;
mod idempotency;
mod manager;
mod producer;
mod props;
mod queue;
mod restart;
mod stress;

use std::time::Duration;

use eventqueue::{
    Config, Delivery, Event, QueueManager, QueueOptions, StatusEvent, Subscription, TaskId,
    TaskState, TenantId,
};

pub fn tenant(s: &str) -> TenantId {
    TenantId::new(s).unwrap()
}

pub fn task(s: &str) -> TaskId {
    TaskId::new(s).unwrap()
}

/// The store the library suite runs against: `EVENTQUEUE_TEST_STORAGE` (what `--storage`
/// takes), the embedded default when unset. `.ci/run` runs the suite once per backend.
pub fn backend() -> eventqueue::StorageBackend {
    match std::env::var("EVENTQUEUE_TEST_STORAGE") {
        Ok(s) if !s.is_empty() => s.parse().expect("EVENTQUEUE_TEST_STORAGE"),
        _ => eventqueue::StorageBackend::Redb,
    }
}

/// Whether the backend under test keeps queues across a reopen.
pub fn persists() -> bool {
    backend().persists()
}

pub fn config(dir: &std::path::Path) -> Config {
    let storage = match backend() {
        // Tests run in parallel on one Redis: each data directory gets its own key prefix
        // (the same on a reopen of that directory).
        eventqueue::StorageBackend::Redis { url, .. } => eventqueue::StorageBackend::Redis {
            url,
            prefix: format!("test:{}:", dir.display()),
        },
        other => other,
    };
    Config {
        cache_size_bytes: 4 << 20,
        storage,
        ..Config::new(dir)
    }
}

pub async fn open(dir: &std::path::Path) -> QueueManager {
    QueueManager::open(config(dir)).await.unwrap()
}

/// The embedded store, whatever the suite runs against: for tests of what only it does
/// (restarts, crash recovery, log faults, file formats, compaction).
pub mod embedded {
    use eventqueue::{Config, QueueManager, StorageBackend};

    pub fn config(dir: &std::path::Path) -> Config {
        Config {
            storage: StorageBackend::Redb,
            ..super::config(dir)
        }
    }

    pub async fn open(dir: &std::path::Path) -> QueueManager {
        QueueManager::open(config(dir)).await.unwrap()
    }
}

/// A `working` status event whose phase is `phase_{n}`.
pub fn phase(t: &TenantId, k: &TaskId, n: u64) -> Event {
    Event::new(
        t,
        k,
        StatusEvent::new(TaskState::Working).phase(format!("phase_{n}")),
    )
}

pub fn with_buffer(n: u64) -> QueueOptions {
    QueueOptions::default().with_max_buffer_size(n)
}

/// Waits for the next delivery; a stalled subscription fails the test instead of hanging it.
pub async fn next(sub: &mut Subscription) -> Option<Delivery> {
    tokio::time::timeout(Duration::from_secs(20), sub.next())
        .await
        .expect("subscription stalled")
        .map(|r| r.unwrap())
}

/// The next delivery, which must be an event.
pub async fn next_event(sub: &mut Subscription) -> std::sync::Arc<eventqueue::RecordedEvent> {
    match next(sub).await {
        Some(Delivery::Event(e)) => e,
        other => panic!("expected an event, got {other:?}"),
    }
}

/// Reads `n` deliveries and returns the event offsets (panics on a gap).
pub async fn offsets(sub: &mut Subscription, n: usize) -> Vec<u64> {
    let mut out = Vec::new();
    for _ in 0..n {
        match next(sub).await {
            Some(Delivery::Event(e)) => out.push(e.offset()),
            other => panic!("expected an event, got {other:?}"),
        }
    }
    out
}

/// Reads until the subscription ends.
pub async fn drain(sub: &mut Subscription) -> Vec<Delivery> {
    let mut out = Vec::new();
    while let Some(d) = next(sub).await {
        out.push(d);
    }
    out
}

pub fn event_offsets(ds: &[Delivery]) -> Vec<u64> {
    ds.iter()
        .filter_map(|d| d.as_event().map(|e| e.offset()))
        .collect()
}
