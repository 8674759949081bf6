//! `capsule logs RUN_ID [-f]`: what a run's tasks printed.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use capsule_daemon::Client;
use capsule_daemon::api::Line;
use capsule_exec::for_builder::Stream;
use capsule_exec::{Event, Journal};
use clap::Args;
use manifest_schema::{Category, Problem};

use crate::exit::{Exit, Failure};
use crate::layout::ProjectLayout;
use crate::remote::failure;

/// Print what a run's tasks printed: live from the daemon (`-f` follows until it ends), or
/// from the project's journal.
#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  capsule logs 19a2b3c4d5e6f7a80\n  capsule logs -f 19a2b3c4d5e6f7a80")]
pub struct LogsCommand {
    run_id: String,
    /// Keep printing until the run ends (needs the daemon).
    #[arg(short, long)]
    follow: bool,
    /// The journal to read when no daemon holds the run [default: `.capsule/journal.db` here].
    #[arg(long, value_name = "PATH")]
    journal: Option<PathBuf>,
}

fn write(stream: Stream, text: &[u8]) {
    let _ = match stream {
        Stream::Stdout => std::io::stdout().lock().write_all(text),
        Stream::Stderr => std::io::stderr().lock().write_all(text),
    };
}

impl LogsCommand {
    pub async fn execute(self) -> Result<ExitCode, Failure> {
        if let Ok(mut client) = Client::connect_default().await {
            let streamed = client
                .logs(&self.run_id, self.follow, |line| {
                    if let Line::Event { event: Event::Output { stream, text, .. } } = line {
                        write(stream, &text);
                    }
                })
                .await;
            match streamed {
                Ok(()) => return Ok(Exit::Success.into()),
                // Not held by the daemon (finished long ago, or run without it): the journal has it.
                Err(capsule_daemon::ClientError::Api(error)) if error.kind == Category::NotFound && !self.follow => {}
                Err(error) => return Err(failure(error)),
            }
        } else if self.follow {
            return Err(Failure::problem(
                Category::Usage,
                Problem::hinted(
                    "`--follow` needs the daemon that runs the run",
                    "start runs with `capsule daemon` running",
                ),
            ));
        }
        let journal = Journal::open_existing(&ProjectLayout::current(self.journal).journal)?;
        journal.run(&self.run_id)?;
        let mut calls: Vec<_> = journal.calls(&self.run_id)?.into_iter().filter(|c| c.kind == "task").collect();
        calls.sort_by_key(|c| (c.started_at_ms, c.id));
        for call in calls {
            write(Stream::Stdout, call.stdout.as_bytes());
            write(Stream::Stderr, call.stderr.as_bytes());
        }
        Ok(Exit::Success.into())
    }
}
