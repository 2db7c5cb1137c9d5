//! The Redis store: queues kept in one Redis (or Valkey) server.
//!
//! # Layout
//!
//! Every key starts with the configured prefix (`eq:` by default). All keys of one queue share
//! the hash tag `{tenant/task}` (ids cannot contain `{`, `}` or `/`), so a queue lives in one
//! cluster slot:
//!
//! - `q:{T/K}` — hash: the queue's record (settings, offsets, lifecycle) and `rev`, its
//!   revision, bumped by every batch that changes it.
//! - `e:{T/K}` — stream: the retained events; offset `o` is entry id `0-(o+1)`, field `r` the
//!   record (`[type, terminal, id length (u16)]`, the id, the JSON).
//! - `i:{T/K}` — hash: event id → offset, for idempotent enqueues.
//! - `t:{T}` — sorted set of the tenant's task ids (listing); `tenants` — set of tenants.
//! - `c:{T/W}` — hash: a workflow's checkpoints (`r:SEQ`, `id:SEQ`, `next`);
//!   `ci:{T}` — hash: checkpoint id → `W/SEQ`.
//! - `notices` — the channel on which every stored batch is announced (see below).
//!
//! # The write path
//!
//! A batch is staged in the process and applied by one Lua script ([`COMMIT`]), so it is
//! atomic: Redis runs a script to its end before any other command. The script first checks
//! that every queue the batch changes is still at the revision the batch was built on (and
//! that a queue it creates does not exist); otherwise it stores nothing and answers the
//! queues' current records, and the engine rebuilds the batch on them
//! ([`WriteError::Stale`]). Offsets, idempotency, trims and the closed / cancelled checks are
//! thereby all decided against the state Redis holds at the moment the batch is stored.
//!
//! A commit is acknowledged when Redis answered the script: with `appendfsync always` that
//! is on disk; with less, Redis's own durability applies.
//!
//! A reply lost to a broken connection leaves the outcome unknown: the batch's callers get an
//! error (the commit is [`WriteError::Rejected`]) and the next batch of those queues meets
//! their new revision if the script did run, and is rebuilt on it.
//!
//! # Several nodes
//!
//! Any number of nodes share one Redis and prefix. Each keeps its own state of every queue
//! (its *view*, built from the records at start) and writes through the script above, so a
//! node whose view is behind meets the newer revision and rebuilds its batch: offsets stay
//! dense, ids unique, and a cancel or close by one node is what every other node's next
//! batch of that queue finds.
//!
//! So that views do not stay behind (and live subscribers on every node see every event), the
//! script announces each stored batch on the `notices` channel: the queues it changed, each
//! with its new revision and record, or its removal. Every node subscribes
//! ([`Storage::notices`]); the engine takes the records in and, for queues with live
//! subscribers on the node, reads the new events once and hands them to its local fan-out. A
//! notice is only news, never the data itself: a lost notice (the subscription broke) delays
//! nothing that a reload ([`Notice::Resync`], sent after every reconnect) does not repair,
//! and a queue another node created is also loaded on first use ([`Storage::load_queue`]).
//!
//! Queue ids are each node's own handles for queues; Redis names queues by their tags.

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use redis::Value;

use super::redb::checkpoints::{decode_checkpoint, encode_checkpoint};
use super::{
    BatchCheckpoints, CancelRecord, CheckpointRecord, DERIVED_LEN, EventMeta, Fresh,
    KEEP_CHECKPOINTS, LoadedCheckpoint, LoadedQueue, Notice, QueueRecord, Recovered, RemoteQueue,
    Storage, StoredEvent, WriteBatch, WriteError,
};
use crate::error::{Error, Result, StorageError};
use crate::ids::EventId;

/// The batch script; see the module docs and the script's own header.
const COMMIT: &str = include_str!("commit.lua");

/// How long the notice feed waits for a message before it checks whether it should stop,
/// and between attempts to reconnect.
const FEED_POLL: Duration = Duration::from_millis(500);
/// Notices a node holds for its engine before it drops them and asks for a reload instead.
const FEED_CAPACITY: usize = 16_384;
/// Longest wait to connect, and for one command's reply.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes of an event record's header: type, terminal, id length (u16, big-endian).
const HEADER: usize = 4;

/// Where a Redis store lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Target {
    /// The server's URL as the Redis client takes it (`redis://` or `rediss://`).
    pub url: String,
    /// Prefix of every key.
    pub prefix: String,
}

/// A failure talking to Redis, as a storage error that names it. Connection failures keep an
/// I/O kind (`ConnectionRefused`, `TimedOut`, …) so the server can answer 503 for them.
fn redis_error(target: &str, context: &str, e: redis::RedisError) -> Error {
    let kind = if e.code() == Some("OOM") {
        // maxmemory reached: refused before anything was written, like a full disk.
        std::io::ErrorKind::StorageFull
    } else if e.is_timeout() {
        std::io::ErrorKind::TimedOut
    } else if e.is_connection_refusal() {
        std::io::ErrorKind::ConnectionRefused
    } else if e.is_io_error() || e.is_connection_dropped() || e.is_unrecoverable_error() {
        std::io::ErrorKind::ConnectionReset
    } else if matches!(
        e.kind(),
        redis::ErrorKind::Server(
            redis::ServerErrorKind::BusyLoading
                | redis::ServerErrorKind::TryAgain
                | redis::ServerErrorKind::ClusterDown
                | redis::ServerErrorKind::MasterDown
        )
    ) {
        // Up but not serving yet (loading its data after a restart, a failover): soon.
        std::io::ErrorKind::NotConnected
    } else {
        std::io::ErrorKind::Other
    };
    Error::Storage(StorageError::caused(
        format_args!("redis at {target}: {context}"),
        kind,
        e,
    ))
}

/// A connection with the read and write timeouts every connection of this store has (the
/// client clears them after connecting), so a server that stops answering never blocks a
/// thread for long.
fn connect(client: &redis::Client) -> redis::RedisResult<redis::Connection> {
    let c = client.get_connection_with_timeout(CONNECT_TIMEOUT)?;
    c.set_read_timeout(Some(IO_TIMEOUT))?;
    c.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(c)
}

/// The URL without its password, for messages.
fn shown(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_string(),
    }
}

/// The Redis store. See the module docs.
pub(crate) struct RedisStore {
    client: redis::Client,
    shown: String,
    prefix: String,
    /// Idle connections; a connection that failed is dropped, not returned.
    pool: Mutex<Vec<redis::Connection>>,
    /// Each queue's hash tag (`tenant/task`) by its id in this process.
    tags: RwLock<HashMap<u64, Arc<str>>>,
    /// The revision of each queue as of this node's latest commit or look.
    revs: Mutex<HashMap<u64, u64>>,
    /// This node's id in notices (random).
    node: String,
    stop: Arc<AtomicBool>,
    feed: Mutex<Option<std::thread::JoinHandle<()>>>,
    closed: AtomicBool,
    script: redis::Script,
    #[cfg(feature = "failpoints")]
    faults: Arc<super::redb::wal::Faults>,
}

impl RedisStore {
    /// Connects and loads every queue's record.
    ///
    /// # Errors
    ///
    /// A storage error when Redis cannot be reached.
    pub(crate) fn open(target: &Target) -> Result<(RedisStore, Recovered)> {
        let shown = shown(&target.url);
        let client = redis::Client::open(target.url.as_str())
            .map_err(|e| redis_error(&shown, "invalid URL", e))?;
        let node = format!("{:016x}{:016x}", rand_u64(), rand_u64());
        let store = RedisStore {
            client,
            shown,
            prefix: target.prefix.clone(),
            pool: Mutex::new(Vec::new()),
            tags: RwLock::new(HashMap::new()),
            revs: Mutex::new(HashMap::new()),
            node,
            stop: Arc::new(AtomicBool::new(false)),
            feed: Mutex::new(None),
            closed: AtomicBool::new(false),
            script: redis::Script::new(COMMIT),
            #[cfg(feature = "failpoints")]
            faults: Arc::default(),
        };
        store.warn_unless_persistent();
        let recovered = store.load()?;
        Ok((store, recovered))
    }

    fn err(&self, context: &str, e: redis::RedisError) -> Error {
        redis_error(&self.shown, context, e)
    }

    fn key(&self, kind: &str, tag: &str) -> String {
        format!("{}{kind}:{{{tag}}}", self.prefix)
    }

    /// A connection from the pool, or a new one.
    fn conn(&self) -> Result<Conn<'_>> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::ShuttingDown);
        }
        let pooled = self.pool.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let conn = match pooled {
            Some(c) => c,
            None => connect(&self.client).map_err(|e| self.err("connecting", e))?,
        };
        Ok(Conn {
            store: self,
            conn: Some(conn),
        })
    }

    /// Says once, at start, when Redis keeps nothing on disk (neither AOF nor snapshots):
    /// acknowledged events then die with the Redis process.
    fn warn_unless_persistent(&self) {
        if let Some(why) = self.not_persistent() {
            tracing::warn!(
                redis = %self.shown,
                "{why}: acknowledged events are lost if Redis restarts (run Redis with \
                 appendonly yes and appendfsync always for durable acknowledgements)"
            );
        }
    }

    fn not_persistent(&self) -> Option<&'static str> {
        let mut c = self.conn().ok()?;
        let conn = c.conn.as_mut()?;
        not_persistent(conn)
    }

    /// Every queue's record; ids are assigned in this process from 1.
    fn load(&self) -> Result<Recovered> {
        let mut queues = Vec::new();
        let mut next_id = 1;
        for remote in self.records()? {
            let Some(mut record) = remote.record.clone() else {
                continue;
            };
            record.id = next_id;
            self.adopt(next_id, &remote);
            queues.push(LoadedQueue {
                tenant: remote.tenant,
                task: remote.task,
                record,
            });
            next_id += 1;
        }
        Ok(Recovered {
            queues,
            next_queue_id: next_id,
            purges: Vec::new(),
        })
    }

    /// Every queue Redis holds, with its revision (record ids 0).
    fn records(&self) -> Result<Vec<RemoteQueue>> {
        let mut c = self.conn()?;
        let tenants: Vec<String> = c.run("listing tenants", |con| {
            redis::cmd("SMEMBERS")
                .arg(format!("{}tenants", self.prefix))
                .query(con)
        })?;
        let mut queues = Vec::new();
        for tenant in tenants {
            let tasks: Vec<String> = c.run("listing queues", |con| {
                redis::cmd("ZRANGE")
                    .arg(self.key("t", &tenant))
                    .arg(0)
                    .arg(-1)
                    .query(con)
            })?;
            for chunk in tasks.chunks(512) {
                let mut pipe = redis::pipe();
                for task in chunk {
                    pipe.cmd("HGETALL")
                        .arg(self.key("q", &format!("{tenant}/{task}")));
                }
                let records: Vec<HashMap<String, String>> =
                    c.run("loading queues", |con| pipe.query(con))?;
                for (task, fields) in chunk.iter().zip(records) {
                    if fields.is_empty() {
                        continue;
                    }
                    let (record, rev) = parse_record(0, &fields)?;
                    queues.push(RemoteQueue {
                        tenant: tenant.clone(),
                        task: task.clone(),
                        rev,
                        record: Some(record),
                    });
                }
            }
        }
        Ok(queues)
    }

    /// Starts the thread that subscribes to the notice channel and turns each message into a
    /// [`Notice`] (see the module docs): other nodes' batches, and a [`Notice::Resync`]
    /// after every reconnect (notices may have been missed while away) and whenever the
    /// engine fell so far behind that notices were dropped.
    fn start_feed(&self) -> Result<std::sync::mpsc::Receiver<Notice>> {
        let (tx, rx) = std::sync::mpsc::sync_channel(FEED_CAPACITY);
        let client = self.client.clone();
        let channel = format!("{}notices", self.prefix);
        let node = self.node.clone();
        let stop = self.stop.clone();
        let shown = self.shown.clone();
        let handle = std::thread::Builder::new()
            .name("eventqueue-notices".into())
            .spawn(move || {
                while !stop.load(Ordering::Acquire) {
                    let mut con = match connect(&client) {
                        Ok(c) => c,
                        Err(_) => {
                            std::thread::sleep(FEED_POLL);
                            continue;
                        }
                    };
                    let mut pubsub = con.as_pubsub();
                    if pubsub.subscribe(&channel).is_err()
                        || pubsub.set_read_timeout(Some(FEED_POLL)).is_err()
                    {
                        std::thread::sleep(FEED_POLL);
                        continue;
                    }
                    // Subscribed (again): whatever was stored since the node loaded its
                    // queues, or while the feed was away, is in what a reload reads.
                    if tx.send(Notice::Resync).is_err() {
                        return;
                    }
                    while !stop.load(Ordering::Acquire) {
                        let msg = match pubsub.get_message() {
                            Ok(m) => m,
                            Err(e) if e.is_timeout() => continue,
                            Err(e) => {
                                tracing::warn!(redis = %shown, error = %e, "the notice feed broke; reconnecting");
                                break;
                            }
                        };
                        let Some(changes) = parse_notice(msg.get_payload_bytes(), &node) else {
                            continue;
                        };
                        match tx.try_send(Notice::Changed(changes)) {
                            Ok(()) => {}
                            // The engine is this far behind: drop the notice and have it
                            // reload once it has room (waiting here, while Redis buffers
                            // the messages, or drops this subscriber and we reconnect).
                            Err(std::sync::mpsc::TrySendError::Full(_)) => {
                                if tx.send(Notice::Resync).is_err() {
                                    return;
                                }
                            }
                            Err(std::sync::mpsc::TrySendError::Disconnected(_)) => return,
                        }
                    }
                }
            })
            .map_err(|e| Error::internal(format!("cannot start the notice thread: {e}")))?;
        *self.feed.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle);
        Ok(rx)
    }

    fn tag(&self, qid: u64) -> Option<Arc<str>> {
        self.tags
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&qid)
            .cloned()
    }

    fn checkpoint_at(
        &self,
        c: &mut Conn<'_>,
        tenant: &str,
        workflow: &str,
        seq: u64,
    ) -> Result<Option<LoadedCheckpoint>> {
        let ck = self.key("c", &format!("{tenant}/{workflow}"));
        let bytes: Option<Vec<u8>> = c.run("reading a checkpoint", |con| {
            redis::cmd("HGET")
                .arg(&ck)
                .arg(format!("r:{seq}"))
                .query(con)
        })?;
        bytes
            .map(|b| {
                Ok(LoadedCheckpoint {
                    workflow: workflow.to_string(),
                    seq,
                    record: decode_checkpoint(&b)?,
                })
            })
            .transpose()
    }

    fn next_checkpoint_seq(&self, c: &mut Conn<'_>, tenant: &str, workflow: &str) -> Result<u64> {
        let ck = self.key("c", &format!("{tenant}/{workflow}"));
        let next: Option<u64> = c.run("reading a checkpoint", |con| {
            redis::cmd("HGET").arg(&ck).arg("next").query(con)
        })?;
        Ok(next.unwrap_or(0))
    }
}

/// Why the Redis server on `conn` keeps nothing on disk, if it does not (neither AOF nor
/// snapshots); `None` when it persists, or when its settings cannot be read (managed servers
/// that hide CONFIG).
fn not_persistent(conn: &mut redis::Connection) -> Option<&'static str> {
    let mut get = |key: &str| -> Option<String> {
        let pair: Vec<String> = redis::cmd("CONFIG").arg("GET").arg(key).query(conn).ok()?;
        pair.get(1).cloned()
    };
    let aof = get("appendonly")?;
    let save = get("save")?;
    (aof == "no" && save.trim().is_empty()).then_some("Redis persistence is off")
}

/// What `eventqueue serve` warns at start about the Redis server at `url`: `Some` reason when
/// it keeps nothing on disk, so acknowledged events would die with the Redis process.
/// `None` when it persists, cannot be reached, or hides its settings.
pub fn redis_persistence_warning(url: &str) -> Option<&'static str> {
    let client = redis::Client::open(url).ok()?;
    let mut conn = connect(&client).ok()?;
    not_persistent(&mut conn)
}

impl Drop for RedisStore {
    /// Tells the notice thread of a store dropped without [`Storage::close`] to stop (it does
    /// within [`FEED_POLL`]; no network I/O here: this may run on any thread).
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

/// A random 64-bit value (for the node's id), from the standard library's per-process
/// random hasher keys and the time.
fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

/// A pooled connection: back to the pool when dropped after success, discarded after an
/// error (its state is unknown).
struct Conn<'s> {
    store: &'s RedisStore,
    conn: Option<redis::Connection>,
}

impl Conn<'_> {
    fn run<T>(
        &mut self,
        context: &str,
        f: impl FnOnce(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> Result<T> {
        let Some(conn) = self.conn.as_mut() else {
            return Err(Error::storage("redis connection already failed"));
        };
        match f(conn) {
            Ok(v) => Ok(v),
            Err(e) => {
                if e.is_io_error()
                    || e.is_timeout()
                    || e.is_connection_dropped()
                    || e.is_unrecoverable_error()
                {
                    self.conn = None;
                }
                Err(self.store.err(context, e))
            }
        }
    }
}

impl Drop for Conn<'_> {
    fn drop(&mut self) {
        if let Some(c) = self.conn.take()
            && !self.store.closed.load(Ordering::Acquire)
        {
            self.store
                .pool
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(c);
        }
    }
}

/// The hash fields of a queue record.
fn record_fields(r: &QueueRecord) -> Vec<(&'static str, String)> {
    let mut f = vec![
        ("kind", r.kind.to_string()),
        ("created", r.created_at_us.to_string()),
        ("activity", r.last_activity_us.to_string()),
        ("ttl", r.ttl_ms.to_string()),
        ("max", r.max_buffer_size.to_string()),
        ("first", r.first_offset.to_string()),
        ("next", r.next_offset.to_string()),
        ("closed", u8::from(r.closed).to_string()),
        (
            "finished",
            r.finished_at.map(|f| f.to_string()).unwrap_or_default(),
        ),
    ];
    match &r.cancel {
        Some(c) => {
            f.push(("cancelled", c.time_us.to_string()));
            f.push(("reason", c.reason.clone().unwrap_or_default()));
            f.push(("has_reason", u8::from(c.reason.is_some()).to_string()));
        }
        None => f.push(("cancelled", String::new())),
    }
    if let Some(ct) = &r.content_type {
        f.push(("ctype", ct.clone()));
    }
    // A stream's own state (expiry, idempotent producers), as JSON: written with the data in
    // the batch's script, so the producers' check and the append commit together.
    if let Some(st) = &r.stream
        && let Ok(json) = serde_json::to_string(st)
    {
        f.push(("stream", json));
    }
    f
}

/// A queue record from its hash fields (with `id` as its id in this process) and its
/// revision.
fn parse_record(id: u64, f: &HashMap<String, String>) -> Result<(QueueRecord, u64)> {
    fn num<T: std::str::FromStr>(f: &HashMap<String, String>, k: &str) -> Result<T> {
        f.get(k)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| Error::storage(format!("corrupt queue record in redis: field {k}")))
    }
    fn opt<T: std::str::FromStr>(f: &HashMap<String, String>, k: &str) -> Result<Option<T>> {
        match f.get(k).map(String::as_str) {
            None | Some("") => Ok(None),
            Some(_) => num(f, k).map(Some),
        }
    }
    let cancel = opt::<i64>(f, "cancelled")?.map(|time_us| CancelRecord {
        reason: (f.get("has_reason").map(String::as_str) == Some("1"))
            .then(|| f.get("reason").cloned().unwrap_or_default()),
        time_us,
    });
    let record = QueueRecord {
        id,
        kind: num(f, "kind")?,
        created_at_us: num(f, "created")?,
        last_activity_us: num(f, "activity")?,
        ttl_ms: num(f, "ttl")?,
        max_buffer_size: num(f, "max")?,
        first_offset: num(f, "first")?,
        next_offset: num(f, "next")?,
        closed: num::<u8>(f, "closed")? == 1,
        finished_at: opt(f, "finished")?,
        cancel,
        content_type: f.get("ctype").cloned(),
        stream: match f.get("stream") {
            None => None,
            Some(json) => Some(serde_json::from_str(json).map_err(|e| {
                Error::storage(format!("corrupt queue record in redis: field stream: {e}"))
            })?),
        },
    };
    if record.first_offset > record.next_offset {
        return Err(Error::storage(
            "corrupt queue record in redis: first offset past the next",
        ));
    }
    Ok((record, num(f, "rev")?))
}

/// The changes a notice announces, unless this node (`own`) stored the batch or the message
/// is not a notice (both ignored).
fn parse_notice(payload: &[u8], own: &str) -> Option<Vec<RemoteQueue>> {
    let (node, entries): (String, Vec<Vec<String>>) = serde_json::from_slice(payload).ok()?;
    if node == own {
        return None;
    }
    let mut out = Vec::with_capacity(entries.len());
    for entry in entries {
        let mut parts = entry.into_iter();
        let (Some(what), Some(_tag), Some(tenant), Some(task), Some(rev)) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            continue;
        };
        if what == "rm" {
            out.push(RemoteQueue {
                tenant,
                task,
                rev: rev.parse().unwrap_or(0),
                record: None,
            });
            continue;
        }
        let rest: Vec<String> = parts.collect();
        let mut fields: HashMap<String, String> = rest
            .chunks(2)
            .filter_map(|kv| Some((kv.first()?.clone(), kv.get(1)?.clone())))
            .collect();
        fields.insert("rev".into(), rev);
        match parse_record(0, &fields) {
            Ok((record, rev)) => out.push(RemoteQueue {
                tenant,
                task,
                rev,
                record: Some(record),
            }),
            Err(e) => tracing::warn!(error = %e, "ignoring a notice with a corrupt record"),
        }
    }
    Some(out)
}

/// An event record's header and id, and where its JSON starts.
fn decode_record(rec: &[u8]) -> Result<(u8, bool, usize)> {
    let corrupt = || Error::storage("corrupt event record in redis");
    let header = rec.get(..HEADER).ok_or_else(corrupt)?;
    let id_len = usize::from(u16::from_be_bytes([header[2], header[3]]));
    let at = HEADER + id_len;
    if rec.len() < at {
        return Err(corrupt());
    }
    Ok((header[0], header[1] != 0, at))
}

/// Stream entries `[[id, [field, value, …]], …]` as events.
fn parse_entries(v: Value, max_bytes: usize, out: &mut Vec<StoredEvent>) -> Result<()> {
    let corrupt = || Error::storage("unexpected reply to XRANGE from redis");
    let Value::Array(entries) = v else {
        return Err(corrupt());
    };
    let mut copied = 0;
    for entry in entries {
        let Value::Array(mut parts) = entry else {
            return Err(corrupt());
        };
        if parts.len() != 2 {
            return Err(corrupt());
        }
        let fields = parts.pop().ok_or_else(corrupt)?;
        let id = parts.pop().ok_or_else(corrupt)?;
        let id = match id {
            Value::BulkString(b) => String::from_utf8(b).map_err(|_| corrupt())?,
            Value::SimpleString(s) => s,
            _ => return Err(corrupt()),
        };
        let seq: u64 = id
            .strip_prefix("0-")
            .and_then(|s| s.parse().ok())
            .ok_or_else(corrupt)?;
        let Value::Array(mut fields) = fields else {
            return Err(corrupt());
        };
        let Some(Value::BulkString(rec)) = fields.pop() else {
            return Err(corrupt());
        };
        let (event_type, terminal, at) = decode_record(&rec)?;
        copied += rec.len() - at;
        if copied > max_bytes && !out.is_empty() {
            break;
        }
        out.push(StoredEvent {
            offset: seq - 1,
            event_type,
            terminal,
            json: Bytes::from(rec).slice(at..),
        });
    }
    Ok(())
}

impl Storage for RedisStore {
    fn begin(&self) -> Result<Box<dyn WriteBatch + '_>> {
        Ok(Box::new(RedisBatch {
            store: self,
            conn: self.conn()?,
            checks: Vec::new(),
            checked: HashSet::new(),
            ops: Vec::new(),
            tags: HashMap::new(),
            removed: Vec::new(),
            ids: HashMap::new(),
            checkpoints: BatchCheckpoints::default(),
        }))
    }

    fn compact(&self) -> Result<(u64, u64)> {
        Ok((0, 0))
    }

    fn read_range(
        &self,
        qid: u64,
        from: u64,
        to: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<StoredEvent>> {
        let mut out = Vec::new();
        let Some(tag) = self.tag(qid) else {
            return Ok(out);
        };
        if from >= to || limit == 0 {
            return Ok(out);
        }
        let key = self.key("e", &tag);
        let mut c = self.conn()?;
        let v: Value = c.run("reading events", |con| {
            redis::cmd("XRANGE")
                .arg(&key)
                .arg(format!("0-{}", from + 1))
                .arg(format!("0-{to}"))
                .arg("COUNT")
                .arg(limit)
                .query(con)
        })?;
        parse_entries(v, max_bytes, &mut out)?;
        Ok(out)
    }

    fn latest_checkpoint(&self, tenant: &str, workflow: &str) -> Result<Option<LoadedCheckpoint>> {
        let mut c = self.conn()?;
        match self.next_checkpoint_seq(&mut c, tenant, workflow)? {
            0 => Ok(None),
            next => self.checkpoint_at(&mut c, tenant, workflow, next - 1),
        }
    }

    fn checkpoint_by_id(
        &self,
        tenant: &str,
        checkpoint_id: &str,
    ) -> Result<Option<LoadedCheckpoint>> {
        let mut c = self.conn()?;
        let ci = self.key("ci", tenant);
        let at: Option<String> = c.run("reading a checkpoint", |con| {
            redis::cmd("HGET").arg(&ci).arg(checkpoint_id).query(con)
        })?;
        let Some(at) = at else { return Ok(None) };
        let Some((workflow, seq)) = at
            .rsplit_once('/')
            .and_then(|(w, s)| Some((w.to_string(), s.parse::<u64>().ok()?)))
        else {
            return Err(Error::storage("corrupt checkpoint index entry in redis"));
        };
        self.checkpoint_at(&mut c, tenant, &workflow, seq)
    }

    fn list_checkpoints(&self, tenant: &str, workflow: &str) -> Result<Vec<LoadedCheckpoint>> {
        let mut c = self.conn()?;
        let next = self.next_checkpoint_seq(&mut c, tenant, workflow)?;
        let first = next.saturating_sub(KEEP_CHECKPOINTS);
        let mut out = Vec::new();
        for seq in first..next {
            if let Some(cp) = self.checkpoint_at(&mut c, tenant, workflow, seq)? {
                out.push(cp);
            }
        }
        Ok(out)
    }

    fn check(&self) -> Result<()> {
        let mut c = self.conn()?;
        c.run("ping", |con| redis::cmd("PING").query::<String>(con))
            .map(drop)
    }

    fn put_revocation(&self, tenant: &str, not_before_us: u64) -> Result<()> {
        let mut c = self.conn()?;
        c.run("storing a token revocation", |con| {
            redis::cmd("HSET")
                .arg(format!("{}revoked", self.prefix))
                .arg(tenant)
                .arg(not_before_us)
                .query::<u64>(con)
        })
        .map(drop)
    }

    fn revocations(&self) -> Result<Vec<(String, u64)>> {
        let mut c = self.conn()?;
        let all: std::collections::HashMap<String, u64> =
            c.run("reading token revocations", |con| {
                redis::cmd("HGETALL")
                    .arg(format!("{}revoked", self.prefix))
                    .query(con)
            })?;
        Ok(all.into_iter().collect())
    }

    fn size_bytes(&self) -> u64 {
        0
    }

    fn describe(&self) -> String {
        format!("{} (key prefix {:?})", self.shown, self.prefix)
    }

    fn close(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        self.stop.store(true, Ordering::Release);
        if let Some(h) = self.feed.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = h.join();
        }
        self.pool.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    fn notices(&self) -> Option<std::sync::mpsc::Receiver<Notice>> {
        match self.start_feed() {
            Ok(rx) => Some(rx),
            Err(e) => {
                tracing::error!(error = %e, "cannot follow other nodes' writes");
                None
            }
        }
    }

    fn load_queue(&self, tenant: &str, task: &str) -> Result<Option<RemoteQueue>> {
        let mut c = self.conn()?;
        let fields: HashMap<String, String> = c.run("loading a queue", |con| {
            redis::cmd("HGETALL")
                .arg(self.key("q", &format!("{tenant}/{task}")))
                .query(con)
        })?;
        if fields.is_empty() {
            return Ok(None);
        }
        let (record, rev) = parse_record(0, &fields)?;
        Ok(Some(RemoteQueue {
            tenant: tenant.to_string(),
            task: task.to_string(),
            rev,
            record: Some(record),
        }))
    }

    fn load_all(&self) -> Result<Vec<RemoteQueue>> {
        self.records()
    }

    fn adopt(&self, qid: u64, queue: &RemoteQueue) {
        self.tags
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .entry(qid)
            .or_insert_with(|| Arc::from(format!("{}/{}", queue.tenant, queue.task)));
        let mut revs = self.revs.lock().unwrap_or_else(|p| p.into_inner());
        let rev = revs.entry(qid).or_insert(queue.rev);
        *rev = (*rev).max(queue.rev);
    }

    fn revision(&self, qid: u64) -> Option<u64> {
        self.revs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&qid)
            .copied()
    }

    fn forget(&self, qid: u64) {
        self.tags
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&qid);
        self.revs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&qid);
    }

    #[cfg(feature = "failpoints")]
    fn faults(&self) -> Arc<super::redb::wal::Faults> {
        self.faults.clone()
    }
}

/// A staged operation of a batch (tags are resolved at commit: a queue created by the batch
/// gets its tag from its record, stored after its first appends were staged).
enum Staged {
    Add {
        qid: u64,
        offset: u64,
        id: Option<Box<str>>,
        record: Bytes,
    },
    Trim {
        qid: u64,
        to: u64,
    },
    Put {
        qid: u64,
        tenant: String,
        task: String,
        record: QueueRecord,
    },
    Remove {
        qid: u64,
        tenant: String,
        task: String,
    },
    Checkpoint {
        tenant: String,
        workflow: String,
        seq: u64,
        id: String,
        record: Vec<u8>,
    },
}

/// A batch script's arguments, and the queue id of each tag it checks.
type Arguments = (Vec<Vec<u8>>, HashMap<Arc<str>, u64>);

/// One batch of the Redis store: staged here, applied by one script at commit.
struct RedisBatch<'s> {
    store: &'s RedisStore,
    conn: Conn<'s>,
    /// Queues whose revision the script checks, in the order first touched.
    checks: Vec<u64>,
    checked: HashSet<u64>,
    ops: Vec<Staged>,
    /// Tags of queues this batch creates.
    tags: HashMap<u64, Arc<str>>,
    removed: Vec<u64>,
    /// Ids appended by this batch: `(qid, id)` → offset.
    ids: HashMap<(u64, Box<str>), u64>,
    checkpoints: BatchCheckpoints,
}

impl RedisBatch<'_> {
    fn touch(&mut self, qid: u64) {
        if self.checked.insert(qid) {
            self.checks.push(qid);
        }
    }

    fn tag(&self, qid: u64) -> Option<Arc<str>> {
        self.tags.get(&qid).cloned().or_else(|| self.store.tag(qid))
    }

    /// The script's arguments and the queue ids of the tags it checks; `None` for a batch
    /// with nothing to store.
    fn arguments(&self) -> Result<Option<Arguments>> {
        if self.ops.is_empty() {
            return Ok(None);
        }
        let mut by_tag = HashMap::new();
        let mut args: Vec<Vec<u8>> = vec![
            self.store.prefix.clone().into_bytes(),
            self.store.node.clone().into_bytes(),
            self.checks.len().to_string().into_bytes(),
        ];
        let missing = |qid| Error::internal(format!("queue {qid} has no redis key"));
        {
            let revs = self.store.revs.lock().unwrap_or_else(|p| p.into_inner());
            for qid in &self.checks {
                let tag = self.tag(*qid).ok_or_else(|| missing(*qid))?;
                by_tag.insert(tag.clone(), *qid);
                args.push(tag.as_bytes().to_vec());
                args.push(match (self.tags.contains_key(qid), revs.get(qid)) {
                    (true, _) => b"new".to_vec(),
                    (false, Some(rev)) => rev.to_string().into_bytes(),
                    // Never seen stored: any revision is newer.
                    (false, None) => b"0".to_vec(),
                });
            }
        }
        let saves: Vec<&Staged> = self
            .ops
            .iter()
            .filter(|op| matches!(op, Staged::Checkpoint { .. }))
            .collect();
        args.push(saves.len().to_string().into_bytes());
        for op in saves {
            if let Staged::Checkpoint {
                tenant,
                workflow,
                seq,
                id,
                ..
            } = op
            {
                args.push(tenant.clone().into_bytes());
                args.push(workflow.clone().into_bytes());
                args.push(seq.to_string().into_bytes());
                args.push(id.clone().into_bytes());
            }
        }
        args.push(b"keep".to_vec());
        args.push(KEEP_CHECKPOINTS.to_string().into_bytes());
        for op in &self.ops {
            match op {
                Staged::Add {
                    qid,
                    offset,
                    id,
                    record,
                } => {
                    let tag = self.tag(*qid).ok_or_else(|| missing(*qid))?;
                    args.push(b"add".to_vec());
                    args.push(tag.as_bytes().to_vec());
                    args.push((offset + 1).to_string().into_bytes());
                    args.push(offset.to_string().into_bytes());
                    args.push(id.as_deref().unwrap_or("").as_bytes().to_vec());
                    args.push(record.to_vec());
                }
                Staged::Trim { qid, to } => {
                    if *to == 0 {
                        continue;
                    }
                    let tag = self.tag(*qid).ok_or_else(|| missing(*qid))?;
                    args.push(b"trim".to_vec());
                    args.push(tag.as_bytes().to_vec());
                    args.push(format!("0-{to}").into_bytes());
                    args.push(format!("0-{}", to + 1).into_bytes());
                }
                Staged::Put {
                    qid,
                    tenant,
                    task,
                    record,
                } => {
                    let tag = self.tag(*qid).ok_or_else(|| missing(*qid))?;
                    let fields = record_fields(record);
                    args.push(b"put".to_vec());
                    args.push(tag.as_bytes().to_vec());
                    args.push(tenant.clone().into_bytes());
                    args.push(task.clone().into_bytes());
                    args.push(fields.len().to_string().into_bytes());
                    for (k, v) in fields {
                        args.push(k.as_bytes().to_vec());
                        args.push(v.into_bytes());
                    }
                }
                Staged::Remove { qid, tenant, task } => {
                    let tag = self.tag(*qid).ok_or_else(|| missing(*qid))?;
                    args.push(b"rm".to_vec());
                    args.push(tag.as_bytes().to_vec());
                    args.push(tenant.clone().into_bytes());
                    args.push(task.clone().into_bytes());
                }
                Staged::Checkpoint {
                    tenant,
                    workflow,
                    seq,
                    id,
                    record,
                } => {
                    args.push(b"cp".to_vec());
                    args.push(tenant.clone().into_bytes());
                    args.push(workflow.clone().into_bytes());
                    args.push(seq.to_string().into_bytes());
                    args.push(id.clone().into_bytes());
                    args.push(record.clone());
                }
            }
        }
        Ok(Some((args, by_tag)))
    }
}

/// A reply element as text.
fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

impl WriteBatch for RedisBatch<'_> {
    fn derived_id(&self, _qid: u64, _offset: u64) -> Option<[u8; DERIVED_LEN]> {
        None
    }

    fn find_event_id(
        &mut self,
        qid: u64,
        event_id: &str,
        retained: Range<u64>,
    ) -> Result<Option<u64>> {
        if let Some(&at) = self.ids.get(&(qid, Box::from(event_id))) {
            return Ok(Some(at));
        }
        let Some(tag) = self.store.tag(qid) else {
            return Ok(None);
        };
        let key = self.store.key("i", &tag);
        let at: Option<u64> = self.conn.run("looking up an event id", |con| {
            redis::cmd("HGET").arg(&key).arg(event_id).query(con)
        })?;
        Ok(at.filter(|at| retained.contains(at)))
    }

    fn event_record(&self, meta: &EventMeta<'_>, json_len: usize) -> Result<(Vec<u8>, usize)> {
        let id = meta.event_id.as_bytes();
        let id_len = u16::try_from(id.len())
            .map_err(|_| Error::internal("event id longer than 65535 bytes"))?;
        let mut buf = Vec::with_capacity(HEADER + id.len() + json_len);
        buf.push(meta.event_type);
        buf.push(u8::from(meta.terminal));
        buf.extend_from_slice(&id_len.to_be_bytes());
        buf.extend_from_slice(id);
        let at = buf.len();
        Ok((buf, at))
    }

    fn append(
        &mut self,
        qid: u64,
        offset: u64,
        event_id: Option<&EventId>,
        record: Bytes,
        _json_at: usize,
        _meta: (u8, bool),
    ) -> Result<()> {
        self.touch(qid);
        let id: Option<Box<str>> = event_id.map(|id| Box::from(id.as_str()));
        if let Some(id) = &id {
            self.ids.insert((qid, id.clone()), offset);
        }
        self.ops.push(Staged::Add {
            qid,
            offset,
            id,
            record,
        });
        Ok(())
    }

    fn trim(&mut self, qid: u64, from: u64, to: u64) -> Result<u64> {
        self.touch(qid);
        self.ops.push(Staged::Trim { qid, to });
        Ok(to.saturating_sub(from))
    }

    fn put_queue(&mut self, tenant: &str, task: &str, record: &QueueRecord) -> Result<()> {
        let qid = record.id;
        if self.store.tag(qid).is_none() {
            self.tags
                .entry(qid)
                .or_insert_with(|| Arc::from(format!("{tenant}/{task}")));
        }
        self.touch(qid);
        self.ops.push(Staged::Put {
            qid,
            tenant: tenant.to_string(),
            task: task.to_string(),
            record: record.clone(),
        });
        Ok(())
    }

    fn remove_queue(&mut self, qid: u64, tenant: &str, task: &str) -> Result<()> {
        self.touch(qid);
        self.removed.push(qid);
        self.ops.push(Staged::Remove {
            qid,
            tenant: tenant.to_string(),
            task: task.to_string(),
        });
        Ok(())
    }

    fn purge(&mut self, _qid: u64, _from: u64, _to: u64, _last: bool) -> Result<()> {
        // Removing a queue unlinked its events at once (Redis frees them in the background).
        Ok(())
    }

    fn set_next_queue_id(&mut self, _id: u64) -> Result<()> {
        // Queue ids are this process's own handles; Redis names queues by their ids.
        Ok(())
    }

    fn checkpoint_id_taken(&mut self, tenant: &str, checkpoint_id: &str) -> Result<bool> {
        let ci = self.store.key("ci", tenant);
        let conn = &mut self.conn;
        self.checkpoints.taken(tenant, checkpoint_id, || {
            conn.run("looking up a checkpoint id", |con| {
                redis::cmd("HEXISTS").arg(&ci).arg(checkpoint_id).query(con)
            })
        })
    }

    fn put_checkpoint(
        &mut self,
        tenant: &str,
        workflow: &str,
        record: &CheckpointRecord,
    ) -> Result<u64> {
        let (store, conn) = (self.store, &mut self.conn);
        let seq = self.checkpoints.next_seq(tenant, workflow, || {
            store.next_checkpoint_seq(conn, tenant, workflow)
        })?;
        let encoded = encode_checkpoint(record)?;
        self.checkpoints
            .saved(tenant, workflow, &record.checkpoint_id, seq);
        self.ops.push(Staged::Checkpoint {
            tenant: tenant.to_string(),
            workflow: workflow.to_string(),
            seq,
            id: record.checkpoint_id.clone(),
            record: encoded,
        });
        Ok(seq)
    }

    fn commit(mut self: Box<Self>) -> Result<bool, WriteError> {
        let Some((args, by_tag)) = self.arguments().map_err(WriteError::Fatal)? else {
            return Ok(false);
        };
        let script = &self.store.script;
        let mut invocation = script.prepare_invoke();
        for a in &args {
            invocation.arg(a.as_slice());
        }
        // A lost connection leaves the outcome unknown (the next batch of these queues meets
        // their new revision if the script ran); a refusal before the first write (OOM) left
        // nothing. Any other error of a script may have stopped it halfway: stop writing.
        let reply: Value = self
            .conn
            .run("storing a batch", |con| invocation.invoke(con))
            .map_err(|e| match &e {
                Error::Storage(se) if se.is_unavailable() || se.is_storage_full() => {
                    WriteError::Rejected(e)
                }
                _ => WriteError::Fatal(e),
            })?;
        let corrupt =
            || WriteError::Fatal(Error::storage("unexpected reply from the batch script"));
        let Value::Array(items) = reply else {
            return Err(corrupt());
        };
        let mut items = items.into_iter();
        let status = items.next().as_ref().and_then(text).ok_or_else(corrupt)?;
        match status.as_str() {
            "ok" => {
                let rest: Vec<Value> = items.collect();
                let mut revs = self.store.revs.lock().unwrap_or_else(|p| p.into_inner());
                for pair in rest.chunks(2) {
                    let (Some(tag), Some(rev)) = (
                        pair.first().and_then(text),
                        pair.get(1).and_then(text).and_then(|r| r.parse().ok()),
                    ) else {
                        return Err(corrupt());
                    };
                    if let Some(&qid) = by_tag.get(tag.as_str()) {
                        revs.insert(qid, rev);
                    }
                }
                let mut tags = self.store.tags.write().unwrap_or_else(|p| p.into_inner());
                tags.extend(self.tags.drain());
                for qid in &self.removed {
                    tags.remove(qid);
                    revs.remove(qid);
                }
                Ok(true)
            }
            "stale" => {
                let rest: Vec<Value> = items.collect();
                let mut fresh = Vec::new();
                for pair in rest.chunks(2) {
                    let tag = pair.first().and_then(text).ok_or_else(corrupt)?;
                    let Some(&qid) = by_tag.get(tag.as_str()) else {
                        return Err(corrupt());
                    };
                    let Some(Value::Array(kv)) = pair.get(1) else {
                        return Err(corrupt());
                    };
                    let fields: HashMap<String, String> = kv
                        .chunks(2)
                        .filter_map(|p| Some((text(p.first()?)?, text(p.get(1)?)?)))
                        .collect();
                    let record = if fields.is_empty() {
                        self.store
                            .revs
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .remove(&qid);
                        None
                    } else {
                        let (record, rev) =
                            parse_record(qid, &fields).map_err(WriteError::Fatal)?;
                        self.store
                            .revs
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert(qid, rev);
                        if let Some(tag) = self.tags.get(&qid) {
                            // Created elsewhere meanwhile: it is that queue from now on.
                            self.store
                                .tags
                                .write()
                                .unwrap_or_else(|p| p.into_inner())
                                .insert(qid, tag.clone());
                        }
                        Some(record)
                    };
                    fresh.push(Fresh { qid, record });
                }
                Err(WriteError::Stale(fresh))
            }
            _ => Err(corrupt()),
        }
    }
}
