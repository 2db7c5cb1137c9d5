//! `eventqueue watch`: follow a task live, reconnecting by itself.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use crate::cli::render::View;
use crate::cli::{CliError, ConnArgs, Outcome, remote_error, task_arg, unknown_queue};
use crate::client::{
    Client, EndReason, ReconnectPolicy, Route, StreamEvent, StreamItem, SubscribeOptions,
    Subscription,
};

/// Flags of `eventqueue watch`.
#[derive(clap::Args, Debug, Clone)]
#[command(after_help = "Examples:
  eventqueue watch workflow_123
  eventqueue watch ingest_42 --ingestion --from 10
  eventqueue watch workflow_123 --json | jq -c 'select(.event_type == \"error\")'
  eventqueue watch job_7 --wait 60    # started before the producer creates the queue

Exit status: 0 when the task completed, 1 when it failed or was cancelled (or the watch
failed for good), 2 for usage errors, unknown queues, and what no retry can fix (a bad URL,
a certificate refused, a server that does not speak the URL's protocol). With --wait SECS, a
queue still not created after SECS is an unknown queue too: 2, as without --wait, so 1 always
means that the task (or the watch) failed.")]
pub struct WatchArgs {
    /// Task id of the queue to watch.
    pub task_id: String,
    /// Read the ingestion route (`/events/ingestion/{id}`) instead of the workflow route.
    #[arg(long)]
    pub ingestion: bool,
    /// First offset to show (inclusive).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub from: u64,
    /// Print each event as one JSON line exactly as stored (for `jq`); messages go to stderr.
    #[arg(long)]
    pub json: bool,
    /// Wait for the queue to be created instead of failing at once: up to SECS seconds, or
    /// without a value as long as it takes (put it after the task id, or write --wait=SECS)
    #[arg(long, value_name = "SECS", value_parser = wait_secs)]
    pub wait: Option<Option<u64>>,
    /// Give up after this many failed reconnection attempts in a row [default: never]
    #[arg(long, value_name = "N")]
    pub max_retries: Option<u32>,
    /// First reconnection delay; doubled after each failed attempt.
    #[arg(long, value_name = "MS", default_value_t = 250)]
    pub retry_initial_ms: u64,
    /// Longest reconnection delay.
    #[arg(long, value_name = "MS", default_value_t = 10_000)]
    pub retry_max_ms: u64,
    /// Where the server is and who is calling (`--url`, `--token`, `--tenant`).
    #[command(flatten)]
    pub conn: ConnArgs,
}

/// Parses `--wait`'s value, with a hint for `--wait TASK`, which reads the task id as SECS.
fn wait_secs(text: &str) -> Result<u64, String> {
    text.parse().map_err(|_| {
        format!(
            "expected whole seconds; to wait as long as it takes, put --wait after the task id \
             (`watch {text} --wait`)"
        )
    })
}

/// How often a `--wait`ing watch asks whether the queue exists now.
const WAIT_POLL: Duration = Duration::from_millis(250);

/// How the stream's events are shown.
enum Output {
    Json,
    Human(View),
}

impl Output {
    /// Shows an event; false once stdout's reader has gone away (`watch … | head`).
    fn event(&mut self, ev: &StreamEvent) -> bool {
        match self {
            Output::Json => {
                let mut out = std::io::stdout().lock();
                match writeln!(out, "{}", ev.data).and_then(|()| out.flush()) {
                    Err(e) => e.kind() != std::io::ErrorKind::BrokenPipe,
                    Ok(()) => true,
                }
            }
            Output::Human(view) => {
                view.event(ev);
                !view.is_closed()
            }
        }
    }

    fn outcome(&mut self, ok: bool, text: &str) {
        match self {
            Output::Json => eprintln!("{text}"),
            Output::Human(view) => view.outcome(ok, text),
        }
    }

    /// A message for the person watching: stderr, above the bars.
    fn note(&self, text: &str) {
        match self {
            Output::Human(view) => view.note(text),
            Output::Json => eprintln!("{text}"),
        }
    }
}

/// The watched task's terminal event, judged.
fn verdict(ev: &StreamEvent) -> (bool, String) {
    let v = ev.json().unwrap_or_default();
    let s = |k: &str| v.get(k).and_then(serde_json::Value::as_str).unwrap_or("");
    match ev.event_type.as_str() {
        "complete" => (true, format!("✔ task completed (offset {})", ev.offset)),
        "error" => (
            false,
            format!(
                "✘ task failed: {}: {} (offset {})",
                s("error_type"),
                s("error_message"),
                ev.offset
            ),
        ),
        _ => {
            let state = s("state");
            let msg = match s("message") {
                "" => String::new(),
                m => format!(": {m}"),
            };
            (false, format!("✘ task {state}{msg} (offset {})", ev.offset))
        }
    }
}

/// Runs `eventqueue watch`.
///
/// # Errors
///
/// Usage errors and an unknown queue (2) — with `--wait`, a queue still unknown when the wait
/// ran out; authentication failures, or the server staying unreachable past `--max-retries`
/// (1).
pub async fn watch(args: WatchArgs) -> Result<Outcome, CliError> {
    task_arg(&args.task_id)?;
    let client = args.conn.client().await?;
    let options = SubscribeOptions {
        route: if args.ingestion {
            Route::Ingestion
        } else {
            Route::Workflow
        },
        from_offset: args.from,
        reconnect: ReconnectPolicy {
            initial_delay: Duration::from_millis(args.retry_initial_ms.max(1)),
            max_delay: Duration::from_millis(args.retry_max_ms.max(1)),
            max_attempts: args.max_retries,
        },
        ..SubscribeOptions::default()
    };
    let mut out = if args.json {
        Output::Json
    } else {
        Output::Human(View::new(std::io::stdout().is_terminal()))
    };
    let started = Instant::now();
    let mut waiting = false;
    loop {
        match follow(&mut out, &client, &options, &args).await? {
            Followed::Ended(outcome) => return Ok(outcome),
            Followed::NoQueue => {}
        }
        let limit = match args.wait {
            None => return Err(unknown_queue(&args.conn, &args.task_id)),
            Some(limit) => limit.map(Duration::from_secs),
        };
        let left = limit.map(|limit| limit.saturating_sub(started.elapsed()));
        if left == Some(Duration::ZERO) {
            let waited = limit.unwrap_or_default().as_secs();
            return Err(CliError::usage(format!(
                "no queue {:?} for {} at {} after waiting {waited}s (check the task id, or \
                 --tenant / EVENTQUEUE_TENANT)",
                args.task_id,
                args.conn.tenant_label(),
                args.conn.url
            )));
        }
        if !waiting {
            waiting = true;
            let until = match limit {
                Some(limit) => format!("up to {}s", limit.as_secs()),
                None => "Ctrl-C to stop".to_string(),
            };
            out.note(&format!(
                "waiting for queue {:?} of {} at {} to be created ({until})",
                args.task_id,
                args.conn.tenant_label(),
                args.conn.url
            ));
        }
        tokio::time::sleep(left.map_or(WAIT_POLL, |left| left.min(WAIT_POLL))).await;
    }
}

/// How one subscription ended.
enum Followed {
    /// The stream ended; the watch's outcome.
    Ended(Outcome),
    /// The queue did not exist (when the stream first reached the server).
    NoQueue,
}

/// Follows the task with one subscription, until its stream ends or turns out to have no
/// queue.
async fn follow(
    out: &mut Output,
    client: &Client,
    options: &SubscribeOptions,
    args: &WatchArgs,
) -> Result<Followed, CliError> {
    let mut sub = client.subscribe(&args.task_id, options.clone());
    let mut terminal: Option<StreamEvent> = None;
    let mut announced = false;
    while let Some(item) = sub.next().await {
        match item {
            Err(e) if e.is_not_found() && !announced => return Ok(Followed::NoQueue),
            Err(e) => return Err(remote_error(e, &args.conn, Some(&args.task_id))),
            // The server was unreachable at first and, once reached, had no such queue: the
            // queue was never seen, so it is unknown rather than gone.
            Ok(StreamItem::End(EndReason::QueueGone)) if !announced => {
                return Ok(Followed::NoQueue);
            }
            Ok(StreamItem::Connected(c)) => {
                if !announced {
                    announced = true;
                    if !args.json {
                        out.note(&format!(
                            "watching {} (tenant {}) at {}: {} events so far, from offset {}",
                            c.task_id, c.tenant_id, args.conn.url, c.latest_offset, c.offset
                        ));
                    }
                }
            }
            Ok(StreamItem::Event(ev)) => {
                if !out.event(&ev) {
                    // Nobody reads any more: stop quietly, as `cat` does.
                    return Ok(Followed::Ended(Outcome::Success));
                }
                if ev.is_terminal() {
                    terminal = Some(ev);
                }
            }
            Ok(StreamItem::Gap {
                requested_offset,
                first_available_offset,
            }) => out.note(&format!(
                "warning: events {requested_offset}..{first_available_offset} were dropped by \
                 retention before they could be shown"
            )),
            Ok(StreamItem::Reconnecting {
                attempt,
                delay,
                error,
                resume_from,
            }) => {
                let wait = delay.as_secs_f64();
                out.note(&if !announced {
                    format!(
                        "cannot reach {} ({error}); retrying in {wait:.1}s (attempt {attempt})",
                        args.conn.url
                    )
                } else if attempt == 1 {
                    format!(
                        "connection lost ({error}); reconnecting in {wait:.1}s, resuming at \
                         offset {resume_from}"
                    )
                } else {
                    format!(
                        "reconnecting: attempt {} failed ({error}); next in {wait:.1}s",
                        attempt - 1
                    )
                });
            }
            Ok(StreamItem::Reconnected { resume_from }) => {
                out.note(&format!("reconnected; resuming at offset {resume_from}"))
            }
            Ok(StreamItem::End(reason)) => {
                let outcome = finish(out, reason, terminal, &mut sub, options, args).await?;
                return Ok(Followed::Ended(outcome));
            }
        }
    }
    Err(CliError::failure("the stream ended unexpectedly"))
}

async fn finish(
    out: &mut Output,
    reason: EndReason,
    terminal: Option<StreamEvent>,
    sub: &mut Subscription,
    options: &SubscribeOptions,
    args: &WatchArgs,
) -> Result<Outcome, CliError> {
    let judge = |out: &mut Output, ev: &StreamEvent| {
        let (ok, text) = verdict(ev);
        out.outcome(ok, &text);
        if ok {
            Outcome::Success
        } else {
            Outcome::TaskFailed
        }
    };
    match reason {
        EndReason::Finished { .. } => match terminal {
            Some(ev) => Ok(judge(out, &ev)),
            None => Err(CliError::failure(
                "the stream ended without its final event",
            )),
        },
        EndReason::AlreadyFinished => {
            // The task ended before `--from`: find its terminal event to say how it ended.
            out.note(&format!(
                "the task finished before offset {}; looking up how it ended",
                sub.resume_offset()
            ));
            let client = args.conn.client().await?;
            let mut replay = client.subscribe(
                &args.task_id,
                SubscribeOptions {
                    from_offset: 0,
                    ..options.clone()
                },
            );
            while let Some(item) = replay.next().await {
                match item {
                    Ok(StreamItem::Event(ev)) if ev.is_terminal() => {
                        return Ok(judge(out, &ev));
                    }
                    Ok(StreamItem::End(_)) => break,
                    Ok(_) => {}
                    Err(e) => return Err(remote_error(e, &args.conn, Some(&args.task_id))),
                }
            }
            out.outcome(
                false,
                "✘ the task finished, but its final event is no longer retained",
            );
            Ok(Outcome::TaskFailed)
        }
        EndReason::Closed => {
            out.outcome(false, "✘ the queue was closed before the task finished");
            Ok(Outcome::TaskFailed)
        }
        EndReason::QueueGone => {
            out.outcome(
                false,
                "✘ the queue was deleted or expired before the task finished",
            );
            Ok(Outcome::TaskFailed)
        }
    }
}
