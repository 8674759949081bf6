//! `capsule run [FILE] [ARGS...]`: build (cached) and run one task, journaled.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;

use super::{BuildChoice, Source, entry_from_project};
use crate::exit::Failure;
use crate::layout::ProjectLayout;
use crate::run_args::RunArgs;

/// Build FILE (cached) and run one of its tasks, journaled in `.capsule/journal.db`.
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  capsule run hello.py Ada\n  capsule run main.py --task add --args-json '[20, 22]' --json\n  capsule run                # the entrypoint of ./capsule.toml\n  capsule run dist/manifest.toml"
)]
pub struct RunCommand {
    /// The Python file that defines the tasks, or a built `manifest.toml` [default:
    /// `entrypoint` of ./capsule.toml; a first argument that is neither is passed to the task].
    file: Option<PathBuf>,
    /// Resume the journaled run RUN_ID instead: finished sub-tasks and HTTP calls are replayed.
    #[arg(long, value_name = "RUN_ID", conflicts_with_all = ["task", "args_json", "args"])]
    resume: Option<String>,
    #[cfg(feature = "build")]
    #[command(flatten)]
    output: super::build::OutputArgs,
    #[command(flatten)]
    run: RunArgs,
}

impl RunCommand {
    pub async fn execute(mut self) -> Result<ExitCode, Failure> {
        if let Some(run_id) = self.resume.take() {
            return super::resume::resume(&run_id, self.file.take(), &self.build_choice(), &self.run).await;
        }
        let source = match self.file.take() {
            Some(file) if is_source(&file) => Source::of(file),
            other => {
                // Not a file of ours: the first of the task's arguments.
                if let Some(argument) = other {
                    self.run.args.insert(0, argument.display().to_string());
                }
                Source::Python(entry_from_project(Path::new(""))?)
            }
        };
        let layout = ProjectLayout::of_file(source.path(), self.run.journal.clone());
        super::launch_project(&source, &layout, &self.build_choice(), self.run.start()?, &self.run).await
    }

    fn build_choice(&self) -> BuildChoice {
        #[cfg(feature = "build")]
        return self.output.choice();
        #[cfg(not(feature = "build"))]
        return BuildChoice::default();
    }
}

fn is_source(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "py" || e == "toml")
}
