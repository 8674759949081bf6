//! Where Capsule keeps its per-user files, for every part that needs to agree on them, and
//! the checks that make a folder private to the runner.

use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

pub const CACHE_DIR_ENV: &str = "CAPSULE_CACHE_DIR";

/// The per-user cache folder (compiled code, compilation caches, the interpreter image):
/// `$CAPSULE_CACHE_DIR`, else `$XDG_CACHE_HOME/capsule`, else `~/.cache/capsule`; `None`
/// when there is no home.
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os(CACHE_DIR_ENV).filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir));
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir).join("capsule"));
    }
    home().map(|home| home.join(".cache/capsule"))
}

/// `$HOME`, when it is set to an absolute path.
pub fn home() -> Option<PathBuf> {
    std::env::var_os("HOME").map(PathBuf::from).filter(|home| home.is_absolute())
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
        None => home()?.join(".local/share"),
    };
    Some(data.join("capsule/sessions"))
}

/// The user this process runs as.
pub fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Makes `dir` (and its parents) exist, and makes sure only this user can enter it: a folder
/// (not a link) owned by this user, mode 0700 (a wider mode of a folder of ours is narrowed).
/// Refused, in words, when it belongs to someone else.
pub fn private_dir(dir: &Path) -> Result<(), String> {
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| format!("cannot create `{}`: {e}", parent.display()))?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(error) => return Err(format!("cannot create it: {error}")),
    }
    let metadata = std::fs::symlink_metadata(dir).map_err(|e| e.to_string())?;
    if !metadata.is_dir() {
        return Err("it is not a folder (a symbolic link or a file is there)".into());
    }
    if metadata.uid() != effective_uid() {
        return Err(format!(
            "it belongs to another user (uid {}), this process runs as uid {}",
            metadata.uid(),
            effective_uid()
        ));
    }
    if metadata.mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| format!("cannot make it private (mode 0700): {e}"))?;
    }
    Ok(())
}

/// Places no file grant may reach: where Capsule keeps what it later trusts (compiled
/// code, builds, manifests, journals, saved sessions, a daemon's records). A grant that
/// contains one of them, or lies inside one, is refused before the task starts.
#[derive(Debug, Clone, Default)]
pub struct Reserved {
    places: Vec<(PathBuf, &'static str)>,
}

impl Reserved {
    /// The user's own: the cache folder (compiled code, the interpreter image) and saved
    /// sessions.
    pub fn of_user() -> Self {
        let mut reserved = Self::default();
        if let Some(dir) = cache_dir() {
            reserved.add(dir, "Capsule's cache of compiled code");
        }
        if let Some(dir) = saved_sessions_dir() {
            reserved.add(dir, "Capsule's saved sessions");
        }
        reserved
    }

    pub fn add(&mut self, place: PathBuf, what: &'static str) {
        self.places.push((place, what));
    }

    /// Refuses the grant `shown`, which resolved to the folder `host`, if it reaches a
    /// reserved place.
    pub fn check(&self, shown: &str, host: &Path) -> Result<(), String> {
        for (place, what) in &self.places {
            // A place that does not exist yet cannot be reached by a resolved path.
            let Ok(place) = place.canonicalize() else { continue };
            if place.starts_with(host) || host.starts_with(&place) {
                return Err(format!(
                    "`allowed_files` path `{shown}` reaches `{}` ({what}), which no task may read or write; grant a folder of your data instead, such as `./data`",
                    place.display()
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_folders_are_made_private_and_links_refused() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("a/b");
        private_dir(&dir).unwrap();
        assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        private_dir(&dir).unwrap();
        assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o777, 0o700, "narrowed again");
        let link = root.path().join("link");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        assert!(private_dir(&link).unwrap_err().contains("not a folder"));
    }

    #[test]
    fn a_grant_may_neither_contain_nor_lie_inside_a_reserved_place() {
        let root = tempfile::tempdir().unwrap();
        let project = root.path().canonicalize().unwrap();
        for dir in [".capsule/build", "data", "data/sub"] {
            std::fs::create_dir_all(project.join(dir)).unwrap();
        }
        let mut reserved = Reserved::default();
        reserved.add(project.join(".capsule"), "builds");
        reserved.add(project.join("not-made-yet"), "nothing");
        assert!(reserved.check("data", &project.join("data")).is_ok());
        let message = reserved.check(".", &project).unwrap_err();
        assert!(message.contains("`allowed_files` path `.` reaches") && message.contains("(builds)"), "{message}");
        assert!(reserved.check(".capsule/build", &project.join(".capsule/build")).is_err());
    }
}
