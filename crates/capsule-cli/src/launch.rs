//! The one choice every command that runs something makes: through the daemon (`remote`) or
//! in this process (`run_args`).

use std::process::ExitCode;

use capsule_daemon::Client;
use capsule_exec::Engine;

use crate::exit::Failure;
use crate::layout::ProjectLayout;
use crate::run_args::{Launch, RunArgs, run_in_process};

/// Runs `what`, through the daemon when one is to be used, else in this process; shows what
/// happens and gives the exit code.
/// With `--trust`, the manifest runs only if one of its keys signed it, wherever it runs.
pub async fn launch(mut what: Launch, args: &RunArgs, layout: &ProjectLayout) -> Result<ExitCode, Failure> {
    let trust = if what.own_build { None } else { args.trust()? };
    if let Some(client) = daemon(args).await? {
        return crate::remote::run(client, what, trust.as_ref(), args, layout).await;
    }
    let engine = match what.built_with.take() {
        Some(engine) => engine,
        None => Engine::for_one_run()?,
    };
    let loaded = match &trust {
        Some(trust) => engine.load_signed(&what.manifest, trust)?,
        None if what.own_build => engine.load_own(&what.manifest)?,
        None => engine.load(&what.manifest)?,
    };
    run_in_process(&engine, &loaded, what, args, layout).await
}

/// The daemon to run through: none with `--no-daemon`; required with `--daemon` or
/// `--detach`; else the one that answers on the socket, if any.
async fn daemon(args: &RunArgs) -> Result<Option<Client>, Failure> {
    if args.no_daemon {
        return Ok(None);
    }
    match Client::connect_default().await {
        Ok(client) => Ok(Some(client)),
        Err(error) if args.daemon || args.detach => Err(Failure::of(&error)),
        Err(_) => Ok(None),
    }
}
