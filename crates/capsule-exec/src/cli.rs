//! What `capsule-exec` and `capsule run` share: choosing the task, reading its arguments,
//! showing the outcome and the exit code.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use manifest_schema::{Manifest, Task};
use serde_json::Value;

use crate::journal::{Entered, Journal, hash_json};
use crate::output::LiveSink;
use crate::run::{Call, Outcome, run_task};
use crate::sandbox::{Program, Streams};
use crate::subtasks::{JournalPosition, Orchestrator, RunSettings, Scope};

/// Exit code for a task that failed.
pub const EXIT_TASK_FAILED: u8 = 1;
/// Exit code for bad usage, a failed build or an artifact that cannot be loaded.
pub const EXIT_USAGE: u8 = 2;

#[derive(Debug, Clone, Args)]
pub struct TaskArgs {
    /// The task to run [default: `main`, or the only task].
    #[arg(long)]
    pub task: Option<String>,
    /// Print a JSON envelope (result, error, execution details) instead of the bare result.
    #[arg(long)]
    pub json: bool,
    /// The task's arguments as a JSON array, for typed values: '[1, "two", {"three": 3}]'.
    #[arg(long, value_name = "JSON", conflicts_with = "args")]
    pub args_json: Option<String>,
    /// Deadline of each attempt for tasks that set no `timeout` (e.g. "30s", "10m").
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = parse_timeout)]
    pub default_timeout: Duration,
    /// Journal file recording the run, for `--resume` and `capsule runs`.
    #[arg(long, value_name = "PATH")]
    pub journal: Option<std::path::PathBuf>,
    /// Resume the journaled run RUN_ID: finished sub-tasks and HTTP calls are replayed.
    #[arg(long, value_name = "RUN_ID", conflicts_with_all = ["task", "args_json", "args"])]
    pub resume: Option<String>,
    /// Print sub-task events as they happen.
    #[arg(long, short = 'v')]
    pub verbose: bool,
    /// How many spawned sub-tasks run at once [default: the number of cores].
    #[arg(long, value_name = "N")]
    pub workers: Option<usize>,
    /// The project folder that `allowed_files` paths are relative to [default: where it was built].
    #[arg(long, value_name = "DIR")]
    pub project: Option<std::path::PathBuf>,
    /// Arguments passed to the task as strings.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,
}

impl TaskArgs {
    pub fn call(&self) -> Result<Call> {
        let args = match &self.args_json {
            Some(text) => match serde_json::from_str::<Value>(text).context("`--args-json` is not valid JSON")? {
                Value::Array(values) => values,
                _ => bail!("`--args-json` must be a JSON array, e.g. '[1, \"two\"]'"),
            },
            None => self.args.iter().cloned().map(Value::String).collect(),
        };
        Ok(Call { args, kwargs: serde_json::Map::new(), default_timeout: self.default_timeout, project_root: None })
    }

    /// The task named by `--task`, else `main`, else the only one.
    pub fn select<'m>(&self, manifest: &'m Manifest) -> Result<&'m Task> {
        let names = || manifest.tasks.iter().map(|t| format!("`{}`", t.name)).collect::<Vec<_>>().join(", ");
        match &self.task {
            Some(name) => manifest
                .task(name)
                .with_context(|| format!("no task named `{name}`\n  hint: the tasks are {}", names())),
            None => match (manifest.task("main"), manifest.tasks.as_slice()) {
                (Some(main), _) => Ok(main),
                (None, [only]) => Ok(only),
                _ => {
                    bail!("several tasks and none is called `main`\n  hint: choose one with `--task NAME`: {}", names())
                }
            },
        }
    }

    pub fn streams(&self) -> Streams {
        // With `--json`, stdout carries only the envelope; task output goes to stderr.
        let stdout = if self.json { LiveSink::Stderr } else { LiveSink::Stdout };
        Streams { stdout, stderr: LiveSink::Stderr }
    }
}

fn parse_timeout(text: &str) -> Result<Duration, String> {
    manifest_schema::parse_duration(text).map_err(|e| match e.hint {
        Some(hint) => format!("{}\n  hint: {hint}", e.message),
        None => e.message,
    })
}

/// Runs the selected task (or resumes a journaled run) and shows its outcome; returns the
/// process exit code. `journal` is `--journal` or the caller's default.
pub async fn execute(
    program: &Program,
    manifest: &Manifest,
    args: &TaskArgs,
    journal: Option<&Path>,
) -> Result<ExitCode> {
    let journal = match args.journal.as_deref().or(journal) {
        Some(path) => Some(Arc::new(Journal::open(path)?)),
        None => None,
    };
    let (task, mut call, run_id) = match (&args.resume, &journal) {
        (Some(id), Some(journal)) => {
            let record = journal.run(id)?;
            let task = manifest
                .task(&record.task)
                .with_context(|| format!("run `{id}` ran task `{}`, which this build no longer has", record.task))?;
            let Value::Array(values) = record.args else { bail!("run `{id}` has malformed arguments in the journal") };
            let call = Call { args: values, ..args.call()? };
            (task, call, Some(id.clone()))
        }
        (Some(_), None) => bail!("`--resume` needs a journal\n  hint: pass `--journal PATH`"),
        (None, journal) => {
            let task = args.select(manifest)?;
            let call = args.call()?;
            let run_id = match journal {
                Some(journal) => Some(journal.start_run(
                    &manifest.artifact.source,
                    &manifest.artifact.sha256,
                    &task.name,
                    &Value::Array(call.args.clone()),
                )?),
                None => None,
            };
            (task, call, run_id)
        }
    };
    call.project_root = args.project.clone().or_else(|| manifest.artifact.project_root.clone().map(Into::into));
    let workers = args.workers.unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    let settings = RunSettings {
        streams: args.streams(),
        default_timeout: call.default_timeout,
        project_root: call.project_root.clone(),
        workers,
        verbose: args.verbose,
    };
    let orchestrator = Orchestrator::new(program.clone(), manifest.tasks.clone(), settings);

    let mut position = None;
    if let (Some(journal), Some(run)) = (&journal, &run_id) {
        if args.verbose {
            eprintln!("capsule: run {run}");
        }
        let args_hash = hash_json(&serde_json::json!([call.args, call.kwargs]));
        match journal.enter(run, 0, 0, "task", &task.name, "", &args_hash)? {
            Entered::Replay { result, .. } => {
                show(&Outcome::replayed(result), args.json);
                return Ok(ExitCode::SUCCESS);
            }
            Entered::Run { id } => {
                position = Some(JournalPosition { journal: journal.clone(), run: run.as_str().into(), call: id })
            }
        }
    }
    let outcome =
        run_task(program, task, call, args.streams(), Some(Scope::root(orchestrator, position.clone()))).await;
    if let (Some(position), Some(run)) = (position, &run_id) {
        position.complete(position.call, &outcome);
        position.journal.finish_run(run, outcome.success)?;
        if !outcome.success {
            eprintln!("capsule: run {run} failed; resume it with `capsule resume {run}`");
        }
    }
    show(&outcome, args.json);
    Ok(ExitCode::from(if outcome.success { 0 } else { EXIT_TASK_FAILED }))
}

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
                1 => String::new(),
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
