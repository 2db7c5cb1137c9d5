//! Model-based property test: random create / enqueue (with repeated ids) / close / delete /
//! subscribe-at-offset / reopen sequences against a `BTreeMap` reference model.

use std::collections::BTreeMap;

use eventqueue::{Config, Delivery, Error, EventId, QueueManager};
use proptest::prelude::*;

use super::*;

#[derive(Debug, Clone)]
enum Op {
    Create {
        q: usize,
        max: u64,
    },
    Enqueue {
        q: usize,
        n: usize,
        reuse: Option<usize>,
    },
    Close {
        q: usize,
    },
    Delete {
        q: usize,
    },
    Subscribe {
        q: usize,
        from: u64,
    },
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (0..3usize, 1..6u64).prop_map(|(q, max)| Op::Create { q, max }),
        6 => (0..3usize, 1..4usize, proptest::option::of(0..12usize))
            .prop_map(|(q, n, reuse)| Op::Enqueue { q, n, reuse }),
        1 => (0..3usize).prop_map(|q| Op::Close { q }),
        1 => (0..3usize).prop_map(|q| Op::Delete { q }),
        3 => (0..3usize, 0..14u64).prop_map(|(q, from)| Op::Subscribe { q, from }),
        1 => Just(Op::Reopen),
    ]
}

#[derive(Debug, Default)]
struct ModelQueue {
    /// Retained (offset, event id).
    retained: Vec<(u64, String)>,
    next: u64,
    max: u64,
    closed: bool,
    /// Every id ever used in this queue, to pick retries from.
    used: Vec<String>,
}

impl ModelQueue {
    fn first(&self) -> u64 {
        self.retained.first().map_or(self.next, |e| e.0)
    }
}

/// Runs `ops` against a manager that writes pending batches into redb once they hold
/// `apply_bytes` (small values mix batches served from memory and from redb in every step).
async fn run(ops: Vec<Op>, apply_bytes: usize) {
    let dir = tempfile::tempdir().unwrap();
    let t = tenant("t");
    let names = [task("q0"), task("q1"), task("q2")];
    let open = |dir: std::path::PathBuf| async move {
        QueueManager::open(Config {
            apply_bytes,
            ..config(&dir)
        })
        .await
        .unwrap()
    };
    let mut m = open(dir.path().to_path_buf()).await;
    let mut model: BTreeMap<usize, ModelQueue> = BTreeMap::new();
    let mut serial = 0u64;
    for op in ops {
        match op {
            Op::Create { q, max } => {
                let r = m.create_queue(&t, &names[q], with_buffer(max)).await;
                match model.get(&q) {
                    Some(_) => assert!(matches!(r, Err(Error::QueueExists { .. }))),
                    None => {
                        r.unwrap();
                        model.insert(
                            q,
                            ModelQueue {
                                max,
                                ..Default::default()
                            },
                        );
                    }
                }
            }
            Op::Enqueue { q, n, reuse } => {
                let Some(handle) = m.get_queue(&t, &names[q]) else {
                    assert!(!model.contains_key(&q));
                    continue;
                };
                let mq = model.get_mut(&q).unwrap();
                let mut events = Vec::new();
                let mut ids = Vec::new();
                for i in 0..n {
                    let id = match reuse {
                        Some(r) if i == 0 && !mq.used.is_empty() => {
                            mq.used[r % mq.used.len()].clone()
                        }
                        _ => {
                            serial += 1;
                            format!("e{serial}")
                        }
                    };
                    ids.push(id.clone());
                    events.push(
                        phase(&t, &names[q], serial).with_event_id(EventId::new(&id).unwrap()),
                    );
                }
                let r = handle.enqueue_batch(events).await;
                if mq.closed {
                    assert!(matches!(r, Err(Error::QueueClosed { .. })));
                    continue;
                }
                let got = r.unwrap();
                let mut want = Vec::new();
                for id in ids {
                    if let Some((o, _)) = mq.retained.iter().find(|(_, i)| *i == id) {
                        want.push(*o);
                    } else {
                        mq.retained.push((mq.next, id.clone()));
                        mq.used.push(id);
                        want.push(mq.next);
                        mq.next += 1;
                    }
                }
                let excess = mq.retained.len().saturating_sub(mq.max as usize);
                mq.retained.drain(..excess);
                assert_eq!(got, want);
                assert_eq!(handle.latest_offset(), mq.next);
                assert_eq!(handle.first_offset(), mq.first());
            }
            Op::Close { q } => {
                let existed = m.close_queue(&t, &names[q]).await.unwrap();
                assert_eq!(existed, model.contains_key(&q));
                if let Some(mq) = model.get_mut(&q) {
                    mq.closed = true;
                }
            }
            Op::Delete { q } => {
                let existed = m.delete_queue(&t, &names[q]).await.unwrap();
                assert_eq!(existed, model.remove(&q).is_some());
            }
            Op::Subscribe { q, from } => {
                let Some(handle) = m.get_queue(&t, &names[q]) else {
                    assert!(!model.contains_key(&q));
                    continue;
                };
                let mq = &model[&q];
                let mut want: Vec<Delivery> = Vec::new();
                let first = mq.first();
                let owed: Vec<&(u64, String)> =
                    mq.retained.iter().filter(|(o, _)| *o >= from).collect();
                if from < first && from < mq.next {
                    want.push(Delivery::Gap {
                        requested_offset: from,
                        first_available_offset: first,
                    });
                }
                let mut sub = handle.subscribe(from).unwrap();
                let mut got = Vec::new();
                for _ in 0..want.len() + owed.len() {
                    got.push(next(&mut sub).await.unwrap());
                }
                let got_ids: Vec<(u64, String)> = got
                    .iter()
                    .filter_map(|d| d.as_event())
                    .map(|e| (e.offset(), e.event().unwrap().event_id.to_string()))
                    .collect();
                let want_ids: Vec<(u64, String)> = owed.into_iter().cloned().collect();
                assert_eq!(got_ids, want_ids);
                let gaps: Vec<&Delivery> = got.iter().filter(|d| d.as_event().is_none()).collect();
                assert_eq!(gaps, want.iter().collect::<Vec<_>>());
                if mq.closed {
                    assert!(next(&mut sub).await.is_none(), "closed queue's stream ends");
                }
            }
            // A store that does not persist has nothing to reopen: the model goes on as is.
            Op::Reopen if !persists() => {}
            Op::Reopen => {
                m.shutdown().await.unwrap();
                m = open(dir.path().to_path_buf()).await;
            }
        }
    }
    m.shutdown().await.unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
    #[test]
    fn store_matches_the_model(
        ops in proptest::collection::vec(op(), 1..40),
        apply_bytes in prop_oneof![Just(1usize), 1..2048usize, Just(4usize << 20)],
    ) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(run(ops, apply_bytes));
    }
}

#[tokio::test]
async fn reopen_in_the_middle_of_history_keeps_the_model() {
    // A fixed sequence that exercises trim + reopen + gap, independent of random search.
    let ops = vec![
        Op::Create { q: 0, max: 2 },
        Op::Enqueue {
            q: 0,
            n: 3,
            reuse: None,
        },
        Op::Reopen,
        Op::Enqueue {
            q: 0,
            n: 1,
            reuse: Some(0),
        },
        Op::Subscribe { q: 0, from: 0 },
        Op::Close { q: 0 },
        Op::Subscribe { q: 0, from: 2 },
    ];
    // Everything still in memory, everything in redb, and a mix.
    for apply_bytes in [4 << 20, 1, 300] {
        run(ops.clone(), apply_bytes).await;
    }
}
