//! The human view of `eventqueue watch`: one line per event, a progress bar per running step
//! on a terminal, plain text (no ANSI codes, no bars) otherwise.

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
    /// The bar of each running step.
    steps: BTreeMap<String, ProgressBar>,
    /// Whether any bar was drawn.
    drew_bars: bool,
    /// Finished bars still on screen, oldest first, with their step names. They are kept
    /// alive: a dropped bar is wiped at the next redraw.
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

/// The step name of a progress event without one.
const DEFAULT_STEP: &str = "progress";

impl View {
    /// A view for a terminal (colours and bars) or not (plain lines).
    pub(super) fn new(terminal: bool) -> Self {
        let bars = terminal
            .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stdout_with_hz(10)));
        Self {
            terminal,
            bars,
            steps: BTreeMap::new(),
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
        let step = str_field(v, "step").unwrap_or(DEFAULT_STEP).to_string();
        let current = v.get("current").and_then(Value::as_u64).unwrap_or(0);
        let total = v.get("total").and_then(Value::as_u64).unwrap_or(0);
        let pct = v.get("percentage").and_then(Value::as_f64).unwrap_or(0.0);
        let Some(bars) = &self.bars else {
            self.line(&format!(
                "{tag} progress {step} {current}/{total} ({pct:.0}%)"
            ));
            return;
        };
        let bar = match self.steps.get(&step) {
            Some(bar) => bar.clone(),
            None => {
                let style = ProgressStyle::with_template(
                    "{prefix:>16.bold} [{bar:30.cyan/blue}] {pos}/{len} ({percent}%) {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> ");
                let bar = bars.add(ProgressBar::new(total).with_style(style));
                bar.set_prefix(step.clone());
                self.drew_bars = true;
                self.steps.insert(step.clone(), bar.clone());
                bar
            }
        };
        bar.set_length(total);
        bar.set_position(current.min(total));
        if total > 0 && current >= total {
            bar.finish_with_message("done");
            self.steps.remove(&step);
            self.finished.push_back((step, bar));
            if self.finished.len() > MAX_FINISHED_BARS
                && let Some((old_step, old)) = self.finished.pop_front()
            {
                // A long workflow's bars would outgrow the screen: the oldest finished one
                // becomes a line above the bars.
                bars.remove(&old);
                let len = old.length().unwrap_or(0);
                let _ = bars.println(format!("{old_step:>16} done ({len}/{len})"));
            }
        }
    }

    /// Stops every running bar, leaving its last state on screen.
    pub(super) fn finish_bars(&mut self) {
        for (step, bar) in std::mem::take(&mut self.steps) {
            bar.abandon();
            self.finished.push_back((step, bar));
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
