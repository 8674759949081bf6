//! `cargo xtask soak`: many mixed invocations in one process (successes, exceptions,
//! timeouts, fuel and memory exhaustion, refused HTTP, sub-task fan-outs), checking that each
//! ends as it must and that memory and open files stay flat; then concurrent runs sharing
//! one journal. Prints a Markdown table; exits non-zero on a wrong outcome or growth.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use capsule_exec::{Journal, Loaded};
use python_runtime::ErrorKind;
use serde_json::{Value, json};
use tests::{build_into, engine, load, quiet_run};

/// Growth past the warmed-up figure that counts as a leak.
const ALLOWED_RSS_GROWTH: f64 = 0.10;
const WORKERS: usize = 2;
const SHARED_JOURNAL_RUNS: usize = 64;

/// The `i`-th invocation and how it must end (`None`: success with that result).
fn case(i: u64) -> (&'static str, Vec<Value>, Result<Value, ErrorKind>) {
    match i % 100 {
        0 => ("too_slow", vec![], Err(ErrorKind::Timeout)),
        1 => ("too_much_memory", vec![], Err(ErrorKind::Memory)),
        _ => match i % 5 {
            0 => ("ok", vec![json!(i)], Ok(json!(i * 2))),
            1 => ("raises", vec![json!(i)], Err(ErrorKind::Exception)),
            2 => ("too_much_cpu", vec![], Err(ErrorKind::Fuel)),
            3 => ("refused", vec![], Ok(json!("refused"))),
            _ => ("fan_out", vec![json!(4)], Ok(json!(12))),
        },
    }
}

fn proc_status(field: &str) -> u64 {
    let text = std::fs::read_to_string("/proc/self/status").expect("Linux /proc");
    let line = text.lines().find(|l| l.starts_with(field)).expect("field present");
    line.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()).expect("a number") * 1024
}

fn open_files() -> usize {
    std::fs::read_dir("/proc/self/fd").expect("Linux /proc").count()
}

/// Runs invocations `from..to` on `WORKERS` concurrent callers; the first wrong outcome, if any.
fn invoke(loaded: &Arc<Loaded>, from: u64, to: u64) -> Result<(), String> {
    let next = Arc::new(AtomicU64::new(from));
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(WORKERS).enable_all().build().unwrap();
    runtime.block_on(async {
        let mut callers = Vec::new();
        for _ in 0..WORKERS {
            let (loaded, next) = (loaded.clone(), next.clone());
            callers.push(tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= to {
                        return Ok(());
                    }
                    let (task, args, expected) = case(i);
                    let outcome = engine().prepare(&loaded, quiet_run(task, args)).expect("starts").run().await;
                    let ended = match (&outcome.error, outcome.success) {
                        (None, true) => Ok(outcome.result.clone()),
                        (Some(error), _) => Err(error.kind),
                        (None, false) => return Err(format!("#{i} `{task}` failed without an error")),
                    };
                    if ended != expected {
                        return Err(format!(
                            "#{i} `{task}` ended {ended:?}, expected {expected:?}: {:?}",
                            outcome.error
                        ));
                    }
                }
            }));
        }
        for caller in callers {
            caller.await.expect("caller")?;
        }
        Ok(())
    })
}

/// `runs` runs of `fan_out` at once, all recorded in one journal file.
fn shared_journal(loaded: &Arc<Loaded>, runs: usize) -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    let journal = Arc::new(Journal::open(&dir.path().join("journal.db")).map_err(|e| e.to_string())?);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(WORKERS).enable_all().build().unwrap();
    let outcomes = runtime.block_on(async {
        let handles: Vec<_> = (0..runs)
            .map(|_| {
                let mut request = quiet_run("fan_out", vec![json!(4)]);
                request.journal = Some(journal.clone());
                let prepared = engine().prepare(loaded, request).expect("starts");
                tokio::spawn(prepared.run())
            })
            .collect();
        let mut outcomes = Vec::new();
        for handle in handles {
            outcomes.push(handle.await.expect("run"));
        }
        outcomes
    });
    if let Some(failed) = outcomes.iter().find(|o| !o.success) {
        return Err(format!("a run sharing the journal failed: {:?}", failed.error));
    }
    let recorded = journal.runs(u32::MAX).map_err(|e| e.to_string())?;
    let complete = recorded.iter().filter(|r| r.status == capsule_exec::RunState::Ok).count();
    if complete != runs {
        return Err(format!("{complete} of {runs} runs recorded as finished in the shared journal"));
    }
    for run in &recorded {
        let calls = journal.calls(&run.id).map_err(|e| e.to_string())?;
        if calls.len() != 5 {
            return Err(format!("run {} has {} calls recorded, expected 5", run.id, calls.len()));
        }
    }
    Ok(())
}

fn main() {
    let total: u64 = std::env::args().nth(1).map_or(100_000, |n| n.parse().expect("a number of invocations"));
    let project = tempfile::tempdir().unwrap();
    let entry = project.path().join("soak.py");
    std::fs::copy(concat!(env!("CARGO_MANIFEST_DIR"), "/bench/soak.py"), &entry).unwrap();
    let loaded = load(build_into(&entry, &project.path().join("build"), false)).loaded;

    let warm_up = (total / 10).max(100);
    let started = Instant::now();
    let mut result = invoke(&loaded, 0, warm_up);
    let (rss_warm, files_warm) = (proc_status("VmRSS:"), open_files());
    result = result.and_then(|()| invoke(&loaded, warm_up, total));
    let elapsed = started.elapsed();
    let (rss_end, files_end) = (proc_status("VmRSS:"), open_files());
    let journal_started = Instant::now();
    let journal = shared_journal(&loaded, SHARED_JOURNAL_RUNS);
    let journal_time = journal_started.elapsed();

    let mib = |bytes: u64| bytes as f64 / f64::from(1 << 20);
    let growth = rss_end as f64 / rss_warm as f64 - 1.0;
    println!("| measure | figure |\n| --- | --- |");
    println!(
        "| mixed invocations | {total} in {:.1} s ({:.0}/s on {WORKERS} callers) |",
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64()
    );
    println!(
        "| RSS after {warm_up} / after {total} | {:.1} MiB / {:.1} MiB ({:+.1} %) |",
        mib(rss_warm),
        mib(rss_end),
        growth * 100.0
    );
    println!("| open files after {warm_up} / after {total} | {files_warm} / {files_end} |");
    println!(
        "| {SHARED_JOURNAL_RUNS} concurrent runs sharing one journal | {} in {:.2} s |",
        if journal.is_ok() { "all recorded" } else { "FAILED" },
        journal_time.as_secs_f64()
    );

    let mut problems = Vec::new();
    problems.extend(result.err());
    problems.extend(journal.err());
    if growth > ALLOWED_RSS_GROWTH {
        problems.push(format!("RSS grew {:.1} % after warm-up", growth * 100.0));
    }
    if files_end > files_warm {
        problems.push(format!("open files grew from {files_warm} to {files_end}"));
    }
    if !problems.is_empty() {
        eprintln!("soak failed:\n{}", problems.join("\n"));
        std::process::exit(1);
    }
}
