//! The cheap check that a build is still up to date, made before anything is parsed or
//! hashed: like cargo, by the sizes and times of the files the build read.
//!
//! Beside each build's manifest, `fingerprint.json` names the runtime the build was asked to
//! use (`BuildOptions::runtime`, made absolute) and lists every file the build depended on
//! with its size, modification and change times (nanoseconds since the epoch), and the files
//! whose absence it depended on (a `capsule.toml` that did not exist):
//!
//! ```json
//! {"version": 3, "capsule": "0.1.0", "runtime": "/abs/capsule-python.wasm",
//!  "files": [["/abs/main.py", [812, 1732612345000000000, 1732612345000000000]], ...],
//!  "absent": ["/abs/capsule.toml"]}
//! ```
//!
//! If the build would use the same runtime, every file still has its recorded size and times,
//! and every absent file is still absent, the build is up to date. Otherwise the full check
//! runs (parse the sources, hash every input into the build key), which also catches a file
//! touched but not changed. (The runtime's own file is among the files; naming it as well
//! catches a switch to another runtime, e.g. through `CAPSULE_RUNTIME`, while the recorded
//! one is still there unchanged.)
//! The Python SDK reads this same file to skip a build without starting a process.

use std::fs;
use std::path::{Path, PathBuf};

use capsule_exec::for_builder::FileStamp;
use serde::{Deserialize, Serialize};

pub const FINGERPRINT_FILE: &str = "fingerprint.json";
const VERSION: u32 = 3;

#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fingerprint {
    version: u32,
    capsule: String,
    runtime: PathBuf,
    files: Vec<(PathBuf, FileStamp)>,
    absent: Vec<PathBuf>,
}

impl Fingerprint {
    /// The fingerprint of a build asked to use `runtime`: of `files` as they are now, and of
    /// `absent` files being absent.
    pub fn of(
        runtime: &Path,
        files: impl IntoIterator<Item = PathBuf>,
        absent: impl IntoIterator<Item = PathBuf>,
    ) -> Self {
        let files = files.into_iter().filter_map(|path| FileStamp::of(&path).map(|stamp| (path, stamp))).collect();
        Self {
            version: VERSION,
            capsule: env!("CARGO_PKG_VERSION").to_string(),
            runtime: absolute(runtime),
            files,
            absent: absent.into_iter().collect(),
        }
    }

    pub fn read(out_dir: &Path) -> Option<Self> {
        serde_json::from_slice(&fs::read(out_dir.join(FINGERPRINT_FILE)).ok()?).ok()
    }

    pub fn write(&self, out_dir: &Path) -> std::io::Result<()> {
        crate::cache::write_atomic(&out_dir.join(FINGERPRINT_FILE), &serde_json::to_vec(self).expect("serialises"))
    }

    /// Whether a build asked to use `runtime` would read the same: the same runtime, every file
    /// as recorded.
    pub fn holds(&self, runtime: &Path) -> bool {
        self.version == VERSION
            && self.capsule == env!("CARGO_PKG_VERSION")
            && self.runtime == absolute(runtime)
            && self.files.iter().all(|(path, stamp)| FileStamp::of(path) == Some(*stamp))
            && self.absent.iter().all(|path| !path.exists())
    }
}

/// `path` made absolute without touching the file system, as recorded.
pub(crate) fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_change_of_a_file_or_an_absence_breaks_it() {
        let dir = tempfile::tempdir().unwrap();
        let runtime = dir.path().join("capsule-python.wasm");
        let (file, absent) = (dir.path().join("main.py"), dir.path().join("capsule.toml"));
        fs::write(&file, "x = 1\n").unwrap();
        let print = Fingerprint::of(&runtime, [file.clone()], [absent.clone()]);
        print.write(dir.path()).unwrap();
        assert!(Fingerprint::read(dir.path()).unwrap().holds(&runtime));
        fs::write(&file, "x = 2\n").unwrap();
        assert!(!print.holds(&runtime), "same size, new times");
        let print = Fingerprint::of(&runtime, [file.clone()], [absent.clone()]);
        fs::write(&absent, "").unwrap();
        assert!(!print.holds(&runtime), "a file that appeared");
    }

    #[test]
    fn another_runtime_breaks_it_though_the_recorded_one_is_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let (runtime, other) = (dir.path().join("a/capsule-python.wasm"), dir.path().join("b/capsule-python.wasm"));
        for path in [&runtime, &other] {
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, "\0asm").unwrap();
        }
        let print = Fingerprint::of(&runtime, [runtime.clone()], []);
        assert!(print.holds(&runtime));
        assert!(!print.holds(&other));
    }
}
