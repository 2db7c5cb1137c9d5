//! Reopening a data directory restores everything; offsets are never reused.

use eventqueue::{Error, QueueManager, QueueOptions};

use super::*;
// The embedded store's own behaviour: always on redb, whatever the suite runs against.
use super::embedded::{config, open};
use crate::helpers::{make_older_format, read_meta};

#[tokio::test]
async fn reopen_restores_queues_offsets_events_and_flags() {
    let dir = tempfile::tempdir().unwrap();
    let t = tenant("t");
    let (a, b, c) = (task("a"), task("b"), task("c"));
    {
        let m = open(dir.path()).await;
        let qa = m.create_queue(&t, &a, with_buffer(3)).await.unwrap();
        for n in 0..5 {
            qa.enqueue(phase(&t, &a, n)).await.unwrap();
        }
        let qb = m
            .create_queue(&t, &b, QueueOptions::default())
            .await
            .unwrap();
        qb.enqueue(phase(&t, &b, 0)).await.unwrap();
        qb.close().await.unwrap();
        let qc = m
            .create_queue(&t, &c, QueueOptions::default())
            .await
            .unwrap();
        qc.cancel(Some("stop")).await.unwrap();
        m.shutdown().await.unwrap();
        assert!(matches!(
            qa.enqueue(phase(&t, &a, 9)).await.unwrap_err(),
            Error::ShuttingDown
        ));
    }
    let m = open(dir.path()).await;
    let qa = m.get_queue(&t, &a).unwrap();
    assert_eq!((qa.first_offset(), qa.latest_offset()), (2, 5));
    let mut sub = qa.subscribe(0).unwrap();
    let first = next(&mut sub).await.unwrap();
    assert!(matches!(
        first,
        Delivery::Gap {
            requested_offset: 0,
            first_available_offset: 2
        }
    ));
    assert_eq!(offsets(&mut sub, 3).await, vec![2, 3, 4]);
    // Offsets continue, never reused.
    assert_eq!(qa.enqueue(phase(&t, &a, 5)).await.unwrap(), 5);
    let qb = m.get_queue(&t, &b).unwrap();
    assert!(qb.is_closed());
    assert!(qb.enqueue(phase(&t, &b, 1)).await.is_err());
    let qc = m.get_queue(&t, &c).unwrap();
    assert!(qc.is_cancelled());
    assert_eq!(qc.cancellation().reason.as_deref(), Some("stop"));
    assert!(qc.cancellation_token().is_cancelled());
}

#[tokio::test]
async fn finished_state_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (t, k) = (tenant("t"), task("wf"));
    {
        let m = open(dir.path()).await;
        let q = m
            .create_queue(&t, &k, QueueOptions::default())
            .await
            .unwrap();
        q.enqueue(phase(&t, &k, 0)).await.unwrap();
        q.enqueue(eventqueue::Event::new(
            &t,
            &k,
            eventqueue::CompleteEvent::new(serde_json::json!({})),
        ))
        .await
        .unwrap();
        m.shutdown().await.unwrap();
    }
    let m = open(dir.path()).await;
    let q = m.get_queue(&t, &k).unwrap();
    assert_eq!(q.finished_at(), Some(1));
    let mut sub = q.subscribe(0).unwrap();
    assert_eq!(event_offsets(&drain(&mut sub).await), vec![0, 1]);
}

#[tokio::test]
async fn deleted_queue_stays_deleted_and_ids_are_not_reused() {
    let dir = tempfile::tempdir().unwrap();
    let (t, k) = (tenant("t"), task("wf"));
    {
        let m = open(dir.path()).await;
        let q = m
            .create_queue(&t, &k, QueueOptions::default())
            .await
            .unwrap();
        q.enqueue(phase(&t, &k, 0)).await.unwrap();
        m.delete_queue(&t, &k).await.unwrap();
        m.shutdown().await.unwrap();
    }
    let m = open(dir.path()).await;
    assert!(m.get_queue(&t, &k).is_none());
    let q = m
        .create_queue(&t, &k, QueueOptions::default())
        .await
        .unwrap();
    let mut sub = q.subscribe(0).unwrap();
    q.enqueue(phase(&t, &k, 42)).await.unwrap();
    let e = next_event(&mut sub).await;
    assert!(std::str::from_utf8(e.json()).unwrap().contains("phase_42"));
}

#[tokio::test]
async fn a_second_open_of_a_held_directory_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let _m = open(dir.path()).await;
    let err = QueueManager::open(config(dir.path())).await.unwrap_err();
    assert!(matches!(err, Error::Locked { .. }), "{err}");
    assert!(err.to_string().contains("in use"), "{err}");
}

#[tokio::test]
async fn unknown_format_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    open(dir.path()).await.shutdown().await.unwrap();
    {
        let db = redb::Database::create(dir.path().join(eventqueue::DB_FILE)).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut meta = txn
                .open_table(redb::TableDefinition::<&str, u64>::new("meta"))
                .unwrap();
            meta.insert("format_version", 99).unwrap();
        }
        txn.commit().unwrap();
    }
    let err = QueueManager::open(config(dir.path())).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::UnsupportedFormat {
                found: 99,
                expected: 4
            }
        ),
        "{err}"
    );
}

/// A version-2 file (before derived event ids) is upgraded in place: it gets a key of derived
/// ids, kept from then on, and the ids it indexed still make enqueues idempotent.
#[tokio::test]
async fn a_version_2_database_is_upgraded_in_place_and_keeps_its_ids() {
    let dir = tempfile::tempdir().unwrap();
    let (t, wf) = (tenant("t"), task("wf"));
    let events: Vec<_> = (0..3).map(|n| phase(&t, &wf, n)).collect();
    {
        let m = open(dir.path()).await;
        let q = m
            .create_queue(&t, &wf, QueueOptions::default())
            .await
            .unwrap();
        assert_eq!(q.enqueue_batch(events.clone()).await.unwrap(), [0, 1, 2]);
        m.shutdown().await.unwrap();
    }
    make_older_format(dir.path(), 2, |_| {});
    assert_eq!(read_meta(dir.path(), "derived_id_key_0"), None);
    let mut key = None;
    for _ in 0..2 {
        let m = open(dir.path()).await;
        let q = m.get_queue(&t, &wf).unwrap();
        // Indexed before the upgrade: still found.
        assert_eq!(q.enqueue(events[1].clone()).await.unwrap(), 1);
        assert_eq!(q.latest_offset(), 3);
        m.shutdown().await.unwrap();
        assert_eq!(read_meta(dir.path(), "format_version"), Some(4));
        let now = (
            read_meta(dir.path(), "derived_id_key_0"),
            read_meta(dir.path(), "derived_id_key_1"),
        );
        assert!(now.0.is_some() && now.1.is_some());
        // Created once, then kept.
        assert_eq!(*key.get_or_insert(now), now);
    }
}

#[tokio::test]
async fn a_log_reader_reads_a_stopped_directory_and_refuses_a_running_one() {
    let dir = tempfile::tempdir().unwrap();
    let (t, k) = (tenant("t"), task("wf"));
    let m = open(dir.path()).await;
    let q = m.create_queue(&t, &k, with_buffer(4)).await.unwrap();
    for n in 0..6 {
        q.enqueue(phase(&t, &k, n)).await.unwrap();
    }
    q.close().await.unwrap();
    let path = dir.path().to_path_buf();
    let locked = tokio::task::spawn_blocking(move || eventqueue::LogReader::open(&path))
        .await
        .unwrap();
    assert!(
        matches!(locked, Err(eventqueue::Error::Locked { .. })),
        "{locked:?}"
    );
    m.shutdown().await.unwrap();

    let path = dir.path().to_path_buf();
    let (t2, k2) = (t.clone(), k.clone());
    tokio::task::spawn_blocking(move || {
        let reader = eventqueue::LogReader::open(&path).unwrap();
        let queues = reader.queues();
        assert_eq!(queues.len(), 1);
        let info = &queues[0];
        assert_eq!((info.first_offset, info.latest_offset), (2, 6));
        assert!(info.is_closed);
        // Reads start at the first retained offset and go on from the last one read.
        let first: Vec<u64> = reader
            .read(&t2, &k2, 0, 3)
            .unwrap()
            .iter()
            .map(|e| e.offset())
            .collect();
        assert_eq!(first, vec![2, 3, 4]);
        let rest = reader.read(&t2, &k2, 5, 100).unwrap();
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].offset(), 5);
        assert!(
            std::str::from_utf8(rest[0].json())
                .unwrap()
                .contains("phase_5")
        );
        assert!(reader.read(&t2, &k2, 6, 100).unwrap().is_empty());
        assert!(matches!(
            reader.read(&t2, &task("nope"), 0, 1),
            Err(eventqueue::Error::QueueNotFound { .. })
        ));
    })
    .await
    .unwrap();
    // The reader released the directory: a server opens it again.
    let m = open(dir.path()).await;
    assert_eq!(m.get_queue(&t, &k).unwrap().latest_offset(), 6);
}
