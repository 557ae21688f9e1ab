//! `meshward up` and the live operations, end to end with real processes:
//! the built-in example (control plane, proxies, echo applications, each
//! workload on its own 127.0.x.y) checked with `up --check`; then a running
//! mesh asked by `call`, `status`, `proxy-config`, `describe`, `mtls
//! report` and a real Prometheus scraping the proxies.
//!
//! The example's workload addresses are fixed, so the tests here take
//! turns (one mesh at a time).

mod support;

use std::net::SocketAddr;
use std::process::{Command, Output};
use std::sync::Mutex;

use meshward_test_support::process::Process;
use meshward_test_support::wait;
use support::bin;

/// One mesh of the example at a time: its addresses are fixed.
static ONE_MESH: Mutex<()> = Mutex::new(());

fn control_ports() -> (SocketAddr, SocketAddr) {
    let p = wait::free_ports(2).unwrap();
    (
        format!("127.0.0.1:{}", p[0]).parse().unwrap(),
        format!("127.0.0.1:{}", p[1]).parse().unwrap(),
    )
}

fn up_command(grpc: SocketAddr, admin: SocketAddr, extra: &[&str]) -> Command {
    let mut cmd = Command::new(bin());
    cmd.arg("up")
        .args(["--control-listen", &grpc.to_string()])
        .args(["--control-admin", &admin.to_string()])
        .args(extra);
    cmd
}

fn text(out: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn up_check_runs_the_built_in_example_and_every_call_gets_its_result() {
    let _one = ONE_MESH.lock().unwrap_or_else(|e| e.into_inner());
    let (grpc, admin) = control_ports();
    let out = up_command(grpc, admin, &["--check"]).output().unwrap();
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    // The table: every workload with its identity, ports and modes.
    for row in [
        "production/orders",
        "spiffe://cluster.local/ns/production/sa/orders",
        "8080/http PERMISSIVE",
        "spiffe://cluster.local/ns/production/sa/payment-service",
        "9090/http-metrics PERMISSIVE",
        "development/dev-tools",
        "127.0.1.1:15001",
    ] {
        assert!(stdout.contains(row), "missing {row:?}:\n{all}");
    }
    let payment = stdout
        .lines()
        .find(|l| l.starts_with("production/payment-service"))
        .unwrap();
    assert!(payment.contains("8080/http STRICT"), "{payment}");
    let legacy = stdout
        .lines()
        .find(|l| l.starts_with("legacy/billing"))
        .unwrap();
    assert!(legacy.contains("(no proxy)"), "{legacy}");
    // The calls, each as expected.
    assert!(!stdout.contains("FAIL"), "{all}");
    assert!(
        stdout.contains("ALLOW by production/frontend-to-product-catalog, mutual_tls"),
        "{all}"
    );
    assert!(
        stdout.contains("DENY by production/deny-development"),
        "{all}"
    );
    assert!(stdout.contains("got the expected result"), "{all}");
    // Everything it started has stopped: the addresses are free again.
    for addr in ["127.0.1.5:8080", "127.0.1.5:15000", "127.0.4.1:8080"] {
        std::net::TcpListener::bind(addr).unwrap_or_else(|e| panic!("{addr} still taken: {e}"));
    }
    std::net::TcpListener::bind(admin).expect("the control plane stopped");
}

#[test]
fn up_check_fails_when_a_call_does_not_get_its_result() {
    let _one = ONE_MESH.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let calls = dir.path().join("calls.yaml");
    // The development client is denied; expecting an allow must fail.
    std::fs::write(
        &calls,
        "calls:\n- from: development/dev-tools\n  url: http://product-catalog.production.svc.cluster.local:8080/api/v1/products\n  expect: {status: 200, decision: allow}\n",
    )
    .unwrap();
    let (grpc, admin) = control_ports();
    let out = up_command(
        grpc,
        admin,
        &["--check", "--calls", calls.to_str().unwrap()],
    )
    .output()
    .unwrap();
    let all = text(&out);
    assert_eq!(out.status.code(), Some(1), "{all}");
    assert!(
        all.contains("FAIL meshward call development/dev-tools"),
        "{all}"
    );
    assert!(all.contains("status 403, expected 200"), "{all}");
    assert!(all.contains("decision deny, expected allow"), "{all}");
}

#[test]
fn up_refuses_a_directory_it_cannot_run_and_says_why() {
    let _one = ONE_MESH.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("w.yaml"),
        "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: a, namespace: x}\nspec: {address: 10.1.2.3, ports: {http: 8080}}\n---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: b, namespace: x}\nspec: {address: 127.0.9.1, ports: {http: 8080}}\n---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: c, namespace: x}\nspec: {address: 127.0.9.1, ports: {http: 8081}}\n",
    )
    .unwrap();
    let (grpc, admin) = control_ports();
    let out = up_command(grpc, admin, &[dir.path().to_str().unwrap(), "--check"])
        .output()
        .unwrap();
    let all = text(&out);
    assert_eq!(out.status.code(), Some(2), "{all}");
    assert!(
        all.contains("WorkloadEntry x/a: address 10.1.2.3 is not a loopback address"),
        "{all}"
    );
    assert!(
        all.contains("WorkloadEntries x/b and x/c share the address 127.0.9.1"),
        "{all}"
    );
    // Nothing was started.
    std::net::TcpListener::bind(admin).expect("no control plane");
}

/// `meshward ARGS --control-admin ADMIN`: its output.
fn live(admin: SocketAddr, args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .args(["--control-admin", &admin.to_string()])
        .output()
        .unwrap()
}

fn live_ok(admin: SocketAddr, args: &[&str]) -> String {
    let out = live(admin, args);
    assert!(out.status.success(), "meshward {args:?}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

const CATALOG: &str = "http://product-catalog.production.svc.cluster.local:8080/api/v1/products";
const ORDERS: &str = "http://orders.production.svc.cluster.local:8080/api/v1/orders/7";
const PAYMENTS: &str = "http://payment-service.production.svc.cluster.local:8080/api/v1/payments";
const MYSQL: &str = "tcp://mysql.production.svc.cluster.local:3306";

#[test]
fn live_operations_on_a_running_mesh() {
    let _one = ONE_MESH.lock().unwrap_or_else(|e| e.into_inner());
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(live_operations());
}

async fn live_operations() {
    let state = tempfile::tempdir().unwrap();
    let (grpc, admin) = control_ports();
    let mut up = Process::spawn_captured(
        "meshward up",
        up_command(grpc, admin, &["--state", state.path().to_str().unwrap()]),
    )
    .unwrap();
    let limit = wait::patience() * 3;
    wait::within(limit, || {
        let ready = up.stdout().contains("The mesh runs until Ctrl-C");
        async move { ready.then_some(()) }
    })
    .await
    .unwrap_or_else(|| panic!("the mesh did not come up:\n{}", up.logs()));

    // call: allowed over mTLS, denied by a DENY policy, a plaintext caller
    // without a proxy allowed by address, and refused by STRICT.
    let out = live_ok(admin, &["call", "production/frontend", CATALOG]);
    assert!(out.contains("HTTP 200 OK"), "{out}");
    assert!(
        out.contains("\"workload\":\"production/product-catalog\""),
        "{out}"
    );
    assert!(
        out.contains("decision: ALLOW by production/frontend-to-product-catalog (rule 0), recorded by production/product-catalog"),
        "{out}"
    );
    assert!(
        out.contains("source:      spiffe://cluster.local/ns/production/sa/frontend"),
        "{out}"
    );
    assert!(out.contains("tls:         mutual_tls"), "{out}");
    let out = live_ok(admin, &["call", "dev-tools", CATALOG]);
    assert!(out.contains("HTTP 403 Forbidden"), "{out}");
    assert!(out.contains("RBAC: access denied"), "{out}");
    assert!(
        out.contains("decision: DENY by production/deny-development"),
        "{out}"
    );
    let out = live_ok(admin, &["call", "legacy/billing", ORDERS]);
    assert!(out.contains("HTTP 200 OK"), "{out}");
    assert!(
        out.contains("decision: ALLOW by production/billing-reads-orders"),
        "{out}"
    );
    assert!(
        out.contains("source:      none (plaintext) (127.0.4.1:"),
        "{out}"
    );
    assert!(out.contains("tls:         none"), "{out}");
    let refused = live(admin, &["call", "legacy/billing", "-X", "POST", PAYMENTS]);
    let out = text(&refused);
    assert_eq!(refused.status.code(), Some(1), "{out}");
    assert!(out.contains("no response: "), "{out}");
    assert!(out.contains("decision: DENY"), "{out}");
    let out = live_ok(admin, &["call", "legacy/billing", MYSQL, "-d", "SELECT 1;"]);
    assert!(out.contains("SELECT 1;"), "{out}");
    assert!(
        out.contains("decision: ALLOW by production/mysql-clients"),
        "{out}"
    );
    let json: serde_json::Value = serde_json::from_str(&live_ok(
        admin,
        &[
            "call",
            "payment-service",
            "-X",
            "POST",
            "http://orders.production.svc.cluster.local:8080/api/v1/orders/new",
            "-d",
            "{}",
            "-o",
            "json",
        ],
    ))
    .unwrap();
    assert_eq!(json["response"]["status"], 200, "{json}");
    assert_eq!(json["decision"], "allow", "{json}");
    assert_eq!(json["policy"], "production/payment-to-orders", "{json}");
    assert_eq!(json["tls"], "mutual_tls", "{json}");

    // status: every proxy connected, in sync, with its certificate's expiry.
    let out = live_ok(admin, &["status"]);
    for w in [
        "production/frontend",
        "production/orders",
        "production/mysql",
        "development/dev-tools",
        "monitoring/scraper",
    ] {
        let row = out
            .lines()
            .find(|l| l.starts_with(w))
            .unwrap_or_else(|| panic!("no row for {w}:\n{out}"));
        assert!(row.contains(" yes ") && row.contains("SYNCED"), "{row}");
        assert!(row.contains("T") && row.contains("Z ("), "no expiry: {row}");
    }
    assert!(
        !out.contains("legacy/billing"),
        "a workload without a proxy has no status:\n{out}"
    );

    // proxy-config secret -o json through jq, base64 and openssl, as in the
    // seed article.
    let pipeline = format!(
        "'{}' proxy-config secret production/orders -o json --control-admin {admin} | jq -r '.dynamicActiveSecrets[0].secret.tlsCertificate.certificateChain.inlineBytes' | base64 -d | openssl x509 -text -noout",
        bin().display()
    );
    let out = Command::new("sh").args(["-c", &pipeline]).output().unwrap();
    let cert = text(&out);
    assert!(out.status.success(), "{cert}");
    assert!(
        cert.contains("URI:spiffe://cluster.local/ns/production/sa/orders"),
        "{cert}"
    );
    let roots = format!(
        "'{}' proxy-config secret production/orders -o json --control-admin {admin} | jq -r '.dynamicActiveSecrets[] | select(.name == \"ROOTCA\") | .secret.validationContext.trustedCa.inlineBytes' | base64 -d | openssl x509 -noout -subject",
        bin().display()
    );
    let out = Command::new("sh").args(["-c", &roots]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let secret = live_ok(admin, &["proxy-config", "secret", "production/orders"]);
    assert!(
        secret.contains("default") && secret.contains("Cert Chain") && secret.contains("ROOTCA"),
        "{secret}"
    );
    let listeners = live_ok(
        admin,
        &["proxy-config", "listeners", "production/payment-service"],
    );
    assert!(
        listeners.contains("127.0.1.4:8080") && listeners.contains("STRICT"),
        "{listeners}"
    );
    assert!(
        listeners.contains("127.0.1.4:9090") && listeners.contains("PERMISSIVE"),
        "{listeners}"
    );
    let endpoints = live_ok(admin, &["proxy-config", "endpoints", "production/frontend"]);
    assert!(
        endpoints.contains("127.0.1.2:8080") && endpoints.contains("ISTIO_MUTUAL (auto)"),
        "{endpoints}"
    );
    assert!(
        endpoints.contains("127.0.4.1:8080") && endpoints.contains("DISABLE (auto: no proxy)"),
        "{endpoints}"
    );
    let authz = live_ok(admin, &["proxy-config", "authz", "production/orders"]);
    assert!(
        authz.contains("production/payment-to-orders")
            && authz.contains("production/deny-development"),
        "{authz}"
    );

    // describe asks the running proxy.
    let out = live_ok(admin, &["describe", "production/orders"]);
    assert!(out.contains("its running proxy"), "{out}");
    assert!(
        out.contains(
            "port 8080 (http): PERMISSIVE (namespace PeerAuthentication production/default)"
        ),
        "{out}"
    );
    assert!(out.contains("DENY   production/deny-development"), "{out}");

    // The migration report names the plaintext callers and what STRICT in
    // production would refuse.
    let out = live_ok(admin, &["mtls", "report", "--if-strict", "production"]);
    assert!(
        out.contains("legacy/billing -> production/orders:8080"),
        "{out}"
    );
    assert!(
        out.contains("legacy/billing -> production/orders:8080: WOULD BE REFUSED"),
        "{out}"
    );
    assert!(out.contains("legacy/billing -> production/mysql:3306: kept: PERMISSIVE by workload PeerAuthentication production/mysql-permissive"), "{out}");
    assert!(
        out.contains("legacy/billing -> production/payment-service:8080: refused already"),
        "{out}"
    );
    assert!(
        out.contains("legacy/billing: runs without a proxy"),
        "{out}"
    );
    let json: serde_json::Value = serde_json::from_str(&live_ok(
        admin,
        &["mtls", "report", "--since", "10m", "-o", "json"],
    ))
    .unwrap();
    let flows = json["flows"].as_array().unwrap();
    assert!(
        flows
            .iter()
            .any(|f| f["source"]["name"] == "production/frontend"
                && f["destination"] == "production/product-catalog"
                && f["mtls"]["requests"].as_u64() >= Some(1)),
        "{json}"
    );

    // analyze --live: the example passes; a mistake written into the
    // running mesh's directory is found once the control plane serves it.
    let out = live(admin, &["analyze", "--live"]);
    assert!(out.status.success(), "{}", text(&out));
    std::fs::write(
        state.path().join("config/typo.yaml"),
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: ordres-reads, namespace: production}\nspec:\n  selector: {matchLabels: {app: ordres}}\n  rules: [{from: [{source: {principals: [cluster.local/ns/production/sa/frontend]}}]}]\n",
    )
    .unwrap();
    let found = wait::within(wait::patience(), || {
        let out = live(
            admin,
            &["analyze", "--live", "--failure-threshold", "Warning"],
        );
        async move {
            (out.status.code() == Some(79))
                .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
        }
    })
    .await
    .expect("analyze --live never found the planted mistake");
    assert!(
        found.contains("[IST0127] (AuthorizationPolicy production/ordres-reads"),
        "{found}"
    );
    std::fs::remove_file(state.path().join("config/typo.yaml")).unwrap();

    // The seed's Prometheus query, on metrics a real Prometheus scraped.
    prometheus_names_the_plaintext_caller(state.path()).await;

    // Ctrl-C stops the mesh and every process it started.
    let sent = Command::new("kill")
        .args(["-INT", &up.pid().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let status = wait::within(wait::patience(), || {
        let done = up.exited();
        async move { done }
    })
    .await
    .unwrap_or_else(|| panic!("meshward up did not stop:\n{}", up.logs()));
    assert!(status.success(), "{}", up.logs());
    for addr in ["127.0.1.5:8080", "127.0.1.5:15000", "127.0.4.1:8080"] {
        std::net::TcpListener::bind(addr).unwrap_or_else(|e| panic!("{addr} still taken: {e}"));
    }
}

/// Runs Prometheus against every proxy's metrics port and evaluates
/// `sum(istio_tcp_connections_opened_total{connection_security_policy="none"}) by (source_workload, destination_workload)`.
async fn prometheus_names_the_plaintext_caller(dir: &std::path::Path) {
    let prometheus = which("prometheus").expect(
        "prometheus is not installed (apt-get install prometheus; scripts/dev.sh setup installs it)",
    );
    let targets: Vec<String> = [
        "127.0.1.1",
        "127.0.1.2",
        "127.0.1.3",
        "127.0.1.4",
        "127.0.1.5",
        "127.0.1.6",
        "127.0.2.1",
        "127.0.3.1",
    ]
    .iter()
    .map(|a| format!("'{a}:15020'"))
    .collect();
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global: {{scrape_interval: 1s}}\nscrape_configs:\n- job_name: meshward\n  metrics_path: /stats/prometheus\n  static_configs: [{{targets: [{}]}}]\n",
            targets.join(", ")
        ),
    )
    .unwrap();
    let port = wait::free_port();
    let mut cmd = Command::new(prometheus);
    cmd.arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("tsdb").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"));
    let prom = Process::spawn_captured("prometheus", cmd).unwrap();
    let query = "sum(istio_tcp_connections_opened_total{connection_security_policy=\"none\"}) by (source_workload, destination_workload)";
    let url = format!(
        "/api/v1/query?query={}",
        meshward_ops::admin::query_value(query)
    );
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let result = wait::within(wait::patience() * 2, || {
        let url = url.clone();
        async move {
            let v = meshward_ops::admin::get_json(meshward_ops::admin::Side::Proxy, addr, &url)
                .await
                .ok()?;
            let series = v["data"]["result"].as_array()?.clone();
            // Each proxy is scraped on its own: wait for the mysql one,
            // not just any series naming billing.
            series
                .iter()
                .any(|s| {
                    s["metric"]["source_workload"] == "billing"
                        && s["metric"]["destination_workload"] == "mysql"
                })
                .then_some(series)
        }
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "Prometheus never named the plaintext caller:\n{}",
            prom.logs()
        )
    });
    assert!(
        result
            .iter()
            .any(|s| s["metric"]["source_workload"] == "billing"
                && s["metric"]["destination_workload"] == "mysql"),
        "{result:?}"
    );
}

fn which(name: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    })
}
