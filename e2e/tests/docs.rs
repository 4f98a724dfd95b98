//! The contributor docs stay true to the tree: every crate's module map
//! lists its modules, every path `docs/architecture.md` names exists, and
//! no file points outside the repository.

use std::path::{Path, PathBuf};
use std::process::Command;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace root").to_path_buf()
}

/// The repository's tracked files.
fn tracked_files() -> Vec<String> {
    let output = Command::new("git").current_dir(workspace()).args(["ls-files"]).output().expect("git runs");
    assert!(output.status.success(), "git ls-files: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).lines().map(str::to_string).collect()
}

#[test]
fn every_lib_rs_module_map_lists_every_module() {
    let mut missing = Vec::new();
    for file in tracked_files().iter().filter(|f| f.ends_with("/src/lib.rs")) {
        let text = std::fs::read_to_string(workspace().join(file)).unwrap();
        let header: String = text.lines().take_while(|l| l.starts_with("//!") || l.is_empty()).collect::<Vec<_>>().join("\n");
        for line in text.lines() {
            let declared = line.strip_prefix("pub mod ").or_else(|| line.strip_prefix("mod "));
            let Some(module) = declared.and_then(|rest| rest.strip_suffix(';')) else { continue };
            if !header.contains(&format!("`{module}`")) {
                missing.push(format!("{file}: module `{module}` is not in the module map"));
            }
        }
    }
    assert!(missing.is_empty(), "{missing:#?}");
}

#[test]
fn every_path_the_architecture_names_exists() {
    let doc = std::fs::read_to_string(workspace().join("docs/architecture.md")).expect("docs/architecture.md");
    let mut named = 0;
    let mut missing = Vec::new();
    for span in doc.split('`').skip(1).step_by(2) {
        // A path is a span with a slash and a file extension or a trailing
        // slash, without spaces: `core/src/planner.rs`, `charts/`.
        let path = span.split(':').next().unwrap_or(span);
        let looks_like_path = !path.contains(' ')
            && path.contains('/')
            && !path.starts_with('/')
            && !path.contains("://")
            && (path.ends_with('/') || Path::new(path).extension().is_some());
        if looks_like_path {
            named += 1;
            if !workspace().join(path).exists() {
                missing.push(path.to_string());
            }
        }
    }
    assert!(named > 30, "the architecture names only {named} paths");
    assert!(missing.is_empty(), "docs/architecture.md names paths that do not exist: {missing:#?}");
}

#[test]
fn no_file_refers_outside_the_repository() {
    // Built here so that this file does not name them itself: the design
    // file of the founding team and the folder beside the repository.
    let outside = [["DESIGN", ".md"].concat(), ["..", "/shared"].concat()];
    let mut found = Vec::new();
    for file in tracked_files() {
        let Ok(text) = std::fs::read_to_string(workspace().join(&file)) else { continue };
        for (n, line) in text.lines().enumerate() {
            if outside.iter().any(|name| line.contains(name.as_str())) {
                found.push(format!("{file}:{}: {line}", n + 1));
            }
        }
    }
    assert!(found.is_empty(), "{found:#?}");
}
