//! What a client may ask of the daemon, checked like a manifest before anything runs: paths
//! absolute and resolved (symbolic links, `..`) before they are compared, and options that
//! replace a task's validated and never wider than the manifest's where they reach the
//! daemon's own environment or files: `env_passthrough`, `secrets`, `allowed_files`. The
//! built-in interpreter image is the exception for grants only: each of its calls brings the
//! folders it may use, inside the caller's project.

use std::path::{Path, PathBuf};

use capsule_exec::Trust;
use capsule_exec::trust::PublicKey;
use manifest_schema::{Category, FileMode, Task, TaskOptions};

use crate::api::{ApiError, SubmitRun};

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::new(Category::Usage, message)
}

/// `path`, which must be absolute, resolved; `exists` says whether it must exist (else what
/// does not exist yet, below its nearest existing folder, is kept as written, without `..`).
pub fn resolved(what: &str, path: &Path, exists: bool) -> Result<PathBuf, ApiError> {
    if !path.is_absolute() {
        return Err(ApiError::hinted(
            Category::Usage,
            format!("`{what}` must be an absolute path, not `{}`", path.display()),
            "the daemon does not share your current folder",
        ));
    }
    let missing = |e: std::io::Error| bad(format!("`{what}` `{}`: {e}", path.display()));
    if exists {
        return path.canonicalize().map_err(missing);
    }
    let mut existing = path;
    let mut rest = Vec::new();
    loop {
        if let Ok(real) = existing.canonicalize() {
            return Ok(rest.iter().rev().fold(real, |path, name| path.join(name)));
        }
        match (existing.file_name(), existing.parent()) {
            (Some(name), Some(parent)) => {
                rest.push(name.to_os_string());
                existing = parent;
            }
            _ => return Err(bad(format!("`{what}` `{}` names no file", path.display()))),
        }
    }
}

/// Resolves the request's paths in place and checks that `files_root` is inside the project.
pub fn resolve_paths(request: &mut SubmitRun) -> Result<(), ApiError> {
    // A manifest that is not there is the engine's to report (`load`), as for any runner.
    request.manifest = match resolved("manifest", &request.manifest, true) {
        Ok(manifest) => manifest,
        Err(_) if request.manifest.is_absolute() => request.manifest.clone(),
        Err(error) => return Err(error),
    };
    if let Some(project) = &request.project {
        request.project = Some(resolved("project", project, true)?);
    }
    if let Some(journal) = &request.journal {
        request.journal = Some(resolved("journal", journal, false)?);
    }
    if let Some(entry) = &request.entry {
        resolved("entry", entry, false)?;
    }
    if let Some(root) = &request.files_root {
        let root = resolved("files_root", root, true)?;
        let project = match &request.project {
            Some(project) => project.clone(),
            None => request.manifest.parent().unwrap_or(Path::new("/")).to_path_buf(),
        };
        if !root.starts_with(&project) {
            return Err(ApiError::hinted(
                Category::Usage,
                format!("`files_root` `{}` is outside the project `{}`", root.display(), project.display()),
                "granted folders must be inside the caller's project",
            ));
        }
        request.files_root = Some(root);
    }
    Ok(())
}

/// Refuses a journal inside one of `places` (the daemon's own records).
pub fn check_journal(journal: &Path, places: &[PathBuf]) -> Result<(), ApiError> {
    match places.iter().find(|place| place.canonicalize().is_ok_and(|place| journal.starts_with(place))) {
        Some(place) => Err(bad(format!(
            "the journal `{}` is inside `{}`, where the daemon keeps its own records",
            journal.display(),
            place.display()
        ))),
        None => Ok(()),
    }
}

/// The keys of a request's `trust` (the text of `.pub` files), if it names any.
pub fn trust(keys: &[String]) -> Result<Option<Trust>, ApiError> {
    let keys = keys
        .iter()
        .map(|text| PublicKey::parse(text).map_err(|why| bad(format!("`trust`: {why}"))))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((!keys.is_empty()).then(|| Trust::new(keys)))
}

/// Checks `requested`, which is to replace `task`'s options: valid, and never passing through
/// more of the daemon's environment, secrets or folders than the manifest does (folders are
/// the call's own when `call_grants`: the interpreter image's).
pub fn check_options(task: &Task, requested: &TaskOptions, call_grants: bool) -> Result<(), ApiError> {
    requested.validate().map_err(|(field, problem)| ApiError::of(&problem.context(format!("`options.{field}`"))))?;
    let declared = &task.options;
    let widened = |field: &str, what: String| {
        ApiError::hinted(
            Category::Usage,
            format!("`options.{field}` asks for {what}, which task `{}` does not have in its manifest", task.name),
            "a client may narrow a task's options, never widen them: declare it in `@task(...)` and rebuild",
        )
    };
    if let Some(name) = requested.env_passthrough.iter().find(|n| !declared.env_passthrough.contains(n)) {
        return Err(widened("env_passthrough", format!("the variable `{name}`")));
    }
    if let Some((name, _)) =
        requested.secrets.iter().find(|(name, secret)| declared.secrets.get(*name) != Some(*secret))
    {
        return Err(widened("secrets", format!("the secret `{name}` (or other hosts or headers for it)")));
    }
    if !call_grants {
        let covered = |path: &str, mode: FileMode| {
            declared.allowed_files.iter().any(|grant| {
                let inside = path == grant.path || path.starts_with(&format!("{}/", grant.path));
                inside && (mode == FileMode::ReadOnly || grant.mode == FileMode::ReadWrite)
            })
        };
        if let Some(grant) = requested.allowed_files.iter().find(|g| !covered(&g.path, g.mode)) {
            let mode = if grant.mode == FileMode::ReadWrite { "read-write" } else { "read-only" };
            return Err(widened("allowed_files", format!("`{}` {mode}", grant.path)));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use manifest_schema::FileGrant;

    fn task(options: TaskOptions) -> Task {
        Task { name: "main".into(), function: "main.main".into(), options, signature: None }
    }

    #[test]
    fn options_may_narrow_a_task_never_widen_it() {
        let data = |mode| FileGrant { path: "data".into(), mode };
        let declared = TaskOptions {
            env_passthrough: vec!["HOME".into()],
            allowed_files: vec![data(FileMode::ReadOnly)],
            ..TaskOptions::default()
        };
        let task = task(declared.clone());
        assert!(check_options(&task, &declared, false).is_ok());
        assert!(check_options(&task, &TaskOptions::default(), false).is_ok(), "fewer is fine");
        let more_env = TaskOptions { env_passthrough: vec!["AWS_SECRET_ACCESS_KEY".into()], ..declared.clone() };
        let error = check_options(&task, &more_env, false).unwrap_err();
        assert!(error.message.contains("`AWS_SECRET_ACCESS_KEY`"), "{}", error.message);
        let writable = TaskOptions { allowed_files: vec![data(FileMode::ReadWrite)], ..declared.clone() };
        assert!(check_options(&task, &writable, false).is_err());
        let elsewhere = TaskOptions {
            allowed_files: vec![FileGrant { path: "datasets".into(), mode: FileMode::ReadOnly }],
            ..declared.clone()
        };
        assert!(check_options(&task, &elsewhere, false).is_err(), "`datasets` is not inside `data`");
        assert!(check_options(&task, &elsewhere, true).is_ok(), "the interpreter image takes its calls' grants");
        let inside = TaskOptions {
            allowed_files: vec![FileGrant { path: "data/2024".into(), mode: FileMode::ReadOnly }],
            ..declared.clone()
        };
        assert!(check_options(&task, &inside, false).is_ok());
        let mut secret = declared.clone();
        secret.secrets.insert(
            "TOKEN".into(),
            manifest_schema::Secret {
                header: "Authorization".into(),
                format: "Bearer {value}".into(),
                hosts: manifest_schema::HostPolicy::parse(&["evil.example".into()]).unwrap(),
            },
        );
        assert!(check_options(&task, &secret, true).is_err(), "no secret for any image");
    }

    /// Fuzz target: whatever a client sends, a request the checks let through never names a
    /// folder outside its project, nor options wider than the task's; never a panic.
    #[test]
    fn fuzzed_run_requests_never_get_past_the_checks_wider_than_the_task() {
        let dir = tempfile::tempdir().unwrap();
        let project = dir.path().canonicalize().unwrap().join("project");
        std::fs::create_dir_all(project.join("data/in")).unwrap();
        std::fs::create_dir_all(dir.path().join("outside")).unwrap();
        std::fs::write(project.join("manifest.toml"), "").unwrap();
        let declared = TaskOptions {
            env_passthrough: vec!["LANG".into()],
            allowed_files: vec![FileGrant { path: "data".into(), mode: FileMode::ReadOnly }],
            ..TaskOptions::default()
        };
        let task = task(declared.clone());
        let seed = serde_json::to_string(&SubmitRun {
            manifest: project.join("manifest.toml"),
            project: Some(project.clone()),
            files_root: Some(project.join("data")),
            journal: Some(project.join("journal.db")),
            options: Some(declared.clone()),
            trust: vec!["capsule-public-key ed25519 AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA= x".into()],
            ..SubmitRun::default()
        })
        .unwrap();
        bolero::check!().with_iterations(fixtures::fuzz_iterations()).for_each(|noise: &[u8]| {
            let Ok(mut request) = serde_json::from_str::<SubmitRun>(&fixtures::mutate(&seed, noise)) else { return };
            let _ = trust(&request.trust);
            if resolve_paths(&mut request).is_ok()
                && let Some(root) = &request.files_root
            {
                let project =
                    request.project.clone().unwrap_or_else(|| request.manifest.parent().unwrap().to_path_buf());
                assert!(root.starts_with(&project), "{} got past, outside {}", root.display(), project.display());
                assert!(root.canonicalize().is_ok_and(|real| real == *root), "{} is not resolved", root.display());
            }
            if let Some(options) = &request.options
                && check_options(&task, options, false).is_ok()
            {
                assert!(options.env_passthrough.iter().all(|name| declared.env_passthrough.contains(name)));
                assert!(options.secrets.is_empty());
                assert!(
                    options
                        .allowed_files
                        .iter()
                        .all(|g| { g.mode == FileMode::ReadOnly && (g.path == "data" || g.path.starts_with("data/")) })
                );
            }
        });
    }

    #[test]
    fn paths_are_resolved_before_they_are_compared() {
        let dir = tempfile::tempdir().unwrap();
        let project = dir.path().join("project");
        std::fs::create_dir_all(project.join("data")).unwrap();
        std::fs::write(project.join("manifest.toml"), "").unwrap();
        let request = |files_root: PathBuf| SubmitRun {
            manifest: project.join("manifest.toml"),
            project: Some(project.clone()),
            files_root: Some(files_root),
            ..SubmitRun::default()
        };
        let mut inside = request(project.join("data/../data"));
        resolve_paths(&mut inside).unwrap();
        assert_eq!(inside.files_root.unwrap(), project.canonicalize().unwrap().join("data"));
        let error = resolve_paths(&mut request(project.join("data/../.."))).unwrap_err();
        assert!(error.message.contains("is outside the project"), "{}", error.message);
        let mut journal = request(project.join("data"));
        journal.journal = Some(project.join("data/../new/folder/journal.db"));
        resolve_paths(&mut journal).unwrap();
        assert_eq!(journal.journal.unwrap(), project.canonicalize().unwrap().join("new/folder/journal.db"));
        let own = [dir.path().join("state")];
        std::fs::create_dir(&own[0]).unwrap();
        let records = own[0].canonicalize().unwrap().join("daemon.db");
        assert!(check_journal(&records, &own).unwrap_err().message.contains("where the daemon keeps its own records"));
        assert!(check_journal(&project.join("journal.db"), &own).is_ok());
        let relative = resolve_paths(&mut request(PathBuf::from("data"))).unwrap_err();
        assert!(relative.message.contains("must be an absolute path"), "{}", relative.message);
    }
}
