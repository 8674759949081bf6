//! Helpers for the end-to-end tests: build fixtures with the real toolchain and run their
//! tasks in real sandboxes.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use capsule_build::{BuildOptions, BuildOutput, build};
use capsule_exec::output::LiveSink;
use capsule_exec::subtasks::{Orchestrator, RunSettings, Scope};
use capsule_exec::{Call, Outcome, Program, Runner, Streams, run_task};
use serde_json::Value;

/// The process-wide runner (one engine, as in the real binaries).
pub fn runner() -> &'static Runner {
    static RUNNER: OnceLock<Runner> = OnceLock::new();
    RUNNER.get_or_init(|| capsule_build::build_runner().expect("engine"))
}

/// Runs `future` on a multi-threaded runtime, as the binaries do, so that spawned sub-tasks
/// really run in parallel.
pub fn block_on<F: Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio").block_on(future)
}

/// A built fixture, loaded and ready to run.
pub struct Built {
    pub output: BuildOutput,
    pub program: Program,
}

impl Built {
    pub fn out_dir(&self) -> &Path {
        self.output.manifest_path.parent().expect("manifest in a folder")
    }

    /// Runs `task` with `args`, capturing its output instead of printing it.
    pub fn run(&self, task: &str, args: Vec<Value>) -> Outcome {
        let task = self.output.manifest.task(task).unwrap_or_else(|| panic!("no task {task}"));
        let streams = Streams { stdout: LiveSink::Quiet, stderr: LiveSink::Quiet };
        let mut call = Call::new(args);
        call.project_root = self.output.manifest.artifact.project_root.clone().map(Into::into);
        let settings = RunSettings {
            streams,
            default_timeout: call.default_timeout,
            project_root: call.project_root.clone(),
            workers: 2,
            verbose: false,
        };
        let orchestrator = Orchestrator::new(self.program.clone(), self.output.manifest.tasks.clone(), settings);
        block_on(run_task(&self.program, task, call, streams, Some(Scope::root(orchestrator, None))))
    }
}

pub fn build_into(entry: &Path, out_dir: &Path, force: bool) -> BuildOutput {
    let options = BuildOptions {
        entry: entry.to_path_buf(),
        out_dir: Some(out_dir.to_path_buf()),
        runtime: python_runtime::runtime_path(),
        force,
    };
    block_on(build(runner(), &options)).unwrap_or_else(|e| panic!("building {}: {e}", entry.display()))
}

pub fn load(output: BuildOutput) -> Built {
    let (_, program) = runner().load(&output.manifest_path).expect("a fresh build loads");
    Built { output, program }
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
