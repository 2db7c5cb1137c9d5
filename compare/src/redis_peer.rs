//! Redis Streams: XADD to append, XRANGE to replay, XREAD BLOCK to follow.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use redis::Value;
use redis::aio::MultiplexedConnection;

use crate::drive::{self, CLIENTS, DEPTH, Measure, Plan, STREAMS, Subscribers, Tally, Window};
use crate::servers::{Server, free_addr};

pub struct Redis {
    client: redis::Client,
    keys: Vec<String>,
}

/// Starts `redis-server` with AOF on and `appendfsync` = `fsync` (`always` / `everysec`),
/// RDB snapshots off, data in `dir`.
pub fn start(bin: &Path, dir: &Path, fsync: &str) -> Result<(Server, Redis)> {
    let addr = free_addr()?;
    let mut cmd = Command::new(bin);
    cmd.arg("--port")
        .arg(addr.port().to_string())
        .args(["--bind", "127.0.0.1", "--protected-mode", "yes"])
        .arg("--dir")
        .arg(dir)
        .args(["--appendonly", "yes", "--appendfsync", fsync])
        .args(["--save", "", "--daemonize", "no", "--logfile", ""]);
    let server = Server::spawn(
        &format!("redis-server ({fsync})"),
        cmd,
        addr,
        dir.join("server.log"),
    )?;
    let client = redis::Client::open(format!("redis://{addr}/")).context("redis client")?;
    let keys = (0..STREAMS).map(|i| format!("s:{i}")).collect();
    Ok((server, Redis { client, keys }))
}

impl Redis {
    async fn conn(&self) -> Result<MultiplexedConnection> {
        let cfg = redis::AsyncConnectionConfig::new()
            .set_response_timeout(Some(Duration::from_secs(30)))
            .set_connection_timeout(Some(Duration::from_secs(5)));
        self.client
            .get_multiplexed_async_connection_with_config(&cfg)
            .await
            .context("connecting to redis")
    }

    /// `clients` connections, each sending one XADD at a time.
    pub async fn sequential(&self, plan: &Plan, clients: usize) -> Result<Measure> {
        let mut conns = Vec::new();
        for _ in 0..clients {
            conns.push(self.conn().await?);
        }
        let payload = drive::payload(0);
        let w = std::sync::Arc::new(Window::start(plan));
        let futures = conns
            .into_iter()
            .enumerate()
            .map(|(c, mut con)| {
                let (w, keys, payload) = (w.clone(), self.keys.clone(), payload.clone());
                async move {
                    let mut t = Tally::new();
                    let mut k = c * 37;
                    while w.open() {
                        let start = Instant::now();
                        let _: String = redis::cmd("XADD")
                            .arg(&keys[k % STREAMS])
                            .arg("*")
                            .arg("p")
                            .arg(&payload)
                            .query_async(&mut con)
                            .await
                            .context("XADD")?;
                        t.ack(&w, start, 1);
                        k += 1;
                    }
                    Ok(t)
                }
            })
            .collect();
        Ok(Measure::from_tallies(
            drive::join_clients(futures).await?,
            plan,
        ))
    }

    /// 8 connections, each sending pipelines of 16 XADDs to one stream and waiting for all.
    pub async fn pipelined(&self, plan: &Plan) -> Result<Measure> {
        let mut conns = Vec::new();
        for _ in 0..CLIENTS {
            conns.push(self.conn().await?);
        }
        let payload = drive::payload(0);
        let w = std::sync::Arc::new(Window::start(plan));
        let futures = conns
            .into_iter()
            .enumerate()
            .map(|(c, mut con)| {
                let (w, keys, payload) = (w.clone(), self.keys.clone(), payload.clone());
                async move {
                    let mut t = Tally::new();
                    let mut k = c * 37;
                    while w.open() {
                        let mut pipe = redis::pipe();
                        for _ in 0..DEPTH {
                            pipe.cmd("XADD")
                                .arg(&keys[k % STREAMS])
                                .arg("*")
                                .arg("p")
                                .arg(&payload);
                        }
                        let start = Instant::now();
                        let ids: Vec<String> =
                            pipe.query_async(&mut con).await.context("XADD pipeline")?;
                        t.ack(&w, start, ids.len() as u64);
                        k += 1;
                    }
                    Ok(t)
                }
            })
            .collect();
        Ok(Measure::from_tallies(
            drive::join_clients(futures).await?,
            plan,
        ))
    }

    /// Fills one stream with `n` events, then reads it back with XRANGE, 1000 per call.
    pub async fn replay(&self, n: u64) -> Result<Measure> {
        let key = "replay";
        let mut con = self.conn().await?;
        let payload = drive::payload(0);
        let mut left = n;
        while left > 0 {
            let k = left.min(1000);
            let mut pipe = redis::pipe();
            for _ in 0..k {
                pipe.cmd("XADD")
                    .arg(key)
                    .arg("*")
                    .arg("p")
                    .arg(&payload)
                    .ignore();
            }
            let () = pipe
                .query_async(&mut con)
                .await
                .context("filling the replay stream")?;
            left -= k;
        }
        let start = Instant::now();
        let mut from = "-".to_string();
        let mut read = 0u64;
        loop {
            let page: Value = redis::cmd("XRANGE")
                .arg(key)
                .arg(&from)
                .arg("+")
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut con)
                .await
                .context("XRANGE")?;
            let Value::Array(entries) = page else {
                bail!("XRANGE answered {page:?}");
            };
            let Some(last) = entries.last().and_then(entry_id) else {
                break;
            };
            read += entries.len() as u64;
            from = format!("({last}");
            if read >= n {
                break;
            }
        }
        let secs = start.elapsed().as_secs_f64();
        if read != n {
            bail!("XRANGE replay returned {read} events, expected {n}");
        }
        Ok(Measure {
            events: read,
            secs,
            events_per_s: read as f64 / secs,
            ..Default::default()
        })
    }

    /// One publisher (XADD, one at a time, on schedule) and `plan.subscribers` connections in
    /// XREAD BLOCK on the same stream.
    pub async fn fanout(&self, plan: &Plan, rate: u64) -> Result<Measure> {
        let key = format!("fanout:{rate}");
        let mut subs = Subscribers::new();
        for _ in 0..plan.subscribers {
            let mut con = self.conn().await?;
            let key = key.clone();
            subs.spawn(|tally, ready| async move {
                ready.fetch_add(1, Ordering::SeqCst);
                let mut last = "0-0".to_string();
                loop {
                    let reply: Value = redis::cmd("XREAD")
                        .arg("COUNT")
                        .arg(1000)
                        .arg("BLOCK")
                        .arg(1000)
                        .arg("STREAMS")
                        .arg(&key)
                        .arg(&last)
                        .query_async(&mut con)
                        .await
                        .context("XREAD")?;
                    // [[key, [[id, [field, value]], ...]]] or nil on timeout.
                    let Value::Array(streams) = reply else {
                        continue;
                    };
                    for s in streams {
                        let Value::Array(mut kv) = s else { continue };
                        let Some(Value::Array(entries)) = kv.pop() else {
                            continue;
                        };
                        let mut t = tally.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
                        for e in &entries {
                            if let Some(v) = entry_value(e) {
                                t.deliver(v);
                            }
                            if let Some(id) = entry_id(e) {
                                last = id;
                            }
                        }
                    }
                }
            });
        }
        subs.wait_ready(Duration::from_secs(30)).await?;
        let mut con = self.conn().await?;
        let mut pacer = drive::Pacer::new(rate, plan.fanout_secs);
        while pacer.tick().await.is_some() {
            let _: String = redis::cmd("XADD")
                .arg(&key)
                .arg("*")
                .arg("p")
                .arg(drive::payload(drive::now_us()))
                .query_async(&mut con)
                .await
                .context("XADD")?;
        }
        let published = pacer.published();
        drive::settle(Duration::from_secs(5), || subs.all_received(published)).await;
        subs.finish(published, plan.fanout_secs).await
    }
}

/// The id of an XRANGE / XREAD entry `[id, [field, value, ...]]`.
fn entry_id(e: &Value) -> Option<String> {
    match e {
        Value::Array(parts) => match parts.first()? {
            Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
            Value::SimpleString(s) => Some(s.clone()),
            _ => None,
        },
        _ => None,
    }
}

/// The first field's value of an entry.
fn entry_value(e: &Value) -> Option<&[u8]> {
    let Value::Array(parts) = e else { return None };
    let Value::Array(fields) = parts.get(1)? else {
        return None;
    };
    match fields.get(1)? {
        Value::BulkString(b) => Some(b),
        _ => None,
    }
}
