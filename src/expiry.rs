//! Expiry of idle queues: [`expire_once`] (testable, with an explicit `now`) and the loop
//! around it; and offline compaction of a data directory's file ([`compact_offline`]).
//!
//! A queue is expired when its last activity (creation or last event) plus its TTL is at or
//! before `now`. The check is repeated by the writer inside the removing batch, so an event
//! that arrives between the scan and the removal keeps the queue alive.

use std::sync::Weak;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::engine::Core;
use crate::error::{Error, Result};
use crate::event::Timestamp;

/// What an offline compaction did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CompactReport {
    /// File size before, bytes.
    pub bytes_before: u64,
    /// File size after, bytes.
    pub bytes_after: u64,
}

/// Shrinks the database file of a data directory that no server holds.
///
/// A running store reuses the space of removed events but never returns it to the
/// filesystem; this rewrites the file so it does. Blocking: call it from a plain thread or
/// `spawn_blocking`.
///
/// # Errors
///
/// [`Error::Locked`] while another process (a server) holds the database; storage
/// errors.
pub fn compact_offline(data_dir: &std::path::Path) -> Result<CompactReport> {
    let (bytes_before, bytes_after) = crate::storage::redb::Store::compact_offline(data_dir)?;
    Ok(CompactReport {
        bytes_before,
        bytes_after,
    })
}

/// What one cleanup pass did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CleanupReport {
    /// Queues removed.
    pub queues_expired: usize,
    /// Retained events removed with them.
    pub events_removed: u64,
    /// Time the pass took.
    pub duration: Duration,
}

/// Removes every queue idle for at least its TTL at `now`, one queue per writer op so
/// appends interleave with the removals.
pub(crate) async fn expire_once(core: &Core, now: Timestamp) -> Result<CleanupReport> {
    let started = Instant::now();
    let mut candidates = core.queues(None);
    candidates.retain(|q| q.is_expired_at(now));
    let mut report = CleanupReport::default();
    for q in candidates {
        let events = q.with_view(|v| v.next_offset - v.first_offset);
        let removed = core.expire(q, now).await;
        match removed {
            Ok(true) => {
                report.queues_expired += 1;
                report.events_removed += events;
            }
            Ok(false) | Err(Error::QueueNotFound { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    report.duration = started.elapsed();
    if report.queues_expired > 0 {
        tracing::info!(
            queues = report.queues_expired,
            events = report.events_removed,
            "expired idle queues"
        );
    }
    Ok(report)
}

/// Runs [`expire_once`] every `interval` until `stop` is cancelled or the manager is gone.
pub(crate) async fn cleanup_loop(core: Weak<Core>, interval: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Some(core) = core.upgrade() else { return };
        let now = core.clock().now();
        if let Err(e) = expire_once(&core, now).await {
            tracing::warn!(error = %e, "cleanup pass failed");
        }
    }
}
