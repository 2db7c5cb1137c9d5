//! `eventqueue bench` runs its steps and reports them (figures themselves are not asserted:
//! timing thresholds do not belong in tests).

#[tokio::test]
async fn bench_steps_report_what_they_measured() {
    let dir = tempfile::tempdir().unwrap();
    let report = eventqueue::bench::run(eventqueue::bench::BenchOptions {
        data_dir: Some(dir.path().to_path_buf()),
        quick: true,
        progress: None,
        only: Some("raw,replay,reopen".into()),
        churn_secs: None,
        streams: None,
        storage: Default::default(),
    })
    .await
    .unwrap();
    let raw = report.raw_fdatasync.unwrap();
    assert!(raw.p50_ms > 0.0 && raw.p99_ms >= raw.p50_ms);
    assert!(report.replay_events_per_sec.unwrap() > 0.0);
    assert_eq!(report.replay_events, Some(100_000));
    assert_eq!(report.reopen.as_ref().unwrap().queues, 1000);
    assert!(report.sequential_ack.is_none() && report.appends.is_empty());
    let table = report.to_table();
    assert!(table.contains("raw 300 B append + fdatasync"), "{table}");
    assert!(
        table.contains("reopen, 100000 events in 1000 queues"),
        "{table}"
    );
    // The temporary directory inside the measured disk is removed.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_http_steps_run_the_real_server_over_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = seen.clone();
    let report = eventqueue::bench::run(eventqueue::bench::BenchOptions {
        data_dir: Some(dir.path().to_path_buf()),
        quick: true,
        progress: Some(std::sync::Arc::new(move |n, total, what: &str| {
            record.lock().unwrap().push((n, total, what.to_string()));
        })),
        only: Some("http".into()),
        churn_secs: None,
        streams: None,
        storage: Default::default(),
    })
    .await
    .unwrap();
    let enqueue: Vec<(usize, usize)> = report
        .http_enqueue
        .iter()
        .map(|h| (h.clients, h.batch))
        .collect();
    assert_eq!(enqueue, [(1, 1), (8, 16)]);
    assert!(report.http_enqueue.iter().all(|h| h.events_per_sec > 0.0));
    assert_eq!(report.http_replay_events, Some(20_000));
    assert!(report.http_replay_events_per_sec.unwrap() > 0.0);
    let fanout: Vec<(usize, u64)> = report
        .http_fanout
        .iter()
        .map(|f| (f.clients, f.lost))
        .collect();
    assert_eq!(
        fanout,
        [(100, 0), (1000, 0)],
        "every client got every event"
    );
    assert!(report.appends.is_empty() && report.raw_fdatasync.is_none());
    // Progress: every step announced once, numbered 1..=5 of 5.
    let steps = seen.lock().unwrap().clone();
    let numbers: Vec<(usize, usize)> = steps.iter().map(|(n, t, _)| (*n, *t)).collect();
    assert_eq!(
        numbers,
        (1..=5).map(|n| (n, 5)).collect::<Vec<_>>(),
        "{steps:?}"
    );
    let table = report.to_table();
    assert!(
        table.contains("| HTTP enqueue, 8 clients × 16 events/request |"),
        "{table}"
    );
    assert!(
        table.contains("| SSE replay of 20000 events, 1 client |"),
        "{table}"
    );
    assert!(
        table.contains("| SSE fan-out, 1000 clients × 1000 events at 1k/s |"),
        "{table}"
    );
    // The JSON report carries the documented field names.
    let json = serde_json::to_value(&report).unwrap();
    assert!(json["http_enqueue"][1]["request"]["p99_ms"].is_number());
    assert!(json["http_fanout"][0]["latency"]["p50_ms"].is_number());
}
