//! HTTPS: the server's certificate and key ([`TlsConfig`]), and serving one TLS connection
//! with HTTP/2 or HTTP/1.1, whichever the client chose by ALPN.
//!
//! Browsers speak HTTP/2 only over TLS, and over HTTP/1.1 they open at most six connections
//! per origin — six SSE streams per page. Over HTTP/2 every stream of a page shares one
//! connection, so a dashboard can follow many tasks at once.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::Watcher;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// The server's certificate chain and private key, for [`super::ServerConfig::tls`]. Cheap
/// to clone.
#[derive(Clone)]
pub struct TlsConfig {
    rustls: Arc<rustls::ServerConfig>,
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key stays out of logs.
        f.debug_struct("TlsConfig")
            .field("alpn", &["h2", "http/1.1"])
            .finish_non_exhaustive()
    }
}

/// Why a certificate or key could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// The file could not be read.
    #[error("cannot read the TLS {what} {}: {source}", path.display())]
    Read {
        /// `certificate` or `key`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The PEM text holds no certificate, or no private key, or is malformed.
    #[error("TLS {what}{}: {reason}", path_suffix(path.as_deref()))]
    Pem {
        /// `certificate` or `key`.
        what: &'static str,
        /// The file, when read from one.
        path: Option<PathBuf>,
        /// What is wrong.
        reason: String,
    },
    /// rustls refused the pair (for example, the key does not belong to the certificate).
    #[error("TLS certificate and key refused: {0}")]
    Refused(String),
}

fn path_suffix(path: Option<&Path>) -> String {
    path.map(|p| format!(" {}", p.display()))
        .unwrap_or_default()
}

impl TlsConfig {
    /// A certificate chain (PEM, the server's certificate first, then any intermediates) and
    /// its private key (PEM: PKCS#8, PKCS#1 or SEC1). The server offers HTTP/2 and HTTP/1.1
    /// by ALPN.
    ///
    /// # Errors
    ///
    /// [`TlsError::Pem`] when either holds nothing usable; [`TlsError::Refused`] when the key
    /// does not match the certificate or rustls refuses it.
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<Self, TlsError> {
        Self::from_pem_at(cert_pem, key_pem, None, None)
    }

    /// [`TlsConfig::from_pem`] on the contents of two files, read at once (a blocking read:
    /// call it at start-up, or on a blocking thread).
    ///
    /// # Errors
    ///
    /// [`TlsError::Read`] when a file cannot be read; otherwise as [`TlsConfig::from_pem`].
    pub fn from_pem_files(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let read = |what, path: &Path| {
            std::fs::read(path).map_err(|source| TlsError::Read {
                what,
                path: path.to_path_buf(),
                source,
            })
        };
        let cert_pem = read("certificate", cert)?;
        let key_pem = read("key", key)?;
        Self::from_pem_at(&cert_pem, &key_pem, Some(cert), Some(key))
    }

    fn from_pem_at(
        cert_pem: &[u8],
        key_pem: &[u8],
        cert_path: Option<&Path>,
        key_path: Option<&Path>,
    ) -> Result<Self, TlsError> {
        let pem_error = |what, path: Option<&Path>, reason: String| TlsError::Pem {
            what,
            path: path.map(Path::to_path_buf),
            reason,
        };
        let certs = CertificateDer::pem_slice_iter(cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| pem_error("certificate", cert_path, e.to_string()))?;
        if certs.is_empty() {
            return Err(pem_error(
                "certificate",
                cert_path,
                "no certificate (-----BEGIN CERTIFICATE-----) in it".into(),
            ));
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| {
            let reason = match e {
                rustls::pki_types::pem::Error::NoItemsFound => {
                    "no private key (-----BEGIN PRIVATE KEY-----) in it".to_string()
                }
                e => e.to_string(),
            };
            pem_error("key", key_path, reason)
        })?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Refused(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| TlsError::Refused(e.to_string()))?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Self {
            rustls: Arc::new(config),
        })
    }

    pub(super) fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.rustls.clone())
    }
}

/// How the server's TLS connections are served.
#[derive(Clone)]
pub(super) struct TlsServe {
    pub(super) acceptor: TlsAcceptor,
    /// HTTP/1.1 connections (the same settings as plain HTTP's).
    pub(super) http1: hyper::server::conn::http1::Builder,
    pub(super) http2: hyper::server::conn::http2::Builder<TokioExecutor>,
    /// Longest TLS handshake; a client that stalls it is disconnected, as one that stalls
    /// its request head.
    pub(super) handshake_timeout: Duration,
}

impl TlsServe {
    /// For `tls`, with `http1` for HTTP/1.1 connections. HTTP/2 connections ping an idle peer
    /// every `header_read_timeout` and close when it does not answer within as long (a dead
    /// peer does not hold its connection forever).
    pub(super) fn new(
        tls: &TlsConfig,
        http1: hyper::server::conn::http1::Builder,
        header_read_timeout: Duration,
    ) -> Self {
        let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        http2
            .timer(TokioTimer::new())
            .keep_alive_interval(Some(header_read_timeout))
            .keep_alive_timeout(header_read_timeout);
        Self {
            acceptor: tls.acceptor(),
            http1,
            http2,
            handshake_timeout: header_read_timeout,
        }
    }

    /// Runs the TLS handshake on `stream`, then serves it with `service` over HTTP/2 when the
    /// client chose `h2` by ALPN, else HTTP/1.1 (upgradeable to the WebSocket producer
    /// connection); the connection shuts down gracefully through `watcher` and `shutdown`.
    pub(super) async fn serve<S, B>(
        self,
        stream: TcpStream,
        service: S,
        watcher: Watcher,
        shutdown: CancellationToken,
    ) where
        S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B> + Clone + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
        B: hyper::body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let tls = match tokio::time::timeout(self.handshake_timeout, self.acceptor.accept(stream))
            .await
        {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "TLS handshake failed");
                return;
            }
            Err(_) => {
                tracing::debug!("TLS handshake timed out");
                return;
            }
        };
        if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
            let conn = self.http2.serve_connection(TokioIo::new(tls), service);
            if let Err(e) = watcher.watch(conn).await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        } else {
            let io = TokioIo::new(super::conn::HeadErrors::new(tls));
            let conn = self.http1.serve_connection(io, service).with_upgrades();
            super::conn::serve_upgradeable(conn, watcher, shutdown).await;
        }
    }
}
