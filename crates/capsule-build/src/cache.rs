//! Caches that make repeated builds fast, in one folder per user:
//! `$CAPSULE_CACHE_DIR`, else `$XDG_CACHE_HOME/capsule`, else `~/.cache/capsule`.
//!
//! - `code/`: the runtime's code module (see `split`) compiled, keyed by the runtime's
//!   sha256 and the engine's fingerprint, with the sha256 of the compiled file beside it:
//!   compiled once per runtime and engine configuration, shared by every project's build.
//!
//! Like `~/.cargo`, the folder is trusted: whoever can write it can change what builds run.

use std::fs;
use std::path::Path;

use sha2::{Digest, Sha256};

pub use capsule_exec::{CACHE_DIR_ENV, cache_dir};

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
