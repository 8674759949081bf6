// Each test file uses a part of this module.
#![allow(dead_code)]

//! What the tests of the real binaries share: a local HTTP server that counts hits, the
//! journal's view of a run, and a daemon on a temporary socket.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// Counts the hits on each path; `/block` does not answer while `blocking` is set.
pub struct Server {
    pub base: String,
    pub hits: Arc<Mutex<HashMap<String, u32>>>,
    pub blocking: Arc<AtomicBool>,
}

pub fn start_server() -> Server {
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

pub fn finished_fetches(journal: &std::path::Path) -> u32 {
    let Ok(db) = rusqlite::Connection::open_with_flags(journal, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY) else {
        return 0;
    };
    db.query_row("SELECT COUNT(*) FROM calls WHERE kind = 'task' AND name = 'fetch' AND status = 'ok'", [], |r| {
        r.get(0)
    })
    .unwrap_or(0)
}

/// A `capsule daemon` on a socket of its own, killed when dropped.
pub struct Daemon {
    pub child: Child,
    pub socket: PathBuf,
    pub state: PathBuf,
    _dir: tempfile::TempDir,
}

impl Daemon {
    pub fn start(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (socket, state) = (dir.path().join("d.sock"), dir.path().join("state"));
        let child = Self::spawn(&socket, &state, extra);
        Self { child, socket, state, _dir: dir }
    }

    fn spawn(socket: &Path, state: &Path, extra: &[&str]) -> Child {
        let child = Command::new(env!("CARGO_BIN_EXE_capsule"))
            .arg("daemon")
            .arg("--socket")
            .arg(socket)
            .arg("--state-dir")
            .arg(state)
            .args(extra)
            // Saved sessions stay with the test's daemon.
            .env("XDG_DATA_HOME", state.with_file_name("data"))
            .stdout(Stdio::null())
            .stderr(log_to(&state.with_file_name("daemon.log")))
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(socket).is_err() {
            assert!(Instant::now() < deadline, "the daemon did not start");
            thread::sleep(Duration::from_millis(20));
        }
        child
    }

    /// Kills this daemon (SIGKILL) and starts another on the same socket and state.
    pub fn kill_and_restart(&mut self, extra: &[&str]) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        self.child = Self::spawn(&self.socket, &self.state, extra);
    }

    /// `capsule` talking to this daemon.
    pub fn capsule(&self) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_capsule"));
        command.env("CAPSULE_SOCKET", &self.socket);
        command
    }

    /// A JSON request (`body` empty for none): (status, the answer's JSON, or null).
    pub fn json(&self, method: &str, route: &str, body: &str) -> (u16, serde_json::Value) {
        let (status, answer) = self.http(&format!(
            "{method} {route} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ));
        (status, serde_json::from_str(&answer).unwrap_or(serde_json::Value::Null))
    }

    /// One HTTP/1.1 request over the socket, written by hand: (status, body).
    pub fn http(&self, request: &str) -> (u16, String) {
        let mut stream = std::os::unix::net::UnixStream::connect(&self.socket).unwrap();
        // The daemon may answer (and close) before reading all of a body it refuses.
        let _ = stream.write_all(request.as_bytes());
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        let answer = String::from_utf8_lossy(&answer);
        let status = answer.split_whitespace().nth(1).unwrap_or("0").parse().unwrap();
        let body = answer.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
        (status, body)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        show_if_failing("the daemon", &self.state.with_file_name("daemon.log"));
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A file for a child's stderr (added to by a restarted child), shown by `show_if_failing`.
fn log_to(path: &Path) -> Stdio {
    std::fs::OpenOptions::new().create(true).append(true).open(path).unwrap().into()
}

/// When the test is failing, the end of a child's stderr: the other half of the story.
fn show_if_failing(whose: &str, log: &Path) {
    if !thread::panicking() {
        return;
    }
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    eprintln!("--- the last lines {whose} wrote ---");
    for line in &lines[lines.len().saturating_sub(60)..] {
        eprintln!("{line}");
    }
}

/// Waits for `child` (stdout and stderr piped) at most `limit`, so a test that would hang
/// fails instead, with what the child wrote so far.
pub fn output_within(mut child: Child, limit: Duration) -> std::process::Output {
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut bytes);
            }
            bytes
        })
    };
    let stdout = drain(child.stdout.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let stderr = drain(child.stderr.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let (stdout, stderr) = (stdout.join().unwrap(), stderr.join().unwrap());
            panic!(
                "still running after {limit:?}\n{}\n{}",
                String::from_utf8_lossy(&stdout),
                String::from_utf8_lossy(&stderr)
            );
        }
        thread::sleep(Duration::from_millis(50));
    };
    std::process::Output { status, stdout: stdout.join().unwrap(), stderr: stderr.join().unwrap() }
}

/// Runs `command`: (exit code, stdout, stderr).
pub fn run(command: &mut Command) -> (i32, String, String) {
    let output = command.output().expect("the binary starts");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// A `nats-server -js` on a free loopback port with its storage in a temporary folder (the
/// pinned one `cargo xtask nats-server` unpacks), killed when dropped.
pub struct Nats {
    child: Child,
    pub url: String,
    port: u16,
    _dir: tempfile::TempDir,
}

/// The users of `examples/cluster/users.conf`, with the passwords the tests give them.
pub const SUBMITTER: (&str, &str) = ("submitter", "submitter-password-for-tests");
pub const WORKER: (&str, &str) = ("worker", "worker-password-for-tests");

impl Nats {
    /// A server anyone on loopback may use.
    pub fn start() -> Self {
        Self::spawn(false)
    }

    /// A server configured with the users of `examples/cluster/users.conf`.
    pub fn start_with_users() -> Self {
        Self::spawn(true)
    }

    fn spawn(users: bool) -> Self {
        let binary = std::env::var_os("CAPSULE_NATS_SERVER")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/nats-server"));
        assert!(binary.exists(), "no nats-server at {}: run `cargo xtask nats-server`", binary.display());
        let dir = tempfile::tempdir().unwrap();
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut command = Command::new(&binary);
        if users {
            let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/cluster");
            std::fs::copy(examples.join("users.conf"), dir.path().join("users.conf")).unwrap();
            let config = format!(
                "listen: \"127.0.0.1:{port}\"\njetstream {{ store_dir: \"{}\" }}\ninclude users.conf\n",
                dir.path().join("store").display()
            );
            std::fs::write(dir.path().join("nats.conf"), config).unwrap();
            command
                .arg("-c")
                .arg(dir.path().join("nats.conf"))
                .env("CAPSULE_SUBMITTER_PASSWORD", SUBMITTER.1)
                .env("CAPSULE_WORKER_PASSWORD", WORKER.1);
        } else {
            command.args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"]).arg(dir.path());
        }
        let child = command.stdout(Stdio::null()).stderr(log_to(&dir.path().join("nats.log"))).spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "nats-server did not start: {}",
                std::fs::read_to_string(dir.path().join("nats.log")).unwrap_or_default()
            );
            thread::sleep(Duration::from_millis(20));
        }
        Self { child, url: format!("nats://127.0.0.1:{port}"), port, _dir: dir }
    }

    /// The server's URL with a user and password in it.
    pub fn url_as(&self, (user, password): (&str, &str)) -> String {
        format!("nats://{user}:{password}@127.0.0.1:{}", self.port)
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `capsule worker` with a cache of its own (so it fetches every artifact), killed when
/// dropped.
pub struct Worker {
    pub child: Child,
    pub cache: tempfile::TempDir,
    name: String,
}

impl Worker {
    /// A worker that runs unsigned work too.
    pub fn start(nats: &Nats, name: &str, slots: usize, project_root: &Path) -> Self {
        Self::start_with(&nats.url, name, slots, project_root, &["--allow-unsigned"])
    }

    /// A worker on the NATS server at `url`, with `extra` arguments.
    pub fn start_with(url: &str, name: &str, slots: usize, project_root: &Path, extra: &[&str]) -> Self {
        let cache = tempfile::tempdir().unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_capsule"))
            .args(["worker", "--nats", url, "--name", name, "--workers", &slots.to_string()])
            .args(extra)
            .args(["--ack-wait", "2s", "--project-root"])
            .arg(project_root)
            .env("CAPSULE_CACHE_DIR", cache.path())
            .env("CAPSULE_LOG", "info,capsule_cluster=debug")
            .stdout(Stdio::null())
            .stderr(log_to(&cache.path().join("worker.log")))
            .spawn()
            .unwrap();
        Self { child, cache, name: name.to_string() }
    }

    /// SIGKILL: no chance to finish or acknowledge anything.
    pub fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if thread::panicking() {
            let status = self.child.try_wait().ok().flatten();
            eprintln!("worker `{}`: {}", self.name, status.map_or("still running".into(), |s| format!("exited, {s}")));
        }
        show_if_failing(&format!("worker `{}`", self.name), &self.cache.path().join("worker.log"));
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
