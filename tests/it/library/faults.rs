//! I/O faults on commit: the failing enqueues get the error, the store refuses further writes
//! until reopened, nothing acknowledged is lost, and a reopen is consistent.

use eventqueue::{Delivery, Error, QueueOptions};

use super::*;

async fn replay_all(q: &eventqueue::EventQueue) -> Vec<u64> {
    let latest = q.latest_offset();
    let mut sub = q.subscribe(0).unwrap();
    let mut got = Vec::new();
    while (got.len() as u64) < latest {
        match next(&mut sub).await {
            Some(Delivery::Event(e)) => got.push(e.offset()),
            other => panic!("unexpected {other:?}"),
        }
    }
    got
}

#[tokio::test]
async fn a_failed_log_write_fails_the_batch_and_stops_writes() {
    let dir = tempfile::tempdir().unwrap();
    let (t, k) = (tenant("t"), task("wf"));
    {
        let m = open(dir.path()).await;
        let q = m
            .create_queue(&t, &k, QueueOptions::default())
            .await
            .unwrap();
        for n in 0..5 {
            q.enqueue(phase(&t, &k, n)).await.unwrap();
        }
        m.faults().fail_appends_after(0);
        let err = q.enqueue(phase(&t, &k, 5)).await.unwrap_err();
        assert!(matches!(err, Error::Storage(_)), "{err}");
        assert!(err.to_string().contains("injected"), "{err}");
        let err = q.enqueue(phase(&t, &k, 6)).await.unwrap_err();
        assert!(matches!(err, Error::StoreFailed(_)), "{err}");
        let err = m
            .create_queue(&t, &task("other"), QueueOptions::default())
            .await
            .unwrap_err();
        assert!(matches!(err, Error::StoreFailed(_)), "{err}");
        // Reads keep working and show exactly what was acknowledged.
        assert_eq!(q.latest_offset(), 5);
        assert_eq!(replay_all(&q).await, vec![0, 1, 2, 3, 4]);
        let _ = m.shutdown().await;
    }
    let m = open(dir.path()).await;
    let q = m.get_queue(&t, &k).unwrap();
    assert_eq!(replay_all(&q).await, vec![0, 1, 2, 3, 4]);
    assert_eq!(q.enqueue(phase(&t, &k, 5)).await.unwrap(), 5);
}

#[tokio::test]
async fn a_failed_fsync_is_never_acknowledged_and_reopen_is_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let (t, k) = (tenant("t"), task("wf"));
    {
        let m = open(dir.path()).await;
        let q = m
            .create_queue(&t, &k, QueueOptions::default())
            .await
            .unwrap();
        for n in 0..3 {
            q.enqueue(phase(&t, &k, n)).await.unwrap();
        }
        m.faults().fail_syncs_after(0);
        let err = q.enqueue(phase(&t, &k, 3)).await.unwrap_err();
        assert!(matches!(err, Error::Storage(_)), "{err}");
        assert!(q.enqueue(phase(&t, &k, 4)).await.is_err());
        // The unacknowledged event was never published.
        assert_eq!(q.latest_offset(), 3);
        let _ = m.shutdown().await;
    }
    // After reopen the log holds what reached the file: the failed event may be there (its
    // caller got an error, as after a timeout), but offsets are dense, with no duplicates,
    // and every acknowledged event is present.
    let m = open(dir.path()).await;
    let q = m.get_queue(&t, &k).unwrap();
    let got = replay_all(&q).await;
    assert!(got.len() == 3 || got.len() == 4, "{got:?}");
    assert_eq!(got, (0..got.len() as u64).collect::<Vec<_>>());
    let n = q.enqueue(phase(&t, &k, 9)).await.unwrap();
    assert_eq!(n, got.len() as u64);
}
