//! End to end: the seeds' shop as real `meshward proxy` processes on
//! 127.0.0.1 with in-process applications. Covers mTLS between proxies,
//! per-request authorization with 403 and the deciding policy in the access
//! log, STRICT and PERMISSIVE ports, a client certificate from another CA,
//! secure naming, auto-mTLS to a workload without a proxy, XFCC
//! replacement, Istio metrics, and live reload of policies, certificates and
//! listeners.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;

use support::*;

struct Ports {
    catalog: u16,
    orders: u16,
    orders_metrics: u16,
    cart: u16,
    out_frontend: u16,
    out_payment: u16,
    out_dev: u16,
    out_scraper: u16,
}

fn workload(ns: &str, name: &str, sa: &str, ports: &str, annotations: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata:\n  name: {name}\n  namespace: {ns}\n  annotations: {{{annotations}}}\nspec:\n  address: 127.0.0.1\n  labels: {{app: {name}}}\n  serviceAccount: {sa}\n  ports: {{{ports}}}\n---\n"
    )
}

use support::mesh::service_entry as service;

const POLICIES: &str = r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-all, namespace: production}
spec: {}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: frontend-to-product-catalog, namespace: production}
spec:
  selector: {matchLabels: {app: product-catalog}}
  rules:
  - from: [{source: {principals: ["cluster.local/ns/production/sa/frontend"]}}]
    to: [{operation: {methods: ["GET"], paths: ["/api/v1/products", "/api/v1/products/*"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: payment-to-orders, namespace: production}
spec:
  selector: {matchLabels: {app: orders}}
  rules:
  - from: [{source: {principals: ["cluster.local/ns/production/sa/payment-service"]}}]
    to: [{operation: {methods: ["GET", "POST", "PUT"], paths: ["/api/v1/orders/*"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-metrics-scraping, namespace: production}
spec:
  rules:
  - from: [{source: {namespaces: ["monitoring"]}}]
    to: [{operation: {methods: ["GET"], paths: ["/metrics"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-development, namespace: production}
spec:
  action: DENY
  rules:
  - from: [{source: {namespaces: ["development"]}}]
"#;

fn shop_config(p: &Ports, legacy: SocketAddr) -> String {
    let mut c = String::new();
    c += &workload(
        "production",
        "product-catalog",
        "product-catalog",
        &format!("http: {}", p.catalog),
        "",
    );
    c += &workload(
        "production",
        "orders",
        "orders",
        &format!("http: {}, http-metrics: {}", p.orders, p.orders_metrics),
        "",
    );
    c += &workload(
        "production",
        "cart",
        "cart",
        &format!("http: {}", p.cart),
        "",
    );
    c += &workload(
        "production",
        "frontend",
        "frontend",
        "",
        &format!("meshward.io/outbound: \"127.0.0.1:{}\"", p.out_frontend),
    );
    c += &workload(
        "production",
        "payment-service",
        "payment-service",
        "",
        &format!("meshward.io/outbound: \"127.0.0.1:{}\"", p.out_payment),
    );
    c += &workload(
        "development",
        "dev-tools",
        "dev-tools",
        "",
        &format!("meshward.io/outbound: \"127.0.0.1:{}\"", p.out_dev),
    );
    c += &workload(
        "monitoring",
        "scraper",
        "prometheus",
        "",
        &format!("meshward.io/outbound: \"127.0.0.1:{}\"", p.out_scraper),
    );
    c += &workload(
        "production",
        "legacy",
        "legacy",
        &format!("http: {}", legacy.port()),
        "meshward.io/proxy: \"false\"",
    );
    // Claims to be product-catalog but points at cart's proxy.
    c += &format!(
        "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: impostor, namespace: production}}\nspec:\n  address: 127.0.0.1\n  labels: {{app: impostor}}\n  serviceAccount: product-catalog\n  ports: {{http: {}}}\n---\n",
        p.cart
    );
    c += &service(
        "production",
        "product-catalog",
        "product-catalog",
        "{number: 8080, name: http, protocol: HTTP}",
    );
    c += &service(
        "production",
        "orders",
        "orders",
        "{number: 8080, name: http, protocol: HTTP}, {number: 9090, name: http-metrics, protocol: HTTP}",
    );
    c += &service(
        "production",
        "legacy",
        "legacy",
        "{number: 8080, name: http, protocol: HTTP}",
    );
    c += &service(
        "production",
        "cart",
        "cart",
        "{number: 8080, name: http, protocol: HTTP}",
    );
    c += &service(
        "production",
        "impostor",
        "impostor",
        "{number: 8080, name: http, protocol: HTTP}",
    );
    // The orders metrics port accepts plaintext (a Prometheus outside the mesh).
    c += &format!(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: orders-metrics, namespace: production}}\nspec:\n  selector: {{matchLabels: {{app: orders}}}}\n  portLevelMtls:\n    {}: {{mode: PERMISSIVE}}\n---\n",
        p.orders_metrics
    );
    c += &format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: prometheus-outside-mesh, namespace: production}}\nspec:\n  selector: {{matchLabels: {{app: orders}}}}\n  rules:\n  - from: [{{source: {{ipBlocks: [\"127.0.0.0/8\"]}}}}]\n    to: [{{operation: {{ports: [\"{}\"], methods: [\"GET\"], paths: [\"/metrics\"]}}}}]\n---\n",
        p.orders_metrics
    );
    c
}

fn app_ports(app: SocketAddr) -> String {
    format!("http=127.0.0.1:{}", app.port())
}

const CATALOG: &str = "product-catalog.production.svc.cluster.local";
const CATALOG_ID: &str = "spiffe://cluster.local/ns/production/sa/product-catalog";
const ORDERS: &str = "orders.production.svc.cluster.local";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shop_mesh_enforces_identity_and_policy() {
    let mesh = Mesh::new();
    let p = Ports {
        catalog: free_port(),
        orders: free_port(),
        orders_metrics: free_port(),
        cart: free_port(),
        out_frontend: free_port(),
        out_payment: free_port(),
        out_dev: free_port(),
        out_scraper: free_port(),
    };
    let catalog_app = App::start("product-catalog").await;
    let orders_app = App::start("orders").await;
    let cart_app = App::start("cart").await;
    let legacy_app = App::start("legacy").await;
    let mut config = shop_config(&p, legacy_app.addr);
    // Where each application listens.
    config = config.replace(
        "name: product-catalog\n  namespace: production\n  annotations: {}",
        &format!("name: product-catalog\n  namespace: production\n  annotations: {{meshward.io/app-ports: \"{}\"}}", app_ports(catalog_app.addr)),
    );
    config = config.replace(
        "name: orders\n  namespace: production\n  annotations: {}",
        &format!(
            "name: orders\n  namespace: production\n  annotations: {{meshward.io/app-ports: \"http=127.0.0.1:{0},http-metrics=127.0.0.1:{0}\"}}",
            orders_app.addr.port()
        ),
    );
    config = config.replace(
        "name: cart\n  namespace: production\n  annotations: {}",
        &format!(
            "name: cart\n  namespace: production\n  annotations: {{meshward.io/app-ports: \"{}\"}}",
            app_ports(cart_app.addr)
        ),
    );
    mesh.write_config("workloads.yaml", &config);
    mesh.write_config("policies.yaml", POLICIES);

    let catalog = mesh
        .proxy(
            "production/product-catalog",
            &mesh.issue("catalog", "production", "product-catalog"),
        )
        .await;
    let orders = mesh
        .proxy(
            "production/orders",
            &mesh.issue("orders", "production", "orders"),
        )
        .await;
    let _cart = mesh
        .proxy("production/cart", &mesh.issue("cart", "production", "cart"))
        .await;
    let frontend = mesh
        .proxy(
            "production/frontend",
            &mesh.issue("frontend", "production", "frontend"),
        )
        .await;
    let _payment = mesh
        .proxy(
            "production/payment-service",
            &mesh.issue("payment", "production", "payment-service"),
        )
        .await;
    let _dev = mesh
        .proxy(
            "development/dev-tools",
            &mesh.issue("dev", "development", "dev-tools"),
        )
        .await;
    let _scraper = mesh
        .proxy(
            "monitoring/scraper",
            &mesh.issue("scraper", "monitoring", "prometheus"),
        )
        .await;
    let out = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));

    // Allowed calls succeed, through mTLS between the two proxies.
    let forged = [(
        "x-forwarded-client-cert",
        "By=spiffe://evil;URI=spiffe://cluster.local/ns/production/sa/payment-service",
    )];
    assert_eq!(
        get(out(p.out_frontend), CATALOG, "/api/v1/products", &forged).await,
        Some((200, "product-catalog".into()))
    );
    assert_eq!(
        get(
            out(p.out_frontend),
            CATALOG,
            "/api/v1/products/42?fields=name",
            &[]
        )
        .await,
        Some((200, "product-catalog".into()))
    );
    let seen = catalog_app.last().unwrap();
    assert_eq!(seen.path, "/api/v1/products/42?fields=name");

    // The application sees the proxy's XFCC, never the caller's.
    let first = catalog_app.seen.lock().unwrap()[0].clone();
    let xfcc = &first.headers["x-forwarded-client-cert"];
    assert!(
        xfcc.starts_with("By=spiffe://cluster.local/ns/production/sa/product-catalog;Hash="),
        "{xfcc}"
    );
    assert!(
        xfcc.ends_with(";Subject=\"\";URI=spiffe://cluster.local/ns/production/sa/frontend"),
        "{xfcc}"
    );

    // Denied: 403 with Istio's body, and the access log says why.
    assert_eq!(
        request(
            out(p.out_frontend),
            "DELETE",
            CATALOG,
            "/api/v1/products/42",
            &[]
        )
        .await,
        Ok((403, "RBAC: access denied".into()))
    );
    assert_eq!(
        request(out(p.out_payment), "POST", ORDERS, "/api/v1/orders/7", &[]).await,
        Ok((200, "orders".into()))
    );
    assert_eq!(
        get(out(p.out_frontend), ORDERS, "/api/v1/orders/7", &[]).await,
        Some((403, "RBAC: access denied".into()))
    );
    assert_eq!(
        get(out(p.out_dev), CATALOG, "/api/v1/products", &[]).await,
        Some((403, "RBAC: access denied".into()))
    );
    let dev_line = catalog
        .log_line("the development call", |l| {
            l["src.identity"] == "spiffe://cluster.local/ns/development/sa/dev-tools"
        })
        .await;
    assert_eq!(dev_line["decision"], "deny");
    assert_eq!(dev_line["policy"], "production/deny-development");
    assert_eq!(dev_line["response_code"], 403);
    assert_eq!(dev_line["tls.mode"], "mutual_tls");
    let delete_line = catalog
        .log_line("DELETE", |l| l["method"] == "DELETE")
        .await;
    assert_eq!(delete_line["reason"], "no_allow_matched");
    assert!(
        delete_line["explanation"]
            .as_str()
            .unwrap()
            .contains("production/frontend-to-product-catalog"),
        "{delete_line}"
    );

    // STRICT: a plaintext client is refused before any HTTP is served.
    let plain = request(out(p.catalog), "GET", CATALOG, "/api/v1/products", &[]).await;
    assert!(
        plain.is_err(),
        "plaintext to a STRICT port must fail, got {plain:?}"
    );
    catalog
        .log_line("plaintext refusal", |l| l["reason"] == "plaintext_rejected")
        .await;

    // PERMISSIVE metrics port: mTLS from the monitoring namespace and
    // plaintext from outside the mesh are both accepted.
    assert_eq!(
        get(
            out(p.out_scraper),
            &format!("{ORDERS}:9090"),
            "/metrics",
            &[]
        )
        .await,
        Some((200, "orders".into()))
    );
    assert_eq!(
        get(out(p.orders_metrics), ORDERS, "/metrics", &[]).await,
        Some((200, "orders".into()))
    );
    // ...and the plaintext request carried no client certificate details.
    assert!(
        !orders_app
            .last()
            .unwrap()
            .headers
            .contains_key("x-forwarded-client-cert")
    );

    // A pooled connection to cart, verified as cart (cart denies everything).
    assert_eq!(
        get(
            out(p.out_frontend),
            "cart.production.svc.cluster.local",
            "/",
            &[]
        )
        .await,
        Some((403, "RBAC: access denied".into()))
    );
    // Secure naming: the endpoint claims product-catalog but cart answers.
    let (status, _) = get(
        out(p.out_frontend),
        "impostor.production.svc.cluster.local",
        "/",
        &[],
    )
    .await
    .unwrap();
    assert_eq!(status, 503);
    assert!(
        cart_app.seen.lock().unwrap().is_empty(),
        "the impostor must not receive the request"
    );
    let line = frontend
        .log_line("impostor call", |l| {
            l["dst.service"] == "impostor.production.svc.cluster.local"
        })
        .await;
    assert!(
        line["reason"].as_str().unwrap().contains("upstream"),
        "{line}"
    );

    // Auto-mTLS: a workload without a proxy is called in plaintext.
    assert_eq!(
        get(
            out(p.out_frontend),
            "legacy.production.svc.cluster.local",
            "/hello",
            &[]
        )
        .await,
        Some((200, "legacy".into()))
    );
    assert!(
        !legacy_app
            .last()
            .unwrap()
            .headers
            .contains_key("x-forwarded-client-cert")
    );
    let line = frontend
        .log_line("legacy call", |l| {
            l["dst.service"] == "legacy.production.svc.cluster.local"
        })
        .await;
    assert_eq!(line["tls.mode"], "none");

    // Istio metrics: connection_security_policy tells mTLS from plaintext.
    let (_, cat_metrics) = catalog.admin_get("/stats/prometheus").await;
    assert!(
        metric(
            &cat_metrics,
            "istio_requests_total",
            &[
                ("reporter", "destination"),
                ("response_code", "200"),
                ("connection_security_policy", "mutual_tls"),
                (
                    "source_principal",
                    "spiffe://cluster.local/ns/production/sa/frontend"
                )
            ]
        ) >= 2.0,
        "{cat_metrics}"
    );
    assert!(
        metric(
            &cat_metrics,
            "istio_requests_total",
            &[("response_code", "403")]
        ) >= 2.0
    );
    let (_, ord_metrics) = orders.admin_get("/stats/prometheus").await;
    assert!(
        metric(
            &ord_metrics,
            "istio_requests_total",
            &[
                ("connection_security_policy", "none"),
                ("response_code", "200")
            ]
        ) >= 1.0,
        "{ord_metrics}"
    );
    assert!(
        metric(
            &ord_metrics,
            "istio_requests_total",
            &[
                ("connection_security_policy", "mutual_tls"),
                (
                    "source_principal",
                    "spiffe://cluster.local/ns/monitoring/sa/prometheus"
                )
            ]
        ) >= 1.0
    );
    let (_, front_metrics) = frontend.admin_get("/stats/prometheus").await;
    assert!(
        metric(
            &front_metrics,
            "istio_requests_total",
            &[
                ("reporter", "source"),
                ("destination_service_name", "legacy"),
                ("connection_security_policy", "none")
            ]
        ) >= 1.0,
        "{front_metrics}"
    );

    // Admin endpoints: the effective configuration and certificates.
    let (_, dump) = catalog.admin_get("/config_dump").await;
    let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
    assert_eq!(dump["identity"], CATALOG_ID);
    assert_eq!(dump["inbound"][0]["port"], p.catalog);
    assert_eq!(dump["inbound"][0]["mtls_mode"], "STRICT");
    let names: Vec<&str> = dump["authorization_policies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"frontend-to-product-catalog") && names.contains(&"deny-development"),
        "{names:?}"
    );
    let (_, listeners) = catalog.admin_get("/listeners").await;
    assert!(
        listeners.contains(&format!("127.0.0.1:{}", p.catalog)),
        "{listeners}"
    );
    let (_, certs) = catalog.admin_get("/certs").await;
    let certs: serde_json::Value = serde_json::from_str(&certs).unwrap();
    assert_eq!(certs["identity"], CATALOG_ID);
    assert_eq!(certs["chain"]["verification"]["status"], "valid");
    // The metrics port serves metrics only.
    let (status, body) = get(catalog.metrics, "metrics", "/stats/prometheus", &[])
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert!(body.contains("istio_requests_total"));
    assert_eq!(
        get(catalog.metrics, "metrics", "/config_dump", &[])
            .await
            .map(|r| r.0),
        Some(404)
    );

    // A client certificate from another CA is refused.
    run_ok(&[
        "ca",
        "init",
        "--out",
        mesh.path("other-ca").to_str().unwrap(),
    ]);
    let rogue = mesh.issue_from("other-ca", "rogue", "production", "frontend");
    let result = rogue_request(
        &rogue,
        &mesh.path("certs/frontend/root-cert.pem"),
        out(p.catalog),
    )
    .await;
    assert!(
        result.is_err(),
        "a certificate from another CA must be refused, got {result:?}"
    );
    eventually("the rejected handshake in the access log", || {
        let found = catalog
            .access_log()
            .iter()
            .any(|l| l["reason"] == "tls_handshake_failed");
        async move { found.then_some(()) }
    })
    .await;
}

/// An mTLS request to `addr` with the credentials in `dir`, trusting `root`.
async fn rogue_request(
    dir: &std::path::Path,
    root: &std::path::Path,
    addr: SocketAddr,
) -> Result<(u16, String), String> {
    let tls = mtls_connect(dir, root, addr, b"istio-http/1.1").await?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    send_on(&mut send, "GET", CATALOG, "/api/v1/products", &[]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_over_mtls_is_authorized_per_request() {
    use http_body_util::BodyExt;
    let mesh = Mesh::new();
    let cat_port = free_port();
    let app = App::start("product-catalog").await;
    let mut c = workload(
        "production",
        "product-catalog",
        "product-catalog",
        &format!("http: {cat_port}"),
        &format!(
            "meshward.io/app-ports: \"http=127.0.0.1:{}\"",
            app.addr.port()
        ),
    );
    c += &workload("production", "frontend", "frontend", "", "");
    mesh.write_config("workloads.yaml", &c);
    mesh.write_config("policies.yaml", POLICIES);
    let catalog = mesh
        .proxy(
            "production/product-catalog",
            &mesh.issue("catalog", "production", "product-catalog"),
        )
        .await;
    let certs = mesh.issue("frontend", "production", "frontend");
    let tls = mtls_connect(
        &certs,
        &certs.join("root-cert.pem"),
        SocketAddr::from(([127, 0, 0, 1], cat_port)),
        b"h2",
    )
    .await
    .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let mut send = h2_handshake(tls).await;
    // Two requests on one HTTP/2 connection, decided one by one.
    for (path, expected) in [("/api/v1/products", 200), ("/admin", 403)] {
        let req = http::Request::builder()
            .uri(format!("https://{CATALOG}{path}"))
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.status().as_u16(), expected, "{path}");
        let _ = resp.into_body().collect().await;
    }
    // The application got HTTP/1.1 with the Host taken from :authority.
    assert_eq!(app.last().unwrap().headers["host"], CATALOG);
    // Body sizes are recorded once each response body has gone: the
    // application's 15 bytes, the proxy's 19-byte 403.
    eventually("the body sizes of both requests", || async {
        let (_, m) = catalog.admin_get("/stats/prometheus").await;
        let sum = |name: &str, code: &str| metric(&m, name, &[("response_code", code)]);
        let done = [("200", 15.0), ("403", 19.0)].iter().all(|&(code, bytes)| {
            sum("istio_response_bytes_sum", code) == bytes
                && sum("istio_response_bytes_count", code) == 1.0
                && sum("istio_request_bytes_sum", code) == 0.0
                && sum("istio_request_bytes_count", code) == 1.0
        });
        done.then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_and_certificate_changes_apply_without_dropping_connections() {
    let mesh = Mesh::new();
    let (cat_port, out_port) = (free_port(), free_port());
    let app = App::start("product-catalog").await;
    let mut config = workload(
        "production",
        "product-catalog",
        "product-catalog",
        &format!("http: {cat_port}"),
        &format!(
            "meshward.io/app-ports: \"http=127.0.0.1:{}\"",
            app.addr.port()
        ),
    );
    config += &workload(
        "production",
        "frontend",
        "frontend",
        "",
        &format!("meshward.io/outbound: \"127.0.0.1:{out_port}\""),
    );
    config += &service(
        "production",
        "product-catalog",
        "product-catalog",
        "{number: 8080, name: http, protocol: HTTP}",
    );
    mesh.write_config("workloads.yaml", &config);
    mesh.write_config("policies.yaml", POLICIES);
    let catalog_certs = mesh.issue("catalog", "production", "product-catalog");
    let catalog = mesh
        .proxy("production/product-catalog", &catalog_certs)
        .await;
    let _frontend = mesh
        .proxy(
            "production/frontend",
            &mesh.issue("frontend", "production", "frontend"),
        )
        .await;

    let mut conn = connect(SocketAddr::from(([127, 0, 0, 1], out_port))).await;
    assert_eq!(
        send_on(&mut conn, "GET", CATALOG, "/api/v1/products", &[]).await,
        Ok((200, "product-catalog".into()))
    );

    // Rotate the server's certificate.
    let serial = |body: &str| -> String {
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        v["chain"]["certificates"][0]["serial"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    let before = serial(&catalog.admin_get("/certs").await.1);
    mesh.issue("catalog", "production", "product-catalog");
    eventually("the rotated certificate to be loaded", || async {
        let now = serial(&catalog.admin_get("/certs").await.1);
        (!now.is_empty() && now != before).then_some(())
    })
    .await;

    // Change the policy: products become read-only for nobody.
    mesh.apply(
        "policies.yaml",
        &POLICIES.replace(
            "paths: [\"/api/v1/products\", \"/api/v1/products/*\"]",
            "paths: [\"/api/v2/*\"]",
        ),
        &[&catalog],
    )
    .await;

    // Same client connection: the next request sees the new policy.
    assert_eq!(
        send_on(&mut conn, "GET", CATALOG, "/api/v1/products", &[]).await,
        Ok((403, "RBAC: access denied".into()))
    );
    assert_eq!(
        send_on(&mut conn, "GET", CATALOG, "/api/v2/items", &[]).await,
        Ok((200, "product-catalog".into()))
    );

    // An invalid change (an empty method, which Istio refuses too) is
    // refused; the proxy keeps the last good state.
    let v2 = catalog.config_version().await;
    mesh.write_config(
        "policies.yaml",
        &POLICIES.replace("methods: [\"GET\"]", "methods: [\"\"]"),
    );
    eventually("the invalid change to be refused", || async {
        let (_, m) = catalog.admin_get("/stats/prometheus").await;
        (metric(&m, "meshward_config_rejected_total", &[]) >= 1.0
            || m.contains("meshward_config_rejected_total 1"))
        .then_some(())
    })
    .await;
    assert_eq!(catalog.config_version().await, v2);
    assert_eq!(
        send_on(&mut conn, "GET", CATALOG, "/api/v2/items", &[]).await,
        Ok((200, "product-catalog".into()))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_services_and_destination_rules() {
    let mesh = Mesh::new();
    let (db_port, pay_tcp, front_tcp, out_front) =
        (free_port(), free_port(), free_port(), free_port());
    let echo = Echo::start().await;
    let app = App::start("product-catalog").await;
    let cat_port = free_port();
    let mut c = workload(
        "production",
        "orders-db",
        "orders-db",
        &format!("mongo: {db_port}"),
        &format!(
            "meshward.io/app-ports: \"mongo=127.0.0.1:{}\"",
            echo.addr.port()
        ),
    );
    c += &workload(
        "production",
        "payment-service",
        "payment-service",
        "",
        &format!(
            "meshward.io/tcp-outbound: \"127.0.0.1:{pay_tcp}=orders-db.production.svc.cluster.local:27017\""
        ),
    );
    c += &workload(
        "production",
        "frontend",
        "frontend",
        "",
        &format!(
            "meshward.io/tcp-outbound: \"127.0.0.1:{front_tcp}=orders-db.production.svc.cluster.local:27017\", meshward.io/outbound: \"127.0.0.1:{out_front}\""
        ),
    );
    c += &workload(
        "production",
        "product-catalog",
        "product-catalog",
        &format!("http: {cat_port}"),
        &format!(
            "meshward.io/app-ports: \"http=127.0.0.1:{}\"",
            app.addr.port()
        ),
    );
    c += &service(
        "production",
        "orders-db",
        "orders-db",
        "{number: 27017, name: mongo, protocol: MONGO}",
    );
    c += &service(
        "production",
        "product-catalog",
        "product-catalog",
        "{number: 8080, name: http, protocol: HTTP}",
    );
    // An application doing its own TLS on a PERMISSIVE port.
    let tls_port = free_port();
    c += &workload(
        "production",
        "tls-app",
        "tls-app",
        &format!("tcp-tls: {tls_port}"),
        &format!(
            "meshward.io/app-ports: \"tcp-tls=127.0.0.1:{}\"",
            echo.addr.port()
        ),
    );
    c += "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: tls-app, namespace: production}\nspec:\n  selector: {matchLabels: {app: tls-app}}\n  mtls: {mode: PERMISSIVE}\n---\n";
    // A DestinationRule that turns mTLS off towards the catalog: its STRICT
    // inbound then refuses the plaintext connection.
    c += "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: catalog-plaintext, namespace: production}\nspec:\n  host: product-catalog.production.svc.cluster.local\n  trafficPolicy: {tls: {mode: DISABLE}}\n---\n";
    mesh.write_config("workloads.yaml", &c);
    mesh.write_config(
        "policies.yaml",
        &format!(
            "{}{}",
            mesh::mesh_strict(),
            r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: mongodb-policy, namespace: production}
spec:
  selector: {matchLabels: {app: orders-db}}
  rules:
  - from: [{source: {principals: ["cluster.local/ns/production/sa/payment-service"]}}]
    to: [{operation: {ports: ["DBPORT"]}}]
  # An HTTP-only rule never allows TCP traffic.
  - from: [{source: {principals: ["cluster.local/ns/production/sa/frontend"]}}]
    to: [{operation: {methods: ["GET"]}}]
"#
            .replace("DBPORT", &db_port.to_string())
        ),
    );
    let db = mesh
        .proxy(
            "production/orders-db",
            &mesh.issue("db", "production", "orders-db"),
        )
        .await;
    let _pay = mesh
        .proxy(
            "production/payment-service",
            &mesh.issue("pay", "production", "payment-service"),
        )
        .await;
    let front = mesh
        .proxy(
            "production/frontend",
            &mesh.issue("front", "production", "frontend"),
        )
        .await;
    let _cat = mesh
        .proxy(
            "production/product-catalog",
            &mesh.issue("cat", "production", "product-catalog"),
        )
        .await;
    let local = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));

    // Allowed: bytes flow both ways through mTLS.
    assert_eq!(
        tcp_roundtrip(local(pay_tcp), b"ping from payment").await,
        Ok(b"ping from payment".to_vec())
    );
    // Denied: the connection is closed, nothing reaches the database.
    let denied = tcp_roundtrip(local(front_tcp), b"ping from frontend").await;
    assert!(
        denied.is_err(),
        "frontend must be refused on TCP, got {denied:?}"
    );
    let allowed = db
        .log_line("allowed TCP", |l| {
            l["kind"] == "tcp" && l["decision"] == "allow"
        })
        .await;
    assert_eq!(
        allowed["src.identity"],
        "spiffe://cluster.local/ns/production/sa/payment-service"
    );
    assert_eq!(allowed["bytes_received"], 17);
    assert_eq!(allowed["policy"], "production/mongodb-policy");
    let refused = db
        .log_line("denied TCP", |l| {
            l["kind"] == "tcp" && l["decision"] == "deny"
        })
        .await;
    assert_eq!(
        refused["src.identity"],
        "spiffe://cluster.local/ns/production/sa/frontend"
    );
    let (_, m) = db.admin_get("/stats/prometheus").await;
    assert!(
        metric(
            &m,
            "istio_tcp_connections_opened_total",
            &[("connection_security_policy", "mutual_tls")]
        ) >= 2.0,
        "{m}"
    );
    assert!(
        metric(
            &m,
            "istio_tcp_received_bytes_total",
            &[(
                "source_principal",
                "spiffe://cluster.local/ns/production/sa/payment-service"
            )]
        ) >= 17.0
    );

    // A policy change closes open TCP connections it no longer allows.
    let mut long_lived = tokio::net::TcpStream::connect(local(pay_tcp))
        .await
        .unwrap();
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        long_lived.write_all(b"hello").await.unwrap();
        let mut buf = [0u8; 5];
        long_lived.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hello");
        let policies = std::fs::read_to_string(mesh.config_dir().join("policies.yaml")).unwrap();
        mesh.apply(
            "policies.yaml",
            &policies.replace("sa/payment-service", "sa/someone-else"),
            &[&db],
        )
        .await;
        let mut rest = Vec::new();
        let read = tokio::time::timeout(patience(), long_lived.read_to_end(&mut rest)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "the connection must be closed, got {read:?}"
        );
        db.tcp_log_line("closed by the policy change", "policy_changed")
            .await;
    }

    // PERMISSIVE passes TLS that is not mesh mTLS (no istio ALPN) through
    // untouched: the echo application returns the very ClientHello bytes.
    let _tls_app = mesh
        .proxy(
            "production/tls-app",
            &mesh.issue("tls-app", "production", "tls-app"),
        )
        .await;
    let hello = client_hello_bytes();
    assert_eq!(
        tcp_roundtrip(local(tls_port), &hello).await,
        Ok(hello.clone())
    );

    // DestinationRule DISABLE: the frontend sends plaintext, STRICT refuses it.
    let (status, _) = get(local(out_front), CATALOG, "/", &[]).await.unwrap();
    assert_eq!(status, 503);
    let line = front
        .log_line("catalog call", |l| l["dst.service"] == CATALOG)
        .await;
    assert_eq!(line["tls.mode"], "none");
}

/// A real TLS ClientHello (ALPN h2, no mesh ALPN), as raw bytes.
fn client_hello_bytes() -> Vec<u8> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(std::iter::empty());
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let mut conn =
        rustls::ClientConnection::new(Arc::new(config), "app.example.com".try_into().unwrap())
            .unwrap();
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).unwrap();
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_flows_over_http2_end_to_end_with_trailers() {
    use http_body_util::BodyExt;
    let mesh = Mesh::new();
    let (grpc_port, out) = (free_port(), free_port());
    // The echo application answers gRPC calls: a message, then trailers
    // with `grpc-status`.
    let grpc = App::start_grpc().await;
    let app = grpc.addr;
    let mut c = workload(
        "production",
        "product-catalog",
        "product-catalog",
        &format!("grpc-api: {grpc_port}"),
        &format!(
            "meshward.io/app-ports: \"grpc-api=127.0.0.1:{}\"",
            app.port()
        ),
    );
    c += &workload(
        "production",
        "frontend",
        "frontend",
        "",
        &format!("meshward.io/outbound: \"127.0.0.1:{out}\""),
    );
    c += &service(
        "production",
        "product-catalog",
        "product-catalog",
        "{number: 9090, name: grpc-api, protocol: GRPC}",
    );
    c += "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: grpc, namespace: production}\nspec:\n  selector: {matchLabels: {app: product-catalog}}\n  rules:\n  - from: [{source: {principals: [\"cluster.local/ns/production/sa/frontend\"]}}]\n    to: [{operation: {methods: [\"POST\"], paths: [\"/shop.Catalog/*\"]}}]\n---\n";
    mesh.write_config("mesh.yaml", &c);
    let catalog = mesh
        .proxy(
            "production/product-catalog",
            &mesh.issue("catalog", "production", "product-catalog"),
        )
        .await;
    let frontend = mesh
        .proxy(
            "production/frontend",
            &mesh.issue("frontend", "production", "frontend"),
        )
        .await;

    // The application (a gRPC client) speaks cleartext HTTP/2 to its proxy.
    let tcp = tokio::net::TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], out)))
        .await
        .unwrap();
    let mut send = h2_handshake(tcp).await;
    let call = |path: &'static str| {
        http::Request::builder()
            .method("POST")
            .uri(format!(
                "http://product-catalog.production.svc.cluster.local:9090{path}"
            ))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(http_body_util::Full::new(bytes::Bytes::from_static(
                b"\0\0\0\0\0",
            )))
            .unwrap()
    };
    let resp = send.send_request(call("/shop.Catalog/List")).await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let body = resp.into_body().collect().await.unwrap();
    assert_eq!(
        body.trailers()
            .and_then(|t| t.get("grpc-status"))
            .map(|v| v.to_str().unwrap()),
        Some("0"),
        "trailers cross both proxies"
    );
    assert_eq!(body.to_bytes().as_ref(), b"\0\0\0\0\x02hi");
    assert_eq!(
        grpc.seen
            .lock()
            .unwrap()
            .iter()
            .map(|s| format!("{:?} {}", s.version, s.path))
            .collect::<Vec<_>>(),
        ["HTTP/2.0 /shop.Catalog/List"],
        "the application got HTTP/2"
    );
    // Authorization still applies per call.
    let resp = send.send_request(call("/admin.Admin/Drop")).await.unwrap();
    assert_eq!(resp.status().as_u16(), 403);
    let line = frontend
        .log_line("the gRPC call", |l| l["path"] == "/shop.Catalog/List")
        .await;
    assert_eq!(line["tls.mode"], "mutual_tls");
    // The call's body sizes on both sides: a 5-byte request message, a
    // 7-byte response message (trailers are not body); one message each
    // way, under `request_protocol="grpc"` as Istio labels gRPC.
    for (proxy, reporter) in [(&frontend, "source"), (&catalog, "destination")] {
        eventually(&format!("the gRPC call's sizes ({reporter})"), || async {
            let (_, m) = proxy.admin_get("/stats/prometheus").await;
            let sum = |name: &str| {
                metric(
                    &m,
                    name,
                    &[
                        ("reporter", reporter),
                        ("response_code", "200"),
                        ("request_protocol", "grpc"),
                    ],
                )
            };
            (sum("istio_request_bytes_sum") == 5.0
                && sum("istio_response_bytes_sum") == 7.0
                && sum("istio_response_bytes_count") == 1.0
                && sum("istio_request_messages_total") == 1.0
                && sum("istio_response_messages_total") == 1.0)
                .then_some(())
        })
        .await;
    }
}

/// The listeners follow the configuration, as Envoy's follow LDS: a change
/// that adds a port or a TCP service starts listening on it, one that
/// removes one stops accepting there while the connections it accepted
/// go on, and a listener that cannot be bound does not hold back the rest
/// of the change and is bound at a later change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listeners_follow_configuration_changes() {
    let mesh = Mesh::new();
    let echo = Echo::start().await;
    let (db_port, db_port2) = (free_port(), free_port());
    let (tcp_a, tcp_b, tcp_c, tcp_d) = (free_port(), free_port(), free_port(), free_port());
    let local = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
    // orders-db with its second port or without; payment-service's local
    // ports to orders-db's service ports.
    let config = |second_port: bool, outbound: &[(u16, u16)]| {
        let app = echo.addr.port();
        let (mut ports, mut app_ports) = (
            format!("mongo: {db_port}"),
            format!("mongo=127.0.0.1:{app}"),
        );
        if second_port {
            ports += &format!(", mongo-2: {db_port2}");
            app_ports += &format!(",mongo-2=127.0.0.1:{app}");
        }
        let outbound: Vec<String> = outbound
            .iter()
            .map(|(local, port)| {
                format!("127.0.0.1:{local}=orders-db.production.svc.cluster.local:{port}")
            })
            .collect();
        let mut c = workload(
            "production",
            "orders-db",
            "orders-db",
            &ports,
            &format!("meshward.io/app-ports: \"{app_ports}\""),
        );
        c += &workload(
            "production",
            "payment-service",
            "payment-service",
            "",
            &format!("meshward.io/tcp-outbound: \"{}\"", outbound.join(",")),
        );
        c += &service(
            "production",
            "orders-db",
            "orders-db",
            "{number: 27017, name: mongo, protocol: MONGO}, {number: 27018, name: mongo-2, protocol: MONGO}",
        );
        c
    };
    mesh.write_config("workloads.yaml", &config(false, &[(tcp_a, 27017)]));
    mesh.write_config(
        "policies.yaml",
        &format!(
            "{}{}",
            mesh::mesh_strict(),
            r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: payment-to-db, namespace: production}
spec:
  selector: {matchLabels: {app: orders-db}}
  rules:
  - from: [{source: {principals: ["cluster.local/ns/production/sa/payment-service"]}}]
"#
        ),
    );
    let db = mesh
        .proxy(
            "production/orders-db",
            &mesh.issue("db", "production", "orders-db"),
        )
        .await;
    // Like every test proxy, one worker thread: a current-thread runtime,
    // which the reload thread waits on when it closes a listener.
    let pay = mesh
        .proxy(
            "production/payment-service",
            &mesh.issue("pay", "production", "payment-service"),
        )
        .await;
    assert_eq!(
        tcp_roundtrip(local(tcp_a), b"before").await,
        Ok(b"before".to_vec())
    );
    let mut long_lived = tokio::net::TcpStream::connect(local(tcp_a)).await.unwrap();
    assert_eq!(
        echoes(&mut long_lived, b"hello").await,
        Ok(b"hello".to_vec())
    );

    // One change: orders-db gets a second port, payment-service reaches it
    // through a new local port, and its first local port goes away.
    // The listeners follow the configuration version just after it.
    mesh.apply(
        "workloads.yaml",
        &config(true, &[(tcp_b, 27018)]),
        &[&db, &pay],
    )
    .await;
    let body = listeners_once(&db, "the new inbound port", |b| {
        listener_at(b, local(db_port2)).is_some()
    })
    .await;
    let found = listener_at(&body, local(db_port2));
    assert_eq!(
        found.as_ref().map(|l| l["name"].clone()),
        Some(serde_json::json!(format!("inbound|{db_port2}|mongo-2"))),
        "{body}"
    );
    let body = listeners_once(&pay, "the local port moved", |b| {
        listener_at(b, local(tcp_a)).is_none() && listener_at(b, local(tcp_b)).is_some()
    })
    .await;
    assert!(listener_at(&body, local(tcp_a)).is_none(), "{body}");
    assert_eq!(
        listener_at(&body, local(tcp_b)).map(|l| l["name"].clone()),
        Some(serde_json::json!(
            "outbound|tcp|orders-db.production.svc.cluster.local:27018"
        )),
        "{body}"
    );
    // The new path works, over mTLS, to the new port.
    assert_eq!(
        tcp_roundtrip(local(tcp_b), b"to the second port").await,
        Ok(b"to the second port".to_vec())
    );
    let line = db
        .log_line("a connection on the new port", |l| {
            l["kind"] == "tcp" && l["dst.addr"] == local(db_port2).to_string()
        })
        .await;
    assert_eq!(line["decision"], "allow");
    assert_eq!(line["tls.mode"], "mutual_tls");
    // The new port is STRICT like the others: plaintext is refused.
    assert!(tcp_roundtrip(local(db_port2), b"plaintext").await.is_err());
    // The removed listener accepts nothing new, but what it accepted goes on.
    assert!(tokio::net::TcpStream::connect(local(tcp_a)).await.is_err());
    assert_eq!(
        echoes(&mut long_lived, b"still here").await,
        Ok(b"still here".to_vec())
    );

    // A port taken by someone else: that listener is reported, the rest of
    // the change (another new listener) applies.
    let squatter = std::net::TcpListener::bind(local(tcp_c)).unwrap();
    let three = config(true, &[(tcp_b, 27018), (tcp_c, 27017), (tcp_d, 27017)]);
    mesh.apply("workloads.yaml", &three, &[&pay]).await;
    let body = listeners_once(&pay, "the taken port to be reported", |b| {
        listener_at(b, local(tcp_c)).is_some() && listener_at(b, local(tcp_d)).is_some()
    })
    .await;
    let failed = listener_at(&body, local(tcp_c)).unwrap();
    assert!(
        failed["error"]
            .as_str()
            .is_some_and(|e| e.contains("in use")),
        "{body}"
    );
    assert_eq!(
        tcp_roundtrip(local(tcp_d), b"via d").await,
        Ok(b"via d".to_vec())
    );
    assert!(
        pay.logs().contains("listener not added"),
        "the bind error must be logged: {}",
        pay.logs()
    );
    // Once the port is free, the next change binds it.
    drop(squatter);
    mesh.apply("workloads.yaml", &three, &[&pay]).await;
    let body = listeners_once(&pay, "the freed port to be bound", |b| {
        listener_at(b, local(tcp_c)).is_some_and(|l| l.get("error").is_none())
    })
    .await;
    let bound = listener_at(&body, local(tcp_c)).unwrap();
    assert!(bound.get("error").is_none(), "{body}");
    assert_eq!(
        tcp_roundtrip(local(tcp_c), b"via c").await,
        Ok(b"via c".to_vec())
    );
}

/// `proxy`'s `/listeners` once `ready` holds for it (a configuration
/// change reaches the listeners just after its version shows).
async fn listeners_once(proxy: &ProxyProcess, what: &str, ready: impl Fn(&str) -> bool) -> String {
    eventually(what, || async {
        let (_, body) = proxy.admin_get("/listeners").await;
        ready(&body).then_some(body)
    })
    .await
}

/// The entry of `/listeners` (its JSON `body`) at `addr`.
fn listener_at(body: &str, addr: SocketAddr) -> Option<serde_json::Value> {
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    v.as_array()?
        .iter()
        .find(|l| l["address"] == addr.to_string())
        .cloned()
}

/// Writes `msg` on `s` and reads as many bytes back.
async fn echoes(s: &mut tokio::net::TcpStream, msg: &[u8]) -> Result<Vec<u8>, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(msg).await.map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; msg.len()];
    s.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
    Ok(buf)
}
