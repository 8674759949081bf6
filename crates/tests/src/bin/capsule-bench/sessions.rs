//! Code strings and sessions: `run_python("1 + 1")` in the daemon and from the Python SDK,
//! a session call against pydantic-monty's, and saving and restoring a session.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use capsule_daemon::api::SubmitRun;
use capsule_daemon::{Client, Target};

use crate::peers::Peers;
use crate::service::{Place, p50_of, python_timing, sdk_command, sdk_script};
use crate::{Row, Settings, mib, ms, percentile, row};

/// The interpreter image's manifest, built if need be.
fn image(capsule: &Path) -> PathBuf {
    let output = Command::new(capsule).args(["python", "--image"]).output().expect("capsule starts");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    PathBuf::from(String::from_utf8_lossy(&output.stdout).trim())
}

pub fn measure(settings: &Settings, rows: &mut Vec<Row>, capsule: &Path, socket: &Path, peers: &Peers) {
    let image = image(capsule);
    let monty = |mode: &str| {
        peers.python().and_then(|mut python| {
            python.arg(sdk_script()).args([mode, "-", &settings.count(2_000).to_string()]);
            python_timing(python)
        })
    };
    let against_monty = |ours: Duration, monty: &Option<serde_json::Value>, what: &str| match monty.as_ref().map(p50_of)
    {
        Some(p50) => (format!("{} (pydantic-monty {what})", ms(p50)), Some(ours.as_secs_f64() / p50.as_secs_f64())),
        None => (peers.missing("pydantic-monty"), None),
    };

    // run_python("1 + 1") as an API client makes it.
    let request = SubmitRun {
        manifest: image,
        task: Some("run_python".into()),
        args: vec![serde_json::json!("1 + 1")],
        wait: true,
        stream: false,
        ..SubmitRun::default()
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let samples = runtime.block_on(async {
        let mut client = Client::connect(Target::Unix(socket.to_path_buf())).await.unwrap();
        let mut samples = Vec::new();
        for round in 0..settings.count(100) + settings.count(2_000) {
            let started = Instant::now();
            let finished = client.submit_and_wait(&request).await.expect("the daemon answers");
            assert_eq!(finished.outcome.result, serde_json::json!(2), "run_python failed");
            if round >= settings.count(100) {
                samples.push(started.elapsed());
            }
        }
        samples
    });
    let in_daemon = percentile(&samples, 0.5);
    let monty_run = monty("monty-python");
    let (baseline, ratio) = against_monty(in_daemon, &monty_run, "checkout and run");
    rows.push(row(
        "`run_python(\"1 + 1\")` through the daemon's API, warm, p50",
        ms(in_daemon),
        baseline,
        ratio,
        "<= 1 ms",
    ));

    let n = settings.count(1_000).to_string();
    let monty_session = monty("monty-session");
    for place in [Place::Here, Place::Daemon(socket)] {
        let sdk = |mode: &str, count: &str| python_timing(sdk_command(place, mode, Path::new("-"), count));
        if let Some(timing) = sdk("python", &n) {
            let (baseline, ratio) = against_monty(p50_of(&timing), &monty_run, "checkout and run");
            let target = if let Place::Here = place { "<= 1.0x" } else { "" };
            let what = format!("`capsule.run_python(\"1 + 1\")` from Python {}, warm, p50", place.says());
            rows.push(row(&what, ms(p50_of(&timing)), baseline, ratio, target));
        }
        if let Some(timing) = sdk("session", &n) {
            let (baseline, ratio) = against_monty(p50_of(&timing), &monty_session, "session call");
            let target = if let Place::Here = place { "<= 1.0x" } else { "" };
            let what = format!("`Session.run(\"x += 1\")` from Python {}, p50", place.says());
            rows.push(row(&what, ms(p50_of(&timing)), baseline, ratio, target));
        }
    }
    // The memory of a Python process that runs many code strings in itself.
    let many = if settings.quick { 200 } else { 100_000 };
    if let Some(rss) = python_timing(sdk_command(Place::Here, "rss", Path::new("-"), &many.to_string())) {
        let (start, end) = (rss["start"].as_u64().unwrap_or(0), rss["end"].as_u64().unwrap_or(0));
        rows.push(row(
            &format!("Python process RSS after {many} more `run_python` calls in process"),
            mib(end),
            format!("{} after 1,000", mib(start)),
            Some(end as f64 / start.max(1) as f64),
            "flat",
        ));
    }
    if let Some(saved) =
        python_timing(sdk_command(Place::Here, "save", Path::new("-"), &settings.count(10).to_string()))
    {
        let size = saved["bytes"].as_u64().unwrap_or(0);
        let of = |key: &str| Duration::from_secs_f64(saved[key].as_f64().unwrap_or(0.0) / 1e3);
        let what = format!("saved file {:.1} MiB (only what differs from the image)", size as f64 / (1 << 20) as f64);
        rows.push(row(
            "save a session (json, re, datetime imported; 10 MB of data), p50",
            ms(of("save_ms")),
            what,
            None,
            "<= 50 ms",
        ));
        rows.push(row(
            "restore it in a new session and call it, p50",
            ms(of("restore_ms")),
            String::new(),
            None,
            "<= 50 ms",
        ));
    }
}
