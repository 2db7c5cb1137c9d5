//! One queue: the seed's queue tests (7–18) and the contract's subscription rules.

use std::time::Duration;

use eventqueue::{
    ArtifactEvent, CompleteEvent, Delivery, ErrorEvent, Event, QueueOptions, StatusEvent, TaskState,
};
use serde_json::json;

use super::*;

#[tokio::test]
async fn enqueued_event_reaches_a_subscriber() {
    let dir = tempfile::tempdir().unwrap();
    let m = open(dir.path()).await;
    let (t, k) = (tenant("tenant1"), task("workflow_123"));
    let q = m
        .create_queue(&t, &k, QueueOptions::default())
        .await
        .unwrap();
    let ev = phase(&t, &k, 0);
    let id = ev.event_id.clone();
    assert_eq!(q.enqueue(ev).await.unwrap(), 0);
    let mut sub = q.subscribe(0).unwrap();
    let got = next_event(&mut sub).await;
    let parsed = got.event().unwrap();
    assert_eq!(parsed.event_id, id);
    assert_eq!(parsed.offset, Some(0));
    assert_eq!(
        parsed.tenant_id, t,
        "subscribed events carry their tenant id"
    );
}

#[tokio::test]
async fn events_arrive_in_enqueue_order_and_replay_from_an_offset() {
    let dir = tempfile::tempdir().unwrap();
    let m = open(dir.path()).await;
    let (t, k) = (tenant("t"), task("wf"));
    let q = m
        .create_queue(&t, &k, QueueOptions::default())
        .await
        .unwrap();
    assert_eq!(q.latest_offset(), 0);
    for n in 0..5 {
        assert_eq!(q.enqueue(phase(&t, &k, n)).await.unwrap(), n);
    }
    assert_eq!(q.latest_offset(), 5);
    let mut all = q.subscribe(0).unwrap();
    assert_eq!(offsets(&mut all, 5).await, vec![0, 1, 2, 3, 4]);
    let mut from3 = q.subscribe(3).unwrap();
    let got = offsets(&mut from3, 2).await;
    assert_eq!(got, vec![3, 4]);
    // Event JSON carries the phase it was enqueued with.
    let mut again = q.subscribe(3).unwrap();
    let e = next_event(&mut again).await;
    assert!(std::str::from_utf8(e.json()).unwrap().contains("phase_3"));
}

#[tokio::test]
async fn parked_subscriber_receives_every_event_despite_trimming() {
    // Seed 11: buffer of 3, a subscriber waiting before six enqueues gets 0..5 in order.
    let dir = tempfile::tempdir().unwrap();
    let m = open(dir.path()).await;
    let (t, k) = (tenant("t"), task("wf"));
    let q = m.create_queue(&t, &k, with_buffer(3)).await.unwrap();
    let mut sub = q.subscribe(0).unwrap();
    for n in 0..6 {
        q.enqueue(phase(&t, &k, n)).await.unwrap();
    }
    assert_eq!(offsets(&mut sub, 6).await, vec![0, 1, 2, 3, 4, 5]);
    assert_eq!(q.info().event_count, 3);
}

#[tokio::test]
async fn latest_offset_counts_dropped_events() {
    let dir = tempfile::tempdir().unwrap();
    let m = open(dir.path()).await;
    let (t, k) = (tenant("t"), task("wf"));
    let q = m.create_queue(&t, &k, with_buffer(2)).await.unwrap();
    for n in 0..5 {
        q.enqueue(phase(&t, &k, n)).await.unwrap();
    }
    assert_eq!(q.latest_offset(), 5);
    assert_eq!(q.first_offset(), 3);

    let q5 = m
        .create_queue(&t, &task("wf5"), with_buffer(5))
        .await
        .unwrap();
    for n in 0..10 {
        q5.enqueue(phase(&t, &task("wf5"), n)).await.unwrap();
    }
    let info = q5.info();
    assert_eq!(
        (info.event_count, info.latest_offset, info.first_offset),
        (5, 10, 5)
    );
}

#[tokio::test]
async fn replay_below_retention_says_gap_then_continues() {
    let dir = tempfile::tempdir().unwrap();
    let m = open(dir.path()).await;
    let (t, k) = (tenant("t"), task("wf"));
    let q = m.create_queue(&t, &k, with_buffer(2)).await.unwrap();
    for n in 0..5 {
        q.enqueue(phase(&t, &k, n)).await.unwrap();
    }
    let mut sub = q.subscribe(0).unwrap();
    assert_eq!(sub.first_offset(), 3);
    assert_eq!(
        next(&mut sub).await,
        Some(Delivery::Gap {
            requested_offset: 0,
            first_available_offset: 3
        })
    );
    assert_eq!(offsets(&mut sub, 2).await, vec![3, 4]);
    // Then it follows live.
    q.enqueue(phase(&t, &k, 5)).await.unwrap();
    assert_eq!(offsets(&mut sub, 1).await, vec![5]);
    assert_eq!(
        m.metrics()
            .gap_notices
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[tokio::test]
async fn cancel_sets_the_token_with_reason_and_time() {
    let dir = tempfile::tempdir().unwrap();
    let m = open(dir.path()).await;
    let (t, k) = (tenant("t"), task("wf"));
    let q = m
        .create_queue(&t, &k, QueueOptions::default())
        .await
        .unwrap();
    let fresh = q.cancellation();
    assert!(!fresh.is_cancelled && fresh.reason.is_none() && fresh.cancel_time.is_none());
    let token = q.cancellation_token();
    q.cancel(Some("Timeout exceeded")).await.unwrap();
    let c = q.cancellation();
    assert!(c.is_cancelled);
    assert_eq!(c.reason.as_deref(), Some("Timeout exceeded"));
    assert!(c.cancel_time.is_some());
    assert!(token.is_cancelled() && q.is_cancelled());
    // Cancelling appends no event and does not end streams.
    assert_eq!(q.latest_offset(), 0);
    // A second cancel keeps the first reason.
    q.cancel(Some("other")).await.unwrap();
    assert_eq!(q.cancellation().reason.as_deref(), Some("Timeout exceeded"));
}

#[tokio::test]
async fn close_ends_an_active_subscriber_after_what_came_before() {
    let dir = tempfile::tempdir().unwrap();
    let m = open(dir.path()).await;
    let (t, k) = (tenant("t"), task("wf"));
    let q = m
        .create_queue(&t, &k, QueueOptions::default())
        .await
        .unwrap();
    let mut sub = q.subscribe(0).unwrap();
    let waiter = tokio::spawn(async move { drain(&mut sub).await });
    for n in 0..3 {
        q.enqueue(phase(&t, &k, n)).await.unwrap();
    }
    q.close().await.unwrap();
    let got = waiter.await.unwrap();
    assert_eq!(event_offsets(&got), vec![0, 1, 2]);
    assert!(q.is_closed());
    // Enqueue on a closed queue fails; close is idempotent; the queue stays replayable.
    let err = q.enqueue(phase(&t, &k, 9)).await.unwrap_err();
    assert!(
        matches!(err, eventqueue::Error::QueueClosed { .. }),
        "{err}"
    );
    q.close().await.unwrap();
    let mut late = q.subscribe(0).unwrap();
    assert_eq!(event_offsets(&drain(&mut late).await), vec![0, 1, 2]);
}

#[tokio::test]
async fn two_live_subscribers_each_receive_the_same_events() {
    let dir = tempfile::tempdir().unwrap();
    let m = open(dir.path()).await;
    let (t, k) = (tenant("t"), task("wf"));
    let q = m
        .create_queue(&t, &k, QueueOptions::default())
        .await
        .unwrap();
    let mut dashboard = q.subscribe(0).unwrap();
    let mut cli = q.subscribe(0).unwrap();
    assert_eq!(q.info().subscriber_count, 2);
    let mut ids = Vec::new();
    for n in 0..3 {
        let e = phase(&t, &k, n);
        ids.push(e.event_id.clone());
        q.enqueue(e).await.unwrap();
    }
    for sub in [&mut dashboard, &mut cli] {
        let mut got = Vec::new();
        for _ in 0..3 {
            let e = next_event(sub).await;
            got.push(e.event().unwrap().event_id);
        }
        assert_eq!(got, ids);
    }
    drop(dashboard);
    assert_eq!(q.info().subscriber_count, 1);
}

#[tokio::test]
async fn fresh_queue_info_is_zero() {
    let dir = tempfile::tempdir().unwrap();
    let m = open(dir.path()).await;
    let q = m
        .create_queue(&tenant("t"), &task("wf"), QueueOptions::default())
        .await
        .unwrap();
    let i = q.info();
    assert_eq!(
        (i.event_count, i.subscriber_count, i.latest_offset),
        (0, 0, 0)
    );
    assert!(!i.is_closed && !i.is_cancelled && !i.is_finished);
    assert_eq!(i.ttl_minutes, 30.0);
    assert_eq!(i.max_buffer_size, 1000);
    let json = serde_json::to_value(&i).unwrap();
    let keys: Vec<&str> = json
        .as_object()
        .unwrap()
        .keys()
        .map(|s| s.as_str())
        .collect();
    for field in [
        "task_id",
        "tenant_id",
        "kind",
        "event_count",
        "subscriber_count",
        "is_closed",
        "is_cancelled",
        "cancel_reason",
        "is_finished",
        "created_at",
        "last_activity",
        "ttl_minutes",
        "max_buffer_size",
        "first_offset",
        "latest_offset",
    ] {
        assert!(keys.contains(&field), "missing {field}");
    }
}

#[tokio::test]
async fn terminal_event_ends_streams_but_later_events_are_stored() {
    let dir = tempfile::tempdir().unwrap();
    let m = open(dir.path()).await;
    let (t, k) = (tenant("t"), task("wf"));
    let q = m
        .create_queue(&t, &k, QueueOptions::default())
        .await
        .unwrap();
    let mut live = q.subscribe(0).unwrap();
    q.enqueue(phase(&t, &k, 0)).await.unwrap();
    // status: completed is not terminal.
    q.enqueue(Event::new(&t, &k, StatusEvent::new(TaskState::Completed)))
        .await
        .unwrap();
    q.enqueue(Event::new(
        &t,
        &k,
        CompleteEvent::new(json!({"answer": 42})),
    ))
    .await
    .unwrap();
    q.enqueue(phase(&t, &k, 3)).await.unwrap();
    assert!(q.is_finished());
    assert_eq!(q.finished_at(), Some(2));
    assert_eq!(q.latest_offset(), 4);
    assert_eq!(event_offsets(&drain(&mut live).await), vec![0, 1, 2]);
    let mut replay = q.subscribe(1).unwrap();
    assert_eq!(event_offsets(&drain(&mut replay).await), vec![1, 2]);
    // A subscription starting past the terminal event yields nothing.
    let mut past = q.subscribe(3).unwrap();
    assert!(drain(&mut past).await.is_empty());
    // Cancel of a finished task is refused.
    let err = q.cancel(None).await.unwrap_err();
    assert!(matches!(err, eventqueue::Error::TaskFinished { .. }));
}

#[tokio::test]
async fn non_recoverable_error_and_failed_status_are_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let m = open(dir.path()).await;
    let t = tenant("t");
    let (a, b, c) = (task("a"), task("b"), task("c"));
    let qa = m
        .create_queue(&t, &a, QueueOptions::default())
        .await
        .unwrap();
    qa.enqueue(Event::new(&t, &a, ErrorEvent::new("Io", "disk gone")))
        .await
        .unwrap();
    assert!(!qa.is_finished(), "a recoverable error is not terminal");
    qa.enqueue(Event::new(
        &t,
        &a,
        ErrorEvent::new("Io", "fatal").non_recoverable(),
    ))
    .await
    .unwrap();
    assert_eq!(qa.finished_at(), Some(1));
    let qb = m
        .create_queue(&t, &b, QueueOptions::default())
        .await
        .unwrap();
    qb.enqueue(Event::new(&t, &b, StatusEvent::new(TaskState::Failed)))
        .await
        .unwrap();
    let qc = m
        .create_queue(&t, &c, QueueOptions::default())
        .await
        .unwrap();
    qc.enqueue(Event::new(&t, &c, StatusEvent::new(TaskState::Cancelled)))
        .await
        .unwrap();
    assert!(qb.is_finished() && qc.is_finished());
}

#[tokio::test]
async fn events_must_match_the_queue() {
    let dir = tempfile::tempdir().unwrap();
    let m = open(dir.path()).await;
    let (t, k) = (tenant("t"), task("wf"));
    let q = m
        .create_queue(&t, &k, QueueOptions::default())
        .await
        .unwrap();
    let wrong_task = phase(&t, &task("other"), 0);
    let err = q.enqueue(wrong_task).await.unwrap_err();
    assert!(err.to_string().contains("task_id"), "{err}");
    let wrong_tenant = phase(&tenant("u"), &k, 0);
    let err = q.enqueue(wrong_tenant).await.unwrap_err();
    assert!(err.to_string().contains("tenant_id"), "{err}");
    // A batch with one invalid event stores none.
    let bad = Event::new(&t, &k, eventqueue::ProgressEvent::new(11, 10));
    let err = q
        .enqueue_batch(vec![phase(&t, &k, 0), bad])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("current"), "{err}");
    assert_eq!(q.latest_offset(), 0);
}

#[tokio::test]
async fn delete_ends_subscribers_and_removes_the_queue() {
    let dir = tempfile::tempdir().unwrap();
    let m = open(dir.path()).await;
    let (t, k) = (tenant("t"), task("wf"));
    let q = m
        .create_queue(&t, &k, QueueOptions::default())
        .await
        .unwrap();
    q.enqueue(phase(&t, &k, 0)).await.unwrap();
    let mut sub = q.subscribe(1).unwrap();
    let waiter = tokio::spawn(async move { drain(&mut sub).await });
    assert!(m.delete_queue(&t, &k).await.unwrap());
    assert!(waiter.await.unwrap().is_empty());
    assert!(m.get_queue(&t, &k).is_none());
    assert!(!m.delete_queue(&t, &k).await.unwrap());
    assert!(matches!(
        q.enqueue(phase(&t, &k, 1)).await.unwrap_err(),
        eventqueue::Error::QueueNotFound { .. }
    ));
    assert!(q.subscribe(0).is_err());
    // The same task id can be created again and starts from offset 0 with no old events.
    let q2 = m
        .create_queue(&t, &k, QueueOptions::default())
        .await
        .unwrap();
    assert_eq!(q2.latest_offset(), 0);
    q2.enqueue(phase(&t, &k, 7)).await.unwrap();
    let mut s = q2.subscribe(0).unwrap();
    let e = next_event(&mut s).await;
    assert!(std::str::from_utf8(e.json()).unwrap().contains("phase_7"));
}

#[tokio::test]
async fn idle_queue_holds_no_live_channel() {
    let dir = tempfile::tempdir().unwrap();
    let m = open(dir.path()).await;
    let (t, k) = (tenant("t"), task("wf"));
    let q = m
        .create_queue(&t, &k, QueueOptions::default())
        .await
        .unwrap();
    assert!(!q.has_live_channel());
    let sub = q.subscribe(0).unwrap();
    assert!(q.has_live_channel());
    drop(sub);
    q.enqueue(phase(&t, &k, 0)).await.unwrap();
    assert!(
        !q.has_live_channel(),
        "the channel is dropped once nobody listens"
    );
}

#[tokio::test]
async fn subscription_past_latest_waits_for_new_events() {
    let dir = tempfile::tempdir().unwrap();
    let m = open(dir.path()).await;
    let (t, k) = (tenant("t"), task("wf"));
    let q = m
        .create_queue(&t, &k, QueueOptions::default())
        .await
        .unwrap();
    q.enqueue(phase(&t, &k, 0)).await.unwrap();
    let mut sub = q.subscribe(3).unwrap();
    for n in 1..5 {
        q.enqueue(phase(&t, &k, n)).await.unwrap();
    }
    assert_eq!(offsets(&mut sub, 2).await, vec![3, 4]);
}

#[tokio::test]
async fn ttl_zero_expires_at_the_next_sweep() {
    let dir = tempfile::tempdir().unwrap();
    let m = open(dir.path()).await;
    let t = tenant("t");
    let zero = m
        .create_queue(
            &t,
            &task("zero"),
            QueueOptions::default().with_ttl(Duration::ZERO),
        )
        .await
        .unwrap();
    let mut sub = zero.subscribe(0).unwrap();
    m.create_queue(&t, &task("live"), QueueOptions::default())
        .await
        .unwrap();
    let report = m.cleanup_expired().await.unwrap();
    assert_eq!(report.queues_expired, 1);
    assert!(m.get_queue(&t, &task("zero")).is_none());
    assert!(m.get_queue(&t, &task("live")).is_some());
    assert!(
        drain(&mut sub).await.is_empty(),
        "subscribers of an expired queue end"
    );
}

async fn small_channel(dir: &std::path::Path) -> eventqueue::QueueManager {
    eventqueue::QueueManager::open(eventqueue::Config {
        broadcast_capacity: 2,
        ..config(dir)
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn stalled_subscriber_catches_up_from_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let m = small_channel(dir.path()).await;
    let (t, k) = (tenant("t"), task("wf"));
    let q = m
        .create_queue(&t, &k, QueueOptions::default())
        .await
        .unwrap();
    let mut stalled = q.subscribe(0).unwrap();
    for n in 0..10 {
        q.enqueue(phase(&t, &k, n)).await.unwrap();
    }
    assert_eq!(offsets(&mut stalled, 10).await, (0..10).collect::<Vec<_>>());
    let lags = m
        .metrics()
        .lag_recoveries
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        lags >= 1,
        "the subscriber must have lagged the capacity-2 channel"
    );
    // And it re-joins live.
    q.enqueue(phase(&t, &k, 10)).await.unwrap();
    assert_eq!(offsets(&mut stalled, 1).await, vec![10]);
}

#[tokio::test]
async fn subscriber_behind_retention_gets_a_gap_then_the_retained_events() {
    let dir = tempfile::tempdir().unwrap();
    let m = small_channel(dir.path()).await;
    let (t, k) = (tenant("t"), task("wf"));
    let q = m.create_queue(&t, &k, with_buffer(3)).await.unwrap();
    let mut stalled = q.subscribe(0).unwrap();
    for n in 0..10 {
        q.enqueue(phase(&t, &k, n)).await.unwrap();
    }
    assert_eq!(
        next(&mut stalled).await,
        Some(Delivery::Gap {
            requested_offset: 0,
            first_available_offset: 7
        })
    );
    assert_eq!(offsets(&mut stalled, 3).await, vec![7, 8, 9]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_of_megabytes_from_redb_and_memory_returns_every_event_intact() {
    // ~1 KiB events, several MiB in all: replay reads them in chunks whose JSON shares
    // buffers, part from redb (written in bulk every 64 KiB of log here) and part from memory.
    let dir = tempfile::tempdir().unwrap();
    let m = QueueManager::open(Config {
        apply_bytes: 64 << 10,
        replay_chunk: 1000,
        ..config(dir.path())
    })
    .await
    .unwrap();
    let (t, k) = (tenant("t"), task("big"));
    let q = m.create_queue(&t, &k, with_buffer(100_000)).await.unwrap();
    let pad = "p".repeat(1000);
    let n = 4000u64;
    for chunk in 0..n / 500 {
        let batch = (0..500)
            .map(|i| {
                let at = chunk * 500 + i;
                Event::new(
                    &t,
                    &k,
                    StatusEvent::new(TaskState::Working)
                        .phase(format!("phase_{at}"))
                        .message(pad.clone()),
                )
            })
            .collect();
        q.enqueue_batch(batch).await.unwrap();
    }
    q.close().await.unwrap();
    let mut sub = q.subscribe(0).unwrap();
    let mut seen = 0u64;
    while let Some(d) = next(&mut sub).await {
        let e = d.as_event().expect("no gaps: nothing was trimmed");
        assert_eq!(e.offset(), seen);
        let parsed = e.event().unwrap();
        assert_eq!(parsed.offset, Some(seen));
        match parsed.payload {
            eventqueue::Payload::Status(s) => {
                assert_eq!(s.phase.as_deref(), Some(format!("phase_{seen}").as_str()));
                assert_eq!(s.message.as_deref(), Some(pad.as_str()));
            }
            other => panic!("unexpected payload {other:?}"),
        }
        seen += 1;
    }
    assert_eq!(seen, n);
    m.shutdown().await.unwrap();
}

/// A manager with queue `t`/`wf` (`options`) holding `n` phase events.
async fn queue_with_phases(
    dir: &std::path::Path,
    options: QueueOptions,
    n: u64,
) -> (eventqueue::QueueManager, eventqueue::EventQueue) {
    let m = open(dir).await;
    let (t, k) = (tenant("t"), task("wf"));
    let q = m.create_queue(&t, &k, options).await.unwrap();
    for i in 0..n {
        q.enqueue(phase(&t, &k, i)).await.unwrap();
    }
    (m, q)
}

#[tokio::test]
async fn batches_deliver_exactly_what_next_delivers() {
    let dir = tempfile::tempdir().unwrap();
    let (_m, q) = queue_with_phases(dir.path(), with_buffer(5), 8).await;
    let (t, k) = (tenant("t"), task("wf"));
    q.enqueue(Event::new(&t, &k, CompleteEvent::new(json!({"n": 8}))))
        .await
        .unwrap();
    for n in 9..11 {
        q.enqueue(phase(&t, &k, n)).await.unwrap();
    }
    // Offsets 0–5 are trimmed, 8 is terminal: a gap, then 6, 7, 8, then the end.
    let one_by_one = drain(&mut q.subscribe(0).unwrap()).await;
    assert_eq!(
        one_by_one.first(),
        Some(&Delivery::Gap {
            requested_offset: 0,
            first_available_offset: 6
        })
    );
    assert_eq!(event_offsets(&one_by_one), vec![6, 7, 8]);
    for max in [1, 2, 3, 64] {
        let mut sub = q.subscribe(0).unwrap();
        let mut batched = Vec::new();
        loop {
            let batch = tokio::time::timeout(Duration::from_secs(20), sub.next_batch(max, 1 << 20))
                .await
                .expect("subscription stalled");
            let Some(batch) = batch else { break };
            let batch = batch.unwrap();
            assert!(
                (1..=max).contains(&batch.len()),
                "a batch of {} with max {max}",
                batch.len()
            );
            batched.extend(batch);
        }
        assert_eq!(batched, one_by_one, "max {max}");
        assert!(sub.is_ended());
    }
}

#[tokio::test]
async fn a_batch_follows_live_events_after_the_replay() {
    let dir = tempfile::tempdir().unwrap();
    let (_m, q) = queue_with_phases(dir.path(), QueueOptions::default(), 3).await;
    let (t, k) = (tenant("t"), task("wf"));
    let mut sub = q.subscribe(1).unwrap();
    let replayed = sub.next_batch(64, 1 << 20).await.unwrap().unwrap();
    assert_eq!(event_offsets(&replayed), vec![1, 2]);
    // Nothing ready: the next batch waits for the next live event.
    let waiting =
        tokio::spawn(async move { sub.next_batch(64, 1 << 20).await.map(|b| b.unwrap()) });
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(!waiting.is_finished());
    q.enqueue(phase(&t, &k, 3)).await.unwrap();
    let live = tokio::time::timeout(Duration::from_secs(20), waiting)
        .await
        .expect("subscription stalled")
        .unwrap()
        .unwrap();
    assert_eq!(event_offsets(&live), vec![3]);
}

#[tokio::test]
async fn a_batch_stops_once_its_events_hold_the_byte_budget() {
    let dir = tempfile::tempdir().unwrap();
    let (_m, q) = queue_with_phases(dir.path(), QueueOptions::default(), 10).await;
    let one = first_event_json_len(&q).await;
    // A budget of two and a half events: three per batch (the third passes it), then the rest.
    let budget = one * 5 / 2;
    let mut sub = q.subscribe(0).unwrap();
    let mut sizes = Vec::new();
    while sizes.iter().sum::<usize>() < 10 {
        let batch = sub.next_batch(64, budget).await.unwrap().unwrap();
        sizes.push(batch.len());
    }
    assert_eq!(sizes, vec![3, 3, 3, 1]);
    // A budget of zero still delivers one at a time.
    let mut sub = q.subscribe(0).unwrap();
    assert_eq!(sub.next_batch(64, 0).await.unwrap().unwrap().len(), 1);
}

/// The JSON length of the queue's first event (all of them have the same length here).
async fn first_event_json_len(q: &eventqueue::EventQueue) -> usize {
    let mut sub = q.subscribe(0).unwrap();
    next_event(&mut sub).await.json().len()
}

#[tokio::test]
async fn a_replay_of_large_events_from_redb_then_memory_skips_nothing() {
    // 12 events of ~300 KB in redb (over 3 MB: replay steps stop at about 1 MB each), then 3
    // in memory. A step cut short in redb must not go on with the events in memory.
    let dir = tempfile::tempdir().unwrap();
    let (t, k) = (tenant("t"), task("wf"));
    let big = |n: u64| {
        Event::new(
            &t,
            &k,
            ArtifactEvent::new("blob", json!({"n": n, "pad": "x".repeat(300_000)})),
        )
    };
    {
        let m = embedded::open(dir.path()).await;
        let q = m
            .create_queue(&t, &k, QueueOptions::default())
            .await
            .unwrap();
        for n in 0..12 {
            q.enqueue(big(n)).await.unwrap();
        }
        m.shutdown().await.unwrap();
    }
    let m = embedded::open(dir.path()).await;
    let q = m.get_queue(&t, &k).unwrap();
    for n in 12..15 {
        q.enqueue(big(n)).await.unwrap();
    }
    let mut sub = q.subscribe(0).unwrap();
    let mut seen = Vec::new();
    for _ in 0..15 {
        let ev = next_event(&mut sub).await;
        let body: serde_json::Value = serde_json::from_slice(ev.json()).unwrap();
        seen.push((ev.offset(), body["data"]["n"].as_u64().unwrap()));
    }
    let want: Vec<(u64, u64)> = (0..15).map(|n| (n, n)).collect();
    assert_eq!(seen, want);
}
