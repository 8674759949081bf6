//! Signed builds as a user makes and runs them: `capsule keygen`, `capsule build --sign`, and
//! runners (`capsule-exec`, `capsule run`, the daemon) that run only what a trusted key signed.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use support::{Daemon, run};

/// `capsule` in-process: no daemon answers on this socket.
fn capsule() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_capsule"));
    command.env("CAPSULE_SOCKET", "/nonexistent/capsule.sock").env_remove("CAPSULE_TRUST");
    command
}

fn capsule_exec() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_capsule-exec"));
    command.env("CAPSULE_SOCKET", "/nonexistent/capsule.sock").env_remove("CAPSULE_TRUST");
    command
}

/// A project with `hello.py`, and two key pairs: `release` and `other`.
struct Signed {
    dir: tempfile::TempDir,
}

impl Signed {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let hello = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/hello.py");
        std::fs::copy(hello, dir.path().join("hello.py")).unwrap();
        for name in ["release", "other"] {
            let (code, stdout, stderr) = run(capsule().arg("keygen").arg(dir.path().join(name)));
            assert_eq!(code, 0, "{stderr}");
            assert!(stdout.contains(&format!("{name}.pub")), "{stdout}");
        }
        Self { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn manifest(&self) -> PathBuf {
        self.path(".capsule/build/hello/manifest.toml")
    }

    /// Builds `hello.py`, signed with `key` when given.
    fn build(&self, key: Option<&str>) {
        let mut command = capsule();
        command.arg("build").arg(self.path("hello.py")).arg("--force");
        if let Some(key) = key {
            command.arg("--sign").arg(self.path(key));
        }
        let (code, stdout, stderr) = run(&mut command);
        assert_eq!(code, 0, "{stderr}");
        assert_eq!(stdout.contains("signed:"), key.is_some(), "{stdout}");
    }

    /// `capsule-exec` of the manifest with `--trust` of each key: (exit code, stderr).
    fn exec(&self, trusted: &[&str]) -> (i32, String, String) {
        let mut command = capsule_exec();
        command.arg(self.manifest()).arg("--no-daemon");
        for key in trusted {
            command.arg("--trust").arg(self.path(&format!("{key}.pub")));
        }
        run(&mut command)
    }
}

#[test]
fn capsule_exec_runs_only_what_a_trusted_key_signed() {
    let project = Signed::new();
    assert_eq!(std::fs::metadata(project.path("release")).unwrap().permissions().mode() & 0o777, 0o600);
    project.build(Some("release"));
    assert!(project.path(".capsule/build/hello/manifest.toml.sig").is_file());

    let (code, stdout, stderr) = project.exec(&["release"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("Hello, world"), "{stdout}");
    assert_eq!(project.exec(&["other", "release"]).0, 0, "any of the trusted keys will do");
    let (code, stdout, stderr) = run(capsule_exec()
        .arg(project.manifest())
        .arg("--no-daemon")
        .env("CAPSULE_TRUST", project.path("release.pub")));
    assert_eq!(code, 0, "`CAPSULE_TRUST` names trusted keys too: {stderr}");
    assert!(stdout.contains("Hello, world"));

    // Signed by a key the runner does not trust.
    let (code, stdout, stderr) = project.exec(&["other"]);
    assert_eq!((code, stdout.as_str()), (4, ""), "{stderr}");
    assert!(stderr.contains("which this runner does not trust"), "{stderr}");

    // Altered after signing (its limits raised, say).
    let manifest = project.manifest();
    std::fs::set_permissions(&manifest, std::fs::Permissions::from_mode(0o644)).unwrap();
    let text = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(&manifest, text.replacen("compute = ", "# raised\ncompute = ", 1)).unwrap();
    let (code, _, stderr) = project.exec(&["release"]);
    assert_eq!(code, 4, "{stderr}");
    assert!(stderr.contains("does not match it: the manifest was altered after signing"), "{stderr}");

    // Not signed at all: a rebuild without `--sign` leaves no old signature behind.
    project.build(None);
    assert!(!project.path(".capsule/build/hello/manifest.toml.sig").exists());
    let (code, _, stderr) = project.exec(&["release"]);
    assert_eq!(code, 4, "{stderr}");
    assert!(stderr.contains("is not signed") && stderr.contains("hint: sign it with"), "{stderr}");
    assert_eq!(project.exec(&[]).0, 0, "a runner that trusts no key runs unsigned builds, as before");
    let (code, _, stderr) =
        run(capsule().arg("run").arg(project.path("hello.py")).arg("--trust").arg(project.path("release.pub")));
    assert_eq!(code, 4, "`capsule run` takes `--trust` too: {stderr}");

    // A secret key that others can read is not used.
    std::fs::set_permissions(project.path("release"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, _, stderr) =
        run(capsule().arg("build").arg(project.path("hello.py")).arg("--sign").arg(project.path("release")));
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("readable by its owner only"), "{stderr}");
    let (code, _, stderr) = run(capsule().arg("keygen").arg(project.path("other")));
    assert_eq!(code, 2, "an existing key is never overwritten: {stderr}");
}

#[test]
fn a_daemon_that_trusts_a_key_runs_only_what_it_signed() {
    let project = Signed::new();
    let release = project.path("release.pub");
    let daemon = Daemon::start(&["--trust", release.to_str().unwrap()]);
    let through_daemon = |trusted: Option<&str>| {
        let mut command = daemon.capsule();
        command.env_remove("CAPSULE_TRUST").arg("run").arg(project.manifest()).arg("--daemon");
        if let Some(key) = trusted {
            command.arg("--trust").arg(project.path(&format!("{key}.pub")));
        }
        run(&mut command)
    };
    project.build(None);
    let (code, _, stderr) = through_daemon(None);
    assert_eq!(code, 4, "{stderr}");
    assert!(stderr.contains("is not signed"), "{stderr}");
    project.build(Some("release"));
    let (code, stdout, stderr) = through_daemon(None);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("Hello, world"), "{stdout}");
    // The client's own `--trust` holds through the daemon as well.
    let (code, _, stderr) = through_daemon(Some("other"));
    assert_eq!(code, 4, "{stderr}");
    assert!(stderr.contains("does not trust"), "{stderr}");
    assert_eq!(through_daemon(Some("release")).0, 0);
}
