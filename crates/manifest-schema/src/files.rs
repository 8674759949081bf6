//! `allowed_files`: project folders a task may use, each read-only or read-write. Paths are
//! relative to the project root and may not leave it, nor be the root itself or inside
//! `.capsule/`, where Capsule keeps the project's builds and journal; the runner checks again,
//! after resolving symbolic links, before it opens anything.

use serde::{Deserialize, Serialize};

use crate::problem::Problem;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FileMode {
    ReadOnly,
    ReadWrite,
}

impl FileMode {
    /// `read-only`/`ro` or `read-write`/`rw`.
    pub fn parse(text: &str) -> Result<Self, Problem> {
        match text.trim().to_ascii_lowercase().as_str() {
            "read-only" | "ro" => Ok(Self::ReadOnly),
            "read-write" | "rw" => Ok(Self::ReadWrite),
            _ => Err(Problem {
                message: format!("`{text}` is not a file mode"),
                hint: Some("use \"read-only\" (or \"ro\") or \"read-write\" (or \"rw\")".into()),
            }),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileGrant {
    /// Normalised, relative to the project root, `/`-separated; `.` is the root itself.
    #[serde(deserialize_with = "normalised")]
    pub path: String,
    pub mode: FileMode,
}

impl FileGrant {
    /// Where the task sees the folder: `/data` for `data`, so `open("data/x")` works.
    pub fn guest_path(&self) -> String {
        if self.path == "." { "/".into() } else { format!("/{}", self.path) }
    }
}

fn normalised<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    let text = String::deserialize(deserializer)?;
    normalise_grant_path(&text).map_err(|p| serde::de::Error::custom(p.message))
}

/// The folder in a project where Capsule keeps its builds and journal.
pub const STATE_DIR: &str = ".capsule";

/// Normalises a grant's path, refusing absolute paths, any way out of the project, and any
/// way into Capsule's own folder.
pub fn normalise_grant_path(text: &str) -> Result<String, Problem> {
    let refuse = |why: &str| Problem {
        message: format!("`{text}` {why}"),
        hint: Some("give a folder inside the project, relative to it, e.g. \"./data\"".into()),
    };
    if text.starts_with('/') || text.starts_with('\\') || text.get(1..2) == Some(":") {
        return Err(refuse("is an absolute path"));
    }
    let mut parts = Vec::new();
    for part in text.split(['/', '\\']) {
        match part {
            "" | "." => {}
            ".." => return Err(refuse("leaves the project (`..`)")),
            name => parts.push(name),
        }
    }
    if text.trim().is_empty() {
        return Err(refuse("is empty"));
    }
    let reserved = |what: &str| Problem {
        message: format!(
            "`{text}` {what}, where Capsule keeps the project's builds and journal: a task must never reach them"
        ),
        hint: Some(
            "grant a folder of your data instead, e.g. \"./data\" or {\"path\": \"./out\", \"mode\": \"read-write\"}"
                .into(),
        ),
    };
    match parts.first() {
        None => Err(reserved(&format!("is the project folder itself, which holds `{STATE_DIR}/`"))),
        Some(&STATE_DIR) => Err(reserved(&format!("is inside `{STATE_DIR}/`"))),
        Some(_) => Ok(parts.join("/")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_and_refuses_escapes() {
        assert_eq!(normalise_grant_path("./data").unwrap(), "data");
        assert_eq!(normalise_grant_path("data/sub/").unwrap(), "data/sub");
        for bad in ["/etc", "../outside", "data/../../x", "", "C:\\\\x", ".", "./", ".capsule", "./.capsule/build/x"] {
            assert!(normalise_grant_path(bad).is_err(), "{bad}");
        }
        assert_eq!(FileMode::parse("rw").unwrap(), FileMode::ReadWrite);
        assert_eq!(FileMode::parse("read-only").unwrap(), FileMode::ReadOnly);
        assert!(FileMode::parse("write").is_err());
        let grant = FileGrant { path: "data".into(), mode: FileMode::ReadOnly };
        assert_eq!(grant.guest_path(), "/data");
    }
}
