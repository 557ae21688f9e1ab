//! `meshward validate` and `meshward proxy` on input Istio applies but that
//! cannot do what it looks like it does: it is accepted, the warning names
//! the file, the line and the field, and the decision is Istio's. Also the
//! shapes of `--mesh-config` files (bare block, Helm values, IstioOperator).

mod support;

use std::process::{Command, Output};

use support::*;

fn validate(args: &[&str]) -> Output {
    Command::new(bin())
        .arg("validate")
        .args(args)
        .output()
        .expect("run meshward")
}

use support::output_text as out;
use support::tls::write;

const LOWER_CASE_GET: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: api-access
  namespace: production
spec:
  selector:
    matchLabels: {app: api}
  rules:
  - to:
    - operation:
        methods: [\"get\"]
";

#[test]
fn validate_accepts_a_lower_case_method_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "policies.yaml", LOWER_CASE_GET);
    let o = validate(&[&file]);
    let (stdout, stderr) = out(&o);
    assert!(o.status.success(), "{stdout}{stderr}");
    assert_eq!(
        stderr.trim_end(),
        format!(
            "{file}:12: warning: AuthorizationPolicy production/api-access: spec.rules[0].to[0].operation.methods[0]: \"get\" never matches: methods are case-sensitive and requests use upper case (\"GET\")"
        )
    );
    assert_eq!(
        stdout.trim_end(),
        "valid: 1 resources (1 AuthorizationPolicy), 1 warnings"
    );
}

const CUSTOM_OPA: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: opa-ext-auth, namespace: production}
spec:
  selector: {matchLabels: {app: api}}
  action: CUSTOM
  provider: {name: opa}
  rules:
  - to: [{operation: {paths: [\"/api/*\"]}}]
";

#[test]
fn validate_reads_mesh_settings_from_helm_values_and_istio_operator() {
    let dir = tempfile::tempdir().unwrap();
    let policies = write(dir.path(), "policies.yaml", CUSTOM_OPA);
    let opa = "extensionProviders:\n- name: opa\n  envoyExtAuthzGrpc:\n    service: opa.istio-system.svc.cluster.local\n    port: 9191\n";
    let indented = |by: usize, text: &str| -> String {
        text.lines()
            .map(|l| format!("{}{l}\n", " ".repeat(by)))
            .collect()
    };
    let iop = write(
        dir.path(),
        "iop.yaml",
        &format!(
            "apiVersion: install.istio.io/v1alpha1\nkind: IstioOperator\nmetadata:\n  name: cp\n  namespace: istio-system\nspec:\n  profile: default\n  meshConfig:\n{}",
            indented(4, opa)
        ),
    );
    let helm = write(
        dir.path(),
        "values.yaml",
        &format!("global:\n  hub: example\nmeshConfig:\n{}", indented(2, opa)),
    );
    for (mesh, skipped) in [
        (
            &iop,
            format!("{iop}:7: warning: IstioOperator istio-system/cp: spec: skipped `profile`"),
        ),
        (
            &helm,
            format!("{helm}:1: warning: Helm values: skipped `global`"),
        ),
    ] {
        let o = validate(&["--mesh-config", mesh, &policies]);
        let (stdout, stderr) = out(&o);
        assert!(o.status.success(), "{stdout}{stderr}");
        // The provider is defined: no warning about the CUSTOM policy.
        let lines = own_lines(&stderr);
        assert_eq!(lines.len(), 1, "{stderr}");
        assert!(lines[0].starts_with(&skipped), "{stderr}");
    }
    // A bad field inside spec.meshConfig is named by its path in the file.
    let bad = write(
        dir.path(),
        "bad.yaml",
        &format!(
            "apiVersion: install.istio.io/v1alpha1\nkind: IstioOperator\nmetadata:\n  name: cp\nspec:\n  meshConfig:\n{}        failOpen: maybe\n",
            indented(4, opa)
        ),
    );
    let o = validate(&["--mesh-config", &bad, &policies]);
    let (stdout, stderr) = out(&o);
    assert_eq!(o.status.code(), Some(1), "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!(
            "{bad}:12: IstioOperator istio-system/cp: spec.meshConfig.extensionProviders[0].envoyExtAuthzGrpc.failOpen: expected true or false"
        )),
        "{stdout}"
    );
    assert!(
        stdout.contains("invalid: 1 error; nothing was accepted"),
        "{stdout}"
    );
}

/// The proxy logs the warning when it loads its configuration, and decides
/// as Istio: an ALLOW policy whose only method is `get` allows no request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_logs_the_warning_and_a_lower_case_method_allows_nothing() {
    let mesh = Mesh::new();
    let app = App::start("api").await;
    let port = free_port();
    mesh.write_config(
        "workloads.yaml",
        &format!(
            "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata:\n  name: api\n  namespace: production\n  annotations: {{meshward.io/app-ports: \"http=127.0.0.1:{}\"}}\nspec:\n  address: 127.0.0.1\n  labels: {{app: api}}\n  serviceAccount: api\n  ports: {{http: {port}}}\n",
            app.addr.port()
        ),
    );
    mesh.write_config("policies.yaml", LOWER_CASE_GET);
    // Mesh settings as Helm values, read at start.
    let values = mesh.path("values.yaml");
    std::fs::write(
        &values,
        "pilot:\n  replicaCount: 1\nmeshConfig:\n  trustDomain: cluster.local\n",
    )
    .unwrap();
    let proxy = mesh
        .proxy_with(
            "production/api",
            &mesh.issue("api", "production", "api"),
            &["--mesh-config", values.to_str().unwrap()],
        )
        .await;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let (status, body) = get(addr, "api.production.svc.cluster.local", "/", &[])
        .await
        .expect("request through the proxy");
    assert_eq!(
        (status, body.as_str()),
        (403, "RBAC: access denied"),
        "{}",
        proxy.logs()
    );
    assert!(
        app.last().is_none(),
        "the request must not reach the application"
    );
    // The proxy logs JSON lines; the warnings are `WARN` on `meshward::config`.
    let logs = proxy.logs();
    let warnings: Vec<String> = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["level"] == "WARN" && v["target"] == "meshward::config")
        .filter_map(|v| v["fields"]["message"].as_str().map(str::to_string))
        .collect();
    assert!(
        warnings.iter().any(|w| w.ends_with("policies.yaml:12: warning: AuthorizationPolicy production/api-access: spec.rules[0].to[0].operation.methods[0]: \"get\" never matches: methods are case-sensitive and requests use upper case (\"GET\")")),
        "{logs}"
    );
    assert!(
        warnings.iter().any(|w| w.ends_with("values.yaml:1: warning: Helm values: skipped `pilot`: meshward reads only the mesh settings (meshConfig)")),
        "{logs}"
    );
}
