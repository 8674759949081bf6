//! Every fixture through `capsule build`: valid ones give the recorded tasks, invalid ones
//! the recorded error (file:line:column and hint). Snapshots live in `tests/snapshots/`.

use std::path::Path;

use capsule_build::{BuildOptions, Project, build};
use manifest_schema::Explain;

fn stem(path: &Path) -> String {
    path.file_stem().unwrap().to_string_lossy().into_owned()
}

#[test]
fn valid_fixtures_discover_their_tasks() {
    for file in fixtures::python_files("valid") {
        let project = Project::load(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let modules: Vec<&str> = project.modules.iter().map(|m| m.path.as_str()).collect();
        let mut text = format!("modules: {modules:?}\n");
        for task in &project.tasks {
            let options = toml::to_string(&task.options).unwrap();
            text.push_str(&format!("\n[task `{}`: def {} at line {}]\n{options}", task.name, task.function, task.line));
        }
        insta::assert_snapshot!(format!("valid_{}", stem(&file)), text);
    }
}

#[test]
fn invalid_fixtures_are_refused_with_located_errors() {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let engine = capsule_build::build_engine().unwrap();
    for file in fixtures::python_files("invalid") {
        let out = tempfile::tempdir().unwrap();
        let options = BuildOptions {
            entry: file.clone(),
            out_dir: Some(out.path().to_path_buf()),
            runtime: python_runtime::runtime_path(),
            force: false,
        };
        let error = match runtime.block_on(build(&engine, &options)) {
            Ok(_) => panic!("{} built, but must be refused", file.display()),
            Err(error) => error,
        };
        let text = manifest_schema::problem::render(&error.problems());
        // The snapshot's size moves with the runtime; the message's shape is what is tested.
        let mut settings = insta::Settings::clone_current();
        settings.add_filter(r"needs \d+ bytes \([\d.]+ MiB\)", "needs [N] bytes ([N] MiB)");
        settings.add_filter(r#"ram="\d+MiB""#, r#"ram="[N]MiB""#);
        settings.bind(|| insta::assert_snapshot!(format!("invalid_{}", stem(&file)), text.trim_end()));
        assert!(!out.path().join(capsule_build::MANIFEST_FILE).exists(), "a failed build wrote a manifest");
    }
}
