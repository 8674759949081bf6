//! One file per command; each parses its own arguments and runs through the engine API.

#[cfg(feature = "build")]
pub mod build;
pub mod daemon;
pub mod exec;
pub mod keygen;
pub mod list;
pub mod logs;
#[cfg(feature = "build")]
pub mod mcp;
#[cfg(feature = "build")]
pub mod python;
pub mod restart;
pub mod resume;
pub mod run;
pub mod runs;
pub mod stop;
pub mod worker;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use capsule_exec::{Engine, Start};
use manifest_schema::{Category, Problem};

use crate::exit::Failure;
use crate::launch::launch;
use crate::layout::ProjectLayout;
use crate::run_args::{Journaling, Launch, RunArgs};

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

/// The manifest of `source`, building it first (cached) if it is Python, and the engine that
/// built it if it had to be built (a cache hit makes none).
pub async fn manifest_of(
    source: &Source,
    layout: &ProjectLayout,
    choice: &BuildChoice,
) -> Result<(PathBuf, Option<Engine>), Failure> {
    match source {
        Source::Manifest(path) => Ok((path.clone(), None)),
        Source::Python(entry) => build_entry(entry, layout, choice).await,
    }
}

/// Builds (or finds built) `source` and starts `start` of it, journaled in the project:
/// what `run` and `resume` share.
pub async fn launch_project(
    source: &Source,
    layout: &ProjectLayout,
    choice: &BuildChoice,
    start: Start,
    args: &RunArgs,
) -> Result<ExitCode, Failure> {
    let (manifest, built_with) = manifest_of(source, layout, choice).await?;
    let what = Launch {
        manifest,
        entry: source.absolute(),
        built_with,
        start,
        options: None,
        journaling: Journaling::Project,
        own_build: false,
    };
    launch(what, args, layout).await
}

#[cfg(feature = "build")]
async fn build_entry(
    entry: &Path,
    layout: &ProjectLayout,
    choice: &BuildChoice,
) -> Result<(PathBuf, Option<Engine>), Failure> {
    let options = build::options(entry, layout, choice);
    if let Some(output) = capsule_build::up_to_date(&options) {
        return Ok((output.manifest_path, None));
    }
    let engine = capsule_build::build_engine()?;
    let output = build::build_with_progress(&engine, &options).await?;
    Ok((output.manifest_path, Some(engine)))
}

#[cfg(not(feature = "build"))]
async fn build_entry(entry: &Path, _: &ProjectLayout, _: &BuildChoice) -> Result<(PathBuf, Option<Engine>), Failure> {
    Err(Failure::problem(
        Category::Usage,
        Problem::hinted(
            format!("`{}` must be built first, and this `capsule` has no builder", entry.display()),
            "build it with a `capsule` that has the `build` feature, then run its `manifest.toml`",
        ),
    ))
}

/// The entry point named by `capsule.toml` in `dir` (`""`: the current folder), for commands
/// given no file.
pub fn entry_from_project(dir: &Path) -> Result<PathBuf, Failure> {
    let hint =
        "pass the Python file (`capsule run main.py`), or set `[workflow] entrypoint = \"main.py\"` in capsule.toml";
    let config = manifest_schema::ProjectFile::find(dir).map_err(|e| Failure::of(&e))?;
    match config.and_then(|c| c.workflow.entrypoint) {
        Some(entry) => Ok(dir.join(entry)),
        None => Err(Failure::problem(
            Category::Usage,
            Problem::hinted(
                match dir.as_os_str().is_empty() {
                    true => {
                        "no Python file given, and no `capsule.toml` with an entrypoint in the current folder".into()
                    }
                    false => format!("no `capsule.toml` with an entrypoint in `{}`", dir.display()),
                },
                hint,
            ),
        )),
    }
}
