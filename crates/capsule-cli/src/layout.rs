//! Where a project keeps its things, worked out once per command: its folder, its build
//! outputs and its journal.

use std::path::{Path, PathBuf};

use manifest_schema::STATE_DIR;

#[derive(Debug, Clone)]
pub struct ProjectLayout {
    /// The project folder: the entry file's folder, else the current one (empty). Journaled
    /// entry paths and `allowed_files` grants are relative to it.
    pub root: PathBuf,
    /// The journal: `--journal`, else `.capsule/journal.db` in the project.
    pub journal: PathBuf,
}

impl ProjectLayout {
    /// The project of `entry` (a `.py` file or a manifest).
    pub fn of_file(entry: &Path, journal: Option<PathBuf>) -> Self {
        Self::new(entry.parent().map(Path::to_path_buf).unwrap_or_default(), journal)
    }

    /// The project in the current folder, for commands that name no file.
    pub fn current(journal: Option<PathBuf>) -> Self {
        Self::new(PathBuf::new(), journal)
    }

    fn new(root: PathBuf, journal: Option<PathBuf>) -> Self {
        let journal = journal.unwrap_or_else(|| root.join(STATE_DIR).join("journal.db"));
        Self { root, journal }
    }

    /// Where `capsule build` writes the outputs of the entry module `stem` by default.
    pub fn build_dir(&self, stem: &str) -> PathBuf {
        self.root.join(STATE_DIR).join("build").join(stem)
    }

    /// The arguments that reach this journal from the current folder, for hints: none when
    /// it is the current folder's default.
    pub fn journal_flag(&self) -> String {
        if self.journal == Path::new(STATE_DIR).join("journal.db") {
            String::new()
        } else {
            format!(" --journal {}", self.journal.display())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_project_is_the_entry_files_folder() {
        let layout = ProjectLayout::of_file(Path::new("examples/hello.py"), None);
        assert_eq!(layout.root, Path::new("examples"));
        assert_eq!(layout.journal, Path::new("examples/.capsule/journal.db"));
        assert_eq!(layout.build_dir("hello"), Path::new("examples/.capsule/build/hello"));
        assert_eq!(layout.journal_flag(), " --journal examples/.capsule/journal.db");
        let here = ProjectLayout::of_file(Path::new("hello.py"), None);
        assert_eq!(here.journal_flag(), "");
        let elsewhere = ProjectLayout::current(Some(PathBuf::from("/tmp/j.db")));
        assert_eq!(elsewhere.root, Path::new(""), "an explicit journal does not move the project");
    }
}
