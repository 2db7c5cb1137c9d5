//! The command line a person uses, run as a person would: the real `eventqueue` binary against
//! a real `eventqueue serve` started by each test on a free port with its own data directory.
//! `watch` exit codes, `--json` output against the stored events, reconnection across a server
//! restart, `publish` from stdin, `queues` / `info` / `cancel`, the offline `dump` and
//! `inspect` (and their refusal while a server holds the database), `watch --wait` for a queue
//! created later, and the progress bars under a pseudo-terminal (one per progress series).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// Longest wait for anything expected; only guards against hangs.
const HANG_GUARD: Duration = Duration::from_secs(30);

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_eventqueue"))
}

/// A running `eventqueue serve` on a data directory of its own.
struct Server {
    child: Option<Child>,
    dir: tempfile::TempDir,
    port: u16,
    /// Extra `serve` flags.
    flags: Vec<String>,
}

impl Server {
    fn start() -> Server {
        Self::start_with(&[])
    }

    fn start_with(flags: &[&str]) -> Server {
        let mut server = Server {
            child: None,
            dir: tempfile::tempdir().unwrap(),
            port: 0,
            flags: flags.iter().map(|f| f.to_string()).collect(),
        };
        // A free port can be taken by another process between our probe and the server's
        // bind: then the server exits and the next port is tried.
        for _ in 0..5 {
            server.port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            if server.try_start() {
                return server;
            }
        }
        panic!(
            "the server could not bind a free port; log:\n{}",
            server.log()
        );
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn url(&self) -> String {
        let scheme = if self.flags.iter().any(|f| f == "--tls-cert") {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// Starts the server (again, on the same port and data directory) and waits until it
    /// accepts connections.
    fn restart(&mut self) {
        assert!(self.try_start(), "the server exited; log:\n{}", self.log());
    }

    /// Starts the server on `self.port` and waits until it says it listens there; false if
    /// it exited first (the port was taken).
    fn try_start(&mut self) -> bool {
        assert!(self.child.is_none(), "already running");
        let listening = format!("listening on {}", self.url());
        let before = self.log().matches(&listening).count();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("server.log"))
            .unwrap();
        let child = Command::new(bin())
            .arg("serve")
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("--bind")
            .arg(format!("127.0.0.1:{}", self.port))
            .args(&self.flags)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("cannot start eventqueue serve");
        self.child = Some(child);
        let started = Instant::now();
        // Its own line in the log, not just an open port: another process may hold the port.
        while self.log().matches(&listening).count() == before
            || std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err()
        {
            if let Some(child) = &mut self.child
                && child.try_wait().unwrap().is_some()
            {
                self.child = None;
                return false;
            }
            assert!(
                started.elapsed() < HANG_GUARD,
                "the server did not come up; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }

    /// SIGKILL, then reap: the harshest way a server can go away.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// SIGTERM, then wait: a graceful shutdown, which ends every SSE stream cleanly.
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let sent = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status()
                .unwrap();
            assert!(sent.success());
            assert!(child.wait().unwrap().success(), "unclean shutdown");
        }
    }

    /// An `eventqueue` command aimed at this server (through the environment, as a person
    /// would set it up).
    fn cmd(&self, args: &[&str]) -> assert_cmd::Command {
        let mut cmd = assert_cmd::Command::new(bin());
        cmd.args(args)
            .env("EVENTQUEUE_URL", self.url())
            .env_remove("EVENTQUEUE_TOKEN")
            .env_remove("EVENTQUEUE_TENANT")
            .env_remove("EVENTQUEUE_DATA_DIR")
            .env_remove("EVENTQUEUE_CA_CERT")
            .timeout(HANG_GUARD);
        if let Some(ca) = self.flags.iter().position(|f| f == "--tls-cert") {
            // The server's self-signed certificate is its own CA.
            cmd.env("EVENTQUEUE_CA_CERT", &self.flags[ca + 1]);
        }
        cmd
    }

    /// Publishes events (JSON lines on stdin), creating the queue; returns their offsets.
    fn publish(&self, task: &str, events: &[Value]) -> Vec<u64> {
        let stdin: String = events.iter().map(|e| format!("{e}\n")).collect();
        let out = self
            .cmd(&["publish", task, "--create", "-"])
            .write_stdin(stdin)
            .assert()
            .success()
            .get_output()
            .stdout
            .clone();
        String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| l.parse().unwrap())
            .collect()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

fn status(state: &str) -> Value {
    json!({"event_type": "status", "state": state, "phase": "planning"})
}

fn progress(current: u64, total: u64) -> Value {
    json!({"event_type": "progress", "current": current, "total": total, "step": "search"})
}

fn complete() -> Value {
    json!({"event_type": "complete", "result": {"answer": 42}, "summary": "all good"})
}

fn stdout_of(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr_of(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The `offset` of each JSON line.
fn offsets(lines: &str) -> Vec<u64> {
    lines
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
            v["offset"].as_u64().unwrap()
        })
        .collect()
}

#[test]
fn watch_exit_codes_follow_the_tasks_outcome() {
    let server = Server::start();
    let cases: [(&str, Vec<Value>, i32, &str); 4] = [
        (
            "done",
            vec![status("working"), progress(1, 2), complete()],
            0,
            "completed",
        ),
        (
            "failed",
            vec![status("working"), status("failed")],
            1,
            "task failed",
        ),
        (
            "cancelled",
            vec![status("working"), status("cancelled")],
            1,
            "task cancelled",
        ),
        (
            "crashed",
            vec![json!({"event_type": "error", "error_type": "Boom",
                        "error_message": "disk on fire", "recoverable": false})],
            1,
            "disk on fire",
        ),
    ];
    for (task, events, code, says) in cases {
        server.publish(task, &events);
        let out = server.cmd(&["watch", task]).output().unwrap();
        assert_eq!(out.status.code(), Some(code), "{task}: {out:?}");
        let text = stdout_of(&out);
        assert!(text.contains(says), "{task}: {text}");
        // stdout is a pipe here: no ANSI escapes, no bars.
        assert!(!text.contains('\x1b'), "{task}: ANSI in {text:?}");
        assert_eq!(
            text.lines().filter(|l| l.starts_with('[')).count(),
            events.len(),
            "{task}: one line per event: {text}"
        );
    }

    // An unknown queue is a usage error, said clearly.
    let out = server.cmd(&["watch", "no_such_task"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = stderr_of(&out);
    assert!(err.contains("no queue \"no_such_task\""), "{err}");
    // So are bad arguments.
    let out = server.cmd(&["watch", "bad/id"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(stderr_of(&out).contains("task_id"), "{out:?}");
    let out = server
        .cmd(&["watch", "done", "--from", "x"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");

    // A closed queue that never finished ends the watch with 1.
    server.publish("closed", &[status("working")]);
    let closed = close_queue(&server, "closed");
    assert!(closed, "close failed");
    let out = server.cmd(&["watch", "closed"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(stdout_of(&out).contains("closed before the task finished"));

    // --from past the terminal event still reports how the task ended.
    let out = server
        .cmd(&["watch", "done", "--from", "10"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let out = server
        .cmd(&["watch", "failed", "--from", "5"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
}

/// Runs one call of the library's HTTP client (for what the CLI has no command for).
fn with_client<T>(server: &Server, f: impl AsyncFnOnce(eventqueue::client::Client) -> T) -> T {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = eventqueue::client::Client::new(server.url()).unwrap();
    rt.block_on(f(client))
}

/// Closes a queue.
fn close_queue(server: &Server, task: &str) -> bool {
    with_client(server, async |c| c.close_queue(task).await.is_ok())
}

#[test]
fn watch_reports_gaps_and_deleted_queues() {
    let server = Server::start();
    // Retention keeps 3 events: a watch from 0 is told that 0..7 are gone, then gets 7..=9.
    with_client(&server, async |c| {
        let options = eventqueue::client::CreateQueue {
            max_buffer_size: Some(3),
            ..Default::default()
        };
        c.create_queue("small", &options).await.unwrap();
    });
    let mut events: Vec<Value> = (1..=9).map(|i| progress(i, 10)).collect();
    events.push(complete());
    server.publish("small", &events);
    let out = server.cmd(&["watch", "small", "--json"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(offsets(&stdout_of(&out)), [7, 8, 9]);
    assert!(
        stderr_of(&out).contains("events 0..7 were dropped"),
        "{out:?}"
    );

    // A queue deleted while watched ends the watch with 1, said plainly.
    server.publish("doomed", &[status("working")]);
    let child = Command::new(bin())
        .args(["watch", "doomed"])
        .env("EVENTQUEUE_URL", server.url())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Deleted once the watcher is subscribed.
    let started = Instant::now();
    loop {
        let out = server.cmd(&["info", "doomed", "--json"]).output().unwrap();
        let info: Value = serde_json::from_slice(&out.stdout).unwrap();
        if info["subscriber_count"] == 1 {
            break;
        }
        assert!(
            started.elapsed() < HANG_GUARD,
            "the watcher never subscribed"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    with_client(&server, async |c| c.delete_queue("doomed").await.unwrap());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(stdout_of(&out).contains("deleted or expired"), "{out:?}");
}

#[test]
fn watch_json_prints_exactly_the_stored_events() {
    let mut server = Server::start();
    let mut events: Vec<Value> = (0..20).map(|i| progress(i, 20)).collect();
    events.insert(0, status("working"));
    events.push(json!({"event_type": "artifact", "artifact_type": "report",
                       "data": {"title": "draft", "unicode": "Zürich ✓"}}));
    events.push(complete());
    assert_eq!(
        server.publish("wf", &events),
        (0..events.len() as u64).collect::<Vec<_>>()
    );
    let out = server.cmd(&["watch", "wf", "--json"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let watched = stdout_of(&out);
    assert_eq!(
        offsets(&watched),
        (0..events.len() as u64).collect::<Vec<_>>()
    );
    // --from starts at that offset.
    let out = server
        .cmd(&["watch", "wf", "--json", "--from", "20"])
        .output()
        .unwrap();
    assert_eq!(offsets(&stdout_of(&out)), [20, 21, 22]);

    // Byte for byte what the store holds (dump reads it directly once the server is gone).
    server.kill();
    let out = server
        .cmd(&["dump", "--data-dir", server.data_dir().to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(watched, stdout_of(&out));
}

#[test]
fn watch_reconnects_across_a_server_restart_without_duplicates_or_holes() {
    let mut server = Server::start();
    server.publish("wf", &[status("working"), progress(1, 6), progress(2, 6)]);
    let mut child = Command::new(bin())
        .args(["watch", "wf", "--json", "--retry-initial-ms", "20"])
        .args(["--retry-max-ms", "100"])
        .env("EVENTQUEUE_URL", server.url())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    while lines.len() < 3 {
        lines.push(
            rx.recv_timeout(HANG_GUARD)
                .expect("watch printed too little"),
        );
    }
    // Killed while the watcher is connected (the stream breaks off), restarted on the same
    // port and data.
    server.kill();
    server.restart();
    server.publish("wf", &[progress(3, 6), progress(4, 6)]);
    while lines.len() < 5 {
        lines.push(
            rx.recv_timeout(HANG_GUARD)
                .expect("watch printed too little"),
        );
    }
    // Stopped gracefully (the stream ends cleanly, without the task's end), restarted.
    server.stop();
    server.restart();
    server.publish("wf", &[progress(6, 6), complete()]);
    while let Ok(line) = rx.recv_timeout(HANG_GUARD) {
        lines.push(line);
    }
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(status.success(), "{status:?}: {stderr}");
    assert_eq!(
        offsets(&lines.join("\n")),
        (0..7).collect::<Vec<_>>(),
        "{stderr}"
    );
    assert!(stderr.contains("reconnecting"), "{stderr}");
    assert!(
        stderr.contains("reconnected; resuming at offset 3"),
        "{stderr}"
    );
}

/// The lines a child writes to `pipe`, as they come.
fn lines_of(pipe: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

#[test]
fn watch_wait_follows_a_queue_created_after_it_started() {
    let server = Server::start();
    let mut child = Command::new(bin())
        .args(["watch", "later", "--json", "--wait"])
        .env("EVENTQUEUE_URL", server.url())
        .env_remove("EVENTQUEUE_TENANT")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = lines_of(child.stdout.take().unwrap());
    let stderr = lines_of(child.stderr.take().unwrap());
    // It says once that it waits, then keeps waiting (no error, no exit).
    let notice = stderr
        .recv_timeout(HANG_GUARD)
        .expect("no notice while waiting");
    assert!(
        notice.starts_with("waiting for queue \"later\"") && notice.contains("Ctrl-C"),
        "{notice}"
    );
    assert!(child.try_wait().unwrap().is_none(), "watch --wait gave up");

    let events = [status("working"), progress(1, 2), complete()];
    assert_eq!(server.publish("later", &events), [0, 1, 2]);
    let status = child.wait().unwrap();
    let printed: Vec<String> = stdout.iter().collect();
    let notes: Vec<String> = stderr.iter().collect();
    assert!(status.success(), "{status:?}: {notes:?}");
    assert_eq!(offsets(&printed.join("\n")), [0, 1, 2], "{notes:?}");
    // One notice in all, however long it waited.
    assert!(
        !notes.iter().any(|l| l.starts_with("waiting for queue")),
        "{notes:?}"
    );
}

#[test]
fn watch_wait_gives_up_with_the_unknown_queue_code() {
    let server = Server::start();
    let started = Instant::now();
    let out = server
        .cmd(&["watch", "never", "--wait", "1"])
        .output()
        .unwrap();
    let err = stderr_of(&out);
    // 2, as for an unknown queue without --wait (see `watch --help`).
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(started.elapsed() >= Duration::from_secs(1), "did not wait");
    assert!(err.contains("waiting for queue \"never\""), "{err}");
    assert!(
        err.contains("no queue \"never\"") && err.contains("after waiting 1s"),
        "{err}"
    );
    assert!(stdout_of(&out).is_empty(), "{out:?}");

    // `--wait TASK` reads the task id as SECS: a usage error that says where --wait goes.
    let out = server.cmd(&["watch", "--wait", "never"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        stderr_of(&out).contains("put --wait after the task id"),
        "{out:?}"
    );
}

#[test]
fn publish_reads_json_lines_from_stdin_in_batches() {
    let server = Server::start();
    server
        .cmd(&[
            "publish",
            "wf",
            "--create",
            "--kind",
            "workflow",
            "--event",
            r#"{"event_type": "status", "state": "working"}"#,
        ])
        .assert()
        .success()
        .stdout("0\n");
    let lines: String = (1..=250)
        .map(|i| format!("{}\n\n", progress(i, 250)))
        .collect();
    let out = server
        .cmd(&["publish", "wf", "--batch-size", "100", "-"])
        .write_stdin(lines)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let offsets: Vec<u64> = stdout_of(&out)
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    assert_eq!(offsets, (1..=250).collect::<Vec<_>>());
    let out = server.cmd(&["info", "wf", "--json"]).output().unwrap();
    let info: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["latest_offset"], 251);
    assert_eq!(info["kind"], "workflow");

    // From a file.
    let file = server.dir.path().join("events.jsonl");
    std::fs::write(&file, format!("{}\n{}\n", progress(1, 1), complete())).unwrap();
    server
        .cmd(&["publish", "wf", "--file", file.to_str().unwrap()])
        .assert()
        .success()
        .stdout("251\n252\n");

    // A bad line is named; nothing after it is sent.
    let out = server
        .cmd(&["publish", "wf2", "--create", "-"])
        .write_stdin(format!("{}\nnot json\n{}\n", status("working"), complete()))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(stderr_of(&out).contains("stdin line 2"), "{out:?}");
    let out = server.cmd(&["info", "wf2", "--json"]).output().unwrap();
    let info: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["latest_offset"], 0);

    // An invalid event is the server's 400, with the field named.
    let out = server
        .cmd(&[
            "publish",
            "wf2",
            "--event",
            r#"{"event_type": "progress", "current": 5, "total": 1}"#,
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(stderr_of(&out).contains("current"), "{out:?}");
    // An unknown queue without --create.
    let out = server
        .cmd(&[
            "publish",
            "nope",
            "--event",
            r#"{"event_type": "status", "state": "working"}"#,
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(stderr_of(&out).contains("no queue \"nope\""), "{out:?}");
    // Nothing to publish.
    let out = server.cmd(&["publish", "wf"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

#[test]
fn queues_info_and_cancel() {
    let server = Server::start();
    server.publish("alpha", &[status("working")]);
    server.publish("beta", &[status("working"), complete()]);
    let out = server.cmd(&["queues"]).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = stdout_of(&out);
    assert!(text.starts_with("TASK"), "{text}");
    assert!(text.contains("alpha") && text.contains("beta"), "{text}");
    let out = server.cmd(&["queues", "--json"]).output().unwrap();
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 2);
    // Another tenant sees none of them.
    let out = server
        .cmd(&["queues", "--json", "--tenant", "acme"])
        .output()
        .unwrap();
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list, json!([]));

    let out = server.cmd(&["info", "alpha"]).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(stdout_of(&out).contains("latest offset    1"), "{out:?}");

    server
        .cmd(&["cancel", "alpha", "--reason", "user pressed stop"])
        .assert()
        .success()
        .stdout("Workflow alpha cancellation requested\n");
    let out = server.cmd(&["info", "alpha", "--json"]).output().unwrap();
    let info: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["is_cancelled"], true);
    assert_eq!(info["cancel_reason"], "user pressed stop");
    // The producer learns it from its next publish.
    let out = server
        .cmd(&[
            "publish",
            "alpha",
            "--event",
            r#"{"event_type": "status", "state": "cancelled"}"#,
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(stderr_of(&out).contains("was cancelled"), "{out:?}");

    // Filters and a limit; the state column names the state the filter uses first.
    let tasks = |args: &[&str]| {
        let out = server.cmd(args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
        let list: Value = serde_json::from_slice(&out.stdout).unwrap();
        let tasks: Vec<String> = list
            .as_array()
            .unwrap()
            .iter()
            .map(|q| q["task_id"].as_str().unwrap().to_string())
            .collect();
        (tasks, stderr_of(&out))
    };
    assert_eq!(
        tasks(&["queues", "--json", "--state", "cancelled"]).0,
        ["alpha"]
    );
    assert_eq!(
        tasks(&["queues", "--json", "--state", "finished,running"]).0,
        ["beta"]
    );
    assert_eq!(tasks(&["queues", "--json", "--prefix", "be"]).0, ["beta"]);
    assert_eq!(
        tasks(&["queues", "--json", "--kind", "workflow"]).0,
        Vec::<String>::new()
    );
    // alpha's cancelled status is the newest activity.
    let (newest, note) = tasks(&["queues", "--json", "--limit", "1"]);
    assert_eq!(newest, ["alpha"]);
    assert!(note.contains("more queues match"), "{note}");
    let out = server.cmd(&["queues"]).output().unwrap();
    let text = stdout_of(&out);
    let alpha = text.lines().find(|l| l.starts_with("alpha")).unwrap();
    assert!(alpha.contains("cancelled,finished"), "{text}");
    let out = server.cmd(&["queues", "--state", "done"]).output().unwrap();
    assert!(!out.status.success(), "{out:?}");
    assert!(stderr_of(&out).contains("state:"), "{out:?}");

    // A finished task cannot be cancelled; an unknown one is a usage error.
    let out = server.cmd(&["cancel", "beta"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(stderr_of(&out).contains("already finished"), "{out:?}");
    let out = server
        .cmd(&["cancel", "gamma", "--ingestion"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let out = server.cmd(&["info", "gamma"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");

    // No server there: a failure that says where it looked.
    let out = server
        .cmd(&["queues"])
        .env("EVENTQUEUE_URL", "http://127.0.0.1:1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(stderr_of(&out).contains("http://127.0.0.1:1"), "{out:?}");
}

#[test]
fn token_mode_takes_the_token_from_the_environment() {
    let secrets = tempfile::tempdir().unwrap();
    let secret = secrets.path().join("jwt.secret");
    std::fs::write(&secret, "0123456789abcdef0123456789abcdef-cli-test").unwrap();
    let secret = secret.to_str().unwrap();
    let server = Server::start_with(&["--jwt-secret-file", secret]);
    let token = |scope: &str| {
        let out = server
            .cmd(&[
                "token",
                "--jwt-secret-file",
                secret,
                "--tenant",
                "acme",
                "--scope",
                scope,
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        stdout_of(&out).trim().to_string()
    };
    let (writer, reader) = (token("publish"), token("subscribe"));
    server
        .cmd(&[
            "publish",
            "wf",
            "--create",
            "--event",
            r#"{"event_type": "complete", "result": {}}"#,
        ])
        .env("EVENTQUEUE_TOKEN", &writer)
        .assert()
        .success();
    let out = server
        .cmd(&["watch", "wf", "--json"])
        .env("EVENTQUEUE_TOKEN", &reader)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let event: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(event["tenant_id"], "acme");
    // Without a token: refused, with the hint; with the wrong scope: said so.
    let out = server.cmd(&["watch", "wf"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(stderr_of(&out).contains("EVENTQUEUE_TOKEN"), "{out:?}");
    let out = server
        .cmd(&[
            "publish",
            "wf",
            "--event",
            r#"{"event_type": "complete", "result": {}}"#,
        ])
        .env("EVENTQUEUE_TOKEN", &reader)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(stderr_of(&out).contains("scope"), "{out:?}");
}

#[test]
fn token_lifetimes_are_bounded_and_revoke_refuses_a_tenants_older_tokens() {
    let secrets = tempfile::tempdir().unwrap();
    let secret = secrets.path().join("jwt.secret");
    std::fs::write(&secret, "0123456789abcdef0123456789abcdef-cli-test").unwrap();
    let secret = secret.to_str().unwrap();
    let server = Server::start_with(&["--jwt-secret-file", secret]);
    let mint = |tenant: &str, scope: &str, ttl: &str| {
        server
            .cmd(&[
                "token",
                "--jwt-secret-file",
                secret,
                "--tenant",
                tenant,
                "--scope",
                scope,
                "--ttl",
                ttl,
            ])
            .env_remove("EVENTQUEUE_MAX_TOKEN_TTL")
            .output()
            .unwrap()
    };
    // Longer than servers accept: refused, naming the limit.
    let out = mint("acme", "subscribe", "99999999999999d");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        stderr_of(&out).contains("longer than the longest token lifetime servers accept, 30d"),
        "{out:?}"
    );
    let token = |out: std::process::Output| {
        assert!(out.status.success(), "{out:?}");
        stdout_of(&out).trim().to_string()
    };
    let user = token(mint("acme", "subscribe", "30d"));
    let admin = token(mint("ops", "admin", "1h"));
    let queues = || {
        server
            .cmd(&["queues", "--json"])
            .env("EVENTQUEUE_TOKEN", &user)
            .output()
            .unwrap()
    };
    assert!(queues().status.success());
    // Only an admin token revokes.
    let out = server
        .cmd(&["revoke", "--tenant", "acme", "--token", &user])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(stderr_of(&out).contains("admin"), "{out:?}");
    let out = server
        .cmd(&["revoke", "--tenant", "acme", "--token", &admin])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(
        stdout_of(&out).starts_with("tokens of tenant acme issued before "),
        "{out:?}"
    );
    let out = queues();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(stderr_of(&out).contains("token revoked"), "{out:?}");
    // A time in the future is a usage error.
    let out = server
        .cmd(&[
            "revoke",
            "--tenant",
            "acme",
            "--before",
            "2999-01-01T00:00:00Z",
            "--token",
            &admin,
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(stderr_of(&out).contains("in the future"), "{out:?}");
}

/// Events of two tenants and two tasks with known types and timestamps.
fn dump_fixture(server: &Server) {
    let at = |s: u32| format!("2026-11-28T02:00:{s:02}.000000Z");
    let events = |base: u32| -> Vec<Value> {
        vec![
            json!({"event_type": "status", "state": "working", "timestamp": at(base)}),
            json!({"event_type": "progress", "current": 1, "total": 2, "timestamp": at(base + 1)}),
            json!({"event_type": "error", "error_type": "E", "error_message": "m",
                   "timestamp": at(base + 2)}),
            json!({"event_type": "complete", "result": {}, "timestamp": at(base + 3)}),
        ]
    };
    server.publish("t1", &events(0));
    server.publish("t2", &events(10));
    let stdin: String = events(20).iter().map(|e| format!("{e}\n")).collect();
    server
        .cmd(&["publish", "t1", "--create", "--tenant", "acme", "-"])
        .write_stdin(stdin)
        .assert()
        .success();
}

#[test]
fn dump_filters_and_refuses_a_locked_database() {
    let mut server = Server::start();
    dump_fixture(&server);
    let dir = server.data_dir();
    let dir = dir.to_str().unwrap();

    // While the server runs, the database is locked: refused, with the way out.
    for cmd in ["dump", "inspect"] {
        let out = server.cmd(&[cmd, "--data-dir", dir]).output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        let err = stderr_of(&out);
        assert!(err.contains("locked"), "{err}");
        assert!(
            err.contains("eventqueue watch TASK --json --from 0"),
            "{err}"
        );
    }
    server.kill();

    let dump = |extra: &[&str]| -> Vec<Value> {
        let mut args = vec!["dump", "--data-dir", dir];
        args.extend_from_slice(extra);
        let out = server.cmd(&args).output().unwrap();
        assert!(out.status.success(), "{extra:?}: {out:?}");
        stdout_of(&out)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let key = |v: &Value| {
        format!(
            "{}/{}/{}",
            v["tenant_id"].as_str().unwrap(),
            v["task_id"].as_str().unwrap(),
            v["offset"]
        )
    };
    let keys = |vs: Vec<Value>| vs.iter().map(key).collect::<Vec<_>>();

    assert_eq!(dump(&[]).len(), 12);
    assert_eq!(
        keys(dump(&["--tenant", "acme"])),
        ["acme/t1/0", "acme/t1/1", "acme/t1/2", "acme/t1/3"]
    );
    assert_eq!(
        keys(dump(&["--task", "t1", "--from", "2"])),
        ["acme/t1/2", "acme/t1/3", "default/t1/2", "default/t1/3"]
    );
    assert_eq!(
        keys(dump(&["--tenant", "default", "--type", "status,error"])),
        [
            "default/t1/0",
            "default/t1/2",
            "default/t2/0",
            "default/t2/2"
        ]
    );
    assert_eq!(
        keys(dump(&[
            "--since",
            "2026-11-28T02:00:12Z",
            "--tenant",
            "default"
        ])),
        ["default/t2/2", "default/t2/3"]
    );
    assert_eq!(
        keys(dump(&[
            "--since",
            "2026-11-28T03:00:12+01:00",
            "--type",
            "complete"
        ])),
        ["acme/t1/3", "default/t2/3"]
    );

    // Bad filters are usage errors.
    for bad in [["--type", "statuss"], ["--since", "yesterday"]] {
        let mut args = vec!["dump", "--data-dir", dir];
        args.extend_from_slice(&bad);
        let out = server.cmd(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {out:?}");
    }
    // A directory without a database is not silently made into one.
    let empty = tempfile::tempdir().unwrap();
    let out = server
        .cmd(&["dump", "--data-dir", empty.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(!empty.path().join("eventqueue.redb").exists());

    // inspect: the summary.
    let out = server
        .cmd(&["inspect", "--data-dir", dir, "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["format_version"], 4);
    assert_eq!(report["queues"], 3);
    assert_eq!(report["events"], 12);
    assert_eq!(report["tenants"]["acme"]["queues"], 1);
    assert_eq!(report["tenants"]["default"]["events"], 8);
    assert_eq!(report["tenants"]["default"]["finished"], 2);
    assert_eq!(report["oldest_event"], "2026-11-28T02:00:00.000000Z");
    assert_eq!(report["newest_event"], "2026-11-28T02:00:23.000000Z");
    assert!(report["database_bytes"].as_u64().unwrap() > 0);
    let out = server
        .cmd(&["inspect", "--data-dir", dir])
        .output()
        .unwrap();
    let text = stdout_of(&out);
    assert!(text.contains("format version  4"), "{text}");
    assert!(text.contains("acme"), "{text}");
}

#[test]
fn every_subcommand_has_help_with_an_example() {
    for cmd in [
        "watch", "queues", "info", "cancel", "publish", "dump", "inspect", "demo",
    ] {
        let out = assert_cmd::Command::new(bin())
            .args([cmd, "--help"])
            .timeout(HANG_GUARD)
            .output()
            .unwrap();
        assert!(out.status.success(), "{cmd}: {out:?}");
        let text = stdout_of(&out);
        assert!(text.contains("Example"), "{cmd}: {text}");
        assert!(text.contains(&format!("eventqueue {cmd}")), "{cmd}: {text}");
    }
}

/// Runs `eventqueue watch` under a pseudo-terminal (util-linux `script`) and checks that the
/// progress bar is drawn and finished and colours are used.
#[test]
fn watch_draws_progress_bars_on_a_terminal() {
    if Command::new("script").arg("--version").output().is_err() {
        // util-linux is part of every Debian-based machine this project runs on; say so loudly
        // if it is missing rather than pass silently.
        panic!("`script` (util-linux) is needed for the terminal test");
    }
    let server = Server::start();
    let mut events = vec![status("working")];
    events.extend((1..=4).map(|i| progress(i, 4)));
    events.push(complete());
    server.publish("wf", &events);
    let typescript = server.dir.path().join("typescript");
    let cmdline = format!("{} watch wf --url {}", shell_quote(&bin()), server.url());
    let out = Command::new("script")
        .args(["-q", "-e", "-c", &cmdline])
        .arg(&typescript)
        .env("TERM", "xterm-256color")
        .env("COLUMNS", "120")
        .env("LINES", "40")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let screen = std::fs::read_to_string(&typescript).unwrap_or_default();
    assert_eq!(out.status.code(), Some(0), "{out:?}\n{screen}");
    assert!(
        screen.contains('\x1b'),
        "no ANSI codes on a terminal: {screen:?}"
    );
    assert!(screen.contains("search"), "no bar for the step: {screen:?}");
    assert!(screen.contains("4/4"), "the bar did not finish: {screen:?}");
    assert!(screen.contains("task completed"), "{screen:?}");
}

/// Whether a line of the screen is a progress bar of `watch`:
/// `label [=====>    ] pos/len (pct%) step`.
fn is_bar(line: &str) -> bool {
    line.split_once(" [")
        .and_then(|(_, rest)| rest.get(..31))
        .is_some_and(|bar| bar.ends_with(']') && bar[..30].chars().all(|c| "=> ".contains(c)))
}

/// A 1000-step job watched on a terminal (started before the job, with `--wait`) leaves one
/// progress bar on the screen, not one per step: the screen is what `script` recorded,
/// replayed through a terminal emulator.
#[test]
fn watch_draws_one_bar_per_progress_series() {
    const STEPS: u64 = 1000;
    use std::num::NonZeroU16;
    const ROWS: NonZeroU16 = NonZeroU16::new(60).unwrap();
    const COLS: NonZeroU16 = NonZeroU16::new(120).unwrap();
    let server = Server::start();
    let typescript = server.dir.path().join("typescript");
    let cmdline = format!(
        "stty sane rows {ROWS} cols {COLS} && exec {} watch job --wait --url {}",
        shell_quote(&bin()),
        server.url()
    );
    let mut watcher = Command::new("script")
        .args(["-q", "-e", "-f", "-c", &cmdline])
        .arg(&typescript)
        .env("TERM", "xterm-256color")
        .env_remove("EVENTQUEUE_TENANT")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("`script` (util-linux) is needed for the terminal test");
    let read =
        || String::from_utf8_lossy(&std::fs::read(&typescript).unwrap_or_default()).into_owned();
    let started = Instant::now();
    while !read().contains("waiting for queue") {
        assert!(
            watcher.try_wait().unwrap().is_none(),
            "watch exited: {:?}",
            read()
        );
        assert!(
            started.elapsed() < HANG_GUARD,
            "no wait notice: {:?}",
            read()
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // The producer: a phase, then one progress event per step, each named after its item.
    let url = server.url();
    with_client(&server, async |c| {
        use eventqueue::producer::{HttpSink, ProducerError, Reporter};
        let options = eventqueue::client::CreateQueue {
            max_buffer_size: Some(2 * STEPS),
            ..Default::default()
        };
        c.create_queue("job", &options).await.unwrap();
        let task = eventqueue::TaskId::new("job").unwrap();
        let outcome = Reporter::new(HttpSink::new(&url, &task).unwrap())
            .run(|r| async move {
                r.phase("ingestion").await?;
                for n in 1..=STEPS {
                    r.step(n, STEPS, format!("item_{n}.mp4")).await?;
                }
                Ok::<_, ProducerError>(eventqueue::CompleteEvent::new(json!({"items": STEPS})))
            })
            .await
            .unwrap();
        assert!(outcome.is_completed());
    });

    let started = Instant::now();
    let status = loop {
        if let Some(status) = watcher.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < HANG_GUARD,
            "watch did not end: {:?}",
            read()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let raw = std::fs::read(&typescript).unwrap();
    let mut term = vt100::Parser::new(ROWS, COLS, 0);
    term.process(&raw);
    // Row by row: a row written up to its last column would run into the next one in
    // `contents()`.
    let rows: Vec<String> = term.screen().rows(0, COLS.get()).collect();
    let screen = rows.join("\n");
    assert_eq!(status.code(), Some(0), "{screen}");
    let bars: Vec<&String> = rows.iter().filter(|l| is_bar(l)).collect();
    assert_eq!(bars.len(), 1, "{screen}");
    // Labelled with the phase, full, the last step as its message.
    let bar = bars[0];
    assert!(bar.trim_start().starts_with("ingestion ["), "{bar}");
    assert!(bar.contains("1000/1000 (100%) item_1000.mp4"), "{bar}");
    assert!(screen.contains("task completed"), "{screen}");
    assert!(screen.contains("waiting for queue \"job\""), "{screen}");
}

fn shell_quote(path: &Path) -> String {
    format!("'{}'", path.display().to_string().replace('\'', r"'\''"))
}

/// A self-signed certificate for 127.0.0.1 and its key, as PEM files in `dir`.
fn self_signed(dir: &Path) -> (PathBuf, PathBuf) {
    let made =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, made.cert.pem()).unwrap();
    std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();
    (cert, key)
}

#[test]
fn watch_follows_a_task_over_https_and_refuses_an_unknown_certificate_once() {
    let certs = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(certs.path());
    let server = Server::start_with(&[
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ]);
    // `publish` and `watch` over HTTPS, trusting the certificate through EVENTQUEUE_CA_CERT.
    server.publish("wf", &[status("working"), progress(1, 2)]);
    let mut child = Command::new(bin())
        .args(["watch", "wf", "--json", "--url", &server.url()])
        .arg("--ca-cert")
        .arg(&cert)
        .env_remove("EVENTQUEUE_CA_CERT")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // The replay, then a live event.
    let mut lines = Vec::new();
    while lines.len() < 2 {
        lines.push(rx.recv_timeout(HANG_GUARD).expect("no replay over HTTPS"));
    }
    server.publish("wf", &[complete()]);
    while let Ok(line) = rx.recv_timeout(HANG_GUARD) {
        lines.push(line);
    }
    let exit = child.wait().unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(exit.success(), "{exit:?}: {stderr}");
    assert_eq!(offsets(&lines.join("\n")), [0, 1, 2], "{stderr}");

    // Without the CA (the system's trust store alone), the certificate is refused: said once,
    // exit code 2, no reconnection attempts.
    let out = server
        .cmd(&["watch", "wf"])
        .env_remove("EVENTQUEUE_CA_CERT")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = stderr_of(&out);
    assert!(
        err.contains("certificate") && err.contains("--ca-cert"),
        "{err}"
    );
    assert!(!err.contains("retrying"), "{err}");
    assert_eq!(
        err.lines().filter(|l| l.starts_with("error:")).count(),
        1,
        "{err}"
    );
    let out = server
        .cmd(&["queues"])
        .env_remove("EVENTQUEUE_CA_CERT")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");

    // http:// on the TLS port, an https:// URL on a plain HTTP server, and a CA file that is
    // not one: also said once.
    let http_on_tls = server.url().replace("https://", "http://");
    let out = server
        .cmd(&["watch", "wf", "--url", &http_on_tls])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = stderr_of(&out);
    assert!(
        err.contains("https://") && !err.contains("retrying"),
        "{err}"
    );
    let plain = Server::start();
    let https_on_plain = plain.url().replace("http://", "https://");
    let out = plain
        .cmd(&["watch", "wf", "--url", &https_on_plain])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(stderr_of(&out).contains("plain HTTP"), "{out:?}");
    let out = server
        .cmd(&["watch", "wf", "--ca-cert"])
        .arg(&key)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(stderr_of(&out).contains("key.pem"), "{out:?}");
}
