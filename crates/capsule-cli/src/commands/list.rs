//! `capsule list`: running and recent runs as a tree per project, live from the daemon, or
//! from the project's journal when no daemon answers.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use capsule_daemon::Client;
use capsule_daemon::api::{CallView, RunView};
use capsule_exec::{CallStatus, HttpCall, Journal, RunRecord, RunState};
use clap::Args;

use crate::exit::{Exit, Failure};
use crate::layout::ProjectLayout;
use crate::remote::failure;

/// Show running and recent runs as trees: run → sub-tasks → HTTP calls.
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  capsule list\n  capsule list --all --json\n  capsule list --no-daemon --journal other/.capsule/journal.db"
)]
pub struct ListCommand {
    /// Finished runs too, not only those queued or running.
    #[arg(long)]
    all: bool,
    /// Print JSON instead of trees.
    #[arg(long)]
    json: bool,
    /// Read this project's journal even when a daemon answers.
    #[arg(long)]
    no_daemon: bool,
    /// The journal to read without a daemon [default: `.capsule/journal.db` in the current folder].
    #[arg(long, value_name = "PATH")]
    journal: Option<PathBuf>,
}

/// Finished runs shown from a journal without `--all`.
const RECENT: u32 = 20;

impl ListCommand {
    pub async fn execute(self) -> Result<ExitCode, Failure> {
        let daemon = match self.no_daemon {
            true => None,
            false => Client::connect_default().await.ok(),
        };
        let runs = match daemon {
            Some(mut client) => client.runs(self.all).await.map_err(failure)?,
            None => from_journal(&ProjectLayout::current(self.journal.clone()), self.all)?,
        };
        if self.json {
            println!("{}", serde_json::to_string_pretty(&runs).expect("views serialise"));
        } else if runs.is_empty() {
            println!("{}", if self.all { "no runs" } else { "no runs running (`--all` shows finished ones)" });
        } else {
            print!("{}", draw(&runs, now_ms()));
        }
        Ok(Exit::Success.into())
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// The runs of a journal as the daemon would show them.
fn from_journal(layout: &ProjectLayout, all: bool) -> Result<Vec<RunView>, Failure> {
    let journal = Journal::open_existing(&layout.journal)?;
    let namespace = manifest_schema::ProjectFile::namespace(&layout.root).map_err(|e| Failure::of(&e))?;
    let mut views = Vec::new();
    for run in journal.runs(if all { 1_000 } else { RECENT })? {
        if !all && run.status != RunState::Running {
            continue;
        }
        let calls = journal.calls(&run.id)?;
        views.push(view_of(&run, &calls, &namespace));
    }
    Ok(views)
}

fn view_of(run: &RunRecord, calls: &[capsule_exec::CallRecord], namespace: &str) -> RunView {
    let mut tasks: Vec<CallView> = Vec::new();
    for call in calls {
        if call.kind == "http" {
            let http = HttpCall {
                method: call.name.clone(),
                url: call.detail.clone(),
                status: None,
                duration_ms: call.duration_ms.unwrap_or(0),
                bytes: 0,
                error: (call.status != CallStatus::Ok).then(|| call.status.to_string()),
            };
            if let Some(parent) = tasks.iter_mut().find(|t| t.id == call.parent as u64) {
                parent.http.push(http);
            }
            continue;
        }
        tasks.push(CallView::of_journal(call, now_ms()));
    }
    RunView {
        id: run.id.clone(),
        namespace: namespace.to_string(),
        task: run.task.clone(),
        entry: run.entry.clone(),
        status: run.status,
        submitted_at_ms: run.started_at_ms,
        finished_at_ms: run.finished_at_ms,
        restarted_from: None,
        error: None,
        calls: tasks,
    }
}

fn elapsed(ms: u64) -> String {
    if ms < 1_000 { format!("{ms} ms") } else { format!("{:.1} s", ms as f64 / 1e3) }
}

/// Runs grouped by namespace, each drawn as a tree.
pub fn draw(runs: &[RunView], now_ms: i64) -> String {
    let mut by_namespace: BTreeMap<&str, Vec<&RunView>> = BTreeMap::new();
    for run in runs {
        by_namespace.entry(&run.namespace).or_default().push(run);
    }
    let mut out = String::new();
    for (namespace, runs) in by_namespace {
        out.push_str(namespace);
        out.push('\n');
        for (i, run) in runs.iter().enumerate() {
            let last = i + 1 == runs.len();
            let took = run.finished_at_ms.unwrap_or(now_ms).saturating_sub(run.submitted_at_ms).max(0) as u64;
            let restarted = run.restarted_from.as_deref().map_or_else(String::new, |id| format!(", restart of {id}"));
            out.push_str(&format!(
                "{} run {} {} ({}, {}{restarted})\n",
                if last { "└─" } else { "├─" },
                run.id,
                run.task,
                run.status,
                elapsed(took)
            ));
            let prefix = if last { "   " } else { "│  " };
            let mut children: BTreeMap<Option<u64>, Vec<&CallView>> = BTreeMap::new();
            for call in &run.calls {
                children.entry(call.parent).or_default().push(call);
            }
            // The top-level call is the run's own line; its children hang below it.
            let top = children.get(&None).and_then(|c| c.first()).map(|c| c.id);
            if let Some(top) = top {
                let call = run.calls.iter().find(|c| c.id == top).expect("present");
                draw_http(&mut out, prefix, &call.http, children.contains_key(&Some(top)));
                draw_calls(&mut out, &children, Some(top), prefix);
            }
        }
    }
    out
}

fn facts(call: &CallView) -> String {
    let mut facts = vec![call.status.to_string()];
    if let Some(kind) = &call.error_type {
        facts.push(kind.clone());
    }
    facts.push(format!("attempt {}", call.attempt));
    facts.push(elapsed(call.elapsed_ms));
    if let Some(worker) = &call.worker {
        facts.push(format!("on {worker}"));
    }
    // Time-metered projects count no fuel.
    if let Some(fuel) = call.fuel.filter(|&fuel| fuel > 0) {
        facts.push(format!("fuel {fuel}"));
    }
    if let Some(memory) = call.peak_memory_bytes {
        facts.push(format!("{:.1} MiB", memory as f64 / f64::from(1 << 20)));
    }
    facts.join(", ")
}

fn draw_calls(out: &mut String, children: &BTreeMap<Option<u64>, Vec<&CallView>>, parent: Option<u64>, prefix: &str) {
    let Some(calls) = children.get(&parent) else { return };
    for (i, call) in calls.iter().enumerate() {
        let last = i + 1 == calls.len();
        out.push_str(&format!("{prefix}{} {} ({})\n", if last { "└─" } else { "├─" }, call.task, facts(call)));
        let inner = format!("{prefix}{}", if last { "   " } else { "│  " });
        draw_http(out, &inner, &call.http, children.contains_key(&Some(call.id)));
        draw_calls(out, children, Some(call.id), &inner);
    }
}

fn draw_http(out: &mut String, prefix: &str, calls: &[HttpCall], more_below: bool) {
    for (i, call) in calls.iter().enumerate() {
        let last = i + 1 == calls.len() && !more_below;
        let status = call.status.map_or_else(|| call.error.clone().unwrap_or_default(), |s| s.to_string());
        out.push_str(&format!(
            "{prefix}{} {} {} {status} ({})\n",
            if last { "└─" } else { "├─" },
            call.method,
            call.url,
            elapsed(call.duration_ms)
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(id: u64, parent: Option<u64>, task: &str, status: &str) -> CallView {
        CallView {
            id,
            parent,
            task: task.into(),
            status: status.parse().unwrap(),
            attempt: 1,
            elapsed_ms: 120,
            fuel: Some(1000),
            peak_memory_bytes: Some(24 << 20),
            error_type: None,
            http: Vec::new(),
            worker: None,
        }
    }

    #[test]
    fn runs_are_drawn_as_trees_per_namespace() {
        let mut fetch = call(2, Some(1), "fetch", "ok");
        fetch.http.push(HttpCall {
            method: "GET".into(),
            url: "https://api.example.com/items".into(),
            status: Some(200),
            duration_ms: 45,
            bytes: 10,
            error: None,
        });
        let run = RunView {
            id: "19a2b3c4d5e6f7a80".into(),
            namespace: "research".into(),
            task: "main".into(),
            entry: "/p/main.py".into(),
            status: RunState::Running,
            submitted_at_ms: 1_000,
            finished_at_ms: None,
            restarted_from: None,
            error: None,
            calls: vec![call(1, None, "main", "running"), fetch, call(3, Some(1), "summarise", "running")],
        };
        insta::assert_snapshot!(draw(&[run], 3_300), @r"
        research
        └─ run 19a2b3c4d5e6f7a80 main (running, 2.3 s)
           ├─ fetch (ok, attempt 1, 120 ms, fuel 1000, 24.0 MiB)
           │  └─ GET https://api.example.com/items 200 (45 ms)
           └─ summarise (running, attempt 1, 120 ms, fuel 1000, 24.0 MiB)
        ");
    }

    #[test]
    fn a_call_that_counted_no_fuel_shows_none() {
        let mut timed = call(1, None, "main", "ok");
        timed.fuel = Some(0);
        assert_eq!(facts(&timed), "ok, attempt 1, 120 ms, 24.0 MiB");
        assert_eq!(facts(&call(1, None, "main", "ok")), "ok, attempt 1, 120 ms, fuel 1000, 24.0 MiB");
    }
}
