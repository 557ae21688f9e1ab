//! Traffic capture end to end (issue 19): unmodified programs (curl,
//! Python's http.server, a Python client) in network namespaces the test
//! creates, each workload with its own `meshward proxy --capture`, the
//! rules installed by the proxy (or by `meshward capture install`).
//!
//! Needs root (namespaces, nftables): CI runs as root; elsewhere the test
//! fails saying so.

mod support;

use std::path::Path;

use meshward_test_support::netns::{Host, Lan};
use meshward_test_support::process::Process;
use meshward_test_support::wait::eventually;
use support::{Mesh, bin};

/// A program serving HTTP on `port` in `host`'s namespace, unchanged
/// (Python's http.server), ready once it accepts connections.
async fn http_server(host: &Host, port: u16) -> Process {
    let mut cmd = host.command("python3");
    cmd.args(["-m", "http.server", &port.to_string(), "--bind", "0.0.0.0"]);
    let p = Process::spawn_captured(&format!("http.server {}:{port}", host.ns), cmd).unwrap();
    let probe = format!("http://127.0.0.1:{port}/");
    eventually(&format!("http.server on {}:{port}", host.ns), || {
        let ok = curl(host, &[&probe]).0 == 200;
        async move { ok.then_some(()) }
    })
    .await;
    p
}

/// `curl` in `host`'s namespace: (status, body); status 0 when no
/// response came.
fn curl(host: &Host, args: &[&str]) -> (u16, String) {
    let out = host.run(
        "curl",
        &[&["-s", "-m", "5", "-w", "\n%{http_code}"], args].concat(),
    );
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// A workload's proxy in its namespace, with `--capture` and whatever
/// `extra` says; ready once it says the rules are installed (or, with
/// `--capture external`, once its capture listeners are bound).
async fn proxy(mesh: &Mesh, host: &Host, workload: &str, certs: &Path, extra: &[&str]) -> Process {
    let mut cmd = host.command(bin());
    cmd.arg("proxy")
        .args(["--config", mesh.config_dir().to_str().unwrap()])
        .args(["--certs", certs.to_str().unwrap()])
        .args(["--workload", workload, "--worker-threads", "1"])
        .args(["--drain-duration", "0s"])
        .args(extra);
    let mut p = Process::spawn_captured(&format!("proxy {workload}"), cmd).unwrap();
    let external = extra.contains(&"external");
    eventually(&format!("proxy {workload} capturing"), || {
        let alive = p.check_alive();
        let err = p.stderr();
        let ready = if external {
            err.contains("\"listener\":\"outbound|capture\"")
        } else {
            err.contains("capture rules installed")
        };
        async move {
            if let Err(e) = alive {
                panic!("{e}");
            }
            ready.then_some(())
        }
    })
    .await;
    p
}

fn access_log(p: &Process) -> Vec<serde_json::Value> {
    p.stdout()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

async fn log_line(
    p: &Process,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    eventually(what, || {
        let found = access_log(p).into_iter().find(|l| pred(l));
        async move { found }
    })
    .await
}

fn nft_table(host: &Host) -> Option<String> {
    let out = host.run("nft", &["list", "table", "inet", "meshward"]);
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).to_string())
}

const CONFIG: &str = r#"apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: client
  namespace: shop
  annotations:
    traffic.sidecar.istio.io/excludeOutboundPorts: "8083"
    traffic.sidecar.istio.io/excludeOutboundIPRanges: "10.89.0.6/32"
spec:
  address: 10.89.0.2
  serviceAccount: client
  labels: {app: client}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: server
  namespace: shop
  annotations:
    traffic.sidecar.istio.io/excludeInboundPorts: "8082"
spec:
  address: 10.89.0.3
  serviceAccount: server
  labels: {app: server}
  ports: {http: 8080}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: billing
  namespace: legacy
  annotations: {meshward.io/proxy: "false"}
spec:
  address: 10.89.0.4
  serviceAccount: billing
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: server, namespace: shop}
spec:
  hosts: [server.shop.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 8080, name: http, protocol: HTTP}]
  workloadSelector: {labels: {app: server}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmodified_programs_talk_through_both_sidecars() {
    let mut lan = Lan::new("cap").expect("traffic capture tests need root");
    let client = lan.host("client", 2).unwrap();
    let server = lan.host("server", 3).unwrap();
    let legacy = lan.host("legacy", 4).unwrap();
    let outside = lan.host("outside", 5).unwrap();
    let excluded = lan.host("excluded", 6).unwrap();
    let mesh = Mesh::new();
    mesh.write_config("mesh.yaml", CONFIG);
    let client_certs = mesh.issue("client", "shop", "client");
    let server_certs = mesh.issue("server", "shop", "server");

    let _app = http_server(&server, 8080).await;
    let _other_app = http_server(&server, 8082).await;
    let _outside = http_server(&outside, 8081).await;
    let _outside_excluded_port = http_server(&outside, 8083).await;
    let _excluded = http_server(&excluded, 8081).await;
    let server_proxy = proxy(&mesh, &server, "shop/server", &server_certs, &["--capture"]).await;
    let mut client_proxy =
        proxy(&mesh, &client, "shop/client", &client_certs, &["--capture"]).await;

    // By the service's name, through both sidecars, over mTLS.
    let url = "http://server.shop.svc.cluster.local:8080/";
    let (code, _) = curl(&client, &["-H", "x-request-id: by-name", url]);
    assert_eq!(
        code,
        200,
        "{}\n{}",
        client_proxy.logs(),
        server_proxy.logs()
    );
    let dst = log_line(&server_proxy, "the server's record", |l| {
        l["request_id"] == "by-name" && l["reporter"] == "destination"
    })
    .await;
    assert_eq!(
        dst["src.identity"],
        "spiffe://cluster.local/ns/shop/sa/client"
    );
    assert_eq!(
        dst["dst.identity"],
        "spiffe://cluster.local/ns/shop/sa/server"
    );
    assert_eq!(dst["tls.mode"], "mutual_tls");
    assert_eq!(dst["dst.addr"], "10.89.0.3:8080");
    // The client's proxy made one upstream connection, not captured again.
    let src: Vec<_> = access_log(&client_proxy)
        .into_iter()
        .filter(|l| l["request_id"] == "by-name")
        .collect();
    assert_eq!(src.len(), 1, "{src:?}");
    assert_eq!(src[0]["dst.service"], "server.shop.svc.cluster.local");
    assert!(
        !client_proxy.stderr().contains("capture loop"),
        "{}",
        client_proxy.logs()
    );

    // A Python client, unchanged, by the short name (its namespace's) and
    // by the server's own address.
    for url in ["http://server:8080/", "http://10.89.0.3:8080/"] {
        let py = client.run(
            "python3",
            &[
                "-c",
                &format!("import urllib.request as u; print(u.urlopen('{url}', timeout=5).status)"),
            ],
        );
        assert_eq!(
            String::from_utf8_lossy(&py.stdout).trim(),
            "200",
            "{url}: {py:?}"
        );
    }

    // STRICT: a plaintext client without a sidecar is refused.
    let (code, _) = curl(&legacy, &["http://10.89.0.3:8080/"]);
    assert_eq!(code, 0, "plaintext reached a STRICT workload");
    log_line(&server_proxy, "the plaintext refusal", |l| {
        l["src.addr"]
            .as_str()
            .is_some_and(|a| a.starts_with("10.89.0.4:"))
            && l["decision"] == "deny"
    })
    .await;
    // An excluded inbound port is not captured: plaintext reaches it.
    assert_eq!(curl(&legacy, &["http://10.89.0.3:8082/"]).0, 200);

    // Outside the mesh: passed through (ALLOW_ANY), and recorded.
    assert_eq!(curl(&client, &["http://10.89.0.5:8081/"]).0, 200);
    let pass = log_line(&client_proxy, "the passthrough record", |l| {
        l["dst.addr"] == "10.89.0.5:8081"
    })
    .await;
    assert_eq!(pass["dst.service"], "PassthroughCluster");
    // An excluded outbound port and range bypass the proxy.
    assert_eq!(curl(&client, &["http://10.89.0.5:8083/"]).0, 200);
    assert_eq!(curl(&client, &["http://10.89.0.6:8081/"]).0, 200);
    let bypassed = access_log(&client_proxy)
        .into_iter()
        .any(|l| l["dst.addr"] == "10.89.0.5:8083" || l["dst.addr"] == "10.89.0.6:8081");
    assert!(!bypassed, "an excluded destination went through the proxy");

    // The rules go with the proxy.
    client_proxy.terminate();
    assert!(
        nft_table(&client).is_none(),
        "the rules outlived the proxy:\n{}",
        nft_table(&client).unwrap_or_default()
    );

    // REGISTRY_ONLY: the same destination is refused.
    let registry_only = mesh.path("registry-only.yaml");
    std::fs::write(
        &registry_only,
        "outboundTrafficPolicy:\n  mode: REGISTRY_ONLY\n",
    )
    .unwrap();
    let blocked = proxy(
        &mesh,
        &client,
        "shop/client",
        &client_certs,
        &[
            "--capture",
            "--mesh-config",
            registry_only.to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(curl(&client, &["http://10.89.0.5:8081/"]).0, 0);
    let hole = log_line(&blocked, "the refusal", |l| {
        l["dst.addr"] == "10.89.0.5:8081"
    })
    .await;
    assert_eq!(hole["dst.service"], "BlackHoleCluster");
    // Mesh services still work.
    assert_eq!(curl(&client, &[url]).0, 200);
}

/// A proxy that could neither mark its own sockets nor runs as the
/// exempt user would capture its own connections again: it refuses to
/// start, saying what to change. As the exempt user it passes that check
/// (and goes on to what else it needs).
#[test]
fn a_proxy_whose_traffic_would_loop_does_not_start() {
    use std::os::unix::process::CommandExt;
    let run = |uid: u32| {
        let out = std::process::Command::new(bin())
            .args(["proxy", "--capture", "--workload", "shop/client"])
            .args(["--config", "/nonexistent", "--certs", "/nonexistent"])
            .uid(uid)
            .gid(uid)
            .output()
            .expect("run meshward as another user (the test needs root)");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (ok, err) = run(65534);
    assert!(!ok);
    assert!(
        err.contains("would be captured again")
            && err.contains("CAP_NET_ADMIN")
            && err.contains("uid 1337"),
        "{err}"
    );
    let (ok, err) = run(1337);
    assert!(!ok, "started without a configuration");
    assert!(!err.contains("would be captured again"), "{err}");

    // `--capture external` where no init step installed the rules (this
    // test's own namespace has none): the application's traffic would
    // bypass the proxy, so it does not start.
    let out = std::process::Command::new(bin())
        .args([
            "proxy",
            "--capture",
            "external",
            "--workload",
            "shop/client",
        ])
        .args(["--config", "/nonexistent", "--certs", "/nonexistent"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("no capture rules in this network namespace")
            && err.contains("meshward capture install"),
        "{err}"
    );
}
