//! Running through the daemon: the same output, envelope and exit codes as in-process.

use std::path::Path;
use std::process::ExitCode;

use capsule_daemon::api::{Line, SubmitRun};
use capsule_daemon::{Client, ClientError};
use capsule_exec::trust::PublicKey;
use capsule_exec::{EventSink, Trust};
use manifest_schema::{Category, Problem};

use crate::exit::{Exit, Failure};
use crate::layout::ProjectLayout;
use crate::run_args::{Journaling, Launch, RunArgs, finish};
use crate::terminal::Terminal;

/// `path` made absolute (the daemon does not share this process's current folder).
fn absolute(path: &Path) -> std::path::PathBuf {
    if path.as_os_str().is_empty() {
        return std::env::current_dir().unwrap_or_default();
    }
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// What the daemon says went wrong, as the in-process path would say it: the same category,
/// so the same exit code.
pub fn failure(error: ClientError) -> Failure {
    Failure::of(&error)
}

pub async fn run(
    mut client: Client,
    what: Launch,
    trust: Option<&Trust>,
    args: &RunArgs,
    layout: &ProjectLayout,
) -> Result<ExitCode, Failure> {
    let limits = what.limits();
    let project = absolute(args.project.as_deref().unwrap_or(&layout.root));
    let journaled = what.journaling == Journaling::Project || args.journal.is_some();
    let mut order = what.order(args);
    // The daemon does not share this process's current folder.
    order.entry = Some(absolute(&what.entry).display().to_string());
    order.files_root = order.files_root.as_deref().map(absolute);
    let request = SubmitRun {
        project: Some(project),
        journal: journaled.then(|| absolute(&layout.journal)),
        trust: trust.map(|t| t.keys().iter().map(PublicKey::to_text).collect()).unwrap_or_default(),
        stop_on_disconnect: true,
        ..SubmitRun::of_order(absolute(&what.manifest), order)
    };
    if args.detach {
        let run = client.submit(&request).await.map_err(failure)?;
        println!("{}", run.id);
        return Ok(Exit::Success.into());
    }
    let terminal = Terminal { json: args.json, verbose: args.verbose };
    let (mut run_id, mut outcome) = (None, None);
    client
        .submit_and_follow(&request, |line| match line {
            Line::Accepted { run } => {
                if args.verbose {
                    eprintln!("capsule: run {} (in the daemon)", run.id);
                }
                run_id = Some(run.id);
            }
            Line::Event { event } => terminal.event(&event),
            Line::Outcome { outcome: last } => outcome = Some(last),
        })
        .await
        .map_err(failure)?;
    let outcome = outcome.ok_or_else(|| {
        Failure::problem(Category::Internal, Problem::new("the daemon ended the run's stream without its outcome"))
    })?;
    Ok(finish(&outcome, run_id.as_deref(), args, layout, limits))
}
