//! Third-party packages a project declares, installed from PyPI at build time and bundled
//! like `vendor/`.
//!
//! Declared (first found wins): `[workflow] dependencies` in `capsule.toml`, else a
//! `requirements.txt` beside the entry file, else `[project] dependencies` in a
//! `pyproject.toml` there. pip resolves them for the sandbox's CPython 3.13 (wheels only),
//! into `<cache>/dependencies/<key>`, keyed by the requirements, so a second build installs
//! nothing. Compiled files in the wheels cannot run in the sandbox: they are left out and
//! named in a note; packages whose compiled parts are optional speed-ups work without them,
//! and one that needs them fails at import with the module named.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use manifest_schema::{LockedPackage, ProjectFile};

use crate::cache::hex_sha256;
use crate::error::BuildError;

/// The Python that runs pip: `$CAPSULE_PYTHON`, else `python3`.
pub const PYTHON_ENV: &str = "CAPSULE_PYTHON";
/// Where installed packages appear in module paths (tracebacks, messages).
pub const SHOWN_DIR: &str = "site-packages";
const REQUIREMENTS_FILE: &str = "requirements.txt";
const PYPROJECT_FILE: &str = "pyproject.toml";
/// The lock and the notes of an installation, beside its packages.
const RECORD_FILE: &str = "capsule-install.json";
/// Wheels are chosen for the runtime's Python; the platform only decides which compiled
/// files come along, and those are dropped, so one fixed platform keeps the lock the same on
/// every machine.
const PIP_TARGET: &[&str] = &[
    "--python-version",
    "3.13",
    "--implementation",
    "cp",
    "--abi",
    "cp313",
    "--abi",
    "abi3",
    "--abi",
    "none",
    "--platform",
    "manylinux_2_17_x86_64",
    "--only-binary=:all:",
];
const COMPILED: &[&str] = &[".so", ".pyd", ".dylib"];

/// The requirements a project declares, and the file they came from.
#[derive(Debug, Clone)]
pub struct Requirements {
    /// The file that declares them (it is part of the build's fingerprint).
    file: PathBuf,
    lines: Vec<String>,
}

/// Files whose appearance changes which requirements apply.
pub fn declaring_files(root: &Path) -> [PathBuf; 2] {
    [root.join(REQUIREMENTS_FILE), root.join(PYPROJECT_FILE)]
}

impl Requirements {
    /// What the project beside `root` declares, if anything.
    pub fn find(root: &Path, config: &ProjectFile) -> Result<Option<Self>, BuildError> {
        if let Some(lines) = &config.workflow.dependencies {
            return Ok(Some(Self { file: root.join(manifest_schema::PROJECT_FILE), lines: lines.clone() }));
        }
        let [requirements, pyproject] = declaring_files(root);
        if requirements.is_file() {
            let text = read(&requirements)?;
            let lines = text
                .lines()
                .map(|line| line.split(" #").next().unwrap_or_default().trim())
                .filter(|line| !line.is_empty() && !line.starts_with('#'))
                .map(str::to_string)
                .collect();
            return Ok(Some(Self { file: requirements, lines }));
        }
        if pyproject.is_file() {
            let table: toml::Table = read(&pyproject)?.parse().map_err(|e: toml::de::Error| {
                BuildError::message(format!("{}: {}", pyproject.display(), e.message()))
            })?;
            let declared = table.get("project").and_then(|p| p.get("dependencies"));
            let Some(declared) = declared else { return Ok(None) };
            let lines =
                declared.as_array().and_then(|items| items.iter().map(|i| i.as_str().map(str::to_string)).collect());
            return match lines {
                Some(lines) => Ok(Some(Self { file: pyproject, lines })),
                None => Err(BuildError::hinted(
                    format!("{}: `project.dependencies` must be a list of strings", pyproject.display()),
                    "write requirements as PEP 508 strings, e.g. `dependencies = [\"jinja2>=3\"]`",
                )),
            };
        }
        Ok(None)
    }
}

fn read(path: &Path) -> Result<String, BuildError> {
    fs::read_to_string(path).map_err(|e| BuildError::io(format!("cannot read `{}`", path.display()), e))
}

/// Installed packages: the folder to bundle from, the lock, what was left out.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Installed {
    #[serde(skip)]
    pub dir: PathBuf,
    pub locked: Vec<LockedPackage>,
    /// Compiled files left out, relative to `dir`.
    pub dropped: Vec<String>,
}

impl Installed {
    /// The one-line note about compiled files left out, if any were.
    pub fn note(&self) -> Option<String> {
        (!self.dropped.is_empty()).then(|| {
            format!(
                "left out compiled files the sandbox cannot run (the packages use their pure-Python code): {}",
                self.dropped.join(", ")
            )
        })
    }

    /// The hint for a failed import whose `message` names a module whose compiled file was
    /// left out: that package needs native code.
    pub fn explain(&self, message: &str) -> Option<String> {
        self.dropped.iter().find_map(|file| {
            let module = file.split('.').next()?.replace('/', ".");
            let named = [format!("No module named '{module}'"), format!("from '{module}'")];
            let package = module.split('.').next()?;
            named.iter().any(|n| message.contains(n.as_str())).then(|| {
                format!(
                    "`{package}` needs its compiled module `{file}`, which cannot run in the sandbox; use a pure-Python package instead"
                )
            })
        })
    }
}

/// Installs `requirements` (or finds them installed) in the cache.
pub fn install(requirements: &Requirements) -> Result<Installed, BuildError> {
    let cache = crate::cache_dir().ok_or_else(|| {
        BuildError::hinted(
            "no cache folder for installed dependencies",
            format!("set `{}` to a folder Capsule may write", crate::CACHE_DIR_ENV),
        )
    })?;
    let key =
        hex_sha256(&[b"dependencies/1", requirements.lines.join("\n").as_bytes(), PIP_TARGET.join(" ").as_bytes()]);
    let dir = cache.join("dependencies").join(&key[..32]);
    if let Ok(record) = fs::read(dir.join(RECORD_FILE))
        && let Ok(installed) = serde_json::from_slice::<Installed>(&record)
    {
        return Ok(Installed { dir, ..installed });
    }
    let staging = dir.with_extension(format!("tmp{}", std::process::id()));
    let _ = fs::remove_dir_all(&staging);
    fs::create_dir_all(&staging).map_err(|e| BuildError::io(format!("cannot create `{}`", staging.display()), e))?;
    let result = pip_install(requirements, &staging).and_then(|()| tidy(&staging));
    let mut installed = match result {
        Ok(installed) => installed,
        Err(error) => {
            let _ = fs::remove_dir_all(&staging);
            return Err(error);
        }
    };
    let record = serde_json::to_vec_pretty(&installed).expect("serialises");
    fs::write(staging.join(RECORD_FILE), record).map_err(|e| BuildError::io("cannot record the installation", e))?;
    // A concurrent build may have installed the same set first: either copy will do.
    if fs::rename(&staging, &dir).is_err() {
        let _ = fs::remove_dir_all(&staging);
    }
    installed.dir = dir;
    Ok(installed)
}

fn pip_install(requirements: &Requirements, target: &Path) -> Result<(), BuildError> {
    let python = std::env::var_os(PYTHON_ENV).unwrap_or_else(|| "python3".into());
    let shown = requirements.file.display();
    tracing::info!(requirements = ?requirements.lines, from = %shown, "installing dependencies");
    let output = Command::new(&python)
        .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-compile", "--no-input"])
        .arg("--target")
        .arg(target)
        .args(PIP_TARGET)
        .args(&requirements.lines)
        .env("PIP_NO_WARN_SCRIPT_LOCATION", "1")
        .output()
        .map_err(|e| {
            BuildError::hinted(
                format!(
                    "cannot run `{} -m pip` to install the dependencies in `{shown}`: {e}",
                    python.to_string_lossy()
                ),
                format!("install Python 3 with pip, or set `{PYTHON_ENV}` to a Python that has it"),
            )
        })?;
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let reason: Vec<&str> =
        stderr.lines().map(str::trim).filter(|l| l.starts_with("ERROR") || l.contains("No module named pip")).collect();
    let reason = if reason.is_empty() { stderr.trim().to_string() } else { reason.join("\n") };
    Err(BuildError::hinted(
        format!("installing the dependencies in `{shown}` failed:\n{reason}"),
        "the sandbox runs CPython 3.13 and needs packages published as wheels; check the names and versions on PyPI",
    ))
}

/// Leaves out what a sandbox cannot use (compiled files, scripts) and reads the lock from
/// the installed packages' metadata.
fn tidy(dir: &Path) -> Result<Installed, BuildError> {
    let _ = fs::remove_dir_all(dir.join("bin"));
    let mut dropped = Vec::new();
    remove_compiled(dir, dir, &mut dropped)?;
    dropped.sort();
    let mut locked = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| BuildError::io("cannot list the installed packages", e))?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(stem) = name.strip_suffix(".dist-info") {
            let metadata = fs::read_to_string(entry.path().join("METADATA")).unwrap_or_default();
            let field = |key: &str| metadata.lines().find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_string()));
            let (fallback_name, fallback_version) = stem.split_once('-').unwrap_or((stem, ""));
            locked.push(LockedPackage {
                name: field("Name:").unwrap_or_else(|| fallback_name.to_string()),
                version: field("Version:").unwrap_or_else(|| fallback_version.to_string()),
            });
        }
    }
    locked.sort();
    Ok(Installed { dir: dir.to_path_buf(), locked, dropped })
}

fn remove_compiled(root: &Path, dir: &Path, dropped: &mut Vec<String>) -> Result<(), BuildError> {
    for entry in fs::read_dir(dir).map_err(|e| BuildError::io(format!("cannot list `{}`", dir.display()), e))?.flatten()
    {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if path.is_dir() {
            remove_compiled(root, &path, dropped)?;
        } else if COMPILED.iter().any(|ext| name.ends_with(ext)) {
            fs::remove_file(&path).map_err(|e| BuildError::io(format!("cannot remove `{}`", path.display()), e))?;
            dropped.push(path.strip_prefix(root).unwrap_or(&path).display().to_string());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requirements_come_from_the_first_file_that_declares_them() {
        let dir = tempfile::tempdir().unwrap();
        let none = Requirements::find(dir.path(), &ProjectFile::default()).unwrap();
        assert!(none.is_none());
        fs::write(dir.path().join(PYPROJECT_FILE), "[project]\nname = \"x\"\ndependencies = [\"attrs>=23\"]\n")
            .unwrap();
        let found = Requirements::find(dir.path(), &ProjectFile::default()).unwrap().unwrap();
        assert_eq!(
            (found.file.file_name().unwrap().to_str(), found.lines),
            (Some(PYPROJECT_FILE), vec!["attrs>=23".into()])
        );
        fs::write(dir.path().join(REQUIREMENTS_FILE), "# tools\ntabulate==0.9.0  # tables\n\nmore-itertools\n")
            .unwrap();
        let found = Requirements::find(dir.path(), &ProjectFile::default()).unwrap().unwrap();
        assert_eq!(found.lines, ["tabulate==0.9.0", "more-itertools"]);
        let config = ProjectFile::parse("[workflow]\ndependencies = [\"pyyaml\"]\n", "capsule.toml").unwrap();
        let found = Requirements::find(dir.path(), &config).unwrap().unwrap();
        assert_eq!(found.lines, ["pyyaml"]);
    }

    #[test]
    fn a_malformed_pyproject_is_named() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(PYPROJECT_FILE), "[project]\ndependencies = \"attrs\"\n").unwrap();
        let error = Requirements::find(dir.path(), &ProjectFile::default()).unwrap_err().to_string();
        assert!(error.contains("pyproject.toml: `project.dependencies` must be a list of strings"), "{error}");
    }
}
