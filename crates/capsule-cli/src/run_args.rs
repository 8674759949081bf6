//! The options of running a task, shared by `capsule run`, `capsule resume` and
//! `capsule-exec`, and the one path from them to the engine and back.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use capsule_exec::{Engine, Journal, Loaded, Outcome, RunOrder, RunRequest, Start};
use clap::Args;
use manifest_schema::TaskOptions;
use manifest_schema::{Category, Problem};
use serde_json::Value;

use crate::exit::{Exit, Failure};
use crate::layout::ProjectLayout;
use crate::terminal::{Limits, Terminal, show};

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// The task to run [default: `main`, or the only task].
    #[arg(long)]
    pub task: Option<String>,
    /// Print a JSON envelope (result, error, execution details) instead of the bare result.
    #[arg(long)]
    pub json: bool,
    /// The task's arguments as a JSON array, for typed values: '[1, "two", {"three": 3}]';
    /// `-` reads it from standard input.
    #[arg(long, value_name = "JSON", conflicts_with = "args")]
    pub args_json: Option<String>,
    /// The task's arguments as a JSON array in a file (`-`: standard input), for inputs too
    /// large for a command line.
    #[arg(long, value_name = "PATH", conflicts_with_all = ["args", "args_json"])]
    pub args_file: Option<PathBuf>,
    /// Deadline of each attempt for tasks that set no `timeout` (e.g. "30s", "10m").
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = parse_duration)]
    pub default_timeout: Duration,
    /// Journal file recording the run [default: `.capsule/journal.db` in the project].
    #[arg(long, value_name = "PATH")]
    pub journal: Option<PathBuf>,
    /// Print sub-task events as they happen.
    #[arg(long, short = 'v')]
    pub verbose: bool,
    /// How many spawned sub-tasks run at once [default: the number of cores].
    #[arg(long, value_name = "N")]
    pub workers: Option<usize>,
    /// The project folder that `allowed_files` paths are relative to [default: where it was built].
    #[arg(long, value_name = "DIR")]
    pub project: Option<PathBuf>,
    /// Run through the daemon (fail if none answers) [default: through it when one answers].
    #[arg(long, conflicts_with = "no_daemon")]
    pub daemon: bool,
    /// Run in this process even when a daemon answers.
    #[arg(long)]
    pub no_daemon: bool,
    /// Run the manifest only if one of these public keys signed it (`capsule keygen`,
    /// `capsule build --sign`); repeatable. `CAPSULE_TRUST` adds a colon-separated list.
    #[arg(long, value_name = "KEY.pub")]
    pub trust: Vec<PathBuf>,
    /// Start the run in the daemon and print its id instead of waiting (see `capsule list`, `logs`).
    #[arg(long, conflicts_with_all = ["no_daemon", "json"])]
    pub detach: bool,
    /// Arguments passed to the task as strings.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,
}

/// The largest arguments accepted: what the daemon accepts in one request.
const MAX_ARGS_BYTES: usize = capsule_daemon::api::MAX_REQUEST_BYTES;

/// Arguments from a file, or standard input for `-`, read up to one byte past the limit.
fn read_args(path: &Path) -> Result<String, Failure> {
    use std::io::Read;
    let limit = MAX_ARGS_BYTES as u64 + 1;
    let mut text = String::new();
    let read = if path == Path::new("-") {
        std::io::stdin().take(limit).read_to_string(&mut text)
    } else {
        std::fs::File::open(path).and_then(|file| file.take(limit).read_to_string(&mut text))
    };
    let shown = if path == Path::new("-") { "standard input".to_string() } else { format!("`{}`", path.display()) };
    read.map_err(|error| {
        Failure::problem(Category::Usage, Problem::new(format!("cannot read the arguments from {shown}: {error}")))
    })?;
    Ok(text)
}

/// A duration option's value, with the unit's hint in clap's error.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    manifest_schema::parse_duration(text).map_err(|e| match e.hint {
        Some(hint) => format!("{}\n  hint: {hint}", e.message),
        None => e.message,
    })
}

impl RunArgs {
    fn args(&self) -> Result<Vec<Value>, Failure> {
        let stdin = Path::new("-");
        let (text, source) = match (&self.args_json, &self.args_file) {
            (Some(json), _) if json != "-" => (json.clone(), "`--args-json`".to_string()),
            (Some(_), _) => (read_args(stdin)?, "the arguments on standard input".to_string()),
            (None, Some(file)) if file == stdin => (read_args(stdin)?, "the arguments on standard input".to_string()),
            (None, Some(file)) => (read_args(file)?, format!("`{}`", file.display())),
            (None, None) => return Ok(self.args.iter().cloned().map(Value::String).collect()),
        };
        if text.len() > MAX_ARGS_BYTES {
            return Err(Failure::problem(
                Category::Usage,
                Problem::hinted(
                    format!("{source} is larger than {} MiB, the limit for arguments", MAX_ARGS_BYTES >> 20),
                    "pass large data as a file the task reads (`allowed_files`), and its name as the argument",
                ),
            ));
        }
        match serde_json::from_str::<Value>(&text) {
            Ok(Value::Array(values)) => Ok(values),
            Ok(_) => Err(Failure::problem(
                Category::Usage,
                Problem::hinted(format!("{source} must be a JSON array"), "e.g. --args-json '[1, \"two\"]'"),
            )),
            Err(error) => {
                Err(Failure::problem(Category::Usage, Problem::new(format!("{source} is not valid JSON: {error}"))))
            }
        }
    }

    /// The keys a manifest must be signed by to run, if any (`--trust`, `CAPSULE_TRUST`).
    pub fn trust(&self) -> Result<Option<capsule_exec::Trust>, Failure> {
        capsule_exec::Trust::from_files_and_env(&self.trust).map_err(|e| Failure::of(&e))
    }

    /// A new run of the selected task.
    pub fn start(&self) -> Result<Start, Failure> {
        Ok(Start::Task { task: self.task.clone(), args: self.args()?, kwargs: serde_json::Map::new() })
    }
}

/// Whether runs of this command are journaled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Journaling {
    /// Always: in `--journal`, else the project's journal.
    Project,
    /// Only when `--journal` is given (`capsule-exec`, which has no project of its own).
    OnRequest,
}

/// What to run, for [`launch`].
pub struct Launch {
    /// The built manifest.
    pub manifest: PathBuf,
    /// The file it came from (recorded for resuming).
    pub entry: PathBuf,
    /// The engine that built it, if this process did (reused rather than made twice).
    pub built_with: Option<Engine>,
    pub start: Start,
    /// Options replacing the task's (the interpreter image's calls bring their own).
    pub options: Option<TaskOptions>,
    pub journaling: Journaling,
    /// This user's own build in its cache folder (the interpreter image), run without asking
    /// for a signature.
    pub own_build: bool,
}

impl Launch {
    /// What this launch asks of the engine, with the command's flags.
    pub fn order(&self, args: &RunArgs) -> RunOrder {
        RunOrder {
            entry: Some(self.entry.display().to_string()),
            options: self.options.clone(),
            default_timeout: Some(args.default_timeout),
            files_root: args.project.clone(),
            workers: args.workers,
            ..RunOrder::starting(self.start.clone())
        }
    }

    /// Where the run's limits come from: the options it brings (the command's flags), else
    /// the task's own.
    pub fn limits(&self) -> Limits {
        if self.options.is_some() { Limits::Flags } else { Limits::Task }
    }
}

/// Runs `what` on `loaded` in this process.
pub(crate) async fn run_in_process(
    engine: &Engine,
    loaded: &Arc<Loaded>,
    what: Launch,
    args: &RunArgs,
    layout: &ProjectLayout,
) -> Result<ExitCode, Failure> {
    let journal = match (what.journaling, &args.journal) {
        (Journaling::OnRequest, None) => None,
        _ => Some(Arc::new(Journal::open(&layout.journal)?)),
    };
    let limits = what.limits();
    let request = RunRequest {
        journal,
        events: Arc::new(Terminal { json: args.json, verbose: args.verbose }),
        ..RunRequest::new(what.order(args))
    };
    let prepared = engine.prepare(loaded, request)?;
    let run_id = prepared.run_id().map(str::to_string);
    if let (true, Some(run)) = (args.verbose, &run_id) {
        eprintln!("capsule: run {run}");
    }
    let outcome = prepared.run().await;
    Ok(finish(&outcome, run_id.as_deref(), args, layout, limits))
}

/// Shows the outcome of a run, with how to resume it when that could help.
pub fn finish(
    outcome: &Outcome,
    run_id: Option<&str>,
    args: &RunArgs,
    layout: &ProjectLayout,
    limits: Limits,
) -> ExitCode {
    let resume = run_id
        .filter(|_| outcome.could_succeed_on_resume())
        .map(|run| format!("resume run {run} with `capsule resume {run}{}`", layout.journal_flag()));
    show(outcome, args.json, limits, resume);
    if outcome.success { Exit::Success } else { Exit::TaskFailed }.into()
}
