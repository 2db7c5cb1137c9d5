//! The connection layer's own protection, below HTTP: how many connections the server holds
//! (in total and per client address), the process's open-file limit they live within, and a
//! JSON `detail` on the answers hyper writes by itself to a request head it cannot parse.
//!
//! A connection is counted when it is accepted and given back when its task ends, so the
//! counts are exact whatever the connection did (a TLS handshake that failed, an SSE stream,
//! a keep-alive connection idling until its header read timeout). One over a limit is
//! refused at once: on plain HTTP with a `503` JSON answer (`Retry-After`, `Connection:
//! close`) written before anything is read, then closed; over TLS it is closed without a
//! handshake, so a flood of refused connections costs no key exchange.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv6Addr};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::server::limits::RETRY_AFTER_SECS;

/// File descriptors kept for everything but client connections (the store's files, a Redis
/// connection pool, the log, connections being refused) when the open-file limit caps
/// connections.
pub(crate) const FD_MARGIN: u64 = 256;

/// Most refusals lingering at once (see [`Connections::refuse`]); beyond it a refused
/// connection gets its answer only if it fits the socket at once, so a flood cannot hold
/// descriptors through the refusals themselves.
const MAX_REFUSING: usize = 128;

/// Longest time a refusal may take to write its answer, and then to see the client's request
/// out (closing a socket with unread input resets it, and the client may lose the answer).
const REFUSAL_LINGER: Duration = Duration::from_secs(1);

/// A client address as the per-address limit counts it: IPv4 addresses (also IPv4-mapped IPv6
/// ones) each on their own; IPv6 addresses by their /64 prefix, which one host usually holds
/// whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct ClientKey(IpAddr);

impl ClientKey {
    pub(crate) fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => Self(IpAddr::V4(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Self(IpAddr::V4(v4)),
                None => {
                    let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                    Self(IpAddr::V6(Ipv6Addr::from(prefix)))
                }
            },
        }
    }
}

impl std::fmt::Display for ClientKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            IpAddr::V4(v4) => write!(f, "{v4}"),
            IpAddr::V6(v6) => write!(f, "{v6}/64"),
        }
    }
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    per_client: HashMap<ClientKey, usize>,
}

/// The open connections of one server, and its limits.
#[derive(Debug)]
pub(crate) struct Connections {
    counts: Mutex<Counts>,
    max_total: usize,
    max_per_client: usize,
    refusing: AtomicUsize,
}

/// Why a connection was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The server holds its most connections.
    Total(usize),
    /// The client's address holds its most connections.
    PerClient(ClientKey, usize),
}

impl Refusal {
    /// The `detail` of the `503` answer.
    pub(crate) fn detail(&self) -> String {
        match self {
            Refusal::Total(max) => {
                format!("too many connections: the server holds at most {max}; retry later")
            }
            Refusal::PerClient(client, max) => format!(
                "too many connections from {client}: at most {max} per client address; \
                 close idle connections or retry later"
            ),
        }
    }
}

/// A counted connection; dropping it gives its place back.
#[derive(Debug)]
pub(crate) struct Admitted {
    conns: Arc<Connections>,
    client: ClientKey,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut counts = self.conns.counts();
        counts.total = counts.total.saturating_sub(1);
        if let Some(n) = counts.per_client.get_mut(&self.client) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.per_client.remove(&self.client);
            }
        }
    }
}

impl Connections {
    /// Counts for a server holding at most `max_total` connections, `max_per_client` from one
    /// client address.
    pub(crate) fn new(max_total: usize, max_per_client: usize) -> Self {
        Self {
            counts: Mutex::default(),
            max_total,
            max_per_client,
            refusing: AtomicUsize::new(0),
        }
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        // Every update is one statement: the counts are consistent even after a panic.
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Connections open now.
    #[cfg(test)]
    pub(crate) fn open(&self) -> usize {
        self.counts().total
    }

    /// Counts a connection from `peer`, or says why it is refused.
    pub(crate) fn admit(self: &Arc<Self>, peer: IpAddr) -> Result<Admitted, Refusal> {
        let client = ClientKey::of(peer);
        let mut counts = self.counts();
        if counts.total >= self.max_total {
            return Err(Refusal::Total(self.max_total));
        }
        let mine = counts.per_client.get(&client).copied().unwrap_or(0);
        if mine >= self.max_per_client {
            return Err(Refusal::PerClient(client, self.max_per_client));
        }
        counts.total += 1;
        *counts.per_client.entry(client).or_default() += 1;
        Ok(Admitted {
            conns: self.clone(),
            client,
        })
    }

    /// Answers a refused plain-HTTP connection with `503` and closes it, on a task of its own
    /// (at most [`MAX_REFUSING`] at once, each for at most twice [`REFUSAL_LINGER`]). Over the
    /// bound the answer is written only if the socket takes it at once (an empty send buffer
    /// does), what the client sent so far is read off, and the socket is closed.
    pub(crate) fn refuse(self: &Arc<Self>, mut stream: TcpStream, why: &Refusal) {
        let answer = refusal_answer(&why.detail());
        if self.refusing.fetch_add(1, Ordering::AcqRel) >= MAX_REFUSING {
            self.refusing.fetch_sub(1, Ordering::AcqRel);
            let _ = stream.try_write(&answer);
            // Closing with unread input would reset the connection, and the client might
            // lose the answer: read off what has arrived (its request, usually).
            let mut sink = [0u8; 4096];
            for _ in 0..16 {
                match stream.try_read(&mut sink) {
                    Ok(n) if n > 0 => {}
                    _ => break,
                }
            }
            return;
        }
        let conns = self.clone();
        tokio::spawn(async move {
            let wrote = tokio::time::timeout(REFUSAL_LINGER, async {
                stream.write_all(&answer).await?;
                stream.shutdown().await
            })
            .await;
            if matches!(wrote, Ok(Ok(()))) {
                // Read what the client sent (its request) until it closes, so that closing
                // does not reset the connection before the answer is read.
                let mut sink = [0u8; 4096];
                let _ = tokio::time::timeout(REFUSAL_LINGER, async {
                    let mut left = 64 * 1024usize;
                    while left > 0 {
                        match stream.read(&mut sink).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => left = left.saturating_sub(n),
                        }
                    }
                })
                .await;
            }
            conns.refusing.fetch_sub(1, Ordering::AcqRel);
        });
    }
}

/// A connection's place in the counts, shared with what outlives its HTTP exchange: a
/// connection upgraded to a WebSocket leaves hyper's connection task, and holds its place
/// through the upgraded socket's own task instead. The place is given back when the last
/// holder drops.
#[derive(Debug, Clone)]
pub(crate) struct Place {
    _held: Arc<Admitted>,
}

/// A connection's service: `inner`, with the connection's [`Place`] in every request's
/// extensions.
#[derive(Debug, Clone)]
pub(crate) struct Placed<S> {
    inner: S,
    place: Place,
}

impl<S> Placed<S> {
    pub(crate) fn new(inner: S, admitted: Admitted) -> Self {
        Self {
            inner,
            place: Place {
                _held: Arc::new(admitted),
            },
        }
    }
}

impl<S, B> hyper::service::Service<axum::http::Request<B>> for Placed<S>
where
    S: hyper::service::Service<axum::http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn call(&self, mut req: axum::http::Request<B>) -> Self::Future {
        req.extensions_mut().insert(self.place.clone());
        self.inner.call(req)
    }
}

/// Serves an HTTP/1 connection that can be upgraded (to the WebSocket producer connection) to
/// its end. hyper-util's graceful shutdown cannot watch such a connection, so `watcher` is
/// held (counted by the shutdown) until the connection ends, and the connection starts its
/// graceful end when `shutdown` is cancelled (the listener cancels it before waiting for the
/// watchers).
pub(crate) async fn serve_upgradeable<I, S, B>(
    conn: hyper::server::conn::http1::UpgradeableConnection<I, S>,
    watcher: hyper_util::server::graceful::Watcher,
    shutdown: tokio_util::sync::CancellationToken,
) where
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut conn = std::pin::pin!(conn);
    let ended = tokio::select! {
        ended = conn.as_mut() => ended,
        () = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = ended {
        tracing::debug!(error = %e, "connection ended with an error");
    }
    drop(watcher);
}

/// The bytes of a `503` answer with `detail`, closing the connection.
fn refusal_answer(detail: &str) -> Vec<u8> {
    let body = serde_json::json!({ "detail": detail }).to_string();
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         retry-after: {RETRY_AFTER_SECS}\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// The process's open-file limit after [`raise_open_file_limit`]: the soft limit, `None` when
/// unlimited.
pub fn open_file_limit() -> Option<u64> {
    rustix::process::getrlimit(rustix::process::Resource::Nofile).current
}

/// Raises the process's soft open-file limit (`RLIMIT_NOFILE`) to its hard limit: every
/// connection and SSE stream holds a descriptor, and the common soft default of 1024 runs out
/// long before the server's other limits. Returns the soft limit before and after (`None` =
/// unlimited).
///
/// # Errors
///
/// The system's refusal (the limit is then unchanged).
pub fn raise_open_file_limit() -> io::Result<(Option<u64>, Option<u64>)> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let now = getrlimit(Resource::Nofile);
    if now.current == now.maximum {
        return Ok((now.current, now.current));
    }
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: now.maximum,
            maximum: now.maximum,
        },
    )?;
    Ok((now.current, getrlimit(Resource::Nofile).current))
}

/// The connection limit to apply under an open-file limit of `nofile`: `max_connections`,
/// or less when the descriptors would run out first (then accepting would fail with EMFILE
/// and every client, whichever, would wait). `None` when no cap is needed.
pub(crate) fn capped_by_files(max_connections: usize, nofile: Option<u64>) -> Option<usize> {
    let nofile = nofile?;
    let room = usize::try_from(nofile.saturating_sub(FD_MARGIN)).unwrap_or(usize::MAX);
    (room < max_connections).then_some(room.max(1))
}

/// An HTTP/1 connection's I/O, with a JSON `detail` added to the answers hyper writes by
/// itself when it cannot parse a request head (`400`, `414 URI Too Long`, `431 Request Header
/// Fields Too Large`): those go out with an empty body, unlike every other error of the API.
///
/// They are recognised by their head: a `400`, `414` or `431` status line, `connection:
/// close`, `content-length: 0` and no content type, which no answer of the API has (its
/// errors are JSON). Everything else passes through untouched.
pub(crate) struct HeadErrors<T> {
    inner: T,
    /// The replacement being written, and how much of it is out.
    replacing: Option<(Vec<u8>, usize)>,
}

impl<T> HeadErrors<T> {
    pub(crate) fn new(inner: T) -> Self {
        Self {
            inner,
            replacing: None,
        }
    }
}

/// The replacement of hyper's answer `head`, if it is one of its bodiless parse-error
/// answers.
fn replacement(head: &[u8]) -> Option<Vec<u8>> {
    let (status, detail) = if head.starts_with(b"HTTP/1.1 431 ") {
        (
            "431 Request Header Fields Too Large",
            "request head too large: the request line and headers must fit in about 400 KB \
             and at most 100 headers",
        )
    } else if head.starts_with(b"HTTP/1.1 414 ") {
        (
            "414 URI Too Long",
            "request URI too long: at most 65534 bytes",
        )
    } else if head.starts_with(b"HTTP/1.1 400 ") {
        (
            "400 Bad Request",
            "malformed request head: not a valid HTTP/1.1 request line and headers",
        )
    } else {
        return None;
    };
    let end = memchr::memmem::find(head, b"\r\n\r\n")?;
    let fields = &head[..end];
    // hyper's own answer: closing, empty, and without the content type every answer of the
    // API has (so a bodiless answer to a HEAD request is never given a body).
    let has = |field: &[u8]| {
        memchr::memmem::find(fields, &[b"\r\n", field, b"\r\n"].concat()).is_some()
            || fields.ends_with(&[b"\r\n", field].concat())
    };
    if !has(b"content-length: 0")
        || !has(b"connection: close")
        || memchr::memmem::find(fields, b"\r\ncontent-type:").is_some()
    {
        return None;
    }
    let body = serde_json::json!({ "detail": detail }).to_string();
    Some(
        format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\nconnection: close\r\n\
             content-length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes(),
    )
}

impl<T: AsyncWrite + Unpin> HeadErrors<T> {
    /// Writes the pending replacement; `Ready(Ok(()))` once it is all out.
    fn poll_replacement(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some((bytes, done)) = &mut self.replacing {
            if *done >= bytes.len() {
                self.replacing = None;
                break;
            }
            match Pin::new(&mut self.inner).poll_write(cx, &bytes[*done..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => *done += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Writes `first` (the start of what hyper writes, `total` bytes in all) in place of
    /// hyper's answer when it is a parse-error answer; `None` when it is not.
    fn poll_replace(
        &mut self,
        cx: &mut Context<'_>,
        first: &[u8],
        total: usize,
    ) -> Option<Poll<io::Result<usize>>> {
        if self.replacing.is_none() {
            self.replacing = Some((replacement(first)?, 0));
        }
        Some(match self.poll_replacement(cx) {
            // hyper's bytes count as written: ours went out in their place.
            Poll::Ready(Ok(())) => Poll::Ready(Ok(total)),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        })
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for HeadErrors<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for HeadErrors<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if (self.replacing.is_some() || buf.starts_with(b"HTTP/1.1 4"))
            && let Some(done) = self.poll_replace(cx, buf, buf.len())
        {
            return done;
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let first = bufs
            .iter()
            .find(|b| !b.is_empty())
            .map_or(&[][..], |b| &**b);
        if self.replacing.is_some() || first.starts_with(b"HTTP/1.1 4") {
            let total = bufs.iter().map(|b| b.len()).sum();
            if let Some(done) = self.poll_replace(cx, first, total) {
                return done;
            }
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.replacing.is_some() {
            match self.poll_replacement(cx) {
                Poll::Ready(Ok(())) => {}
                other => return other,
            }
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_are_counted_per_client_and_in_total() {
        let conns = Arc::new(Connections::new(3, 2));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let a1 = conns.admit(a).unwrap();
        let _a2 = conns.admit(a).unwrap();
        assert_eq!(
            conns.admit(a).unwrap_err(),
            Refusal::PerClient(ClientKey::of(a), 2)
        );
        let _b1 = conns.admit(b).unwrap();
        assert_eq!(conns.admit(b).unwrap_err(), Refusal::Total(3));
        drop(a1);
        assert_eq!(conns.open(), 2);
        let _b2 = conns.admit(b).unwrap();
        assert_eq!(conns.open(), 3);
    }

    #[test]
    fn ipv6_clients_count_by_their_64_prefix_and_mapped_ipv4_as_ipv4() {
        let one: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let two: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(ClientKey::of(one), ClientKey::of(two));
        assert_ne!(ClientKey::of(one), ClientKey::of(other));
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        let v4: IpAddr = "10.0.0.1".parse().unwrap();
        assert_eq!(ClientKey::of(mapped), ClientKey::of(v4));
        assert_eq!(ClientKey::of(one).to_string(), "2001:db8:1:2::/64");
    }

    #[test]
    fn the_file_limit_caps_connections_only_when_it_is_lower() {
        assert_eq!(capped_by_files(16_384, None), None);
        assert_eq!(capped_by_files(16_384, Some(1_048_576)), None);
        assert_eq!(capped_by_files(16_384, Some(1024)), Some(1024 - 256));
        assert_eq!(capped_by_files(16_384, Some(10)), Some(1));
    }

    #[test]
    fn only_hypers_bodiless_parse_error_answers_are_replaced() {
        let hyper = b"HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\n\
                      content-length: 0\r\ndate: Sun, 06 Dec 2026 04:23:56 GMT\r\n\r\n";
        let new = String::from_utf8(replacement(hyper).unwrap()).unwrap();
        assert!(new.starts_with("HTTP/1.1 431 "), "{new}");
        let body = new.split("\r\n\r\n").nth(1).unwrap();
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert!(
            json["detail"]
                .as_str()
                .unwrap()
                .contains("request head too large")
        );
        // The API's own errors carry a body: untouched.
        let ours = b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n\
                     content-length: 17\r\n\r\n{\"detail\":\"bad\"}";
        assert_eq!(replacement(ours), None);
        assert_eq!(
            replacement(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"),
            None
        );
    }
}
