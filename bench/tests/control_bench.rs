//! `meshward-control-bench --quick` against the debug `meshward` binary:
//! it finishes, and its JSON report carries every metric of issue 17's
//! item 9 with plausible values (so that CI keeps the harness working).
//!
//! The `meshward` binary is `MESHWARD_TEST_BIN` if set, else the one this
//! build put in the target directory (`cargo build -p meshward-cli`;
//! `cargo test --workspace` builds it). Without it the test fails and
//! says how to build it: it is never reported as passed without running.

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

/// The `meshward` binary: `MESHWARD_TEST_BIN`, else `target/<profile>/meshward`
/// (this test runs from `target/<profile>/deps/`).
fn meshward() -> PathBuf {
    if let Some(bin) = std::env::var_os("MESHWARD_TEST_BIN") {
        return PathBuf::from(bin);
    }
    let exe = std::env::current_exe().expect("the test's own path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("the test runs from target/<profile>/deps");
    let bin = profile_dir.join(format!("meshward{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.is_file(),
        "{} not found: build it with `cargo build -p meshward-cli` (or set MESHWARD_TEST_BIN)",
        bin.display()
    );
    bin
}

fn number(v: &Value, path: &str) -> f64 {
    let mut at = v;
    for key in path.split('.') {
        at = &at[key];
    }
    at.as_f64()
        .unwrap_or_else(|| panic!("the report has no number at {path}: {v:#}"))
}

#[test]
fn quick_run_reports_every_metric() {
    let out = Command::new(env!("CARGO_BIN_EXE_meshward-control-bench"))
        .arg("--quick")
        .arg("--json")
        .arg("--meshward")
        .arg(meshward())
        .output()
        .expect("the harness starts");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the harness failed:\n{stderr}");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}):\n{}\n{stderr}",
            String::from_utf8_lossy(&out.stdout)
        )
    });

    // Push: 50 proxies, every one ACKed the initial version and the change.
    assert_eq!(number(&report, "push.proxies"), 50.0);
    assert_eq!(
        number(&report, "push.pilot_xds"),
        50.0,
        "the control plane counts them connected"
    );
    assert!(number(&report, "push.responses_acked") >= 100.0);
    let rounds = report["push"]["push_all_acked_ms"]
        .as_array()
        .expect("rounds");
    assert_eq!(rounds.len(), 1);
    for key in ["push_all_acked_median_ms", "push_all_acked_max_ms"] {
        let ms = number(&report, &format!("push.{key}"));
        assert!(ms > 0.0 && ms < 60_000.0, "{key} = {ms}");
    }
    assert!(number(&report, "push.pilot_proxy_convergence_time.count") >= 100.0);

    // Memory with the proxies connected, and at peak.
    let rss = number(&report, "push.control_rss_connected_mib");
    assert!(rss > 1.0 && rss < 4096.0, "RSS {rss} MiB");
    assert!(number(&report, "control_peak_rss_kib") >= rss * 1024.0);

    // Issuance: certificates were issued, every request succeeded, and the
    // control plane's own counter agrees with the harness.
    let certs = number(&report, "issuance.certificates");
    assert!(certs > 0.0);
    assert_eq!(
        number(&report, "issuance.requests"),
        certs,
        "{:#}",
        report["issuance"]
    );
    assert_eq!(
        number(
            &report,
            "issuance.citadel_server_success_cert_issuance_count_delta"
        ),
        certs
    );
    assert!(number(&report, "issuance.certificates_per_s") > 0.0);
    let p50 = number(&report, "issuance.latency_p50_ms");
    let p99 = number(&report, "issuance.latency_p99_ms");
    assert!(p50 > 0.0 && p50 <= p99, "p50 {p50} ms, p99 {p99} ms");
    assert!(number(&report, "issuance.control_cpu_s") > 0.0);
}

#[test]
fn a_missing_binary_is_a_clear_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_meshward-control-bench"))
        .args(["--quick", "--meshward", "/nonexistent/meshward"])
        .output()
        .expect("the harness starts");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("/nonexistent/meshward")
            && stderr.contains("cargo build --release -p meshward-cli"),
        "{stderr}"
    );
}

#[test]
fn a_control_plane_that_does_not_start_is_a_clear_error() {
    // `false` exits at once: the harness must say so, not hang or pass.
    let out = Command::new(env!("CARGO_BIN_EXE_meshward-control-bench"))
        .args(["--quick", "--meshward", "/bin/false"])
        .output()
        .expect("the harness starts");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("meshward control did not become ready") && stderr.contains("exited"),
        "{stderr}"
    );
}

#[test]
fn renewal_callers_are_served_over_their_own_certificates() {
    let out = Command::new(env!("CARGO_BIN_EXE_meshward-control-bench"))
        .args([
            "--quick", "--json", "--only", "issuance", "--proof", "renewal",
        ])
        .arg("--meshward")
        .arg(meshward())
        .output()
        .expect("the harness starts");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the harness failed:\n{stderr}");
    let report: Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    assert_eq!(report["issuance"]["proof"], "renewal");
    assert_eq!(
        number(&report, "issuance.connections"),
        200.0,
        "one per identity"
    );
    let certs = number(&report, "issuance.certificates");
    assert!(certs > 0.0);
    assert_eq!(
        number(&report, "issuance.requests"),
        certs,
        "{:#}",
        report["issuance"]
    );
    assert!(report.get("push").is_none(), "--only issuance");
}
