//! Runs a WASI command (CPython's instrumented `python.wasm`) so that the run is the same on
//! every machine: the clocks advance by a fixed step on each reading instead of following
//! time, random bytes come from a fixed seed, and nothing but the given folders, variables
//! and arguments is visible. `cargo xtask build-runtime` trains its profile-guided build this
//! way, so that two runs count alike and the optimised runtime is reproducible. What the
//! host's file system reports, times and inode numbers, the guest evens out itself:
//! `crates/python-runtime/build/pgo/training.c`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use clap::Parser;
use rand::SeedableRng;
use rand::rngs::StdRng;
use wasmtime::{Config, Engine, Linker, Module, Store};
use wasmtime_wasi::p1::{self, WasiP1Ctx};
use wasmtime_wasi::{FsPerms, HostMonotonicClock, HostWallClock, I32Exit, WasiCtxBuilder};

/// What each reading of a clock advances it by.
const CLOCK_STEP_NANOS: u64 = 1_000;
/// 2024-01-01T00:00:00Z, the wall clock's first reading.
const WALL_CLOCK_START: Duration = Duration::from_secs(1_704_067_200);

#[derive(Parser)]
#[command(about, after_help = "Example:\n  profile-run python.wasm --dir cpython::/ -- /python.wasm -m test --pgo")]
struct Args {
    /// The WASI command module.
    wasm: PathBuf,
    /// A host folder the guest may read, as HOST::GUEST.
    #[arg(long = "dir", value_name = "HOST::GUEST")]
    dirs: Vec<String>,
    /// A host folder the guest may read and write, as HOST::GUEST.
    #[arg(long = "write-dir", value_name = "HOST::GUEST")]
    write_dirs: Vec<String>,
    /// An environment variable, as NAME=VALUE.
    #[arg(long = "env", value_name = "NAME=VALUE")]
    envs: Vec<String>,
    /// The guest's arguments, its name first.
    #[arg(last = true, required = true)]
    args: Vec<String>,
}

/// A clock that moves forward by [`CLOCK_STEP_NANOS`] each time it is read.
#[derive(Default)]
struct SteppingClock(AtomicU64);

impl SteppingClock {
    fn tick(&self) -> u64 {
        self.0.fetch_add(CLOCK_STEP_NANOS, Ordering::Relaxed) + CLOCK_STEP_NANOS
    }
}

impl HostMonotonicClock for SteppingClock {
    fn resolution(&self) -> u64 {
        CLOCK_STEP_NANOS
    }
    fn now(&self) -> u64 {
        self.tick()
    }
}

impl HostWallClock for SteppingClock {
    fn resolution(&self) -> Duration {
        Duration::from_nanos(CLOCK_STEP_NANOS)
    }
    fn now(&self) -> Duration {
        WALL_CLOCK_START + Duration::from_nanos(self.tick())
    }
}

fn main() -> Result<ExitCode> {
    let args = Args::parse();
    let mut config = Config::new();
    // CPython's test suite recurses deeply; its WASI build expects a large stack.
    config.max_wasm_stack(16 << 20);
    // Must exceed the Wasm stack whenever wasmtime is built with async support, as here.
    config.async_stack_size(17 << 20);
    let engine = Engine::new(&config)?;
    let module =
        Module::from_file(&engine, &args.wasm).map_err(|e| anyhow!("compiling {}: {e:#}", args.wasm.display()))?;
    let mut linker = Linker::<WasiP1Ctx>::new(&engine);
    p1::add_to_linker_sync(&mut linker, |ctx| ctx)?;

    let mut wasi = WasiCtxBuilder::new();
    wasi.inherit_stdout()
        .inherit_stderr()
        .args(&args.args)
        .wall_clock(SteppingClock::default())
        .monotonic_clock(SteppingClock::default())
        .secure_random(StdRng::seed_from_u64(0))
        .insecure_random(StdRng::seed_from_u64(1))
        .insecure_random_seed(2);
    for var in &args.envs {
        let Some((key, value)) = var.split_once('=') else { bail!("--env {var}: expected NAME=VALUE") };
        wasi.env(key, value);
    }
    let dirs = args.dirs.iter().map(|d| (d, FsPerms::ReadOnly));
    for (dir, perms) in dirs.chain(args.write_dirs.iter().map(|d| (d, FsPerms::ReadWrite))) {
        let Some((host, guest)) = dir.split_once("::") else { bail!("{dir}: expected HOST::GUEST") };
        wasi.preopened_dir(host, guest, perms).map_err(|e| anyhow!("opening {host}: {e:#}"))?;
    }
    let mut store = Store::new(&engine, wasi.build_p1());
    let instance = linker.instantiate(&mut store, &module)?;
    let start = instance.get_typed_func::<(), ()>(&mut store, "_start")?;
    match start.call(&mut store, ()) {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(error) => match error.downcast_ref::<I32Exit>() {
            Some(I32Exit(code)) => Ok(ExitCode::from(u8::try_from(*code).unwrap_or(1))),
            None => Err(anyhow!("{} trapped: {error:#}", args.wasm.display())),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clocks_step_the_same_way_every_run() {
        let readings = || {
            let clock = SteppingClock::default();
            let monotonic: Vec<u64> = (0..3).map(|_| HostMonotonicClock::now(&clock)).collect();
            (monotonic, HostWallClock::now(&clock))
        };
        let (monotonic, wall) = readings();
        assert_eq!(monotonic, [1_000, 2_000, 3_000]);
        assert_eq!(wall, WALL_CLOCK_START + Duration::from_nanos(4_000));
        assert_eq!(readings(), (monotonic, wall));
    }
}
