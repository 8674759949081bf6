//! The `data` runtime: numpy and pandas kernels against native numpy and pandas (from the
//! bench venv, BLAS held to one thread), hello on it, its builds, size and compile time.

use std::fs;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tests::{block_on, build_into, load};

use crate::peers::Peers;
use crate::{Row, Settings, bench_dir, bench_sources, invoke_task, mib, ms, percentile, row, workspace};

pub fn measure(settings: &Settings, peers: &Peers, rows: &mut Vec<Row>) {
    let kernels_py = bench_sources().join("data_kernels.py");
    let project = bench_dir().join("data-project");
    fs::create_dir_all(&project).expect("bench folder");
    for file in ["data_kernels.py", "timing.py"] {
        fs::copy(bench_sources().join(file), project.join(file)).expect("copy the kernels");
    }
    fs::write(project.join("capsule.toml"), "[runtime]\nflavour = \"data\"\n").expect("capsule.toml");

    // The first data build compiles the runtime's code; a second project reuses it.
    let first = load(build_into(&project.join("data_kernels.py"), &project.join("build"), true));
    let second_project = bench_dir().join("data-project-2");
    fs::create_dir_all(&second_project).expect("bench folder");
    fs::copy(project.join("capsule.toml"), second_project.join("capsule.toml")).expect("capsule.toml");
    fs::write(
        second_project.join("stats.py"),
        "import numpy as np\nfrom capsule import task\n\n@task\ndef mean(values: list) -> float:\n    return float(np.mean(values))\n",
    )
    .expect("stats.py");
    let started = Instant::now();
    let second = load(build_into(&second_project.join("stats.py"), &second_project.join("build"), true));
    let second_build = started.elapsed();
    let timings = &first.output.timings;
    rows.push(row(
        "data runtime: first build on a machine (compiles the runtime's code)",
        ms(timings.total),
        format!("{} compiling, {} snapshot", ms(timings.compile), ms(timings.snapshot)),
        None,
        "",
    ));
    rows.push(row(
        "data runtime: cold build of a project, runtime's code compiled",
        ms(second_build),
        format!("{} (first build)", ms(timings.total)),
        Some(second_build.as_secs_f64() / timings.total.as_secs_f64()),
        "<= 10 s",
    ));
    let runtime = python_runtime::Flavour::Data.beside(&python_runtime::runtime_path());
    let runtime_bytes = fs::metadata(&runtime).map(|m| m.len()).unwrap_or_default();
    let size = |file: &str| fs::metadata(first.out_dir().join(file)).map(|m| m.len()).unwrap_or_default();
    let artifact = &first.output.manifest.artifact;
    rows.push(row(
        "data runtime: module, a project's compiled state, the runtime's compiled code",
        format!(
            "{} module, {} state, {} code",
            mib(runtime_bytes),
            mib(size(&artifact.file)),
            mib(size(&artifact.code.file))
        ),
        format!("{} snapshot heap", mib(first.output.manifest.artifact.initial_memory_bytes)),
        None,
        "",
    ));
    assert_eq!(second.run("mean", vec![json!([1, 2, 3])]).result, json!(2.0));

    let samples = block_on(async {
        let mut samples = Vec::new();
        for _ in 0..settings.count(500) {
            samples.push(invoke_task(&first.loaded, "hello").await);
        }
        samples
    });
    let p50 = percentile(&samples, 0.5);
    rows.push(row("data runtime: hello invoke p50 (in-process)", ms(p50), String::new(), None, "<= 2 ms"));

    let repeat = if settings.quick { 1 } else { 3 };
    let inside = first.run("main", vec![json!(repeat)]);
    assert!(inside.success, "{:?}", inside.error);
    let native = peers.python().and_then(|mut python| {
        let output = python
            .arg(&kernels_py)
            .arg(repeat.to_string())
            .env("PYTHONPATH", workspace().join("crates/python-runtime/python"))
            .env("OPENBLAS_NUM_THREADS", "1")
            .env("OMP_NUM_THREADS", "1")
            .env("MKL_NUM_THREADS", "1")
            .output()
            .ok()?;
        if !output.status.success() {
            eprintln!("bench: native data kernels failed: {}", String::from_utf8_lossy(&output.stderr));
            return None;
        }
        serde_json::from_slice::<Value>(&output.stdout).ok()
    });
    for (name, seconds) in inside.result.as_object().expect("timings") {
        let seconds = seconds.as_f64().expect("seconds");
        let native_seconds = native.as_ref().and_then(|n| n[name].as_f64());
        rows.push(row(
            &format!("data kernel `{name}`"),
            ms(Duration::from_secs_f64(seconds)),
            native_seconds.map_or_else(
                || peers.missing("numpy"),
                |n| format!("{} (native numpy/pandas, 1 BLAS thread)", ms(Duration::from_secs_f64(n))),
            ),
            native_seconds.map(|n| seconds / n),
            "<= 3x",
        ));
    }
}
