//! What the real binaries print, snapshot by snapshot: exit code, stdout and stderr, with
//! the parts that change from run to run (folders, run ids, timings) filtered out.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The commands in-process: no daemon answers on their socket.
fn capsule() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_capsule"));
    command.env("CAPSULE_SOCKET", "/nonexistent/capsule.sock");
    command
}

fn capsule_exec() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_capsule-exec"));
    command.env("CAPSULE_SOCKET", "/nonexistent/capsule.sock");
    command
}

/// A project folder with a copy of `files` from the fixtures and examples.
fn project(files: &[(&str, &Path)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, source) in files {
        std::fs::copy(source, dir.path().join(name)).unwrap();
    }
    dir
}

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples").join(name)
}

/// Runs `command` in `dir` and renders what a user would see.
fn transcript(command: &mut Command, dir: &Path) -> String {
    let output = command.current_dir(dir).env_remove("CAPSULE_LOG").output().expect("the binary starts");
    format!(
        "exit: {}\n--- stdout\n{}--- stderr\n{}",
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn settings(dir: &Path) -> insta::Settings {
    let mut settings = insta::Settings::clone_current();
    let real = dir.canonicalize().unwrap();
    for path in [real.display().to_string(), dir.display().to_string()] {
        settings.add_filter(&regex_escape(&path), "[PROJECT]");
    }
    settings.add_filter(r"\b[0-9a-f]{16}\b", "[RUN_ID]");
    settings.add_filter(r"\b[0-9a-f]{64}\b", "[SHA256]");
    settings.add_filter(r"\d+ ms\b", "[N] ms");
    settings.add_filter(r"\d+(\.\d+)?(ms|s|µs)\b", "[DURATION]");
    settings
}

fn regex_escape(text: &str) -> String {
    text.chars().fold(String::new(), |mut out, c| {
        if "\\.+*?()|[]{}^$#&-~".contains(c) {
            out.push('\\');
        }
        out.push(c);
        out
    })
}

#[test]
fn run_prints_the_tasks_output_then_its_result() {
    let dir = project(&[("hello.py", &example("hello.py"))]);
    settings(dir.path()).bind(|| {
        insta::assert_snapshot!(transcript(capsule().args(["run", "hello.py", "Ada"]), dir.path()));
    });
}

#[test]
fn a_failing_task_shows_its_traceback_the_error_and_how_to_resume() {
    let dir = project(&[("tasks.py", &fixtures::path("valid/multi_task.py"))]);
    settings(dir.path()).bind(|| {
        insta::assert_snapshot!(transcript(capsule().args(["run", "tasks.py", "--task", "fail", "boom"]), dir.path()));
        insta::assert_snapshot!(transcript(capsule().args(["run", "tasks.py", "--task", "nope"]), dir.path()));
        insta::assert_snapshot!(transcript(capsule().args(["run", "tasks.py", "--args-json", "{}"]), dir.path()));
    });
}

#[test]
fn a_build_error_names_the_place_and_hints_at_the_fix() {
    let dir = project(&[("unknown_option.py", &fixtures::path("invalid/unknown_option.py"))]);
    settings(dir.path()).bind(|| {
        insta::assert_snapshot!(transcript(capsule().args(["build", "unknown_option.py"]), dir.path()));
    });
}

#[test]
fn commands_without_their_files_say_what_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    settings(dir.path()).bind(|| {
        insta::assert_snapshot!(transcript(capsule().args(["runs"]), dir.path()));
        insta::assert_snapshot!(transcript(capsule().args(["run"]), dir.path()));
        insta::assert_snapshot!(transcript(capsule_exec().args(["nowhere/manifest.toml"]), dir.path()));
    });
}

#[test]
fn a_deterministic_failure_gets_no_resume_hint() {
    let dir = project(&[("limits.py", &fixtures::path("valid/limits.py"))]);
    settings(dir.path()).bind(|| {
        insta::assert_snapshot!(transcript(
            capsule().args(["run", "limits.py", "--task", "count_custom", "--args-json", "[1000000000]"]),
            dir.path()
        ));
    });
}

#[test]
fn capsule_python_prints_what_the_code_printed_then_its_last_value() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("data")).unwrap();
    std::fs::write(dir.path().join("data/in.txt"), "a line\n").unwrap();
    settings(dir.path()).bind(|| {
        insta::assert_snapshot!(transcript(
            capsule().args(["python", "-c", "total = sum(range(10))\nprint('sum:', total)\ntotal * 2"]),
            dir.path()
        ));
        insta::assert_snapshot!(transcript(capsule().args(["python", "-c", "x = (1,"]), dir.path()));
        insta::assert_snapshot!(transcript(capsule().args(["python", "-c", "open('data/in.txt').read()"]), dir.path()));
        insta::assert_snapshot!(transcript(
            capsule().args(["python", "--allow-dir", "data", "-c", "open('data/in.txt').read()"]),
            dir.path()
        ));
        insta::assert_snapshot!(transcript(
            capsule().args(["python", "--compute", "LOW", "-c", "while True: pass"]),
            dir.path()
        ));
        insta::assert_snapshot!(transcript(capsule().args(["python", "--ram", "lots", "-c", "1"]), dir.path()));
        // A dict comes back in Python's order, not sorted.
        insta::assert_snapshot!(transcript(
            capsule().args(["python", "-c", "{'b': 1, 'a': [2, {'z': 0, 'y': 1}]}"]),
            dir.path()
        ));
        // What the sandbox cannot do fails on use, saying what to do instead.
        insta::assert_snapshot!(transcript(
            capsule().args(["python", "-c", "import socket\nsocket.create_connection(('example.com', 80))"]),
            dir.path()
        ));
        insta::assert_snapshot!(transcript(
            capsule().args(["python", "-c", "import threading\nthreading.Thread(target=print).start()"]),
            dir.path()
        ));
    });
}

/// Every category of failure ends a command with its exit code, and says what would help.
#[test]
fn each_category_of_failure_has_its_exit_code() {
    let dir = project(&[
        ("tasks.py", &fixtures::path("valid/multi_task.py")),
        ("unknown_option.py", &fixtures::path("invalid/unknown_option.py")),
    ]);
    std::fs::write(dir.path().join("not-a-folder"), "").unwrap();
    settings(dir.path()).bind(|| {
        // usage (2): a task the file does not have.
        insta::assert_snapshot!(transcript(capsule().args(["run", "tasks.py", "--task", "nope"]), dir.path()));
        // not found (2): a run the journal does not have.
        insta::assert_snapshot!(transcript(capsule().args(["runs", "show", "0123456789abcdef"]), dir.path()));
        // build (3).
        insta::assert_snapshot!(transcript(capsule().args(["build", "unknown_option.py"]), dir.path()));
        // load (4): no manifest there, and how to make one.
        insta::assert_snapshot!(transcript(capsule_exec().args(["nowhere/manifest.toml"]), dir.path()));
        // task (1): the task raised; resuming could help.
        insta::assert_snapshot!(transcript(
            capsule().args(["run", "--no-daemon", "tasks.py", "--task", "fail", "boom"]),
            dir.path()
        ));
        // internal (70): the machine refused what Capsule needed.
        insta::assert_snapshot!(transcript(
            capsule().args(["daemon", "--socket", "not-a-folder/daemon.sock", "--state-dir", "state"]),
            dir.path()
        ));
    });
}

/// For programs (the Python SDK reads it): a failure as one line of JSON, in the shape of the
/// daemon's API errors.
#[test]
fn a_failure_as_json_for_programs() {
    let dir = project(&[("unknown_option.py", &fixtures::path("invalid/unknown_option.py"))]);
    settings(dir.path()).bind(|| {
        insta::assert_snapshot!(transcript(
            capsule().args(["build", "unknown_option.py", "--message-format", "json"]),
            dir.path()
        ));
        insta::assert_snapshot!(transcript(
            capsule_exec().args(["--message-format", "json", "nowhere/manifest.toml"]),
            dir.path()
        ));
    });
}
