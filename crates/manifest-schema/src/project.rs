//! `capsule.toml`, the optional project file beside the entry point:
//!
//! ```toml
//! [workflow]
//! name = "research-agent"
//! version = "0.3.0"
//! entrypoint = "main.py"      # so that `capsule run` needs no file argument
//!
//! [tasks]                     # defaults for options a task leaves out
//! default_compute = "MEDIUM"
//! default_ram = "512MB"
//! default_timeout = "2m"
//! default_max_retries = 2
//! ```
//!
//! Unknown sections and keys are errors, like in the manifest.

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::units::{Compute, parse_duration, parse_memory};
use crate::{ManifestError, defaults};

pub const PROJECT_FILE: &str = "capsule.toml";

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectFile {
    #[serde(default)]
    pub workflow: Workflow,
    #[serde(default)]
    tasks: RawTaskDefaults,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workflow {
    pub name: Option<String>,
    pub version: Option<String>,
    /// The entry Python file, relative to `capsule.toml`.
    pub entrypoint: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTaskDefaults {
    default_compute: Option<toml::Value>,
    default_ram: Option<String>,
    default_timeout: Option<String>,
    default_max_retries: Option<u32>,
}

/// Limits for options a task leaves out: Capsule's, or the project's `[tasks]` defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskDefaults {
    pub compute: Compute,
    pub memory_bytes: u64,
    pub timeout: Option<Duration>,
    pub max_retries: u32,
}

impl Default for TaskDefaults {
    fn default() -> Self {
        Self {
            compute: defaults::COMPUTE,
            memory_bytes: defaults::MEMORY_BYTES,
            timeout: None,
            max_retries: defaults::MAX_RETRIES,
        }
    }
}

impl ProjectFile {
    pub fn parse(text: &str, path: &str) -> Result<Self, ManifestError> {
        let file: ProjectFile = toml::from_str(text)
            .map_err(|e| ManifestError::Parse { path: path.to_string(), message: e.to_string() })?;
        file.task_defaults().map_err(|message| ManifestError::Invalid { path: path.to_string(), message })?;
        Ok(file)
    }

    /// The `capsule.toml` in `dir`, if there is one.
    pub fn find(dir: &Path) -> Result<Option<Self>, ManifestError> {
        let path = dir.join(PROJECT_FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => Self::parse(&text, &path.display().to_string()).map(Some),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(ManifestError::Read { path: path.display().to_string(), source }),
        }
    }

    pub fn task_defaults(&self) -> Result<TaskDefaults, String> {
        let raw = &self.tasks;
        let mut defaults = TaskDefaults::default();
        let field = |name: &str, message: String| format!("`tasks.{name}`: {message}");
        if let Some(value) = &raw.default_compute {
            defaults.compute = match value {
                toml::Value::String(text) => Compute::parse(text),
                toml::Value::Integer(fuel) => Compute::from_fuel(u64::try_from(*fuel).unwrap_or(0)),
                other => return Err(field("default_compute", format!("`{other}` is not a compute level"))),
            }
            .map_err(|e| field("default_compute", e.message))?;
        }
        if let Some(text) = &raw.default_ram {
            defaults.memory_bytes = parse_memory(text).map_err(|e| field("default_ram", e.message))?;
        }
        if let Some(text) = &raw.default_timeout {
            defaults.timeout = Some(parse_duration(text).map_err(|e| field("default_timeout", e.message))?);
        }
        if let Some(retries) = raw.default_max_retries {
            defaults.max_retries = retries;
        }
        Ok(defaults)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(defaults.memory_bytes, 1 << 30);
        assert_eq!(defaults.timeout, Some(Duration::from_secs(120)));
        assert_eq!(defaults.max_retries, 3);
        assert_eq!(ProjectFile::default().task_defaults().unwrap(), TaskDefaults::default());
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
