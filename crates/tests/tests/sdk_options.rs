//! The Python SDK accepts exactly the `@task` options the builder knows.

use std::path::Path;
use std::process::Command;

#[test]
fn the_sdk_and_the_option_table_name_the_same_options() {
    let sdk = Path::new(env!("CARGO_MANIFEST_DIR")).join("../python-runtime/python");
    let output = Command::new("python3")
        .args(["-B", "-c", "import capsule; print('\\n'.join(capsule.TASK_OPTIONS))"])
        .env("PYTHONPATH", sdk)
        .output()
        .expect("python3 must be installed to test the SDK");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let python: Vec<String> = String::from_utf8_lossy(&output.stdout).lines().map(str::to_string).collect();
    let rust: Vec<String> = manifest_schema::options::option_names().map(str::to_string).collect();
    assert_eq!(python, rust, "`TASK_OPTIONS` in capsule/_task.py and `OPTIONS` in manifest-schema disagree");
}
