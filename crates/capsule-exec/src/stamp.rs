//! Telling that a file changed without reading it, as cargo does: by its size and its
//! modification and change times (nanoseconds). Rewriting a file in place and restoring its
//! modification time still changes its change time.

use std::path::Path;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStamp(u64, i128, i128);

impl FileStamp {
    /// The file's stamp now; `None` if it cannot be read.
    pub fn of(path: &Path) -> Option<Self> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).ok()?;
        let nanos = |seconds: i64, nanos: i64| i128::from(seconds) * 1_000_000_000 + i128::from(nanos);
        Some(Self(m.len(), nanos(m.mtime(), m.mtime_nsec()), nanos(m.ctime(), m.ctime_nsec())))
    }
}
