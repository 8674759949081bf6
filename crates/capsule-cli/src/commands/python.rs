//! `capsule python`: run a code string in a sandbox, like a notebook cell.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use capsule_exec::Start;
use clap::Args;
use manifest_schema::{Category, Problem};

use crate::exit::{Exit, Failure};
use crate::launch::launch;
use crate::layout::ProjectLayout;
use crate::run_args::{Journaling, Launch, RunArgs};
use crate::sandbox_args::SandboxArgs;

/// Run Python code in a sandbox: the value of a final expression is the result (as JSON when
/// it is JSON, else its repr), like a notebook cell. Same output and envelope as `capsule run`.
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  capsule python -c '1 + 1'\n  capsule python analysis.py --json --compute HIGH --ram 512MiB --timeout 30s\n  echo 'print(\"hi\")' | capsule python -\n  capsule python -c 'open(\"data/in.csv\").read()[:80]' --allow-dir ./data\n  capsule python -c 'import urllib.request; urllib.request.urlopen(\"https://example.com\").status' --allow-host example.com"
)]
pub struct PythonCommand {
    /// The code to run.
    #[arg(short = 'c', value_name = "CODE", conflicts_with = "file")]
    code: Option<String>,
    /// A file of code to run; `-` reads standard input.
    file: Option<PathBuf>,
    #[command(flatten)]
    sandbox: SandboxArgs,
    /// Print the JSON envelope instead of the bare result.
    #[arg(long)]
    json: bool,
    /// Run through the daemon (fail if none answers) [default: through it when one answers].
    #[arg(long, conflicts_with = "no_daemon")]
    daemon: bool,
    /// Run in this process even when a daemon answers.
    #[arg(long)]
    no_daemon: bool,
    /// Print the interpreter image's manifest (building it first if need be) and exit.
    #[arg(long, conflicts_with_all = ["code", "file"])]
    image: bool,
}

fn usage(problem: Problem) -> Failure {
    Failure::problem(Category::Usage, problem)
}

impl PythonCommand {
    pub async fn execute(self) -> Result<ExitCode, Failure> {
        let (manifest, built_with) = image().await?;
        if self.image {
            println!("{}", manifest.display());
            return Ok(Exit::Success.into());
        }
        let code = self.code()?;
        let options = self.sandbox.options()?;
        let run = RunArgs {
            task: None,
            json: self.json,
            args_json: None,
            args_file: None,
            default_timeout: Duration::from_secs(300),
            journal: None,
            verbose: false,
            workers: None,
            project: (!self.sandbox.allow_dir.is_empty()).then(|| PathBuf::from(".")),
            daemon: self.daemon,
            no_daemon: self.no_daemon,
            detach: false,
            trust: Vec::new(),
            args: Vec::new(),
        };
        let layout = ProjectLayout::current(None);
        let start = Start::Task {
            task: Some("run_python".into()),
            args: vec![serde_json::Value::String(code)],
            kwargs: serde_json::Map::new(),
        };
        let entry = manifest.clone();
        let what = Launch {
            manifest,
            entry,
            built_with,
            start,
            options: Some(options),
            journaling: Journaling::OnRequest,
            own_build: true,
        };
        launch(what, &run, &layout).await
    }

    fn code(&self) -> Result<String, Failure> {
        match (&self.code, &self.file) {
            (Some(code), _) => Ok(code.clone()),
            (None, Some(file)) if file.as_os_str() == "-" => {
                let mut code = String::new();
                std::io::stdin()
                    .read_to_string(&mut code)
                    .map_err(|e| usage(Problem::new(format!("cannot read standard input: {e}"))))?;
                Ok(code)
            }
            (None, Some(file)) => std::fs::read_to_string(file)
                .map_err(|e| usage(Problem::new(format!("cannot read `{}`: {e}", file.display())))),
            (None, None) => Err(usage(Problem::hinted(
                "no code to run",
                "give it with `-c CODE`, as a file, or `-` for standard input",
            ))),
        }
    }
}

/// The interpreter image's manifest, built (once per runtime, cached) if need be.
pub async fn image() -> Result<(PathBuf, Option<capsule_exec::Engine>), Failure> {
    let options = capsule_build::interpreter_options(capsule_build::runtime_path())?;
    if let Some(output) = capsule_build::up_to_date(&options) {
        return Ok((output.manifest_path, None));
    }
    let engine = capsule_build::build_engine()?;
    let output = super::build::build_with_progress(&engine, &options).await?;
    Ok((output.manifest_path, Some(engine)))
}
