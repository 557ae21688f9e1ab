//! Regressions for the attacks that got through the proxy (issue 15 and
//! `docs/SECURITY.md`), each through a real `meshward proxy`.

mod support;

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use support::*;

const ORDERS: &str = "orders.production.svc.cluster.local";

/// orders (PERMISSIVE, so the test can speak to its proxy directly) with a
/// DENY on the presence of `x-block`, and an ALLOW for everything else.
fn header_deny_config(port: u16, app: SocketAddr) -> String {
    format!(
        r#"apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: orders
  namespace: production
  annotations: {{meshward.io/app-ports: "http=127.0.0.1:{app}"}}
spec:
  address: 127.0.0.1
  labels: {{app: orders}}
  serviceAccount: orders
  ports: {{http: {port}}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: block, namespace: production}}
spec:
  action: DENY
  rules:
  - when:
    - key: request.headers[x-block]
      values: ["*"]
"#,
        app = app.port()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deny_on_a_header_holds_for_values_that_are_not_utf8() {
    let mesh = Mesh::new();
    let app = App::start("orders").await;
    let port = free_port();
    mesh.write_config("mesh.yaml", &header_deny_config(port, app.addr));
    let _orders = mesh
        .proxy(
            "production/orders",
            &mesh.issue("orders", "production", "orders"),
        )
        .await;
    let inbound = SocketAddr::from(([127, 0, 0, 1], port));

    // HTTP/1.1: the value `1` and the single byte 0xff are both present.
    for value in [&b"1"[..], b"\xff", b"ok\x80"] {
        let mut raw = Raw::connect(inbound).await;
        let mut req = format!("GET /api HTTP/1.1\r\nHost: {ORDERS}\r\nx-block: ").into_bytes();
        req.extend_from_slice(value);
        req.extend_from_slice(b"\r\n\r\n");
        raw.send(&req).await;
        let resp = raw.response().await;
        assert_eq!(
            (resp.status, resp.body.as_str()),
            (403, "RBAC: access denied"),
            "x-block: {value:?}"
        );
    }
    assert!(app.last().is_none(), "a blocked request reached the app");
    let mut raw = Raw::connect(inbound).await;
    raw.send(format!("GET /api HTTP/1.1\r\nHost: {ORDERS}\r\n\r\n").as_bytes())
        .await;
    assert_eq!(raw.response().await.status, 200, "without x-block");

    // HTTP/2 (hyper on the proxy's side): the same.
    let tcp = tokio::net::TcpStream::connect(inbound).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake(executor(), TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = http::Request::builder()
        .uri(format!("http://{ORDERS}/api"))
        .header("x-block", http::HeaderValue::from_bytes(b"\xff").unwrap())
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!((status, &body[..]), (403, &b"RBAC: access denied"[..]));
    assert_eq!(
        app.seen.lock().unwrap().len(),
        1,
        "only the request without x-block"
    );
}
