//! Helpers for the end-to-end tests: build fixtures with the real toolchain and run their
//! tasks in real sandboxes.

pub mod server;

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use capsule_build::{BuildOptions, BuildOutput, build};
use capsule_exec::{Engine, Loaded, Outcome, RunOrder, RunRequest};
use serde_json::Value;

/// The process-wide engine (one, as in the real binaries).
pub fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| capsule_build::build_engine().expect("engine"))
}

/// Runs `future` on a multi-threaded runtime, as the binaries do, so that spawned sub-tasks
/// really run in parallel.
pub fn block_on<F: Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio").block_on(future)
}

/// A built fixture, loaded and ready to run.
pub struct Built {
    pub output: BuildOutput,
    pub loaded: Arc<Loaded>,
}

/// A new, unjournaled run of `task` with its output captured only.
pub fn quiet_run(task: &str, args: Vec<Value>) -> RunRequest {
    let order = RunOrder { workers: Some(2), ..RunOrder::task(Some(task.to_string()), args, serde_json::Map::new()) };
    RunRequest::new(order)
}

impl Built {
    pub fn out_dir(&self) -> &Path {
        self.output.manifest_path.parent().expect("manifest in a folder")
    }

    /// Runs `task` with `args`, capturing its output instead of printing it.
    pub fn run(&self, task: &str, args: Vec<Value>) -> Outcome {
        self.run_request(quiet_run(task, args))
    }

    /// Runs `task` with `args` by a runner whose environment holds exactly `variables`.
    pub fn run_in_environment(&self, task: &str, args: Vec<Value>, variables: &[(&str, &str)]) -> Outcome {
        let mut request = quiet_run(task, args);
        request.environment =
            capsule_exec::Environment::of(variables.iter().map(|(name, value)| (name.to_string(), value.to_string())));
        self.run_request(request)
    }

    pub fn run_request(&self, request: RunRequest) -> Outcome {
        block_on(async { engine().prepare(&self.loaded, request).expect("the run starts").run().await })
    }
}

pub fn build_into(entry: &Path, out_dir: &Path, force: bool) -> BuildOutput {
    let options = BuildOptions {
        entry: entry.to_path_buf(),
        out_dir: Some(out_dir.to_path_buf()),
        runtime: python_runtime::runtime_path(),
        force,
    };
    block_on(build(engine(), &options)).unwrap_or_else(|e| panic!("building {}: {e}", entry.display()))
}

pub fn load(output: BuildOutput) -> Built {
    let loaded = engine().load(&output.manifest_path).expect("a fresh build loads");
    Built { output, loaded }
}

/// A fixture built once per test binary (freshly: `--force`), shared by its tests.
pub fn shared(fixture: &str) -> Arc<Built> {
    static BUILDS: OnceLock<Mutex<HashMap<String, Arc<Built>>>> = OnceLock::new();
    // Holding the lock while building keeps parallel tests from compiling at the same time.
    let mut builds = BUILDS.get_or_init(Mutex::default).lock().unwrap_or_else(|e| e.into_inner());
    builds
        .entry(fixture.to_string())
        .or_insert_with(|| {
            let binary = std::env::current_exe().expect("test binary");
            let binary = binary.file_stem().expect("name").to_string_lossy().into_owned();
            let out_dir = scratch_dir().join(binary).join(fixture.replace('/', "_"));
            Arc::new(load(build_into(&fixtures::path(fixture), &out_dir, true)))
        })
        .clone()
}

/// `target/e2e-builds`: outputs kept between runs for inspection, overwritten each run.
pub fn scratch_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/e2e-builds")
}

/// The 1-based line of the first line of `fixture` containing `needle`.
pub fn line_of(fixture: &str, needle: &str) -> usize {
    let source = std::fs::read_to_string(fixtures::path(fixture)).expect("fixture source");
    source.lines().position(|l| l.contains(needle)).expect("needle in fixture") + 1
}
