//! Limits that protect the node from one greedy or hostile client: open SSE streams (in total
//! and per tenant), queues per tenant, and JSON nesting depth. Body size, batch size and read
//! timeouts are enforced where bodies are read ([`crate::server::ServerConfig`]).
//!
//! Counting is exact: a stream slot or a queue reservation is taken under a lock before the
//! work starts and given back when it ends (a stream's slot when its body is dropped, a
//! reservation when its [`QueueReservation`] is), so concurrent requests cannot overshoot a
//! limit.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::ids::TenantId;
use crate::server::error::ApiError;

/// `Retry-After` of a `429`, in seconds.
pub const RETRY_AFTER_SECS: u64 = 5;

#[derive(Debug, Default)]
struct Counts {
    streams_total: usize,
    streams: HashMap<TenantId, usize>,
    creating: HashMap<TenantId, usize>,
}

/// The live counts behind the limits (one per server).
#[derive(Debug, Default)]
pub(crate) struct Limits {
    counts: Mutex<Counts>,
}

impl Limits {
    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        // The counts stay consistent even if a holder panicked: every update is one statement.
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// SSE streams open on this server.
    pub(crate) fn open_streams(&self) -> usize {
        self.counts().streams_total
    }

    /// Takes a stream slot for `tenant`.
    ///
    /// # Errors
    ///
    /// `429` with `Retry-After` when the server or the tenant is at its limit.
    pub(crate) fn open_stream(
        &self,
        tenant: &TenantId,
        max_total: usize,
        max_per_tenant: usize,
    ) -> Result<(), ApiError> {
        let mut counts = self.counts();
        if counts.streams_total >= max_total {
            return Err(ApiError::too_many(
                format!("too many open streams: the server serves at most {max_total}"),
                RETRY_AFTER_SECS,
            ));
        }
        let mine = counts.streams.get(tenant).copied().unwrap_or(0);
        if mine >= max_per_tenant {
            return Err(ApiError::too_many(
                format!(
                    "too many open streams: tenant {tenant} has {mine}, the limit is {max_per_tenant}"
                ),
                RETRY_AFTER_SECS,
            ));
        }
        counts.streams_total += 1;
        *counts.streams.entry(tenant.clone()).or_default() += 1;
        Ok(())
    }

    /// Gives back a slot taken by [`open_stream`](Self::open_stream).
    pub(crate) fn close_stream(&self, tenant: &TenantId) {
        let mut counts = self.counts();
        counts.streams_total = counts.streams_total.saturating_sub(1);
        if let Some(n) = counts.streams.get_mut(tenant) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.streams.remove(tenant);
            }
        }
    }

    /// Reserves the creation of one queue for `tenant`, which has `existing()` queues.
    ///
    /// # Errors
    ///
    /// `429` with `Retry-After` when the tenant's existing queues plus the creations in
    /// flight reach `max`.
    pub(crate) fn reserve_queue(
        &self,
        tenant: &TenantId,
        max: usize,
        existing: impl FnOnce() -> usize,
    ) -> Result<QueueReservation<'_>, ApiError> {
        let mut counts = self.counts();
        let creating = counts.creating.get(tenant).copied().unwrap_or(0);
        let have = existing().saturating_add(creating);
        if have >= max {
            return Err(ApiError::too_many(
                format!(
                    "too many queues: tenant {tenant} has {have}, the limit is {max}; delete \
                     queues or wait for them to expire"
                ),
                RETRY_AFTER_SECS,
            ));
        }
        *counts.creating.entry(tenant.clone()).or_default() += 1;
        Ok(QueueReservation {
            limits: self,
            tenant: tenant.clone(),
        })
    }

    /// Ends a reservation taken by [`reserve_queue`](Self::reserve_queue) (created or not).
    fn release_queue(&self, tenant: &TenantId) {
        let mut counts = self.counts();
        if let Some(n) = counts.creating.get_mut(tenant) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.creating.remove(tenant);
            }
        }
    }
}

/// A queue creation in flight; dropping it ends the reservation (the queue then counts as
/// existing, or was not created).
#[derive(Debug)]
pub(crate) struct QueueReservation<'a> {
    limits: &'a Limits,
    tenant: TenantId,
}

impl Drop for QueueReservation<'_> {
    fn drop(&mut self) {
        self.limits.release_queue(&self.tenant);
    }
}

/// Checks that JSON text nests arrays and objects at most `max` deep, without parsing it
/// (a parser would recurse first). Text that is not JSON passes; the parser reports it.
///
/// # Errors
///
/// `400` naming the limit.
pub(crate) fn check_json_depth(body: &[u8], max: usize) -> Result<(), ApiError> {
    let mut depth = 0usize;
    let mut i = 0;
    while i < body.len() {
        match body[i] {
            b'"' => {
                // Skip the string: jump from one quote or backslash to the next.
                i += 1;
                loop {
                    match memchr::memchr2(b'"', b'\\', &body[i..]) {
                        // Unterminated: the parser reports it.
                        None => return Ok(()),
                        Some(at) if body[i + at] == b'\\' => i += at + 2,
                        Some(at) => {
                            i += at;
                            break;
                        }
                    }
                    if i >= body.len() {
                        return Ok(());
                    }
                }
            }
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return Err(ApiError::bad_request(format!(
                        "invalid JSON: arrays and objects nest deeper than {max} levels"
                    )));
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depth_counts_structure_not_strings() {
        let deep = format!("{}{}", "[".repeat(65), "]".repeat(65));
        assert!(check_json_depth(deep.as_bytes(), 64).is_err());
        let ok = format!("{}{}", "[".repeat(64), "]".repeat(64));
        assert!(check_json_depth(ok.as_bytes(), 64).is_ok());
        let in_string = format!("{{\"a\": \"{}\\\"{}\"}}", "[".repeat(100), "{".repeat(100));
        assert!(check_json_depth(in_string.as_bytes(), 2).is_ok());
        // An escaped backslash ends before the closing quote: the brackets after it count.
        assert!(check_json_depth(br#"["a\\", [[1]]]"#, 2).is_err());
        assert!(check_json_depth(br#"["a\\", [1]]"#, 2).is_ok());
        // Unterminated strings and a trailing backslash pass (the parser reports them).
        assert!(check_json_depth(br#"["abc\"#, 1).is_ok());
        assert!(check_json_depth(br#"["abc"#, 1).is_ok());
        assert!(check_json_depth(br#"[""]"#, 1).is_ok());
    }

    #[test]
    fn stream_slots_are_counted_per_tenant_and_in_total() {
        let limits = Limits::default();
        let a = TenantId::new("a").unwrap();
        let b = TenantId::new("b").unwrap();
        limits.open_stream(&a, 3, 2).unwrap();
        limits.open_stream(&a, 3, 2).unwrap();
        let err = limits.open_stream(&a, 3, 2).unwrap_err();
        assert_eq!(err.status().as_u16(), 429);
        limits.open_stream(&b, 3, 2).unwrap();
        assert!(limits.open_stream(&b, 3, 2).is_err(), "total limit");
        limits.close_stream(&a);
        limits.open_stream(&b, 3, 2).unwrap();
        assert_eq!(limits.open_streams(), 3);
    }
}
