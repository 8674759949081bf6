//! The book (`docs/`): mdBook, installed from crates.io at a pinned version (cargo checks the
//! crates' checksums) into the development cache, builds it into `target/book`; every
//! relative link of the book and of the repository's own Markdown is checked to lead to a file
//! and, with `#`, to a heading there.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Result, bail};

use crate::runtime::dev_cache_dir;
use crate::util::{cargo, run, workspace_root};

const MDBOOK_VERSION: &str = "0.4.52";

/// `cargo xtask docs`: the command-line reference written anew from the commands, then the
/// book built and its links checked.
pub fn docs() -> Result<()> {
    run(cargo()
        .args(["test", "-p", "capsule-cli", "--lib", "the_books_cli_reference_is_current"])
        .env("CAPSULE_UPDATE_DOCS", "1"))?;
    build_and_check()
}

/// Builds the book and checks every relative link (what CI runs).
pub fn build_and_check() -> Result<()> {
    check_links()?;
    run(Command::new(mdbook()?).arg("build").arg(workspace_root().join("docs")))?;
    eprintln!("xtask: the book is in target/book/index.html");
    Ok(())
}

/// The pinned mdBook, installed once into the development cache.
fn mdbook() -> Result<PathBuf> {
    let root = dev_cache_dir().join(format!("mdbook-{MDBOOK_VERSION}"));
    let binary = root.join("bin/mdbook");
    if !binary.exists() {
        run(cargo()
            .args(["install", "mdbook", "--version", MDBOOK_VERSION, "--locked", "--no-default-features"])
            .args(["--features", "search", "--root"])
            .arg(&root))?;
    }
    Ok(binary)
}

/// The Markdown whose links are checked: the book's pages and the repository's own files.
fn markdown_files() -> Result<Vec<PathBuf>> {
    let root = workspace_root();
    let mut files: Vec<PathBuf> =
        ["README.md", "SECURITY.md", "CONTRIBUTING.md", "ARCHITECTURE.md", "BENCHMARKS.md", "CHANGELOG.md"]
            .iter()
            .map(|name| root.join(name))
            .collect();
    let mut folders = vec![root.join("docs/src"), root.join("docs/perf")];
    while let Some(folder) = folders.pop() {
        for entry in std::fs::read_dir(&folder)? {
            let path = entry?.path();
            if path.is_dir() {
                folders.push(path);
            } else if path.extension().is_some_and(|e| e == "md") {
                files.push(path);
            }
        }
    }
    files.sort();
    Ok(files)
}

fn check_links() -> Result<()> {
    let mut broken = Vec::new();
    for file in markdown_files()? {
        let text = std::fs::read_to_string(&file)?;
        for target in links(&text) {
            if let Err(why) = check_link(&file, &text, &target) {
                broken.push(format!("{}: `{target}`: {why}", file.strip_prefix(workspace_root())?.display()));
            }
        }
    }
    if !broken.is_empty() {
        bail!("broken links:\n  {}", broken.join("\n  "));
    }
    Ok(())
}

/// The targets of the Markdown links in `text` (`[text](target)`), outside code.
fn links(text: &str) -> Vec<String> {
    let mut targets = Vec::new();
    let mut in_code = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
            continue;
        }
        if in_code {
            continue;
        }
        // Inline code spans may show link-like text: leave them out.
        let outside_code: String = line.split('`').step_by(2).collect::<Vec<_>>().join(" ");
        let mut rest = outside_code.as_str();
        while let Some(at) = rest.find("](") {
            rest = &rest[at + 2..];
            let end = rest.find(')').unwrap_or(rest.len());
            targets.push(rest[..end].trim().to_string());
            rest = &rest[end..];
        }
    }
    targets
}

fn check_link(file: &Path, text: &str, target: &str) -> Result<(), String> {
    if target.contains("://") || target.starts_with("mailto:") {
        return Ok(());
    }
    let (path, anchor) = target.split_once('#').map_or((target, None), |(p, a)| (p, Some(a)));
    let (destination, destination_text) = if path.is_empty() {
        (file.to_path_buf(), text.to_string())
    } else {
        let destination = file.parent().unwrap_or(Path::new(".")).join(path);
        if !destination.exists() {
            return Err("no such file".into());
        }
        let text = if destination.is_file() {
            std::fs::read_to_string(&destination).unwrap_or_default()
        } else {
            String::new()
        };
        (destination, text)
    };
    match anchor {
        Some(anchor) if !anchors(&destination_text).contains(anchor) => {
            Err(format!("no heading for `#{anchor}` in {}", destination.display()))
        }
        _ => Ok(()),
    }
}

/// The anchors of `text`'s headings, as mdBook and GitHub make them.
fn anchors(text: &str) -> BTreeSet<String> {
    let mut in_code = false;
    let mut anchors = BTreeSet::new();
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
        }
        if in_code || !line.starts_with('#') {
            continue;
        }
        let heading = line.trim_start_matches('#').trim();
        let slug: String = heading
            .to_lowercase()
            .chars()
            .filter_map(|c| match c {
                ' ' => Some('-'),
                c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
                _ => None,
            })
            .collect();
        anchors.insert(slug);
    }
    anchors
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_and_anchors_are_read_as_mdbook_makes_them() {
        let text =
            "# The daemon's API\n\nSee [the API](api.md#the-daemons-api) and `[not](a-link)`.\n```\n[no](link)\n```\n";
        assert_eq!(links(text), ["api.md#the-daemons-api"]);
        assert!(anchors(text).contains("the-daemons-api"));
    }
}

#[cfg(test)]
mod codemap {
    use super::*;

    /// Every source file of every crate is named in ARCHITECTURE.md's codemap (as `name.rs`,
    /// or as its folder `name/` for a module with submodules): a module added without saying
    /// where it sits fails here.
    #[test]
    fn the_codemap_names_every_module() {
        let root = workspace_root();
        let architecture = std::fs::read_to_string(root.join("ARCHITECTURE.md")).unwrap();
        let mut missing = Vec::new();
        let mut folders = vec![root.join("crates")];
        while let Some(folder) = folders.pop() {
            for entry in std::fs::read_dir(&folder).unwrap() {
                let path = entry.unwrap().path();
                let name = path.file_name().unwrap().to_string_lossy().into_owned();
                if path.is_dir() {
                    // Integration tests (a crate's `tests/`) and what is not Rust are not modules.
                    let integration_tests = name == "tests" && folder.file_name().is_some_and(|f| f != "crates");
                    let skipped = ["target", "snapshots", "bench", "python", "c", "build", "data", "fixtures"];
                    if !integration_tests && !skipped.contains(&name.as_str()) {
                        folders.push(path);
                    }
                    continue;
                }
                let in_src = path.components().any(|c| c.as_os_str() == "src");
                if !in_src
                    || path.extension().is_none_or(|e| e != "rs")
                    || ["lib.rs", "main.rs", "mod.rs"].contains(&name.as_str())
                {
                    continue;
                }
                let stem = name.trim_end_matches(".rs");
                if !architecture.contains(&format!("`{name}`")) && !architecture.contains(&format!("`{stem}`")) {
                    missing.push(path.strip_prefix(&root).unwrap().display().to_string());
                }
            }
        }
        missing.sort();
        assert!(missing.is_empty(), "ARCHITECTURE.md's codemap does not name: {missing:#?}");
    }
}
