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
//! - `e:{T/K}` — stream: the retained events. The events a batch appends to the queue
//!   together are one entry (a run of up to `RUN_EVENTS`), named `0-(o+1)` after its last
//!   offset `o`, a field `r` per event in offset order holding its record (`[type, terminal,
//!   id length (u16)]`, the id, the JSON). A trim removes whole entries, so reads skip the
//!   offsets below the queue's first that its first entry may still hold.
//! - `i:{T/K}` — hash: event id → offset, for idempotent enqueues.
//! - `t:{T}` — sorted set of the tenant's task ids (listing); `tenants` — set of tenants.
//! - `c:{T/W}` — hash: a workflow's checkpoints (`r:SEQ`, `id:SEQ`, `next`);
//!   `ci:{T}` — hash: checkpoint id → `W/SEQ`.
//! - `notices` — the channel on which every stored batch is announced (see below).
//! - `idkey` — the key of the event ids derived from offsets (see below), shared by every
//!   node; written once by the first node that opens the store.
//!
//! # Derived event ids
//!
//! An event whose producer gave no id gets one derived from its offset, as on redb
//! (`storage/redb/derived_ids.rs`): `evt_` + 12 hex characters, a keyed permutation of the
//! offset. It needs no entry in the id index, so the most common append writes its record
//! into a stream entry and nothing else. Every node must derive the same id for the same
//! event, and a queue deleted and created again must not repeat its predecessor's ids: the
//! permutation's key is the one `idkey` holds, and its per-queue tweak comes from what every
//! node reads in the queue's record — its tag and creation time ([`id_tweak`]) — not from a
//! node's own queue id. An id of that shape that a producer sends is found by inverting the
//! permutation and comparing the id stored at the offset it names (besides the index, which
//! holds the ids producers chose and every id stored before ids were derived). Events appended
//! in the batch that creates their queue keep the id generated on receipt (indexed): the
//! queue's creation time is stored after them.
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
use super::redb::derived_ids::IdKey;
use super::{
    BatchCheckpoints, CancelRecord, CheckpointRecord, DERIVED_LEN, EventMeta, Fresh,
    KEEP_CHECKPOINTS, LoadedCheckpoint, LoadedQueue, Notice, QueueRecord, Recovered, RemoteQueue,
    Storage, StoredEvent, WriteBatch, WriteError,
};
use crate::error::{Error, Result, StorageError};
use crate::ids::EventId;

mod xrange;

/// The batch script; see the module docs and the script's own header.
const COMMIT: &str = include_str!("commit.lua");

/// Writes a queue's revision again, unchanged (a write the replicas receive, that changes
/// nothing), if it is `ARGV[1]` (any, when that is empty); 1 if it did. See
/// `RedisBatch::wait_for_found` and `RedisBatch::wait_for_replicas`.
static REWRITE_REVISION: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        "local r = redis.call('HGET', KEYS[1], 'rev') \
         if r and (ARGV[1] == '' or r == ARGV[1]) then \
           redis.call('HSET', KEYS[1], 'rev', r) return 1 end return 0",
    )
});

/// How long the notice feed waits for a message before it checks whether it should stop,
/// and between attempts to reconnect.
const FEED_POLL: Duration = Duration::from_millis(500);
/// Longest wait to connect, and for one command's reply.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Most events one stream entry holds (a run of appends to one queue in a batch is one entry,
/// see `commit.lua`): far below what the script's `unpack` can pass to one `XADD` (~4000).
const RUN_EVENTS: usize = 128;
/// An entry takes no further event once its records hold this many bytes, so that a read
/// sized by the entries seen before (`read_range`) cannot meet entries much larger.
const RUN_BYTES: usize = 64 * 1024;
/// Bytes of an event record's header: type, terminal, id length (u16, big-endian).
const HEADER: usize = 4;

/// Where a Redis store lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Target {
    /// The server's URL (`redis://`, `rediss://`), or a cluster's seed nodes
    /// (`redis-cluster://`, `redis-cluster+tls://`).
    pub url: String,
    /// Prefix of every key.
    pub prefix: String,
    /// Replicas each batch must reach before it is acknowledged (0: none).
    pub wait_replicas: u32,
    /// Longest wait for them.
    pub wait_timeout: Duration,
}

/// Environment variable naming a PEM file of CA certificates for TLS to Redis (instead of the
/// system's roots: the Redis client takes one or the other).
pub const REDIS_CA_ENV: &str = "EVENTQUEUE_REDIS_CA";

/// Number of hash slots of a Redis Cluster.
const SLOTS: u16 = 16384;

/// The cluster hash slot of a hash tag (CRC16/XMODEM, as Redis Cluster computes it).
fn slot_of(tag: &str) -> u16 {
    let mut crc: u16 = 0;
    for &b in tag.as_bytes() {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % SLOTS
}

/// How to reach a node of a cluster from its address: the scheme, credentials and options of
/// the seed URL, and the CA file's certificates.
#[derive(Clone)]
struct NodeTemplate {
    scheme: &'static str,
    /// `user:password@` or empty.
    userinfo: String,
    /// `?…` or empty.
    query: String,
    ca: Option<Vec<u8>>,
}

impl NodeTemplate {
    fn url(&self, host: &str, port: u16) -> String {
        let host = if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]")
        } else {
            host.to_string()
        };
        format!(
            "{}://{}{host}:{port}{}",
            self.scheme, self.userinfo, self.query
        )
    }

    fn client(&self, host: &str, port: u16) -> redis::RedisResult<redis::Client> {
        client_for(&self.url(host, port), self.ca.as_deref())
    }
}

/// The seed nodes of `redis-cluster[+tls]://[USERINFO@]HOST:PORT[,HOST:PORT…][?QUERY]`, and
/// the template for reaching any node.
fn cluster_seeds(
    url: &str,
    ca: Option<Vec<u8>>,
) -> std::result::Result<(NodeTemplate, Vec<(String, u16)>), String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| "invalid redis cluster URL".to_string())?;
    let scheme = match scheme {
        "redis-cluster" => "redis",
        "redis-cluster+tls" => "rediss",
        other => return Err(format!("not a redis cluster URL scheme: {other}")),
    };
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, format!("?{q}")),
        None => (rest, String::new()),
    };
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    if !path.is_empty() && path != "0" {
        return Err("a Redis Cluster has only database 0".into());
    }
    let (userinfo, hosts) = match authority.rsplit_once('@') {
        Some((u, h)) => (format!("{u}@"), h),
        None => (String::new(), authority),
    };
    let mut seeds = Vec::new();
    for node in hosts.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let (host, port) = match node.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(':') => (
                h,
                p.parse::<u16>()
                    .map_err(|_| format!("invalid port in redis cluster node {node:?}"))?,
            ),
            _ => (node, 6379),
        };
        seeds.push((host.to_string(), port));
    }
    if seeds.is_empty() {
        return Err("a redis cluster URL names no node".into());
    }
    Ok((
        NodeTemplate {
            scheme,
            userinfo,
            query,
            ca,
        },
        seeds,
    ))
}

/// A client for one server, trusting the certificates of `ca` instead of the system's roots
/// when given (with TLS).
fn client_for(url: &str, ca: Option<&[u8]>) -> redis::RedisResult<redis::Client> {
    #[cfg(feature = "redis-tls")]
    if let Some(ca) = ca
        && url.starts_with("rediss://")
    {
        return redis::Client::build_with_tls(
            url,
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(ca.to_vec()),
            },
        );
    }
    #[cfg(not(feature = "redis-tls"))]
    let _ = ca;
    redis::Client::open(url)
}

/// The CA certificates named by [`REDIS_CA_ENV`], if set.
fn ca_file() -> Result<Option<Vec<u8>>> {
    let Some(path) = std::env::var_os(REDIS_CA_ENV).filter(|p| !p.is_empty()) else {
        return Ok(None);
    };
    std::fs::read(&path).map(Some).map_err(|e| {
        Error::Storage(StorageError::io(
            format_args!("reading {REDIS_CA_ENV} ({})", path.to_string_lossy()),
            e,
        ))
    })
}

/// How a store reaches Redis.
enum Backend {
    /// One server (and its replicas).
    Single(Box<redis::Client>),
    /// A Redis Cluster.
    Cluster(Box<ClusterBackend>),
}

/// How a store reaches a Redis Cluster.
struct ClusterBackend {
    client: redis::cluster::ClusterClient,
    /// A client per seed node: the notice feed subscribes to one of them.
    seeds: Vec<redis::Client>,
    /// How to reach any other node (to scan a master).
    template: NodeTemplate,
}

/// A connection to the server, or to the cluster (routing each command by its key).
enum Connection {
    Single(redis::Connection),
    Cluster(Box<redis::cluster::ClusterConnection>),
}

impl redis::ConnectionLike for Connection {
    fn req_packed_command(&mut self, cmd: &[u8]) -> redis::RedisResult<Value> {
        match self {
            Connection::Single(c) => c.req_packed_command(cmd),
            Connection::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands(
        &mut self,
        cmd: &[u8],
        offset: usize,
        count: usize,
    ) -> redis::RedisResult<Vec<Value>> {
        match self {
            Connection::Single(c) => c.req_packed_commands(cmd, offset, count),
            Connection::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn req_command(&mut self, cmd: &redis::Cmd) -> redis::RedisResult<Value> {
        match self {
            Connection::Single(c) => c.req_command(cmd),
            Connection::Cluster(c) => c.req_command(cmd),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(c) => c.get_db(),
            Connection::Cluster(c) => c.get_db(),
        }
    }

    fn supports_pipelining(&self) -> bool {
        match self {
            Connection::Single(c) => c.supports_pipelining(),
            Connection::Cluster(c) => c.supports_pipelining(),
        }
    }

    fn check_connection(&mut self) -> bool {
        match self {
            Connection::Single(c) => c.check_connection(),
            Connection::Cluster(c) => c.check_connection(),
        }
    }

    fn is_open(&self) -> bool {
        match self {
            Connection::Single(c) => c.is_open(),
            Connection::Cluster(c) => c.is_open(),
        }
    }
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

impl Backend {
    fn open(url: &str) -> std::result::Result<Backend, String> {
        let ca = ca_file().map_err(|e| e.to_string())?;
        if url.starts_with("redis-cluster") {
            let (template, seeds) = cluster_seeds(url, ca)?;
            let urls: Vec<String> = seeds.iter().map(|(h, p)| template.url(h, *p)).collect();
            let builder = redis::cluster::ClusterClient::builder(urls.clone())
                .connection_timeout(CONNECT_TIMEOUT)
                .response_timeout(IO_TIMEOUT)
                // Few retries: a cluster that is down answers 503 soon, as one server does.
                .retries(2);
            #[cfg(feature = "redis-tls")]
            let builder = match &template.ca {
                Some(ca) if template.scheme == "rediss" => builder.certs(redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(ca.clone()),
                }),
                _ => builder,
            };
            let client = builder.build().map_err(|e| e.to_string())?;
            let seeds = urls
                .iter()
                .map(|u| client_for(u, template.ca.as_deref()))
                .collect::<redis::RedisResult<Vec<_>>>()
                .map_err(|e| e.to_string())?;
            Ok(Backend::Cluster(Box::new(ClusterBackend {
                client,
                seeds,
                template,
            })))
        } else {
            client_for(url, ca.as_deref())
                .map(|c| Backend::Single(Box::new(c)))
                .map_err(|e| e.to_string())
        }
    }

    /// A connection with the timeouts of [`connect`].
    fn connect(&self) -> redis::RedisResult<Connection> {
        match self {
            Backend::Single(client) => connect(client).map(Connection::Single),
            Backend::Cluster(cluster) => {
                let c = cluster.client.get_connection()?;
                c.set_read_timeout(Some(IO_TIMEOUT))?;
                c.set_write_timeout(Some(IO_TIMEOUT))?;
                Ok(Connection::Cluster(Box::new(c)))
            }
        }
    }

    /// Clients of the servers to subscribe to, in the order to try them: the server, or the
    /// seed nodes of a cluster (a PUBLISH on any node of a cluster reaches subscribers on
    /// every node).
    fn feed_clients(&self) -> Vec<redis::Client> {
        match self {
            Backend::Single(client) => vec![(**client).clone()],
            Backend::Cluster(cluster) => cluster.seeds.clone(),
        }
    }
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
    backend: Backend,
    shown: String,
    prefix: String,
    /// Idle connections; a connection that failed is dropped, not returned.
    pool: Mutex<Vec<Connection>>,
    /// Where replays read with their own reply parser ([`xrange`]); `None` with TLS, whose
    /// reads go through the redis crate.
    direct: Option<Direct>,
    /// Idle connections of those reads by server (`host:port`; empty for the one server),
    /// as `pool`.
    readers: Mutex<HashMap<String, Vec<xrange::Reader<xrange::Stream>>>>,
    wait_replicas: u32,
    wait_timeout: Duration,
    /// Whether the server has `WAITAOF` (Redis ≥ 7.2); learnt from the first try.
    waitaof: AtomicBool,
    /// A cluster's masters by slot range (`CLUSTER SLOTS`), for the replica waits; refreshed
    /// by every full load.
    masters: RwLock<Vec<(Range<u16>, String, u16)>>,
    /// Each queue's hash tag (`tenant/task`) by its id in this process.
    tags: RwLock<HashMap<u64, Arc<str>>>,
    /// The key of derived event ids (see the module docs), as `idkey` holds it.
    id_key: IdKey,
    /// Each queue's tweak of its derived ids ([`id_tweak`]), by its id in this process: from
    /// the newest record this node saw of it.
    tweaks: RwLock<HashMap<u64, u64>>,
    /// The revision of each queue as of this node's latest commit or look.
    revs: Mutex<HashMap<u64, u64>>,
    /// What reads of each queue need to know (see `read_range`).
    reads: RwLock<HashMap<u64, QueueReads>>,
    /// This node's id in notices (random).
    node: String,
    stop: Arc<AtomicBool>,
    feed: Mutex<Option<std::thread::JoinHandle<()>>>,
    closed: AtomicBool,
    script: redis::Script,
    #[cfg(feature = "failpoints")]
    faults: Arc<super::redb::wal::Faults>,
}

/// What a node knows for its reads of one queue.
#[derive(Default, Clone, Copy)]
struct QueueReads {
    /// The first retained offset as of this node's latest commit or look: a trim removes
    /// whole stream entries, so the entry holding the first offset may still hold events
    /// before it, which reads skip.
    first: u64,
    /// Bytes of JSON per stream entry in the latest read (0 before any), to size the next.
    entry_bytes: usize,
}

impl RedisStore {
    /// The queue's first retained offset is `first` (from its newest record seen).
    fn set_first(&self, qid: u64, first: u64) {
        self.update_reads(qid, |r| r.first = first);
    }

    fn update_reads(&self, qid: u64, update: impl FnOnce(&mut QueueReads)) {
        update(
            self.reads
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .entry(qid)
                .or_default(),
        );
    }

    fn forget_reads(&self, qid: u64) {
        self.reads
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&qid);
    }

    /// Connects and loads every queue's record.
    ///
    /// # Errors
    ///
    /// A storage error when Redis cannot be reached.
    pub(crate) fn open(target: &Target) -> Result<(RedisStore, Recovered)> {
        let shown = shown(&target.url);
        if target.prefix.contains(['{', '}']) {
            return Err(Error::storage(format!(
                "redis at {shown}: the key prefix must not contain '{{' or '}}'"
            )));
        }
        let backend = Backend::open(&target.url)
            .map_err(|e| Error::storage(format!("redis at {shown}: {e}")))?;
        let node = format!("{:016x}{:016x}", rand_u64(), rand_u64());
        let direct = match &backend {
            Backend::Single(client) => xrange::Target::of(client).map(Direct::Single),
            Backend::Cluster(cluster) => (cluster.template.scheme == "redis")
                .then(|| Direct::Cluster(cluster.template.clone())),
        };
        let mut store = RedisStore {
            backend,
            shown,
            prefix: target.prefix.clone(),
            pool: Mutex::new(Vec::new()),
            direct,
            readers: Mutex::new(HashMap::new()),
            wait_replicas: target.wait_replicas,
            wait_timeout: target.wait_timeout,
            waitaof: AtomicBool::new(true),
            masters: RwLock::new(Vec::new()),
            tags: RwLock::new(HashMap::new()),
            id_key: IdKey::random(),
            tweaks: RwLock::new(HashMap::new()),
            revs: Mutex::new(HashMap::new()),
            reads: RwLock::new(HashMap::new()),
            node,
            stop: Arc::new(AtomicBool::new(false)),
            feed: Mutex::new(None),
            closed: AtomicBool::new(false),
            script: redis::Script::new(COMMIT),
            #[cfg(feature = "failpoints")]
            faults: Arc::default(),
        };
        store.warn_unless_persistent();
        store.id_key = store.shared_id_key()?;
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
            None => self
                .backend
                .connect()
                .map_err(|e| self.err("connecting", e))?,
        };
        Ok(Conn {
            store: self,
            conn: Some(conn),
        })
    }

    /// The connection a read of queue `tag`'s events goes through, and whether it was idle
    /// in the pool: a connection of the store's own reader to the server (in a cluster: to
    /// the master of the queue's slot, as the store last learnt it), else the crate's.
    fn read_source(&self, tag: &str) -> Result<(Source<'_>, bool)> {
        let server = match &self.direct {
            None => None,
            Some(Direct::Single(target)) => Some((String::new(), Some(target.clone()))),
            Some(Direct::Cluster(template)) => {
                let slot = slot_of(tag);
                let masters = self.masters.read().unwrap_or_else(|p| p.into_inner());
                masters
                    .iter()
                    .find(|(r, _, _)| r.contains(&slot))
                    .map(|(_, host, port)| {
                        let target = template
                            .client(host, *port)
                            .ok()
                            .and_then(|c| xrange::Target::of(&c));
                        (format!("{host}:{port}"), target)
                    })
            }
        };
        let Some((addr, Some(target))) = server else {
            return Ok((Source::Crate(self.conn()?), false));
        };
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::ShuttingDown);
        }
        let pooled = self
            .readers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(&addr)
            .and_then(Vec::pop);
        let idle = pooled.is_some();
        let reader = match pooled {
            Some(r) => r,
            None => match target.connect(CONNECT_TIMEOUT, IO_TIMEOUT) {
                Ok(r) => r,
                // The master as last learnt is gone (a failover?): the crate's cluster
                // connection finds the slot's owner.
                Err(_) if !addr.is_empty() => {
                    return Ok((Source::Crate(self.relearn_masters()?), false));
                }
                Err(e) => return Err(self.read_error("connecting", e)),
            },
        };
        Ok((
            Source::Direct {
                addr,
                target,
                reader,
            },
            idle,
        ))
    }

    /// A crate connection after relearning a cluster's masters (for the next reads: the
    /// ones the store knew failed it), to read through while the store's own reader cannot.
    fn relearn_masters(&self) -> Result<Conn<'_>> {
        let mut c = self.conn()?;
        if let Err(e) = self.refresh_masters(&mut c) {
            tracing::debug!(error = %e, "relearning the cluster's masters");
        }
        Ok(c)
    }

    /// Returns a read's connection to its pool (a crate connection returns on drop).
    fn give_back(&self, source: Source<'_>) {
        if let Source::Direct { addr, reader, .. } = source
            && !self.closed.load(Ordering::Acquire)
        {
            self.readers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(addr)
                .or_default()
                .push(reader);
        }
    }

    /// A failure of the replays' own reader, as [`redis_error`] words the crate's.
    fn read_error(&self, context: &str, e: xrange::ReadError) -> Error {
        let (kind, source) = match e {
            xrange::ReadError::Io(e) => {
                let kind = match e.kind() {
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                        std::io::ErrorKind::TimedOut
                    }
                    std::io::ErrorKind::ConnectionRefused => std::io::ErrorKind::ConnectionRefused,
                    _ => std::io::ErrorKind::ConnectionReset,
                };
                (kind, e)
            }
            xrange::ReadError::Server(message) => {
                let code = message.split(' ').next().unwrap_or("");
                let kind = match code {
                    "OOM" => std::io::ErrorKind::StorageFull,
                    // Up but not serving yet: soon.
                    "LOADING" | "TRYAGAIN" | "CLUSTERDOWN" | "MASTERDOWN" => {
                        std::io::ErrorKind::NotConnected
                    }
                    _ => std::io::ErrorKind::Other,
                };
                (kind, std::io::Error::other(message))
            }
            xrange::ReadError::Protocol(what) => (
                std::io::ErrorKind::Other,
                std::io::Error::new(std::io::ErrorKind::InvalidData, what),
            ),
        };
        Error::Storage(StorageError::caused(
            format_args!("redis at {}: {context}", self.shown),
            kind,
            source,
        ))
    }

    /// The key of derived event ids every node uses: the one Redis holds, or (the first
    /// node to open the store) a fresh one stored there.
    fn shared_id_key(&self) -> Result<IdKey> {
        let key = format!("{}idkey", self.prefix);
        let fresh = IdKey::random().parts();
        let mut c = self.conn()?;
        let stored: String = c.run("reading the event id key", |con| {
            redis::cmd("SET")
                .arg(&key)
                .arg(format!("{:016x}{:016x}", fresh.0, fresh.1))
                .arg("NX")
                .query::<()>(con)?;
            redis::cmd("GET").arg(&key).query(con)
        })?;
        let half = |h: Option<&str>| h.and_then(|h| u64::from_str_radix(h, 16).ok());
        match (stored.len(), half(stored.get(..16)), half(stored.get(16..))) {
            (32, Some(k0), Some(k1)) => Ok(IdKey::from_parts(k0, k1)),
            _ => Err(Error::storage(format!(
                "redis at {}: corrupt event id key {key}",
                self.shown
            ))),
        }
    }

    /// Queue `qid`'s tweak of its derived ids, if this node knows its record.
    fn tweak(&self, qid: u64) -> Option<u64> {
        self.tweaks
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&qid)
            .copied()
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

    /// (In a cluster: as a seed node says; the nodes of one cluster are set up alike.)
    fn not_persistent(&self) -> Option<&'static str> {
        self.backend
            .feed_clients()
            .iter()
            .find_map(|client| connect(client).ok())
            .and_then(|mut conn| not_persistent(&mut conn))
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
        match &self.backend {
            Backend::Single(_) => self.records_single(),
            Backend::Cluster(cluster) => self.records_cluster(&cluster.template),
        }
    }

    /// A cluster's masters by slot range, as `CLUSTER SLOTS` says now (also kept for the
    /// replica waits).
    fn refresh_masters(&self, c: &mut Conn<'_>) -> Result<Vec<(Range<u16>, String, u16)>> {
        let reply: Value = c.run("reading the cluster's slots", |con| {
            redis::cmd("CLUSTER").arg("SLOTS").query(con)
        })?;
        let corrupt = || Error::storage("unexpected reply to CLUSTER SLOTS from redis");
        let Value::Array(ranges) = reply else {
            return Err(corrupt());
        };
        let mut masters = Vec::new();
        for range in ranges {
            let Value::Array(parts) = range else {
                return Err(corrupt());
            };
            let (Some(Value::Int(start)), Some(Value::Int(end)), Some(Value::Array(master))) =
                (parts.first(), parts.get(1), parts.get(2))
            else {
                return Err(corrupt());
            };
            let (Some(host), Some(Value::Int(port))) =
                (master.first().and_then(text), master.get(1))
            else {
                return Err(corrupt());
            };
            let (Ok(start), Ok(end), Ok(port)) = (
                u16::try_from(*start),
                u16::try_from(*end + 1),
                u16::try_from(*port),
            ) else {
                return Err(corrupt());
            };
            masters.push((start..end, host, port));
        }
        *self.masters.write().unwrap_or_else(|p| p.into_inner()) = masters.clone();
        Ok(masters)
    }

    /// Every queue of a cluster: each master's queue records, found by `SCAN` in pages (no
    /// index key spans the cluster's slots).
    fn records_cluster(&self, template: &NodeTemplate) -> Result<Vec<RemoteQueue>> {
        let mut c = self.conn()?;
        let mut addrs: Vec<(String, u16)> = self
            .refresh_masters(&mut c)?
            .into_iter()
            .map(|(_, host, port)| (host, port))
            .collect();
        drop(c);
        addrs.sort();
        addrs.dedup();
        let qkeys = format!("{}q:", self.prefix);
        let pattern = format!("{}*", glob_escape(&qkeys));
        let mut queues = Vec::new();
        for (host, port) in addrs {
            let at = format!("{host}:{port}");
            let mut con = template
                .client(&host, port)
                .and_then(|client| connect(&client))
                .map_err(|e| self.err(&format!("connecting to cluster master {at}"), e))?;
            let mut cursor: u64 = 0;
            loop {
                let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(1000)
                    .arg("TYPE")
                    .arg("hash")
                    .query(&mut con)
                    .map_err(|e| self.err(&format!("listing queues on {at}"), e))?;
                if !keys.is_empty() {
                    let mut pipe = redis::pipe();
                    for key in &keys {
                        pipe.cmd("HGETALL").arg(key);
                    }
                    let records: Vec<HashMap<String, String>> = pipe
                        .query(&mut con)
                        .map_err(|e| self.err(&format!("loading queues on {at}"), e))?;
                    for (key, fields) in keys.iter().zip(records) {
                        let Some((tenant, task)) = key
                            .strip_prefix(qkeys.as_str())
                            .and_then(|k| k.strip_prefix('{')?.strip_suffix('}'))
                            .and_then(|tag| tag.split_once('/'))
                        else {
                            continue;
                        };
                        if fields.is_empty() || !fields.contains_key("kind") {
                            continue;
                        }
                        let (record, rev) = parse_record(0, &fields)?;
                        queues.push(RemoteQueue {
                            tenant: tenant.to_string(),
                            task: task.to_string(),
                            rev,
                            record: Some(record),
                        });
                    }
                }
                cursor = next;
                if cursor == 0 {
                    break;
                }
            }
        }
        Ok(queues)
    }

    /// Every queue of one server, from the tenant index the batch script keeps there.
    fn records_single(&self) -> Result<Vec<RemoteQueue>> {
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
    fn start_feed(&self, tx: std::sync::mpsc::SyncSender<Notice>) -> Result<()> {
        let clients = self.backend.feed_clients();
        let channel = format!("{}notices", self.prefix);
        let node = self.node.clone();
        let stop = self.stop.clone();
        let shown = self.shown.clone();
        let handle = std::thread::Builder::new()
            .name("eventqueue-notices".into())
            .spawn(move || {
                let mut attempt = 0usize;
                while !stop.load(Ordering::Acquire) {
                    // The next server to try (a cluster's seed nodes in turn).
                    let Some(client) = clients.get(attempt % clients.len().max(1)) else {
                        return;
                    };
                    attempt = attempt.wrapping_add(1);
                    let mut con = match connect(client) {
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
        Ok(())
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

/// `s` with the glob characters of `SCAN … MATCH` escaped.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        if matches!(ch, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(ch);
    }
    out
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

/// The connection a read goes through.
enum Source<'s> {
    /// The replays' own reader ([`xrange`]) to the server at `addr` (its pool's key).
    Direct {
        addr: String,
        target: xrange::Target,
        reader: xrange::Reader<xrange::Stream>,
    },
    /// The redis crate's.
    Crate(Conn<'s>),
}

/// How the store's own reader reaches the servers (see [`RedisStore::read_source`]).
enum Direct {
    /// The one server.
    Single(xrange::Target),
    /// A cluster's nodes, by the addresses `CLUSTER SLOTS` gives.
    Cluster(NodeTemplate),
}

/// A pooled connection: back to the pool when dropped after success, discarded after an
/// error (its state is unknown).
struct Conn<'s> {
    store: &'s RedisStore,
    conn: Option<Connection>,
}

impl Conn<'_> {
    fn run<T>(
        &mut self,
        context: &str,
        f: impl FnOnce(&mut Connection) -> redis::RedisResult<T>,
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
    // The script encodes `[node, …]` with the node's id (hex digits, nothing to escape)
    // first: this node's own notices, the most frequent ones on a node that writes, are
    // skipped without being parsed.
    if payload
        .strip_prefix(b"[\"")
        .and_then(|rest| rest.strip_prefix(own.as_bytes()))
        .is_some_and(|rest| rest.starts_with(b"\","))
    {
        return None;
    }
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

/// The record of offset `at` in the reply to `XRANGE key 0-(at+1) + COUNT 1` (the entry
/// holding `at`, if any is stored); `None` when the offset is not stored.
fn record_at(v: Value, at: u64) -> Result<Option<Vec<u8>>> {
    let Value::Array(mut entries) = v else {
        return Err(xrange_corrupt());
    };
    let Some(entry) = entries.pop() else {
        return Ok(None);
    };
    let (first, fields) = entry_of(entry)?;
    let Some(k) = at
        .checked_sub(first)
        .filter(|&k| k < (fields.len() / 2) as u64)
    else {
        return Ok(None);
    };
    match fields.into_iter().nth(2 * k as usize + 1) {
        Some(Value::BulkString(rec)) => Ok(Some(rec)),
        _ => Err(xrange_corrupt()),
    }
}

/// JSON bytes per stream entry in a read: per event taken, times records per entry seen.
fn entry_bytes(out: &[StoredEvent], records: usize, entries: usize) -> Option<usize> {
    if out.is_empty() || entries == 0 {
        return None;
    }
    let json: usize = out.iter().map(|e| e.json.len()).sum();
    Some(((json / out.len()).saturating_mul(records) / entries).max(1))
}

/// The last entry id a read of offsets below `to` asks for: the entry holding `to - 1`
/// ends at most RUN_EVENTS - 1 offsets later.
fn last_entry_id(to: u64) -> String {
    format!("0-{}", to.saturating_add(RUN_EVENTS as u64 - 1))
}

fn xrange_corrupt() -> Error {
    Error::storage("unexpected reply to XRANGE from redis")
}

/// A stream entry `[id, [field, record, …]]` of an `XRANGE` reply: the first offset its
/// records hold (it is named after the last, `0-(last+1)`), and its fields.
fn entry_of(entry: Value) -> Result<(u64, Vec<Value>)> {
    let Value::Array(mut parts) = entry else {
        return Err(xrange_corrupt());
    };
    let (Some(Value::Array(fields)), Some(id), None) = (parts.pop(), parts.pop(), parts.pop())
    else {
        return Err(xrange_corrupt());
    };
    let id = match id {
        Value::BulkString(b) => String::from_utf8(b).map_err(|_| xrange_corrupt())?,
        Value::SimpleString(s) => s,
        _ => return Err(xrange_corrupt()),
    };
    let seq: u64 = id
        .strip_prefix("0-")
        .and_then(|s| s.parse().ok())
        .ok_or_else(xrange_corrupt)?;
    let records = fields.len() / 2;
    if records == 0 || fields.len() % 2 != 0 {
        return Err(xrange_corrupt());
    }
    let first = seq.checked_sub(records as u64).ok_or_else(xrange_corrupt)?;
    Ok((first, fields))
}

/// The event id an event record holds (see [`decode_record`]).
fn record_id(rec: &[u8]) -> Option<&[u8]> {
    let (_, _, at) = decode_record(rec).ok()?;
    rec.get(HEADER..at)
}

/// The tweak of a queue's derived ids (see the module docs): from its tag and creation time,
/// which every node reads in its record, so every node derives the same ids, and a queue
/// deleted and created again (a later creation time) derives others. FNV-1a over the tag:
/// a hash that stays the same across builds, as the ids derived from it are stored.
fn id_tweak(tag: &str, created_at_us: i64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in tag.as_bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^ (created_at_us as u64).rotate_left(32)
}

/// Stream entries `[[id, [field, record, …]], …]` (a run of events each, see `commit.lua`) as
/// the events of offsets `from..to`, appended to `out` until it holds `limit` or their JSON
/// (counted in `copied`, across calls) would exceed `max_bytes` (`out` keeps at least one).
fn parse_entries(
    v: Value,
    (from, to): (u64, u64),
    (limit, max_bytes): (usize, usize),
    copied: &mut usize,
    out: &mut Vec<StoredEvent>,
) -> Result<xrange::Chunk> {
    let Value::Array(entries) = v else {
        return Err(xrange_corrupt());
    };
    let mut chunk = xrange::Chunk {
        entries: entries.len(),
        records: 0,
        full: false,
    };
    // Once the read is done, the entries left only count their records.
    let mut done = false;
    for entry in entries {
        let (first, fields) = entry_of(entry)?;
        chunk.records += fields.len() / 2;
        if done {
            continue;
        }
        for (offset, rec) in (first..).zip(fields.into_iter().skip(1).step_by(2)) {
            let Value::BulkString(rec) = rec else {
                return Err(xrange_corrupt());
            };
            if offset < from {
                continue;
            }
            if offset >= to || out.len() >= limit {
                done = true;
                break;
            }
            let (event_type, terminal, at) = decode_record(&rec)?;
            *copied += rec.len() - at;
            if *copied > max_bytes && !out.is_empty() {
                chunk.full = true;
                done = true;
                break;
            }
            out.push(StoredEvent {
                offset,
                event_type,
                terminal,
                json: Bytes::from(rec).slice(at..),
            });
        }
    }
    Ok(chunk)
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
            tweaks: HashMap::new(),
            removed: Vec::new(),
            ids: HashMap::new(),
            checkpoints: BatchCheckpoints::default(),
            found: Vec::new(),
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
        let known = self
            .reads
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&qid)
            .copied()
            .unwrap_or_default();
        // Not the events before the queue's first that share its first's entry: trimmed.
        let from = from.max(known.first);
        if from >= to || limit == 0 {
            return Ok(out);
        }
        let key = self.key("e", &tag);
        // A pooled connection may have broken while it was idle (Redis restarted): its
        // first failure is retried once on a new connection, as a read can be. In a cluster,
        // a node that fails the store's own reader is left to the crate (below).
        let (mut source, mut idle) = self.read_source(&tag)?;
        // Ask Redis for about as many entries as `max_bytes` holds at the size this queue's
        // entries had in earlier reads (not `limit`: most of those would be sent only to be
        // dropped; before any, as if each were a full run), and go on from the last event
        // while the read is short of its bounds: the result is the same as one read of
        // `limit` events cut at `max_bytes`. Every entry asked for holds an offset still
        // wanted (`XRANGE` from the entry holding `next`, up to the last that can hold
        // `to - 1`: an entry holds at most RUN_EVENTS), so a read never asks for more
        // entries than offsets it wants.
        // Entries read, and the records they held (some skipped: below `from`, or past the read).
        let (mut copied, mut next, mut entries, mut records) = (0usize, from, 0usize, 0usize);
        let mut size = match known.entry_bytes {
            0 => RUN_BYTES,
            bytes => bytes,
        };
        loop {
            let wanted = usize::try_from(to - next).unwrap_or(usize::MAX);
            let count = (max_bytes.saturating_sub(copied) / size.max(1))
                .saturating_add(2)
                .clamp(1, (limit - out.len()).min(wanted).max(1));
            let taken = out.len();
            let chunk = match &mut source {
                Source::Direct {
                    addr,
                    target,
                    reader,
                } => {
                    let chunk = reader.xrange(
                        &key,
                        (next, to),
                        count,
                        size,
                        limit,
                        max_bytes,
                        &mut copied,
                        &mut out,
                    );
                    match chunk {
                        Ok(chunk) => {
                            idle = false;
                            chunk
                        }
                        Err(e) if e.breaks_connection() && idle && addr.is_empty() => {
                            idle = false;
                            *reader = target
                                .connect(CONNECT_TIMEOUT, IO_TIMEOUT)
                                .map_err(|e| self.read_error("connecting", e))?;
                            continue;
                        }
                        Err(e @ (xrange::ReadError::Io(_) | xrange::ReadError::Protocol(_)))
                            if !addr.is_empty() =>
                        {
                            // In a cluster: the master as last learnt is gone or failing (a
                            // failover?); the crate's cluster connection finds the slot's
                            // owner, and the next reads use the masters relearnt.
                            tracing::debug!(error = ?e, "reading from a cluster node");
                            source = Source::Crate(self.relearn_masters()?);
                            continue;
                        }
                        Err(xrange::ReadError::Server(m))
                            if m.starts_with("MOVED ") || m.starts_with("ASK ") =>
                        {
                            // The slot moved (or is moving) since the store learnt the
                            // cluster's masters: relearn them for the next reads, and read
                            // this one through the crate, which follows the redirection.
                            let c = self.relearn_masters()?;
                            self.give_back(std::mem::replace(&mut source, Source::Crate(c)));
                            continue;
                        }
                        Err(e) => {
                            if !e.breaks_connection() {
                                self.give_back(source);
                            }
                            return Err(self.read_error("reading events", e));
                        }
                    }
                }
                Source::Crate(c) => {
                    // From the entry holding offset `next` (named after its last offset).
                    let v: Value = c.run("reading events", |con| {
                        redis::cmd("XRANGE")
                            .arg(&key)
                            .arg(format!("0-{}", next + 1))
                            .arg(last_entry_id(to))
                            .arg("COUNT")
                            .arg(count)
                            .query(con)
                    })?;
                    parse_entries(v, (next, to), (limit, max_bytes), &mut copied, &mut out)?
                }
            };
            entries += chunk.entries;
            records += chunk.records;
            let Some(last) = out.last() else { break };
            next = last.offset + 1;
            // No event taken: what is left of the range is gone (trimmed meanwhile, or the
            // queue removed), or lies past `to`.
            if chunk.full
                || chunk.entries < count
                || out.len() >= limit
                || next >= to
                || out.len() == taken
            {
                break;
            }
            size = entry_bytes(&out, records, entries).unwrap_or(size);
        }
        self.give_back(source);
        if let Some(bytes) = entry_bytes(&out, records, entries) {
            self.update_reads(qid, |r| r.entry_bytes = bytes);
        }
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
        // In a cluster the index is written apart from the checkpoint (another slot): an
        // entry of a save that failed names a checkpoint with another id, or none.
        Ok(self
            .checkpoint_at(&mut c, tenant, &workflow, seq)?
            .filter(|cp| cp.record.checkpoint_id == checkpoint_id))
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
        self.readers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    fn notices(&self, to: std::sync::mpsc::SyncSender<Notice>) -> bool {
        match self.start_feed(to) {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(error = %e, "cannot follow other nodes' writes");
                false
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
        let tag = self
            .tags
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .entry(qid)
            .or_insert_with(|| Arc::from(format!("{}/{}", queue.tenant, queue.task)))
            .clone();
        let mut revs = self.revs.lock().unwrap_or_else(|p| p.into_inner());
        let rev = revs.entry(qid).or_insert(queue.rev);
        if *rev <= queue.rev
            && let Some(record) = &queue.record
        {
            self.tweaks
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .insert(qid, id_tweak(&tag, record.created_at_us));
            self.set_first(qid, record.first_offset);
        }
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
        self.tweaks
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&qid);
        self.revs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&qid);
        self.forget_reads(qid);
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
    /// Tweaks of the derived ids of queues this batch creates (see [`id_tweak`]).
    tweaks: HashMap<u64, u64>,
    removed: Vec<u64>,
    /// Ids appended by this batch: `(qid, id)` → offset.
    ids: HashMap<(u64, Box<str>), u64>,
    checkpoints: BatchCheckpoints,
    /// Queues with an answer this batch gives from what Redis holds (an `event_id` sent
    /// again, an answer decided on a checked state), when acknowledgements wait for
    /// replicas: the batch waits for them there too, as the first answer may have been a
    /// refusal for want of them.
    found: Vec<u64>,
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

    /// The batch answers something of queue `qid` from what Redis holds: see `found`.
    fn answered_from_store(&mut self, qid: u64) {
        if self.store.wait_replicas > 0 && !self.found.contains(&qid) {
            self.found.push(qid);
        }
    }

    /// The batch's checks and operations by cluster slot (each slot's own script), with a
    /// key of the slot to route the script by.
    fn groups(&self) -> Result<Vec<Group<'_>>> {
        let missing = |qid| Error::internal(format!("queue {qid} has no redis key"));
        let mut groups: std::collections::BTreeMap<u16, Group<'_>> = Default::default();
        fn group<'g, 'b>(
            groups: &'g mut std::collections::BTreeMap<u16, Group<'b>>,
            key: impl FnOnce() -> String,
            tag: &str,
        ) -> &'g mut Group<'b> {
            let slot = slot_of(tag);
            groups.entry(slot).or_insert_with(|| Group {
                slot,
                key: key(),
                checks: Vec::new(),
                ops: Vec::new(),
            })
        }
        for &qid in &self.checks {
            let tag = self.tag(qid).ok_or_else(|| missing(qid))?;
            group(&mut groups, || self.store.key("q", &tag), &tag)
                .checks
                .push(qid);
        }
        for op in &self.ops {
            match op {
                Staged::Add { qid, .. }
                | Staged::Trim { qid, .. }
                | Staged::Put { qid, .. }
                | Staged::Remove { qid, .. } => {
                    let tag = self.tag(*qid).ok_or_else(|| missing(*qid))?;
                    group(&mut groups, || self.store.key("q", &tag), &tag)
                        .ops
                        .push(op);
                }
                Staged::Checkpoint {
                    tenant, workflow, ..
                } => {
                    let tag = format!("{tenant}/{workflow}");
                    group(&mut groups, || self.store.key("c", &tag), &tag)
                        .ops
                        .push(op);
                }
            }
        }
        Ok(groups.into_values().collect())
    }

    /// The script's arguments for `checks` and `ops` in `mode` (see the script's header),
    /// and the queue ids of the tags it checks.
    fn arguments(&self, mode: &str, checks: &[u64], ops: &[&Staged]) -> Result<Arguments> {
        let mut by_tag = HashMap::new();
        let mut args: Vec<Vec<u8>> = vec![
            mode.as_bytes().to_vec(),
            self.store.prefix.clone().into_bytes(),
            self.store.node.clone().into_bytes(),
            checks.len().to_string().into_bytes(),
        ];
        let missing = |qid| Error::internal(format!("queue {qid} has no redis key"));
        {
            let revs = self.store.revs.lock().unwrap_or_else(|p| p.into_inner());
            for qid in checks {
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
        let saves: Vec<&Staged> = ops
            .iter()
            .copied()
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
        if mode == "claim" {
            return Ok((args, by_tag));
        }
        args.push(b"keep".to_vec());
        args.push(KEEP_CHECKPOINTS.to_string().into_bytes());
        let mut k = 0;
        while let Some(op) = ops.get(k) {
            k += 1;
            match op {
                Staged::Add { qid, offset, .. } => {
                    // A run of appends to one queue at consecutive offsets is one operation
                    // and one stream entry (see `commit.lua`): the queue's keys are named
                    // once, and each event passes only its id and record. A run ends at
                    // RUN_EVENTS events, or at the first event past RUN_BYTES.
                    let mut bytes = 0usize;
                    let run = ops[k - 1..]
                        .iter()
                        .zip(*offset..)
                        .take(RUN_EVENTS)
                        .take_while(|(op, o)| match op {
                            Staged::Add {
                                qid: q,
                                offset: at,
                                record,
                                ..
                            } if q == qid && at == o && bytes < RUN_BYTES => {
                                bytes += record.len();
                                true
                            }
                            _ => false,
                        })
                        .count();
                    let tag = self.tag(*qid).ok_or_else(|| missing(*qid))?;
                    args.push(b"add".to_vec());
                    args.push(tag.as_bytes().to_vec());
                    args.push((offset + 1).to_string().into_bytes());
                    args.push(run.to_string().into_bytes());
                    for op in &ops[k - 1..k - 1 + run] {
                        if let Staged::Add { id, record, .. } = op {
                            args.push(id.as_deref().unwrap_or("").as_bytes().to_vec());
                            args.push(record.to_vec());
                        }
                    }
                    k += run - 1;
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
        Ok((args, by_tag))
    }

    /// Runs the batch script with `args`, routed (in a cluster) by `key`.
    fn invoke(&mut self, key: &str, args: &[Vec<u8>]) -> Result<Value, WriteError> {
        let mut invocation = self.store.script.prepare_invoke();
        invocation.key(key);
        for a in args {
            invocation.arg(a.as_slice());
        }
        // A lost connection leaves the outcome unknown (the next batch of these queues meets
        // their new revision if the script ran); a refusal before the first write (OOM) left
        // nothing. Any other error of a script may have stopped it halfway: stop writing.
        self.conn
            .run("storing a batch", |con| invocation.invoke(con))
            .map_err(|e| match &e {
                Error::Storage(se) if se.is_unavailable() || se.is_storage_full() => {
                    WriteError::Rejected(e)
                }
                _ => WriteError::Fatal(e),
            })
    }

    /// The batch script once per `(key, args)`, in one cluster pipeline (`EVALSHA`; should
    /// a node not have the script yet, one by one, loading it); the replies in order.
    fn pipelined(&mut self, calls: &[(&str, &[Vec<u8>])]) -> Result<Vec<Value>, WriteError> {
        let hash = self.store.script.get_hash().to_string();
        let mut pipe = redis::cluster::cluster_pipe();
        for (key, args) in calls {
            let cmd = pipe.cmd("EVALSHA").arg(&hash).arg(1).arg(*key);
            for a in *args {
                cmd.arg(a.as_slice());
            }
        }
        let piped: Result<Vec<Value>> = self.conn.run("storing a batch", |con| match con {
            Connection::Cluster(c) => pipe.query(c),
            Connection::Single(_) => Err(redis::RedisError::from((
                redis::ErrorKind::Client,
                "a cluster pipeline on a single server",
            ))),
        });
        match piped {
            Ok(replies) if replies.len() == calls.len() => Ok(replies),
            Ok(_) => Err(WriteError::Fatal(Error::storage(
                "unexpected reply from the batch script",
            ))),
            Err(Error::Storage(se))
                if se.to_string().contains("NOSCRIPT") || se.to_string().contains("NoScript") =>
            {
                calls
                    .iter()
                    .map(|(key, args)| self.invoke(key, args))
                    .collect()
            }
            Err(e) => Err(match &e {
                Error::Storage(se) if se.is_unavailable() || se.is_storage_full() => {
                    WriteError::Rejected(e)
                }
                _ => WriteError::Fatal(e),
            }),
        }
    }

    /// In a cluster, before the scripts: points the tenant's checkpoint id index (a key of
    /// another slot) at each checkpoint the batch saves. An entry whose save then fails is
    /// harmless: lookups check that the checkpoint found holds the id.
    fn index_checkpoint_ids(&mut self) -> Result<()> {
        let entries: Vec<(String, String, String)> = self
            .ops
            .iter()
            .filter_map(|op| match op {
                Staged::Checkpoint {
                    tenant,
                    workflow,
                    seq,
                    id,
                    ..
                } => Some((
                    self.store.key("ci", tenant),
                    id.clone(),
                    format!("{workflow}/{seq}"),
                )),
                _ => None,
            })
            .collect();
        for (ci, id, at) in entries {
            self.conn.run("indexing a checkpoint id", |con| {
                redis::cmd("HSET")
                    .arg(&ci)
                    .arg(&id)
                    .arg(&at)
                    .query::<()>(con)
            })?;
        }
        Ok(())
    }

    /// Waits until the configured number of replicas have what this batch wrote (on every
    /// master it wrote to); an unavailable-storage error when fewer do in time.
    ///
    /// In a cluster, a wait that fails at a master as last learnt (gone, or a replica now: a
    /// failover) is made again, once, at the masters learnt anew — after writing the
    /// revision of every queue in `stored` (tag, revision the batch stored; "" for any) again
    /// there, unchanged: the new master must hold the batch (else the error stands: the
    /// batch may be lost), and the wait on this connection then counts from a write after it.
    fn wait_for_replicas(&mut self, slots: &[u16], stored: &[(String, String)]) -> Result<()> {
        let want = self.store.wait_replicas;
        if want == 0 {
            return Ok(());
        }
        let timeout_ms = u64::try_from(self.store.wait_timeout.as_millis()).unwrap_or(u64::MAX);
        let mut relearnt = false;
        'targets: loop {
            for routing in self.wait_targets(slots) {
                let reached = match self.wait_on(routing.as_ref(), want, timeout_ms) {
                    Ok(n) => n,
                    // In a cluster, the master as last learnt may be gone or a replica now (a
                    // failover): learn the masters again and wait at the new ones, once.
                    Err(e) if routing.is_some() && !relearnt => {
                        tracing::debug!(error = %e, "waiting for replicas; relearning the masters");
                        relearnt = true;
                        let mut c = self.store.conn()?;
                        if self.store.refresh_masters(&mut c).is_err() {
                            return Err(e);
                        }
                        drop(c);
                        for (tag, rev) in stored {
                            if !self.rewrite_revision(tag, rev)? {
                                return Err(e);
                            }
                        }
                        continue 'targets;
                    }
                    Err(e) => return Err(e),
                };
                if reached < i64::from(want) {
                    return Err(Error::Storage(StorageError::io(
                        format_args!(
                            "redis at {}: {reached} of {want} replicas confirmed the batch \
                             within {timeout_ms} ms (--redis-wait-replicas); it is on the \
                             primary but may not survive a failover",
                            self.store.shown
                        ),
                        std::io::Error::from(std::io::ErrorKind::TimedOut),
                    )));
                }
            }
            return Ok(());
        }
    }

    /// Waits until the configured number of replicas have the stored events this batch
    /// answers from (see `found`), beyond the slots `waited` its own writes waited on. A
    /// replica wait counts from the connection's last write, which may be older than the
    /// event (written by another connection, or by this node for an answer it then refused
    /// for want of replicas): each such queue's revision is first written again, unchanged
    /// (atomically, in a script), on this batch's connection; on one server a batch that
    /// waited for its own writes covers them already.
    fn wait_for_found(&mut self, waited: &[u16]) -> Result<()> {
        if self.found.is_empty() {
            return Ok(());
        }
        let single = matches!(self.store.backend, Backend::Single(_));
        if single && !waited.is_empty() {
            return Ok(());
        }
        let mut slots = Vec::new();
        let mut touched = Vec::new();
        for qid in std::mem::take(&mut self.found) {
            let Some(tag) = self.tag(qid) else { continue };
            let slot = slot_of(&tag);
            if waited.contains(&slot) || slots.contains(&slot) {
                continue;
            }
            if !self.rewrite_revision(&tag, "")? {
                return Err(Error::storage(format!(
                    "redis at {}: a queue was removed while the batch confirmed its events",
                    self.store.shown
                )));
            }
            slots.push(slot);
            touched.push((tag.to_string(), String::new()));
            if single {
                break;
            }
        }
        self.wait_for_replicas(&slots, &touched)
    }

    /// [`REWRITE_REVISION`] of queue `tag` on this batch's connection: whether the queue's
    /// revision was `rev` (any, when empty) and is written again.
    fn rewrite_revision(&mut self, tag: &str, rev: &str) -> Result<bool> {
        let key = self.store.key("q", tag);
        let done: i64 = self.conn.run("confirming a stored batch", |con| {
            REWRITE_REVISION.key(&key).arg(rev).invoke(con)
        })?;
        Ok(done == 1)
    }

    /// Where the replica waits of a batch over `slots` go: the one server (`None`), or each
    /// master the batch wrote to, once (by the masters as last learnt; by slot for a slot none
    /// of them serves).
    fn wait_targets(&self, slots: &[u16]) -> Vec<Option<redis::cluster_routing::RoutingInfo>> {
        use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
        if let Backend::Single(_) = &self.store.backend {
            return vec![None];
        }
        let masters = self.store.masters.read().unwrap_or_else(|p| p.into_inner());
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for &slot in slots {
            let routing = match masters.iter().find(|(r, _, _)| r.contains(&slot)) {
                Some((_, host, port)) if seen.insert((host.clone(), *port)) => {
                    SingleNodeRoutingInfo::ByAddress {
                        host: host.clone(),
                        port: *port,
                    }
                }
                Some(_) => continue,
                None => SingleNodeRoutingInfo::SpecificNode(Route::new(slot, SlotAddr::Master)),
            };
            out.push(Some(RoutingInfo::SingleNode(routing)));
        }
        out
    }

    /// `WAITAOF 0 N timeout` (Redis ≥ 7.2: replicas that wrote the batch to their AOF), else
    /// `WAIT N timeout` (replicas that received it), on the connection that wrote the batch;
    /// the number of replicas that confirmed.
    fn wait_on(
        &mut self,
        routing: Option<&redis::cluster_routing::RoutingInfo>,
        want: u32,
        timeout_ms: u64,
    ) -> Result<i64> {
        let run = |con: &mut Connection, cmd: &redis::Cmd| -> redis::RedisResult<Value> {
            let v = match (con, routing) {
                (Connection::Cluster(c), Some(r)) => c.route_command(cmd, r.clone())?,
                (con, _) => cmd.query(con)?,
            };
            match v {
                Value::ServerError(e) => Err(e.into()),
                v => Ok(v),
            }
        };
        if self.store.waitaof.load(Ordering::Relaxed) {
            let mut cmd = redis::cmd("WAITAOF");
            cmd.arg(0).arg(want).arg(timeout_ms);
            match self.conn.run("waiting for replicas", |con| run(con, &cmd)) {
                Ok(Value::Array(counts)) => {
                    return match counts.get(1) {
                        Some(Value::Int(n)) => Ok(*n),
                        _ => Err(Error::storage("unexpected reply to WAITAOF from redis")),
                    };
                }
                Ok(_) => return Err(Error::storage("unexpected reply to WAITAOF from redis")),
                Err(e)
                    if e.to_string()
                        .to_ascii_lowercase()
                        .contains("unknown command") =>
                {
                    // Before Redis 7.2: WAIT.
                    self.store.waitaof.store(false, Ordering::Relaxed);
                }
                Err(e) => return Err(e),
            }
        }
        let mut cmd = redis::cmd("WAIT");
        cmd.arg(want).arg(timeout_ms);
        match self
            .conn
            .run("waiting for replicas", |con| run(con, &cmd))?
        {
            Value::Int(n) => Ok(n),
            _ => Err(Error::storage("unexpected reply to WAIT from redis")),
        }
    }
}

/// What the scripts of a batch stored: each one's `(tag, revision)` pairs (see [`Reply`]), with
/// the queue ids of its tags.
type Stored<'a> = Vec<(Vec<(String, String)>, &'a HashMap<Arc<str>, u64>)>;

/// The part of a batch in one cluster slot.
struct Group<'b> {
    slot: u16,
    /// A key of the slot (the script is routed by it).
    key: String,
    checks: Vec<u64>,
    ops: Vec<&'b Staged>,
}

/// What one script answered.
enum Reply {
    /// Stored: `(tag, revision)` of each queue stored, and checkpoint ids to drop from a
    /// tenant's index (`ci:T`, id).
    Stored(Vec<(String, String)>),
    /// Nothing stored: these queues are newer (their records taken in already).
    Stale(Vec<Fresh>),
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
    fn derived_id(&self, qid: u64, offset: u64) -> Option<[u8; DERIVED_LEN]> {
        // Known once the queue's record is stored: a queue this batch creates has none yet.
        let tweak = self.store.tweak(qid)?;
        self.store.id_key.derive(tweak, offset)
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
        // The one offset whose derived id `event_id` can be: the event there holds the id
        // if it was derived (not indexed).
        let mut derived = self
            .store
            .tweak(qid)
            .and_then(|tweak| self.store.id_key.offset_of(tweak, event_id))
            .filter(|at| retained.contains(at));
        if let Some(at) = derived {
            let staged = self.ops.iter().rev().find_map(|op| match op {
                Staged::Add {
                    qid: q,
                    offset,
                    record,
                    ..
                } if *q == qid && *offset == at => Some(record),
                _ => None,
            });
            if let Some(record) = staged {
                if record_id(record) == Some(event_id.as_bytes()) {
                    return Ok(Some(at));
                }
                derived = None;
            }
        }
        let Some(tag) = self.store.tag(qid) else {
            return Ok(None);
        };
        let index = self.store.key("i", &tag);
        let (indexed, stored) = match derived {
            None => {
                let at: Option<u64> = self.conn.run("looking up an event id", |con| {
                    redis::cmd("HGET").arg(&index).arg(event_id).query(con)
                })?;
                (at, None)
            }
            // Both in one round trip; the entry holding `at` is the first named after `at`
            // or a later offset.
            Some(at) => {
                let entry = format!("0-{}", at + 1);
                let events = self.store.key("e", &tag);
                let (indexed, stored): (Option<u64>, Value) =
                    self.conn.run("looking up an event id", |con| {
                        redis::pipe()
                            .cmd("HGET")
                            .arg(&index)
                            .arg(event_id)
                            .cmd("XRANGE")
                            .arg(&events)
                            .arg(&entry)
                            .arg("+")
                            .arg("COUNT")
                            .arg(1)
                            .query(con)
                    })?;
                (indexed, Some((at, stored)))
            }
        };
        let found = match indexed.filter(|at| retained.contains(at)) {
            Some(at) => Some(at),
            None => match stored {
                None => None,
                Some((at, stored)) => (record_at(stored, at)?.as_deref().and_then(record_id)
                    == Some(event_id.as_bytes()))
                .then_some(at),
            },
        };
        if found.is_some() {
            self.answered_from_store(qid);
        }
        Ok(found)
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
            let tag = self
                .tags
                .entry(qid)
                .or_insert_with(|| Arc::from(format!("{tenant}/{task}")));
            let tweak = id_tweak(tag, record.created_at_us);
            self.tweaks.insert(qid, tweak);
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
        let (store, conn) = (self.store, &mut self.conn);
        self.checkpoints.taken(tenant, checkpoint_id, || {
            if !matches!(store.backend, Backend::Cluster(_)) {
                return conn.run("looking up a checkpoint id", |con| {
                    redis::cmd("HEXISTS").arg(&ci).arg(checkpoint_id).query(con)
                });
            }
            // A cluster's index may name a save that failed: taken only if it was stored.
            let at: Option<String> = conn.run("looking up a checkpoint id", |con| {
                redis::cmd("HGET").arg(&ci).arg(checkpoint_id).query(con)
            })?;
            let Some((workflow, seq)) = at.as_deref().and_then(|at| at.rsplit_once('/')) else {
                return Ok(false);
            };
            let ck = store.key("c", &format!("{tenant}/{workflow}"));
            let stored: Option<String> = conn.run("looking up a checkpoint id", |con| {
                redis::cmd("HGET")
                    .arg(&ck)
                    .arg(format!("id:{seq}"))
                    .query(con)
            })?;
            Ok(stored.as_deref() == Some(checkpoint_id))
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

    fn check(&mut self, qid: u64) {
        self.touch(qid);
        // An answer decided on what Redis holds (a Durable Streams append found to be a
        // duplicate, say) may repeat one refused for want of replicas: it waits for them too.
        self.answered_from_store(qid);
    }

    fn commit(mut self: Box<Self>) -> Result<bool, WriteError> {
        // A batch of checks alone (see `WriteBatch::check`) still runs the script: its
        // revision checks confirm the views its answers were decided on; it writes nothing,
        // and waits for replicas only as an answer from what Redis holds does (`found`).
        if self.ops.is_empty() && self.checks.is_empty() {
            // Answers from what Redis holds alone (events sent again): acknowledged once the
            // replicas have those events too.
            self.wait_for_found(&[]).map_err(WriteError::Rejected)?;
            return Ok(false);
        }
        let writes = !self.ops.is_empty();
        let cluster = matches!(self.store.backend, Backend::Cluster(_));
        let (scripts, slots) = {
            let groups = if cluster {
                self.groups().map_err(WriteError::Fatal)?
            } else {
                let tag = self
                    .checks
                    .first()
                    .and_then(|&qid| self.tag(qid))
                    .unwrap_or_else(|| Arc::from(""));
                vec![Group {
                    slot: slot_of(&tag),
                    key: self.store.key("q", &tag),
                    checks: self.checks.clone(),
                    ops: self.ops.iter().collect(),
                }]
            };
            let mode = if cluster { "cluster" } else { "single" };
            let mut scripts = Vec::with_capacity(groups.len());
            let mut slots = Vec::with_capacity(groups.len());
            for g in &groups {
                let claim = if groups.len() > 1 {
                    Some(self.arguments("claim", &g.checks, &g.ops)?.0)
                } else {
                    None
                };
                let (args, by_tag) = self.arguments(mode, &g.checks, &g.ops)?;
                scripts.push((g.key.clone(), claim, args, by_tag));
                if !g.ops.is_empty() {
                    slots.push(g.slot);
                }
            }
            (scripts, slots)
        };
        if cluster {
            self.index_checkpoint_ids().map_err(|e| match &e {
                Error::Storage(se) if se.is_unavailable() => WriteError::Rejected(e),
                _ => WriteError::Fatal(e),
            })?;
        }
        // A batch over several slots cannot be one script: first each slot's checks, which
        // claim its queues for this node if they pass (nothing is stored), then, once every
        // slot passed, each slot's writes. Other nodes' batches of the claimed queues wait
        // meanwhile, so the writes meet the state the checks saw. Each step is one pipeline
        // (a round trip per master). A claim is kept out of the AOF and the replicas (see
        // `commit.lua`): the checks write nothing durable, so they wait for no fsync; a claim
        // a failover dropped ends as one that ran out (the writes check the revisions again).
        let stored: Stored<'_> = if scripts.len() > 1 {
            let claims: Vec<(&str, &[Vec<u8>])> = scripts
                .iter()
                .filter_map(|(key, claim, _, _)| Some((key.as_str(), claim.as_deref()?)))
                .collect();
            let replies = self.pipelined(&claims).map_err(|e| match e {
                // The checks store nothing.
                WriteError::Fatal(e) => WriteError::Rejected(e),
                other => other,
            })?;
            let mut fresh = Vec::new();
            let mut claimed = Vec::new();
            for (reply, (key, _, args, by_tag)) in replies.into_iter().zip(&scripts) {
                match self.parse_reply(reply, by_tag)? {
                    Reply::Stale(f) => fresh.extend(f),
                    Reply::Stored(_) => claimed.push((key, args)),
                }
            }
            if !fresh.is_empty() {
                // Free the queues claimed, so that the node that has them next (another's
                // batch, or this one's rebuild) need not wait out the claims.
                let releases: Vec<(String, Vec<Vec<u8>>)> = claimed
                    .iter()
                    .map(|(key, args)| {
                        let mut release = args.to_vec();
                        if let Some(mode) = release.first_mut() {
                            *mode = b"release".to_vec();
                        }
                        ((*key).clone(), release)
                    })
                    .collect();
                let releases: Vec<(&str, &[Vec<u8>])> = releases
                    .iter()
                    .map(|(k, a)| (k.as_str(), a.as_slice()))
                    .collect();
                if !releases.is_empty()
                    && let Err(e) = self.pipelined(&releases)
                {
                    tracing::debug!(error = %e.error(), "claims left to run out");
                }
                return Err(WriteError::Stale(fresh));
            }
            let writes: Vec<(&str, &[Vec<u8>])> = scripts
                .iter()
                .map(|(key, _, args, _)| (key.as_str(), args.as_slice()))
                .collect();
            let replies = self.pipelined(&writes)?;
            let mut stored = Vec::new();
            let mut stale = Vec::new();
            for (reply, (_, _, _, by_tag)) in replies.into_iter().zip(&scripts) {
                match self.parse_reply(reply, by_tag)? {
                    Reply::Stored(pairs) => stored.push((pairs, by_tag)),
                    Reply::Stale(f) => stale.extend(f),
                }
            }
            if stored.is_empty() {
                return Err(WriteError::Stale(stale));
            }
            if !stale.is_empty() {
                // Some claim ran out before its writes: the other slots are stored. The
                // callers get an error, as after a lost reply; this node's next batch of
                // those queues meets their new revisions and takes them in.
                return Err(WriteError::Rejected(Error::Storage(StorageError::io(
                    format_args!(
                        "redis at {}: a batch over {} cluster slots met another node's write \
                         after its checks and was stored in part",
                        self.store.shown,
                        scripts.len()
                    ),
                    std::io::Error::from(std::io::ErrorKind::NotConnected),
                ))));
            }
            stored
        } else {
            let mut stored = Vec::new();
            for (key, _, args, by_tag) in &scripts {
                let reply = self.invoke(key, args)?;
                match self.parse_reply(reply, by_tag)? {
                    Reply::Stored(pairs) => stored.push((pairs, by_tag)),
                    Reply::Stale(fresh) => return Err(WriteError::Stale(fresh)),
                }
            }
            stored
        };
        // Stored. Acknowledged only once enough replicas have it; otherwise the callers get
        // an error and the revisions stay unknown to this node, so its next batch of these
        // queues takes in what is stored.
        // (Without a replica wait, as by default, nothing to collect for it.)
        if writes && self.store.wait_replicas > 0 {
            let revs: Vec<(String, String)> = stored
                .iter()
                .flat_map(|(pairs, _)| pairs)
                .filter(|(tag, _)| !tag.starts_with("ci:"))
                .cloned()
                .collect();
            self.wait_for_replicas(&slots, &revs)
                .map_err(WriteError::Rejected)?;
        }
        self.wait_for_found(if writes { &slots } else { &[] })
            .map_err(WriteError::Rejected)?;
        let mut dropped: Vec<(String, String)> = Vec::new();
        {
            let mut revs = self.store.revs.lock().unwrap_or_else(|p| p.into_inner());
            for (pairs, by_tag) in stored {
                for (tag, rev) in pairs {
                    if let Some(tenant) = tag.strip_prefix("ci:") {
                        dropped.push((self.store.key("ci", tenant), rev));
                    } else if let (Some(&qid), Ok(rev)) = (by_tag.get(tag.as_str()), rev.parse()) {
                        revs.insert(qid, rev);
                    }
                }
            }
            let mut tags = self.store.tags.write().unwrap_or_else(|p| p.into_inner());
            tags.extend(self.tags.drain());
            let mut tweaks = self.store.tweaks.write().unwrap_or_else(|p| p.into_inner());
            tweaks.extend(self.tweaks.drain());
            let mut reads = self.store.reads.write().unwrap_or_else(|p| p.into_inner());
            for op in &self.ops {
                if let Staged::Put { qid, record, .. } = op {
                    reads.entry(*qid).or_default().first = record.first_offset;
                }
            }
            for qid in &self.removed {
                tags.remove(qid);
                tweaks.remove(qid);
                revs.remove(qid);
                reads.remove(qid);
            }
        }
        // Index entries of checkpoints dropped beyond the kept number (a cluster keeps the
        // index apart from the checkpoints): best effort, lookups check what they find.
        for (ci, id) in dropped {
            if let Err(e) = self.conn.run("dropping a checkpoint id", |con| {
                redis::cmd("HDEL").arg(&ci).arg(&id).query::<()>(con)
            }) {
                tracing::debug!(error = %e, "a dropped checkpoint's id stays indexed");
            }
        }
        Ok(writes)
    }
}

impl RedisBatch<'_> {
    /// A script's reply: stored, or stale (the fresh records taken in at once).
    fn parse_reply(
        &self,
        reply: Value,
        by_tag: &HashMap<Arc<str>, u64>,
    ) -> Result<Reply, WriteError> {
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
                let mut pairs = Vec::with_capacity(rest.len() / 2);
                for pair in rest.chunks(2) {
                    let (Some(tag), Some(rev)) =
                        (pair.first().and_then(text), pair.get(1).and_then(text))
                    else {
                        return Err(corrupt());
                    };
                    pairs.push((tag, rev));
                }
                Ok(Reply::Stored(pairs))
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
                    let (record, rev) = if fields.is_empty() {
                        self.store
                            .revs
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .remove(&qid);
                        self.store
                            .tweaks
                            .write()
                            .unwrap_or_else(|p| p.into_inner())
                            .remove(&qid);
                        self.store.forget_reads(qid);
                        (None, 0)
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
                        // Its ids are derived as the stored record says (the queue may be
                        // another than the one this node knew by that id).
                        if let Some(tag) = self.tag(qid) {
                            self.store
                                .tweaks
                                .write()
                                .unwrap_or_else(|p| p.into_inner())
                                .insert(qid, id_tweak(&tag, record.created_at_us));
                        }
                        self.store.set_first(qid, record.first_offset);
                        (Some(record), rev)
                    };
                    fresh.push(Fresh { qid, record, rev });
                }
                Ok(Reply::Stale(fresh))
            }
            _ => Err(corrupt()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Derived ids are stored, and recognised when a producer sends one again by deriving it
    /// anew: the tweak must stay what they were derived with, across builds and versions.
    #[test]
    fn the_tweak_of_derived_ids_is_pinned_and_tells_queues_apart() {
        assert_eq!(
            id_tweak("t/k", 1_765_000_000_000_000),
            0x4018_e719_43ad_bebf
        );
        assert_ne!(id_tweak("t/k", 1), id_tweak("t/k", 2));
        assert_ne!(id_tweak("t/k", 1), id_tweak("t/j", 1));
    }

    /// An `XRANGE` reply through the Redis client (TLS, a cluster's redirections): entries of
    /// several records give each its offset; a read skips what lies outside its bounds, and
    /// the lookup of one offset finds its record.
    #[test]
    fn entries_of_several_events_read_through_the_client() {
        let rec = |o: u64| {
            let mut r = vec![1, 0, 0, 2, b'i', b'd'];
            r.extend_from_slice(format!("[{o}]").as_bytes());
            Value::BulkString(r)
        };
        let entry = |last: u64, offsets: std::ops::RangeInclusive<u64>| {
            let mut fields = Vec::new();
            for o in offsets {
                fields.push(Value::BulkString(b"r".to_vec()));
                fields.push(rec(o));
            }
            Value::Array(vec![
                Value::BulkString(format!("0-{}", last + 1).into_bytes()),
                Value::Array(fields),
            ])
        };
        let reply = || Value::Array(vec![entry(6, 3..=6), entry(7, 7..=7), entry(9, 8..=9)]);
        let read = |bounds, limit| {
            let mut out = Vec::new();
            let chunk = parse_entries(reply(), bounds, (limit, usize::MAX), &mut 0, &mut out)
                .expect("a well-formed reply");
            for e in &out {
                assert_eq!(&e.json[..], format!("[{}]", e.offset).as_bytes());
            }
            (chunk, out.iter().map(|e| e.offset).collect::<Vec<_>>())
        };
        let (chunk, got) = read((5, 9), usize::MAX);
        assert_eq!(got, [5, 6, 7, 8]);
        assert_eq!((chunk.entries, chunk.records), (3, 7));
        assert_eq!(read((0, 100), usize::MAX).1, [3, 4, 5, 6, 7, 8, 9]);
        assert_eq!(read((4, 100), 2).1, [4, 5]);
        let one = |at| {
            record_at(Value::Array(vec![entry(6, 3..=6)]), at)
                .unwrap()
                .map(|r| r[6..].to_vec())
        };
        assert_eq!(one(3), Some(b"[3]".to_vec()));
        assert_eq!(one(6), Some(b"[6]".to_vec()));
        assert_eq!(one(2), None, "before the entry: not stored");
        assert_eq!(record_at(Value::Array(vec![]), 2).unwrap(), None);
        // An entry naming fewer offsets than it holds records is corrupt.
        assert!(record_at(Value::Array(vec![entry(0, 0..=1)]), 0).is_err());
    }

    /// A notice as the batch script encodes it (`cjson`): another node's is taken in, this
    /// node's own is skipped, whatever follows its id.
    #[test]
    fn notices_of_other_nodes_are_read_and_own_ones_skipped() {
        let own = "0123456789abcdef0123456789abcdef";
        let other = "fedcba9876543210fedcba9876543210";
        let notice = |node: &str| {
            format!(
                r#"["{node}",[["put","t\/k","t","k","17","kind","2","created","5","activity","6","ttl","0","max","10","first","0","next","3","closed","0","finished","","cancelled",""],["rm","t\/j","t","j","9"]]]"#
            )
        };
        let changes = parse_notice(notice(other).as_bytes(), own).expect("another node's notice");
        assert_eq!(changes.len(), 2);
        assert_eq!((changes[0].task.as_str(), changes[0].rev), ("k", 17));
        let record = changes[0].record.as_ref().expect("a put holds the record");
        assert_eq!((record.first_offset, record.next_offset), (0, 3));
        assert_eq!((changes[1].task.as_str(), changes[1].rev), ("j", 9));
        assert!(changes[1].record.is_none());
        assert!(parse_notice(notice(own).as_bytes(), own).is_none());
        // An id that merely starts with this node's is another node's.
        let longer = format!("{own}00");
        assert!(parse_notice(notice(&longer).as_bytes(), own).is_some());
        assert!(parse_notice(b"not json", own).is_none());
    }
}
