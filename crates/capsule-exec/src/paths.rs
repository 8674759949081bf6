//! Where Capsule keeps its per-user files, for every part that needs to agree on them.

use std::path::PathBuf;

pub const CACHE_DIR_ENV: &str = "CAPSULE_CACHE_DIR";

/// The per-user cache folder (compilation caches, the interpreter image):
/// `$CAPSULE_CACHE_DIR`, else `$XDG_CACHE_HOME/capsule`, else `~/.cache/capsule`; `None`
/// when there is no home.
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os(CACHE_DIR_ENV) {
        return Some(PathBuf::from(dir));
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir).join("capsule"));
    }
    std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache/capsule"))
}

/// The folder of the built-in interpreter image (`run_python`): its source, and its build in
/// `build/` (written by a builder, read by any runner).
pub fn interpreter_dir() -> Option<PathBuf> {
    cache_dir().map(|dir| dir.join("interpreter"))
}

/// Where saved sessions are kept, so that any daemon of the user (a shared one, or the private
/// one an SDK process starts) restores them: `$XDG_DATA_HOME/capsule/sessions`, else
/// `~/.local/share/capsule/sessions`.
pub fn saved_sessions_dir() -> Option<PathBuf> {
    let data = match std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME")?).join(".local/share"),
    };
    Some(data.join("capsule/sessions"))
}
