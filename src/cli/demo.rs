//! `eventqueue demo`: a simulated workflow and a simulated ingestion job, published to a
//! running server through the HTTP producer helpers, for a newcomer to watch (and cancel).
//! The command ([`DemoArgs`]) prints what to watch and how to cancel; [`run`] is the demo
//! itself, for tests and other callers.
//!
//! - The **workflow** plans, then runs three phases of tasks; each task publishes an artifact,
//!   each phase ends with a checkpoint (which emits its status and progress events), and the
//!   last checkpoint (`completed`) is followed by the `complete` event with the result. It
//!   checks for cancellation at every phase boundary.
//! - The **ingestion job** processes N "videos": per video a progress event when it starts,
//!   an artifact, and a progress event when it is done; video 3 reports a recoverable error.
//!   It checks for cancellation at every video boundary, so a cancel stops it between two
//!   videos, with `status: cancelled` as its last event.
//!
//! Both are ordinary [`Reporter`]s over [`HttpSink`]s: the demo is also an example of the
//! producer helpers. Its narration goes to a callback, so tests run it quietly against a
//! server of their own with short delays.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use crate::checkpoint::{Checkpoint, TaskStatus, WorkflowStatus};
use crate::cli::ConnArgs;
use crate::client::{Client, ClientError, CreateQueue, DEFAULT_URL, Route};
use crate::event::{
    ArtifactEvent, CompleteEvent, ErrorEvent, ProgressEvent, StatusEvent, TaskState,
};
use crate::ids::{TaskId, TenantId};
use crate::producer::{EventSink, HttpSink, Outcome, ProducerError, Reporter};

/// Receives the demo's narration, one line at a time.
pub type Narrate = Arc<dyn Fn(String) + Send + Sync>;

/// What the demo runs, and where.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// The server. Default `http://127.0.0.1:8000`.
    pub url: String,
    /// Bearer token (token mode); needs the `publish` and `subscribe` scopes.
    pub token: Option<String>,
    /// Tenant to act for in open mode (`X-Tenant-ID`). Default: the server's default.
    pub tenant: Option<TenantId>,
    /// The workflow's id (its queue's task id). Default `demo_workflow_` + 6 hex chars.
    pub workflow_id: TaskId,
    /// The ingestion job's id. Default `demo_ingestion_` + the same 6 hex chars.
    pub ingestion_id: TaskId,
    /// Videos the ingestion job processes. Default 8.
    pub videos: u64,
    /// Duration of one simulated unit of work (a task, a video). Default 1 s.
    pub delay: Duration,
    /// Run the workflow. Default true.
    pub workflow: bool,
    /// Run the ingestion job. Default true.
    pub ingestion: bool,
    /// PEM of a CA certificate to trust for an `https://` URL besides the system's. Default
    /// none.
    pub ca_cert_pem: Option<Vec<u8>>,
}

impl DemoOptions {
    /// Defaults, against the server at `url`, with fresh ids.
    ///
    /// # Errors
    ///
    /// Never in practice: the generated ids are valid. The signature keeps id validation
    /// visible.
    pub fn new(url: impl Into<String>) -> crate::Result<Self> {
        let suffix = format!("{:06x}", fastrand::u32(..1 << 24));
        Ok(Self {
            url: url.into(),
            token: None,
            tenant: None,
            workflow_id: TaskId::new(format!("demo_workflow_{suffix}"))?,
            ingestion_id: TaskId::new(format!("demo_ingestion_{suffix}"))?,
            videos: 8,
            delay: Duration::from_secs(1),
            workflow: true,
            ingestion: true,
            ca_cert_pem: None,
        })
    }

    /// Defaults against `http://127.0.0.1:8000`.
    ///
    /// # Errors
    ///
    /// As [`DemoOptions::new`].
    pub fn local() -> crate::Result<Self> {
        Self::new(DEFAULT_URL)
    }

    /// A client of these options' server, with their CA, token and tenant.
    ///
    /// # Errors
    ///
    /// As [`crate::client::ClientBuilder::build`]: [`ClientError::InvalidUrl`] for a bad
    /// server URL, [`ClientError::InvalidCaCert`] for a bad CA.
    pub fn client(&self) -> Result<Client, ClientError> {
        let mut builder = Client::builder(&self.url);
        if let Some(pem) = &self.ca_cert_pem {
            builder = builder.ca_cert_pem(pem.clone());
        }
        let mut client = builder.build()?;
        if let Some(token) = &self.token {
            client = client.with_token(token.clone());
        }
        if let Some(tenant) = &self.tenant {
            client = client.with_tenant(tenant.as_str());
        }
        Ok(client)
    }

    /// An HTTP sink for queue `task` with these options' server, CA, token and tenant.
    ///
    /// # Errors
    ///
    /// As [`DemoOptions::client`].
    pub fn sink(&self, task: &TaskId) -> Result<HttpSink, ClientError> {
        Ok(HttpSink::from_client(self.client()?, task))
    }

    /// Shell commands that watch, cancel and inspect the demo's tasks.
    pub fn commands(&self) -> Vec<String> {
        let base = self.url.trim_end_matches('/');
        let mut headers = String::new();
        let mut flags = String::new();
        if self.token.is_some() {
            headers.push_str(" -H \"Authorization: Bearer $TOKEN\"");
            flags.push_str(" --token \"$TOKEN\"");
        }
        if let Some(tenant) = &self.tenant {
            headers.push_str(&format!(" -H 'X-Tenant-ID: {tenant}'"));
            flags.push_str(&format!(" --tenant {tenant}"));
        }
        if self.ca_cert_pem.is_some() {
            headers.push_str(" --cacert \"$CA_CERT\"");
            flags.push_str(" --ca-cert \"$CA_CERT\"");
        }
        if base != DEFAULT_URL {
            flags.push_str(&format!(" --url {base}"));
        }
        let (wf, job) = (&self.workflow_id, &self.ingestion_id);
        let mut lines =
            vec!["Watch (in another terminal; a late watcher replays from the start):".into()];
        if self.workflow {
            lines.push(format!("  curl -N{headers} {base}/events/workflows/{wf}"));
        }
        if self.ingestion {
            lines.push(format!("  curl -N{headers} {base}/events/ingestion/{job}"));
        }
        lines.push("or with the CLI (progress bars; reconnects by itself):".into());
        if self.workflow {
            lines.push(format!("  cargo run --release -- watch{flags} {wf}"));
        }
        if self.ingestion {
            lines.push(format!(
                "  cargo run --release -- watch{flags} --ingestion {job}"
            ));
            lines.push("Cancel the ingestion job (it stops before the next video):".into());
            lines.push(format!(
                "  curl -X POST{headers} {base}/events/ingestion/{job}/cancel -d '{{\"reason\": \"user pressed stop\"}}'"
            ));
        }
        if self.workflow {
            lines.push("The workflow's latest checkpoint (what a restart resumes from):".into());
            lines.push(format!(
                "  curl{headers} {base}/events/workflows/{wf}/checkpoints/latest"
            ));
        }
        lines
    }
}

/// How each part of the demo ended.
#[derive(Debug, Clone, PartialEq)]
pub struct DemoReport {
    /// The workflow's outcome, if it ran.
    pub workflow: Option<Outcome>,
    /// The ingestion job's outcome, if it ran.
    pub ingestion: Option<Outcome>,
}

/// Runs the demo: creates the queues, narrates the commands to watch and cancel, then runs the
/// workflow and the ingestion job side by side until both have ended.
///
/// # Errors
///
/// When the server cannot be reached or refuses (bad token, a queue closed by someone else).
pub async fn run(options: &DemoOptions, narrate: Narrate) -> Result<DemoReport, ProducerError> {
    let tenant = options
        .tenant
        .as_ref()
        .map_or("the server's default tenant".to_string(), |t| {
            format!("tenant {t}")
        });
    narrate(format!("eventqueue demo on {} ({tenant})", options.url));
    if options.workflow {
        narrate(format!(
            "  workflow  {}: planning, 3 phases of tasks, a checkpoint after each phase",
            options.workflow_id
        ));
    }
    if options.ingestion {
        narrate(format!(
            "  ingestion {}: {} videos, {:?} each, cancellable between videos",
            options.ingestion_id, options.videos, options.delay
        ));
    }
    // Create both queues first, so the printed commands work at once.
    let workflow = match options.workflow {
        true => Some(prepare(options, &options.workflow_id, "workflow").await?),
        false => None,
    };
    let ingestion = match options.ingestion {
        true => Some(prepare(options, &options.ingestion_id, "ingestion").await?),
        false => None,
    };
    narrate(String::new());
    for line in options.commands() {
        narrate(line);
    }
    narrate(String::new());
    let delay = options.delay;
    let videos = options.videos;
    let (workflow, ingestion) = tokio::join!(
        async {
            match workflow {
                Some(sink) => run_workflow(sink, delay, narrate.clone()).await.map(Some),
                None => Ok(None),
            }
        },
        async {
            match ingestion {
                Some(sink) => run_ingestion(sink, videos, delay, narrate.clone())
                    .await
                    .map(Some),
                None => Ok(None),
            }
        }
    );
    let report = DemoReport {
        workflow: workflow?,
        ingestion: ingestion?,
    };
    narrate(format!(
        "demo finished: workflow {}, ingestion {}",
        describe(report.workflow.as_ref()),
        describe(report.ingestion.as_ref())
    ));
    Ok(report)
}

fn describe(outcome: Option<&Outcome>) -> String {
    match outcome {
        None => "not run".into(),
        Some(Outcome::Completed { .. }) => "completed".into(),
        Some(Outcome::Cancelled { reason }) => match reason {
            Some(r) => format!("cancelled ({r})"),
            None => "cancelled".into(),
        },
        Some(Outcome::Failed { message }) => format!("failed ({message})"),
    }
}

/// Creates the queue of `task` (an existing one is reused) and returns its sink.
async fn prepare(
    options: &DemoOptions,
    task: &TaskId,
    kind: &str,
) -> Result<HttpSink, ProducerError> {
    let sink = options.sink(task)?;
    let create = CreateQueue {
        kind: Some(kind.to_string()),
        ..CreateQueue::default()
    };
    match sink.client().create_queue(task.as_str(), &create).await {
        Ok(_) => Ok(sink),
        Err(e) if e.status() == Some(409) => Ok(sink),
        Err(e) => Err(e.into()),
    }
}

/// The workflow's phases and their tasks.
const PHASES: [(&str, &[&str]); 3] = [
    ("research", &["search_web", "search_videos"]),
    ("analysis", &["summarise", "extract_entities"]),
    ("report", &["draft_report"]),
];

/// The workflow's checkpoint after `done` phases.
fn workflow_checkpoint(workflow: &TaskId, done: usize, status: WorkflowStatus) -> Checkpoint {
    let mut c = Checkpoint::new(workflow, status).phase(done as u64, PHASES.len() as u64);
    for (i, (_, tasks)) in PHASES.iter().enumerate() {
        for task in *tasks {
            let status = if i < done {
                TaskStatus::Completed
            } else {
                TaskStatus::Pending
            };
            c = c.task(*task, status);
        }
    }
    c.state(json!({"query": "how do cats land on their feet?", "phases_done": done}))
}

/// Runs the simulated workflow to its end (completed, cancelled or failed).
///
/// # Errors
///
/// When its outcome cannot be reported (the server is gone).
pub async fn run_workflow(
    sink: HttpSink,
    delay: Duration,
    narrate: Narrate,
) -> Result<Outcome, ProducerError> {
    let wf = sink.task_id().clone();
    let label = format!("[workflow {wf}]");
    let outcome = Reporter::new(sink)
        .run(|r| {
            let (wf, label, narrate) = (wf.clone(), label.clone(), narrate.clone());
            async move {
                r.status(
                    StatusEvent::new(TaskState::Working)
                        .phase("planning")
                        .message("Planning workflow execution"),
                )
                .await?;
                narrate(format!("{label} planning"));
                tokio::time::sleep(delay).await;
                let plan: Vec<_> = PHASES
                    .iter()
                    .map(|(phase, tasks)| json!({"phase": phase, "tasks": tasks}))
                    .collect();
                r.artifact(ArtifactEvent::new("plan", json!({ "phases": plan })))
                    .await?;
                r.checkpoint(workflow_checkpoint(&wf, 0, WorkflowStatus::Running))
                    .await?;
                for (i, (phase, tasks)) in PHASES.iter().enumerate() {
                    r.check_cancelled().await?;
                    r.status(
                        StatusEvent::new(TaskState::Working)
                            .phase(*phase)
                            .message(format!("Phase {} of {}: {phase}", i + 1, PHASES.len())),
                    )
                    .await?;
                    narrate(format!("{label} phase {}/{}: {phase}", i + 1, PHASES.len()));
                    for task in *tasks {
                        tokio::time::sleep(delay).await;
                        r.artifact(ArtifactEvent::new(
                            "task_result",
                            json!({"task": task, "phase": phase, "summary": format!("{task} finished")}),
                        ))
                        .await?;
                    }
                    let last = i + 1 == PHASES.len();
                    let status = if last {
                        WorkflowStatus::Completed
                    } else {
                        WorkflowStatus::Running
                    };
                    let saved = r.checkpoint(workflow_checkpoint(&wf, i + 1, status)).await?;
                    narrate(format!("{label} checkpoint {} saved", saved.checkpoint_id));
                }
                Ok(CompleteEvent::new(json!({
                    "answer": "Cats twist their front half, then their back half, in mid-air.",
                    "sources": 3,
                }))
                .summary("Workflow completed successfully"))
            }
        })
        .await?;
    narrate(format!("{label} {}", describe(Some(&outcome))));
    Ok(outcome)
}

/// Runs the simulated ingestion job over `videos` videos to its end.
///
/// # Errors
///
/// When its outcome cannot be reported (the server is gone).
pub async fn run_ingestion(
    sink: HttpSink,
    videos: u64,
    delay: Duration,
    narrate: Narrate,
) -> Result<Outcome, ProducerError> {
    let job = sink.task_id().clone();
    let label = format!("[ingestion {job}]");
    let error_at = videos.min(3);
    let outcome = Reporter::new(sink)
        .run(|r| {
            let (label, narrate) = (label.clone(), narrate.clone());
            async move {
                r.status(
                    StatusEvent::new(TaskState::Working)
                        .phase("ingestion")
                        .message(format!("Ingesting {videos} videos")),
                )
                .await?;
                for n in 1..=videos {
                    // The video boundary: a cancel stops the job here, between two videos.
                    r.check_cancelled().await?;
                    let video = format!("video_{n}.mp4");
                    r.progress(
                        ProgressEvent::new(n - 1, videos)
                            .step(format!("processing_{video}"))
                            .details(json!({ "video": video })),
                    )
                    .await?;
                    tokio::time::sleep(delay).await;
                    if n == error_at {
                        r.error(
                            ErrorEvent::new(
                                "DecodeWarning",
                                format!("corrupt frame in {video}; skipped"),
                            )
                            .code("E_FRAME")
                            .context(json!({ "video": video, "frame": 1412 })),
                        )
                        .await?;
                        narrate(format!("{label} {video}: recoverable error reported"));
                    }
                    r.artifact(ArtifactEvent::new(
                        "video_embeddings",
                        json!({ "video": video, "segments": 4 + n % 3 }),
                    ))
                    .await?;
                    r.progress(
                        ProgressEvent::new(n, videos)
                            .step(format!("done_{video}"))
                            .details(json!({ "video": video })),
                    )
                    .await?;
                    narrate(format!("{label} {n}/{videos} {video} done"));
                }
                Ok(CompleteEvent::new(json!({
                    "videos_processed": videos,
                    "recoverable_errors": u64::from(videos > 0),
                }))
                .summary(format!("Ingested {videos} videos")))
            }
        })
        .await?;
    narrate(format!("{label} {}", describe(Some(&outcome))));
    Ok(outcome)
}

/// Which parts of the demo to run.
#[derive(Copy, Clone, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Only {
    /// The multi-phase workflow with checkpoints.
    Workflow,
    /// The ingestion job over N videos.
    Ingestion,
}

/// Flags of `eventqueue demo`.
#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// The server, and who is calling.
    #[command(flatten)]
    conn: ConnArgs,
    /// Videos the ingestion job processes.
    #[arg(long, value_name = "N", default_value_t = 8)]
    videos: u64,
    /// Milliseconds of one simulated unit of work (a workflow task, a video).
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    delay_ms: u64,
    /// Run only one of the two.
    #[arg(long, value_enum)]
    only: Option<Only>,
    /// Task id of the workflow [default: demo_workflow_ + 6 random hex chars]
    #[arg(long, value_name = "ID")]
    workflow_id: Option<String>,
    /// Task id of the ingestion job [default: demo_ingestion_ + the same 6 hex chars]
    #[arg(long, value_name = "ID")]
    ingestion_id: Option<String>,
}

/// Runs `eventqueue demo`; Ctrl-C cancels both tasks through the server (they stop at their
/// next boundary and report `status: cancelled`).
pub(super) async fn demo(args: DemoArgs) -> Result<(), String> {
    let mut options = DemoOptions::new(args.conn.url).map_err(|e| e.to_string())?;
    options.token = args.conn.token.filter(|t| !t.trim().is_empty());
    options.tenant = args
        .conn
        .tenant
        .filter(|t| !t.is_empty())
        .map(TenantId::new)
        .transpose()
        .map_err(|e| e.to_string())?;
    if let Some(id) = args.workflow_id {
        options.workflow_id = TaskId::new(id).map_err(|e| e.to_string())?;
    }
    if let Some(id) = args.ingestion_id {
        options.ingestion_id = TaskId::new(id).map_err(|e| e.to_string())?;
    }
    options.videos = args.videos;
    options.delay = Duration::from_millis(args.delay_ms);
    options.workflow = args.only != Some(Only::Ingestion);
    options.ingestion = args.only != Some(Only::Workflow);
    if let Some(path) = &args.conn.ca_cert {
        let pem = tokio::fs::read(path)
            .await
            .map_err(|e| format!("--ca-cert: cannot read {}: {e}", path.display()))?;
        options.ca_cert_pem = Some(pem);
    }

    let narrate: Narrate = Arc::new(|line: String| println!("{line}"));
    let interrupt = tokio::spawn(cancel_on_ctrl_c(options.clone(), narrate.clone()));
    let result = run(&options, narrate).await;
    interrupt.abort();
    result.map(drop).map_err(|e| format!("demo failed: {e}"))
}

/// On Ctrl-C, asks the server to cancel both tasks (the producers then stop themselves).
async fn cancel_on_ctrl_c(options: DemoOptions, narrate: Narrate) {
    if tokio::signal::ctrl_c().await.is_err() {
        return;
    }
    narrate("Ctrl-C: cancelling; the tasks stop at their next boundary".into());
    let Ok(client) = options.client() else {
        return;
    };
    for (selected, route, id) in [
        (options.workflow, Route::Workflow, &options.workflow_id),
        (options.ingestion, Route::Ingestion, &options.ingestion_id),
    ] {
        if selected {
            // A task that already finished answers 409: nothing to cancel.
            let _ = client
                .cancel(route, id.as_str(), Some("demo interrupted"))
                .await;
        }
    }
}
