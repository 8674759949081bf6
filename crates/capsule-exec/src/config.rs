//! The one wasmtime configuration shared by `capsule build` (which compiles with it) and the
//! runner (which loads what was compiled). Anything here that changes compiled code must
//! change [`engine_settings`], so old artifacts are refused with a clear message.
//!
//! Each metering compiles its own checks into the code, and only those: fuel counts
//! instructions (and yields every [`FUEL_YIELD_INTERVAL`] of them), time metering checks the
//! epoch at loops and calls (and yields at every tick). Deadlines and cancels need no check
//! of their own: they are looked at whenever the code yields (`cancel::until_stopped`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

use manifest_schema::Metering;
use sha2::{Digest, Sha256};
use wasmtime::{Config, Enabled, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

/// The wasmtime release this build links; recorded in every manifest.
pub const WASMTIME_VERSION: &str = "48.0.8";

/// Wasm stack for guest code: at least the C stack the runtime was linked with, so Python's
/// recursion limits fire before a stack-overflow trap.
pub const MAX_WASM_STACK: usize = python_runtime::C_STACK_BYTES;

/// How often the epoch advances under time metering: the CPU time a run used is counted,
/// and its deadline checked, at this granularity.
pub const EPOCH_TICK: Duration = Duration::from_millis(5);

/// Under fuel metering, code yields to the host after this many instructions (about a
/// millisecond): a deadline or a cancel stops CPU-bound code within one interval, and other
/// runs on the same thread get their turn. Each yield costs a few microseconds.
pub const FUEL_YIELD_INTERVAL: u64 = 2_000_000;

/// Everything about the configuration that the compiled code depends on.
fn engine_settings(metering: Metering) -> &'static str {
    match metering {
        Metering::Fuel => "capsule-engine/1 fuel=on epoch=off async=on max_wasm_stack=8MiB",
        Metering::Time => "capsule-engine/1 fuel=off epoch=on async=on max_wasm_stack=8MiB",
    }
}

/// Sandboxes that can exist at once in a process that serves many runs (an engine from
/// `Engine::new`); each reserves (but does not commit) address space for a 4 GiB linear
/// memory and a fiber stack.
pub const MAX_LIVE_SANDBOXES: u32 = 256;

/// The configuration for fuel metering; [`with_metering`] gives the other.
pub fn config() -> Config {
    let mut config = Config::new();
    config.consume_fuel(true);
    config.max_wasm_stack(MAX_WASM_STACK);
    // Guests run on fibers: the fiber's stack must hold the Wasm stack plus host frames.
    config.async_stack_size(MAX_WASM_STACK + (1 << 20));
    // Instances come from preallocated slots, and linear memory starts as a copy-on-write
    // mapping of the snapshot: instantiation copies nothing and a sandbox only costs the
    // pages it writes. When a slot is freed, the pages a run dirtied (found with Linux's
    // PAGEMAP_SCAN where available) are copied back from the snapshot and stay mapped, so
    // the next run in that slot takes no page faults for them.
    let mut pool = PoolingAllocationConfig::new();
    // Two instances per sandbox: the build's state and the runtime's code (`Program`).
    pool.total_core_instances(2 * MAX_LIVE_SANDBOXES)
        .total_memories(MAX_LIVE_SANDBOXES)
        .total_tables(MAX_LIVE_SANDBOXES)
        .total_stacks(MAX_LIVE_SANDBOXES)
        .max_memory_size(4 << 30)
        .max_core_instance_size(4 << 20)
        .table_elements(1 << 16)
        .async_stack_keep_resident(512 << 10)
        .table_keep_resident(256 << 10)
        .linear_memory_keep_resident(4 << 20)
        .pagemap_scan(Enabled::Auto);
    config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    config.memory_init_cow(true);
    config
}

/// `config` for a process that makes one run and exits: sandboxes allocated on demand, not
/// from a pool, which such a process would spend part of its start setting up (a guard page
/// per fiber stack) for slots it never uses. Memory still starts as a copy-on-write mapping
/// of the snapshot.
pub(crate) fn on_demand(config: &Config) -> Config {
    let mut config = config.clone();
    config.allocation_strategy(InstanceAllocationStrategy::OnDemand);
    config
}

/// `config` (from [`config`], plus settings that do not change code) for `metering`: fuel is
/// counted by instrumented code, time by epoch ticks.
pub fn with_metering(config: &Config, metering: Metering) -> Config {
    let mut config = config.clone();
    config.consume_fuel(metering == Metering::Fuel);
    config.epoch_interruption(metering == Metering::Time);
    config
}

/// sha256 of the wasmtime version, the settings above and the target, as written in manifests.
pub fn fingerprint(metering: Metering) -> String {
    let mut hasher = Sha256::new();
    hasher.update(WASMTIME_VERSION);
    hasher.update([0]);
    hasher.update(engine_settings(metering));
    hasher.update([0]);
    hasher.update(std::env::consts::ARCH);
    hasher.update(std::env::consts::OS);
    hex::encode(hasher.finalize())
}

/// An engine with its epoch ticking in the background for as long as it lives, for time
/// metering.
pub(crate) struct TickingEngine {
    engine: Engine,
    stop: Arc<AtomicBool>,
}

impl TickingEngine {
    pub fn new(config: &Config) -> wasmtime::Result<Self> {
        let engine = Engine::new(config)?;
        let stop = Arc::new(AtomicBool::new(false));
        let ticker_engine = engine.weak();
        let ticker_stop = stop.clone();
        thread::Builder::new().name("capsule-epoch".into()).spawn(move || {
            while !ticker_stop.load(Ordering::Relaxed) {
                thread::sleep(EPOCH_TICK);
                match ticker_engine.upgrade() {
                    Some(engine) => engine.increment_epoch(),
                    None => break,
                }
            }
        })?;
        Ok(Self { engine, stop })
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }
}

impl Drop for TickingEngine {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
