//! `cargo xtask build-runtime`: CPython 3.13 compiled for `wasm32-wasi` and linked as the
//! Capsule reactor (`target/python-runtime/capsule-python.wasm`), and with `--flavour data`
//! the same with numpy and pandas linked in (`capsule-python-data.wasm`, see [`crate::data`]).
//!
//! Three cached layers (for the data flavour, OpenBLAS's, numpy's and pandas' between the last two),
//! each in a folder named by a hash of its inputs and marked complete
//! only once fully built. They live outside the checkout, under
//! `$XDG_CACHE_HOME/capsule-dev/python-runtime` (else `~/.cache/...`), so a fresh clone whose
//! inputs did not change reuses them; a lock file serialises builders sharing that folder,
//! and whoever takes it prunes all but the two last-used layers of each kind.
//! 1. `build-python-*`: a native CPython of the same version (cross builds need one);
//! 2. `cpython-wasi-*`: `libpython3.13.a` and its helper libraries for WASI, zlib, bzip2,
//!    SQLite and liblzma included, optimised with a profile of CPython's own test suite's
//!    training set run under wasmtime ([`crate::pgo`]; `CAPSULE_PGO=0` leaves it out);
//! 3. the reactor: the stdlib, the build's `_sysconfigdata`, the `tzdata` wheel (modules and
//!    zone files) and the `capsule` package packed as bytecode, embedded in the module
//!    together with the C entry points of `crates/python-runtime/c`.
//!
//! Inputs are pinned by sha256: the upstream tarballs of CPython, zlib, bzip2, SQLite and xz from Debian's source
//! packages, the `tzdata` wheel from PyPI, the `minicov` crate (LLVM's profile runtime) from crates.io.
//!
//! The final key hashes this file, the toolchain pins, the source pin and every file of
//! `crates/python-runtime/{c,python,build}` but the host's SDK (`HOST_ONLY`): when it
//! matches, nothing is done.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};

use python_runtime::Flavour;

use crate::data::{self, DataSources, TargetPython};
use crate::layers::{
    DebianSource, RegistryFile, fresh_layer, hex_sha256, is_complete, make_all, make_jobs, mark_complete, prune_layers,
    tree_contents,
};
use crate::pgo;
use crate::toolchain;
use crate::util::{output, run, sha256_file, target_dir, workspace_root, write_atomic};

const CPYTHON_VERSION: &str = "3.13.5";
/// `major.minor`, as in CPython's folder names.
const PYTHON_MINOR: &str = "3.13";
const CPYTHON_SOURCE: DebianSource = DebianSource {
    package: "python3.13",
    tarball: "python3.13_3.13.5.orig.tar.xz",
    sha256: "93e583f243454e6e9e4588ca2c2662206ad961659863277afcdb96801647d640",
};

/// A C library CPython's optional modules link, compiled from its upstream sources.
struct CLibrary {
    source: DebianSource,
    /// The tarball's top folder.
    dir: &'static str,
    /// `-l` name: the archive is `lib<name>.a`.
    name: &'static str,
    /// Prefix of the `<PREFIX>_CFLAGS`/`<PREFIX>_LIBS` variables CPython's configure reads.
    configure_prefix: &'static str,
    recipe: Recipe,
}

/// How a C library is built for WASI.
#[derive(Debug)]
enum Recipe {
    /// Compile `files` (`.c` left out) with `flags`, after running the `generate` commands
    /// natively in the source folder; the `headers` are copied beside the archive.
    Compile {
        generate: &'static [&'static [&'static str]],
        files: &'static [&'static str],
        headers: &'static [&'static str],
        flags: &'static [&'static str],
    },
    /// The library's own `configure` for the wasm target with `args`, then `make` in `subdir`,
    /// which leaves `.libs/lib<name>.a` there; the headers are in `include`.
    Configure { args: &'static [&'static str], subdir: &'static str, include: &'static str },
}

const C_LIBRARIES: &[CLibrary] = &[
    // `zlib`, and through it `gzip`, `zipfile` deflate, `urllib3`.
    CLibrary {
        source: DebianSource {
            package: "zlib",
            tarball: "zlib_1.3.dfsg+really1.3.1.orig.tar.gz",
            sha256: "60dd315c07f616887caa029408308a018ace66e3d142726a97db164b3b8f69fb",
        },
        dir: "zlib-1.3.1",
        name: "z",
        configure_prefix: "ZLIB",
        recipe: Recipe::Compile {
            generate: &[],
            files: &[
                "adler32", "compress", "crc32", "deflate", "gzclose", "gzlib", "gzread", "gzwrite", "infback",
                "inffast", "inflate", "inftrees", "trees", "uncompr", "zutil",
            ],
            headers: &["zlib.h", "zconf.h"],
            flags: &["-DHAVE_UNISTD_H", "-DHAVE_STDARG_H"],
        },
    },
    // `bz2`, which `tarfile` and `networkx` import.
    CLibrary {
        source: DebianSource {
            package: "bzip2",
            tarball: "bzip2_1.0.8.orig.tar.gz",
            sha256: "ab5a03176ee106d3f0fa90e381da478ddae405918153cca248e682cd0c4a2269",
        },
        dir: "bzip2-1.0.8",
        name: "bz2",
        configure_prefix: "BZIP2",
        recipe: Recipe::Compile {
            generate: &[],
            files: &["blocksort", "huffman", "crctable", "randtable", "compress", "decompress", "bzlib"],
            headers: &["bzlib.h"],
            flags: &[],
        },
    },
    // `sqlite3`, on in-memory databases and granted files.
    CLibrary {
        source: DebianSource {
            package: "sqlite3",
            tarball: "sqlite3_3.46.1.orig.tar.xz",
            sha256: "d0cdd2ece271b29e7ce18095745d892517ee26d0f270065b3a25c2e9eb11639c",
        },
        dir: "sqlite3-3.46.1",
        name: "sqlite3",
        configure_prefix: "LIBSQLITE3",
        recipe: Recipe::Compile {
            // The amalgamation `sqlite3.c`, made by SQLite's own (Tcl) build scripts.
            generate: &[&["./configure", "-q", "--disable-tcl"], &["make", "-s", "sqlite3.c"]],
            files: &["sqlite3"],
            headers: &["sqlite3.h"],
            // SQLite's own `__wasi__` settings apply: no threads, WAL or loadable extensions.
            flags: &[],
        },
    },
    // `lzma`, for `.xz` files (and `tarfile`'s `r:xz`).
    CLibrary {
        source: DebianSource {
            package: "xz-utils",
            tarball: "xz-utils_5.8.1.orig.tar.xz",
            sha256: "0b54f79df85912504de0b14aec7971e3f964491af1812d83447005807513cd9e",
        },
        dir: "xz-5.8.1",
        name: "lzma",
        configure_prefix: "LIBLZMA",
        recipe: Recipe::Configure {
            // The library alone, single-threaded.
            args: &[
                "--disable-threads",
                "--disable-shared",
                "--enable-static",
                "--disable-xz",
                "--disable-xzdec",
                "--disable-lzmadec",
                "--disable-lzmainfo",
                "--disable-lzma-links",
                "--disable-scripts",
                "--disable-doc",
                "--disable-nls",
                "--disable-sandbox",
            ],
            subdir: "src/liblzma",
            include: "src/liblzma/api",
        },
    },
];

/// IANA time zone data for `zoneinfo`, as the `tzdata` wheel on PyPI packages it.
const TZDATA_WHEEL: RegistryFile = RegistryFile {
    file: "tzdata-2026.6-py2.py3-none-any.whl",
    url: "https://files.pythonhosted.org/packages/0a/66/9a06c2227fedfd4919f0eaaa8b94377d9730882a7e4f95823c9a331ab5e1/tzdata-2026.6-py2.py3-none-any.whl",
    sha256: "0a10eec6e13ef16b627fabed9a5f2ba61a62b1c67f327305f4e7e412a70b4aec",
};

/// Linear-memory C stack of the reactor. The host's `max_wasm_stack` is sized to match.
const C_STACK_BYTES: u64 = 8 << 20;

pub struct RuntimePaths {
    /// `target/python-runtime`: the installed module, its key, and a link to the native Python.
    pub root: PathBuf,
    /// The layers and downloads, keyed by their inputs' hash, shared by every checkout.
    layers: PathBuf,
}

impl RuntimePaths {
    pub fn new() -> Self {
        Self { root: target_dir().join("python-runtime"), layers: dev_cache_dir().join("python-runtime") }
    }
    pub fn installed_runtime(&self, flavour: Flavour) -> PathBuf {
        self.root.join(flavour.file_name())
    }
    fn installed_key(&self, flavour: Flavour) -> PathBuf {
        self.installed_runtime(flavour).with_extension("key")
    }
    /// Where tests find the native CPython (and its `Lib`) of the runtime's version.
    fn native_python_link(&self) -> PathBuf {
        self.root.join("native-python")
    }
    fn downloads(&self) -> PathBuf {
        self.layers.join("downloads")
    }
    /// Holds the layers' lock until dropped: builders in other checkouts wait their turn.
    /// While no one builds, old layers are pruned.
    fn lock(&self) -> Result<fs::File> {
        fs::create_dir_all(&self.layers)?;
        let path = self.layers.join(".lock");
        let file = fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        if file.try_lock().is_err() {
            eprintln!("xtask: waiting for another build using {}", self.layers.display());
            file.lock().with_context(|| format!("locking {}", path.display()))?;
        }
        prune_layers(&self.layers)?;
        Ok(file)
    }
}

/// `$XDG_CACHE_HOME/capsule-dev`, else `~/.cache/capsule-dev`: build outputs keyed by the hash
/// of their inputs, kept across clones (the development counterpart of the users' cache).
pub fn dev_cache_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|dir| !dir.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))
        .unwrap_or_else(|| target_dir().join("cache"));
    base.join("capsule-dev")
}

fn runtime_crate() -> PathBuf {
    workspace_root().join("crates/python-runtime")
}

/// Key of the `libpython` layer: the source, the toolchain and the configure recipe (and the
/// profile-guided build's, unless it is off).
fn cpython_key() -> Result<String> {
    let config_site = fs::read(runtime_crate().join("build/config.site-wasi"))?;
    let libraries = c_libraries_fingerprint();
    let toolchain = toolchain::fingerprint(toolchain::PACKAGES);
    let configure_args = configure_args_fingerprint();
    let mut parts: Vec<&[u8]> = vec![
        CPYTHON_SOURCE.sha256.as_bytes(),
        libraries.as_bytes(),
        toolchain.as_bytes(),
        &config_site,
        configure_args.as_bytes(),
    ];
    let pgo_fingerprint = if pgo::enabled() { Some(pgo::fingerprint()?) } else { None };
    parts.extend(pgo_fingerprint.as_ref().map(String::as_bytes));
    Ok(hex_sha256(&parts))
}

/// Key of the final module: the `libpython` layer plus everything in the runtime crate, and
/// for the data flavour the packages' layers.
/// Files of `crates/python-runtime/python` that only the host's Python uses (the SDK): not
/// packed into the runtime, nor part of its key, so that changing the SDK rebuilds nothing.
const HOST_ONLY: &[&str] = &["capsule/_host.py", "capsule/_native.pyi"];

fn runtime_key(flavour: Flavour) -> Result<String> {
    let cpython_key = cpython_key()?;
    let mut parts: Vec<Vec<u8>> = vec![
        cpython_key.clone().into_bytes(),
        include_bytes!("runtime.rs").to_vec(),
        C_STACK_BYTES.to_le_bytes().to_vec(),
    ];
    if flavour == Flavour::Data {
        parts.push(data::key(&cpython_key)?.into_bytes());
    }
    for sub in ["c", "python", "build"] {
        for (rel, contents) in tree_contents(&runtime_crate().join(sub))? {
            if sub == "python" && HOST_ONLY.contains(&rel.as_str()) {
                continue;
            }
            parts.push(format!("{sub}/{rel}").into_bytes());
            parts.push(contents);
        }
    }
    let borrowed: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
    Ok(hex_sha256(&borrowed))
}

fn configure_args_fingerprint() -> String {
    WASI_CONFIGURE_ARGS.join(" ")
}

/// With pymalloc, which CPython's configure turns off for WASI: without it every small object
/// goes through wasi-libc's `malloc`. The runtime gives each size class a fresh pool before
/// the snapshot (`c/capsule_runtime.c`), so that short runs write few pages (BENCHMARKS.md).
const WASI_CONFIGURE_ARGS: &[&str] =
    &["--host=wasm32-unknown-wasi", "--disable-test-modules", "--with-ensurepip=no", "--with-pymalloc"];

/// Builds the runtime of `flavour` if its inputs changed; returns the installed module.
pub fn build_runtime(flavour: Flavour, force: bool) -> Result<PathBuf> {
    let paths = RuntimePaths::new();
    let key = runtime_key(flavour)?;
    let installed = paths.installed_runtime(flavour);
    let linked = fs::canonicalize(paths.native_python_link()).is_ok_and(|dir| is_complete(&dir));
    if !force
        && linked
        && installed.exists()
        && fs::read_to_string(paths.installed_key(flavour)).is_ok_and(|k| k.trim() == key)
    {
        eprintln!("xtask: runtime up to date: {}", installed.display());
        return Ok(installed);
    }
    let started = Instant::now();
    fs::create_dir_all(&paths.root)?;
    let _lock = paths.lock()?;
    let reactor_dir = reactor_dir(&paths.layers, flavour, &key);
    if force && reactor_dir.exists() {
        fs::remove_dir_all(&reactor_dir).with_context(|| format!("clearing {}", reactor_dir.display()))?;
    }
    if !is_complete(&reactor_dir) {
        toolchain::ensure_installed(toolchain::PACKAGES, &paths.downloads())?;
    }
    let sources = Sources::fetch(&paths, flavour)?;
    let build_python = build_native_python(&paths, &sources.cpython)?;
    let wasm = build_reactor(&paths.layers, &sources, &build_python, &key)?;
    fs::copy(&wasm, &installed).with_context(|| format!("installing {}", installed.display()))?;
    write_atomic(&paths.installed_key(flavour), key.as_bytes())?;
    let size = fs::metadata(&installed)?.len();
    eprintln!(
        "xtask: built {} ({:.1} MB, sha256 {}) in {:.0?}",
        installed.display(),
        size as f64 / 1e6,
        sha256_file(&installed)?,
        started.elapsed()
    );
    Ok(installed)
}

/// Builds the layers and the reactors of `flavours` a second time under another directory
/// (sharing one second `libpython`) and checks that each module is byte-identical to the
/// installed one. A pass is recorded in the reactor's cached layer: the same inputs need not
/// be checked again.
pub fn check_reproducible(flavours: &[Flavour]) -> Result<()> {
    let paths = RuntimePaths::new();
    let elsewhere = paths.layers.join("reproducibility-check");
    let mut fresh = true;
    for &flavour in flavours {
        let first = build_runtime(flavour, false)?;
        let key = runtime_key(flavour)?;
        let _lock = paths.lock()?;
        let checked = reactor_dir(&paths.layers, flavour, &key).join(".reproducible");
        if checked.exists() {
            eprintln!(
                "xtask: reproducible: these {} runtime inputs (key {}) were already built twice to the same bytes",
                flavour.as_str(),
                &key[..16]
            );
            continue;
        }
        if fresh {
            if elsewhere.exists() {
                fs::remove_dir_all(&elsewhere)?;
            }
            fs::create_dir_all(&elsewhere)?;
            fresh = false;
        }
        let sources = Sources::fetch(&paths, flavour)?;
        let build_python = build_native_python(&paths, &sources.cpython)?;
        let second = build_reactor(&elsewhere, &sources, &build_python, &key)?;
        let (a, b) = (sha256_file(&first)?, sha256_file(&second)?);
        if a != b {
            bail!(
                "the {} runtime is not reproducible: {} has sha256 {a}, the rebuild {} has {b}",
                flavour.as_str(),
                first.display(),
                second.display()
            );
        }
        fs::write(&checked, &a)?;
        eprintln!(
            "xtask: reproducible: two builds of the {} runtime in different directories both have sha256 {a}",
            flavour.as_str()
        );
    }
    if elsewhere.exists() {
        fs::remove_dir_all(&elsewhere)?;
    }
    Ok(())
}

/// The downloaded inputs of the build, each checked against its pin.
struct Sources {
    cpython: PathBuf,
    /// The tarballs of [`C_LIBRARIES`], in order.
    libraries: Vec<PathBuf>,
    tzdata: PathBuf,
    /// The `minicov` crate, when the build is profile-guided.
    profile_runtime: Option<PathBuf>,
    /// For the data flavour.
    data: Option<DataSources>,
}

impl Sources {
    fn fetch(paths: &RuntimePaths, flavour: Flavour) -> Result<Self> {
        let downloads = paths.downloads();
        Ok(Self {
            cpython: CPYTHON_SOURCE.fetch(&downloads)?,
            libraries: C_LIBRARIES.iter().map(|l| l.source.fetch(&downloads)).collect::<Result<_>>()?,
            tzdata: TZDATA_WHEEL.fetch(&downloads)?,
            profile_runtime: pgo::enabled().then(|| pgo::PROFILE_RUNTIME.fetch(&downloads)).transpose()?,
            data: match flavour {
                Flavour::Base => None,
                Flavour::Data => Some(DataSources::fetch(&downloads)?),
            },
        })
    }
}

fn extract(tarball: &Path, into: &Path) -> Result<PathBuf> {
    fs::create_dir_all(into)?;
    run(Command::new("tar").arg("xf").arg(tarball).arg("-C").arg(into))?;
    let src = into.join(format!("Python-{CPYTHON_VERSION}"));
    // Configure scripts read this optional file; an empty one keeps the build to the defaults.
    fs::write(src.join("Modules/Setup.local"), "")?;
    Ok(src)
}

/// A native CPython of the same version; the cross build runs it to freeze modules, and we
/// run it to compile the stdlib to bytecode.
fn build_native_python(paths: &RuntimePaths, tarball: &Path) -> Result<PathBuf> {
    let dir = paths.layers.join(format!("build-python-{}", &CPYTHON_SOURCE.sha256[..16]));
    let python = dir.join(format!("Python-{CPYTHON_VERSION}/cross-build/build/python"));
    let link = paths.native_python_link();
    if fs::read_link(&link).ok().as_deref() != Some(dir.as_path()) {
        match fs::remove_file(&link) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                return Err(error).with_context(|| format!("replacing {}", link.display()));
            }
            _ => {}
        }
        std::os::unix::fs::symlink(&dir, &link).with_context(|| format!("linking {}", link.display()))?;
    }
    if !fresh_layer(&dir)? {
        return Ok(python);
    }
    let started = Instant::now();
    let src = extract(tarball, &dir)?;
    let build = src.join("cross-build/build");
    fs::create_dir_all(&build)?;
    run(Command::new("../../configure")
        .args(["-q", "--disable-test-modules", "--with-ensurepip=no"])
        .current_dir(&build))?;
    run(Command::new("make").args(["-s", &make_jobs(), "all"]).current_dir(&build))?;
    mark_complete(&dir)?;
    eprintln!("xtask: native build python ready in {:.0?}", started.elapsed());
    Ok(python)
}

/// Builds `libpython3.13.a` for WASI below `base` (and the packages, for the data flavour), then the
/// reactor; returns the module path.
fn build_reactor(base: &Path, sources: &Sources, build_python: &Path, key: &str) -> Result<PathBuf> {
    let libs = build_libpython(base, sources, build_python)?;
    let packages = match &sources.data {
        Some(data_sources) => {
            let sysconfig = sysconfigdata(&libs)?;
            let target = TargetPython {
                src: &libs.src,
                build: &libs.build,
                sysconfig_dir: sysconfig.parent().expect("a file has a folder"),
            };
            data::build_packages(base, data_sources, &target, build_python, &cpython_key()?)?
        }
        None => Vec::new(),
    };
    let flavour = if sources.data.is_some() { Flavour::Data } else { Flavour::Base };
    let out_dir = reactor_dir(base, flavour, key);
    let module = out_dir.join(flavour.file_name());
    if !fresh_layer(&out_dir)? {
        return Ok(module);
    }
    let started = Instant::now();
    let crate_dir = runtime_crate();
    let wrappers = toolchain::write_wrappers(
        &out_dir.join("toolchain"),
        &[(&out_dir, "/reactor"), (&libs.src, "/cpython"), (&crate_dir, "/python-runtime")],
    )?;

    // The stdlib and the `capsule` package as bytecode, in one blob that the C code embeds.
    let blob = out_dir.join("capsule_modules.bin");
    let mut pack = Command::new(build_python);
    pack.args(["-S", "-s", "-B"])
        .arg(crate_dir.join("build/pack_modules.py"))
        .arg("--stdlib")
        .arg(libs.src.join("Lib"))
        .arg("--package")
        .arg(crate_dir.join("python"))
        // `sysconfig` (and through it `zoneinfo`, `platform`) reads the build's configuration.
        .arg("--generated")
        .arg(sysconfigdata(&libs)?)
        .arg("--path-map")
        .arg(format!("{}=/build", base.display()))
        .arg("--path-map")
        .arg(format!("{}=/build-python", build_python_dir(build_python).display()))
        .arg("--wheel")
        .arg(&sources.tzdata)
        .arg("--out")
        .arg(&blob)
        .env("PYTHONHASHSEED", "0");
    for file in HOST_ONLY {
        pack.arg("--leave-out").arg(file);
    }
    for package in &packages {
        pack.arg("--site").arg(&package.site);
    }
    for wheel in sources.data.iter().flat_map(|data| &data.wheels) {
        pack.arg("--wheel").arg(wheel);
    }
    run(&mut pack)?;

    let mut objects = vec![out_dir.join("capsule_runtime.o")];
    let mut compile = Command::new(&wrappers.cc);
    compile
        .args(["-O2", "-std=c23", "-Wall", "-Werror", "-c"])
        .arg(crate_dir.join("c/capsule_runtime.c"))
        .arg(format!("-I{}", libs.src.join("Include").display()))
        .arg(format!("-I{}", libs.build.display()))
        .arg(format!("--embed-dir={}", out_dir.display()))
        .arg("-o")
        .arg(&objects[0]);
    let mut link = Command::new(&wrappers.cc);
    link.arg("-mexec-model=reactor")
        .arg(format!("-Wl,-z,stack-size={C_STACK_BYTES}"))
        // A direct call whose signature does not match its definition is an error.
        .args(["-Wl,--stack-first", "-Wl,--strip-debug", "-Wl,--fatal-warnings"])
        .arg("-o")
        .arg(&module);
    let mut libraries = vec![];
    if flavour == Flavour::Data {
        let mut modules = Vec::new();
        for package in &packages {
            modules.extend(package.modules()?);
        }
        fs::write(out_dir.join("builtin_modules.h"), builtin_modules_header(&modules))?;
        compile.args(["-DCAPSULE_BUILTIN_MODULES", &format!("-I{}", out_dir.display())]);
        let exceptions = out_dir.join("cxx_exceptions.o");
        run(Command::new(&wrappers.cc)
            .args(["-O2", "-Wall", "-Werror", "-c"])
            .arg(crate_dir.join("data/cxx_exceptions.c"))
            .arg("-o")
            .arg(&exceptions))?;
        objects.push(exceptions);
        libraries.extend(modules.into_iter().map(|(_, _, archive)| archive));
        libraries.extend(packages.iter().flat_map(|package| package.support_archives()));
    }
    run(&mut compile)?;
    libraries.extend(libs.archives.iter().cloned());
    link.args(&objects).args(&libraries);
    if flavour == Flavour::Data {
        // numpy's and pandas' C++ parts, and `long double` (binary128) formatting.
        link.args(["-lc++", "-lc++abi", "-lc-printscan-long-double"]);
    }
    run(link.args(["-lwasi-emulated-signal", "-lwasi-emulated-getpid", "-lwasi-emulated-process-clocks", "-lm"]))?;
    fs::remove_file(&blob)?;
    for object in &objects {
        fs::remove_file(object)?;
    }
    fs::remove_dir_all(&wrappers.dir)?;
    mark_complete(&out_dir)?;
    eprintln!("xtask: reactor linked in {:.0?}", started.elapsed());
    Ok(module)
}

/// C declarations and the `_inittab` table of the extension modules linked in as built-ins.
fn builtin_modules_header(modules: &[(String, String, PathBuf)]) -> String {
    let mut header = String::from("/* Generated by `cargo xtask build-runtime`. */\n");
    for (_, init, _) in modules {
        header.push_str(&format!("extern PyObject *{init}(void);\n"));
    }
    header.push_str("static struct _inittab builtin_modules[] = {\n");
    for (name, init, _) in modules {
        header.push_str(&format!("    {{\"{name}\", {init}}},\n"));
    }
    header.push_str("    {NULL, NULL},\n};\n");
    header
}

struct Libpython {
    src: PathBuf,
    build: PathBuf,
    archives: Vec<PathBuf>,
}

fn reactor_dir(base: &Path, flavour: Flavour, key: &str) -> PathBuf {
    base.join(format!("reactor-{}-{}", flavour.as_str(), &key[..16]))
}

fn libpython_dir(base: &Path) -> Result<PathBuf> {
    Ok(base.join(format!("cpython-wasi-{}", &cpython_key()?[..16])))
}

/// The folder of the native build CPython (`build-python-*`), from its executable's path.
fn build_python_dir(build_python: &Path) -> &Path {
    build_python.ancestors().nth(4).unwrap_or(build_python)
}

/// Where CPython's WASI build in `build` writes its generated modules (`_sysconfigdata`).
fn generated_dir(build: &Path) -> PathBuf {
    build.join(format!("build/lib.wasi-wasm32-{PYTHON_MINOR}"))
}

/// The `_sysconfigdata_*.py` module CPython's build wrote for the WASI target.
fn sysconfigdata(libs: &Libpython) -> Result<PathBuf> {
    let dir = generated_dir(&libs.build);
    let name = "_sysconfigdata__wasi_wasm32-wasi.py";
    let path = dir.join(name);
    if !path.is_file() {
        bail!("CPython's WASI build did not write {}", path.display());
    }
    Ok(path)
}

fn build_libpython(base: &Path, sources: &Sources, build_python: &Path) -> Result<Libpython> {
    let dir = libpython_dir(base)?;
    let src = dir.join(format!("Python-{CPYTHON_VERSION}"));
    let build = src.join("cross-build/wasm32-wasi");
    let archives = [
        "libpython3.13.a",
        "Modules/_decimal/libmpdec/libmpdec.a",
        "Modules/_hacl/libHacl_Hash_SHA2.a",
        "Modules/expat/libexpat.a",
    ]
    .iter()
    .map(|a| build.join(a))
    .chain(C_LIBRARIES.iter().map(|l| dir.join(l.name).join(format!("lib{}.a", l.name))))
    .collect();
    let libs = Libpython { src: src.clone(), build: build.clone(), archives };
    if !fresh_layer(&dir)? {
        return Ok(libs);
    }
    let started = Instant::now();
    extract(&sources.cpython, &dir)?;
    fs::create_dir_all(&build)?;
    let wrappers = toolchain::write_wrappers(&dir.join("toolchain"), &[(&src, "/cpython")])?;
    let sysroot = wrappers.dir.join("sysroot");
    let build_triple = output(&mut Command::new(src.join("config.guess")))?;
    let mut configure = Command::new("../../configure");
    for (library, tarball) in C_LIBRARIES.iter().zip(&sources.libraries) {
        // Found this way instead of through pkg-config: the modules link the archives statically.
        let include = build_c_library(library, tarball, &dir, &wrappers.cc)?;
        let lib_dir = dir.join(library.name);
        configure.env(format!("{}_CFLAGS", library.configure_prefix), format!("-I{}", include.display()));
        configure
            .env(format!("{}_LIBS", library.configure_prefix), format!("-L{} -l{}", lib_dir.display(), library.name));
    }
    run(configure
        .arg("-q")
        .args(WASI_CONFIGURE_ARGS)
        .arg(format!("--build={build_triple}"))
        .arg(format!("--with-build-python={}", build_python.display()))
        .current_dir(&build)
        .env("CPYTHON_SRC", &src)
        .env("CONFIG_SITE", runtime_crate().join("build/config.site-wasi"))
        .env("CC", &wrappers.cc)
        .env("CPP", &wrappers.cpp)
        .env("CXX", "false")
        .env("AR", "llvm-ar-19")
        .env("RANLIB", "llvm-ranlib-19")
        .env("PKG_CONFIG_PATH", "")
        .env("PKG_CONFIG_LIBDIR", sysroot.join("lib/pkgconfig"))
        .env("PKG_CONFIG_SYSROOT_DIR", &sysroot)
        .env("SOURCE_DATE_EPOCH", "0"))?;
    if let Some(profile_runtime) = &sources.profile_runtime {
        let generated = generated_dir(&build);
        let cpython = pgo::Build { layer: &dir, src: &src, build: &build, generated: &generated, cc: &wrappers.cc };
        let profile = pgo::profile(&dir.join("pgo"), &cpython, profile_runtime)?;
        run(make_all(&build).arg(pgo::use_flags(&profile)))?;
    } else {
        run(&mut make_all(&build))?;
    }
    mark_complete(&dir)?;
    eprintln!("xtask: libpython for WASI built in {:.0?}", started.elapsed());
    Ok(libs)
}

/// Everything about the C libraries that changes what is compiled.
fn c_libraries_fingerprint() -> String {
    let describe = |l: &CLibrary| format!("{} {:?}", l.source.sha256, l.recipe);
    C_LIBRARIES.iter().map(describe).collect::<Vec<_>>().join("\n")
}

/// Builds `library` for WASI into `dir/<name>/lib<name>.a`; returns the folder of its headers.
fn build_c_library(library: &CLibrary, tarball: &Path, dir: &Path, cc: &Path) -> Result<PathBuf> {
    run(Command::new("tar").arg("xf").arg(tarball).arg("-C").arg(dir))?;
    let src = dir.join(library.dir);
    let out = dir.join(library.name);
    fs::create_dir_all(&out)?;
    let archive = out.join(format!("lib{}.a", library.name));
    match library.recipe {
        Recipe::Compile { generate, files, headers, flags } => {
            for command in generate {
                run(Command::new(command[0]).args(&command[1..]).current_dir(&src))?;
            }
            for header in headers {
                fs::copy(src.join(header), out.join(header))?;
            }
            let mut objects = Vec::new();
            for name in files {
                let object = out.join(format!("{name}.o"));
                run(Command::new(cc)
                    .args(["-O2", "-c"])
                    .args(flags)
                    .arg(src.join(format!("{name}.c")))
                    .arg("-o")
                    .arg(&object))?;
                objects.push(object);
            }
            run(Command::new("llvm-ar-19").arg("rcsD").arg(&archive).args(&objects))?;
            Ok(out)
        }
        Recipe::Configure { args, subdir, include } => {
            run(Command::new("./configure")
                .args(["-q", "--host=wasm32-unknown-wasi"])
                .args(args)
                .current_dir(&src)
                .env("CC", cc)
                .env("AR", "llvm-ar-19")
                .env("RANLIB", "llvm-ranlib-19"))?;
            run(Command::new("make").args(["-s", &make_jobs()]).current_dir(src.join(subdir)))?;
            fs::copy(src.join(subdir).join(".libs").join(format!("lib{}.a", library.name)), &archive)?;
            Ok(src.join(include))
        }
    }
}
