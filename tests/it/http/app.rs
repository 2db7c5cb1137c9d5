//! A router under test driven with `oneshot` (no sockets), in open or token mode, for the
//! auth, hostile-input and isolation tests.
#![allow(dead_code)]

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode};
use eventqueue::TenantId;
use eventqueue::server::{AppState, Auth, ServerConfig, TokenKeys, router};
use serde_json::Value;
use tempfile::TempDir;
use tower::ServiceExt;

use crate::helpers;

/// The secret of token-mode tests.
pub const SECRET: &[u8] = b"eventqueue-tests-secret-0123456789abcdef";

/// Token keys over [`SECRET`].
pub fn keys() -> TokenKeys {
    TokenKeys::from_secret(SECRET).unwrap()
}

/// The test server config in token mode.
pub fn token_config() -> ServerConfig {
    let mut config = helpers::server_config();
    config.auth = Auth::Token(keys());
    config
}

/// A token for `tenant` with the space-separated `scopes`, valid for an hour.
pub fn token(tenant: &str, scopes: &str) -> String {
    keys()
        .mint(
            &TenantId::new(tenant).unwrap(),
            eventqueue::server::Scopes::parse_strict(scopes).unwrap(),
            std::time::Duration::from_secs(3600),
        )
        .unwrap()
}

/// An answer, read whole (or its head only, for streams).
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl Reply {
    /// The body as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }

    /// The `detail` of an error body.
    pub fn detail(&self) -> String {
        self.json()["detail"]
            .as_str()
            .unwrap_or_else(|| panic!("no detail in {:?}", self.json()))
            .to_string()
    }

    /// A header's value as text.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
    }

    /// Asserts an error answer: `status`, a JSON body whose detail contains `needle`.
    #[track_caller]
    pub fn assert_error(&self, status: StatusCode, needle: &str) {
        assert_eq!(
            self.status,
            status,
            "{}",
            String::from_utf8_lossy(&self.body)
        );
        assert_eq!(
            self.header("content-type").as_deref(),
            Some("application/json")
        );
        let detail = self.detail();
        assert!(
            detail.to_lowercase().contains(&needle.to_lowercase()),
            "{detail:?} lacks {needle:?}"
        );
    }
}

/// One request: method, URI, headers, body.
#[derive(Debug, Clone, Default)]
pub struct Req {
    pub method: String,
    pub uri: String,
    pub headers: Vec<(String, String)>,
    pub body: Option<Vec<u8>>,
}

impl Req {
    /// A request without headers or body.
    pub fn new(method: &str, uri: &str) -> Self {
        Self {
            method: method.into(),
            uri: uri.into(),
            ..Self::default()
        }
    }

    /// With a header.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// With `Authorization: Bearer {token}`.
    pub fn bearer(self, token: &str) -> Self {
        self.header("authorization", &format!("Bearer {token}"))
    }

    /// With a body.
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = Some(body.into());
        self
    }

    fn build(&self) -> Request<Body> {
        let mut req = Request::builder()
            .method(self.method.as_str())
            .uri(self.uri.as_str());
        for (k, v) in &self.headers {
            req = req.header(k.as_str(), v.as_str());
        }
        req.body(match &self.body {
            Some(b) => Body::from(b.clone()),
            None => Body::empty(),
        })
        .unwrap()
    }
}

/// A router over a fresh data directory.
pub struct App {
    pub router: Router,
    pub state: AppState,
    _dir: TempDir,
}

impl App {
    /// In token mode with [`SECRET`].
    pub async fn token_mode() -> Self {
        Self::with(token_config()).await
    }

    /// In open mode.
    pub async fn open_mode() -> Self {
        Self::with(helpers::server_config()).await
    }

    /// With `config`.
    pub async fn with(config: ServerConfig) -> Self {
        let (manager, dir) = helpers::manager().await;
        Self::over(manager, dir, config)
    }

    /// With `config`, over `manager` (opened on `dir`, which lives as long as the app).
    pub fn over(manager: eventqueue::QueueManager, dir: TempDir, config: ServerConfig) -> Self {
        let state = AppState::new(manager, config);
        Self {
            router: router(state.clone()),
            state,
            _dir: dir,
        }
    }

    /// Sends `req` and reads the whole answer. An SSE answer (`200 text/event-stream`) is read
    /// up to its head only: its body is dropped, which ends the stream.
    pub async fn send(&self, req: &Req) -> Reply {
        let resp = tokio::time::timeout(
            helpers::HANG_GUARD,
            self.router.clone().oneshot(req.build()),
        )
        .await
        .expect("no answer")
        .unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let is_stream = headers
            .get("content-type")
            .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
        let body = if is_stream {
            Vec::new()
        } else {
            tokio::time::timeout(
                helpers::HANG_GUARD,
                axum::body::to_bytes(resp.into_body(), usize::MAX),
            )
            .await
            .expect("body did not end")
            .unwrap()
            .to_vec()
        };
        Reply {
            status,
            headers,
            body,
        }
    }

    /// Sends `req` and keeps the response (an SSE body stays open while it is held).
    pub async fn open(&self, req: &Req) -> axum::response::Response {
        self.router.clone().oneshot(req.build()).await.unwrap()
    }

    /// `method uri` with `token` and an optional JSON body.
    pub async fn call(&self, token: &str, method: &str, uri: &str, body: Option<&str>) -> Reply {
        let mut req = Req::new(method, uri).bearer(token);
        if let Some(b) = body {
            req = req.body(b);
        }
        self.send(&req).await
    }

    /// Creates `task` with `token`; asserts `201`.
    pub async fn create(&self, token: &str, task: &str) {
        let r = self
            .call(
                token,
                "POST",
                "/events/queues",
                Some(&serde_json::json!({ "task_id": task }).to_string()),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.json());
    }
}
