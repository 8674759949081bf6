//! The `capsule` and `capsule-exec` binaries as a user runs them: output, exit codes, errors.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use manifest_schema::{Compute, Manifest};
use serde_json::Value;

/// `capsule` in-process: no daemon answers on this socket.
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

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn run(command: &mut Command) -> (i32, String, String) {
    let Output { status, stdout, stderr } = command.output().expect("the binary starts");
    (status.code().expect("exit code"), text(&stdout), text(&stderr))
}

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples")
}

#[test]
fn capsule_run_hello_prints_the_result() {
    let out = tempfile::tempdir().unwrap();
    let (code, stdout, stderr) =
        run(capsule().arg("run").arg(examples().join("hello.py")).arg("-o").arg(out.path()).arg("Ada"));
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("running inside a wasi sandbox"), "task output streams to stdout: {stdout}");
    assert!(stdout.trim_end().ends_with("Hello, Ada, from Capsule!"), "{stdout}");
}

#[test]
fn build_then_capsule_exec_with_json_envelope_and_exit_codes() {
    let out = tempfile::tempdir().unwrap();
    let fixture = fixtures::path("valid/multi_task.py");
    let (code, stdout, stderr) = run(capsule().arg("build").arg(&fixture).arg("-o").arg(out.path()));
    assert_eq!(code, 0, "{stderr}");
    let manifest = out.path().join("manifest.toml");
    assert!(stdout.contains(&manifest.display().to_string()), "{stdout}");

    let (code, stdout, stderr) =
        run(capsule_exec().arg(&manifest).args(["--task", "add", "--json", "--args-json", "[20, 22]"]));
    assert_eq!(code, 0, "{stderr}");
    let envelope: Value = serde_json::from_str(&stdout).expect("stdout is exactly the JSON envelope");
    assert_eq!(envelope["success"], true);
    assert_eq!(envelope["result"], 42);
    assert_eq!(envelope["error"], Value::Null);
    let execution = &envelope["execution"];
    assert_eq!(execution["task"], "add");
    assert_eq!(execution["attempts"], 1);
    for field in ["duration_ms", "fuel_consumed", "peak_memory_bytes"] {
        assert!(execution[field].as_u64().is_some(), "{field} in {execution}");
    }

    let (code, stdout, _) = run(capsule_exec().arg(&manifest).args(["--task", "shout", "--json", "hi"]));
    assert_eq!(code, 0);
    let envelope: Value = serde_json::from_str(&stdout).expect("prints go to stderr with --json");
    assert_eq!(envelope["output"]["stdout"]["text"], "shouting hi\n");

    let (code, _, stderr) = run(capsule_exec().arg(&manifest).args(["--task", "fail", "boom"]));
    assert_eq!(code, 1, "a failed task exits 1");
    assert!(stderr.contains("ValueError: boom"), "{stderr}");
    assert!(stderr.contains("error: task `fail` failed after 3 attempts (exception): ValueError: boom"), "{stderr}");

    let (code, _, stderr) = run(capsule_exec().arg(&manifest).args(["--task", "nope"]));
    assert_eq!(code, 2, "an unknown task is a usage error");
    assert!(stderr.contains("no task named `nope`") && stderr.contains("hint:"), "{stderr}");

    let (code, _, stderr) = run(capsule_exec().arg(&manifest));
    assert_eq!(code, 0, "`main` is the default task: {stderr}");

    let (code, _, stderr) = run(capsule_exec().arg(&manifest).args(["--args-json", "{}"]));
    assert_eq!(code, 2);
    assert!(stderr.contains("must be a JSON array"), "{stderr}");
}

#[test]
fn large_arguments_come_from_a_file_or_standard_input_up_to_a_limit() {
    use std::io::Write;
    use std::process::Stdio;

    let out = tempfile::tempdir().unwrap();
    let fixture = fixtures::path("valid/multi_task.py");
    let (code, _, stderr) = run(capsule().arg("build").arg(&fixture).arg("-o").arg(out.path()));
    assert_eq!(code, 0, "{stderr}");
    let manifest = out.path().join("manifest.toml");
    // Longer than a command line may be (about 2 MB on Linux).
    let word = "a".repeat(3 << 20);
    let args = out.path().join("args.json");
    std::fs::write(&args, serde_json::to_string(&[word.as_str(), "!"]).unwrap()).unwrap();
    let (code, stdout, stderr) = run(capsule_exec().arg(&manifest).args(["--task", "add", "--args-file"]).arg(&args));
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.trim_end().ends_with("aa!") && stdout.len() > 3 << 20, "{}", &stdout[stdout.len() - 10..]);

    let mut child = capsule_exec()
        .arg(&manifest)
        .args(["--task", "add", "--args-json", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(br#"[40, 2]"#).unwrap();
    let output = child.wait_with_output().unwrap();
    assert_eq!(text(&output.stdout).trim(), "42");

    std::fs::write(&args, format!("[\"{}\"]", "a".repeat(17 << 20))).unwrap();
    let (code, _, stderr) = run(capsule_exec().arg(&manifest).args(["--task", "add", "--args-file"]).arg(&args));
    assert_eq!(code, 2);
    assert!(stderr.contains("is larger than 16 MiB, the limit for arguments"), "{stderr}");
    assert!(stderr.contains("hint: pass large data as a file the task reads"), "{stderr}");
}

#[test]
fn build_errors_exit_3_with_the_location() {
    let out = tempfile::tempdir().unwrap();
    let (code, _, stderr) =
        run(capsule().arg("build").arg(fixtures::path("invalid/unknown_option.py")).arg("-o").arg(out.path()));
    assert_eq!(code, 3);
    assert!(stderr.starts_with("error: unknown_option.py:4:21: unknown `@task` option `rma`"), "{stderr}");
    assert!(stderr.contains("hint: did you mean `ram`?"), "{stderr}");

    let (code, _, stderr) = run(capsule().args(["run", "does/not/exist.py"]));
    assert_eq!(code, 3);
    assert!(stderr.contains("cannot read `does/not/exist.py`"), "{stderr}");
}

#[test]
fn capsule_exec_refuses_a_missing_manifest() {
    let (code, _, stderr) = run(capsule_exec().arg("nowhere/manifest.toml"));
    assert_eq!(code, 4, "an artifact that cannot be loaded");
    assert!(stderr.contains("cannot read manifest `nowhere/manifest.toml`"), "{stderr}");
}

#[test]
fn a_build_with_a_cold_cache_equals_one_with_a_warm_cache() {
    let cache = tempfile::tempdir().unwrap();
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let hello = examples().join("hello.py");
    for out in [&a, &b] {
        let (code, _, stderr) = run(capsule()
            .args(["build", "--force"])
            .arg(&hello)
            .arg("-o")
            .arg(out.path())
            .env("CAPSULE_CACHE_DIR", cache.path()));
        assert_eq!(code, 0, "{stderr}");
    }
    let manifest = |dir: &tempfile::TempDir| std::fs::read_to_string(dir.path().join("manifest.toml")).unwrap();
    assert_eq!(manifest(&a), manifest(&b), "the compilation cache must not change the artifact");
    let code = &Manifest::load(&a.path().join("manifest.toml")).unwrap().artifact.code;
    let files = |folder: &str, extension: &str| {
        std::fs::read_dir(cache.path().join(folder))
            .unwrap()
            .flatten()
            .filter(|entry| entry.path().extension().is_some_and(|e| e == extension))
            .map(|entry| entry.file_name().to_string_lossy().into_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(files("code", "sha256").len(), 1, "the runtime's code was compiled once, for both builds");
    assert!(files("compiled", "cwasm").contains(&code.file), "the runner keeps it");
    assert!(a.path().join(&code.file).is_file() && b.path().join(&code.file).is_file());
}

#[test]
fn capsule_toml_names_the_entry_point_and_task_defaults() {
    let project = tempfile::tempdir().unwrap();
    let root = project.path();
    std::fs::write(
        root.join("capsule.toml"),
        "[workflow]\nname = \"greeter\"\nversion = \"1.0.0\"\nentrypoint = \"app.py\"\n\n[tasks]\ndefault_compute = \"LOW\"\ndefault_max_retries = 0\ndefault_ram = \"96MiB\"\n",
    )
    .unwrap();
    std::fs::write(
        root.join("app.py"),
        "from capsule import task\n\n@task\ndef main(name='you'):\n    return f'hi {name}'\n\n@task(max_retries=2)\ndef other():\n    return 1\n",
    )
    .unwrap();
    let (code, stdout, stderr) = run(capsule().args(["run", "Ada"]).current_dir(root));
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stdout.trim(), "hi Ada", "a first argument that is not a .py file goes to the task");

    let manifest = std::fs::read_to_string(root.join(".capsule/build/app/manifest.toml")).unwrap();
    let manifest = manifest_schema::Manifest::from_toml(&manifest, "manifest.toml").unwrap();
    let main = manifest.task("main").unwrap();
    let options = &main.options;
    assert_eq!((options.compute, options.max_retries, options.ram.bytes()), (Compute::Low, 0, 96 << 20));
    assert_eq!(manifest.task("other").unwrap().options.max_retries, 2, "a task's own option wins");

    std::fs::write(root.join("capsule.toml"), "[workflow]\nentry = \"app.py\"\n").unwrap();
    let (code, _, stderr) = run(capsule().arg("run").current_dir(root));
    assert_eq!(code, 2);
    assert!(stderr.contains("unknown field `entry`"), "{stderr}");

    std::fs::remove_file(root.join("capsule.toml")).unwrap();
    let (code, _, stderr) = run(capsule().arg("run").current_dir(root));
    assert_eq!(code, 2);
    assert!(stderr.contains("no `capsule.toml` with an entrypoint") && stderr.contains("hint:"), "{stderr}");
}

#[test]
fn a_failed_run_resumes_without_redoing_finished_steps_and_divergence_is_refused() {
    let project = tempfile::tempdir().unwrap();
    let root = project.path();
    std::fs::copy(fixtures::path("valid/durable.py"), root.join("durable.py")).unwrap();
    let capsule_in = |failing: Option<&str>| {
        let mut command = capsule();
        command.current_dir(root).env_remove("CAPSULE_TEST_FAIL_AT");
        if let Some(step) = failing {
            command.env("CAPSULE_TEST_FAIL_AT", step);
        }
        command
    };
    let (code, _, stderr) = run(capsule_in(Some("3")).args(["run", "durable.py", "--json"]));
    assert_eq!(code, 1, "step 3 fails: {stderr}");
    let run_id =
        stderr.split("capsule resume ").nth(1).unwrap().trim_end_matches(|c: char| !c.is_ascii_hexdigit()).to_string();

    let (code, listing, _) = run(capsule_in(None).args(["runs", "--json"]));
    assert_eq!(code, 0);
    let runs: Value = serde_json::from_str(&listing).unwrap();
    assert_eq!((runs[0]["id"].as_str(), runs[0]["status"].as_str()), (Some(run_id.as_str()), Some("failed")));

    let (code, stdout, stderr) = run(capsule_in(None).args(["resume", &run_id, "--json", "--verbose"]));
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stderr.matches("replayed from the journal").count(), 2, "steps 1 and 2 are not run again: {stderr}");
    let envelope: Value = serde_json::from_str(&stdout).unwrap();
    let steps = envelope["result"].as_array().unwrap();
    assert_eq!(steps.len(), 3);

    let (code, tree, _) = run(capsule_in(None).args(["runs", "show", &run_id]));
    assert_eq!(code, 0);
    assert!(tree.contains("main ok") && tree.contains("#3 step: ok"), "{tree}");

    // The code changes under a failed run: resuming it must refuse, not mix two programs.
    let (code, _, _) = run(capsule_in(Some("2")).args(["run", "durable.py"]));
    assert_eq!(code, 1);
    let (_, listing, _) = run(capsule_in(None).args(["runs", "--json"]));
    let second_id = serde_json::from_str::<Value>(&listing).unwrap()[0]["id"].as_str().unwrap().to_string();
    let source = std::fs::read_to_string(root.join("durable.py")).unwrap();
    // (With retries now: another attempt would meet the same refusal, so none is made.)
    let changed = source
        .replace("range(1, count + 1)", "range(count, 0, -1)")
        .replace("@task(max_retries=0)\ndef main", "@task(max_retries=2)\ndef main");
    std::fs::write(root.join("durable.py"), changed).unwrap();
    let (code, _, stderr) = run(capsule_in(None).args(["resume", &second_id]));
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("workflow diverged at step 1"), "{stderr}");
    assert!(stderr.contains("(diverged)") && !stderr.contains("hint: resume"), "a resume cannot help: {stderr}");
    let (_, envelope, _) = run(capsule_in(None).args(["resume", &second_id, "--json"]));
    let envelope: Value = serde_json::from_str(&envelope).unwrap();
    assert_eq!(
        (envelope["error"]["type"].as_str(), envelope["execution"]["attempts"].as_u64()),
        (Some("diverged"), Some(1))
    );

    // A finished step's result changed in the journal behind Capsule's back is not replayed.
    std::fs::write(root.join("durable.py"), source).unwrap();
    let (code, _, _) = run(capsule_in(Some("3")).args(["run", "durable.py"]));
    assert_eq!(code, 1);
    let (_, listing, _) = run(capsule_in(None).args(["runs", "--json"]));
    let third_id = serde_json::from_str::<Value>(&listing).unwrap()[0]["id"].as_str().unwrap().to_string();
    let journal = rusqlite::Connection::open(root.join(".capsule/journal.db")).unwrap();
    let changed = journal
        .execute("UPDATE calls SET result = '\"forged\"' WHERE run_id = ?1 AND seq = 1 AND parent != 0", [&third_id])
        .unwrap();
    assert_eq!(changed, 1);
    let (code, _, stderr) = run(capsule_in(None).args(["resume", &third_id]));
    assert_ne!(code, 0, "{stderr}");
    assert!(stderr.contains("task 'step' failed (diverged): the journal's record of step 1"), "{stderr}");
    assert!(stderr.contains("was changed outside Capsule (its checksum does not match)"), "{stderr}");
    assert!(!stderr.contains("hint: resume"), "a resume cannot help: {stderr}");
}

#[test]
fn the_fan_out_example_collects_results_and_failures() {
    let out = tempfile::tempdir().unwrap();
    let (code, stdout, stderr) = run(capsule().arg("run").arg(examples().join("fan_out.py")).arg("-o").arg(out.path()));
    assert_eq!(code, 0, "{stderr}");
    let result: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(result["total"], 6);
    assert_eq!(result["failures"][0]["message"], "empty document");
}

#[test]
fn a_build_killed_at_any_moment_leaves_a_folder_the_next_build_repairs() {
    let project = tempfile::tempdir().unwrap();
    let hello = std::fs::read_to_string(examples().join("hello.py")).unwrap();
    let source = |version: u32| format!("{hello}\n# version {version}\n");
    std::fs::write(project.path().join("hello.py"), source(0)).unwrap();
    let started = std::time::Instant::now();
    let (code, _, stderr) = run(capsule().args(["build", "hello.py"]).current_dir(project.path()));
    assert_eq!(code, 0, "{stderr}");
    // Kill points spread over a whole build (the first one's length), each on a new source.
    let whole = started.elapsed();
    for version in 1..=6 {
        std::fs::write(project.path().join("hello.py"), source(version)).unwrap();
        let mut build = capsule()
            .args(["build", "hello.py"])
            .current_dir(project.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(whole * version / 7);
        let _ = build.kill();
        build.wait().unwrap();

        let (code, stdout, stderr) = run(capsule().args(["run", "hello.py", "Ada"]).current_dir(project.path()));
        assert_eq!(code, 0, "after a build killed at {version}/7 of its way: {stderr}");
        assert!(stdout.ends_with("Hello, Ada, from Capsule!\n"), "{stdout}");
        let names: Vec<String> = std::fs::read_dir(project.path().join(".capsule/build/hello"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        // The build's state and the runtime's code.
        assert_eq!(names.iter().filter(|n| n.ends_with(".cwasm")).count(), 2, "one artifact: {names:?}");
        assert!(!names.iter().any(|n| n.ends_with(".tmp")), "no half-written file left: {names:?}");
    }
}

#[test]
fn eight_concurrent_builds_of_one_new_file_all_succeed_with_the_same_artifact() {
    let project = tempfile::tempdir().unwrap();
    std::fs::copy(examples().join("hello.py"), project.path().join("hello.py")).unwrap();
    let builds: Vec<_> = (0..8)
        .map(|_| {
            capsule()
                .args(["build", "hello.py"])
                .current_dir(project.path())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for build in builds {
        let output = build.wait_with_output().unwrap();
        assert!(output.status.success(), "{}", text(&output.stderr));
    }
    let (code, stdout, stderr) = run(capsule().args(["run", "hello.py", "Ada"]).current_dir(project.path()));
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.ends_with("Hello, Ada, from Capsule!\n"), "{stdout}");
    let artifacts = std::fs::read_dir(project.path().join(".capsule/build/hello"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().ends_with(".cwasm"))
        .count();
    assert_eq!(artifacts, 2, "one artifact (state and code), no leftovers");
}
