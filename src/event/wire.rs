//! The event's JSON shape, defined once.
//!
//! [`Head`] holds the base fields and one struct per event type holds that type's fields, in
//! wire order. Rendering serialises them (`Event::render`, `Event::to_json`, `impl Serialize
//! for Event`); parsing deserialises them (`super::parse`). Types that are optional on input
//! are `Option`s here: absent and `null` read as `None`, and `None` renders as `null`. Defaults
//! (a generated id, `{}`, a computed percentage, …) are filled in by the conversions below.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::canonical::Canonical;
use super::{
    ArtifactEvent, CompleteEvent, ErrorEvent, Event, EventType, Payload, ProgressEvent,
    StatusEvent, TaskState, Timestamp, computed_percentage, empty_object, generate_artifact_id,
    json_type,
};
use crate::error::Error;
use crate::ids::validate_id;

/// The base fields every event has, first in its JSON.
///
/// Parsing leaves `event_type` to the dispatch on the type (it is never read into a `Head`),
/// and `offset` is only kept where the caller asks for it.
#[derive(Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct Head<'a> {
    #[serde(borrow)]
    pub event_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub task_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub tenant_id: Option<Cow<'a, str>>,
    pub timestamp: Option<Timestamp>,
    pub event_type: Option<EventType>,
    pub offset: Option<u64>,
}

impl<'a> Head<'a> {
    /// The head of `event`, with no offset: it renders ending in `"offset":null}`.
    pub fn of(event: &'a Event) -> Self {
        Self {
            event_id: Some(Cow::Borrowed(event.event_id.as_str())),
            task_id: Some(Cow::Borrowed(event.task_id.as_str())),
            tenant_id: Some(Cow::Borrowed(event.tenant_id.as_str())),
            timestamp: Some(event.timestamp),
            event_type: Some(event.event_type()),
            offset: None,
        }
    }
}

/// A `status` event's fields.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct StatusWire<'a> {
    pub state: TaskState,
    pub phase: Option<Cow<'a, str>>,
    pub message: Option<Cow<'a, str>>,
}

/// A `progress` event's fields. `J`, here and below, is what a free-form field holds: a
/// `Value` (an [`Event`]'s), or its text ([`Canonical`], an event rendered on receipt).
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ProgressWire<'a, J = Cow<'a, Value>> {
    pub current: u64,
    pub total: u64,
    /// Computed from `current` and `total` when absent.
    pub percentage: Option<f64>,
    pub step: Option<Cow<'a, str>>,
    /// `{}` when absent.
    pub details: Option<J>,
}

/// An `artifact` event's fields.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ArtifactWire<'a, J = Cow<'a, Value>> {
    pub artifact_type: Cow<'a, str>,
    /// Generated when absent.
    pub artifact_id: Option<Cow<'a, str>>,
    pub data: J,
    /// `false` when absent.
    pub is_partial: Option<bool>,
}

/// An `error` event's fields.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ErrorWire<'a, J = Cow<'a, Value>> {
    pub error_type: Cow<'a, str>,
    pub error_message: Cow<'a, str>,
    pub error_code: Option<Cow<'a, str>>,
    /// `{}` when absent.
    pub context: Option<J>,
    /// `true` when absent.
    pub recoverable: Option<bool>,
}

/// A `complete` event's fields.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CompleteWire<'a, J = Cow<'a, Value>> {
    pub result: J,
    pub summary: Option<Cow<'a, str>>,
    pub execution_time_seconds: Option<f64>,
}

/// The type's fields of one event; renders as the type's struct (no tag: `event_type` is a
/// base field).
#[derive(Serialize)]
#[serde(untagged)]
pub(super) enum PayloadWire<'a, J = Cow<'a, Value>> {
    Status(StatusWire<'a>),
    Progress(ProgressWire<'a, J>),
    Artifact(ArtifactWire<'a, J>),
    Error(ErrorWire<'a, J>),
    Complete(CompleteWire<'a, J>),
}

/// What a free-form field (`details`, `data`, `context`, `result`) holds.
pub(super) trait FreeForm {
    /// `{}`.
    fn empty_object() -> Self;
    /// The JSON type of the value, as [`json_type`] names it.
    fn json_type(&self) -> &'static str;
}

impl FreeForm for Cow<'_, Value> {
    fn empty_object() -> Self {
        Cow::Owned(empty_object())
    }

    fn json_type(&self) -> &'static str {
        json_type(self)
    }
}

impl FreeForm for Canonical {
    fn empty_object() -> Self {
        Canonical::empty_object()
    }

    fn json_type(&self) -> &'static str {
        self.kind()
    }
}

impl<J: FreeForm> PayloadWire<'_, J> {
    /// The defaults filled in: every optional field that has a default has it (a generated
    /// artifact id, `{}`, the computed percentage, …); only optionals that are `null` by
    /// default stay `None`.
    pub fn with_defaults(self) -> Self {
        match self {
            PayloadWire::Status(s) => PayloadWire::Status(s),
            PayloadWire::Progress(p) => PayloadWire::Progress(ProgressWire {
                percentage: Some(
                    p.percentage
                        .unwrap_or_else(|| computed_percentage(p.current, p.total)),
                ),
                details: Some(p.details.unwrap_or_else(J::empty_object)),
                ..p
            }),
            PayloadWire::Artifact(a) => PayloadWire::Artifact(ArtifactWire {
                artifact_id: Some(
                    a.artifact_id
                        .unwrap_or_else(|| Cow::Owned(generate_artifact_id())),
                ),
                is_partial: Some(a.is_partial.unwrap_or(false)),
                ..a
            }),
            PayloadWire::Error(e) => PayloadWire::Error(ErrorWire {
                context: Some(e.context.unwrap_or_else(J::empty_object)),
                recoverable: Some(e.recoverable.unwrap_or(true)),
                ..e
            }),
            PayloadWire::Complete(c) => PayloadWire::Complete(c),
        }
    }

    /// Checks everything the types do not guarantee (see [`Event::validate`]); an absent
    /// optional counts as its default.
    pub fn validate(&self) -> Result<(), Error> {
        match self {
            PayloadWire::Status(_) => Ok(()),
            PayloadWire::Progress(p) => {
                if p.current > p.total {
                    return Err(Error::invalid_event(
                        "current",
                        format!("must not exceed total ({}), got {}", p.total, p.current),
                    ));
                }
                if let Some(percentage) = p.percentage
                    && (!percentage.is_finite() || !(0.0..=100.0).contains(&percentage))
                {
                    return Err(Error::invalid_event(
                        "percentage",
                        format!("must be a number from 0 to 100, got {percentage}"),
                    ));
                }
                require_object("details", p.details.as_ref())
            }
            PayloadWire::Artifact(a) => {
                require_non_empty("artifact_type", &a.artifact_type)?;
                if let Some(id) = &a.artifact_id {
                    validate_id("artifact_id", id)?;
                }
                require_object("data", Some(&a.data))
            }
            PayloadWire::Error(e) => {
                require_non_empty("error_type", &e.error_type)?;
                require_non_empty("error_message", &e.error_message)?;
                require_object("context", e.context.as_ref())
            }
            PayloadWire::Complete(c) => {
                require_object("result", Some(&c.result))?;
                match c.execution_time_seconds {
                    Some(t) if !t.is_finite() || t < 0.0 => Err(Error::invalid_event(
                        "execution_time_seconds",
                        format!("must be a finite number >= 0, got {t}"),
                    )),
                    _ => Ok(()),
                }
            }
        }
    }

    /// Whether the event finishes its task (see [`Event::is_terminal`]).
    pub fn is_terminal(&self) -> bool {
        match self {
            PayloadWire::Complete(_) => true,
            PayloadWire::Error(e) => !e.recoverable.unwrap_or(true),
            PayloadWire::Status(s) => matches!(s.state, TaskState::Failed | TaskState::Cancelled),
            PayloadWire::Progress(_) | PayloadWire::Artifact(_) => false,
        }
    }
}

/// `Ok` when `value` is absent (its default is `{}`) or a JSON object.
fn require_object(field: &str, value: Option<&impl FreeForm>) -> Result<(), Error> {
    match value.map(FreeForm::json_type) {
        None | Some("object") => Ok(()),
        Some(got) => Err(Error::invalid_event(
            field,
            format!("must be a JSON object, got {got}"),
        )),
    }
}

fn require_non_empty(field: &str, value: &str) -> Result<(), Error> {
    if value.is_empty() {
        Err(Error::invalid_event(field, "must not be empty"))
    } else {
        Ok(())
    }
}

/// A whole event: the head, then the type's fields.
#[derive(Serialize)]
pub(super) struct Wire<'a> {
    #[serde(flatten)]
    pub head: Head<'a>,
    #[serde(flatten)]
    pub payload: PayloadWire<'a>,
}

fn borrowed(s: &Option<String>) -> Option<Cow<'_, str>> {
    s.as_deref().map(Cow::Borrowed)
}

fn owned(s: Option<Cow<'_, str>>) -> Option<String> {
    s.map(Cow::into_owned)
}

impl<'a> From<&'a Payload> for PayloadWire<'a> {
    fn from(payload: &'a Payload) -> Self {
        match payload {
            Payload::Status(s) => PayloadWire::Status(StatusWire {
                state: s.state,
                phase: borrowed(&s.phase),
                message: borrowed(&s.message),
            }),
            Payload::Progress(p) => PayloadWire::Progress(ProgressWire {
                current: p.current,
                total: p.total,
                percentage: Some(p.percentage),
                step: borrowed(&p.step),
                details: Some(Cow::Borrowed(&p.details)),
            }),
            Payload::Artifact(a) => PayloadWire::Artifact(ArtifactWire {
                artifact_type: Cow::Borrowed(&a.artifact_type),
                artifact_id: Some(Cow::Borrowed(&a.artifact_id)),
                data: Cow::Borrowed(&a.data),
                is_partial: Some(a.is_partial),
            }),
            Payload::Error(e) => PayloadWire::Error(ErrorWire {
                error_type: Cow::Borrowed(&e.error_type),
                error_message: Cow::Borrowed(&e.error_message),
                error_code: borrowed(&e.error_code),
                context: Some(Cow::Borrowed(&e.context)),
                recoverable: Some(e.recoverable),
            }),
            Payload::Complete(c) => PayloadWire::Complete(CompleteWire {
                result: Cow::Borrowed(&c.result),
                summary: borrowed(&c.summary),
                execution_time_seconds: c.execution_time_seconds,
            }),
        }
    }
}

impl From<StatusWire<'_>> for Payload {
    fn from(w: StatusWire<'_>) -> Self {
        Payload::Status(StatusEvent {
            state: w.state,
            phase: owned(w.phase),
            message: owned(w.message),
        })
    }
}

impl From<ProgressWire<'_, Cow<'_, Value>>> for Payload {
    fn from(w: ProgressWire<'_, Cow<'_, Value>>) -> Self {
        Payload::Progress(ProgressEvent {
            current: w.current,
            total: w.total,
            percentage: w
                .percentage
                .unwrap_or_else(|| computed_percentage(w.current, w.total)),
            step: owned(w.step),
            details: w.details.map_or_else(empty_object, Cow::into_owned),
        })
    }
}

impl From<ArtifactWire<'_, Cow<'_, Value>>> for Payload {
    fn from(w: ArtifactWire<'_, Cow<'_, Value>>) -> Self {
        Payload::Artifact(ArtifactEvent {
            artifact_type: w.artifact_type.into_owned(),
            artifact_id: owned(w.artifact_id).unwrap_or_else(generate_artifact_id),
            data: w.data.into_owned(),
            is_partial: w.is_partial.unwrap_or(false),
        })
    }
}

impl From<ErrorWire<'_, Cow<'_, Value>>> for Payload {
    fn from(w: ErrorWire<'_, Cow<'_, Value>>) -> Self {
        Payload::Error(ErrorEvent {
            error_type: w.error_type.into_owned(),
            error_message: w.error_message.into_owned(),
            error_code: owned(w.error_code),
            context: w.context.map_or_else(empty_object, Cow::into_owned),
            recoverable: w.recoverable.unwrap_or(true),
        })
    }
}

impl From<CompleteWire<'_, Cow<'_, Value>>> for Payload {
    fn from(w: CompleteWire<'_, Cow<'_, Value>>) -> Self {
        Payload::Complete(CompleteEvent {
            result: w.result.into_owned(),
            summary: owned(w.summary),
            execution_time_seconds: w.execution_time_seconds,
        })
    }
}

impl From<PayloadWire<'_, Cow<'_, Value>>> for Payload {
    fn from(w: PayloadWire<'_, Cow<'_, Value>>) -> Self {
        match w {
            PayloadWire::Status(w) => w.into(),
            PayloadWire::Progress(w) => w.into(),
            PayloadWire::Artifact(w) => w.into(),
            PayloadWire::Error(w) => w.into(),
            PayloadWire::Complete(w) => w.into(),
        }
    }
}

impl EventType {
    /// Reads this type's fields from `d` (the type's struct above), free-form fields as `J`.
    pub(super) fn read_payload<'de, J: Deserialize<'de>, D: serde::Deserializer<'de>>(
        self,
        d: D,
    ) -> Result<PayloadWire<'de, J>, D::Error> {
        Ok(match self {
            EventType::Status => PayloadWire::Status(StatusWire::deserialize(d)?),
            EventType::Progress => PayloadWire::Progress(ProgressWire::deserialize(d)?),
            EventType::Artifact => PayloadWire::Artifact(ArtifactWire::deserialize(d)?),
            EventType::Error => PayloadWire::Error(ErrorWire::deserialize(d)?),
            EventType::Complete => PayloadWire::Complete(CompleteWire::deserialize(d)?),
            EventType::Message => {
                return Err(serde::de::Error::custom(
                    "a stream message is not an event type",
                ));
            }
        })
    }
}

/// Appends `value`, one of the structs above, as compact JSON.
pub(super) fn write<T: Serialize + ?Sized>(buf: &mut Vec<u8>, value: &T) {
    // Only the structs above (strings, numbers, booleans, options of those, ids, timestamps
    // and `serde_json::Value`, whose keys are strings) come here, written to a Vec:
    // serialising cannot fail on any of them.
    value
        .serialize(&mut Writer(buf))
        .expect("serialising an event into memory cannot fail");
}

/// Writes one of the structs above as serde_json's compact form would, except that field
/// names are copied as they are: they are the Rust identifiers of the structs above, which
/// need no escapes (serde_json scans every byte of every name for them, a third of
/// rendering's time). The fields' values are written by [`FieldWriter`].
struct Writer<'b>(&'b mut Vec<u8>);

/// The fields of a struct being written by [`Writer`].
struct StructFields<'a, 'b> {
    writer: &'a mut Writer<'b>,
    first: bool,
}

type Unsupported = serde::ser::Impossible<(), serde_json::Error>;

fn unsupported() -> serde_json::Error {
    serde::ser::Error::custom("only structs are written by the event writer")
}

macro_rules! unsupported {
    ($($method:ident($($arg:ident: $ty:ty),*) -> $ret:ty;)*) => {
        $(fn $method(self, $(_: $ty),*) -> Result<$ret, serde_json::Error> {
            Err(unsupported())
        })*
    };
}

impl<'a, 'b> serde::Serializer for &'a mut Writer<'b> {
    type Ok = ();
    type Error = serde_json::Error;
    type SerializeSeq = Unsupported;
    type SerializeTuple = Unsupported;
    type SerializeTupleStruct = Unsupported;
    type SerializeTupleVariant = Unsupported;
    type SerializeMap = Unsupported;
    type SerializeStruct = StructFields<'a, 'b>;
    type SerializeStructVariant = Unsupported;

    unsupported! {
        serialize_bool(v: bool) -> ();
        serialize_i8(v: i8) -> ();
        serialize_i16(v: i16) -> ();
        serialize_i32(v: i32) -> ();
        serialize_i64(v: i64) -> ();
        serialize_u8(v: u8) -> ();
        serialize_u16(v: u16) -> ();
        serialize_u32(v: u32) -> ();
        serialize_u64(v: u64) -> ();
        serialize_f32(v: f32) -> ();
        serialize_f64(v: f64) -> ();
        serialize_char(v: char) -> ();
        serialize_str(v: &str) -> ();
        serialize_bytes(v: &[u8]) -> ();
        serialize_none() -> ();
        serialize_unit() -> ();
        serialize_unit_struct(name: &'static str) -> ();
        serialize_unit_variant(name: &'static str, index: u32, variant: &'static str) -> ();
        serialize_seq(len: Option<usize>) -> Self::SerializeSeq;
        serialize_tuple(len: usize) -> Self::SerializeTuple;
        serialize_tuple_struct(name: &'static str, len: usize) -> Self::SerializeTupleStruct;
        serialize_tuple_variant(name: &'static str, index: u32, variant: &'static str, len: usize) -> Self::SerializeTupleVariant;
        serialize_map(len: Option<usize>) -> Self::SerializeMap;
        serialize_struct_variant(name: &'static str, index: u32, variant: &'static str, len: usize) -> Self::SerializeStructVariant;
    }

    fn serialize_some<T: Serialize + ?Sized>(self, _: &T) -> Result<(), serde_json::Error> {
        Err(unsupported())
    }

    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: &T,
    ) -> Result<(), serde_json::Error> {
        Err(unsupported())
    }

    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: &T,
    ) -> Result<(), serde_json::Error> {
        Err(unsupported())
    }

    fn serialize_struct(
        self,
        _name: &'static str,
        _len: usize,
    ) -> Result<Self::SerializeStruct, serde_json::Error> {
        self.0.push(b'{');
        Ok(StructFields {
            writer: self,
            first: true,
        })
    }
}

impl serde::ser::SerializeStruct for StructFields<'_, '_> {
    type Ok = ();
    type Error = serde_json::Error;

    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        key: &'static str,
        value: &T,
    ) -> Result<(), serde_json::Error> {
        debug_assert!(
            key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'),
            "{key} needs escaping"
        );
        let buf = &mut *self.writer.0;
        if !self.first {
            buf.push(b',');
        }
        buf.push(b'"');
        buf.extend_from_slice(key.as_bytes());
        buf.extend_from_slice(b"\":");
        self.first = false;
        value.serialize(FieldWriter(buf))
    }

    fn end(self) -> Result<(), serde_json::Error> {
        self.writer.0.push(b'}');
        Ok(())
    }
}

/// Writes one field's value as serde_json's compact form would (through serde_json), except
/// bytes: they are JSON text, written as they are. Only a [`Canonical`] value serialises as
/// bytes (no field of the structs above is a byte string), so an event rendered on receipt
/// copies its free-form fields' text instead of building and writing a `Value`.
struct FieldWriter<'b>(&'b mut Vec<u8>);

impl FieldWriter<'_> {
    fn json<T: Serialize + ?Sized>(self, v: &T) -> Result<(), serde_json::Error> {
        v.serialize(&mut serde_json::Serializer::new(self.0))
    }
}

macro_rules! through_serde_json {
    ($($method:ident($ty:ty);)*) => {
        $(fn $method(self, v: $ty) -> Result<(), serde_json::Error> {
            self.json(&v)
        })*
    };
}

impl<'b> serde::Serializer for FieldWriter<'b> {
    type Ok = ();
    type Error = serde_json::Error;
    type SerializeSeq = Items<'b>;
    type SerializeTuple = Unsupported;
    type SerializeTupleStruct = Unsupported;
    type SerializeTupleVariant = Unsupported;
    type SerializeMap = Entries<'b>;
    type SerializeStruct = Unsupported;
    type SerializeStructVariant = Unsupported;

    through_serde_json! {
        serialize_bool(bool);
        serialize_i8(i8);
        serialize_i16(i16);
        serialize_i32(i32);
        serialize_i64(i64);
        serialize_u8(u8);
        serialize_u16(u16);
        serialize_u32(u32);
        serialize_u64(u64);
        serialize_f32(f32);
        serialize_f64(f64);
        serialize_char(char);
        serialize_str(&str);
    }

    unsupported! {
        serialize_tuple(len: usize) -> Self::SerializeTuple;
        serialize_tuple_struct(name: &'static str, len: usize) -> Self::SerializeTupleStruct;
        serialize_tuple_variant(name: &'static str, index: u32, variant: &'static str, len: usize) -> Self::SerializeTupleVariant;
        serialize_struct(name: &'static str, len: usize) -> Self::SerializeStruct;
        serialize_struct_variant(name: &'static str, index: u32, variant: &'static str, len: usize) -> Self::SerializeStructVariant;
    }

    fn serialize_bytes(self, json: &[u8]) -> Result<(), serde_json::Error> {
        self.0.extend_from_slice(json);
        Ok(())
    }

    fn serialize_none(self) -> Result<(), serde_json::Error> {
        self.serialize_unit()
    }

    fn serialize_some<T: Serialize + ?Sized>(self, v: &T) -> Result<(), serde_json::Error> {
        v.serialize(self)
    }

    fn serialize_unit(self) -> Result<(), serde_json::Error> {
        self.0.extend_from_slice(b"null");
        Ok(())
    }

    fn serialize_unit_struct(self, _: &'static str) -> Result<(), serde_json::Error> {
        self.serialize_unit()
    }

    fn serialize_unit_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
    ) -> Result<(), serde_json::Error> {
        self.json(variant)
    }

    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        v: &T,
    ) -> Result<(), serde_json::Error> {
        v.serialize(self)
    }

    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: &T,
    ) -> Result<(), serde_json::Error> {
        Err(unsupported())
    }

    fn serialize_seq(self, _: Option<usize>) -> Result<Items<'b>, serde_json::Error> {
        self.0.push(b'[');
        Ok(Items {
            buf: self.0,
            first: true,
        })
    }

    fn serialize_map(self, _: Option<usize>) -> Result<Entries<'b>, serde_json::Error> {
        self.0.push(b'{');
        Ok(Entries {
            buf: self.0,
            first: true,
        })
    }
}

/// The elements of an array a [`FieldWriter`] writes (a `Value`'s), each by serde_json.
struct Items<'b> {
    buf: &'b mut Vec<u8>,
    first: bool,
}

impl serde::ser::SerializeSeq for Items<'_> {
    type Ok = ();
    type Error = serde_json::Error;

    fn serialize_element<T: Serialize + ?Sized>(&mut self, v: &T) -> Result<(), Self::Error> {
        if !std::mem::take(&mut self.first) {
            self.buf.push(b',');
        }
        v.serialize(&mut serde_json::Serializer::new(&mut *self.buf))
    }

    fn end(self) -> Result<(), Self::Error> {
        self.buf.push(b']');
        Ok(())
    }
}

/// The entries of an object a [`FieldWriter`] writes (a `Value`'s), each by serde_json.
struct Entries<'b> {
    buf: &'b mut Vec<u8>,
    first: bool,
}

impl serde::ser::SerializeMap for Entries<'_> {
    type Ok = ();
    type Error = serde_json::Error;

    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), Self::Error> {
        if !std::mem::take(&mut self.first) {
            self.buf.push(b',');
        }
        // A `Value`'s keys are strings: written as serde_json writes a string.
        key.serialize(&mut serde_json::Serializer::new(&mut *self.buf))?;
        self.buf.push(b':');
        Ok(())
    }

    fn serialize_value<T: Serialize + ?Sized>(&mut self, v: &T) -> Result<(), Self::Error> {
        v.serialize(&mut serde_json::Serializer::new(&mut *self.buf))
    }

    fn end(self) -> Result<(), Self::Error> {
        self.buf.push(b'}');
        Ok(())
    }
}
