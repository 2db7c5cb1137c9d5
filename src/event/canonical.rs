//! Free-form JSON (an event's `details`, `data`, `context`, `result`) read straight into the
//! text a `serde_json::Value` of it renders as, without building the `Value`.
//!
//! An event's stored JSON has always been what a `Value` of each free-form field writes:
//! compact, object keys in byte order, a repeated key's last value, numbers and strings as
//! serde_json writes them. Building that `Value` for each event a producer sends (a tree
//! node, a `String` per key and per string, and freeing them after rendering) and rendering it
//! again was most of the request path's JSON cost. [`Canonical`] takes the same parser
//! callbacks a `Value` would, in the same order, and writes what that `Value` would render as:
//! the stored bytes stay exactly as they were, and any error is the parser's, as before.
//!
//! In most of the text this is a copy: a string without escapes is written as it came, and an
//! object whose keys come in order (without repeats) needs no reordering.

use std::borrow::Cow;
use std::fmt;

use serde::Serialize;
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

/// The key with which serde_json marks a raw value; a `Value` reads an object whose first key
/// is this as the JSON text of the entry's string value.
const RAW_VALUE_TOKEN: &str = "$serde_json::private::RawValue";

/// A free-form JSON value as the compact text a `serde_json::Value` of it renders as, and
/// its JSON type (for validation messages).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Canonical {
    json: Cow<'static, [u8]>,
    kind: &'static str,
}

impl Canonical {
    /// `{}`: a free-form field's default.
    pub(crate) fn empty_object() -> Self {
        Self {
            json: Cow::Borrowed(b"{}"),
            kind: "object",
        }
    }

    /// The JSON type, as [`super::json_type`] names it.
    pub(crate) fn kind(&self) -> &'static str {
        self.kind
    }
}

impl<'de> de::Deserialize<'de> for Canonical {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Written into this thread's scratch buffer and copied out at its exact size: one
        // allocation, where growing a buffer to a few hundred bytes took three or four.
        thread_local! {
            static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        /// A larger scratch buffer (after a large value) is not kept.
        const KEEP: usize = 64 << 10;
        let mut fallback = Vec::new();
        let read = |out: &mut Vec<u8>| {
            out.clear();
            let kind = Transcode { out: &mut *out }.deserialize(d)?;
            let json = Cow::Owned(out.as_slice().to_vec());
            if out.capacity() > KEEP {
                *out = Vec::new();
            }
            Ok(Canonical { json, kind })
        };
        match SCRATCH.try_with(|s| s.try_borrow_mut().ok().map(|mut s| std::mem::take(&mut *s))) {
            Ok(Some(mut scratch)) => {
                let read = read(&mut scratch);
                // Given back for the next value (a value read while it was out found it
                // empty and used a buffer of its own).
                let _ = SCRATCH.try_with(|s| {
                    if let Ok(mut s) = s.try_borrow_mut() {
                        *s = scratch;
                    }
                });
                read
            }
            _ => read(&mut fallback),
        }
    }
}

impl Serialize for Canonical {
    /// As bytes: the event writer (`wire::write`) writes them as the JSON text they are. No
    /// other serializer sees a `Canonical`.
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.json)
    }
}

/// Writes the value it reads, as a `Value` of it would render, onto `out`; its JSON type is
/// the result.
pub(super) struct Transcode<'o> {
    out: &'o mut Vec<u8>,
}

/// A [`Transcode`] onto `out` (a visitor, for a reader that wants a value read exactly as a
/// `Value` would be, without keeping it).
pub(super) fn transcode_into(out: &mut Vec<u8>) -> Transcode<'_> {
    Transcode { out }
}

impl Transcode<'_> {
    /// Writes `v` as serde_json writes it.
    fn write<T: Serialize + ?Sized, E: de::Error>(&mut self, v: &T) -> Result<(), E> {
        v.serialize(&mut serde_json::Serializer::new(&mut *self.out))
            .map_err(E::custom)
    }

    /// Writes `s` as a JSON string, as serde_json writes it: as it is when it has nothing to
    /// escape (the usual case, checked a word at a time), else escaped by serde_json.
    fn string<E: de::Error>(&mut self, s: &str) -> Result<(), E> {
        if needs_escape(s.as_bytes()) {
            return self.write(s);
        }
        self.out.reserve(s.len() + 2);
        self.out.push(b'"');
        self.out.extend_from_slice(s.as_bytes());
        self.out.push(b'"');
        Ok(())
    }
}

/// Whether serde_json escapes any of these bytes in a string: `"`, `\` and the control
/// characters below 0x20 (and nothing else).
pub(crate) fn needs_escape(bytes: &[u8]) -> bool {
    // Chunks of 16 without a branch per byte, so the compiler can vectorise the check.
    let mut chunks = bytes.chunks_exact(16);
    for chunk in &mut chunks {
        if chunk.iter().fold(false, |hit, &b| {
            hit | (b < 0x20) | (b == b'"') | (b == b'\\')
        }) {
            return true;
        }
    }
    chunks
        .remainder()
        .iter()
        .any(|&b| b < 0x20 || b == b'"' || b == b'\\')
}

impl<'de> DeserializeSeed<'de> for Transcode<'_> {
    type Value = &'static str;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<&'static str, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Transcode<'_> {
    type Value = &'static str;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any valid JSON value")
    }

    fn visit_bool<E: de::Error>(mut self, v: bool) -> Result<&'static str, E> {
        self.write(&v)?;
        Ok("boolean")
    }

    fn visit_i64<E: de::Error>(mut self, v: i64) -> Result<&'static str, E> {
        self.write(&v)?;
        Ok("number")
    }

    fn visit_u64<E: de::Error>(mut self, v: u64) -> Result<&'static str, E> {
        self.write(&v)?;
        Ok("number")
    }

    fn visit_i128<E: de::Error>(self, v: i128) -> Result<&'static str, E> {
        // As a `Value` takes one: a number when it fits 64 bits.
        match (i64::try_from(v), u64::try_from(v)) {
            (Ok(v), _) => self.visit_i64(v),
            (_, Ok(v)) => self.visit_u64(v),
            _ => Err(E::custom("JSON number out of range")),
        }
    }

    fn visit_u128<E: de::Error>(self, v: u128) -> Result<&'static str, E> {
        match u64::try_from(v) {
            Ok(v) => self.visit_u64(v),
            Err(_) => Err(E::custom("JSON number out of range")),
        }
    }

    fn visit_f64<E: de::Error>(mut self, v: f64) -> Result<&'static str, E> {
        if v.is_finite() {
            self.write(&v)?;
            Ok("number")
        } else {
            // A `Value` has no non-finite numbers: it holds `null`.
            self.visit_unit()
        }
    }

    fn visit_str<E: de::Error>(mut self, v: &str) -> Result<&'static str, E> {
        self.string(v)?;
        Ok("string")
    }

    fn visit_none<E: de::Error>(self) -> Result<&'static str, E> {
        self.visit_unit()
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<&'static str, D::Error> {
        self.deserialize(d)
    }

    fn visit_unit<E: de::Error>(self) -> Result<&'static str, E> {
        self.out.extend_from_slice(b"null");
        Ok("null")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<&'static str, A::Error> {
        self.out.push(b'[');
        let mut first = true;
        loop {
            let at = self.out.len();
            if !first {
                self.out.push(b',');
            }
            let seed = Transcode {
                out: &mut *self.out,
            };
            if seq.next_element_seed(seed)?.is_none() {
                self.out.truncate(at);
                break;
            }
            first = false;
        }
        self.out.push(b']');
        Ok("array")
    }

    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<&'static str, A::Error> {
        let Some(first) = map.next_key_seed(super::parse::Key)? else {
            self.out.extend_from_slice(b"{}");
            return Ok("object");
        };
        if first == RAW_VALUE_TOKEN {
            // What a `Value` does with such an object: reads the entry's string as JSON text.
            let text = map.next_value_seed(RawText)?;
            let value: Value = serde_json::from_str(&text).map_err(de::Error::custom)?;
            return self.deserialize(value).map_err(de::Error::custom);
        }
        let start = self.out.len();
        self.out.push(b'{');
        // Each entry's `"key":value` text, in the order read; `ordered` while every key is
        // greater than the one before (then the text is already what a `Value` writes).
        let mut entries: Vec<(Cow<'de, str>, std::ops::Range<usize>)> = Vec::new();
        let mut ordered = true;
        let mut key = first;
        loop {
            if let Some((last, _)) = entries.last() {
                ordered &= **last < *key;
                self.out.push(b',');
            }
            let at = self.out.len();
            self.string(&key)?;
            self.out.push(b':');
            map.next_value_seed(Transcode {
                out: &mut *self.out,
            })?;
            entries.push((key, at..self.out.len()));
            match map.next_key_seed(super::parse::Key)? {
                Some(next) => key = next,
                None => break,
            }
        }
        if ordered {
            self.out.push(b'}');
            return Ok("object");
        }
        // A `Value`'s object is a map ordered by key in which a repeated key keeps its last
        // value: sort by key (stable, so repeats stay in reading order), keep each key's last.
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        let end = self.out.len();
        self.out.push(b'{');
        for (i, (key, range)) in entries.iter().enumerate() {
            if entries.get(i + 1).is_some_and(|(next, _)| next == key) {
                continue;
            }
            if self.out.len() > end + 1 {
                self.out.push(b',');
            }
            self.out.extend_from_within(range.clone());
        }
        self.out.push(b'}');
        self.out.copy_within(end.., start);
        self.out.truncate(start + (self.out.len() - end));
        Ok("object")
    }
}

/// The string value of a raw-value entry (see [`RAW_VALUE_TOKEN`]), read as a `Value` reads
/// it.
struct RawText;

impl<'de> DeserializeSeed<'de> for RawText {
    type Value = String;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<String, D::Error> {
        d.deserialize_str(self)
    }
}

impl Visitor<'_> for RawText {
    type Value = String;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("raw value")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
        Ok(v.to_owned())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// What a `Value` read from `text` renders as, or its error's text.
    fn via_value(text: &str) -> Result<(String, &'static str), String> {
        let value: Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
        Ok((
            serde_json::to_string(&value).map_err(|e| e.to_string())?,
            super::super::json_type(&value),
        ))
    }

    /// What [`Canonical`] reads from `text`, or its error's text.
    fn via_canonical(text: &str) -> Result<(String, &'static str), String> {
        let c: Canonical = serde_json::from_str(text).map_err(|e| e.to_string())?;
        Ok((
            String::from_utf8(c.json.to_vec()).map_err(|e| e.to_string())?,
            c.kind(),
        ))
    }

    #[test]
    fn writes_what_a_value_writes() {
        for text in [
            r#"{}"#,
            r#"{"a":1}"#,
            r#"{"sent_us":1733480000000000,"pad":"xxxx"}"#,
            r#"{ "b" : [1, 2.50, -0, 1e3, 1E-7, 18446744073709551615, 18446744073709551616, -9223372036854775809] , "a" : {"y": null, "x": true, "x": false} }"#,
            r#"{"k":"\u00e9\/\n\"\\ \u001f\ud83d\ude00 é"}"#,
            r#"{"\n":1,"\"":2,"a":3,"A":4,"é":5,"":6}"#,
            r#"{"dup":1,"dup":2,"a":0,"dup":3}"#,
            r#"[{"b":1,"a":2},[],[[]],{}]"#,
            r#""just a string""#,
            r#"12.0"#,
            r#"-0.0"#,
            r#"null"#,
            r#"true"#,
            r#"{"$serde_json::private::RawValue":"{\"b\":1,\"a\":[1.50]}"}"#,
            r#"{"$serde_json::private::RawValue":"not json"}"#,
            r#"{"$serde_json::private::RawValue":5}"#,
            r#"{"$serde_json::private::RawValue":"1","b":2}"#,
            r#"{"a":"$serde_json::private::RawValue","$serde_json::private::RawValue":"2"}"#,
            r#"{"a":1,}"#,
            r#"{"a":1"#,
            r#"[1,2"#,
        ] {
            assert_eq!(via_canonical(text), via_value(text), "{text}");
        }
    }

    #[test]
    fn reads_a_value_as_it_renders() {
        let value = serde_json::json!({"b": [1, 2.5, "x\ny"], "a": {"z": null, "y": -3}});
        let c: Canonical = serde_json::from_value(value.clone()).expect("transcode");
        assert_eq!(
            &*c.json,
            serde_json::to_string(&value).expect("render").as_bytes()
        );
        assert_eq!(c.kind(), "object");
    }

    #[test]
    fn escape_check_finds_every_escaped_byte_anywhere() {
        for len in [0, 1, 15, 16, 17, 40] {
            let plain = "x".repeat(len);
            assert!(!needs_escape(plain.as_bytes()));
            for at in 0..len {
                for b in [b'"', b'\\', 0x00, 0x1f, b'\n'] {
                    let mut bytes = plain.clone().into_bytes();
                    bytes[at] = b;
                    assert!(needs_escape(&bytes), "{len} {at} {b}");
                }
                let mut bytes = plain.clone().into_bytes();
                bytes[at] = 0x7f;
                assert!(!needs_escape(&bytes));
            }
        }
    }

    /// Arbitrary JSON text: objects with repeated and unordered keys, strings that need
    /// escapes, numbers of every kind, whitespace.
    pub(crate) fn json_text() -> impl Strategy<Value = String> {
        let key = prop_oneof![
            Just("a".to_string()),
            Just("b".to_string()),
            Just("é".to_string()),
            Just("\\n".to_string()),
            Just("\\u0041".to_string()),
            "[a-c]{0,3}",
        ];
        let leaf = prop_oneof![
            Just("null".to_string()),
            Just("true".to_string()),
            Just("false".to_string()),
            any::<i64>().prop_map(|n| n.to_string()),
            any::<u64>().prop_map(|n| n.to_string()),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(|f| format!("{f:e}")),
            Just("1.50".to_string()),
            Just("-0".to_string()),
            "[a-z \\\\\"/\u{e9}\u{1F600}]{0,20}".prop_map(|s| {
                // Escape the backslashes and quotes the pattern may produce, some with
                // `\u` escapes.
                let mut out = String::from("\"");
                for c in s.chars() {
                    match c {
                        '"' => out.push_str("\\\""),
                        '\\' => out.push_str("\\u005c"),
                        '/' => out.push_str("\\/"),
                        c => out.push(c),
                    }
                }
                out.push('"');
                out
            }),
        ];
        leaf.prop_recursive(4, 40, 6, move |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..5)
                    .prop_map(|items| format!("[{}]", items.join(" , "))),
                proptest::collection::vec((key.clone(), inner), 0..6).prop_map(|entries| {
                    let entries: Vec<String> = entries
                        .into_iter()
                        .map(|(k, v)| format!("\"{k}\": {v}"))
                        .collect();
                    format!("{{{}}}", entries.join(","))
                }),
            ]
        })
    }

    proptest! {
        #[test]
        fn any_json_reads_as_its_value_renders(text in json_text()) {
            prop_assert_eq!(via_canonical(&text), via_value(&text));
        }
    }
}
