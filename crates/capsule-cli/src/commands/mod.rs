//! One file per command; each parses its own arguments and runs through the engine API.

#[cfg(feature = "build")]
pub mod build;
pub mod exec;
pub mod resume;
pub mod run;
pub mod runs;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use capsule_exec::{Engine, Loaded};
use manifest_schema::Problem;

use crate::exit::{Exit, Failure};
use crate::layout::ProjectLayout;

/// What a run starts from: a Python entry file (built first) or a built manifest.
pub enum Source {
    Python(PathBuf),
    Manifest(PathBuf),
}

impl Source {
    /// A `.toml` file is a manifest; anything else is taken for Python source.
    pub fn of(path: PathBuf) -> Self {
        if path.extension().is_some_and(|e| e == "toml") { Self::Manifest(path) } else { Self::Python(path) }
    }

    pub fn path(&self) -> &Path {
        match self {
            Self::Python(path) | Self::Manifest(path) => path,
        }
    }

    /// The absolute path, as the journal records it for resuming from anywhere.
    pub fn absolute(&self) -> PathBuf {
        std::path::absolute(self.path()).unwrap_or_else(|_| self.path().to_path_buf())
    }
}

/// Where build outputs go and whether to force a rebuild.
#[derive(Debug, Clone, Default)]
pub struct BuildChoice {
    pub out_dir: Option<PathBuf>,
    pub force: bool,
}

/// The engine for commands that may build: with the builder's compilation caches.
pub fn engine() -> Result<Engine, Failure> {
    #[cfg(feature = "build")]
    return capsule_build::build_engine().map_err(Failure::from);
    #[cfg(not(feature = "build"))]
    return Engine::new().map_err(Failure::from);
}

/// Loads `source`, building it first (cached) if it is Python.
pub async fn load(
    engine: &Engine,
    source: &Source,
    layout: &ProjectLayout,
    build: &BuildChoice,
) -> Result<Arc<Loaded>, Failure> {
    let manifest = match source {
        Source::Manifest(path) => path.clone(),
        Source::Python(entry) => build_entry(engine, entry, layout, build).await?,
    };
    Ok(engine.load(&manifest)?)
}

#[cfg(feature = "build")]
async fn build_entry(
    engine: &Engine,
    entry: &Path,
    layout: &ProjectLayout,
    choice: &BuildChoice,
) -> Result<PathBuf, Failure> {
    let output = build::build_quietly(engine, entry, layout, choice).await?;
    Ok(output.manifest_path)
}

#[cfg(not(feature = "build"))]
async fn build_entry(_: &Engine, entry: &Path, _: &ProjectLayout, _: &BuildChoice) -> Result<PathBuf, Failure> {
    Err(Failure::problem(
        Exit::Usage,
        Problem::hinted(
            format!("`{}` must be built first, and this `capsule` has no builder", entry.display()),
            "build it with a `capsule` that has the `build` feature, then run its `manifest.toml`",
        ),
    ))
}

/// The entry point named by `./capsule.toml`, for commands given no file.
pub fn entry_from_project() -> Result<PathBuf, Failure> {
    let dir = Path::new("");
    let hint =
        "pass the Python file (`capsule run main.py`), or set `[workflow] entrypoint = \"main.py\"` in capsule.toml";
    let config = manifest_schema::ProjectFile::find(dir).map_err(|e| Failure::usage(&e))?;
    match config.and_then(|c| c.workflow.entrypoint) {
        Some(entry) => Ok(dir.join(entry)),
        None => Err(Failure::problem(
            Exit::Usage,
            Problem::hinted(
                "no Python file given, and no `capsule.toml` with an entrypoint in the current folder",
                hint,
            ),
        )),
    }
}
