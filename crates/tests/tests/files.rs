//! `allowed_files`: granted folders work with their modes; nothing else can be reached.

use std::fs;

use python_runtime::ErrorKind;
use serde_json::json;
use tests::{Built, build_into, load};

/// A temporary project holding `files.py`; `prepare` lays out its folders before the build.
fn project(prepare: impl FnOnce(&std::path::Path)) -> (tempfile::TempDir, Built) {
    let project = tempfile::tempdir().unwrap();
    let root = project.path();
    fs::copy(fixtures::path("valid/files.py"), root.join("files.py")).unwrap();
    prepare(root);
    let built = load(build_into(&root.join("files.py"), &root.join(".capsule/build"), true));
    (project, built)
}

#[test]
fn granted_folders_work_and_nothing_else_is_reachable() {
    let (project, built) = project(|root| {
        fs::create_dir_all(root.join("data")).unwrap();
        fs::create_dir_all(root.join("out")).unwrap();
        fs::write(root.join("data/input.txt"), "granted input").unwrap();
        fs::write(root.join("secret.txt"), "not granted").unwrap();
        std::os::unix::fs::symlink("/etc", root.join("data/link")).unwrap();
    });
    let root = project.path();

    assert_eq!(built.run("read_input", vec![]).result, json!("granted input"));
    assert_eq!(built.run("write_report", vec![json!("done")]).result, json!(["report.txt"]));
    assert_eq!(fs::read_to_string(root.join("out/report.txt")).unwrap(), "done", "written through to the host");

    let forbidden = built.run("forbidden", vec![]);
    assert!(forbidden.success, "{:?}", forbidden.error);
    for (what, result) in forbidden.result.as_object().unwrap() {
        assert_eq!(result, "PermissionError", "{what} must be refused");
    }
    assert_eq!(fs::read_to_string(root.join("secret.txt")).unwrap(), "not granted", "nothing outside changed");
    assert!(!root.join("data/new.txt").exists());
    assert_eq!(built.run("no_grants", vec![]).result, json!("PermissionError"));

    let planted = built.run("plant_links", vec![]);
    let refused_by_os = json!([
        "PermissionError",
        "symbolic links cannot be created in a Capsule sandbox: one in a granted folder could lead out of it; write a copy of the file instead"
    ]);
    assert_eq!(
        planted.result,
        json!({
            "absolute": refused_by_os,
            "relative": refused_by_os,
            "wasi call": ["PermissionError", "Operation not permitted"],
        }),
        "{:?}",
        planted.error
    );
    for link in ["passwd", "secret", "raw"] {
        assert!(root.join("out").join(link).symlink_metadata().is_err(), "out/{link} was left behind");
    }
}

#[test]
fn file_quotas_refuse_writes_and_creations_beyond_them_and_say_so() {
    let (project, built) = project(|root| fs::create_dir_all(root.join("out")).unwrap());
    let root = project.path();

    // 1 MB in writes of 100 kB: the eleventh is refused whole (EDQUOT, 19); `big.bin` (one of
    // the three files allowed) exists, so opening it again creates nothing.
    let expected = json!({"written": 1_000_000, "write refused": 19, "opened": ["a.txt", "b.txt", "big.bin", 19, 19]});
    for _ in 0..2 {
        fs::remove_dir_all(root.join("out")).unwrap();
        fs::create_dir(root.join("out")).unwrap();
        let outcome = built.run("fill_quotas", vec![]);
        assert_eq!(outcome.result, expected, "each call starts from zero: {:?}", outcome.error);
    }
    assert_eq!(fs::metadata(root.join("out/big.bin")).unwrap().len(), 0, "truncated by the last open");
    assert!(!root.join("out/c.txt").exists() && !root.join("out/folder").exists());

    let outcome = built.run("overflow", vec![]);
    let error = outcome.error.expect("refused");
    assert_eq!(error.kind, ErrorKind::Exception);
    assert!(
        error.message.contains("the task reached its `max_written` quota: 0 bytes written to files, 1000000 allowed"),
        "{}",
        error.message
    );
    assert_eq!(fs::metadata(root.join("out/overflow.bin")).unwrap().len(), 0);
}

#[test]
fn a_grant_that_leaves_the_project_through_a_symlink_is_refused_by_the_runner() {
    let outside = tempfile::tempdir().unwrap();
    let (_project, built) = project(|root| std::os::unix::fs::symlink(outside.path(), root.join("data")).unwrap());
    let outcome = built.run("read_input", vec![]);
    let error = outcome.error.expect("refused");
    assert_eq!(error.kind, ErrorKind::Host);
    assert!(error.message.contains("resolves outside the project"), "{}", error.message);
    assert_eq!(outcome.execution.attempts, 0, "no sandbox was started");
}

#[test]
fn quotas_follow_the_open_file_and_count_what_a_file_grows_by() {
    let (_project, built) = project(|root| fs::create_dir_all(root.join("out")).unwrap());
    for (how, expected) in [
        // Standard output closed and its number reused for a file: counted like any file.
        ("descriptor 1", json!(["EDQUOT", 1_000_000])),
        // A hole of 10 MB is as much disk as 10 MB written (on a file system without holes).
        ("write past the end", json!(["EDQUOT", 0])),
        ("pwrite past the end", json!(["EDQUOT", 0])),
        ("truncate longer", json!(["EDQUOT", 0])),
    ] {
        let outcome = built.run("bypass_quota", vec![json!(how)]);
        assert_eq!(outcome.result, expected, "{how}: {:?}", outcome.error);
    }
}

#[test]
fn no_grant_reaches_what_capsule_keeps() {
    // A link to the project folder itself, which holds `.capsule/` (the builds, the journal).
    let (_project, built) = project(|root| {
        fs::create_dir_all(root.join("out")).unwrap();
        std::os::unix::fs::symlink(".", root.join("data")).unwrap();
    });
    let error = built.run("read_input", vec![]).error.expect("refused");
    assert_eq!(error.kind, ErrorKind::Host);
    assert!(error.message.contains("resolves to the project folder itself"), "{}", error.message);

    // A link into the build folder.
    let (_project, built) = project(|root| std::os::unix::fs::symlink(".capsule/build", root.join("data")).unwrap());
    let error = built.run("read_input", vec![]).error.expect("refused");
    assert!(
        error.message.contains("`allowed_files` path `data` reaches") && error.message.contains("manifest"),
        "{}",
        error.message
    );
}

/// CPython never writes more than one buffer at a time (WASI's CPython has no `os.writev`),
/// so a module written for the purpose makes the WASI call itself, through the sandbox's own
/// linker: more buffers than POSIX's IOV_MAX are refused (`EINVAL`), fewer are written.
#[test]
fn a_write_of_more_than_1024_buffers_is_refused() {
    use wasm_encoder::{
        CodeSection, EntityType, ExportKind, ExportSection, Function, FunctionSection, ImportSection, MemorySection,
        MemoryType, Module, TypeSection, ValType,
    };
    let mut module = Module::new();
    let mut types = TypeSection::new();
    types.ty().function([ValType::I32; 4], [ValType::I32]);
    types.ty().function([ValType::I32], [ValType::I32]);
    module.section(&types);
    let mut imports = ImportSection::new();
    imports.import("wasi_snapshot_preview1", "fd_write", EntityType::Function(0));
    module.section(&imports);
    let mut functions = FunctionSection::new();
    functions.function(1);
    module.section(&functions);
    let mut memories = MemorySection::new();
    memories.memory(MemoryType { minimum: 1, maximum: None, memory64: false, shared: false, page_size_log2: None });
    module.section(&memories);
    let mut exports = ExportSection::new();
    exports.export(python_runtime::exports::MEMORY, ExportKind::Memory, 0).export("write", ExportKind::Func, 1);
    module.section(&exports);
    // write(count): `fd_write(1, iovecs at 0, count, written at 60000)`; every buffer is empty.
    let mut write = Function::new([]);
    write.instructions().i32_const(1).i32_const(0).local_get(0).i32_const(60_000).call(0).end();
    let mut code = CodeSection::new();
    code.function(&write);
    module.section(&code);

    let engine = tests::engine().wasmtime(manifest_schema::Metering::Fuel).unwrap();
    let module = wasmtime::Module::new(engine, module.finish()).unwrap();
    let errno = |count: i32| {
        tests::block_on(async {
            let state = capsule_exec::for_builder::SandboxState::new(
                wasmtime_wasi::WasiCtxBuilder::new().build_p1(),
                u64::MAX,
                Box::new(capsule_exec::for_builder::RefuseHostCalls("no host calls here")),
            );
            let mut store = wasmtime::Store::new(engine, state);
            store.set_fuel(u64::MAX).unwrap();
            let instance = capsule_exec::for_builder::linker(engine)
                .unwrap()
                .instantiate_async(&mut store, &module)
                .await
                .unwrap();
            let write = instance.get_typed_func::<i32, i32>(&mut store, "write").unwrap();
            write.call_async(&mut store, count).await.unwrap()
        })
    };
    assert_eq!(errno(1_024), 0, "IOV_MAX buffers are fine");
    assert_eq!(errno(1_025), 28, "one more is EINVAL");
    assert_eq!(errno(-1), 28);
}
