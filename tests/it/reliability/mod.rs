//! Reliability: simulated power loss swept over every sync of a workload, I/O faults swept over
//! every operation, a full disk through the HTTP server, and slow SSE consumers. The
//! process-kill test of the real server binary is a separate test binary (`tests/kill.rs`).

mod disk_full;
mod faults_sweep;
mod power_loss;
mod slow_consumers;

use std::collections::{BTreeMap, HashSet};

use eventqueue::{Delivery, Event, EventId, EventQueue, ProgressEvent, TaskId, TenantId};
use serde_json::Value;

pub use crate::library::{next, task, tenant};

/// An event whose content identifies it: producer-chosen id, step and a payload.
pub fn marked(t: &TenantId, k: &TaskId, id: &str, n: u64) -> Event {
    Event::new(
        t,
        k,
        ProgressEvent::new(n, n + 10)
            .step(format!("step_{id}"))
            .details(
                serde_json::json!({"id": id, "n": n, "pad": "x".repeat((n % 7) as usize * 40)}),
            ),
    )
    .with_event_id(EventId::new(id).unwrap())
}

/// An event's JSON without its `offset` (assigned at commit).
pub fn content(json: &[u8]) -> Value {
    let mut v: Value = serde_json::from_slice(json).expect("stored event is not JSON");
    if let Value::Object(map) = &mut v {
        map.remove("offset");
    }
    v
}

/// What a producer was told was stored: offset → (event id, content).
pub type Acked = BTreeMap<u64, (String, Value)>;

/// Replays every retained event of `q` and checks the log's shape: offsets dense from the first
/// retained one to the latest, no event id twice. Returns offset → (id, content).
pub async fn retained(q: &EventQueue) -> Acked {
    let (first, latest) = (q.first_offset(), q.latest_offset());
    let mut sub = q.subscribe(first).unwrap();
    let mut out = Acked::new();
    let mut ids = HashSet::new();
    for expected in first..latest {
        match next(&mut sub).await {
            Some(Delivery::Event(e)) => {
                assert_eq!(e.offset(), expected, "offsets are not dense");
                let v = content(e.json());
                let id = v["event_id"].as_str().unwrap().to_string();
                assert!(ids.insert(id.clone()), "event id {id} stored twice");
                out.insert(expected, (id, v));
            }
            other => panic!("expected the event at {expected}, got {other:?}"),
        }
    }
    out
}

/// Every acknowledged event is retained at its offset with the content that was sent, unless
/// `max_buffer_size` trimmed it (then the retained window is exactly full).
pub fn check_acked(
    name: &str,
    acked: &Acked,
    stored: &Acked,
    first: u64,
    latest: u64,
    max_buffer: u64,
) {
    if let Some((&last, _)) = acked.last_key_value() {
        assert!(
            latest > last,
            "{name}: latest offset {latest} is not past acknowledged {last}"
        );
    }
    assert!(
        latest - first <= max_buffer,
        "{name}: {} retained > bound {max_buffer}",
        latest - first
    );
    if first > 0 {
        assert_eq!(
            latest - first,
            max_buffer,
            "{name}: events below {first} were dropped without need"
        );
    }
    for (off, (id, sent)) in acked {
        if *off < first {
            continue;
        }
        let Some((got_id, got)) = stored.get(off) else {
            panic!("{name}: acknowledged {id} at {off} is lost");
        };
        assert_eq!(got_id, id, "{name}: offset {off} holds another event");
        assert_eq!(got, sent, "{name}: {id} at {off} changed");
    }
}
