//! The `capsule` package must import and work under the host's own CPython, so users can
//! unit-test their tasks without Capsule. Runs `test_host_sdk.py` with `python3`.

use std::path::Path;
use std::process::Command;

#[test]
fn the_sdk_works_under_host_python() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let output = Command::new("python3")
        .arg("-B")
        .arg(crate_dir.join("tests/test_host_sdk.py"))
        .env("PYTHONPATH", crate_dir.join("python"))
        .output()
        .expect("python3 must be installed to test the host SDK");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("OK"), "{stderr}");
}
