//! NATS JetStream: one file-storage stream `EVENTS` over subjects `events.>` (one subject per
//! event stream), publish with acks, ordered consumers to replay and follow.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;

use crate::drive::{self, CLIENTS, DEPTH, Measure, Plan, STREAMS, Subscribers, Tally, Window};
use crate::servers::{Server, free_addr};

const STREAM: &str = "EVENTS";

pub struct Nats {
    url: String,
    subjects: Vec<String>,
}

/// Starts `nats-server` with JetStream on `dir`; `sync_always` sets `sync_interval: always`
/// (fsync before every ack), otherwise the server's default (fsync every 2 minutes).
pub async fn start(bin: &Path, dir: &Path, sync_always: bool) -> Result<(Server, Nats)> {
    let addr = free_addr()?;
    let store = dir.join("jetstream");
    let sync = if sync_always {
        "\n  sync_interval: always"
    } else {
        ""
    };
    let conf = format!(
        "listen: \"{addr}\"\njetstream {{\n  store_dir: {:?}{sync}\n}}\n",
        store.display().to_string()
    );
    let conf_path = dir.join("nats.conf");
    std::fs::write(&conf_path, conf).with_context(|| format!("writing {}", conf_path.display()))?;
    let mut cmd = Command::new(bin);
    cmd.arg("-c").arg(&conf_path);
    let name = if sync_always {
        "nats-server (sync always)"
    } else {
        "nats-server (default sync)"
    };
    let server = Server::spawn(name, cmd, addr, dir.join("server.log"))?;
    let nats = Nats {
        url: format!("nats://{addr}"),
        subjects: (0..STREAMS).map(|i| format!("events.s{i}")).collect(),
    };
    let (_, js) = nats.connect().await?;
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let made = js
            .create_stream(stream::Config {
                name: STREAM.into(),
                subjects: vec!["events.>".into()],
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await;
        match made {
            Ok(_) => break,
            Err(e) if Instant::now() > end => {
                bail!(
                    "creating the JetStream stream: {e}; server log:\n{}",
                    server.log_tail()
                )
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    Ok((server, nats))
}

impl Nats {
    async fn connect(&self) -> Result<(async_nats::Client, jetstream::Context)> {
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(5))
            .connect(&self.url)
            .await
            .with_context(|| format!("connecting to {}", self.url))?;
        let js = jetstream::context::ContextBuilder::new()
            .timeout(Duration::from_secs(30))
            .build(client.clone());
        Ok((client, js))
    }

    /// `clients` connections, each publishing one event and awaiting its ack.
    pub async fn sequential(&self, plan: &Plan, clients: usize) -> Result<Measure> {
        let mut ctxs = Vec::new();
        for _ in 0..clients {
            ctxs.push(self.connect().await?);
        }
        let payload = Bytes::from(drive::payload(0));
        let w = std::sync::Arc::new(Window::start(plan));
        let futures = ctxs
            .into_iter()
            .enumerate()
            .map(|(c, (_client, js))| {
                let (w, subjects, payload) = (w.clone(), self.subjects.clone(), payload.clone());
                async move {
                    let mut t = Tally::new();
                    let mut k = c * 37;
                    while w.open() {
                        let start = Instant::now();
                        js.publish(subjects[k % STREAMS].clone(), payload.clone())
                            .await
                            .map_err(|e| anyhow!("publish: {e}"))?
                            .await
                            .map_err(|e| anyhow!("publish ack: {e}"))?;
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

    /// 8 connections, each keeping 16 publishes awaiting their acks.
    pub async fn windowed(&self, plan: &Plan) -> Result<Measure> {
        let mut ctxs = Vec::new();
        for _ in 0..CLIENTS {
            ctxs.push(self.connect().await?);
        }
        let payload = Bytes::from(drive::payload(0));
        let w = std::sync::Arc::new(Window::start(plan));
        let futures = ctxs
            .into_iter()
            .enumerate()
            .map(|(c, (_client, js))| {
                let (w, subjects, payload) = (w.clone(), self.subjects.clone(), payload.clone());
                async move {
                    let mut t = Tally::new();
                    let mut k = c * 37;
                    let mut pending = FuturesUnordered::new();
                    loop {
                        while pending.len() < DEPTH && w.open() {
                            let start = Instant::now();
                            let ack = js
                                .publish(subjects[k % STREAMS].clone(), payload.clone())
                                .await
                                .map_err(|e| anyhow!("publish: {e}"))?;
                            k += 1;
                            pending.push(async move { ack.await.map(|_| start) });
                        }
                        match pending.next().await {
                            Some(acked) => {
                                let start = acked.map_err(|e| anyhow!("publish ack: {e}"))?;
                                t.ack(&w, start, 1);
                            }
                            None => break,
                        }
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

    /// Fills subject `events.replay` with `n` events (or as many as `fill_limit` allows),
    /// then reads them with an ordered consumer.
    pub async fn replay(&self, n: u64, fill_limit: Duration) -> Result<Measure> {
        let subject = "events.replay";
        let (_client, js) = self.connect().await?;
        let payload = Bytes::from(drive::payload(0));
        let mut pending: FuturesUnordered<
            <jetstream::context::PublishAckFuture as std::future::IntoFuture>::IntoFuture,
        > = FuturesUnordered::new();
        let fill_end = Instant::now() + fill_limit;
        let mut filled = 0u64;
        while filled < n && Instant::now() < fill_end {
            filled += 1;
            if pending.len() >= 256
                && let Some(r) = pending.next().await
            {
                r.map_err(|e| anyhow!("filling the replay subject: {e}"))?;
            }
            let ack = js
                .publish(subject, payload.clone())
                .await
                .map_err(|e| anyhow!("publish: {e}"))?;
            pending.push(std::future::IntoFuture::into_future(ack));
        }
        while let Some(r) = pending.next().await {
            r.map_err(|e| anyhow!("filling the replay subject: {e}"))?;
        }
        let start = Instant::now();
        let stream = js
            .get_stream(STREAM)
            .await
            .map_err(|e| anyhow!("get stream: {e}"))?;
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: subject.into(),
                deliver_policy: consumer::DeliverPolicy::All,
                ..Default::default()
            })
            .await
            .map_err(|e| anyhow!("ordered consumer: {e}"))?;
        let mut messages = consumer
            .messages()
            .await
            .map_err(|e| anyhow!("consumer messages: {e}"))?;
        let n = filled;
        let mut read = 0u64;
        while read < n {
            match tokio::time::timeout(Duration::from_secs(30), messages.next()).await {
                Ok(Some(Ok(_))) => read += 1,
                Ok(Some(Err(e))) => bail!("replay: {e}"),
                Ok(None) => break,
                Err(_) => bail!("replay stalled after {read} of {n} events"),
            }
        }
        let secs = start.elapsed().as_secs_f64();
        Ok(Measure {
            events: read,
            secs,
            events_per_s: read as f64 / secs,
            ..Default::default()
        })
    }

    /// One publisher (publish + ack, on schedule) and `plan.subscribers` connections, each
    /// following the subject with its own ordered consumer.
    pub async fn fanout(&self, plan: &Plan, rate: u64) -> Result<Measure> {
        let subject = format!("events.fanout{rate}");
        let mut subs = Subscribers::new();
        for _ in 0..plan.subscribers {
            let (client, js) = self.connect().await?;
            let subject = subject.clone();
            subs.spawn(|tally, ready| async move {
                let _client = client;
                let stream = js
                    .get_stream(STREAM)
                    .await
                    .map_err(|e| anyhow!("get stream: {e}"))?;
                let consumer = stream
                    .create_consumer(consumer::pull::OrderedConfig {
                        filter_subject: subject,
                        deliver_policy: consumer::DeliverPolicy::All,
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| anyhow!("ordered consumer: {e}"))?;
                let mut messages = consumer
                    .messages()
                    .await
                    .map_err(|e| anyhow!("consumer messages: {e}"))?;
                ready.fetch_add(1, Ordering::SeqCst);
                while let Some(m) = messages.next().await {
                    let m = m.map_err(|e| anyhow!("fan-out consumer: {e}"))?;
                    tally
                        .lock()
                        .map_err(|_| anyhow!("poisoned"))?
                        .deliver(&m.payload);
                }
                Ok(())
            });
        }
        subs.wait_ready(Duration::from_secs(60)).await?;
        let (_client, js) = self.connect().await?;
        let mut pacer = drive::Pacer::new(rate, plan.fanout_secs);
        while pacer.tick().await.is_some() {
            js.publish(
                subject.clone(),
                Bytes::from(drive::payload(drive::now_us())),
            )
            .await
            .map_err(|e| anyhow!("publish: {e}"))?
            .await
            .map_err(|e| anyhow!("publish ack: {e}"))?;
        }
        let published = pacer.published();
        drive::settle(Duration::from_secs(5), || subs.all_received(published)).await;
        subs.finish(published, plan.fanout_secs).await
    }
}
