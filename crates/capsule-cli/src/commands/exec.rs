//! `capsule-exec MANIFEST [ARGS...]`: the runner on its own, for hosts that never build.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

use crate::exit::{Failure, MessageFormat};
use crate::launch::launch;
use crate::layout::ProjectLayout;
use crate::run_args::{Journaling, Launch, RunArgs};

/// Run a task of a Capsule artifact built by `capsule build`.
#[derive(Debug, Parser)]
#[command(
    name = "capsule-exec",
    version,
    after_help = "Examples:\n  capsule-exec .capsule/build/main/manifest.toml Ada\n  capsule-exec manifest.toml --task add --args-json '[1, 2]' --json\n  capsule-exec manifest.toml --journal runs.db --resume 19a2b3c4d5e6f7a80"
)]
pub struct ExecCommand {
    /// The manifest written by `capsule build`.
    manifest: PathBuf,
    /// Resume the journaled run RUN_ID (needs `--journal`): finished calls are replayed.
    #[arg(long, value_name = "RUN_ID", conflicts_with_all = ["task", "args_json", "args"])]
    resume: Option<String>,
    #[command(flatten)]
    run: RunArgs,
    /// How a failure is printed on stderr: `human` lines, or one line of `json` for programs.
    #[arg(long, value_enum, default_value_t)]
    message_format: MessageFormat,
}

impl ExecCommand {
    pub fn message_format(&self) -> MessageFormat {
        self.message_format
    }

    pub async fn execute(self) -> Result<ExitCode, Failure> {
        let layout = ProjectLayout::of_file(&self.manifest, self.run.journal.clone());
        let start = match self.resume {
            Some(run_id) => capsule_exec::Start::Resume { run_id },
            None => self.run.start()?,
        };
        let entry = std::path::absolute(&self.manifest).unwrap_or(self.manifest.clone());
        let what = Launch {
            manifest: self.manifest.clone(),
            entry,
            built_with: None,
            start,
            options: None,
            journaling: Journaling::OnRequest,
            own_build: false,
        };
        launch(what, &self.run, &layout).await
    }
}
