//! Which DestinationRule a real `meshward proxy` applies to its calls, as
//! Istio chooses it: the client's namespace first (seed 001's
//! `external-database` rule), `exportTo`, wildcard hosts.

mod support;

use std::net::SocketAddr;

use support::*;

/// Seed 001's rule, as the article writes it (namespace `production`,
/// plaintext to the legacy namespace's database).
const EXTERNAL_DATABASE: &str = "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: external-database
  namespace: production
spec:
  host: database.legacy.svc.cluster.local
  trafficPolicy:
    tls:
      mode: DISABLE
";

/// A client workload `ns/name` with an outbound listener on `out`.
fn client(ns: &str, name: &str, out: u16) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata:\n  name: {name}\n  namespace: {ns}\n  annotations: {{meshward.io/outbound: \"127.0.0.1:{out}\"}}\nspec: {{address: 127.0.0.1, labels: {{app: {name}}}, serviceAccount: {name}}}\n---\n"
    )
}

/// The DestinationRule `/config_dump` says applies to `host`.
async fn applied_rule(proxy: &ProxyProcess, host: &str) -> serde_json::Value {
    let (_, dump) = proxy.admin_get("/config_dump").await;
    let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
    dump["services"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["host"] == host))
        .unwrap_or_else(|| panic!("no service {host} in {dump}"))["destination_rule"]
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_in_the_clients_namespace_decides_tls_to_another_namespaces_host() {
    let mesh = Mesh::new();
    // The legacy database: declared as a mesh workload (so auto-mTLS
    // would use mTLS), but nothing terminates mTLS in front of it: only
    // plaintext reaches it, as in the article's migration story.
    let db = App::start("database").await;
    let (prod_out, dev_out) = (free_port(), free_port());
    let mut c = client("production", "frontend", prod_out);
    c += &client("development", "tester", dev_out);
    c += &format!(
        "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: database, namespace: legacy}}\nspec: {{address: 127.0.0.1, labels: {{app: database}}, serviceAccount: database, ports: {{http: {port}}}}}\n---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: database, namespace: legacy}}\nspec:\n  hosts: [database.legacy.svc.cluster.local]\n  ports: [{{number: 80, name: http, protocol: HTTP}}]\n  workloadSelector: {{labels: {{app: database}}}}\n---\n",
        port = db.addr.port()
    );
    c += EXTERNAL_DATABASE;
    mesh.write_config("mesh.yaml", &c);
    let front = mesh
        .proxy(
            "production/frontend",
            &mesh.issue("frontend", "production", "frontend"),
        )
        .await;
    let tester = mesh
        .proxy(
            "development/tester",
            &mesh.issue("tester", "development", "tester"),
        )
        .await;
    let db_host = "database.legacy.svc.cluster.local";

    // production's rule applies to production's calls: plaintext.
    let prod = SocketAddr::from(([127, 0, 0, 1], prod_out));
    assert_eq!(
        get(prod, db_host, "/orders", &[]).await,
        Some((200, "database".into()))
    );
    let line = front
        .log_line("the call to the database", |l| l["dst.service"] == db_host)
        .await;
    assert_eq!(line["tls.mode"], "none");
    assert_eq!(
        applied_rule(&front, db_host).await,
        "production/external-database"
    );

    // It is production's alone: development's calls use auto-mTLS, which a
    // plaintext database cannot answer.
    let dev = SocketAddr::from(([127, 0, 0, 1], dev_out));
    assert_eq!(
        get(dev, db_host, "/orders", &[]).await.map(|r| r.0),
        Some(503)
    );

    // A wildcard rule in the legacy namespace, exported to development
    // only, now applies to development's calls; production keeps its own
    // (the client's namespace comes first).
    let wildcard = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: legacy-plaintext, namespace: legacy}\nspec:\n  host: \"*.legacy.svc.cluster.local\"\n  exportTo: [development]\n  trafficPolicy: {tls: {mode: DISABLE}}\n";
    mesh.apply("legacy-dr.yaml", wildcard, &[&front, &tester])
        .await;
    assert_eq!(
        get(dev, db_host, "/orders", &[]).await,
        Some((200, "database".into()))
    );
    assert_eq!(
        get(prod, db_host, "/orders", &[]).await,
        Some((200, "database".into()))
    );
    assert_eq!(
        applied_rule(&tester, db_host).await,
        "legacy/legacy-plaintext"
    );
    assert_eq!(
        applied_rule(&front, db_host).await,
        "production/external-database"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_exported_elsewhere_is_unknown_to_the_client() {
    let mesh = Mesh::new();
    let app = App::start("internal").await;
    let out = free_port();
    let mut c = client("production", "frontend", out);
    c += &format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: internal, namespace: backoffice}}\nspec:\n  hosts: [internal.backoffice.svc.cluster.local]\n  exportTo: [\".\"]\n  location: MESH_EXTERNAL\n  resolution: STATIC\n  ports: [{{number: 80, name: http, protocol: HTTP, targetPort: {port}}}]\n  endpoints: [{{address: 127.0.0.1}}]\n",
        port = app.addr.port()
    );
    mesh.write_config("mesh.yaml", &c);
    let front = mesh
        .proxy(
            "production/frontend",
            &mesh.issue("frontend", "production", "frontend"),
        )
        .await;
    let local = SocketAddr::from(([127, 0, 0, 1], out));
    let host = "internal.backoffice.svc.cluster.local";
    assert_eq!(get(local, host, "/", &[]).await.map(|r| r.0), Some(404));
    assert!(app.last().is_none(), "the private service was reached");
    // Exported to production, it is reachable.
    mesh.apply(
        "mesh.yaml",
        &c.replace("exportTo: [\".\"]", "exportTo: [production]"),
        &[&front],
    )
    .await;
    assert_eq!(
        get(local, host, "/", &[]).await,
        Some((200, "internal".into()))
    );
}
