//! The cluster (NATS JetStream): a fan-out of trivial sub-tasks through a daemon with
//! `--nats` and 1, 2 and 3 local `capsule worker`s, against the same fan-out in process.
//! Every worker shares this machine's cores, so the figure is the overhead per call, not a
//! speed-up.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use capsule_daemon::api::SubmitRun;
use capsule_daemon::{Client, Target};
use serde_json::json;

use crate::{Row, Settings, bench_dir, ms, row, workspace};

/// Killed when dropped.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(command: &mut Command) -> Process {
    Process(command.stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("it starts"))
}

fn wait_until(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ready() {
        assert!(Instant::now() < deadline, "{what} did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn nats_server() -> Option<PathBuf> {
    let path = workspace().join("target/nats-server");
    path.exists().then_some(path)
}

/// Calls of the fan-out, and how many times each setting is run (median taken).
fn sizes(settings: &Settings) -> (u64, usize) {
    if settings.quick { (20, 1) } else { (200, 5) }
}

/// The fan-out's wall time in process (the engine's own pool of sandboxes).
fn in_process(manifest: &Path, calls: u64, repeats: usize) -> Duration {
    let engine = tests::engine();
    let loaded = engine.load(manifest).expect("the fan-out loads");
    let samples: Vec<Duration> = (0..repeats)
        .map(|_| {
            let started = Instant::now();
            let request = tests::quiet_run("main", vec![json!(calls)]);
            let outcome = tests::block_on(async { engine.prepare(&loaded, request).expect("it starts").run().await });
            assert!(outcome.success, "the fan-out failed: {:?}", outcome.error);
            started.elapsed()
        })
        .collect();
    crate::median(samples)
}

pub fn measure(settings: &Settings, rows: &mut Vec<Row>, capsule: &Path, project: &Path, manifest: &Path) {
    let measure = "fan-out over the cluster (NATS JetStream), per call";
    let Some(server) = nats_server() else {
        rows.push(row(
            measure,
            "skipped".into(),
            "no target/nats-server: run `cargo xtask nats-server`".into(),
            None,
            "",
        ));
        return;
    };
    let (calls, repeats) = sizes(settings);
    let here = in_process(manifest, calls, repeats);
    let per_call_here = here / calls as u32;
    for workers in 1..=3 {
        let dir = bench_dir().join("cluster");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let url = format!("nats://127.0.0.1:{port}");
        let _nats = spawn(
            Command::new(&server).args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"]).arg(dir.join("js")),
        );
        wait_until("nats-server", || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
        // Two calls at once per worker, as many as this machine has cores.
        let _workers: Vec<Process> = (0..workers)
            .map(|n| {
                spawn(
                    Command::new(capsule)
                        .args([
                            "worker",
                            "--nats",
                            &url,
                            "--allow-unsigned",
                            "--workers",
                            "2",
                            "--name",
                            &format!("bench-{n}"),
                        ])
                        .arg("--project-root")
                        .arg(project)
                        .env("CAPSULE_CACHE_DIR", dir.join(format!("worker-{n}"))),
                )
            })
            .collect();
        let socket = dir.join("d.sock");
        let _daemon = spawn(
            Command::new(capsule)
                .args(["daemon", "--no-resume", "--nats", &url, "--allow-unsigned", "--socket"])
                .arg(&socket)
                .arg("--state-dir")
                .arg(dir.join("state")),
        );
        wait_until("the daemon", || std::os::unix::net::UnixStream::connect(&socket).is_ok());
        let request = SubmitRun {
            manifest: manifest.to_path_buf(),
            project: Some(project.to_path_buf()),
            args: vec![json!(calls)],
            ..SubmitRun::default()
        };
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let samples = runtime.block_on(async {
            let mut client = Client::connect(Target::Unix(socket.clone())).await.unwrap();
            // The first run uploads the artifact and each worker fetches it.
            let warm = client.submit_and_wait(&request).await.expect("the daemon answers");
            assert!(warm.outcome.success, "the fan-out failed on the cluster: {:?}", warm.outcome.error);
            let mut samples = Vec::new();
            for _ in 0..repeats {
                let started = Instant::now();
                let finished = client.submit_and_wait(&request).await.expect("the daemon answers");
                assert!(finished.outcome.success, "the fan-out failed on the cluster");
                samples.push(started.elapsed());
            }
            samples
        });
        let total = crate::median(samples);
        let per_call = total / calls as u32;
        rows.push(row(
            &format!("{measure}: {calls} calls, {workers} local worker(s) x 2 slots"),
            format!("{} ({} in all)", ms(per_call), ms(total)),
            format!("{} (in process, {} in all)", ms(per_call_here), ms(here)),
            Some(per_call.as_secs_f64() / per_call_here.as_secs_f64()),
            "",
        ));
    }
}
