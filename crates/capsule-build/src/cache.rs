//! Caches that make repeated builds fast, in one folder per user:
//! `$CAPSULE_CACHE_DIR`, else `$XDG_CACHE_HOME/capsule`, else `~/.cache/capsule`.
//!
//! - `init/`: the runtime compiled for the initialisation run, keyed by the hash of the
//!   instrumented runtime and the wasmtime version. It only changes with the runtime.
//! - `cranelift/`: wasmtime's incremental compilation cache. Wizer changes a module's data,
//!   not its code, so after editing a task the snapshot's functions are all found here.
//!
//! Like `~/.cargo`, the folder is trusted: whoever can write it can change what builds run.

use std::borrow::Cow;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};
use wasmtime::CacheStore;

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

/// wasmtime's incremental compilation cache as files, two hex digits per subfolder.
#[derive(Debug)]
pub struct FileCacheStore {
    dir: PathBuf,
}

impl FileCacheStore {
    pub fn new(dir: PathBuf) -> Arc<Self> {
        Arc::new(Self { dir })
    }

    fn path(&self, key: &[u8]) -> PathBuf {
        let name = hex::encode(Sha256::digest(key));
        self.dir.join(&name[..2]).join(&name[2..])
    }
}

impl CacheStore for FileCacheStore {
    fn get(&self, key: &[u8]) -> Option<Cow<'_, [u8]>> {
        fs::read(self.path(key)).ok().map(Cow::Owned)
    }

    fn insert(&self, key: &[u8], value: Vec<u8>) -> bool {
        write_atomic(&self.path(key), &value).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stores_and_finds_entries() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileCacheStore::new(dir.path().to_path_buf());
        assert!(store.get(b"key").is_none());
        assert!(store.insert(b"key", b"value".to_vec()));
        assert_eq!(store.get(b"key").as_deref(), Some(&b"value"[..]));
        assert!(store.get(b"other").is_none());
    }
}
