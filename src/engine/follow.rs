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
//!
//! The node's own writer sends into the same channel ([`Notice::Behind`]) the queues whose
//! published state no notice will bring up to date: a batch that met another node's write
//! took the newer state in (so the notice of that write is old news when it comes), or a
//! batch failed after it may have been stored (a node skips its own notices). The follower
//! hands their records over with the other changes, to be followed even when the writer knows
//! them already; a [`Behind`](Notice::Behind) the channel had no room for asks for a reload.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
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
/// Notices a node holds for its follower; past that the store's feed asks for a reload
/// instead (and so does the writer, see [`Feed::behind`]).
const CAPACITY: usize = 16_384;

/// The writer's end of the follower's channel (see the module docs).
pub(crate) struct Feed {
    tx: std_mpsc::SyncSender<Notice>,
    /// A [`Notice::Behind`] found the channel full: the follower reloads everything.
    lost: Arc<AtomicBool>,
}

impl Feed {
    /// Has the follower bring the published state of these queues up to the store's (see
    /// [`Notice::Behind`]). Never blocks: when the channel is full, the follower reloads
    /// every queue after what it holds (which follows them all).
    pub(crate) fn behind(
        &self,
        known: Vec<crate::storage::RemoteQueue>,
        load: Vec<(String, String)>,
    ) {
        if known.is_empty() && load.is_empty() {
            return;
        }
        if self.tx.try_send(Notice::Behind { known, load }).is_err() {
            self.lost.store(true, Ordering::Release);
        }
    }
}

/// The follower's channel, with the store's feed started into it; `None` for a store only
/// this process writes.
pub(super) fn channel(storage: &Arc<dyn Storage>) -> Option<(Feed, Follower)> {
    let (tx, rx) = std_mpsc::sync_channel(CAPACITY);
    if !storage.notices(tx.clone()) {
        return None;
    }
    let lost = Arc::new(AtomicBool::new(false));
    let feed = Feed {
        tx,
        lost: lost.clone(),
    };
    Some((feed, Follower { rx, lost }))
}

/// The follower's end of its channel.
pub(super) struct Follower {
    rx: std_mpsc::Receiver<Notice>,
    lost: Arc<AtomicBool>,
}

/// Starts the follower of a shared store.
pub(super) fn start(
    storage: &Arc<dyn Storage>,
    follower: Follower,
    writer: mpsc::Sender<Request>,
    read_limit: usize,
) -> Option<std::thread::JoinHandle<()>> {
    let storage = storage.clone();
    let spawned = std::thread::Builder::new()
        .name("eventqueue-follow".into())
        .spawn(move || run(&*storage, &follower, &writer, read_limit.max(1)));
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
    follower: &Follower,
    writer: &mpsc::Sender<Request>,
    read_limit: usize,
) {
    let notices = &follower.rx;
    let mut resync = false;
    loop {
        let mut changes = Vec::new();
        let mut behind = Vec::new();
        // Queues loaded in this burst (failed batches of one queue, as during an outage,
        // ask for it once per batch).
        let mut loaded = std::collections::HashSet::new();
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
                    Notice::Behind { known, load } => {
                        behind.extend(known);
                        for (tenant, task) in load {
                            // A reload comes anyway: it follows every queue.
                            if resync {
                                break;
                            }
                            if !loaded.insert((tenant.clone(), task.clone())) {
                                continue;
                            }
                            match storage.load_queue(&tenant, &task) {
                                Ok(Some(q)) => behind.push(q),
                                // Removed (a delete of this node's failed batch was stored
                                // after all: no notice of it comes): the writer checks again.
                                Ok(None) => behind.push(crate::storage::RemoteQueue {
                                    tenant,
                                    task,
                                    rev: 0,
                                    record: None,
                                }),
                                // The store is away (or the queue's part of it moving): reload
                                // everything once it answers.
                                Err(e) => {
                                    tracing::debug!(error = %e, "cannot load a queue this node may be behind on");
                                    resync = true;
                                }
                            }
                        }
                    }
                }
            }
        }
        // Since the previous burst, the writer had no room to say which queues are behind.
        if follower.lost.swap(false, Ordering::AcqRel) {
            resync = true;
        }
        // A reload reads everything as of now: it supersedes the changes taken with it.
        let complete = resync;
        if resync {
            match storage.load_all() {
                Ok(all) => {
                    changes = all;
                    behind.clear();
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
        let remote = Remote {
            changes,
            complete,
            behind,
        };
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
