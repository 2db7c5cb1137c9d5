//! `eventqueue migrate --from DIR --to redis://…`: copies a single-node install's data into
//! a Redis store (or another data directory), so that nodes started on the target serve
//! exactly what the old node served.
//!
//! What is copied, per queue: its record (kind, settings, closed / cancelled / finished
//! state, last activity — the TTL counts on from it —, retention floor, next offset, a
//! stream's content type), its retained events at their offsets with the ids they were
//! stored with (so an idempotent re-post is still recognised) and their bytes unchanged;
//! then every workflow's checkpoints, oldest first, and every tenant's token revocation.
//!
//! How: the source is opened as `dump` opens it (redb's lock refuses a directory a server
//! holds). The target is written through the storage trait's batches — the path every
//! write takes — but with the offsets the source assigned, since nothing here applies the
//! engine's rules: the rules were applied when the events were first stored. A queue is
//! copied in batches of at most [`CHUNK_BYTES`] of events, so memory stays bounded whatever
//! the queue's size; each batch also stores the queue's record as of the events copied so
//! far (open, with the next offset after them), and the last one its final record. An
//! interrupted migration thus leaves a queue that is a consistent prefix of the source's,
//! which a rerun reports as existing (remove it, or rerun into a fresh key prefix).
//!
//! The first batch of a queue creates it, which the Redis store's script refuses if the
//! queue exists by then, so a queue created on the target meanwhile is never overwritten.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::StorageBackend;
use crate::error::Error;
use crate::ids::EventId;
use crate::storage::redb::export::ExportedEvent;
use crate::storage::redb::{self, Store};
use crate::storage::redis::{RedisStore, Target as RedisTarget};
use crate::storage::{EventMeta, LoadedQueue, QueueRecord, Storage, WriteError};

/// Event bytes per batch, at most (a larger single event is copied alone).
const CHUNK_BYTES: usize = 1 << 20;
/// Events per batch, at most.
const CHUNK_EVENTS: usize = 4096;
/// Interval of the progress lines on stderr.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);
/// Conflicts named in the refusal; the rest are counted.
const LISTED: usize = 20;

/// Flags of `eventqueue migrate`.
#[derive(clap::Args, Debug)]
pub struct MigrateArgs {
    /// Data directory of the single-node install to copy (stop its server first; nothing in
    /// it is changed).
    #[arg(long, value_name = "DIR")]
    pub from: PathBuf,
    /// Where to copy to: `redis://HOST:PORT[/DB][?prefix=P]` or any other Redis URL
    /// `serve --storage` takes (the password may come from EVENTQUEUE_REDIS_PASSWORD), or
    /// another data directory.
    #[arg(long, value_name = "URL|DIR")]
    pub to: String,
    /// Leave out queues (and workflows' checkpoints) the target already holds, instead of
    /// refusing to start.
    #[arg(long)]
    pub skip_existing: bool,
}

/// What a migration copied.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MigrateSummary {
    /// Queues copied.
    pub queues: u64,
    /// Queues (and workflows with checkpoints) left out because the target held them.
    pub skipped: u64,
    /// Events copied.
    pub events: u64,
    /// Checkpoints copied.
    pub checkpoints: u64,
    /// Bytes of event data copied.
    pub bytes: u64,
}

/// Runs `eventqueue migrate`: prints progress on stderr and the summary on stdout.
pub(super) fn migrate(args: MigrateArgs) -> Result<(), String> {
    let started = Instant::now();
    let to = target_label(&args.to);
    let summary = run(&args, &mut Progress::new())?;
    println!(
        "migrated {} queues ({} skipped), {} events, {} checkpoints, {:.1} MB from {} to {} in \
         {:.1} s",
        summary.queues,
        summary.skipped,
        summary.events,
        summary.checkpoints,
        summary.bytes as f64 / (1 << 20) as f64,
        args.from.display(),
        to,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The target as it may be printed (a URL without its password).
fn target_label(to: &str) -> String {
    match (to.find("://"), to.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => format!("{}://{}", &to[..scheme], &to[at + 1..]),
        _ => to.to_string(),
    }
}

/// Progress lines on stderr, at most every [`PROGRESS_EVERY`].
struct Progress {
    last: Instant,
}

impl Progress {
    fn new() -> Self {
        Progress {
            last: Instant::now(),
        }
    }

    fn tick(&mut self, s: &MigrateSummary, total: usize) {
        if self.last.elapsed() < PROGRESS_EVERY {
            return;
        }
        self.last = Instant::now();
        // Progress is best effort: a closed stderr must not stop the copy.
        let _ = writeln!(
            std::io::stderr(),
            "migrate: {}/{} queues, {} events, {:.1} MB",
            s.queues + s.skipped,
            total,
            s.events,
            s.bytes as f64 / (1 << 20) as f64
        );
    }
}

/// The store to copy into.
enum Dest {
    Redis(RedisStore),
    Redb(Store),
}

impl Dest {
    fn store(&self) -> &dyn Storage {
        match self {
            Dest::Redis(s) => s,
            Dest::Redb(s) => s,
        }
    }
}

/// Opens the target named by `to`; returns it and the queues it holds.
fn open_target(to: &str, from: &Path) -> Result<(Dest, crate::storage::Recovered), String> {
    if to == "memory" || to == "redb" {
        return Err(format!(
            "--to {to}: name a redis:// URL or a data directory (a memory store dies with \
             the process that holds it)"
        ));
    }
    if !to.contains("://") {
        let dir = PathBuf::from(to);
        let same = match (dir.canonicalize(), from.canonicalize()) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        };
        if same {
            return Err("--to names the --from directory".into());
        }
        let (store, recovered) = Store::open(&dir, &redb::Options::offline())
            .map_err(|e| opening_error(&e, "the target", &dir))?;
        return Ok((Dest::Redb(store), recovered));
    }
    let mut url = match to.parse::<StorageBackend>()? {
        StorageBackend::Redis { url, prefix } => (url, prefix),
        other => return Err(format!("--to: cannot migrate into {other} storage")),
    };
    if let Ok(password) = std::env::var("EVENTQUEUE_REDIS_PASSWORD")
        && !password.is_empty()
    {
        url.0 = super::serve::with_password(&url.0, &password)?;
    }
    let target = RedisTarget {
        url: url.0,
        prefix: url.1,
        // No replica waits: until the copy is done and checked, the source holds the data.
        wait_replicas: 0,
        wait_timeout: Duration::from_secs(1),
    };
    let (store, recovered) =
        RedisStore::open(&target).map_err(|e| format!("opening the target: {e}"))?;
    Ok((Dest::Redis(store), recovered))
}

fn opening_error(e: &Error, what: &str, dir: &Path) -> String {
    match e {
        Error::Locked { .. } => format!(
            "{what} {} is in use: a running server holds its database (stop it first; \
             migrate reads a stopped install)",
            dir.display()
        ),
        e => format!("opening {what} {}: {e}", dir.display()),
    }
}

/// Copies everything of `args.from` into `args.to`. Blocking.
///
/// # Errors
///
/// A message saying what failed: the source in use or missing, the target unreachable or
/// already holding some of the queues (without `--skip-existing`), a failed write.
fn run(args: &MigrateArgs, progress: &mut Progress) -> Result<MigrateSummary, String> {
    if !args.from.join(redb::DB_FILE).is_file() {
        return Err(format!(
            "{} holds no eventqueue database ({} not found)",
            args.from.display(),
            redb::DB_FILE
        ));
    }
    let (source, recovered) = Store::open(&args.from, &redb::Options::offline())
        .map_err(|e| opening_error(&e, "the source", &args.from))?;
    let (target, existing) = open_target(&args.to, &args.from)?;
    let result = copy(args, &source, recovered.queues, &target, existing, progress);
    Storage::close(&source);
    let folded = target.store().fold();
    target.store().close();
    let summary = result?;
    folded.map_err(|e| format!("making the target durable: {e}"))?;
    Ok(summary)
}

fn copy(
    args: &MigrateArgs,
    source: &Store,
    mut queues: Vec<LoadedQueue>,
    target: &Dest,
    existing: crate::storage::Recovered,
    progress: &mut Progress,
) -> Result<MigrateSummary, String> {
    let into = target.store();
    queues.sort_by(|a, b| (&a.tenant, &a.task).cmp(&(&b.tenant, &b.task)));
    let held: HashSet<(String, String)> = existing
        .queues
        .iter()
        .map(|q| (q.tenant.clone(), q.task.clone()))
        .collect();
    let workflows = source
        .checkpoint_workflows()
        .map_err(|e| format!("reading the source's checkpoints: {e}"))?;

    // Refuse before writing anything when the target holds some of it.
    let mut conflicts = Vec::new();
    for q in &queues {
        if held.contains(&(q.tenant.clone(), q.task.clone())) {
            conflicts.push(format!("queue {}/{}", q.tenant, q.task));
        }
    }
    let mut skip_workflows = HashSet::new();
    for (tenant, workflow) in &workflows {
        let has = into
            .latest_checkpoint(tenant, workflow)
            .map_err(|e| format!("reading the target's checkpoints: {e}"))?;
        if has.is_some() {
            conflicts.push(format!("checkpoints of workflow {tenant}/{workflow}"));
            skip_workflows.insert((tenant.clone(), workflow.clone()));
        }
    }
    if !conflicts.is_empty() && !args.skip_existing {
        let more = conflicts.len().saturating_sub(LISTED);
        let mut list = conflicts[..conflicts.len().min(LISTED)].join(", ");
        if more > 0 {
            list.push_str(&format!(" and {more} more"));
        }
        return Err(format!(
            "the target already holds {} of what would be copied: {list}. Nothing was \
             copied; pass --skip-existing to copy the rest",
            conflicts.len()
        ));
    }

    let mut summary = MigrateSummary::default();
    let mut next_id = existing.next_queue_id.max(1);
    for q in &queues {
        if held.contains(&(q.tenant.clone(), q.task.clone())) {
            summary.skipped += 1;
            continue;
        }
        copy_queue(source, into, q, next_id, &mut summary, |s| {
            progress.tick(s, queues.len())
        })
        .map_err(|e| {
            format!(
                "copying queue {}/{}: {e}. Queues copied before it are complete; this one \
                 may be partly copied (remove it from the target before a rerun)",
                q.tenant, q.task
            )
        })?;
        next_id += 1;
        summary.queues += 1;
        progress.tick(&summary, queues.len());
    }
    if let Dest::Redb(_) = target {
        let mut w = into.begin().map_err(|e| e.to_string())?;
        w.set_next_queue_id(next_id).map_err(|e| e.to_string())?;
        commit(into, w).map_err(|e| format!("storing the next queue id: {e}"))?;
    }

    for (tenant, workflow) in &workflows {
        if skip_workflows.contains(&(tenant.clone(), workflow.clone())) {
            summary.skipped += 1;
            continue;
        }
        let saved = source
            .list_checkpoints(tenant, workflow)
            .map_err(|e| format!("reading checkpoints of {tenant}/{workflow}: {e}"))?;
        let mut w = into.begin().map_err(|e| e.to_string())?;
        for cp in &saved {
            w.put_checkpoint(tenant, workflow, &cp.record)
                .map_err(|e| e.to_string())?;
        }
        commit(into, w)
            .map_err(|e| format!("copying checkpoints of workflow {tenant}/{workflow}: {e}"))?;
        summary.checkpoints += saved.len() as u64;
    }

    let theirs: std::collections::HashMap<String, u64> = into
        .revocations()
        .map_err(|e| format!("reading the target's token revocations: {e}"))?
        .into_iter()
        .collect();
    for (tenant, not_before) in source
        .revocations()
        .map_err(|e| format!("reading the source's token revocations: {e}"))?
    {
        // The later revocation refuses more tokens: keep it.
        if theirs.get(&tenant).is_none_or(|&t| t < not_before) {
            into.put_revocation(&tenant, not_before)
                .map_err(|e| format!("copying the token revocation of {tenant}: {e}"))?;
        }
    }
    Ok(summary)
}

/// Copies one queue as queue `qid` of the target, in bounded batches.
fn copy_queue(
    source: &Store,
    into: &dyn Storage,
    q: &LoadedQueue,
    qid: u64,
    summary: &mut MigrateSummary,
    mut tick: impl FnMut(&MigrateSummary),
) -> Result<(), String> {
    let last = &q.record;
    let mut from = last.first_offset;
    loop {
        let events = source
            .export_events(last.id, from, last.next_offset, CHUNK_EVENTS, CHUNK_BYTES)
            .map_err(|e| format!("reading the source: {e}"))?;
        let copied_to = events.last().map_or(last.next_offset, |e| e.offset + 1);
        let done = copied_to >= last.next_offset;
        let record = if done {
            QueueRecord {
                id: qid,
                ..last.clone()
            }
        } else {
            // As of the events copied so far: what an interrupted copy leaves is consistent.
            QueueRecord {
                id: qid,
                next_offset: copied_to,
                closed: false,
                finished_at: last.finished_at.filter(|&f| f < copied_to),
                ..last.clone()
            }
        };
        let mut w = into.begin().map_err(|e| e.to_string())?;
        w.put_queue(&q.tenant, &q.task, &record)
            .map_err(|e| e.to_string())?;
        let mut bytes = 0;
        for e in &events {
            append(&mut *w, qid, e)?;
            bytes += e.json.len() as u64;
        }
        commit(into, w)?;
        summary.events += events.len() as u64;
        summary.bytes += bytes;
        if done {
            return Ok(());
        }
        tick(summary);
        from = copied_to;
    }
}

/// Stages event `e` at its own offset of queue `qid`, indexed by its stored id.
fn append(
    w: &mut dyn crate::storage::WriteBatch,
    qid: u64,
    e: &ExportedEvent,
) -> Result<(), String> {
    let meta = EventMeta {
        event_type: e.event_type,
        terminal: e.terminal,
        timestamp_us: e.timestamp_us,
        event_id: &e.event_id,
    };
    let (mut record, json_at) = w
        .event_record(&meta, e.json.len())
        .map_err(|e| e.to_string())?;
    record.extend_from_slice(&e.json);
    // An id no producer could send (none is stored so) cannot be repeated: nothing to index.
    let id = EventId::new(e.event_id.clone()).ok();
    w.append(
        qid,
        e.offset,
        id.as_ref(),
        record.into(),
        json_at,
        (e.event_type, e.terminal),
    )
    .map_err(|e| e.to_string())
}

/// Commits `w` and makes it durable, running the store's housekeeping as the engine would
/// between batches (a redb target writes its log into the database in bounded steps).
fn commit(into: &dyn Storage, w: Box<dyn crate::storage::WriteBatch + '_>) -> Result<(), String> {
    match w.commit() {
        Ok(_) => {}
        Err(WriteError::Stale(_)) => {
            return Err(
                "the target changed meanwhile (a queue or checkpoint of the same name was \
                 created there): is a server running on it?"
                    .into(),
            );
        }
        Err(e) => return Err(e.error().to_string()),
    }
    into.sync().map_err(|e| e.to_string())?;
    let done = into.maintain().map_err(|e| e.to_string())?;
    if let Some(work) = done.handoff {
        into.background(work).map_err(|e| e.to_string())?;
    }
    Ok(())
}
