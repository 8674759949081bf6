//! The daemon as a service: a whole `capsule run` process through it against the reference
//! implementation's, the API's own cost per run, runs per second, and its memory over many runs.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use capsule_daemon::api::SubmitRun;
use capsule_daemon::{Client, Target};

use crate::peers::Peers;
use crate::{Row, Settings, bench_dir, mib, ms, percentile, row, time_process};

struct Daemon {
    child: Child,
    socket: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_daemon(capsule: &Path) -> Daemon {
    let dir = bench_dir().join("daemon");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("d.sock");
    let child = Command::new(capsule)
        .arg("daemon")
        .arg("--socket")
        .arg(&socket)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--no-resume")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("the daemon starts");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(Instant::now() < deadline, "the daemon did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    Daemon { child, socket }
}

fn rss_of(pid: u32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("Linux /proc");
    let line = text.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS");
    line.split_whitespace().nth(1).and_then(|kb| kb.parse::<u64>().ok()).expect("kB") * 1024
}

/// One run as an API client makes it (the Python SDK's way): submit and wait for the outcome.
async fn one_run(client: &mut Client, request: &SubmitRun) {
    let finished = client.submit_and_wait(request).await.expect("the daemon answers");
    assert!(finished.outcome.success, "hello failed in the daemon");
}

/// What `bench/sdk.py` printed.
pub fn python_timing(mut command: Command) -> Option<serde_json::Value> {
    let output = command.output().expect("python starts");
    if !output.status.success() {
        eprintln!("bench: {command:?} failed: {}", String::from_utf8_lossy(&output.stderr));
        return None;
    }
    serde_json::from_slice(&output.stdout).ok()
}

pub fn sdk_script() -> PathBuf {
    crate::bench_sources().join("sdk.py")
}

/// Where the SDK's calls go.
#[derive(Clone, Copy)]
pub enum Place<'a> {
    /// The engine in the Python process (the package's functions).
    Here,
    /// The daemon on this socket (`capsule.connect`).
    Daemon(&'a Path),
}

impl Place<'_> {
    pub fn says(self) -> &'static str {
        match self {
            Self::Here => "in process",
            Self::Daemon(_) => "through the daemon",
        }
    }
}

/// This checkout's SDK as a package: its Python files and the native module this bench was
/// built beside (`lib_native.so`, built by `cargo xtask bench`), staged once.
fn sdk_package() -> &'static Path {
    static STAGED: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    STAGED.get_or_init(|| {
        let root = bench_dir().join("sdk");
        let package = root.join("capsule");
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&package).unwrap();
        let source = crate::workspace().join("crates/python-runtime/python/capsule");
        for entry in std::fs::read_dir(&source).unwrap() {
            let path = entry.unwrap().path();
            if path.is_file() {
                std::fs::copy(&path, package.join(path.file_name().unwrap())).unwrap();
            }
        }
        let native = std::env::current_exe().expect("own path").with_file_name("lib_native.so");
        std::fs::copy(&native, package.join("_native.abi3.so"))
            .unwrap_or_else(|e| panic!("{}: {e} (`cargo build -p capsule-python` makes it)", native.display()));
        root
    })
}

/// `bench/sdk.py MODE FILE COUNT` with this checkout's SDK, its calls going to `place`.
pub fn sdk_command(place: Place<'_>, mode: &str, file: &Path, count: &str) -> Command {
    let mut command = Command::new("python3");
    command.arg(sdk_script()).arg(mode).arg(file).arg(count).env("PYTHONPATH", sdk_package());
    if let Place::Daemon(socket) = place {
        command.env("CAPSULE_BENCH_DAEMON", socket);
    }
    command
}

/// The p50 `bench/sdk.py` printed.
pub fn p50_of(timing: &serde_json::Value) -> Duration {
    Duration::from_secs_f64(timing["p50_ms"].as_f64().unwrap_or(0.0) / 1e3)
}

/// `capsule.run("hello.py")` from a Python process, in process and through the daemon,
/// against the reference implementation's `run()` and pydantic-monty's checkout-and-run; and
/// many `run_async` at once.
fn sdk(
    settings: &Settings,
    rows: &mut Vec<Row>,
    socket: &Path,
    project: &Path,
    reference_project: &Path,
    peers: &Peers,
) {
    let script = sdk_script();
    let n = settings.count(1_000).to_string();
    let reference = peers.python().and_then(|mut python| {
        python
            .arg(&script)
            .args(["reference", reference_project.join("hello.py").to_str().unwrap(), &settings.count(200).to_string()])
            .current_dir(reference_project);
        python_timing(peers.in_venv(python))
    });
    let monty = peers.python().and_then(|mut python| {
        python.arg(&script).args(["monty", "-", &n]);
        python_timing(python)
    });
    for place in [Place::Here, Place::Daemon(socket)] {
        let ours = |mode: &str, count: &str| python_timing(sdk_command(place, mode, &project.join("hello.py"), count));
        let Some(ours_p50) = ours("capsule", &n).as_ref().map(p50_of) else { return };
        let (baseline, ratio) = match reference.as_ref().map(p50_of) {
            Some(p50) => (
                format!("{} (reference `await capsule.run()`)", ms(p50)),
                Some(ours_p50.as_secs_f64() / p50.as_secs_f64()),
            ),
            None => (peers.missing("capsule-run"), None),
        };
        let target = if let Place::Here = place { "<= 0.1x" } else { "" };
        let what = format!("`capsule.run(\"hello.py\")` from Python {}, warm, p50", place.says());
        rows.push(row(&what, ms(ours_p50), baseline, ratio, target));
        let (baseline, ratio) = match monty.as_ref().map(p50_of) {
            Some(p50) => (
                format!("{} (pydantic-monty checkout and run)", ms(p50)),
                Some(ours_p50.as_secs_f64() / p50.as_secs_f64()),
            ),
            None => (peers.missing("pydantic-monty"), None),
        };
        let what = format!("`capsule.run(\"hello.py\")` {} against a small interpreter's pool", place.says());
        rows.push(row(&what, ms(ours_p50), baseline, ratio, ""));
        let many = settings.count(1_000);
        if let Some(done) = ours("async", &many.to_string()) {
            rows.push(row(
                &format!("{many} concurrent `run_async` calls {}", place.says()),
                format!(
                    "{} of {many} completed in {:.2} s",
                    done["completed"],
                    done["seconds"].as_f64().unwrap_or(0.0)
                ),
                String::new(),
                None,
                "all complete",
            ));
        }
    }
}

/// `project` holds `hello.py`, built; `invoke_p50` is the in-process invoke of the same task.
pub fn measure(
    settings: &Settings,
    rows: &mut Vec<Row>,
    capsule: &Path,
    project: &Path,
    manifest: &Path,
    invoke_p50: Duration,
    peers: &Peers,
) {
    let daemon = start_daemon(capsule);

    // A whole `capsule run hello.py` process, through the warm daemon.
    let mut ours = Command::new(capsule);
    ours.args(["run", "hello.py"]).current_dir(project).env("CAPSULE_SOCKET", &daemon.socket);
    let ours_time = time_process(ours, settings.count(20));
    let reference_project = bench_dir().join("reference");
    let _ = std::fs::remove_dir_all(&reference_project);
    std::fs::create_dir_all(&reference_project).unwrap();
    std::fs::copy(project.join("hello.py"), reference_project.join("hello.py")).unwrap();
    let (baseline, ratio) = match peers.reference_cli(&reference_project) {
        Some(mut reference) => {
            reference.args(["run", "hello.py"]);
            let reference_time = time_process(reference, settings.count(20));
            (
                format!("{} (reference `capsule run hello.py`, warm)", ms(reference_time)),
                Some(ours_time.as_secs_f64() / reference_time.as_secs_f64()),
            )
        }
        None => (peers.missing("capsule-run"), None),
    };
    rows.push(row("whole `capsule run hello.py` process, warm daemon", ms(ours_time), baseline, ratio, "<= 0.5x"));

    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let request =
        SubmitRun { manifest: manifest.to_path_buf(), project: Some(project.to_path_buf()), ..SubmitRun::default() };

    // The API's own cost: a hello run from a client process, minus the invoke itself.
    let samples = runtime.block_on(async {
        let mut client = Client::connect(Target::Unix(daemon.socket.clone())).await.unwrap();
        for _ in 0..settings.count(100) {
            one_run(&mut client, &request).await;
        }
        let mut samples = Vec::new();
        for _ in 0..settings.count(2_000) {
            let started = Instant::now();
            one_run(&mut client, &request).await;
            samples.push(started.elapsed());
        }
        samples
    });
    let api_p50 = percentile(&samples, 0.5);
    let on_top = api_p50.saturating_sub(invoke_p50);
    rows.push(row(
        "hello run through the API (keep-alive), p50",
        ms(api_p50),
        format!("{} (in-process invoke)", ms(invoke_p50)),
        Some(api_p50.as_secs_f64() / invoke_p50.as_secs_f64()),
        "",
    ));
    rows.push(row("API round trip on top of the invoke, p50", ms(on_top), ms(invoke_p50), None, "<= 0.5 ms"));

    // Runs per second through the API, several keep-alive connections.
    let window = if settings.quick { Duration::from_millis(300) } else { Duration::from_secs(3) };
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    runtime.block_on(async {
        let mut clients = Vec::new();
        for _ in 0..8 {
            let (socket, request, done) = (daemon.socket.clone(), request.clone(), done.clone());
            clients.push(tokio::spawn(async move {
                let mut client = Client::connect(Target::Unix(socket)).await.unwrap();
                while started.elapsed() < window {
                    one_run(&mut client, &request).await;
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        for client in clients {
            client.await.unwrap();
        }
    });
    let rate = done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    rows.push(row(
        &format!("hello runs/s through the API on {cores} cores (8 connections)"),
        format!("{rate:.0}/s"),
        String::new(),
        None,
        ">= 3,000/s",
    ));

    sdk(settings, rows, &daemon.socket, project, &reference_project, peers);
    crate::sessions::measure(settings, rows, capsule, &daemon.socket, peers);

    // The daemon's memory over many runs.
    let (warm_up, many) = if settings.quick { (50, 200) } else { (10_000, 100_000) };
    let run_many = |count: u64| {
        runtime.block_on(async {
            let left = Arc::new(AtomicU64::new(count));
            let mut clients = Vec::new();
            for _ in 0..4 {
                let (socket, request, left) = (daemon.socket.clone(), request.clone(), left.clone());
                clients.push(tokio::spawn(async move {
                    let mut client = Client::connect(Target::Unix(socket)).await.unwrap();
                    while left.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() {
                        one_run(&mut client, &request).await;
                    }
                }));
            }
            for client in clients {
                client.await.unwrap();
            }
        })
    };
    run_many(warm_up);
    let rss_start = rss_of(daemon.child.id());
    run_many(many);
    let rss_end = rss_of(daemon.child.id());
    rows.push(row(
        &format!("daemon RSS after {many} more runs"),
        mib(rss_end),
        format!("{} after {warm_up}", mib(rss_start)),
        Some(rss_end as f64 / rss_start as f64),
        "flat",
    ));
}
