//! Live reload however the files are replaced (issue 15, items 4 and 7;
//! `docs/SECURITY.md`): a configuration directory deleted and re-created,
//! a Kubernetes volume's `..data` link swapped, the parent directory
//! replaced, a policy file emptied by a writer that truncates first, the
//! certificate directory replaced. Each through a real `meshward proxy`:
//! the change applies, a lost source is logged, counted and shown, and the
//! last good policies are enforced meanwhile.

mod support;

use std::net::SocketAddr;
use std::path::Path;

use support::*;

const ORDERS: &str = "orders.production.svc.cluster.local";

/// A DENY of requests to `paths`, in namespace `ns`.
fn deny(ns: &str, name: &str, paths: &[&str]) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  action: DENY\n  rules: [{{to: [{{operation: {{paths: {paths:?}}}}}]}}]\n"
    )
}

/// The status of `GET path` straight to the orders proxy.
async fn status(inbound: SocketAddr, path: &str) -> u16 {
    get(inbound, ORDERS, path, &[]).await.map_or(0, |(s, _)| s)
}

/// Waits until `path` gets `want`.
async fn until_status(inbound: SocketAddr, path: &str, want: u16) {
    eventually(&format!("GET {path} to get {want}"), || async move {
        (status(inbound, path).await == want).then_some(())
    })
    .await;
}

/// `/config_dump`'s `source.<which>`.
async fn source(proxy: &ProxyProcess, which: &str) -> serde_json::Value {
    let (_, body) = proxy.admin_get("/config_dump").await;
    let dump: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    dump["source"][which].clone()
}

/// Waits until `source.<which>.state` is `state`; returns the source.
async fn until_source(proxy: &ProxyProcess, which: &str, state: &str) -> serde_json::Value {
    eventually(&format!("the {which} source to be {state}"), || async {
        let s = source(proxy, which).await;
        (s["state"] == state).then_some(s)
    })
    .await
}

/// `meshward_config_source_up{source=which}` and
/// `meshward_config_source_lost_total{source=which}`.
async fn source_metrics(proxy: &ProxyProcess, which: &str) -> (f64, f64) {
    let (_, m) = proxy.admin_get("/stats/prometheus").await;
    (
        metric(&m, "meshward_config_source_up", &[("source", which)]),
        metric(
            &m,
            "meshward_config_source_lost_total",
            &[("source", which)],
        ),
    )
}

fn is_warn(e: &serde_json::Value, source: &str, message: &str) -> bool {
    e["level"] == "WARN"
        && e["fields"]["source"] == source
        && e["fields"]["message"]
            .as_str()
            .is_some_and(|m| m.contains(message))
}

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

/// Deleting the configuration directory left the proxy watching nothing:
/// no later change was ever loaded (a new DENY never enforced), while it
/// stayed ready and logged nothing above INFO. Now the loss is logged
/// (WARN), counted and shown, the last good policies stay enforced, an
/// empty re-created directory is held, and the re-created files load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_directory_deleted_and_recreated_is_loaded_again() {
    let mesh = Mesh::new();
    let app = App::start("orders").await;
    let port = free_port();
    let inbound = SocketAddr::from(([127, 0, 0, 1], port));
    mesh.write_config("workload.yaml", &orders_workload(port, app.addr));
    mesh.write_config("deny.yaml", &deny("production", "no-admin", &["/admin"]));
    let orders = mesh
        .proxy(
            "production/orders",
            &mesh.issue("orders", "production", "orders"),
        )
        .await;
    assert_eq!(status(inbound, "/admin").await, 403);
    assert_eq!(status(inbound, "/api").await, 200);
    let ok = source(&orders, "config").await;
    assert_eq!(ok["state"], "ok", "{ok}");
    assert_eq!(ok["last_load"]["version"], 1, "{ok}");
    assert_eq!(source_metrics(&orders, "config").await, (1.0, 0.0));

    std::fs::remove_dir_all(mesh.config_dir()).unwrap();
    orders
        .event("a WARN that the configuration source is lost", |e| {
            is_warn(e, "config", "configuration source lost")
        })
        .await;
    let lost = until_source(&orders, "config", "lost").await;
    assert!(
        lost["error"]
            .as_str()
            .is_some_and(|e| e.contains("No such file")),
        "{lost}"
    );
    assert_eq!(lost["last_load"]["version"], 1, "{lost}");
    assert_eq!(source_metrics(&orders, "config").await, (0.0, 1.0));
    // The last good configuration is enforced, and the proxy stays ready.
    assert_eq!(status(inbound, "/admin").await, 403);
    assert_eq!(status(inbound, "/api").await, 200);
    assert_eq!(orders.admin_get("/healthz/ready").await.0, 200);

    // Re-created empty (an `rm -rf` and `mkdir` before the files come):
    // taken for a directory being written, not for a mesh without
    // policies.
    std::fs::create_dir(mesh.config_dir()).unwrap();
    let held = until_source(&orders, "config", "held").await;
    assert!(
        held["error"]
            .as_str()
            .is_some_and(|e| e.contains("taken for a directory being written")),
        "{held}"
    );
    assert_eq!(status(inbound, "/admin").await, 403);
    assert_eq!(source_metrics(&orders, "config").await.0, 1.0);

    // The files come back, with a new DENY.
    mesh.write_config("workload.yaml", &orders_workload(port, app.addr));
    mesh.write_config(
        "deny.yaml",
        &deny("production", "no-admin", &["/admin", "/orders"]),
    );
    until_status(inbound, "/orders", 403).await;
    assert_eq!(status(inbound, "/admin").await, 403);
    assert_eq!(status(inbound, "/api").await, 200);
    let back = until_source(&orders, "config", "ok").await;
    assert!(back["last_load"]["version"].as_u64() > Some(1), "{back}");
    assert_eq!(source_metrics(&orders, "config").await, (1.0, 1.0));

    // And the directory is watched again: a later change applies.
    mesh.apply(
        "deny.yaml",
        &deny("production", "no-admin", &["/orders"]),
        &[&orders],
    )
    .await;
    assert_eq!(status(inbound, "/admin").await, 200);
    assert_eq!(status(inbound, "/orders").await, 403);
}

/// Publishes `files` into `dir` as the kubelet updates a ConfigMap or
/// Secret volume: a new timestamped directory, `..data` swapped to it by a
/// rename, each file a link through `..data`, the old directory removed.
fn publish(dir: &Path, version: &str, files: &[(&str, &str)]) {
    let data = format!("..{version}");
    for (name, text) in files {
        write(&dir.join(&data).join(name), text);
    }
    let old = std::fs::read_link(dir.join("..data")).ok();
    std::os::unix::fs::symlink(&data, dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    for (name, _) in files {
        let link = dir.join(name);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(Path::new("..data").join(name), link).unwrap();
        }
    }
    if let Some(old) = old {
        std::fs::remove_dir_all(dir.join(old)).unwrap();
    }
}

/// Kubernetes ConfigMap volumes: the configuration directory and a mesh
/// config file are `..data` link farms, swapped atomically to new
/// timestamped directories. Every swap loads, the second swap of the
/// mesh config file included (its watch used to follow the first
/// version's file, deleted by the first swap).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_volume_swaps_are_loaded() {
    let mesh = Mesh::new();
    let app = App::start("orders").await;
    let port = free_port();
    let inbound = SocketAddr::from(([127, 0, 0, 1], port));
    let workload = orders_workload(port, app.addr);
    // A DENY in `mesh-root`, which applies to every namespace only while
    // `mesh-root` is the root namespace.
    let mesh_wide = deny("mesh-root", "no-mesh-wide", &["/mesh-wide"]);
    let policies = format!(
        "{}---\n{mesh_wide}",
        deny("production", "no-admin", &["/admin"])
    );
    publish(
        &mesh.config_dir(),
        "2026_01_01_00_00_00.1",
        &[("workload.yaml", &workload), ("policies.yaml", &policies)],
    );
    let mesh_dir = mesh.path("mesh-config");
    std::fs::create_dir(&mesh_dir).unwrap();
    publish(
        &mesh_dir,
        "2026_01_01_00_00_00.1",
        &[("mesh", "rootNamespace: istio-system\n")],
    );
    let orders = mesh
        .proxy_with(
            "production/orders",
            &mesh.issue("orders", "production", "orders"),
            &["--mesh-config", mesh_dir.join("mesh").to_str().unwrap()],
        )
        .await;
    assert_eq!(status(inbound, "/admin").await, 403);
    assert_eq!(status(inbound, "/orders").await, 200);
    assert_eq!(status(inbound, "/mesh-wide").await, 200);

    // The configuration volume updated: a new DENY.
    let policies = format!(
        "{}---\n{mesh_wide}",
        deny("production", "no-admin", &["/admin", "/orders"])
    );
    publish(
        &mesh.config_dir(),
        "2026_01_01_00_01_00.2",
        &[("workload.yaml", &workload), ("policies.yaml", &policies)],
    );
    until_status(inbound, "/orders", 403).await;

    // The mesh config volume updated twice.
    publish(
        &mesh_dir,
        "2026_01_01_00_02_00.3",
        &[("mesh", "rootNamespace: mesh-root\n")],
    );
    until_status(inbound, "/mesh-wide", 403).await;
    publish(
        &mesh_dir,
        "2026_01_01_00_03_00.4",
        &[("mesh", "rootNamespace: istio-system\n")],
    );
    until_status(inbound, "/mesh-wide", 200).await;

    // And the configuration volume again.
    let policies = deny("production", "no-admin", &["/orders"]);
    publish(
        &mesh.config_dir(),
        "2026_01_01_00_04_00.5",
        &[("workload.yaml", &workload), ("policies.yaml", &policies)],
    );
    until_status(inbound, "/admin", 200).await;
    assert_eq!(status(inbound, "/orders").await, 403);
    assert_eq!(source(&orders, "config").await["state"], "ok");
}

/// The parent of a configuration directory replaced by renames (the old
/// tree moved aside, a new one moved in): the watch used to follow the
/// old tree, so the new policies were never loaded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_parent_directory_is_loaded() {
    let mesh = Mesh::new();
    let app = App::start("orders").await;
    let port = free_port();
    let inbound = SocketAddr::from(([127, 0, 0, 1], port));
    mesh.write_config("workload.yaml", &orders_workload(port, app.addr));
    let site = mesh.path("site");
    let policies = site.join("policies");
    write(
        &policies.join("deny.yaml"),
        &deny("production", "no-admin", &["/admin"]),
    );
    let orders = mesh
        .proxy_with(
            "production/orders",
            &mesh.issue("orders", "production", "orders"),
            &["--config", policies.to_str().unwrap()],
        )
        .await;
    assert_eq!(status(inbound, "/admin").await, 403);
    assert_eq!(status(inbound, "/orders").await, 200);

    let new = mesh.path("site.new");
    write(
        &new.join("policies/deny.yaml"),
        &deny("production", "no-admin", &["/admin", "/orders"]),
    );
    std::fs::rename(&site, mesh.path("site.old")).unwrap();
    std::fs::rename(&new, &site).unwrap();
    until_status(inbound, "/orders", 403).await;
    assert_eq!(status(inbound, "/admin").await, 403);

    // The old tree, now elsewhere, is not the configuration.
    write(
        &mesh.path("site.old/policies/deny.yaml"),
        &deny("production", "no-admin", &["/old-tree"]),
    );
    // The new tree is: a change there applies.
    write(
        &policies.join("deny.yaml"),
        &deny("production", "no-admin", &["/orders"]),
    );
    until_status(inbound, "/admin", 200).await;
    assert_eq!(status(inbound, "/orders").await, 403);
    assert_eq!(status(inbound, "/old-tree").await, 200);
    assert_eq!(source(&orders, "config").await["state"], "ok");
}

/// A writer that truncates a policy file, then writes it (not write and
/// rename), left it empty for a moment, and the proxy loaded that: the
/// file's DENY dropped, its requests let through. An emptied file is now
/// taken for one being written: the change waits (WARN, `held`) and the
/// policies stay; the new contents apply once written; deleting the file
/// removes its policies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_file_emptied_by_a_writer_keeps_its_policies_until_rewritten() {
    let mesh = Mesh::new();
    let app = App::start("orders").await;
    let port = free_port();
    let inbound = SocketAddr::from(([127, 0, 0, 1], port));
    mesh.write_config("workload.yaml", &orders_workload(port, app.addr));
    let file = mesh.config_dir().join("deny.yaml");
    std::fs::write(&file, deny("production", "no-admin", &["/admin"])).unwrap();
    let orders = mesh
        .proxy(
            "production/orders",
            &mesh.issue("orders", "production", "orders"),
        )
        .await;
    assert_eq!(status(inbound, "/admin").await, 403);
    let version = orders.config_version().await;

    // Truncated, and the writer pauses.
    std::fs::File::create(&file).unwrap();
    let held = orders
        .event("a WARN that the change is held", |e| {
            is_warn(e, "config", "configuration change held")
        })
        .await;
    let error = held["fields"]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("deny.yaml is empty but held 1 document(s)")
            && error.contains("deleting it removes its resources"),
        "{held}"
    );
    assert_eq!(
        until_source(&orders, "config", "held").await["error"],
        error
    );
    assert_eq!(status(inbound, "/admin").await, 403);
    assert_eq!(orders.config_version().await, version);

    // Whitespace and a comment are no more content than nothing.
    std::fs::write(&file, "  \n# being rewritten\n---\n").unwrap();
    eventually("the comment-only file held as well", || async {
        let held = orders
            .events()
            .iter()
            .filter(|e| is_warn(e, "config", "configuration change held"))
            .count();
        (held >= 2).then_some(())
    })
    .await;
    assert_eq!(status(inbound, "/admin").await, 403);
    assert_eq!(orders.admin_get("/healthz/ready").await.0, 200);

    // The writer finishes: the new contents apply.
    std::fs::write(&file, deny("production", "no-admin", &["/orders"])).unwrap();
    until_status(inbound, "/orders", 403).await;
    assert_eq!(status(inbound, "/admin").await, 200);
    until_source(&orders, "config", "ok").await;

    // Deleting the file is how its policies are removed.
    std::fs::remove_file(&file).unwrap();
    until_status(inbound, "/orders", 200).await;
    assert_eq!(source(&orders, "config").await["state"], "ok");
}

/// The workload certificate directory replaced (moved away, a new one
/// moved in): the loss is logged, counted and shown, mTLS goes on with the
/// certificate in use, a policy change still applies meanwhile (it used to
/// be refused for want of certificate files), and the new certificate is
/// loaded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_certificate_directory_is_loaded() {
    let mesh = Mesh::new();
    let app = App::start("orders").await;
    let (port, out) = (free_port(), free_port());
    let config = format!(
        "{}---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata:\n  name: frontend\n  namespace: production\n  annotations: {{meshward.io/outbound: \"127.0.0.1:{out}\"}}\nspec: {{address: 127.0.0.1, labels: {{app: frontend}}, serviceAccount: frontend}}\n---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: orders, namespace: production}}\nspec:\n  hosts: [{ORDERS}]\n  ports: [{{number: 80, name: http, protocol: HTTP, targetPort: {port}}}]\n  workloadSelector: {{labels: {{app: orders}}}}\n",
        orders_workload(port, app.addr)
    );
    mesh.write_config("mesh.yaml", &config);
    let certs = mesh.issue("orders", "production", "orders");
    let orders = mesh.proxy("production/orders", &certs).await;
    let frontend = mesh
        .proxy(
            "production/frontend",
            &mesh.issue("frontend", "production", "frontend"),
        )
        .await;
    let local = SocketAddr::from(([127, 0, 0, 1], out));
    let via_frontend = |path: &'static str| async move {
        get(local, ORDERS, path, &[]).await.map_or(0, |(s, _)| s)
    };
    assert_eq!(via_frontend("/admin").await, 200);
    let serial = || async {
        let (_, body) = orders.admin_get("/certs").await;
        let certs: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        certs["chain"]["certificates"][0]["serial"].clone()
    };
    let first = serial().await;
    assert!(first.is_string(), "{first}");

    std::fs::rename(&certs, mesh.path("certs/orders.old")).unwrap();
    orders
        .event("a WARN that the certificate source is lost", |e| {
            is_warn(e, "certs", "certificate source lost")
        })
        .await;
    until_source(&orders, "certs", "lost").await;
    assert_eq!(source_metrics(&orders, "certs").await, (0.0, 1.0));
    assert_eq!(source_metrics(&orders, "config").await, (1.0, 0.0));
    assert_eq!(via_frontend("/admin").await, 200);

    // A policy change applies meanwhile, with the certificate in use.
    mesh.apply(
        "deny.yaml",
        &deny("production", "no-admin", &["/admin"]),
        &[&orders, &frontend],
    )
    .await;
    assert_eq!(via_frontend("/admin").await, 403);
    assert_eq!(via_frontend("/api").await, 200);
    assert_eq!(serial().await, first);
    assert_eq!(source(&orders, "certs").await["state"], "lost");

    // A new directory moved in with a new certificate.
    let new = mesh.issue("orders.new", "production", "orders");
    std::fs::rename(&new, &certs).unwrap();
    let second = eventually("the new certificate to be loaded", || async {
        let s = serial().await;
        (s.is_string() && s != first).then_some(s)
    })
    .await;
    assert!(second.is_string());
    until_source(&orders, "certs", "ok").await;
    assert_eq!(source_metrics(&orders, "certs").await, (1.0, 1.0));
    orders
        .event("an INFO that the certificate source is back", |e| {
            e["level"] == "INFO" && e["fields"]["message"] == "certificate source back"
        })
        .await;
    assert_eq!(via_frontend("/api").await, 200);
    assert_eq!(via_frontend("/admin").await, 403);
}
