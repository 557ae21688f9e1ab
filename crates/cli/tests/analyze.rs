//! `meshward analyze`: the real binary on planted mistakes (each found, with
//! istioctl's message form and exit status 79), on the shop example (no
//! errors), on invalid and unparsable input, and its thresholds and output
//! formats.

mod support;

use std::path::PathBuf;
use std::process::{Command, Output};

use support::*;

fn analyze(args: &[&str]) -> Output {
    Command::new(bin())
        .arg("analyze")
        .args(args)
        .output()
        .expect("run meshward")
}

use support::output_text as text;
use support::tls::write;

const WORKLOADS: &str = r#"apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: orders, namespace: production}
spec:
  address: 127.0.1.5
  labels: {app: orders}
  serviceAccount: orders
  ports: {http: 8080}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: legacy
  namespace: legacy
  annotations: {meshward.io/proxy: "false"}
spec:
  address: 127.0.1.7
  labels: {app: legacy}
  serviceAccount: legacy
  ports: {http: 8080}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: orders, namespace: production}
spec:
  hosts: [orders.production.svc.cluster.local]
  ports: [{number: 80, name: http, protocol: HTTP, targetPort: 8080}]
  workloadSelector: {labels: {app: orders}}
  resolution: STATIC
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: legacy, namespace: legacy}
spec:
  hosts: [legacy.legacy.svc.cluster.local]
  ports: [{number: 8080, name: http, protocol: HTTP}]
  workloadSelector: {labels: {app: legacy}}
  resolution: STATIC
"#;

/// Every mistake the checks find, one resource each (line numbers below).
const MISTAKES: &str = r#"apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: production}
spec:
  mtls: {mode: STRICT}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: typo, namespace: production}
spec:
  selector: {matchLabels: {app: order}}
  rules: [{}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: callers, namespace: production}
spec:
  selector: {matchLabels: {app: orders}}
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/production/sa/fronted"]
        namespaces: ["prodution"]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: plaintext, namespace: production}
spec:
  host: orders.production.svc.cluster.local
  trafficPolicy:
    tls: {mode: DISABLE}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: legacy-mtls, namespace: legacy}
spec:
  host: legacy.legacy.svc.cluster.local
  trafficPolicy:
    tls: {mode: ISTIO_MUTUAL}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: orders-ports, namespace: production}
spec:
  selector: {matchLabels: {app: orders}}
  portLevelMtls:
    80: {mode: PERMISSIVE}
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: jwt, namespace: production}
spec:
  selector: {matchLabels: {app: orders}}
  jwtRules: [{issuer: "https://issuer.example", jwksUri: "https://issuer.example/jwks"}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext, namespace: production}
spec:
  selector: {matchLabels: {app: orders}}
  action: CUSTOM
  provider: {name: opa}
  rules: [{to: [{operation: {paths: ["/admin"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: unenforced, namespace: legacy}
spec:
  selector: {matchLabels: {app: legacy}}
  rules: [{}]
"#;

fn planted() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a-workloads.yaml", WORKLOADS);
    let file = write(dir.path(), "b-mistakes.yaml", MISTAKES);
    (dir, file)
}

#[test]
fn every_planted_mistake_is_found_with_istioctls_message_form() {
    let (dir, file) = planted();
    let o = analyze(&[dir.path().to_str().unwrap()]);
    let (stdout, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(79), "{stdout}{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    let starts: Vec<String> = lines
        .iter()
        .map(|l| l.split(')').next().unwrap_or_default().to_string())
        .collect();
    // istioctl's order: errors first, then by code, then by resource.
    let expected = [
        format!("Error [IST0101] (AuthorizationPolicy production/callers {file}:14"),
        format!("Error [MW0103] (DestinationRule production/plaintext {file}:25"),
        format!("Error [MW0104] (DestinationRule legacy/legacy-mtls {file}:33"),
        format!("Error [MW0107] (AuthorizationPolicy production/ext {file}:56"),
        format!("Warning [IST0127] (AuthorizationPolicy production/typo {file}:7"),
        format!("Warning [IST0167] (AuthorizationPolicy legacy/unenforced {file}:65"),
        format!("Warning [MW0101] (AuthorizationPolicy production/callers {file}:14"),
        format!("Warning [MW0105] (PeerAuthentication production/orders-ports {file}:41"),
        format!("Warning [MW0106] (RequestAuthentication production/jwt {file}:49"),
    ];
    assert_eq!(starts, expected, "{stdout}");
    assert_eq!(
        lines[4],
        format!(
            "Warning [IST0127] (AuthorizationPolicy production/typo {file}:7) No matching workloads for this resource with the following labels: app=order"
        )
    );
    assert!(
        lines[0].ends_with("Referenced namespace not found: \"prodution\""),
        "{}",
        lines[0]
    );
    assert!(
        !stderr.contains("No validation issues"),
        "nothing to say when issues were found: {stderr}"
    );
}

#[test]
fn the_shop_example_has_no_errors() {
    let shop = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/shop/policies");
    let o = analyze(&[shop.to_str().unwrap()]);
    let (stdout, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{stdout}{stderr}");
    assert!(!stdout.contains("Error ["), "{stdout}");
}

#[test]
fn nothing_found_says_so_as_istioctl_does() {
    let dir = tempfile::tempdir().unwrap();
    let one = write(dir.path(), "workloads.yaml", WORKLOADS);
    let o = analyze(&[&one]);
    let (stdout, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{stdout}{stderr}");
    assert_eq!(stdout, "");
    assert_eq!(
        stderr,
        format!("\u{2714} No validation issues found when analyzing {one}.\n")
    );
    let two = write(dir.path(), "mesh.yaml", "# nothing here yet\n");
    let o = analyze(&[dir.path().to_str().unwrap()]);
    let (_, stderr) = text(&o);
    assert_eq!(
        stderr,
        format!("\u{2714} No validation issues found when analyzing:\n  - {two}\n  - {one}\n")
    );
}

#[test]
fn thresholds_decide_what_is_shown_and_what_fails() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "workloads.yaml", WORKLOADS);
    // Only a warning: the selector matches nothing.
    write(
        dir.path(),
        "policy.yaml",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: typo, namespace: production}\nspec:\n  selector: {matchLabels: {app: order}}\n",
    );
    let path = dir.path().to_str().unwrap();
    let o = analyze(&[path]);
    let (stdout, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{stdout}{stderr}");
    assert!(stdout.starts_with("Warning [IST0127]"), "{stdout}");

    let o = analyze(&[path, "--failure-threshold", "Warning"]);
    assert_eq!(o.status.code(), Some(79), "{:?}", text(&o));

    let o = analyze(&[path, "--output-threshold", "Error"]);
    let (stdout, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{stdout}{stderr}");
    assert_eq!(stdout, "");

    let o = analyze(&[path, "--failure-threshold", "Severe"]);
    let (_, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr.contains("\"Severe\" is not one of Info, Warning, Error"),
        "{stderr}"
    );
}

#[test]
fn json_and_yaml_carry_istioctls_fields() {
    let (dir, file) = planted();
    let o = analyze(&[dir.path().to_str().unwrap(), "-o", "json"]);
    assert_eq!(o.status.code(), Some(79), "{:?}", text(&o));
    let list: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON output");
    let typo = &list[4];
    assert_eq!(typo["code"], "IST0127");
    assert_eq!(typo["level"], "Warning");
    assert_eq!(typo["origin"], "AuthorizationPolicy production/typo");
    assert_eq!(typo["reference"], format!("{file}:7"));
    assert_eq!(typo["field"], "spec.selector.matchLabels");
    assert_eq!(
        typo["message"],
        "No matching workloads for this resource with the following labels: app=order"
    );
    assert_eq!(
        typo["documentationUrl"],
        "https://istio.io/latest/docs/reference/config/analysis/ist0127/"
    );
    assert_eq!(list[1]["code"], "MW0103");
    assert_eq!(list[1].get("documentationUrl"), None);
    assert_eq!(list.as_array().map(Vec::len), Some(9));

    let o = analyze(&[dir.path().to_str().unwrap(), "-o", "yaml"]);
    assert_eq!(o.status.code(), Some(79));
    let (stdout, _) = text(&o);
    assert!(
        stdout.starts_with("- code: \"IST0101\"\n  documentationUrl: "),
        "{stdout}"
    );
    assert_eq!(stdout.matches("\n- code: ").count() + 1, 9, "{stdout}");
    assert!(stdout.contains("  reference: \""), "{stdout}");
}

#[test]
fn an_invalid_resource_is_ist0106_and_nothing_else_is_analyzed() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "workloads.yaml", WORKLOADS);
    let bad = write(
        dir.path(),
        "bad.yaml",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: production}\nspec:\n  selector: {matchLabels: {app: nobody}}\n  action: ALOW\n",
    );
    let o = analyze(&[dir.path().to_str().unwrap()]);
    let (stdout, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(79), "{stdout}{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "{stdout}");
    assert!(
        lines[0].starts_with(&format!(
            "Error [IST0106] (AuthorizationPolicy production/p {bad}:6) Schema validation error: spec.action: "
        )),
        "{stdout}"
    );
    assert!(
        stderr.contains("the other checks need a valid configuration"),
        "{stderr}"
    );
}

#[test]
fn an_unparsable_file_is_exit_status_65() {
    let dir = tempfile::tempdir().unwrap();
    let broken = write(dir.path(), "broken.yaml", "key: [unclosed\n");
    let o = analyze(&[&broken]);
    let (stdout, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(65), "{stdout}{stderr}");
    assert!(stderr.contains(&format!("{broken}:")), "{stderr}");
    assert!(
        stderr.contains("(but 1 file could not be parsed)"),
        "{stderr}"
    );

    let o = analyze(&[dir.path().join("missing.yaml").to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(65), "{:?}", text(&o));
}

#[test]
fn without_a_path_it_says_what_to_name() {
    let o = analyze(&[]);
    let (_, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr.contains("name the files or directories to analyze"),
        "{stderr}"
    );
}

#[test]
fn mesh_config_defines_the_custom_provider() {
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    std::fs::create_dir(&policies).unwrap();
    write(&policies, "workloads.yaml", WORKLOADS);
    write(
        &policies,
        "ext.yaml",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: ext, namespace: production}\nspec:\n  selector: {matchLabels: {app: orders}}\n  action: CUSTOM\n  provider: {name: opa}\n  rules: [{to: [{operation: {paths: [\"/admin\"]}}]}]\n",
    );
    let mesh = write(
        dir.path(),
        "mesh.yaml",
        "extensionProviders:\n- name: opa\n  envoyExtAuthzGrpc: {service: opa.example, port: 9191}\n",
    );
    let path = policies.to_str().unwrap();
    let o = analyze(&[path]);
    let (stdout, _) = text(&o);
    assert_eq!(o.status.code(), Some(79), "{stdout}");
    assert!(stdout.starts_with("Error [MW0107]"), "{stdout}");

    let o = analyze(&[path, "--mesh-config", &mesh]);
    let (stdout, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{stdout}{stderr}");
    assert_eq!(stdout, "");
}

#[test]
fn suppressions_leave_messages_out_of_output_and_exit_status() {
    let (dir, _) = planted();
    let path = dir.path().to_str().unwrap();
    let o = analyze(&[path, "-S", "IST0127=AuthorizationPolicy production/*"]);
    let (stdout, _) = text(&o);
    assert!(!stdout.contains("[IST0127]"), "{stdout}");
    assert_eq!(stdout.lines().count(), 8, "{stdout}");

    // Every error suppressed, in both of istioctl's resource spellings:
    // the warnings remain, the exit status is 0.
    let o = analyze(&[
        path,
        "-S",
        "IST0101=AuthorizationPolicy production/callers",
        "-S",
        "MW0103=DestinationRule plaintext.production",
        "--suppress",
        "MW0104=DestinationRule *.legacy",
        "-S",
        "MW0107=*",
    ]);
    let (stdout, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{stdout}{stderr}");
    assert!(!stdout.contains("Error ["), "{stdout}");
    assert!(stdout.contains("Warning [IST0127]"), "{stdout}");

    let o = analyze(&[path, "-S", "IST0127"]);
    let (_, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr.contains("\"IST0127\" is not CODE=RESOURCE"),
        "{stderr}"
    );

    let o = analyze(&[path, "-S", "IST9999=*"]);
    let (_, stderr) = text(&o);
    assert!(
        stderr.contains("'IST9999' is an unknown message code"),
        "{stderr}"
    );
}

#[test]
fn an_info_message_fails_only_at_the_info_threshold() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "workloads.yaml", WORKLOADS);
    write(
        dir.path(),
        "trial.yaml",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: trial\n  namespace: production\n  annotations: {istio.io/dry-run: \"true\"}\nspec:\n  selector: {matchLabels: {app: orders}}\n  action: DENY\n  rules: [{to: [{operation: {paths: [\"/admin\"]}}]}]\n",
    );
    let path = dir.path().to_str().unwrap();
    let o = analyze(&[path]);
    let (stdout, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{stdout}{stderr}");
    assert!(stdout.starts_with("Info [MW0109]"), "{stdout}");
    let o = analyze(&[path, "--failure-threshold", "info"]);
    assert_eq!(o.status.code(), Some(79), "{:?}", text(&o));
    let o = analyze(&[path, "--output-threshold", "Warning"]);
    let (stdout, stderr) = text(&o);
    assert_eq!(stdout, "");
    assert!(stderr.contains("No validation issues found"), "{stderr}");
}

#[test]
fn policies_without_workloads_are_not_compared_with_workloads() {
    let policies = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples/shop/policies/authorization.yaml");
    let o = analyze(&[policies.to_str().unwrap()]);
    let (stdout, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{stdout}{stderr}");
    assert!(!stdout.contains("IST0127"), "{stdout}");
    assert!(
        stderr.contains("note: the configuration describes no WorkloadEntry"),
        "{stderr}"
    );
}
