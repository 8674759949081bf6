//! The Python SDK agrees with the builder: the `@task` options, and when a build is up to date.

use std::path::Path;
use std::process::Command;

use tests::build_into;

fn sdk() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../python-runtime/python")
}

#[test]
fn the_sdk_and_the_option_table_name_the_same_options() {
    let output = Command::new("python3")
        .args(["-B", "-c", "import capsule; print('\\n'.join(capsule.TASK_OPTIONS))"])
        .env("PYTHONPATH", sdk())
        .output()
        .expect("python3 must be installed to test the SDK");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let python: Vec<String> = String::from_utf8_lossy(&output.stdout).lines().map(str::to_string).collect();
    let rust: Vec<String> = manifest_schema::options::option_names().map(str::to_string).collect();
    assert_eq!(python, rust, "`TASK_OPTIONS` in capsule/_task.py and `OPTIONS` in manifest-schema disagree");
}

/// The SDK skips a build without starting a process when the build's fingerprint holds: it
/// must read the fingerprint the builder writes, and see a change the builder would see.
#[test]
fn the_sdk_recognises_an_up_to_date_build_from_its_fingerprint() {
    let project = tempfile::tempdir().unwrap();
    let entry = project.path().join("hello.py");
    std::fs::copy(fixtures::path("valid/multi_task.py"), &entry).unwrap();
    let out = project.path().join("build");
    build_into(&entry, &out, false);
    let runtime = python_runtime::runtime_path();
    // Another runtime, while the one the build used stays as it was.
    let other_runtime = project.path().join("other/capsule-python.wasm");
    std::fs::create_dir_all(other_runtime.parent().unwrap()).unwrap();
    std::fs::copy(&runtime, &other_runtime).unwrap();
    let check = "import pathlib, sys\nfrom capsule import _host\nprint(_host._up_to_date(pathlib.Path(sys.argv[1])))";
    let up_to_date = |runtime: &Path| {
        let output = Command::new("python3")
            .args(["-B", "-c", check])
            .arg(&out)
            .env("PYTHONPATH", sdk())
            .env("CAPSULE_RUNTIME", runtime)
            .output()
            .unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stdout).trim().to_string()
    };
    let builder_up_to_date = |runtime: &Path| {
        let options = capsule_build::BuildOptions {
            entry: entry.clone(),
            out_dir: Some(out.clone()),
            runtime: runtime.to_path_buf(),
            force: false,
        };
        capsule_build::up_to_date(&options).is_some()
    };
    assert_eq!(up_to_date(&runtime), out.join("manifest.toml").display().to_string());
    assert!(builder_up_to_date(&runtime));
    assert_eq!(up_to_date(&other_runtime), "None", "a build for another runtime is stale for the SDK");
    assert!(!builder_up_to_date(&other_runtime), "a build for another runtime is stale for the builder");
    std::fs::write(project.path().join("requirements.txt"), "tabulate\n").unwrap();
    assert_eq!(up_to_date(&runtime), "None", "a requirements file that appeared makes the build stale");
    assert!(!builder_up_to_date(&runtime));
}
