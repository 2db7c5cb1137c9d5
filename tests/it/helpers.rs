//! Shared test helpers.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use eventqueue::server::{self, AppState, ServeError, ServerConfig};
use eventqueue::{Config, QueueManager};
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Longest wait for anything a test expects to happen; only guards against hangs.
pub const HANG_GUARD: Duration = Duration::from_secs(20);

/// A server config for tests: no background cleanup loop, everything else default.
pub fn server_config() -> ServerConfig {
    let mut config = ServerConfig::default();
    config.cleanup_interval = None;
    config
}

/// A manager on a fresh temporary directory.
pub async fn manager() -> (QueueManager, TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let manager = QueueManager::open(Config::new(dir.path())).await.unwrap();
    (manager, dir)
}

const META: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("meta");

/// The `meta` value `key` of the (stopped) store in `dir`.
pub fn read_meta(dir: &std::path::Path, key: &str) -> Option<u64> {
    let db = redb::Database::create(dir.join(eventqueue::DB_FILE)).unwrap();
    let txn = redb::ReadableDatabase::begin_read(&db).unwrap();
    let table = txn.open_table(META).unwrap();
    table.get(key).unwrap().map(|v| v.value())
}

/// Turns the (stopped) store in `dir` back into what a build of format `version` (1 or 2)
/// wrote: that version number and no key of derived ids; `more` changes whatever else that
/// version lacked, in the same transaction.
pub fn make_older_format(
    dir: &std::path::Path,
    version: u64,
    more: impl FnOnce(&redb::WriteTransaction),
) {
    let db = redb::Database::create(dir.join(eventqueue::DB_FILE)).unwrap();
    let txn = db.begin_write().unwrap();
    {
        let mut table = txn.open_table(META).unwrap();
        table.insert("format_version", version).unwrap();
        table.remove("derived_id_key_0").unwrap();
        table.remove("derived_id_key_1").unwrap();
    }
    more(&txn);
    txn.commit().unwrap();
}

/// A real server on `127.0.0.1:0` over a temporary data directory, run in-process.
pub struct TestServer {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its state (manager, settings, shutdown token).
    pub state: AppState,
    dir: TempDir,
    stop: Option<oneshot::Sender<()>>,
    handle: JoinHandle<Result<(), ServeError>>,
}

impl TestServer {
    /// Starts a server on a fresh data directory.
    pub async fn start(config: ServerConfig) -> Self {
        Self::start_in(tempfile::tempdir().unwrap(), config).await
    }

    /// Starts a server on `dir` (for example one a stopped server used).
    pub async fn start_in(dir: TempDir, config: ServerConfig) -> Self {
        Self::start_tuned(dir, |_| {}, config).await
    }

    /// [`TestServer::start_in`] with the store's settings changed by `tune`.
    pub async fn start_tuned(
        dir: TempDir,
        tune: impl FnOnce(&mut Config),
        config: ServerConfig,
    ) -> Self {
        let mut store_config = Config::new(dir.path());
        tune(&mut store_config);
        let manager = QueueManager::open(store_config).await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = AppState::new(manager, config);
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = tokio::spawn(server::serve(state.clone(), listener, async move {
            let _ = stopped.await;
        }));
        Self {
            addr,
            state,
            dir,
            stop: Some(stop),
            handle,
        }
    }

    /// `http://addr{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// `GET path`, its body as JSON (whatever the status).
    pub async fn get_json(&self, path: &str) -> serde_json::Value {
        client()
            .get(self.url(path))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// The data directory it runs on.
    pub fn data_dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// The server's manager.
    pub fn manager(&self) -> &QueueManager {
        self.state.manager()
    }

    /// Triggers a graceful shutdown and waits until `serve` returned; returns the data
    /// directory for a restart.
    pub async fn stop(mut self) -> TempDir {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(HANG_GUARD, &mut self.handle)
            .await
            .expect("serve did not return after shutdown")
            .unwrap()
            .unwrap();
        self.dir
    }
}

/// An HTTP client for tests.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// One SSE frame: its fields, or a comment.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Frame {
    /// `id:` field.
    pub id: Option<String>,
    /// `event:` field.
    pub event: Option<String>,
    /// `data:` lines joined by `\n`.
    pub data: Option<String>,
    /// Comment text (after `:`), for comment-only frames.
    pub comment: Option<String>,
}

impl Frame {
    /// The data parsed as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(self.data.as_deref().expect("frame without data")).unwrap()
    }

    /// Whether the frame is only a comment.
    pub fn is_comment(&self) -> bool {
        self.comment.is_some() && self.id.is_none() && self.event.is_none() && self.data.is_none()
    }
}

/// Reads SSE frames from a response body.
pub struct SseReader {
    body: BoxStream<'static, reqwest::Result<Bytes>>,
    buf: Vec<u8>,
    /// Every raw byte received so far.
    pub raw: Vec<u8>,
}

impl SseReader {
    /// Reads `response`'s body.
    pub fn new(response: reqwest::Response) -> Self {
        Self {
            body: response.bytes_stream().boxed(),
            buf: Vec::new(),
            raw: Vec::new(),
        }
    }

    /// The next frame, comments included; `None` at the end of the stream.
    pub async fn next_frame(&mut self) -> Option<Frame> {
        tokio::time::timeout(HANG_GUARD, self.read_frame())
            .await
            .expect("no SSE frame arrived")
    }

    /// The next frame that is not a comment.
    pub async fn next_event(&mut self) -> Option<Frame> {
        tokio::time::timeout(HANG_GUARD, async {
            loop {
                let frame = self.read_frame().await?;
                if !frame.is_comment() {
                    return Some(frame);
                }
            }
        })
        .await
        .expect("no SSE event arrived")
    }

    /// Every remaining non-comment frame, until the stream ends.
    pub async fn rest(&mut self) -> Vec<Frame> {
        let mut frames = Vec::new();
        while let Some(f) = self.next_event().await {
            frames.push(f);
        }
        frames
    }

    async fn read_frame(&mut self) -> Option<Frame> {
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.buf.drain(..end + 2).collect();
                return Some(parse_frame(&block[..end]));
            }
            match self.body.next().await {
                Some(Ok(chunk)) => {
                    self.raw.extend_from_slice(&chunk);
                    self.buf.extend_from_slice(&chunk);
                }
                Some(Err(_)) | None => {
                    assert!(
                        self.buf.iter().all(u8::is_ascii_whitespace),
                        "stream ended inside a frame: {:?}",
                        String::from_utf8_lossy(&self.buf)
                    );
                    return None;
                }
            }
        }
    }
}

fn parse_frame(block: &[u8]) -> Frame {
    let text = std::str::from_utf8(block).expect("SSE frame is not UTF-8");
    let mut frame = Frame::default();
    for line in text.split('\n') {
        if let Some(comment) = line.strip_prefix(':') {
            frame.comment = Some(comment.trim_start().to_string());
            continue;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value).to_string();
        match field {
            "id" => frame.id = Some(value),
            "event" => frame.event = Some(value),
            "data" => {
                frame.data = Some(match frame.data.take() {
                    Some(d) => format!("{d}\n{value}"),
                    None => value,
                })
            }
            other => panic!("unexpected SSE field {other:?} in {text:?}"),
        }
    }
    frame
}
