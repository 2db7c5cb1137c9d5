//! Per-queue live fan-out: a `tokio::sync::broadcast` sender created when the first subscriber
//! arrives and dropped when a publish finds no receivers, so an idle queue holds no channel.
//! Never touches the store.
//!
//! Everything here is called with the queue's state mutex held. That lock is what makes the
//! replay → live hand-off exact: a subscriber reads the published offset and joins the channel
//! under the lock, and the writer advances the published offset and sends under the same lock,
//! so every event at or past the offset the subscriber read reaches its receiver (or is reported
//! to it as lag).

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::broadcast;

use crate::error::{Error, Result};
use crate::event::{Event, EventType};
use crate::storage::StoredEvent;

/// A committed event as stored: its offset, type, and JSON bytes (offset included), shared by
/// every subscriber that receives it.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedEvent {
    offset: u64,
    event_type: EventType,
    terminal: bool,
    json: Bytes,
}

impl RecordedEvent {
    pub(crate) fn new(offset: u64, event_type: EventType, terminal: bool, json: Bytes) -> Self {
        Self {
            offset,
            event_type,
            terminal,
            json,
        }
    }

    /// An event as the store read it back.
    ///
    /// # Errors
    ///
    /// A storage error when the stored type code is unknown (a corrupt record).
    pub(crate) fn from_stored(e: StoredEvent) -> Result<Self> {
        let event_type = EventType::from_code(e.event_type)
            .ok_or_else(|| Error::storage("corrupt event record: unknown type"))?;
        Ok(Self::new(e.offset, event_type, e.terminal, e.json))
    }

    /// The event's offset.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The event's type.
    pub fn event_type(&self) -> EventType {
        self.event_type
    }

    /// Whether this event finishes its task (see the terminal rule).
    pub fn is_terminal(&self) -> bool {
        self.terminal
    }

    /// The event's JSON exactly as stored (cheap to clone).
    pub fn json(&self) -> &Bytes {
        &self.json
    }

    /// Parses the JSON into an [`Event`].
    ///
    /// # Errors
    ///
    /// Only if the stored bytes are corrupt.
    pub fn event(&self) -> Result<Event> {
        Event::from_json_bytes(&self.json)
    }
}

/// What the writer sends to live subscribers, in commit order.
#[derive(Debug, Clone)]
pub(crate) enum Live {
    /// A committed event.
    Event(Arc<RecordedEvent>),
    /// The queue was closed when `next_offset` was `at`: no event at or past `at` will come.
    Closed { at: u64 },
    /// Events below `to` are committed but were not sent (another node appended them and
    /// they could not be read for the fan-out): read them from the store.
    Advanced { to: u64 },
    /// The queue was deleted or expired.
    Removed,
}

/// The optional sender of one queue.
#[derive(Debug, Default)]
pub(crate) struct Hub {
    tx: Option<broadcast::Sender<Live>>,
}

impl Hub {
    /// A new receiver, creating the channel if there is none.
    pub(crate) fn subscribe(&mut self, capacity: usize) -> broadcast::Receiver<Live> {
        match &self.tx {
            Some(tx) => tx.subscribe(),
            None => {
                let (tx, rx) = broadcast::channel(capacity.max(1));
                self.tx = Some(tx);
                rx
            }
        }
    }

    /// Sends to every receiver; drops the channel once nobody listens.
    pub(crate) fn publish(&mut self, msg: Live) {
        if let Some(tx) = &self.tx
            && tx.send(msg).is_err()
        {
            self.tx = None;
        }
    }

    /// Whether a channel exists (for tests of the idle-queue footprint).
    pub(crate) fn is_open(&self) -> bool {
        self.tx.is_some()
    }

    /// Drops the channel: receivers see it closed after draining what was sent.
    pub(crate) fn shut(&mut self) {
        self.tx = None;
    }
}
