//! Client-side coalescing (`Client::coalescer`): concurrent publishes ride in one batch
//! request, each publisher gets its own event's offset, a refused batch gives each event its
//! own answer, and a lone publisher's events keep their order.

use std::time::Duration;

use eventqueue::client::{Client, ClientError};
use serde_json::json;

use super::working;
use crate::helpers::{HANG_GUARD, TestServer, server_config};

async fn server_with_queue(task: &str) -> (TestServer, Client) {
    let server = TestServer::start(server_config()).await;
    let client = Client::new(format!("http://{}", server.addr)).unwrap();
    client
        .create_queue(task, &Default::default())
        .await
        .unwrap();
    (server, client)
}

#[tokio::test]
async fn concurrent_publishes_share_one_request_and_each_gets_its_own_offset() {
    let (server, client) = server_with_queue("wf").await;
    // The batch is sent when it is full, long before the linger is out.
    let coalescer = client
        .coalescer("wf")
        .unwrap()
        .with_linger(Duration::from_secs(3600))
        .with_max_events(50);
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let c = coalescer.clone();
            tokio::spawn(async move { c.publish(&working(i)).await })
        })
        .collect();
    let mut offsets = Vec::new();
    for t in tasks {
        let outcome = tokio::time::timeout(HANG_GUARD, t)
            .await
            .expect("no answer")
            .unwrap()
            .unwrap();
        assert_eq!(outcome.offsets.len(), 1, "{outcome:?}");
        offsets.push(outcome.offsets[0]);
    }
    offsets.sort_unstable();
    assert_eq!(offsets, (0..50).collect::<Vec<u64>>());
    assert_eq!(coalescer.requests(), 1);
    assert_eq!(client.queue_info("wf").await.unwrap().latest_offset, 50);
    server.stop().await;
}

#[tokio::test]
async fn an_invalid_event_is_refused_alone_and_the_others_are_stored() {
    let (server, client) = server_with_queue("wf").await;
    let coalescer = client
        .coalescer("wf")
        .unwrap()
        .with_linger(Duration::from_secs(3600))
        .with_max_events(3);
    let invalid = json!({"event_type": "progress", "current": 5, "total": 2});
    let (first, second) = (working(0), working(1));
    let (a, bad, b) = tokio::join!(
        coalescer.publish(&first),
        coalescer.publish(&invalid),
        coalescer.publish(&second),
    );
    match bad {
        Err(ClientError::Api {
            status: 400,
            detail,
        }) => {
            assert!(detail.contains("must not exceed total"), "{detail}");
        }
        other => panic!("expected a 400, got {other:?}"),
    }
    let mut stored = vec![a.unwrap().offsets[0], b.unwrap().offsets[0]];
    stored.sort_unstable();
    assert_eq!(stored, vec![0, 1]);
    assert_eq!(client.queue_info("wf").await.unwrap().latest_offset, 2);
    // The refused batch, then each of its events alone.
    assert_eq!(coalescer.requests(), 4);
    server.stop().await;
}

#[tokio::test]
async fn a_lone_publishers_events_keep_their_order_without_a_linger() {
    let (server, client) = server_with_queue("wf").await;
    // Default linger: zero, each event sent at once.
    let coalescer = client.coalescer("wf").unwrap();
    for i in 0..5 {
        let outcome = coalescer.publish(&working(i)).await.unwrap();
        assert_eq!(outcome.offsets, vec![i as u64]);
    }
    assert_eq!(coalescer.requests(), 5);
    server.stop().await;
}
