//! The wasm C toolchain: Debian's clang 19, lld 19 and wasi-libc (and Tcl, for SQLite's
//! generated source), pinned by version and sha256; for the `data` runtime also Debian's
//! libc++ for wasm32.
//!
//! The packages come from the machine's own Debian archive through `apt-get`. Each `.deb` is
//! downloaded first, its sha256 compared with the pin below, and only then installed, so a
//! changed package fails loudly instead of silently changing the runtime.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::util::{output, run, sha256_file, write_executable};

pub struct DebPackage {
    pub name: &'static str,
    pub version: &'static str,
    pub sha256: &'static str,
}

pub const PACKAGES: &[DebPackage] = &[
    DebPackage {
        name: "clang-19",
        version: "1:19.1.7-3~deb12u1",
        sha256: "89ab931a9bbfd567a76df3141af5d5ec67b01d800150e614f2c9bf4671da9b08",
    },
    DebPackage {
        name: "lld-19",
        version: "1:19.1.7-3~deb12u1",
        sha256: "416e084363a16a7060eaa6343ed641dfe864b8208c39170ee00a5679e4b486a2",
    },
    DebPackage {
        name: "llvm-19",
        version: "1:19.1.7-3~deb12u1",
        sha256: "f91492c5b361ff12f540b9f6145cf638b5e0fb3f145fceabd6c4b9540eab4bf9",
    },
    DebPackage {
        name: "wasi-libc",
        version: "0.0~git20220510.9886d3d-2",
        sha256: "513e25eeca77f7e31adf928b684714dd656cc6bc70c2970abfe3b4117e3b736f",
    },
    // Runs SQLite's scripts that generate its single-file source.
    DebPackage {
        name: "libtcl8.6",
        version: "8.6.13+dfsg-2",
        sha256: "976c4235b816635e1756016f3adbabb634e8b97a9f6b97cf901be099e4fd2487",
    },
    DebPackage {
        name: "tcl8.6",
        version: "8.6.13+dfsg-2",
        sha256: "4d539bdd459ea9fd5be25bf46c3c928ae5eb9cfdb5a1bf7ca25cacc596327d9d",
    },
    DebPackage {
        name: "libclang-rt-19-dev-wasm32",
        version: "1:19.1.7-3~deb12u1",
        sha256: "a291d4ae24344016f2e05390a7875c88da6c1e2e48711607454e394604ecc669",
    },
];

/// The C++ standard library for wasm32 (numpy has C++ parts), needed by the `data` runtime
/// only. Built without exceptions: see `crates/python-runtime/data/cxx_exceptions.c`.
pub const CXX_PACKAGES: &[DebPackage] = &[
    DebPackage {
        name: "libc++-19-dev-wasm32",
        version: "1:19.1.7-3~deb12u1",
        sha256: "e2c3a1ec97f42ff660688e7a435dab7cb785211d9e9559eef86192a218c24ce8",
    },
    DebPackage {
        name: "libc++abi-19-dev-wasm32",
        version: "1:19.1.7-3~deb12u1",
        sha256: "a0835ee4cf44d41ee988e77be30d023134160a80bdea02b03a6a384c3f048e4d",
    },
];

/// Debian's single-threaded wasi-libc headers and libraries.
const WASI_INCLUDE: &str = "/usr/include/wasm32-wasi";
const WASI_LIB: &str = "/usr/lib/wasm32-wasi";

fn installed_version(name: &str) -> Option<String> {
    let out = Command::new("dpkg-query").args(["-W", "-f=${Status}|${Version}", name]).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (status, version) = text.split_once('|')?;
    status.ends_with("installed").then(|| version.to_string())
}

/// Makes sure each of `packages` is installed at its pinned version.
pub fn ensure_installed(packages: &[DebPackage], download_dir: &Path) -> Result<()> {
    let missing: Vec<&DebPackage> =
        packages.iter().filter(|p| installed_version(p.name).as_deref() != Some(p.version)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let names: Vec<&str> = missing.iter().map(|p| p.name).collect();
    eprintln!("xtask: installing the wasm C toolchain: {}", names.join(", "));
    if !is_root() {
        bail!(
            "the wasm C toolchain is not installed ({})\nhint: run `cargo xtask build-runtime` as root once, or install these Debian packages yourself",
            names.join(", ")
        );
    }
    fs::create_dir_all(download_dir)?;
    let specs: Vec<String> = missing.iter().map(|p| format!("{}={}", p.name, p.version)).collect();
    let download = |dir: &Path| run(Command::new("apt-get").arg("download").args(&specs).current_dir(dir));
    if download(download_dir).is_err() {
        // A fresh machine may have no package lists yet.
        run(Command::new("apt-get").args(["update", "-q"]))?;
        download(download_dir)?;
    }
    let mut debs = Vec::new();
    for package in &missing {
        let deb = find_deb(download_dir, package)?;
        let actual = sha256_file(&deb)?;
        if actual != package.sha256 {
            bail!(
                "`{}` has sha256 {actual}, expected {}\nhint: the archive serves a different build of {} {}; refusing to install it",
                deb.display(),
                package.sha256,
                package.name,
                package.version
            );
        }
        debs.push(deb);
    }
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&debs)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn find_deb(dir: &Path, package: &DebPackage) -> Result<PathBuf> {
    let prefix = format!("{}_", package.name);
    let version = package.version.replace(':', "%3a");
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let file = path.file_name().unwrap_or_default().to_string_lossy().into_owned();
        if file.starts_with(&prefix) && file.contains(&version) && file.ends_with(".deb") {
            return Ok(path);
        }
    }
    bail!("apt-get did not download {} {}", package.name, package.version)
}

fn is_root() -> bool {
    output(Command::new("id").arg("-u")).is_ok_and(|uid| uid == "0")
}

/// A text describing `packages`, part of the runtime's cache key.
pub fn fingerprint(packages: &[DebPackage]) -> String {
    packages.iter().map(|p| format!("{}={} {}\n", p.name, p.version, p.sha256)).collect()
}

/// Compiler wrappers that always target WASI with a private sysroot, so the host's glibc
/// headers can never leak into configure checks, and that map build paths out of the output.
pub struct Wrappers {
    pub cc: PathBuf,
    pub cpp: PathBuf,
    /// The C++ compiler; finds libc++ only once [`CXX_PACKAGES`] are installed.
    pub cxx: PathBuf,
    pub dir: PathBuf,
}

pub fn write_wrappers(dir: &Path, prefix_maps: &[(&Path, &str)]) -> Result<Wrappers> {
    let sysroot = dir.join("sysroot");
    fs::create_dir_all(sysroot.join("lib"))?;
    fs::create_dir_all(dir.join("bin"))?;
    replace_symlink(Path::new(WASI_INCLUDE), &sysroot.join("include"))?;
    replace_symlink(Path::new(WASI_LIB), &sysroot.join("lib/wasm32-wasi"))?;
    let mut flags =
        format!("--target=wasm32-wasi --sysroot={} -ffile-prefix-map={}=/toolchain", sysroot.display(), dir.display());
    for (from, to) in prefix_maps {
        flags.push_str(&format!(" -ffile-prefix-map={}={to}", from.display()));
    }
    let cc = dir.join("bin/wasi-clang");
    let cpp = dir.join("bin/wasi-clang-cpp");
    let cxx = dir.join("bin/wasi-clang++");
    write_executable(&cc, &format!("#!/bin/sh\nexec clang-19 {flags} \"$@\"\n"))?;
    write_executable(&cpp, &format!("#!/bin/sh\nexec clang-19 {flags} -E \"$@\"\n"))?;
    write_executable(&cxx, &format!("#!/bin/sh\nexec clang++-19 {flags} \"$@\"\n"))?;
    Ok(Wrappers { cc, cpp, cxx, dir: dir.to_path_buf() })
}

fn replace_symlink(target: &Path, link: &Path) -> Result<()> {
    if link.symlink_metadata().is_ok() {
        fs::remove_file(link)?;
    }
    std::os::unix::fs::symlink(target, link)
        .with_context(|| format!("linking {} to {}", link.display(), target.display()))
}
