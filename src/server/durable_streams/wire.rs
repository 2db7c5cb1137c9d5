//! The protocol's small formats: offsets, cursors, ETags, media types, SSE data frames.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::BytesMut;

/// Response headers a browser may read (CORS).
pub(super) const EXPOSE: &str = "stream-next-offset, stream-up-to-date, stream-closed, \
    stream-cursor, stream-sse-data-encoding, producer-epoch, producer-seq, \
    producer-expected-seq, producer-received-seq, etag, location, content-type, \
    stream-ttl, stream-expires-at";

/// Request headers a browser may send (CORS).
pub(super) const ALLOW: &str = "content-type, authorization, if-none-match, stream-ttl, \
    stream-expires-at, stream-seq, stream-closed, producer-id, producer-epoch, producer-seq, \
    x-tenant-id, stream-forked-from, stream-fork-offset, stream-fork-sub-offset";

/// Digits of each half of a rendered offset.
const HALF_DIGITS: usize = 16;
/// What one half counts up to: the offset is `high * SPLIT + low`.
const SPLIT: u64 = 10_u64.pow(HALF_DIGITS as u32);
/// Digits of the offsets sent before the split form (still accepted).
const LEGACY_DIGITS: usize = 20;

/// An offset as sent: `HHHHHHHHHHHHHHHH_LLLLLLLLLLLLLLLL`, the queue offset's decimal digits
/// split in two zero-padded halves of 16 (the reference server's shape, so clients and
/// tests that know it work; every `u64` fits). Equal widths sort as strings, one to one
/// with queue offsets.
pub(super) fn format_offset(offset: u64) -> String {
    format!(
        "{:0w$}_{:0w$}",
        offset / SPLIT,
        offset % SPLIT,
        w = HALF_DIGITS
    )
}

/// A requested read position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ReadOffset {
    /// `-1`: the oldest retained message.
    Start,
    /// `now`: the tail.
    Now,
    /// An offset the server gave out.
    At(u64),
}

impl ReadOffset {
    /// `-1`, `now`, an offset as [`format_offset`] renders it, or up to 20 decimal digits
    /// (the form offsets had before, which clients may have saved); anything else is no
    /// offset.
    pub(super) fn parse(s: &str) -> Option<Self> {
        let digits = |d: &str| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit());
        match s {
            "-1" => Some(ReadOffset::Start),
            "now" => Some(ReadOffset::Now),
            _ => match s.split_once('_') {
                Some((high, low))
                    if high.len() == HALF_DIGITS
                        && low.len() == HALF_DIGITS
                        && digits(high)
                        && digits(low) =>
                {
                    let high: u64 = high.parse().ok()?;
                    let low: u64 = low.parse().ok()?;
                    high.checked_mul(SPLIT)?
                        .checked_add(low)
                        .map(ReadOffset::At)
                }
                None if s.len() <= LEGACY_DIGITS && digits(s) => s.parse().ok().map(ReadOffset::At),
                _ => None,
            },
        }
    }
}

/// The media type of a `Content-Type` value: without parameters, lower case.
pub(super) fn media_type(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// Whether the stream is in JSON mode (protocol §9.1).
pub(super) fn is_json(content_type: &str) -> bool {
    media_type(content_type) == "application/json"
}

/// The ETag of a read of `from..to`; it changes when the stream closes (protocol §10.1).
pub(super) fn etag(from: u64, to: u64, closed: bool) -> String {
    let c = if closed { ":c" } else { "" };
    format!("\"{}:{}{c}\"", format_offset(from), format_offset(to))
}

/// Seconds of one cursor interval, counted from [`CURSOR_EPOCH`] (protocol §10.1).
const CURSOR_INTERVAL: u64 = 20;
/// 2024-10-09T00:00:00Z.
const CURSOR_EPOCH: u64 = 1_728_432_000;

/// The cursor of a live response: the current interval number, or, when the client already
/// holds that interval or a later one, a later one (by 1 to 3600 s of jitter), so cursors
/// never go backwards.
pub(super) fn cursor(client: Option<&str>) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let current = now.saturating_sub(CURSOR_EPOCH) / CURSOR_INTERVAL;
    match client.and_then(|c| c.parse::<u64>().ok()) {
        Some(c) if c >= current => {
            let jitter = fastrand::u64(1..=3600).div_ceil(CURSOR_INTERVAL).max(1);
            (c + jitter).to_string()
        }
        _ => current.to_string(),
    }
}

/// Appends an SSE `data` event carrying `payload` to `out`: its lines as they are (text and
/// JSON streams), or its standard base64 (binary streams), one `data:` line per line.
/// Written in place: every live reader frames every message, so nothing is allocated for
/// valid UTF-8 text.
pub(super) fn put_sse_data(out: &mut BytesMut, payload: &[u8], base64: bool) {
    if base64 {
        put_sse_lines(out, &encode_base64(payload));
    } else {
        // Borrowed when valid: a copy only where invalid UTF-8 is replaced.
        put_sse_lines(out, &String::from_utf8_lossy(payload));
    }
}

fn put_sse_lines(out: &mut BytesMut, text: &str) {
    out.reserve(text.len() + 32);
    out.extend_from_slice(b"event: data\n");
    // CR LF, LF and a lone CR all end a line in SSE: each becomes a `data:` line of its own,
    // so no payload can start a frame of its own.
    for line in text.split("\r\n").flat_map(|l| l.split(['\n', '\r'])) {
        out.extend_from_slice(b"data:");
        out.extend_from_slice(line.as_bytes());
        out.extend_from_slice(b"\n");
    }
    out.extend_from_slice(b"\n");
}

/// Standard base64 (RFC 4648, with padding).
pub(super) fn encode_base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_sort_as_strings_in_offset_order() {
        let offsets = [0u64, 9, 10, 99, 100, 12_345, SPLIT - 1, SPLIT, u64::MAX];
        for pair in offsets.windows(2) {
            assert!(format_offset(pair[0]) < format_offset(pair[1]));
        }
        for n in offsets {
            assert_eq!(
                ReadOffset::parse(&format_offset(n)),
                Some(ReadOffset::At(n))
            );
        }
        assert_eq!(format_offset(42), "0000000000000000_0000000000000042");
        assert_eq!(
            ReadOffset::parse("0000000000000000_0000000000000000"),
            Some(ReadOffset::At(0))
        );
        // The 20-digit form offsets had before is still read.
        assert_eq!(
            ReadOffset::parse("00000000000000000042"),
            Some(ReadOffset::At(42))
        );
        assert_eq!(ReadOffset::parse("-1"), Some(ReadOffset::Start));
        assert_eq!(ReadOffset::parse("now"), Some(ReadOffset::Now));
        for bad in [
            "",
            "abc",
            "-2",
            "1.5",
            "+1",
            "999999999999999999999",
            "0_1",
            "0000000000000000_000000000000000x",
            "9999999999999999_9999999999999999",
            "0000000000000000_0000000000000000_0",
        ] {
            assert_eq!(ReadOffset::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn base64_matches_rfc_4648_vectors() {
        let vectors = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ];
        for (plain, encoded) in vectors {
            assert_eq!(encode_base64(plain.as_bytes()), encoded);
        }
    }

    #[test]
    fn a_client_cursor_at_or_past_now_moves_forward() {
        let now: u64 = cursor(None).parse().unwrap();
        let ahead = now + 50;
        let next: u64 = cursor(Some(&ahead.to_string())).parse().unwrap();
        assert!(next > ahead);
        let old: u64 = cursor(Some("1")).parse().unwrap();
        assert!(old >= now);
    }

    #[test]
    fn sse_data_lines_carry_each_line_of_the_payload() {
        let frame = |payload: &[u8], base64: bool| {
            let mut out = BytesMut::new();
            put_sse_data(&mut out, payload, base64);
            String::from_utf8(out.to_vec()).unwrap()
        };
        assert_eq!(frame(b"a\nb", false), "event: data\ndata:a\ndata:b\n\n");
        assert_eq!(
            frame(b"a\r\nb\rc", false),
            "event: data\ndata:a\ndata:b\ndata:c\n\n"
        );
        assert_eq!(frame(&[0, 1, 2], true), "event: data\ndata:AAEC\n\n");
        // Invalid UTF-8 is replaced, never sent raw.
        assert_eq!(
            frame(&[b'a', 0xff], false),
            "event: data\ndata:a\u{fffd}\n\n"
        );
    }
}
