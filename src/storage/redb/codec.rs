//! On-disk encodings: the format version, queue records and event records.
//!
//! An event record is `[RECORD_VERSION][postcard(EventHeader)][event JSON]`: the small binary
//! header carries what the log needs without parsing JSON (type, terminal flag, id for the
//! idempotency index, timestamp); the JSON is the event exactly as rendered at commit, offset
//! included, so replay and SSE send stored bytes without re-encoding.
//!
//! A value of the `events` table, keyed by its queue and first offset, is either one record or
//! a *block* of records at consecutive offsets: `[BLOCK_VERSION]` then, per record,
//! `[len: u32 LE][record]` (format version 4). Moving a generation of logged batches into redb
//! stores each queue's run of events as blocks: one B-tree insert per block instead of one per
//! event, which halved the CPU of that step.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::storage::QueueRecord;

/// Version of the whole file layout, stored in the `meta` table and checked on open.
/// 2 added the checkpoint tables and the log op that writes them; 3 the key of derived event
/// ids (and events whose ids are not indexed: an older build would not find them); 4 blocks
/// of events in one value. Files of versions 1 to 3 are upgraded in place on open.
pub(crate) const FORMAT_VERSION: u32 = 4;
/// First byte of every event record.
const RECORD_VERSION: u8 = 1;
/// First byte of a block of event records.
const BLOCK_VERSION: u8 = 2;
/// A block is closed once its records reach this size (a larger record is a value of its own).
pub(crate) const BLOCK_BYTES: usize = 8 << 10;

/// The fixed part of an event record. The id borrows, so neither encoding nor decoding
/// copies it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct EventHeader<'a> {
    pub event_type: u8,
    pub terminal: bool,
    pub timestamp_us: i64,
    pub event_id: &'a str,
}

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

/// Where an event record's JSON starts, as [`decode_event`] finds it, without decoding the
/// header: its fields skipped by their postcard encoding (`event_type` one byte, `terminal`
/// one byte, `timestamp_us` a varint, `event_id` a varint length and its bytes), so a reader
/// that wants only the JSON pays no UTF-8 check of the id.
pub(crate) fn json_start(record: &[u8]) -> Result<usize> {
    let corrupt = || Error::storage("corrupt event record: truncated header");
    match record.first() {
        Some(&RECORD_VERSION) => {}
        Some(v) => return Err(Error::storage(format!("unknown event record version {v}"))),
        None => return Err(Error::storage("empty event record")),
    }
    // Version, event_type, terminal.
    let mut at = 3;
    if record.len() < at {
        return Err(corrupt());
    }
    let varint = |at: &mut usize| -> Result<u64> {
        let mut value = 0u64;
        for shift in (0..70).step_by(7) {
            let b = *record.get(*at).ok_or_else(corrupt)?;
            *at += 1;
            value |= u64::from(b & 0x7f).checked_shl(shift).unwrap_or(0);
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(corrupt())
    };
    varint(&mut at)?;
    let id_len = usize::try_from(varint(&mut at)?).map_err(|_| corrupt())?;
    let start = at.checked_add(id_len).ok_or_else(corrupt)?;
    if start > record.len() {
        return Err(corrupt());
    }
    Ok(start)
}

/// Encodes records of consecutive offsets as one `events` value: the record itself when there
/// is one, a block otherwise. `None` for no records.
pub(crate) fn encode_value<R: AsRef<[u8]>>(records: &[R]) -> Option<std::borrow::Cow<'_, [u8]>> {
    match records {
        [] => None,
        [one] => Some(std::borrow::Cow::Borrowed(one.as_ref())),
        many => {
            let len = 1 + many.iter().map(|r| 4 + r.as_ref().len()).sum::<usize>();
            let mut buf = Vec::with_capacity(len);
            buf.push(BLOCK_VERSION);
            for r in many {
                let r = r.as_ref();
                // Records are far below 4 GiB (the event size limit); a longer one would have
                // failed its log append already.
                buf.extend_from_slice(&u32::try_from(r.len()).unwrap_or(u32::MAX).to_le_bytes());
                buf.extend_from_slice(r);
            }
            Some(std::borrow::Cow::Owned(buf))
        }
    }
}

/// The records of one `events` value, in offset order (the first is at the value's key).
pub(crate) fn records(value: &[u8]) -> Records<'_> {
    match value.split_first() {
        Some((&BLOCK_VERSION, rest)) => Records {
            rest,
            single: false,
        },
        _ => Records {
            rest: value,
            single: true,
        },
    }
}

/// Iterator of [`records`]; a truncated block yields an error and ends.
pub(crate) struct Records<'a> {
    rest: &'a [u8],
    single: bool,
}

impl<'a> Iterator for Records<'a> {
    type Item = Result<&'a [u8]>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        if self.single {
            return Some(Ok(std::mem::take(&mut self.rest)));
        }
        let corrupt = || Error::storage("corrupt event block: truncated record");
        let Some((len, rest)) = self.rest.split_first_chunk::<4>() else {
            self.rest = &[];
            return Some(Err(corrupt()));
        };
        let len = u32::from_le_bytes(*len) as usize;
        if rest.len() < len {
            self.rest = &[];
            return Some(Err(corrupt()));
        }
        let (record, rest) = rest.split_at(len);
        self.rest = rest;
        Some(Ok(record))
    }
}

/// A queue record: its postcard encoding, then, for a stream only, `postcard(content type)`
/// and `postcard(stream state)`. Typed queues' records keep the bytes they had before streams
/// existed; a record without the trailer decodes with no content type, and one with the
/// content type alone (written before streams kept their own state) with the default state.
pub(crate) fn encode_queue(record: &QueueRecord) -> Result<Vec<u8>> {
    // Room for a typed queue's record, so that encoding it (once per batch that touches the
    // queue) allocates once instead of growing from empty.
    let buf = postcard::to_extend(record, Vec::with_capacity(64)).map_err(Error::storage)?;
    match &record.content_type {
        Some(ct) => {
            let buf = postcard::to_extend(ct.as_str(), buf).map_err(Error::storage)?;
            match &record.stream {
                Some(st) => postcard::to_extend(st, buf).map_err(Error::storage),
                None => Ok(buf),
            }
        }
        None => Ok(buf),
    }
}

pub(crate) fn decode_queue(bytes: &[u8]) -> Result<QueueRecord> {
    let corrupt = |e: postcard::Error| Error::storage(format!("corrupt queue record: {e}"));
    let (mut record, rest) = postcard::take_from_bytes::<QueueRecord>(bytes).map_err(corrupt)?;
    if !rest.is_empty() {
        let (ct, rest) = postcard::take_from_bytes::<String>(rest).map_err(corrupt)?;
        record.content_type = Some(ct);
        if !rest.is_empty() {
            record.stream = Some(postcard::from_bytes(rest).map_err(corrupt)?);
        }
    }
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::CancelRecord;

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
    fn json_start_finds_the_json_decode_event_finds() {
        for (event_type, terminal, timestamp_us, event_id) in [
            (0u8, false, 0i64, ""),
            (3, true, 1_764_000_000_123_456, "evt_0123456789ab"),
            (
                255,
                false,
                -1,
                "ds-0123456789abcdef-0-18446744073709551615-999",
            ),
            (1, false, i64::MIN, &"x".repeat(300)[..]),
        ] {
            let header = EventHeader {
                event_type,
                terminal,
                timestamp_us,
                event_id,
            };
            let json = br#"{"a":1}"#;
            let (mut buf, start) = encode_event(&header, json.len()).unwrap();
            buf.extend_from_slice(json);
            assert_eq!(json_start(&buf).unwrap(), start);
            assert_eq!(decode_event(&buf).unwrap().1, start);
            // A record cut inside its header is corrupt, never a wrong start.
            for cut in 0..start {
                assert!(json_start(&buf[..cut]).is_err(), "cut at {cut}");
            }
        }
    }

    fn record(id: &str, json: &[u8]) -> Vec<u8> {
        let header = EventHeader {
            event_type: 1,
            terminal: false,
            timestamp_us: 5,
            event_id: id,
        };
        let (mut buf, _) = encode_event(&header, json.len()).unwrap();
        buf.extend_from_slice(json);
        buf
    }

    #[test]
    fn a_value_holds_one_record_as_it_is_and_more_as_a_block() {
        assert!(encode_value::<Vec<u8>>(&[]).is_none());
        let one = [record("a", b"{}")];
        let value = encode_value(&one).unwrap();
        // One record is stored exactly as format 3 stored every record.
        assert_eq!(value.as_ref(), one[0].as_slice());
        let back: Vec<&[u8]> = records(&value).map(|r| r.unwrap()).collect();
        assert_eq!(back, vec![one[0].as_slice()]);

        let many = [record("a", b"{}"), record("bb", b"[1,2]"), record("", b"")];
        let value = encode_value(&many).unwrap();
        let back: Vec<&[u8]> = records(&value).map(|r| r.unwrap()).collect();
        assert_eq!(back, many.iter().map(Vec::as_slice).collect::<Vec<_>>());
        assert_eq!(decode_event(back[1]).unwrap().0.event_id, "bb");
        // Records are found by position: the third is the one at key + 2.
        assert_eq!(records(&value).nth(2).unwrap().unwrap(), many[2].as_slice());
        assert!(records(&value).nth(3).is_none());
    }

    #[test]
    fn a_truncated_block_is_an_error_not_a_shorter_block() {
        let many = [record("a", b"{}"), record("b", b"{}")];
        let value = encode_value(&many).unwrap().into_owned();
        for cut in [value.len() - 1, value.len() - many[1].len() - 2] {
            let got: Vec<Result<&[u8]>> = records(&value[..cut]).collect();
            assert_eq!(got.len(), 2, "cut at {cut}");
            assert!(got[0].is_ok() && got[1].is_err(), "cut at {cut}");
        }
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
            content_type: None,
            stream: None,
        };
        let typed = encode_queue(&rec).unwrap();
        assert_eq!(decode_queue(&typed).unwrap(), rec);
        // A stream's record carries its content type after the record; a typed queue's record
        // is unchanged by it, so files written before streams existed still decode.
        let stream = QueueRecord {
            kind: 3,
            content_type: Some("application/json".into()),
            ..rec
        };
        let bytes = encode_queue(&stream).unwrap();
        assert!(bytes.len() > typed.len());
        assert_eq!(decode_queue(&bytes).unwrap(), stream);
        // Its own state (expiry, producers) follows the content type.
        let mut producers = crate::storage::Producers::default();
        producers.by_id.insert(
            "p1".into(),
            crate::storage::ProducerState {
                epoch: 2,
                last_seq: 5,
                at: 9,
            },
        );
        producers.closed_by = Some(("p1".into(), 2, 5));
        let with_state = QueueRecord {
            stream: Some(crate::storage::StreamRecord {
                expires_at_us: Some(123),
                producers,
            }),
            ..stream
        };
        let bytes = encode_queue(&with_state).unwrap();
        assert_eq!(decode_queue(&bytes).unwrap(), with_state);
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
            let _ = crate::storage::redb::wal::decode_ops(&bytes);
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
