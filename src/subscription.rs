//! Subscriptions: replay from the log, then live, with no holes and no duplicates.
//!
//! # Ordering
//!
//! A [`Subscription`] tracks `next`, the next offset it owes its reader. It is created under
//! the queue's state lock: it joins the live channel and reads the published offset `latest`
//! in the same critical section. The writer advances the published offset and sends each
//! committed event under that same lock, after the commit. Hence:
//!
//! - every event below `latest` is committed and is read from the log (or was trimmed);
//! - every event at or above `latest` is sent to this subscription's receiver, in offset order.
//!
//! The subscription first reads `next..latest` from the log in chunks, then takes live events.
//! A live event below `next` was already delivered from the log and is skipped (no duplicate).
//! A live event above `next` means the subscription missed some (it lagged); it keeps that
//! event aside, reads `next..event` from the log — committed, because publication follows
//! commit — and then delivers the kept event (no hole).
//!
//! # Lagging
//!
//! A subscriber that stops reading never blocks the writer or other subscribers: the live
//! channel is a bounded `tokio::sync::broadcast`, and a receiver that falls more than its
//! capacity behind observes `Lagged`. The subscription then re-reads the published state and
//! catches up from the durable log, losing nothing that is still retained.
//!
//! # Memory
//!
//! A subscription reads the log one step at a time ([`Config::replay_bytes`] of JSON, or one
//! larger event), and reads the next step only once its reader asked for more than it holds:
//! nothing is read ahead. A reader that stops reading therefore leaves the subscription
//! holding at most one step (plus the live events it was sent, which the queue shares with
//! every subscriber); a live channel it lags is caught up from the log in the same steps.
//!
//! [`Config::replay_bytes`]: crate::Config::replay_bytes
//!
//! # Gaps
//!
//! When the log no longer holds an offset the subscription owes (trimmed by `max_buffer_size`
//! or expiry while it was away), it yields one [`Delivery::Gap`] naming the requested offset and
//! the first offset it will deliver next, then continues. Gaps are said, never silent.
//!
//! # Closing
//!
//! The stream ends after the queue's first terminal event, after a close once everything
//! before it was delivered, or at once when the queue is deleted or expires.

use std::collections::VecDeque;
use std::sync::Arc;

use futures_util::Stream;
use tokio::sync::broadcast::{self, error::RecvError};

use crate::engine::{Core, Live, QueueState, SubscriberGuard};
use crate::error::{Error, Result};
use crate::metrics::Metrics;

pub use crate::engine::RecordedEvent;

/// What a subscription yields.
#[derive(Debug, Clone, PartialEq)]
pub enum Delivery {
    /// The next event in offset order.
    Event(Arc<RecordedEvent>),
    /// Events from `requested_offset` up to `first_available_offset` (exclusive) were dropped
    /// before this subscription could deliver them.
    Gap {
        /// The offset the subscription owed.
        requested_offset: u64,
        /// The offset it continues at.
        first_available_offset: u64,
    },
}

impl Delivery {
    /// The event, if this is one.
    pub fn as_event(&self) -> Option<&Arc<RecordedEvent>> {
        match self {
            Delivery::Event(e) => Some(e),
            Delivery::Gap { .. } => None,
        }
    }
}

/// A stream of one queue's events from an offset; see the module docs for its guarantees.
///
/// Read it with [`Subscription::next`] (or [`Subscription::next_batch`], several ready
/// deliveries at once) or turn it into a `Stream` with [`Subscription::into_stream`] (or
/// [`Subscription::into_batches`]).
#[derive(Debug)]
pub struct Subscription {
    q: Arc<QueueState>,
    core: Arc<Core>,
    rx: broadcast::Receiver<Live>,
    /// One past the last offset queued for delivery (or skipped as dropped).
    next: u64,
    /// Offsets below this are read from the log.
    read_until: u64,
    close_at: Option<u64>,
    finished_at: Option<u64>,
    /// A gap starting at this offset is to be reported before the next delivery.
    gap_from: Option<u64>,
    /// A live event received ahead of `next`, delivered once the log filled the hole.
    stash: Option<Arc<RecordedEvent>>,
    buf: VecDeque<Arc<RecordedEvent>>,
    /// Bytes of JSON the next read of the log may take; [`Config::replay_bytes`] unless set.
    ///
    /// [`Config::replay_bytes`]: crate::Config::replay_bytes
    step_bytes: usize,
    done: bool,
    first_to_send: u64,
    latest_at_start: u64,
    _guard: SubscriberGuard,
}

impl Subscription {
    pub(crate) fn new(q: Arc<QueueState>, core: Arc<Core>, from: u64) -> Result<Self> {
        let (rx, st) = q.join_live(core.config().broadcast_capacity)?;
        let (st_next, st_first, closed, finished_at) =
            (st.next_offset, st.first_offset, st.closed, st.finished_at);
        let guard = q.count_subscriber();
        let done = st.nothing_from(from);
        let step_bytes = core.config().replay_bytes;
        Ok(Self {
            q,
            core,
            rx,
            next: from,
            read_until: st_next,
            close_at: closed.then_some(st_next),
            finished_at,
            gap_from: None,
            stash: None,
            buf: VecDeque::new(),
            step_bytes,
            done,
            first_to_send: if from < st_next {
                from.max(st_first)
            } else {
                from
            },
            latest_at_start: st_next,
            _guard: guard,
        })
    }

    /// The first offset this subscription expects to send (after a gap at the start: the first
    /// retained one), as known when it was created.
    pub fn first_offset(&self) -> u64 {
        self.first_to_send
    }

    /// The queue's latest offset when the subscription was created.
    pub fn latest_offset_at_start(&self) -> u64 {
        self.latest_at_start
    }

    /// Whether the subscription already knows it will yield nothing more.
    pub fn is_ended(&self) -> bool {
        self.done && self.buf.is_empty()
    }

    /// The next delivery, or `None` when the stream has ended.
    ///
    /// # Errors
    ///
    /// A storage error while reading the log; the subscription ends after it.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe while waiting for live events: a dropped call loses nothing. A call dropped
    /// while reading the log may repeat that read.
    pub async fn next(&mut self) -> Option<Result<Delivery>> {
        loop {
            if let Some(delivery) = self.ready() {
                return Some(Ok(delivery));
            }
            if self.done {
                return None;
            }
            let closed = self.close_at.is_some_and(|c| self.next >= c);
            let finished = self.finished_at.is_some_and(|f| self.next > f);
            if closed || finished {
                self.done = true;
                return self.gap_from.take().map(|r| Ok(self.gap(r, self.next)));
            }
            if self.next < self.read_until {
                if let Err(e) = self.fill().await {
                    self.end();
                    return Some(Err(e));
                }
                continue;
            }
            if let Some(ev) = self.stash.take() {
                self.accept(ev);
                continue;
            }
            match self.rx.recv().await {
                Ok(Live::Event(ev)) => self.accept(ev),
                Ok(Live::Closed { at }) => {
                    self.close_at = Some(at);
                    self.read_until = self.read_until.max(at);
                }
                Ok(Live::Advanced { to }) => self.read_until = self.read_until.max(to),
                Ok(Live::Removed) => {
                    self.end();
                    return None;
                }
                Err(RecvError::Lagged(_)) => {
                    Metrics::add(&self.core.metrics().lag_recoveries, 1);
                    self.refresh(false);
                }
                Err(RecvError::Closed) => self.refresh(true),
            }
        }
    }

    /// Deliveries that are ready together: waits for the first as [`next`](Self::next) does,
    /// then takes what is already read behind it without waiting, until the batch holds `max`
    /// deliveries or events of `max_bytes` of JSON (so at least one delivery, and at most
    /// `max_bytes` plus one event's JSON). A replay is delivered a read chunk at a time this
    /// way rather than an await per event. `None` when the stream has ended.
    ///
    /// # Errors
    ///
    /// As [`next`](Self::next); deliveries taken before the error are not lost: the error comes
    /// only from the wait for the first one.
    ///
    /// # Cancel safety
    ///
    /// As [`next`](Self::next): only the wait for the first delivery can be cancelled.
    pub async fn next_batch(
        &mut self,
        max: usize,
        max_bytes: usize,
    ) -> Option<Result<Vec<Delivery>>> {
        let first = match self.next().await? {
            Ok(delivery) => delivery,
            Err(e) => return Some(Err(e)),
        };
        let json_len = |d: &Delivery| d.as_event().map_or(0, |ev| ev.json().len());
        let mut bytes = json_len(&first);
        let mut out = Vec::with_capacity(max.clamp(1, self.buf.len() + 1));
        out.push(first);
        while out.len() < max && bytes < max_bytes {
            match self.ready() {
                Some(delivery) => {
                    bytes += json_len(&delivery);
                    out.push(delivery);
                }
                None => break,
            }
        }
        Some(Ok(out))
    }

    /// Sets the bytes of JSON the next reads of the log take (a reader that has room for a
    /// larger step than [`Config::replay_bytes`](crate::Config::replay_bytes)).
    #[cfg_attr(not(feature = "server"), allow(dead_code))] // the SSE server's stream bodies
    pub(crate) fn set_step_bytes(&mut self, bytes: usize) {
        self.step_bytes = bytes;
    }

    /// Whether the next delivery will be read from the log: nothing is buffered and the log
    /// holds offsets this subscription owes.
    #[cfg_attr(not(feature = "server"), allow(dead_code))] // the SSE server's stream bodies
    pub(crate) fn will_read(&self) -> bool {
        !self.done && self.buf.is_empty() && self.next < self.read_until
    }

    /// Takes back the events from offset `at` on that this subscription delivered: they are
    /// delivered again, next, in order, read from the log, as if they had not been taken (a
    /// reader that cannot hold an event yet drops it and asks for it again later instead of
    /// holding it while it waits). Live events past them are read from the log too; events
    /// dropped meanwhile are reported as a gap, as always.
    ///
    /// Returns `false`, changing nothing, when the subscription cannot: it ended (the
    /// events taken included its terminal event), it owes a gap notice, or `at` is not an
    /// offset it delivered last (`at` must be one of the latest batch's events).
    #[cfg_attr(not(feature = "server"), allow(dead_code))] // the SSE server's stream bodies
    pub(crate) fn rewind(&mut self, at: u64) -> bool {
        if self.done || self.gap_from.is_some() || at >= self.next {
            return false;
        }
        // Everything below the old `next` is published, hence in the log (or trimmed).
        self.read_until = self.read_until.max(self.next);
        self.next = at;
        self.buf.clear();
        true
    }

    /// The next delivery when one is ready without waiting: the next read event, or the gap
    /// notice owed before it. `None` when none is buffered, or when the stream ended here (the
    /// queue finished below the next buffered event; `done` is set then).
    fn ready(&mut self) -> Option<Delivery> {
        let ev = self.buf.pop_front()?;
        if self.finished_at.is_some_and(|f| ev.offset() > f) {
            self.end();
            return None;
        }
        if let Some(requested) = self.gap_from.take() {
            let first = ev.offset();
            self.buf.push_front(ev);
            return Some(self.gap(requested, first));
        }
        if ev.is_terminal() {
            self.end();
        }
        Some(Delivery::Event(ev))
    }

    /// Turns the subscription into a `Stream`.
    pub fn into_stream(self) -> impl Stream<Item = Result<Delivery>> + Send + 'static {
        futures_util::stream::unfold(self, |mut sub| async move {
            sub.next().await.map(|item| (item, sub))
        })
    }

    /// Turns the subscription into a `Stream` of [`next_batch`](Self::next_batch)es.
    pub fn into_batches(
        self,
        max: usize,
        max_bytes: usize,
    ) -> impl Stream<Item = Result<Vec<Delivery>>> + Send + 'static {
        futures_util::stream::unfold(self, move |mut sub| async move {
            sub.next_batch(max, max_bytes).await.map(|item| (item, sub))
        })
    }

    fn end(&mut self) {
        self.done = true;
        self.stash = None;
        self.buf.clear();
        self.gap_from = None;
    }

    fn gap(&self, requested_offset: u64, first_available_offset: u64) -> Delivery {
        Metrics::add(&self.core.metrics().gap_notices, 1);
        Delivery::Gap {
            requested_offset,
            first_available_offset,
        }
    }

    /// Takes a live event: skip it if already delivered, queue it if it is the next one, and
    /// otherwise keep it aside and read the hole before it from the log.
    fn accept(&mut self, ev: Arc<RecordedEvent>) {
        if ev.offset() < self.next {
            return;
        }
        if ev.offset() == self.next {
            self.next += 1;
            self.buf.push_back(ev);
        } else {
            self.read_until = ev.offset();
            self.stash = Some(ev);
        }
    }

    /// Re-reads the published state after lagging (or after the channel went away).
    fn refresh(&mut self, resubscribe: bool) {
        let capacity = self.core.config().broadcast_capacity;
        let Some((rx, st)) = self.q.refresh(resubscribe.then_some(capacity)) else {
            self.end();
            return;
        };
        if let Some(rx) = rx {
            self.rx = rx;
        }
        self.read_until = self.read_until.max(st.next_offset);
        if st.closed {
            self.close_at = Some(st.next_offset);
        }
        self.finished_at = st.finished_at;
    }

    /// Reads the next step of `next..read_until` from the log (on the blocking pool): at most
    /// [`Config::replay_chunk`](crate::Config::replay_chunk) events and
    /// [`Config::replay_bytes`](crate::Config::replay_bytes) of JSON, or one larger event.
    /// The step may end below `read_until` (which only grows); the next one covers the rest.
    async fn fill(&mut self) -> Result<()> {
        let (from, to) = (self.next, self.read_until);
        let config = self.core.config();
        let events = self
            .core
            .spawn_read(self.q.id(), from, to, config.replay_chunk, self.step_bytes)
            .await
            .map_err(|e| Error::internal(format!("replay task failed: {e}")))??;
        match events.first() {
            None => {
                // Everything owed below `read_until` is gone.
                self.gap_from.get_or_insert(from);
                self.next = to;
                self.refresh(false);
            }
            Some(first) => {
                if first.offset > from {
                    self.gap_from.get_or_insert(from);
                    // The refresh may learn that the queue is gone: then the stream ends here
                    // and nothing read past the hole may be delivered.
                    self.refresh(false);
                    if self.done {
                        return Ok(());
                    }
                }
                for e in events {
                    self.next = e.offset + 1;
                    self.buf.push_back(Arc::new(RecordedEvent::from_stored(e)?));
                }
            }
        }
        Ok(())
    }
}
