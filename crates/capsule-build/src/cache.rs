//! Caches that make repeated builds fast, in one folder per user:
//! `$CAPSULE_CACHE_DIR`, else `$XDG_CACHE_HOME/capsule`, else `~/.cache/capsule`.
//!
//! - `code/<key>.sha256`: which compiled file is the runtime's code module (see `split`),
//!   keyed by the runtime's sha256 and the engine's fingerprint. The file itself is one of
//!   the runner's own (`compiled/`, see `capsule_exec::Engine::keep_compiled`): compiled once
//!   per runtime and engine configuration, shared by every project's build.
//!
//! The folder is this user's, like `~/.cargo`, and no task's grant reaches it.

use std::fs;
use std::path::Path;

use sha2::{Digest, Sha256};

pub use capsule_exec::paths::{CACHE_DIR_ENV, cache_dir};

pub fn hex_sha256(parts: &[&[u8]]) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    hex::encode(hasher.finalize())
}

/// Writes through a temporary file, so that concurrent builds never read half an entry.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    fs::write(&tmp, bytes)?;
    fs::rename(&tmp, path)
}
