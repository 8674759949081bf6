//! Python virtual environments for the tools and peers `xtask` needs from PyPI, each package
//! pinned, made once per set of pins under `target/venvs/`.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

use crate::util::{run, target_dir};

pub struct Venv {
    pub dir: PathBuf,
}

/// How a package that cannot be installed is taken.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Missing {
    /// As an error.
    Fail,
    /// Noted in the venv's `skipped.txt` with pip's last words (for peers a benchmark skips).
    Note,
}

impl Venv {
    /// `target/venvs/<name>-<hash of the pins>` with `packages` installed, each on its own.
    pub fn ensure(name: &str, packages: &[&str], missing: Missing) -> Result<Self> {
        let key = hex::encode(&Sha256::digest(packages.join("\n"))[..8]);
        let dir = target_dir().join("venvs").join(format!("{name}-{key}"));
        let venv = Self { dir };
        if venv.dir.join(".complete").exists() {
            return Ok(venv);
        }
        let _ = std::fs::remove_dir_all(&venv.dir);
        run(Command::new("python3").arg("-m").arg("venv").arg(&venv.dir))?;
        let mut skipped = String::new();
        for package in packages {
            eprintln!("xtask: installing {package} into {}", venv.dir.display());
            let output = Command::new(venv.bin("pip"))
                .args(["install", "--quiet", "--disable-pip-version-check", package])
                .output()
                .with_context(|| format!("running pip for {package}"))?;
            if output.status.success() {
                continue;
            }
            let stderr = String::from_utf8_lossy(&output.stderr);
            let last = stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("pip failed");
            if missing == Missing::Fail {
                bail!("cannot install {package} from PyPI: {last}");
            }
            eprintln!("xtask: {package} could not be installed: {last}");
            skipped.push_str(&format!("{package} could not be installed: {last}\n"));
        }
        std::fs::write(venv.dir.join("skipped.txt"), skipped)?;
        std::fs::write(venv.dir.join(".complete"), "")?;
        Ok(venv)
    }

    pub fn bin(&self, name: &str) -> PathBuf {
        self.dir.join("bin").join(name)
    }
}
