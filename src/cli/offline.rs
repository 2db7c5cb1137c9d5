//! `eventqueue dump` and `eventqueue inspect`: read a data directory directly, for
//! replay-heavy debugging of a stopped server.
//!
//! Opening the directory is what a server start does: a log left by an unclean stop is
//! re-applied first. That needs the database lock; while a server holds it the commands
//! refuse and point at the HTTP replay instead.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::cli::{CliError, Outcome};
use crate::{DB_FILE, Error, LogReader, QueueInfo, Timestamp};

/// Events read from the store per step (bounds memory for any queue size).
const CHUNK: usize = 1024;

/// Flags of `eventqueue dump`.
#[derive(clap::Args, Debug, Clone)]
#[command(after_help = "Examples:
  eventqueue dump --data-dir ./data
  eventqueue dump --data-dir ./data --tenant acme --task workflow_123 --from 40
  eventqueue dump --data-dir ./data --type status,error --since 2026-11-28T02:00:00Z | jq .

Prints every retained event matching the filters as one JSON line, exactly as stored, by
tenant, task and offset. Stop the server first: it holds the database lock (to replay a
running server's queue, use `eventqueue watch TASK --json --from 0`).")]
pub struct DumpArgs {
    /// Data directory of a stopped server.
    #[arg(
        long,
        env = "EVENTQUEUE_DATA_DIR",
        value_name = "DIR",
        default_value = "./data"
    )]
    pub data_dir: PathBuf,
    /// Only this tenant's queues.
    #[arg(long, value_name = "TENANT")]
    pub tenant: Option<String>,
    /// Only queues of this task id.
    #[arg(long, value_name = "TASK")]
    pub task: Option<String>,
    /// Only events at this offset or later.
    #[arg(long, value_name = "N")]
    pub from: Option<u64>,
    /// Only these event types (comma-separated: status, progress, artifact, error, complete).
    #[arg(long = "type", value_name = "TYPES", value_delimiter = ',')]
    pub types: Vec<String>,
    /// Only events whose timestamp is at or after this RFC 3339 time.
    #[arg(long, value_name = "RFC3339")]
    pub since: Option<String>,
}

/// Flags of `eventqueue inspect`.
#[derive(clap::Args, Debug, Clone)]
#[command(after_help = "Examples:
  eventqueue inspect --data-dir ./data
  eventqueue inspect --data-dir ./data --json | jq .tenants

Summarises a stopped server's store: format version, file sizes, queues and retained events
per tenant, oldest and newest event.")]
pub struct InspectArgs {
    /// Data directory of a stopped server.
    #[arg(
        long,
        env = "EVENTQUEUE_DATA_DIR",
        value_name = "DIR",
        default_value = "./data"
    )]
    pub data_dir: PathBuf,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Opens a data directory for reading, with clear messages for the usual mistakes.
fn open(data_dir: &Path) -> Result<(LogReader, Vec<QueueInfo>), CliError> {
    if !data_dir.join(DB_FILE).exists() {
        return Err(CliError::usage(format!(
            "{} holds no eventqueue database ({DB_FILE}); pass the server's --data-dir",
            data_dir.display()
        )));
    }
    match LogReader::open(data_dir) {
        Ok(reader) => {
            let queues = reader.queues();
            Ok((reader, queues))
        }
        Err(Error::Locked { path }) => Err(CliError::failure(format!(
            "the database {path} is locked: a running eventqueue server holds it. Offline \
             reading needs the server stopped; to replay a running server's queue use HTTP \
             instead: `eventqueue watch TASK --json --from 0` (or `curl -N \
             $EVENTQUEUE_URL/events/workflows/TASK`)"
        ))),
        Err(e @ Error::UnsupportedFormat { .. }) => Err(CliError::failure(e.to_string())),
        Err(e) => Err(CliError::failure(format!(
            "cannot open {}: {e}",
            data_dir.display()
        ))),
    }
}

/// The fields of a stored event the filters look at.
#[derive(Deserialize)]
struct Head<'a> {
    #[serde(borrow)]
    event_type: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    timestamp: Option<std::borrow::Cow<'a, str>>,
}

const TYPES: [&str; 5] = ["status", "progress", "artifact", "error", "complete"];

/// Runs `eventqueue dump`.
///
/// # Errors
///
/// Invalid filters or a directory without a database (2); a locked or unreadable database
/// (1).
pub fn dump(args: DumpArgs) -> Result<Outcome, CliError> {
    let types: Vec<String> = args
        .types
        .iter()
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect();
    if let Some(bad) = types.iter().find(|t| !TYPES.contains(&t.as_str())) {
        return Err(CliError::usage(format!(
            "--type: unknown event type {bad:?} (expected {})",
            TYPES.join(", ")
        )));
    }
    let since = args
        .since
        .as_deref()
        .map(|s| {
            Timestamp::parse_rfc3339(s.trim()).map_err(|_| {
                CliError::usage(format!(
                    "--since: {s:?} is not an RFC 3339 time (e.g. 2026-11-28T02:31:45Z)"
                ))
            })
        })
        .transpose()?;
    let (store, mut queues) = open(&args.data_dir)?;
    queues.retain(|q| {
        args.tenant
            .as_deref()
            .is_none_or(|t| t == q.tenant_id.as_str())
            && args.task.as_deref().is_none_or(|t| t == q.task_id.as_str())
    });
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let result = (|| -> Result<(), CliError> {
        for q in &queues {
            let mut from = q.first_offset.max(args.from.unwrap_or(0));
            while from < q.latest_offset {
                let chunk = store
                    .read(&q.tenant_id, &q.task_id, from, CHUNK)
                    .map_err(|e| CliError::failure(format!("reading the store: {e}")))?;
                let Some(last) = chunk.last() else { break };
                from = last.offset() + 1;
                for ev in &chunk {
                    if !types.is_empty() || since.is_some() {
                        let head: Head<'_> = serde_json::from_slice(ev.json()).map_err(|e| {
                            CliError::failure(format!(
                                "event {} of {}/{} is not valid JSON: {e}",
                                ev.offset(),
                                q.tenant_id,
                                q.task_id
                            ))
                        })?;
                        if !types.is_empty()
                            && !head
                                .event_type
                                .as_deref()
                                .is_some_and(|t| types.iter().any(|w| w == t))
                        {
                            continue;
                        }
                        if let Some(since) = since {
                            let at = head
                                .timestamp
                                .as_deref()
                                .and_then(|t| Timestamp::parse_rfc3339(t).ok());
                            if at.is_none_or(|at| at < since) {
                                continue;
                            }
                        }
                    }
                    let written = out.write_all(ev.json()).and_then(|()| out.write_all(b"\n"));
                    if let Err(e) = written {
                        return Err(write_error(e));
                    }
                }
            }
        }
        out.flush().map_err(write_error)
    })();
    store.close();
    match result {
        Ok(()) => Ok(Outcome::Success),
        // `dump | head` closes the pipe early: that is the reader's choice, not a failure.
        Err(e) if e.code == 0 => Ok(Outcome::Success),
        Err(e) => Err(e),
    }
}

/// A write error on stdout; a closed pipe is marked with code 0 (not a failure).
fn write_error(e: std::io::Error) -> CliError {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        CliError {
            code: 0,
            message: String::new(),
        }
    } else {
        CliError::failure(format!("cannot write the output: {e}"))
    }
}

/// The `inspect` report.
#[derive(Debug, Serialize)]
struct Report {
    data_dir: String,
    format_version: u32,
    database_bytes: u64,
    log_bytes: u64,
    queues: u64,
    events: u64,
    oldest_event: Option<String>,
    newest_event: Option<String>,
    tenants: BTreeMap<String, TenantReport>,
}

#[derive(Debug, Default, Serialize)]
struct TenantReport {
    queues: u64,
    events: u64,
    open: u64,
    closed: u64,
    finished: u64,
    cancelled: u64,
    kinds: BTreeMap<String, u64>,
    oldest_event: Option<String>,
    newest_event: Option<String>,
}

/// An event's timestamp: microseconds since the epoch (to compare) and its text (to print).
type Stamp = (i64, String);

/// Keeps the earlier / later of two timestamps.
fn keep(slot: &mut Option<Stamp>, candidate: Option<Stamp>, later: bool) {
    if let Some((us, text)) = candidate {
        let replace = match slot {
            None => true,
            Some((cur, _)) => (later && us > *cur) || (!later && us < *cur),
        };
        if replace {
            *slot = Some((us, text));
        }
    }
}

/// Runs `eventqueue inspect`.
///
/// # Errors
///
/// A directory without a database (2); a locked or unreadable database (1).
pub fn inspect(args: InspectArgs) -> Result<Outcome, CliError> {
    let (store, queues) = open(&args.data_dir)?;
    let stamp = |q: &QueueInfo, offset: u64| -> Result<Option<Stamp>, CliError> {
        let evs = store
            .read(&q.tenant_id, &q.task_id, offset, 1)
            .map_err(|e| CliError::failure(format!("reading the store: {e}")))?;
        Ok(evs.first().and_then(|ev| {
            let head: Head<'_> = serde_json::from_slice(ev.json()).ok()?;
            let text = head.timestamp?.into_owned();
            let us = Timestamp::parse_rfc3339(&text).ok()?.as_micros();
            Some((us, text))
        }))
    };
    let mut report = Report {
        data_dir: args.data_dir.display().to_string(),
        format_version: LogReader::FORMAT_VERSION,
        database_bytes: 0,
        log_bytes: 0,
        queues: 0,
        events: 0,
        oldest_event: None,
        newest_event: None,
        tenants: BTreeMap::new(),
    };
    let mut oldest_all = None;
    let mut newest_all = None;
    let mut per_tenant: BTreeMap<String, (Option<Stamp>, Option<Stamp>)> = BTreeMap::new();
    let result = (|| -> Result<(), CliError> {
        for q in &queues {
            let events = q.event_count;
            let tenant = q.tenant_id.to_string();
            let t = report.tenants.entry(tenant.clone()).or_default();
            t.queues += 1;
            t.events += events;
            if q.is_closed {
                t.closed += 1;
            } else {
                t.open += 1;
            }
            if q.is_finished {
                t.finished += 1;
            }
            if q.is_cancelled {
                t.cancelled += 1;
            }
            *t.kinds.entry(q.kind.as_str().to_string()).or_default() += 1;
            report.queues += 1;
            report.events += events;
            if events > 0 {
                let first = stamp(q, q.first_offset)?;
                let last = stamp(q, q.latest_offset - 1)?;
                let slot = per_tenant.entry(tenant).or_default();
                keep(&mut slot.0, first.clone(), false);
                keep(&mut slot.1, last.clone(), true);
                keep(&mut oldest_all, first, false);
                keep(&mut newest_all, last, true);
            }
        }
        Ok(())
    })();
    // Sizes after the open, which re-applied and emptied any log.
    (report.database_bytes, report.log_bytes) = store.file_sizes();
    store.close();
    result?;
    for (tenant, (oldest, newest)) in per_tenant {
        if let Some(t) = report.tenants.get_mut(&tenant) {
            t.oldest_event = oldest.map(|o| o.1);
            t.newest_event = newest.map(|n| n.1);
        }
    }
    report.oldest_event = oldest_all.map(|o| o.1);
    report.newest_event = newest_all.map(|n| n.1);
    if args.json {
        let text = serde_json::to_string_pretty(&report)
            .map_err(|e| CliError::failure(format!("cannot print JSON: {e}")))?;
        println!("{text}");
        return Ok(Outcome::Success);
    }
    let none = || "-".to_string();
    println!("data directory  {}", report.data_dir);
    println!("format version  {}", report.format_version);
    println!(
        "file size       {} ({} database, {} log)",
        human_bytes(report.database_bytes + report.log_bytes),
        human_bytes(report.database_bytes),
        human_bytes(report.log_bytes)
    );
    println!("queues          {}", report.queues);
    println!("events          {} retained", report.events);
    println!(
        "oldest event    {}",
        report.oldest_event.clone().unwrap_or_else(none)
    );
    println!(
        "newest event    {}",
        report.newest_event.clone().unwrap_or_else(none)
    );
    if !report.tenants.is_empty() {
        println!();
        println!(
            "{:<20} {:>7} {:>9} {:>6} {:>7} {:>9} {:>10}  {:<27}  {:<27}",
            "TENANT",
            "QUEUES",
            "EVENTS",
            "OPEN",
            "CLOSED",
            "FINISHED",
            "CANCELLED",
            "OLDEST EVENT",
            "NEWEST EVENT"
        );
        for (name, t) in &report.tenants {
            println!(
                "{:<20} {:>7} {:>9} {:>6} {:>7} {:>9} {:>10}  {:<27}  {:<27}",
                name,
                t.queues,
                t.events,
                t.open,
                t.closed,
                t.finished,
                t.cancelled,
                t.oldest_event.clone().unwrap_or_else(none),
                t.newest_event.clone().unwrap_or_else(none)
            );
        }
    }
    Ok(Outcome::Success)
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}
