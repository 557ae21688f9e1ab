//! Runs every case of the shared Istio conformance corpus: the directory
//! named by `MESHWARD_CONFORMANCE_DIR`, else `../shared/conformance` beside
//! the checkout.
//!
//! The corpus is not part of the repository. Where it exists the test runs
//! and must pass; a `MESHWARD_CONFORMANCE_DIR` that cannot be read, or a
//! corpus with files or checks missing, fails. Where neither exists (a clone
//! on its own) the test is reported as *ignored*, with the reason, never as
//! passed. CI sets `MESHWARD_CONFORMANCE_DIR` (`scripts/dev.sh ci`), so
//! there it can only run or fail.
//!
//! Why `harness = false`: libtest decides "ignored" at compile time
//! (`#[ignore]`), and a cfg set by a build script would go stale, or rebuild
//! the policy crate on every build while the corpus is missing. So this
//! target is its own small harness: it speaks enough of libtest's command
//! line (name filters, `--exact`, `--skip`, `--list`, `--ignored`,
//! `--include-ignored`; other flags are accepted and have no effect) and
//! prints libtest's lines, so that `cargo test` output reads as usual:
//! `test result: ok. 0 passed; 0 failed; 1 ignored; ...` when the corpus is
//! missing. `--ignored` runs it anyway, and then it fails, saying where the
//! corpus was looked for.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use meshward_policy::suite::{parse_suite, run_suite};

const TEST_NAME: &str = "istio_conformance_corpus_passes";
const ENV: &str = "MESHWARD_CONFORMANCE_DIR";

/// Where the corpus is, or why the test does not run.
enum Corpus {
    /// Named by `MESHWARD_CONFORMANCE_DIR` or found beside the checkout.
    At(PathBuf),
    /// Neither: the reason, for the test output.
    Missing(String),
}

fn locate() -> Corpus {
    if let Some(dir) = std::env::var_os(ENV) {
        // Named explicitly (as CI does): it must be there; reading it
        // reports what is wrong.
        return Corpus::At(PathBuf::from(dir));
    }
    // crates/policy -> the checkout -> the directory holding it.
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let beside = manifest
        .ancestors()
        .nth(3)
        .unwrap_or(manifest)
        .join("shared/conformance");
    if beside.is_dir() {
        Corpus::At(beside)
    } else {
        Corpus::Missing(format!(
            "NOT RUN: conformance corpus not found at {} and {ENV} is not set \
             (CI sets it; put the corpus there or set {ENV} to run this test)",
            beside.display()
        ))
    }
}

/// Runs every check of the corpus in `dir`; the summary, or every failure.
fn run_corpus(dir: &Path) -> Result<String, String> {
    let entries = std::fs::read_dir(dir).map_err(|e| {
        format!(
            "conformance corpus not readable at {} ({e}); it lives in ../shared/conformance \
             beside the checkout, or set {ENV}",
            dir.display()
        )
    })?;
    let mut files = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| format!("{}: {e}", dir.display()))?.path();
        if path.extension().is_some_and(|e| e == "yaml") {
            files.push(path);
        }
    }
    files.sort();
    if files.len() < 10 {
        return Err(format!(
            "expected the full corpus in {}, found {} YAML files",
            dir.display(),
            files.len()
        ));
    }
    let (mut passed, mut failed) = (0, Vec::new());
    for file in &files {
        let text = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
        let name = file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let suite = parse_suite(&name, &text).map_err(|d| format!("cannot parse {name}:\n{d}"))?;
        // The corpus is self-contained: a case naming config files is a
        // corpus (or parser) bug.
        let config_paths = std::cell::RefCell::new(Vec::new());
        let results = run_suite(&suite, &|_, p| config_paths.borrow_mut().push(p.to_owned()));
        let config_paths = config_paths.into_inner();
        if !config_paths.is_empty() {
            return Err(format!(
                "{name}: the corpus uses no configPaths, found {config_paths:?}"
            ));
        }
        for r in results {
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
    if !failed.is_empty() {
        return Err(format!(
            "{} conformance checks failed ({passed} passed):\n{}",
            failed.len(),
            failed.join("\n")
        ));
    }
    // The corpus held 242 checks when this was written; far fewer means
    // files were not found or parsed, not that everything passed.
    if passed < 240 {
        return Err(format!(
            "suspiciously few checks ran in {}: {passed}",
            dir.display()
        ));
    }
    Ok(format!(
        "{passed} checks in {} files of {}",
        files.len(),
        dir.display()
    ))
}

/// The part of libtest's command line this harness honours.
#[derive(Default)]
struct Args {
    list: bool,
    terse: bool,
    ignored: bool,
    include_ignored: bool,
    exact: bool,
    filters: Vec<String>,
    skip: Vec<String>,
}

impl Args {
    fn parse(args: impl Iterator<Item = String>) -> Args {
        let mut out = Args::default();
        let mut args = args.peekable();
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--list" => out.list = true,
                "--ignored" => out.ignored = true,
                "--include-ignored" => out.include_ignored = true,
                "--exact" => out.exact = true,
                "--format=terse" => out.terse = true,
                "--skip" => out.skip.extend(args.next()),
                "--format" => out.terse = args.next().as_deref() == Some("terse"),
                // libtest options taking a separate value: skip the value.
                "--test-threads" | "--color" | "--logfile" | "--shuffle-seed" | "-Z" => {
                    args.next();
                }
                flag if flag.starts_with('-') => {}
                filter => out.filters.push(filter.to_owned()),
            }
        }
        out
    }

    fn selects(&self, name: &str) -> bool {
        let hit = |f: &String| {
            if self.exact {
                name == f
            } else {
                name.contains(f.as_str())
            }
        };
        (self.filters.is_empty() || self.filters.iter().any(hit)) && !self.skip.iter().any(hit)
    }
}

/// "1 test" or "0 tests", as libtest words it.
fn tests(selected: bool) -> &'static str {
    if selected { "1 test" } else { "0 tests" }
}

fn main() -> ExitCode {
    let args = Args::parse(std::env::args().skip(1));
    let corpus = locate();
    let ignored = matches!(corpus, Corpus::Missing(_));
    // As libtest: --ignored runs only ignored tests, --include-ignored all.
    let selected = args.selects(TEST_NAME) && (!args.ignored || ignored);
    let runs = selected && (!ignored || args.ignored || args.include_ignored);

    if args.list {
        if selected {
            println!("{TEST_NAME}: test");
        }
        if !args.terse {
            println!("\n{}, 0 benchmarks", tests(selected));
        }
        return ExitCode::SUCCESS;
    }

    let started = Instant::now();
    println!("\nrunning {}", tests(selected));
    let (mut passed, mut failed, mut skipped) = (0, 0, 0);
    let mut failure = None;
    if selected && !runs {
        if let Corpus::Missing(reason) = &corpus {
            println!("test {TEST_NAME} ... ignored, {reason}");
        }
        skipped = 1;
    } else if runs {
        let result = match &corpus {
            Corpus::At(dir) => run_corpus(dir),
            Corpus::Missing(reason) => Err(reason.clone()),
        };
        match result {
            Ok(summary) => {
                println!("conformance: {summary}");
                println!("test {TEST_NAME} ... ok");
                passed = 1;
            }
            Err(why) => {
                println!("test {TEST_NAME} ... FAILED");
                failure = Some(why);
                failed = 1;
            }
        }
    }
    if let Some(why) = &failure {
        println!("\nfailures:\n\n---- {TEST_NAME} ----\n{why}\n\nfailures:\n    {TEST_NAME}");
    }
    println!(
        "\ntest result: {}. {passed} passed; {failed} failed; {skipped} ignored; 0 measured; {} filtered out; finished in {:.2}s\n",
        if failed == 0 { "ok" } else { "FAILED" },
        u8::from(!selected),
        started.elapsed().as_secs_f64()
    );
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        // libtest's exit status for failed tests.
        ExitCode::from(101)
    }
}
