//! Heap allocations per one-event request, on the server's side, for the two producer paths:
//! `POST /events/queues/{task}/events` (one keep-alive connection) and the WebSocket producer
//! connection (one frame at a time). Issue 24 measured the allocator at ~10 % of server CPU
//! on these rows; this counts what a change saves exactly, where timings on a shared
//! machine are noise.
//!
//! ```text
//! cargo run --release --example request_allocs -- [REQUESTS]
//! ```
//!
//! The server runs in this process (default durability: fsync before the ack) under a
//! counting allocator; the client is a plain blocking socket on a thread whose allocations
//! are not counted. Prints allocations (and bytes) per request on the server's tokio
//! threads (HTTP, parsing, rendering, the handler) and on the engine's threads (writer,
//! acknowledger, background).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};

use eventqueue::server::{self, AppState, ServerConfig};
use eventqueue::{Config, QueueManager};

/// Who allocates: set per thread by this program; unmarked threads are the engine's.
#[derive(Clone, Copy)]
enum Role {
    Engine = 0,
    Tokio = 1,
    Uncounted = 2,
}

thread_local! {
    static ROLE: Cell<Role> = const { Cell::new(Role::Engine) };
    static IN_TRACE: Cell<bool> = const { Cell::new(false) };
}

/// Set while one request is traced (`EQ_ALLOC_TRACE=1`): each counted allocation prints
/// where it came from.
static TRACING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn trace(role: usize, size: usize) {
    if role == Role::Uncounted as usize || IN_TRACE.with(Cell::get) {
        return;
    }
    IN_TRACE.with(|t| t.set(true));
    let bt = std::backtrace::Backtrace::force_capture().to_string();
    let frames: Vec<&str> = bt
        .lines()
        .filter(|l| !l.trim_start().starts_with("at "))
        .map(|l| l.split_once(": ").map_or(l, |(_, f)| f))
        .take(40)
        .collect();
    eprintln!(
        "ALLOC role={role} size={size}\n    {}",
        frames.join("\n    ")
    );
    IN_TRACE.with(|t| t.set(false));
}

static COUNTS: [AtomicU64; 3] = [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)];
static BYTES: [AtomicU64; 3] = [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)];

struct Counting;

impl Counting {
    fn count(size: usize) {
        let role = ROLE.try_with(Cell::get).unwrap_or(Role::Uncounted) as usize;
        COUNTS[role].fetch_add(1, Ordering::Relaxed);
        if TRACING.load(Ordering::Relaxed) {
            trace(role, size);
        }
        BYTES[role].fetch_add(size as u64, Ordering::Relaxed);
    }
}

// SAFETY: every call is passed on to the system allocator unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        Self::count(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        Self::count(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        Self::count(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn snapshot() -> [(u64, u64); 3] {
    std::array::from_fn(|i| {
        (
            COUNTS[i].load(Ordering::Relaxed),
            BYTES[i].load(Ordering::Relaxed),
        )
    })
}

/// A 300-byte progress event, as the compare harness sends.
fn event() -> String {
    let head = r#"{"event_type":"progress","current":1,"total":100,"step":"processing_video","details":{"sent_us":1,"pad":""#;
    format!("{head}{}\"}}}}", "x".repeat(300 - head.len() - 3))
}

/// Reads one HTTP/1.1 response with a `content-length`; returns its status line.
fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>) -> String {
    buf.clear();
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk).expect("read");
        assert!(n > 0, "the server closed the connection");
        buf.extend_from_slice(&chunk[..n]);
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .map_or(0, |v| v.trim().parse().expect("content-length"));
        if buf.len() >= end + 4 + len {
            return head.lines().next().unwrap_or_default().to_string();
        }
    }
}

/// One masked text frame (client frames must be masked).
fn ws_frame(payload: &[u8]) -> Vec<u8> {
    let mask = [1u8, 2, 3, 4];
    let mut f = vec![0x81];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
    }
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// Reads one unmasked server frame; returns its payload.
fn read_ws_frame(s: &mut TcpStream) -> Vec<u8> {
    let mut head = [0u8; 2];
    s.read_exact(&mut head).expect("frame head");
    let len = match head[1] & 0x7f {
        126 => {
            let mut l = [0u8; 2];
            s.read_exact(&mut l).expect("frame length");
            u16::from_be_bytes(l) as usize
        }
        127 => {
            let mut l = [0u8; 8];
            s.read_exact(&mut l).expect("frame length");
            u64::from_be_bytes(l) as usize
        }
        n => n as usize,
    };
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).expect("frame payload");
    payload
}

fn report(what: &str, before: [(u64, u64); 3], after: [(u64, u64); 3], n: u64) {
    let per = |i: usize| {
        (
            (after[i].0 - before[i].0) as f64 / n as f64,
            (after[i].1 - before[i].1) as f64 / n as f64,
        )
    };
    let (t, e) = (per(Role::Tokio as usize), per(Role::Engine as usize));
    println!(
        "{what}: per request {:.1} allocations ({:.0} bytes) on the server's tokio threads, \
         {:.1} ({:.0} bytes) on the engine's threads; {:.1} in all",
        t.0,
        t.1,
        e.0,
        e.1,
        t.0 + e.0
    );
}

fn main() {
    ROLE.with(|r| r.set(Role::Uncounted));
    let n: u64 = std::env::args()
        .nth(1)
        .map_or(2000, |a| a.parse().expect("REQUESTS: a number"));
    let dir = tempfile::tempdir().expect("a temporary directory");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .on_thread_start(|| ROLE.with(|r| r.set(Role::Tokio)))
        .enable_all()
        .build()
        .expect("a runtime");
    let path = dir.path().to_path_buf();
    let addr = rt.block_on(async move {
        let manager = QueueManager::open(Config::new(path)).await.expect("open");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        let mut config = ServerConfig::default();
        config.cleanup_interval = None;
        tokio::spawn(server::serve(
            AppState::new(manager, config),
            listener,
            std::future::pending(),
        ));
        addr
    });
    let body = event();
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_nodelay(true).expect("nodelay");
    let mut buf = Vec::new();
    let create = r#"{"task_id":"allocs","max_buffer_size":10000000}"#;
    write!(
        s,
        "POST /events/queues HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n{create}",
        create.len()
    )
    .expect("write");
    let status = read_response(&mut s, &mut buf);
    assert!(status.contains("201"), "create: {status}");
    let request = format!(
        "POST /events/queues/allocs/events HTTP/1.1\r\nhost: x\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let post = |s: &mut TcpStream, buf: &mut Vec<u8>| {
        s.write_all(request.as_bytes()).expect("write");
        let status = read_response(s, buf);
        assert!(status.contains(" 20"), "enqueue: {status}");
    };
    // Warm up (first-use allocations: pools, caches, the queue's state), then count.
    for _ in 0..200 {
        post(&mut s, &mut buf);
    }
    let before = snapshot();
    for _ in 0..n {
        post(&mut s, &mut buf);
    }
    report("POST one event", before, snapshot(), n);
    let traced = std::env::var("EQ_ALLOC_TRACE").is_ok();
    if traced {
        TRACING.store(true, Ordering::Relaxed);
        post(&mut s, &mut buf);
        TRACING.store(false, Ordering::Relaxed);
        eprintln!("==== end of POST");
    }

    let mut ws = TcpStream::connect(addr).expect("connect");
    ws.set_nodelay(true).expect("nodelay");
    write!(
        ws,
        "GET /events/queues/allocs/events/ws HTTP/1.1\r\nhost: x\r\nconnection: Upgrade\r\n\
         upgrade: websocket\r\nsec-websocket-version: 13\r\n\
         sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    .expect("write");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        ws.read_exact(&mut byte).expect("handshake");
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "handshake refused");
    let frame = ws_frame(body.as_bytes());
    let send = |ws: &mut TcpStream| {
        ws.write_all(&frame).expect("write");
        let answer = read_ws_frame(ws);
        let refused = answer.windows(8).any(|w| w == b"\"status\"");
        assert!(answer.starts_with(b"{\"seq\"") && !refused, "frame refused");
    };
    for _ in 0..200 {
        send(&mut ws);
    }
    let before = snapshot();
    for _ in 0..n {
        send(&mut ws);
    }
    report("WebSocket frame of one event", before, snapshot(), n);
    if traced {
        TRACING.store(true, Ordering::Relaxed);
        send(&mut ws);
        std::thread::sleep(std::time::Duration::from_millis(50));
        TRACING.store(false, Ordering::Relaxed);
        eprintln!("==== end of WS");
    }
}
