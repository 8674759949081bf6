//! The Python files that make up a build: the entry file and the local modules and packages
//! it imports (directly or through each other), found by parsing, never by running code.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use manifest_schema::ProjectFile;
use python_runtime::SourceModule;

use crate::discover::{Diagnostic, Diagnostics, DiscoveredTask, parse_module};
use crate::error::BuildError;

/// Folders never bundled: tool output, environments, caches.
const SKIPPED_DIRS: &[&str] = &["__pycache__", "node_modules", "target", "venv", "site-packages"];

#[derive(Debug, Clone)]
pub struct Project {
    /// The folder of the entry file; module paths are relative to it.
    pub root: PathBuf,
    pub entry: PathBuf,
    pub entry_module: String,
    /// Every bundled module, sorted by name.
    pub modules: Vec<SourceModule>,
    /// The entry file's tasks, in source order.
    pub tasks: Vec<DiscoveredTask>,
}

impl Project {
    pub fn load(entry: &Path) -> Result<Self, BuildError> {
        let shown = entry.display().to_string();
        if entry.extension().and_then(|e| e.to_str()) != Some("py") {
            return Err(BuildError::usage(
                format!("`{shown}` is not a Python file"),
                "pass the `.py` file that defines your tasks",
            ));
        }
        let source = fs::read_to_string(entry).map_err(|e| BuildError::io(format!("cannot read `{shown}`"), e))?;
        let entry = fs::canonicalize(entry).map_err(|e| BuildError::io(format!("cannot resolve `{shown}`"), e))?;
        let root = entry.parent().expect("a file has a parent").to_path_buf();
        let stem = entry.file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_string();
        if !is_identifier(&stem) {
            return Err(BuildError::usage(
                format!("`{shown}` cannot be imported as a Python module: `{stem}` is not an identifier"),
                "rename the file with letters, digits and underscores only, e.g. `my_tasks.py`",
            ));
        }
        let entry_path = format!("{stem}.py");
        let config = ProjectFile::find(&root).map_err(|e| BuildError::message(e.to_string()))?.unwrap_or_default();
        let defaults = config.task_defaults().map_err(BuildError::message)?;
        let info = parse_module(&source, &entry_path, &defaults)?;
        if info.tasks.is_empty() {
            return Err(BuildError::Discovery(Diagnostics(vec![Diagnostic {
                path: entry_path,
                line: 1,
                column: 1,
                message: "no `@task` functions found".into(),
                hint: Some(
                    "decorate a top-level function: `from capsule import task` then `@task` above `def main():`".into(),
                ),
            }])));
        }

        let mut modules = BTreeMap::new();
        modules.insert(stem.clone(), SourceModule { name: stem.clone(), path: entry_path, source, is_package: false });
        let mut pending: Vec<String> = info.imports.into_iter().collect();
        let mut seen = BTreeSet::new();
        while let Some(import) = pending.pop() {
            let top = import.split('.').next().unwrap_or_default().to_string();
            if !seen.insert(top.clone()) || modules.contains_key(&top) {
                continue;
            }
            for module in local_modules(&root, &top)? {
                match parse_module(&module.source, &module.path, &defaults) {
                    Ok(parsed) => pending.extend(parsed.imports),
                    // Third-party code is CPython's to judge when it is imported (it may be
                    // imported only on a path the task never takes).
                    Err(_) if module.path.starts_with(&format!("{VENDOR_DIR}/")) => {}
                    Err(diagnostics) => return Err(diagnostics.into()),
                }
                modules.insert(module.name.clone(), module);
            }
        }
        Ok(Self { root, entry, entry_module: stem, modules: modules.into_values().collect(), tasks: info.tasks })
    }
}

impl Project {
    /// The fingerprint of everything the build of this project reads: its modules, its
    /// `capsule.toml` (or that there is none) and the runtime.
    pub fn fingerprint(&self, runtime: &Path) -> crate::Fingerprint {
        let config = self.root.join(manifest_schema::PROJECT_FILE);
        let mut files: Vec<PathBuf> = self.modules.iter().map(|m| self.root.join(&m.path)).collect();
        files.push(std::path::absolute(runtime).unwrap_or_else(|_| runtime.to_path_buf()));
        let absent = if config.exists() {
            files.push(config);
            None
        } else {
            Some(config)
        };
        crate::Fingerprint::of(files, absent)
    }
}

fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_alphabetic() || c == '_') && chars.all(|c| c.is_alphanumeric() || c == '_')
}

/// Where third-party packages are installed for a project: `pip install --target vendor PKG`.
pub const VENDOR_DIR: &str = "vendor";

/// File endings of compiled extension modules, which cannot run in the sandbox.
const NATIVE_EXTENSIONS: &[&str] = &[".so", ".pyd", ".dylib"];

/// The module `name.py` or the whole package `name/` beside the entry file, else in
/// `vendor/`, if any exists. Module names are relative to the folder they were found in.
fn local_modules(root: &Path, name: &str) -> Result<Vec<SourceModule>, BuildError> {
    for base in [root.to_path_buf(), root.join(VENDOR_DIR)] {
        let file = base.join(format!("{name}.py"));
        if file.is_file() {
            return Ok(vec![read_module(root, &base, &file)?]);
        }
        let package = base.join(name);
        if package.join("__init__.py").is_file() {
            let mut found = Vec::new();
            collect_package(root, &base, &package, &mut found)?;
            return Ok(found);
        }
        if let Some(native) = native_module(&base, name)? {
            return Err(native_extension_error(root, name, &native));
        }
    }
    Ok(Vec::new()) // the stdlib, or missing: Python will say so at import time
}

/// A compiled single-file module `name.*.so` (or `.pyd`) in `base`.
fn native_module(base: &Path, name: &str) -> Result<Option<PathBuf>, BuildError> {
    let Ok(entries) = fs::read_dir(base) else { return Ok(None) };
    Ok(entries.filter_map(|e| e.ok().map(|e| e.path())).find(|path| {
        let file = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        file.split('.').next() == Some(name) && NATIVE_EXTENSIONS.iter().any(|ext| file.ends_with(ext))
    }))
}

fn native_extension_error(root: &Path, package: &str, file: &Path) -> BuildError {
    let shown = file.strip_prefix(root).unwrap_or(file).display();
    BuildError::usage(
        format!("`{package}` contains a compiled extension module, `{shown}`, which cannot run in the Wasm sandbox"),
        format!("use a pure-Python package instead of `{package}` (or a pure-Python version of it, if it has one)"),
    )
}

fn collect_package(root: &Path, base: &Path, dir: &Path, found: &mut Vec<SourceModule>) -> Result<(), BuildError> {
    let mut entries: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(|e| BuildError::io(format!("cannot list `{}`", dir.display()), e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for path in entries {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if name.starts_with('.') || SKIPPED_DIRS.contains(&name) {
            continue;
        }
        if path.is_dir() && path.join("__init__.py").is_file() {
            collect_package(root, base, &path, found)?;
        } else if path.is_file() && name.ends_with(".py") && is_identifier(name.trim_end_matches(".py")) {
            found.push(read_module(root, base, &path)?);
        } else if NATIVE_EXTENSIONS.iter().any(|ext| name.ends_with(ext)) {
            let package = dir.strip_prefix(base).unwrap_or(dir).components().next();
            let package = package.map_or_else(String::new, |c| c.as_os_str().to_string_lossy().into_owned());
            return Err(native_extension_error(root, &package, &path));
        }
    }
    Ok(())
}

/// A module file below `base` (the project root or `vendor/`), shown relative to `root`.
fn read_module(root: &Path, base: &Path, file: &Path) -> Result<SourceModule, BuildError> {
    let slashed =
        |relative: &Path| relative.components().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>().join("/");
    let path = slashed(file.strip_prefix(root).expect("modules are below the root"));
    let source = fs::read_to_string(file).map_err(|e| BuildError::io(format!("cannot read `{path}`"), e))?;
    let dotted = slashed(file.strip_prefix(base).expect("modules are below their base"));
    let mut parts: Vec<&str> = dotted.trim_end_matches(".py").split('/').collect();
    let is_package = parts.last() == Some(&"__init__");
    if is_package {
        parts.pop();
    }
    Ok(SourceModule { name: parts.join("."), path, source, is_package })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, rel: &str, text: &str) {
        let path = dir.join(rel);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, text).unwrap();
    }

    #[test]
    fn bundles_imported_local_modules_only() {
        let dir = std::env::temp_dir().join(format!("capsule-project-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        write(
            &dir,
            "main.py",
            "import json\nimport util\nfrom pkg.sub import f\nfrom capsule import task\n@task\ndef main(): pass\n",
        );
        write(&dir, "util.py", "import deep\n");
        write(&dir, "deep.py", "X = 1\n");
        write(&dir, "pkg/__init__.py", "");
        write(&dir, "pkg/sub.py", "def f(): pass\n");
        write(&dir, "pkg/inner/__init__.py", "");
        write(&dir, "unused.py", "this is not python");
        let project = Project::load(&dir.join("main.py")).unwrap();
        let names: Vec<(&str, &str, bool)> =
            project.modules.iter().map(|m| (m.name.as_str(), m.path.as_str(), m.is_package)).collect();
        assert_eq!(
            names,
            [
                ("deep", "deep.py", false),
                ("main", "main.py", false),
                ("pkg", "pkg/__init__.py", true),
                ("pkg.inner", "pkg/inner/__init__.py", true),
                ("pkg.sub", "pkg/sub.py", false),
                ("util", "util.py", false),
            ]
        );
        assert_eq!(project.entry_module, "main");
        fs::remove_dir_all(&dir).unwrap();
    }
}
