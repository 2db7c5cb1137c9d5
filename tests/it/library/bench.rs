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
