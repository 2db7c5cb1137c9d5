//! Validated identifiers: [`TenantId`], [`TaskId`] and [`EventId`].
//!
//! Every id is 1..=128 bytes of `[A-Za-z0-9._:@-]` and does not start with `.`. An id is checked
//! when it is parsed, so an invalid id cannot exist past the boundary: code that holds a `TaskId`
//! never re-validates it. Ids are cheap to clone (`Arc<str>` inside).

use std::fmt;
use std::sync::Arc;

use crate::error::Error;

/// Longest accepted id, in bytes.
pub const MAX_ID_LEN: usize = 128;

/// Checks an id against the contract's rule; `field` names it in the error.
///
/// # Errors
///
/// [`Error::InvalidId`] naming `field` and what is wrong.
pub fn validate_id(field: &'static str, value: &str) -> Result<(), Error> {
    let reason = if value.is_empty() {
        "must not be empty".to_string()
    } else if value.len() > MAX_ID_LEN {
        format!("must be at most {MAX_ID_LEN} bytes (got {})", value.len())
    } else if value.starts_with('.') {
        "must not start with '.'".to_string()
    } else if let Some(c) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '@' | '-')))
    {
        format!("contains {c:?}; allowed are A-Z a-z 0-9 . _ : @ -")
    } else {
        return Ok(());
    };
    Err(Error::InvalidId { field, reason })
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $field:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Arc<str>);

        impl $name {
            /// Parses and validates an id.
            ///
            /// # Errors
            ///
            /// [`Error::InvalidId`] when the id breaks the rule in the module docs.
            pub fn new(value: impl AsRef<str>) -> Result<Self, Error> {
                let value = value.as_ref();
                validate_id($field, value)?;
                Ok(Self(Arc::from(value)))
            }

            /// The id as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&*self.0, f)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl std::str::FromStr for $name {
            type Err = Error;
            fn from_str(s: &str) -> Result<Self, Error> {
                Self::new(s)
            }
        }

        impl TryFrom<&str> for $name {
            type Error = Error;
            fn try_from(s: &str) -> Result<Self, Error> {
                Self::new(s)
            }
        }

        impl TryFrom<String> for $name {
            type Error = Error;
            fn try_from(s: String) -> Result<Self, Error> {
                Self::new(s)
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                Self::new(&*s).map_err(serde::de::Error::custom)
            }
        }
    };
}

id_type!(
    /// A tenant: the unit of isolation. Nothing of one tenant is visible to another.
    TenantId,
    "tenant_id"
);
id_type!(
    /// A task (workflow, ingestion job, …); with the tenant it names one queue.
    TaskId,
    "task_id"
);
id_type!(
    /// An event's id: generated as `evt_` + 12 hex chars, or supplied by the producer for
    /// idempotent retries.
    EventId,
    "event_id"
);

impl EventId {
    /// A fresh random id, `evt_` followed by 12 lowercase hex characters.
    pub fn generate() -> Self {
        // Written in place: this runs for every event a producer sends without an id, and
        // `format!` took three allocations where the `Arc` alone needs one.
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut id = *b"evt_000000000000";
        let mut n = fastrand::u64(..1 << 48);
        for c in id[4..].iter_mut().rev() {
            *c = HEX[(n & 0xf) as usize];
            n >>= 4;
        }
        // Only ASCII was written.
        Self(Arc::from(
            std::str::from_utf8(&id).unwrap_or("evt_000000000000"),
        ))
    }
}

impl TenantId {
    /// The tenant used in open mode when a request names none: `default`.
    pub fn default_tenant() -> Self {
        // Shared: open mode names it on every request that gives no tenant.
        static DEFAULT: std::sync::LazyLock<TenantId> =
            std::sync::LazyLock::new(|| TenantId(Arc::from("default")));
        DEFAULT.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_allowed_alphabet() {
        for ok in ["a", "workflow_123", "A.b:c@d-e_f", &"x".repeat(128), "a."] {
            assert!(TaskId::new(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn rejects_bad_ids_naming_the_field() {
        for bad in ["", ".hidden", "a/b", "a b", "é", &"x".repeat(129), "a\n"] {
            let err = TaskId::new(bad).unwrap_err();
            assert!(err.to_string().contains("task_id"), "{err}");
        }
        let err = TenantId::new("x/y").unwrap_err();
        assert!(err.to_string().contains("tenant_id"), "{err}");
    }

    #[test]
    fn generated_event_ids_have_the_seed_shape() {
        let id = EventId::generate();
        let s = id.as_str();
        assert_eq!(s.len(), 16);
        assert!(s.starts_with("evt_"));
        assert!(
            s[4..]
                .chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        assert_ne!(EventId::generate(), EventId::generate());
        // Every hex position is random (48 bits), not only the low ones.
        let ids: Vec<EventId> = (0..64).map(|_| EventId::generate()).collect();
        for at in 4..16 {
            let first = ids[0].as_str().as_bytes()[at];
            assert!(
                ids.iter().any(|id| id.as_str().as_bytes()[at] != first),
                "position {at} never changes"
            );
        }
    }
}
