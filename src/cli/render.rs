//! The human view of `eventqueue watch`: one line per event, a progress bar per progress
//! series on a terminal, plain text (no ANSI codes, no bars) otherwise.
//!
//! # Progress series
//!
//! A progress event's `step` names what the task is doing now (`processing_video_7.mp4`); it
//! is not a counter of its own, so one bar per step would leave a bar per item of a job. The
//! events of one counter form a *series*, and each series gets one bar, with the current step
//! as its message:
//!
//! - the task's phase, when it uses phases: progress events belong to the phase named by the
//!   latest `status` event that had one (progress events carry no phase of their own);
//! - the task itself, when no phase was announced;
//! - a workflow checkpoint's progress events (`details` with `checkpoint_id` and
//!   `total_phases`) count the workflow's tasks over all its phases: one series for the task,
//!   whatever phase the checkpoint's own status event names.
//!
//! A series whose bar reached its total is finished: its bar stays as one line in its final
//! state, and a later event of the series starts a new bar.

use std::collections::BTreeMap;
use std::io::Write;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::Value;

use crate::client::StreamEvent;

/// How events are shown.
pub(super) struct View {
    /// ANSI colours and progress bars (stdout is a terminal).
    terminal: bool,
    bars: Option<MultiProgress>,
    /// The bar of each running series.
    running: BTreeMap<Series, ProgressBar>,
    /// Which series each progress event belongs to.
    series: SeriesKeys,
    /// Whether any bar was drawn.
    drew_bars: bool,
    /// Finished bars still on screen, oldest first, with their labels. They are kept alive: a
    /// dropped bar is wiped at the next redraw.
    finished: std::collections::VecDeque<(String, ProgressBar)>,
    /// stdout was closed by its reader (`watch … | head`).
    closed: std::cell::Cell<bool>,
}

const RED: &str = "\x1b[31m";
const GREEN: &str = "\x1b[32m";
const YELLOW: &str = "\x1b[33m";
const CYAN: &str = "\x1b[36m";
const BOLD: &str = "\x1b[1m";
const DIM: &str = "\x1b[2m";
const RESET: &str = "\x1b[0m";

/// Finished bars kept on screen; older ones are turned into lines.
const MAX_FINISHED_BARS: usize = 5;

/// The step name of a progress event without one (plain output).
const DEFAULT_STEP: &str = "progress";

/// The label of the task's own series (no phase announced).
const TASK_LABEL: &str = "progress";

/// The label of a workflow checkpoint's series (it counts the workflow's tasks).
const CHECKPOINT_LABEL: &str = "tasks";

/// Which counter a progress event advances; see the module docs.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Series {
    /// The task as a whole (no phase announced yet).
    Task,
    /// The workflow's tasks, as its checkpoints count them.
    Checkpoint,
    /// A phase named by a `status` event.
    Phase(String),
}

/// Follows a stream's phases to key its progress events.
#[derive(Debug, Default)]
struct SeriesKeys {
    /// The phase named by the latest `status` event that had one.
    phase: Option<String>,
}

impl SeriesKeys {
    /// Takes note of a `status` event's phase (one without a phase leaves the phase as is).
    fn status(&mut self, v: &Value) {
        if let Some(phase) = str_field(v, "phase") {
            self.phase = Some(phase.to_string());
        }
    }

    /// The series of progress event `v`.
    fn progress(&self, v: &Value) -> Series {
        let details = v.get("details");
        let from_checkpoint = ["checkpoint_id", "total_phases"]
            .iter()
            .all(|k| details.and_then(|d| d.get(k)).is_some());
        match &self.phase {
            _ if from_checkpoint => Series::Checkpoint,
            Some(phase) => Series::Phase(phase.clone()),
            None => Series::Task,
        }
    }
}

impl Series {
    /// The bar's label.
    fn label(&self) -> &str {
        match self {
            Series::Task => TASK_LABEL,
            Series::Checkpoint => CHECKPOINT_LABEL,
            Series::Phase(phase) => phase,
        }
    }
}

impl View {
    /// A view for a terminal (colours and bars) or not (plain lines).
    pub(super) fn new(terminal: bool) -> Self {
        let bars = terminal
            .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stdout_with_hz(10)));
        Self {
            terminal,
            bars,
            running: BTreeMap::new(),
            series: SeriesKeys::default(),
            drew_bars: false,
            finished: std::collections::VecDeque::new(),
            closed: std::cell::Cell::new(false),
        }
    }

    fn paint(&self, colour: &str, text: &str) -> String {
        if self.terminal {
            format!("{colour}{text}{RESET}")
        } else {
            text.to_string()
        }
    }

    /// Prints a line above the bars (or plainly).
    pub(super) fn line(&self, text: &str) {
        match &self.bars {
            Some(bars) => {
                // A failed terminal write leaves nothing better to do than go on.
                let _ = bars.println(text);
            }
            None => {
                let mut out = std::io::stdout().lock();
                if let Err(e) = writeln!(out, "{text}").and_then(|()| out.flush())
                    && e.kind() == std::io::ErrorKind::BrokenPipe
                {
                    self.closed.set(true);
                }
            }
        }
    }

    /// Whether stdout's reader has gone away.
    pub(super) fn is_closed(&self) -> bool {
        self.closed.get()
    }

    /// A message on stderr (bars are hidden while it is written).
    pub(super) fn note(&self, text: &str) {
        match &self.bars {
            Some(bars) => bars.suspend(|| eprintln!("{text}")),
            None => eprintln!("{text}"),
        }
    }

    /// Shows one event.
    pub(super) fn event(&mut self, ev: &StreamEvent) {
        let v = ev.json().unwrap_or(Value::Null);
        let tag = format!("[{}]", ev.offset);
        let tag = self.paint(DIM, &tag);
        match ev.event_type.as_str() {
            "status" => {
                let state = str_field(&v, "state").unwrap_or("?");
                let colour = match state {
                    "failed" | "cancelled" => RED,
                    "completed" => GREEN,
                    "input-required" => YELLOW,
                    _ => CYAN,
                };
                let mut text = format!("{tag} status   {}", self.paint(colour, state));
                if let Some(phase) = str_field(&v, "phase") {
                    text.push_str(&format!("  phase {}", self.paint(BOLD, phase)));
                }
                self.series.status(&v);
                if let Some(msg) = str_field(&v, "message") {
                    text.push_str(&format!("  {msg}"));
                }
                self.line(&text);
            }
            "progress" => self.progress(&tag, &v),
            "artifact" => {
                let kind = str_field(&v, "artifact_type").unwrap_or("?");
                let id = str_field(&v, "artifact_id").unwrap_or("?");
                let partial = if v.get("is_partial").and_then(Value::as_bool) == Some(true) {
                    " (partial)"
                } else {
                    ""
                };
                let data = v.get("data").map(compact).unwrap_or_default();
                self.line(&format!(
                    "{tag} artifact {} {id}{partial}  {data}",
                    self.paint(BOLD, kind)
                ));
            }
            "error" => {
                let recoverable = v.get("recoverable").and_then(Value::as_bool) != Some(false);
                let kind = str_field(&v, "error_type").unwrap_or("error");
                let msg = str_field(&v, "error_message").unwrap_or("");
                let code = str_field(&v, "error_code")
                    .map(|c| format!(" [{c}]"))
                    .unwrap_or_default();
                let note = if recoverable {
                    "recoverable"
                } else {
                    "not recoverable"
                };
                let text = format!("{kind}{code}: {msg} ({note})");
                let colour = if recoverable { YELLOW } else { RED };
                self.line(&format!("{tag} error    {}", self.paint(colour, &text)));
            }
            "complete" => {
                self.finish_bars();
                let mut text = format!("{tag} complete");
                if let Some(summary) = str_field(&v, "summary") {
                    text.push_str(&format!("  {summary}"));
                }
                if let Some(secs) = v.get("execution_time_seconds").and_then(Value::as_f64) {
                    text.push_str(&format!("  in {secs:.1}s"));
                }
                self.line(&self.paint(GREEN, &text));
                if let Some(result) = v.get("result") {
                    self.line(&format!("  result: {}", compact(result)));
                }
            }
            other => self.line(&format!("{tag} {other} {}", ev.data)),
        }
    }

    fn progress(&mut self, tag: &str, v: &Value) {
        let step = str_field(v, "step");
        let current = v.get("current").and_then(Value::as_u64).unwrap_or(0);
        let total = v.get("total").and_then(Value::as_u64).unwrap_or(0);
        let pct = v.get("percentage").and_then(Value::as_f64).unwrap_or(0.0);
        let Some(bars) = &self.bars else {
            let step = step.unwrap_or(DEFAULT_STEP);
            self.line(&format!(
                "{tag} progress {step} {current}/{total} ({pct:.0}%)"
            ));
            return;
        };
        let series = self.series.progress(v);
        let bar = match self.running.get(&series) {
            Some(bar) => bar.clone(),
            None => {
                // `wide_msg` cuts a long step name to the terminal's width: a wrapped bar
                // would be redrawn one line too low.
                let style = ProgressStyle::with_template(
                    "{prefix:>16.bold} [{bar:30.cyan/blue}] {pos}/{len} ({percent}%) {wide_msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> ");
                let bar = bars.add(ProgressBar::new(total).with_style(style));
                bar.set_prefix(series.label().to_string());
                self.drew_bars = true;
                self.running.insert(series.clone(), bar.clone());
                bar
            }
        };
        bar.set_length(total);
        bar.set_position(current.min(total));
        bar.set_message(step.unwrap_or_default().to_string());
        if total > 0 && current >= total {
            bar.finish();
            self.running.remove(&series);
            self.finished.push_back((series.label().to_string(), bar));
            if self.finished.len() > MAX_FINISHED_BARS
                && let Some((old_label, old)) = self.finished.pop_front()
            {
                // A long workflow's bars would outgrow the screen: the oldest finished one
                // becomes a line above the bars.
                bars.remove(&old);
                let len = old.length().unwrap_or(0);
                let _ = bars.println(format!("{old_label:>16} done ({len}/{len})"));
            }
        }
    }

    /// Stops every running bar, leaving its last state on screen.
    pub(super) fn finish_bars(&mut self) {
        for (series, bar) in std::mem::take(&mut self.running) {
            bar.abandon();
            self.finished.push_back((series.label().to_string(), bar));
        }
    }

    /// The final word: finishes bars and prints `text` in green (success) or red.
    pub(super) fn outcome(&mut self, ok: bool, text: &str) {
        self.finish_bars();
        let painted = self.paint(if ok { GREEN } else { RED }, text);
        if !self.drew_bars {
            self.line(&painted);
        } else {
            // Below the bars, which stay on screen in their final state.
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{painted}");
            let _ = out.flush();
        }
    }
}

fn str_field<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

/// A JSON value on one line, cut to 200 characters.
fn compact(v: &Value) -> String {
    let text = v.to_string();
    if text.chars().count() > 200 {
        let head: String = text.chars().take(200).collect();
        format!("{head}…")
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The series of each event of a stream (`None` for non-progress events).
    fn series_of(events: &[Value]) -> Vec<Option<Series>> {
        let mut keys = SeriesKeys::default();
        events
            .iter()
            .map(|v| match str_field(v, "event_type") {
                Some("status") => {
                    keys.status(v);
                    None
                }
                Some("progress") => Some(keys.progress(v)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn steps_of_one_counter_are_one_series() {
        // The demo's ingestion job: a step per video and stage, one counter.
        let mut events =
            vec![json!({"event_type": "status", "state": "working", "phase": "ingestion"})];
        for n in 1..=8u64 {
            events.push(
                json!({"event_type": "progress", "current": n - 1, "total": 8,
                               "step": format!("processing_video_{n}.mp4")}),
            );
            events.push(json!({"event_type": "progress", "current": n, "total": 8,
                               "step": format!("done_video_{n}.mp4")}));
        }
        let series: Vec<_> = series_of(&events).into_iter().flatten().collect();
        assert_eq!(series.len(), 16);
        assert!(
            series
                .iter()
                .all(|s| *s == Series::Phase("ingestion".into()))
        );
    }

    #[test]
    fn a_task_without_phases_is_one_series_and_phases_split_it() {
        let events = [
            json!({"event_type": "progress", "current": 1, "total": 2, "step": "a"}),
            json!({"event_type": "progress", "current": 2, "total": 2, "step": "b"}),
            json!({"event_type": "status", "state": "working", "phase": "embed"}),
            json!({"event_type": "progress", "current": 1, "total": 5, "step": "c"}),
            // A status without a phase does not end the phase.
            json!({"event_type": "status", "state": "working", "message": "halfway"}),
            json!({"event_type": "progress", "current": 2, "total": 5, "step": "d"}),
            json!({"event_type": "status", "state": "working", "phase": "index"}),
            json!({"event_type": "progress", "current": 1, "total": 3, "step": "e"}),
        ];
        let series: Vec<_> = series_of(&events).into_iter().flatten().collect();
        let embed = Series::Phase("embed".into());
        let index = Series::Phase("index".into());
        assert_eq!(
            series,
            [Series::Task, Series::Task, embed.clone(), embed, index]
        );
        assert_eq!(Series::Task.label(), TASK_LABEL);
    }

    #[test]
    fn checkpoint_progress_is_one_series_across_phases() {
        // What a checkpoint save emits (DESIGN.md, Checkpoints): its status names
        // `phase_{n}`, its progress counts the workflow's tasks.
        let mut events = Vec::new();
        for n in 0..=3u64 {
            events.push(json!({"event_type": "status", "state": "working",
                               "phase": format!("phase_{n}")}));
            events.push(json!({"event_type": "progress", "current": n, "total": 3,
                               "step": format!("phase_{n}"),
                               "details": {"checkpoint_id": format!("ckpt_{n}"),
                                           "workflow_status": "running",
                                           "current_phase": n, "total_phases": 3}}));
        }
        let series: Vec<_> = series_of(&events).into_iter().flatten().collect();
        assert_eq!(series, vec![Series::Checkpoint; 4]);
    }
}
