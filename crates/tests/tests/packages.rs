//! Real packages from PyPI, declared in `capsule.toml` or `requirements.txt`, installed by
//! the build (pip, for CPython 3.13), locked in the manifest and used in tasks.

use capsule_build::{BuildOptions, build};
use manifest_schema::Explain;
use serde_json::json;
use tests::server::start_server;
use tests::{block_on, engine, shared};

const PACKAGES: &str = "packages/tasks.py";

#[test]
fn declared_packages_are_installed_locked_and_used() {
    let built = shared(PACKAGES);
    let locked: Vec<String> =
        built.output.manifest.dependencies.iter().map(|p| format!("{}=={}", p.name, p.version)).collect();
    for pinned in ["PyYAML==6.0.2", "requests==2.32.4", "networkx==3.5", "Jinja2==3.1.6"] {
        assert!(locked.iter().any(|l| l == pinned), "{pinned} not in the lock {locked:?}");
    }
    // Dependencies of dependencies are locked too.
    assert!(locked.iter().any(|l| l.starts_with("MarkupSafe==")), "{locked:?}");
    let note = built.output.notes.join("\n");
    assert!(note.contains("yaml/_yaml.cpython-313-x86_64-linux-gnu.so"), "{note}");
    assert!(note.contains("markupsafe/_speedups"), "{note}");

    let outcome = built.run("text", vec![]);
    assert_eq!(
        outcome.result,
        json!({
            "table": "| name   |   count |\n|--------|---------|\n| a      |       1 |\n| b      |       2 |",
            "template": "Hello ADA!",
            "escaped": "&lt;b&gt;",
            "yaml": {"k": [1, 2], "s": "text"},
            "heading": "Title",
            "chunks": [[0, 1], [2, 3], [4]],
        }),
        "{:?}",
        outcome.error
    );
    // The night clocks went forward in Paris.
    let outcome = built.run("dates", vec![]);
    assert_eq!(
        outcome.result,
        json!({"before": "2026-03-29T01:30:00+01:00", "after": "2026-03-29T04:30:00+02:00"}),
        "{:?}",
        outcome.error
    );
    let outcome = built.run("graphs", vec![]);
    assert_eq!(
        outcome.result,
        json!({"path": ["a", "b", "c", "e"], "degrees": {"a": 2, "b": 2, "c": 3, "d": 2, "e": 1}, "cycle": ["a", "b", "c", "d"]}),
        "{:?}",
        outcome.error
    );
}

#[test]
fn requests_goes_through_the_host_under_allowed_hosts() {
    let base = start_server();
    let outcome = shared(PACKAGES).run("fetch", vec![json!(base)]);
    assert_eq!(
        outcome.result,
        json!({
            "get": [200, {"hello": "world"}, "application/json", "OK"],
            "post": {"method": "POST", "body": "{\"n\": 1}", "authorized": true},
            "missing": [404, false, "missing", 404],
            "refused": "refused",
        }),
        "{:?}",
        outcome.error
    );
}

#[test]
fn a_package_that_needs_its_compiled_code_fails_the_build_naming_it() {
    let out = tempfile::tempdir().unwrap();
    let options = BuildOptions {
        entry: fixtures::path("native_package/main.py"),
        out_dir: Some(out.path().to_path_buf()),
        runtime: python_runtime::runtime_path(),
        force: true,
    };
    let error = block_on(build(engine(), &options)).expect_err("orjson cannot run in the sandbox");
    let text = manifest_schema::problem::render(&error.problems());
    assert!(text.contains("No module named 'orjson.orjson'"), "{text}");
    assert!(
        text.contains("`orjson` needs its compiled module `orjson/orjson.cpython-313-x86_64-linux-gnu.so`"),
        "{text}"
    );
}
