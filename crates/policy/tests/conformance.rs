//! Runs every case of the shared Istio conformance corpus
//! (`../shared/conformance/` beside the checkout, or the directory named by
//! `MESHWARD_CONFORMANCE_DIR`). A missing corpus is a failure, not a skip.

use std::path::PathBuf;

use meshward_policy::suite::{parse_suite, run_suite};

fn corpus_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("MESHWARD_CONFORMANCE_DIR") {
        return PathBuf::from(dir);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/conformance")
}

#[test]
fn istio_conformance_corpus_passes() {
    let dir = corpus_dir();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| {
            panic!(
                "conformance corpus not found at {} ({e}); it lives in ../shared/conformance beside the checkout, \
                 or set MESHWARD_CONFORMANCE_DIR",
                dir.display()
            )
        })
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 10,
        "expected the full corpus in {}, found {} files",
        dir.display(),
        files.len()
    );
    let (mut passed, mut failed) = (0, Vec::new());
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let name = file.file_name().unwrap().to_string_lossy().to_string();
        let suite =
            parse_suite(&name, &text).unwrap_or_else(|d| panic!("cannot parse {name}:\n{d}"));
        for r in run_suite(&suite, &|_, p| {
            panic!("the corpus uses no configPaths ({p})")
        }) {
            if r.passed {
                passed += 1;
            } else {
                failed.push(format!(
                    "{name}: {} / {}: expected {}, got {}\n    {}",
                    r.case,
                    r.check,
                    r.expected,
                    r.actual,
                    r.explanation.replace('\n', "\n    ")
                ));
            }
        }
    }
    assert!(
        failed.is_empty(),
        "{} conformance checks failed ({passed} passed):\n{}",
        failed.len(),
        failed.join("\n")
    );
    // The corpus held 242 checks when this was written; far fewer means
    // files were not found or parsed, not that everything passed.
    assert!(passed >= 240, "suspiciously few checks ran: {passed}");
}
