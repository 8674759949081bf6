//! Pre-initialising the runtime with Wizer: CPython starts, imports the user's module, and
//! the resulting memory becomes the module every task instance starts from.
//!
//! The initialisation is deterministic: fixed clocks, a fixed random stream and a hash seed
//! derived from the build key, no files, no environment beyond the seed, and no host calls.
//! The same inputs therefore give a byte-identical snapshot.

use std::time::{Duration, Instant};

use capsule_exec::{
    MAX_WASM_STACK, RefuseHostCalls, SandboxState, Stream, TeeOutput, TickingEngine, WASMTIME_VERSION, linker,
};
use python_runtime::{HASH_SEED_ENV, InitRequest, exports};
use rand::SeedableRng;
use rand::rngs::StdRng;
use wasmtime::{Config, Instance, OptLevel, Store, UpdateDeadline, Val};
use wasmtime_wasi::p2::pipe::MemoryInputPipe;
use wasmtime_wasi::{HostMonotonicClock, HostWallClock, WasiCtxBuilder};
use wasmtime_wizer::{InstanceState, SnapshotVal, ValType, Wizer};

use crate::cache::{cache_dir, hex_sha256, write_atomic};
use crate::error::BuildError;

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

/// Describes [`init_engine`]'s configuration, for the key of its cached compilations.
const INIT_ENGINE_SETTINGS: &str = "capsule-init-engine/1 opt=none epoch=on max_wasm_stack=8MiB";

/// The engine Wizer runs the initialisation on. Its code runs once per build, so it is
/// compiled for compile speed, not run speed; the snapshot it produces does not depend on it.
pub fn init_engine() -> wasmtime::Result<TickingEngine> {
    let mut config = Config::new();
    config.cranelift_opt_level(OptLevel::None);
    config.epoch_interruption(true);
    config.max_wasm_stack(MAX_WASM_STACK);
    config.async_stack_size(MAX_WASM_STACK + (1 << 20));
    TickingEngine::new(&config)
}

/// The instrumented runtime, compiled for the init engine: from the cache when it was
/// compiled before (it only changes with the runtime), else compiled and cached.
fn init_module(engine: &wasmtime::Engine, instrumented: &[u8]) -> wasmtime::Result<wasmtime::Module> {
    let Some(dir) = cache_dir() else {
        return wasmtime::Module::new(engine, instrumented);
    };
    let key = hex_sha256(&[instrumented, WASMTIME_VERSION.as_bytes(), INIT_ENGINE_SETTINGS.as_bytes()]);
    let path = dir.join("init").join(format!("{key}.cwasm"));
    if path.is_file() {
        // SAFETY: written below by this code from this engine's own compilation; the cache
        // folder is trusted like the build tool itself (see `cache`).
        match unsafe { wasmtime::Module::deserialize_file(engine, &path) } {
            Ok(module) => return Ok(module),
            Err(error) => tracing::warn!(%error, path = %path.display(), "ignoring an unusable cache entry"),
        }
    }
    let module = wasmtime::Module::new(engine, instrumented)?;
    if let Err(error) = module.serialize().map(|bytes| write_atomic(&path, &bytes)) {
        tracing::warn!(%error, "could not cache the compiled runtime");
    }
    Ok(module)
}

/// Runs the runtime's initialisation with `request` and returns the snapshot module.
pub async fn snapshot(
    engine: &TickingEngine,
    runtime: &[u8],
    request: &InitRequest,
    hash_seed: u32,
) -> Result<Vec<u8>, BuildError> {
    let engine = engine.engine();
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
    let deadline = Instant::now() + INIT_TIMEOUT;
    store.epoch_deadline_callback(move |_| {
        Ok(if Instant::now() >= deadline { UpdateDeadline::Interrupt } else { UpdateDeadline::Yield(1) })
    });
    let linker = linker(engine).map_err(|e| BuildError::message(format!("{e:#}")))?;

    let mut wizer = Wizer::new();
    wizer.init_func(exports::INITIALIZE);
    let (context, instrumented) = wizer.instrument(runtime).map_err(|e| BuildError::message(format!("{e:#}")))?;
    let result = async {
        let started = Instant::now();
        let module = init_module(engine, &instrumented)?;
        tracing::debug!(elapsed = ?started.elapsed(), "runtime ready for initialisation");
        let instance = linker.instantiate_async(&mut store, &module).await?;
        // A reactor's `_initialize` runs the C constructors; then the interpreter starts.
        if let Ok(constructors) = instance.get_typed_func::<(), ()>(&mut store, "_initialize") {
            constructors.call_async(&mut store, ()).await?;
        }
        let initialize = instance.get_typed_func::<(), ()>(&mut store, exports::INITIALIZE)?;
        initialize.call_async(&mut store, ()).await?;
        tracing::debug!(elapsed = ?started.elapsed(), "imported the user's module");
        let snapshot = wizer.snapshot(&context, &mut Snapshotting { store: &mut store, instance }).await;
        tracing::debug!(elapsed = ?started.elapsed(), "snapshot taken");
        snapshot
    }
    .await;
    match result {
        Ok(snapshot) => Ok(snapshot),
        Err(error) => {
            let printed = stderr.captured().text;
            let entry = request
                .modules
                .iter()
                .find(|m| m.name == request.entry_module)
                .map_or(request.entry_module.as_str(), |m| m.path.as_str());
            let reason = match error.root_cause().downcast_ref::<wasmtime::Trap>() {
                Some(wasmtime::Trap::Interrupt) => format!("importing `{entry}` took longer than {INIT_TIMEOUT:?}"),
                _ if store.data().memory().exceeded() => {
                    format!("importing `{entry}` needed more than {} MiB of memory", INIT_MEMORY_LIMIT >> 20)
                }
                _ if !printed.trim().is_empty() => format!("importing `{entry}` failed:\n{}", printed.trim_end()),
                _ => format!("snapshotting `{entry}` failed: {error:#}"),
            };
            let hint = unavailable_module_hint(&printed).unwrap_or_else(|| {
                "module-level code runs once, at build time, without files, network or environment; move such work into a task".into()
            });
            Err(BuildError::usage(reason, hint))
        }
    }
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

/// Gives Wizer read access to the initialised instance.
struct Snapshotting<'a> {
    store: &'a mut Store<SandboxState>,
    instance: Instance,
}

impl InstanceState for Snapshotting<'_> {
    async fn global_get(&mut self, name: &str, _: ValType) -> SnapshotVal {
        let global = self.instance.get_global(&mut *self.store, name).expect("Wizer asks for exported globals");
        match global.get(&mut *self.store) {
            Val::I32(x) => SnapshotVal::I32(x),
            Val::I64(x) => SnapshotVal::I64(x),
            Val::F32(x) => SnapshotVal::F32(x),
            Val::F64(x) => SnapshotVal::F64(x),
            Val::V128(x) => SnapshotVal::V128(x.as_u128()),
            other => unreachable!("CPython has no {other:?} globals"),
        }
    }

    async fn memory_contents(&mut self, name: &str, contents: impl FnOnce(&[u8]) + Send) {
        let memory = self.instance.get_memory(&mut *self.store, name).expect("Wizer asks for exported memories");
        contents(memory.data(&*self.store));
    }
}
