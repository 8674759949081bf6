//! A real `capsule run` is killed with SIGKILL in the middle of a workflow; `capsule resume`
//! finishes it without running again what had finished, and the journal is intact.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// Counts the hits on each path; `/block` does not answer while `blocking` is set.
struct Server {
    base: String,
    hits: Arc<Mutex<HashMap<String, u32>>>,
    blocking: Arc<AtomicBool>,
}

fn start_server() -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let hits: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let blocking = Arc::new(AtomicBool::new(true));
    let (shared_hits, shared_blocking) = (hits.clone(), blocking.clone());
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let (hits, blocking) = (shared_hits.clone(), shared_blocking.clone());
            thread::spawn(move || answer(stream, &hits, &blocking));
        }
    });
    Server { base, hits, blocking }
}

fn answer(stream: TcpStream, hits: &Mutex<HashMap<String, u32>>, blocking: &AtomicBool) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
    let mut length = 0;
    loop {
        let mut header = String::new();
        reader.read_line(&mut header).unwrap();
        if let Some(value) = header.to_ascii_lowercase().strip_prefix("content-length:") {
            length = value.trim().parse().unwrap();
        }
        if header == "\r\n" || header.is_empty() {
            break;
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).unwrap();
    let count = {
        let mut hits = hits.lock().unwrap();
        let count = hits.entry(path.clone()).or_insert(0);
        *count += 1;
        *count
    };
    if path == "/block" {
        let until = Instant::now() + Duration::from_secs(100);
        while blocking.load(Ordering::SeqCst) && Instant::now() < until {
            thread::sleep(Duration::from_millis(20));
        }
    }
    let text = format!("ok:{path}:{count}");
    let mut stream = stream;
    let _ = write!(stream, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}", text.len());
}

fn finished_fetches(journal: &std::path::Path) -> u32 {
    let Ok(db) = rusqlite::Connection::open_with_flags(journal, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY) else {
        return 0;
    };
    db.query_row("SELECT COUNT(*) FROM calls WHERE kind = 'task' AND name = 'fetch' AND status = 'ok'", [], |r| {
        r.get(0)
    })
    .unwrap_or(0)
}

#[test]
fn a_killed_run_resumes_without_redoing_finished_work() {
    let server = start_server();
    let project = tempfile::tempdir().unwrap();
    let root = project.path();
    std::fs::copy(fixtures::path("valid/crash.py"), root.join("crash.py")).unwrap();
    let journal = root.join(".capsule/journal.db");

    let mut child = Command::new(env!("CARGO_BIN_EXE_capsule"))
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
