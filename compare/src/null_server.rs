//! The null server: the floor of an HTTP front end on this machine.
//!
//! It answers eventqueue's endpoints that the throughput workloads use (`GET /healthz`,
//! `POST /events/queues`, `POST /events/queues/{id}/events`, and the WebSocket producer
//! connection `GET /events/queues/{id}/events/ws`, each text frame acknowledged with an
//! offset, acknowledgements of the frames read together written together) on the same HTTP
//! stack (hyper's HTTP/1.1 server on a multi-threaded tokio runtime, `TCP_NODELAY`), and does
//! no more per request than its mode says (a WebSocket frame: nothing, in every mode):
//!
//! - `none` (the default without `--storage`): nothing at all — no parsing, no storage, no
//!   hand-off. What a row measures then is what HTTP alone costs on this machine: a goal
//!   above it is out of reach of any server that takes one event per HTTP request.
//! - `xadd`: one Redis `XADD` of the body, on one thread with its own connection (as a node's
//!   writer thread holds its own): the least an HTTP front end over Redis can do.
//! - `script` (the default with `--storage redis://…`): one call of eventqueue's own batch
//!   script (`src/storage/redis/commit.lua`) with the arguments of a one-event batch, on that
//!   thread: the least a node over Redis can do while assigning offsets, checking the queue
//!   and announcing the batch atomically, as issue 21 asks.
//!
//! `eventqueue-compare --null-server` runs the comparison with this server in eventqueue's
//! place: the harness starts itself as `eventqueue-compare serve --bind ADDR [--storage URL]
//! …` (other flags ignored); `EQ_COMPARE_NULL` picks the mode.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, Response, StatusCode};
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

/// eventqueue's batch script, called as a node calls it.
const BATCH_SCRIPT: &str = include_str!("../../src/storage/redis/commit.lua");

/// Whether this process was started as the null server (`eventqueue-compare serve …`).
pub fn invoked() -> bool {
    std::env::args().nth(1).as_deref() == Some("serve")
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    None,
    Xadd,
    Script,
}

/// A request's work for the store thread, and where its offset goes.
type Job = (Bytes, oneshot::Sender<Result<u64, String>>);

/// Runs the null server until killed; `--bind` and `--storage` are read from the command line
/// (`serve …`), every other flag is ignored.
pub fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(2).collect();
    let mut bind = None;
    let mut storage = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--bind" => bind = it.next().cloned(),
            "--storage" => storage = it.next().cloned(),
            _ => {}
        }
    }
    let bind: SocketAddr = bind
        .context("the null server needs --bind ADDR")?
        .parse()
        .context("--bind")?;
    // `--storage memory` and the like (the scale comparison's memory section): no Redis.
    let storage = storage.filter(|s| s.starts_with("redis"));
    let mode = match std::env::var("EQ_COMPARE_NULL").ok().as_deref() {
        None | Some("") if storage.is_some() => Mode::Script,
        None | Some("") | Some("none") => Mode::None,
        Some("xadd") => Mode::Xadd,
        Some("script") => Mode::Script,
        Some(other) => bail!("EQ_COMPARE_NULL={other}: expected none, xadd or script"),
    };
    let jobs = match (mode, storage) {
        (Mode::None, _) => None,
        (_, None) => bail!("the null server's {mode:?} mode needs --storage redis://HOST:PORT"),
        (_, Some(url)) => Some(store(&url, mode)?),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(serve(bind, jobs))
}

async fn serve(bind: SocketAddr, jobs: Option<std::sync::mpsc::Sender<Job>>) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(bind)
        .await
        .with_context(|| format!("binding {bind}"))?;
    let jobs = jobs.map(Arc::new);
    let counter = Arc::new(AtomicU64::new(0));
    loop {
        let (stream, _) = listener.accept().await.context("accepting")?;
        let _ = stream.set_nodelay(true);
        let (jobs, counter) = (jobs.clone(), counter.clone());
        let service =
            hyper::service::service_fn(move |req| handle(req, jobs.clone(), counter.clone()));
        tokio::spawn(async move {
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .with_upgrades()
                .await;
        });
    }
}

type Jobs = Option<Arc<std::sync::mpsc::Sender<Job>>>;

async fn handle(
    req: Request<hyper::body::Incoming>,
    jobs: Jobs,
    counter: Arc<AtomicU64>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let answer = |status: StatusCode, body: String| {
        let mut resp = Response::new(Full::new(Bytes::from(body)));
        *resp.status_mut() = status;
        resp.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("application/json"),
        );
        Ok(resp)
    };
    let path = req.uri().path().to_string();
    match (req.method().clone(), path.as_str()) {
        (Method::GET, "/healthz") => answer(StatusCode::OK, r#"{"status":"ok"}"#.into()),
        (Method::POST, "/events/queues") => answer(StatusCode::CREATED, "{}".into()),
        (Method::GET, p) if p.starts_with("/events/queues/") && p.ends_with("/events/ws") => {
            let Some(key) = req.headers().get(hyper::header::SEC_WEBSOCKET_KEY) else {
                return answer(
                    StatusCode::BAD_REQUEST,
                    r#"{"detail":"a WebSocket upgrade expected"}"#.into(),
                );
            };
            let accept = derive_accept_key(key.as_bytes());
            tokio::spawn(async move {
                if let Ok(upgraded) = hyper::upgrade::on(req).await {
                    acknowledge_frames(upgraded, counter).await;
                }
            });
            let mut resp = Response::new(Full::new(Bytes::new()));
            *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            let h = resp.headers_mut();
            h.insert(
                hyper::header::CONNECTION,
                hyper::header::HeaderValue::from_static("upgrade"),
            );
            h.insert(
                hyper::header::UPGRADE,
                hyper::header::HeaderValue::from_static("websocket"),
            );
            if let Ok(v) = hyper::header::HeaderValue::from_str(&accept) {
                h.insert(hyper::header::SEC_WEBSOCKET_ACCEPT, v);
            }
            Ok(resp)
        }
        (Method::POST, p) if p.starts_with("/events/queues/") && p.ends_with("/events") => {
            let body = match req.into_body().collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => {
                    let detail = serde_json::Value::String(e.to_string());
                    return answer(StatusCode::BAD_REQUEST, format!("{{\"detail\":{detail}}}"));
                }
            };
            let offset = match &jobs {
                None => Ok(counter.fetch_add(1, Ordering::Relaxed)),
                Some(jobs) => {
                    let (tx, rx) = oneshot::channel();
                    match jobs.send((body, tx)) {
                        Ok(()) => rx.await.unwrap_or_else(|e| Err(e.to_string())),
                        Err(_) => Err("the store thread is gone".to_string()),
                    }
                }
            };
            match offset {
                Ok(o) => answer(StatusCode::OK, acknowledgement(o)),
                Err(e) => answer(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("{{\"detail\":{}}}", serde_json::Value::String(e)),
                ),
            }
        }
        _ => answer(StatusCode::NOT_FOUND, r#"{"detail":"not found"}"#.into()),
    }
}

/// The answer to one event appended at offset `o`, as eventqueue gives it.
fn acknowledgement(o: u64) -> String {
    format!(
        "{{\"offsets\":[{o}],\"latest_offset\":{},\"cancelled\":false}}",
        o + 1
    )
}

/// A WebSocket producer connection: every text frame answered with the next offset, the
/// answers to the frames already read written out together.
async fn acknowledge_frames(upgraded: hyper::upgrade::Upgraded, counter: Arc<AtomicU64>) {
    use futures_util::{FutureExt, SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let io = hyper_util::rt::TokioIo::new(upgraded);
    let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
        io,
        tokio_tungstenite::tungstenite::protocol::Role::Server,
        None,
    )
    .await;
    let ack = |counter: &AtomicU64| {
        Message::text(acknowledgement(counter.fetch_add(1, Ordering::Relaxed)))
    };
    while let Some(Ok(first)) = ws.next().await {
        let mut msg = Some(first);
        while let Some(m) = msg.take() {
            match m {
                Message::Text(_) if ws.feed(ack(&counter)).await.is_err() => return,
                Message::Close(_) => return,
                _ => {}
            }
            // The frames already here are answered in the same write.
            msg = ws.next().now_or_never().flatten().and_then(Result::ok);
        }
        if ws.flush().await.is_err() {
            return;
        }
    }
}

/// Starts the store thread (one Redis connection) and returns its job channel.
fn store(url: &str, mode: Mode) -> Result<std::sync::mpsc::Sender<Job>> {
    let client = redis::Client::open(url).with_context(|| format!("opening {url}"))?;
    let mut con = client
        .get_connection()
        .with_context(|| format!("connecting to {url}"))?;
    let sha: String = redis::cmd("SCRIPT")
        .arg("LOAD")
        .arg(BATCH_SCRIPT)
        .query(&mut con)
        .context("loading the batch script")?;
    // One queue per null server (two servers over one Redis never meet).
    let task = format!("null{}", std::process::id());
    let tag = format!("default/{task}");
    let (tx, rx) = std::sync::mpsc::channel::<Job>();
    std::thread::Builder::new()
        .name("null-store".into())
        .spawn(move || {
            let mut next = 0u64;
            let mut rev = "new".to_string();
            for (body, reply) in rx {
                let result = match mode {
                    Mode::Xadd => redis::cmd("XADD")
                        .arg(format!("nullx:{{{tag}}}"))
                        .arg("*")
                        .arg("r")
                        .arg(body.as_ref())
                        .query::<String>(&mut con)
                        .map(|_| next)
                        .map_err(|e| e.to_string()),
                    _ => {
                        script_call(&mut con, &sha, &tag, &task, &rev, next, &body).map(|new_rev| {
                            rev = new_rev;
                            next
                        })
                    }
                };
                if result.is_ok() {
                    next += 1;
                }
                let _ = reply.send(result);
            }
        })
        .context("starting the store thread")?;
    Ok(tx)
}

/// One call of the batch script as a node makes it for one event appended to an open queue
/// (mode `single`, the queue's revision checked, the event added, the record stored, the
/// batch announced); returns the queue's new revision.
fn script_call(
    con: &mut redis::Connection,
    sha: &str,
    tag: &str,
    task: &str,
    rev: &str,
    offset: u64,
    body: &[u8],
) -> Result<String, String> {
    // A stored event: [type, terminal, id length (2 bytes)], id (none here), JSON.
    let mut record = vec![0u8, 0, 0, 0];
    record.extend_from_slice(body);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0);
    let reply: Vec<redis::Value> = redis::cmd("EVALSHA")
        .arg(sha)
        .arg(1)
        .arg(format!("null:q:{{{tag}}}"))
        .arg("single")
        .arg("null:")
        .arg("nullnode")
        .arg(1)
        .arg(tag)
        .arg(rev)
        .arg(0)
        .arg("add")
        .arg(tag)
        .arg(offset + 1)
        .arg(1)
        .arg("")
        .arg(record)
        .arg("put")
        .arg(tag)
        .arg("default")
        .arg(task)
        .arg(10)
        .arg("kind")
        .arg(2)
        .arg("created")
        .arg(now)
        .arg("activity")
        .arg(now)
        .arg("ttl")
        .arg(1_800_000)
        .arg("max")
        .arg(10_000_000)
        .arg("first")
        .arg(0)
        .arg("next")
        .arg(offset + 1)
        .arg("closed")
        .arg(0)
        .arg("finished")
        .arg("")
        .arg("cancelled")
        .arg("")
        .query(con)
        .map_err(|e| e.to_string())?;
    match reply.as_slice() {
        [
            redis::Value::BulkString(ok),
            _,
            redis::Value::BulkString(rev),
        ] if ok == b"ok" => Ok(String::from_utf8_lossy(rev).into_owned()),
        other => Err(format!("unexpected reply from the batch script: {other:?}")),
    }
}
