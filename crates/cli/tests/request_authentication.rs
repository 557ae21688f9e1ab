//! End to end: RequestAuthentication with real `meshward proxy` processes.
//! The orders service accepts JWTs of the shop's issuer, whose keys the
//! server-side proxy fetches from a JWKS endpoint (a real HTTP server on
//! 127.0.0.1), and an AuthorizationPolicy asks for a request principal.
//! Valid tokens reach the application without the token and with a claim
//! header; bad ones are answered `401` with Envoy's messages, over
//! HTTP/1.1 through the client proxy and over HTTP/2 straight to the
//! server proxy.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use meshward_test_support::jwt::es256;
use serde_json::{Value, json};
use support::*;

const ISSUER: &str = "https://auth.shop.example";
const DOWN_ISSUER: &str = "https://down.shop.example";
const ORDERS: &str = "orders.production.svc.cluster.local";

fn token(key: &EncodingKey, iss: &str, sub: &str, extra: Value) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut claims = json!({"iss": iss, "sub": sub, "aud": "orders", "exp": now + 600});
    for (k, v) in extra.as_object().unwrap() {
        claims[k] = v.clone();
    }
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some("shop-1".into());
    jsonwebtoken::encode(&header, &claims, key).unwrap()
}

/// A JWKS endpoint serving `jwks` at `/jwks.json`; counts its requests.
async fn jwks_server(jwks: Value) -> (SocketAddr, Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let hits2 = Arc::clone(&hits);
    let body = Bytes::from(jwks.to_string());
    let task = tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                return;
            };
            let (hits, body) = (Arc::clone(&hits2), body.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |req: http::Request<Incoming>| {
                    let found = req.uri().path() == "/jwks.json";
                    hits.fetch_add(1, Ordering::SeqCst);
                    let body = body.clone();
                    async move {
                        let mut resp =
                            http::Response::new(Full::new(if found { body } else { Bytes::new() }));
                        if !found {
                            *resp.status_mut() = http::StatusCode::NOT_FOUND;
                        }
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (addr, hits, task)
}

/// A response as the client saw it.
#[derive(Debug)]
struct Answer {
    status: u16,
    www_authenticate: Option<String>,
    body: String,
}

/// One HTTP/1.1 request to `addr` for the orders service.
async fn call(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)]) -> Answer {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", ORDERS);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = send
        .send_request(req.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap();
    answer(resp).await
}

async fn answer(resp: http::Response<Incoming>) -> Answer {
    let status = resp.status().as_u16();
    let www_authenticate = resp
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_string());
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Answer {
        status,
        www_authenticate,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

fn config(orders_port: u16, app: SocketAddr, outbound: u16, jwks: SocketAddr) -> String {
    // Nothing listens on this port: the second issuer's keys never come.
    let down = free_port();
    let mut c = String::new();
    c += &format!(
        "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata:\n  name: orders\n  namespace: production\n  annotations: {{meshward.io/app-ports: \"http=127.0.0.1:{}\"}}\nspec:\n  address: 127.0.0.1\n  labels: {{app: orders}}\n  serviceAccount: orders\n  ports: {{http: {orders_port}}}\n---\n",
        app.port()
    );
    c += &format!(
        "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata:\n  name: frontend\n  namespace: production\n  annotations: {{meshward.io/outbound: \"127.0.0.1:{outbound}\"}}\nspec:\n  address: 127.0.0.1\n  labels: {{app: frontend}}\n  serviceAccount: frontend\n---\n"
    );
    c += &format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: orders, namespace: production}}\nspec:\n  hosts: [{ORDERS}]\n  ports: [{{number: {orders_port}, name: http, protocol: HTTP}}]\n  workloadSelector: {{labels: {{app: orders}}}}\n  resolution: STATIC\n---\n"
    );
    c += &format!(
        r#"apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: default, namespace: istio-system}}
spec: {{mtls: {{mode: STRICT}}}}
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: orders-jwt, namespace: production}}
spec:
  selector: {{matchLabels: {{app: orders}}}}
  jwtRules:
  - issuer: "{ISSUER}"
    jwksUri: "http://{jwks}/jwks.json"
    audiences: [orders]
    outputClaimToHeaders: [{{header: x-jwt-sub, claim: sub}}]
  - issuer: "{DOWN_ISSUER}"
    jwksUri: "http://127.0.0.1:{down}/jwks.json"
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: orders-require-jwt, namespace: production}}
spec:
  selector: {{matchLabels: {{app: orders}}}}
  rules:
  - from: [{{source: {{requestPrincipals: ["{ISSUER}/*"]}}}}]
    to: [{{operation: {{methods: [GET], paths: ["/api/v1/orders/*"]}}}}]
  - to: [{{operation: {{methods: [DELETE]}}}}]
    when: [{{key: "request.auth.claims[role]", values: [admin]}}]
"#
    );
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwts_are_validated_and_feed_authorization() {
    let (key, jwk) = es256("shop-1");
    let (forger, _) = es256("shop-1");
    let (jwks, jwks_hits, _jwks_task) = jwks_server(json!({ "keys": [jwk] })).await;
    let app = App::start("orders").await;
    let mesh = Mesh::new();
    let (orders_port, out_port) = (free_port(), free_port());
    mesh.write_config("mesh.yaml", &config(orders_port, app.addr, out_port, jwks));
    let orders = mesh
        .proxy(
            "production/orders",
            &mesh.issue("orders", "production", "orders"),
        )
        .await;
    let frontend_certs = mesh.issue("frontend", "production", "frontend");
    let _frontend = mesh.proxy("production/frontend", &frontend_certs).await;
    // Ready means the keys were fetched; /config_dump shows the rules and
    // the state of their keys.
    assert!(jwks_hits.load(Ordering::SeqCst) >= 1);
    let (_, dump) = orders.admin_get("/config_dump").await;
    let dump: Value = serde_json::from_str(&dump).unwrap();
    let rules = &dump["request_authentication"];
    assert_eq!(rules[0]["issuer"], ISSUER, "{dump}");
    assert_eq!(rules[0]["policy"], "production/orders-jwt");
    assert_eq!(rules[0]["jwks"]["keys"], 1, "{dump}");
    assert_eq!(
        rules[0]["locations"],
        json!([
            "header authorization after \"Bearer \"",
            "query access_token"
        ])
    );
    assert_eq!(rules[1]["jwks"]["keys"], 0, "{dump}");
    assert!(rules[1]["jwks"]["error"].is_string(), "{dump}");
    let outbound = SocketAddr::from(([127, 0, 0, 1], out_port));

    // A valid token: allowed; the application gets the subject in a
    // header (not the one the client forged) and no token.
    let alice = token(&key, ISSUER, "alice", json!({}));
    let bearer = |t: &str| format!("Bearer {t}");
    let a = call(
        outbound,
        "GET",
        "/api/v1/orders/7",
        &[("authorization", &bearer(&alice)), ("x-jwt-sub", "mallory")],
    )
    .await;
    assert_eq!(
        (a.status, a.body.as_str()),
        (200, "orders"),
        "{}",
        orders.logs()
    );
    let seen = app.last().unwrap();
    assert_eq!(
        seen.headers.get("x-jwt-sub").map(String::as_str),
        Some("alice")
    );
    assert!(!seen.headers.contains_key("authorization"), "{seen:?}");
    let line = orders
        .log_line("the allowed request", |l| l["response_code"] == 200)
        .await;
    assert_eq!(line["policy"], "production/orders-require-jwt", "{line}");

    // No token: authentication lets it through, authorization does not.
    let a = call(
        outbound,
        "GET",
        "/api/v1/orders/7",
        &[("x-jwt-sub", "alice")],
    )
    .await;
    assert_eq!((a.status, a.body.as_str()), (403, "RBAC: access denied"));

    // Bad tokens: 401 with Envoy's message and challenge; the application
    // never sees them.
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let cases = [
        (
            token(&key, ISSUER, "alice", json!({"exp": now - 3600})),
            "Jwt is expired",
        ),
        (
            token(&forger, ISSUER, "alice", json!({})),
            "Jwt verification fails",
        ),
        (
            token(&key, ISSUER, "alice", json!({"aud": "payments"})),
            "Audiences in Jwt are not allowed",
        ),
        (
            token(&key, DOWN_ISSUER, "alice", json!({})),
            "Jwks remote fetch is failed",
        ),
        (
            token(&key, "https://elsewhere.example", "alice", json!({})),
            "Jwt issuer is not configured",
        ),
    ];
    let requests_before = app.seen.lock().unwrap().len();
    for (t, message) in &cases {
        let a = call(
            outbound,
            "GET",
            "/api/v1/orders/7?x=1",
            &[("authorization", &bearer(t))],
        )
        .await;
        assert_eq!((a.status, a.body.as_str()), (401, *message));
        assert_eq!(
            a.www_authenticate.as_deref(),
            Some(
                format!(
                    "Bearer realm=\"http://{ORDERS}/api/v1/orders/7\", error=\"invalid_token\""
                )
                .as_str()
            )
        );
    }
    // A bad token in the query parameter too.
    let a = call(
        outbound,
        "GET",
        &format!("/api/v1/orders/7?access_token={}", cases[0].0),
        &[],
    )
    .await;
    assert_eq!((a.status, a.body.as_str()), (401, "Jwt is expired"));
    assert_eq!(app.seen.lock().unwrap().len(), requests_before);
    let line = orders
        .log_line("the expired token", |l| {
            l["response_code"] == 401 && l["reason"] == "RequestAuthentication: Jwt is expired"
        })
        .await;
    assert_eq!(line["decision"], "deny", "{line}");
    assert_eq!(line["policy"], "production/orders-jwt", "{line}");

    // Claims in `when` conditions.
    let admin = token(&key, ISSUER, "alice", json!({"role": "admin"}));
    let a = call(
        outbound,
        "DELETE",
        "/api/v1/orders/7",
        &[("authorization", &bearer(&admin))],
    )
    .await;
    assert_eq!(a.status, 200);
    let user = token(&key, ISSUER, "alice", json!({"role": "user"}));
    let a = call(
        outbound,
        "DELETE",
        "/api/v1/orders/7",
        &[("authorization", &bearer(&user))],
    )
    .await;
    assert_eq!(a.status, 403);

    // HTTP/2 straight to the server proxy, with mTLS as the frontend.
    let tls = mtls_connect(
        &frontend_certs,
        &frontend_certs.join("root-cert.pem"),
        SocketAddr::from(([127, 0, 0, 1], orders_port)),
        b"h2",
    )
    .await
    .unwrap();
    let mut send = h2_handshake(tls).await;
    for (t, expected) in [(&alice, 200), (&cases[1].0, 401)] {
        let req = http::Request::builder()
            .uri(format!("https://{ORDERS}/api/v1/orders/8"))
            .header("authorization", bearer(t))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let a = answer(send.send_request(req).await.unwrap()).await;
        assert_eq!(a.status, expected, "{a:?}");
        if expected == 401 {
            assert_eq!(a.body, "Jwt verification fails");
            assert!(a.www_authenticate.is_some());
        } else {
            let seen = app.last().unwrap();
            assert_eq!(seen.path, "/api/v1/orders/8");
            assert!(!seen.headers.contains_key("authorization"), "{seen:?}");
            assert_eq!(seen.headers["x-jwt-sub"], "alice");
        }
    }
}

#[test]
fn describe_lists_the_request_authentications_that_apply() {
    let dir = tempfile::tempdir().unwrap();
    let ra = |ns: &str, name: &str, selector: &str| {
        format!(
            "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  {selector}\n  jwtRules: [{{issuer: \"https://{name}.example\", jwks: '{{\"keys\": []}}'}}]\n---\n"
        )
    };
    let mut yaml = "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: orders, namespace: production}\nspec: {address: 127.0.0.1, labels: {app: orders}, serviceAccount: orders}\n---\n".to_string();
    yaml += &ra(
        "production",
        "orders-jwt",
        "selector: {matchLabels: {app: orders}}",
    );
    yaml += &ra(
        "production",
        "cart-jwt",
        "selector: {matchLabels: {app: cart}}",
    );
    yaml += &ra("production", "namespace-jwt", "selector: {}");
    yaml += &ra("istio-system", "mesh-jwt", "selector: {}");
    yaml += &ra("development", "dev-jwt", "selector: {}");
    let stdout = describe(dir.path(), "production/orders", &yaml);
    let section = stdout
        .split("Request authentication (JWT):")
        .nth(1)
        .unwrap();
    for applies in [
        "production/orders-jwt",
        "production/namespace-jwt",
        "istio-system/mesh-jwt",
    ] {
        assert!(section.contains(applies), "{applies}: {stdout}");
    }
    for other in ["cart-jwt", "dev-jwt"] {
        assert!(!section.contains(other), "{other}: {stdout}");
    }
}

/// A token header with one byte that is not UTF-8 after a tampered token
/// was taken for "no token" and forwarded to the application unchecked
/// (issue 15). It is refused with 401 now, through the client proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_with_bytes_that_are_not_utf8_is_refused() {
    let (key, jwk) = es256("shop-1");
    let (jwks, _, _jwks_task) = jwks_server(json!({ "keys": [jwk] })).await;
    let app = App::start("orders").await;
    let mesh = Mesh::new();
    let (orders_port, out_port) = (free_port(), free_port());
    mesh.write_config("mesh.yaml", &config(orders_port, app.addr, out_port, jwks));
    let _orders = mesh
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
    let outbound = SocketAddr::from(([127, 0, 0, 1], out_port));
    let good = token(&key, ISSUER, "alice", json!({}));
    let tampered = format!("{}A", &good[..good.len() - 1]);
    for (what, token, tail) in [
        ("a tampered token", tampered.as_str(), &b" \xff"[..]),
        ("a valid token", good.as_str(), b"\xff"),
    ] {
        let mut raw = Raw::connect(outbound).await;
        let mut req = format!(
            "GET /api/v1/orders/7 HTTP/1.1\r\nHost: {ORDERS}\r\nAuthorization: Bearer {token}"
        )
        .into_bytes();
        req.extend_from_slice(tail);
        req.extend_from_slice(b"\r\n\r\n");
        raw.send(&req).await;
        let resp = raw.response().await;
        assert_eq!(resp.status, 401, "{what} with a byte that is not UTF-8");
        assert!(resp.head.to_ascii_lowercase().contains("www-authenticate"));
    }
    assert!(app.last().is_none(), "the token reached the application");
}
