//! `capsule.toml`, the optional project file beside the entry point:
//!
//! ```toml
//! [workflow]
//! name = "research-agent"
//! version = "0.3.0"
//! entrypoint = "main.py"      # so that `capsule run` needs no file argument
//! dependencies = ["jinja2>=3", "pyyaml"]  # from PyPI, installed at build time
//!
//! [runtime]
//! metering = "time"           # CPU budgets in time instead of fuel (default "fuel")
//! flavour = "data"            # the runtime with numpy (default "base")
//!
//! [tasks]                     # defaults for options a task leaves out:
//! default_compute = "MEDIUM"  # `default_<option>` for any `@task` option but `name`
//! default_ram = "512MB"
//! default_timeout = "2m"
//! default_max_retries = 2
//! ```
//!
//! Unknown sections and keys are errors, like in the manifest.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use crate::ManifestError;
use crate::problem::{Category, Explain};

/// A `capsule.toml` that cannot be read or is not valid: the caller's to fix.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct ProjectFileError(#[from] ManifestError);

impl Explain for ProjectFileError {
    fn category(&self) -> Category {
        Category::Usage
    }
}
use crate::options::{self, Literal, TaskOptions, TaskSpec, Value};

pub const PROJECT_FILE: &str = "capsule.toml";

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectFile {
    #[serde(default)]
    pub workflow: Workflow,
    #[serde(default)]
    pub runtime: Runtime,
    /// `default_<option> = value`, checked against the option table when read.
    #[serde(default)]
    tasks: BTreeMap<String, toml::Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workflow {
    /// The project's namespace (in `capsule list`); defaults to the folder's name.
    pub name: Option<String>,
    pub version: Option<String>,
    /// The entry Python file, relative to `capsule.toml`.
    pub entrypoint: Option<String>,
    /// Packages to install from PyPI at build time, as PEP 508 requirements.
    pub dependencies: Option<Vec<String>>,
}

/// How the project's code is compiled and run.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Runtime {
    /// How CPU budgets are counted.
    #[serde(default)]
    pub metering: crate::Metering,
    /// Which runtime the project is built on: `base`, or `data` (with numpy).
    #[serde(default)]
    pub flavour: python_runtime::Flavour,
}

impl ProjectFile {
    pub fn parse(text: &str, path: &str) -> Result<Self, ProjectFileError> {
        let file: ProjectFile = toml::from_str(text)
            .map_err(|e| ManifestError::Parse { path: path.to_string(), message: e.to_string() })?;
        file.task_defaults().map_err(|message| ManifestError::Invalid { path: path.to_string(), message })?;
        Ok(file)
    }

    /// The `capsule.toml` in `dir`, if there is one.
    pub fn find(dir: &Path) -> Result<Option<Self>, ProjectFileError> {
        let path = dir.join(PROJECT_FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => Self::parse(&text, &path.display().to_string()).map(Some),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(ManifestError::Read { path: path.display().to_string(), source }.into()),
        }
    }

    /// The namespace of the project in `dir` (how `capsule list` groups runs): `[workflow]
    /// name` of its capsule.toml, else the folder's name.
    pub fn namespace(dir: &Path) -> Result<String, ProjectFileError> {
        let named = Self::find(dir)?.and_then(|file| file.workflow.name);
        Ok(named.unwrap_or_else(|| {
            let absolute = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
            absolute.file_name().map_or_else(|| "/".into(), |n| n.to_string_lossy().into_owned())
        }))
    }

    /// The options a task starts from before its own `@task(...)` options apply.
    pub fn task_defaults(&self) -> Result<TaskOptions, String> {
        let mut spec = TaskSpec::default();
        for (key, value) in &self.tasks {
            let spec_of = key.strip_prefix("default_").and_then(options::option).filter(|o| o.has_default);
            let Some(option) = spec_of else {
                let known: Vec<String> = options::OPTIONS
                    .iter()
                    .filter(|o| o.has_default)
                    .map(|o| format!("`default_{}`", o.name))
                    .collect();
                return Err(format!("unknown key `tasks.{key}`; `[tasks]` takes {}", known.join(", ")));
            };
            option
                .apply(&mut spec, &literal(value))
                .map_err(|error| format!("`tasks.{key}`: {}", error.problem.message))?;
        }
        if let Err((option, problem)) = spec.options.validate() {
            return Err(format!("`tasks.default_{option}`: {}", problem.message));
        }
        Ok(spec.options)
    }
}

fn literal(value: &toml::Value) -> Literal {
    let value = match value {
        toml::Value::String(text) => Value::Str(text.clone()),
        toml::Value::Integer(n) => Value::Int(i128::from(*n)),
        toml::Value::Float(x) => Value::Float(*x),
        toml::Value::Boolean(b) => Value::Bool(*b),
        toml::Value::Datetime(d) => Value::Str(d.to_string()),
        toml::Value::Array(items) => Value::List(items.iter().map(literal).collect()),
        toml::Value::Table(table) => Value::Dict(
            table.iter().map(|(k, v)| (Literal { value: Value::Str(k.clone()), at: 0 }, literal(v))).collect(),
        ),
    };
    Literal { value, at: 0 }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::units::{ByteSize, Compute, Timeout};

    /// Fuzz target: a damaged `capsule.toml` is refused with an error, never a panic.
    #[test]
    fn fuzzed_project_files_are_refused_or_read_never_a_panic() {
        let seed = "[workflow]\nname = \"agent\"\nentrypoint = \"main.py\"\ndependencies = [\"jinja2>=3\"]\n\n\
                    [tasks]\ndefault_compute = \"HIGH\"\ndefault_ram = \"512MB\"\ndefault_timeout = \"2m\"\n\
                    default_allowed_hosts = [\"api.example.com\"]\n";
        ProjectFile::parse(seed, "capsule.toml").expect("the seed is valid");
        bolero::check!().with_iterations(fixtures::fuzz_iterations()).for_each(|noise: &[u8]| {
            if let Ok(file) = ProjectFile::parse(&fixtures::mutate(seed, noise), "capsule.toml") {
                assert!(file.task_defaults().is_ok());
            }
        });
    }

    #[test]
    fn reads_workflow_and_defaults() {
        let file = ProjectFile::parse(
            "[workflow]\nname = \"w\"\nentrypoint = \"main.py\"\n[tasks]\ndefault_compute = \"HIGH\"\ndefault_ram = \"1GiB\"\ndefault_timeout = \"2m\"\ndefault_max_retries = 3\n",
            "capsule.toml",
        )
        .unwrap();
        assert_eq!(file.workflow.entrypoint.as_deref(), Some("main.py"));
        let defaults = file.task_defaults().unwrap();
        assert_eq!(defaults.compute, Compute::High);
        assert_eq!(defaults.ram, ByteSize(1 << 30));
        assert_eq!(defaults.timeout, Some(Timeout(Duration::from_secs(120))));
        assert_eq!(defaults.max_retries, 3);
        assert_eq!(ProjectFile::default().task_defaults().unwrap(), TaskOptions::default());
        let hosts = ProjectFile::parse("[tasks]\ndefault_allowed_hosts = [\"api.example.com\"]\n", "c.toml").unwrap();
        assert!(!hosts.task_defaults().unwrap().allowed_hosts.is_empty());
    }

    #[test]
    fn metering_is_fuel_unless_the_project_asks_for_time() {
        assert_eq!(ProjectFile::default().runtime.metering, crate::Metering::Fuel);
        let timed = ProjectFile::parse("[runtime]\nmetering = \"time\"\n", "capsule.toml").unwrap();
        assert_eq!(timed.runtime.metering, crate::Metering::Time);
        let error = ProjectFile::parse("[runtime]\nmetering = \"fast\"\n", "capsule.toml").unwrap_err().to_string();
        assert!(error.contains("line 2") && error.contains("`fuel`") && error.contains("`time`"), "{error}");
    }

    #[test]
    fn the_runtime_flavour_is_base_unless_the_project_asks_for_data() {
        assert_eq!(ProjectFile::default().runtime.flavour, python_runtime::Flavour::Base);
        let data = ProjectFile::parse("[runtime]\nflavour = \"data\"\n", "capsule.toml").unwrap();
        assert_eq!(data.runtime.flavour, python_runtime::Flavour::Data);
        let error = ProjectFile::parse("[runtime]\nflavour = \"numpy\"\n", "capsule.toml").unwrap_err().to_string();
        assert!(error.contains("line 2") && error.contains("`base`") && error.contains("`data`"), "{error}");
    }

    #[test]
    fn refuses_unknown_keys_and_bad_units() {
        let error = |text: &str| ProjectFile::parse(text, "capsule.toml").unwrap_err().to_string();
        insta::assert_snapshot!(error("[workflow]\nentry = \"main.py\"\n"));
        insta::assert_snapshot!(error("[tasks]\ndefault_ram = \"lots\"\n"));
        insta::assert_snapshot!(error("[task]\ndefault_ram = \"1GB\"\n"));
        insta::assert_snapshot!(error("[tasks]\ndefault_compute = \"TURBO\"\n"));
    }
}
