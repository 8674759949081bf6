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
