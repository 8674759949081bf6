//! The limits and grants of a sandbox given as flags (`capsule python`, `capsule mcp`), read
//! by the same option table as `@task` options.

use clap::Args;
use manifest_schema::options::{self, Literal, TaskSpec, Value};
use manifest_schema::{Category, Problem, TaskOptions};

use crate::exit::Failure;

#[derive(Debug, Clone, Args)]
pub struct SandboxArgs {
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
    pub allow_dir: Vec<String>,
    /// An environment variable the code sees (repeatable).
    #[arg(long = "env", value_name = "NAME=VALUE")]
    env: Vec<String>,
}

fn usage(problem: Problem) -> Failure {
    Failure::problem(Category::Usage, problem)
}

fn text(value: &str) -> Literal {
    Literal { value: Value::Str(value.to_string()), at: 0 }
}

impl SandboxArgs {
    /// The limits and grants, read by the same table as `@task` options.
    pub fn options(&self) -> Result<TaskOptions, Failure> {
        let mut spec = TaskSpec { name: None, options: TaskOptions::for_code() };
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
