//! `GET /metrics`: the manager's figures in Prometheus text format (aggregates only, no tenant
//! data).

use std::fmt::Write;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};

use crate::metrics::Metrics;
use crate::server::AppState;

/// Renders every figure.
pub(super) async fn render(State(state): State<AppState>) -> Response {
    let manager = state.manager().clone();
    // The file size is a metadata syscall: keep it off the async workers.
    let store_bytes = tokio::task::spawn_blocking(move || manager.store_size_bytes())
        .await
        .unwrap_or(0);
    let manager = state.manager();
    let m = manager.metrics();
    let stats = manager.stats();
    let mut out = String::with_capacity(4096);
    counter(
        &mut out,
        "eventqueue_events_appended_total",
        "Events appended (idempotent repeats excluded).",
        Metrics::get(&m.events_appended),
    );
    counter(
        &mut out,
        "eventqueue_commits_total",
        "Write transactions committed.",
        Metrics::get(&m.commits),
    );
    m.batch_size.render(
        "eventqueue_commit_batch_size",
        "Events per commit.",
        &mut out,
    );
    m.commit_seconds.render(
        "eventqueue_commit_seconds",
        "Seconds from the start of a commit until it is acknowledged, fsync included.",
        &mut out,
    );
    counter(
        &mut out,
        "eventqueue_log_folds_total",
        "Log folds: the write-ahead log written into the database, made durable, emptied.",
        Metrics::get(&m.log_folds),
    );
    m.log_fold_seconds.render(
        "eventqueue_log_fold_seconds",
        "Log fold duration in seconds; appends wait while one runs.",
        &mut out,
    );
    gauge(
        &mut out,
        "eventqueue_subscribers",
        "Live subscriptions over all queues.",
        stats.subscribers as u64,
    );
    gauge(
        &mut out,
        "eventqueue_sse_streams",
        "SSE streams open on this server.",
        state.open_streams(),
    );
    gauge(
        &mut out,
        "eventqueue_stream_buffer_bytes",
        "Bytes of the server-wide stream buffer budget held by streams (events over 32 KiB, larger replay steps).",
        state.stream_buffer_bytes_held(),
    );
    counter(
        &mut out,
        "eventqueue_lag_recoveries_total",
        "Times a subscriber fell behind the live channel and caught up from the log.",
        Metrics::get(&m.lag_recoveries),
    );
    counter(
        &mut out,
        "eventqueue_batch_rebuilds_total",
        "Group commits rebuilt because another node had written to one of their queues.",
        Metrics::get(&m.batch_rebuilds),
    );
    counter(
        &mut out,
        "eventqueue_writer_acks_total",
        "Group commits the writer thread synced (if needed), published and answered itself \
         because nothing else was waiting (the rest went to the acknowledger thread).",
        Metrics::get(&m.writer_acks),
    );
    counter(
        &mut out,
        "eventqueue_gap_notices_total",
        "Gap notices delivered to subscribers.",
        Metrics::get(&m.gap_notices),
    );
    counter(
        &mut out,
        "eventqueue_events_removed_total",
        "Events removed by trimming, expiry and deletion.",
        Metrics::get(&m.events_removed),
    );
    let _ = writeln!(
        out,
        "# HELP eventqueue_queues Queues by state (open or closed).\n# TYPE eventqueue_queues gauge\n\
         eventqueue_queues{{state=\"open\"}} {}\neventqueue_queues{{state=\"closed\"}} {}",
        stats.active_queues, stats.closed_queues
    );
    gauge(
        &mut out,
        "eventqueue_queues_finished",
        "Queues whose task finished (open or closed).",
        stats.finished_queues as u64,
    );
    gauge(
        &mut out,
        "eventqueue_store_size_bytes",
        "Size of the database file in bytes.",
        store_bytes,
    );
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    )
        .into_response()
}

fn counter(out: &mut String, name: &str, help: &str, value: u64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
    );
}

fn gauge(out: &mut String, name: &str, help: &str, value: u64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
    );
}
