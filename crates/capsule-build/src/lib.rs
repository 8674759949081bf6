//! `capsule build`: from a Python file to a manifest and a precompiled, content-addressed
//! artifact. See ARCHITECTURE.md for where this sits.

mod cache;
mod dependencies;
mod discover;
mod error;
mod fingerprint;
mod project;
mod signature;
mod snapshot;
mod split;

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use capsule_exec::Engine;
use capsule_exec::for_builder::{WASMTIME_VERSION, sha256_hex};
use manifest_schema::{Artifact, Compute, Manifest, SCHEMA_VERSION, Task};
use python_runtime::{Flavour, InitRequest, RegisteredTask};
use sha2::{Digest, Sha256};
use snapshot::RuntimeCode;
use split::Layout;

pub use cache::{CACHE_DIR_ENV, cache_dir};
pub use discover::{Diagnostic, Diagnostics};
pub use error::BuildError;
pub use fingerprint::{FINGERPRINT_FILE, Fingerprint};
pub use project::Project;
pub use python_runtime::runtime_path;

/// Name of the manifest in the output folder.
pub const MANIFEST_FILE: &str = "manifest.toml";
/// The key of the build in the output folder, for cache hits.
const KEY_FILE: &str = "build-key";

#[derive(Debug, Clone)]
pub struct BuildOptions {
    pub entry: PathBuf,
    /// Output folder; default `.capsule/build/<entry stem>/` beside the entry file.
    pub out_dir: Option<PathBuf>,
    /// The CPython runtime module (see [`python_runtime::runtime_path`]).
    pub runtime: PathBuf,
    /// Rebuild even if the key matches.
    pub force: bool,
}

#[derive(Debug, Clone)]
pub struct BuildOutput {
    pub manifest_path: PathBuf,
    pub manifest: Manifest,
    pub cache_hit: bool,
    pub timings: Timings,
    /// What the user should know about a build that succeeded (compiled files left out).
    pub notes: Vec<String>,
}

/// Where a build spent its time.
#[derive(Debug, Clone, Default)]
pub struct Timings {
    /// Importing the project in the runtime.
    pub snapshot: Duration,
    /// Compiling the snapshot, and the runtime's code when the cache did not have it.
    pub compile: Duration,
    pub total: Duration,
}

/// The entry file named by `[workflow] entrypoint` in `dir/capsule.toml`, for `capsule run`
/// without a file.
pub fn entry_from_project(dir: &Path) -> Result<PathBuf, BuildError> {
    let hint =
        "pass the Python file (`capsule run main.py`), or set `[workflow] entrypoint = \"main.py\"` in capsule.toml";
    let config = manifest_schema::ProjectFile::find(dir).map_err(|e| BuildError::message(e.to_string()))?;
    match config.and_then(|c| c.workflow.entrypoint) {
        Some(entry) => Ok(dir.join(entry)),
        None => Err(BuildError::usage(
            format!("no Python file given, and no `capsule.toml` with an entrypoint in `{}`", dir.display()),
            hint,
        )),
    }
}

/// The engine builds compile with; it runs what it builds like any other.
pub fn build_engine() -> Result<Engine, BuildError> {
    Engine::new().map_err(|e| BuildError::message(e.to_string()))
}

/// The output folder of a build of `entry`: `out_dir`, else `.capsule/build/<stem>/` beside it.
fn out_dir_of(options: &BuildOptions) -> PathBuf {
    options.out_dir.clone().unwrap_or_else(|| {
        let stem = options.entry.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        options.entry.parent().unwrap_or(Path::new("")).join(manifest_schema::STATE_DIR).join("build").join(stem)
    })
}

/// The previous build, if nothing it read has changed since (see [`fingerprint`]): no
/// parsing, no hashing, no engine. `None` means "build to know".
pub fn up_to_date(options: &BuildOptions) -> Option<BuildOutput> {
    if options.force {
        return None;
    }
    let started = Instant::now();
    let out_dir = out_dir_of(options);
    if !Fingerprint::read(&out_dir)?.holds(&options.runtime) {
        return None;
    }
    let manifest_path = out_dir.join(MANIFEST_FILE);
    let manifest = Manifest::load(&manifest_path).ok()?;
    artifact_files_present(&out_dir, &manifest).then(|| {
        let timings = Timings { total: started.elapsed(), ..Timings::default() };
        BuildOutput { manifest_path, manifest, cache_hit: true, timings, notes: Vec::new() }
    })
}

/// Builds `options.entry`, or finds the identical previous build.
pub async fn build(engine: &Engine, options: &BuildOptions) -> Result<BuildOutput, BuildError> {
    if let Some(output) = up_to_date(options) {
        tracing::info!(manifest = %output.manifest_path.display(), "build up to date (fingerprint)");
        return Ok(output);
    }
    // Builds into one folder take turns; one that waited finds the other's build done.
    let _turn = take_turn(&out_dir_of(options))?;
    if let Some(output) = up_to_date(options) {
        return Ok(output);
    }
    let started = Instant::now();
    let project = Project::load(&options.entry)?;
    let runtime_path = project.flavour.beside(&options.runtime);
    let runtime = fs::read(&runtime_path).map_err(|e| match project.flavour {
        Flavour::Base => BuildError::usage(
            format!("cannot read the CPython runtime `{}`: {e}", runtime_path.display()),
            "build it once with `cargo xtask build-runtime`, or point `CAPSULE_RUNTIME` at a built `capsule-python.wasm`",
        ),
        flavour => BuildError::usage(
            format!(
                "capsule.toml asks for the `{}` runtime (`[runtime] flavour`), but `{}` cannot be read: {e}",
                flavour.as_str(),
                runtime_path.display()
            ),
            format!(
                "build it once with `cargo xtask build-runtime --flavour {}`, or install a Capsule that ships it",
                flavour.as_str()
            ),
        ),
    })?;
    let runtime_sha256 = sha256_hex(&runtime);
    check_runtime(&runtime_path, &runtime_sha256)?;
    let key = build_key(&project, &runtime_sha256);
    let out_dir = out_dir_of(options);
    let manifest_path = out_dir.join(MANIFEST_FILE);
    let fingerprint = project.fingerprint(&options.runtime, &runtime_path);

    if !options.force
        && let Some(manifest) = cached(&out_dir, &key)
    {
        tracing::info!(manifest = %manifest_path.display(), "build cache hit");
        if let Err(error) = fingerprint.write(&out_dir) {
            tracing::warn!(%error, "could not record the build's fingerprint");
        }
        let timings = Timings { total: started.elapsed(), ..Timings::default() };
        return Ok(BuildOutput { manifest_path, manifest, cache_hit: true, timings, notes: Vec::new() });
    }

    let request = InitRequest {
        entry_module: project.entry_module.clone(),
        modules: project.modules.clone(),
        data_files: project.data_files.clone(),
        preload: project.preload.clone(),
    };
    let hash_seed = u32::from_le_bytes(Sha256::digest(key.as_bytes())[..4].try_into().expect("4 bytes"));
    let wasmtime = engine.wasmtime(project.metering).map_err(|e| BuildError::message(e.to_string()))?;
    let (layout, initial) = Layout::read(&runtime).map_err(|e| BuildError::message(e.to_string()))?;
    let compile_started = Instant::now();
    let code = RuntimeCode::get(engine, &layout, &runtime, &runtime_sha256, project.metering)?;
    let mut compile_time = compile_started.elapsed();
    let snapshot_started = Instant::now();
    let state = snapshot::snapshot(wasmtime, &layout, &initial, &code.module, project.metering, &request, hash_seed)
        .await
        .map_err(|error| {
            match (error, &project.dependencies) {
                // An import that failed for want of a compiled file the install left out says so.
                (BuildError::Other(problem), Some(installed)) => match installed.explain(&problem.message) {
                    Some(hint) => BuildError::Other(manifest_schema::Problem::hinted(problem.message, hint)),
                    None => BuildError::Other(problem),
                },
                (error, _) => error,
            }
        })?;
    let snapshot_time = snapshot_started.elapsed();

    let compile_started = Instant::now();
    let compiled = snapshot::compile_state(wasmtime, &layout, &state)?;
    compile_time += compile_started.elapsed();
    let inspection = engine.inspect(&compiled, &code.module, project.metering).await.map_err(BuildError::message)?;
    let registered = inspection.tasks;
    check_registered(&project, &registered)?;
    let initial_memory_bytes = inspection.initial_memory_bytes;
    check_memory(&project, initial_memory_bytes)?;

    let sha256 = sha256_hex(&compiled);
    let manifest = Manifest {
        schema_version: SCHEMA_VERSION,
        capsule_version: env!("CARGO_PKG_VERSION").to_string(),
        engine: manifest_schema::Engine {
            wasmtime_version: WASMTIME_VERSION.to_string(),
            fingerprint: capsule_exec::for_builder::fingerprint(project.metering),
            metering: project.metering,
        },
        artifact: Artifact {
            file: format!("{sha256}.cwasm"),
            sha256,
            source: format!("{}.py", project.entry_module),
            initial_memory_bytes,
            project_root: project
                .tasks
                .iter()
                .any(|t| !t.options.allowed_files.is_empty())
                .then(|| project.root.display().to_string()),
            code: code.compiled.clone(),
        },
        tasks: manifest_tasks(&project, &registered),
        dependencies: project.dependencies.as_ref().map(|d| d.locked.clone()).unwrap_or_default(),
    };
    manifest.validate().map_err(BuildError::message)?;
    // The runner keeps its own copy, so that the first run need not copy it in.
    if let Err(error) = engine.keep_compiled(&compiled) {
        tracing::warn!(%error, "could not keep the compiled snapshot");
    }
    write_output(engine, &out_dir, &manifest, &compiled, &code, &key)?;
    // Last: a fingerprint only ever describes a complete build.
    fingerprint.write(&out_dir).map_err(|e| BuildError::io("cannot record the build's fingerprint", e))?;
    let timings = Timings { snapshot: snapshot_time, compile: compile_time, total: started.elapsed() };
    tracing::info!(
        ?timings,
        runtime_bytes = runtime.len(),
        snapshot_bytes = state.memory.len(),
        artifact_bytes = compiled.len(),
        manifest = %manifest_path.display(),
        "built"
    );
    let notes = project.dependencies.as_ref().and_then(dependencies::Installed::note).into_iter().collect();
    Ok(BuildOutput { manifest_path, manifest, cache_hit: false, timings, notes })
}

/// An installed runtime comes with `<file>.sha256`: a runtime that does not match it was
/// damaged or swapped, and is not built with.
fn check_runtime(path: &Path, actual: &str) -> Result<(), BuildError> {
    let sidecar = PathBuf::from(format!("{}.sha256", path.display()));
    let Ok(expected) = fs::read_to_string(&sidecar) else { return Ok(()) };
    let expected = expected.split_whitespace().next().unwrap_or_default();
    if actual != expected {
        return Err(BuildError::usage(
            format!(
                "the CPython runtime `{}` does not match `{}` (sha256 {actual})",
                path.display(),
                sidecar.display()
            ),
            "reinstall Capsule, or point `CAPSULE_RUNTIME` at a runtime built with `cargo xtask build-runtime`",
        ));
    }
    Ok(())
}

/// sha256 over everything the artifact depends on.
fn build_key(project: &Project, runtime_sha256: &str) -> String {
    let mut hasher = Sha256::new();
    let mut field = |bytes: &[u8]| {
        hasher.update((bytes.len() as u64).to_le_bytes());
        hasher.update(bytes);
    };
    field(b"capsule-build/1");
    field(env!("CARGO_PKG_VERSION").as_bytes());
    field(runtime_sha256.as_bytes());
    field(capsule_exec::for_builder::fingerprint(project.metering).as_bytes());
    field(project.entry_module.as_bytes());
    field(project.root.as_os_str().as_encoded_bytes());
    // The options as resolved now: a change of defaults or levels must not reuse a manifest.
    for task in &project.tasks {
        field(task.name.as_bytes());
        field(task.function.as_bytes());
        field(&serde_json::to_vec(&task.options).expect("options serialise"));
        field(&Compute::fuel(task.options.compute).to_le_bytes());
    }
    for module in &project.modules {
        field(module.name.as_bytes());
        field(module.path.as_bytes());
        field(module.source.as_bytes());
        field(&[u8::from(module.is_package)]);
    }
    for data in &project.data_files {
        field(data.path.as_bytes());
        field(&data.contents);
    }
    hex::encode(hasher.finalize())
}

fn cached(out_dir: &Path, key: &str) -> Option<Manifest> {
    let stored = fs::read_to_string(out_dir.join(KEY_FILE)).ok()?;
    if stored.trim() != key {
        return None;
    }
    let manifest = Manifest::load(&out_dir.join(MANIFEST_FILE)).ok()?;
    artifact_files_present(out_dir, &manifest).then_some(manifest)
}

/// Whether the files the manifest names are there (the runner verifies their hashes before
/// loading them; here it is enough that they exist).
fn artifact_files_present(out_dir: &Path, manifest: &Manifest) -> bool {
    out_dir.join(&manifest.artifact.file).is_file() && out_dir.join(&manifest.artifact.code.file).is_file()
}

/// The tasks Python registered must be exactly those the parser found.
fn check_registered(project: &Project, registered: &[RegisteredTask]) -> Result<(), BuildError> {
    let parsed: BTreeSet<(&str, String)> =
        project.tasks.iter().map(|t| (t.name.as_str(), format!("{}.{}", project.entry_module, t.function))).collect();
    let live: BTreeSet<(&str, String)> = registered.iter().map(|t| (t.name.as_str(), t.function.clone())).collect();
    let mut problems = Vec::new();
    for (name, function) in live.difference(&parsed) {
        problems.push(format!("task `{name}` ({function}) was registered while importing, but is not a top-level `@task` with literal options in `{}.py`", project.entry_module));
    }
    for (name, function) in parsed.difference(&live) {
        problems.push(format!(
            "task `{name}` ({function}) is in the source but was not registered when the module was imported"
        ));
    }
    if problems.is_empty() {
        return Ok(());
    }
    Err(BuildError::hinted(
        problems.join("\n"),
        "define tasks at the top level of the entry file with `@task` from `capsule`, not conditionally or in other modules",
    ))
}

fn check_memory(project: &Project, initial: u64) -> Result<(), BuildError> {
    for task in &project.tasks {
        if task.options.ram.bytes() < initial {
            return Err(BuildError::hinted(
                format!(
                    "task `{}` has `ram` of {} bytes, but the snapshot alone needs {initial} bytes ({:.1} MiB)",
                    task.name,
                    task.options.ram.bytes(),
                    initial as f64 / f64::from(1 << 20)
                ),
                format!(
                    "give `{}.py:{}` at least `ram=\"{}MiB\"`",
                    project.entry_module,
                    task.line,
                    initial.div_ceil(1 << 20) + 16
                ),
            ));
        }
    }
    Ok(())
}

fn manifest_tasks(project: &Project, registered: &[RegisteredTask]) -> Vec<Task> {
    project
        .tasks
        .iter()
        .map(|task| Task {
            name: task.name.clone(),
            function: registered
                .iter()
                .find(|r| r.name == task.name)
                .map_or_else(|| format!("{}.{}", project.entry_module, task.function), |r| r.function.clone()),
            options: task.options.clone(),
            signature: Some(task.signature.clone()),
        })
        .collect()
}

/// Waits for the lock on `out_dir` (held until the returned file is dropped, or the process ends).
fn take_turn(out_dir: &Path) -> Result<fs::File, BuildError> {
    fs::create_dir_all(out_dir).map_err(|e| BuildError::io(format!("cannot create `{}`", out_dir.display()), e))?;
    let path = out_dir.join(".lock");
    let lock = fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| BuildError::io(format!("cannot open `{}`", path.display()), e))?;
    lock.lock().map_err(|e| BuildError::io(format!("cannot lock `{}`", path.display()), e))?;
    Ok(lock)
}

/// Writes the artifact, then the manifest, then the key, each atomically and read-only;
/// removes artifacts of earlier builds, and the temporary files of builds killed while
/// writing (the caller holds the folder's lock, so no live build is writing them). A reader
/// never sees a manifest whose artifact is missing.
fn write_output(
    engine: &Engine,
    out_dir: &Path,
    manifest: &Manifest,
    compiled: &[u8],
    code: &RuntimeCode,
    key: &str,
) -> Result<(), BuildError> {
    let io = |what: &str, path: &Path, e: std::io::Error| BuildError::io(format!("{what} `{}`", path.display()), e);
    fs::create_dir_all(out_dir).map_err(|e| io("cannot create", out_dir, e))?;
    let write = |name: &str, bytes: &[u8]| -> Result<(), BuildError> {
        let path = out_dir.join(name);
        capsule_exec::for_builder::write_read_only(&path, bytes).map_err(|e| io("cannot write", &path, e))
    };
    write(&manifest.artifact.file, compiled)?;
    code.place(engine, out_dir)?;
    let manifest_text = manifest.to_toml();
    write(MANIFEST_FILE, manifest_text.as_bytes())?;
    // An earlier build's signature does not sign this manifest.
    let _ = fs::remove_file(capsule_exec::trust::signature_path(&out_dir.join(MANIFEST_FILE)));
    write(KEY_FILE, key.as_bytes())?;
    if let Ok(entries) = fs::read_dir(out_dir) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let stale_artifact =
                name.ends_with(".cwasm") && name != manifest.artifact.file && name != manifest.artifact.code.file;
            let killed_write = name.starts_with('.') && name.ends_with(".tmp");
            if stale_artifact || killed_write {
                let _ = fs::remove_file(entry.path());
            }
        }
    }
    Ok(())
}

/// Signs the manifest at `manifest_path` with `key`: writes `manifest.toml.sig` beside it
/// (read-only), over the manifest's bytes as they are on disk.
pub fn sign(manifest_path: &Path, key: &capsule_exec::trust::SigningKey) -> Result<PathBuf, BuildError> {
    let bytes =
        fs::read(manifest_path).map_err(|e| BuildError::io(format!("cannot read `{}`", manifest_path.display()), e))?;
    let path = capsule_exec::trust::signature_path(manifest_path);
    capsule_exec::for_builder::write_read_only(&path, key.sign(&bytes).as_bytes())
        .map_err(|e| BuildError::io(format!("cannot write `{}`", path.display()), e))?;
    Ok(path)
}

/// The source of the built-in interpreter image (see [`interpreter_options`]).
const INTERPRETER_SOURCE: &str = include_str!("interpreter.py");
/// The image's entry file; its frames are left out of cells' tracebacks by the runtime.
const INTERPRETER_ENTRY: &str = "capsule_python.py";

/// How to build Capsule's built-in interpreter image, whose task `run_python` runs a code
/// string like a notebook cell: once per runtime, into the cache folder, like any build (an
/// unchanged one is found by its fingerprint). Its limits come with each call.
pub fn interpreter_options(runtime: PathBuf) -> Result<BuildOptions, BuildError> {
    let dir = capsule_exec::paths::interpreter_dir().ok_or_else(|| {
        BuildError::message("no cache folder for the interpreter image: set CAPSULE_CACHE_DIR or HOME")
    })?;
    let entry = dir.join(INTERPRETER_ENTRY);
    if fs::read_to_string(&entry).ok().as_deref() != Some(INTERPRETER_SOURCE) {
        fs::create_dir_all(&dir).map_err(|e| BuildError::io(format!("cannot create `{}`", dir.display()), e))?;
        cache::write_atomic(&entry, INTERPRETER_SOURCE.as_bytes())
            .map_err(|e| BuildError::io(format!("cannot write `{}`", entry.display()), e))?;
    }
    Ok(BuildOptions { entry, out_dir: Some(dir.join("build")), runtime, force: false })
}
