//! The CPython runtime, exercised through the real toolchain: a snapshot of real
//! Python, precompiled, run by wasmtime.

use python_runtime::ErrorKind;
use serde_json::{Value, json};
use tests::{line_of, shared};

const PROBE: &str = "valid/runtime_probe.py";
const MULTI: &str = "valid/multi_task.py";

#[test]
fn print_reaches_the_host() {
    let outcome = shared(MULTI).run("shout", vec![json!("hey")]);
    assert_eq!(outcome.result, json!("HEY"));
    assert_eq!(outcome.output.stdout.text, "shouting hey\n");
}

#[test]
fn the_listed_stdlib_modules_import_and_work() {
    let outcome = shared(PROBE).run("stdlib", vec![]);
    assert!(outcome.success, "{:?}", outcome.error);
    assert_eq!(
        outcome.result,
        json!({
            "json": {"a": [1, 2]},
            "re": ["1", "22", "333"],
            "math": 4,
            "datetime": "2024-02-01",
            "collections": [["a", 5], ["b", 2]],
            "itertools": [1, 3, 6],
            "functools": 24,
            "dataclasses": {"x": 1, "y": 2},
            "typing": {"a": 1, "b": 2},
            "decimal": "3.30",
            "fractions": "1/2",
            "statistics": 2,
            "random": true,
            "hashlib": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
            "base64": "Y2Fwc3VsZQ==",
            "uuid": "12345678123456781234567812345678",
            "textwrap": ["a b", "c d"],
            "string": "abcde",
        })
    );
}

#[test]
fn an_exception_reports_type_message_and_the_users_file_and_line() {
    let outcome = shared(MULTI).run("fail", vec![json!("no luck")]);
    let error = outcome.error.expect("the task raises");
    assert_eq!(error.kind, ErrorKind::Exception);
    assert_eq!(error.exc_type, "ValueError");
    assert_eq!(error.message, "no luck");
    let line = line_of(MULTI, "raise ValueError(message)");
    assert!(error.traceback.contains(&format!("File \"multi_task.py\", line {line}, in fail")), "{}", error.traceback);
    assert!(error.traceback.contains("raise ValueError(message)"), "the source line is shown: {}", error.traceback);
}

#[test]
fn deep_recursion_is_a_recursion_error_not_a_crash() {
    for task in ["recurse_forever", "nested_json"] {
        let error = shared(PROBE).run(task, vec![]).error.expect("recursion fails");
        assert_eq!(
            (error.kind, error.exc_type.as_str()),
            (ErrorKind::Exception, "RecursionError"),
            "{task}: {error:?}"
        );
    }
}

#[test]
fn runs_of_one_snapshot_share_no_state_and_no_randomness() {
    let built = shared(PROBE);
    let first = built.run("state_and_entropy", vec![]).result;
    let second = built.run("state_and_entropy", vec![]).result;
    assert_eq!(first["runs"], json!(1), "module state starts from the snapshot");
    assert_eq!(second["runs"], json!(1), "module state starts from the snapshot");
    for key in ["random", "urandom", "uuid4"] {
        assert_ne!(first[key], second[key], "`{key}` repeated across runs");
        assert_ne!(first[key], Value::Null);
    }
}

#[test]
fn results_that_cannot_be_encoded_and_hard_exits_are_explained() {
    let cases = [
        ("nested_result", "RecursionError", "the result of task 'nested_result' is not JSON: maximum recursion depth"),
        (
            "surrogate_result",
            "UnicodeEncodeError",
            "the result of task 'surrogate_result' is not JSON: it contains the lone surrogate '\\ud800'",
        ),
        ("hard_exit", "SystemExit", "the task ended the interpreter with exit status 3 (`os._exit`)"),
    ];
    for (task, exc_type, message) in cases {
        let outcome = shared(PROBE).run(task, vec![]);
        let error = outcome.error.expect("the task fails");
        assert_eq!((error.kind, error.exc_type.as_str()), (ErrorKind::Exception, exc_type), "{task}: {error:?}");
        assert!(error.message.starts_with(message), "{task}: {}", error.message);
    }
    // The sandbox after a hard exit is not reused half-dead: the next run works.
    let outcome = shared(PROBE).run("hard_exit", vec![]);
    assert_eq!(outcome.output.stdout.text, "leaving\n");
    assert!(shared(PROBE).run("stdlib", vec![]).success);
}

#[test]
fn modules_first_imported_at_run_time_load_without_a_file_system() {
    let outcome = shared("valid/uses_helpers.py").run("main", vec![json!("quiet")]);
    assert_eq!(outcome.result, json!("QUIET!"), "{:?}", outcome.error);
}

#[test]
fn what_wasi_cannot_do_fails_inside_the_task_only() {
    let outcome = shared(PROBE).run("unavailable", vec![]);
    assert!(outcome.success, "{:?}", outcome.error);
    for (what, result) in outcome.result.as_object().expect("a dict") {
        assert_ne!(result, "worked", "`{what}` must be impossible in the sandbox");
    }
}

#[test]
fn vendored_pure_python_packages_import() {
    let outcome = shared("valid/uses_vendor.py").run("main", vec![]);
    assert_eq!(
        outcome.result,
        json!(["hello from vendor", "hello%20from%20vendor", "1.17.0", true]),
        "{:?}",
        outcome.error
    );
}

#[test]
fn syntax_that_discovery_accepts_runs_as_cpython_runs_it() {
    let outcome = shared("valid/modern_syntax.py").run("modern", vec![json!(["x", "y"])]);
    assert_eq!(outcome.result, json!("x-y:1"), "{:?}", outcome.error);
}

#[test]
fn sqlite_runs_on_an_in_memory_database() {
    let rows = json!([["tea", 3.5], ["bread", 2.25], ["jam", 4.0]]);
    let outcome = shared("valid/stdlib_modules.py").run("database", vec![rows]);
    assert_eq!(outcome.result, json!({"total": 9.75, "cheapest": "bread", "version": "3.46.1"}), "{:?}", outcome.error);
}

#[test]
fn compression_and_time_zones_work_from_the_standard_library() {
    let outcome = shared("valid/stdlib_modules.py").run("compress", vec![json!("a line that repeats. ".repeat(50))]);
    assert_eq!(
        outcome.result,
        json!({
            "gzip_round_trip": true,
            "smaller": true,
            "zip_round_trip": true,
            "bz2_round_trip": true,
            "xz_round_trip": true,
        }),
        "{:?}",
        outcome.error
    );
    let outcome = shared("valid/stdlib_modules.py").run("time_zones", vec![]);
    assert_eq!(
        outcome.result,
        json!({
            "paris": "2026-07-01T14:00:00+02:00",
            "tokyo": "2026-07-01T21:00:00+09:00",
            "zones": true,
            "get_data": "TZif",
            "platform": ["wasi", "wasi-0.0.0-wasm32"],
        }),
        "{:?}",
        outcome.error
    );
}

#[test]
fn a_runs_new_small_objects_share_a_few_neighbouring_pages() {
    let built = shared(PROBE);
    let outcome = built.run("small_objects", vec![]);
    assert!(outcome.success, "{:?}", outcome.error);
    assert!(outcome.result["pymalloc_blocks"].as_u64().unwrap() > 0, "the small-object allocator is on");
    let addresses: Vec<u64> =
        outcome.result["addresses"].as_array().unwrap().iter().map(|a| a.as_u64().unwrap()).collect();
    let (lowest, highest) = (addresses.iter().min().unwrap(), addresses.iter().max().unwrap());
    // One fresh pool per size class, all in one 256 KiB arena: scattered pools spread
    // objects like these over megabytes of heap.
    assert!(highest - lowest < 256 << 10, "{} objects spread over {} KiB", addresses.len(), (highest - lowest) >> 10);
    let again = built.run("small_objects", vec![]).result;
    assert_eq!(again["addresses"], outcome.result["addresses"], "every run starts from the same layout");
}
