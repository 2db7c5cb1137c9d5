//! Reading JSON objects into the serde-derived wire structs, with errors that name the field.
//!
//! serde's derived code reports a value of the wrong type without saying which field it was
//! in. [`FieldMap`] sits between a JSON object and a derived struct: it reads each key itself,
//! remembers it while the value is read, and reports errors as [`FieldError`]s naming it.
//!
//! An event's JSON has the base fields and the type's fields in one object, in any order, and
//! which struct holds the type's fields depends on `event_type`. [`read_event`] reads entries
//! until it has seen `event_type` (setting aside what came before; producers and this crate
//! write `event_type` ahead of the type's fields, so usually only base fields are set aside),
//! then lets the type's struct read the rest of the object in the same pass, with the base
//! fields diverted to [`Head`], which is read last. No intermediate `Value` of the whole
//! object is built.

use std::borrow::Cow;
use std::cell::Cell;
use std::fmt;

use serde::de::{
    self, DeserializeSeed, Deserializer, IgnoredAny, IntoDeserializer, MapAccess, Visitor,
};
use serde_json::Value;

use super::canonical::{Canonical, transcode_into};
use super::wire::{FreeForm, Head, PayloadWire};
use super::{Event, EventType, ProducerContext, Received, Timestamp, preview, render};
use crate::error::Error;
use crate::ids::{EventId, TaskId, TenantId};

/// Longest reason quoted from serde: its messages may echo a value of any length.
const MAX_REASON_CHARS: usize = 160;

// ---------------------------------------------------------------------------------------------
// Field errors
// ---------------------------------------------------------------------------------------------

/// What is wrong with a JSON object read into a struct.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum FieldError {
    /// The input is not JSON.
    Syntax(String),
    /// The input is JSON but not an object; the JSON type it is.
    NotObject(&'static str),
    /// A field is wrong.
    Field {
        /// The field's name.
        field: String,
        /// What is wrong with it.
        reason: String,
        /// `Some` when the field is not one of the struct's: the struct's fields.
        allowed: Option<&'static [&'static str]>,
    },
    /// Anything else serde reports about the object as a whole.
    Other(String),
}

impl FieldError {
    fn field(field: impl Into<String>, reason: impl fmt::Display) -> Self {
        FieldError::Field {
            field: field.into(),
            reason: cut(reason.to_string()),
            allowed: None,
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FieldError::Syntax(e) => write!(f, "invalid JSON: {e}"),
            FieldError::NotObject(got) => write!(f, "must be a JSON object, got {got}"),
            FieldError::Field {
                field,
                reason,
                allowed: None,
            } => write!(f, "{field}: {reason}"),
            FieldError::Field {
                field,
                reason,
                allowed: Some(allowed),
            } => write!(f, "{field}: {reason} (expected {})", allowed.join(", ")),
            FieldError::Other(e) => f.write_str(e),
        }
    }
}

impl std::error::Error for FieldError {}

/// An error that a [`FieldError`] can be turned into.
pub(crate) trait FromFieldError {
    /// The error for `e`.
    fn from_field_error(e: FieldError) -> Self;
}

impl FromFieldError for FieldError {
    fn from_field_error(e: FieldError) -> Self {
        e
    }
}

impl FromFieldError for Error {
    /// An event's error: about its field, or about the event as a whole (field `event`).
    fn from_field_error(e: FieldError) -> Self {
        match e {
            FieldError::Field {
                field,
                reason,
                allowed: None,
            } => Error::invalid_event(field, reason),
            FieldError::Field {
                field,
                reason,
                allowed: Some(allowed),
            } => Error::invalid_event(field, format!("{reason} (expected {})", allowed.join(", "))),
            other => Error::invalid_event("event", other.to_string()),
        }
    }
}

impl de::Error for FieldError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        FieldError::Other(cut(msg.to_string()))
    }

    fn missing_field(field: &'static str) -> Self {
        FieldError::field(field, "is required")
    }

    fn unknown_field(field: &str, expected: &'static [&'static str]) -> Self {
        FieldError::Field {
            field: field.chars().take(64).collect(),
            reason: "unknown field".into(),
            allowed: Some(expected),
        }
    }

    fn duplicate_field(field: &'static str) -> Self {
        FieldError::field(field, "appears more than once")
    }
}

/// `s` cut to [`MAX_REASON_CHARS`].
/// A reason in the words of the contract rather than of the parser: serde's type names become
/// what a producer writes ("u64" is "a non-negative integer"), and the parser's position, which
/// points into the request body rather than the event, goes.
fn plain(reason: String) -> String {
    let mut s = match reason.rfind(" at line ") {
        Some(at) if reason[at..].contains(" column ") => reason[..at].to_string(),
        _ => reason,
    };
    for (serde, words) in [
        ("expected u64", "expected a non-negative integer"),
        ("expected i64", "expected an integer"),
        ("expected f64", "expected a number"),
        ("expected u8", "expected a small non-negative integer"),
    ] {
        if s.ends_with(serde) {
            s.truncate(s.len() - serde.len());
            s.push_str(words);
        }
    }
    s
}

fn cut(s: String) -> String {
    let s = plain(s);
    if s.chars().count() <= MAX_REASON_CHARS {
        s
    } else {
        let mut cut: String = s.chars().take(MAX_REASON_CHARS).collect();
        cut.push('…');
        cut
    }
}

// ---------------------------------------------------------------------------------------------
// Keys
// ---------------------------------------------------------------------------------------------

/// Reads a map key, borrowed from the input when it has no escapes.
pub(super) struct Key;

impl<'de> DeserializeSeed<'de> for Key {
    type Value = Cow<'de, str>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Key {
    type Value = Cow<'de, str>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a field name")
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(v))
    }

    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v))
    }
}

// ---------------------------------------------------------------------------------------------
// FieldMap
// ---------------------------------------------------------------------------------------------

/// An entry read ahead of the struct that takes it.
type Entry<'de> = (Cow<'de, str>, Value);

/// A key, with its value when the entry was read ahead.
type NextEntry<'de> = (Cow<'de, str>, Option<Value>);

/// A map with no entries: the live part of a [`FieldMap`] over set-aside entries only.
struct NoEntries;

impl<'de> MapAccess<'de> for NoEntries {
    type Error = serde_json::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        _: K,
    ) -> Result<Option<K::Value>, Self::Error> {
        Ok(None)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, _: V) -> Result<V::Value, Self::Error> {
        Err(de::Error::custom("a value without a key"))
    }
}

/// Where a [`FieldMap`] puts keys that are not its struct's fields.
#[derive(Default)]
struct Divert<'de> {
    /// When set, such entries are kept here instead of being reported as unknown.
    entries: Option<Vec<Entry<'de>>>,
    /// A key whose value is skipped wherever it appears (a producer's `offset`).
    skip: Option<&'static str>,
}

/// The entries of a JSON object, handed to a derived struct one by one: first the set-aside
/// `pending` ones, then the rest of `live`.
struct FieldMap<'de, A> {
    live: A,
    pending: std::vec::IntoIter<Entry<'de>>,
    divert: Divert<'de>,
    /// The struct's fields, as it told [`Fields::deserialize_struct`].
    fields: &'static [&'static str],
    /// The key whose value is next, and the value if it was set aside.
    current: Option<(&'static str, Option<Value>)>,
}

impl<'de, A: MapAccess<'de>> FieldMap<'de, A> {
    fn new(live: A, pending: Vec<Entry<'de>>, divert: Divert<'de>) -> Self {
        Self {
            live,
            pending: pending.into_iter(),
            divert,
            fields: &[],
            current: None,
        }
    }

    /// The next entry's key, and its value when it was set aside.
    fn next_entry(&mut self) -> Result<Option<NextEntry<'de>>, FieldError> {
        if let Some((key, value)) = self.pending.next() {
            return Ok(Some((key, Some(value))));
        }
        let key = self
            .live
            .next_key_seed(Key)
            .map_err(|e| FieldError::Syntax(e.to_string()))?;
        Ok(key.map(|k| (k, None)))
    }

    /// The value of a key read from `live`, read as `T`.
    fn live_value<T: de::Deserialize<'de>>(&mut self, key: &str) -> Result<T, FieldError> {
        self.live
            .next_value()
            .map_err(|e| FieldError::field(key, e))
    }
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for FieldMap<'de, A> {
    type Error = FieldError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, FieldError> {
        loop {
            let Some((key, value)) = self.next_entry()? else {
                return Ok(None);
            };
            if let Some(&name) = self.fields.iter().find(|f| **f == key) {
                self.current = Some((name, value));
                let name: de::value::BorrowedStrDeserializer<'de, FieldError> =
                    de::value::BorrowedStrDeserializer::new(name);
                return seed.deserialize(name).map(Some);
            }
            if self.divert.skip == Some(&*key) {
                if value.is_none() {
                    self.live_value::<IgnoredAny>(&key)?;
                }
                continue;
            }
            if self.divert.entries.is_some() {
                let value = match value {
                    Some(v) => v,
                    None => self.live_value::<Value>(&key)?,
                };
                if let Some(entries) = &mut self.divert.entries {
                    entries.push((key, value));
                }
                continue;
            }
            // Not a field: the struct reports it (every wire struct denies unknown fields).
            self.current = Some(("", value));
            return seed.deserialize(key.as_ref().into_deserializer()).map(Some);
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, FieldError> {
        let (name, value) = self
            .current
            .take()
            .ok_or_else(|| <FieldError as de::Error>::custom("a value without a key"))?;
        match value {
            Some(v) => seed.deserialize(v).map_err(|e| FieldError::field(name, e)),
            None => self
                .live
                .next_value_seed(seed)
                .map_err(|e| FieldError::field(name, e)),
        }
    }
}

/// A deserializer handing a derived struct the entries of a [`FieldMap`].
struct Fields<'m, 'de, A>(&'m mut FieldMap<'de, A>);

impl<'de, A: MapAccess<'de>> Deserializer<'de> for Fields<'_, 'de, A> {
    type Error = FieldError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, FieldError> {
        visitor.visit_map(self.0)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, FieldError> {
        self.0.fields = fields;
        visitor.visit_map(self.0)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
        ignored_any
    }
}

// ---------------------------------------------------------------------------------------------
// Objects
// ---------------------------------------------------------------------------------------------

/// Reads one JSON object; the error, when there is one, is `E`.
pub(crate) trait ReadObject<'de> {
    /// What the object reads as.
    type Value;
    /// The error this reader reports (a [`FieldError`] or something built from one).
    type Error: FromFieldError;

    /// Reads the object's entries from `map`. A parser error from `map` is passed on
    /// as [`Failure::Json`].
    fn read<A: MapAccess<'de>>(self, map: A)
    -> Result<Self::Value, Failure<Self::Error, A::Error>>;
}

/// Why reading an object stopped.
pub(crate) enum Failure<E, J> {
    /// The input's own error (not JSON, or an error passed up from a nested reader).
    Json(J),
    /// The reader's error.
    Read(E),
}

impl<E: FromFieldError, J> From<FieldError> for Failure<E, J> {
    fn from(e: FieldError) -> Self {
        Failure::Read(E::from_field_error(e))
    }
}

/// A [`ReadObject`] as a serde visitor: errors cross serde's error type through `stash`.
pub(crate) struct ObjectSeed<'s, 'de, R: ReadObject<'de>> {
    reader: R,
    stash: &'s Cell<Option<R::Error>>,
    _de: std::marker::PhantomData<&'de ()>,
}

impl<'s, 'de, R: ReadObject<'de>> ObjectSeed<'s, 'de, R> {
    pub(crate) fn new(reader: R, stash: &'s Cell<Option<R::Error>>) -> Self {
        Self {
            reader,
            stash,
            _de: std::marker::PhantomData,
        }
    }

    fn not_object<E: de::Error>(self, got: &'static str) -> Result<R::Value, E> {
        self.stash
            .set(Some(R::Error::from_field_error(FieldError::NotObject(got))));
        Err(E::custom("not a JSON object"))
    }
}

impl<'de, R: ReadObject<'de>> DeserializeSeed<'de> for ObjectSeed<'_, 'de, R> {
    type Value = R::Value;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<R::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de, R: ReadObject<'de>> Visitor<'de> for ObjectSeed<'_, 'de, R> {
    type Value = R::Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<R::Value, A::Error> {
        match self.reader.read(map) {
            Ok(v) => Ok(v),
            Err(Failure::Json(e)) => Err(e),
            Err(Failure::Read(e)) => {
                self.stash.set(Some(e));
                Err(de::Error::custom("see the stashed error"))
            }
        }
    }

    fn visit_seq<S: de::SeqAccess<'de>>(self, _: S) -> Result<R::Value, S::Error> {
        self.not_object("array")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<R::Value, E> {
        self.not_object("boolean")
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<R::Value, E> {
        self.not_object("number")
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<R::Value, E> {
        self.not_object("number")
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<R::Value, E> {
        self.not_object("number")
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<R::Value, E> {
        self.not_object("string")
    }

    fn visit_unit<E: de::Error>(self) -> Result<R::Value, E> {
        self.not_object("null")
    }

    fn visit_none<E: de::Error>(self) -> Result<R::Value, E> {
        self.not_object("null")
    }
}

/// Reads `bytes`, one JSON object, with `reader`. Syntax errors take precedence: a body that
/// is not JSON is reported as such, whatever the reader found first.
pub(crate) fn read_slice<'de, R: ReadObject<'de>>(
    bytes: &'de [u8],
    reader: R,
) -> Result<R::Value, R::Error> {
    let stash = Cell::new(None);
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let read = ObjectSeed::new(reader, &stash)
        .deserialize(&mut de)
        .and_then(|v| de.end().map(|()| v));
    read.map_err(|e| {
        if let Err(syntax) = serde_json::from_slice::<IgnoredAny>(bytes) {
            return R::Error::from_field_error(FieldError::Syntax(syntax.to_string()));
        }
        stash
            .take()
            .unwrap_or_else(|| R::Error::from_field_error(FieldError::Syntax(e.to_string())))
    })
}

/// Reads `value`, a JSON object, with `reader`.
pub(crate) fn read_value<'de, R: ReadObject<'de>>(
    value: Value,
    reader: R,
) -> Result<R::Value, R::Error> {
    let stash = Cell::new(None);
    ObjectSeed::new(reader, &stash)
        .deserialize(value)
        .map_err(|e| {
            stash
                .take()
                .unwrap_or_else(|| R::Error::from_field_error(FieldError::Other(e.to_string())))
        })
}

/// Reads a derived struct `T` from an object, errors naming the field.
#[cfg_attr(not(feature = "server"), allow(dead_code))]
pub(crate) struct Struct<T>(std::marker::PhantomData<T>);

impl<'de, T: de::Deserialize<'de>> ReadObject<'de> for Struct<T> {
    type Value = T;
    type Error = FieldError;

    fn read<A: MapAccess<'de>>(self, map: A) -> Result<T, Failure<FieldError, A::Error>> {
        let mut map = FieldMap::new(map, Vec::new(), Divert::default());
        Ok(T::deserialize(Fields(&mut map))?)
    }
}

/// Reads `bytes`, a JSON object, into the derived struct `T`, naming the field in errors.
#[cfg_attr(not(feature = "server"), allow(dead_code))]
pub(crate) fn struct_from_slice<'de, T: de::Deserialize<'de>>(
    bytes: &'de [u8],
) -> Result<T, FieldError> {
    read_slice(bytes, Struct(std::marker::PhantomData))
}

// ---------------------------------------------------------------------------------------------
// Events
// ---------------------------------------------------------------------------------------------

/// Reads one event: for the queue `ctx` (a producer's event), or the stored form (`None`:
/// ids required, offset kept). The value says whether the event's id was generated.
#[derive(Clone, Copy)]
pub(crate) struct EventReader<'c> {
    pub ctx: Option<&'c ProducerContext<'c>>,
}

impl<'de> ReadObject<'de> for EventReader<'_> {
    type Value = (Event, bool);
    type Error = Error;

    fn read<A: MapAccess<'de>>(self, map: A) -> Result<(Event, bool), Failure<Error, A::Error>> {
        read_event::<AsEvent, A>(map, None, self.ctx)
    }
}

/// Reads one event a producer sent to the queue `ctx` straight into its stored form
/// ([`Received`]): the same checks and errors as [`EventReader`], no `Value`s.
#[derive(Clone, Copy)]
#[cfg_attr(not(feature = "server"), allow(dead_code))]
pub(crate) struct ReceivedReader<'c> {
    pub ctx: &'c ProducerContext<'c>,
}

impl<'de> ReadObject<'de> for ReceivedReader<'_> {
    type Value = Received;
    type Error = Error;

    fn read<A: MapAccess<'de>>(self, map: A) -> Result<Received, Failure<Error, A::Error>> {
        read_event::<AsReceived, A>(map, None, Some(self.ctx))
    }
}

/// The next key of `map`, borrowed from the text when it has no escapes (a `String` key
/// would be an allocation per object).
///
/// # Errors
///
/// The parser's, for text that is not a key.
#[cfg_attr(not(feature = "server"), allow(dead_code))]
pub(crate) fn next_key<'de, A: MapAccess<'de>>(
    map: &mut A,
) -> Result<Option<Cow<'de, str>>, A::Error> {
    map.next_key_seed(Key)
}

/// What [`read_event`] reads an event into.
pub(super) trait EventForm {
    /// What a free-form field is read as.
    type Free: for<'de> de::Deserialize<'de> + FreeForm;
    /// The event read.
    type Output;

    /// The event from its checked base fields and its type's fields (defaults not filled in).
    fn finish(base: Base, payload: PayloadWire<'_, Self::Free>) -> Result<Self::Output, Error>;
}

/// An [`Event`], and whether its id was generated.
pub(super) enum AsEvent {}

impl EventForm for AsEvent {
    type Free = Cow<'static, Value>;
    type Output = (Event, bool);

    fn finish(base: Base, payload: PayloadWire<'_, Self::Free>) -> Result<(Event, bool), Error> {
        let event = Event {
            event_id: base.event_id,
            task_id: base.task_id,
            tenant_id: base.tenant_id,
            timestamp: base.timestamp,
            offset: base.offset,
            payload: payload.into(),
        };
        event.validate()?;
        Ok((event, base.generated_id))
    }
}

/// A producer's event in its stored form, without an [`Event`] in between.
pub(super) enum AsReceived {}

impl EventForm for AsReceived {
    type Free = Canonical;
    type Output = Received;

    fn finish(base: Base, payload: PayloadWire<'_, Canonical>) -> Result<Received, Error> {
        let payload = payload.with_defaults();
        payload.validate()?;
        let head = Head {
            event_id: Some(Cow::Borrowed(base.event_id.as_str())),
            task_id: Some(Cow::Borrowed(base.task_id.as_str())),
            tenant_id: Some(Cow::Borrowed(base.tenant_id.as_str())),
            timestamp: Some(base.timestamp),
            event_type: Some(base.event_type),
            offset: None,
        };
        let rendered = render(&head, &payload);
        Ok(Received {
            terminal: payload.is_terminal(),
            event_type: base.event_type,
            timestamp: base.timestamp,
            generated_id: base.generated_id,
            event_id: base.event_id,
            rendered,
        })
    }
}

/// An event's base fields, checked against the queue and with their defaults.
pub(super) struct Base {
    event_id: EventId,
    generated_id: bool,
    task_id: TaskId,
    tenant_id: TenantId,
    timestamp: Timestamp,
    offset: Option<u64>,
    event_type: EventType,
}

/// A producer's event for the queue `ctx` from the entries of `map` (after `first`, a key
/// already read from it), straight into its stored form (see [`ReceivedReader`]).
#[cfg_attr(not(feature = "server"), allow(dead_code))]
pub(crate) fn read_received<'de, A: MapAccess<'de>>(
    map: A,
    first: Option<Cow<'de, str>>,
    ctx: &ProducerContext<'_>,
) -> Result<Received, Failure<Error, A::Error>> {
    read_event::<AsReceived, A>(map, first, Some(ctx))
}

/// An event's entries from `map` (after `first`, a key already read from it), read into
/// the form `F`.
fn read_event<'de, F: EventForm, A: MapAccess<'de>>(
    mut map: A,
    first: Option<Cow<'de, str>>,
    ctx: Option<&ProducerContext<'_>>,
) -> Result<F::Output, Failure<Error, A::Error>> {
    // A producer's offset is ignored, whatever it is.
    let skip = if ctx.is_some() { Some("offset") } else { None };
    let mut aside: Vec<Entry<'de>> = Vec::new();
    let mut next = first;
    let event_type = loop {
        let key = match next.take() {
            Some(key) => key,
            None => match map.next_key_seed(Key).map_err(Failure::Json)? {
                Some(key) => key,
                None => break TypeValue::Absent,
            },
        };
        if key == "event_type" {
            break map.next_value_seed(ReadTypeValue).map_err(Failure::Json)?;
        }
        if skip == Some(&*key) {
            map.next_value::<IgnoredAny>().map_err(Failure::Json)?;
            continue;
        }
        let value = map.next_value::<Value>().map_err(Failure::Json)?;
        aside.push((key, value));
    };
    let event_type = event_type_of(event_type).map_err(Failure::Read)?;

    let divert = Divert {
        entries: Some(Vec::new()),
        skip,
    };
    let mut fields = FieldMap::new(map, aside, divert);
    let payload = event_type
        .read_payload::<F::Free, _>(Fields(&mut fields))
        .map_err(|e| Failure::Read(event_error(e, event_type, fields.fields)))?;
    let payload_fields = fields.fields;
    let rest = fields.divert.entries.unwrap_or_default();
    let mut head_fields = FieldMap::new(NoEntries, rest, Divert::default());
    let head = <Head as de::Deserialize>::deserialize(Fields(&mut head_fields))
        .map_err(|e| Failure::Read(event_error(e, event_type, payload_fields)))?;
    let base = base(head, event_type, ctx).map_err(Failure::Read)?;
    F::finish(base, payload).map_err(Failure::Read)
}

/// The value of `event_type`, read without building a `Value` of it.
enum TypeValue<'de> {
    /// No `event_type` key.
    Absent,
    /// `null`.
    Null,
    Str(Cow<'de, str>),
    /// Anything else: its JSON type.
    Other(&'static str),
}

/// Reads a [`TypeValue`]. A value that is not a string is read through as a `Value` would
/// read it (so the parser reports what it would have), into a buffer that is dropped.
struct ReadTypeValue;

impl<'de> DeserializeSeed<'de> for ReadTypeValue {
    type Value = TypeValue<'de>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<TypeValue<'de>, D::Error> {
        d.deserialize_any(self)
    }
}

/// A [`TypeValue`] of a value of JSON type `kind`.
fn other<'de>(kind: &'static str) -> TypeValue<'de> {
    match kind {
        "null" => TypeValue::Null,
        kind => TypeValue::Other(kind),
    }
}

macro_rules! read_through {
    ($($method:ident($ty:ty);)*) => {
        $(fn $method<E: de::Error>(self, v: $ty) -> Result<TypeValue<'de>, E> {
            transcode_into(&mut Vec::new()).$method(v).map(other)
        })*
    };
}

impl<'de> Visitor<'de> for ReadTypeValue {
    type Value = TypeValue<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any valid JSON value")
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<TypeValue<'de>, E> {
        Ok(TypeValue::Str(Cow::Borrowed(v)))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<TypeValue<'de>, E> {
        Ok(TypeValue::Str(Cow::Owned(v.to_owned())))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<TypeValue<'de>, E> {
        Ok(TypeValue::Str(Cow::Owned(v)))
    }

    read_through! {
        visit_bool(bool);
        visit_i64(i64);
        visit_u64(u64);
        visit_i128(i128);
        visit_u128(u128);
        visit_f64(f64);
    }

    fn visit_none<E: de::Error>(self) -> Result<TypeValue<'de>, E> {
        Ok(TypeValue::Null)
    }

    fn visit_unit<E: de::Error>(self) -> Result<TypeValue<'de>, E> {
        Ok(TypeValue::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<TypeValue<'de>, D::Error> {
        self.deserialize(d)
    }

    fn visit_seq<S: de::SeqAccess<'de>>(self, seq: S) -> Result<TypeValue<'de>, S::Error> {
        transcode_into(&mut Vec::new()).visit_seq(seq).map(other)
    }

    fn visit_map<M: MapAccess<'de>>(self, map: M) -> Result<TypeValue<'de>, M::Error> {
        transcode_into(&mut Vec::new()).visit_map(map).map(other)
    }
}

/// The event type from the value of `event_type`.
fn event_type_of(value: TypeValue<'_>) -> Result<EventType, Error> {
    let types = || EventType::ALL.map(EventType::as_str).join(", ");
    match value {
        TypeValue::Str(s) => EventType::parse(&s).ok_or_else(|| {
            Error::invalid_event(
                "event_type",
                format!("must be one of {}, got {}", types(), preview(&s)),
            )
        }),
        TypeValue::Absent | TypeValue::Null => Err(Error::invalid_event(
            "event_type",
            format!("is required (one of {})", types()),
        )),
        TypeValue::Other(kind) => Err(Error::invalid_event(
            "event_type",
            format!("must be a string (one of {}), got {kind}", types()),
        )),
    }
}

/// A [`FieldError`] of an event of type `event_type`, whose own fields are `type_fields`.
fn event_error(e: FieldError, event_type: EventType, type_fields: &[&str]) -> Error {
    match e {
        FieldError::Field {
            field,
            allowed: Some(base),
            ..
        } => Error::invalid_event(
            field,
            format!(
                "unknown field for a {event_type} event (allowed: {}, {})",
                base.join(", "),
                type_fields.join(", ")
            ),
        ),
        FieldError::Field { field, reason, .. } => Error::invalid_event(field, reason),
        other => Error::invalid_event("event", other.to_string()),
    }
}

/// The base fields from `head`: ids checked against `ctx`, defaults filled in.
fn base(
    head: Head<'_>,
    event_type: EventType,
    ctx: Option<&ProducerContext<'_>>,
) -> Result<Base, Error> {
    if head.event_type.is_some() {
        return Err(Error::invalid_event("event_type", "appears more than once"));
    }
    let generated_id = head.event_id.is_none();
    let event_id = match head.event_id {
        Some(s) => EventId::new(&*s)?,
        None => EventId::generate(),
    };
    let (tenant_id, task_id) = match ctx {
        Some(ctx) => (
            matching_id(head.tenant_id, "tenant_id", ctx.tenant_id)?,
            matching_id(head.task_id, "task_id", ctx.task_id)?,
        ),
        None => (
            TenantId::new(&*head.tenant_id.ok_or_else(|| missing("tenant_id"))?)?,
            TaskId::new(&*head.task_id.ok_or_else(|| missing("task_id"))?)?,
        ),
    };
    Ok(Base {
        event_id,
        generated_id,
        task_id,
        tenant_id,
        timestamp: head.timestamp.unwrap_or_else(Timestamp::now),
        offset: if ctx.is_some() { None } else { head.offset },
        event_type,
    })
}

fn missing(field: &str) -> Error {
    Error::invalid_event(field, "is required")
}

/// An id that must match the queue's: absent gives `expected`.
fn matching_id<T>(given: Option<Cow<'_, str>>, field: &str, expected: &T) -> Result<T, Error>
where
    T: PartialEq + Clone + fmt::Display + for<'s> TryFrom<&'s str, Error = Error>,
{
    let Some(s) = given else {
        return Ok(expected.clone());
    };
    let id = T::try_from(&*s)?;
    if id == *expected {
        Ok(id)
    } else {
        Err(Error::invalid_event(
            field,
            format!("{field} does not match the queue (expected {expected}, got {id})"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_speak_of_the_event_not_of_the_parser() {
        assert_eq!(
            plain("invalid type: string \"x\", expected u64 at line 1 column 38".into()),
            "invalid type: string \"x\", expected a non-negative integer"
        );
        assert_eq!(
            plain("invalid value: integer `-1`, expected u64".into()),
            "invalid value: integer `-1`, expected a non-negative integer"
        );
        assert_eq!(
            plain("invalid type: map, expected f64".into()),
            "invalid type: map, expected a number"
        );
        // Anything else is kept as it is.
        assert_eq!(plain("must be a string".into()), "must be a string");
        assert_eq!(
            plain("mentions at line 3 of a text".into()),
            "mentions at line 3 of a text"
        );
    }
}
