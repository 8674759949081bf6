//! `capsule resume RUN_ID`: run a journaled run again, replaying what finished.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use capsule_exec::{Journal, Start};
use clap::Args;

use super::{BuildChoice, Source};
use crate::exit::Failure;
use crate::layout::ProjectLayout;
use crate::run_args::RunArgs;

/// Resume a journaled run: what finished is replayed, the rest runs.
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  capsule resume 19a2b3c4d5e6f7a80\n  capsule resume 19a2b3c4d5e6f7a80 --journal other/.capsule/journal.db"
)]
pub struct ResumeCommand {
    /// The run to resume, as printed by `capsule run` or listed by `capsule runs`.
    run_id: String,
    #[cfg(feature = "build")]
    #[command(flatten)]
    output: super::build::OutputArgs,
    #[command(flatten)]
    run: RunArgs,
}

impl ResumeCommand {
    pub async fn execute(self) -> Result<ExitCode, Failure> {
        #[cfg(feature = "build")]
        let choice = self.output.choice();
        #[cfg(not(feature = "build"))]
        let choice = BuildChoice::default();
        resume(&self.run_id, None, &choice, &self.run).await
    }
}

/// Resumes `run_id` of the journal `run.journal` (else the current project's), built from
/// `file` when given, else from the file the journal recorded.
pub async fn resume(
    run_id: &str,
    file: Option<PathBuf>,
    choice: &BuildChoice,
    run: &RunArgs,
) -> Result<ExitCode, Failure> {
    let layout = match &file {
        Some(file) => ProjectLayout::of_file(file, run.journal.clone()),
        None => ProjectLayout::current(run.journal.clone()),
    };
    let source = match file {
        Some(file) => Source::of(file),
        None => {
            let record = Journal::open_existing(&layout.journal)?.run(run_id)?;
            // Entries are recorded absolute; a relative one is from the project folder.
            Source::of(layout.root.join(Path::new(&record.entry)))
        }
    };
    super::launch_project(&source, &layout, choice, Start::Resume { run_id: run_id.to_string() }, run).await
}
