//! Loading a built artifact: the manifest is validated and the engine checked, and each
//! `.cwasm` is run only from bytes that no one but the runner can change after they were
//! hashed (deserialising a `.cwasm` is unsafe: it is native code).
//!
//! The runner keeps its own copy of every compiled file it runs, by sha256, in a store
//! folder that only its user can enter (0700, files 0444). A file beside a manifest is read
//! into the runner's memory, hashed, compared with the manifest, and only those bytes are
//! copied into the store; later loads map the store's copy. The project's build folder, which
//! a task with a file grant might reach, is never mapped.

use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use manifest_schema::{Category, Explain, Manifest, ManifestError};
use sha2::{Digest, Sha256};
use thiserror::Error;
use wasmtime::{Engine, Module};

use crate::config::{self, WASMTIME_VERSION};
use crate::paths;
use crate::trust::TrustError;

#[derive(Debug, Error)]
pub enum LoadError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Untrusted(#[from] TrustError),
    #[error("`{manifest}` was built for wasmtime {built}, this runner uses {WASMTIME_VERSION}")]
    WasmtimeVersion { manifest: String, built: String },
    #[error("`{manifest}` was compiled for another engine configuration (fingerprint {built})")]
    EngineFingerprint { manifest: String, built: String },
    #[error("cannot read artifact `{path}`: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("artifact `{path}` does not match its manifest: sha256 is {actual}, the manifest says {expected}")]
    HashMismatch { path: PathBuf, expected: String, actual: String },
    #[error("wasmtime refused artifact `{path}`: {message}")]
    Deserialize { path: PathBuf, message: String },
    #[error("the store of compiled code `{path}` cannot be used: {why}")]
    Store { path: PathBuf, why: String },
}

impl Explain for LoadError {
    fn category(&self) -> Category {
        match self {
            Self::Untrusted(error) => error.category(),
            _ => Category::Load,
        }
    }

    fn problems(&self) -> Vec<manifest_schema::Problem> {
        match self {
            Self::Untrusted(error) => error.problems(),
            Self::Manifest(error) => error.problems(),
            _ => vec![manifest_schema::Problem { message: self.to_string(), hint: self.hint() }],
        }
    }

    fn hint(&self) -> Option<String> {
        match self {
            Self::WasmtimeVersion { .. } | Self::EngineFingerprint { .. } => {
                Some("rebuild it with the `capsule build` of this release".into())
            }
            Self::HashMismatch { .. } => Some(
                "the file was modified or corrupted; rebuild it, and never run an artifact whose hash does not match"
                    .into(),
            ),
            Self::Store { .. } => Some(format!(
                "it must be a folder of this user's with mode 0700; remove it, or point `{}` elsewhere",
                paths::CACHE_DIR_ENV
            )),
            Self::Untrusted(error) => error.hint(),
            Self::Manifest(_) | Self::Read { .. } | Self::Deserialize { .. } => None,
        }
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Checks a manifest read from `shown`: valid, and built for this engine.
pub fn check_manifest(text: &str, shown: &str) -> Result<Manifest, LoadError> {
    let manifest = Manifest::from_toml(text, shown)?;
    if manifest.engine.wasmtime_version != WASMTIME_VERSION {
        return Err(LoadError::WasmtimeVersion { manifest: shown.into(), built: manifest.engine.wasmtime_version });
    }
    if manifest.engine.fingerprint != config::fingerprint(manifest.engine.metering) {
        return Err(LoadError::EngineFingerprint { manifest: shown.into(), built: manifest.engine.fingerprint });
    }
    Ok(manifest)
}

/// Store files kept at most; beyond them (or [`STORE_BYTES`]) the oldest go first. A removed
/// file that a process still maps stays valid for it; the next load copies it in again.
const STORE_FILES: usize = 256;
const STORE_BYTES: u64 = 4 << 30;

/// The runner's private copies of the compiled files it runs, each named `<sha256>.cwasm`.
/// Without a folder (no home, no cache folder), each load reads and hashes into memory.
#[derive(Debug, Clone)]
pub struct CompiledStore {
    dir: Option<PathBuf>,
}

impl CompiledStore {
    /// The user's store: `compiled/` in the cache folder.
    pub fn of_user() -> Self {
        Self { dir: paths::cache_dir().map(|dir| dir.join("compiled")) }
    }

    pub fn at(dir: PathBuf) -> Self {
        Self { dir: Some(dir) }
    }

    /// The store's folder, made private to this user if it was not, or refused.
    fn folder(&self) -> Result<Option<&Path>, LoadError> {
        let Some(dir) = &self.dir else { return Ok(None) };
        paths::private_dir(dir).map_err(|why| LoadError::Store { path: dir.clone(), why })?;
        Ok(Some(dir))
    }

    fn stored_path(dir: &Path, sha256: &str) -> PathBuf {
        dir.join(format!("{sha256}.cwasm"))
    }

    /// The module of the compiled file `sha256`: the store's copy, else the file `source`
    /// checked against `sha256` and copied in.
    pub fn load(&self, engine: &Engine, sha256: &str, source: &Path) -> Result<Module, LoadError> {
        let started = std::time::Instant::now();
        if let Some(module) = self.stored(engine, sha256)? {
            tracing::debug!(elapsed = ?started.elapsed(), sha256, "loaded from the store");
            return Ok(module);
        }
        let read_error = |source_error| LoadError::Read { path: source.to_path_buf(), source: source_error };
        // Read once into this process's memory: what is hashed is what is kept and run.
        let bytes = fs::read(source).map_err(read_error)?;
        let actual = sha256_hex(&bytes);
        if actual != sha256 {
            return Err(LoadError::HashMismatch { path: source.to_path_buf(), expected: sha256.into(), actual });
        }
        self.keep(sha256, &bytes)?;
        // SAFETY: these bytes hash to the value the manifest records for this engine
        // configuration (checked above), and no one else can change them: they are ours.
        let module = unsafe { Module::deserialize(engine, &bytes) }
            .map_err(|e| LoadError::Deserialize { path: source.to_path_buf(), message: e.to_string() })?;
        tracing::debug!(elapsed = ?started.elapsed(), sha256, "hashed and stored");
        Ok(module)
    }

    /// The store's copy of `sha256`, if it has one.
    pub fn stored(&self, engine: &Engine, sha256: &str) -> Result<Option<Module>, LoadError> {
        let Some(dir) = self.folder()? else { return Ok(None) };
        let path = Self::stored_path(dir, sha256);
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(LoadError::Read { path, source }),
        };
        let metadata = file.metadata().map_err(|source| LoadError::Read { path: path.clone(), source })?;
        if metadata.uid() != paths::effective_uid() || metadata.mode() & 0o222 != 0 {
            return Err(LoadError::Store {
                path: dir.to_path_buf(),
                why: format!("`{}` is writable or not this user's", path.display()),
            });
        }
        // SAFETY: the store's files are written only by `keep`, from bytes hashed to their
        // name, read-only, in a folder only this user can enter (checked by `folder`).
        let module = unsafe { Module::deserialize_open_file(engine, file) }
            .map_err(|e| LoadError::Deserialize { path, message: e.to_string() })?;
        Ok(Some(module))
    }

    /// Keeps `bytes`, which hash to `sha256`, in the store (nothing without a store folder).
    pub fn keep(&self, sha256: &str, bytes: &[u8]) -> Result<(), LoadError> {
        let Some(dir) = self.folder()? else { return Ok(()) };
        let path = Self::stored_path(dir, sha256);
        if path.exists() {
            return Ok(());
        }
        write_read_only(&path, bytes).map_err(|source| LoadError::Read { path: path.clone(), source })?;
        prune(dir, &path);
        Ok(())
    }

    /// Copies the store's file `sha256` to `dest` (read-only), checking its hash on the way.
    pub fn copy_out(&self, sha256: &str, dest: &Path) -> Result<(), LoadError> {
        let Some(dir) = self.folder()? else {
            return Err(LoadError::Store { path: PathBuf::new(), why: "there is no cache folder".into() });
        };
        let path = Self::stored_path(dir, sha256);
        let bytes = fs::read(&path).map_err(|source| LoadError::Read { path: path.clone(), source })?;
        let actual = sha256_hex(&bytes);
        if actual != sha256 {
            return Err(LoadError::HashMismatch { path, expected: sha256.into(), actual });
        }
        write_read_only(dest, &bytes).map_err(|source| LoadError::Read { path: dest.to_path_buf(), source })
    }
}

/// Writes `bytes` at `path` as a new read-only file, through a temporary file beside it, so
/// that no reader ever sees part of it.
pub fn write_read_only(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let temporary = path.with_file_name(format!(".{name}.{}-{n}.tmp", std::process::id()));
    let written = File::options()
        .write(true)
        .create_new(true)
        .mode(0o444)
        .open(&temporary)
        .and_then(|mut file| file.write_all(bytes))
        .and_then(|()| fs::rename(&temporary, path));
    if written.is_err() {
        let _ = fs::remove_file(&temporary);
    }
    written
}

/// Removes the oldest store files beyond [`STORE_FILES`] or [`STORE_BYTES`], never `kept`.
fn prune(dir: &Path, kept: &Path) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    let mut files: Vec<(std::time::SystemTime, u64, PathBuf)> = entries
        .flatten()
        .filter(|entry| entry.path().extension().is_some_and(|e| e == "cwasm"))
        .filter_map(|entry| {
            let metadata = entry.metadata().ok()?;
            Some((metadata.modified().ok()?, metadata.len(), entry.path()))
        })
        .collect();
    files.sort();
    let mut bytes: u64 = files.iter().map(|(_, size, _)| size).sum();
    let mut count = files.len();
    for (_, size, path) in files {
        if count <= STORE_FILES && bytes <= STORE_BYTES {
            break;
        }
        if path != kept && fs::remove_file(&path).is_ok() {
            count -= 1;
            bytes -= size;
        }
    }
}
