//! Where the daemon's socket is, and owning it: one daemon per socket, a socket left by a
//! dead daemon replaced, the socket usable by its owner only from the moment it exists.

use std::fs::{self, File, TryLockError};
use std::path::{Path, PathBuf};

use crate::DaemonError;

/// Clients use the socket this names instead of the default.
pub const SOCKET_ENV: &str = "CAPSULE_SOCKET";

/// `$CAPSULE_SOCKET`, else `$XDG_RUNTIME_DIR/capsule/daemon.sock`, else `~/.capsule/daemon.sock`;
/// without any of them, an error (never a shared folder such as `/tmp`).
pub fn default_socket() -> Result<PathBuf, DaemonError> {
    if let Some(path) = std::env::var_os(SOCKET_ENV).filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(path));
    }
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir).join("capsule/daemon.sock"));
    }
    Ok(home("socket")?.join(".capsule/daemon.sock"))
}

/// `$XDG_STATE_HOME/capsule`, else `~/.local/state/capsule`: the daemon's registry of runs,
/// which must outlive a reboot (unlike the runtime folder the socket is in).
pub fn default_state_dir() -> Result<PathBuf, DaemonError> {
    match std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        Some(dir) => Ok(PathBuf::from(dir).join("capsule")),
        None => Ok(home("state folder")?.join(".local/state/capsule")),
    }
}

fn home(what: &'static str) -> Result<PathBuf, DaemonError> {
    capsule_exec::paths::home().ok_or(DaemonError::NoHome(what))
}

/// A socket this process owns: a lock held on `<socket>.lock` for as long as it lives.
pub struct Bound {
    path: PathBuf,
    listener: Option<std::os::unix::net::UnixListener>,
    _lock: File,
}

impl Bound {
    /// Binds `path`, whose folder is made private (0700) when this creates it; the socket
    /// is made with mode 0600 (a umask held while binding, before the daemon starts any
    /// thread), so no other user can connect even for a moment.
    pub fn claim(path: &Path) -> Result<Self, DaemonError> {
        let io = |source| DaemonError::Io { path: path.to_path_buf(), source };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty())
            && !parent.exists()
        {
            capsule_exec::paths::private_dir(parent)
                .map_err(|why| DaemonError::Io { path: parent.to_path_buf(), source: std::io::Error::other(why) })?;
        }
        let lock_path = path.with_extension("lock");
        let lock = File::options().create(true).truncate(false).write(true).open(&lock_path).map_err(io)?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => return Err(DaemonError::AlreadyRunning(path.to_path_buf())),
            Err(TryLockError::Error(error)) => return Err(io(error)),
        }
        // With the lock held, a socket file here belongs to no live daemon: replace it.
        if path.exists() {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(DaemonError::AlreadyRunning(path.to_path_buf()));
            }
            tracing::info!(socket = %path.display(), "replacing a socket left by a daemon that is gone");
            fs::remove_file(path).map_err(io)?;
        }
        // SAFETY: umask has no preconditions; it is set back at once.
        let previous = unsafe { libc::umask(0o177) };
        let bound = std::os::unix::net::UnixListener::bind(path);
        unsafe { libc::umask(previous) };
        let listener = bound.map_err(io)?;
        listener.set_nonblocking(true).map_err(io)?;
        Ok(Self { path: path.to_path_buf(), listener: Some(listener), _lock: lock })
    }

    /// The listener, for the runtime (once).
    pub fn listener(&self) -> std::io::Result<tokio::net::UnixListener> {
        let listener = self.listener.as_ref().expect("taken once").try_clone()?;
        tokio::net::UnixListener::from_std(listener)
    }
}

impl Drop for Bound {
    fn drop(&mut self) {
        self.listener.take();
        let _ = fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn one_daemon_per_socket_and_stale_sockets_are_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/daemon.sock");
        let first = Bound::claim(&path).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(fs::metadata(path.parent().unwrap()).unwrap().permissions().mode() & 0o777, 0o700);
        assert!(matches!(Bound::claim(&path), Err(DaemonError::AlreadyRunning(_))));
        drop(first);
        // A socket file left behind by a daemon that was killed.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let second = Bound::claim(&path).unwrap();
        drop(second);
        assert!(!path.exists());
    }
}
