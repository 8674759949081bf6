//! What a run shows on the terminal: the task's output as it happens, sub-task events with
//! `--verbose`, and the outcome (or the envelope with `--json`).

use std::io::Write;

use capsule_exec::{Event, EventSink, Outcome, Stream};
use serde_json::Value;

/// Prints a run's events as they happen.
pub struct Terminal {
    /// With `--json`, stdout carries only the envelope: task output goes to stderr.
    pub json: bool,
    pub verbose: bool,
}

impl EventSink for Terminal {
    fn event(&self, event: &Event<'_>) {
        match event {
            Event::Output { stream, text, .. } => {
                // Live output is best effort: a closed terminal must not fail the task.
                let _ = match (stream, self.json) {
                    (Stream::Stdout, false) => write_all(&mut std::io::stdout().lock(), text),
                    _ => write_all(&mut std::io::stderr().lock(), text),
                };
            }
            _ if !self.verbose => {}
            Event::TaskStarted { parent: Some(_), task, depth, .. } => note(*depth, task, "started"),
            Event::TaskReplayed { task, depth, .. } => note(*depth, task, "replayed from the journal"),
            Event::AttemptFailed { attempt, error, retrying: true, .. } => {
                eprintln!("capsule: attempt {attempt} failed ({}); retrying", error.kind.as_str());
            }
            Event::TaskFinished { depth, outcome, .. } if *depth > 0 => {
                let how = match &outcome.error {
                    None => format!("finished in {} ms", outcome.execution.duration_ms),
                    Some(error) => {
                        format!("failed ({}) after {} attempts", error.kind.as_str(), outcome.execution.attempts)
                    }
                };
                note(*depth, &outcome.execution.task, &how);
            }
            _ => {}
        }
    }
}

fn write_all(out: &mut impl Write, bytes: &[u8]) -> std::io::Result<()> {
    out.write_all(bytes)?;
    out.flush()
}

fn note(depth: u32, task: &str, what: &str) {
    eprintln!("capsule: {}{task} {what}", "  ".repeat(depth as usize));
}

/// Prints the outcome: the bare result on stdout, or the failure on stderr; with `json`,
/// the whole envelope on stdout.
pub fn show(outcome: &Outcome, json: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(outcome).expect("envelopes serialise"));
        return;
    }
    match (&outcome.error, &outcome.result) {
        (None, Value::String(text)) => println!("{text}"),
        (None, value) => println!("{value}"),
        (Some(error), _) => {
            let attempts = match outcome.execution.attempts {
                0 | 1 => String::new(),
                n => format!(" after {n} attempts"),
            };
            if !error.traceback.is_empty() {
                eprint!("{}", error.traceback);
                if !error.traceback.ends_with('\n') {
                    eprintln!();
                }
            }
            let what = if error.exc_type.is_empty() { String::new() } else { format!("{}: ", error.exc_type) };
            eprintln!(
                "error: task `{}` failed{attempts} ({}): {what}{}",
                outcome.execution.task,
                error.kind.as_str(),
                error.message
            );
        }
    }
}
