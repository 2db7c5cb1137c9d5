//! Slow consumers over real SSE connections: of many subscribers of one queue, some stop
//! reading while producers push events. Producers finish and the reading subscribers receive
//! everything *while the stalled ones are still stalled* (so nobody waited for them); then the
//! stalled ones read again and get every retained event in order, with a gap notice wherever
//! retention dropped what they still owed. Latencies and the process's RSS are reported.
//!
//! `cargo test` runs a scaled-down version (100 subscribers, 10 stalled, 10k events); the full
//! one (1000 / 100 / 100k) is `#[ignore]`d: `scripts/slow-consumers.sh` runs it.

use std::sync::Arc;
use std::time::Instant;

use serde_json::{Value, json};
use tokio::sync::{Barrier, watch};

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::BoxStream;

use crate::helpers::{self, Frame, HANG_GUARD, TestServer};

const TASK: &str = "fanout";

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|v| v.parse().unwrap_or(0)))
        })
        .unwrap_or(0)
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// A minimal SSE reader that keeps nothing it has parsed (the shared test reader keeps every
/// raw byte, which would dwarf the server's own memory here).
struct Reader {
    body: BoxStream<'static, reqwest::Result<Bytes>>,
    buf: Vec<u8>,
}

impl Reader {
    fn new(r: reqwest::Response) -> Self {
        Self {
            body: r.bytes_stream().boxed(),
            buf: Vec::new(),
        }
    }

    /// The next frame that is not a comment; `None` at the end of the stream.
    async fn next_event(&mut self) -> Option<Frame> {
        tokio::time::timeout(HANG_GUARD, async {
            loop {
                while let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
                    let block: Vec<u8> = self.buf.drain(..end + 2).collect();
                    let text = std::str::from_utf8(&block[..end]).unwrap();
                    let mut frame = Frame::default();
                    for line in text.split('\n') {
                        if line.starts_with(':') {
                            continue;
                        }
                        let (field, value) = line.split_once(": ").unwrap_or((line, ""));
                        match field {
                            "id" => frame.id = Some(value.to_string()),
                            "event" => frame.event = Some(value.to_string()),
                            "data" => frame.data = Some(value.to_string()),
                            other => panic!("unexpected SSE field {other:?}"),
                        }
                    }
                    if frame.event.is_some() || frame.data.is_some() {
                        return Some(frame);
                    }
                }
                match self.body.next().await {
                    Some(Ok(chunk)) => self.buf.extend_from_slice(&chunk),
                    _ => return None,
                }
            }
        })
        .await
        .expect("no SSE event arrived")
    }
}

/// What one subscriber saw: events in order, gaps where they were announced.
#[derive(Default, Debug)]
struct Seen {
    events: u64,
    gaps: u64,
    /// Delivery latency (ms) of every 16th event, from the producer's send time.
    latency_ms: Vec<f64>,
}

/// Reads `stream` to its end (the terminal event), checking order and gap notices.
async fn read_to_end(stream: &mut Reader, from: u64, last: u64, t0: Instant) -> Seen {
    let mut seen = Seen::default();
    let mut next = from;
    while let Some(frame) = stream.next_event().await {
        match frame.event.as_deref() {
            Some("gap") => {
                let g = frame.json();
                assert_eq!(
                    g["requested_offset"], next,
                    "a gap notice for the wrong offset"
                );
                let to = g["first_available_offset"].as_u64().unwrap();
                assert!(to > next, "a gap that skips nothing");
                next = to;
                seen.gaps += 1;
            }
            Some(_) => {
                let off: u64 = frame.id.as_deref().unwrap().parse().unwrap();
                assert_eq!(off, next, "an event out of order or a silent hole");
                // Sampled (parsed and kept): the full-scale run has 100M deliveries.
                if off.is_multiple_of(16)
                    && let Some(sent) = frame.json()["details"]["sent_us"].as_u64()
                {
                    let now = t0.elapsed().as_micros() as u64;
                    seen.latency_ms
                        .push(now.saturating_sub(sent) as f64 / 1000.0);
                }
                seen.events += 1;
                next += 1;
            }
            None => panic!("a frame without an event type: {frame:?}"),
        }
    }
    assert_eq!(next, last + 1, "the stream ended before the terminal event");
    seen
}

async fn scenario(subscribers: usize, stalled: usize, events: u64, retained: u64, pad: usize) {
    let mut config = helpers::server_config();
    config.max_sse_streams_per_tenant = subscribers + 10;
    config.max_sse_streams = subscribers + 10;
    // Every subscriber and producer is on loopback: one address.
    config.max_connections_per_ip = config.max_connections.max(subscribers + 100);
    config.max_connections = config.max_connections_per_ip;
    let server = TestServer::start(config).await;
    let http = helpers::client();
    let r = http
        .post(server.url("/events/queues"))
        .json(&json!({"task_id": TASK, "max_buffer_size": retained}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let rss_before = rss_kib();
    let t0 = Instant::now();

    // Subscribers connect; the stalled ones read one event and then stop until released.
    let ready = Arc::new(Barrier::new(subscribers + 1));
    let (release, released) = watch::channel(false);
    let mut subs = Vec::new();
    for i in 0..subscribers {
        let (ready, mut released) = (ready.clone(), released.clone());
        let url = server.url(&format!("/events/workflows/{TASK}"));
        let is_stalled = i < stalled;
        subs.push(tokio::spawn(async move {
            let r = helpers::client().get(url).send().await.unwrap();
            assert_eq!(r.status().as_u16(), 200);
            let mut s = Reader::new(r);
            assert_eq!(
                s.next_event().await.unwrap().event.as_deref(),
                Some("connected")
            );
            ready.wait().await;
            let mut first = 0;
            if is_stalled {
                let f = s.next_event().await.unwrap();
                assert_eq!(f.id.as_deref(), Some("0"));
                first = 1;
                // Stop reading until every producer and every reading subscriber is done.
                released.wait_for(|r| *r).await.unwrap();
            }
            (is_stalled, read_to_end(&mut s, first, events, t0).await)
        }));
    }
    ready.wait().await;

    // Producers: batches of 10, each event ~`pad` + 150 bytes, stamped with its send time.
    let producers = 4u64;
    let per = events / producers;
    let mut handles = Vec::new();
    let next_id = Arc::new(std::sync::atomic::AtomicU64::new(0));
    for _ in 0..producers {
        let url = server.url(&format!("/events/queues/{TASK}/events"));
        let next_id = next_id.clone();
        handles.push(tokio::spawn(async move {
            let http = helpers::client();
            let mut acks = Vec::new();
            for _ in 0..per / 10 {
                let batch: Vec<Value> = (0..10)
                    .map(|_| {
                        let n = next_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        json!({"event_type": "progress", "current": n, "total": events,
                               "details": {"sent_us": t0.elapsed().as_micros() as u64,
                                           "pad": "x".repeat(pad)}})
                    })
                    .collect();
                let sent = Instant::now();
                let r = http
                    .post(url.clone())
                    .json(&json!({"events": batch}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status().as_u16(), 200, "{}", r.text().await.unwrap());
                acks.push(sent.elapsed().as_secs_f64() * 1000.0);
            }
            acks
        }));
    }
    let mut acks = Vec::new();
    for h in handles {
        acks.extend(h.await.unwrap());
    }
    let produced = t0.elapsed();
    // The terminal event at offset `events` ends every stream.
    let r = http
        .post(server.url(&format!("/events/queues/{TASK}/events")))
        .json(&json!({"event_type": "complete", "result": {}}))
        .send()
        .await
        .unwrap();
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["offsets"], json!([events]));
    let rss_peak_stalled = rss_kib();

    // The reading subscribers finish while the stalled ones are still stalled.
    let (stalled_subs, reading_subs): (Vec<_>, Vec<_>) = subs
        .into_iter()
        .enumerate()
        .partition(|(i, _)| *i < stalled);
    let mut latency = Vec::new();
    let mut reading_gaps = 0;
    for (_, h) in reading_subs {
        let (is_stalled, seen) = h.await.unwrap();
        assert!(!is_stalled);
        reading_gaps += seen.gaps;
        if seen.gaps == 0 {
            assert_eq!(seen.events, events + 1);
        }
        latency.extend(seen.latency_ms);
    }
    let all_read = t0.elapsed();
    release.send(true).unwrap();
    let mut stalled_gaps = 0;
    let mut stalled_events = 0;
    for (_, h) in stalled_subs {
        let (is_stalled, seen) = h.await.unwrap();
        assert!(is_stalled);
        stalled_gaps += seen.gaps;
        stalled_events += seen.events;
    }
    let rss_after = rss_kib();
    eprintln!(
        "slow consumers: {subscribers} subscribers ({stalled} stalled), {events} events, \
         retention {retained}: produced in {:.2} s ({:.0} events/s); ack latency p50 {:.1} ms \
         p99 {:.1} ms; reading subscribers done at {:.2} s, delivery latency p50 {:.1} ms p99 \
         {:.1} ms, {reading_gaps} gap notices; stalled subscribers: {stalled_events} events and \
         {stalled_gaps} gap notices after release; RSS {} MiB before, {} MiB with the stalled \
         connections open, {} MiB after (server and clients share this process)",
        produced.as_secs_f64(),
        events as f64 / produced.as_secs_f64(),
        percentile(&mut acks, 0.5),
        percentile(&mut acks, 0.99),
        all_read.as_secs_f64(),
        percentile(&mut latency, 0.5),
        percentile(&mut latency, 0.99),
        rss_before / 1024,
        rss_peak_stalled / 1024,
        rss_after / 1024,
    );
    drop(server.stop().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_sse_subscribers_block_nobody_and_catch_up_or_hear_of_gaps() {
    scenario(100, 10, 10_000, 4_000, 900).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full scale, minutes: scripts/slow-consumers.sh"]
async fn full_scale_slow_consumers() {
    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    scenario(
        env("EVENTQUEUE_SLOW_SUBSCRIBERS", 1000) as usize,
        env("EVENTQUEUE_SLOW_STALLED", 100) as usize,
        env("EVENTQUEUE_SLOW_EVENTS", 100_000),
        env("EVENTQUEUE_SLOW_RETAINED", 20_000),
        env("EVENTQUEUE_SLOW_PAD", 100) as usize,
    )
    .await;
}
