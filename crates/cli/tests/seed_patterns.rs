//! The seed articles' resources, in the shape the articles write them,
//! through real `meshward proxy` processes: PeerAuthentication at mesh,
//! namespace, workload and port level (seeds 000 and 001), and seed 002's
//! workload-level STRICT with a DestinationRule `ISTIO_MUTUAL` by short
//! host. (The shop's AuthorizationPolicies are in `e2e_mesh.rs`,
//! RequestAuthentication in `request_authentication.rs`, DestinationRule
//! `SIMPLE`/`MUTUAL` to external hosts in `destination_tls.rs`, `DISABLE`
//! and the rule lookup in `destination_rules.rs`.)

mod support;

use std::net::SocketAddr;

use support::*;

fn workload(ns: &str, name: &str, ports: &str, annotations: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata:\n  name: {name}\n  namespace: {ns}\n  annotations: {{{annotations}}}\nspec:\n  address: 127.0.0.1\n  labels: {{app: {name}}}\n  serviceAccount: {name}\n  ports: {{{ports}}}\n---\n"
    )
}

fn service(ns: &str, name: &str, ports: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  hosts: [{name}.{ns}.svc.cluster.local]\n  ports: [{ports}]\n  workloadSelector: {{labels: {{app: {name}}}}}\n---\n"
    )
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_authentication_at_every_level_as_the_seeds_write_it() {
    let mesh = Mesh::new();
    let (pay_app, old_app, api_app) = (
        App::start("payments").await,
        App::start("legacy").await,
        App::start("api").await,
    );
    let mysql_app = Echo::start().await;
    let (pay, old, mysql) = (free_port(), free_port(), free_port());
    let (api, api_metrics, api_health, out) = (free_port(), free_port(), free_port(), free_port());
    let app = |name: &str, a: &App| {
        format!(
            "meshward.io/app-ports: \"{name}=127.0.0.1:{}\"",
            a.addr.port()
        )
    };
    let mut c = String::new();
    c += &workload(
        "payments",
        "pay",
        &format!("http: {pay}"),
        &app("http", &pay_app),
    );
    c += &workload(
        "legacy",
        "old",
        &format!("http: {old}"),
        &app("http", &old_app),
    );
    c += &workload(
        "data",
        "mysql",
        &format!("tcp-mysql: {mysql}"),
        &format!(
            "meshward.io/app-ports: \"tcp-mysql=127.0.0.1:{}\"",
            mysql_app.addr.port()
        ),
    );
    c += &workload(
        "production",
        "api-service",
        &format!("http: {api}, http-metrics: {api_metrics}, http-health: {api_health}"),
        &format!(
            "meshward.io/app-ports: \"http=127.0.0.1:{p}, http-metrics=127.0.0.1:{p}, http-health=127.0.0.1:{p}\"",
            p = api_app.addr.port()
        ),
    );
    c += &workload(
        "production",
        "frontend",
        "",
        &format!("meshward.io/outbound: \"127.0.0.1:{out}\""),
    );
    c += &service("legacy", "old", "{number: 80, name: http, protocol: HTTP}");
    c += &service(
        "production",
        "api-service",
        "{number: 80, name: http, protocol: HTTP}",
    );
    // Seed 000 and 001, as written (only the port numbers are the test's).
    c += &format!(
        r#"# Mesh-wide STRICT
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata:
  name: default
  namespace: istio-system
spec:
  mtls:
    mode: STRICT
---
# Namespace level
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: default
  namespace: payments
spec:
  mtls:
    mode: STRICT
---
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata:
  name: default
  namespace: legacy
spec:
  mtls:
    mode: PERMISSIVE
---
# Workload level
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: mysql-permissive
  namespace: data
spec:
  selector:
    matchLabels:
      app: mysql
  mtls:
    mode: PERMISSIVE # MySQL clients outside the mesh need plaintext access
---
# Port level
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: api-service
  namespace: production
spec:
  selector:
    matchLabels:
      app: api-service
  mtls:
    mode: STRICT
  portLevelMtls:
    {api}:
      mode: STRICT # Application traffic
    {api_metrics}:
      mode: PERMISSIVE # Prometheus scrape port
    {api_health}:
      mode: DISABLE # Health check port
"#
    );
    mesh.write_config("mesh.yaml", &c);
    let mut proxies = Vec::new();
    for (w, ns, name) in [
        ("payments/pay", "payments", "pay"),
        ("legacy/old", "legacy", "old"),
        ("data/mysql", "data", "mysql"),
        ("production/api-service", "production", "api-service"),
        ("production/frontend", "production", "frontend"),
    ] {
        proxies.push(mesh.proxy(w, &mesh.issue(name, ns, name)).await);
    }

    // Plaintext from outside the mesh, straight to each inbound port.
    assert_eq!(
        get(local(pay), "pay", "/", &[]).await,
        None,
        "namespace STRICT (payments) refuses plaintext"
    );
    assert_eq!(
        get(local(old), "old", "/", &[]).await,
        Some((200, "legacy".into())),
        "namespace PERMISSIVE (legacy) overrides the mesh's STRICT"
    );
    assert_eq!(
        tcp_roundtrip(local(mysql), b"mysql handshake").await,
        Ok(b"mysql handshake".to_vec()),
        "workload PERMISSIVE (data/mysql) overrides the mesh's STRICT"
    );
    assert_eq!(
        get(local(api), "api", "/", &[]).await,
        None,
        "port STRICT refuses plaintext"
    );
    assert_eq!(
        get(local(api_metrics), "api", "/metrics", &[]).await,
        Some((200, "api".into())),
        "port PERMISSIVE accepts plaintext"
    );
    assert_eq!(
        get(local(api_health), "api", "/healthz", &[]).await,
        Some((200, "api".into())),
        "port DISABLE accepts plaintext"
    );

    // A meshed client reaches the STRICT port and the PERMISSIVE
    // namespace over mTLS.
    assert_eq!(
        get(
            local(out),
            "api-service.production.svc.cluster.local",
            "/",
            &[]
        )
        .await,
        Some((200, "api".into()))
    );
    assert_eq!(
        get(local(out), "old.legacy.svc.cluster.local", "/", &[]).await,
        Some((200, "legacy".into()))
    );
    let front = &proxies[4];
    for host in [
        "api-service.production.svc.cluster.local",
        "old.legacy.svc.cluster.local",
    ] {
        let line = front
            .log_line(&format!("the call to {host}"), |l| l["dst.service"] == host)
            .await;
        assert_eq!(line["tls.mode"], "mutual_tls", "{line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_002_istio_mutual_by_short_host_reaches_a_strict_workload() {
    let mesh = Mesh::new();
    let reviews_app = App::start("reviews").await;
    let (reviews, out) = (free_port(), free_port());
    let mut c = String::new();
    // Callers are told reviews has no sidecar (so auto-mTLS would send
    // plaintext), but it runs one, with STRICT mTLS.
    c += &workload(
        "default",
        "reviews",
        &format!("http: {reviews}"),
        &format!(
            "meshward.io/proxy: \"false\", meshward.io/app-ports: \"http=127.0.0.1:{}\"",
            reviews_app.addr.port()
        ),
    );
    c += &workload(
        "default",
        "productpage",
        "",
        &format!("meshward.io/outbound: \"127.0.0.1:{out}\""),
    );
    c += &service(
        "default",
        "reviews",
        "{number: 9080, name: http, protocol: HTTP}",
    );
    c += r#"apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata:
  name: foo-peer-policy
  namespace: default
spec:
  selector:
    matchLabels:
      app: reviews
  mtls:
    mode: STRICT
"#;
    mesh.write_config("mesh.yaml", &c);
    let _reviews = mesh
        .proxy(
            "default/reviews",
            &mesh.issue("reviews", "default", "reviews"),
        )
        .await;
    let page = mesh
        .proxy(
            "default/productpage",
            &mesh.issue("productpage", "default", "productpage"),
        )
        .await;
    let host = "reviews.default.svc.cluster.local";
    assert_eq!(
        get(local(out), host, "/", &[]).await.map(|r| r.0),
        Some(503),
        "plaintext (auto-mTLS to a workload without a sidecar) meets STRICT"
    );
    // Seed 002's DestinationRule, as written: the short host `reviews`
    // is reviews.default.svc.cluster.local.
    mesh.apply(
        "dr.yaml",
        r#"apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata:
  name: reviews
  namespace: default
spec:
  host: reviews
  trafficPolicy:
    tls:
      mode: ISTIO_MUTUAL
"#,
        &[&page],
    )
    .await;
    assert_eq!(
        get(local(out), host, "/", &[]).await,
        Some((200, "reviews".into()))
    );
    let line = page
        .log_line("the mTLS call", |l| {
            l["dst.service"] == host && l["response_code"] == 200
        })
        .await;
    assert_eq!(line["tls.mode"], "mutual_tls");
}
