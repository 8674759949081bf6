//! A real `capsule run` is killed with SIGKILL in the middle of a workflow; `capsule resume`
//! finishes it without running again what had finished, and the journal is intact.

mod support;

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{finished_fetches, start_server};

#[test]
fn a_killed_run_resumes_without_redoing_finished_work() {
    let server = start_server();
    let project = tempfile::tempdir().unwrap();
    let root = project.path();
    std::fs::copy(fixtures::path("valid/crash.py"), root.join("crash.py")).unwrap();
    let journal = root.join(".capsule/journal.db");

    let mut child = Command::new(env!("CARGO_BIN_EXE_capsule"))
        .env("CAPSULE_SOCKET", "/nonexistent/capsule.sock")
        .args(["run", "crash.py", &server.base])
        .current_dir(root)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait on the journal: three finished sub-tasks, and main blocked in its last call.
    let deadline = Instant::now() + Duration::from_secs(120);
    while !(finished_fetches(&journal) == 3 && server.hits.lock().unwrap().contains_key("/block")) {
        assert!(Instant::now() < deadline, "the workflow did not reach its blocking call");
        assert!(child.try_wait().unwrap().is_none(), "capsule run ended early");
        thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    let db = rusqlite::Connection::open(&journal).unwrap();
    let integrity: String = db.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
    assert_eq!(integrity, "ok");
    let run_id: String = db.query_row("SELECT id FROM runs", [], |r| r.get(0)).unwrap();
    drop(db);

    server.blocking.store(false, Ordering::SeqCst);
    let output = Command::new(env!("CARGO_BIN_EXE_capsule"))
        .env("CAPSULE_SOCKET", "/nonexistent/capsule.sock")
        .args(["resume", &run_id, "--json"])
        .current_dir(root)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let envelope: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        envelope["result"],
        json!(["ok:/hit/direct:1", ["ok:/hit/1:1", "ok:/hit/2:1", "ok:/hit/3:1"], "ok:/block:2"])
    );
    let hits = server.hits.lock().unwrap().clone();
    let expected: HashMap<String, u32> =
        [("/hit/direct", 1), ("/hit/1", 1), ("/hit/2", 1), ("/hit/3", 1), ("/block", 2)]
            .into_iter()
            .map(|(path, count)| (path.to_string(), count))
            .collect();
    assert_eq!(hits, expected, "finished calls must not run again; the unfinished one runs once more");

    // The journal agrees: each sub-task ran exactly one attempt, across both processes.
    let db = rusqlite::Connection::open(&journal).unwrap();
    let attempts: Vec<u32> = db
        .prepare("SELECT (SELECT COUNT(*) FROM attempts WHERE call_id = calls.id) FROM calls WHERE name = 'fetch' ORDER BY seq")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(attempts, [1, 1, 1]);
}
