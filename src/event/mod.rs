//! Events: the five event types, their validation and their JSON wire form.
//!
//! The JSON shape follows the contract (DESIGN.md, "Events"): base fields first (`event_id`,
//! `task_id`, `tenant_id`, `timestamp`, `event_type`, `offset`), then the type's fields in a fixed
//! order; absent optionals are written as `null`, never omitted. [`Event::render`] writes that JSON
//! once, split around the offset, so the queue can splice the offset in at commit time without
//! encoding the event again.

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use crate::error::Error;
use crate::ids::{EventId, TaskId, TenantId};

mod canonical;
mod parse;
mod wire;

// The readers the server's request bodies use; the library alone uses only some of them.
#[cfg_attr(not(feature = "server"), allow(unused_imports))]
pub(crate) use parse::{
    EventReader, Failure, FieldError, FromFieldError, ObjectSeed, ReadObject, ReceivedReader,
    next_key, read_received, read_slice, struct_from_slice,
};
use wire::{Head, PayloadWire, Wire};

// ---------------------------------------------------------------------------------------------
// Timestamp
// ---------------------------------------------------------------------------------------------

/// Earliest representable instant, `0000-01-01T00:00:00.000000Z`, in µs since the Unix epoch.
const MIN_MICROS: i64 = -62_167_219_200_000_000;
/// Latest representable instant, `9999-12-31T23:59:59.999999Z`, in µs since the Unix epoch.
const MAX_MICROS: i64 = 253_402_300_799_999_999;

/// Length of [`Timestamp::to_rfc3339`]'s text.
const RFC3339_LEN: usize = "2026-11-28T02:31:45.664387Z".len();

/// An instant in microseconds since the Unix epoch, UTC.
///
/// Values are kept within years 0000..=9999, the range an RFC 3339 date-time can express, so
/// every timestamp renders and parses back unchanged; constructors clamp to that range.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct Timestamp(i64);

impl Timestamp {
    /// The system clock, truncated to microseconds.
    pub fn now() -> Self {
        Self::from_micros(Utc::now().timestamp_micros())
    }

    /// An instant given in microseconds since the Unix epoch (clamped to years 0000..=9999).
    pub fn from_micros(us: i64) -> Self {
        Self(us.clamp(MIN_MICROS, MAX_MICROS))
    }

    /// Microseconds since the Unix epoch.
    pub fn as_micros(self) -> i64 {
        self.0
    }

    /// RFC 3339 in UTC with exactly six fractional digits and `Z`, e.g.
    /// `2026-11-28T02:31:45.664387Z`.
    pub fn to_rfc3339(self) -> String {
        let mut buf = [0u8; RFC3339_LEN];
        self.rfc3339(&mut buf).to_owned()
    }

    /// [`to_rfc3339`](Self::to_rfc3339) into `buf`, without allocating: events render one
    /// each.
    fn rfc3339(self, buf: &mut [u8; RFC3339_LEN]) -> &str {
        const DAY_US: i64 = 86_400_000_000;
        let (days, in_day) = (self.0.div_euclid(DAY_US), self.0.rem_euclid(DAY_US));
        // Days since 1970-01-01 to a proleptic Gregorian date (H. Hinnant, "chrono-Compatible
        // Low-Level Date Algorithms", civil_from_days).
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        let year = yoe + era * 400 + i64::from(month <= 2);
        let secs = in_day / 1_000_000;
        let fields = [
            (0, 4, year),
            (5, 2, month),
            (8, 2, day),
            (11, 2, secs / 3600),
            (14, 2, secs / 60 % 60),
            (17, 2, secs % 60),
            (20, 6, in_day % 1_000_000),
        ];
        *buf = *b"0000-00-00T00:00:00.000000Z";
        for (at, width, n) in fields {
            // The clamp in the constructors keeps the year within 0000..=9999: every field
            // is small and non-negative.
            let mut n = n as u32;
            for i in (at..at + width).rev() {
                buf[i] = b'0' + (n % 10) as u8;
                n /= 10;
            }
        }
        // Only ASCII digits were written over an ASCII template.
        std::str::from_utf8(buf).expect("ASCII")
    }

    /// Parses an RFC 3339 date-time with any offset and normalises it to UTC microseconds
    /// (sub-microsecond digits are truncated).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidEvent`] with field `timestamp` when `s` is not an RFC 3339 date-time.
    pub fn parse_rfc3339(s: &str) -> Result<Self, Error> {
        DateTime::parse_from_rfc3339(s)
            .map(|dt| Self::from_micros(dt.timestamp_micros()))
            .map_err(|e| {
                Error::invalid_event(
                    "timestamp",
                    format!(
                        "must be an RFC 3339 date-time such as 2026-11-28T02:31:45.664387Z, \
                         got {}: {e}",
                        preview(s)
                    ),
                )
            })
    }

    /// This instant plus `d`, saturating at the end of the representable range.
    pub fn saturating_add(self, d: Duration) -> Self {
        let add = i64::try_from(d.as_micros()).unwrap_or(i64::MAX);
        Self::from_micros(self.0.saturating_add(add))
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_rfc3339())
    }
}

impl serde::Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.rfc3339(&mut [0; RFC3339_LEN]))
    }
}

impl<'de> serde::Deserialize<'de> for Timestamp {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Self::parse_rfc3339(&s).map_err(|e| match e {
            Error::InvalidEvent { reason, .. } => serde::de::Error::custom(reason),
            other => serde::de::Error::custom(other),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Task states and event types
// ---------------------------------------------------------------------------------------------

/// A task's state as reported by a `status` event.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TaskState {
    /// `pending`
    Pending,
    /// `working`
    Working,
    /// `input-required`
    InputRequired,
    /// `completed` (not terminal: the `complete` event carrying the result follows it)
    Completed,
    /// `failed` (terminal)
    Failed,
    /// `cancelled` (terminal)
    Cancelled,
}

impl TaskState {
    /// Every state, in wire order.
    pub const ALL: [TaskState; 6] = [
        TaskState::Pending,
        TaskState::Working,
        TaskState::InputRequired,
        TaskState::Completed,
        TaskState::Failed,
        TaskState::Cancelled,
    ];

    /// The wire string.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Pending => "pending",
            TaskState::Working => "working",
            TaskState::InputRequired => "input-required",
            TaskState::Completed => "completed",
            TaskState::Failed => "failed",
            TaskState::Cancelled => "cancelled",
        }
    }

    /// Parses a wire string; `None` for anything else.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|state| state.as_str() == s)
    }
}

impl fmt::Display for TaskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The kind of an event.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventType {
    /// `status`
    Status,
    /// `progress`
    Progress,
    /// `artifact`
    Artifact,
    /// `error`
    Error,
    /// `complete`
    Complete,
    /// A Durable Streams message stored as given (a queue of kind `stream`): not an event a
    /// producer can send as JSON, so not in [`EventType::ALL`].
    #[serde(skip_deserializing)]
    Message,
}

impl EventType {
    /// Every type, in code order.
    pub const ALL: [EventType; 5] = [
        EventType::Status,
        EventType::Progress,
        EventType::Artifact,
        EventType::Error,
        EventType::Complete,
    ];

    /// The wire string.
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Status => "status",
            EventType::Progress => "progress",
            EventType::Artifact => "artifact",
            EventType::Error => "error",
            EventType::Complete => "complete",
            EventType::Message => "message",
        }
    }

    /// Parses a wire string; `None` for anything else.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
    }

    /// A stable one-byte code, `0..=4`, for compact storage.
    pub fn code(self) -> u8 {
        match self {
            EventType::Status => 0,
            EventType::Progress => 1,
            EventType::Artifact => 2,
            EventType::Error => 3,
            EventType::Complete => 4,
            EventType::Message => 5,
        }
    }

    /// The type with the given [`code`](Self::code); `None` outside `0..=5`.
    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            5 => Some(EventType::Message),
            _ => Self::ALL.into_iter().find(|t| t.code() == code),
        }
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// ---------------------------------------------------------------------------------------------
// Payloads
// ---------------------------------------------------------------------------------------------

/// A `status` event: the task's state, optionally with a phase and a message.
#[derive(Clone, PartialEq, Debug)]
pub struct StatusEvent {
    /// The task's state.
    pub state: TaskState,
    /// Free-form phase name (`planning`, `executing`, …).
    pub phase: Option<String>,
    /// Human-readable message.
    pub message: Option<String>,
}

impl StatusEvent {
    /// A status event with no phase and no message.
    pub fn new(state: TaskState) -> Self {
        Self {
            state,
            phase: None,
            message: None,
        }
    }

    /// Sets the phase.
    pub fn phase(mut self, phase: impl Into<String>) -> Self {
        self.phase = Some(phase.into());
        self
    }

    /// Sets the message.
    pub fn message(mut self, message: impl Into<String>) -> Self {
        self.message = Some(message.into());
        self
    }
}

/// A `progress` event: `current` of `total` units done.
#[derive(Clone, PartialEq, Debug)]
pub struct ProgressEvent {
    /// Units done; must not exceed `total`.
    pub current: u64,
    /// Units overall.
    pub total: u64,
    /// Percentage done, `0..=100`.
    pub percentage: f64,
    /// Name of the current step.
    pub step: Option<String>,
    /// Free-form details; a JSON object.
    pub details: Value,
}

impl ProgressEvent {
    /// Progress with `percentage` computed as `current / total * 100` (0 when `total` is 0) and
    /// empty details.
    pub fn new(current: u64, total: u64) -> Self {
        Self {
            current,
            total,
            percentage: computed_percentage(current, total),
            step: None,
            details: empty_object(),
        }
    }

    /// Sets the step name.
    pub fn step(mut self, step: impl Into<String>) -> Self {
        self.step = Some(step.into());
        self
    }

    /// Sets the details (must be a JSON object to validate).
    pub fn details(mut self, details: Value) -> Self {
        self.details = details;
        self
    }

    /// Overrides the computed percentage.
    pub fn percentage(mut self, percentage: f64) -> Self {
        self.percentage = percentage;
        self
    }
}

/// An `artifact` event: an intermediate or final product of the task.
#[derive(Clone, PartialEq, Debug)]
pub struct ArtifactEvent {
    /// Kind of artifact (`search_results`, `summary`, …); must not be empty.
    pub artifact_type: String,
    /// The artifact's id; an id by the rule of [`crate::validate_id`]. Default `art_` + 8 lowercase hex chars.
    pub artifact_id: String,
    /// The artifact; a JSON object.
    pub data: Value,
    /// Whether more parts of this artifact follow.
    pub is_partial: bool,
}

impl ArtifactEvent {
    /// A complete (not partial) artifact with a fresh artifact id.
    pub fn new(artifact_type: impl Into<String>, data: Value) -> Self {
        Self {
            artifact_type: artifact_type.into(),
            artifact_id: generate_artifact_id(),
            data,
            is_partial: false,
        }
    }

    /// Sets the artifact id.
    pub fn artifact_id(mut self, artifact_id: impl Into<String>) -> Self {
        self.artifact_id = artifact_id.into();
        self
    }

    /// Marks the artifact as partial.
    pub fn partial(mut self) -> Self {
        self.is_partial = true;
        self
    }
}

/// An `error` event. A non-recoverable error finishes the task.
#[derive(Clone, PartialEq, Debug)]
pub struct ErrorEvent {
    /// Kind of error; must not be empty.
    pub error_type: String,
    /// Human-readable message; must not be empty.
    pub error_message: String,
    /// Machine-readable code.
    pub error_code: Option<String>,
    /// Free-form context; a JSON object.
    pub context: Value,
    /// Whether the task continues after this error (default `true`).
    pub recoverable: bool,
}

impl ErrorEvent {
    /// A recoverable error with no code and empty context.
    pub fn new(error_type: impl Into<String>, error_message: impl Into<String>) -> Self {
        Self {
            error_type: error_type.into(),
            error_message: error_message.into(),
            error_code: None,
            context: empty_object(),
            recoverable: true,
        }
    }

    /// Sets the error code.
    pub fn code(mut self, code: impl Into<String>) -> Self {
        self.error_code = Some(code.into());
        self
    }

    /// Sets the context (must be a JSON object to validate).
    pub fn context(mut self, context: Value) -> Self {
        self.context = context;
        self
    }

    /// Marks the error as non-recoverable: it finishes the task.
    pub fn non_recoverable(mut self) -> Self {
        self.recoverable = false;
        self
    }
}

/// A `complete` event: the task's result. It finishes the task.
#[derive(Clone, PartialEq, Debug)]
pub struct CompleteEvent {
    /// The result; a JSON object.
    pub result: Value,
    /// Human-readable summary.
    pub summary: Option<String>,
    /// Wall-clock execution time; finite and `>= 0`.
    pub execution_time_seconds: Option<f64>,
}

impl CompleteEvent {
    /// A completion with no summary and no execution time.
    pub fn new(result: Value) -> Self {
        Self {
            result,
            summary: None,
            execution_time_seconds: None,
        }
    }

    /// Sets the summary.
    pub fn summary(mut self, summary: impl Into<String>) -> Self {
        self.summary = Some(summary.into());
        self
    }

    /// Sets the execution time in seconds.
    pub fn execution_time_seconds(mut self, seconds: f64) -> Self {
        self.execution_time_seconds = Some(seconds);
        self
    }
}

/// The type-specific part of an event.
#[derive(Clone, PartialEq, Debug)]
pub enum Payload {
    /// A `status` event.
    Status(StatusEvent),
    /// A `progress` event.
    Progress(ProgressEvent),
    /// An `artifact` event.
    Artifact(ArtifactEvent),
    /// An `error` event.
    Error(ErrorEvent),
    /// A `complete` event.
    Complete(CompleteEvent),
}

impl Payload {
    /// The event type this payload belongs to.
    pub fn event_type(&self) -> EventType {
        match self {
            Payload::Status(_) => EventType::Status,
            Payload::Progress(_) => EventType::Progress,
            Payload::Artifact(_) => EventType::Artifact,
            Payload::Error(_) => EventType::Error,
            Payload::Complete(_) => EventType::Complete,
        }
    }
}

impl From<StatusEvent> for Payload {
    fn from(e: StatusEvent) -> Self {
        Payload::Status(e)
    }
}

impl From<ProgressEvent> for Payload {
    fn from(e: ProgressEvent) -> Self {
        Payload::Progress(e)
    }
}

impl From<ArtifactEvent> for Payload {
    fn from(e: ArtifactEvent) -> Self {
        Payload::Artifact(e)
    }
}

impl From<ErrorEvent> for Payload {
    fn from(e: ErrorEvent) -> Self {
        Payload::Error(e)
    }
}

impl From<CompleteEvent> for Payload {
    fn from(e: CompleteEvent) -> Self {
        Payload::Complete(e)
    }
}

// ---------------------------------------------------------------------------------------------
// Event
// ---------------------------------------------------------------------------------------------

/// The queue an event from a producer is meant for; ids the event omits are taken from here,
/// ids it carries must match.
#[derive(Clone, Copy, Debug)]
pub struct ProducerContext<'a> {
    /// The queue's tenant.
    pub tenant_id: &'a TenantId,
    /// The queue's task.
    pub task_id: &'a TaskId,
}

/// One event of a queue.
#[derive(Clone, PartialEq, Debug)]
pub struct Event {
    /// The event's id (generated, or supplied by the producer for idempotent retries).
    pub event_id: EventId,
    /// The task whose queue holds the event.
    pub task_id: TaskId,
    /// The tenant owning the queue.
    pub tenant_id: TenantId,
    /// When the event happened.
    pub timestamp: Timestamp,
    /// Position in the queue; assigned by the queue at commit, `None` before.
    pub offset: Option<u64>,
    /// The type-specific part.
    pub payload: Payload,
}

/// An event's JSON split around the offset's value: `prefix` ends with `"offset":` and `suffix`
/// starts with `,`.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct RenderedEvent {
    /// Everything up to and including `"offset":`.
    pub prefix: Vec<u8>,
    /// Everything after the offset's value, starting with `,` and ending with `}`.
    pub suffix: Vec<u8>,
}

impl RenderedEvent {
    /// The full JSON with `offset` spliced in, in one allocation of exact size.
    pub fn with_offset(&self, offset: u64) -> Vec<u8> {
        let mut digits = [0u8; 20];
        let digits = decimal(offset, &mut digits);
        let mut out = Vec::with_capacity(self.prefix.len() + digits.len() + self.suffix.len());
        out.extend_from_slice(&self.prefix);
        out.extend_from_slice(digits);
        out.extend_from_slice(&self.suffix);
        out
    }
}

impl Event {
    /// A new event for the queue `(tenant_id, task_id)` with a fresh id, the current time and no
    /// offset.
    pub fn new(tenant_id: &TenantId, task_id: &TaskId, payload: impl Into<Payload>) -> Self {
        Self {
            event_id: EventId::generate(),
            task_id: task_id.clone(),
            tenant_id: tenant_id.clone(),
            timestamp: Timestamp::now(),
            offset: None,
            payload: payload.into(),
        }
    }

    /// Replaces the event id.
    pub fn with_event_id(mut self, event_id: EventId) -> Self {
        self.event_id = event_id;
        self
    }

    /// Replaces the timestamp.
    pub fn with_timestamp(mut self, timestamp: Timestamp) -> Self {
        self.timestamp = timestamp;
        self
    }

    /// The event's type.
    pub fn event_type(&self) -> EventType {
        self.payload.event_type()
    }

    /// Whether this event finishes its task: a `complete` event, an `error` with
    /// `recoverable: false`, or a `status` with state `failed` or `cancelled`. (`status:
    /// completed` is not terminal.)
    pub fn is_terminal(&self) -> bool {
        PayloadWire::from(&self.payload).is_terminal()
    }

    /// Checks everything the types do not guarantee.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidEvent`] naming the offending field, or [`Error::InvalidId`] with field
    /// `artifact_id` for a bad artifact id.
    pub fn validate(&self) -> Result<(), Error> {
        PayloadWire::from(&self.payload).validate()
    }

    /// The event's JSON split around the offset's value, for splicing the offset in at commit.
    pub fn render(&self) -> RenderedEvent {
        render(&Head::of(self), &PayloadWire::from(&self.payload))
    }

    /// The full JSON, with `offset` set to [`self.offset`](Self::offset) (`null` when `None`).
    pub fn to_json(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        let head = Head {
            offset: self.offset,
            ..Head::of(self)
        };
        wire::write(&mut out, &head);
        // The payload's fields continue the head's object: its `}` goes, the payload's
        // `{` becomes `,`.
        out.pop();
        let end = out.len();
        wire::write(&mut out, &PayloadWire::from(&self.payload));
        out[end] = b',';
        out
    }

    /// The event as its wire struct.
    fn wire(&self) -> Wire<'_> {
        Wire {
            head: Head {
                offset: self.offset,
                ..Head::of(self)
            },
            payload: PayloadWire::from(&self.payload),
        }
    }

    /// Parses an event sent by a producer (an HTTP body object) for the queue named by `ctx`.
    ///
    /// `task_id` and `tenant_id` may be omitted (filled in from `ctx`) but must match `ctx`
    /// when given; `event_id` and `timestamp` are generated when absent or null; a producer's
    /// `offset` is ignored. Unknown fields are rejected. The result is [validated](Self::validate).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidEvent`] or [`Error::InvalidId`] naming the offending field.
    pub fn from_producer_json(value: Value, ctx: &ProducerContext) -> Result<Event, Error> {
        parse::read_value(value, EventReader { ctx: Some(ctx) }).map(|(event, _)| event)
    }

    /// [`from_producer_json`](Self::from_producer_json) from the JSON text, without building
    /// a `serde_json::Value` of it first.
    ///
    /// # Errors
    ///
    /// As [`from_producer_json`](Self::from_producer_json); text that is not JSON is an
    /// [`Error::InvalidEvent`] with field `event`.
    pub fn from_producer_bytes(bytes: &[u8], ctx: &ProducerContext) -> Result<Event, Error> {
        parse::read_slice(bytes, EventReader { ctx: Some(ctx) }).map(|(event, _)| event)
    }

    /// Parses an event as written by [`to_json`](Self::to_json) or
    /// [`RenderedEvent::with_offset`], keeping its offset. `task_id` and `tenant_id` are
    /// required; the result is [validated](Self::validate).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidEvent`] or [`Error::InvalidId`] naming the offending field.
    pub fn from_json_bytes(bytes: &[u8]) -> Result<Event, Error> {
        parse::read_slice(bytes, EventReader { ctx: None }).map(|(event, _)| event)
    }
}

/// An event's JSON from its parts, split around the offset's value (see [`Event::render`]).
fn render<J: serde::Serialize>(head: &Head<'_>, payload: &PayloadWire<'_, J>) -> RenderedEvent {
    // Both parts are written into this thread's scratch buffer and copied out at their
    // exact size: one allocation each, where growing a guessed capacity took two more
    // for an event of a few hundred bytes (this runs once per event received).
    thread_local! {
        static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    /// A larger scratch buffer (after a large event) is not kept.
    const KEEP: usize = 64 << 10;
    let render = |scratch: &mut Vec<u8>| {
        scratch.clear();
        wire::write(scratch, head);
        // The head renders as `{…,"offset":null}`; the prefix ends before the `null`.
        debug_assert!(scratch.ends_with(b"\"offset\":null}"));
        let prefix = scratch[..scratch.len() - b"null}".len()].to_vec();
        scratch.clear();
        wire::write(scratch, payload);
        let mut suffix = scratch.to_vec();
        // Every type has fields: `{"…` becomes `,"…`.
        suffix[0] = b',';
        if scratch.capacity() > KEEP {
            *scratch = Vec::new();
        }
        RenderedEvent { prefix, suffix }
    };
    SCRATCH
        .try_with(|s| match s.try_borrow_mut() {
            Ok(mut scratch) => render(&mut scratch),
            // Only if rendering ever rendered an event itself.
            Err(_) => render(&mut Vec::new()),
        })
        // While the thread's locals are being torn down.
        .unwrap_or_else(|_| render(&mut Vec::new()))
}

/// An event a producer sent, read straight into what the writer stores (by
/// [`ReceivedReader`]: parsed, checked against its queue, validated and rendered in one pass,
/// its free-form fields' text copied rather than built into `Value`s and written again).
#[derive(Debug)]
#[cfg_attr(not(feature = "server"), allow(dead_code))]
pub(crate) struct Received {
    pub event_id: EventId,
    /// The producer gave no `event_id`: `event_id` was generated on receipt.
    pub generated_id: bool,
    pub event_type: EventType,
    pub terminal: bool,
    pub timestamp: Timestamp,
    pub rendered: RenderedEvent,
}

impl serde::Serialize for Event {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        serde::Serialize::serialize(&self.wire(), s)
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn empty_object() -> Value {
    Value::Object(Map::new())
}

fn computed_percentage(current: u64, total: u64) -> f64 {
    if total == 0 {
        0.0
    } else {
        current as f64 / total as f64 * 100.0
    }
}

fn generate_artifact_id() -> String {
    format!("art_{:08x}", fastrand::u32(..))
}

/// Formats `n` in decimal into `buf`, returning the digits.
pub(crate) fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &buf[i..]
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// A user-supplied string quoted for an error message, cut to a readable length.
fn preview(s: &str) -> String {
    const MAX_CHARS: usize = 64;
    if s.chars().count() <= MAX_CHARS {
        format!("{s:?}")
    } else {
        let cut: String = s.chars().take(MAX_CHARS).collect();
        format!("{cut:?}…")
    }
}

#[cfg(test)]
mod tests {
    use super::parse::{EventReader, ReceivedReader};
    use super::*;
    use chrono::SecondsFormat;
    use proptest::prelude::*;
    use serde_json::json;

    fn tenant() -> TenantId {
        TenantId::new("t1").expect("valid tenant")
    }

    fn task() -> TaskId {
        TaskId::new("wf1").expect("valid task")
    }

    fn event(payload: impl Into<Payload>) -> Event {
        Event::new(&tenant(), &task(), payload)
    }

    /// `value` read as a producer's event; its text read both ways must agree (see
    /// [`read_both`]).
    fn parse(value: Value) -> Result<Event, Error> {
        let (tenant, task) = (tenant(), task());
        let event = Event::from_producer_json(
            value.clone(),
            &ProducerContext {
                tenant_id: &tenant,
                task_id: &task,
            },
        );
        let _ = read_both(&serde_json::to_vec(&value).expect("a Value renders"));
        event
    }

    /// `bytes` read as a producer's event, both ways (see [`read_both`]).
    fn parse_bytes(bytes: &[u8]) -> Result<Event, Error> {
        read_both(bytes)
    }

    /// Reads `bytes` both ways a producer's event is read, into an [`Event`] and straight
    /// into its stored form ([`Received`], as the server does), and checks that they agree:
    /// the same error, or the same stored bytes (what was generated on receipt aside: an
    /// absent id, timestamp or artifact id). Returns the [`Event`].
    fn read_both(bytes: &[u8]) -> Result<Event, Error> {
        let (tenant, task) = (tenant(), task());
        let ctx = ProducerContext {
            tenant_id: &tenant,
            task_id: &task,
        };
        let event = parse::read_slice(bytes, EventReader { ctx: Some(&ctx) });
        let received = parse::read_slice(bytes, ReceivedReader { ctx: &ctx });
        let shown = String::from_utf8_lossy(bytes);
        match (&event, received) {
            (Err(a), Err(b)) => assert_eq!(format!("{a:?}"), format!("{b:?}"), "{shown}"),
            (Ok((e, generated_id)), Ok(r)) => {
                assert_eq!(*generated_id, r.generated_id, "{shown}");
                assert_eq!(e.event_type(), r.event_type, "{shown}");
                assert_eq!(e.is_terminal(), r.terminal, "{shown}");
                let given: Value = serde_json::from_slice(bytes).expect("JSON");
                let absent = |key: &str| given.get(key).is_none_or(Value::is_null);
                let mut e = e.clone();
                if r.generated_id {
                    e.event_id = r.event_id.clone();
                } else {
                    assert_eq!(e.event_id, r.event_id);
                }
                if absent("timestamp") {
                    e.timestamp = r.timestamp;
                }
                assert_eq!(e.timestamp, r.timestamp, "{shown}");
                if let Payload::Artifact(a) = &mut e.payload
                    && absent("artifact_id")
                {
                    let stored = Event::from_json_bytes(&r.rendered.with_offset(0))
                        .expect("stored JSON reads back");
                    let Payload::Artifact(s) = stored.payload else {
                        panic!("not an artifact: {shown}")
                    };
                    a.artifact_id = s.artifact_id;
                }
                assert_eq!(
                    String::from_utf8_lossy(&e.render().with_offset(3)),
                    String::from_utf8_lossy(&r.rendered.with_offset(3)),
                    "{shown}"
                );
            }
            (a, b) => panic!("{shown}: read as {a:?} and as {b:?}"),
        }
        event.map(|(e, _)| e)
    }

    fn err_field(result: Result<Event, Error>) -> String {
        match result {
            Err(Error::InvalidEvent { field, .. }) => field,
            Err(Error::InvalidId { field, .. }) => field.to_string(),
            Err(other) => panic!("unexpected error {other}"),
            Ok(e) => panic!("expected an error, got {e:?}"),
        }
    }

    fn samples() -> Vec<Event> {
        vec![
            event(StatusEvent::new(TaskState::Working).phase("planning")),
            event(StatusEvent::new(TaskState::InputRequired).message("need \"input\"\n")),
            event(
                ProgressEvent::new(3, 7)
                    .step("embed")
                    .details(json!({"b": [1, 2], "a": {"x": null}})),
            ),
            event(ProgressEvent::new(0, 0)),
            event(ArtifactEvent::new("search_results", json!({"hits": 3})).partial()),
            event(
                ErrorEvent::new("Timeout", "took too long")
                    .code("E1")
                    .non_recoverable(),
            ),
            event(ErrorEvent::new("Transient", "retrying")),
            event(
                CompleteEvent::new(json!({"answer": "é ✓"}))
                    .summary("done")
                    .execution_time_seconds(10.5),
            ),
            event(CompleteEvent::new(json!({}))),
        ]
    }

    // ---- seed behaviours ----

    #[test]
    fn status_event_keeps_fields() {
        let e = event(
            StatusEvent::new(TaskState::Working)
                .phase("planning")
                .message("thinking"),
        );
        assert_eq!(e.event_type(), EventType::Status);
        assert!(e.event_id.as_str().starts_with("evt_"));
        assert!(e.timestamp.as_micros() > 0);
        assert_eq!(e.offset, None);
        let Payload::Status(s) = &e.payload else {
            panic!("not a status event")
        };
        assert_eq!(s.state, TaskState::Working);
        assert_eq!(s.phase.as_deref(), Some("planning"));
        assert_eq!(s.message.as_deref(), Some("thinking"));
    }

    #[test]
    fn progress_event_computes_percentage() {
        let e = event(
            ProgressEvent::new(5, 10)
                .step("ingest")
                .details(json!({"file": "a.mp4"})),
        );
        let Payload::Progress(p) = &e.payload else {
            panic!("not a progress event")
        };
        assert_eq!(p.percentage, 50.0);
        assert_eq!(p.step.as_deref(), Some("ingest"));
        assert_eq!(p.details, json!({"file": "a.mp4"}));
        assert_eq!(ProgressEvent::new(0, 0).percentage, 0.0);
        assert_eq!(ProgressEvent::new(0, 0).details, json!({}));
        assert!(String::from_utf8_lossy(&e.to_json()).contains("\"percentage\":50.0"));
    }

    #[test]
    fn artifact_event_keeps_fields() {
        let e = event(ArtifactEvent::new("search_results", json!({"hits": [1]})).partial());
        let Payload::Artifact(a) = &e.payload else {
            panic!("not an artifact event")
        };
        assert_eq!(a.artifact_type, "search_results");
        assert_eq!(a.data, json!({"hits": [1]}));
        assert!(a.is_partial);
        assert_eq!(a.artifact_id.len(), 12);
        assert!(a.artifact_id.starts_with("art_"));
        assert!(
            a.artifact_id[4..]
                .chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        assert!(e.validate().is_ok());
    }

    #[test]
    fn error_event_keeps_fields() {
        let e = event(
            ErrorEvent::new("ValueError", "bad input")
                .code("E42")
                .context(json!({"line": 3}))
                .non_recoverable(),
        );
        let Payload::Error(x) = &e.payload else {
            panic!("not an error event")
        };
        assert_eq!(x.error_type, "ValueError");
        assert_eq!(x.error_message, "bad input");
        assert_eq!(x.error_code.as_deref(), Some("E42"));
        assert_eq!(x.context, json!({"line": 3}));
        assert!(!x.recoverable);
        assert!(ErrorEvent::new("a", "b").recoverable);
    }

    #[test]
    fn complete_event_keeps_fields() {
        let e = event(
            CompleteEvent::new(json!({"answer": 42}))
                .summary("all done")
                .execution_time_seconds(10.5),
        );
        let Payload::Complete(c) = &e.payload else {
            panic!("not a complete event")
        };
        assert_eq!(c.result, json!({"answer": 42}));
        assert_eq!(c.summary.as_deref(), Some("all done"));
        assert_eq!(c.execution_time_seconds, Some(10.5));
    }

    #[test]
    fn event_json_contains_ids_and_state() {
        let json = String::from_utf8(event(StatusEvent::new(TaskState::Working)).to_json())
            .expect("utf-8");
        assert!(json.contains("wf1"));
        assert!(json.contains("t1"));
        assert!(json.contains("\"working\""));
    }

    // ---- wire form ----

    #[test]
    fn exact_status_json() {
        let mut e = event(StatusEvent::new(TaskState::Working).phase("planning"))
            .with_event_id(EventId::new("evt_0123456789ab").expect("id"))
            .with_timestamp(
                Timestamp::parse_rfc3339("2026-11-28T02:31:45.664387Z").expect("timestamp"),
            );
        e.offset = Some(3);
        let expected = r#"{"event_id":"evt_0123456789ab","task_id":"wf1","tenant_id":"t1","timestamp":"2026-11-28T02:31:45.664387Z","event_type":"status","offset":3,"state":"working","phase":"planning","message":null}"#;
        assert_eq!(String::from_utf8(e.to_json()).expect("utf-8"), expected);
        assert_eq!(serde_json::to_string(&e).expect("serialize"), expected);
        e.offset = None;
        assert!(
            String::from_utf8(e.to_json())
                .expect("utf-8")
                .contains(r#""offset":null,"state""#)
        );
    }

    /// Every type's JSON, byte for byte: field order, number formatting, `null` for absent
    /// optionals. Rendering, `to_json` and `Serialize` must all give exactly this.
    #[test]
    fn exact_json_for_every_type() {
        let head = r#"{"event_id":"evt_0123456789ab","task_id":"wf1","tenant_id":"t1","timestamp":"2026-11-28T02:31:45.664387Z","event_type":"#;
        let cases: Vec<(Payload, &str)> = vec![
            (
                StatusEvent::new(TaskState::InputRequired).into(),
                r#""status","offset":42,"state":"input-required","phase":null,"message":null}"#,
            ),
            (
                StatusEvent::new(TaskState::Working)
                    .phase("planning")
                    .message("need \"input\"\n é")
                    .into(),
                r#""status","offset":42,"state":"working","phase":"planning","message":"need \"input\"\n é"}"#,
            ),
            (
                ProgressEvent::new(1, 3).into(),
                r#""progress","offset":42,"current":1,"total":3,"percentage":33.33333333333333,"step":null,"details":{}}"#,
            ),
            (
                ProgressEvent::new(5, 10)
                    .step("embed")
                    .details(json!({"b": [1, 2.5, null], "a": {"x": true}}))
                    .into(),
                r#""progress","offset":42,"current":5,"total":10,"percentage":50.0,"step":"embed","details":{"a":{"x":true},"b":[1,2.5,null]}}"#,
            ),
            (
                ProgressEvent::new(0, 0).percentage(100.0).into(),
                r#""progress","offset":42,"current":0,"total":0,"percentage":100.0,"step":null,"details":{}}"#,
            ),
            (
                ArtifactEvent::new("search_results", json!({"hits": 3}))
                    .artifact_id("art_0000beef")
                    .into(),
                r#""artifact","offset":42,"artifact_type":"search_results","artifact_id":"art_0000beef","data":{"hits":3},"is_partial":false}"#,
            ),
            (
                ArtifactEvent::new("frames", json!({}))
                    .artifact_id("a1")
                    .partial()
                    .into(),
                r#""artifact","offset":42,"artifact_type":"frames","artifact_id":"a1","data":{},"is_partial":true}"#,
            ),
            (
                ErrorEvent::new("Transient", "retrying").into(),
                r#""error","offset":42,"error_type":"Transient","error_message":"retrying","error_code":null,"context":{},"recoverable":true}"#,
            ),
            (
                ErrorEvent::new("Timeout", "took too long")
                    .code("E1")
                    .context(json!({"after_s": 1e-7}))
                    .non_recoverable()
                    .into(),
                r#""error","offset":42,"error_type":"Timeout","error_message":"took too long","error_code":"E1","context":{"after_s":1e-7},"recoverable":false}"#,
            ),
            (
                CompleteEvent::new(json!({})).into(),
                r#""complete","offset":42,"result":{},"summary":null,"execution_time_seconds":null}"#,
            ),
            (
                CompleteEvent::new(json!({"answer": "é ✓", "n": -3}))
                    .summary("done")
                    .execution_time_seconds(10.0)
                    .into(),
                r#""complete","offset":42,"result":{"answer":"é ✓","n":-3},"summary":"done","execution_time_seconds":10.0}"#,
            ),
        ];
        for (payload, tail) in cases {
            let mut e = event(payload)
                .with_event_id(EventId::new("evt_0123456789ab").expect("id"))
                .with_timestamp(
                    Timestamp::parse_rfc3339("2026-11-28T02:31:45.664387Z").expect("timestamp"),
                );
            let expected = format!("{head}{tail}");
            let rendered = e.render();
            assert_eq!(
                String::from_utf8(rendered.with_offset(42)).expect("utf-8"),
                expected
            );
            let (prefix, suffix) = expected.split_once("42").expect("offset");
            assert_eq!(rendered.prefix, prefix.as_bytes());
            assert_eq!(rendered.suffix, suffix.as_bytes());
            e.offset = Some(42);
            assert_eq!(String::from_utf8(e.to_json()).expect("utf-8"), expected);
            assert_eq!(serde_json::to_string(&e).expect("serialize"), expected);
            assert_eq!(
                Event::from_json_bytes(expected.as_bytes()).expect("parse"),
                e
            );
            e.offset = None;
            assert_eq!(
                String::from_utf8(e.to_json()).expect("utf-8"),
                expected.replace(r#""offset":42"#, r#""offset":null"#)
            );
        }
    }

    #[test]
    fn field_order_for_every_type() {
        let base = [
            "event_id",
            "task_id",
            "tenant_id",
            "timestamp",
            "event_type",
            "offset",
        ];
        for e in samples() {
            let json = String::from_utf8(e.to_json()).expect("utf-8");
            let own: &[&str] = match e.event_type() {
                EventType::Status => &["state", "phase", "message"],
                EventType::Progress => &["current", "total", "percentage", "step", "details"],
                EventType::Artifact => &["artifact_type", "artifact_id", "data", "is_partial"],
                EventType::Error => &[
                    "error_type",
                    "error_message",
                    "error_code",
                    "context",
                    "recoverable",
                ],
                EventType::Complete => &["result", "summary", "execution_time_seconds"],
                EventType::Message => unreachable!("samples are typed events"),
            };
            let mut last = 0;
            for f in base.iter().chain(own) {
                let at = json
                    .find(&format!("\"{f}\":"))
                    .unwrap_or_else(|| panic!("{f} missing in {json}"));
                assert!(at >= last, "{f} out of order in {json}");
                last = at;
            }
        }
    }

    #[test]
    fn rendered_with_offset_equals_to_json() {
        for (i, mut e) in samples().into_iter().enumerate() {
            let rendered = e.render();
            assert!(rendered.prefix.ends_with(b"\"offset\":"));
            assert!(rendered.suffix.starts_with(b","));
            assert!(rendered.suffix.ends_with(b"}"));
            for offset in [0, 7, i as u64 * 1000 + 1, u64::MAX] {
                e.offset = Some(offset);
                let spliced = rendered.with_offset(offset);
                assert_eq!(spliced, e.to_json());
                assert_eq!(spliced.len(), spliced.capacity());
                assert_eq!(spliced, serde_json::to_vec(&e).expect("serialize"));
            }
        }
    }

    #[test]
    fn round_trip_through_json_bytes() {
        for (i, mut e) in samples().into_iter().enumerate() {
            e.offset = Some(i as u64);
            let back = Event::from_json_bytes(&e.to_json()).expect("parse");
            assert_eq!(back, e);
            e.offset = None;
            let back = Event::from_json_bytes(&e.to_json()).expect("parse");
            assert_eq!(back, e);
        }
    }

    #[test]
    fn json_bytes_requires_ids_and_valid_offset() {
        let bad = br#"{"event_type":"status","state":"working","task_id":"wf1"}"#;
        assert_eq!(err_field(Event::from_json_bytes(bad)), "tenant_id");
        let bad = br#"{"event_type":"status","state":"working","tenant_id":"t1","task_id":"wf1","offset":-1}"#;
        assert_eq!(err_field(Event::from_json_bytes(bad)), "offset");
        assert_eq!(err_field(Event::from_json_bytes(b"{nope")), "event");
        assert_eq!(err_field(Event::from_json_bytes(b"[1]")), "event");
    }

    // ---- timestamps ----

    #[test]
    fn timestamp_format_and_parse() {
        let ts = Timestamp::from_micros(1_795_833_105_664_387);
        assert_eq!(ts.to_rfc3339(), "2026-11-28T02:31:45.664387Z");
        assert_eq!(ts.to_string(), ts.to_rfc3339());
        assert_eq!(
            Timestamp::from_micros(0).to_rfc3339(),
            "1970-01-01T00:00:00.000000Z"
        );
        let now = Timestamp::now().to_rfc3339();
        let (_, frac) = now.rsplit_once('.').expect("fraction");
        assert_eq!(frac.len(), 7, "{now}");
        assert!(frac.ends_with('Z'));

        let shifted = Timestamp::parse_rfc3339("2026-11-28T04:31:45.664387+02:00").expect("parse");
        assert_eq!(shifted, ts);
        let ns = Timestamp::parse_rfc3339("2026-11-28T02:31:45.664387999Z").expect("parse");
        assert_eq!(ns, ts);
        let whole = Timestamp::parse_rfc3339("2026-11-28T02:31:45Z").expect("parse");
        assert_eq!(whole.to_rfc3339(), "2026-11-28T02:31:45.000000Z");

        for bad in ["", "yesterday", "2026-11-28", "2026-11-28T02:31:45"] {
            match Timestamp::parse_rfc3339(bad) {
                Err(Error::InvalidEvent { field, .. }) => assert_eq!(field, "timestamp"),
                other => panic!("{bad}: {other:?}"),
            }
        }
        assert_eq!(
            serde_json::to_string(&ts).expect("serialize"),
            "\"2026-11-28T02:31:45.664387Z\""
        );
    }

    /// The allocation-free formatting agrees with chrono's over the whole range.
    #[test]
    fn timestamp_text_matches_chrono() {
        let chrono_text = |us: i64| {
            DateTime::<Utc>::from_timestamp_micros(us)
                .expect("in range")
                .to_rfc3339_opts(SecondsFormat::Micros, true)
        };
        let day = 86_400_000_000;
        let mut cases = vec![
            MIN_MICROS,
            MIN_MICROS + 1,
            MAX_MICROS,
            MAX_MICROS - 1,
            0,
            -1,
            1,
            day - 1,
            -day,
            951_782_400_000_000,    // 2000-02-29
            4_107_542_400_000_000,  // 2100-03-01
            -2_203_891_200_000_000, // 1900-02-28
        ];
        let mut rng = fastrand::Rng::with_seed(7);
        cases.extend((0..200_000).map(|_| rng.i64(MIN_MICROS..=MAX_MICROS)));
        cases.extend((0..20_000).map(|_| rng.i64(-3 * day..3 * day)));
        for us in cases {
            assert_eq!(
                Timestamp::from_micros(us).to_rfc3339(),
                chrono_text(us),
                "{us}"
            );
        }
    }

    #[test]
    fn timestamp_range_is_clamped_and_round_trips() {
        let min = Timestamp::from_micros(i64::MIN);
        let max = Timestamp::from_micros(i64::MAX);
        assert_eq!(min.to_rfc3339(), "0000-01-01T00:00:00.000000Z");
        assert_eq!(max.to_rfc3339(), "9999-12-31T23:59:59.999999Z");
        for ts in [min, max] {
            assert_eq!(
                Timestamp::parse_rfc3339(&ts.to_rfc3339()).expect("parse"),
                ts
            );
        }
        assert_eq!(max.saturating_add(Duration::MAX), max);
        let ts = Timestamp::from_micros(1_000_000);
        assert_eq!(
            ts.saturating_add(Duration::from_millis(1500)).as_micros(),
            2_500_000
        );
    }

    // ---- enums ----

    #[test]
    fn enum_strings_and_codes() {
        for state in TaskState::ALL {
            assert_eq!(TaskState::parse(state.as_str()), Some(state));
            assert_eq!(
                serde_json::to_string(&state).expect("serialize"),
                format!("\"{}\"", state.as_str())
            );
        }
        assert_eq!(TaskState::InputRequired.as_str(), "input-required");
        assert_eq!(TaskState::parse("Working"), None);
        for (i, t) in EventType::ALL.into_iter().enumerate() {
            assert_eq!(EventType::parse(t.as_str()), Some(t));
            assert_eq!(t.code() as usize, i);
            assert_eq!(EventType::from_code(t.code()), Some(t));
        }
        // Code 5 is a stream's message: stored and read back, never parsed from event JSON.
        assert_eq!(EventType::from_code(5), Some(EventType::Message));
        assert_eq!(EventType::parse("message"), None);
        assert_eq!(EventType::from_code(6), None);
    }

    // ---- terminal rule ----

    #[test]
    fn terminal_rule() {
        let cases: Vec<(Payload, bool)> = vec![
            (StatusEvent::new(TaskState::Pending).into(), false),
            (StatusEvent::new(TaskState::Working).into(), false),
            (StatusEvent::new(TaskState::InputRequired).into(), false),
            (StatusEvent::new(TaskState::Completed).into(), false),
            (StatusEvent::new(TaskState::Failed).into(), true),
            (StatusEvent::new(TaskState::Cancelled).into(), true),
            (ProgressEvent::new(10, 10).into(), false),
            (ArtifactEvent::new("x", json!({})).into(), false),
            (ErrorEvent::new("E", "m").into(), false),
            (ErrorEvent::new("E", "m").non_recoverable().into(), true),
            (CompleteEvent::new(json!({})).into(), true),
        ];
        for (payload, terminal) in cases {
            let e = event(payload);
            assert_eq!(e.is_terminal(), terminal, "{e:?}");
        }
    }

    // ---- validation and producer parsing ----

    #[test]
    fn validation_names_the_field() {
        let over = event(ProgressEvent::new(11, 10)).validate();
        match over {
            Err(Error::InvalidEvent { field, reason }) => {
                assert_eq!(field, "current");
                assert_eq!(reason, "must not exceed total (10), got 11");
            }
            other => panic!("{other:?}"),
        }
        let cases: Vec<(Payload, &str)> = vec![
            (ProgressEvent::new(1, 0).into(), "current"),
            (
                ProgressEvent::new(1, 2).percentage(150.0).into(),
                "percentage",
            ),
            (
                ProgressEvent::new(1, 2).percentage(-1.0).into(),
                "percentage",
            ),
            (
                ProgressEvent::new(1, 2).percentage(f64::NAN).into(),
                "percentage",
            ),
            (
                ProgressEvent::new(1, 2).details(json!([1])).into(),
                "details",
            ),
            (ArtifactEvent::new("x", json!("text")).into(), "data"),
            (ArtifactEvent::new("", json!({})).into(), "artifact_type"),
            (
                ArtifactEvent::new("x", json!({})).artifact_id("a b").into(),
                "artifact_id",
            ),
            (ErrorEvent::new("", "m").into(), "error_type"),
            (ErrorEvent::new("E", "").into(), "error_message"),
            (
                ErrorEvent::new("E", "m").context(json!(1)).into(),
                "context",
            ),
            (CompleteEvent::new(json!(null)).into(), "result"),
            (
                CompleteEvent::new(json!({}))
                    .execution_time_seconds(-0.5)
                    .into(),
                "execution_time_seconds",
            ),
            (
                CompleteEvent::new(json!({}))
                    .execution_time_seconds(f64::INFINITY)
                    .into(),
                "execution_time_seconds",
            ),
        ];
        for (payload, field) in cases {
            let e = event(payload);
            assert_eq!(err_field(e.validate().map(|()| e.clone())), field, "{e:?}");
        }
        for e in samples() {
            assert!(e.validate().is_ok(), "{e:?}");
        }
    }

    #[test]
    fn producer_json_fills_defaults() {
        let e = parse(json!({"event_type": "progress", "current": 5, "total": 10, "offset": 99}))
            .expect("parse");
        assert_eq!(e.offset, None);
        assert_eq!(e.task_id, task());
        assert_eq!(e.tenant_id, tenant());
        assert!(e.event_id.as_str().starts_with("evt_"));
        assert_eq!(
            e.payload,
            Payload::Progress(ProgressEvent {
                current: 5,
                total: 10,
                percentage: 50.0,
                step: None,
                details: json!({}),
            })
        );

        let e = parse(json!({
            "event_type": "artifact", "artifact_type": "frames", "data": {"n": 1},
            "artifact_id": null, "is_partial": null, "event_id": null, "timestamp": null,
        }))
        .expect("parse");
        let Payload::Artifact(a) = &e.payload else {
            panic!("not an artifact")
        };
        assert!(a.artifact_id.starts_with("art_"));
        assert!(!a.is_partial);

        let e = parse(json!({"event_type": "error", "error_type": "E", "error_message": "m"}))
            .expect("parse");
        assert!(!e.is_terminal());

        let e = parse(json!({
            "event_type": "status", "state": "input-required", "event_id": "evt_custom",
            "task_id": "wf1", "tenant_id": "t1", "timestamp": "2026-11-28T04:31:45.664387+02:00",
        }))
        .expect("parse");
        assert_eq!(e.event_id.as_str(), "evt_custom");
        assert_eq!(e.timestamp.to_rfc3339(), "2026-11-28T02:31:45.664387Z");
        assert_eq!(
            e.payload,
            Payload::Status(StatusEvent::new(TaskState::InputRequired))
        );

        let e = parse(json!({
            "event_type": "complete", "result": {"ok": true}, "execution_time_seconds": 3
        }))
        .expect("parse");
        let Payload::Complete(c) = &e.payload else {
            panic!("not a complete event")
        };
        assert_eq!(c.execution_time_seconds, Some(3.0));
    }

    #[test]
    fn producer_json_errors_name_the_field() {
        let cases = [
            (json!([1, 2]), "event"),
            (json!({"state": "working"}), "event_type"),
            (json!({"event_type": null}), "event_type"),
            (json!({"event_type": "bogus"}), "event_type"),
            (json!({"event_type": 3}), "event_type"),
            (
                json!({"event_type": "status", "state": "working", "colour": 1}),
                "colour",
            ),
            // A field of another type is unknown for this one.
            (
                json!({"event_type": "status", "state": "working", "current": 1}),
                "current",
            ),
            (json!({"event_type": "status"}), "state"),
            (json!({"event_type": "status", "state": "done"}), "state"),
            (
                json!({"event_type": "status", "state": "working", "phase": 1}),
                "phase",
            ),
            (
                json!({"event_type": "status", "state": "working", "task_id": "other"}),
                "task_id",
            ),
            (
                json!({"event_type": "status", "state": "working", "tenant_id": "t2"}),
                "tenant_id",
            ),
            (
                json!({"event_type": "status", "state": "working", "task_id": "a/b"}),
                "task_id",
            ),
            (
                json!({"event_type": "status", "state": "working", "event_id": "x y"}),
                "event_id",
            ),
            (
                json!({"event_type": "status", "state": "working", "timestamp": "now"}),
                "timestamp",
            ),
            (
                json!({"event_type": "status", "state": "working", "timestamp": 5}),
                "timestamp",
            ),
            (json!({"event_type": "progress", "total": 10}), "current"),
            (
                json!({"event_type": "progress", "current": -1, "total": 10}),
                "current",
            ),
            (
                json!({"event_type": "progress", "current": 1.5, "total": 10}),
                "current",
            ),
            (
                json!({"event_type": "progress", "current": "1", "total": 10}),
                "current",
            ),
            (
                json!({"event_type": "progress", "current": 11, "total": 10}),
                "current",
            ),
            (
                json!({"event_type": "progress", "current": 1, "total": 0}),
                "current",
            ),
            (
                json!({"event_type": "progress", "current": 1, "total": 2, "percentage": 150}),
                "percentage",
            ),
            (
                json!({"event_type": "progress", "current": 1, "total": 2, "percentage": "x"}),
                "percentage",
            ),
            (
                json!({"event_type": "progress", "current": 1, "total": 2, "details": [1]}),
                "details",
            ),
            (
                json!({"event_type": "artifact", "data": {}}),
                "artifact_type",
            ),
            (
                json!({"event_type": "artifact", "artifact_type": "", "data": {}}),
                "artifact_type",
            ),
            (
                json!({"event_type": "artifact", "artifact_type": "x"}),
                "data",
            ),
            (
                json!({"event_type": "artifact", "artifact_type": "x", "data": "s"}),
                "data",
            ),
            (
                json!({"event_type": "artifact", "artifact_type": "x", "data": {}, "is_partial": "yes"}),
                "is_partial",
            ),
            (
                json!({"event_type": "error", "error_type": "E"}),
                "error_message",
            ),
            (
                json!({"event_type": "error", "error_type": "E", "error_message": "m", "recoverable": 0}),
                "recoverable",
            ),
            (json!({"event_type": "complete"}), "result"),
            (
                json!({"event_type": "complete", "result": {}, "execution_time_seconds": -1}),
                "execution_time_seconds",
            ),
        ];
        for (value, field) in cases {
            let shown = value.to_string();
            assert_eq!(err_field(parse_bytes(shown.as_bytes())), field, "{shown}");
            assert_eq!(err_field(parse(value)), field, "{shown}");
        }
        // Not JSON at all.
        for bad in [
            &b"{"[..],
            b"",
            b"nope",
            br#"{"event_type":"status",}"#,
            b"\xff{",
        ] {
            match parse_bytes(bad) {
                Err(Error::InvalidEvent { field, reason }) => {
                    assert_eq!(field, "event");
                    assert!(reason.starts_with("invalid JSON"), "{reason}");
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn fields_may_come_in_any_order() {
        let texts = [
            r#"{"event_type":"progress","current":5,"total":10,"step":"s","task_id":"wf1"}"#,
            r#"{"step":"s","total":10,"task_id":"wf1","current":5,"event_type":"progress"}"#,
            r#"{"task_id":"wf1","current":5,"event_type":"progress","total":10,"step":"s"}"#,
        ];
        for text in texts {
            let e = parse_bytes(text.as_bytes()).expect(text);
            assert_eq!(
                e.payload,
                Payload::Progress(ProgressEvent::new(5, 10).step("s")),
                "{text}"
            );
            let value: Value = serde_json::from_str(text).expect("json");
            assert_eq!(parse(value).expect(text).payload, e.payload);
        }
    }

    #[test]
    fn a_producers_offset_is_ignored_whatever_it_is() {
        for offset in [
            json!(3),
            json!(-1),
            json!("x"),
            json!({"a": [1]}),
            json!(null),
        ] {
            for value in [
                json!({"offset": offset, "event_type": "status", "state": "working"}),
                json!({"event_type": "status", "offset": offset, "state": "working"}),
            ] {
                let text = value.to_string();
                assert_eq!(parse_bytes(text.as_bytes()).expect(&text).offset, None);
                assert_eq!(parse(value).expect(&text).offset, None);
            }
        }
    }

    #[test]
    fn a_field_twice_is_an_error() {
        for (text, field) in [
            (
                r#"{"event_type":"status","state":"working","state":"failed"}"#,
                "state",
            ),
            (
                r#"{"event_type":"status","state":"working","event_type":"status"}"#,
                "event_type",
            ),
            (
                r#"{"task_id":"wf1","event_type":"status","state":"working","task_id":"wf1"}"#,
                "task_id",
            ),
        ] {
            assert_eq!(err_field(parse_bytes(text.as_bytes())), field, "{text}");
        }
    }

    #[test]
    fn long_values_are_not_echoed_in_full() {
        let long = "x".repeat(10_000);
        for value in [
            json!({"event_type": "status", "state": long}),
            json!({"event_type": "progress", "current": long, "total": 1}),
            json!({"event_type": long}),
            json!({"event_type": "status", "state": "working", long.clone(): 1}),
        ] {
            let text = value.to_string();
            let msg = parse_bytes(text.as_bytes()).expect_err("long").to_string();
            assert!(msg.len() < 400, "{} bytes: {msg}", msg.len());
        }
    }

    #[test]
    fn error_messages_explain() {
        let msg = parse(json!({"event_type": "bogus"}))
            .expect_err("bogus type")
            .to_string();
        assert!(
            msg.contains("status, progress, artifact, error, complete"),
            "{msg}"
        );
        let msg = parse(json!({"event_type": "status", "state": "working", "task_id": "other"}))
            .expect_err("mismatch")
            .to_string();
        assert!(
            msg.contains("task_id does not match the queue (expected wf1, got other)"),
            "{msg}"
        );
        let msg = parse(json!({"event_type": "status", "state": "working", "zzz": 1}))
            .expect_err("unknown")
            .to_string();
        assert!(msg.contains("unknown field"), "{msg}");
        let msg = parse(json!({"event_type": "artifact", "artifact_type": "x", "data": []}))
            .expect_err("data")
            .to_string();
        assert!(msg.contains("object") && msg.contains("array"), "{msg}");
    }

    /// Producer event bodies of every shape: mostly valid ones of each type (required fields
    /// valid, optional ones present or not, free-form ones of any content, base fields given
    /// or not), some with a field of any JSON type or an unknown or repeated key, in any
    /// order; so that both the stored bytes and the errors are compared.
    fn event_body() -> impl Strategy<Value = String> {
        let object = canonical::tests::json_text().prop_map(|v| format!("{{\"v\": {v}, \"a\":0}}"));
        let free = prop_oneof![3 => object, 1 => canonical::tests::json_text()];
        let text = prop_oneof![
            proptest::sample::select(vec![r#""x""#, r#""a b""#, r#""""#, r#""é\n\"""#, "null"])
                .prop_map(str::to_string),
        ];
        let number = proptest::sample::select(vec![
            "0", "1", "3", "10", "2.5", "-1", "100.0", "1e2", "null",
        ])
        .prop_map(str::to_string);
        let boolean =
            proptest::sample::select(vec!["true", "false", "null"]).prop_map(str::to_string);
        let type_fields = (0usize..5).prop_flat_map(move |t| {
            let (name, fields): (&str, Vec<(&str, BoxedStrategy<String>)>) = match t {
                0 => (
                    "status",
                    vec![
                        (
                            "state",
                            proptest::sample::select(vec![
                                r#""working""#,
                                r#""failed""#,
                                r#""cancelled""#,
                            ])
                            .prop_map(str::to_string)
                            .boxed(),
                        ),
                        ("phase", text.clone().boxed()),
                        ("message", text.clone().boxed()),
                    ],
                ),
                1 => (
                    "progress",
                    vec![
                        (
                            "current",
                            proptest::sample::select(vec!["0", "1", "5"])
                                .prop_map(str::to_string)
                                .boxed(),
                        ),
                        (
                            "total",
                            proptest::sample::select(vec!["5", "10", "18446744073709551615"])
                                .prop_map(str::to_string)
                                .boxed(),
                        ),
                        ("percentage", number.clone().boxed()),
                        ("step", text.clone().boxed()),
                        ("details", free.clone().boxed()),
                    ],
                ),
                2 => (
                    "artifact",
                    vec![
                        (
                            "artifact_type",
                            proptest::sample::select(vec![r#""search""#, r#""frames""#])
                                .prop_map(str::to_string)
                                .boxed(),
                        ),
                        ("data", free.clone().boxed()),
                        (
                            "artifact_id",
                            proptest::sample::select(vec![r#""art_1""#, "null"])
                                .prop_map(str::to_string)
                                .boxed(),
                        ),
                        ("is_partial", boolean.clone().boxed()),
                    ],
                ),
                3 => (
                    "error",
                    vec![
                        (
                            "error_type",
                            proptest::sample::select(vec![r#""E""#])
                                .prop_map(str::to_string)
                                .boxed(),
                        ),
                        ("error_message", text.clone().boxed()),
                        ("error_code", text.clone().boxed()),
                        ("context", free.clone().boxed()),
                        ("recoverable", boolean.clone().boxed()),
                    ],
                ),
                _ => (
                    "complete",
                    vec![
                        ("result", free.clone().boxed()),
                        ("summary", text.clone().boxed()),
                        ("execution_time_seconds", number.clone().boxed()),
                    ],
                ),
            };
            let required = match name {
                "status" | "artifact" => 1,
                "progress" | "error" => 2,
                _ => 1,
            };
            let present = proptest::collection::vec(any::<bool>(), fields.len());
            let values: Vec<BoxedStrategy<(String, String)>> = fields
                .into_iter()
                .map(|(k, v)| v.prop_map(move |v| (k.to_string(), v)).boxed())
                .collect();
            (Just(name), values, present).prop_map(move |(name, values, present)| {
                let mut entries = vec![("event_type".to_string(), format!("\"{name}\""))];
                for (i, (entry, keep)) in values.into_iter().zip(present).enumerate() {
                    if i < required || keep {
                        entries.push(entry);
                    }
                }
                entries
            })
        });
        let base = proptest::collection::vec(
            proptest::sample::select(vec![
                ("event_id", r#""evt_0123456789ab""#),
                ("event_id", "null"),
                ("task_id", r#""wf1""#),
                ("tenant_id", r#""t1""#),
                ("timestamp", r#""2026-11-28T02:31:45.664387Z""#),
                ("offset", "7"),
            ]),
            0..3,
        );
        let junk = proptest::collection::vec(
            (
                proptest::sample::select(vec![
                    "state",
                    "current",
                    "details",
                    "data",
                    "result",
                    "event_type",
                    "colour",
                    "task_id",
                    "timestamp",
                    "percentage",
                    "is_partial",
                ]),
                prop_oneof![
                    proptest::sample::select(vec![
                        r#""x""#, "null", "true", "-1", "1e400", "[]", "{}"
                    ])
                    .prop_map(str::to_string),
                    canonical::tests::json_text(),
                ],
            ),
            0..2,
        );
        (
            type_fields,
            base,
            prop_oneof![3 => Just(Vec::new()), 1 => junk],
        )
            .prop_flat_map(|(mut entries, base, junk)| {
                entries.extend(
                    base.into_iter()
                        .map(|(k, v)| (k.to_string(), v.to_string())),
                );
                entries.extend(junk.into_iter().map(|(k, v)| (k.to_string(), v)));
                Just(entries).prop_shuffle()
            })
            .prop_map(|entries| {
                let fields: Vec<String> = entries
                    .into_iter()
                    .map(|(k, v)| format!("\"{k}\":{v}"))
                    .collect();
                format!("{{{}}}", fields.join(","))
            })
    }

    proptest::proptest! {
        #[test]
        fn a_body_reads_the_same_into_an_event_and_into_its_stored_form(body in event_body()) {
            let _ = read_both(body.as_bytes());
        }
    }

    #[test]
    fn valid_bodies_read_the_same_both_ways() {
        for body in [
            // The compare harness's event (keys of `details` out of order).
            r#"{"event_type":"progress","current":1,"total":100,"step":"processing_video","details":{"sent_us":1733480000000000,"pad":"xxxx"}}"#,
            r#"{"event_type":"progress","current":1,"total":3}"#,
            r#"{ "details" : { "b" : [ 1 , 2.50 ] , "a" : "\u00e9\n" } , "total" : 10 , "current" : 5 , "event_type" : "progress" }"#,
            r#"{"event_type":"artifact","artifact_type":"t","data":{"z":1,"z":2,"a":{}}}"#,
            r#"{"event_type":"artifact","artifact_type":"t","artifact_id":"a1","data":{},"is_partial":true}"#,
            r#"{"event_type":"error","error_type":"E","error_message":"m","context":{"k":[null]},"recoverable":false}"#,
            r#"{"event_type":"complete","result":{"answer":"é ✓","n":-3},"summary":"s","execution_time_seconds":10}"#,
            r#"{"event_id":"evt_given","timestamp":"2026-11-28T04:31:45.664387+02:00","event_type":"status","state":"failed","message":"a \"quoted\" line\n"}"#,
            r#"{"event_type":"complete","result":{"$serde_json::private::RawValue":"{\"b\":1,\"a\":2}"}}"#,
        ] {
            read_both(body.as_bytes()).expect(body);
        }
    }
}
