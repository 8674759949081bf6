//! The `data` runtime's packages, numpy and pandas: their PyPI sdists cross-compiled for WASI
//! by their own meson builds, each extension module made a static archive that the data
//! reactor links in as a built-in module.
//!
//! The packages' meson files are used as they are; compiler wrappers do the rest: a
//! `-shared` link (an extension module) writes an archive instead
//! (`data/static_extension.py`), `-fPIC` is dropped (a static link needs no
//! position-independent code), and objects whose functions would clash in one static link
//! get them renamed by a forced include. Each sdist is patched (`data/<name>-*-wasi.patch`).
//! Cython and ninja come from their PyPI wheels; meson is the copy numpy vendors. numpy's
//! BLAS is OpenBLAS ([`crate::openblas`]), built first.
//!
//! One cached layer per package, `<name>-wasi-<key>`, keyed by every input (pandas' key
//! includes numpy's: it compiles against numpy's headers), holds the archives, `modules.tsv`
//! (dotted name, init function, archive) and the Python files (`site/`).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::layers::{RegistryFile, data_dir, fresh_layer, hex_sha256, make_jobs, mark_complete, tree_contents};
use crate::openblas::{self, OpenBlas};
use crate::toolchain::{self, Wrappers};
use crate::util::{run, write_executable};

/// A package built by its own meson build.
struct MesonPackage {
    name: &'static str,
    version: &'static str,
    sdist: RegistryFile,
    /// Options to `meson setup`.
    options: &'static [&'static str],
    /// Objects (a shell `case` pattern on the object's path) and the header force-included
    /// into them, which renames functions that another object defines too.
    renames: &'static [(&'static str, &'static str)],
    /// Static libraries of the build shared by several of its modules, linked once.
    helpers: &'static [&'static str],
    /// What `meson install` installs: `--tags`, or everything.
    install_tags: Option<&'static str>,
    /// Links OpenBLAS (its archive is linked after the package's), and its LAPACK
    /// (`lapack_lite`) is pointed at OpenBLAS by [`LAPACK_LITE_SCRIPT`].
    links_blas: bool,
}

const NUMPY: MesonPackage = MesonPackage {
    name: "numpy",
    version: "2.4.6",
    sdist: RegistryFile {
        file: "numpy-2.4.6.tar.gz",
        url: "https://files.pythonhosted.org/packages/d0/ad/fed0499ce6a338d2a03ebae59cd15093910c8875328855781952abf6c2fe/numpy-2.4.6.tar.gz",
        sha256: "f3a3570c4a2a16746ac2c31a7c7c7b0c186b95ce902e33db6f28094ed7387dda",
    },
    // OpenBLAS for BLAS, numpy's own lapack_lite for LAPACK (on OpenBLAS's BLAS), no threads.
    // (`allow-noblas` is about LAPACK here; the tests check that numpy reports OpenBLAS.)
    options: &["-Dblas=openblas", "-Dlapack=none", "-Dallow-noblas=true", "-Ddisable-threading=true"],
    // `numpy.random.mtrand` compiles its own copy of the `random_*` functions.
    renames: &[("*/mtrand.cpython-*.so.p/*.o", "npy_random_legacy_rename.h")],
    helpers: &["numpy/_core/libnpymath.a", "numpy/random/libnpyrandom.a"],
    // Not the tests (their extension modules would be linked in); `devel` brings the headers
    // pandas compiles against.
    install_tags: Some("runtime,python-runtime,devel"),
    links_blas: true,
};

const PANDAS: MesonPackage = MesonPackage {
    name: "pandas",
    version: "3.0.6",
    sdist: RegistryFile {
        file: "pandas-3.0.6.tar.gz",
        url: "https://files.pythonhosted.org/packages/e2/17/d7b106e05bfa642e8694451e7d3d759c6a241c5386a5d962e4f66c047e06/pandas-3.0.6.tar.gz",
        sha256: "66b07ef7315a31bfe1089cd3d71a7de781c9dca986762d0b4fe7c0ef17465d10",
    },
    options: &[],
    // Its vendored copy of numpy's datetime functions, in the module that defines them.
    renames: &[("*/pandas_datetime.cpython-*.so.p/*.o", "pandas_rename.h")],
    helpers: &[],
    // Its Python subpackages are installed untagged.
    install_tags: None,
    links_blas: false,
};

impl MesonPackage {
    /// The patch applied to the sdist, in `data/`.
    fn patch(&self) -> String {
        format!("{}-{}-wasi.patch", self.name, self.version)
    }
}

/// Built in this order: each may compile against those before it.
const PACKAGES: &[&MesonPackage] = &[&NUMPY, &PANDAS];

/// The pure-Python packages pandas imports, packed from their wheels.
pub const PURE_WHEELS: &[RegistryFile] = &[
    RegistryFile {
        file: "python_dateutil-2.9.0.post0-py2.py3-none-any.whl",
        url: "https://files.pythonhosted.org/packages/ec/57/56b9bcc3c9c6a792fcbaf139543cee77261f3651ca9da0c93f5c1221264b/python_dateutil-2.9.0.post0-py2.py3-none-any.whl",
        sha256: "a8b2bc7bffae282281c8140a97d3aa9c14da0b136dfe83f850eea9a5f7470427",
    },
    RegistryFile {
        file: "six-1.17.0-py2.py3-none-any.whl",
        url: "https://files.pythonhosted.org/packages/b7/ce/149a00dd41f10bc29e5921b496af8b574d8413afcd5e30dfa0ed46c2cc5e/six-1.17.0-py2.py3-none-any.whl",
        sha256: "4721f391ed90541fddacab5acf947aa0d3dc7d27b2e1e8eda2be8970586c3274",
    },
];

/// Compiled for CPython 3.13, the native build Python that runs it.
const CYTHON_WHEEL: RegistryFile = RegistryFile {
    file: "cython-3.1.8-cp313-cp313-manylinux2014_x86_64.manylinux_2_17_x86_64.manylinux_2_28_x86_64.whl",
    url: "https://files.pythonhosted.org/packages/97/59/aaa43285de4970857787c4f43ae5a4f6bb40001c161552e1fe1b6bb5274b/cython-3.1.8-cp313-cp313-manylinux2014_x86_64.manylinux_2_17_x86_64.manylinux_2_28_x86_64.whl",
    sha256: "03959ed8996e16550267469187442f3926ea3ba4bb220a06714e6203e4cb6017",
};

const NINJA_WHEEL: RegistryFile = RegistryFile {
    file: "ninja-1.13.2-py3-none-manylinux2014_x86_64.manylinux_2_17_x86_64.whl",
    url: "https://files.pythonhosted.org/packages/6e/53/ebfed7b689c338dd8ebeec9c0730c8d56821292f14e2536e5f3ef1a05744/ninja-1.13.2-py3-none-manylinux2014_x86_64.manylinux_2_17_x86_64.whl",
    sha256: "65a24341b5ac09fcadcc37082660be40a94174e51a937fabf6e2cae26225fa2c",
};

/// meson options every package gets.
const MESON_OPTIONS: &[&str] = &["--buildtype=release", "-Db_ndebug=if-release", "--prefix=/"];

/// Preprocessor and warning flags for every C and C++ file: no signal handling (WASI has
/// none), wasi-libc's emulations as CPython uses them.
const FLAGS: &[&str] = &[
    "-DNPY_NO_SIGNAL",
    "-D_WASI_EMULATED_SIGNAL",
    "-D_WASI_EMULATED_PROCESS_CLOCKS",
    "-D_WASI_EMULATED_GETPID",
    "-Wno-return-type",
];

/// The downloaded inputs, each checked against its pin.
pub struct DataSources {
    sdists: Vec<PathBuf>,
    openblas: PathBuf,
    cython: PathBuf,
    ninja: PathBuf,
    /// [`PURE_WHEELS`], in order.
    pub wheels: Vec<PathBuf>,
}

impl DataSources {
    pub fn fetch(downloads: &Path) -> Result<Self> {
        toolchain::ensure_installed(toolchain::CXX_PACKAGES, downloads)?;
        Ok(Self {
            sdists: PACKAGES.iter().map(|p| p.sdist.fetch(downloads)).collect::<Result<_>>()?,
            openblas: openblas::SOURCE.fetch(downloads)?,
            cython: CYTHON_WHEEL.fetch(downloads)?,
            ninja: NINJA_WHEEL.fetch(downloads)?,
            wheels: PURE_WHEELS.iter().map(|w| w.fetch(downloads)).collect::<Result<_>>()?,
        })
    }
}

/// The WASI CPython the packages compile against.
pub struct TargetPython<'a> {
    /// Its source tree (the headers).
    pub src: &'a Path,
    /// Its build folder (`pyconfig.h`).
    pub build: &'a Path,
    /// The folder of its `_sysconfigdata` module.
    pub sysconfig_dir: &'a Path,
}

/// One package, built: what the data reactor links and packs.
pub struct BuiltPackage {
    /// The archives, `modules.tsv` beside them.
    lib: PathBuf,
    /// The package's Python files, as `site/<name>/...`.
    pub site: PathBuf,
    helpers: Vec<PathBuf>,
}

impl BuiltPackage {
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

    /// The archives shared by several modules, to link after the modules' own.
    pub fn support_archives(&self) -> Vec<PathBuf> {
        std::iter::once(self.lib.join(SHARED_ARCHIVE))
            .filter(|path| path.exists())
            .chain(self.helpers.clone())
            .collect()
    }
}

/// Written by `collect_archives.py`: objects several modules of a package compile alike.
const SHARED_ARCHIVE: &str = "libshared.a";

/// Run on the patched source of a package that links OpenBLAS: too mechanical an edit for a
/// patch.
const LAPACK_LITE_SCRIPT: &str = "lapack_lite_blas.py";

/// The files of `data/` every package's build uses.
const BUILD_SCRIPTS: &[&str] = &["static_extension.py", "collect_archives.py"];

/// Key of the layer of `PACKAGES[index]`: the `libpython` layer (the packages compile
/// against its headers and `pyconfig.h`), OpenBLAS's, this file, the tools, and the pins and
/// files of this package and those before it (pandas compiles against numpy).
fn layer_key(cpython_key: &str, index: usize) -> Result<String> {
    let mut parts: Vec<Vec<u8>> = vec![
        cpython_key.as_bytes().to_vec(),
        openblas::key()?.into_bytes(),
        include_bytes!("data.rs").to_vec(),
        toolchain::fingerprint(toolchain::CXX_PACKAGES).into_bytes(),
        CYTHON_WHEEL.sha256.as_bytes().to_vec(),
        NINJA_WHEEL.sha256.as_bytes().to_vec(),
    ];
    let mut files: Vec<String> = BUILD_SCRIPTS.iter().map(|f| f.to_string()).collect();
    for package in &PACKAGES[..=index] {
        parts.push(package.sdist.sha256.as_bytes().to_vec());
        files.push(package.patch());
        files.extend(package.renames.iter().map(|(_, header)| header.to_string()));
        if package.links_blas {
            files.push(LAPACK_LITE_SCRIPT.to_string());
        }
    }
    for file in files {
        let path = data_dir().join(&file);
        parts.push(fs::read(&path).with_context(|| format!("reading {}", path.display()))?);
        parts.push(file.into_bytes());
    }
    let borrowed: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
    Ok(hex_sha256(&borrowed))
}

/// Key of everything the data flavour adds: the last layer's key (which covers the others),
/// the pure-Python wheels, and every file of `data/`.
pub fn key(cpython_key: &str) -> Result<String> {
    let mut parts: Vec<Vec<u8>> = vec![layer_key(cpython_key, PACKAGES.len() - 1)?.into_bytes()];
    parts.extend(PURE_WHEELS.iter().map(|pin| pin.sha256.as_bytes().to_vec()));
    for (rel, contents) in tree_contents(&data_dir())? {
        parts.push(rel.into_bytes());
        parts.push(contents);
    }
    let borrowed: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
    Ok(hex_sha256(&borrowed))
}

/// Builds every package below `base` unless its layer is complete; returns them in link order.
pub fn build_packages(
    base: &Path,
    sources: &DataSources,
    target: &TargetPython,
    build_python: &Path,
    cpython_key: &str,
) -> Result<Vec<BuiltPackage>> {
    let blas = openblas::build(base, &sources.openblas)?;
    let mut built: Vec<BuiltPackage> = Vec::new();
    for (index, (package, sdist)) in PACKAGES.iter().zip(&sources.sdists).enumerate() {
        let key = layer_key(cpython_key, index)?;
        let dir = base.join(format!("{}-wasi-{}", package.name, &key[..16]));
        let mut helpers: Vec<PathBuf> =
            package.helpers.iter().map(|h| dir.join("lib").join(Path::new(h).file_name().expect("a file"))).collect();
        if package.links_blas {
            helpers.push(blas.archive());
        }
        let result = BuiltPackage { lib: dir.join("lib"), site: dir.join("site"), helpers };
        if fresh_layer(&dir)? {
            let context = BuildContext { sources, target, build_python, blas: &blas };
            build_package(package, &dir, sdist, &context, &built)?;
        }
        built.push(result);
    }
    Ok(built)
}

/// What every package's build uses.
struct BuildContext<'a> {
    sources: &'a DataSources,
    target: &'a TargetPython<'a>,
    /// The native Python that runs meson, Cython and the scripts.
    build_python: &'a Path,
    blas: &'a OpenBlas,
}

fn build_package(
    package: &MesonPackage,
    dir: &Path,
    sdist: &Path,
    context: &BuildContext,
    earlier: &[BuiltPackage],
) -> Result<()> {
    let BuildContext { sources, target, build_python, blas } = context;
    let started = Instant::now();
    let (name, version) = (package.name, package.version);
    eprintln!("xtask: compiling {name} {version} for WASI (a few minutes, once per machine)");
    let src = dir.join(format!("{name}-{version}"));
    run(Command::new("tar").arg("xf").arg(sdist).arg("-C").arg(dir))?;
    let patch = data_dir().join(package.patch());
    run(Command::new("patch").args(["-s", "-p1", "-i"]).arg(&patch).current_dir(&src))?;
    if package.links_blas {
        run(Command::new(build_python)
            .arg(data_dir().join(LAPACK_LITE_SCRIPT))
            .arg("llvm-nm-19")
            .arg(blas.archive())
            .arg(&src))?;
    }

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
    // Cython finds the `.pxd` files of the packages built before (`cimport numpy`) on its path.
    let cython_path: Vec<String> =
        std::iter::once(&pylib).chain(earlier.iter().map(|p| &p.site)).map(|dir| dir.display().to_string()).collect();
    // `--generate-shared` (pandas' shared utility module) names a random temporary folder in
    // the C it writes: replaced by the bare file name, for a reproducible build.
    write_executable(
        &bin.join("cython"),
        &format!(
            "#!/bin/sh\n\
             PYTHONPATH={} {} -c 'import sys; from Cython.Compiler.Main import setuptools_main; sys.exit(setuptools_main())' \"$@\" || exit\n\
             for arg do\n  case \"$arg\" in\n    --generate-shared=*) sed -i -E 's#\"[^\"]*/_cyutility[.]pyx\"#\"_cyutility.pyx\"#g' \"${{arg#--generate-shared=}}\" ;;\n  esac\ndone\n",
            cython_path.join(":"),
            build_python.display()
        ),
    )?;
    // What the build asks the target's numpy (`numpy.get_include()`): the host cannot import
    // the WASI numpy, so a stand-in answers with its headers.
    let host_packages = tools.join("host");
    if let Some(numpy) = earlier.first() {
        let include = numpy.site.join("numpy/_core/include");
        fs::create_dir_all(host_packages.join("numpy"))?;
        fs::write(
            host_packages.join("numpy/__init__.py"),
            format!("def get_include():\n    return {:?}\n", include.display().to_string()),
        )?;
    }

    let build = dir.join("build");
    let wrappers = toolchain::write_wrappers(
        &tools.join("toolchain"),
        &[(dir, &format!("/{name}")), (target.src, "/cpython"), (&data_dir(), "/data")],
    )?;
    let cross_file = write_cross_file(package, &tools, &wrappers, context, &host_packages)?;
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    // numpy's vendored meson (a fork with what numpy needs) builds every package.
    let numpy_dir = format!("{}-{}", NUMPY.name, NUMPY.version);
    run(Command::new("tar")
        .arg("xf")
        .arg(&sources.sdists[0])
        .arg("-C")
        .arg(&tools)
        .arg(format!("{numpy_dir}/vendored-meson")))?;
    let meson_py = tools.join(numpy_dir).join("vendored-meson/meson/meson.py");
    let meson = |args: &[&str]| {
        let mut command = Command::new(build_python);
        command.arg(&meson_py).args(args).current_dir(&src).env("PATH", &path).env("SOURCE_DATE_EPOCH", "0");
        command
    };
    run(meson(&["setup"]).arg(&build).arg("--cross-file").arg(&cross_file).args(MESON_OPTIONS).args(package.options))?;
    run(Command::new(&ninja).arg("-C").arg(&build).arg(make_jobs()).env("PATH", &path))?;
    let stage = dir.join("stage");
    let mut install = meson(&["install", "--no-rebuild", "--quiet", "-C"]);
    install.arg(&build).arg("--destdir").arg(&stage);
    if let Some(tags) = package.install_tags {
        install.args(["--tags", tags]);
    }
    run(&mut install)?;
    let site_packages = stage.join("lib/python3.13/site-packages");
    let lib = dir.join("lib");
    run(Command::new(build_python)
        .arg(data_dir().join("collect_archives.py"))
        .arg("llvm-ar-19")
        .arg(&site_packages)
        .arg(name)
        .arg(&lib)
        .args(package.helpers.iter().map(|h| build.join(h))))?;
    fs::create_dir_all(dir.join("site"))?;
    fs::rename(site_packages.join(name), dir.join("site").join(name))?;
    for leftover in [&src, &build, &stage, &tools] {
        fs::remove_dir_all(leftover).with_context(|| format!("removing {}", leftover.display()))?;
    }
    mark_complete(dir)?;
    eprintln!("xtask: {name} for WASI built in {:.0?}", started.elapsed());
    Ok(())
}
/// The meson cross file and the compiler wrappers it names.
fn write_cross_file(
    package: &MesonPackage,
    tools: &Path,
    wrappers: &Wrappers,
    context: &BuildContext,
    host_packages: &Path,
) -> Result<PathBuf> {
    let BuildContext { target, build_python, blas, .. } = context;
    let static_extension = data_dir().join("static_extension.py");
    // A `-shared` link makes an archive; no -fPIC; some objects get renames.
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
    let renames: String = package
        .renames
        .iter()
        .map(|(objects, header)| {
            format!("    {objects}) extra=\"-include {}\" ;;\n", data_dir().join(header).display())
        })
        .collect();
    let cc = tools.join("wasi-cc");
    let cxx = tools.join("wasi-c++");
    write_executable(&cc, &wrapper(&wrappers.cc, &renames))?;
    write_executable(&cxx, &wrapper(&wrappers.cxx, &renames))?;

    // Meson asks this Python about the target: the native build Python, told to report the
    // WASI build's configuration (extension suffix, headers, `pyconfig.h`), and finding the
    // host stand-ins of packages built before and Cython (pandas' generators use its
    // templates).
    let python = tools.join("python-wasi-cross");
    write_executable(
        &python,
        &format!(
            "#!/bin/sh\n\
             export _PYTHON_PROJECT_BASE={base}\n\
             export _PYTHON_HOST_PLATFORM=wasi-wasm32\n\
             export _PYTHON_SYSCONFIGDATA_NAME=_sysconfigdata__wasi_wasm32-wasi\n\
             export PYTHONPATH={target_lib}:{host_packages}:{tools}/pylib\n\
             exec {build_python} \"$@\"\n",
            base = target.build.display(),
            target_lib = target.sysconfig_dir.display(),
            host_packages = host_packages.display(),
            tools = tools.display(),
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
             openblas_includedir = '{blas_include}'\n\
             openblas_librarydir = '{blas_lib}'\n\
             \n\
             [host_machine]\n\
             system = 'wasi'\n\
             cpu_family = 'wasm32'\n\
             cpu = 'wasm32'\n\
             endian = 'little'\n",
            cc = cc.display(),
            cxx = cxx.display(),
            python = python.display(),
            flags = quoted(FLAGS),
            blas_include = blas.include_dir().display(),
            blas_lib = blas.lib_dir().display(),
        ),
    )?;
    Ok(cross)
}
