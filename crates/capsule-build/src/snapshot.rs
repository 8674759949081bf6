//! Pre-initialising the runtime: CPython starts and imports the user's module in an
//! instance of the runtime's code linked to its initial state, and the memory and globals it
//! ends with become the build's state module (see [`crate::split`]).
//!
//! The initialisation is deterministic: fixed clocks, a fixed random stream and a hash seed
//! derived from the build key, no files, no environment beyond the seed, and no host calls.
//! The same inputs therefore give a byte-identical snapshot.

use std::path::Path;
use std::time::{Duration, Instant};

use capsule_exec::for_builder::{
    Program, RefuseHostCalls, SandboxState, Stopped, Stream, TeeOutput, fingerprint, until_stopped,
};
use capsule_exec::{Cancel, Engine};
use manifest_schema::{CompiledFile, Metering};
use python_runtime::{HASH_SEED_ENV, InitRequest, exports};
use rand::SeedableRng;
use rand::rngs::StdRng;
use wasmtime::{Store, Val};
use wasmtime_wasi::p2::pipe::MemoryInputPipe;
use wasmtime_wasi::{HostMonotonicClock, HostWallClock, WasiCtxBuilder};

use crate::cache::{cache_dir, hex_sha256, write_atomic};
use crate::error::BuildError;
use crate::split::{Layout, State, Value, global_export};

/// How long importing the user's module may take at build time.
pub const INIT_TIMEOUT: Duration = Duration::from_secs(120);
/// Memory the interpreter may use while importing the user's module.
const INIT_MEMORY_LIMIT: u64 = 2 << 30;

/// 2024-01-01T00:00:00Z: what `time.time()` says while the module is imported.
const BUILD_EPOCH: Duration = Duration::from_secs(1_704_067_200);

struct FixedWallClock;
impl HostWallClock for FixedWallClock {
    fn resolution(&self) -> Duration {
        Duration::from_nanos(1)
    }
    fn now(&self) -> Duration {
        BUILD_EPOCH
    }
}

struct FixedMonotonicClock;
impl HostMonotonicClock for FixedMonotonicClock {
    fn resolution(&self) -> u64 {
        1
    }
    fn now(&self) -> u64 {
        0
    }
}

/// Bumped when [`crate::split`] makes a different code module from the same runtime.
const CODE_LAYOUT: &str = "capsule-code/1";

/// The runtime's code module, compiled for one engine configuration.
pub struct RuntimeCode {
    pub module: wasmtime::Module,
    pub compiled: CompiledFile,
    /// The compiled bytes when the runner's store could not keep them.
    fresh: Option<Vec<u8>>,
}

impl RuntimeCode {
    /// The runtime's code compiled by `engine`'s compiler for `metering`: the compiled file
    /// the runner keeps (see `capsule_exec::Engine::keep_compiled`) when this runtime was
    /// compiled for this configuration before (`code/<key>.sha256` in the cache folder names
    /// it), else compiled now and kept.
    pub fn get(
        engine: &Engine,
        layout: &Layout,
        runtime: &[u8],
        runtime_sha256: &str,
        metering: Metering,
    ) -> Result<Self, BuildError> {
        let key = hex_sha256(&[CODE_LAYOUT.as_bytes(), runtime_sha256.as_bytes(), fingerprint(metering).as_bytes()]);
        let named = cache_dir().map(|dir| dir.join("code").join(format!("{key}.sha256")));
        if let Some(path) = &named
            && let Some(code) = Self::kept(engine, path, metering)
        {
            return Ok(code);
        }
        let started = Instant::now();
        if let Some(dir) = cache_dir() {
            remove_obsolete(&dir);
        }
        let wasm = layout.code_module(runtime).map_err(|e| BuildError::message(e.to_string()))?;
        let wasmtime = engine.wasmtime(metering).map_err(|e| BuildError::message(e.to_string()))?;
        let bytes = wasmtime
            .precompile_module(&wasm)
            .map_err(|e| BuildError::message(format!("compiling the runtime failed: {e:#}")))?;
        tracing::info!(elapsed = ?started.elapsed(), "compiled the runtime's code");
        // SAFETY: bytes this engine's own compiler produced just now.
        let module = unsafe { wasmtime::Module::deserialize(wasmtime, &bytes) }
            .map_err(|e| BuildError::message(format!("loading the compiled runtime failed: {e}")))?;
        let sha256 = match engine.keep_compiled(&bytes) {
            Ok(sha256) => sha256,
            Err(error) => {
                tracing::warn!(%error, "could not keep the compiled runtime");
                capsule_exec::for_builder::sha256_hex(&bytes)
            }
        };
        let compiled = CompiledFile::named_by(sha256);
        let kept = engine.kept_module(metering, &compiled.sha256).ok().flatten().is_some();
        if kept
            && let Some(path) = &named
            && let Err(error) = write_atomic(path, compiled.sha256.as_bytes())
        {
            tracing::warn!(%error, "could not record the compiled runtime's name");
        }
        Ok(Self { module, compiled, fresh: (!kept).then_some(bytes) })
    }

    /// The compiled code `named` names, if the runner keeps it.
    fn kept(engine: &Engine, named: &Path, metering: Metering) -> Option<Self> {
        let sha256 = std::fs::read_to_string(named).ok()?.trim().to_string();
        match engine.kept_module(metering, &sha256) {
            Ok(Some(module)) => Some(Self { module, compiled: CompiledFile::named_by(sha256), fresh: None }),
            Ok(None) => None,
            Err(error) => {
                tracing::warn!(%error, "ignoring an unusable compiled runtime");
                None
            }
        }
    }

    /// Puts the compiled code in `dir` under its name, read-only: a copy of the runner's,
    /// checked against its hash (never a link: a project's files must not be the runner's).
    /// A read-only file of that name already there (an earlier build's) is left: runners
    /// check it against its name before they run it.
    pub fn place(&self, engine: &Engine, dir: &Path) -> Result<(), BuildError> {
        let dest = dir.join(&self.compiled.file);
        if std::fs::metadata(&dest).is_ok_and(|m| m.permissions().readonly()) {
            return Ok(());
        }
        let _ = std::fs::remove_file(&dest);
        match &self.fresh {
            Some(bytes) => capsule_exec::for_builder::write_read_only(&dest, bytes)
                .map_err(|e| BuildError::io(format!("cannot write `{}`", dest.display()), e)),
            None => engine.copy_kept(&self.compiled.sha256, &dest).map_err(|e| BuildError::message(e.to_string())),
        }
    }
}

/// What earlier versions cached and this one no longer reads: an incremental compilation
/// cache of several GB, an instrumented runtime, records of verified files, and compiled
/// code kept under `code/` itself (now the runner keeps it, in `compiled/`).
fn remove_obsolete(cache: &Path) {
    for obsolete in ["cranelift", "init", "verified"] {
        let _ = std::fs::remove_dir_all(cache.join(obsolete));
    }
    if let Ok(entries) = std::fs::read_dir(cache.join("code")) {
        for entry in entries.flatten().filter(|e| e.path().extension().is_some_and(|x| x == "cwasm")) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// `state` as a state module of `layout`'s runtime, compiled by `engine`.
pub fn compile_state(engine: &wasmtime::Engine, layout: &Layout, state: &State) -> Result<Vec<u8>, BuildError> {
    let wasm = layout.state_module(state).map_err(|e| BuildError::message(e.to_string()))?;
    engine.precompile_module(&wasm).map_err(|e| BuildError::message(format!("compiling the snapshot failed: {e:#}")))
}

/// Runs the runtime's initialisation with `request` in its `code` (compiled by `engine`, of
/// `metering`) linked to its `initial` state, and returns the memory and globals it ends with.
pub async fn snapshot(
    engine: &wasmtime::Engine,
    layout: &Layout,
    initial: &State,
    code: &wasmtime::Module,
    metering: Metering,
    request: &InitRequest,
    hash_seed: u32,
) -> Result<State, BuildError> {
    let initial = compile_state(engine, layout, initial)?;
    // SAFETY: bytes this engine's own compiler produced just now.
    let initial = unsafe { wasmtime::Module::deserialize(engine, &initial) }
        .map_err(|e| BuildError::message(format!("loading the runtime's initial state failed: {e}")))?;
    let program = Program::new(engine, &initial, code, metering)
        .map_err(|e| BuildError::message(format!("linking the runtime failed: {e:#}")))?;
    let globals = layout.globals();
    let stdin = serde_json::to_vec(request).expect("init requests serialise");
    let stdout = TeeOutput::quiet(Stream::Stdout);
    let stderr = TeeOutput::quiet(Stream::Stderr);
    let wasi = WasiCtxBuilder::new()
        .stdin(MemoryInputPipe::new(stdin))
        .stdout(stdout.clone())
        .stderr(stderr.clone())
        .env(HASH_SEED_ENV, hash_seed.to_string())
        .wall_clock(FixedWallClock)
        .monotonic_clock(FixedMonotonicClock)
        .secure_random(StdRng::seed_from_u64(u64::from(hash_seed)))
        .insecure_random(StdRng::seed_from_u64(u64::from(hash_seed) + 1))
        .insecure_random_seed(u128::from(hash_seed))
        .build_p1();
    let host_calls = Box::new(RefuseHostCalls(
        "module-level code runs while `capsule build` imports the module; call it inside a task",
    ));
    let mut store = Store::new(engine, SandboxState::new(wasi, INIT_MEMORY_LIMIT, host_calls));
    SandboxState::limit(&mut store);
    let started = Instant::now();
    let import = async {
        let instance = program.instantiate(&mut store).await?;
        // A reactor's `_initialize` runs the C constructors; then the interpreter starts.
        if let Ok(constructors) = instance.get_typed_func::<(), ()>(&mut store, "_initialize") {
            constructors.call_async(&mut store, ()).await?;
        }
        let initialize = instance.get_typed_func::<(), ()>(&mut store, exports::INITIALIZE)?;
        initialize.call_async(&mut store, ()).await?;
        tracing::debug!(elapsed = ?started.elapsed(), "imported the user's module");
        let memory = instance
            .get_memory(&mut store, exports::MEMORY)
            .ok_or_else(|| wasmtime::format_err!("the runtime exports no memory"))?
            .data(&store)
            .to_vec();
        let globals = (0..globals)
            .map(|k| {
                let global = instance
                    .get_global(&mut store, &global_export(k))
                    .ok_or_else(|| wasmtime::format_err!("the runtime's code does not export global {k}"))?;
                match global.get(&mut store) {
                    Val::I32(x) => Ok(Value::I32(x)),
                    Val::I64(x) => Ok(Value::I64(x)),
                    Val::F32(bits) => Ok(Value::F32(bits)),
                    Val::F64(bits) => Ok(Value::F64(bits)),
                    other => Err(wasmtime::format_err!("global {k} holds {other:?}, which a snapshot cannot keep")),
                }
            })
            .collect::<wasmtime::Result<Vec<_>>>()?;
        Ok::<_, wasmtime::Error>(State { memory, globals })
    };
    let result = until_stopped(started + INIT_TIMEOUT, &Cancel::default(), import).await;
    match result {
        Ok(Ok(snapshot)) => Ok(snapshot),
        Err(stopped) => {
            let entry = entry_path(request);
            // No one cancels a build's import: it can only have run out of time.
            debug_assert_eq!(stopped, Stopped::Deadline);
            Err(BuildError::hinted(
                format!("importing `{entry}` took longer than {INIT_TIMEOUT:?}"),
                MODULE_LEVEL_HINT.to_string(),
            ))
        }
        Ok(Err(error)) => {
            let printed = stderr.captured().text;
            let entry = entry_path(request);
            let reason = if store.data().memory().exceeded() {
                format!("importing `{entry}` needed more than {} MiB of memory", INIT_MEMORY_LIMIT >> 20)
            } else if !printed.trim().is_empty() {
                format!("importing `{entry}` failed:\n{}", printed.trim_end())
            } else {
                format!("snapshotting `{entry}` failed: {error:#}")
            };
            let hint = unavailable_module_hint(&printed).unwrap_or_else(|| MODULE_LEVEL_HINT.into());
            Err(BuildError::hinted(reason, hint))
        }
    }
}

const MODULE_LEVEL_HINT: &str =
    "module-level code runs once, at build time, without files, network or environment; move such work into a task";

/// The path of the module the build imports, as the user named it.
fn entry_path(request: &InitRequest) -> &str {
    request
        .modules
        .iter()
        .find(|m| m.name == request.entry_module)
        .map_or(request.entry_module.as_str(), |m| m.path.as_str())
}

/// C modules of the standard library that the runtime does not have, and what to do.
const UNAVAILABLE_MODULES: &[(&str, &str)] = &[
    (
        "_ctypes",
        "`ctypes` calls C libraries, which a Wasm sandbox cannot load; the package importing it (see the traceback) cannot run in Capsule",
    ),
    ("_ssl", "the host makes HTTPS requests for tasks: use `capsule.http`, `urllib.request` or `requests`"),
    ("_sqlite3", "`sqlite3` is not in Capsule's runtime yet"),
];

/// The hint for an import that failed on a C module the runtime lacks.
fn unavailable_module_hint(traceback: &str) -> Option<String> {
    UNAVAILABLE_MODULES.iter().find_map(|(module, hint)| {
        traceback.contains(&format!("No module named '{module}'")).then(|| (*hint).to_string())
    })
}
