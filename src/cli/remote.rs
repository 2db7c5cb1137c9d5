//! `eventqueue queues`, `info`, `cancel` and `publish`: one-shot calls to a running server.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};

use crate::cli::{CliError, ConnArgs, Outcome, remote_error, task_arg};
use crate::client::{
    Client, ClientError, CreateQueue, ListFilter, PendingAck, Pipeline, PublishOutcome,
    RemoteQueueInfo, Route,
};

/// Flags of `eventqueue queues`.
#[derive(clap::Args, Debug, Clone)]
#[command(after_help = "Examples:
  eventqueue queues
  eventqueue queues --kind workflow --state running,cancelled --prefix nightly-
  eventqueue queues --limit 20
  EVENTQUEUE_TENANT=acme eventqueue queues --json | jq '.[].task_id'")]
pub struct QueuesArgs {
    /// Print the server's JSON array instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Only these kinds, comma-separated: workflow, ingestion, task.
    #[arg(long, value_name = "KINDS", value_delimiter = ',')]
    pub kind: Vec<String>,
    /// Only these states, comma-separated: running, closed, finished, cancelled.
    #[arg(long, value_name = "STATES", value_delimiter = ',')]
    pub state: Vec<String>,
    /// Only task ids starting with this text.
    #[arg(long, value_name = "TEXT")]
    pub prefix: Option<String>,
    /// Only the N most recently active queues (1..=1000), newest first; without it every
    /// matching queue, by task id.
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    /// Where the server is and who is calling (`--url`, `--token`, `--tenant`).
    #[command(flatten)]
    pub conn: ConnArgs,
}

/// Flags of `eventqueue info`.
#[derive(clap::Args, Debug, Clone)]
#[command(after_help = "Examples:
  eventqueue info workflow_123
  eventqueue info workflow_123 --json | jq .latest_offset")]
pub struct InfoArgs {
    /// Task id of the queue.
    pub task_id: String,
    /// Print the server's JSON object instead of a listing.
    #[arg(long)]
    pub json: bool,
    /// Where the server is and who is calling (`--url`, `--token`, `--tenant`).
    #[command(flatten)]
    pub conn: ConnArgs,
}

/// Flags of `eventqueue cancel`.
#[derive(clap::Args, Debug, Clone)]
#[command(after_help = "Example:
  eventqueue cancel workflow_123 --reason \"user pressed stop\"

Cancelling appends no event and ends no stream: the producer sees the cancellation in its
next enqueue answer (or the queue info) and reports `status: cancelled` itself.")]
pub struct CancelArgs {
    /// Task id of the queue.
    pub task_id: String,
    /// Why the task is cancelled (stored with the cancellation).
    #[arg(long)]
    pub reason: Option<String>,
    /// Use the ingestion route (`/events/ingestion/{id}/cancel`); only the wording differs.
    #[arg(long)]
    pub ingestion: bool,
    /// Where the server is and who is calling (`--url`, `--token`, `--tenant`).
    #[command(flatten)]
    pub conn: ConnArgs,
}

/// Flags of `eventqueue publish`.
#[derive(clap::Args, Debug, Clone)]
#[command(after_help = "Examples:
  eventqueue publish workflow_123 --event '{\"event_type\": \"status\", \"state\": \"working\"}'
  eventqueue publish workflow_123 --file events.jsonl
  producer | eventqueue publish workflow_123 -

Events are JSON objects as the HTTP API takes them (task_id and tenant_id may be omitted).
From a file or stdin, one event per line; lines are sent in batches, each stored
atomically. Prints the offset of each event, one per line. Batches go over the server's
pipelined producer connection (a WebSocket: the next batch is sent without waiting for the
previous answer) when the server has it, else one HTTP request at a time.")]
pub struct PublishArgs {
    /// Task id of the queue.
    pub task_id: String,
    /// `-` to read JSON lines from stdin.
    #[arg(value_name = "-", conflicts_with_all = ["event", "file"])]
    pub stdin: Option<String>,
    /// One event, as a JSON object.
    #[arg(long, value_name = "JSON", conflicts_with = "file")]
    pub event: Option<String>,
    /// A file of JSON lines, one event per line (`-` for stdin).
    #[arg(long, value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// Most events per request (the server takes up to 1000 by default).
    #[arg(long, value_name = "N", default_value_t = 100,
          value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub batch_size: u64,
    /// Create the queue first if it does not exist.
    #[arg(long)]
    pub create: bool,
    /// Kind of a queue made by --create: workflow, ingestion or task.
    #[arg(long, value_name = "KIND", requires = "create")]
    pub kind: Option<String>,
    /// Where the server is and who is calling (`--url`, `--token`, `--tenant`).
    #[command(flatten)]
    pub conn: ConnArgs,
}

/// Runs `eventqueue queues`.
///
/// # Errors
///
/// An unreachable server or an error answer (1).
pub async fn queues(args: QueuesArgs) -> Result<Outcome, CliError> {
    let client = args.conn.client().await?;
    let filter = ListFilter {
        kinds: args.kind.clone(),
        states: args.state.clone(),
        task_id_prefix: args.prefix.clone(),
    };
    let (list, more) = match args.limit {
        None => (client.list_queues_matching(&filter).await, false),
        Some(limit) => match client.list_queues_page(&filter, limit, None).await {
            Ok(page) => (Ok(page.queues), page.next_cursor.is_some()),
            Err(e) => (Err(e), false),
        },
    };
    let list = list.map_err(|e| remote_error(e, &args.conn, None))?;
    if more {
        eprintln!(
            "more queues match; these are the {} most recently active",
            list.len()
        );
    }
    if args.json {
        print_json(&list)?;
        return Ok(Outcome::Success);
    }
    if list.is_empty() {
        println!("no queues for {}", args.conn.tenant_label());
        return Ok(Outcome::Success);
    }
    let mut rows = vec![[
        "TASK".to_string(),
        "TENANT".to_string(),
        "KIND".to_string(),
        "EVENTS".to_string(),
        "OFFSET".to_string(),
        "STATE".to_string(),
        "LAST ACTIVITY".to_string(),
    ]];
    for q in &list {
        rows.push([
            q.task_id.clone(),
            q.tenant_id.clone(),
            q.kind.clone(),
            q.event_count.to_string(),
            q.latest_offset.to_string(),
            state_label(q),
            q.last_activity.clone(),
        ]);
    }
    let widths: Vec<usize> = (0..7)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
    Ok(Outcome::Success)
}

/// The queue's state as `GET /events/queues?state=` names it — the first of `cancelled`,
/// `finished`, `closed` that applies, else `running` — followed by the other flags that also
/// hold (`cancelled,finished`: cancelled, and the producer has since stopped).
fn state_label(q: &RemoteQueueInfo) -> String {
    let flags = [
        (q.is_cancelled, "cancelled"),
        (q.is_finished, "finished"),
        (q.is_closed, "closed"),
    ];
    let parts: Vec<&str> = flags
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, name)| *name)
        .collect();
    if parts.is_empty() {
        "running".to_string()
    } else {
        parts.join(",")
    }
}

fn print_json<T: serde::Serialize>(value: &T) -> Result<(), CliError> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| CliError::failure(format!("cannot print JSON: {e}")))?;
    println!("{text}");
    Ok(())
}

/// Runs `eventqueue info`.
///
/// # Errors
///
/// An unknown queue (2); an unreachable server or an error answer (1).
pub async fn info(args: InfoArgs) -> Result<Outcome, CliError> {
    task_arg(&args.task_id)?;
    let client = args.conn.client().await?;
    let q = client
        .queue_info(&args.task_id)
        .await
        .map_err(|e| remote_error(e, &args.conn, Some(&args.task_id)))?;
    if args.json {
        print_json(&q)?;
        return Ok(Outcome::Success);
    }
    let retained = if q.event_count == 0 {
        "none".to_string()
    } else {
        format!("{}..{}", q.first_offset, q.latest_offset - 1)
    };
    let cancel = match (q.is_cancelled, &q.cancel_reason) {
        (false, _) => "no".to_string(),
        (true, Some(r)) => format!("yes: {r}"),
        (true, None) => "yes".to_string(),
    };
    let lines = [
        ("task", q.task_id.clone()),
        ("tenant", q.tenant_id.clone()),
        ("kind", q.kind.clone()),
        ("state", state_label(&q)),
        ("cancelled", cancel),
        (
            "events retained",
            format!("{} (offsets {retained})", q.event_count),
        ),
        ("latest offset", q.latest_offset.to_string()),
        ("subscribers", q.subscriber_count.to_string()),
        ("created", q.created_at.clone()),
        ("last activity", q.last_activity.clone()),
        ("ttl", format!("{} min from last activity", q.ttl_minutes)),
        ("max buffer size", q.max_buffer_size.to_string()),
    ];
    for (k, v) in lines {
        println!("{k:<16} {v}");
    }
    Ok(Outcome::Success)
}

/// Runs `eventqueue cancel`.
///
/// # Errors
///
/// An unknown queue (2); a finished task, an unreachable server or an error answer (1).
pub async fn cancel(args: CancelArgs) -> Result<Outcome, CliError> {
    task_arg(&args.task_id)?;
    let client = args.conn.client().await?;
    let route = if args.ingestion {
        Route::Ingestion
    } else {
        Route::Workflow
    };
    match client
        .cancel(route, &args.task_id, args.reason.as_deref())
        .await
    {
        Ok(answer) => {
            println!("{}", answer.message);
            Ok(Outcome::Success)
        }
        Err(ClientError::Api {
            status: 409,
            detail,
        }) => Err(CliError::failure(format!(
            "{detail}: there is nothing left to cancel"
        ))),
        Err(e) => Err(remote_error(e, &args.conn, Some(&args.task_id))),
    }
}

/// How long `publish` waits for more lines before sending a partial batch, so that a producer
/// piping events one by one is not delayed until a batch fills.
const LINGER: Duration = Duration::from_millis(50);

/// Runs `eventqueue publish`.
///
/// # Errors
///
/// No event source, an invalid JSON line or an unknown queue (2); an unreachable server or an
/// error answer (1). Batches sent before the failure stay stored; the message says how many.
pub async fn publish(args: PublishArgs) -> Result<Outcome, CliError> {
    task_arg(&args.task_id)?;
    let client = args.conn.client().await?;
    if args.create {
        let options = CreateQueue {
            kind: args.kind.clone(),
            ..CreateQueue::default()
        };
        match client.create_queue(&args.task_id, &options).await {
            Ok(_) | Err(ClientError::Api { status: 409, .. }) => {}
            Err(e) => return Err(remote_error(e, &args.conn, Some(&args.task_id))),
        }
    }
    // A single `--event` gains nothing from a pipeline.
    let pipeline = if args.event.is_none() {
        client.pipeline(&args.task_id).await.ok()
    } else {
        None
    };
    let mut publisher = Publisher {
        client: &client,
        args: &args,
        sent: 0,
        cancelled: false,
        pipeline,
        pending: std::collections::VecDeque::new(),
    };
    match (&args.event, &args.file, args.stdin.as_deref()) {
        (Some(text), None, None) => {
            let event = parse_event(text, "--event")?;
            publisher.send(vec![event]).await?;
            publisher.finish().await?;
        }
        (None, Some(path), None) if path.as_os_str() == "-" => {
            publisher.lines(tokio::io::stdin(), "stdin").await?;
        }
        (None, Some(path), None) => {
            let file = tokio::fs::File::open(path)
                .await
                .map_err(|e| CliError::usage(format!("cannot open {}: {e}", path.display())))?;
            publisher.lines(file, &path.display().to_string()).await?;
        }
        (None, None, Some("-")) => publisher.lines(tokio::io::stdin(), "stdin").await?,
        (None, None, Some(other)) => {
            return Err(CliError::usage(format!(
                "unexpected argument {other:?}: give `-` for stdin, --file FILE or --event JSON"
            )));
        }
        _ => {
            return Err(CliError::usage(
                "nothing to publish: give --event JSON, --file FILE, or `-` to read JSON lines \
                 from stdin",
            ));
        }
    }
    if publisher.cancelled {
        eprintln!(
            "note: task {} was cancelled; its producer should stop and report `status: cancelled`",
            args.task_id
        );
    }
    Ok(Outcome::Success)
}

fn parse_event(text: &str, source: &str) -> Result<Value, CliError> {
    match serde_json::from_str::<Value>(text) {
        Ok(v @ Value::Object(_)) => Ok(v),
        Ok(_) => Err(CliError::usage(format!(
            "{source}: an event must be a JSON object"
        ))),
        Err(e) => Err(CliError::usage(format!("{source}: invalid JSON: {e}"))),
    }
}

struct Publisher<'a> {
    client: &'a Client,
    args: &'a PublishArgs,
    /// Events stored so far.
    sent: u64,
    cancelled: bool,
    /// The pipelined producer connection, when the server has it.
    pipeline: Option<Pipeline>,
    /// Batches sent on it and not answered yet, in order.
    pending: std::collections::VecDeque<PendingAck>,
}

/// Batches in flight on the pipeline before `publish` waits for the oldest answer.
const PIPELINE_DEPTH: usize = 64;

impl Publisher<'_> {
    async fn send(&mut self, events: Vec<Value>) -> Result<(), CliError> {
        if events.is_empty() {
            return Ok(());
        }
        if let Some(pipeline) = &self.pipeline {
            let sent = if events.len() == 1 {
                pipeline.send(&events[0]).await
            } else {
                pipeline.send_batch(&events).await
            };
            let ack = sent.map_err(|e| self.error(e))?;
            self.pending.push_back(ack);
            while self.pending.len() >= PIPELINE_DEPTH {
                self.answer_oldest().await?;
            }
            return Ok(());
        }
        let result = if events.len() == 1 {
            self.client.publish(&self.args.task_id, &events[0]).await
        } else {
            self.client.publish_batch(&self.args.task_id, &events).await
        };
        let answer = result.map_err(|e| self.error(e))?;
        self.record(answer);
        Ok(())
    }

    /// Waits for the oldest answer due on the pipeline and prints its offsets.
    async fn answer_oldest(&mut self) -> Result<(), CliError> {
        if let Some(ack) = self.pending.pop_front() {
            let answer = ack.outcome().await.map_err(|e| self.error(e))?;
            self.record(answer);
        }
        Ok(())
    }

    /// Waits for every answer still due.
    async fn finish(&mut self) -> Result<(), CliError> {
        while !self.pending.is_empty() {
            self.answer_oldest().await?;
        }
        Ok(())
    }

    fn error(&self, e: ClientError) -> CliError {
        let mut err = remote_error(e, &self.args.conn, Some(&self.args.task_id));
        if self.sent > 0 {
            err.message
                .push_str(&format!(" ({} events before it were stored)", self.sent));
        }
        err
    }

    fn record(&mut self, answer: PublishOutcome) {
        self.sent += answer.offsets.len() as u64;
        self.cancelled |= answer.cancelled;
        let text: String = answer.offsets.iter().map(|o| format!("{o}\n")).collect();
        print!("{text}");
    }

    /// Reads JSON lines and sends them in batches of at most `--batch-size`, sending early
    /// when no line arrives for a moment.
    async fn lines(&mut self, input: impl AsyncRead + Unpin, source: &str) -> Result<(), CliError> {
        let mut lines = BufReader::new(input).lines();
        let max = usize::try_from(self.args.batch_size).unwrap_or(usize::MAX);
        let mut batch = Vec::new();
        let mut number = 0u64;
        loop {
            let next = if batch.is_empty() && self.pending.is_empty() {
                lines.next_line().await
            } else {
                match tokio::time::timeout(LINGER, lines.next_line()).await {
                    Ok(r) => r,
                    // No line for a moment: send the partial batch, or print the answers of
                    // batches sent (a slow producer sees its offsets as they come).
                    Err(_) if batch.is_empty() => {
                        self.answer_oldest().await?;
                        continue;
                    }
                    Err(_) => {
                        self.send(std::mem::take(&mut batch)).await?;
                        continue;
                    }
                }
            };
            let line = match next {
                Ok(Some(line)) => line,
                Ok(None) => break,
                Err(e) => {
                    return Err(CliError::failure(format!("cannot read {source}: {e}")));
                }
            };
            number += 1;
            if line.trim().is_empty() {
                continue;
            }
            batch.push(parse_event(&line, &format!("{source} line {number}"))?);
            if batch.len() >= max {
                self.send(std::mem::take(&mut batch)).await?;
            }
        }
        self.send(batch).await?;
        self.finish().await
    }
}
