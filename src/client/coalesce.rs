//! Client-side coalescing: concurrent publishes to one queue ride in one batch request.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use serde_json::value::RawValue;
use tokio::sync::{Notify, oneshot};

use super::{Client, ClientError, PublishOutcome};

/// Default most events per batch request (the server takes 1000 by default).
pub const DEFAULT_MAX_EVENTS: usize = 100;

/// Most bytes of events per batch request: half the server's default body limit (2 MiB).
const MAX_BATCH_BYTES: usize = 1 << 20;

/// Publishes to one queue, gathering concurrent publishes into batch requests. Cheap to
/// clone: clones share the batches.
///
/// One event per HTTP request pays the whole request path per event (a request head, a
/// commit, its hand-offs); a batch pays it once. Many tasks of one program publishing to the
/// same queue at once — reporters of parallel steps, a web handler per request — can share
/// batches without changing their code: each calls [`Coalescer::publish`] and gets the answer
/// for its own event.
///
/// How events are gathered: while no batch is being sent, the first event starts one, which
/// waits the [linger](Coalescer::with_linger) (default **0**: it goes at once) or until
/// [`Coalescer::with_max_events`] events (default 100) are waiting, then is sent. Events
/// published while a batch request is in flight wait for it and go together in the next. So a
/// lone publisher sees one request per event with no added delay, and under load batches grow
/// by themselves. One batch request is in flight per coalescer at a time, so events are stored
/// in the order their `publish` calls queued them.
///
/// What an answer means is what [`Client::publish`]'s means: `Ok` = that event is stored
/// (durably, with the server's `immediate` durability), with its own offset. A batch is
/// stored atomically by the server, so when it is refused (one invalid event, a closed queue)
/// its events are sent again one per request, and each publisher gets its own event's answer.
/// A transport failure is every waiting event's answer (their events may or may not be
/// stored: retry with `event_id`s, as after a failed [`Client::publish`]).
#[derive(Clone)]
pub struct Coalescer {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Coalescer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coalescer")
            .field("task_id", &self.inner.task)
            .field("linger", &self.inner.linger)
            .field("max_events", &self.inner.max_events)
            .finish_non_exhaustive()
    }
}

struct Inner {
    client: Client,
    task: String,
    linger: Duration,
    max_events: usize,
    state: Mutex<State>,
    /// Wakes a lingering sender when a batch is full.
    full: Notify,
    requests: AtomicU64,
}

#[derive(Default)]
struct State {
    waiting: Vec<Waiting>,
    bytes: usize,
    /// The sender task runs (lingering, or sending a batch).
    sending: bool,
}

struct Waiting {
    event: Box<RawValue>,
    answer: oneshot::Sender<Result<PublishOutcome, ClientError>>,
}

impl Inner {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // Every update leaves the state whole: a panic elsewhere cannot corrupt it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn is_full(&self, state: &State) -> bool {
        state.waiting.len() >= self.max_events || state.bytes >= MAX_BATCH_BYTES
    }
}

impl Client {
    /// A [`Coalescer`] publishing to `task_id`'s queue through this client.
    ///
    /// # Errors
    ///
    /// [`ClientError::InvalidInput`] for a task id the server would refuse.
    pub fn coalescer(&self, task_id: &str) -> Result<Coalescer, ClientError> {
        super::events_path(task_id)?;
        Ok(Coalescer {
            inner: Arc::new(Inner {
                client: self.clone(),
                task: task_id.to_owned(),
                linger: Duration::ZERO,
                max_events: DEFAULT_MAX_EVENTS,
                state: Mutex::default(),
                full: Notify::new(),
                requests: AtomicU64::new(0),
            }),
        })
    }
}

impl Coalescer {
    /// How long the first event of a batch waits for others before the batch is sent
    /// (default zero: at once; events still gather while a batch is in flight). A linger
    /// adds up to that much to each event's latency and saves requests when publishes come
    /// close together but not at the same moment. Set it before the first publish (it applies
    /// to this handle and the clones made from it afterwards).
    #[must_use]
    pub fn with_linger(self, linger: Duration) -> Self {
        self.reconfigure(|inner| inner.linger = linger)
    }

    /// Most events per batch request (default [`DEFAULT_MAX_EVENTS`], at least 1; at most
    /// the server's `max_batch_events`, 1000 by default). A full batch is sent without waiting
    /// out the linger.
    #[must_use]
    pub fn with_max_events(self, max_events: usize) -> Self {
        self.reconfigure(|inner| inner.max_events = max_events.max(1))
    }

    fn reconfigure(self, change: impl FnOnce(&mut Inner)) -> Self {
        let Inner {
            client,
            task,
            linger,
            max_events,
            ..
        } = &*self.inner;
        let mut inner = Inner {
            client: client.clone(),
            task: task.clone(),
            linger: *linger,
            max_events: *max_events,
            state: Mutex::default(),
            full: Notify::new(),
            requests: AtomicU64::new(0),
        };
        change(&mut inner);
        Self {
            inner: Arc::new(inner),
        }
    }

    /// The queue's task id.
    pub fn task_id(&self) -> &str {
        &self.inner.task
    }

    /// Requests sent so far (batches, and single events of refused batches sent again): with
    /// the number of events published, how well publishes coalesce.
    pub fn requests(&self) -> u64 {
        self.inner.requests.load(Ordering::Relaxed)
    }

    /// Publishes one event (any JSON object the server accepts), in a batch with the events
    /// published meanwhile, and waits for its answer.
    ///
    /// # Errors
    ///
    /// As [`Client::publish`] for this event (see [`Coalescer`] for a refused batch and
    /// a transport failure); [`ClientError::InvalidInput`] when `event` does not serialise.
    pub async fn publish<T: Serialize + ?Sized>(
        &self,
        event: &T,
    ) -> Result<PublishOutcome, ClientError> {
        let event = serde_json::value::to_raw_value(event)
            .map_err(|e| ClientError::InvalidInput(format!("cannot encode the event: {e}")))?;
        let (answer, answered) = oneshot::channel();
        let (start, full) = {
            let mut state = self.inner.state();
            state.bytes += event.get().len();
            state.waiting.push(Waiting { event, answer });
            let start = !std::mem::replace(&mut state.sending, true);
            (start, self.inner.is_full(&state))
        };
        if start {
            // A task of its own: a publisher that stops waiting does not strand the others.
            tokio::spawn(send_batches(self.inner.clone()));
        } else if full {
            self.inner.full.notify_one();
        }
        answered.await.unwrap_or_else(|_| {
            Err(ClientError::Transport {
                url: self.inner.client.base.clone(),
                reason: "the batch sender ended before answering (runtime shutting down)".into(),
            })
        })
    }
}

/// Sends batches until no event waits.
async fn send_batches(inner: Arc<Inner>) {
    loop {
        let full = inner.is_full(&inner.state());
        if !inner.linger.is_zero() && !full {
            tokio::select! {
                () = tokio::time::sleep(inner.linger) => {}
                () = inner.full.notified() => {}
            }
        }
        let batch = {
            let mut state = inner.state();
            if state.waiting.is_empty() {
                state.sending = false;
                return;
            }
            let mut bytes = 0;
            let mut n = 0;
            for w in &state.waiting {
                if n > 0 && (n >= inner.max_events || bytes + w.event.get().len() > MAX_BATCH_BYTES)
                {
                    break;
                }
                bytes += w.event.get().len();
                n += 1;
            }
            state.bytes -= bytes;
            state.waiting.drain(..n).collect::<Vec<_>>()
        };
        send(&inner, batch).await;
    }
}

/// Sends `batch` and answers each of its events.
async fn send(inner: &Inner, batch: Vec<Waiting>) {
    let client = &inner.client;
    if let [one] = &batch[..] {
        inner.requests.fetch_add(1, Ordering::Relaxed);
        let answer = client.publish(&inner.task, &one.event).await;
        for w in batch {
            let _ = w.answer.send(answer.clone());
        }
        return;
    }
    let events: Vec<&RawValue> = batch.iter().map(|w| &*w.event).collect();
    inner.requests.fetch_add(1, Ordering::Relaxed);
    match client.publish_batch(&inner.task, &events).await {
        Ok(outcome) if outcome.offsets.len() == batch.len() => {
            for (w, offset) in batch.into_iter().zip(&outcome.offsets) {
                let _ = w.answer.send(Ok(PublishOutcome {
                    offsets: vec![*offset],
                    latest_offset: outcome.latest_offset,
                    cancelled: outcome.cancelled,
                }));
            }
        }
        Ok(outcome) => {
            let e = ClientError::Decode(format!(
                "{} offsets for a batch of {} events",
                outcome.offsets.len(),
                batch.len()
            ));
            for w in batch {
                let _ = w.answer.send(Err(e.clone()));
            }
        }
        // Refused as a whole, nothing stored: each event on its own gets its own answer.
        Err(ClientError::Api { .. }) => {
            for w in batch {
                inner.requests.fetch_add(1, Ordering::Relaxed);
                let answer = client.publish(&inner.task, &w.event).await;
                let _ = w.answer.send(answer);
            }
        }
        Err(e) => {
            for w in batch {
                let _ = w.answer.send(Err(e.clone()));
            }
        }
    }
}
