//! Harness shared by the end-to-end tests: where the repository is, and walking its sources.

use std::path::{Path, PathBuf};

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_owned()
}

/// Every file under `dir` whose name ends with `extension`, skipping build output and VCS data.
pub fn source_files(dir: &Path, extension: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let skipped = name.starts_with('.')
                || name == "target"
                || name == "corpus"
                || name == "artifacts";
            if path.is_dir() && !skipped {
                stack.push(path);
            } else if name.ends_with(extension) {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}
