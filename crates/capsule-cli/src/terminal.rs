//! What a run shows on the terminal: the task's output as it happens, sub-task events with
//! `--verbose`, and the outcome (or the envelope with `--json`).

use std::io::Write;

use capsule_exec::for_builder::Stream;
use capsule_exec::{Event, EventSink, Outcome};
use manifest_schema::Problem;
use manifest_schema::problem::render;
use python_runtime::{ErrorKind, GuestError};
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

/// Where the limits of a failed task come from, so a hint names what the user can change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limits {
    /// Its `@task(...)` options (a project's task).
    Task,
    /// The command's flags (`capsule python`).
    Flags,
}

/// Prints the outcome: the bare result on stdout, or the failure on stderr (the traceback,
/// then the failure as a problem with what would help: `resume`, when resuming could); with
/// `json`, the whole envelope on stdout, and a failure's problem still on stderr.
pub fn show(outcome: &Outcome, json: bool, limits: Limits, resume: Option<String>) {
    if json {
        println!("{}", serde_json::to_string_pretty(outcome).expect("envelopes serialise"));
        if let Some(error) = &outcome.error {
            eprint!("{}", render(&[failure(outcome, error, limits, resume)]));
        }
        return;
    }
    match (&outcome.error, &outcome.result) {
        (None, Value::String(text)) => println!("{text}"),
        (None, value) => println!("{value}"),
        (Some(error), _) => {
            if !error.traceback.is_empty() {
                eprint!("{}", error.traceback);
                if !error.traceback.ends_with('\n') {
                    eprintln!();
                }
            }
            eprint!("{}", render(&[failure(outcome, error, limits, resume)]));
        }
    }
}

/// A task's failure as a problem, with the hint that would help.
fn failure(outcome: &Outcome, error: &GuestError, limits: Limits, resume: Option<String>) -> Problem {
    let attempts = match outcome.execution.attempts {
        0 | 1 => String::new(),
        n => format!(" after {n} attempts"),
    };
    let what = if error.exc_type.is_empty() { String::new() } else { format!("{}: ", error.exc_type) };
    let message = format!(
        "task `{}` failed{attempts} ({}): {what}{}",
        outcome.execution.task,
        error.kind.as_str(),
        error.message
    );
    let option = |name: &str, example: &str, flag: &str| match limits {
        Limits::Task => format!("raise the task's `{name}` (`@task({name}={example})`)"),
        Limits::Flags => format!("raise it with `{flag}`"),
    };
    let hint = match error.kind {
        _ if resume.is_some() => resume,
        ErrorKind::Fuel => Some(option("compute", "\"HIGH\"", "--compute HIGH")),
        ErrorKind::Memory => Some(option("ram", "\"1GiB\"", "--ram 1GiB")),
        ErrorKind::Timeout => Some(option("timeout", "\"10m\"", "--timeout 10m")),
        ErrorKind::Exception if error.exc_type == "PermissionError" => Some(match limits {
            Limits::Task => "a task sees only the folders its `allowed_files` grants".into(),
            Limits::Flags => "give it a folder with `--allow-dir DIR` (`DIR:rw` to write)".into(),
        }),
        _ => None,
    };
    Problem { message, hint }
}
