//! OpenBLAS for the `data` runtime: numpy's matrix products (`cblas_dgemm`, ...) run on
//! OpenBLAS's blocked kernels, its `WASM128_GENERIC` target using wasm SIMD (`-msimd128`), and
//! so does numpy's LAPACK: OpenBLAS's own LU, Cholesky and triangular routines replace
//! `lapack_lite`'s, whose other routines call OpenBLAS's BLAS
//! (`crates/python-runtime/data/lapack_lite_blas.py`).
//!
//! The source is Debian's `openblas` source package (its `+ds` tarball drops the reference
//! LAPACK, in Fortran: no Fortran compiler targets wasm, and numpy brings its own LAPACK).
//! Built with OpenBLAS's own makefiles (`libs`: BLAS, CBLAS and OpenBLAS's LAPACK routines,
//! not the reference LAPACK): single-threaded (a sandbox runs on one thread), buffers from
//! malloc (`OS_EMBEDDED`: WASI has no mmap), no position-independent code (it is linked
//! statically). Its `xerbla_` is renamed so that numpy's, which raises a Python exception,
//! keeps the name lapack_lite calls.
//!
//! One cached layer, `openblas-wasi-<key>`: `lib/libopenblas.a` and its headers.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result};

use crate::layers::{DebianSource, data_dir, fresh_layer, hex_sha256, make_jobs, mark_complete};
use crate::toolchain;
use crate::util::run;

pub const SOURCE: DebianSource = DebianSource {
    package: "openblas",
    tarball: "openblas_0.3.34+ds.orig.tar.xz",
    sha256: "031220660e58d0afd3344a379e47ba68c6e082cb9c8a104755e8cf0af7d0da7d",
};
/// The tarball's top folder.
const SOURCE_DIR: &str = "OpenMathLib-OpenBLAS-e016600";
/// In `crates/python-runtime/data/`.
const PATCH: &str = "openblas-0.3.34-wasi.patch";

/// Variables for OpenBLAS's makefiles (the compiler is added).
const MAKE_VARIABLES: &[&str] = &[
    "TARGET=WASM128_GENERIC",
    "BINARY=32",
    "CROSS=1",
    "HOSTCC=cc",
    "AR=llvm-ar-19",
    "RANLIB=llvm-ranlib-19",
    "NOFORTRAN=1",
    "NO_LAPACKE=1",
    "NO_SHARED=1",
    "NEED_PIC=0",
    "DYNAMIC_ARCH=0",
    "USE_THREAD=0",
    "NUM_THREADS=1",
    "USE_OPENMP=0",
    "NO_AFFINITY=1",
    "COMMON_OPT=-O2 -DOS_EMBEDDED -Dxerbla_=openblas_xerbla_",
];

/// The built library.
pub struct OpenBlas {
    dir: PathBuf,
}

impl OpenBlas {
    pub fn lib_dir(&self) -> PathBuf {
        self.dir.join("lib")
    }

    pub fn include_dir(&self) -> PathBuf {
        self.dir.join("include")
    }

    pub fn archive(&self) -> PathBuf {
        self.lib_dir().join("libopenblas.a")
    }
}

fn patch_file() -> PathBuf {
    data_dir().join(PATCH)
}

/// Every input: the toolchain, the source, the patch, this file.
pub fn key() -> Result<String> {
    let patch = fs::read(patch_file()).with_context(|| format!("reading {}", patch_file().display()))?;
    Ok(hex_sha256(&[
        toolchain::fingerprint(toolchain::PACKAGES).as_bytes(),
        SOURCE.sha256.as_bytes(),
        &patch,
        include_bytes!("openblas.rs"),
    ]))
}

/// Builds OpenBLAS below `base` from `tarball` unless its layer is complete.
pub fn build(base: &Path, tarball: &Path) -> Result<OpenBlas> {
    let dir = base.join(format!("openblas-wasi-{}", &key()?[..16]));
    let built = OpenBlas { dir: dir.clone() };
    if !fresh_layer(&dir)? {
        return Ok(built);
    }
    let started = Instant::now();
    eprintln!("xtask: compiling OpenBLAS for WASI (about a minute, once per machine)");
    run(Command::new("tar").arg("xf").arg(tarball).arg("-C").arg(&dir))?;
    let src = dir.join(SOURCE_DIR);
    run(Command::new("patch").args(["-s", "-p1", "-i"]).arg(patch_file()).current_dir(&src))?;
    let wrappers = toolchain::write_wrappers(&dir.join("toolchain"), &[(&src, "/openblas")])?;
    let make = |target: &str| {
        let mut command = Command::new("make");
        command
            .arg(make_jobs())
            .arg(format!("CC={}", wrappers.cc.display()))
            .args(MAKE_VARIABLES)
            .arg(format!("PREFIX={}", dir.display()))
            .arg(target)
            .current_dir(&src);
        command
    };
    run(&mut make("libs"))?;
    run(&mut make("install"))?;
    // Only the archive and the headers are used; the rest names this folder.
    for leftover in [src, wrappers.dir, dir.join("bin"), dir.join("lib/cmake"), dir.join("lib/pkgconfig")] {
        fs::remove_dir_all(&leftover).with_context(|| format!("removing {}", leftover.display()))?;
    }
    mark_complete(&dir)?;
    eprintln!("xtask: OpenBLAS for WASI built in {:.0?}", started.elapsed());
    Ok(built)
}
