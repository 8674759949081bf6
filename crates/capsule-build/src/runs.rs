//! `capsule runs` and `capsule runs show RUN_ID`: what the journal recorded.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Result;
use capsule_exec::journal::{CallRecord, Journal, RunRecord};
use serde_json::json;

pub fn show(path: &Path, run: Option<&str>, json: bool) -> Result<()> {
    if !path.exists() {
        anyhow::bail!(
            "no journal at `{}`\n  hint: run `capsule runs` in the project folder, or pass `--journal PATH`",
            path.display()
        );
    }
    let journal = Journal::open(path)?;
    match run {
        None => list(&journal.runs(50)?, json),
        Some(id) => tree(&journal.run(id)?, &journal.calls(id)?, json),
    }
    Ok(())
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
    println!("{:<18} {:<8} {:<20} {:>10}  ENTRY", "RUN", "STATUS", "TASK", "DURATION");
    for run in runs {
        println!("{:<18} {:<8} {:<20} {:>10}  {}", run.id, run.status, run.task, duration(run), run.entry);
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
        let mut facts = vec![call.status.clone()];
        if let Some(attempts) = call.attempts {
            facts.push(format!("attempts {attempts}"));
        }
        if let Some(fuel) = call.fuel {
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
