//! What the runtime's build layers share: pinned downloads, layer folders that count only
//! once complete, and the hashing that names them.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

use crate::util::{run, sha256_file};

/// A file from PyPI, pinned by sha256.
pub struct PypiFile {
    pub file: &'static str,
    pub url: &'static str,
    pub sha256: &'static str,
}

impl PypiFile {
    /// The file in `downloads`, downloaded unless it is already there.
    pub fn fetch(&self, downloads: &Path) -> Result<PathBuf> {
        let path = downloads.join(self.file);
        if !(path.exists() && sha256_file(&path)? == self.sha256) {
            download(self.url, &path, self.sha256)?;
        }
        Ok(path)
    }
}

/// Downloads `url` to `dest` with apt's own downloader, which checks the sha256 before the
/// file appears (checked again here, as the build's guarantee).
pub fn download(url: &str, dest: &Path, sha256: &str) -> Result<()> {
    fs::create_dir_all(dest.parent().context("download folder")?)?;
    run(Command::new("/usr/lib/apt/apt-helper")
        .arg("download-file")
        .arg(url)
        .arg(dest)
        .arg(format!("SHA256:{sha256}")))
    .with_context(|| {
        format!("downloading {url}\nhint: if the registry dropped this version, update its pin in crates/xtask/src/")
    })?;
    let actual = sha256_file(dest)?;
    if actual != sha256 {
        bail!("{} has sha256 {actual}, expected {sha256}; refusing to build from it", dest.display());
    }
    Ok(())
}

/// sha256 over `parts`, each prefixed with its length (so no two lists hash alike), in hex.
pub fn hex_sha256(parts: &[&[u8]]) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    hex::encode(hasher.finalize())
}

/// Every file below `dir`, sorted, as (relative path, contents).
pub fn tree_contents(dir: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(current) = stack.pop() {
        for entry in fs::read_dir(&current).with_context(|| format!("reading {}", current.display()))? {
            let path = entry?.path();
            let name = path.file_name().unwrap_or_default().to_string_lossy().into_owned();
            if name == "__pycache__" || name.starts_with('.') {
                continue;
            }
            if path.is_dir() {
                stack.push(path);
            } else {
                let rel = path.strip_prefix(dir)?.to_string_lossy().into_owned();
                files.push((rel, fs::read(&path)?));
            }
        }
    }
    files.sort();
    Ok(files)
}

/// A folder that is only used once a `.complete` marker says it was fully built.
pub fn fresh_layer(dir: &Path) -> Result<bool> {
    if dir.join(".complete").exists() {
        return Ok(false);
    }
    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    fs::create_dir_all(dir)?;
    Ok(true)
}

/// `-jN` for `make` and `ninja`: every core.
pub fn make_jobs() -> String {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    format!("-j{cores}")
}
