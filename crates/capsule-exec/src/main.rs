//! `capsule-exec MANIFEST [--task NAME] [--json] [ARGS...]`

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use capsule_exec::Runner;
use capsule_exec::cli::{EXIT_USAGE, TaskArgs, execute};
use clap::Parser;

/// Run a task of a Capsule artifact built by `capsule build`.
#[derive(Parser)]
#[command(name = "capsule-exec", version)]
struct Cli {
    /// The manifest written by `capsule build`.
    manifest: PathBuf,
    #[command(flatten)]
    task: TaskArgs,
}

fn main() -> ExitCode {
    init_logging();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    match runtime.block_on(run(&cli)) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(EXIT_USAGE)
        }
    }
}

async fn run(cli: &Cli) -> Result<ExitCode> {
    let started = std::time::Instant::now();
    let runner = Runner::new()?;
    tracing::debug!(elapsed = ?started.elapsed(), "engine ready");
    let (artifact, program) = runner.load(&cli.manifest)?;
    tracing::debug!(elapsed = ?started.elapsed(), "program ready");
    execute(&program, &artifact.manifest, &cli.task, None).await
}

fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("CAPSULE_LOG"))
        .with_writer(std::io::stderr)
        .init();
}
