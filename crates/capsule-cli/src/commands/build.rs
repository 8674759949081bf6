//! `capsule build [FILE] [-o DIR] [--force]`

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use capsule_build::{BuildOptions, BuildOutput};
use capsule_exec::Engine;
use capsule_exec::trust::SigningKey;
use clap::Args;

use super::{BuildChoice, entry_from_project};
use crate::exit::{Exit, Failure};
use crate::layout::ProjectLayout;

/// Snapshot and precompile FILE's tasks; writes a manifest and a `.cwasm` artifact.
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  capsule build main.py\n  capsule build main.py -o dist/ --force\n  capsule build main.py --sign release.key   # writes manifest.toml.sig, for runners with `--trust release.key.pub`\n  capsule build            # the entrypoint of ./capsule.toml"
)]
pub struct BuildCommand {
    /// The Python file that defines the tasks [default: `entrypoint` of ./capsule.toml].
    file: Option<PathBuf>,
    #[command(flatten)]
    output: OutputArgs,
    /// Sign the manifest with this secret key (from `capsule keygen`): writes
    /// `manifest.toml.sig` beside it.
    #[arg(long, value_name = "KEY")]
    sign: Option<PathBuf>,
}

/// Where a build writes, shared by `build` and `run`.
#[derive(Debug, Clone, Args)]
pub struct OutputArgs {
    /// Output folder [default: `.capsule/build/<name>/` beside FILE].
    #[arg(short = 'o', long = "out-dir", value_name = "DIR")]
    pub out_dir: Option<PathBuf>,
    /// Rebuild even when nothing changed.
    #[arg(long)]
    pub force: bool,
}

impl OutputArgs {
    pub fn choice(&self) -> BuildChoice {
        BuildChoice { out_dir: self.out_dir.clone(), force: self.force }
    }
}

impl BuildCommand {
    pub async fn execute(self) -> Result<ExitCode, Failure> {
        let entry = match self.file {
            Some(file) => file,
            None => entry_from_project(Path::new(""))?,
        };
        // A key that cannot be read fails before the build, not after it.
        let key = match &self.sign {
            Some(path) => Some(SigningKey::read(path).map_err(|e| Failure::of(&e))?),
            None => None,
        };
        let layout = ProjectLayout::of_file(&entry, None);
        let options = options(&entry, &layout, &self.output.choice());
        let output = match capsule_build::up_to_date(&options) {
            Some(output) => output,
            None => build_with_progress(&capsule_build::build_engine()?, &options).await?,
        };
        let status = if output.cache_hit { "up to date" } else { "built" };
        println!("{status}: {}", output.manifest_path.display());
        if let Some(key) = key {
            let signature = capsule_build::sign(&output.manifest_path, &key)?;
            println!("signed: {} (key {})", signature.display(), key.public().id());
        }
        Ok(Exit::Success.into())
    }
}

/// How `entry` is built: into `--out-dir`, else the project's build folder.
pub fn options(entry: &Path, layout: &ProjectLayout, choice: &BuildChoice) -> BuildOptions {
    let stem = entry.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    BuildOptions {
        entry: entry.to_path_buf(),
        out_dir: Some(choice.out_dir.clone().unwrap_or_else(|| layout.build_dir(&stem))),
        runtime: capsule_build::runtime_path(),
        force: choice.force,
    }
}

/// Builds (or finds built), telling a person at a terminal that it may take a while.
pub async fn build_with_progress(engine: &Engine, options: &BuildOptions) -> Result<BuildOutput, Failure> {
    let progress = std::io::stderr().is_terminal().then(|| Progress::start(&options.entry));
    let output = capsule_build::build(engine, options).await;
    drop(progress);
    let output = output?;
    for note in &output.notes {
        eprintln!("note: {note}");
    }
    Ok(output)
}

/// A line on the terminal while a build runs longer than a moment; erased when it ends.
struct Progress {
    task: tokio::task::JoinHandle<()>,
}

impl Progress {
    fn start(entry: &Path) -> Self {
        let what = entry.display().to_string();
        let task = tokio::spawn(async move {
            let started = std::time::Instant::now();
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            loop {
                eprint!("\r\x1b[2Kcapsule: building {what} ({}s)", started.elapsed().as_secs());
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        });
        Self { task }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if !self.task.is_finished() {
            self.task.abort();
        }
        eprint!("\r\x1b[2K");
    }
}
