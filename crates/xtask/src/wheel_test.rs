//! The wheel as a new user meets it: a fresh virtual environment in a folder outside the
//! checkout, `pip install` of the wheel, a `hello.py`, `capsule run hello.py`, then
//! `capsule.run("hello.py")` from Python (which starts a daemon of its own and must leave no
//! process behind), a pandas project on the data runtime, the SDK's tests, and `cargo
//! install` run from another folder.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::util::{output, run, target_dir, workspace_root};

const PYTEST: &str = "pytest==8.3.4";
/// The official MCP client, for the end-to-end test of `capsule mcp`.
const MCP_CLIENT: &str = "mcp==2.3.0";

/// A project on the data runtime, which the wheel ships too.
const PANDAS_PROJECT: &str = "import pandas as pd\nfrom capsule import task\n\n\n@task\ndef main() -> str:\n    frame = pd.DataFrame({\"k\": [\"a\", \"b\", \"a\"], \"v\": [1, 2, 3]})\n    return str(frame.groupby(\"k\")[\"v\"].sum().to_dict())\n";

const HELLO: &str = "from capsule import task\n\n\n@task(compute=\"LOW\", ram=\"64MB\", timeout=\"10s\")\ndef main(name: str = \"world\") -> str:\n    return f\"Hello, {name}!\"\n";

/// A command as a user's shell would run it: the venv first on PATH, a home of its own (so
/// no daemon of the developer's answers), nothing of this checkout.
fn user(program: &Path, home: &Path, venv: &Path, dir: &Path) -> Command {
    let mut command = Command::new(program);
    command
        .current_dir(dir)
        .env_clear()
        .env("HOME", home)
        .env("PATH", format!("{}:/usr/local/bin:/usr/bin:/bin", venv.join("bin").display()))
        .env("LANG", "C.UTF-8");
    command
}

/// A folder of its own under the system's temporary folder, removed when dropped, whether the
/// test passed or not: a failed run must not leave a virtual environment behind.
fn scratch_dir(name: &str) -> Result<tempfile::TempDir> {
    tempfile::Builder::new().prefix(&format!("{name}-")).tempdir().context("creating a temporary folder")
}

pub fn test_wheel(wheel: &Path) -> Result<()> {
    let scratch = scratch_dir("capsule-wheel-test")?;
    let base = scratch.path();
    let (venv, home, project) = (base.join("venv"), base.join("home"), base.join("project"));
    for dir in [&home, &project] {
        std::fs::create_dir_all(dir)?;
    }
    run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
    run(Command::new(venv.join("bin/pip"))
        .args(["install", "--quiet", "--disable-pip-version-check"])
        .arg(wheel)
        .args([PYTEST, MCP_CLIENT]))?;
    std::fs::write(project.join("hello.py"), HELLO)?;

    let said = output(user(&venv.join("bin/capsule"), &home, &venv, &project).args(["run", "hello.py", "Ada"]))?;
    expect(&said, "Hello, Ada!", "`capsule run hello.py Ada`")?;
    let script = "import capsule; print(capsule.run('hello.py', args=['Ada']).result)";
    let said = output(user(&venv.join("bin/python"), &home, &venv, &project).args(["-c", script]))?;
    expect(&said, "Hello, Ada!", "`capsule.run('hello.py')` from Python")?;
    let left: Vec<String> = processes_mentioning(base)?;
    if !left.is_empty() {
        bail!("`capsule.run` left processes behind: {left:?}");
    }
    let data_project = base.join("data-project");
    std::fs::create_dir_all(&data_project)?;
    std::fs::write(data_project.join("capsule.toml"), "[runtime]\nflavour = \"data\"\n")?;
    std::fs::write(data_project.join("stats.py"), PANDAS_PROJECT)?;
    let said = output(user(&venv.join("bin/capsule"), &home, &venv, &data_project).args(["run", "stats.py"]))?;
    expect(&said, "{'a': 4, 'b': 2}", "`capsule run` of a pandas project")?;

    let tests = workspace_root().join("crates/python-runtime/tests/sdk");
    run(user(&venv.join("bin/python"), &home, &venv, &project)
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
        .arg(&tests))?;
    let left: Vec<String> = processes_mentioning(base)?;
    if !left.is_empty() {
        bail!("the SDK's tests left processes behind: {left:?}");
    }

    // `cargo install` (the debug build this checkout has, into a folder of its own), run from
    // another folder: it finds the runtime this checkout built.
    let root = base.join("cargo-root");
    run(Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .current_dir(workspace_root())
        .args(["install", "--locked", "--debug", "--path", "crates/capsule-cli", "--root"])
        .arg(&root)
        .arg("--target-dir")
        .arg(target_dir()))?;
    let said = output(user(&root.join("bin/capsule"), &home, &venv, &project).args(["run", "hello.py", "Bob"]))?;
    expect(&said, "Hello, Bob!", "a `cargo install`ed `capsule run`")?;
    eprintln!("xtask: the wheel installs and works in a fresh virtual environment");
    Ok(())
}

/// Table rows for BENCHMARKS.md: the wheel's size, `pip install` of it into a fresh venv, and
/// the first `capsule run hello.py` after that (a cold build: empty caches).
pub fn install_figures(wheel: &Path) -> Result<String> {
    let scratch = scratch_dir("capsule-install-figures")?;
    let base = scratch.path();
    let (venv, home, project) = (base.join("venv"), base.join("home"), base.join("project"));
    for dir in [&home, &project] {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(project.join("hello.py"), HELLO)?;
    let started = std::time::Instant::now();
    run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
    run(Command::new(venv.join("bin/pip")).args(["install", "--quiet", "--disable-pip-version-check"]).arg(wheel))?;
    let install = started.elapsed();
    let started = std::time::Instant::now();
    let said = output(user(&venv.join("bin/capsule"), &home, &venv, &project).args(["run", "hello.py", "Ada"]))?;
    let first_run = started.elapsed();
    expect(&said, "Hello, Ada!", "the first `capsule run` after installing")?;
    let size = std::fs::metadata(wheel)?.len() as f64 / 1e6;
    Ok(format!(
        "| wheel size (release) | {size:.1} MB |  | n/a |  |\n\
         | fresh venv + `pip install` of the wheel | {:.1} s |  | n/a |  |\n\
         | first `capsule run hello.py` after installing (cold build) | {:.1} s |  | n/a |  |\n",
        install.as_secs_f64(),
        first_run.as_secs_f64()
    ))
}

fn expect(said: &str, wanted: &str, what: &str) -> Result<()> {
    if said.lines().last() != Some(wanted) {
        bail!("{what} printed {said:?}, not {wanted:?}");
    }
    Ok(())
}

/// Processes whose command line mentions `dir` (a daemon left running, say).
fn processes_mentioning(dir: &Path) -> Result<Vec<String>> {
    let needle = dir.display().to_string();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc")? {
        let path: PathBuf = entry?.path();
        let Ok(cmdline) = std::fs::read(path.join("cmdline")) else { continue };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(&needle) {
            found.push(cmdline.trim().to_string());
        }
    }
    Ok(found)
}
