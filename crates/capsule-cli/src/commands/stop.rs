//! `capsule stop RUN_ID`: stop a run in the daemon, and every sub-task under it.

use std::process::ExitCode;

use capsule_daemon::Client;
use clap::Args;

use crate::exit::{Exit, Failure};
use crate::remote::failure;

/// Stop a run the daemon is running (its sub-tasks too); it ends as `cancelled`.
#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  capsule stop 19a2b3c4d5e6f7a80")]
pub struct StopCommand {
    /// The run, as `capsule run --detach` printed it or `capsule list` shows it.
    run_id: String,
}

impl StopCommand {
    pub async fn execute(self) -> Result<ExitCode, Failure> {
        let mut client = Client::connect_default().await.map_err(failure)?;
        let run = client.stop(&self.run_id).await.map_err(failure)?;
        println!("run {} {}", run.id, run.status);
        Ok(Exit::Success.into())
    }
}
