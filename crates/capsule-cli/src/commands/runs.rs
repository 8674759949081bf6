//! `capsule runs` and `capsule runs show RUN_ID`: what the journal recorded.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use capsule_exec::{CallRecord, Journal, RunRecord};
use clap::{Args, Subcommand};
use serde_json::json;

use crate::exit::{Exit, Failure};
use crate::layout::ProjectLayout;

/// List recent runs of the journal, or show one as a tree.
#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  capsule runs\n  capsule runs show 19a2b3c4d5e6f7a80 --json")]
pub struct RunsCommand {
    #[command(subcommand)]
    show: Option<Show>,
    /// The journal [default: `.capsule/journal.db` in the current folder].
    #[arg(long, value_name = "PATH", global = true)]
    journal: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum Show {
    /// Show the tree of tasks and HTTP calls of one run.
    Show { run_id: String },
}

impl RunsCommand {
    pub async fn execute(self) -> Result<ExitCode, Failure> {
        let layout = ProjectLayout::current(self.journal);
        let journal = Journal::open_existing(&layout.journal)?;
        match self.show {
            None => list(&journal.runs(50)?, self.json),
            Some(Show::Show { run_id }) => tree(&journal.run(&run_id)?, &journal.calls(&run_id)?, self.json),
        }
        Ok(Exit::Success.into())
    }
}

fn duration(run: &RunRecord) -> String {
    run.finished_at_ms.map_or_else(|| "-".into(), |end| format!("{} ms", end - run.started_at_ms))
}

fn list(runs: &[RunRecord], json: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(runs).expect("records serialise"));
        return;
    }
    if runs.is_empty() {
        println!("no runs yet");
        return;
    }
    println!("{:<18} {:<11} {:<20} {:>10}  ENTRY", "RUN", "STATUS", "TASK", "DURATION");
    for run in runs {
        println!("{:<18} {:<11} {:<20} {:>10}  {}", run.id, run.status, run.task, duration(run), run.entry);
    }
}

fn tree(run: &RunRecord, calls: &[CallRecord], json: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(&json!({"run": run, "calls": calls})).expect("records serialise"));
        return;
    }
    println!("run {} ({}) {} {} in {}", run.id, run.entry, run.task, run.status, duration(run));
    let mut children: BTreeMap<i64, Vec<&CallRecord>> = BTreeMap::new();
    for call in calls {
        children.entry(call.parent).or_default().push(call);
    }
    draw(&children, 0, "");
}

fn draw(children: &BTreeMap<i64, Vec<&CallRecord>>, parent: i64, prefix: &str) {
    let Some(calls) = children.get(&parent) else { return };
    for (i, call) in calls.iter().enumerate() {
        let last = i + 1 == calls.len();
        let mut facts = vec![call.status.to_string()];
        if let Some(attempts) = call.attempts {
            facts.push(format!("attempts {attempts}"));
        }
        // Time-metered projects count no fuel.
        if let Some(fuel) = call.fuel.filter(|&fuel| fuel > 0) {
            facts.push(format!("fuel {fuel}"));
        }
        if let Some(memory) = call.peak_memory_bytes {
            facts.push(format!("memory {:.1} MiB", memory as f64 / f64::from(1 << 20)));
        }
        if let Some(ms) = call.duration_ms {
            facts.push(format!("{ms} ms"));
        }
        let what = if call.kind == "http" { format!("{} {}", call.name, call.detail) } else { call.name.clone() };
        println!("{prefix}{} #{} {what}: {}", if last { "└─" } else { "├─" }, call.seq, facts.join(", "));
        draw(children, call.id, &format!("{prefix}{}", if last { "   " } else { "│  " }));
    }
}
