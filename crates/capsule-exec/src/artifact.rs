//! Loading a built artifact: the manifest is validated, the engine checked, and the `.cwasm`
//! hashed before wasmtime is allowed to deserialise it (deserialising untrusted bytes is
//! unsafe: a `.cwasm` is native code).

use std::io::Read;
use std::path::{Path, PathBuf};

use manifest_schema::{CompiledFile, Explain, Manifest, ManifestError};
use sha2::{Digest, Sha256};
use thiserror::Error;
use wasmtime::{Engine, Module};

use crate::config::{self, WASMTIME_VERSION};

#[derive(Debug, Error)]
pub enum LoadError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
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
}

impl Explain for LoadError {
    fn hint(&self) -> Option<String> {
        match self {
            Self::WasmtimeVersion { .. } | Self::EngineFingerprint { .. } => {
                Some("rebuild it with the `capsule build` of this release".into())
            }
            Self::HashMismatch { .. } => Some(
                "the file was modified or corrupted; rebuild it, and never run an artifact whose hash does not match"
                    .into(),
            ),
            Self::Manifest(_) | Self::Read { .. } | Self::Deserialize { .. } => None,
        }
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Hashes in chunks through one small buffer: no copy of the whole file in memory.
fn sha256_of_reader(reader: &mut impl Read) -> std::io::Result<String> {
    let mut hasher = Sha256::new();
    let mut buffer = vec![0; 1 << 20];
    loop {
        match reader.read(&mut buffer)? {
            0 => return Ok(hex::encode(hasher.finalize())),
            n => hasher.update(&buffer[..n]),
        }
    }
}

/// What identifies the content of an open file without reading it: device, inode, size, and
/// the modification and change times to the nanosecond. Writing to the file changes its
/// change time (`ctime`), which no one but the kernel can set back, so a file modified in
/// place, even with its modification time restored, no longer matches.
struct FileIdentity(String);

impl FileIdentity {
    fn of(file: &std::fs::File) -> std::io::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let m = file.metadata()?;
        Ok(Self(format!(
            "{} {} {} {}.{:09} {}.{:09}\n",
            m.dev(),
            m.ino(),
            m.size(),
            m.mtime(),
            m.mtime_nsec(),
            m.ctime(),
            m.ctime_nsec()
        )))
    }
}

/// Where the identity of the file last verified to hash to `sha256` is kept: in the per-user
/// cache folder, trusted like the compilation caches (see ARCHITECTURE.md).
fn verified_record(sha256: &str) -> Option<PathBuf> {
    let valid = sha256.len() == 64 && sha256.bytes().all(|b| b.is_ascii_hexdigit());
    valid.then(|| crate::paths::cache_dir().map(|dir| dir.join("verified").join(sha256))).flatten()
}

/// Records that the file `identity` names hashed to its sha256 (best effort: without the
/// record, the next load hashes again).
fn remember(record: &Path, identity: &FileIdentity) {
    let temporary = record.with_extension(format!("{}.tmp", std::process::id()));
    let written = record
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| std::fs::write(&temporary, &identity.0))
        .and_then(|()| std::fs::rename(&temporary, record));
    if let Err(error) = written {
        tracing::debug!(%error, "cannot record the verified artifact");
        let _ = std::fs::remove_file(&temporary);
    }
}

/// A built artifact on disk: its manifest and, beside it, the `.cwasm` of its state and the
/// runtime's code.
pub struct Artifact;

impl Artifact {
    /// Reads and validates the manifest, and checks it was built for this engine.
    pub fn manifest(manifest_path: &Path) -> Result<Manifest, LoadError> {
        let manifest = Manifest::load(manifest_path)?;
        let shown = manifest_path.display().to_string();
        if manifest.engine.wasmtime_version != WASMTIME_VERSION {
            return Err(LoadError::WasmtimeVersion { manifest: shown, built: manifest.engine.wasmtime_version });
        }
        if manifest.engine.fingerprint != config::fingerprint(manifest.engine.metering) {
            return Err(LoadError::EngineFingerprint { manifest: shown, built: manifest.engine.fingerprint });
        }
        Ok(manifest)
    }

    /// The file `compiled` beside the manifest at `manifest_path` (its state module or its
    /// code module), verified against its sha256 and deserialised.
    pub fn load(engine: &Engine, manifest_path: &Path, compiled: &CompiledFile) -> Result<Module, LoadError> {
        let dir = manifest_path.parent().unwrap_or(Path::new("."));
        let path = dir.join(&compiled.file);
        let started = std::time::Instant::now();
        let read_error = |source| LoadError::Read { path: path.clone(), source };
        let mut file = std::fs::File::open(&path).map_err(read_error)?;
        let expected = &compiled.sha256;
        let identity = FileIdentity::of(&file).map_err(read_error)?;
        let record = verified_record(expected);
        if record.as_ref().and_then(|r| std::fs::read_to_string(r).ok()).as_deref() == Some(&identity.0) {
            tracing::debug!(elapsed = ?started.elapsed(), file = %compiled.file, "verified before, unchanged since");
        } else {
            let actual = sha256_of_reader(&mut file).map_err(read_error)?;
            tracing::debug!(elapsed = ?started.elapsed(), file = %compiled.file, "hashed");
            if actual != *expected {
                return Err(LoadError::HashMismatch { path, expected: expected.clone(), actual });
            }
            if let Some(record) = record {
                remember(&record, &identity);
            }
        }
        // SAFETY: the file hashes to the value recorded by `capsule build` when it compiled it
        // with this engine configuration (checked above), so it is its own output. wasmtime
        // maps this same open file, so the memory image is shared with the page cache rather
        // than copied. (Someone able to rewrite the file between the two steps could as well
        // rewrite the manifest beside it: the manifest is the root of trust.)
        let module = unsafe { Module::deserialize_open_file(engine, file) }
            .map_err(|e| LoadError::Deserialize { path, message: e.to_string() })?;
        tracing::debug!(elapsed = ?started.elapsed(), file = %compiled.file, "loaded");
        Ok(module)
    }
}
