//! End to end: `meshward control` issues every proxy its identity and
//! pushes its configuration; real processes on 127.0.0.1 (issue 17).
//! A payment-service proxy calls orders through its outbound listener;
//! the mesh is STRICT and only payment-service may call orders.

mod support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use support::control::{CaDir, ControlMesh, ControlProcess, Traffic, serving_serial};
use support::*;

const ORDERS: &str = "orders.production.svc.cluster.local";

struct Shop {
    cm: ControlMesh,
    /// The orders application (kept running for the test).
    _app: App,
    outbound: u16,
}

/// Writes the shop's workloads and policies.
async fn shop(ca: CaDir) -> Shop {
    let cm = ControlMesh::new(ca);
    let app = App::start("orders").await;
    let outbound = free_port();
    let orders_port = free_port();
    let mut yaml = WorkloadEntry::new("production", "orders")
        .app_ports(&[("http", app.addr)])
        .port("http", orders_port)
        .yaml();
    yaml += &WorkloadEntry::new("production", "payment-service")
        .outbound(outbound)
        .yaml();
    yaml += &mesh::service_entry(
        "production",
        "orders",
        "orders",
        &format!("{{number: {orders_port}, name: http, protocol: HTTP}}"),
    );
    yaml += &mesh::mesh_strict();
    yaml += &mesh::authorization_policy("production", "deny-all", "{}");
    yaml += &mesh::allow_from(
        "production",
        "payment-to-orders",
        "orders",
        "cluster.local/ns/production/sa/payment-service",
        None,
    );
    cm.mesh.write_config("mesh.yaml", &yaml);
    Shop {
        cm,
        _app: app,
        outbound,
    }
}

impl Shop {
    fn via(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.outbound))
    }

    async fn pair(&self, controls: &[&ControlProcess]) -> (ProxyProcess, ProxyProcess) {
        let orders = self.cm.proxy(controls, "production/orders", "orders").await;
        let payment = self
            .cm
            .proxy(controls, "production/payment-service", "payment-service")
            .await;
        (orders, payment)
    }

    /// Writes `deny.yaml`: a DENY of path `/locked`.
    fn deny_locked(&self) {
        self.cm.mesh.write_config(
            "deny.yaml",
            &mesh::authorization_policy(
                "production",
                "deny-locked",
                "  action: DENY\n  rules:\n  - to: [{operation: {paths: [\"/locked\"]}}]\n",
            ),
        );
    }

    async fn call(&self, path: &str) -> u16 {
        get(self.via(), ORDERS, path, &[])
            .await
            .map(|r| r.0)
            .unwrap_or(0)
    }
}

/// The configuration version each proxy has applied.
async fn applied(proxies: &[&ProxyProcess]) -> Vec<u64> {
    let mut v = Vec::new();
    for p in proxies {
        v.push(p.config_version().await);
    }
    v
}

/// Waits until every proxy has applied a newer version than `before`.
async fn newer_than(proxies: &[&ProxyProcess], before: Vec<u64>) {
    for (p, v) in proxies.iter().zip(before) {
        eventually(&format!("the change to reach {}", p.name), || async {
            (p.config_version().await > v).then_some(())
        })
        .await;
    }
}

/// How many proxies are connected to `control`.
async fn connected(control: &ControlProcess) -> usize {
    control
        .connections()
        .await
        .iter()
        .filter(|p| p["connected"] == true)
        .count()
}

/// What `/certs` says of the certificate a proxy serves.
async fn certs(p: &ProxyProcess) -> serde_json::Value {
    serde_json::from_str(&p.admin_get("/certs").await.1).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_get_their_identity_and_config_from_the_control_plane() {
    let shop = shop(CaDir::State).await;
    let control = shop.cm.control(None).await;
    let (orders, payment) = shop.pair(&[&control]).await;

    // Identities issued by the control plane's CA, for the token's account.
    for (p, sa) in [(&orders, "orders"), (&payment, "payment-service")] {
        let c = certs(p).await;
        assert_eq!(
            c["identity"],
            format!("spiffe://cluster.local/ns/production/sa/{sa}"),
            "{c:#}"
        );
        assert_eq!(c["roots"].as_array().map(Vec::len), Some(1), "{c:#}");
    }
    let root_pem = std::fs::read_to_string(shop.cm.root_cert()).unwrap();
    assert!(root_pem.contains("BEGIN CERTIFICATE"));

    // mTLS between them, decided by the pushed policies.
    assert_eq!(shop.call("/api/v1/orders/1").await, 200);
    let line = orders
        .log_line("the allowed request", |l| l["path"] == "/api/v1/orders/1")
        .await;
    assert_eq!(
        line["src.identity"], "spiffe://cluster.local/ns/production/sa/payment-service",
        "{line}"
    );
    assert_eq!(line["tls.mode"], "mutual_tls", "{line}");

    // The proxy exports its certificate's expiry as Istio's agent does.
    let (_, metrics) = get(payment.metrics, "m", "/stats/prometheus", &[])
        .await
        .unwrap();
    let left = metric(&metrics, "istio_agent_cert_expiry_seconds", &[]);
    assert!(left > 3600.0 && left <= 86400.0, "{left}");

    // A policy written to the directory is enforced by every proxy within 1 s.
    let before = applied(&[&orders, &payment]).await;
    let deny = mesh::authorization_policy(
        "production",
        "deny-writes",
        "  action: DENY\n  rules:\n  - to: [{operation: {paths: [\"/api/v1/orders/locked\"]}}]\n",
    );
    let written = Instant::now();
    shop.cm.mesh.write_config("deny.yaml", &deny);
    newer_than(&[&orders, &payment], before).await;
    let took = written.elapsed();
    assert!(took <= Duration::from_secs(1), "took {took:?}");
    assert_eq!(shop.call("/api/v1/orders/locked").await, 403);
    assert_eq!(shop.call("/api/v1/orders/2").await, 200);

    // The control plane knows both proxies and the version each ACKed.
    let conns = eventually("both proxies to ACK", || async {
        let c = control.connections().await;
        (c.len() == 2
            && c.iter().all(|p| {
                p["connected"] == true && !p["version_acked"].as_str().unwrap_or("").is_empty()
            }))
        .then_some(c)
    })
    .await;
    assert!(conns.iter().all(|p| p["last_nack"].is_null()), "{conns:?}");

    // An invalid change is refused whole: every proxy stays on the last
    // good version, which keeps being enforced.
    let versions = applied(&[&orders, &payment]).await;
    shop.cm.mesh.write_config(
        "broken.yaml",
        &mesh::authorization_policy("production", "broken", "  action: MAYBE\n"),
    );
    eventually("the control plane to refuse the change", || async {
        (metric(
            &control.metrics().await,
            "meshward_config_rejected_total",
            &[],
        ) >= 1.0)
            .then_some(())
    })
    .await;
    assert!(
        control.logs().contains("broken.yaml:"),
        "the refusal names the file and line:\n{}",
        control.logs()
    );
    assert_eq!(applied(&[&orders, &payment]).await, versions);
    assert_eq!(shop.call("/api/v1/orders/locked").await, 403);
    assert_eq!(shop.call("/api/v1/orders/3").await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_for_one_account_obtains_no_other_workload() {
    let shop = shop(CaDir::State).await;
    let control = shop.cm.control(None).await;
    // A token for payment-service used to run orders: the certificate is
    // payment-service's, and the control plane refuses to push it orders'
    // configuration.
    let token = shop.cm.token("production", "payment-service");
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut cmd = std::process::Command::new(bin());
    cmd.args(["proxy", "--control", &control.grpc.to_string()])
        .args(["--workload", "production/orders"])
        .args(["--token-file", token.to_str().unwrap()])
        .args(["--root-cert", shop.cm.root_cert().to_str().unwrap()])
        .args(["--admin", &admin.to_string()]);
    let proxy = meshward_test_support::Process::spawn_captured("impostor", cmd).unwrap();
    eventually("the control plane to refuse the subscription", || async {
        let logs = proxy.logs();
        (logs.contains("PermissionDenied") || logs.contains("permission denied")).then_some(())
    })
    .await;
    let (status, _) = get(admin, "admin", "/healthz/ready", &[])
        .await
        .unwrap_or((0, String::new()));
    assert_ne!(status, 200, "an impostor must never become ready");
    assert!(
        control
            .connections()
            .await
            .iter()
            .all(|p| p["workload"] != "production/orders")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_lived_certificates_rotate_under_traffic() {
    let mut shop = shop(CaDir::State).await;
    shop.cm.cert_ttl = Some("10s");
    let control = shop.cm.control(None).await;
    let (orders, payment) = shop.pair(&[&control]).await;
    let traffic = Traffic::start(shop.via(), ORDERS, "/api/v1/orders/1");
    let mut serials = [BTreeSet::new(), BTreeSet::new()];
    let end = Instant::now() + Duration::from_secs(60);
    while Instant::now() < end {
        for (p, seen) in [&orders, &payment].into_iter().zip(serials.iter_mut()) {
            if let Some(s) = serving_serial(p).await {
                seen.insert(s);
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (ok, failed, errors) = traffic.stop().await;
    assert_eq!(failed, 0, "{failed} of {} failed: {errors:?}", ok + failed);
    assert!(ok > 100, "{ok}");
    for (name, seen) in ["orders", "payment"].iter().zip(&serials) {
        assert!(
            seen.len() >= 4,
            "{name} served {} serials: {seen:?}",
            seen.len()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_ride_out_a_control_plane_outage_and_resync() {
    let shop = shop(CaDir::State).await;
    let mut control = shop.cm.control(None).await;
    let grpc = control.grpc;
    let (orders, payment) = shop.pair(&[&control]).await;
    let traffic = Traffic::start(shop.via(), ORDERS, "/api/v1/orders/1");
    control.terminate();
    drop(control);
    // A change made while no control plane runs reaches nobody yet.
    let versions = applied(&[&orders, &payment]).await;
    shop.deny_locked();
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(applied(&[&orders, &payment]).await, versions);
    let control = shop.cm.control(Some(grpc)).await;
    eventually("both proxies to resync", || async {
        (connected(&control).await == 2).then_some(())
    })
    .await;
    eventually(
        "the change made during the outage to be enforced",
        || async { (shop.call("/locked").await == 403).then_some(()) },
    )
    .await;
    let (ok, failed, errors) = traffic.stop().await;
    assert_eq!(failed, 0, "{failed} of {} failed: {errors:?}", ok + failed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_one_killed() {
    let shop = shop(CaDir::PlugIn).await;
    let mut a = shop.cm.control(None).await;
    let b = shop.cm.control(None).await;
    let (orders, payment) = shop.pair(&[&a, &b]).await;
    let traffic = Traffic::start(shop.via(), ORDERS, "/api/v1/orders/1");
    a.terminate();
    drop(a);
    eventually(
        "both proxies to be connected to the surviving replica",
        || async { (connected(&b).await == 2).then_some(()) },
    )
    .await;
    let versions = applied(&[&orders, &payment]).await;
    shop.deny_locked();
    newer_than(&[&orders, &payment], versions).await;
    assert_eq!(shop.call("/locked").await, 403);
    let (ok, failed, errors) = traffic.stop().await;
    assert_eq!(failed, 0, "{failed} of {} failed: {errors:?}", ok + failed);
}

/// The serial of the first certificate of a PEM file (`meshward cert inspect --json`).
fn serial_of(pem: &std::path::Path) -> String {
    let out = stdout_of(&["cert", "inspect", pem.to_str().unwrap(), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["certificates"][0]["serial"].as_str().unwrap().to_string()
}

/// Replaces `to` with `content` in one rename, as an operator's tooling
/// should (the control plane also refuses a half-updated set).
fn replace(to: &std::path::Path, content: &[u8]) {
    let tmp = to.with_extension("tmp");
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, to).unwrap();
}

/// docs/ROOT-ROTATION.md, step by step, under traffic: add the new root,
/// switch signing to an intermediate under it, let every certificate
/// rotate, retire the old root. No request fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_rotation_under_traffic() {
    let mut shop = shop(CaDir::PlugIn).await;
    shop.cm.cert_ttl = Some("10s");
    let control = shop.cm.control(None).await;
    let (orders, payment) = shop.pair(&[&control]).await;
    let traffic = Traffic::start(shop.via(), ORDERS, "/api/v1/orders/1");
    let ca = shop.cm.path("ca");
    let new = shop.cm.path("new-root");
    run_ok(&["ca", "init", "--out", new.to_str().unwrap()]);
    let old_root = std::fs::read(ca.join("root-cert.pem")).unwrap();
    let new_root = std::fs::read(new.join("root-cert.pem")).unwrap();
    let new_root_serial = serial_of(&new.join("root-cert.pem"));
    let new_intermediate = serial_of(&new.join("ca-cert.pem"));
    let roots_of = |c: &serde_json::Value| -> Vec<String> {
        c["roots"]
            .as_array()
            .map(|r| {
                r.iter()
                    .filter_map(|c| c["serial"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };

    // 1. Trust both roots; wait until every proxy has the bundle.
    replace(
        &ca.join("root-cert.pem"),
        &[old_root.clone(), new_root.clone()].concat(),
    );
    for p in [&orders, &payment] {
        eventually("every proxy to trust both roots", || async {
            (roots_of(&certs(p).await).len() == 2).then_some(())
        })
        .await;
    }

    // 2. Sign with the intermediate under the new root.
    for f in ["ca-key.pem", "ca-cert.pem", "cert-chain.pem"] {
        replace(&ca.join(f), &std::fs::read(new.join(f)).unwrap());
    }

    // 3. Every proxy rotates to a certificate under the new root.
    for p in [&orders, &payment] {
        eventually(
            "every proxy to serve a certificate of the new intermediate",
            || async {
                let c = certs(p).await;
                (c["chain"]["certificates"][1]["serial"] == new_intermediate.as_str()).then_some(())
            },
        )
        .await;
    }

    // 4. Retire the old root.
    replace(&ca.join("root-cert.pem"), &new_root);
    for p in [&orders, &payment] {
        eventually("every proxy to trust only the new root", || async {
            (roots_of(&certs(p).await) == vec![new_root_serial.clone()]).then_some(())
        })
        .await;
    }
    // New connections and renewals keep working under the new root alone.
    let renewed = serving_serial(&orders).await;
    eventually("a renewal under the new root alone", || async {
        (serving_serial(&orders).await != renewed).then_some(())
    })
    .await;
    let (ok, failed, errors) = traffic.stop().await;
    assert_eq!(failed, 0, "{failed} of {} failed: {errors:?}", ok + failed);
    assert!(ok > 50, "{ok}");
}
