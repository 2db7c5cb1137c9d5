//! The coalesced row: 8 clients, each with 16 concurrent one-event publishers to one queue
//! whose events ride together in batch requests — what `Client::coalescer` does (linger 0, at
//! most 100 events per batch), rebuilt here on the harness's own hyper connections so that the
//! row pays the same client costs as the other HTTP rows (the harness does not build the
//! eventqueue library). Each publisher awaits its own event's answer before its next event;
//! its latency runs from handing its event over to its answer.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, anyhow};
use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use crate::drive::{self, CLIENTS, DEPTH, Measure, Plan, STREAMS, Tally, Window};
use crate::eq_peer::{Conn, Eventqueue, event_json};

/// Most events per batch request: `Client::coalescer`'s default.
const MAX_EVENTS: usize = 100;

/// An event handed to a client's coalescer: where its answer goes.
type Handed = oneshot::Sender<Result<(), String>>;

impl Eventqueue {
    /// 8 clients × 16 one-event publishers, coalesced per client (see the module docs).
    pub async fn coalesced(&self, plan: &Plan) -> Result<Measure> {
        let event = event_json(0);
        // Connections opened and senders started before the clock starts.
        let mut senders = Vec::new();
        for c in 0..CLIENTS {
            // One queue per client, as on the WebSocket row.
            let task = &self.tasks[(c * 13) % STREAMS];
            let path: hyper::Uri = format!("/events/queues/{task}/events")
                .parse()
                .with_context(|| format!("parsing the path of {task}"))?;
            let conn = Conn::open(self.addr).await?;
            let (tx, rx) = mpsc::unbounded_channel::<Handed>();
            tokio::spawn(send_batches(conn, path, event.clone(), rx));
            senders.push(tx);
        }
        let w = Arc::new(Window::start(plan));
        let mut futures = Vec::new();
        for tx in senders {
            for _ in 0..DEPTH {
                let (w, tx) = (w.clone(), tx.clone());
                futures.push(async move {
                    let mut t = Tally::new();
                    while w.open() {
                        let start = Instant::now();
                        let (answer, answered) = oneshot::channel();
                        tx.send(answer)
                            .map_err(|_| anyhow!("the batch sender ended"))?;
                        answered
                            .await
                            .map_err(|_| anyhow!("the batch sender ended"))?
                            .map_err(|e| anyhow!(e))?;
                        t.ack(&w, start, 1);
                    }
                    Ok(t)
                });
            }
        }
        Ok(Measure::from_tallies(
            drive::join_clients(futures).await?,
            plan,
        ))
    }
}

/// A client's coalescer: takes every event handed over while its last batch was in flight
/// (at least one, at most [`MAX_EVENTS`]), posts them as one `{"events": [...]}` request and
/// answers each. Ends when every publisher has gone.
async fn send_batches(
    mut conn: Conn,
    path: hyper::Uri,
    event: String,
    mut rx: mpsc::UnboundedReceiver<Handed>,
) {
    let mut batch = Vec::with_capacity(MAX_EVENTS);
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < MAX_EVENTS {
            match rx.try_recv() {
                Ok(more) => batch.push(more),
                Err(_) => break,
            }
        }
        let mut body = String::with_capacity(12 + batch.len() * (event.len() + 1));
        body.push_str("{\"events\":[");
        for i in 0..batch.len() {
            if i > 0 {
                body.push(',');
            }
            body.push_str(&event);
        }
        body.push_str("]}");
        let answer = conn
            .post(&path, Bytes::from(body))
            .await
            .map_err(|e| format!("{e:#}"));
        for a in batch.drain(..) {
            let _ = a.send(answer.clone());
        }
    }
}
