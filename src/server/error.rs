//! [`ApiError`]: every error the HTTP API answers, as `{"detail": "…"}` with its status code.
//!
//! Client errors carry a message that names what is wrong. Internal errors (storage, I/O) are
//! logged in full and answered with a generic detail, so nothing of the server's insides leaks.

use axum::Json;
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::error::Error;

/// An error answer of the HTTP API: a status code and the `detail` text of its JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    status: StatusCode,
    detail: String,
    /// Extra response headers (`WWW-Authenticate`, `Retry-After`).
    headers: Vec<(HeaderName, HeaderValue)>,
}

#[derive(Serialize)]
struct Body<'a> {
    detail: &'a str,
}

impl ApiError {
    /// An error with the given status and detail text.
    pub fn new(status: StatusCode, detail: impl Into<String>) -> Self {
        Self {
            status,
            detail: detail.into(),
            headers: Vec::new(),
        }
    }

    /// `401 Unauthorized` with a `WWW-Authenticate: Bearer` challenge; `error` is the RFC 6750
    /// error code (`invalid_token`), absent when no credentials were sent.
    pub fn unauthorized(detail: impl Into<String>, error: Option<&'static str>) -> Self {
        let challenge = match error {
            Some(code) => format!("Bearer realm=\"eventqueue\", error=\"{code}\""),
            None => "Bearer realm=\"eventqueue\"".to_string(),
        };
        Self::new(StatusCode::UNAUTHORIZED, detail).with_header(header::WWW_AUTHENTICATE, challenge)
    }

    /// `403 Forbidden`: valid credentials without `scope`.
    pub fn forbidden(detail: impl Into<String>, scope: &str) -> Self {
        Self::new(StatusCode::FORBIDDEN, detail).with_header(
            header::WWW_AUTHENTICATE,
            format!("Bearer realm=\"eventqueue\", error=\"insufficient_scope\", scope=\"{scope}\""),
        )
    }

    /// `429 Too Many Requests` with `Retry-After: {retry_after_secs}`.
    pub fn too_many(detail: impl Into<String>, retry_after_secs: u64) -> Self {
        Self::new(StatusCode::TOO_MANY_REQUESTS, detail)
            .with_header(header::RETRY_AFTER, retry_after_secs.to_string())
    }

    /// `408 Request Timeout`.
    pub fn timeout(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::REQUEST_TIMEOUT, detail)
    }

    /// Adds a response header; a value that is not a valid header value is dropped.
    pub fn with_header(mut self, name: HeaderName, value: impl AsRef<str>) -> Self {
        if let Ok(value) = HeaderValue::from_str(value.as_ref()) {
            self.headers.push((name, value));
        }
        self
    }

    /// The extra response headers.
    pub fn headers(&self) -> &[(HeaderName, HeaderValue)] {
        &self.headers
    }

    /// `400 Bad Request`.
    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, detail)
    }

    /// `404 Not Found`.
    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, detail)
    }

    /// `404` with the text `No queue found for task {task_id}`.
    pub fn no_queue(task_id: impl std::fmt::Display) -> Self {
        Self::not_found(format!("No queue found for task {task_id}"))
    }

    /// `409 Conflict`.
    pub fn conflict(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, detail)
    }

    /// `413 Payload Too Large`.
    pub fn too_large(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, detail)
    }

    /// `503 Service Unavailable`: the server is shutting down.
    pub fn shutting_down() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is shutting down",
        )
    }

    /// The status code.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The detail text.
    pub fn detail(&self) -> &str {
        &self.detail
    }

    /// Prefixes the detail (for example with the index of an event in a batch).
    pub(crate) fn context(mut self, prefix: impl std::fmt::Display) -> Self {
        self.detail = format!("{prefix}: {}", self.detail);
        self
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.status, self.detail)
    }
}

impl std::error::Error for ApiError {}

impl From<Error> for ApiError {
    fn from(err: Error) -> Self {
        match &err {
            Error::InvalidId { .. }
            | Error::InvalidEvent { .. }
            | Error::InvalidCheckpoint { .. } => Self::bad_request(err.to_string()),
            Error::QueueNotFound { task_id } => Self::no_queue(task_id),
            Error::QueueExists { .. } | Error::QueueClosed { .. } | Error::TaskFinished { .. } => {
                Self::conflict(err.to_string())
            }
            Error::ShuttingDown => Self::shutting_down(),
            // Its text is ours (no paths): it tells the client what to do.
            Error::DiskFull(msg) => Self::new(
                StatusCode::INSUFFICIENT_STORAGE,
                format!("insufficient storage: {msg}"),
            ),
            // Freeing space is not enough here: the store stopped writes (see
            // `Error::StoreFailed`), and only a restart takes them again.
            Error::StoreFailed(cause) if cause.is_storage_full() => {
                tracing::error!(error = %err, "storage full; writes stopped until a restart");
                Self::new(
                    StatusCode::INSUFFICIENT_STORAGE,
                    "insufficient storage: the disk filled up during a storage write, so \
                     writes are stopped until the server is restarted with space freed; \
                     reads go on",
                )
            }
            // A networked store (Redis) that cannot be reached: the same request may work
            // in a moment.
            Error::Storage(cause) if cause.is_unavailable() => {
                tracing::warn!(error = %err, "storage unavailable");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("storage unavailable, try again: {cause}"),
                )
            }
            Error::Storage(cause) if cause.is_storage_full() => {
                tracing::error!(error = %err, "storage full");
                Self::new(StatusCode::INSUFFICIENT_STORAGE, "insufficient storage")
            }
            _ => {
                tracing::error!(error = %err, "internal error");
                Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal server error")
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (
            self.status,
            Json(Body {
                detail: &self.detail,
            }),
        )
            .into_response();
        for (name, value) in self.headers {
            response.headers_mut().append(name, value);
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_library_errors_to_status_codes() {
        let cases = [
            (
                Error::InvalidId {
                    field: "task_id",
                    reason: "x".into(),
                },
                400,
            ),
            (
                Error::QueueNotFound {
                    task_id: "t".into(),
                },
                404,
            ),
            (
                Error::QueueExists {
                    tenant_id: "a".into(),
                    task_id: "t".into(),
                },
                409,
            ),
            (
                Error::QueueClosed {
                    task_id: "t".into(),
                },
                409,
            ),
            (
                Error::TaskFinished {
                    task_id: "t".into(),
                },
                409,
            ),
            (Error::ShuttingDown, 503),
            (Error::storage("disk on fire at /secret/path"), 500),
            (Error::StoreFailed(full()), 507),
            (Error::internal("a bug at /secret/path"), 500),
            (Error::Poisoned("writer".into()), 500),
            (Error::DiskFull("the data volume is full".into()), 507),
        ];
        for (err, status) in cases {
            let api = ApiError::from(err);
            assert_eq!(api.status().as_u16(), status, "{api}");
            assert!(!api.detail().contains("/secret/path"));
        }
        // A full disk that stopped writes tells the client that only a restart helps; one
        // that failed a single write does not.
        let stopped = ApiError::from(Error::StoreFailed(full()));
        assert!(stopped.detail().contains("restarted"), "{stopped}");
        let one = ApiError::from(Error::Storage(full()));
        assert_eq!(one.status().as_u16(), 507);
        assert_eq!(one.detail(), "insufficient storage");
        // The status comes from the error's kind, not from its text.
        let says_full = ApiError::from(Error::storage("No space left on device (os error 28)"));
        assert_eq!(says_full.status().as_u16(), 500);
    }

    /// A storage error whose cause is a full disk.
    fn full() -> crate::StorageError {
        crate::StorageError::io(
            "appending to /data/eventqueue.wal",
            std::io::Error::from(std::io::ErrorKind::StorageFull),
        )
    }
}
