//! HTTP API tests: router tests without sockets (`router`), real-socket SSE tests (`sse`),
//! server lifecycle tests — graceful shutdown and restart (`lifecycle`), token mode and limits
//! (`auth`), hostile input and slow clients (`hostile`), tenant isolation as a property
//! (`isolation`), paged and filtered queue lists (`listing`), the dashboard's assets
//! (`dashboard`), checkpoint routes (`checkpoint`), the HTTP producer helpers and the demo
//! (`producer`), a proptest-driven fuzz of event JSON parsing (`fuzz`), and HTTPS with
//! HTTP/2 (`tls`); connection limits and bodies under hostile load (`connections`); token
//! bounds and revocation (`tokens`); the pipelined WebSocket producer connection (`ws`) and
//! client-side coalescing (`coalesce`).

mod a2a;
mod app;
mod auth;
mod checkpoint;
mod coalesce;
mod connections;
mod dashboard;
mod durable_streams;
mod fuzz;
mod hostile;
mod isolation;
mod lifecycle;
mod listing;
mod producer;
mod router;
mod sse;
mod stream_memory;
mod tls;
mod tokens;
mod ws;

use serde_json::{Value, json};

/// A `status: working` event in phase `phase`.
pub fn working(phase: usize) -> Value {
    json!({"event_type": "status", "state": "working", "phase": format!("phase_{phase}")})
}

/// A `complete` event (terminal).
pub fn complete() -> Value {
    json!({"event_type": "complete", "result": {"ok": true}, "summary": "done"})
}
