//! On-disk encodings: the format version, queue records and event records.
//!
//! An event record is `[RECORD_VERSION][postcard(EventHeader)][event JSON]`: the small binary
//! header carries what the log needs without parsing JSON (type, terminal flag, id for the
//! idempotency index, timestamp); the JSON is the event exactly as rendered at commit, offset
//! included, so replay and SSE send stored bytes without re-encoding.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Version of the whole file layout, stored in the `meta` table and checked on open.
/// 2 added the checkpoint tables and the log op that writes them; 3 the key of derived event
/// ids (and events whose ids are not indexed: an older build would not find them). Version-1
/// and version-2 files are upgraded in place on open.
pub(crate) const FORMAT_VERSION: u32 = 3;
/// First byte of every event record.
const RECORD_VERSION: u8 = 1;

/// The fixed part of an event record. The id borrows, so neither encoding nor decoding
/// copies it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct EventHeader<'a> {
    pub event_type: u8,
    pub terminal: bool,
    pub timestamp_us: i64,
    pub event_id: &'a str,
}

/// A queue's persistent metadata, keyed by `(tenant, task)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct QueueRecord {
    pub id: u64,
    pub kind: u8,
    pub created_at_us: i64,
    pub last_activity_us: i64,
    pub ttl_ms: u64,
    pub max_buffer_size: u64,
    pub first_offset: u64,
    pub next_offset: u64,
    pub closed: bool,
    pub finished_at: Option<u64>,
    pub cancel: Option<CancelRecord>,
}

/// A persisted cancellation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct CancelRecord {
    pub reason: Option<String>,
    pub time_us: i64,
}

/// Encodes `header` followed by `json` into one record buffer. Returns the buffer and the
/// position where the JSON starts.
pub(crate) fn encode_event(header: &EventHeader<'_>, json_len: usize) -> Result<(Vec<u8>, usize)> {
    let mut buf = Vec::with_capacity(1 + 24 + header.event_id.len() + json_len);
    buf.push(RECORD_VERSION);
    let mut buf = postcard::to_extend(header, buf).map_err(Error::storage)?;
    let start = buf.len();
    buf.reserve_exact(json_len);
    Ok((std::mem::take(&mut buf), start))
}

/// Splits a record into its header and the position of its JSON.
pub(crate) fn decode_event(record: &[u8]) -> Result<(EventHeader<'_>, usize)> {
    match record.split_first() {
        Some((&RECORD_VERSION, rest)) => {
            let (header, json) = postcard::take_from_bytes::<EventHeader<'_>>(rest)
                .map_err(|e| Error::storage(format!("corrupt event record: {e}")))?;
            Ok((header, record.len() - json.len()))
        }
        Some((v, _)) => Err(Error::storage(format!("unknown event record version {v}"))),
        None => Err(Error::storage("empty event record")),
    }
}

pub(crate) fn encode_queue(record: &QueueRecord) -> Result<Vec<u8>> {
    postcard::to_allocvec(record).map_err(Error::storage)
}

pub(crate) fn decode_queue(bytes: &[u8]) -> Result<QueueRecord> {
    postcard::from_bytes(bytes).map_err(|e| Error::storage(format!("corrupt queue record: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_record_round_trips() {
        let header = EventHeader {
            event_type: 3,
            terminal: true,
            timestamp_us: 1_764_000_000_123_456,
            event_id: "evt_0123456789ab",
        };
        let json = br#"{"a":1}"#;
        let (mut buf, start) = encode_event(&header, json.len()).unwrap();
        buf.extend_from_slice(json);
        let (back, at) = decode_event(&buf).unwrap();
        assert_eq!(back, header);
        assert_eq!(at, start);
        assert_eq!(&buf[at..], json);
    }

    #[test]
    fn unknown_record_version_is_an_error() {
        assert!(decode_event(&[9, 0, 0]).is_err());
        assert!(decode_event(&[]).is_err());
    }

    #[test]
    fn queue_record_round_trips() {
        let rec = QueueRecord {
            id: 7,
            kind: 1,
            created_at_us: 1,
            last_activity_us: 2,
            ttl_ms: 1_800_000,
            max_buffer_size: 1000,
            first_offset: 3,
            next_offset: 9,
            closed: true,
            finished_at: Some(8),
            cancel: Some(CancelRecord {
                reason: Some("user".into()),
                time_us: 5,
            }),
        };
        assert_eq!(decode_queue(&encode_queue(&rec).unwrap()).unwrap(), rec);
    }

    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: std::env::var("EVENTQUEUE_FUZZ_CASES")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(2048),
            ..ProptestConfig::default()
        })]

        /// The record decoders never panic on arbitrary bytes: a corrupt record is an error.
        #[test]
        fn decoders_reject_garbage_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            if let Ok((header, at)) = decode_event(&bytes) {
                prop_assert!(at <= bytes.len());
                prop_assert!(header.event_id.len() <= bytes.len());
            }
            let _ = decode_queue(&bytes);
            let _ = crate::store::wal::decode_ops(&bytes);
        }

        /// Flipping one byte of a valid record never panics the decoder.
        #[test]
        fn decoders_survive_one_flipped_byte(pos in 0usize..64, bit in 0u8..8) {
            let header = EventHeader { event_type: 1, terminal: false, timestamp_us: 42, event_id: "evt_0123456789ab" };
            let (mut buf, _) = encode_event(&header, 8).unwrap();
            buf.extend_from_slice(b"{\"a\":1}");
            let i = pos % buf.len();
            buf[i] ^= 1 << bit;
            let _ = decode_event(&buf);
        }
    }
}
