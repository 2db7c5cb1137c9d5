//! I/O faults on commit: the failing enqueues get the error, nothing acknowledged is lost, and
//! a reopen is consistent. A failed log write fails only its batch; a failed fsync makes the
//! store refuse further writes until reopened. Swept over every operation in
//! `reliability::faults_sweep`.

use eventqueue::{Error, QueueOptions};

use super::*;
// The embedded store's own behaviour: always on redb, whatever the suite runs against.
use super::embedded::open;

async fn replay_all(q: &eventqueue::EventQueue) -> Vec<u64> {
    let latest = q.latest_offset();
    offsets(&mut q.subscribe(0).unwrap(), latest as usize).await
}

#[tokio::test]
async fn a_failed_log_write_fails_only_its_batch() {
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
        // The log was cut back and the transaction dropped: nothing of the batch exists, and
        // the store is not failed (a full disk heals when space is freed).
        let err = m
            .create_queue(&t, &task("other"), QueueOptions::default())
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Storage(_)), "{err}");
        assert!(m.get_queue(&t, &task("other")).is_none());
        assert_eq!(q.latest_offset(), 5);
        assert_eq!(replay_all(&q).await, vec![0, 1, 2, 3, 4]);
        m.faults().fail_appends_after(-1);
        assert_eq!(q.enqueue(phase(&t, &k, 6)).await.unwrap(), 5);
        m.create_queue(&t, &task("other"), QueueOptions::default())
            .await
            .unwrap();
        let _ = m.shutdown().await;
    }
    let m = open(dir.path()).await;
    let q = m.get_queue(&t, &k).unwrap();
    assert_eq!(replay_all(&q).await, vec![0, 1, 2, 3, 4, 5]);
    assert!(m.get_queue(&t, &task("other")).is_some());
    assert_eq!(q.enqueue(phase(&t, &k, 7)).await.unwrap(), 6);
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

#[tokio::test]
async fn a_panicked_writer_poisons_the_manager_instead_of_looking_shut_down() {
    let dir = tempfile::tempdir().unwrap();
    let (t, k) = (tenant("t"), task("wf"));
    let m = open(dir.path()).await;
    let q = m
        .create_queue(&t, &k, QueueOptions::default())
        .await
        .unwrap();
    assert_eq!(q.enqueue(phase(&t, &k, 0)).await.unwrap(), 0);
    m.faults().panic_writer_after(0);
    // The op in the batch that met the panic, and every op after it, learn why.
    let err = q.enqueue(phase(&t, &k, 1)).await.unwrap_err();
    assert!(
        matches!(&err, Error::Poisoned(thread) if &**thread == "writer"),
        "{err}"
    );
    let err = q.enqueue(phase(&t, &k, 2)).await.unwrap_err();
    assert!(
        matches!(&err, Error::Poisoned(thread) if &**thread == "writer"),
        "{err}"
    );
    let err = m
        .create_queue(&t, &task("other"), QueueOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Poisoned(_)), "{err}");
    assert!(matches!(m.shutdown().await, Err(Error::Poisoned(_))));
    // What was acknowledged before the panic survives a reopen.
    let m = open(dir.path()).await;
    let q = m.get_queue(&t, &k).unwrap();
    assert_eq!(replay_all(&q).await, vec![0]);
}

#[tokio::test]
async fn a_storage_error_keeps_its_cause() {
    let dir = tempfile::tempdir().unwrap();
    let (t, k) = (tenant("t"), task("wf"));
    let m = open(dir.path()).await;
    let q = m
        .create_queue(&t, &k, QueueOptions::default())
        .await
        .unwrap();
    m.faults().fail_syncs_after(0);
    let err = q.enqueue(phase(&t, &k, 0)).await.unwrap_err();
    let Error::Storage(cause) = &err else {
        panic!("expected a storage error, got {err}");
    };
    // The injected fsync failure is the source, not flattened into text.
    let source = std::error::Error::source(cause).expect("the cause is kept");
    assert!(source.to_string().contains("injected"), "{source}");
    assert!(!cause.is_storage_full());
    let _ = m.shutdown().await;
}
