//! HTTPS: the server with a self-signed certificate made at test time, followed by the Rust
//! client trusting it; HTTP/2 by ALPN; the pipelined producer connection over HTTPS; and the
//! failures no retry can fix, reported once.

use eventqueue::client::{
    Client, ClientError, EndReason, StreamItem, SubscribeOptions, TlsFailure,
};
use eventqueue::server::TlsConfig;
use serde_json::json;

use super::{complete, working};
use crate::helpers::{HANG_GUARD, SseReader, TestServer, server_config};

/// A self-signed certificate for 127.0.0.1: the server's settings and the PEM to trust.
fn self_signed() -> (TlsConfig, String) {
    let made =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    let cert = made.cert.pem();
    let tls =
        TlsConfig::from_pem(cert.as_bytes(), made.signing_key.serialize_pem().as_bytes()).unwrap();
    (tls, cert)
}

async fn https_server() -> (TestServer, String, String) {
    let (tls, cert) = self_signed();
    let mut config = server_config();
    config.tls = Some(tls);
    let server = TestServer::start(config).await;
    let url = format!("https://127.0.0.1:{}", server.addr.port());
    (server, url, cert)
}

/// The next item of `sub`, bounded by the hang guard.
async fn next(sub: &mut eventqueue::client::Subscription) -> Result<StreamItem, ClientError> {
    tokio::time::timeout(HANG_GUARD, sub.next())
        .await
        .expect("the subscription hung")
        .expect("the subscription ended")
}

#[tokio::test]
async fn a_stream_is_followed_over_https_with_the_ca_given_to_the_client() {
    let (server, url, cert) = https_server().await;
    let client = Client::builder(&url).ca_cert_pem(cert).build().unwrap();
    client
        .create_queue("wf", &Default::default())
        .await
        .unwrap();
    client.publish("wf", &working(0)).await.unwrap();
    client.publish("wf", &working(1)).await.unwrap();

    let mut sub = client.subscribe("wf", SubscribeOptions::default());
    assert!(matches!(next(&mut sub).await, Ok(StreamItem::Connected(c)) if c.latest_offset == 2));
    for offset in 0..2 {
        match next(&mut sub).await {
            Ok(StreamItem::Event(e)) => assert_eq!(e.offset, offset),
            other => panic!("expected replayed event {offset}, got {other:?}"),
        }
    }
    // A live event, published while the stream is open.
    client.publish("wf", &complete()).await.unwrap();
    match next(&mut sub).await {
        Ok(StreamItem::Event(e)) => {
            assert_eq!(e.offset, 2);
            assert!(e.is_terminal());
        }
        other => panic!("expected the live event, got {other:?}"),
    }
    assert!(matches!(
        next(&mut sub).await,
        Ok(StreamItem::End(EndReason::Finished { offset: 2 }))
    ));
    server.stop().await;
}

#[tokio::test]
async fn alpn_chooses_http2_and_falls_back_to_http1() {
    let (server, url, cert) = https_server().await;
    let ca = reqwest::Certificate::from_pem(cert.as_bytes()).unwrap();
    let both = reqwest::Client::builder()
        .no_proxy()
        .tls_certs_only([ca.clone()])
        .build()
        .unwrap();
    let resp = both.get(format!("{url}/healthz")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    // An SSE stream over HTTP/2 carries its frames.
    let client = Client::builder(&url)
        .ca_cert_pem(cert.clone())
        .build()
        .unwrap();
    client
        .create_queue("wf", &Default::default())
        .await
        .unwrap();
    client.publish("wf", &working(0)).await.unwrap();
    let resp = both
        .get(format!("{url}/events/workflows/wf"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    let mut sse = SseReader::new(resp);
    assert_eq!(
        sse.next_frame().await.unwrap().event.as_deref(),
        Some("connected")
    );
    assert_eq!(sse.next_frame().await.unwrap().id.as_deref(), Some("0"));
    drop(sse);

    let http1 = reqwest::Client::builder()
        .no_proxy()
        .http1_only()
        .tls_certs_only([ca])
        .build()
        .unwrap();
    let resp = http1.get(format!("{url}/healthz")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), reqwest::Version::HTTP_11);
    server.stop().await;
}

#[tokio::test]
async fn the_agent_card_names_https_and_the_http2_authority() {
    let (server, url, cert) = https_server().await;
    let ca = reqwest::Certificate::from_pem(cert.as_bytes()).unwrap();
    let http = reqwest::Client::builder()
        .no_proxy()
        .tls_certs_only([ca])
        .build()
        .unwrap();
    // Over HTTP/2 there is no Host header: the card takes the request's authority.
    let resp = http
        .get(format!("{url}/.well-known/agent-card.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    let card: serde_json::Value = resp.json().await.unwrap();
    let endpoint = format!("{url}/a2a");
    assert!(
        card.to_string().contains(&json!(endpoint).to_string()),
        "{card}"
    );
    server.stop().await;
}

#[tokio::test]
async fn an_unknown_certificate_is_reported_once_not_retried() {
    let (server, url, _cert) = https_server().await;
    // Trusting another certificate: the machine's own trust store plays no part.
    let (_, other) = self_signed();
    let client = Client::builder(&url).ca_cert_pem(other).build().unwrap();
    let err = client.health().await.unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::Tls {
                kind: TlsFailure::Certificate,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(!err.is_retryable());
    assert!(err.to_string().contains("certificate"), "{err}");

    // A subscription that would retry forever ends with the error at once.
    let mut sub = client.subscribe("wf", SubscribeOptions::default());
    match next(&mut sub).await {
        Err(ClientError::Tls {
            kind: TlsFailure::Certificate,
            ..
        }) => {}
        other => panic!("expected a certificate error, got {other:?}"),
    }
    assert!(sub.next().await.is_none());
    server.stop().await;
}

#[tokio::test]
async fn https_to_a_plain_http_server_is_reported_once() {
    let server = TestServer::start(server_config()).await;
    let (_, cert) = self_signed();
    let url = format!("https://127.0.0.1:{}", server.addr.port());
    let client = Client::builder(&url).ca_cert_pem(cert).build().unwrap();
    let mut sub = client.subscribe("wf", SubscribeOptions::default());
    match next(&mut sub).await {
        Err(ClientError::Tls {
            kind: TlsFailure::NotTls,
            ..
        }) => {}
        other => panic!("expected a not-TLS error, got {other:?}"),
    }
    server.stop().await;
}

#[tokio::test]
async fn the_pipelined_producer_connection_works_over_https() {
    let (server, url, cert) = https_server().await;
    let client = Client::builder(&url).ca_cert_pem(cert).build().unwrap();
    client
        .create_queue("wf", &Default::default())
        .await
        .unwrap();
    let pipeline = client.pipeline("wf").await.unwrap();
    for i in 0..3 {
        let outcome = pipeline.publish(&working(i)).await.unwrap();
        assert_eq!(outcome.offsets, vec![i as u64]);
    }
    // Stored where a plain request reads them.
    assert_eq!(client.queue_info("wf").await.unwrap().latest_offset, 3);
    server.stop().await;
}
