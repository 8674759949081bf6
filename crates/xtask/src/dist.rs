//! `cargo xtask dist`: what users install. A Python wheel per platform (maturin, PyO3
//! bindings: the `capsule` Python package with its native module `capsule._native`, the engine
//! and builder in process; the `capsule` and `capsule-exec` commands as the wheel's scripts;
//! the runtimes (base and data) under `share/capsule/` with their sha256), and a `tar.gz` of
//! the commands and runtimes for servers. Both reproducible: timestamps from `SOURCE_DATE_EPOCH`, files in a fixed order.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use python_runtime::Flavour;

use crate::util::{forget_xtask_package, run, sha256_file, target_dir, workspace_root};
use crate::venv::{Missing, Venv};

/// The wheel builder, pinned.
const MATURIN: &str = "maturin==1.16.0";
/// The commands the wheel and the tarball carry.
const COMMANDS: [&str; 2] = ["capsule", "capsule-exec"];
/// What every timestamp in the archives says: 1980-01-01, the earliest a zip can hold. Every
/// cargo build of the workspace sees it too (`.cargo/config.toml`).
const SOURCE_DATE_EPOCH: &str = "315532800";

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Profile {
    /// Optimised binaries, as published.
    Release,
    /// The debug build the tests use: the same packaging, built in a minute (CI's wheel test).
    Dev,
}

impl Profile {
    fn dir(self) -> &'static str {
        match self {
            Self::Release => "release",
            Self::Dev => "debug",
        }
    }
}

/// What `dist` made.
pub struct Dist {
    pub wheel: PathBuf,
    pub tarball: PathBuf,
}

/// Copies the runtime of every flavour into `share`, each with its `.sha256` beside it;
/// returns the files' names.
fn install_runtimes(share: &Path) -> Result<Vec<String>> {
    fs::create_dir_all(share)?;
    let mut files = Vec::new();
    for flavour in Flavour::ALL {
        let runtime = crate::runtime::build_runtime(flavour, false)?;
        let name = flavour.file_name();
        fs::copy(&runtime, share.join(name))?;
        fs::write(share.join(format!("{name}.sha256")), format!("{}  {name}\n", sha256_file(&runtime)?))?;
        files.extend([name.to_string(), format!("{name}.sha256")]);
    }
    Ok(files)
}

pub fn dist(profile: Profile) -> Result<Dist> {
    let out = target_dir().join("dist").join(profile.dir());
    let _ = fs::remove_dir_all(&out);
    fs::create_dir_all(&out)?;

    // Staged where pyproject.toml's `data` says: the runtimes installed as `share/capsule/`,
    // the commands as scripts (on PATH in the environment).
    let staged = target_dir().join("dist/wheel-data");
    let share = staged.join("data/share/capsule");
    let _ = fs::remove_dir_all(&staged);
    let runtime_files = install_runtimes(&share)?;
    let mut cargo = crate::util::cargo();
    cargo.current_dir(workspace_root()).args(["build", "--locked", "-p", "capsule-cli", "--bins"]);
    match profile {
        Profile::Release => cargo.arg("--release"),
        Profile::Dev => &mut cargo,
    };
    run(&mut cargo)?;
    fs::create_dir_all(staged.join("scripts"))?;
    for binary in COMMANDS {
        let built = target_dir().join(profile.dir()).join(binary);
        let copy = staged.join("scripts").join(binary);
        fs::copy(&built, &copy).with_context(|| format!("copying {}", built.display()))?;
        run(Command::new("strip").arg(&copy))?;
    }

    let tools = Venv::ensure("dist-tools", &[MATURIN], Missing::Fail)?;
    let mut maturin = Command::new(tools.bin("maturin"));
    forget_xtask_package(&mut maturin)
        .current_dir(workspace_root())
        .env("SOURCE_DATE_EPOCH", SOURCE_DATE_EPOCH)
        .args(["build", "--out"])
        .arg(&out);
    match profile {
        Profile::Release => maturin.arg("--release"),
        Profile::Dev => maturin.args(["--profile", "dev"]),
    };
    run(&mut maturin)?;
    let wheel = only_file(&out, ".whl")?;

    let tarball = tarball(&out, &staged, &runtime_files)?;
    for file in [&wheel, &tarball] {
        let size = fs::metadata(file)?.len();
        eprintln!("xtask: {} ({:.1} MB, sha256 {})", file.display(), size as f64 / 1e6, sha256_file(file)?);
    }
    Ok(Dist { wheel, tarball })
}

fn only_file(dir: &Path, suffix: &str) -> Result<PathBuf> {
    let mut found: Vec<PathBuf> = fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().ends_with(suffix))
        .collect();
    match found.len() {
        1 => Ok(found.remove(0)),
        n => bail!("expected one {suffix} in {}, found {n}", dir.display()),
    }
}

/// `capsule-<version>-linux-<arch>.tar.gz`: the staged commands in `bin/`, the runtimes in
/// `share/capsule/`, the README and the book's pages.
fn tarball(out: &Path, staged: &Path, runtime_files: &[String]) -> Result<PathBuf> {
    let name = format!("capsule-{}-linux-{}", env!("CARGO_PKG_VERSION"), std::env::consts::ARCH);
    let root = out.join(&name);
    fs::create_dir_all(root.join("bin"))?;
    fs::create_dir_all(root.join("share/capsule"))?;
    fs::create_dir_all(root.join("docs"))?;
    for binary in COMMANDS {
        fs::copy(staged.join("scripts").join(binary), root.join("bin").join(binary))?;
    }
    for file in runtime_files {
        fs::copy(staged.join("data/share/capsule").join(file), root.join("share/capsule").join(file))?;
    }
    for file in ["README.md", "SECURITY.md", "CHANGELOG.md"] {
        fs::copy(workspace_root().join(file), root.join(file))?;
    }
    // The book's pages, as Markdown.
    copy_tree(&workspace_root().join("docs/src"), &root.join("docs"))?;
    let tarball = out.join(format!("{name}.tar.gz"));
    // Same bytes every time: sorted names, one timestamp, no owners, no gzip timestamp.
    let script = format!(
        "tar --sort=name --mtime=@{SOURCE_DATE_EPOCH} --owner=0 --group=0 --numeric-owner -cf - '{name}' | gzip -9 -n > '{}'",
        tarball.display()
    );
    run(Command::new("sh").arg("-c").arg(script).current_dir(out))?;
    fs::remove_dir_all(&root)?;
    Ok(tarball)
}

/// Copies the files of `from` (and its folders) into `to`.
fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    fs::create_dir_all(to)?;
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else {
            fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

/// `cargo xtask install --root DIR`: the commands into `DIR/bin`, the runtimes into
/// `DIR/share/capsule/` (where an installed `capsule` looks for them).
pub fn install(root: &Path) -> Result<()> {
    let share = root.join("share/capsule");
    install_runtimes(&share)?;
    run(Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .current_dir(workspace_root())
        .args(["install", "--locked", "--path", "crates/capsule-cli", "--root"])
        .arg(root))?;
    eprintln!(
        "xtask: installed `capsule` and `capsule-exec` in {}, the runtimes in {}",
        root.join("bin").display(),
        share.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The wheel's maturin build and every other build must see one value, or each would
    /// rebuild what the other built (see `.cargo/config.toml`).
    #[test]
    fn cargo_builds_see_the_timestamp_the_wheel_is_built_with() {
        let config = fs::read_to_string(workspace_root().join(".cargo/config.toml")).unwrap();
        assert!(config.contains(&format!("SOURCE_DATE_EPOCH = \"{SOURCE_DATE_EPOCH}\"")), "{config}");
    }
}
