//! The `capsule` command line: `capsule build FILE`, `capsule run FILE`.

use std::path::PathBuf;
use std::process::ExitCode;

use std::path::Path;

use capsule_build::{BuildError, BuildOptions, build, build_runner, entry_from_project};
use capsule_exec::cli::{EXIT_USAGE, TaskArgs, execute};
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
    /// Build FILE (cached) and run one of its tasks.
    Run {
        #[command(flatten)]
        build: BuildArgs,
        #[command(flatten)]
        task: TaskArgs,
    },
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
                let options = args.options(Some(&mut task));
                let output = match async { build(&runner, &options?).await }.await {
                    Ok(output) => output,
                    Err(error) => return build_failed(&error),
                };
                let loaded = runner.load(&output.manifest_path);
                let (artifact, program) = match loaded {
                    Ok(loaded) => loaded,
                    Err(error) => return fail(&error.to_string()),
                };
                match execute(&program, &artifact.manifest, &task).await {
                    Ok(code) => code,
                    Err(error) => fail(&format!("{error:#}")),
                }
            }
        }
    })
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
