//! `capsule python`: run a code string in a sandbox, like a notebook cell.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use capsule_exec::Start;
use clap::Args;
use manifest_schema::options::{self, Literal, TaskSpec, Value};
use manifest_schema::{Problem, TaskOptions};

use crate::exit::{Exit, Failure};
use crate::layout::ProjectLayout;
use crate::run_args::{Journaling, Launch, RunArgs, launch};

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
    /// CPU budget: "LOW", "MEDIUM", "HIGH" or a number of fuel units [default: "MEDIUM"].
    #[arg(long, value_name = "FUEL")]
    compute: Option<String>,
    /// Memory limit, e.g. "512MiB" [default: "256MiB"].
    #[arg(long, value_name = "SIZE")]
    ram: Option<String>,
    /// Wall-clock limit, e.g. "30s" [default: 5 minutes].
    #[arg(long, value_name = "DURATION")]
    timeout: Option<String>,
    /// A host the code may reach over HTTP (repeatable), as in `allowed_hosts`.
    #[arg(long = "allow-host", value_name = "RULE")]
    allow_host: Vec<String>,
    /// A folder of the current one the code may use (repeatable); `DIR:rw` to write in it.
    #[arg(long = "allow-dir", value_name = "DIR[:rw]")]
    allow_dir: Vec<String>,
    /// An environment variable the code sees (repeatable).
    #[arg(long = "env", value_name = "NAME=VALUE")]
    env: Vec<String>,
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
    Failure::problem(Exit::Usage, problem)
}

fn text(value: &str) -> Literal {
    Literal { value: Value::Str(value.to_string()), at: 0 }
}

impl PythonCommand {
    pub async fn execute(self) -> Result<ExitCode, Failure> {
        let (manifest, built_with) = image().await?;
        if self.image {
            println!("{}", manifest.display());
            return Ok(Exit::Success.into());
        }
        let code = self.code()?;
        let options = self.options()?;
        let run = RunArgs {
            task: None,
            json: self.json,
            args_json: None,
            default_timeout: Duration::from_secs(300),
            journal: None,
            verbose: false,
            workers: None,
            project: (!self.allow_dir.is_empty()).then(|| PathBuf::from(".")),
            daemon: self.daemon,
            no_daemon: self.no_daemon,
            detach: false,
            args: Vec::new(),
        };
        let layout = ProjectLayout::current(None);
        let start = Start::Task {
            task: Some("run_python".into()),
            args: vec![serde_json::Value::String(code)],
            kwargs: serde_json::Map::new(),
        };
        let entry = manifest.clone();
        let what =
            Launch { manifest, entry, built_with, start, options: Some(options), journaling: Journaling::OnRequest };
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

    /// The limits and grants, read by the same table as `@task` options.
    fn options(&self) -> Result<TaskOptions, Failure> {
        let mut spec = TaskSpec { name: None, options: TaskOptions { max_retries: 0, ..TaskOptions::default() } };
        let mut set = |name: &str, flag: &str, literal: Literal| {
            let option = options::option(name).expect("a known option");
            option.apply(&mut spec, &literal).map_err(|error| usage(error.problem.context(format!("`{flag}`"))))
        };
        if let Some(compute) = &self.compute {
            set("compute", "--compute", text(compute))?;
        }
        if let Some(ram) = &self.ram {
            set("ram", "--ram", text(ram))?;
        }
        if let Some(timeout) = &self.timeout {
            set("timeout", "--timeout", text(timeout))?;
        }
        if !self.allow_host.is_empty() {
            let rules = self.allow_host.iter().map(|r| text(r)).collect();
            set("allowed_hosts", "--allow-host", Literal { value: Value::List(rules), at: 0 })?;
        }
        if !self.allow_dir.is_empty() {
            let grants = self
                .allow_dir
                .iter()
                .map(|dir| match dir.strip_suffix(":rw") {
                    Some(path) => Literal {
                        value: Value::Dict(vec![(text("path"), text(path)), (text("mode"), text("read-write"))]),
                        at: 0,
                    },
                    None => text(dir),
                })
                .collect();
            set("allowed_files", "--allow-dir", Literal { value: Value::List(grants), at: 0 })?;
        }
        if !self.env.is_empty() {
            let pairs = self
                .env
                .iter()
                .map(|pair| match pair.split_once('=') {
                    Some((name, value)) => Ok((text(name), text(value))),
                    None => {
                        Err(usage(Problem::hinted(format!("`--env {pair}` has no `=`"), "write `--env NAME=VALUE`")))
                    }
                })
                .collect::<Result<_, _>>()?;
            set("env_vars", "--env", Literal { value: Value::Dict(pairs), at: 0 })?;
        }
        Ok(spec.options)
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
