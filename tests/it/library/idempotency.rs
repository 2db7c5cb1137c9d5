//! Idempotent enqueue: an event whose id the queue still retains is not appended again.

use eventqueue::{EventId, QueueOptions};

use super::*;

#[tokio::test]
async fn retry_returns_the_stored_offset() {
    let dir = tempfile::tempdir().unwrap();
    let m = open(dir.path()).await;
    let (t, k) = (tenant("t"), task("wf"));
    let q = m
        .create_queue(&t, &k, QueueOptions::default())
        .await
        .unwrap();
    q.enqueue(phase(&t, &k, 0)).await.unwrap();
    let e = phase(&t, &k, 1).with_event_id(EventId::new("producer-retry-1").unwrap());
    assert_eq!(q.enqueue(e.clone()).await.unwrap(), 1);
    assert_eq!(q.enqueue(e.clone()).await.unwrap(), 1);
    assert_eq!(q.latest_offset(), 2);
    // Within one batch: the repeat reports the first one's offset.
    let f = phase(&t, &k, 2).with_event_id(EventId::new("batch-dup").unwrap());
    let offsets = q
        .enqueue_batch(vec![f.clone(), phase(&t, &k, 3), f.clone(), e])
        .await
        .unwrap();
    assert_eq!(offsets, vec![2, 3, 2, 1]);
    assert_eq!(q.latest_offset(), 4);
}

#[tokio::test]
async fn concurrent_retries_append_once() {
    let dir = tempfile::tempdir().unwrap();
    let m = open(dir.path()).await;
    let (t, k) = (tenant("t"), task("wf"));
    let q = m
        .create_queue(&t, &k, QueueOptions::default())
        .await
        .unwrap();
    let e = phase(&t, &k, 0).with_event_id(EventId::new("once").unwrap());
    let handles: Vec<_> = (0..16)
        .map(|_| {
            let (q, e) = (q.clone(), e.clone());
            tokio::spawn(async move { q.enqueue(e).await.unwrap() })
        })
        .collect();
    for h in handles {
        assert_eq!(h.await.unwrap(), 0);
    }
    assert_eq!(q.latest_offset(), 1);
}

#[tokio::test]
async fn idempotency_holds_across_restart_and_ends_with_retention() {
    let dir = tempfile::tempdir().unwrap();
    let (t, k) = (tenant("t"), task("wf"));
    let e = phase(&t, &k, 0).with_event_id(EventId::new("durable-id").unwrap());
    {
        let m = embedded::open(dir.path()).await;
        let q = m.create_queue(&t, &k, with_buffer(2)).await.unwrap();
        assert_eq!(q.enqueue(e.clone()).await.unwrap(), 0);
        m.shutdown().await.unwrap();
    }
    let m = embedded::open(dir.path()).await;
    let q = m.get_queue(&t, &k).unwrap();
    assert_eq!(q.enqueue(e.clone()).await.unwrap(), 0);
    assert_eq!(q.latest_offset(), 1);
    // Once the event is trimmed its id is forgotten with it.
    q.enqueue(phase(&t, &k, 1)).await.unwrap();
    q.enqueue(phase(&t, &k, 2)).await.unwrap();
    assert_eq!(q.first_offset(), 1);
    assert_eq!(q.enqueue(e).await.unwrap(), 3);
}

#[tokio::test]
async fn ids_are_per_queue() {
    let dir = tempfile::tempdir().unwrap();
    let m = open(dir.path()).await;
    let t = tenant("t");
    let id = EventId::new("shared-id").unwrap();
    for k in ["a", "b"] {
        let k = task(k);
        let q = m
            .create_queue(&t, &k, QueueOptions::default())
            .await
            .unwrap();
        q.enqueue(phase(&t, &k, 0)).await.unwrap();
        assert_eq!(
            q.enqueue(phase(&t, &k, 1).with_event_id(id.clone()))
                .await
                .unwrap(),
            1
        );
    }
}
