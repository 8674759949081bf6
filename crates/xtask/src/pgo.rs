//! Profile-guided optimisation of `libpython`: CPython is compiled once with counters
//! (`-fprofile-generate`), that build runs the training set of CPython's own test suite
//! (`python -m test --pgo`, the run CPython's `--enable-optimizations` uses) under wasmtime, and
//! the counts decide the optimised compile (`-fprofile-use`): which calls are inlined, which
//! paths fall through, which indirect calls are promoted to direct ones.
//!
//! The training must count the same on every run and in every folder, or the runtime would
//! not be reproducible: `profile-run` (crates/profile-run) gives the guest clocks that step on
//! each reading and a seeded random source; the interpreter runs with a fixed hash seed,
//! without writing bytecode and without the writable folders on its import path (a folder's
//! changing modification time would decide when the import system lists it again). The
//! sources are mapped read-only, the build's `_sysconfigdata` from a copy without the layer's
//! path, the instrumented interpreter without its debug information (which names the layer);
//! the tests write to a private `/tmp`. The guest's own hooks (`training.c`) even out what the
//! file system reports.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::layers::{RegistryFile, hex_sha256, make_all, tree_contents};
use crate::util::{cargo, run, target_dir, workspace_root};

/// Set to `0`, `cargo xtask build-runtime` builds `libpython` without the profile: to measure
/// what the profile gives (BENCHMARKS.md), or to spare the training on a quick local build.
pub const ENV: &str = "CAPSULE_PGO";

pub fn enabled() -> bool {
    std::env::var_os(ENV).is_none_or(|value| value != "0")
}

/// LLVM's profile runtime (raw profile version 10, LLVM 19's), as the `minicov` crate keeps it
/// free of any host library.
pub const PROFILE_RUNTIME: RegistryFile = RegistryFile {
    file: "minicov-0.3.7.crate",
    url: "https://static.crates.io/crates/minicov/minicov-0.3.7.crate",
    sha256: "f27fe9f1cc3c22e1687f9446c2083c4c5fc7f0bcf1c7a86bdbded14985895b4b",
};
const PROFILE_RUNTIME_DIR: &str = "minicov-0.3.7/c";
/// The parts of it a registering (non-ELF) target needs.
const PROFILE_RUNTIME_FILES: &[&str] = &[
    "InstrProfiling",
    "InstrProfilingBuffer",
    "InstrProfilingInternal",
    "InstrProfilingMerge",
    "InstrProfilingPlatformOther",
    "InstrProfilingValue",
    "InstrProfilingVersionVar",
    "InstrProfilingWriter",
];

/// The training run's arguments after the interpreter.
const TRAINING: &[&str] = &["-m", "test", "--pgo", "--tempdir", "/tmp/work"];
/// Its environment; see the module's documentation.
const TRAINING_ENV: &[(&str, &str)] = &[
    ("PYTHONHASHSEED", "0"),
    ("PYTHONDONTWRITEBYTECODE", "1"),
    ("PYTHONSAFEPATH", "1"),
    ("TMPDIR", "/tmp"),
    ("CAPSULE_PROFILE_FILE", "/tmp/cpython.profraw"),
];

/// The training's hooks: the profile writer and a file system that looks the same every run.
fn hooks_source() -> PathBuf {
    workspace_root().join("crates/python-runtime/build/pgo/training.c")
}

/// The wasi-libc functions `training.c` wraps.
const WRAPPED: &[&str] = &[
    "__wasi_fd_filestat_get",
    "__wasi_path_filestat_get",
    "__wasi_path_open",
    "__wasi_fd_close",
    "__wasi_fd_renumber",
    "opendir",
    "fdopendir",
    "readdir",
    "closedir",
];

fn runner_crate() -> PathBuf {
    workspace_root().join("crates/profile-run")
}

/// Everything that changes the profile, for the `libpython` layer's key: this file's recipe,
/// the profile runtime and its hooks, the host that runs the training (its code and
/// wasmtime's version).
pub fn fingerprint() -> Result<String> {
    let mut parts = vec![
        include_bytes!("pgo.rs").to_vec(),
        PROFILE_RUNTIME.sha256.as_bytes().to_vec(),
        fs::read(hooks_source())?,
        TRAINING.join(" ").into_bytes(),
        format!("{TRAINING_ENV:?} {WRAPPED:?}").into_bytes(),
        locked_version("wasmtime-wasi")?.into_bytes(),
    ];
    for (path, contents) in tree_contents(&runner_crate())? {
        parts.push(path.into_bytes());
        parts.push(contents);
    }
    let borrowed: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
    Ok(hex_sha256(&borrowed))
}

/// The version of `package` in the workspace's Cargo.lock.
fn locked_version(package: &str) -> Result<String> {
    let lock = fs::read_to_string(workspace_root().join("Cargo.lock"))?;
    let mut lines = lock.lines();
    while let Some(line) = lines.next() {
        if line == format!("name = \"{package}\"")
            && let Some(version) = lines.next().and_then(|l| l.strip_prefix("version = "))
        {
            return Ok(version.trim_matches('"').to_string());
        }
    }
    bail!("{package} is not in Cargo.lock")
}

/// The CPython build being optimised: its configured build folder below the source tree.
pub struct Build<'a> {
    /// The layer folder holding it all; its path is mapped out of what the training reads.
    pub layer: &'a Path,
    pub src: &'a Path,
    pub build: &'a Path,
    /// The folder where the build writes its `_sysconfigdata` module.
    pub generated: &'a Path,
    /// The wasm C compiler wrapper.
    pub cc: &'a Path,
}

/// Builds CPython instrumented in `cpython.build`, trains it, and returns the merged profile
/// (kept in `dir`). The build folder is left clean for the optimised build.
pub fn profile(dir: &Path, cpython: &Build, minicov_crate: &Path) -> Result<PathBuf> {
    let started = Instant::now();
    fs::create_dir_all(dir)?;
    let runtime = build_profile_runtime(dir, cpython.cc, minicov_crate)?;
    // wasm-ld resolves archives in any order, so the runtime can come first on the link line.
    let wraps: String = WRAPPED.iter().map(|name| format!(" -Wl,--wrap={name}")).collect();
    run(make_all(cpython.build)
        .arg("CFLAGS_NODIST=-fprofile-generate")
        .arg(format!("LDFLAGS_NODIST={}{wraps}", runtime.display())))?;
    // Its debug information names the layer's folder. The training looks at the interpreter's
    // own file, so with it, a build in another folder would count differently.
    run(Command::new("llvm-strip-19").arg("--strip-debug").arg(cpython.build.join("python.wasm")))?;
    let instrumented = Instant::now();
    let raw = train(dir, cpython)?;
    let profile = dir.join("cpython.profdata");
    run(Command::new("llvm-profdata-19").arg("merge").arg("-o").arg(&profile).arg(&raw))?;
    fs::remove_dir_all(raw.parent().context("the profile's folder")?)?;
    run(Command::new("make").args(["-s", "clean"]).current_dir(cpython.build))?;
    eprintln!(
        "xtask: CPython profiled in {:.0?} (instrumented build {:.0?}, training {:.0?})",
        started.elapsed(),
        instrumented - started,
        instrumented.elapsed()
    );
    Ok(profile)
}

/// `-fprofile-use` of `profile` for the optimised build's `CFLAGS_NODIST`. Every function is
/// compiled from the sources the profile was taken from, so a mismatch would be a bug.
pub fn use_flags(profile: &Path) -> String {
    format!("CFLAGS_NODIST=-fprofile-use={} -Werror=profile-instr-out-of-date", profile.display())
}

/// The profile runtime for wasm32, as `dir/libprofile.a`.
fn build_profile_runtime(dir: &Path, cc: &Path, minicov_crate: &Path) -> Result<PathBuf> {
    run(Command::new("tar").arg("xzf").arg(minicov_crate).arg("-C").arg(dir))?;
    let sources = dir.join(PROFILE_RUNTIME_DIR);
    let mut objects = Vec::new();
    let files = PROFILE_RUNTIME_FILES.iter().map(|name| sources.join(format!("{name}.c")));
    for source in files.chain([hooks_source()]) {
        let object = dir.join(source.file_name().context("a source file")?).with_extension("o");
        run(Command::new(cc)
            .args(["-O2", "-DCOMPILER_RT_HAS_ATOMICS=1", "-Wno-incompatible-pointer-types-discards-qualifiers"])
            .arg(format!("-I{}", sources.display()))
            .arg("-c")
            .arg(&source)
            .arg("-o")
            .arg(&object))?;
        objects.push(object);
    }
    let archive = dir.join("libprofile.a");
    run(Command::new("llvm-ar-19").arg("rcsD").arg(&archive).args(&objects))?;
    Ok(archive)
}

/// Runs the training under `profile-run`; returns the raw profile it wrote.
fn train(dir: &Path, cpython: &Build) -> Result<PathBuf> {
    // The tests import from the sources: bytecode a build step left there would be read
    // instead of compiled, and differ from run to run.
    remove_bytecode_caches(cpython.src)?;
    let tmp = dir.join("tmp");
    if tmp.exists() {
        fs::remove_dir_all(&tmp)?;
    }
    fs::create_dir_all(&tmp)?;
    run(cargo().args(["build", "-q", "-p", "profile-run"]))?;
    let guest_build = Path::new("/").join(cpython.build.strip_prefix(cpython.src)?);
    let sysconfig = mapped_sysconfig(dir, cpython)?;
    let log_path = dir.join("training.log");
    let log = fs::File::create(&log_path)?;
    let mut runner = Command::new(target_dir().join("debug/profile-run"));
    runner
        .arg(cpython.build.join("python.wasm"))
        .arg("--dir")
        .arg(format!("{}::/", cpython.src.display()))
        .arg("--dir")
        .arg(format!("{}::/sysconfig", sysconfig.display()))
        .arg("--write-dir")
        .arg(format!("{}::/tmp", tmp.display()))
        .arg("--env")
        .arg("PYTHONPATH=/sysconfig");
    for (name, value) in TRAINING_ENV {
        runner.arg("--env").arg(format!("{name}={value}"));
    }
    let status = runner
        .arg("--")
        .arg(guest_build.join("python.wasm"))
        .args(TRAINING)
        .stdout(log.try_clone()?)
        .stderr(log)
        .stdin(Stdio::null())
        .status()
        .context("starting profile-run")?;
    let raw = tmp.join("cpython.profraw");
    // Some tests fail under WASI or with stepping clocks (regrtest then exits with 2); what
    // matters is that the run completed and wrote its counts.
    let summary =
        fs::read_to_string(&log_path)?.lines().find(|line| line.starts_with("Total tests:")).map(str::to_string);
    match (summary, raw.is_file()) {
        (Some(summary), true) => {
            eprintln!("xtask: training {summary} ({status}; log {})", log_path.display());
            Ok(raw)
        }
        _ => bail!("the profile training run did not complete ({status}); see {}", log_path.display()),
    }
}

/// The build's `_sysconfigdata` module (which `sysconfig`, and through it the tests, read) in
/// a folder of its own, with the layer's path replaced by a fixed one: it records the paths of
/// the build, and a string of another length would change what the interpreter counts.
fn mapped_sysconfig(dir: &Path, cpython: &Build) -> Result<PathBuf> {
    let mapped = dir.join("sysconfig");
    fs::create_dir_all(&mapped)?;
    let generated = cpython.generated;
    for entry in fs::read_dir(generated).with_context(|| format!("reading {}", generated.display()))? {
        let path = entry?.path();
        let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let layer = cpython.layer.to_str().context("the layer's path is not UTF-8")?;
        fs::write(mapped.join(path.file_name().context("a file name")?), text.replace(layer, "/cpython-wasi"))?;
    }
    Ok(mapped)
}

fn remove_bytecode_caches(dir: &Path) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            let path = entry.path();
            if entry.file_name() == "__pycache__" {
                fs::remove_dir_all(&path)?;
            } else {
                remove_bytecode_caches(&path)?;
            }
        }
    }
    Ok(())
}
