//! The Python SDK agrees with the builder on the `@task` options. (When a build is up to date
//! it asks the builder itself, through its native module.)

use std::path::Path;
use std::process::Command;

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
