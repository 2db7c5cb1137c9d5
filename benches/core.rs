//! Criterion benches of the library core. The end-to-end figures (concurrent producers,
//! fan-out, reopen) come from `eventqueue bench`, which measures a raw fdatasync baseline in
//! the same run; these benches track the per-operation costs between changes.

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use eventqueue::{
    Config, Delivery, Durability, Event, ProducerContext, ProgressEvent, QueueManager,
    QueueOptions, TaskId, TenantId,
};

fn event(t: &TenantId, k: &TaskId, n: u64) -> Event {
    Event::new(
        t,
        k,
        ProgressEvent::new(n % 100, 100)
            .step("processing_video")
            .details(serde_json::json!({"video": "sample_video_0001.mp4", "stage": "embedding"})),
    )
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn render_and_parse(c: &mut Criterion) {
    let (t, k) = (TenantId::new("t").unwrap(), TaskId::new("k").unwrap());
    let e = event(&t, &k, 5);
    let json = e.render().with_offset(7);
    let mut g = c.benchmark_group("event");
    g.bench_function("render", |b| b.iter(|| e.render().with_offset(7)));
    g.bench_function("parse", |b| {
        b.iter(|| Event::from_json_bytes(&json).expect("parse"))
    });
    // What the enqueue route does with a producer's body: parse it against the queue, then
    // render it for the writer.
    let body = br#"{"event_type":"progress","current":5,"total":100,"step":"processing_video","details":{"video":"sample_video_0001.mp4","stage":"embedding"}}"#;
    let ctx = ProducerContext {
        tenant_id: &t,
        task_id: &k,
    };
    g.bench_function("producer_parse", |b| b.iter(|| producer_parse(body, &ctx)));
    g.bench_function("producer_parse_render", |b| {
        b.iter(|| producer_parse(body, &ctx).render().with_offset(7))
    });
    g.finish();
}

/// A producer's event body parsed as the enqueue route parses it.
fn producer_parse(body: &[u8], ctx: &ProducerContext<'_>) -> Event {
    Event::from_producer_bytes(body, ctx).expect("parse")
}

fn enqueue(c: &mut Criterion) {
    let rt = rt();
    let mut g = c.benchmark_group("enqueue");
    g.measurement_time(Duration::from_secs(5));
    for (name, durability) in [
        ("immediate", Durability::Immediate),
        ("buffered", Durability::buffered()),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (m, q) = rt.block_on(async {
            let m = QueueManager::open(Config {
                durability,
                ..Config::new(dir.path())
            })
            .await
            .unwrap();
            let q = m
                .create_queue(
                    &TenantId::new("t").unwrap(),
                    &TaskId::new("k").unwrap(),
                    QueueOptions::default(),
                )
                .await
                .unwrap();
            (m, q)
        });
        let (t, k) = (q.tenant_id().clone(), q.task_id().clone());
        g.throughput(Throughput::Elements(1));
        g.bench_function(BenchmarkId::new("one", name), |b| {
            b.to_async(&rt)
                .iter(|| async { q.enqueue(event(&t, &k, 1)).await.unwrap() })
        });
        g.throughput(Throughput::Elements(100));
        g.bench_function(BenchmarkId::new("batch_100", name), |b| {
            b.to_async(&rt).iter(|| async {
                let batch = (0..100).map(|n| event(&t, &k, n)).collect();
                q.enqueue_batch(batch).await.unwrap()
            })
        });
        rt.block_on(m.shutdown()).unwrap();
    }
    g.finish();
}

fn replay(c: &mut Criterion) {
    let rt = rt();
    let dir = tempfile::tempdir().unwrap();
    let n = 20_000u64;
    let (m, q) = rt.block_on(async {
        let m = QueueManager::open(Config::new(dir.path())).await.unwrap();
        let (t, k) = (TenantId::new("t").unwrap(), TaskId::new("k").unwrap());
        let q = m
            .create_queue(&t, &k, QueueOptions::default().with_max_buffer_size(n))
            .await
            .unwrap();
        for chunk in 0..n / 1000 {
            let batch = (0..1000).map(|i| event(&t, &k, chunk * 1000 + i)).collect();
            q.enqueue_batch(batch).await.unwrap();
        }
        (m, q)
    });
    let mut g = c.benchmark_group("replay");
    g.throughput(Throughput::Elements(n));
    g.bench_function("20k_from_log", |b| {
        b.to_async(&rt).iter(|| async {
            let mut sub = q.subscribe(0).unwrap();
            let mut got = 0;
            while got < n {
                if let Some(Ok(Delivery::Event(_))) = sub.next().await {
                    got += 1;
                }
            }
        })
    });
    g.finish();
    rt.block_on(m.shutdown()).unwrap();
}

criterion_group!(benches, render_and_parse, enqueue, replay);
criterion_main!(benches);
