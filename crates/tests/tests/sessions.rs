//! The built-in interpreter image and sessions: notebook semantics, state from call to call,
//! what a failed call leaves, save and restore, fork.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use capsule_exec::{CallLimits, Cancel, Loaded, NoEvents, RunSettings, Session};
use manifest_schema::{ByteSize, FileGrant, FileMode, TaskOptions};
use python_runtime::ErrorKind;
use serde_json::{Value, json};
use tests::{block_on, engine};

fn image() -> Arc<Loaded> {
    static IMAGE: OnceLock<Arc<Loaded>> = OnceLock::new();
    IMAGE
        .get_or_init(|| {
            let options = capsule_build::interpreter_options(python_runtime::runtime_path()).expect("a cache folder");
            let output = block_on(capsule_build::build(engine(), &options)).expect("the image builds");
            engine().load(&output.manifest_path).expect("the image loads")
        })
        .clone()
}

/// One runtime for a whole test: a session's sandbox belongs to the runtime it was made on
/// (its output streams are driven by tasks there).
fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap())
}

fn session(ram: &str) -> Session {
    let options = TaskOptions { ram: ByteSize::parse(ram).unwrap(), max_retries: 0, ..TaskOptions::default() };
    let settings = RunSettings { options: Some(options), ..RunSettings::default() };
    runtime().block_on(engine().open_session(&image(), None, settings, Arc::new(NoEvents), None)).expect("a session")
}

fn call(session: &mut Session, code: &str, limits: CallLimits) -> capsule_exec::Outcome {
    runtime().block_on(session.call(vec![json!(code)], limits, &Cancel::default()))
}

fn run(session: &mut Session, code: &str) -> capsule_exec::Outcome {
    call(session, code, CallLimits::default())
}

fn value(session: &mut Session, code: &str) -> Value {
    let outcome = run(session, code);
    assert!(outcome.success, "{code}: {:?}", outcome.error);
    outcome.result
}

#[test]
fn a_cell_is_run_like_a_notebook_cell() {
    let mut s = session("256MiB");
    assert_eq!(value(&mut s, "x = 2\nx * 21"), json!(42));
    assert_eq!(value(&mut s, "x = 3"), Value::Null, "no final expression, no result");
    assert_eq!(value(&mut s, "{1, 2}"), json!("{1, 2}"), "not JSON: its repr");
    let printed = run(&mut s, "print('hello')\n'done'");
    assert_eq!((printed.result, printed.output.stdout.text.as_str()), (json!("done"), "hello\n"));

    let broken = run(&mut s, "y = 1\nz = = 2\n");
    let error = broken.error.unwrap();
    assert_eq!((error.kind, error.exc_type.as_str()), (ErrorKind::Exception, "SyntaxError"));
    assert!(
        error.traceback.contains("line 2") && error.traceback.contains("z = = 2") && error.traceback.contains('^'),
        "{}",
        error.traceback
    );
    let failed = run(&mut s, "def f():\n    return 1 / 0\nf()");
    let error = failed.error.unwrap();
    assert_eq!(error.exc_type, "ZeroDivisionError");
    assert!(
        error.traceback.contains("<cell")
            && error.traceback.contains("line 2, in f")
            && error.traceback.contains("return 1 / 0"),
        "{}",
        error.traceback
    );
    assert!(
        !error.traceback.contains("capsule_python.py") && !error.traceback.contains("capsule-sdk"),
        "{}",
        error.traceback
    );
}

#[test]
fn state_carries_over_and_survives_failed_calls() {
    let mut s = session("256MiB");
    value(&mut s, "import json, re, datetime\ndata = {'a': 1}\ncount = 0");
    assert_eq!(value(&mut s, "json.dumps(data)"), json!("{\"a\": 1}"));
    // An exception keeps what the cell did before raising.
    assert!(!run(&mut s, "count = 1\nraise ValueError('no')").success);
    assert_eq!(value(&mut s, "count"), json!(1));
    // A call stopped by its deadline or its fuel leaves the session as it was before it.
    let stopped = call(
        &mut s,
        "count = 99\nwhile True:\n    pass",
        CallLimits { timeout: Some(Duration::from_millis(300)), ..CallLimits::default() },
    );
    assert_eq!(stopped.error.unwrap().kind, ErrorKind::Timeout);
    assert_eq!(value(&mut s, "(count, data)"), json!([1, {"a": 1}]));
    let spent = call(
        &mut s,
        "count = 98\nwhile True:\n    pass",
        CallLimits { fuel: Some(10_000_000), ..CallLimits::default() },
    );
    assert_eq!(spent.error.unwrap().kind, ErrorKind::Fuel);
    assert_eq!(value(&mut s, "count"), json!(1));
}

#[test]
fn a_session_keeps_to_its_memory_limit() {
    let mut s = session("64MiB");
    value(&mut s, "kept = 'still here'");
    let hog = run(&mut s, "blocks = []\nwhile True:\n    blocks.append(bytearray(1 << 20))");
    assert_eq!(hog.error.unwrap().kind, ErrorKind::Memory);
    assert_eq!(value(&mut s, "kept"), json!("still here"));
}

#[test]
fn saved_sessions_restore_elsewhere_and_forks_are_independent() {
    let mut s = session("256MiB");
    value(&mut s, "import json, re, datetime\nbig = 'x' * (10 * 1024 * 1024)\nanswer = 42");
    let state = runtime().block_on(s.save()).unwrap();
    let bytes = state.to_bytes();
    assert!(state.stored_bytes() < 16 << 20, "only what differs from the image: {}", state.stored_bytes());

    // A new engine, as another process would have.
    let other = capsule_exec::Engine::new().unwrap();
    let image_path = capsule_build::interpreter_options(python_runtime::runtime_path())
        .unwrap()
        .out_dir
        .unwrap()
        .join("manifest.toml");
    let loaded = other.load(&image_path).unwrap();
    let restored_state = other.session_state(&loaded, &bytes).unwrap();
    let options = TaskOptions { ram: ByteSize::parse("256MiB").unwrap(), max_retries: 0, ..TaskOptions::default() };
    let settings = RunSettings { options: Some(options), ..RunSettings::default() };
    let mut restored = runtime()
        .block_on(other.open_session(&loaded, None, settings, Arc::new(NoEvents), Some(restored_state)))
        .unwrap();
    assert_eq!(value(&mut restored, "(answer, len(big), json.dumps([1]))"), json!([42, 10485760, "[1]"]));

    let mut damaged = bytes.clone();
    let middle = damaged.len() / 2;
    damaged[middle] ^= 1;
    assert!(other.session_state(&loaded, &damaged).unwrap_err().to_string().contains("damaged"));
    let error = other.session_state(&loaded, b"not a session").unwrap_err().to_string();
    assert!(error.contains("damaged: it is not a Capsule session"), "{error}");

    let mut fork = runtime().block_on(s.fork()).unwrap();
    value(&mut fork, "answer = 7");
    assert_eq!(value(&mut s, "answer"), json!(42));
    assert_eq!(value(&mut fork, "answer"), json!(7));
}

#[test]
fn a_sessions_calls_share_one_file_quota() {
    let project = tempfile::tempdir().unwrap();
    std::fs::create_dir(project.path().join("out")).unwrap();
    let options = TaskOptions {
        max_written: ByteSize::parse("1MB").unwrap(),
        allowed_files: vec![FileGrant { path: "out".into(), mode: FileMode::ReadWrite }],
        max_retries: 0,
        ..TaskOptions::default()
    };
    let settings = RunSettings {
        options: Some(options),
        project_root: Some(project.path().to_path_buf()),
        ..RunSettings::default()
    };
    let mut s = runtime()
        .block_on(engine().open_session(&image(), None, settings, Arc::new(NoEvents), None))
        .expect("a session");
    let write = "import os\nname = f\"out/part-{len(os.listdir('out'))}.bin\"\nopen(name, 'wb').write(b'x' * 600_000)";
    assert_eq!(value(&mut s, write), json!(600_000));
    let second = run(&mut s, write);
    let error = second.error.expect("the second call goes past the session's quota");
    assert!(
        error.message.contains("the task reached its `max_written` quota") && error.message.contains("1000000 allowed"),
        "{}",
        error.message
    );
}
