//! numpy for the `data` runtime: its PyPI sdist cross-compiled for WASI by numpy's own meson
//! build, with each extension module made a static archive that the data reactor links in
//! as a built-in module.
//!
//! meson's files are used as they are; compiler wrappers do the rest: a `-shared` link (an
//! extension module) writes an archive instead (`data/static_extension.py`), `-fPIC` is
//! dropped (a static link needs no position-independent code), and `numpy.random.mtrand`,
//! which compiles its own copy of the `random_*` functions, gets them renamed
//! (`data/npy_random_legacy_rename.h`). The sdist is patched (`data/numpy-*-wasi.patch`).
//! Cython and ninja come from their PyPI wheels; meson is the copy numpy vendors.
//!
//! One cached layer, `numpy-wasi-<key>`, keyed by every input, holds the archives,
//! `modules.tsv` (dotted name, init function, archive) and the Python files (`site/`).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::runtime::{Libpython, PypiFile, fresh_layer, hex_sha256, make_jobs, tree_contents};
use crate::toolchain::{self, Wrappers};
use crate::util::{run, workspace_root, write_executable};

const NUMPY_VERSION: &str = "2.4.6";

const NUMPY_SDIST: PypiFile = PypiFile {
    file: "numpy-2.4.6.tar.gz",
    url: "https://files.pythonhosted.org/packages/d0/ad/fed0499ce6a338d2a03ebae59cd15093910c8875328855781952abf6c2fe/numpy-2.4.6.tar.gz",
    sha256: "f3a3570c4a2a16746ac2c31a7c7c7b0c186b95ce902e33db6f28094ed7387dda",
};

/// Compiled for CPython 3.13, the native build Python that runs it.
const CYTHON_WHEEL: PypiFile = PypiFile {
    file: "cython-3.1.8-cp313-cp313-manylinux2014_x86_64.manylinux_2_17_x86_64.manylinux_2_28_x86_64.whl",
    url: "https://files.pythonhosted.org/packages/97/59/aaa43285de4970857787c4f43ae5a4f6bb40001c161552e1fe1b6bb5274b/cython-3.1.8-cp313-cp313-manylinux2014_x86_64.manylinux_2_17_x86_64.manylinux_2_28_x86_64.whl",
    sha256: "03959ed8996e16550267469187442f3926ea3ba4bb220a06714e6203e4cb6017",
};

const NINJA_WHEEL: PypiFile = PypiFile {
    file: "ninja-1.13.2-py3-none-manylinux2014_x86_64.manylinux_2_17_x86_64.whl",
    url: "https://files.pythonhosted.org/packages/6e/53/ebfed7b689c338dd8ebeec9c0730c8d56821292f14e2536e5f3ef1a05744/ninja-1.13.2-py3-none-manylinux2014_x86_64.manylinux_2_17_x86_64.whl",
    sha256: "65a24341b5ac09fcadcc37082660be40a94174e51a937fabf6e2cae26225fa2c",
};

/// numpy's build options: no BLAS library (numpy's own lapack_lite), no threads.
const MESON_OPTIONS: &[&str] = &[
    "--buildtype=release",
    "-Db_ndebug=if-release",
    "-Dblas=none",
    "-Dlapack=none",
    "-Dallow-noblas=true",
    "-Ddisable-threading=true",
    "--prefix=/",
];

/// Preprocessor and warning flags for every numpy C and C++ file: no signal handling (WASI
/// has none), wasi-libc's emulations as CPython uses them.
const NUMPY_FLAGS: &[&str] = &[
    "-DNPY_NO_SIGNAL",
    "-D_WASI_EMULATED_SIGNAL",
    "-D_WASI_EMULATED_PROCESS_CLOCKS",
    "-D_WASI_EMULATED_GETPID",
    "-Wno-return-type",
];

/// The downloaded inputs, each checked against its pin.
pub struct NumpySources {
    sdist: PathBuf,
    cython: PathBuf,
    ninja: PathBuf,
}

impl NumpySources {
    pub fn fetch(downloads: &Path) -> Result<Self> {
        toolchain::ensure_installed(toolchain::CXX_PACKAGES, downloads)?;
        Ok(Self {
            sdist: NUMPY_SDIST.fetch(downloads)?,
            cython: CYTHON_WHEEL.fetch(downloads)?,
            ninja: NINJA_WHEEL.fetch(downloads)?,
        })
    }
}

/// numpy, built: what the data reactor links and packs.
pub struct Numpy {
    /// The archives, `modules.tsv` beside them.
    pub lib: PathBuf,
    /// numpy's Python files, as `site/numpy/...`.
    pub site: PathBuf,
}

impl Numpy {
    /// The extension modules: (dotted name, init function, archive), in link order.
    pub fn modules(&self) -> Result<Vec<(String, String, PathBuf)>> {
        let table = self.lib.join("modules.tsv");
        let text = fs::read_to_string(&table).with_context(|| format!("reading {}", table.display()))?;
        text.lines()
            .map(|line| match line.split('\t').collect::<Vec<_>>().as_slice() {
                [name, init, archive] => Ok((name.to_string(), init.to_string(), self.lib.join(archive))),
                _ => bail!("{}: malformed line {line:?}", table.display()),
            })
            .collect()
    }

    /// The archives shared by several modules, after the modules' own.
    pub fn support_archives(&self) -> Vec<PathBuf> {
        ["libnumpy_shared.a", "libnpyrandom.a", "libnpymath.a"]
            .iter()
            .map(|name| self.lib.join(name))
            .filter(|path| path.exists())
            .collect()
    }
}

fn data_dir() -> PathBuf {
    workspace_root().join("crates/python-runtime/data")
}

/// Key of the numpy layer: its pins, this file, the data folder, and the `libpython` layer
/// (numpy compiles against its headers and `pyconfig.h`).
pub fn key(cpython_key: &str) -> Result<String> {
    let mut parts: Vec<Vec<u8>> = vec![
        cpython_key.as_bytes().to_vec(),
        include_bytes!("numpy.rs").to_vec(),
        toolchain::fingerprint(toolchain::CXX_PACKAGES).into_bytes(),
    ];
    for pin in [&NUMPY_SDIST, &CYTHON_WHEEL, &NINJA_WHEEL] {
        parts.push(pin.sha256.as_bytes().to_vec());
    }
    for (rel, contents) in tree_contents(&data_dir())? {
        parts.push(rel.into_bytes());
        parts.push(contents);
    }
    let borrowed: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
    Ok(hex_sha256(&borrowed))
}

/// Builds numpy below `base` unless its layer is complete.
pub fn build_numpy(
    base: &Path,
    sources: &NumpySources,
    libs: &Libpython,
    build_python: &Path,
    cpython_key: &str,
) -> Result<Numpy> {
    let dir = base.join(format!("numpy-wasi-{}", &key(cpython_key)?[..16]));
    let numpy = Numpy { lib: dir.join("lib"), site: dir.join("site") };
    if !fresh_layer(&dir)? {
        return Ok(numpy);
    }
    let started = Instant::now();
    eprintln!("xtask: compiling numpy {NUMPY_VERSION} for WASI (a few minutes, once per machine)");
    let src = dir.join(format!("numpy-{NUMPY_VERSION}"));
    run(Command::new("tar").arg("xf").arg(&sources.sdist).arg("-C").arg(&dir))?;
    let patch = data_dir().join(format!("numpy-{NUMPY_VERSION}-wasi.patch"));
    run(Command::new("patch").args(["-s", "-p1", "-i"]).arg(&patch).current_dir(&src))?;

    // Cython and ninja, unpacked from their wheels (zip files; ninja's binary loses its mode).
    let tools = dir.join("tools");
    let pylib = tools.join("pylib");
    for wheel in [&sources.cython, &sources.ninja] {
        run(Command::new(build_python).args(["-m", "zipfile", "-e"]).arg(wheel).arg(&pylib))?;
    }
    // Meson looks for both on PATH (a cross file's `cython` is not used for the host).
    let bin = tools.join("bin");
    fs::create_dir_all(&bin)?;
    let ninja = bin.join("ninja");
    fs::rename(pylib.join("ninja-1.13.2.data/scripts/ninja"), &ninja)?;
    fs::set_permissions(&ninja, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    write_executable(
        &bin.join("cython"),
        &format!(
            "#!/bin/sh\nPYTHONPATH={} exec {} -c 'import sys; from Cython.Compiler.Main import setuptools_main; sys.exit(setuptools_main())' \"$@\"\n",
            pylib.display(),
            build_python.display()
        ),
    )?;

    let build = dir.join("build");
    let wrappers = toolchain::write_wrappers(
        &tools.join("toolchain"),
        &[(&dir, "/numpy"), (&libs.src, "/cpython"), (&data_dir(), "/data")],
    )?;
    let cross_file = write_cross_file(&tools, &wrappers, libs, build_python)?;
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    let meson = |args: &[&str]| {
        let mut command = Command::new(build_python);
        command
            .arg(src.join("vendored-meson/meson/meson.py"))
            .args(args)
            .current_dir(&src)
            .env("PATH", &path)
            .env("SOURCE_DATE_EPOCH", "0");
        command
    };
    run(meson(&["setup"]).arg(&build).arg("--cross-file").arg(&cross_file).args(MESON_OPTIONS))?;
    run(Command::new(&ninja).arg("-C").arg(&build).arg(make_jobs()).env("PATH", &path))?;
    let stage = dir.join("stage");
    run(meson(&["install", "--no-rebuild", "--quiet", "--tags", "runtime,python-runtime", "-C"])
        .arg(&build)
        .arg("--destdir")
        .arg(&stage))?;
    let site_packages = stage.join("lib/python3.13/site-packages");
    run(Command::new(build_python)
        .arg(data_dir().join("collect_archives.py"))
        .arg("llvm-ar-19")
        .arg(&build)
        .arg(&site_packages)
        .arg(&numpy.lib))?;
    fs::create_dir_all(&numpy.site)?;
    fs::rename(site_packages.join("numpy"), numpy.site.join("numpy"))?;
    for leftover in [&src, &build, &stage, &tools] {
        fs::remove_dir_all(leftover).with_context(|| format!("removing {}", leftover.display()))?;
    }
    fs::write(dir.join(".complete"), "")?;
    eprintln!("xtask: numpy for WASI built in {:.0?}", started.elapsed());
    Ok(numpy)
}

/// The meson cross file and the compiler wrappers it names.
fn write_cross_file(tools: &Path, wrappers: &Wrappers, libs: &Libpython, build_python: &Path) -> Result<PathBuf> {
    let static_extension = data_dir().join("static_extension.py");
    let rename = data_dir().join("npy_random_legacy_rename.h");
    // A `-shared` link makes an archive; no -fPIC; mtrand's objects get the renames.
    let wrapper = |compiler: &Path, per_argument: &str| {
        format!(
            "#!/bin/sh\n\
             for arg in \"$@\"; do [ \"$arg\" = -shared ] && exec {python} {static_extension} llvm-ar-19 \"$@\"; done\n\
             extra=\n\
             for arg do\n  shift\n  case \"$arg\" in\n    -fPIC|-fpic) continue ;;\n{per_argument}  esac\n  set -- \"$@\" \"$arg\"\ndone\n\
             exec {compiler} $extra \"$@\"\n",
            python = build_python.display(),
            static_extension = static_extension.display(),
            compiler = compiler.display(),
        )
    };
    let mtrand = format!("    */mtrand.cpython-*.so.p/*.o) extra=\"-include {}\" ;;\n", rename.display());
    let cc = tools.join("wasi-cc");
    let cxx = tools.join("wasi-c++");
    write_executable(&cc, &wrapper(&wrappers.cc, &mtrand))?;
    write_executable(&cxx, &wrapper(&wrappers.cxx, ""))?;

    // Meson asks this Python about the target: the native build Python, told to report the
    // WASI build's configuration (extension suffix, headers, `pyconfig.h`).
    let python = tools.join("python-wasi-cross");
    let target_lib = libs.build.join(format!("build/lib.wasi-wasm32-{}", crate::runtime::PYTHON_MINOR));
    write_executable(
        &python,
        &format!(
            "#!/bin/sh\n\
             export _PYTHON_PROJECT_BASE={base}\n\
             export _PYTHON_HOST_PLATFORM=wasi-wasm32\n\
             export _PYTHON_SYSCONFIGDATA_NAME=_sysconfigdata__wasi_wasm32-wasi\n\
             export PYTHONPATH={target_lib}\n\
             exec {build_python} \"$@\"\n",
            base = libs.build.display(),
            target_lib = target_lib.display(),
            build_python = build_python.display(),
        ),
    )?;
    let quoted = |flags: &[&str]| flags.iter().map(|f| format!("'{f}'")).collect::<Vec<_>>().join(", ");
    let cross = tools.join("wasi.cross");
    fs::write(
        &cross,
        format!(
            "[binaries]\n\
             c = '{cc}'\n\
             cpp = '{cxx}'\n\
             ar = 'llvm-ar-19'\n\
             ranlib = 'llvm-ranlib-19'\n\
             strip = 'llvm-strip-19'\n\
             nm = 'llvm-nm-19'\n\
             python = '{python}'\n\
             pkg-config = 'false'\n\
             \n\
             [built-in options]\n\
             c_args = [{flags}]\n\
             # CPython's WASI pthread stubs use C99 `restrict`, which C++ does not have.\n\
             cpp_args = [{flags}, '-Drestrict=__restrict']\n\
             \n\
             [properties]\n\
             needs_exe_wrapper = true\n\
             longdouble_format = 'IEEE_QUAD_LE'\n\
             \n\
             [host_machine]\n\
             system = 'wasi'\n\
             cpu_family = 'wasm32'\n\
             cpu = 'wasm32'\n\
             endian = 'little'\n",
            cc = cc.display(),
            cxx = cxx.display(),
            python = python.display(),
            flags = quoted(NUMPY_FLAGS),
        ),
    )?;
    Ok(cross)
}
