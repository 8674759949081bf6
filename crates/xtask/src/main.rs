//! Project automation, run as `cargo xtask <command>`.

mod data;
mod dist;
mod docs;
mod layers;
mod nats;
mod openblas;
mod peers;
mod pgo;
mod runtime;
mod toolchain;
mod util;
mod venv;
mod wheel_test;

use std::process::Command;

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};
use python_runtime::Flavour;

use crate::util::{cargo, run, workspace_root};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Capsule's build, demo and CI tasks")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Set up everything a fresh machine lacks, build Capsule and run the hello example.
    Demo,
    /// Everything CI checks: runtime build and its reproducibility, then the whole test suite.
    Ci,
    /// Unpack the pinned `nats-server` the cluster tests use (linked as target/nats-server).
    NatsServer,
    /// Build the CPython-for-WASI runtime (cached by the hash of its inputs).
    BuildRuntime {
        /// Rebuild the final module even when its key matches.
        #[arg(long)]
        force: bool,
        /// `base`, or `data` (with numpy; compiles numpy the first time, a few minutes).
        #[arg(long, default_value = "base", value_parser = parse_flavour)]
        flavour: Flavour,
    },
    /// Rebuild the runtimes in another directory and check the results are byte-identical.
    CheckReproducible {
        /// Only this flavour (default: both).
        #[arg(long, value_parser = parse_flavour)]
        flavour: Option<Flavour>,
    },
    /// Build the Python wheel and the tar.gz of the commands and runtime (target/dist/).
    Dist {
        /// Release binaries (published), or the debug build (quick, for testing the packaging).
        #[arg(long, value_enum, default_value = "release")]
        profile: dist::Profile,
        /// Build twice and check the wheel and tarball come out byte-identical.
        #[arg(long)]
        check_reproducible: bool,
    },
    /// `cargo install` the commands into ROOT/bin and the runtime into ROOT/share/capsule/.
    Install {
        #[arg(long, value_name = "ROOT")]
        root: std::path::PathBuf,
    },
    /// Install the wheel in a fresh virtual environment outside the checkout and use it as a
    /// new user would (the CLI, `capsule.run`, the SDK's tests, `cargo install`).
    TestWheel,
    /// Many mixed invocations in one process, checking every outcome and that memory and
    /// open files stay flat, then concurrent runs sharing one journal (see BENCHMARKS.md).
    Soak {
        /// How many invocations.
        #[arg(long, default_value_t = 100_000)]
        invocations: u64,
    },
    /// The fuzz targets (manifest, capsule.toml, discovery, journal rows, signature files,
    /// daemon requests and their checks:
    /// every test named `fuzzed_*`) with many more inputs than the test suite gives them.
    Fuzz {
        /// Inputs per target.
        #[arg(long, default_value_t = 200_000)]
        iterations: u64,
    },
    /// Write the book's command-line reference from the commands, build the book (mdBook,
    /// installed once) into `target/book`, and check every relative link.
    Docs,
    /// Measure Capsule against native `python3` (see BENCHMARKS.md).
    Bench {
        /// One iteration of everything: checks the benchmark still runs, measures nothing.
        #[arg(long)]
        quick: bool,
        /// Put the results into BENCHMARKS.md.
        #[arg(long, conflicts_with = "quick")]
        write: bool,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Task::Demo => demo(),
        Task::Ci => ci(),
        Task::NatsServer => nats::ensure().map(|path| eprintln!("xtask: {}", path.display())),
        Task::BuildRuntime { force, flavour } => runtime::build_runtime(flavour, force).map(drop),
        Task::CheckReproducible { flavour } => match flavour {
            Some(flavour) => runtime::check_reproducible(&[flavour]),
            None => runtime::check_reproducible(&Flavour::ALL),
        },
        Task::Dist { profile, check_reproducible } => make_dist(profile, check_reproducible),
        Task::Install { root } => dist::install(&root),
        Task::TestWheel => wheel_test::test_wheel(&dist::dist(dist::Profile::Dev)?.wheel),
        Task::Bench { quick, write } => bench(quick, write),
        Task::Docs => docs::docs(),
        Task::Soak { invocations } => soak(invocations, "release"),
        Task::Fuzz { iterations } => run(cargo()
            .args(["test", "--lib", "-p", "manifest-schema", "-p", "capsule-build", "-p", "capsule-exec"])
            .args(["-p", "capsule-daemon", "fuzzed_"])
            .env("CAPSULE_FUZZ_ITERATIONS", iterations.to_string())),
    }
}

fn make_dist(profile: dist::Profile, check_reproducible: bool) -> Result<()> {
    if check_reproducible { reproducible_dist(profile).map(drop) } else { dist::dist(profile).map(drop) }
}

/// `dist` twice, failing unless both made the same wheel and tarball, byte for byte.
fn reproducible_dist(profile: dist::Profile) -> Result<dist::Dist> {
    let hashes = |d: &dist::Dist| -> Result<(String, String)> {
        Ok((util::sha256_file(&d.wheel)?, util::sha256_file(&d.tarball)?))
    };
    let before = hashes(&dist::dist(profile)?)?;
    let again = dist::dist(profile)?;
    if hashes(&again)? != before {
        bail!("two `dist` runs made different wheels or tarballs");
    }
    eprintln!("xtask: dist is reproducible (wheel {}, tarball {})", before.0, before.1);
    Ok(again)
}

fn parse_flavour(text: &str) -> Result<Flavour, String> {
    match text {
        "base" => Ok(Flavour::Base),
        "data" => Ok(Flavour::Data),
        _ => Err(format!("`{text}` is not a runtime flavour: `base` or `data`")),
    }
}

fn demo() -> Result<()> {
    runtime::build_runtime(Flavour::Base, false)?;
    run(cargo().args(["build", "--bin", "capsule", "--bin", "capsule-exec"]))?;
    let capsule = util::target_dir().join("debug/capsule");
    eprintln!("\nxtask: running `capsule run examples/hello.py`\n");
    run(Command::new(&capsule).args(["run", "examples/hello.py"]).current_dir(workspace_root()))?;
    eprintln!(
        "\nxtask: the demo ran. Try `{} run examples/hello.py --json Ada`, or see README.md.",
        capsule.strip_prefix(workspace_root()).unwrap_or(&capsule).display()
    );
    Ok(())
}

fn ci() -> Result<()> {
    runtime::check_reproducible(&Flavour::ALL)?;
    check_exec_has_no_compiler()?;
    nats::ensure()?;
    run(cargo().args(["test", "--workspace", "--no-fail-fast"]))?;
    // The tests checked the command-line reference; the book must build, its links lead somewhere.
    docs::build_and_check()?;
    // On the test suite's binaries, before anything rebuilds them another way.
    soak(1_000, "debug")?;
    bench(true, false)?;
    // What a new user installs, made twice to the same bytes, used as a new user would.
    wheel_test::test_wheel(&reproducible_dist(dist::Profile::Dev)?.wheel)
}

/// Runs the soak binary of `profile` (built first) for `invocations`.
fn soak(invocations: u64, profile: &str) -> Result<()> {
    runtime::build_runtime(Flavour::Base, false)?;
    build_bins(profile)?;
    run(Command::new(util::target_dir().join(profile).join("capsule-soak")).arg(invocations.to_string()))
}

/// Builds every binary of the workspace, and the SDK's native module, for `profile`. The debug
/// binaries are built the way `cargo test --workspace` builds them (a no-op after the tests
/// ran): another selection of packages would resolve other features and compile wasmtime once
/// more.
fn build_bins(profile: &str) -> Result<()> {
    let mut build = cargo();
    match profile {
        "release" => build.args(["build", "--release", "-p", "capsule-cli", "-p", "tests", "-p", "capsule-python"]),
        _ => build.args(["test", "--workspace", "--no-run"]),
    };
    run(&mut build)?;
    if profile != "release" {
        // The SDK's native module, which the tests do not build (the bench's SDK rows load it).
        run(cargo().args(["build", "-p", "capsule-python"]))?;
    }
    Ok(())
}

/// Markers around the measured table in BENCHMARKS.md; the prose outside them is kept.
const BENCH_START: &str = "<!-- bench:start -->";
const BENCH_END: &str = "<!-- bench:end -->";

fn bench(quick: bool, write: bool) -> Result<()> {
    for flavour in Flavour::ALL {
        runtime::build_runtime(flavour, false)?;
    }
    nats::ensure()?;
    // Figures are of release builds, as users run them; the quick pass only checks that the
    // benchmark still works, on the debug build CI already has.
    let profile = if quick { "debug" } else { "release" };
    build_bins(profile)?;
    let report_file = util::target_dir().join("bench/report.md");
    let mut command = Command::new(util::target_dir().join(profile).join("capsule-bench"));
    command.current_dir(workspace_root()).arg("--write").arg(&report_file);
    if quick {
        command.arg("--quick");
    } else {
        command.arg("--venv").arg(peers::bench_venv()?);
    }
    run(&mut command)?;
    if !quick {
        // What installing costs a user: the wheel's size, `pip install` and the first run.
        let rows = wheel_test::install_figures(&dist::dist(dist::Profile::Release)?.wheel)?;
        let mut report = std::fs::read_to_string(&report_file)?;
        report.push_str(&rows);
        std::fs::write(&report_file, report)?;
    }
    if write {
        let path = workspace_root().join("BENCHMARKS.md");
        let text = std::fs::read_to_string(&path)?;
        let (Some(start), Some(end)) = (text.find(BENCH_START), text.find(BENCH_END)) else {
            bail!("BENCHMARKS.md lacks the `{BENCH_START}` and `{BENCH_END}` markers");
        };
        let report = std::fs::read_to_string(&report_file)?;
        let updated = format!("{}{BENCH_START}\n{}\n{}", &text[..start], report.trim_end(), &text[end..]);
        std::fs::write(&path, updated)?;
        eprintln!("xtask: updated {}", path.display());
    }
    Ok(())
}

/// The engine, and the commands without their `build` feature, must be buildable without
/// Cranelift: runners only load precompiled code. Fails closed: a `cargo tree` that does not
/// answer is an error, not a pass.
fn check_exec_has_no_compiler() -> Result<()> {
    for (package, extra) in [("capsule-exec", None), ("capsule-cli", Some("--no-default-features"))] {
        let mut command = cargo();
        command.args(["tree", "-p", package, "-e", "normal", "--prefix", "none"]);
        command.args(extra);
        let output = command.output()?;
        if !output.status.success() {
            bail!("`cargo tree -p {package}` failed:\n{}", String::from_utf8_lossy(&output.stderr));
        }
        let tree = String::from_utf8_lossy(&output.stdout);
        if !tree.lines().any(|line| line.starts_with("wasmtime ")) {
            bail!("`cargo tree -p {package}` lists no wasmtime: the check would prove nothing");
        }
        // `cranelift-entity` and friends are data structures the runtime uses too; the compiler
        // is `cranelift-codegen`, reached through `wasmtime-internal-cranelift`.
        if let Some(line) = tree.lines().find(|line| line.starts_with("cranelift-codegen ")) {
            bail!(
                "{package} depends on Cranelift (`{line}`)\nhint: only capsule-build may enable wasmtime's `cranelift` feature"
            );
        }
    }
    eprintln!("xtask: the engine and the commands without `build` link no compiler");
    Ok(())
}
