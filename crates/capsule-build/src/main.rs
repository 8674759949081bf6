//! The `capsule` command line: `capsule build`, `capsule run`, `capsule resume`, `capsule runs`.

mod runs;

use std::path::PathBuf;
use std::process::ExitCode;

use std::path::Path;

use capsule_build::{BuildError, BuildOptions, build, build_runner, entry_from_project};
use capsule_exec::cli::{EXIT_USAGE, TaskArgs, execute};
use capsule_exec::journal::{DEFAULT_JOURNAL, Journal};
use clap::{Args, Parser, Subcommand};

/// Run Python `@task` functions in WebAssembly sandboxes.
#[derive(Parser)]
#[command(name = "capsule", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Snapshot and precompile FILE's tasks; writes a manifest and a `.cwasm` artifact.
    Build {
        #[command(flatten)]
        build: BuildArgs,
    },
    /// Build FILE (cached) and run one of its tasks, journaled in `.capsule/journal.db`.
    Run {
        #[command(flatten)]
        build: BuildArgs,
        #[command(flatten)]
        task: TaskArgs,
    },
    /// Resume a journaled run: what finished is replayed, the rest runs.
    Resume {
        /// The run to resume, as printed by `capsule run` or listed by `capsule runs`.
        run_id: String,
        /// Output folder of the build [default: `.capsule/build/<name>/`].
        #[arg(short = 'o', long = "out-dir", value_name = "DIR")]
        out_dir: Option<PathBuf>,
        #[command(flatten)]
        task: TaskArgs,
    },
    /// List recent runs of the journal, or show one as a tree.
    Runs {
        #[command(subcommand)]
        show: Option<RunsCommand>,
        /// The journal [default: `.capsule/journal.db`].
        #[arg(long, value_name = "PATH", global = true)]
        journal: Option<PathBuf>,
        /// Print JSON instead of text.
        #[arg(long, global = true)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum RunsCommand {
    /// Show the tree of tasks and HTTP calls of one run.
    Show { run_id: String },
}

#[derive(Args)]
struct BuildArgs {
    /// The Python file that defines the tasks [default: `entrypoint` of ./capsule.toml].
    file: Option<PathBuf>,
    /// Output folder [default: `.capsule/build/<name>/` beside FILE].
    #[arg(short = 'o', long = "out-dir", value_name = "DIR")]
    out_dir: Option<PathBuf>,
    /// Rebuild even when nothing changed.
    #[arg(long)]
    force: bool,
}

impl BuildArgs {
    /// The build options; a first argument that is not a `.py` file belongs to the task, and
    /// the entry point then comes from capsule.toml.
    fn options(&self, task: Option<&mut TaskArgs>) -> Result<BuildOptions, BuildError> {
        let entry = match &self.file {
            Some(file) if file.extension().is_some_and(|e| e == "py") => file.clone(),
            other => {
                if let (Some(argument), Some(task)) = (other, task) {
                    task.args.insert(0, argument.display().to_string());
                } else if let Some(argument) = other {
                    return Err(BuildError::usage(
                        format!("`{}` is not a Python file", argument.display()),
                        "pass the `.py` file that defines your tasks",
                    ));
                }
                entry_from_project(Path::new("."))?
            }
        };
        Ok(BuildOptions {
            entry,
            out_dir: self.out_dir.clone(),
            runtime: python_runtime::runtime_path(),
            force: self.force,
        })
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("CAPSULE_LOG"))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    runtime.block_on(async {
        let runner = match build_runner() {
            Ok(runner) => runner,
            Err(error) => return fail(&format!("{error:#}")),
        };
        match &cli.command {
            Command::Build { build: args } => match async { build(&runner, &args.options(None)?).await }.await {
                Ok(output) => {
                    let status = if output.cache_hit { "up to date" } else { "built" };
                    println!("{status}: {}", output.manifest_path.display());
                    ExitCode::SUCCESS
                }
                Err(error) => build_failed(&error),
            },
            Command::Run { build: args, task } => {
                let mut task = task.clone();
                let options = if task.resume.is_some() && args.file.is_none() {
                    resumed_entry(&task).map(|entry| BuildOptions {
                        entry,
                        out_dir: args.out_dir.clone(),
                        runtime: python_runtime::runtime_path(),
                        force: args.force,
                    })
                } else {
                    args.options(Some(&mut task))
                };
                run_and_show(&runner, options, &task).await
            }
            Command::Resume { run_id, out_dir, task } => {
                let mut task = task.clone();
                task.resume = Some(run_id.clone());
                let options = resumed_entry(&task).map(|entry| BuildOptions {
                    entry,
                    out_dir: out_dir.clone(),
                    runtime: python_runtime::runtime_path(),
                    force: false,
                });
                run_and_show(&runner, options, &task).await
            }
            Command::Runs { show, journal, json } => {
                let path = journal.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_JOURNAL));
                match runs::show(&path, show.as_ref().map(|RunsCommand::Show { run_id }| run_id.as_str()), *json) {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(error) => fail(&format!("{error:#}")),
                }
            }
        }
    })
}

/// The entry file of the run being resumed, from its journal (`--journal`, else the one in
/// the current folder).
fn resumed_entry(task: &TaskArgs) -> Result<PathBuf, BuildError> {
    let path = task.journal.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_JOURNAL));
    let run = task.resume.as_deref().expect("resuming");
    let journal = Journal::open(&path).map_err(|e| BuildError::message(e.to_string()))?;
    let record = journal.run(run).map_err(|e| {
        BuildError::usage(
            e.to_string(),
            "run `capsule runs` in the project folder to list the runs, or pass `--journal PATH`",
        )
    })?;
    // The journal lives in `<project>/.capsule/journal.db`; entries are relative to the project.
    let project = path.parent().and_then(Path::parent).unwrap_or(Path::new("."));
    Ok(project.join(record.entry))
}

async fn run_and_show(
    runner: &capsule_exec::Runner,
    options: Result<BuildOptions, BuildError>,
    task: &TaskArgs,
) -> ExitCode {
    // The journal lives in the project: the entry file's folder.
    let journal = options.as_ref().ok().map(|o| o.entry.parent().unwrap_or(Path::new("")).join(DEFAULT_JOURNAL));
    let output = match async { build(runner, &options?).await }.await {
        Ok(output) => output,
        Err(error) => return build_failed(&error),
    };
    let (artifact, program) = match runner.load(&output.manifest_path) {
        Ok(loaded) => loaded,
        Err(error) => return fail(&error.to_string()),
    };
    match execute(&program, &artifact.manifest, task, journal.as_deref()).await {
        Ok(code) => code,
        Err(error) => fail(&format!("{error:#}")),
    }
}

fn build_failed(error: &BuildError) -> ExitCode {
    for line in error.lines() {
        eprintln!("error: {line}");
    }
    ExitCode::from(EXIT_USAGE)
}

fn fail(message: &str) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(EXIT_USAGE)
}
