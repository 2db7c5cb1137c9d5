//! Library configuration with documented defaults.

use std::path::PathBuf;
use std::time::Duration;

/// When an enqueue is acknowledged relative to fsync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Acknowledge after an fsync'd commit. Concurrent enqueues share commits (group commit).
    /// Default.
    Immediate,
    /// Acknowledge after a commit without fsync; a background flush makes commits durable at
    /// least every `flush_interval`. A crash (power loss, kernel panic) may lose events
    /// acknowledged within the last `flush_interval` plus one commit; a killed process loses
    /// nothing the OS already received.
    Buffered {
        /// Longest time between a commit and the fsync that makes it durable. Default 100 ms.
        flush_interval: Duration,
    },
}

impl Durability {
    /// Buffered durability with the default 100 ms flush interval.
    pub const fn buffered() -> Self {
        Durability::Buffered {
            flush_interval: Duration::from_millis(100),
        }
    }
}

/// Where a [`crate::QueueManager`] keeps its queues. Its `Debug` form hides a Redis URL's
/// password.
#[derive(Clone, PartialEq, Eq, Default)]
pub enum StorageBackend {
    /// The embedded database (redb plus a write-ahead log) in [`Config::data_dir`]. Default.
    #[default]
    Redb,
    /// Process memory: everything but restart survival, with the same bounds.
    Memory,
    /// A Redis (or Valkey) server, or a Redis Cluster.
    Redis {
        /// `redis://[:PASSWORD@]HOST:PORT[/DB]` (`rediss://` with TLS), or
        /// `redis-cluster://[:PASSWORD@]HOST:PORT[,HOST:PORT…]` (`redis-cluster+tls://` with
        /// TLS): the nodes of a Redis Cluster to learn its layout from.
        url: String,
        /// Prefix of every key this install uses (default `eq:`), so installs can share a
        /// server.
        prefix: String,
    },
}

/// The key prefix of a Redis store when the URL names none.
pub const DEFAULT_REDIS_PREFIX: &str = "eq:";

impl StorageBackend {
    /// The name `--storage` takes.
    pub fn name(&self) -> &'static str {
        match self {
            StorageBackend::Redb => "redb",
            StorageBackend::Memory => "memory",
            StorageBackend::Redis { .. } => "redis",
        }
    }

    /// Whether what is stored survives a restart of the process.
    pub fn persists(&self) -> bool {
        !matches!(self, StorageBackend::Memory)
    }

    /// Whether this is a Redis Cluster (`redis-cluster://`, `redis-cluster+tls://`).
    pub fn is_redis_cluster(&self) -> bool {
        matches!(self, StorageBackend::Redis { url, .. } if url.starts_with("redis-cluster"))
    }

    /// A Redis store at `url`; a `prefix=` query parameter sets the key prefix (removed from
    /// the URL the client is given). The prefix may not hold `{` or `}`: Redis Cluster takes
    /// a key's first `{…}` as its hash tag, which must be the queue's (see docs/storage.md).
    fn redis(url: &str) -> std::result::Result<Self, String> {
        let (base, query) = match url.split_once('?') {
            Some((b, q)) => (b, q),
            None => (url, ""),
        };
        let mut prefix = DEFAULT_REDIS_PREFIX.to_string();
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("prefix", v)) if v.contains(['{', '}']) => {
                    return Err("redis URL: prefix must not contain '{' or '}'".into());
                }
                Some(("prefix", v)) if !v.is_empty() => prefix = v.to_string(),
                Some(("prefix", _)) => return Err("redis URL: prefix must not be empty".into()),
                _ => kept.push(pair),
            }
        }
        let url = if kept.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        Ok(StorageBackend::Redis { url, prefix })
    }
}

impl std::fmt::Debug for StorageBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StorageBackend::Redb => f.write_str("Redb"),
            StorageBackend::Memory => f.write_str("Memory"),
            StorageBackend::Redis { url, prefix } => {
                let shown = match (url.find("://"), url.rfind('@')) {
                    (Some(scheme), Some(at)) if at > scheme => {
                        format!("{}://***@{}", &url[..scheme], &url[at + 1..])
                    }
                    _ => url.clone(),
                };
                f.debug_struct("Redis")
                    .field("url", &shown)
                    .field("prefix", prefix)
                    .finish()
            }
        }
    }
}

impl std::fmt::Display for StorageBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_names_and_urls_parse_and_the_prefix_leaves_the_url() {
        assert_eq!("redb".parse(), Ok(StorageBackend::Redb));
        assert_eq!("memory".parse(), Ok(StorageBackend::Memory));
        assert_eq!(
            "redis://127.0.0.1:6379/2".parse(),
            Ok(StorageBackend::Redis {
                url: "redis://127.0.0.1:6379/2".into(),
                prefix: "eq:".into()
            })
        );
        assert_eq!(
            "redis://:pw@h:1/0?prefix=prod:&protocol=resp3".parse(),
            Ok(StorageBackend::Redis {
                url: "redis://:pw@h:1/0?protocol=resp3".into(),
                prefix: "prod:".into()
            })
        );
        let with_password: StorageBackend = "redis://:s3cret@h:1".parse().unwrap();
        let debug = format!("{with_password:?}");
        assert!(
            !debug.contains("s3cret") && debug.contains("h:1"),
            "{debug}"
        );
        let tls: StorageBackend = "rediss://:pw@h:1?prefix=p:".parse().unwrap();
        assert_eq!(
            tls,
            StorageBackend::Redis {
                url: "rediss://:pw@h:1".into(),
                prefix: "p:".into()
            }
        );
        assert!(!tls.is_redis_cluster());
        for url in ["redis-cluster://a:1,b:2", "redis-cluster+tls://:pw@a:1,b:2"] {
            let cluster: StorageBackend = format!("{url}?prefix=x:").parse().unwrap();
            assert!(cluster.is_redis_cluster(), "{url}");
            assert_eq!(
                cluster,
                StorageBackend::Redis {
                    url: url.into(),
                    prefix: "x:".into()
                }
            );
        }
        let cluster: StorageBackend = "redis-cluster+tls://:s3cret@a:1,b:2".parse().unwrap();
        let debug = format!("{cluster:?}");
        assert!(
            !debug.contains("s3cret") && debug.contains("a:1,b:2"),
            "{debug}"
        );
        assert!("redis://h?prefix=".parse::<StorageBackend>().is_err());
        let err = "redis-cluster://a:1?prefix={x}"
            .parse::<StorageBackend>()
            .unwrap_err();
        assert!(err.contains("'{'"), "{err}");
        let err = "postgres://h".parse::<StorageBackend>().unwrap_err();
        assert!(err.contains("unknown storage"), "{err}");
    }
}

impl std::str::FromStr for StorageBackend {
    type Err = String;

    /// `redb`, `memory`, `redis://…`, `rediss://…`, `redis-cluster://…` or
    /// `redis-cluster+tls://…` (`?prefix=P` sets the key prefix).
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        const SCHEMES: [&str; 4] = [
            "redis://",
            "rediss://",
            "redis-cluster://",
            "redis-cluster+tls://",
        ];
        match s {
            "redb" => Ok(StorageBackend::Redb),
            "memory" => Ok(StorageBackend::Memory),
            url if SCHEMES.iter().any(|scheme| url.starts_with(scheme)) => Self::redis(url),
            other => Err(format!(
                "unknown storage {other:?}: expected redb, memory, or a redis://, rediss://, \
                 redis-cluster:// or redis-cluster+tls:// URL"
            )),
        }
    }
}

/// Configuration of a [`crate::QueueManager`].
#[derive(Debug, Clone)]
pub struct Config {
    /// Where queues are kept. Default [`StorageBackend::Redb`].
    pub storage: StorageBackend,
    /// Directory holding `eventqueue.redb` (with [`StorageBackend::Redb`]). Default `./data`.
    pub data_dir: PathBuf,
    /// TTL of a queue created without one, counted from its last activity. Default 30 min.
    pub default_ttl: Duration,
    /// Retained events per queue for queues created without a bound. Default 1000.
    pub max_buffer_size: u64,
    /// When enqueues are acknowledged. Default [`Durability::Immediate`].
    pub durability: Durability,
    /// Capacity of each queue's live broadcast channel; a subscriber further behind than this
    /// catches up from the log. Default 1024.
    pub broadcast_capacity: usize,
    /// redb page cache in bytes: pages read, and pages written into redb since the last
    /// fold. Default 128 MiB. One budget covers both, so a replay that reads more than
    /// the cache minus those written pages makes the reader write them out on its own
    /// thread; with 64 MiB, a 100k-event replay right after the events were written did, at
    /// half the speed of a later replay of the same events.
    pub cache_size_bytes: usize,
    /// Most events one group commit takes. Default 8192.
    pub max_commit_events: usize,
    /// Most events read from the log per replay step. Default 1024. A step also ends before
    /// its events' JSON would exceed [`Config::replay_bytes`].
    pub replay_chunk: usize,
    /// Most bytes of event JSON read from the log per replay step (an event larger than this
    /// is read alone). A subscription holds at most one step it has not delivered yet, so
    /// this bounds what a subscriber that stops reading keeps in memory; it reads the next
    /// step only when asked for more. Default 32 KiB: about 100 events of 300 bytes, enough
    /// that a replay's cost is the events, not the steps.
    pub replay_bytes: usize,
    /// Longest time commits stay only in the write-ahead log before the log is folded into
    /// redb (redb itself made durable and the log emptied). Bounds recovery work after a
    /// crash; each fold costs one durable redb commit. Default 1 s.
    pub fold_interval: Duration,
    /// Most events removed per step when purging a deleted or expired queue; steps interleave
    /// with appends so a large deletion never holds them up. Default 256.
    pub purge_step: u64,
    /// Appends are logged at once but written into redb in bulk, once the logged batches
    /// not yet in redb hold this many bytes (or at the next fold): fewer, larger redb
    /// transactions cost much less CPU per event; until then those events are served from
    /// memory. Writing them in is a pause of the writer (~8 µs per event on a 2-vCPU Xeon), so
    /// larger values trade tail latency for little: on that machine 16 KiB already cost only
    /// ~2 % more CPU per event than 4 MiB. Default 256 KiB.
    pub apply_bytes: usize,
    /// Free space kept on the data directory's filesystem. While less is free, commands that
    /// add data (enqueues, queue creation, checkpoint saves) are refused with
    /// [`crate::Error::DiskFull`] (HTTP 507), so that what frees space — deleting or expiring
    /// queues, folding the log into the database, and the compaction that follows a
    /// deletion on a nearly full disk — always has room. Writes are taken again as soon as
    /// enough is free. `None` (the default): 64 MiB, or a tenth of the filesystem if that is
    /// less. `Some(0)` turns the check off: a full disk is then met by a failing write (see
    /// `docs/guarantees.md`).
    pub disk_reserve: Option<u64>,
    /// With a Redis store: replicas that must have each batch (`WAITAOF` on Redis ≥ 7.2:
    /// in their AOF; else `WAIT`: received) before it is acknowledged, so a failover to one
    /// of them keeps it. Fewer within [`Config::redis_wait_timeout`] → the batch's writers get
    /// a storage-unavailable error (the events may or may not survive a failover). Default 0:
    /// acknowledged once the primary has it.
    pub redis_wait_replicas: u32,
    /// Longest wait for [`Config::redis_wait_replicas`]. Default 1 s.
    pub redis_wait_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            storage: StorageBackend::Redb,
            data_dir: PathBuf::from("./data"),
            default_ttl: Duration::from_secs(30 * 60),
            max_buffer_size: 1000,
            durability: Durability::Immediate,
            broadcast_capacity: 1024,
            cache_size_bytes: 128 << 20,
            max_commit_events: 8192,
            replay_chunk: 1024,
            replay_bytes: 32 << 10,
            fold_interval: Duration::from_secs(1),
            purge_step: 256,
            apply_bytes: 256 << 10,
            disk_reserve: None,
            redis_wait_replicas: 0,
            redis_wait_timeout: Duration::from_secs(1),
        }
    }
}

impl Config {
    /// The default configuration on `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            ..Self::default()
        }
    }

    /// The default configuration on the in-memory store.
    pub fn memory() -> Self {
        Self {
            storage: StorageBackend::Memory,
            ..Self::default()
        }
    }
}
