//! Event ids the store assigns at commit, derived from the event's queue and offset.
//!
//! An event enqueued over HTTP without an `event_id` gets its id from the writer when its
//! offset is known: `evt_` + 12 lowercase hex characters (the contract's shape), the hex being
//! a keyed permutation of the 48-bit offset, tweaked by the queue's numeric id. Because the
//! id names its offset, such an id needs no entry in the idempotency index: a producer who
//! later enqueues an event with that id explicitly is recognised by inverting the permutation
//! and comparing the id of the event stored at the resulting offset
//! ([`IdKey::offset_of`]). The index then only holds ids producers chose, and the most common
//! enqueue (no id) costs neither an index lookup nor an index insert (nor an index removal
//! when the event is trimmed or purged).
//!
//! Properties relied on:
//! - Within a queue, distinct offsets get distinct ids (the permutation is a bijection on 48
//!   bits), so no two derived ids of a queue collide. Queue ids are never reused, and the
//!   tweak makes a recreated queue's ids differ from its predecessor's.
//! - The key is random per database (stored in redb's `meta` table when the file is created
//!   or upgraded), so ids look random and differ between installations, as the generated ids
//!   of the library ([`crate::EventId::generate`]) do. It is not a secret: it only spreads
//!   ids, it does not authenticate them.
//! - An id a producer chose that happens to have the same shape is indexed as usual; the
//!   derived-offset check is only a second way to find a retained id, never a reason to refuse.

/// The per-database key of the permutation.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct IdKey {
    k0: u64,
    k1: u64,
}

impl std::fmt::Debug for IdKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IdKey(..)")
    }
}

/// Offsets below this get a derived id (48 bits: every offset a queue will ever reach).
pub(crate) const DERIVED_LIMIT: u64 = 1 << 48;

/// Length of a derived id: `evt_` + 12 hex characters.
pub(crate) const DERIVED_LEN: usize = 16;

const HALF: u32 = 24;
const HALF_MASK: u64 = (1 << HALF) - 1;
const ROUNDS: u64 = 6;

/// The splitmix64 finaliser: a cheap, well-mixing 64-bit hash step.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl IdKey {
    /// A key from its two stored halves.
    pub(crate) fn from_parts(k0: u64, k1: u64) -> Self {
        IdKey { k0, k1 }
    }

    /// A fresh random key.
    pub(crate) fn random() -> Self {
        IdKey {
            k0: fastrand::u64(..),
            k1: fastrand::u64(..),
        }
    }

    /// The two halves, for storing.
    pub(crate) fn parts(self) -> (u64, u64) {
        (self.k0, self.k1)
    }

    /// The key mixed with queue `qid`: what the rounds of that queue's permutation share.
    fn tweak(self, qid: u64) -> u64 {
        mix(self.k0 ^ qid.wrapping_mul(0x9e37_79b9_7f4a_7c15))
    }

    /// The round function of the Feistel network: 24 bits from the queue's tweak, the round
    /// and the other half.
    fn round(self, tweak: u64, round: u64, half: u64) -> u64 {
        mix(tweak ^ self.k1.rotate_left(round as u32 * 11) ^ (round << 56) ^ half) & HALF_MASK
    }

    /// The permutation of 48-bit values for queue `qid`.
    fn permute(self, qid: u64, value: u64) -> u64 {
        let tweak = self.tweak(qid);
        let (mut left, mut right) = (value >> HALF, value & HALF_MASK);
        for r in 0..ROUNDS {
            (left, right) = (right, left ^ self.round(tweak, r, right));
        }
        (left << HALF) | right
    }

    /// The inverse of [`IdKey::permute`].
    fn unpermute(self, qid: u64, value: u64) -> u64 {
        let tweak = self.tweak(qid);
        let (mut left, mut right) = (value >> HALF, value & HALF_MASK);
        for r in (0..ROUNDS).rev() {
            (left, right) = (right ^ self.round(tweak, r, left), left);
        }
        (left << HALF) | right
    }

    /// The id of the event at `offset` of queue `qid`, if the offset has one (below
    /// [`DERIVED_LIMIT`]).
    pub(crate) fn derive(self, qid: u64, offset: u64) -> Option<[u8; DERIVED_LEN]> {
        if offset >= DERIVED_LIMIT {
            return None;
        }
        let value = self.permute(qid, offset);
        let mut id = *b"evt_000000000000";
        for (i, byte) in id[4..].iter_mut().enumerate() {
            let nibble = (value >> (44 - 4 * i)) & 0xf;
            *byte = b"0123456789abcdef"[nibble as usize];
        }
        Some(id)
    }

    /// Whether `event_id` is the derived id of `offset` in queue `qid`.
    pub(crate) fn is_derived(self, qid: u64, offset: u64, event_id: &str) -> bool {
        self.derive(qid, offset)
            .is_some_and(|id| id.as_slice() == event_id.as_bytes())
    }

    /// The only offset of queue `qid` whose derived id can be `event_id`, if it has the
    /// derived shape. The caller still compares the id stored at that offset.
    pub(crate) fn offset_of(self, qid: u64, event_id: &str) -> Option<u64> {
        let hex = event_id.strip_prefix("evt_")?;
        if hex.len() != 12 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return None;
        }
        let value = u64::from_str_radix(hex, 16).ok()?;
        Some(self.unpermute(qid, value))
    }
}

/// The `event_id` of a stored event's JSON, which starts with it (base fields come first).
pub(crate) fn json_event_id(json: &[u8]) -> Option<&str> {
    let rest = json.strip_prefix(b"{\"event_id\":\"")?;
    let end = memchr::memchr(b'"', rest)?;
    std::str::from_utf8(&rest[..end]).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn key() -> IdKey {
        IdKey::from_parts(0x0123_4567_89ab_cdef, 0xfedc_ba98_7654_3210)
    }

    #[test]
    fn derived_ids_have_the_contract_shape_and_name_their_offset() {
        let k = key();
        for qid in [1, 2, 77, u64::MAX] {
            for offset in [0, 1, 2, 999, 1 << 24, (1 << 47) + 5, DERIVED_LIMIT - 1] {
                let id = k.derive(qid, offset).expect("derived");
                let s = std::str::from_utf8(&id).expect("ascii");
                crate::ids::EventId::new(s).expect("a valid event id");
                assert!(s.starts_with("evt_"));
                assert!(
                    s[4..]
                        .bytes()
                        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
                );
                assert_eq!(k.offset_of(qid, s), Some(offset), "{s}");
                assert!(k.is_derived(qid, offset, s));
                assert!(!k.is_derived(qid, offset + 1, s));
            }
        }
        assert_eq!(k.derive(1, DERIVED_LIMIT), None);
    }

    #[test]
    fn ids_are_distinct_within_a_queue_and_differ_across_queues_and_keys() {
        let k = key();
        let mut seen = HashSet::new();
        for offset in 0..100_000 {
            assert!(seen.insert(k.derive(5, offset).expect("derived")));
        }
        let other_queue = (0..1000)
            .filter(|&o| k.derive(5, o) == k.derive(6, o))
            .count();
        assert_eq!(other_queue, 0);
        let other_key = IdKey::from_parts(1, 2);
        let same = (0..1000)
            .filter(|&o| k.derive(5, o) == other_key.derive(5, o))
            .count();
        assert_eq!(same, 0);
        // Consecutive offsets do not give consecutive ids.
        let a = u64::from_str_radix(
            std::str::from_utf8(&k.derive(5, 0).expect("id")[4..]).expect("hex"),
            16,
        )
        .expect("hex");
        let b = u64::from_str_radix(
            std::str::from_utf8(&k.derive(5, 1).expect("id")[4..]).expect("hex"),
            16,
        )
        .expect("hex");
        assert!(a.abs_diff(b) > 1);
    }

    #[test]
    fn other_shapes_name_no_offset() {
        let k = key();
        for id in [
            "evt_0123456789a",
            "evt_0123456789abc",
            "evt_0123456789AB",
            "evx_0123456789ab",
            "my-id",
            "evt_01234567_9ab",
        ] {
            assert_eq!(k.offset_of(3, id), None, "{id}");
        }
        // Every well-shaped id names some offset; only the stored id decides.
        assert!(k.offset_of(3, "evt_0123456789ab").is_some());
    }

    #[test]
    fn the_event_id_is_read_from_the_start_of_stored_json() {
        assert_eq!(
            json_event_id(br#"{"event_id":"evt_0123456789ab","task_id":"t"}"#),
            Some("evt_0123456789ab")
        );
        assert_eq!(json_event_id(br#"{"task_id":"t"}"#), None);
    }
}
