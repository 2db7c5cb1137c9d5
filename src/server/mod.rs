//! The HTTP server (axum): routes, SSE, errors.
