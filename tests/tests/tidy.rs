//! Repository hygiene enforced inside `cargo test`: module docs everywhere, no debugging leftovers.

use flotilla_tests::{repo_root, source_files};

#[test]
fn every_rust_file_starts_with_a_module_doc_line() {
    let root = repo_root();
    let missing: Vec<String> = source_files(&root, ".rs")
        .into_iter()
        .filter(|path| {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            !text.starts_with("//!")
        })
        .map(|p| p.strip_prefix(&root).unwrap_or(&p).display().to_string())
        .collect();
    assert!(
        missing.is_empty(),
        "files without a leading //! line: {missing:?}"
    );
}

#[test]
fn no_debugging_or_placeholder_macros_and_no_ignored_tests() {
    // Spelled in pieces so this file does not match itself.
    let forbidden = [
        concat!("db", "g!("),
        concat!("to", "do!("),
        concat!("unimple", "mented!("),
        concat!("#[", "ignore"),
    ];
    let root = repo_root();
    let mut hits = Vec::new();
    for path in source_files(&root, ".rs") {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        for (n, line) in text.lines().enumerate() {
            for bad in forbidden {
                if line.contains(bad) {
                    let rel = path
                        .strip_prefix(&root)
                        .unwrap_or(&path)
                        .display()
                        .to_string();
                    hits.push(format!("{rel}:{}: {bad}", n + 1));
                }
            }
        }
    }
    assert!(hits.is_empty(), "forbidden in the tree: {hits:#?}");
}

#[test]
fn no_sled_batches_or_transactions() {
    // sled 0.34's `apply_batch` and transactions take a process-wide exclusive lock, and a
    // concurrent `flush` holding the shared side while it waits for sled's flusher thread
    // deadlocks the whole process (seen with several stores in one process). Single-key
    // writes in a crash-safe order are used instead.
    let forbidden = [concat!(".apply", "_batch("), concat!(".trans", "action(")];
    let root = repo_root();
    let mut hits = Vec::new();
    for path in source_files(&root, ".rs") {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        for (n, line) in text.lines().enumerate() {
            if forbidden.iter().any(|bad| line.contains(bad)) {
                let rel = path
                    .strip_prefix(&root)
                    .unwrap_or(&path)
                    .display()
                    .to_string();
                hits.push(format!("{rel}:{}", n + 1));
            }
        }
    }
    assert!(
        hits.is_empty(),
        "sled batch or transaction in the tree: {hits:#?}"
    );
}

#[test]
fn tidy_walk_sees_the_workspace() {
    // Guards the two tests above against vacuously passing on an empty walk.
    let files = source_files(&repo_root(), ".rs");
    assert!(
        files.iter().any(|p| p.ends_with("shared/src/verify.rs")),
        "{files:?}"
    );
    assert!(files.len() > 10);
}
