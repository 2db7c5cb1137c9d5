//! Criterion bench of the request path alone (issue 24): an enqueue body's bytes → parsed and
//! validated events → each event's JSON as the writer stores it, offset spliced in. No HTTP
//! layer, no writer, no disk: the part of a request's CPU that grows with the events it
//! carries, measured without the noise of the machine's other work.
//!
//! The events are the compare harness's (`compare/src/eq_peer.rs`): 300-byte `progress`
//! events whose `details` carry a number and a padding string, sent without an `event_id`.
//! `cargo bench --bench request` (append `-- --save-baseline NAME` / `--baseline NAME` to
//! compare two builds).

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use eventqueue::server::{ServerConfig, Tenant, enqueue_body_json};
use eventqueue::{Event, ProducerContext, TaskId, TenantId};

/// The compare harness's event: 300 bytes of JSON.
fn event_json(sent_us: u64) -> String {
    let head = format!(
        "{{\"event_type\":\"progress\",\"current\":1,\"total\":100,\"step\":\"processing_video\",\
         \"details\":{{\"sent_us\":{sent_us},\"pad\":\""
    );
    let pad = 300usize.saturating_sub(head.len() + 3);
    format!("{head}{}\"}}}}", "x".repeat(pad))
}

/// An artifact with nested data, keys in sorted order (as a `serde_json::Value` writes them).
const ARTIFACT: &str = r#"{"event_type":"artifact","artifact_type":"search_results","data":{"hits":[{"id":"doc_1","score":0.93,"title":"Intro"},{"id":"doc_2","score":0.81,"title":"Setup"}],"query":"install","took_ms":12},"is_partial":false}"#;

fn request_path(c: &mut Criterion) {
    let config = ServerConfig::default();
    let tenant = Tenant(TenantId::new("default").expect("tenant"));
    let task = TaskId::new("bench_s0").expect("task");
    let one = event_json(1_733_480_000_000_000);
    assert_eq!(one.len(), 300, "the compare harness's event size");
    let batch = format!(
        "{{\"events\":[{}]}}",
        (0..16)
            .map(|i| event_json(1_733_480_000_000_000 + i))
            .collect::<Vec<_>>()
            .join(",")
    );
    let mut g = c.benchmark_group("request");
    for (name, body, events) in [
        ("one_event", one.as_str(), 1),
        ("batch_16", batch.as_str(), 16),
        ("artifact", ARTIFACT, 1),
    ] {
        // What a server stores for this body; an error here would make the bench measure
        // the error path.
        let stored = enqueue_body_json(&config, &tenant, &task, body.as_bytes(), 0)
            .expect("a valid enqueue body");
        assert_eq!(stored.len(), events);
        g.throughput(Throughput::Elements(events as u64));
        g.bench_function(name, |b| {
            b.iter(|| enqueue_body_json(&config, &tenant, &task, body.as_bytes(), 7))
        });
    }
    // The same events read into an `Event` (a `serde_json::Value` per free-form field) and
    // rendered from it: the library's path, and the request path's before it read events
    // straight into their stored form. Measured in the same run, as the reference.
    let ctx = ProducerContext {
        tenant_id: &tenant.0,
        task_id: &task,
    };
    for (name, body) in [
        ("one_event_via_event", one.as_str()),
        ("artifact_via_event", ARTIFACT),
    ] {
        g.throughput(Throughput::Elements(1));
        g.bench_function(name, |b| {
            b.iter(|| {
                Event::from_producer_bytes(body.as_bytes(), &ctx).map(|e| e.render().with_offset(7))
            })
        });
    }
    g.finish();
}

criterion_group!(benches, request_path);
criterion_main!(benches);
