//! End to end: CUSTOM AuthorizationPolicies with `envoyExtAuthzHttp`
//! providers and real `meshward proxy` processes. The provider is a real
//! HTTP server on 127.0.0.1 (a mesh service without a sidecar, so the
//! server-side proxy reaches it in plaintext under auto-mTLS); it allows a
//! request that carries `x-ext-authz: allow` and answers anything else
//! with its own 403. Checked: what the check request carries, what an
//! allowing answer adds to the request and the response, what a denying
//! one sends the client, requests no CUSTOM rule matches, a provider that
//! is down (`statusOnError`, `failOpen`) or too slow, DENY policies still
//! counting after the provider allowed, and the HTTP/2 path.

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::StreamBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use meshward_test_support::app::{Protocol, Server, serve};
use support::*;

const ORDERS: &str = "orders.production.svc.cluster.local";

/// A check request as the provider saw it.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// The provider: allows `x-ext-authz: allow` and WebSockets under `/ws/` (adding `x-user`,
/// `x-session` and `x-secret`, and naming `x-drop` for removal), takes 3 s
/// over `/check/slow/...`, fails with 503 over `/check/admin/broken`, and
/// otherwise denies with 403, a body and `x-deny-reason` / `x-other` /
/// `www-authenticate`.
async fn provider() -> (SocketAddr, Arc<Mutex<Vec<Seen>>>, Server) {
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let seen2 = Arc::clone(&seen);
    let server = serve(Protocol::Http1, move |req: http::Request<Incoming>| {
        let seen = Arc::clone(&seen2);
        async move {
            let headers: Vec<(String, String)> = req
                .headers()
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_string()))
                .collect();
            let path = req.uri().to_string();
            seen.lock().unwrap().push(Seen {
                method: req.method().to_string(),
                path: path.clone(),
                headers: headers.clone(),
            });
            if path.starts_with("/check/slow/") {
                tokio::time::sleep(Duration::from_secs(3)).await;
            }
            if path.starts_with("/check/admin/broken") {
                let resp = http::Response::builder()
                    .status(503)
                    .body(Full::new(Bytes::from("provider trouble")));
                return resp.unwrap();
            }
            let allow = path.starts_with("/check/ws/")
                || headers
                    .iter()
                    .any(|(n, v)| n == "x-ext-authz" && v == "allow");
            let resp = if allow {
                http::Response::builder()
                    .header("x-user", "alice")
                    .header("x-session", "s1")
                    .header("x-secret", "not for anyone")
                    .header("x-envoy-auth-headers-to-remove", "x-drop")
                    .body(Full::new(Bytes::new()))
            } else {
                http::Response::builder()
                    .status(403)
                    .header("x-deny-reason", "no ticket")
                    .header("x-other", "not for the client")
                    .header("www-authenticate", "Bearer realm=\"shop\"")
                    .body(Full::new(Bytes::from("denied by ext")))
            };
            resp.unwrap()
        }
    })
    .await;
    (server.addr, seen, server)
}

/// The ports the proxies listen on: orders' HTTP and TCP (`db`) ports,
/// frontend's outbound HTTP listener and its TCP outbound to orders' `db`.
struct Ports {
    orders: u16,
    orders_db: u16,
    outbound: u16,
    tcp_out: u16,
}

impl Ports {
    fn new() -> Ports {
        Ports {
            orders: free_port(),
            orders_db: free_port(),
            outbound: free_port(),
            tcp_out: free_port(),
        }
    }

    fn outbound(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.outbound))
    }
}

/// The mesh: orders (its HTTP port served by `app`, its `db` port by
/// `echo`), frontend, the providers, and the CUSTOM policy `orders-ext`
/// naming `provider` for `/admin/*`, `/slow/*`, `/ws/*` and `/grpc/*`.
fn config(
    ports: &Ports,
    (app, echo): (SocketAddr, SocketAddr),
    ext: SocketAddr,
    grpc_ext: SocketAddr,
    provider: &str,
) -> String {
    let down = free_port();
    let workload = |ns: &str, name: &str, ports: &str, annotations: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata:\n  name: {name}\n  namespace: {ns}\n  annotations: {{{annotations}}}\nspec:\n  address: 127.0.0.1\n  labels: {{app: {name}}}\n  serviceAccount: {name}\n  ports: {{{ports}}}\n---\n"
        )
    };
    let service_of = |ns: &str, name: &str, port: u16, protocol: &str| {
        let port_name = protocol.to_ascii_lowercase();
        format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  hosts: [{name}.{ns}.svc.cluster.local]\n  ports: [{{number: {port}, name: {port_name}, protocol: {protocol}}}]\n  workloadSelector: {{labels: {{app: {name}}}}}\n  resolution: STATIC\n---\n"
        )
    };
    let service = |ns: &str, name: &str, port: u16| service_of(ns, name, port, "HTTP");
    let mut c = String::new();
    c += &workload(
        "production",
        "orders",
        &format!("http: {}, db: {}", ports.orders, ports.orders_db),
        &format!(
            "meshward.io/app-ports: \"http=127.0.0.1:{},db=127.0.0.1:{}\"",
            app.port(),
            echo.port()
        ),
    );
    c += &workload(
        "production",
        "frontend",
        "",
        &format!(
            "meshward.io/outbound: \"127.0.0.1:{}\", meshward.io/tcp-outbound: \"127.0.0.1:{}=orders-db.production.svc.cluster.local:{}\"",
            ports.outbound, ports.tcp_out, ports.orders_db
        ),
    );
    c += &service("production", "orders", ports.orders);
    c += &format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: orders-db, namespace: production}}\nspec:\n  hosts: [orders-db.production.svc.cluster.local]\n  ports: [{{number: {}, name: db, protocol: TCP}}]\n  workloadSelector: {{labels: {{app: orders}}}}\n  resolution: STATIC\n---\n",
        ports.orders_db
    );
    // The providers run without a sidecar.
    c += &workload(
        "auth",
        "ext-authz",
        &format!("http: {}", ext.port()),
        "meshward.io/proxy: \"false\"",
    );
    c += &service("auth", "ext-authz", ext.port());
    c += &workload(
        "auth",
        "ext-down",
        &format!("http: {down}"),
        "meshward.io/proxy: \"false\"",
    );
    c += &service("auth", "ext-down", down);
    c += &workload(
        "auth",
        "ext-grpc",
        &format!("grpc: {}", grpc_ext.port()),
        "meshward.io/proxy: \"false\"",
    );
    c += &service_of("auth", "ext-grpc", grpc_ext.port(), "GRPC");
    c += &workload(
        "auth",
        "ext-grpc-down",
        &format!("grpc: {down}"),
        "meshward.io/proxy: \"false\"",
    );
    c += &service_of("auth", "ext-grpc-down", down, "GRPC");
    c += &format!(
        r#"apiVersion: meshward.io/v1alpha1
kind: MeshConfig
metadata: {{name: mesh, namespace: istio-system}}
spec:
  extensionProviders:
  - name: ext-http
    envoyExtAuthzHttp:
      service: ext-authz.auth.svc.cluster.local
      port: {ext_port}
      timeout: 500ms
      pathPrefix: /check
      includeRequestHeadersInCheck: [x-ext-authz, "x-auth-*"]
      includeAdditionalHeadersInCheck: {{x-from: meshward}}
      headersToUpstreamOnAllow: [x-user]
      headersToDownstreamOnAllow: [x-session]
      headersToDownstreamOnDeny: ["x-deny-*"]
  - name: ext-down
    envoyExtAuthzHttp:
      service: ext-down.auth.svc.cluster.local
      port: {down}
      statusOnError: "503"
  - name: ext-open
    envoyExtAuthzHttp:
      service: ext-down.auth.svc.cluster.local
      port: {down}
      failOpen: true
  - name: ext-grpc
    envoyExtAuthzGrpc:
      service: auth/ext-grpc.auth.svc.cluster.local
      port: {grpc_port}
      statusOnError: "502"
  - name: ext-grpc-down
    envoyExtAuthzGrpc:
      service: ext-grpc-down.auth.svc.cluster.local
      port: {down}
  - name: ext-grpc-open
    envoyExtAuthzGrpc:
      service: ext-grpc-down.auth.svc.cluster.local
      port: {down}
      failOpen: true
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: default, namespace: istio-system}}
spec: {{mtls: {{mode: STRICT}}}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: orders-ext, namespace: production}}
spec:
  selector: {{matchLabels: {{app: orders}}}}
  action: CUSTOM
  provider: {{name: {provider}}}
  rules:
  - to: [{{operation: {{paths: ["/admin/*", "/slow/*", "/ws/*", "/grpc/*"]}}}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: orders-deny, namespace: production}}
spec:
  selector: {{matchLabels: {{app: orders}}}}
  action: DENY
  rules:
  # On TCP the paths are left out; the port keeps the rule to HTTP.
  - to: [{{operation: {{ports: ["{orders_port}"], paths: ["/admin/forbidden"]}}}}]
"#,
        orders_port = ports.orders,
        ext_port = ext.port(),
        grpc_port = grpc_ext.port()
    );
    c
}

/// A response as the client saw it.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: http::HeaderMap,
    body: String,
}

async fn answer(resp: http::Response<Incoming>) -> Answer {
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Answer {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

async fn call(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Answer {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut req = http::Request::builder().uri(path).header("host", ORDERS);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = send
        .send_request(req.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap();
    answer(resp).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_policies_ask_the_external_provider() {
    let (ext, checks, _ext_task) = provider().await;
    let app = App::start("orders").await;
    let echo = Echo::start().await;
    let mesh = Mesh::new();
    let ports = Ports::new();
    let unused = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let with_provider = |p| config(&ports, (app.addr, echo.addr), ext, unused, p);
    mesh.write_config("mesh.yaml", &with_provider("ext-http"));
    let orders = mesh
        .proxy(
            "production/orders",
            &mesh.issue("orders", "production", "orders"),
        )
        .await;
    let frontend_certs = mesh.issue("frontend", "production", "frontend");
    let _frontend = mesh.proxy("production/frontend", &frontend_certs).await;
    let outbound = ports.outbound();
    let checks_made = || checks.lock().unwrap().len();

    // Allowed by the provider: its x-user replaces the client's, its
    // x-session reaches the client, nothing else of its answer goes on.
    let a = call(
        outbound,
        "/admin/report?q=1",
        &[
            ("x-ext-authz", "allow"),
            ("x-auth-token", "t0k"),
            ("cookie", "private"),
            ("x-user", "mallory"),
            ("x-drop", "gone"),
        ],
    )
    .await;
    assert_eq!(
        (a.status, a.body.as_str()),
        (200, "orders"),
        "{}",
        orders.logs()
    );
    assert_eq!(a.headers["x-session"], "s1");
    let seen = app.last().unwrap();
    assert_eq!(seen.headers["x-user"], "alice");
    assert!(!seen.headers.contains_key("x-secret"), "{seen:?}");
    assert!(!seen.headers.contains_key("x-drop"), "removed: {seen:?}");
    assert!(seen.headers.contains_key("cookie"), "{seen:?}");
    // The check request: method, prefix + path, Host, the listed headers
    // and the fixed one; nothing else of the request.
    let check = checks.lock().unwrap().last().cloned().unwrap();
    assert_eq!(check.method, "GET");
    assert_eq!(check.path, "/check/admin/report?q=1");
    assert_eq!(check.header("host"), Some(ORDERS));
    assert_eq!(check.header("x-ext-authz"), Some("allow"));
    assert_eq!(check.header("x-auth-token"), Some("t0k"));
    assert_eq!(check.header("x-from"), Some("meshward"));
    assert_eq!(check.header("cookie"), None, "{check:?}");
    assert_eq!(check.header("x-user"), None, "{check:?}");
    let line = orders
        .log_line("the allowed request", |l| l["path"] == "/admin/report?q=1")
        .await;
    assert_eq!(line["decision"], "allow", "{line}");
    assert_eq!(
        line["reason"], "no_allow_policies; ext_authz ext-http: allowed",
        "{line}"
    );

    // Denied by the provider: its answer is the client's, the application
    // never sees the request.
    let before = app.seen.lock().unwrap().len();
    let a = call(outbound, "/admin/report", &[]).await;
    assert_eq!((a.status, a.body.as_str()), (403, "denied by ext"));
    assert_eq!(a.headers["x-deny-reason"], "no ticket");
    assert!(!a.headers.contains_key("x-other"), "{:?}", a.headers);
    // Not listed, but always passed on, as Envoy does.
    assert_eq!(a.headers["www-authenticate"], "Bearer realm=\"shop\"");
    assert_eq!(app.seen.lock().unwrap().len(), before);
    let line = orders
        .log_line("the refused request", |l| {
            l["path"] == "/admin/report" && l["response_code"] == 403
        })
        .await;
    assert_eq!(line["decision"], "deny", "{line}");
    assert_eq!(line["reason"], "ext_authz ext-http: denied (403)", "{line}");
    assert_eq!(line["policy"], "production/orders-ext", "{line}");
    let (_, m) = orders.admin_get("/stats/prometheus").await;
    let refused = [("response_code", "403"), ("response_flags", "UAEX")];
    assert_eq!(metric(&m, "istio_requests_total", &refused), 1.0, "{m}");
    // Message counts are for gRPC only.
    assert!(!m.contains("istio_request_messages_total{"), "{m}");

    // A request no CUSTOM rule matches is not sent to the provider.
    let made = checks_made();
    let a = call(outbound, "/api/v1/orders/1", &[("x-ext-authz", "deny")]).await;
    assert_eq!(a.status, 200);
    assert_eq!(checks_made(), made);

    // The provider allowed, a DENY policy still denies.
    let a = call(outbound, "/admin/forbidden", &[("x-ext-authz", "allow")]).await;
    assert_eq!((a.status, a.body.as_str()), (403, "RBAC: access denied"));
    assert_eq!(checks_made(), made + 1);

    // A TCP port: an HTTP provider cannot judge a connection, so the
    // CUSTOM policy does not apply to it (as in Istio).
    let tcp_out = SocketAddr::from(([127, 0, 0, 1], ports.tcp_out));
    assert_eq!(tcp_roundtrip(tcp_out, b"ping").await.unwrap(), b"ping");
    assert_eq!(checks_made(), made + 1);

    // Too slow (timeout 500ms): the default statusOnError, 403.
    let a = call(outbound, "/slow/x", &[("x-ext-authz", "allow")]).await;
    assert_eq!((a.status, a.body.as_str()), (403, ""));
    let line = orders
        .log_line("the timed-out check", |l| l["path"] == "/slow/x")
        .await;
    assert!(
        line["reason"]
            .as_str()
            .unwrap()
            .contains("no answer within"),
        "{line}"
    );

    // A 5xx is the provider failing (as in Envoy): statusOnError, not its
    // answer.
    let a = call(outbound, "/admin/broken", &[("x-ext-authz", "allow")]).await;
    assert_eq!((a.status, a.body.as_str()), (403, ""));
    let line = orders
        .log_line("the broken provider", |l| l["path"] == "/admin/broken")
        .await;
    assert_eq!(
        line["reason"], "ext_authz ext-http: check failed: the provider answered 503",
        "{line}"
    );

    // HTTP/2 straight to the server proxy, with mTLS as the frontend.
    let tls = mtls_connect(
        &frontend_certs,
        &frontend_certs.join("root-cert.pem"),
        SocketAddr::from(([127, 0, 0, 1], ports.orders)),
        b"h2",
    )
    .await
    .unwrap();
    let mut send = h2_handshake(tls).await;
    for (ticket, status) in [("allow", 200), ("no", 403)] {
        let req = http::Request::builder()
            .uri(format!("https://{ORDERS}/admin/h2"))
            .header("x-ext-authz", ticket)
            .body(Full::new(Bytes::new()))
            .unwrap();
        let a = answer(send.send_request(req).await.unwrap()).await;
        assert_eq!(a.status, status, "{a:?}");
        if status == 200 {
            assert_eq!(a.headers["x-session"], "s1");
            assert_eq!(app.last().unwrap().headers["x-user"], "alice");
        } else {
            assert_eq!(a.body, "denied by ext");
            assert_eq!(a.headers["x-deny-reason"], "no ticket");
        }
    }
    let check = checks.lock().unwrap().last().cloned().unwrap();
    assert_eq!(check.path, "/check/admin/h2");
    assert_eq!(check.header("host"), Some(ORDERS));

    // A provider that is down: statusOnError, or through with failOpen.
    mesh.apply("mesh.yaml", &with_provider("ext-down"), &[&orders])
        .await;
    let a = call(outbound, "/admin/x", &[]).await;
    assert_eq!((a.status, a.body.as_str()), (503, ""));
    mesh.apply("mesh.yaml", &with_provider("ext-open"), &[&orders])
        .await;
    let a = call(outbound, "/admin/x", &[]).await;
    assert_eq!((a.status, a.body.as_str()), (200, "orders"));
    let line = orders
        .log_line("the failed-open check", |l| {
            l["path"] == "/admin/x" && l["response_code"] == 200
        })
        .await;
    assert_eq!(line["decision"], "allow", "{line}");
    assert!(
        line["reason"].as_str().unwrap().ends_with("(failOpen)"),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_the_provider_let_through_lives_on_until_its_rule_changes() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let (ext, _checks, _ext_task) = provider().await;
    let (app, _seen, _app_task) = websocket_app().await;
    let echo = Echo::start().await;
    let mesh = Mesh::new();
    let ports = Ports::new();
    let unused = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let base = config(&ports, (app, echo.addr), ext, unused, "ext-http");
    mesh.write_config("mesh.yaml", &base);
    let orders = mesh
        .proxy(
            "production/orders",
            &mesh.issue("orders", "production", "orders"),
        )
        .await;
    let _frontend = mesh
        .proxy(
            "production/frontend",
            &mesh.issue("frontend", "production", "frontend"),
        )
        .await;
    let outbound = ports.outbound();
    let mut chat = ws_connect_to(outbound, ORDERS, "/ws/chat").await.unwrap();
    let mut other = ws_connect_to(outbound, ORDERS, "/ws/other").await.unwrap();
    assert_eq!(ws_text(&mut chat).await, "hello /ws/chat");
    assert_eq!(ws_text(&mut other).await, "hello /ws/other");

    // A change that denies /ws/other: once that tunnel has closed, every
    // tunnel was decided again, and the one the provider let through, whose
    // CUSTOM rule still names the same provider, lives on.
    let deny_other = base.replace(
        r#"paths: ["/admin/forbidden"]"#,
        r#"paths: ["/admin/forbidden", "/ws/other"]"#,
    );
    assert_ne!(deny_other, base);
    mesh.apply("mesh.yaml", &deny_other, &[&orders]).await;
    let ended = tokio::time::timeout(patience(), other.next())
        .await
        .expect("the denied tunnel must end");
    assert!(
        !matches!(ended, Some(Ok(Message::Text(_) | Message::Binary(_)))),
        "{ended:?}"
    );
    chat.send(Message::text("still")).await.unwrap();
    assert_eq!(ws_text(&mut chat).await, "echo: still");

    // Its rule now names another provider, which never approved it: closed.
    let moved = deny_other.replace("provider: {name: ext-http}", "provider: {name: ext-down}");
    assert_ne!(moved, deny_other);
    mesh.apply("mesh.yaml", &moved, &[&orders]).await;
    let ended = tokio::time::timeout(patience(), chat.next())
        .await
        .expect("the tunnel must end");
    assert!(
        !matches!(ended, Some(Ok(Message::Text(_) | Message::Binary(_)))),
        "{ended:?}"
    );
}

/// A gRPC provider (cleartext HTTP/2): allows `x-ext-authz: allow` (setting
/// `x-user`, appending `x-tag`, removing `x-drop`, adding `x-session` to
/// the response); fails with gRPC status 14 under `/grpc/broken/`;
/// otherwise denies with a 302 to `/login`. A TCP connection (no request
/// attributes) is allowed from frontend only.
async fn grpc_provider() -> (
    SocketAddr,
    Arc<Mutex<Vec<meshward_proxy::ext_authz_proto::CheckRequest>>>,
    tokio::task::JoinHandle<()>,
) {
    use meshward_proxy::ext_authz_proto as proto;
    use prost::Message as _;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Arc<Mutex<Vec<proto::CheckRequest>>> = Arc::default();
    let seen2 = Arc::clone(&seen);
    let task = tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                return;
            };
            let seen = Arc::clone(&seen2);
            tokio::spawn(async move {
                let svc = service_fn(move |req: http::Request<Incoming>| {
                    let seen = Arc::clone(&seen);
                    async move {
                        assert_eq!(req.uri().path(), proto::CHECK_PATH);
                        assert_eq!(req.headers()["content-type"], "application/grpc");
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let check = proto::CheckRequest::decode(&body[5..]).unwrap();
                        seen.lock().unwrap().push(check.clone());
                        let attributes = check.attributes.unwrap();
                        let from_frontend = attributes
                            .source
                            .is_some_and(|s| s.principal.ends_with("/sa/frontend"));
                        let http = attributes.request.and_then(|r| r.http).unwrap_or_else(|| {
                            proto::HttpRequest {
                                path: "/tcp".into(),
                                headers: [(
                                    "x-ext-authz".to_string(),
                                    if from_frontend { "allow" } else { "no" }.to_string(),
                                )]
                                .into(),
                                ..Default::default()
                            }
                        });
                        let option =
                            |key: &str, value: &str, append: bool| proto::HeaderValueOption {
                                header: Some(proto::HeaderValue {
                                    key: key.into(),
                                    value: value.into(),
                                    raw_value: Vec::new(),
                                }),
                                append: Some(proto::BoolValue { value: append }),
                                append_action: 0,
                            };
                        let (grpc_status, answer) = if http.path.starts_with("/grpc/broken/") {
                            ("14", None)
                        } else if http.headers.get("x-ext-authz").map(String::as_str)
                            == Some("allow")
                        {
                            let ok = proto::OkHttpResponse {
                                headers: vec![
                                    option("x-user", "alice", false),
                                    option("x-tag", "from-ext", true),
                                ],
                                headers_to_remove: vec!["x-drop".into()],
                                response_headers_to_add: vec![option("x-session", "s1", false)],
                            };
                            (
                                "0",
                                Some(proto::CheckResponse {
                                    status: Some(proto::RpcStatus {
                                        code: 0,
                                        message: String::new(),
                                    }),
                                    ok_response: Some(ok),
                                    denied_response: None,
                                }),
                            )
                        } else {
                            let denied = proto::DeniedHttpResponse {
                                status: Some(proto::HttpStatus { code: 302 }),
                                headers: vec![option("location", "/login", false)],
                                body: "go login".into(),
                            };
                            (
                                "0",
                                Some(proto::CheckResponse {
                                    status: Some(proto::RpcStatus {
                                        code: 7,
                                        message: "no ticket".into(),
                                    }),
                                    ok_response: None,
                                    denied_response: Some(denied),
                                }),
                            )
                        };
                        let mut frames = Vec::new();
                        if let Some(answer) = answer {
                            let msg = answer.encode_to_vec();
                            let mut framed = vec![0u8];
                            framed.extend_from_slice(&(msg.len() as u32).to_be_bytes());
                            framed.extend_from_slice(&msg);
                            frames.push(Frame::data(Bytes::from(framed)));
                        }
                        let mut trailers = http::HeaderMap::new();
                        trailers.insert("grpc-status", grpc_status.parse().unwrap());
                        frames.push(Frame::trailers(trailers));
                        let body = StreamBody::new(futures_util::stream::iter(
                            frames.into_iter().map(Ok::<_, std::convert::Infallible>),
                        ));
                        let resp = http::Response::builder()
                            .header("content-type", "application/grpc")
                            .body(body)
                            .unwrap();
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http2::Builder::new(executor())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (addr, seen, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_provider_is_asked_with_the_requests_attributes() {
    let (ext, _checks, _ext_task) = provider().await;
    let (grpc_ext, grpc_checks, _grpc_task) = grpc_provider().await;
    let app = App::start("orders").await;
    let echo = Echo::start().await;
    let mesh = Mesh::new();
    let ports = Ports::new();
    let base = config(&ports, (app.addr, echo.addr), ext, grpc_ext, "ext-grpc");
    mesh.write_config("mesh.yaml", &base);
    let orders = mesh
        .proxy(
            "production/orders",
            &mesh.issue("orders", "production", "orders"),
        )
        .await;
    let _frontend = mesh
        .proxy(
            "production/frontend",
            &mesh.issue("frontend", "production", "frontend"),
        )
        .await;
    let outbound = ports.outbound();

    // Allowed: the answer's edits reach the application and the client.
    let a = call(
        outbound,
        "/grpc/report?q=1",
        &[
            ("x-ext-authz", "allow"),
            ("x-user", "mallory"),
            ("x-tag", "mine"),
            ("x-drop", "gone"),
        ],
    )
    .await;
    assert_eq!(
        (a.status, a.body.as_str()),
        (200, "orders"),
        "{}",
        orders.logs()
    );
    assert_eq!(a.headers["x-session"], "s1");
    let seen = app.last().unwrap();
    assert_eq!(seen.headers["x-user"], "alice");
    assert_eq!(seen.headers["x-tag"], "mine, from-ext", "appended");
    assert!(!seen.headers.contains_key("x-drop"), "{seen:?}");
    // What the provider was told.
    let check = grpc_checks.lock().unwrap().last().cloned().unwrap();
    let attrs = check.attributes.unwrap();
    assert_eq!(
        attrs.source.unwrap().principal,
        "spiffe://cluster.local/ns/production/sa/frontend"
    );
    assert_eq!(
        attrs.destination.unwrap().principal,
        "spiffe://cluster.local/ns/production/sa/orders"
    );
    let http = attrs.request.unwrap().http.unwrap();
    assert_eq!(
        (http.method.as_str(), http.path.as_str(), http.host.as_str()),
        ("GET", "/grpc/report?q=1", ORDERS)
    );
    assert_eq!(http.headers["x-drop"], "gone");

    // Denied: the answer's HTTP response is the client's.
    let a = call(outbound, "/grpc/report", &[]).await;
    assert_eq!((a.status, a.body.as_str()), (302, "go login"));
    assert_eq!(a.headers["location"], "/login");
    // A gRPC error: statusOnError.
    let a = call(outbound, "/grpc/broken/x", &[("x-ext-authz", "allow")]).await;
    assert_eq!((a.status, a.body.as_str()), (502, ""));
    let line = orders
        .log_line("the failed check", |l| l["path"] == "/grpc/broken/x")
        .await;
    assert!(
        line["reason"].as_str().unwrap().contains("gRPC status 14"),
        "{line}"
    );

    // A TCP connection: the gRPC provider is asked once, with the peers
    // and no request (Envoy's network ext_authz filter), and the CUSTOM
    // rule's HTTP-only paths are left out, as for DENY.
    let made = grpc_checks.lock().unwrap().len();
    let tcp_out = SocketAddr::from(([127, 0, 0, 1], ports.tcp_out));
    assert_eq!(tcp_roundtrip(tcp_out, b"ping").await.unwrap(), b"ping");
    let checks = grpc_checks.lock().unwrap().clone();
    assert_eq!(checks.len(), made + 1);
    let attrs = checks[made].attributes.clone().unwrap();
    assert!(attrs.request.is_none(), "{attrs:?}");
    assert_eq!(
        attrs.source.unwrap().principal,
        "spiffe://cluster.local/ns/production/sa/frontend"
    );
    let line = orders
        .log_line("the allowed connection", |l| {
            l["kind"] == "tcp" && l["decision"] == "allow"
        })
        .await;
    assert_eq!(
        line["reason"], "no_allow_policies; ext_authz ext-grpc: allowed",
        "{line}"
    );
    // Refused for another workload: closed before the application hears
    // a byte.
    let payments = mesh.issue("payments", "production", "payments");
    let db = SocketAddr::from(([127, 0, 0, 1], ports.orders_db));
    assert_eq!(
        mtls_roundtrip(&payments, db).await,
        None,
        "{}",
        orders.logs()
    );
    let line = orders
        .log_line("the refused connection", |l| {
            l["kind"] == "tcp" && l["decision"] == "deny"
        })
        .await;
    assert_eq!(line["reason"], "ext_authz ext-grpc: denied", "{line}");
    assert_eq!(line["policy"], "production/orders-ext", "{line}");
    assert_eq!(closed_with_flags(&orders, "UAEX").await, 1.0);
    assert_eq!(
        line["src.identity"], "spiffe://cluster.local/ns/production/sa/payments",
        "{line}"
    );

    // A gRPC provider that cannot be reached: the connection is closed,
    // or let through with failOpen.
    let with = |p: &str| {
        base.replace(
            "provider: {name: ext-grpc}",
            &format!("provider: {{name: {p}}}"),
        )
    };
    mesh.apply("mesh.yaml", &with("ext-grpc-down"), &[&orders])
        .await;
    assert!(tcp_roundtrip(tcp_out, b"ping").await.is_err());
    let line = orders
        .tcp_log_line(
            "the connection refused for a failed check",
            "ext_authz ext-grpc-down: check failed",
        )
        .await;
    assert_eq!(line["decision"], "deny", "{line}");
    mesh.apply("mesh.yaml", &with("ext-grpc-open"), &[&orders])
        .await;
    assert_eq!(tcp_roundtrip(tcp_out, b"ping").await.unwrap(), b"ping");
    let line = orders
        .log_line("the connection let through by failOpen", |l| {
            l["kind"] == "tcp"
                && l["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("ext-grpc-open") && r.ends_with("(failOpen)"))
        })
        .await;
    assert_eq!(line["decision"], "allow", "{line}");

    // A second CUSTOM policy naming another provider: as in Istio, the
    // workload's CUSTOM action cannot be built, and the CUSTOM rules deny
    // what they match in its place, before DENY and ALLOW; what they do
    // not match goes on. No provider is asked.
    let second = base.clone()
        + "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: orders-ext-2, namespace: production}\nspec:\n  selector: {matchLabels: {app: orders}}\n  action: CUSTOM\n  provider: {name: ext-http}\n  rules:\n  - to: [{operation: {paths: [\"/other/*\"]}}]\n";
    mesh.apply("mesh.yaml", &second, &[&orders]).await;
    let (_, dump) = orders.admin_get("/config_dump").await;
    let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
    assert_eq!(
        dump["custom_problem"],
        "only one provider can be used per workload, found \"ext-grpc\", \"ext-http\""
    );
    let made = grpc_checks.lock().unwrap().len();
    for path in ["/grpc/report", "/other/x"] {
        let a = call(outbound, path, &[("x-ext-authz", "allow")]).await;
        assert_eq!(
            (a.status, a.body.as_str()),
            (403, "RBAC: access denied"),
            "{path}"
        );
    }
    let a = call(outbound, "/api/v1/orders/1", &[("x-ext-authz", "allow")]).await;
    assert_eq!(
        (a.status, a.body.as_str()),
        (200, "orders"),
        "no CUSTOM rule matches: no ALLOW policy, allowed; {}",
        orders.logs()
    );
    // On TCP the rules' paths are left out, as in a DENY rule: the
    // connection matches.
    assert!(tcp_roundtrip(tcp_out, b"ping").await.is_err());
    assert_eq!(grpc_checks.lock().unwrap().len(), made, "no provider asked");
    let line = orders
        .log_line("the request denied for two providers", |l| {
            l["path"] == "/other/x"
        })
        .await;
    assert_eq!(line["reason"], "custom_unusable", "{line}");
    assert_eq!(line["policy"], "production/orders-ext-2", "{line}");
    assert_eq!(
        line["explanation"],
        "DENY: matched rule 0 of CUSTOM policy production/orders-ext-2, whose provider cannot be used (only one provider can be used per workload, found \"ext-grpc\", \"ext-http\")"
    );
    let line = orders
        .log_line("the request no CUSTOM rule matches", |l| {
            l["path"] == "/api/v1/orders/1" && l["decision"] == "allow"
        })
        .await;
    assert_eq!(line["reason"], "no_allow_policies", "{line}");
    // A policy denial of a connection carries no response flag, as Envoy's
    // RBAC filter sets none.
    let line = orders
        .log_line("the connection denied for two providers", |l| {
            l["kind"] == "tcp" && l["reason"] == "custom_unusable"
        })
        .await;
    assert_eq!(line["decision"], "deny", "{line}");
    assert_eq!(line["policy"], "production/orders-ext", "{line}");
    assert_eq!(
        closed_with_flags(&orders, "UAEX").await,
        2.0,
        "only the provider's refusal and the failed check"
    );
    // With the CUSTOM rules kept to the HTTP port, a connection matches
    // none of them and goes on to DENY and ALLOW (none applies).
    let http_port_only = second.replace(
        "{operation: {paths:",
        &format!("{{operation: {{ports: [\"{}\"], paths:", ports.orders),
    );
    assert_eq!(http_port_only.matches("ports: [\"").count(), 3);
    mesh.apply("mesh.yaml", &http_port_only, &[&orders]).await;
    assert_eq!(
        tcp_roundtrip(tcp_out, b"ping").await.unwrap(),
        b"ping",
        "{}",
        orders.logs()
    );
    let a = call(outbound, "/other/x", &[("x-ext-authz", "allow")]).await;
    assert_eq!((a.status, a.body.as_str()), (403, "RBAC: access denied"));
    assert_eq!(grpc_checks.lock().unwrap().len(), made, "no provider asked");
    let line = orders
        .log_line("the connection no CUSTOM rule matches", |l| {
            l["kind"] == "tcp" && l["reason"] == "no_allow_policies"
        })
        .await;
    assert_eq!(line["decision"], "allow", "{line}");
}

/// `istio_tcp_connections_closed_total` of `proxy` (destination) with
/// `response_flags`.
async fn closed_with_flags(proxy: &ProxyProcess, flags: &str) -> f64 {
    let (_, m) = proxy.admin_get("/stats/prometheus").await;
    metric(
        &m,
        "istio_tcp_connections_closed_total",
        &[("reporter", "destination"), ("response_flags", flags)],
    )
}

/// Sends `ping` over an mTLS connection with the credentials in `dir` and
/// returns what came back, or `None` when the connection was closed first.
async fn mtls_roundtrip(dir: &std::path::Path, addr: SocketAddr) -> Option<Vec<u8>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tls = mtls_connect(dir, &dir.join("root-cert.pem"), addr, b"istio")
        .await
        .ok()?;
    tls.write_all(b"ping").await.ok()?;
    let mut buf = [0u8; 4];
    match tokio::time::timeout(patience(), tls.read_exact(&mut buf)).await {
        Ok(Ok(_)) => Some(buf.to_vec()),
        Ok(Err(_)) => None,
        Err(_) => panic!("neither an answer nor a close"),
    }
}

#[test]
fn describe_says_when_custom_policies_cannot_be_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let policy = |name: &str, provider: &str| {
        format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: production}}\nspec:\n  action: CUSTOM\n  provider: {{name: {provider}}}\n  rules: [{{to: [{{operation: {{paths: [\"/{name}/*\"]}}}}]}}]\n---\n"
        )
    };
    let base = "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: orders, namespace: production}\nspec: {address: 127.0.0.1, labels: {app: orders}, serviceAccount: orders}\n---\napiVersion: meshward.io/v1alpha1\nkind: MeshConfig\nmetadata: {name: mesh, namespace: istio-system}\nspec:\n  extensionProviders:\n  - {name: a, envoyExtAuthzHttp: {service: a.auth.svc.cluster.local, port: 80}}\n  - {name: b, envoyExtAuthzGrpc: {service: b.auth.svc.cluster.local, port: 80}}\n---\n";
    let describe = |yaml: &str| describe(dir.path(), "production/orders", yaml);
    let one = describe(&format!("{base}{}{}", policy("x", "a"), policy("y", "a")));
    assert!(!one.contains("cannot be enforced"), "{one}");
    let two = describe(&format!("{base}{}{}", policy("x", "a"), policy("y", "b")));
    assert!(
        two.contains(
            "=> the CUSTOM policies cannot be enforced (only one provider can be used per workload, found \"a\", \"b\"): what their rules match is denied"
        ),
        "{two}"
    );
    let undefined = describe(&format!("{base}{}", policy("x", "c")));
    assert!(
        undefined.contains("provider \"c\" is not a defined authorization provider"),
        "{undefined}"
    );
}
