//! `eventqueue demo`: runs the simulated workflow and ingestion job of [`eventqueue::demo`]
//! against a running server and prints what to watch and how to cancel.

use std::time::Duration;

use eventqueue::cli::ConnArgs;
use eventqueue::client::{Client, Route};
use eventqueue::demo::{self, DemoOptions, Narrate};
use eventqueue::{TaskId, TenantId};

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

/// Runs the demo; Ctrl-C cancels both tasks through the server (they stop at their next
/// boundary and report `status: cancelled`).
pub async fn run(args: DemoArgs) -> Result<(), String> {
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

    let narrate: Narrate = std::sync::Arc::new(|line: String| println!("{line}"));
    let interrupt = tokio::spawn(cancel_on_ctrl_c(options.clone(), narrate.clone()));
    let result = demo::run(&options, narrate).await;
    interrupt.abort();
    result.map(drop).map_err(|e| format!("demo failed: {e}"))
}

/// On Ctrl-C, asks the server to cancel both tasks (the producers then stop themselves).
async fn cancel_on_ctrl_c(options: DemoOptions, narrate: Narrate) {
    if tokio::signal::ctrl_c().await.is_err() {
        return;
    }
    narrate("Ctrl-C: cancelling; the tasks stop at their next boundary".into());
    let Ok(mut client) = Client::new(&options.url) else {
        return;
    };
    if let Some(token) = &options.token {
        client = client.with_token(token.clone());
    }
    if let Some(tenant) = &options.tenant {
        client = client.with_tenant(tenant.as_str());
    }
    for (run, route, id) in [
        (options.workflow, Route::Workflow, &options.workflow_id),
        (options.ingestion, Route::Ingestion, &options.ingestion_id),
    ] {
        if run {
            // A task that already finished answers 409: nothing to cancel.
            let _ = client
                .cancel(route, id.as_str(), Some("demo interrupted"))
                .await;
        }
    }
}
