//! A proptest-driven fuzz of event JSON parsing, the code every enqueue body and every stored
//! event goes through: `Event::from_producer_json` (HTTP bodies) and `Event::from_json_bytes`
//! (the stored form). Inputs are near-valid events with random fields and values, mutated
//! valid JSON, and raw bytes. Properties: parsing never panics; whatever parses, validates,
//! renders, and parses back to the same JSON.
//!
//! Bounded for `cargo test` (512 cases per property); `EVENTQUEUE_FUZZ_CASES=200000 cargo test
//! --release --test it http::fuzz` runs longer.

use eventqueue::{Event, ProducerContext, TaskId, TenantId};
use proptest::prelude::*;
use serde_json::{Map, Value, json};

const FIELDS: &[&str] = &[
    "event_id",
    "task_id",
    "tenant_id",
    "timestamp",
    "event_type",
    "offset",
    "state",
    "phase",
    "message",
    "current",
    "total",
    "percentage",
    "step",
    "details",
    "artifact_type",
    "artifact_id",
    "data",
    "is_partial",
    "error_type",
    "error_message",
    "error_code",
    "context",
    "recoverable",
    "result",
    "summary",
    "execution_time_seconds",
    "unknown",
];

fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<u64>().prop_map(|n| json!(n)),
        any::<i64>().prop_map(|n| json!(n)),
        (0u64..200).prop_map(|n| json!(n)),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        prop_oneof![
            Just("status"),
            Just("progress"),
            Just("artifact"),
            Just("error"),
            Just("complete"),
            Just("working"),
            Just("failed"),
            Just("cancelled"),
            Just("2026-11-28T02:31:45.664387Z"),
            Just("evt_0123456789ab"),
            Just("t"),
            Just("acme"),
            Just(""),
            Just(".."),
        ]
        .prop_map(|s| json!(s)),
        ".{0,24}".prop_map(Value::String),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    scalar().prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::btree_map("[a-z]{1,6}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// An object with an `event_type` most of the time and random known (or unknown) fields.
fn event_like() -> impl Strategy<Value = Value> {
    (
        proptest::option::weighted(
            0.9,
            prop_oneof![
                Just("status"),
                Just("progress"),
                Just("artifact"),
                Just("error"),
                Just("complete"),
                Just("other"),
            ],
        ),
        proptest::collection::vec((proptest::sample::select(FIELDS), value()), 0..8),
    )
        .prop_map(|(ty, fields)| {
            let mut map = Map::new();
            for (k, v) in fields {
                map.insert(k.to_string(), v);
            }
            if let Some(ty) = ty {
                map.insert("event_type".into(), json!(ty));
            }
            Value::Object(map)
        })
}

fn valid_events() -> Vec<Value> {
    vec![
        json!({"event_type": "status", "state": "working", "phase": "p", "message": "m"}),
        json!({"event_type": "progress", "current": 1, "total": 4, "step": "s", "details": {"a": [1, {"b": null}]}}),
        json!({"event_type": "artifact", "artifact_type": "report", "data": {"t": "x"}, "is_partial": true}),
        json!({"event_type": "error", "error_type": "E", "error_message": "boom", "recoverable": false}),
        json!({"event_type": "complete", "result": {"ok": true}, "execution_time_seconds": 1.5}),
    ]
}

/// Parsing what `to_json` wrote gives back the same JSON: the same fields and values, with
/// floats equal up to the last digit. (serde_json without its `float_roundtrip` feature may
/// parse a float one unit in the last place off, so `6.337000321959962e-46` can come back as
/// `6.3370003219599624e-46`; the fuzz found it in a `result` object.)
fn assert_round_trip(ev: &Event) {
    ev.validate().expect("a parsed event validates");
    let bytes = ev.to_json();
    let back = Event::from_json_bytes(&bytes)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&bytes)));
    let again = back.to_json();
    let (a, b): (Value, Value) = (
        serde_json::from_slice(&bytes).unwrap(),
        serde_json::from_slice(&again).unwrap(),
    );
    assert!(
        same_json(&a, &b),
        "{}\n!=\n{}",
        String::from_utf8_lossy(&bytes),
        String::from_utf8_lossy(&again)
    );
}

fn same_json(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            if x.is_f64() || y.is_f64() {
                let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
                x == y || (x - y).abs() <= 1e-15 * x.abs().max(y.abs())
            } else {
                x == y
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same_json(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .zip(y)
                    .all(|((kx, vx), (ky, vy))| kx == ky && same_json(vx, vy))
        }
        _ => a == b,
    }
}

/// Cases per property: `EVENTQUEUE_FUZZ_CASES`, default 512.
fn cases() -> u32 {
    std::env::var("EVENTQUEUE_FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(512)
}

fn ctx_ids() -> (TenantId, TaskId) {
    (TenantId::new("acme").unwrap(), TaskId::new("t").unwrap())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn producer_json_never_panics_and_what_parses_round_trips(v in event_like()) {
        let (tenant, task) = ctx_ids();
        let ctx = ProducerContext { tenant_id: &tenant, task_id: &task };
        if let Ok(ev) = Event::from_producer_json(v, &ctx) {
            assert_round_trip(&ev);
        }
    }

    #[test]
    fn stored_json_never_panics(v in event_like(), tenant in value(), task in value()) {
        let mut v = v;
        if let Value::Object(map) = &mut v {
            map.insert("tenant_id".into(), tenant);
            map.insert("task_id".into(), task);
        }
        if let Ok(ev) = Event::from_json_bytes(v.to_string().as_bytes()) {
            assert_round_trip(&ev);
        }
    }

    #[test]
    fn mutated_valid_json_never_panics(
        which in 0..5usize,
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0..3u8), 1..6),
    ) {
        let (tenant, task) = ctx_ids();
        let ctx = ProducerContext { tenant_id: &tenant, task_id: &task };
        let base = Event::from_producer_json(valid_events()[which].clone(), &ctx).unwrap();
        let mut bytes = base.to_json();
        for (at, byte, op) in edits {
            let i = at.index(bytes.len().max(1)).min(bytes.len());
            match op {
                0 if i < bytes.len() => bytes[i] = byte,
                1 => bytes.insert(i, byte),
                _ => bytes.truncate(i),
            }
        }
        if let Ok(ev) = Event::from_json_bytes(&bytes) {
            assert_round_trip(&ev);
        }
        if let Ok(v) = serde_json::from_slice::<Value>(&bytes)
            && let Ok(ev) = Event::from_producer_json(v, &ctx)
        {
            assert_round_trip(&ev);
        }
    }

    #[test]
    fn raw_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = Event::from_json_bytes(&bytes);
    }
}

/// The input the fuzz reduced its one finding to: a float in a free-form object.
#[test]
fn a_float_in_a_free_form_field_round_trips_to_the_last_digit() {
    let (tenant, task) = ctx_ids();
    let ctx = ProducerContext {
        tenant_id: &tenant,
        task_id: &task,
    };
    let v: Value =
        serde_json::from_str(r#"{"event_type":"complete","result":{"a":6.337000321959962e-46}}"#)
            .unwrap();
    assert_round_trip(&Event::from_producer_json(v, &ctx).unwrap());
}

#[test]
fn the_valid_seeds_parse() {
    let (tenant, task) = ctx_ids();
    let ctx = ProducerContext {
        tenant_id: &tenant,
        task_id: &task,
    };
    for v in valid_events() {
        let ev = Event::from_producer_json(v.clone(), &ctx).unwrap_or_else(|e| panic!("{v}: {e}"));
        assert_round_trip(&ev);
    }
}
