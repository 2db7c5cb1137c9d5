//! The markdown report, the JSON object, ratios and the targets of issue 7.

use std::fmt::Write;

use serde::Serialize;
use serde_json::{Value, json};

use crate::drive::Measure;
use crate::{Kind, Run, SystemRun, WORKLOADS, Workload};

pub(crate) fn rate(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

pub(crate) fn ms(v: Option<f64>) -> String {
    match v {
        Some(v) if v >= 10.0 => format!("{v:.0}"),
        Some(v) if v >= 1.0 => format!("{v:.1}"),
        Some(v) => format!("{v:.2}"),
        None => "—".into(),
    }
}

/// One line for the progress log.
pub fn brief(m: &Measure) -> String {
    match (m.p50_ms, m.lost) {
        (_, Some(lost)) => format!(
            "p50 {} ms, p99 {} ms, {} deliveries, {lost} lost",
            ms(m.p50_ms),
            ms(m.p99_ms),
            m.events
        ),
        (Some(_), None) => format!(
            "{} events/s, ack p50 {} ms, p99 {} ms",
            rate(m.events_per_s),
            ms(m.p50_ms),
            ms(m.p99_ms)
        ),
        (None, None) => format!("{} events/s", rate(m.events_per_s)),
    }
}

fn label(w: Workload, run: &Run) -> String {
    match w {
        Workload::Sequential1 => "1 client sequential".into(),
        Workload::Sequential8 => "8 clients sequential".into(),
        Workload::InFlight8x16 => "8 clients × 16 in flight ¹".into(),
        Workload::Batch8x16 => "8 clients × batches of 16 ²".into(),
        Workload::Ws8x16 => "8 clients × 16 in flight on a WebSocket ⁴".into(),
        Workload::Coalesced8x16 => "8 clients × 16 in flight, coalesced ⁵".into(),
        Workload::Replay => format!(
            "replay {}k events of one stream",
            run.plan.replay_events / 1000
        ),
        Workload::Fanout100 => format!("fan-out 1 → {} at 100 events/s", run.plan.subscribers),
        Workload::Fanout1000 => format!("fan-out 1 → {} at 1000 events/s", run.plan.subscribers),
    }
}

fn cell(w: Workload, s: &SystemRun, run: &Run) -> String {
    if !w.applies_to(s.system.kind) {
        return "—".into();
    }
    let Some(o) = s.outcome(w) else {
        return if s.error.is_some() {
            "failed ³".into()
        } else {
            "—".into()
        };
    };
    let Some(m) = &o.measure else {
        return "failed ³".into();
    };
    let text = match w {
        Workload::Replay if m.events != run.plan.replay_events => format!(
            "{}/s ({} events: filling stopped at {} s)",
            rate(m.events_per_s),
            m.events,
            run.plan.replay_fill_limit.as_secs()
        ),
        Workload::Replay => format!("{}/s", rate(m.events_per_s)),
        Workload::Fanout100 | Workload::Fanout1000 => format!(
            "p50 {} · p99 {} ms · lost {}",
            ms(m.p50_ms),
            ms(m.p99_ms),
            m.lost.unwrap_or(0)
        ),
        _ => format!(
            "{}/s · p50 {} · p99 {} ms",
            rate(m.events_per_s),
            ms(m.p50_ms),
            ms(m.p99_ms)
        ),
    };
    if o.throttled() {
        format!("{text} †")
    } else {
        text
    }
}

/// eventqueue ÷ peer for one workload.
#[derive(Serialize)]
struct Ratio {
    durable: bool,
    workload: Workload,
    peer: Kind,
    /// The peer's workload compared with (the batch row compares with the peers' 8 × 16).
    peer_workload: Workload,
    events_per_s: Option<f64>,
    p50: Option<f64>,
    p99: Option<f64>,
    /// Server CPU per acknowledged event.
    cpu: Option<f64>,
    /// The two cells ran in different disk states (one throttled): the ratio says little.
    disk_states_differ: bool,
}

fn div(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

fn ratio(w: Workload, eq: &SystemRun, peer: &SystemRun) -> Option<Ratio> {
    let pw = w.peer_workload();
    let (eo, po) = (eq.outcome(w)?, peer.outcome(pw)?);
    let (e, p) = (eo.measure.as_ref()?, po.measure.as_ref()?);
    let is_fanout = matches!(w, Workload::Fanout100 | Workload::Fanout1000);
    Some(Ratio {
        durable: eq.system.durable,
        workload: w,
        peer: peer.system.kind,
        peer_workload: pw,
        events_per_s: (!is_fanout)
            .then(|| div(Some(e.events_per_s), Some(p.events_per_s)))
            .flatten(),
        p50: div(e.p50_ms, p.p50_ms),
        p99: div(e.p99_ms, p.p99_ms),
        cpu: div(e.server_cpu_us_per_event, p.server_cpu_us_per_event),
        disk_states_differ: eo.throttled() != po.throttled(),
    })
}

fn x(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.2}×")).unwrap_or_else(|| "—".into())
}

fn ratio_cell(r: Option<Ratio>) -> String {
    let Some(r) = r else { return "—".into() };
    let text = match r.workload {
        Workload::Sequential1 => format!("{} · p50 {}", x(r.events_per_s), x(r.p50)),
        Workload::Fanout100 | Workload::Fanout1000 => format!("p99 {}", x(r.p99)),
        _ => x(r.events_per_s),
    };
    if r.disk_states_differ {
        format!("{text} ‡")
    } else {
        text
    }
}

fn find(run: &Run, kind: Kind, durable: bool) -> Option<&SystemRun> {
    run.systems
        .iter()
        .find(|s| s.system.kind == kind && s.system.durable == durable)
}

/// The targets of issue 7, checked on the durable rows.
#[derive(Serialize)]
struct Target {
    what: &'static str,
    value: Option<f64>,
    /// `>=` or `<=` this.
    bound: f64,
    at_least: bool,
    met: Option<bool>,
    /// The compared cells ran in different disk states.
    disk_states_differ: bool,
}

fn targets(run: &Run) -> Vec<Target> {
    let (Some(eq), redis, nats) = (
        find(run, Kind::Eventqueue, true),
        find(run, Kind::Redis, true),
        find(run, Kind::Nats, true),
    ) else {
        return Vec::new();
    };
    let r = |w: Workload, peer: Option<&SystemRun>| peer.and_then(|p| ratio(w, eq, p));
    let mut out = Vec::new();
    let mut push = |what, r: Option<Ratio>, pick: fn(&Ratio) -> Option<f64>, bound, at_least| {
        let value = r.as_ref().and_then(pick);
        let met = value.map(|v| if at_least { v >= bound } else { v <= bound });
        out.push(Target {
            what,
            value,
            bound,
            at_least,
            met,
            disk_states_differ: r.is_some_and(|r| r.disk_states_differ),
        });
    };
    push(
        "8 × 16 (eventqueue batches of 16) events/s ≥ 1.5 × Redis `always`",
        r(Workload::Batch8x16, redis),
        |r| r.events_per_s,
        1.5,
        true,
    );
    push(
        "8 × 16 (eventqueue batches of 16) events/s ≥ 10 × NATS `always`",
        r(Workload::Batch8x16, nats),
        |r| r.events_per_s,
        10.0,
        true,
    );
    push(
        "8 clients sequential events/s ≥ 1 × Redis `always`",
        r(Workload::Sequential8, redis),
        |r| r.events_per_s,
        1.0,
        true,
    );
    push(
        "1 client sequential ack p50 ≤ 1.5 × Redis `always`",
        r(Workload::Sequential1, redis),
        |r| r.p50,
        1.5,
        false,
    );
    push(
        "replay events/s ≥ 2 × Redis XRANGE",
        r(Workload::Replay, redis),
        |r| r.events_per_s,
        2.0,
        true,
    );
    push(
        "fan-out at 1000 events/s p99 ≤ 1 × Redis `always`",
        r(Workload::Fanout1000, redis),
        |r| r.p99,
        1.0,
        false,
    );
    let lost = eq.measure(Workload::Fanout1000).and_then(|m| m.lost);
    out.push(Target {
        what: "fan-out at 1000 events/s: nothing lost (deliveries missing)",
        value: lost.map(|l| l as f64),
        bound: 0.0,
        at_least: false,
        met: lost.map(|l| l == 0),
        disk_states_differ: false,
    });
    out
}

fn section(out: &mut String, run: &Run, durable: bool) {
    let eq = find(run, Kind::Eventqueue, durable);
    let peers = [
        find(run, Kind::Redis, durable),
        find(run, Kind::Nats, durable),
    ];
    let names = [
        if durable {
            "Redis `always`"
        } else {
            "Redis `everysec`"
        },
        if durable {
            "NATS `always`"
        } else {
            "NATS `default`"
        },
        if durable {
            "eventqueue `immediate`"
        } else {
            "eventqueue `buffered`"
        },
    ];
    let _ = writeln!(
        out,
        "| workload | {} | {} | {} | eventqueue ÷ Redis | eventqueue ÷ NATS | server CPU µs/event: Redis · NATS · eventqueue | CPU ÷ Redis |",
        names[0], names[1], names[2]
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|");
    for w in WORKLOADS {
        let cells: Vec<String> = [peers[0], peers[1], eq]
            .iter()
            .map(|s| s.map(|s| cell(w, s, run)).unwrap_or_else(|| "—".into()))
            .collect();
        let ratios: Vec<String> = peers
            .iter()
            .map(|p| match (eq, p) {
                (Some(eq), Some(p)) => ratio_cell(ratio(w, eq, p)),
                _ => "—".into(),
            })
            .collect();
        let cpus: Vec<String> = [peers[0], peers[1], eq]
            .iter()
            .map(|s| {
                let m = s.and_then(|s| {
                    s.measure(if s.system.kind == Kind::Eventqueue {
                        w
                    } else {
                        w.peer_workload()
                    })
                });
                cpu(m.and_then(|m| m.server_cpu_us_per_event))
            })
            .collect();
        let cpu_ratio = match (eq, peers[0]) {
            (Some(eq), Some(p)) => x(ratio(w, eq, p).and_then(|r| r.cpu)),
            _ => "—".into(),
        };
        let cpu_cell = if cpus.iter().all(|c| c == "—") {
            "—".to_string()
        } else {
            cpus.join(" · ")
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            label(w, run),
            cells[0],
            cells[1],
            cells[2],
            ratios[0],
            ratios[1],
            cpu_cell,
            cpu_ratio
        );
    }
}

/// Microseconds of server CPU per event.
fn cpu(v: Option<f64>) -> String {
    match v {
        Some(v) if v >= 10.0 => format!("{v:.0}"),
        Some(v) => format!("{v:.1}"),
        None => "—".into(),
    }
}

/// Which figure of a row a goal of issue 24 bounds.
#[derive(Copy, Clone, Debug, Serialize)]
#[serde(rename_all = "snake_case")]
enum Metric {
    EventsPerS,
    P50,
    CpuPerEvent,
}

impl Metric {
    fn pick(self, r: &Ratio) -> Option<f64> {
        match self {
            Metric::EventsPerS => r.events_per_s,
            Metric::P50 => r.p50,
            Metric::CpuPerEvent => r.cpu,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Metric::EventsPerS => "events/s",
            Metric::P50 => "ack p50",
            Metric::CpuPerEvent => "server CPU/event",
        }
    }
}

/// A goal of issue 24: eventqueue ÷ Redis on one row of one section, in the same run.
#[derive(Serialize)]
pub struct Goal {
    durable: bool,
    workload: Workload,
    metric: Metric,
    bound: f64,
    /// `>= bound` (events/s) or `<= bound` (latency, CPU).
    at_least: bool,
    value: Option<f64>,
    met: Option<bool>,
    disk_states_differ: bool,
}

impl Goal {
    fn title(&self, run: &Run) -> String {
        format!(
            "{}: {} {}",
            label(self.workload, run).trim_end_matches(['¹', '²', '⁴', '⁵', ' ']),
            self.metric.name(),
            if self.at_least { "≥" } else { "≤" },
        ) + &format!(" {}×", self.bound)
    }
}

/// The goals of issue 24 (eventqueue ÷ Redis, same run), each with its value in `run`. The
/// pipelined WebSocket row and the coalesced row are held to the goals of the 16-in-flight row
/// they are answers to.
pub fn goals(run: &Run) -> Vec<Goal> {
    use Metric::*;
    use Workload::*;
    let list: [(bool, Workload, Metric, f64, bool); 20] = [
        (true, Sequential1, P50, 1.0, false),
        (true, Sequential8, EventsPerS, 1.2, true),
        (true, InFlight8x16, EventsPerS, 1.0, true),
        (true, Ws8x16, EventsPerS, 1.0, true),
        (true, Coalesced8x16, EventsPerS, 1.0, true),
        (true, Batch8x16, EventsPerS, 1.5, true),
        (true, Sequential8, CpuPerEvent, 2.0, false),
        (true, InFlight8x16, CpuPerEvent, 2.0, false),
        (true, Ws8x16, CpuPerEvent, 2.0, false),
        (true, Coalesced8x16, CpuPerEvent, 2.0, false),
        (true, Batch8x16, CpuPerEvent, 1.0, false),
        (false, Sequential1, P50, 1.5, false),
        (false, InFlight8x16, EventsPerS, 0.7, true),
        (false, Ws8x16, EventsPerS, 0.7, true),
        (false, Coalesced8x16, EventsPerS, 0.7, true),
        (false, Sequential8, CpuPerEvent, 2.0, false),
        (false, InFlight8x16, CpuPerEvent, 2.0, false),
        (false, Ws8x16, CpuPerEvent, 2.0, false),
        (false, Coalesced8x16, CpuPerEvent, 2.0, false),
        (false, Batch8x16, CpuPerEvent, 1.0, false),
    ];
    list.into_iter()
        .map(|(durable, workload, metric, bound, at_least)| {
            let r = match (
                find(run, Kind::Eventqueue, durable),
                find(run, Kind::Redis, durable),
            ) {
                (Some(eq), Some(redis)) => ratio(workload, eq, redis),
                _ => None,
            };
            let value = r.as_ref().and_then(|r| metric.pick(r));
            Goal {
                durable,
                workload,
                metric,
                bound,
                at_least,
                value,
                met: value.map(|v| if at_least { v >= bound } else { v <= bound }),
                disk_states_differ: r.is_some_and(|r| r.disk_states_differ),
            }
        })
        .collect()
}

/// The chart of [`goals`] as a self-contained SVG: one bar per goal (eventqueue ÷ Redis on a
/// log scale, green when the goal is met, red when missed, grey when not measured), the goal
/// drawn as a black tick on each bar's row and parity (1×) as a dashed line. Written by the
/// harness itself, so a run needs no browser or network to draw it.
pub fn svg(run: &Run) -> String {
    let goals = goals(run);
    let (left, width, row, top) = (410.0, 420.0, 26.0, 64.0);
    let (lo, hi) = (0.05_f64, 10.0_f64);
    let xpos = |v: f64| left + (v.clamp(lo, hi).ln() - lo.ln()) / (hi.ln() - lo.ln()) * width;
    let sections = 2.0;
    let height = top + row * goals.len() as f64 + 22.0 * sections + 50.0;
    let total = left + width + 90.0;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{total:.0}" height="{height:.0}" viewBox="0 0 {total:.0} {height:.0}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        out,
        r#"<text x="10" y="20" font-size="15" font-weight="bold">eventqueue ÷ Redis, same run — goals of issue 24</text>"#
    );
    let _ = writeln!(
        out,
        r##"<text x="10" y="38" fill="#444">eventqueue {}, {}; raw fdatasync p50 {} / {} ms; load {:.2} / {:.2} on {} CPUs. Bar: measured ratio (log scale); black tick: goal.</text>"##,
        escape(&run.machine.eventqueue_revision),
        if run.plan.quick {
            "--quick run"
        } else {
            "full run"
        },
        ms(Some(run.floor_start.p50_ms)),
        ms(Some(run.floor_end.p50_ms)),
        run.load_start,
        run.load_end,
        run.machine.logical_cpus
    );
    let mut y = top;
    let axis_top = y;
    for durable in [true, false] {
        let _ = writeln!(
            out,
            r#"<text x="10" y="{:.0}" font-weight="bold">{}</text>"#,
            y + 14.0,
            if durable {
                "Durable on ack: eventqueue immediate ÷ Redis appendfsync always"
            } else {
                "Not durable on ack: eventqueue buffered ÷ Redis appendfsync everysec"
            }
        );
        y += 22.0;
        for g in goals.iter().filter(|g| g.durable == durable) {
            let colour = match g.met {
                Some(true) => "#2e8b57",
                Some(false) => "#c0392b",
                None => "#bbbbbb",
            };
            let _ = writeln!(
                out,
                r#"<text x="{:.0}" y="{:.0}" text-anchor="end">{}</text>"#,
                left - 8.0,
                y + 16.0,
                escape(&g.title(run))
            );
            let (x0, x1) = match g.value {
                Some(v) => {
                    let (a, b) = (xpos(1.0), xpos(v));
                    (a.min(b), a.max(b))
                }
                None => (xpos(1.0), xpos(1.0)),
            };
            let _ = writeln!(
                out,
                r#"<rect x="{x0:.1}" y="{:.1}" width="{:.1}" height="16" fill="{colour}"/>"#,
                y + 4.0,
                (x1 - x0).max(1.0)
            );
            let gx = xpos(g.bound);
            let _ = writeln!(
                out,
                r#"<line x1="{gx:.1}" x2="{gx:.1}" y1="{:.1}" y2="{:.1}" stroke="black" stroke-width="3"/>"#,
                y + 1.0,
                y + 23.0
            );
            let text = match g.value {
                Some(v) => format!("{v:.2}×{}", if g.disk_states_differ { " ‡" } else { "" }),
                None => "not measured".into(),
            };
            let _ = writeln!(
                out,
                r#"<text x="{:.0}" y="{:.0}">{}</text>"#,
                left + width + 8.0,
                y + 16.0,
                escape(&text)
            );
            y += row;
        }
    }
    let one = xpos(1.0);
    let _ = writeln!(
        out,
        r##"<line x1="{one:.1}" x2="{one:.1}" y1="{axis_top:.0}" y2="{y:.0}" stroke="#555" stroke-dasharray="4 3"/>"##
    );
    let _ = writeln!(
        out,
        r##"<line x1="{left:.0}" x2="{:.0}" y1="{y:.0}" y2="{y:.0}" stroke="#555"/>"##,
        left + width
    );
    for t in [0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0] {
        let tx = xpos(t);
        let _ = writeln!(
            out,
            r##"<line x1="{tx:.1}" x2="{tx:.1}" y1="{y:.0}" y2="{:.0}" stroke="#555"/><text x="{tx:.1}" y="{:.0}" text-anchor="middle">{t}×</text>"##,
            y + 5.0,
            y + 18.0
        );
    }
    let _ = writeln!(
        out,
        r##"<text x="{left:.0}" y="{:.0}" fill="#444">events/s: right of the tick is better; p50 and CPU: left of the tick is better. ‡: disk states differed.</text>"##,
        y + 38.0
    );
    let _ = writeln!(out, "</svg>");
    out
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

pub fn markdown(run: &Run) -> String {
    let m = &run.machine;
    let p = &run.plan;
    let mut out = String::new();
    let _ = writeln!(out, "## eventqueue vs Redis Streams vs NATS JetStream\n");
    let _ = writeln!(
        out,
        "- Machine: {}, {} logical CPUs, {:.1} GiB RAM, Linux {}",
        m.cpu, m.logical_cpus, m.memory_gib, m.kernel
    );
    let _ = writeln!(out, "- Disk: {}", m.disk);
    let throttled = run.floor_start.throttled || run.floor_end.throttled;
    let _ = writeln!(
        out,
        "- Raw floor (300-byte append + fdatasync): start p50 {} / p99 {} ms, end p50 {} / p99 {} ms — {}",
        ms(Some(run.floor_start.p50_ms)),
        ms(Some(run.floor_start.p99_ms)),
        ms(Some(run.floor_end.p50_ms)),
        ms(Some(run.floor_end.p99_ms)),
        if throttled {
            "**the disk was throttled** (p50 above 1 ms)"
        } else {
            "not throttled"
        }
    );
    let _ = writeln!(
        out,
        "- Load average (1 min) at the start / end: {:.2} / {:.2} on {} logical CPUs",
        run.load_start, run.load_end, m.logical_cpus
    );
    let _ = writeln!(
        out,
        "- Versions: {}; {}; eventqueue {}",
        m.redis_version, m.nats_version, m.eventqueue_revision
    );
    let _ = writeln!(
        out,
        "- Run: {}: {} ms warm-up + {} ms measured per throughput workload, {} events replayed, \
         fan-out publishes for {} s per rate; {}-byte events over {} streams; servers and clients \
         share the machine, all on loopback.\n",
        if p.quick { "`--quick`" } else { "full" },
        p.warmup.as_millis(),
        p.measure.as_millis(),
        p.replay_events,
        p.fanout_secs,
        run.event_bytes,
        run.streams
    );
    let _ = writeln!(
        out,
        "Cells: acknowledged events/s · ack p50 · ack p99; replay: events/s read; fan-out: \
         publish → subscriber p50 · p99 and deliveries lost. Ratios are eventqueue ÷ peer in the \
         same run: above 1 is better for events/s, below 1 is better for latencies.\n"
    );
    let _ = writeln!(out, "### Durable on ack (fsync before the ack)\n");
    section(&mut out, run, true);
    let _ = writeln!(out, "\n### Not durable on ack (fsync later)\n");
    section(&mut out, run, false);
    let _ = writeln!(
        out,
        "\n¹ Redis: pipelines of 16 XADDs; NATS: 16 publishes awaiting their acks; eventqueue: 16 \
         concurrent one-event requests per client.  \n\
         ² eventqueue only (one request carries 16 events); its ratios compare with the peers' \
         8 × 16 row.  \n\
         † the disk was throttled (raw fdatasync p50 above 1 ms) just before or after this cell.  \n\
         ‡ the two cells compared ran in different disk states: the ratio says little.  \n\
         ⁴ eventqueue only: 8 WebSocket connections (`GET /events/queues/{{task}}/events/ws`), \
         each with 16 one-event frames unacknowledged; compared with the peers' 8 × 16 row.  \n\
         ⁵ eventqueue only: 8 HTTP connections, one queue each, with 16 concurrent one-event \
         publishers per client whose events ride in `{{\"events\": [...]}}` batch requests (a \
         client-side coalescer as `Client::coalescer`'s, linger 0); compared with the peers' \
         8 × 16 row.  \n\
         Server CPU: user + system time of the server process (all threads, \
         `/proc/PID/stat`) over the measured window ÷ events acknowledged in it."
    );
    let ts = targets(run);
    if !ts.is_empty() {
        let _ = writeln!(out, "\n### Targets of issue 7 (durable rows, same run)\n");
        for t in &ts {
            let mark = match t.met {
                Some(true) => "met",
                Some(false) => "**missed**",
                None => "not measured",
            };
            let value = match t.value {
                Some(v) if t.what.contains("lost") => format!("{v:.0}"),
                Some(v) => format!("{v:.2}×"),
                None => "—".into(),
            };
            let differ = if t.disk_states_differ { " ‡" } else { "" };
            let _ = writeln!(out, "- {}: {value} — {mark}{differ}", t.what);
        }
    }
    let gs = goals(run);
    if gs.iter().any(|g| g.value.is_some()) {
        let _ = writeln!(
            out,
            "\n### Goals of issue 24 (eventqueue ÷ Redis, same run)\n"
        );
        for g in &gs {
            let mark = match g.met {
                Some(true) => "met",
                Some(false) => "**missed**",
                None => "not measured",
            };
            let value = g
                .value
                .map(|v| format!("{v:.2}×"))
                .unwrap_or_else(|| "—".into());
            let differ = if g.disk_states_differ { " ‡" } else { "" };
            let _ = writeln!(
                out,
                "- {} — {}: {value} — {mark}{differ}",
                if g.durable { "durable" } else { "not durable" },
                g.title(run)
            );
        }
    }
    let mut errors = String::new();
    for s in &run.systems {
        if let Some(e) = &s.error {
            let _ = writeln!(
                errors,
                "- {}: {}",
                s.system.label(),
                e.replace('\n', "\n  ")
            );
        }
        for o in &s.outcomes {
            if let Some(e) = &o.error {
                let _ = writeln!(errors, "- {} / {:?}: {e}", s.system.label(), o.workload);
            }
        }
    }
    if !errors.is_empty() {
        let _ = writeln!(out, "\n³ Errors:\n\n{errors}");
    }
    out
}

pub fn json(run: &Run) -> Value {
    let mut ratios = Vec::new();
    for durable in [true, false] {
        let Some(eq) = find(run, Kind::Eventqueue, durable) else {
            continue;
        };
        for kind in [Kind::Redis, Kind::Nats] {
            let Some(peer) = find(run, kind, durable) else {
                continue;
            };
            ratios.extend(WORKLOADS.iter().filter_map(|&w| ratio(w, eq, peer)));
        }
    }
    let mut v = serde_json::to_value(run).unwrap_or(Value::Null);
    if let Value::Object(map) = &mut v {
        map.insert("ratios".into(), json!(ratios));
        map.insert("targets".into(), json!(targets(run)));
        map.insert("goals".into(), json!(goals(run)));
    }
    v
}
