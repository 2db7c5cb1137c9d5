//! Reading a queue's events with `XRANGE` on a connection of the store's own, its reply
//! parsed straight into [`StoredEvent`]s.
//!
//! # Why
//!
//! A replay reads its queue a chunk of up to ~1000 events at a time. Through the redis
//! crate, every entry of the reply becomes a tree of [`redis::Value`]s (an array, its id, an
//! array of fields, a byte vector per field), parsed by a general combinator parser, and then
//! taken apart again into our form: that was ~60 % of a node's CPU time during a replay,
//! more than rendering and sending the events. Here the reply is read into one buffer and
//! each event's JSON is a slice of it ([`Bytes`], no copy): one allocation per chunk.
//!
//! # Scope
//!
//! Only the reply of one command is read: `XRANGE key 0-A 0-B COUNT n` on entries the batch
//! script writes (one per run of events appended together, named `0-(offset+1)` after the
//! run's last offset, a field `r` per event whose value is the event record). The
//! connection speaks RESP2 (no `HELLO`), sends `AUTH` and `SELECT` itself when the URL names
//! a password or a database, and reaches the server over TCP or a Unix socket. TLS and a
//! cluster's redirections are not handled here: those stores keep reading through the
//! redis crate (see [`Target::of`]).
//!
//! # Failures
//!
//! An error reply (`-ERR …`, `-LOADING …`) is returned as [`ReadError::Server`] with the
//! connection still usable. A broken or timed-out socket, or a reply that is not what
//! `XRANGE` answers, is [`ReadError::Io`] / [`ReadError::Protocol`]: the connection's state
//! is then unknown and it must be dropped.

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::ops::Range;
use std::time::Duration;

use bytes::Bytes;

use super::{HEADER, StoredEvent};

/// Bytes a reply of `n` entries takes beyond its records: the entry's array and id headers,
/// the field name and the record's length header (`*2\r\n$5\r\n0-123\r\n*2\r\n$1\r\nr\r\n$N\r\n`
/// and the CRLFs): under 64 for ids below 10^20 (and ~16 more per further event of an
/// entry, within the bytes a reader expects per entry).
const ENTRY_OVERHEAD: usize = 64;
/// Bytes a read from the socket asks for at least (the buffer grows by this much when full).
const READ_STEP: usize = 64 * 1024;
/// Longest header line accepted (an error reply's message included).
const MAX_LINE: usize = 64 * 1024;
/// Largest bulk string accepted (Redis's own `proto-max-bulk-len` default).
const MAX_BULK: usize = 512 * 1024 * 1024;

/// Where the store's server is, and how to log in: what a `redis://` (or Unix socket) URL
/// says, as the redis crate parsed it.
#[derive(Clone)]
pub(super) struct Target {
    addr: Addr,
    username: Option<String>,
    password: Option<String>,
    db: i64,
}

#[derive(Clone)]
enum Addr {
    Tcp(String, u16),
    #[cfg(unix)]
    Unix(std::path::PathBuf),
}

impl Target {
    /// The target of `client`'s connections, unless they use TLS (read through the crate).
    pub(super) fn of(client: &redis::Client) -> Option<Target> {
        let info = client.get_connection_info();
        let addr = match info.addr() {
            redis::ConnectionAddr::Tcp(host, port) => Addr::Tcp(host.clone(), *port),
            #[cfg(unix)]
            redis::ConnectionAddr::Unix(path) => Addr::Unix(path.clone()),
            _ => return None,
        };
        let settings = info.redis_settings();
        Some(Target {
            addr,
            username: settings.username().map(str::to_string),
            password: settings.password().map(str::to_string),
            db: settings.db(),
        })
    }

    /// A connection, logged in and on the URL's database, whose reads and writes give up
    /// after `io_timeout`.
    pub(super) fn connect(
        &self,
        connect_timeout: Duration,
        io_timeout: Duration,
    ) -> Result<Reader<Stream>, ReadError> {
        let stream = match &self.addr {
            Addr::Tcp(host, port) => {
                let mut last = None;
                let mut found = None;
                for addr in (host.as_str(), *port).to_socket_addrs()? {
                    match TcpStream::connect_timeout(&addr, connect_timeout) {
                        Ok(s) => {
                            found = Some(s);
                            break;
                        }
                        Err(e) => last = Some(e),
                    }
                }
                let s = match (found, last) {
                    (Some(s), _) => s,
                    (None, Some(e)) => return Err(e.into()),
                    (None, None) => {
                        return Err(io::Error::new(
                            io::ErrorKind::NotFound,
                            format!("no address for {host}"),
                        )
                        .into());
                    }
                };
                s.set_nodelay(true)?;
                s.set_read_timeout(Some(io_timeout))?;
                s.set_write_timeout(Some(io_timeout))?;
                Stream::Tcp(s)
            }
            #[cfg(unix)]
            Addr::Unix(path) => {
                let s = std::os::unix::net::UnixStream::connect(path)?;
                s.set_read_timeout(Some(io_timeout))?;
                s.set_write_timeout(Some(io_timeout))?;
                Stream::Unix(s)
            }
        };
        let mut reader = Reader::new(stream);
        reader.log_in(self.username.as_deref(), self.password.as_deref(), self.db)?;
        Ok(reader)
    }
}

/// A socket to the server.
pub(super) enum Stream {
    Tcp(TcpStream),
    #[cfg(unix)]
    Unix(std::os::unix::net::UnixStream),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            #[cfg(unix)]
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            #[cfg(unix)]
            Stream::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.flush(),
            #[cfg(unix)]
            Stream::Unix(s) => s.flush(),
        }
    }
}

/// Why a read failed.
#[derive(Debug)]
pub(super) enum ReadError {
    /// The socket failed (or timed out, or the server closed it): drop the connection.
    Io(io::Error),
    /// The server answered an error (its message: code first); the connection is usable.
    Server(String),
    /// The reply is not what the command answers: drop the connection.
    Protocol(&'static str),
}

impl From<io::Error> for ReadError {
    fn from(e: io::Error) -> Self {
        ReadError::Io(e)
    }
}

impl ReadError {
    /// Whether the connection must be dropped after this error.
    pub(super) fn breaks_connection(&self) -> bool {
        !matches!(self, ReadError::Server(_))
    }
}

/// What a read of one chunk found.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Chunk {
    /// Entries in the reply (all of them, also those past `max_bytes`).
    pub entries: usize,
    /// Records those entries held (taken or not): what an entry holds on average, to size
    /// the next read.
    pub records: usize,
    /// Whether the events taken stopped at `max_bytes`.
    pub full: bool,
}

/// Where an event of a reply lies: its offset, header fields and JSON.
struct Entry {
    offset: u64,
    event_type: u8,
    terminal: bool,
    json: Range<usize>,
}

/// A connection that sends commands and reads their replies into its own buffer.
pub(super) struct Reader<S> {
    stream: S,
    /// Received bytes are `buf[..filled]`; the rest is zeroed room for the next read.
    buf: Vec<u8>,
    filled: usize,
}

impl<S: Read + Write> Reader<S> {
    pub(super) fn new(stream: S) -> Self {
        Reader {
            stream,
            buf: Vec::new(),
            filled: 0,
        }
    }

    /// `AUTH` (when a password is given) and `SELECT` (when `db` is not 0), both answered
    /// `+OK`.
    fn log_in(
        &mut self,
        username: Option<&str>,
        password: Option<&str>,
        db: i64,
    ) -> Result<(), ReadError> {
        let mut out = Vec::new();
        let mut replies = 0;
        if let Some(password) = password {
            match username {
                Some(user) => command(&mut out, &[b"AUTH", user.as_bytes(), password.as_bytes()]),
                None => command(&mut out, &[b"AUTH", password.as_bytes()]),
            }
            replies += 1;
        }
        if db != 0 {
            command(&mut out, &[b"SELECT", db.to_string().as_bytes()]);
            replies += 1;
        }
        if replies == 0 {
            return Ok(());
        }
        self.stream.write_all(&out)?;
        // Every reply is read, so that the first error is the one reported.
        let mut first_error = None;
        for _ in 0..replies {
            let line = loop {
                match line(&self.buf[..self.filled], 0)? {
                    Some((kind, text, next)) => break (kind, text.to_vec(), next),
                    None => self.fill(READ_STEP)?,
                }
            };
            self.consume(line.2);
            match line.0 {
                b'+' => {}
                b'-' => {
                    first_error.get_or_insert(ReadError::Server(lossy(&line.1)));
                }
                _ => return Err(ReadError::Protocol("unexpected reply to AUTH or SELECT")),
            }
        }
        match first_error {
            None => Ok(()),
            Some(e) => Err(e),
        }
    }

    /// `XRANGE key 0-(from+1) 0-(to+RUN_EVENTS-1) COUNT count` (the entries from the one
    /// holding offset `from` to the last that can hold `to - 1`): events of offsets
    /// `from..to`, appended to `out` until it holds `limit` events or their JSON (counted in
    /// `copied`, across calls) would exceed `max_bytes` (`out` keeps at least one).
    /// `expect_bytes`: JSON bytes per entry to expect, to size the buffer once.
    #[allow(clippy::too_many_arguments)] // the read's bounds, as `Storage::read_range` has them
    pub(super) fn xrange(
        &mut self,
        key: &str,
        (from, to): (u64, u64),
        count: usize,
        expect_bytes: usize,
        limit: usize,
        max_bytes: usize,
        copied: &mut usize,
        out: &mut Vec<StoredEvent>,
    ) -> Result<Chunk, ReadError> {
        let mut cmd = Vec::with_capacity(64 + key.len());
        command(
            &mut cmd,
            &[
                b"XRANGE",
                key.as_bytes(),
                format!("0-{}", from + 1).as_bytes(),
                super::last_entry_id(to).as_bytes(),
                b"COUNT",
                count.to_string().as_bytes(),
            ],
        );
        self.stream.write_all(&cmd)?;
        let room = count
            .saturating_mul(expect_bytes.saturating_add(ENTRY_OVERHEAD))
            .saturating_add(16);
        self.reserve(room.min(64 << 20));
        let (events, n, end) = self.read_entries()?;
        let reply = self.take(end);
        let mut chunk = Chunk {
            entries: n,
            records: events.len(),
            full: false,
        };
        for e in events {
            if e.offset < from {
                continue;
            }
            if e.offset >= to || out.len() >= limit {
                break;
            }
            *copied += e.json.len();
            if *copied > max_bytes && !out.is_empty() {
                chunk.full = true;
                return Ok(chunk);
            }
            out.push(StoredEvent {
                offset: e.offset,
                event_type: e.event_type,
                terminal: e.terminal,
                json: reply.slice(e.json),
            });
        }
        Ok(chunk)
    }

    /// Reads one `XRANGE` reply: its events, its number of entries and the bytes it took.
    fn read_entries(&mut self) -> Result<(Vec<Entry>, usize, usize), ReadError> {
        let (total, mut at) = loop {
            match line(&self.buf[..self.filled], 0)? {
                Some((b'*', text, next)) => match int(text)? {
                    n if n < 0 => return Err(ReadError::Protocol("a null reply to XRANGE")),
                    n => break (usize::try_from(n).unwrap_or(usize::MAX), next),
                },
                Some((b'-', text, next)) => {
                    let message = lossy(text);
                    self.consume(next);
                    return Err(ReadError::Server(message));
                }
                Some(_) => return Err(ReadError::Protocol("unexpected reply to XRANGE")),
                None => self.fill(READ_STEP)?,
            }
        };
        let mut events = Vec::with_capacity(total.min(1 << 16));
        let mut entries = 0;
        while entries < total {
            match entry(&self.buf[..self.filled], at, &mut events)? {
                Some(next) => {
                    entries += 1;
                    at = next;
                }
                None => self.fill(READ_STEP)?,
            }
        }
        Ok((events, total, at))
    }

    /// Room for at least `n` more bytes without growing while they arrive.
    fn reserve(&mut self, n: usize) {
        let want = self.filled.saturating_add(n);
        if self.buf.len() < want {
            self.buf.resize(want, 0);
        }
    }

    /// Reads what the socket has (at least one byte), growing the buffer by `step` first
    /// when it is full.
    fn fill(&mut self, step: usize) -> Result<(), ReadError> {
        if self.filled == self.buf.len() {
            self.buf.resize(self.filled + step, 0);
        }
        loop {
            match self.stream.read(&mut self.buf[self.filled..]) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the server closed the connection",
                    )
                    .into());
                }
                Ok(n) => {
                    self.filled += n;
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Drops the first `n` received bytes (a reply handled without taking its bytes).
    fn consume(&mut self, n: usize) {
        self.buf.copy_within(n..self.filled, 0);
        self.filled -= n;
    }

    /// The first `n` received bytes, handed over; what follows them stays.
    fn take(&mut self, n: usize) -> Bytes {
        let rest = self.buf.get(n..self.filled).map(<[u8]>::to_vec);
        let mut taken = std::mem::take(&mut self.buf);
        taken.truncate(n);
        self.filled = 0;
        if let Some(rest) = rest.filter(|r| !r.is_empty()) {
            self.filled = rest.len();
            self.buf = rest;
        }
        Bytes::from(taken)
    }
}

/// Appends a command as a RESP array of bulk strings.
fn command(out: &mut Vec<u8>, args: &[&[u8]]) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

/// An error reply's text, for messages.
fn lossy(text: &[u8]) -> String {
    String::from_utf8_lossy(text).into_owned()
}

/// A reply line: its type byte, its text up to CRLF, and where the next one starts.
type Line<'b> = (u8, &'b [u8], usize);

/// The line at `at`; `None` when it has not fully arrived.
fn line(buf: &[u8], at: usize) -> Result<Option<Line<'_>>, ReadError> {
    let Some(rest) = buf.get(at..) else {
        return Ok(None);
    };
    match memchr::memchr(b'\n', rest) {
        Some(nl) => {
            if nl < 2 || rest[nl - 1] != b'\r' {
                return Err(ReadError::Protocol("a reply line not ended by CRLF"));
            }
            Ok(Some((rest[0], &rest[1..nl - 1], at + nl + 1)))
        }
        None if rest.len() > MAX_LINE => Err(ReadError::Protocol("a reply line too long")),
        None => Ok(None),
    }
}

/// A RESP integer.
fn int(text: &[u8]) -> Result<i64, ReadError> {
    let bad = || ReadError::Protocol("a malformed number in a reply");
    let (negative, digits) = match text {
        [b'-', rest @ ..] => (true, rest),
        _ => (false, text),
    };
    if digits.is_empty() || digits.len() > 18 {
        return Err(bad());
    }
    let mut n: i64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return Err(bad());
        }
        n = n * 10 + i64::from(d - b'0');
    }
    Ok(if negative { -n } else { n })
}

/// An array header at `at` and its length.
fn array(buf: &[u8], at: usize) -> Result<Option<(usize, usize)>, ReadError> {
    match line(buf, at)? {
        None => Ok(None),
        Some((b'*', text, next)) => match usize::try_from(int(text)?) {
            Ok(n) => Ok(Some((n, next))),
            Err(_) => Err(ReadError::Protocol("a null array in an XRANGE entry")),
        },
        Some(_) => Err(ReadError::Protocol("an XRANGE entry that is not an array")),
    }
}

/// A bulk string at `at`: where its bytes lie, and where the next value starts.
fn bulk(buf: &[u8], at: usize) -> Result<Option<(Range<usize>, usize)>, ReadError> {
    let Some((kind, text, start)) = line(buf, at)? else {
        return Ok(None);
    };
    if kind != b'$' {
        return Err(ReadError::Protocol(
            "an XRANGE entry field that is not a string",
        ));
    }
    let len = usize::try_from(int(text)?)
        .ok()
        .filter(|&n| n <= MAX_BULK)
        .ok_or(ReadError::Protocol("a bulk string length out of range"))?;
    let end = start + len;
    match buf.get(end..end + 2) {
        None => Ok(None),
        Some(b"\r\n") => Ok(Some((start..end, end + 2))),
        Some(_) => Err(ReadError::Protocol("a bulk string not ended by CRLF")),
    }
}

/// One entry `[id, [field, record, …]]` at `at`: its `n` records hold the offsets up to
/// the one its id `0-(offset+1)` names, appended to `events`; where the next value starts,
/// or `None` (and `events` as it was) when the entry has not fully arrived.
fn entry(buf: &[u8], at: usize, events: &mut Vec<Entry>) -> Result<Option<usize>, ReadError> {
    let before = events.len();
    let parsed = records(buf, at, events);
    if !matches!(parsed, Ok(Some(_))) {
        events.truncate(before);
    }
    parsed
}

fn records(buf: &[u8], at: usize, events: &mut Vec<Entry>) -> Result<Option<usize>, ReadError> {
    let corrupt = ReadError::Protocol;
    let Some((parts, at)) = array(buf, at)? else {
        return Ok(None);
    };
    if parts != 2 {
        return Err(corrupt("an XRANGE entry of other than two parts"));
    }
    let Some((id, at)) = bulk(buf, at)? else {
        return Ok(None);
    };
    let seq = buf[id]
        .strip_prefix(b"0-")
        .and_then(|s| std::str::from_utf8(s).ok())
        .and_then(|s| s.parse::<u64>().ok())
        .filter(|&s| s > 0)
        .ok_or(corrupt("an entry id that is not an event's"))?;
    let Some((fields, mut at)) = array(buf, at)? else {
        return Ok(None);
    };
    if fields == 0 || fields % 2 != 0 {
        return Err(corrupt("an XRANGE entry without its record"));
    }
    let n = (fields / 2) as u64;
    // The entry's first offset: its last (`seq - 1`) less the other records.
    let first = seq.checked_sub(n).ok_or(corrupt(
        "an entry with more records than offsets before its id",
    ))?;
    for k in 0..n {
        // The field's name, then the record.
        let Some((_, next)) = bulk(buf, at)? else {
            return Ok(None);
        };
        let Some((record, next)) = bulk(buf, next)? else {
            return Ok(None);
        };
        at = next;
        let rec = &buf[record.clone()];
        let header = rec
            .get(..HEADER)
            .ok_or(corrupt("an event record shorter than its header"))?;
        let json_at = HEADER + usize::from(u16::from_be_bytes([header[2], header[3]]));
        if rec.len() < json_at {
            return Err(corrupt("an event record shorter than its id"));
        }
        events.push(Entry {
            offset: first + k,
            event_type: header[0],
            terminal: header[1] != 0,
            json: record.start + json_at..record.end,
        });
    }
    Ok(Some(at))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    /// A socket whose reads return the scripted pieces one by one (a reply split across
    /// reads), and which records what was written.
    struct Script {
        reads: VecDeque<Vec<u8>>,
        written: Vec<u8>,
    }

    impl Script {
        fn new(reply: &[u8], piece: usize) -> Self {
            Script {
                reads: reply.chunks(piece.max(1)).map(<[u8]>::to_vec).collect(),
                written: Vec::new(),
            }
        }
    }

    impl Read for Script {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let Some(mut piece) = self.reads.pop_front() else {
                return Ok(0);
            };
            let n = piece.len().min(buf.len());
            buf[..n].copy_from_slice(&piece[..n]);
            if n < piece.len() {
                self.reads.push_front(piece.split_off(n));
            }
            Ok(n)
        }
    }

    impl Write for Script {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.written.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// An event record as the batch script stores it.
    fn record(event_type: u8, terminal: bool, id: &[u8], json: &[u8]) -> Vec<u8> {
        let mut r = vec![event_type, u8::from(terminal)];
        r.extend_from_slice(&u16::try_from(id.len()).unwrap().to_be_bytes());
        r.extend_from_slice(id);
        r.extend_from_slice(json);
        r
    }

    fn bulk_of(b: &[u8]) -> Vec<u8> {
        let mut out = format!("${}\r\n", b.len()).into_bytes();
        out.extend_from_slice(b);
        out.extend_from_slice(b"\r\n");
        out
    }

    /// An `XRANGE` reply of `(offset, record)` entries.
    fn reply(entries: &[(u64, Vec<u8>)]) -> Vec<u8> {
        let mut out = format!("*{}\r\n", entries.len()).into_bytes();
        for (offset, rec) in entries {
            out.extend_from_slice(b"*2\r\n");
            out.extend(bulk_of(format!("0-{}", offset + 1).as_bytes()));
            out.extend_from_slice(b"*2\r\n");
            out.extend(bulk_of(b"r"));
            out.extend(bulk_of(rec));
        }
        out
    }

    fn read(
        reply: &[u8],
        piece: usize,
        max_bytes: usize,
    ) -> (Result<Chunk, ReadError>, Vec<StoredEvent>, Reader<Script>) {
        let mut r = Reader::new(Script::new(reply, piece));
        let mut out = Vec::new();
        let mut copied = 0;
        let res = r.xrange(
            "eq:e:{t/k}",
            (5, 100),
            10,
            8,
            usize::MAX,
            max_bytes,
            &mut copied,
            &mut out,
        );
        (res, out, r)
    }

    fn sample() -> (Vec<(u64, Vec<u8>)>, Vec<u8>) {
        // Binary bytes in the id and the JSON slot: CRLF, NUL, 0xff (lengths rule, not
        // delimiters).
        let entries = vec![
            (5, record(1, false, b"evt_a", b"{\"a\":1}")),
            (6, record(2, false, b"id\r\n\0", b"\r\n\xff\0*2\r\n")),
            (7, record(3, true, b"", b"{}")),
        ];
        let bytes = reply(&entries);
        (entries, bytes)
    }

    #[test]
    fn sends_the_range_and_parses_entries_with_binary_bytes_whatever_the_read_sizes() {
        let (_, bytes) = sample();
        for piece in [1, 2, 3, 7, 16, bytes.len()] {
            let (res, out, r) = read(&bytes, piece, usize::MAX);
            assert_eq!(
                res.unwrap(),
                Chunk {
                    entries: 3,
                    records: 3,
                    full: false
                },
                "reads of {piece} bytes"
            );
            let got: Vec<(u64, u8, bool, &[u8])> = out
                .iter()
                .map(|e| (e.offset, e.event_type, e.terminal, &e.json[..]))
                .collect();
            assert_eq!(
                got,
                vec![
                    (5, 1, false, &b"{\"a\":1}"[..]),
                    (6, 2, false, &b"\r\n\xff\0*2\r\n"[..]),
                    (7, 3, true, &b"{}"[..]),
                ]
            );
            assert_eq!(
                r.stream.written,
                b"*6\r\n$6\r\nXRANGE\r\n$10\r\neq:e:{t/k}\r\n$3\r\n0-6\r\n$5\r\n0-227\r\n\
                  $5\r\nCOUNT\r\n$2\r\n10\r\n"
            );
        }
    }

    #[test]
    fn an_empty_range_is_no_events() {
        let (res, out, _) = read(b"*0\r\n", 1, usize::MAX);
        assert_eq!(
            res.unwrap(),
            Chunk {
                entries: 0,
                records: 0,
                full: false
            }
        );
        assert!(out.is_empty());
    }

    #[test]
    fn the_read_stops_at_max_bytes_with_at_least_one_event() {
        let (_, bytes) = sample();
        // The first JSON (7 bytes) is taken even past a bound of 1; then 7 + 9 fit in 16,
        // and the third would exceed it.
        let (res, out, r) = read(&bytes, 5, 1);
        assert_eq!(
            res.unwrap(),
            Chunk {
                entries: 3,
                records: 3,
                full: true
            }
        );
        assert_eq!(out.len(), 1);
        assert_eq!(r.filled, 0, "the whole reply was consumed");
        let (res, out, _) = read(&bytes, 5, 16);
        assert!(res.unwrap().full);
        assert_eq!(out.iter().map(|e| e.offset).collect::<Vec<_>>(), [5, 6]);
    }

    #[test]
    fn the_next_reply_on_the_connection_is_read_after_the_first() {
        let (_, mut bytes) = sample();
        bytes.extend(reply(&[(8, record(1, false, b"x", b"[8]"))]));
        let mut r = Reader::new(Script::new(&bytes, 4096));
        let (mut out, mut copied) = (Vec::new(), 0);
        r.xrange("k", (5, 9), 3, 8, 9, usize::MAX, &mut copied, &mut out)
            .unwrap();
        r.xrange("k", (8, 9), 3, 8, 9, usize::MAX, &mut copied, &mut out)
            .unwrap();
        assert_eq!(
            out.iter().map(|e| e.offset).collect::<Vec<_>>(),
            [5, 6, 7, 8]
        );
        assert_eq!(&out[3].json[..], b"[8]");
    }

    #[test]
    fn an_error_reply_is_the_servers_and_keeps_the_connection() {
        let mut bytes = b"-LOADING Redis is loading the dataset in memory\r\n".to_vec();
        bytes.extend(reply(&[(0, record(1, false, b"", b"{}"))]));
        let mut r = Reader::new(Script::new(&bytes, 3));
        let (mut out, mut copied) = (Vec::new(), 0);
        match r.xrange("k", (0, 1), 1, 8, 1, usize::MAX, &mut copied, &mut out) {
            Err(ReadError::Server(m)) => assert!(m.starts_with("LOADING "), "{m}"),
            other => panic!("{other:?}"),
        }
        assert!(!ReadError::Server(String::new()).breaks_connection());
        r.xrange("k", (0, 1), 1, 8, 1, usize::MAX, &mut copied, &mut out)
            .unwrap();
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn a_reply_cut_short_or_malformed_breaks_the_connection() {
        let (_, bytes) = sample();
        let (res, _, _) = read(&bytes[..bytes.len() - 1], 64, usize::MAX);
        assert!(matches!(&res, Err(ReadError::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof));
        assert!(res.unwrap_err().breaks_connection());
        let bad: &[&[u8]] = &[
            b"+OK\r\n",
            b"*-1\r\n",
            b"*1\r\n*3\r\n",
            b"*1\r\n*2\r\n$3\r\n1-1\r\n*2\r\n$1\r\nr\r\n$4\r\n\0\0\0\0\r\n",
            b"*1\r\n*2\r\n$3\r\n0-0\r\n*2\r\n$1\r\nr\r\n$4\r\n\0\0\0\0\r\n",
            b"*1\r\n*2\r\n$3\r\n0-1\r\n*1\r\n$1\r\nr\r\n",
            b"*1\r\n*2\r\n$3\r\n0-1\r\n*2\r\n$1\r\nr\r\n$3\r\n\0\0\0\r\n",
            b"*1\r\n*2\r\n$3\r\n0-1\r\n*2\r\n$1\r\nr\r\n$5\r\n\0\0\0\x02x\r\n",
            b"*1\r\n*2\r\n$3\r\n0-1\r\n*2\r\n$1\r\nr\r\n$4\r\n\0\0\0\0xx",
            b"*1\n",
            b"*x\r\n",
        ];
        for b in bad {
            let (res, _, _) = read(b, 64, usize::MAX);
            match res {
                Err(ReadError::Protocol(_)) => {}
                other => panic!("{:?}: {other:?}", String::from_utf8_lossy(b)),
            }
        }
    }

    /// An entry of a run of events: named after its last offset, a field `r` per record.
    fn run_entry(last: u64, recs: &[Vec<u8>]) -> Vec<u8> {
        let mut out = b"*2\r\n".to_vec();
        out.extend(bulk_of(format!("0-{}", last + 1).as_bytes()));
        out.extend(format!("*{}\r\n", 2 * recs.len()).into_bytes());
        for rec in recs {
            out.extend(bulk_of(b"r"));
            out.extend(bulk_of(rec));
        }
        out
    }

    #[test]
    fn an_entry_of_several_events_gives_each_its_offset_within_the_bounds_asked() {
        // Offsets 3..=6 in one entry, 7 alone, 8..=9 in another.
        let rec = |o: u64| record(1, false, b"", format!("[{o}]").as_bytes());
        let mut bytes = b"*3\r\n".to_vec();
        bytes.extend(run_entry(6, &[rec(3), rec(4), rec(5), rec(6)]));
        bytes.extend(run_entry(7, &[rec(7)]));
        bytes.extend(run_entry(9, &[rec(8), rec(9)]));
        let read = |bounds: (u64, u64), limit: usize, max_bytes: usize| {
            let mut r = Reader::new(Script::new(&bytes, 5));
            let (mut out, mut copied) = (Vec::new(), 0);
            let chunk = r
                .xrange("k", bounds, 3, 8, limit, max_bytes, &mut copied, &mut out)
                .unwrap();
            assert_eq!(r.filled, 0, "the whole reply was consumed");
            let got: Vec<(u64, Vec<u8>)> =
                out.iter().map(|e| (e.offset, e.json.to_vec())).collect();
            for (o, json) in &got {
                assert_eq!(json, format!("[{o}]").as_bytes());
            }
            (chunk, got.into_iter().map(|(o, _)| o).collect::<Vec<_>>())
        };
        // Offsets below `from` in the first entry are skipped, those from `to` on dropped.
        let (chunk, got) = read((5, 9), usize::MAX, usize::MAX);
        assert_eq!(got, [5, 6, 7, 8]);
        assert_eq!(
            chunk,
            Chunk {
                entries: 3,
                records: 7,
                full: false
            }
        );
        assert_eq!(
            read((0, 100), usize::MAX, usize::MAX).1,
            [3, 4, 5, 6, 7, 8, 9]
        );
        // At most `limit` events, even within an entry.
        assert_eq!(read((4, 100), 2, usize::MAX).1, [4, 5]);
        // `max_bytes` cuts within an entry too (each JSON here is 3 bytes).
        let (chunk, got) = read((3, 100), usize::MAX, 7);
        assert_eq!(got, [3, 4]);
        assert!(chunk.full);
        // An entry naming fewer offsets than it holds records is corrupt.
        let mut bad = b"*1\r\n".to_vec();
        bad.extend(run_entry(0, &[rec(0), rec(1)]));
        let (res, _, _) = super::tests::read(&bad, 64, usize::MAX);
        assert!(matches!(res, Err(ReadError::Protocol(_))), "{res:?}");
    }

    #[test]
    fn logging_in_sends_auth_and_select_and_reports_a_refusal() {
        let mut r = Reader::new(Script::new(b"+OK\r\n+OK\r\n", 1));
        r.log_in(Some("u"), Some("p w"), 3).unwrap();
        assert_eq!(
            r.stream.written,
            b"*3\r\n$4\r\nAUTH\r\n$1\r\nu\r\n$3\r\np w\r\n*2\r\n$6\r\nSELECT\r\n$1\r\n3\r\n"
        );
        let mut r = Reader::new(Script::new(b"+OK\r\n", 64));
        r.log_in(None, None, 0).unwrap();
        assert!(r.stream.written.is_empty(), "nothing to send");
        let mut r = Reader::new(Script::new(
            b"-WRONGPASS invalid username-password pair\r\n-NOAUTH Authentication required.\r\n",
            64,
        ));
        match r.log_in(None, Some("x"), 1) {
            Err(ReadError::Server(m)) => assert!(m.starts_with("WRONGPASS"), "{m}"),
            other => panic!("{other:?}"),
        }
    }
}
