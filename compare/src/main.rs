//! Side-by-side run of eventqueue (HTTP) against Redis Streams and NATS JetStream on this
//! machine: the same workloads, 300-byte events over 100 streams, each server on loopback with
//! a fresh temporary data directory. Prints one markdown table (or `--json`).
//!
//! `compare/run.sh` installs the peers, builds everything and runs this binary.

mod coalesce;
mod drive;
mod dstreams;
mod eq_peer;
mod nats_peer;
mod null_server;
mod redis_peer;
mod report;
mod scale;
mod servers;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Parser;
use serde::Serialize;

use drive::{CLIENTS, DEPTH, Measure, Plan};
use servers::Floor;

#[derive(Parser, Debug)]
#[command(about = "Compare eventqueue with Redis Streams and NATS JetStream on this machine")]
struct Args {
    /// Short windows and a 20k-event replay: a run under two minutes.
    #[arg(long)]
    quick: bool,
    /// Print one JSON object instead of the markdown report.
    #[arg(long)]
    json: bool,
    /// Also write the JSON object to this file.
    #[arg(long, value_name = "FILE")]
    json_out: Option<PathBuf>,
    /// Also write the chart of the goals (eventqueue ÷ Redis per row, goal drawn) as SVG here.
    #[arg(long, value_name = "FILE")]
    svg: Option<PathBuf>,
    /// The `eventqueue` binary (release build).
    #[arg(long, value_name = "PATH", default_value = "target/release/eventqueue")]
    eventqueue: PathBuf,
    /// The `redis-server` binary (Redis 7).
    #[arg(long, value_name = "PATH", default_value = "redis-server")]
    redis_server: PathBuf,
    /// The `nats-server` binary (2.10 or later).
    #[arg(long, value_name = "PATH", default_value = "nats-server")]
    nats_server: PathBuf,
    /// Directory on the disk to measure; temporary data directories are made in it and removed
    /// [default: the system temporary directory]
    #[arg(long, value_name = "DIR")]
    work_dir: Option<PathBuf>,
    /// The eventqueue repository, to note its revision in the report.
    #[arg(long, value_name = "DIR")]
    repo: Option<PathBuf>,
    /// Run only these systems (comma-separated: redis, nats, eventqueue).
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    only: Option<Vec<String>>,
    /// Run only these workloads (comma-separated: sequential1, sequential8, in_flight8x16,
    /// ws8x16, coalesced8x16, batch8x16, replay, fanout100, fanout1000), e.g. to profile one
    /// of them.
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    workloads: Option<Vec<String>>,
    /// Run the scale-out comparison of issue 21 instead (`scale.rs`): eventqueue on Redis, 1
    /// and 2 nodes, against Redis used directly; the memory backend against redb. `--only`
    /// then picks the sections (`redis`, `memory`), `--workloads` the rows.
    #[arg(long)]
    scale: bool,
    /// Run the Durable Streams comparison of issue 23 instead (`dstreams.rs`): eventqueue's
    /// `/v1/stream` against the peers whose binaries `EQ_DS_ELECTRIC` (ElectricSQL
    /// `durable-streams` 0.1.5) and `EQ_DS_DSS` (`durable-streams-server` 0.3.0) name.
    /// `--workloads` then picks the rows (append1, append8, append64, catchup, tail100,
    /// tail1000).
    #[arg(long)]
    durable_streams: bool,
    /// Length of the measured window of the throughput workloads, in milliseconds (default:
    /// 4000, `--quick` 1000), e.g. to profile a server under a steady load.
    #[arg(long, value_name = "MS")]
    measure_ms: Option<u64>,
    /// Put the harness's null server (`null_server.rs`) in eventqueue's place: an HTTP server
    /// that answers each enqueue doing nothing (or, over Redis, one `XADD` or one call of
    /// eventqueue's batch script; `EQ_COMPARE_NULL=none|xadd|script`). Its rows are the floor
    /// of an HTTP front end on this machine: what no server taking one event per request can
    /// beat.
    #[arg(long)]
    null_server: bool,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Redis,
    Nats,
    Eventqueue,
}

/// One server configuration.
#[derive(Clone, Debug, Serialize)]
pub struct System {
    pub kind: Kind,
    /// `always` / `everysec` (Redis), `always` / `default` (NATS), `immediate` / `buffered`.
    pub mode: &'static str,
    /// Whether an acknowledged event is on disk (fsync'd) when the ack arrives.
    pub durable: bool,
}

impl System {
    pub fn label(&self) -> String {
        match self.kind {
            Kind::Redis => format!("Redis `{}`", self.mode),
            Kind::Nats => format!("NATS `{}`", self.mode),
            Kind::Eventqueue => format!("eventqueue `{}`", self.mode),
        }
    }
}

pub const SYSTEMS: [System; 6] = [
    System {
        kind: Kind::Redis,
        mode: "always",
        durable: true,
    },
    System {
        kind: Kind::Nats,
        mode: "always",
        durable: true,
    },
    System {
        kind: Kind::Eventqueue,
        mode: "immediate",
        durable: true,
    },
    System {
        kind: Kind::Redis,
        mode: "everysec",
        durable: false,
    },
    System {
        kind: Kind::Nats,
        mode: "default",
        durable: false,
    },
    System {
        kind: Kind::Eventqueue,
        mode: "buffered",
        durable: false,
    },
];

#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Workload {
    /// One client, one append in flight.
    Sequential1,
    /// Eight clients, one append in flight each.
    Sequential8,
    /// Eight clients, 16 appends in flight each (Redis: pipelines of 16; NATS: 16 outstanding
    /// acks; eventqueue: 16 concurrent one-event requests).
    InFlight8x16,
    /// eventqueue only: eight clients, one request of 16 events in flight each.
    Batch8x16,
    /// eventqueue only: eight WebSocket producer connections, 16 one-event frames
    /// unacknowledged on each (the pipelined connection, against the peers' 8 × 16).
    Ws8x16,
    /// eventqueue only: eight clients × 16 concurrent one-event publishers whose events ride
    /// in batch requests (client-side coalescing, against the peers' 8 × 16).
    Coalesced8x16,
    /// Read back a stream of `replay_events` events from its start.
    Replay,
    /// One publisher → 100 subscribers of one stream at 100 events/s.
    Fanout100,
    /// The same at 1000 events/s.
    Fanout1000,
}

pub const WORKLOADS: [Workload; 9] = [
    Workload::Sequential1,
    Workload::Sequential8,
    Workload::InFlight8x16,
    Workload::Ws8x16,
    Workload::Coalesced8x16,
    Workload::Batch8x16,
    Workload::Replay,
    Workload::Fanout100,
    Workload::Fanout1000,
];

impl Workload {
    fn applies_to(self, kind: Kind) -> bool {
        !matches!(
            self,
            Workload::Batch8x16 | Workload::Ws8x16 | Workload::Coalesced8x16
        ) || kind == Kind::Eventqueue
    }

    /// The peers' workload an eventqueue-only row is compared with.
    pub fn peer_workload(self) -> Workload {
        match self {
            Workload::Batch8x16 | Workload::Ws8x16 | Workload::Coalesced8x16 => {
                Workload::InFlight8x16
            }
            w => w,
        }
    }
}

/// One workload's outcome on one system.
#[derive(Clone, Debug, Serialize)]
pub struct Outcome {
    pub workload: Workload,
    #[serde(flatten)]
    pub measure: Option<Measure>,
    pub error: Option<String>,
    /// The raw floor just before and just after this workload ran.
    pub floor_before: Option<Floor>,
    pub floor_after: Option<Floor>,
}

impl Outcome {
    /// Whether the disk was throttled at either end of this workload.
    pub fn throttled(&self) -> bool {
        [&self.floor_before, &self.floor_after]
            .iter()
            .any(|f| f.as_ref().is_some_and(|f| f.throttled))
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct SystemRun {
    #[serde(flatten)]
    pub system: System,
    /// Set when the server could not be started.
    pub error: Option<String>,
    pub outcomes: Vec<Outcome>,
}

impl SystemRun {
    pub fn outcome(&self, w: Workload) -> Option<&Outcome> {
        self.outcomes.iter().find(|o| o.workload == w)
    }

    pub fn measure(&self, w: Workload) -> Option<&Measure> {
        self.outcome(w).and_then(|o| o.measure.as_ref())
    }
}

#[derive(Serialize)]
pub struct Run {
    pub plan: Plan,
    pub event_bytes: usize,
    pub streams: usize,
    pub machine: servers::Machine,
    pub floor_start: Floor,
    pub floor_end: Floor,
    /// 1-minute load average at the start and the end (other work competing for the cores).
    pub load_start: f64,
    pub load_end: f64,
    pub systems: Vec<SystemRun>,
}

fn main() {
    let ran = if null_server::invoked() {
        null_server::main()
    } else {
        let args = Args::parse();
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("starting the runtime")
            .and_then(|rt| rt.block_on(run(args)))
    };
    if let Err(e) = ran {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn run(mut args: Args) -> Result<()> {
    if args.null_server {
        args.eventqueue = std::env::current_exe().context("finding this harness's binary")?;
        // The chart is eventqueue's (run.sh writes the README's by default): not replaced.
        if let Some(svg) = args.svg.take() {
            say(&format!(
                "--null-server: no chart written ({} kept)",
                svg.display()
            ));
        }
        let mode = std::env::var("EQ_COMPARE_NULL").unwrap_or_default();
        let banner = format!(
            "**The eventqueue columns below are the harness's null server (mode `{}`), not \
             eventqueue**: the floor of an HTTP front end on this machine (`null_server.rs`).",
            match (mode.as_str(), args.scale) {
                ("", false) => "none",
                ("", true) => "script over Redis, none in the memory section",
                (m, _) => m,
            }
        );
        say(&banner);
        // Above the markdown report; `--json` keeps its standard output one JSON object.
        if !args.json {
            println!("{banner}\n");
        }
    }
    let mut plan = Plan::new(args.quick);
    if let Some(ms) = args.measure_ms {
        plan.measure = std::time::Duration::from_millis(ms);
    }
    let base = args.work_dir.clone().unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&base).with_context(|| format!("creating {}", base.display()))?;
    let work = tempfile::Builder::new()
        .prefix("eventqueue-compare-")
        .tempdir_in(&base)
        .with_context(|| format!("making a temporary directory in {}", base.display()))?;
    if args.durable_streams {
        let machine = servers::machine(
            work.path(),
            &args.redis_server,
            &args.nats_server,
            args.repo.as_deref(),
        );
        let report = dstreams::run(
            &args.eventqueue,
            work.path(),
            args.quick,
            args.workloads.as_deref(),
        )
        .await?;
        println!(
            "- Machine: {}, {} logical CPUs, {:.1} GiB; disk {}; eventqueue {}",
            machine.cpu,
            machine.logical_cpus,
            machine.memory_gib,
            machine.disk,
            machine.eventqueue_revision
        );
        print!("{report}");
        return Ok(());
    }
    check_binaries(&args)?;
    let machine = servers::machine(
        work.path(),
        &args.redis_server,
        &args.nats_server,
        args.repo.as_deref(),
    );
    say(&format!(
        "{} run on {} ({} logical CPUs); data under {}",
        if plan.quick { "quick" } else { "full" },
        machine.cpu,
        machine.logical_cpus,
        work.path().display()
    ));
    if args.scale {
        check_binaries(&args)?;
        let floor_start = floor(work.path(), plan.floor_samples).await?;
        let report = scale::run(
            &args.eventqueue,
            &args.redis_server,
            &plan,
            work.path(),
            args.only.as_deref(),
            args.workloads.as_deref(),
        )
        .await?;
        let floor_end = floor(work.path(), plan.floor_samples).await?;
        println!(
            "- Machine: {}, {} logical CPUs; {}; eventqueue {}\n- Raw floor (300-byte append + \
             fdatasync): start p50 {:.2} / p99 {:.2} ms, end p50 {:.2} / p99 {:.2} ms\n",
            machine.cpu,
            machine.logical_cpus,
            machine.redis_version,
            machine.eventqueue_revision,
            floor_start.p50_ms,
            floor_start.p99_ms,
            floor_end.p50_ms,
            floor_end.p99_ms
        );
        print!("{report}");
        return Ok(());
    }
    let load_start = servers::load_average();
    let floor_start = floor(work.path(), plan.floor_samples).await?;
    say(&format!(
        "disk floor (300-byte append + fdatasync): p50 {:.3} ms, p99 {:.3} ms",
        floor_start.p50_ms, floor_start.p99_ms
    ));
    let mut systems = Vec::new();
    for durable in [true, false] {
        let section: Vec<System> = SYSTEMS
            .into_iter()
            .filter(|s| s.durable == durable)
            .filter(|s| {
                let name = format!("{:?}", s.kind).to_lowercase();
                args.only
                    .as_ref()
                    .is_none_or(|only| only.iter().any(|o| o.eq_ignore_ascii_case(&name)))
            })
            .collect();
        systems.extend(run_section(&section, &plan, &args, work.path()).await);
    }
    let floor_end = floor(work.path(), plan.floor_samples).await?;
    say(&format!(
        "disk floor at the end: p50 {:.3} ms, p99 {:.3} ms",
        floor_end.p50_ms, floor_end.p99_ms
    ));
    let run = Run {
        plan,
        event_bytes: drive::EVENT_BYTES,
        streams: drive::STREAMS,
        machine,
        floor_start,
        floor_end,
        load_start,
        load_end: servers::load_average(),
        systems,
    };
    let json = report::json(&run);
    if let Some(path) = &args.json_out {
        let text = serde_json::to_string_pretty(&json).context("encoding the JSON report")?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.svg {
        std::fs::write(path, report::svg(&run))
            .with_context(|| format!("writing {}", path.display()))?;
        say(&format!("chart written to {}", path.display()));
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json).context("encoding the JSON report")?
        );
    } else {
        print!("{}", report::markdown(&run));
    }
    Ok(())
}

fn check_binaries(args: &Args) -> Result<()> {
    for (what, path) in [
        ("eventqueue", &args.eventqueue),
        ("redis-server", &args.redis_server),
        ("nats-server", &args.nats_server),
    ] {
        std::process::Command::new(path)
            .arg("--version")
            .output()
            .with_context(|| {
                format!(
                    "cannot run {what} at {} (compare/run.sh installs and builds everything)",
                    path.display()
                )
            })?;
    }
    Ok(())
}

fn say(msg: &str) {
    eprintln!("[compare] {msg}");
}

async fn floor(dir: &Path, n: usize) -> Result<Floor> {
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || servers::disk_floor(&dir, n))
        .await
        .context("the floor task panicked")?
}

/// Starts the servers of one section (durable or not) side by side, then runs each workload
/// on each of them in turn, so that the rows compared were measured close together in time;
/// the raw floor is sampled around every cell to catch a change of disk state.
async fn run_section(section: &[System], plan: &Plan, args: &Args, work: &Path) -> Vec<SystemRun> {
    let mut runs = Vec::new();
    let mut live = Vec::new();
    let mut dirs = Vec::new();
    for sys in section {
        let mut run = SystemRun {
            system: sys.clone(),
            error: None,
            outcomes: Vec::new(),
        };
        say(&format!("starting {}", sys.label().replace('`', "")));
        match start(sys, args, work).await {
            Ok((dir, server, peer)) => {
                dirs.push(dir);
                live.push(Some((server, peer)));
            }
            Err(e) => {
                say(&format!("  could not start: {e:#}"));
                run.error = Some(format!("{e:#}"));
                live.push(None);
            }
        }
        runs.push(run);
    }
    for w in WORKLOADS {
        if !args.workloads.as_ref().is_none_or(|list| {
            let name = serde_json::to_value(w).ok();
            list.iter()
                .any(|l| name.as_ref().and_then(|n| n.as_str()) == Some(l.as_str()))
        }) {
            continue;
        }
        for (run, slot) in runs.iter_mut().zip(live.iter_mut()) {
            let Some((server, peer)) = slot else { continue };
            if !w.applies_to(run.system.kind) {
                continue;
            }
            let floor_before = floor(work, plan.floor_samples_per_cell).await.ok();
            drive::watch_server_cpu(server.pid());
            let mut result = peer.run(w, plan).await;
            let cpu = drive::window_cpu_secs().await;
            if let (Ok(m), Some(cpu)) = (&mut result, cpu)
                && m.p50_ms.is_some()
                && m.lost.is_none()
            {
                m.server_cpu_secs = Some(cpu);
                m.server_cpu_us_per_event = (m.events > 0).then(|| cpu * 1e6 / m.events as f64);
            }
            let floor_after = floor(work, plan.floor_samples_per_cell).await.ok();
            let outcome = Outcome {
                workload: w,
                error: result.as_ref().err().map(|e| format!("{e:#}")),
                measure: result.ok(),
                floor_before,
                floor_after,
            };
            let tag = run.system.label().replace('`', "");
            match (&outcome.measure, &outcome.error) {
                (Some(m), _) => say(&format!(
                    "{tag:<22} {:<13} {}{}",
                    format!("{w:?}"),
                    report::brief(m),
                    if outcome.throttled() {
                        " (disk throttled)"
                    } else {
                        ""
                    }
                )),
                (None, e) => say(&format!(
                    "{tag:<22} {w:?} failed: {}",
                    e.as_deref().unwrap_or("")
                )),
            }
            let failed = outcome.measure.is_none();
            run.outcomes.push(outcome);
            if failed && !server.is_running() {
                run.error = Some(format!(
                    "the server exited; its log:\n{}",
                    server.log_tail()
                ));
                *slot = None;
            }
        }
    }
    for (run, slot) in runs.iter().zip(live) {
        if let Some((server, _)) = slot
            && let Err(e) = server.stop()
        {
            say(&format!("stopping {}: {e:#}", run.system.label()));
        }
    }
    drop(dirs);
    runs
}

/// Starts one server on a fresh temporary data directory.
async fn start(
    sys: &System,
    args: &Args,
    work: &Path,
) -> Result<(tempfile::TempDir, servers::Server, Peer)> {
    let dir = tempfile::Builder::new()
        .prefix(&format!("{:?}-{}-", sys.kind, sys.mode).to_lowercase())
        .tempdir_in(work)
        .context("making a temporary data directory")?;
    let (server, peer) = match sys.kind {
        Kind::Redis => redis_peer::start(&args.redis_server, dir.path(), sys.mode)
            .map(|(s, r)| (s, Peer::Redis(r)))?,
        Kind::Nats => nats_peer::start(&args.nats_server, dir.path(), sys.mode == "always")
            .await
            .map(|(s, n)| (s, Peer::Nats(n)))?,
        Kind::Eventqueue => eq_peer::start(&args.eventqueue, dir.path(), sys.mode)
            .await
            .map(|(s, e)| (s, Peer::Eventqueue(e)))?,
    };
    Ok((dir, server, peer))
}

enum Peer {
    Redis(redis_peer::Redis),
    Nats(nats_peer::Nats),
    Eventqueue(eq_peer::Eventqueue),
}

impl Peer {
    async fn run(&self, w: Workload, plan: &Plan) -> Result<Measure> {
        match (self, w) {
            (Peer::Redis(r), Workload::Sequential1) => r.sequential(plan, 1).await,
            (Peer::Redis(r), Workload::Sequential8) => r.sequential(plan, CLIENTS).await,
            (Peer::Redis(r), Workload::InFlight8x16) => r.pipelined(plan).await,
            (Peer::Redis(r), Workload::Replay) => r.replay(plan.replay_events).await,
            (Peer::Redis(r), Workload::Fanout100) => r.fanout(plan, 100).await,
            (Peer::Redis(r), Workload::Fanout1000) => r.fanout(plan, 1000).await,
            (Peer::Nats(n), Workload::Sequential1) => n.sequential(plan, 1).await,
            (Peer::Nats(n), Workload::Sequential8) => n.sequential(plan, CLIENTS).await,
            (Peer::Nats(n), Workload::InFlight8x16) => n.windowed(plan).await,
            (Peer::Nats(n), Workload::Replay) => {
                n.replay(plan.replay_events, plan.replay_fill_limit).await
            }
            (Peer::Nats(n), Workload::Fanout100) => n.fanout(plan, 100).await,
            (Peer::Nats(n), Workload::Fanout1000) => n.fanout(plan, 1000).await,
            (Peer::Eventqueue(e), Workload::Sequential1) => e.requests(plan, 1, 1).await,
            (Peer::Eventqueue(e), Workload::Sequential8) => e.requests(plan, CLIENTS, 1).await,
            (Peer::Eventqueue(e), Workload::InFlight8x16) => e.requests(plan, CLIENTS, DEPTH).await,
            (Peer::Eventqueue(e), Workload::Batch8x16) => e.batches(plan).await,
            (Peer::Eventqueue(e), Workload::Ws8x16) => e.websockets(plan).await,
            (Peer::Eventqueue(e), Workload::Coalesced8x16) => e.coalesced(plan).await,
            (Peer::Eventqueue(e), Workload::Replay) => e.replay(plan.replay_events).await,
            (Peer::Eventqueue(e), Workload::Fanout100) => e.fanout(plan, 100).await,
            (Peer::Eventqueue(e), Workload::Fanout1000) => e.fanout(plan, 1000).await,
            (_, w) => anyhow::bail!("{w:?} does not apply to this peer"),
        }
    }
}
