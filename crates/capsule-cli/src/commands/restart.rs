//! `capsule restart RUN_ID`: the same task with the same arguments, as a new run.

use std::process::ExitCode;

use capsule_daemon::Client;
use clap::Args;

use crate::exit::{Exit, Failure};
use crate::remote::failure;

/// Start the task of a run again with the same arguments, as a new run linked to the old
/// one, in the daemon; prints the new run's id. (`capsule resume` continues the same run.)
#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  capsule restart 19a2b3c4d5e6f7a80")]
pub struct RestartCommand {
    /// The run to start again.
    run_id: String,
}

impl RestartCommand {
    pub async fn execute(self) -> Result<ExitCode, Failure> {
        let mut client = Client::connect_default().await.map_err(failure)?;
        let run = client.restart(&self.run_id).await.map_err(failure)?;
        println!("{}", run.id);
        Ok(Exit::Success.into())
    }
}
