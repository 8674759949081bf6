//! The Python files that make up a build: the entry file and the local modules and packages
//! it imports (directly or through each other), found by parsing, never by running code.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use manifest_schema::{Metering, ProjectFile};
use python_runtime::{DataFile, Flavour, SourceModule};

use crate::dependencies::{self, Installed, Requirements};
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
    /// The data files of bundled third-party packages (`vendor/`, dependencies), by path.
    pub data_files: Vec<DataFile>,
    /// The entry file's tasks, in source order.
    pub tasks: Vec<DiscoveredTask>,
    /// Packages installed from the declared requirements (see [`dependencies`]).
    pub dependencies: Option<Installed>,
    /// How the compiled code counts CPU (`[runtime] metering` in capsule.toml).
    pub metering: Metering,
    /// The runtime it is built on (`[runtime] flavour`).
    pub flavour: Flavour,
    /// The packages of that runtime that the project's code imports, anywhere: the build
    /// imports them into the snapshot.
    pub preload: Vec<String>,
}

impl Project {
    pub fn load(entry: &Path) -> Result<Self, BuildError> {
        let shown = entry.display().to_string();
        if entry.extension().and_then(|e| e.to_str()) != Some("py") {
            return Err(BuildError::hinted(
                format!("`{shown}` is not a Python file"),
                "pass the `.py` file that defines your tasks",
            ));
        }
        let source = fs::read_to_string(entry).map_err(|e| BuildError::io(format!("cannot read `{shown}`"), e))?;
        let entry = fs::canonicalize(entry).map_err(|e| BuildError::io(format!("cannot resolve `{shown}`"), e))?;
        let root = entry.parent().expect("a file has a parent").to_path_buf();
        let stem = entry.file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_string();
        if !is_identifier(&stem) {
            return Err(BuildError::hinted(
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

        let dependencies = Requirements::find(&root, &config)?.as_ref().map(dependencies::install).transpose()?;
        let bases = [
            (root.clone(), String::new()),
            (root.join(VENDOR_DIR), format!("{VENDOR_DIR}/")),
            (
                dependencies.as_ref().map_or_else(PathBuf::new, |d| d.dir.clone()),
                format!("{}/", dependencies::SHOWN_DIR),
            ),
        ];
        let bases = &bases[..if dependencies.is_some() { 3 } else { 2 }];

        let mut modules = BTreeMap::new();
        modules.insert(stem.clone(), SourceModule { name: stem.clone(), path: entry_path, source, is_package: false });
        let mut data_files = Vec::new();
        let mut pending: Vec<String> = info.imports.into_iter().collect();
        let mut seen = BTreeSet::new();
        let flavour = config.runtime.flavour;
        let mut preload = BTreeSet::new();
        while let Some(import) = pending.pop() {
            let top = import.split('.').next().unwrap_or_default().to_string();
            if let Some(package) = flavour.packages().iter().find(|p| **p == top) {
                preload.insert(package.to_string());
            }
            if !seen.insert(top.clone()) || modules.contains_key(&top) {
                continue;
            }
            let found = local_modules(&root, bases, &top)?;
            data_files.extend(found.data_files);
            for module in found.modules {
                match parse_module(&module.source, &module.path, &defaults) {
                    Ok(parsed) => pending.extend(parsed.imports),
                    // Third-party code is CPython's to judge when it is imported (it may be
                    // imported only on a path the task never takes).
                    Err(_) if bases[1..].iter().any(|(_, shown)| module.path.starts_with(shown)) => {}
                    Err(diagnostics) => return Err(diagnostics.into()),
                }
                modules.insert(module.name.clone(), module);
            }
        }
        Ok(Self {
            root,
            entry,
            entry_module: stem,
            modules: modules.into_values().collect(),
            data_files,
            tasks: info.tasks,
            dependencies,
            metering: config.runtime.metering,
            flavour,
            preload: preload.into_iter().collect(),
        })
    }
}

impl Project {
    /// The fingerprint of everything the build of this project, asked to use `base_runtime`,
    /// reads: its modules, its `capsule.toml` and requirement files (or that there are none)
    /// and the runtime of its flavour, `runtime`.
    pub fn fingerprint(&self, base_runtime: &Path, runtime: &Path) -> crate::Fingerprint {
        let shown = self.modules.iter().map(|m| &m.path).chain(self.data_files.iter().map(|d| &d.path));
        let mut files: Vec<PathBuf> = shown.map(|path| self.file_of(path)).collect();
        files.push(crate::fingerprint::absolute(runtime));
        let mut absent = Vec::new();
        let declaring = dependencies::declaring_files(&self.root);
        for file in std::iter::once(self.root.join(manifest_schema::PROJECT_FILE)).chain(declaring) {
            if file.exists() {
                files.push(file);
            } else {
                absent.push(file);
            }
        }
        crate::Fingerprint::of(base_runtime, files, absent)
    }

    /// The file on disk behind a module's or data file's shown path.
    fn file_of(&self, shown: &str) -> PathBuf {
        let installed = shown.strip_prefix(dependencies::SHOWN_DIR).and_then(|rest| rest.strip_prefix('/'));
        match (installed, &self.dependencies) {
            (Some(rest), Some(dependencies)) => dependencies.dir.join(rest),
            _ => self.root.join(shown),
        }
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

/// The module `name.py` or the whole package `name/` in the first of `bases` (the entry
/// file's folder, `vendor/`, installed dependencies) that has it, each base with the prefix
/// its modules' paths are shown with. Module names are relative to the folder they were
/// found in.
fn local_modules(root: &Path, bases: &[(PathBuf, String)], name: &str) -> Result<Found, BuildError> {
    let mut found = Found::default();
    for base in bases {
        let file = base.0.join(format!("{name}.py"));
        if file.is_file() {
            found.modules.push(read_module(base, &file)?);
            return Ok(found);
        }
        let package = base.0.join(name);
        if package.join("__init__.py").is_file() {
            collect_package(root, base, &package, &mut found)?;
            return Ok(found);
        }
        if let Some(native) = native_module(&base.0, name)? {
            return Err(native_extension_error(root, name, &native));
        }
    }
    Ok(found) // the stdlib, or missing: Python will say so at import time
}

/// What one import brings into the build.
#[derive(Default)]
struct Found {
    modules: Vec<SourceModule>,
    data_files: Vec<DataFile>,
}

/// Not data: bytecode and type stubs, which the sandbox never reads.
const NOT_DATA: &[&str] = &[".pyc", ".pyi"];

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
    BuildError::hinted(
        format!("`{package}` contains a compiled extension module, `{shown}`, which cannot run in the Wasm sandbox"),
        format!("use a pure-Python package instead of `{package}` (or a pure-Python version of it, if it has one)"),
    )
}

fn collect_package(root: &Path, base: &(PathBuf, String), dir: &Path, found: &mut Found) -> Result<(), BuildError> {
    // Third-party packages read their own files; a project's own folders may hold anything.
    let third_party = !base.1.is_empty();
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
        if path.is_dir() && (third_party || path.join("__init__.py").is_file()) {
            collect_package(root, base, &path, found)?;
        } else if path.is_file() && name.ends_with(".py") && is_identifier(name.trim_end_matches(".py")) {
            if path.parent().is_some_and(|dir| dir.join("__init__.py").is_file()) {
                found.modules.push(read_module(base, &path)?);
            }
        } else if NATIVE_EXTENSIONS.iter().any(|ext| name.ends_with(ext)) {
            let package = dir.strip_prefix(&base.0).unwrap_or(dir).components().next();
            let package = package.map_or_else(String::new, |c| c.as_os_str().to_string_lossy().into_owned());
            return Err(native_extension_error(root, &package, &path));
        } else if third_party && path.is_file() && !NOT_DATA.iter().any(|ext| name.ends_with(ext)) {
            let contents =
                fs::read(&path).map_err(|e| BuildError::io(format!("cannot read `{}`", path.display()), e))?;
            found.data_files.push(DataFile { path: shown_path(base, &path), contents });
        }
    }
    Ok(())
}

/// A file below `base`, as `/`-separated path after the base's prefix.
fn shown_path((base, shown): &(PathBuf, String), file: &Path) -> String {
    let relative = file.strip_prefix(base).expect("files are below their base");
    let parts: Vec<_> = relative.components().map(|c| c.as_os_str().to_string_lossy()).collect();
    format!("{shown}{}", parts.join("/"))
}

/// A module file below `base`, shown as its relative path after the base's prefix.
fn read_module(base: &(PathBuf, String), file: &Path) -> Result<SourceModule, BuildError> {
    let path = shown_path(base, file);
    let dotted = path[base.1.len()..].to_string();
    let source = fs::read_to_string(file).map_err(|e| BuildError::io(format!("cannot read `{path}`"), e))?;
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
