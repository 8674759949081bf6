//! The build → load → run path: results, failures, env, caching, reproducibility and the
//! refusal of tampered artifacts.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use capsule_exec::LoadError;
use manifest_schema::{Category, Explain};
use python_runtime::ErrorKind;
use serde_json::json;
use tests::{build_into, engine, load, quiet_run, shared};

const MULTI: &str = "valid/multi_task.py";

#[test]
fn results_of_every_json_type_round_trip() {
    let built = shared(MULTI);
    let outcome = built.run("json_types", vec![]);
    assert!(outcome.success);
    assert_eq!(
        outcome.result,
        json!({
            "string": "text", "integer": 42, "float": 2.5, "true": true, "false": false, "null": null,
            "list": [1, "two", [3]], "nested": {"k": {"v": [null]}}, "unicode": "café ✓",
        })
    );
    assert_eq!(built.run("add", vec![json!(2), json!(40)]).result, json!(42));
    assert_eq!(built.run("add", vec![json!("ab"), json!("cd")]).result, json!("abcd"));
    assert_eq!(built.run("main", vec![]).result, json!("hello world"));
    assert_eq!(outcome.execution.attempts, 1);
    assert!(outcome.execution.fuel_consumed > 0);
    assert!(outcome.execution.peak_memory_bytes >= built.output.manifest.artifact.initial_memory_bytes);
}

#[test]
fn a_trivial_run_finds_the_dispatcher_warmed_up_in_the_snapshot() {
    // The build runs the dispatcher's whole path a few times before the snapshot (`_warm_up`
    // in the runtime), so a run does not specialise its bytecode again: a trivial task costs
    // about 140,000 units of fuel, where it cost about 190,000 with one pass.
    let outcome = shared(MULTI).run("main", vec![]);
    assert!(outcome.success, "{:?}", outcome.error);
    let fuel = outcome.execution.fuel_consumed;
    assert!(fuel < 160_000, "a trivial run used {fuel} fuel");
}

#[test]
fn a_failing_task_is_retried_and_every_attempt_is_reported() {
    let outcome = shared(MULTI).run("fail", vec![]);
    assert!(!outcome.success);
    assert_eq!(outcome.execution.attempts, 3, "max_retries=2 means three attempts");
    assert_eq!(outcome.execution.attempt_errors.len(), 3);
    assert!(outcome.execution.attempt_errors.iter().all(|e| e.exc_type == "ValueError"));
    assert_eq!(outcome.result, serde_json::Value::Null);
}

#[test]
fn a_result_that_is_not_json_is_an_error() {
    let error = shared(MULTI).run("not_json", vec![]).error.expect("a set is not JSON");
    assert_eq!(error.kind, ErrorKind::Exception);
    assert!(error.message.contains("not JSON"), "{}", error.message);
}

#[test]
fn arguments_that_do_not_fit_the_function_are_reported() {
    let error = shared(MULTI).run("add", vec![json!(1)]).error.expect("missing argument");
    assert_eq!(error.kind, ErrorKind::InvalidInput);
    assert!(error.message.contains("missing 1 required positional argument: 'b'"), "{}", error.message);
}

#[test]
fn a_task_sees_exactly_its_declared_environment() {
    let outcome =
        shared(MULTI).run_in_environment("environment", vec![], &[("CAPSULE_TEST_HOST_SECRET", "must-not-leak")]);
    assert_eq!(outcome.result, json!({"GREETING": "bonjour", "MODE": "test"}));
}

#[test]
fn options_a_run_brings_are_checked_whichever_front_door_sent_them() {
    let mut options = manifest_schema::TaskOptions::for_code();
    options.env_vars.insert("MODE".into(), "x".into());
    options.env_passthrough.push("MODE".into());
    let mut request = quiet_run("environment", vec![]);
    request.order.options = Some(options);
    let error = engine().prepare(&shared(MULTI).loaded, request).err().expect("the options are refused");
    assert_eq!(error.category(), Category::Usage);
    assert_eq!(error.to_string(), "`env_passthrough`: `MODE` is both in `env_vars` and in `env_passthrough`");
    assert_eq!(error.hint().as_deref(), Some("keep it in one of them"));
}

#[test]
fn rebuilding_from_clean_is_byte_identical() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let entry = fixtures::path(MULTI);
    let first = build_into(&entry, a.path(), true);
    let second = build_into(&entry, b.path(), true);
    assert_eq!(first.manifest.artifact.sha256, second.manifest.artifact.sha256);
    assert_eq!(fs::read_to_string(&first.manifest_path).unwrap(), fs::read_to_string(&second.manifest_path).unwrap());
}

#[test]
fn the_host_api_is_not_in_the_sandbox_and_says_what_to_do_instead() {
    let project = tempfile::tempdir().unwrap();
    let entry = project.path().join("main.py");
    let source = "import importlib\nimport capsule\nfrom capsule import task\n\n@task(max_retries=0)\n\
                  def main():\n    try:\n        importlib.import_module('capsule._host')\n    \
                  except ImportError:\n        return capsule.run('main.py')\n    \
                  return 'the SDK is in the runtime'\n";
    fs::write(&entry, source).unwrap();
    let built = load(build_into(&entry, &project.path().join(".capsule/build"), true));
    let error = built.run("main", vec![]).error.expect("capsule.run refuses inside a task");
    assert_eq!(error.exc_type, "RuntimeError", "{}", error.message);
    assert!(error.message.starts_with("capsule.run is for the host; inside a task, call another task"));
}

/// Writes `entry` with one task, `main`, that returns `value`.
fn write_main_returning(entry: &Path, value: u32) {
    fs::write(entry, format!("from capsule import task\n\n@task\ndef main():\n    return {value}\n")).unwrap();
}

/// A new project (kept while the folder lives) whose `app.py` returns `value`, with its entry
/// file and output folder.
fn project_returning(value: u32) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let project = tempfile::tempdir().unwrap();
    let entry = project.path().join("app.py");
    write_main_returning(&entry, value);
    let out = project.path().join("out");
    (project, entry, out)
}

#[test]
fn editing_the_task_body_changes_the_artifact_and_no_edit_is_a_cache_hit() {
    let (_project, entry, out) = project_returning(1);
    let first = build_into(&entry, &out, false);
    assert!(!first.cache_hit);
    let again = build_into(&entry, &out, false);
    assert!(again.cache_hit, "nothing changed");
    assert_eq!(again.manifest, first.manifest);

    write_main_returning(&entry, 2);
    let edited = build_into(&entry, &out, false);
    assert!(!edited.cache_hit);
    assert_ne!(edited.manifest.artifact.sha256, first.manifest.artifact.sha256);
    assert!(!out.join(&first.manifest.artifact.file).exists(), "the old artifact is cleaned up");
    // The runtime's code is compiled once: the edit reused the runner's kept copy rather
    // than compiling it again, and the project has a read-only copy of its own, never a link
    // to the runner's (a task that could write the project's would change what runners run).
    assert_eq!(edited.manifest.artifact.code, first.manifest.artifact.code);
    let code = fs::metadata(out.join(&edited.manifest.artifact.code.file)).unwrap();
    let kept = fs::metadata(
        capsule_exec::paths::cache_dir().unwrap().join("compiled").join(&edited.manifest.artifact.code.file),
    )
    .expect("the runner keeps the compiled code");
    assert_ne!(code.ino(), kept.ino(), "the output's code file is a copy");
    assert_eq!((code.nlink(), code.len()), (1, kept.len()));
    assert!(code.permissions().readonly() && kept.permissions().readonly());
    assert_eq!(load(edited).run("main", vec![]).result, json!(2));
}

#[test]
fn a_rebuild_replaces_a_damaged_copy_of_the_runtimes_code() {
    let (_project, entry, out) = project_returning(1);
    let built = build_into(&entry, &out, false);
    let code = out.join(&built.manifest.artifact.code.file);
    // A new file in its place: writing through the link would change the cache's entry.
    fs::remove_file(&code).unwrap();
    fs::write(&code, b"damaged").unwrap();
    // A runner that has not kept the code yet reads the project's copy.
    let store = tempfile::tempdir().unwrap();
    let runner = || capsule_exec::Engine::new().unwrap().with_store(store.path().to_path_buf());
    let error = runner().load(&built.manifest_path).err().expect("damaged code");
    assert!(matches!(error, LoadError::HashMismatch { .. }), "{error}");
    build_into(&entry, &out, true);
    assert!(runner().load(&built.manifest_path).is_ok(), "the rebuild put the code back");
}

#[test]
fn a_tampered_artifact_or_manifest_is_refused() {
    let built = shared(MULTI);
    let copy = tempfile::tempdir().unwrap();
    for entry in fs::read_dir(built.out_dir()).unwrap() {
        let entry = entry.unwrap();
        fs::copy(entry.path(), copy.path().join(entry.file_name())).unwrap();
    }
    let manifest_path = copy.path().join(capsule_build::MANIFEST_FILE);
    let manifest_text = fs::read_to_string(&manifest_path).unwrap();
    let artifact = copy.path().join(&built.output.manifest.artifact.file);
    let code = copy.path().join(&built.output.manifest.artifact.code.file);
    for file in [&manifest_path, &artifact, &code] {
        assert!(fs::metadata(file).unwrap().permissions().readonly(), "{} is written read-only", file.display());
        fs::set_permissions(file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    }
    // A fresh engine and store each time, as a new runner would have: a runner keeps its own
    // copy of what it verified and never reads the project's file again.
    let store = tempfile::tempdir().unwrap();
    let runner = || capsule_exec::Engine::new().unwrap().with_store(store.path().join("compiled"));
    let fresh_store = || {
        let _ = fs::remove_dir_all(store.path().join("compiled"));
    };

    // One flipped byte in the native code.
    let mut bytes = fs::read(&artifact).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    fs::write(&artifact, &bytes).unwrap();
    let error = runner().load(&manifest_path).err().expect("tampered artifact");
    assert!(matches!(error, LoadError::HashMismatch { .. }), "{error}");
    assert!(error.to_string().contains("does not match its manifest"), "{error}");
    bytes[middle] ^= 0xff;
    fs::write(&artifact, &bytes).unwrap();

    // The same in the runtime's compiled code.
    let original = fs::read(&code).unwrap();
    let mut flipped = original.clone();
    flipped[original.len() / 2] ^= 0xff;
    fs::write(&code, &flipped).unwrap();
    fresh_store();
    let error = runner().load(&manifest_path).err().expect("tampered code");
    assert!(matches!(&error, LoadError::HashMismatch { path, .. } if *path == code), "{error}");
    fs::write(&code, &original).unwrap();

    // Loaded once, the runner runs its own copy: what happens to the project's file later
    // (a task with a grant on it, say) never reaches the engine.
    fresh_store();
    assert!(runner().load(&manifest_path).is_ok(), "the restored copy loads");
    let kept = store.path().join("compiled").join(&built.output.manifest.artifact.file);
    assert!(fs::metadata(&kept).unwrap().permissions().readonly(), "the runner's copy is read-only");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(fs::metadata(store.path().join("compiled")).unwrap().permissions().mode() & 0o777, 0o700);
    let kept_bytes = fs::read(&kept).unwrap();
    bytes[middle] ^= 0xff;
    fs::write(&artifact, &bytes).unwrap();
    let outcome = {
        let engine = runner();
        let loaded = engine.load(&manifest_path).expect("the runner's copy is used");
        tests::block_on(async {
            engine.prepare(&loaded, tests::quiet_run("add", vec![json!(2), json!(3)])).unwrap().run().await
        })
    };
    assert_eq!(outcome.result, json!(5), "{:?}", outcome.error);
    assert_eq!(fs::read(&kept).unwrap(), kept_bytes, "the runner's copy is unchanged");
    bytes[middle] ^= 0xff;
    fs::write(&artifact, &bytes).unwrap();

    let refuse = |text: String| {
        fs::write(&manifest_path, text).unwrap();
        runner().load(&manifest_path).err().expect("tampered manifest").to_string()
    };
    let other_hash = "0".repeat(64);
    let message = refuse(manifest_text.replace(&built.output.manifest.artifact.sha256, &other_hash));
    assert!(message.contains("cannot read artifact") || message.contains("does not match"), "{message}");
    let version = format!("schema_version = {}", manifest_schema::SCHEMA_VERSION);
    let message = refuse(manifest_text.replace(&version, &format!("{version}\nunsigned = true")));
    assert!(message.contains("unknown field `unsigned`"), "{message}");
    let fingerprint = &built.output.manifest.engine.fingerprint;
    let message = refuse(manifest_text.replace(fingerprint.as_str(), &"1".repeat(64)));
    assert!(message.contains("another engine configuration"), "{message}");
    let message = refuse(manifest_text.replace("wasmtime_version = \"48.0.8\"", "wasmtime_version = \"47.0.0\""));
    assert!(message.contains("built for wasmtime 47.0.0"), "{message}");
}
