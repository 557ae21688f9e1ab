//! The README's first command on the built-in example: the shop's policy
//! tests pass and its policies validate. Also the policy test runner's
//! `warning_contains` (a meshward extension of the corpus format).

mod support;

use std::path::PathBuf;
use std::process::Command;

use support::*;

fn example(p: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples/shop")
        .join(p)
        .to_str()
        .unwrap()
        .to_string()
}

#[test]
fn the_shops_policy_tests_pass() {
    let out = stdout_of(&["policy", "test", &example("tests")]);
    assert!(out.contains(" passed, 0 failed"), "{out}");
}

#[test]
fn the_shops_policies_validate() {
    let out = stdout_of(&["validate", &example("policies")]);
    assert!(out.starts_with("valid:"), "{out}");
}

#[test]
fn warning_contains_fails_when_no_warning_mentions_it() {
    let dir = tempfile::tempdir().unwrap();
    let case = |keyword: &str| {
        format!(
            "cases:\n  - name: typo\n    kind: validate\n    config: |\n      apiVersion: security.istio.io/v1\n      kind: AuthorizationPolicy\n      metadata: {{name: typo, namespace: production}}\n      spec:\n        rules: [{{to: [{{operation: {{methods: [\"get\"]}}}}]}}]\n    expect_valid: true\n    warning_contains: {keyword}\n"
        )
    };
    let file = dir.path().join("t.yaml");
    std::fs::write(&file, case("methods")).unwrap();
    let out = stdout_of(&["policy", "test", file.to_str().unwrap()]);
    assert!(out.contains("1 passed, 0 failed"), "{out}");
    std::fs::write(&file, case("no-such-word")).unwrap();
    let out = Command::new(bin())
        .args(["policy", "test", file.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("expected valid, with a warning mentioning \"no-such-word\""),
        "{text}"
    );
}
