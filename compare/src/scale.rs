//! `--scale`: the measurements of issue 21, in one run.
//!
//! 1. **eventqueue on Redis against Redis used directly**, every Redis with AOF
//!    `appendfsync always`: Redis Streams (the `redis_peer` workloads), eventqueue with
//!    `--storage redis://…` on one node, and on two nodes over one Redis (throughput clients
//!    and fan-out subscribers alternate between the nodes; the publisher writes to the first,
//!    the replay reads from the second). The two eventqueue installs share one Redis server
//!    under two key prefixes, apart from the direct peer's Redis; all run side by side and each
//!    workload runs on the three in turn, as in the main sections.
//! 2. **The memory backend against redb**: eventqueue `--storage memory` beside
//!    `--storage redb` in `immediate` and `buffered` durability, every workload.
//!
//! The report is markdown of its own (two tables and the goals of issue 21), printed to
//! stdout.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};

use crate::drive::{CLIENTS, DEPTH, Measure, Plan};
use crate::report::{ms, rate};
use crate::servers::Server;
use crate::{Workload, eq_peer, redis_peer, say};

/// One configuration of a section.
enum Peer {
    Redis(redis_peer::Redis),
    Eventqueue(eq_peer::Eventqueue),
}

impl Peer {
    async fn run(&self, w: Workload, plan: &Plan) -> Result<Measure> {
        match (self, w) {
            (Peer::Redis(r), Workload::Sequential1) => r.sequential(plan, 1).await,
            (Peer::Redis(r), Workload::Sequential8) => r.sequential(plan, CLIENTS).await,
            (
                Peer::Redis(r),
                Workload::InFlight8x16
                | Workload::Batch8x16
                | Workload::Ws8x16
                | Workload::Coalesced8x16,
            ) => r.pipelined(plan).await,
            (Peer::Redis(r), Workload::Replay) => r.replay(plan.replay_events).await,
            (Peer::Redis(r), Workload::Fanout100) => r.fanout(plan, 100).await,
            (Peer::Redis(r), Workload::Fanout1000) => r.fanout(plan, 1000).await,
            (Peer::Eventqueue(e), Workload::Sequential1) => e.requests(plan, 1, 1).await,
            (Peer::Eventqueue(e), Workload::Sequential8) => e.requests(plan, CLIENTS, 1).await,
            (Peer::Eventqueue(e), Workload::InFlight8x16) => e.requests(plan, CLIENTS, DEPTH).await,
            (Peer::Eventqueue(e), Workload::Batch8x16) => e.batches(plan).await,
            (Peer::Eventqueue(e), Workload::Ws8x16) => e.websockets(plan).await,
            (Peer::Eventqueue(e), Workload::Coalesced8x16) => e.coalesced(plan).await,
            (Peer::Eventqueue(e), Workload::Replay) => e.replay(plan.replay_events).await,
            (Peer::Eventqueue(e), Workload::Fanout100) => e.fanout(plan, 100).await,
            (Peer::Eventqueue(e), Workload::Fanout1000) => e.fanout(plan, 1000).await,
        }
    }
}

/// A column of a section: its label, its servers (stopped at the end), its peer.
struct Column {
    label: String,
    servers: Vec<Server>,
    peer: Option<Peer>,
    /// Each workload's outcome, and whether the raw floor was throttled just before or
    /// after it (p50 above 1 ms).
    cells: Vec<(Workload, Result<Measure, String>, bool)>,
}

impl Column {
    fn cell(&self, w: Workload) -> Option<&Measure> {
        self.cells
            .iter()
            .find(|(x, _, _)| *x == w)
            .and_then(|(_, r, _)| r.as_ref().ok())
    }
}

/// Runs both sections and returns the report.
/// `sections`: `redis`, `memory` or both (`None`); `workloads`: the rows to run (`None`: all
/// of the section's), named as `--workloads` names them.
pub async fn run(
    bin: &Path,
    redis_bin: &Path,
    plan: &Plan,
    work: &Path,
    sections: Option<&[String]>,
    workloads: Option<&[String]>,
) -> Result<String> {
    let wanted = |w: &Workload| {
        workloads.is_none_or(|list| {
            let name = serde_json::to_value(w).ok();
            list.iter()
                .any(|l| name.as_ref().and_then(|n| n.as_str()) == Some(l.as_str()))
        })
    };
    let section = |name: &str| sections.is_none_or(|s| s.iter().any(|x| x == name));
    let mut out = String::new();
    if section("redis") {
        let rows: Vec<Workload> = [
            Workload::Sequential1,
            Workload::Sequential8,
            Workload::Batch8x16,
            Workload::Replay,
            Workload::Fanout1000,
        ]
        .into_iter()
        .filter(wanted)
        .collect();
        let columns = redis_section(bin, redis_bin, work).await?;
        let columns = measure(columns, &rows, plan, work, |_| 1).await;
        write_redis(&mut out, &columns, &rows);
        stop(columns);
    }
    if section("memory") {
        let rows: Vec<Workload> = crate::WORKLOADS.into_iter().filter(wanted).collect();
        let columns = memory_section(bin, work).await?;
        let columns = measure(columns, &rows, plan, work, memory_rounds).await;
        write_memory(&mut out, &columns, &rows);
        stop(columns);
    }
    Ok(out)
}

fn dir(work: &Path, name: &str) -> Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix(name)
        .tempdir_in(work)
        .context("making a temporary data directory")
}

async fn redis_section(bin: &Path, redis_bin: &Path, work: &Path) -> Result<Vec<Column>> {
    // The directories live as long as the run: leaked into `work`, which the caller removes.
    let direct_dir = dir(work, "scale-redis-")?.keep();
    let (direct_srv, direct) = redis_peer::start(redis_bin, &direct_dir, "always")?;
    let store_dir = dir(work, "scale-store-")?.keep();
    let (store_srv, _) = redis_peer::start(redis_bin, &store_dir, "always")?;
    let url = |prefix: &str| format!("redis://{}/?prefix={prefix}", store_srv.addr);

    let one_url = url("one:");
    let one_dir = dir(work, "scale-one-")?.keep();
    say("starting eventqueue on Redis, 1 node");
    let (one_srv, one) = eq_peer::start_with(
        bin,
        &one_dir,
        "eventqueue (redis, 1 node)",
        &["--storage", &one_url],
        true,
    )
    .await?;

    let two_url = url("two:");
    say("starting eventqueue on Redis, 2 nodes");
    let a_dir = dir(work, "scale-two-a-")?.keep();
    let (a_srv, a) = eq_peer::start_with(
        bin,
        &a_dir,
        "eventqueue (redis, node A)",
        &["--storage", &two_url],
        true,
    )
    .await?;
    let b_dir = dir(work, "scale-two-b-")?.keep();
    let (b_srv, b) = eq_peer::start_with(
        bin,
        &b_dir,
        "eventqueue (redis, node B)",
        &["--storage", &two_url],
        false,
    )
    .await?;
    let two = a.and_node(&b);
    Ok(vec![
        Column {
            label: "Redis `always`".into(),
            servers: vec![direct_srv],
            peer: Some(Peer::Redis(direct)),
            cells: Vec::new(),
        },
        Column {
            label: "eventqueue on Redis, 1 node".into(),
            servers: vec![one_srv],
            peer: Some(Peer::Eventqueue(one)),
            cells: Vec::new(),
        },
        Column {
            label: "eventqueue on Redis, 2 nodes".into(),
            servers: vec![a_srv, b_srv, store_srv],
            peer: Some(Peer::Eventqueue(two)),
            cells: Vec::new(),
        },
    ])
}

async fn memory_section(bin: &Path, work: &Path) -> Result<Vec<Column>> {
    let mut columns = Vec::new();
    for (label, flags) in [
        (
            "redb `immediate`",
            ["--storage", "redb", "--durability", "immediate"],
        ),
        (
            "redb `buffered`",
            ["--storage", "redb", "--durability", "buffered"],
        ),
        (
            "memory",
            ["--storage", "memory", "--durability", "immediate"],
        ),
    ] {
        say(&format!("starting eventqueue ({})", label.replace('`', "")));
        let d = dir(work, "scale-mem-")?.keep();
        let (srv, eq) = eq_peer::start_with(bin, &d, label, &flags, true).await?;
        columns.push(Column {
            label: format!("eventqueue {label}"),
            servers: vec![srv],
            peer: Some(Peer::Eventqueue(eq)),
            cells: Vec::new(),
        });
    }
    Ok(columns)
}

/// Rounds per workload in the memory section: the fan-out p99s three times, the rest once.
fn memory_rounds(w: Workload) -> usize {
    match w {
        Workload::Fanout100 | Workload::Fanout1000 => FANOUT_ROUNDS,
        _ => 1,
    }
}

/// How many times the memory section measures each fan-out row per column.
const FANOUT_ROUNDS: usize = 3;

/// Each workload on each column in turn; `rounds(w)` times for workload `w`.
///
/// With several rounds, each round starts at the next column (so no column always runs
/// first or last, right after a neighbour's load), and a column keeps its median round: by
/// p99 for the latency rows, by events/s for the others. A single fan-out p99 on this
/// shared machine swings 2–4× between identical servers run back to back, too much to
/// compare two backends on one sample each.
async fn measure(
    mut columns: Vec<Column>,
    rows: &[Workload],
    plan: &Plan,
    work: &Path,
    rounds: impl Fn(Workload) -> usize,
) -> Vec<Column> {
    for &w in rows {
        let n = columns.len();
        let rounds = rounds(w).max(1);
        let mut taken: Vec<Vec<(Result<Measure, String>, bool)>> =
            (0..n).map(|_| Vec::new()).collect();
        for round in 0..rounds {
            for k in 0..n {
                let i = (round + k) % n;
                if let Some(outcome) = measure_cell(&mut columns[i], w, plan, work).await {
                    taken[i].push(outcome);
                }
            }
        }
        for (c, outcomes) in columns.iter_mut().zip(taken) {
            if let Some((result, throttled)) = median(w, outcomes) {
                c.cells.push((w, result, throttled));
            }
        }
    }
    columns
}

/// One workload on one column: its outcome and whether the disk was throttled around it;
/// `None` when the column's servers are gone.
async fn measure_cell(
    c: &mut Column,
    w: Workload,
    plan: &Plan,
    work: &Path,
) -> Option<(Result<Measure, String>, bool)> {
    let throttled = |f: Result<crate::servers::Floor>| f.is_ok_and(|f| f.throttled);
    let peer = c.peer.as_ref()?;
    let before = throttled(crate::floor(work, plan.floor_samples_per_cell).await);
    // Server CPU per event where one process serves the column (not for several
    // nodes, whose Redis is not theirs alone either).
    let watched = c.servers.len() == 1;
    crate::drive::watch_server_cpu(if watched { c.servers[0].pid() } else { 0 });
    let mut result = peer.run(w, plan).await.map_err(|e| format!("{e:#}"));
    if watched
        && let Ok(m) = &mut result
        && let Some(cpu) = crate::drive::window_cpu_secs().await
        && m.events > 0
    {
        m.server_cpu_us_per_event = Some(cpu * 1e6 / m.events as f64);
    }
    let after = throttled(crate::floor(work, plan.floor_samples_per_cell).await);
    match &result {
        Ok(m) => say(&format!(
            "{:<34} {:<12} {}{}",
            c.label.replace('`', ""),
            format!("{w:?}"),
            crate::report::brief(m),
            if before || after {
                " (disk throttled)"
            } else {
                ""
            }
        )),
        Err(e) => say(&format!("{} {w:?} failed: {e}", c.label)),
    }
    if result.is_err() && !c.servers.iter_mut().all(Server::is_running) {
        c.peer = None;
    }
    Some((result, before || after))
}

/// A column's median round of workload `w` (a failed round counts as the worst); the
/// throttle mark if any round was throttled.
fn median(
    w: Workload,
    mut outcomes: Vec<(Result<Measure, String>, bool)>,
) -> Option<(Result<Measure, String>, bool)> {
    let throttled = outcomes.iter().any(|(_, t)| *t);
    let latency = matches!(w, Workload::Fanout100 | Workload::Fanout1000);
    // Sorted best first; failures last.
    let key = |r: &Result<Measure, String>| match r {
        Ok(m) if latency => m.p99_ms.unwrap_or(f64::INFINITY),
        Ok(m) => -m.events_per_s,
        Err(_) => f64::INFINITY,
    };
    outcomes.sort_by(|a, b| key(&a.0).total_cmp(&key(&b.0)));
    let mid = outcomes.len().checked_sub(1)? / 2;
    let (result, _) = outcomes.into_iter().nth(mid)?;
    Some((result, throttled))
}

fn stop(columns: Vec<Column>) {
    for c in columns {
        for s in c.servers {
            let _ = s.stop();
        }
    }
}

fn label(w: Workload, plan_events: Option<u64>) -> String {
    match w {
        Workload::Sequential1 => "1 client sequential".into(),
        Workload::Sequential8 => "8 clients sequential".into(),
        Workload::InFlight8x16 => "8 clients × 16 one-event requests in flight".into(),
        Workload::Batch8x16 => "8 clients × batches of 16 (Redis: pipelines of 16)".into(),
        Workload::Ws8x16 => "8 WebSocket producers × 16 frames in flight".into(),
        Workload::Coalesced8x16 => "8 clients × 16 in flight, coalesced".into(),
        Workload::Replay => format!(
            "replay {}k events (Redis: XRANGE; eventqueue: SSE)",
            plan_events.unwrap_or(0) / 1000
        ),
        Workload::Fanout100 => "fan-out 1 → 100 at 100 events/s".into(),
        Workload::Fanout1000 => "fan-out 1 → 100 at 1000 events/s".into(),
    }
}

fn cell(c: &Column, w: Workload) -> String {
    let Some((_, result, throttled)) = c.cells.iter().find(|(x, _, _)| *x == w) else {
        return "–".into();
    };
    let mark = if *throttled { " †" } else { "" };
    let text = match result {
        Err(e) => format!("failed: {}", e.lines().next().unwrap_or("")),
        Ok(m) => match (m.p50_ms, m.lost) {
            (_, Some(lost)) => format!(
                "p50 {} · p99 {} ms · lost {lost}",
                ms(m.p50_ms),
                ms(m.p99_ms)
            ),
            (Some(_), None) => format!(
                "{}/s · p50 {} · p99 {} ms{}",
                rate(m.events_per_s),
                ms(m.p50_ms),
                ms(m.p99_ms),
                m.server_cpu_us_per_event
                    .map(|us| format!(" · {us:.0} µs CPU/ev"))
                    .unwrap_or_default()
            ),
            (None, None) => format!("{}/s", rate(m.events_per_s)),
        },
    };
    text + mark
}

/// `a` ÷ `b` for the row's main figure: events/s, or the p99 for fan-out (and the p50 for
/// one client, whose latency is the point).
fn ratio(a: Option<&Measure>, b: Option<&Measure>, w: Workload) -> Option<f64> {
    let (a, b) = (a?, b?);
    let r = match w {
        Workload::Fanout100 | Workload::Fanout1000 => a.p99_ms? / b.p99_ms?,
        Workload::Sequential1 => a.p50_ms? / b.p50_ms?,
        _ => a.events_per_s / b.events_per_s,
    };
    r.is_finite().then_some(r)
}

fn x(r: Option<f64>, w: Workload) -> String {
    let what = match w {
        Workload::Fanout100 | Workload::Fanout1000 => "p99 ",
        Workload::Sequential1 => "p50 ",
        _ => "",
    };
    r.map(|r| format!("{what}{r:.2}×"))
        .unwrap_or_else(|| "–".into())
}

fn replay_events(columns: &[Column]) -> Option<u64> {
    columns
        .iter()
        .find_map(|c| c.cell(Workload::Replay))
        .map(|m| m.events)
}

fn write_redis(out: &mut String, columns: &[Column], rows: &[Workload]) {
    let n = replay_events(columns);
    let _ = writeln!(
        out,
        "#### eventqueue on Redis against Redis used directly (AOF `appendfsync always` everywhere)\n"
    );
    let _ = writeln!(
        out,
        "| workload | {} | {} | {} | 1 node ÷ Redis | 2 nodes ÷ Redis |",
        columns[0].label, columns[1].label, columns[2].label
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|");
    for &w in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} |",
            label(w, n),
            cell(&columns[0], w),
            cell(&columns[1], w),
            cell(&columns[2], w),
            x(ratio(columns[1].cell(w), columns[0].cell(w), w), w),
            x(ratio(columns[2].cell(w), columns[0].cell(w), w), w),
        );
    }
    let _ = writeln!(out, "\nGoals of issue 21 (same run):\n");
    let goal = |out: &mut String, what: &str, w: Workload, col: usize, ok: &dyn Fn(f64) -> bool| {
        let r = ratio(columns[col].cell(w), columns[0].cell(w), w);
        let verdict = match r {
            Some(r) if ok(r) => "met",
            Some(_) => "**missed**",
            None => "not measured",
        };
        let _ = writeln!(out, "- {what}: {} — {verdict}", x(r, w));
    };
    for (col, nodes) in [(1, "1 node"), (2, "2 nodes")] {
        goal(
            out,
            &format!("{nodes}: 8 × batches of 16 ≥ 0.5 × Redis pipelined XADD"),
            Workload::Batch8x16,
            col,
            &|r| r >= 0.5,
        );
        goal(
            out,
            &format!("{nodes}: 1 client sequential p50 ≤ 2 × Redis XADD"),
            Workload::Sequential1,
            col,
            &|r| r <= 2.0,
        );
        goal(
            out,
            &format!("{nodes}: replay over SSE ≥ 1 × XRANGE"),
            Workload::Replay,
            col,
            &|r| r >= 1.0,
        );
    }
    goal(
        out,
        "2 nodes (subscribers split): fan-out 1000/s p99 ≤ 2 × Redis XREAD BLOCK",
        Workload::Fanout1000,
        2,
        &|r| r <= 2.0,
    );
    let lost = columns[2].cell(Workload::Fanout1000).and_then(|m| m.lost);
    let _ = writeln!(
        out,
        "- 2 nodes: fan-out nothing lost: {} — {}\n",
        lost.map_or("–".into(), |l| l.to_string()),
        match lost {
            Some(0) => "met",
            Some(_) => "**missed**",
            None => "not measured",
        }
    );
}

fn write_memory(out: &mut String, columns: &[Column], rows: &[Workload]) {
    let n = replay_events(columns);
    let _ = writeln!(out, "#### The memory backend against redb\n");
    let _ = writeln!(
        out,
        "| workload | {} | {} | {} | memory ÷ `immediate` | memory ÷ `buffered` |",
        columns[0].label, columns[1].label, columns[2].label
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|");
    let mut slower = Vec::new();
    for &w in rows {
        let vs_immediate = ratio(columns[2].cell(w), columns[0].cell(w), w);
        let vs_buffered = ratio(columns[2].cell(w), columns[1].cell(w), w);
        // Events/s: above 1 is better; latencies: below 1.
        let worse = |r: Option<f64>| match w {
            Workload::Fanout100 | Workload::Fanout1000 | Workload::Sequential1 => {
                r.is_some_and(|r| r > 1.0)
            }
            _ => r.is_some_and(|r| r < 1.0),
        };
        if worse(vs_immediate) || worse(vs_buffered) {
            slower.push(label(w, n));
        } else if columns.iter().take(3).any(|c| c.cell(w).is_none()) {
            slower.push(format!("{} (not measured)", label(w, n)));
        }
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} |",
            label(w, n),
            cell(&columns[0], w),
            cell(&columns[1], w),
            cell(&columns[2], w),
            x(vs_immediate, w),
            x(vs_buffered, w),
        );
    }
    let _ = writeln!(
        out,
        "\nGoal of issue 21: memory not slower than redb anywhere — {}\n\nThe fan-out rows \
         show each column's median p99 of {FANOUT_ROUNDS} rounds, each round starting at the \
         next column. † the disk was throttled (raw fdatasync p50 above 1 ms) just before or \
         after this cell.\n",
        if slower.is_empty() {
            "met".to_string()
        } else {
            format!("**missed** in: {}", slower.join("; "))
        }
    );
}
