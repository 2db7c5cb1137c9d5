//! Limits that protect the node from one greedy or hostile client: open SSE streams (in total
//! and per tenant), queues per tenant, and JSON nesting depth and duplicate keys. Body size, batch size and read
//! timeouts are enforced where bodies are read ([`crate::server::ServerConfig`]).
//!
//! Counting is exact: a stream slot or a queue reservation is taken under a lock before the
//! work starts and given back when it ends (a stream's slot when its body is dropped, a
//! reservation when its [`QueueReservation`] is), so concurrent requests cannot overshoot a
//! limit.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use axum::http::StatusCode;
use axum::http::header::RETRY_AFTER;
use serde::de::IgnoredAny;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::ids::TenantId;
use crate::server::error::ApiError;

/// `Retry-After` of a `429`, in seconds.
pub const RETRY_AFTER_SECS: u64 = 5;

/// Queue creations a tenant at its limit is refused at once in one [`REFUSAL_WINDOW`]; the
/// refusals after them wait [`REFUSAL_DELAY`] before they are answered.
const FREE_REFUSALS: u32 = 20;
/// See [`FREE_REFUSALS`].
const REFUSAL_WINDOW: std::time::Duration = std::time::Duration::from_secs(1);
/// See [`FREE_REFUSALS`].
const REFUSAL_DELAY: std::time::Duration = std::time::Duration::from_millis(250);
/// Tenants whose refusals are remembered before old windows are dropped.
const REFUSALS_KEPT: usize = 4096;

#[derive(Debug, Default)]
struct Counts {
    streams_total: usize,
    streams: HashMap<TenantId, usize>,
    creating: HashMap<TenantId, usize>,
    /// Each recently refused tenant's refusal window: its start and the refusals in it.
    refused: HashMap<TenantId, (std::time::Instant, u32)>,
}

/// The live counts behind the limits (one per server).
#[derive(Debug, Default)]
pub(crate) struct Limits {
    counts: Mutex<Counts>,
}

impl Limits {
    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        // The counts stay consistent even if a holder panicked: every update is one statement.
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// SSE streams open on this server.
    pub(crate) fn open_streams(&self) -> usize {
        self.counts().streams_total
    }

    /// Takes a stream slot for `tenant`.
    ///
    /// # Errors
    ///
    /// `429` with `Retry-After` when the server or the tenant is at its limit.
    pub(crate) fn open_stream(
        &self,
        tenant: &TenantId,
        max_total: usize,
        max_per_tenant: usize,
    ) -> Result<(), ApiError> {
        let mut counts = self.counts();
        if counts.streams_total >= max_total {
            return Err(ApiError::too_many(
                format!("too many open streams: the server serves at most {max_total}"),
                RETRY_AFTER_SECS,
            ));
        }
        let mine = counts.streams.get(tenant).copied().unwrap_or(0);
        if mine >= max_per_tenant {
            return Err(ApiError::too_many(
                format!(
                    "too many open streams: tenant {tenant} has {mine}, the limit is {max_per_tenant}"
                ),
                RETRY_AFTER_SECS,
            ));
        }
        counts.streams_total += 1;
        *counts.streams.entry(tenant.clone()).or_default() += 1;
        Ok(())
    }

    /// Gives back a slot taken by [`open_stream`](Self::open_stream).
    pub(crate) fn close_stream(&self, tenant: &TenantId) {
        let mut counts = self.counts();
        counts.streams_total = counts.streams_total.saturating_sub(1);
        if let Some(n) = counts.streams.get_mut(tenant) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.streams.remove(tenant);
            }
        }
    }

    /// Reserves the creation of one queue for `tenant`, which has `existing()` queues.
    ///
    /// # Errors
    ///
    /// `429` with `Retry-After` when the tenant's existing queues plus the creations in
    /// flight reach `max`.
    pub(crate) fn reserve_queue(
        &self,
        tenant: &TenantId,
        max: usize,
        existing: impl FnOnce() -> usize,
    ) -> Result<QueueReservation<'_>, ApiError> {
        let mut counts = self.counts();
        let creating = counts.creating.get(tenant).copied().unwrap_or(0);
        let have = existing().saturating_add(creating);
        if have >= max {
            return Err(ApiError::too_many(
                format!(
                    "too many queues: tenant {tenant} has {have}, the limit is {max}; delete \
                     queues or wait for them to expire"
                ),
                RETRY_AFTER_SECS,
            ));
        }
        *counts.creating.entry(tenant.clone()).or_default() += 1;
        Ok(QueueReservation {
            limits: self,
            tenant: tenant.clone(),
        })
    }

    /// How long to wait before answering a refusal of [`reserve_queue`](Self::reserve_queue)
    /// to `tenant` (counting this one): nothing for its first [`FREE_REFUSALS`] in a
    /// second, [`REFUSAL_DELAY`] after. A client hammering a tenant's limit then waits for its
    /// answers instead of taking the server's CPU from other tenants; the wait costs the
    /// server nothing (an async sleep).
    pub(crate) fn refusal_delay(&self, tenant: &TenantId) -> std::time::Duration {
        let now = std::time::Instant::now();
        let mut counts = self.counts();
        if counts.refused.len() >= REFUSALS_KEPT {
            counts
                .refused
                .retain(|_, (start, _)| now.duration_since(*start) < REFUSAL_WINDOW);
        }
        let (start, n) = counts.refused.entry(tenant.clone()).or_insert((now, 0));
        if now.duration_since(*start) >= REFUSAL_WINDOW {
            *start = now;
            *n = 0;
        }
        *n = n.saturating_add(1);
        if *n > FREE_REFUSALS {
            REFUSAL_DELAY
        } else {
            std::time::Duration::ZERO
        }
    }

    /// Ends a reservation taken by [`reserve_queue`](Self::reserve_queue) (created or not).
    fn release_queue(&self, tenant: &TenantId) {
        let mut counts = self.counts();
        if let Some(n) = counts.creating.get_mut(tenant) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.creating.remove(tenant);
            }
        }
    }
}

/// A queue creation in flight; dropping it ends the reservation (the queue then counts as
/// existing, or was not created).
#[derive(Debug)]
pub(crate) struct QueueReservation<'a> {
    limits: &'a Limits,
    tenant: TenantId,
}

impl Drop for QueueReservation<'_> {
    fn drop(&mut self) {
        self.limits.release_queue(&self.tenant);
    }
}

/// The server-wide budget of bytes in flight ([`crate::server::ServerConfig::max_body_bytes_in_flight`]):
/// request bodies while they are read, and WebSocket producer frames from when they are read
/// until they are answered. Both are bytes a client made the server hold; one budget for both
/// means that neither many slow bodies nor many pipelining producers can make the server hold
/// more than the budget in total. Counted in KiB (a semaphore's permits), each holder at least 1.
#[derive(Debug, Clone)]
pub(crate) struct BodyBudget {
    room: Arc<Semaphore>,
    /// The budget in KiB: the most one holder takes, so that a body or frame larger than the
    /// whole budget still gets in alone.
    kib: usize,
    bytes: usize,
}

impl BodyBudget {
    /// A budget of `bytes` (at least 1 KiB).
    pub(crate) fn new(bytes: usize) -> Self {
        let kib = (bytes / 1024).clamp(1, Semaphore::MAX_PERMITS);
        Self {
            room: Arc::new(Semaphore::new(kib)),
            kib,
            bytes,
        }
    }

    /// Takes room for `bytes`, held until the permit is dropped.
    ///
    /// # Errors
    ///
    /// `503` with `Retry-After` when the budget has no room for them now (nothing waits: the
    /// client retries, and a holder that does not give its room back cannot queue others
    /// behind it).
    pub(crate) fn take(&self, bytes: usize) -> Result<OwnedSemaphorePermit, ApiError> {
        let kib = bytes.div_ceil(1024).clamp(1, self.kib);
        let kib = u32::try_from(kib).unwrap_or(u32::MAX);
        self.room.clone().try_acquire_many_owned(kib).map_err(|_| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "too many request bodies being received: the server takes at most {} \
                     bytes of them at once; retry shortly",
                    self.bytes
                ),
            )
            .with_header(RETRY_AFTER, RETRY_AFTER_SECS.to_string())
        })
    }

    /// Bytes held now (in whole KiB).
    #[cfg(test)]
    pub(crate) fn held_bytes(&self) -> usize {
        self.kib.saturating_sub(self.room.available_permits()) * 1024
    }
}

/// Checks JSON text before it is parsed, in one pass over its bytes: arrays and objects nest
/// at most `max` deep (a parser would recurse first), and no object has a key twice. serde
/// keeps the last of two equal keys while a proxy or another reader may keep the first, so
/// `{"state":"working","state":"failed"}` would mean two things; it is refused instead, in
/// nested objects too. Keys are compared after unescaping (`"st\u0061te"` is `"state"`).
/// Text that is not JSON passes; the parser reports it.
///
/// # Errors
///
/// `400` naming the depth limit, or the repeated key and the object it is in.
pub(crate) fn check_json(body: &[u8], max: usize) -> Result<(), ApiError> {
    // Sized for an ordinary event, so that checking one allocates twice in all.
    let mut frames: Vec<Frame<'_>> = Vec::with_capacity(8);
    // The keys of every open object, outermost first: an object's own are those from its
    // `start` on (an inner object's come after the key whose value it is).
    let mut keys: Vec<Cow<'_, [u8]>> = Vec::with_capacity(32);
    let mut duplicate: Option<String> = None;
    let mut i = 0;
    while i < body.len() {
        match body[i] {
            b'"' => {
                // Skip the string: jump from one quote or backslash to the next.
                let start = i + 1;
                let mut escaped = false;
                i += 1;
                loop {
                    match memchr::memchr2(b'"', b'\\', &body[i..]) {
                        // Unterminated: the parser reports it.
                        None => return Ok(()),
                        Some(at) if body[i + at] == b'\\' => {
                            escaped = true;
                            i += at + 2;
                        }
                        Some(at) => {
                            i += at;
                            break;
                        }
                    }
                    if i >= body.len() {
                        return Ok(());
                    }
                }
                if duplicate.is_none()
                    && let Some(Frame::Object {
                        start: own,
                        set,
                        expect_key,
                    }) = frames.last_mut()
                    && *expect_key
                {
                    *expect_key = false;
                    let key = if escaped {
                        serde_json::from_slice::<String>(&body[start - 1..=i])
                            .map_or(Cow::Borrowed(&body[start..i]), |s| {
                                Cow::Owned(s.into_bytes())
                            })
                    } else {
                        Cow::Borrowed(&body[start..i])
                    };
                    if let Err(key) = insert_key(&mut keys, *own, set, key) {
                        duplicate = Some(duplicate_key(&frames, &keys, &key));
                    }
                }
            }
            b'[' | b'{' => {
                if frames.len() >= max {
                    return Err(ApiError::bad_request(format!(
                        "invalid JSON: arrays and objects nest deeper than {max} levels"
                    )));
                }
                frames.push(if body[i] == b'{' {
                    Frame::Object {
                        start: keys.len(),
                        set: None,
                        expect_key: true,
                    }
                } else {
                    Frame::Array { index: 0 }
                });
            }
            b']' | b'}' => {
                if let Some(Frame::Object { start, .. }) = frames.pop() {
                    keys.truncate(start);
                }
            }
            b',' => match frames.last_mut() {
                Some(Frame::Object { expect_key, .. }) => *expect_key = true,
                Some(Frame::Array { index }) => *index += 1,
                None => {}
            },
            _ => {}
        }
        i += 1;
    }
    match duplicate {
        // Text that is not JSON is the parser's to report, whatever its keys.
        Some(detail) if serde_json::from_slice::<IgnoredAny>(body).is_ok() => {
            Err(ApiError::bad_request(detail))
        }
        _ => Ok(()),
    }
}

/// An open array or object in [`check_json`].
enum Frame<'a> {
    Object {
        /// Where its keys start in the list of open objects' keys (read so far, in order;
        /// the last one's value is being read).
        start: usize,
        /// The same keys, once there are more than [`LINEAR_KEYS`] of them.
        set: Option<HashSet<Cow<'a, [u8]>>>,
        /// Whether the next string is a key.
        expect_key: bool,
    },
    Array {
        /// The element being read.
        index: usize,
    },
}

/// Up to this many keys an object's keys are compared one by one; beyond, through a hash set,
/// so that an object of many keys costs linear time.
const LINEAR_KEYS: usize = 16;

/// Adds `key` to the innermost object's keys (those of `keys` from `start` on, mirrored in
/// `set` for large objects), or gives it back when it is there already.
fn insert_key<'a>(
    keys: &mut Vec<Cow<'a, [u8]>>,
    start: usize,
    set: &mut Option<HashSet<Cow<'a, [u8]>>>,
    key: Cow<'a, [u8]>,
) -> Result<(), Cow<'a, [u8]>> {
    let own = &keys[start..];
    let repeated = if own.len() < LINEAR_KEYS {
        own.contains(&key)
    } else {
        let set = set.get_or_insert_with(|| own.iter().cloned().collect());
        !set.insert(key.clone())
    };
    if repeated {
        return Err(key);
    }
    keys.push(key);
    Ok(())
}

/// The error detail for `key`, repeated in the innermost object of `frames`.
fn duplicate_key(frames: &[Frame<'_>], keys: &[Cow<'_, [u8]>], key: &[u8]) -> String {
    let mut path = String::new();
    // Every frame but the innermost is inside the value of its last key or element.
    let outer = frames.len().saturating_sub(1);
    for (i, frame) in frames[..outer].iter().enumerate() {
        match frame {
            Frame::Object { start, .. } => {
                if !path.is_empty() {
                    path.push('.');
                }
                // Its keys end where the next object inside it starts.
                let end = frames[i + 1..]
                    .iter()
                    .find_map(|f| match f {
                        Frame::Object { start, .. } => Some(*start),
                        Frame::Array { .. } => None,
                    })
                    .unwrap_or(keys.len());
                if let Some(k) = keys[*start..end].last() {
                    path.push_str(&quote_key(k, false));
                }
            }
            Frame::Array { index } => path.push_str(&format!("[{index}]")),
        }
    }
    let key = quote_key(key, true);
    if path.is_empty() {
        format!("invalid JSON: duplicate key {key}")
    } else {
        format!("invalid JSON: duplicate key {key} in {path}")
    }
}

/// A key for an error detail: cut to 64 characters; `quoted` in JSON quotes.
fn quote_key(key: &[u8], quoted: bool) -> String {
    let text = String::from_utf8_lossy(key);
    let mut cut: String = text.chars().take(64).collect();
    if cut.len() < text.len() {
        cut.push('…');
    }
    if quoted { format!("{cut:?}") } else { cut }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_tenant_refused_again_and_again_waits_for_its_answers_others_do_not() {
        let limits = super::Limits::default();
        let (greedy, other) = (
            crate::ids::TenantId::new("greedy").unwrap(),
            crate::ids::TenantId::new("other").unwrap(),
        );
        for _ in 0..super::FREE_REFUSALS {
            assert!(limits.refusal_delay(&greedy).is_zero());
        }
        assert_eq!(limits.refusal_delay(&greedy), super::REFUSAL_DELAY);
        assert!(limits.refusal_delay(&other).is_zero());
    }

    use super::*;

    #[test]
    fn depth_counts_structure_not_strings() {
        let deep = format!("{}{}", "[".repeat(65), "]".repeat(65));
        assert!(check_json(deep.as_bytes(), 64).is_err());
        let ok = format!("{}{}", "[".repeat(64), "]".repeat(64));
        assert!(check_json(ok.as_bytes(), 64).is_ok());
        let in_string = format!("{{\"a\": \"{}\\\"{}\"}}", "[".repeat(100), "{".repeat(100));
        assert!(check_json(in_string.as_bytes(), 2).is_ok());
        // An escaped backslash ends before the closing quote: the brackets after it count.
        assert!(check_json(br#"["a\\", [[1]]]"#, 2).is_err());
        assert!(check_json(br#"["a\\", [1]]"#, 2).is_ok());
        // Unterminated strings and a trailing backslash pass (the parser reports them).
        assert!(check_json(br#"["abc\"#, 1).is_ok());
        assert!(check_json(br#"["abc"#, 1).is_ok());
        assert!(check_json(br#"[""]"#, 1).is_ok());
    }

    fn duplicate(body: &str) -> Option<String> {
        check_json(body.as_bytes(), 64)
            .err()
            .map(|e| e.detail().to_string())
    }

    #[test]
    fn a_key_twice_in_any_object_is_refused_naming_it() {
        assert_eq!(
            duplicate(r#"{"event_type":"status","state":"working","state":"failed"}"#).as_deref(),
            Some(r#"invalid JSON: duplicate key "state""#)
        );
        // Nested, after unescaping, and past the point where keys go into a hash set.
        assert_eq!(
            duplicate(r#"{"events":[{"a":1},{"data":{"x":1,"\u0078":2}}]}"#).as_deref(),
            Some(r#"invalid JSON: duplicate key "x" in events[1].data"#)
        );
        let many: Vec<String> = (0..100).map(|i| format!("\"k{i}\":{i}")).collect();
        let body = format!("{{{},\"k7\":0}}", many.join(","));
        assert_eq!(
            duplicate(&body).as_deref(),
            Some(r#"invalid JSON: duplicate key "k7""#)
        );
        // Equal keys in different objects, and keys' text as values, are fine.
        assert_eq!(
            duplicate(r#"{"a":{"a":"a"},"b":[{"a":1},{"a":2}],"c":"a"}"#),
            None
        );
        assert_eq!(duplicate(r#"{"a":"b","b":"a"}"#), None);
        // An object's keys stay its own around the objects inside it: after one closes, its
        // keys are forgotten and the outer object's are still checked.
        assert_eq!(duplicate(r#"{"a":{"b":1,"c":{"d":1}},"b":2,"d":3}"#), None);
        assert_eq!(
            duplicate(r#"{"a":{"b":1},"c":[{"e":{}}],"a":2}"#).as_deref(),
            Some(r#"invalid JSON: duplicate key "a""#)
        );
        assert_eq!(
            duplicate(r#"{"x":1,"y":{"z":[1,{"k":1,"q":{},"k":2}]}}"#).as_deref(),
            Some(r#"invalid JSON: duplicate key "k" in y.z[1]"#)
        );
        // Text that is not JSON is left to the parser, whatever its keys.
        assert_eq!(duplicate(r#"{"a":1,"a":2"#), None);
    }

    #[test]
    fn stream_slots_are_counted_per_tenant_and_in_total() {
        let limits = Limits::default();
        let a = TenantId::new("a").unwrap();
        let b = TenantId::new("b").unwrap();
        limits.open_stream(&a, 3, 2).unwrap();
        limits.open_stream(&a, 3, 2).unwrap();
        let err = limits.open_stream(&a, 3, 2).unwrap_err();
        assert_eq!(err.status().as_u16(), 429);
        limits.open_stream(&b, 3, 2).unwrap();
        assert!(limits.open_stream(&b, 3, 2).is_err(), "total limit");
        limits.close_stream(&a);
        limits.open_stream(&b, 3, 2).unwrap();
        assert_eq!(limits.open_streams(), 3);
    }
}
