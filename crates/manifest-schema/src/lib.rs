//! The manifest `capsule build` writes and `capsule-exec` runs: which artifact to load (by
//! content hash), which engine it was compiled for, and every task with its limits.
//!
//! Unknown fields are errors everywhere, and [`Manifest::validate`] checks what serde cannot,
//! so a runner never acts on a manifest it does not fully understand.

pub mod files;
pub mod hosts;
pub mod options;
pub mod problem;
pub mod project;
pub mod signature;
pub mod units;

use std::path::Path;

use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use files::{FileGrant, FileMode, STATE_DIR, normalise_grant_path};
pub use hosts::HostPolicy;
pub use options::{OPTIONS, Secret, TaskOptions, TaskSpec, defaults};
pub use problem::{Category, Explain, Problem};
pub use project::{PROJECT_FILE, ProjectFile, ProjectFileError};
pub use signature::{Parameter, Scalar, Signature, TypeHint};
pub use units::{ByteSize, Compute, Timeout, parse_duration, parse_memory};

/// The manifest format this crate reads and writes.
pub const SCHEMA_VERSION: u32 = 3;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub schema_version: u32,
    /// Version of the `capsule` tool that built it.
    pub capsule_version: String,
    pub engine: Engine,
    pub artifact: Artifact,
    pub tasks: Vec<Task>,
    /// Third-party packages the build installed, at the versions it installed: a lock.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dependencies: Vec<LockedPackage>,
}

/// A package installed from a registry for a build.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockedPackage {
    pub name: String,
    pub version: String,
}

/// The engine configuration the artifact was compiled for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Engine {
    pub wasmtime_version: String,
    /// sha256 of the engine settings that affect compiled code (see `capsule-exec`).
    pub fingerprint: String,
    /// How CPU budgets are counted in the compiled code.
    #[serde(default, skip_serializing_if = "Metering::is_fuel")]
    pub metering: Metering,
}

/// How a project's CPU budgets (`compute`) are counted: `[runtime] metering` in capsule.toml.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Metering {
    /// Wasm fuel, about one unit per instruction, counted by the compiled code: exact and the
    /// same on every machine, at a cost of about a fifth of CPU-bound speed.
    #[default]
    Fuel,
    /// Time spent running Wasm, checked at the engine's epoch ticks: the budget is the CPU time
    /// the fuel would buy ([`Compute::FUEL_PER_SECOND`]). Faster code, but a budget is not
    /// deterministic: it depends on the machine and its load.
    Time,
}

impl Metering {
    pub fn is_fuel(&self) -> bool {
        *self == Self::Fuel
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Fuel => "fuel",
            Self::Time => "time",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Artifact {
    /// File name of the precompiled module, beside the manifest: `<sha256>.cwasm`.
    pub file: String,
    pub sha256: String,
    /// The entry Python file, relative to the project root (for messages).
    pub source: String,
    /// Bytes of linear memory the snapshot needs before any task code runs.
    pub initial_memory_bytes: u64,
    /// The project folder (absolute) that `allowed_files` paths are relative to; only present
    /// when a task has `allowed_files`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project_root: Option<String>,
    /// The runtime's compiled code, which the file above (this build's memory image and
    /// globals) is linked to: the same file for every build on the same runtime.
    pub code: CompiledFile,
}

/// A precompiled module beside the manifest, named by its sha256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompiledFile {
    /// `<sha256>.cwasm`.
    pub file: String,
    pub sha256: String,
}

impl CompiledFile {
    pub fn named_by(sha256: String) -> Self {
        Self { file: format!("{sha256}.cwasm"), sha256 }
    }

    /// A bare file name beside the manifest, never a path elsewhere, named by its hash.
    fn validate(&self, field: &str) -> Result<(), String> {
        let sha = &self.sha256;
        if sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()) {
            return Err(format!("`{field}.sha256` must be 64 lowercase hex digits, not `{sha}`"));
        }
        if self.file != format!("{sha}.cwasm") {
            return Err(format!("`{field}.file` must be `{sha}.cwasm` (named by its hash), not `{}`", self.file));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Task {
    pub name: String,
    /// `module.function` that implements it.
    pub function: String,
    pub options: TaskOptions,
    /// Its parameters and docstring, as the build read them (agent tools describe and check
    /// calls with it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<Signature>,
}

#[derive(Debug, Error)]
pub enum ManifestError {
    #[error("cannot read manifest `{path}`: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("cannot parse `{path}`: {message}")]
    Parse { path: String, message: String },
    #[error("`{path}`: {message}")]
    Invalid { path: String, message: String },
}

impl Explain for ManifestError {
    fn category(&self) -> problem::Category {
        problem::Category::Load
    }

    fn hint(&self) -> Option<String> {
        match self {
            Self::Read { source, .. } if source.kind() == std::io::ErrorKind::NotFound => Some(
                "build it first: `capsule build FILE` writes `.capsule/build/<name>/manifest.toml` beside FILE".into(),
            ),
            _ => None,
        }
    }
}

impl Manifest {
    pub fn from_toml(text: &str, path: &str) -> Result<Self, ManifestError> {
        let manifest: Manifest = toml::from_str(text)
            .map_err(|e| ManifestError::Parse { path: path.to_string(), message: e.to_string() })?;
        manifest.validate().map_err(|message| ManifestError::Invalid { path: path.to_string(), message })?;
        Ok(manifest)
    }

    pub fn load(path: &Path) -> Result<Self, ManifestError> {
        let display = path.display().to_string();
        let text =
            std::fs::read_to_string(path).map_err(|source| ManifestError::Read { path: display.clone(), source })?;
        Self::from_toml(&text, &display)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a manifest always serialises")
    }

    /// Checks what the types cannot: the version, the artifact's name, the limits.
    pub fn validate(&self) -> Result<(), String> {
        if self.schema_version != SCHEMA_VERSION {
            return Err(format!(
                "`schema_version` is {}, this capsule reads version {SCHEMA_VERSION}; rebuild with the matching `capsule build`",
                self.schema_version
            ));
        }
        CompiledFile { file: self.artifact.file.clone(), sha256: self.artifact.sha256.clone() }.validate("artifact")?;
        self.artifact.code.validate("artifact.code")?;
        if self.tasks.is_empty() {
            return Err("`tasks` is empty".into());
        }
        let mut names = std::collections::BTreeSet::new();
        for task in &self.tasks {
            if !names.insert(task.name.as_str()) {
                return Err(format!("task `{}` appears twice", task.name));
            }
            let options = &task.options;
            if options.ram.bytes() < self.artifact.initial_memory_bytes {
                return Err(format!(
                    "task `{}`: `ram` of {} bytes is below the {} bytes the snapshot needs",
                    task.name,
                    options.ram.bytes(),
                    self.artifact.initial_memory_bytes
                ));
            }
            if !options.allowed_files.is_empty() && self.artifact.project_root.is_none() {
                return Err(format!("task `{}` has `allowed_files` but `artifact.project_root` is missing", task.name));
            }
            if let Err((option, problem)) = options.validate() {
                return Err(format!("task `{}`: `{option}`: {}", task.name, problem.message));
            }
        }
        Ok(())
    }

    pub fn task(&self, name: &str) -> Option<&Task> {
        self.tasks.iter().find(|t| t.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        let sha = "ab".repeat(32);
        Manifest {
            schema_version: SCHEMA_VERSION,
            capsule_version: "0.1.0".into(),
            engine: Engine {
                wasmtime_version: "48.0.8".into(),
                fingerprint: "cd".repeat(32),
                metering: Metering::Fuel,
            },
            artifact: Artifact {
                file: format!("{sha}.cwasm"),
                sha256: sha,
                source: "hello.py".into(),
                initial_memory_bytes: 30 << 20,
                project_root: Some("/home/user/project".into()),
                code: CompiledFile::named_by("ef".repeat(32)),
            },
            tasks: vec![
                Task {
                    name: "main".into(),
                    function: "hello.main".into(),
                    options: TaskOptions {
                        compute: Compute::Low,
                        ram: ByteSize(64_000_000),
                        timeout: Some(Timeout(std::time::Duration::from_secs(30))),
                        max_retries: 1,
                        env_vars: std::collections::BTreeMap::from([("MODE".into(), "test".into())]),
                        env_passthrough: vec!["API_TOKEN".into()],
                        allowed_hosts: HostPolicy::parse(&["api.example.com".into(), "*.example.org:8443".into()])
                            .unwrap(),
                        allowed_files: vec![
                            FileGrant { path: "data".into(), mode: FileMode::ReadOnly },
                            FileGrant { path: "out/reports".into(), mode: FileMode::ReadWrite },
                        ],
                        max_written: ByteSize(100_000_000),
                        max_files_created: 50,
                        secrets: std::collections::BTreeMap::from([(
                            "API_KEY".into(),
                            Secret {
                                header: "Authorization".into(),
                                format: "Bearer {value}".into(),
                                hosts: HostPolicy::parse(&["api.example.com".into()]).unwrap(),
                            },
                        )]),
                    },
                    signature: Some(Signature {
                        parameters: vec![Parameter {
                            name: "name".into(),
                            hint: TypeHint::Str,
                            required: false,
                            default: Some(Scalar::Str("world".into())),
                            positional_only: false,
                        }],
                        more_keywords: false,
                        doc: Some("Greets `name`.".into()),
                    }),
                },
                Task {
                    name: "helper".into(),
                    function: "hello.helper".into(),
                    options: TaskOptions {
                        compute: Compute::Fuel(1_000_000),
                        max_retries: 0,
                        ..TaskOptions::default()
                    },
                    signature: None,
                },
            ],
            dependencies: vec![LockedPackage { name: "tabulate".into(), version: "0.9.0".into() }],
        }
    }

    /// Fuzz target: a damaged manifest is refused with an error, never a panic, and what is
    /// accepted is valid.
    #[test]
    fn fuzzed_manifests_are_refused_or_valid_never_a_panic() {
        let seed = sample().to_toml();
        bolero::check!().with_iterations(fixtures::fuzz_iterations()).for_each(|noise: &[u8]| {
            if let Ok(manifest) = Manifest::from_toml(&fixtures::mutate(&seed, noise), "m.toml") {
                assert!(manifest.validate().is_ok());
            }
        });
    }

    #[test]
    fn golden_manifest() {
        let text = sample().to_toml();
        insta::assert_snapshot!(text);
        assert_eq!(Manifest::from_toml(&text, "m.toml").unwrap(), sample());
    }

    fn error_for(edit: impl FnOnce(&mut Manifest)) -> String {
        let mut manifest = sample();
        edit(&mut manifest);
        Manifest::from_toml(&manifest.to_toml(), "capsule.manifest.toml").unwrap_err().to_string()
    }

    #[test]
    fn refuses_invalid_manifests() {
        insta::assert_snapshot!(error_for(|m| m.schema_version = 1));
        insta::assert_snapshot!(error_for(|m| m.artifact.file = "../../etc/passwd".into()));
        insta::assert_snapshot!(error_for(|m| m.artifact.sha256 = "nothex".into()));
        insta::assert_snapshot!(error_for(|m| m.tasks[1].name = "main".into()));
        insta::assert_snapshot!(error_for(|m| m.tasks[0].options.ram = ByteSize(1 << 20)));
        insta::assert_snapshot!(error_for(|m| m.tasks.clear()));
        insta::assert_snapshot!(error_for(|m| m.tasks[0].options.env_passthrough.push("MODE".into())));
        insta::assert_snapshot!(error_for(|m| m.tasks[0].options.allowed_files[0].path = "../etc".into()));
        insta::assert_snapshot!(error_for(|m| m.artifact.code.file = "../code.cwasm".into()));
    }

    #[test]
    fn refuses_unknown_fields() {
        let text = sample().to_toml().replace("max_retries = 0", "max_retries = 0\nretries = 3");
        assert_ne!(text, sample().to_toml());
        insta::assert_snapshot!(Manifest::from_toml(&text, "capsule.manifest.toml").unwrap_err().to_string());
    }

    #[test]
    fn typed_options_are_checked_when_read() {
        let text = sample().to_toml().replace("\"api.example.com\",", "\"https://api.example.com\",");
        let error = Manifest::from_toml(&text, "m.toml").unwrap_err().to_string();
        assert!(error.contains("`https://api.example.com` is not a host rule"), "{error}");
        let text = sample().to_toml().replace("compute = 1000000", "compute = 0");
        assert!(Manifest::from_toml(&text, "m.toml").unwrap_err().to_string().contains("fuel budget of 0"));
    }
}
