//! `cargo xtask bench`: Capsule against native `python3` on the same machine, in one run.
//!
//! Every figure is shown with its baseline and the ratio; absolute times are for reading,
//! never asserted. `--quick` runs each measurement once (CI's smoke run); `--write FILE`
//! writes the Markdown report.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

mod cluster;
mod data;
mod peers;
mod service;
mod sessions;

use capsule_exec::{Engine, Loaded, RunRequest};
use serde_json::{Value, json};
use tests::{block_on, build_into, engine, load, quiet_run};

struct Settings {
    quick: bool,
    write: Option<PathBuf>,
    /// The bench's virtual environment with the peers (`cargo xtask bench` makes it).
    venv: Option<PathBuf>,
    /// Measure the daemon only (while working on it; the report is then partial).
    only_service: bool,
}

impl Settings {
    fn count(&self, full: usize) -> usize {
        if self.quick { 1 } else { full }
    }
}

/// One line of the report.
struct Row {
    measure: String,
    capsule: String,
    baseline: String,
    ratio: String,
    target: String,
}

fn row(measure: &str, capsule: String, baseline: String, ratio: Option<f64>, target: &str) -> Row {
    Row {
        measure: measure.into(),
        capsule,
        baseline,
        ratio: ratio.map_or_else(|| "n/a".into(), |r| format!("{r:.2}x")),
        target: target.into(),
    }
}

fn ms(duration: Duration) -> String {
    format!("{:.3} ms", duration.as_secs_f64() * 1e3)
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn percentile(samples: &[Duration], p: f64) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// A binary built beside this one (the same profile).
fn sibling(name: &str) -> PathBuf {
    std::env::current_exe().expect("own path").with_file_name(name)
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("workspace")
}

/// `crates/tests/bench`: the benchmark's Python.
fn bench_sources() -> PathBuf {
    workspace().join("crates/tests/bench")
}

fn bench_dir() -> PathBuf {
    workspace().join("target/bench")
}

fn python3(args: &[&str]) -> Command {
    let mut command = Command::new("python3");
    command.args(args).env("PYTHONPATH", workspace().join("crates/python-runtime/python"));
    command
}

/// The median wall time of `runs` runs of `command`, after one run not counted.
fn time_process(mut command: Command, runs: usize) -> Duration {
    let warm_up = command.output().expect("process starts");
    assert!(warm_up.status.success(), "{:?} failed: {}", command, String::from_utf8_lossy(&warm_up.stderr));
    let mut samples = Vec::new();
    for _ in 0..runs {
        let started = Instant::now();
        let output = command.output().expect("process starts");
        samples.push(started.elapsed());
        assert!(output.status.success(), "{:?} failed: {}", command, String::from_utf8_lossy(&output.stderr));
    }
    median(samples)
}

async fn run(engine: &Engine, loaded: &Arc<Loaded>, request: RunRequest) -> capsule_exec::Outcome {
    engine.prepare(loaded, request).expect("the run starts").run().await
}

async fn invoke_once(loaded: &Arc<Loaded>) -> Duration {
    invoke_task(loaded, "main").await
}

async fn invoke_task(loaded: &Arc<Loaded>, task: &str) -> Duration {
    let started = Instant::now();
    let outcome = run(engine(), loaded, quiet_run(task, vec![])).await;
    assert!(outcome.success, "{:?}", outcome.error);
    started.elapsed()
}

fn rss_bytes() -> u64 {
    proc_field("/proc/self/status", "VmRSS:")
}

fn private_bytes() -> u64 {
    proc_field("/proc/self/smaps_rollup", "Private_Clean:") + proc_field("/proc/self/smaps_rollup", "Private_Dirty:")
}

fn proc_field(file: &str, field: &str) -> u64 {
    let text = std::fs::read_to_string(file).expect("Linux /proc");
    let line = text.lines().find(|l| l.starts_with(field)).expect("field present");
    line.split_whitespace().nth(1).and_then(|kb| kb.parse::<u64>().ok()).expect("kB") * 1024
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
}

/// Child process: hold `count` idle sandboxes of `manifest`; print bytes per sandbox.
fn idle_sandboxes(manifest: &Path, count: usize) {
    let engine = Engine::new().expect("engine");
    let loaded = engine.load(manifest).expect("artifact loads");
    let first = block_on(loaded.instantiate_idle()).expect("instance");
    let (private_before, rss_before) = (private_bytes(), rss_bytes());
    let held = block_on(async {
        let mut held = vec![first];
        for _ in 1..count {
            held.push(loaded.instantiate_idle().await.expect("instance"));
        }
        held
    });
    let others = (held.len() - 1) as u64;
    println!(
        "{} {}",
        private_bytes().saturating_sub(private_before) / others,
        rss_bytes().saturating_sub(rss_before) / others
    );
}

fn main() {
    let mut args = std::env::args().skip(1);
    if std::env::args().nth(1).as_deref() == Some("--idle-sandboxes") {
        let manifest = PathBuf::from(std::env::args().nth(2).expect("manifest"));
        idle_sandboxes(&manifest, std::env::args().nth(3).and_then(|n| n.parse().ok()).expect("count"));
        return;
    }
    let mut settings = Settings { quick: false, write: None, venv: None, only_service: false };
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quick" => settings.quick = true,
            "--write" => settings.write = Some(PathBuf::from(args.next().expect("--write FILE"))),
            "--venv" => settings.venv = Some(PathBuf::from(args.next().expect("--venv DIR"))),
            "--only-service" => settings.only_service = true,
            other => panic!("unknown argument {other}; use --quick, --write FILE, --venv DIR, --only-service"),
        }
    }
    let peers = peers::Peers::new(settings.venv.clone());
    // Start from empty build caches, so that the cold build is really cold.
    let cache = bench_dir().join("cache");
    let _ = std::fs::remove_dir_all(&cache);
    // SAFETY: no other thread runs yet.
    unsafe { std::env::set_var(capsule_build::CACHE_DIR_ENV, &cache) };
    let mut rows = Vec::new();
    let hello_py = bench_sources().join("hello.py");
    if settings.only_service {
        let project = bench_dir().join("service-project");
        std::fs::create_dir_all(&project).unwrap();
        std::fs::copy(&hello_py, project.join("hello.py")).unwrap();
        let built = load(build_into(&project.join("hello.py"), &project.join("out"), false));
        let samples = block_on(async {
            let mut samples = Vec::new();
            for _ in 0..500 {
                samples.push(invoke_once(&built.loaded).await);
            }
            samples
        });
        let manifest = project.join("out/manifest.toml");
        service::measure(
            &settings,
            &mut rows,
            &sibling("capsule"),
            &project,
            &manifest,
            percentile(&samples, 0.5),
            &peers,
        );
        println!("{}", render(&rows, &settings));
        return;
    }
    let python_hello = time_process(python3(&[hello_py.to_str().unwrap()]), settings.count(20));

    // Builds: cold (nothing cached but the runtime), after an edit, unchanged.
    let project = bench_dir().join("project");
    let _ = std::fs::remove_dir_all(&project);
    std::fs::create_dir_all(&project).unwrap();
    let entry = project.join("hello.py");
    let source = std::fs::read_to_string(&hello_py).unwrap();
    std::fs::write(&entry, &source).unwrap();
    let out = project.join("out");
    let started = Instant::now();
    let cold = build_into(&entry, &out, true);
    let cold_time = started.elapsed();
    std::fs::write(&entry, source.replace("hello {name}", "hi {name}")).unwrap();
    let started = Instant::now();
    let edited = build_into(&entry, &out, false);
    let edit_time = started.elapsed();
    assert!(!edited.cache_hit);
    let mut hits = Vec::new();
    for _ in 0..settings.count(10) {
        let started = Instant::now();
        assert!(build_into(&entry, &out, false).cache_hit);
        hits.push(started.elapsed());
    }
    let hit_time = median(hits);
    rows.push(row(
        "`capsule build`, cold (runtime built, empty caches)",
        ms(cold_time),
        ms(python_hello),
        Some(cold_time.as_secs_f64() / python_hello.as_secs_f64()),
        "<= 5 s",
    ));
    rows.push(row(
        "`capsule build` after editing the task body (warm caches)",
        ms(edit_time),
        ms(cold_time),
        Some(edit_time.as_secs_f64() / cold_time.as_secs_f64()),
        "<= 1 s",
    ));
    rows.push(row(
        "`capsule build`, unchanged (cache hit)",
        ms(hit_time),
        ms(python_hello),
        Some(hit_time.as_secs_f64() / python_hello.as_secs_f64()),
        "<= 50 ms",
    ));
    let snapshot_bytes = cold.manifest.artifact.initial_memory_bytes;

    let built = load(edited);

    // 1. In-process invocation latency.
    let samples: Vec<Duration> = block_on(async {
        for _ in 0..settings.count(50) {
            invoke_once(&built.loaded).await;
        }
        let mut samples = Vec::new();
        for _ in 0..settings.count(2000) {
            samples.push(invoke_once(&built.loaded).await);
        }
        samples
    });
    let p50 = percentile(&samples, 0.5);
    let p99 = percentile(&samples, 0.99);
    rows.push(row(
        "in-process invoke of hello, p50",
        ms(p50),
        format!("{} (`python3 hello.py`)", ms(python_hello)),
        Some(p50.as_secs_f64() / python_hello.as_secs_f64()),
        "<= 0.2 ms",
    ));
    rows.push(row(
        "in-process invoke of hello, p99",
        ms(p99),
        ms(python_hello),
        Some(p99.as_secs_f64() / python_hello.as_secs_f64()),
        "",
    ));

    // The daemon: whole processes through it, the API's cost, its throughput and memory.
    service::measure(&settings, &mut rows, &sibling("capsule"), &project, &out.join("manifest.toml"), p50, &peers);

    // The cluster: what the queue adds to each call of a fan-out.
    let fanout = bench_dir().join("fanout-project");
    std::fs::create_dir_all(&fanout).unwrap();
    std::fs::copy(bench_sources().join("fanout.py"), fanout.join("main.py")).unwrap();
    let fanout_manifest = build_into(&fanout.join("main.py"), &fanout.join("out"), false).manifest_path;
    cluster::measure(&settings, &mut rows, &sibling("capsule"), &fanout, &fanout_manifest);

    // 2. Sustained invocations per second on all cores.
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let window = if settings.quick { Duration::from_millis(200) } else { Duration::from_secs(3) };
    let rate = throughput(built.loaded.clone(), cores, window);
    rows.push(row(
        &format!("sustained invocations/s on {cores} cores"),
        format!("{rate:.0}/s"),
        format!("{:.1}/s (`python3 hello.py` processes)", cores as f64 / python_hello.as_secs_f64()),
        Some(rate / (cores as f64 / python_hello.as_secs_f64())),
        ">= 6,000/s",
    ));

    // 3. The runner as a process (in-process: no daemon answers on its socket), against the
    // reference implementation's runner of its own build of the same file.
    let no_daemon = bench_dir().join("no-daemon.sock");
    let mut exec = Command::new(sibling("capsule-exec"));
    exec.arg(out.join("manifest.toml")).env("CAPSULE_SOCKET", &no_daemon);
    let exec_time = time_process(exec, settings.count(20));
    let reference_project = bench_dir().join("reference-exec");
    std::fs::create_dir_all(&reference_project).unwrap();
    std::fs::copy(&hello_py, reference_project.join("hello.py")).unwrap();
    let reference = peers.reference_artifact(&reference_project).and_then(|artifact| {
        let mut command = peers.reference_cli(&reference_project)?;
        command.arg("exec").arg(artifact);
        Some(time_process(command, settings.count(20)))
    });
    let (baseline, ratio) = match reference {
        Some(time) => (
            format!("{} (reference `capsule exec hello.wasm`)", ms(time)),
            Some(exec_time.as_secs_f64() / time.as_secs_f64()),
        ),
        None => (peers.missing("capsule-run"), None),
    };
    rows.push(row("`capsule-exec manifest.toml` process, no daemon", ms(exec_time), baseline, ratio, "<= 0.5x"));
    rows.push(row(
        "`capsule-exec manifest.toml` process against `python3 hello.py`",
        ms(exec_time),
        ms(python_hello),
        Some(exec_time.as_secs_f64() / python_hello.as_secs_f64()),
        "",
    ));

    // 5. CPU-bound kernels, natively and in Capsule with either metering, in interleaved
    // rounds: each side keeps its best time per kernel, so that a slow spell of a shared
    // machine during one side's turn does not decide the ratio.
    let kernels_py = bench_sources().join("kernels.py");
    let (repeat, rounds) = if settings.quick { (1, 1) } else { (3, 5) };
    // The same kernels in a copy of the project with `[runtime] metering = "time"`.
    let timed_project = bench_dir().join("kernels-time-metered");
    fs::create_dir_all(&timed_project).expect("bench folder");
    for file in ["kernels.py", "timing.py"] {
        fs::copy(bench_sources().join(file), timed_project.join(file)).expect("copy the kernels");
    }
    fs::write(timed_project.join("capsule.toml"), "[runtime]\nmetering = \"time\"\n").expect("capsule.toml");
    let metered = [
        (load(build_into(&kernels_py, &bench_dir().join("kernels"), true)), ""),
        (load(build_into(&timed_project.join("kernels.py"), &timed_project.join("build"), true)), ", time metering"),
    ];
    let mut native_best = Timings::default();
    let mut capsule_best = [Timings::default(), Timings::default()];
    for _ in 0..rounds {
        let native = python3(&[kernels_py.to_str().unwrap(), &repeat.to_string()]).output().expect("python3 runs");
        native_best.keep_fastest(&serde_json::from_slice(&native.stdout).expect("kernel timings"));
        for ((kernel_build, _), best) in metered.iter().zip(&mut capsule_best) {
            let inside = kernel_build.run("main", vec![json!(repeat)]);
            assert!(inside.success, "{:?}", inside.error);
            best.keep_fastest(&inside.result);
        }
    }
    for ((_, metering), best) in metered.iter().zip(&capsule_best) {
        for (name, native_seconds) in &native_best.0 {
            let capsule_seconds = best.of(name);
            rows.push(row(
                &format!("kernel `{name}`{metering}"),
                ms(Duration::from_secs_f64(capsule_seconds)),
                format!("{} (native python3)", ms(Duration::from_secs_f64(*native_seconds))),
                Some(capsule_seconds / native_seconds),
                "<= 1.5x",
            ));
        }
    }

    // The data runtime: numpy and pandas.
    data::measure(&settings, &peers, &mut rows);

    // Fan-out: 32 CPU-bound sub-tasks with `map`, against the same calls one by one.
    let workflow =
        load(build_into(&workspace().join("crates/fixtures/valid/workflow.py"), &bench_dir().join("workflow"), true));
    let timed = |task: &str| {
        let started = Instant::now();
        let outcome = workflow.run(task, vec![json!(32)]);
        assert!(outcome.success, "{:?}", outcome.error);
        started.elapsed()
    };
    let (parallel, sequential) = (timed("fan_out"), timed("one_by_one"));
    rows.push(row(
        &format!("32 CPU-bound sub-tasks with `map` on {cores} workers"),
        ms(parallel),
        format!("{} (one after another)", ms(sequential)),
        Some(sequential.as_secs_f64() / parallel.as_secs_f64()),
        ">= 1.7x faster",
    ));

    // 6. Memory: idle sandboxes, then many invocations.
    let built = load(build_into(&entry, &out, false));
    // In a fresh process, so that memory freed by the measurements above cannot be reused.
    let idle_count = if settings.quick { 5 } else { 100 };
    let child = Command::new(std::env::current_exe().expect("own path"))
        .arg("--idle-sandboxes")
        .arg(out.join("manifest.toml"))
        .arg(idle_count.to_string())
        .output()
        .expect("child runs");
    let measured: Vec<u64> =
        String::from_utf8_lossy(&child.stdout).split_whitespace().map(|n| n.parse().expect("bytes")).collect();
    let (private_each, rss_each) = (measured[0], measured[1]);
    rows.push(row(
        &format!("private memory per idle sandbox ({idle_count} live)"),
        format!("{:.1} KiB (RSS {:.1} KiB)", private_each as f64 / 1024.0, rss_each as f64 / 1024.0),
        format!("{} snapshot", mib(snapshot_bytes)),
        Some(private_each as f64 / snapshot_bytes as f64),
        "<= 2 MB",
    ));
    // Warm-up invocations fill the pool's reusable slots; after that RSS must stay flat.
    let (warm_up, invocations) = if settings.quick { (10, 50) } else { (1_000, 10_000) };
    let invoke_many = |count: usize| {
        block_on(async {
            for _ in 0..count {
                invoke_once(&built.loaded).await;
            }
        })
    };
    invoke_many(warm_up);
    let rss_start = rss_bytes();
    invoke_many(invocations);
    let rss_end = rss_bytes();
    rows.push(row(
        &format!("RSS after {invocations} more invocations"),
        mib(rss_end),
        format!("{} after {warm_up}", mib(rss_start)),
        Some(rss_end as f64 / rss_start as f64),
        "flat",
    ));

    let report = render(&rows, &settings);
    println!("{report}");
    if let Some(path) = &settings.write {
        std::fs::write(path, report).expect("write the report");
        eprintln!("wrote {}", path.display());
    }
}

fn throughput(loaded: Arc<Loaded>, workers: usize, window: Duration) -> f64 {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(workers).enable_all().build().unwrap();
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    runtime.block_on(async {
        let mut handles = Vec::new();
        for _ in 0..workers {
            let (loaded, done) = (loaded.clone(), done.clone());
            handles.push(tokio::spawn(async move {
                while started.elapsed() < window {
                    invoke_once(&loaded).await;
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        for handle in handles {
            handle.await.unwrap();
        }
    });
    done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
}

fn render(rows: &[Row], settings: &Settings) -> String {
    let commit = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(workspace())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let python = python3(&["--version"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let date = Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let mut out = String::new();
    let _ = writeln!(out, "| measure | Capsule | baseline | ratio | target |");
    let _ = writeln!(out, "| --- | --- | --- | --- | --- |");
    for r in rows {
        let _ = writeln!(out, "| {} | {} | {} | {} | {} |", r.measure, r.capsule, r.baseline, r.ratio, r.target);
    }
    let mode = if settings.quick { "quick (one iteration each; not for comparison)" } else { "full" };
    format!(
        "Measured {date} on {} cores ({cpu}), commit {commit}, mode {mode}; native baseline {python}; \
         Capsule's CPython is 3.13.5 in wasmtime {}.\n\n{out}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        capsule_exec::for_builder::WASMTIME_VERSION,
    )
}

/// The best time of each kernel over several rounds, in seconds, in the kernels' order.
#[derive(Default)]
struct Timings(Vec<(String, f64)>);

impl Timings {
    /// Keeps the faster of each kernel's time so far and its time in `round`, a JSON object
    /// of seconds by kernel.
    fn keep_fastest(&mut self, round: &Value) {
        for (name, seconds) in round.as_object().expect("kernel timings are an object") {
            let seconds = seconds.as_f64().expect("a kernel's time is a number");
            match self.0.iter_mut().find(|(known, _)| known == name) {
                Some((_, best)) => *best = best.min(seconds),
                None => self.0.push((name.clone(), seconds)),
            }
        }
    }

    fn of(&self, name: &str) -> f64 {
        self.0
            .iter()
            .find(|(known, _)| known == name)
            .map(|(_, seconds)| *seconds)
            .expect("every side ran every kernel")
    }
}
