//! Project automation, run as `cargo xtask <command>`.

mod runtime;
mod toolchain;
mod util;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Capsule's build, demo and CI tasks")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Build the CPython-for-WASI runtime (cached by the hash of its inputs).
    BuildRuntime {
        /// Rebuild the final module even when its key matches.
        #[arg(long)]
        force: bool,
    },
    /// Rebuild the runtime in another directory and check the result is byte-identical.
    CheckReproducible,
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Task::BuildRuntime { force } => runtime::build_runtime(force).map(drop),
        Task::CheckReproducible => runtime::check_reproducible(),
    }
}
