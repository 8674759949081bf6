//! The `data` runtime: real numpy and pandas in real Wasm, built from `crates/fixtures/data`
//! (whose capsule.toml asks for the flavour), checked for correct results and every limit.

use std::fs;
use std::sync::OnceLock;

use python_runtime::ErrorKind;
use serde_json::{Value, json};
use tests::{Built, build_into, load};

/// The fixture project, copied beside a granted `data/` folder and built once.
fn project() -> &'static (tempfile::TempDir, Built) {
    static PROJECT: OnceLock<(tempfile::TempDir, Built)> = OnceLock::new();
    PROJECT.get_or_init(|| {
        let project = tempfile::tempdir().unwrap();
        let root = project.path();
        for file in ["capsule.toml", "data_tasks.py"] {
            fs::copy(fixtures::path(&format!("data/{file}")), root.join(file)).unwrap();
        }
        fs::create_dir(root.join("data")).unwrap();
        fs::write(root.join("data/table.csv"), "a,b\n1,2.5\n3,4.5\n5,-1\n").unwrap();
        let built = load(build_into(&root.join("data_tasks.py"), &root.join(".capsule/build"), true));
        (project, built)
    })
}

fn run_ok(task: &str, args: Vec<Value>) -> Value {
    let outcome = project().1.run(task, args);
    assert!(outcome.success, "{task}: {:?}\n{}", outcome.error, outcome.output.stderr.text);
    outcome.result
}

fn failure(task: &str, args: Vec<Value>) -> python_runtime::GuestError {
    let outcome = project().1.run(task, args);
    assert!(!outcome.success, "{task} succeeded: {:?}", outcome.result);
    outcome.error.expect("a failed run has an error")
}

#[test]
fn dtypes_behave_as_in_native_numpy() {
    assert_eq!(
        run_ok("dtypes", vec![]),
        json!({
            "int8": [100, -56, 44],
            "int8_dtype": "int8",
            "float16": [1.5, 2.5],
            // IEEE binary128 in software, as wasm32 defines `long double`.
            "longdouble_bits": 128,
            "longdouble_third": "0.333333",
            "strings": ["a!", "bc!"],
            "scalar_copy": 2.25,
            "complex": "2j",
        })
    );
}

#[test]
fn broadcasting_and_reductions() {
    assert_eq!(
        run_ok("broadcasting", vec![]),
        json!({
            "grid": [[0, 1, 2, 3], [10, 11, 12, 13], [20, 21, 22, 23]],
            "shape": [3, 4],
            "means": [10.0, 11.0, 12.0, 13.0],
            "masked": [0, 2, 10, 12, 20, 22],
            "einsum": 2402,
        })
    );
}

#[test]
fn linear_algebra_and_fft() {
    let result = run_ok("linalg", vec![]);
    assert!(result["residual"].as_f64().unwrap() < 1e-9, "{result}");
    assert_eq!(result["det_sign"], json!(1.0));
    assert_eq!(result["inverse_ok"], json!(true));
    assert_eq!(result["eigenvalues"], json!([2.0, 3.0]));
    // trace(M Mᵀ) = Σ m² for m = k/1e6, k < 1e6: (n-1)n(2n-1)/6 / 1e12.
    let expected = 999_999.0 * 1_000_000.0 * 1_999_999.0 / 6.0 / 1e12;
    assert!((result["trace"].as_f64().unwrap() - expected).abs() < 1e-6 * expected, "{result}");
    assert_eq!(result["fft"], json!([0.0, 2.0, 0.0, 2.0]));
}

#[test]
fn every_precision_runs_on_openblas() {
    let result = run_ok("blas", vec![]);
    assert_eq!(result["blas"], json!("openblas"), "{result}");
    // No LAPACK library: numpy's own lapack_lite, calling OpenBLAS.
    assert_eq!(result["lapack"], json!("none"), "{result}");
    for (dtype, tolerance) in [("float32", 1e-4), ("float64", 1e-12), ("complex64", 1e-4), ("complex128", 1e-12)] {
        let error = result["errors"][dtype].as_f64().unwrap();
        assert!(error < tolerance, "{dtype}: {error} ({result})");
    }
    assert_eq!(result["polyfit"], json!([2.0, 0.0, 1.0]));
    assert_eq!(result["singular"], json!("Singular matrix"), "OpenBLAS's LU reports a zero pivot");
}

#[test]
fn real_products_run_in_the_host_kernel_with_the_same_bits_everywhere() {
    let result = run_ok("host_kernel_products", vec![]);
    assert_eq!(result, json!({"differing": {"float64": 0, "float32": 0}, "integers": true, "transposed": true}));
}

#[test]
fn the_host_kernel_charges_a_fuel_unit_per_multiply_add() {
    // 400**3 = 64 M multiply-adds fit the task's 200 M fuel; 700**3 = 343 M do not.
    assert_eq!(run_ok("budgeted_product", vec![json!(400)]), json!(400.0));
    let error = failure("budgeted_product", vec![json!(700)]);
    assert_eq!(error.kind, ErrorKind::Fuel, "{error:?}");
}

#[test]
fn floating_point_flags_numpy_raises_itself_warn_and_raise() {
    assert_eq!(
        run_ok("floating_point_flags", vec![]),
        json!({
            "warnings": ["divide by zero encountered in floor_divide"],
            "raised": "divide by zero encountered in floor_divide",
        })
    );
}

#[test]
fn datetimes() {
    assert_eq!(
        run_ok("dates", vec![]),
        json!({
            "days": ["2026-02-26", "2026-02-27", "2026-02-28", "2026-03-01", "2026-03-02"],
            "span": "4 days",
            "weekdays": 3,
        })
    );
}

#[test]
fn csv_from_a_granted_folder_and_npy_files_written_back() {
    assert_eq!(run_ok("table", vec![json!("table.csv")]), json!({"rows": 3, "sums": [9.0, 6.0]}));
    let written = fs::read(project().0.path().join("data/sums.npy")).unwrap();
    assert!(written.starts_with(b"\x93NUMPY"), "an .npy file reached the host");
}

#[test]
fn pandas_groupby() {
    assert_eq!(
        run_ok("groupby", vec![]),
        json!([
            {"team": "a", "points": 16, "games": 6, "best": 9, "per_game": 16.0 / 6.0},
            {"team": "b", "points": 6, "games": 3, "best": 5, "per_game": 2.0},
            {"team": "c", "points": 1, "games": 1, "best": 1, "per_game": 1.0},
        ])
    );
}

#[test]
fn pandas_datetime_index_with_a_time_zone() {
    assert_eq!(
        run_ok("time_series", vec![]),
        json!({
            "monthly": {"2026-01-01": 1, "2026-02-01": 14},
            "utc_offset": "1:00:00",
            "weekday": "Sunday",
            "shifted": "2026-01-31 12:00:00+01:00",
        })
    );
}

#[test]
fn pandas_reads_a_csv_from_a_granted_folder() {
    assert_eq!(
        run_ok("read_csv", vec![json!("table.csv")]),
        json!({"columns": ["a", "b"], "sums": {"a": 9.0, "b": 6.0}, "dtypes": {"a": "int64", "b": "float64"}})
    );
}

#[test]
fn each_run_draws_fresh_random_numbers() {
    let first = run_ok("random_draws", vec![]);
    let second = run_ok("random_draws", vec![]);
    for i in 0..2 {
        assert_ne!(first[i], second[i], "generator {i} repeated the snapshot's state: {first} {second}");
    }
}

#[test]
fn a_huge_array_hits_the_memory_limit() {
    let error = failure("huge_array", vec![]);
    assert_eq!(error.kind, ErrorKind::Memory, "{error:?}");
    assert!(error.message.starts_with("Unable to allocate 512. MiB"), "{error:?}");
}

#[test]
fn a_long_numpy_loop_meets_its_deadline() {
    let error = failure("long_loop", vec![]);
    assert_eq!(error.kind, ErrorKind::Timeout, "{error:?}");
}

#[test]
fn fuel_counts_numpy_native_code() {
    let error = failure("busy_sorting", vec![]);
    assert_eq!(error.kind, ErrorKind::Fuel, "{error:?}");
}

#[test]
fn numpy_is_imported_into_the_snapshot_when_only_a_function_imports_it() {
    let (project, _) = project();
    fs::copy(fixtures::path("data/lazy_numpy.py"), project.path().join("lazy_numpy.py")).unwrap();
    let built = load(build_into(&project.path().join("lazy_numpy.py"), &project.path().join(".capsule/lazy"), true));
    let outcome = built.run("numpy_was_loaded", vec![]);
    assert_eq!(outcome.result, json!(true), "{:?}", outcome.error);
}

#[test]
fn a_data_project_without_the_data_runtime_says_how_to_get_it() {
    let runtimes = tempfile::tempdir().unwrap();
    let base = runtimes.path().join(python_runtime::Flavour::Base.file_name());
    std::os::unix::fs::symlink(python_runtime::runtime_path(), &base).unwrap();
    let project = tempfile::tempdir().unwrap();
    for file in ["capsule.toml", "lazy_numpy.py"] {
        fs::copy(fixtures::path(&format!("data/{file}")), project.path().join(file)).unwrap();
    }
    let options = capsule_build::BuildOptions {
        entry: project.path().join("lazy_numpy.py"),
        out_dir: Some(project.path().join("out")),
        runtime: base,
        force: true,
    };
    let Err(capsule_build::BuildError::Usage(problem)) =
        tests::block_on(capsule_build::build(tests::engine(), &options))
    else {
        panic!("the build must fail as a usage error with a problem and a hint");
    };
    assert!(problem.message.contains("capsule.toml asks for the `data` runtime"), "{problem:?}");
    assert!(problem.hint.unwrap_or_default().contains("cargo xtask build-runtime --flavour data"));
}
