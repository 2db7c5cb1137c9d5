//! Following other nodes' writes to a shared store (Redis): the follower thread.
//!
//! A shared store announces every stored batch ([`Storage::notices`]). The follower takes
//! the notices in order, in bursts, and for each burst:
//!
//! 1. hands the changes to the writer ([`Request::Remote`]), which takes them into the
//!    committed views (so its next batches build on the newest state), adopts queues new to
//!    this node, forgets removed ones, and skips old news by the store's revisions — all on
//!    its own thread, in order with its own batches;
//! 2. makes each changed queue's published state follow its new record
//!    ([`QueueState::follow`]): for a queue with live subscribers on this node, it reads the
//!    new events from the store once and sends them to the local fan-out. So a node holds at
//!    most one reader per queue with local subscribers, however many subscribers it has, and
//!    no node polls.
//!
//! After a [`Notice::Resync`] (the feed reconnected, or fell behind and dropped notices) it
//! reloads every queue the store holds and hands that over as complete, so nothing missed
//! meanwhile stays missed.

use std::sync::Arc;
use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::ops::{Call, Reply};
use super::pipeline::{Remote, Request};
use crate::storage::{Notice, Storage};

/// Most bytes of event JSON one read for the fan-out takes (a larger event is read alone).
const READ_BYTES: usize = 1 << 20;
/// Most notices taken in one burst.
const BURST: usize = 1024;
/// Wait before retrying a reload the store refused (it is away).
const RETRY: Duration = Duration::from_millis(500);

/// Starts the follower of a shared store; does nothing for a store only this process writes.
pub(super) fn start(
    storage: &Arc<dyn Storage>,
    writer: mpsc::Sender<Request>,
    read_limit: usize,
) -> Option<std::thread::JoinHandle<()>> {
    let notices = storage.notices()?;
    let storage = storage.clone();
    let spawned = std::thread::Builder::new()
        .name("eventqueue-follow".into())
        .spawn(move || run(&*storage, &notices, &writer, read_limit.max(1)));
    match spawned {
        Ok(handle) => Some(handle),
        Err(e) => {
            tracing::error!(error = %e, "cannot start the thread that follows other nodes");
            None
        }
    }
}

fn run(
    storage: &dyn Storage,
    notices: &std_mpsc::Receiver<Notice>,
    writer: &mpsc::Sender<Request>,
    read_limit: usize,
) {
    let mut resync = false;
    loop {
        let mut changes = Vec::new();
        if !resync {
            let Ok(first) = notices.recv() else { return };
            let mut burst = vec![first];
            while burst.len() < BURST {
                match notices.try_recv() {
                    Ok(n) => burst.push(n),
                    Err(_) => break,
                }
            }
            for notice in burst {
                match notice {
                    Notice::Changed(c) => changes.extend(c),
                    Notice::Resync => resync = true,
                }
            }
        }
        // A reload reads everything as of now: it supersedes the changes taken with it.
        let complete = resync;
        if resync {
            match storage.load_all() {
                Ok(all) => {
                    changes = all;
                    resync = false;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot reload other nodes' writes; retrying");
                    std::thread::sleep(RETRY);
                    continue;
                }
            }
        }
        let (tx, rx) = oneshot::channel();
        let remote = Remote { changes, complete };
        if writer
            .blocking_send(Request::Remote(Call::new(remote, Reply::new(tx))))
            .is_err()
        {
            return;
        }
        let Ok(Ok(accepted)) = rx.blocking_recv() else {
            return;
        };
        for (q, record) in accepted {
            let read = |from, to| storage.read_range(q.id(), from, to, read_limit, READ_BYTES);
            if let Err(e) = q.follow(&record, read) {
                // Delivery resumes with the queue's next change, or the next reload.
                tracing::debug!(error = %e, task = %q.task_id(), "cannot read another node's events yet");
            }
        }
    }
}
