//! End to end: the HTTP/1.1 fast path of both proxies, byte for byte.
//! Real `meshward proxy` processes: a client-side proxy (outbound
//! listener) and a server-side proxy in front of an application. Requests
//! are written as raw bytes, so framing edge cases reach the proxies
//! exactly as sent: chunked bodies and responses, pipelining,
//! `Expect: 100-continue`, HTTP/1.0, ambiguous framing (request
//! smuggling), oversized heads, an application that closes idle
//! connections, an HTTP/1.1 client calling an HTTP/2 port, a streamed
//! HTTP/2 response recorded when it ends, and the
//! proxies' own idle timeouts (HTTP/1.1, HTTP/2 and TCP).

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::stream;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use meshward_test_support::app::{Protocol, Server, serve};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const HOST: &str = "orders.production.svc.cluster.local";

/// What the application received: method, target and body of each request.
type Log = Arc<Mutex<Vec<String>>>;

/// An HTTP/1.1 (or, with `h2`, cleartext HTTP/2) application: answers
/// `METHOD TARGET BODY`, and `/stream` with a chunked body in two parts.
async fn body_app(h2: bool) -> (SocketAddr, Log, Server) {
    let log: Log = Arc::default();
    let log2 = Arc::clone(&log);
    let protocol = if h2 { Protocol::Http2 } else { Protocol::Http1 };
    let server = serve(protocol, move |req: http::Request<Incoming>| {
        let log = Arc::clone(&log2);
        async move {
            let (parts, body) = req.into_parts();
            let body = body.collect().await.unwrap().to_bytes();
            // HTTP/1.1: the request-target as sent; HTTP/2:
            // the path (the URI carries the authority).
            let target = if h2 {
                parts.uri.path_and_query().unwrap().to_string()
            } else {
                parts.uri.to_string()
            };
            let line = format!(
                "{} {} {}",
                parts.method,
                target,
                String::from_utf8_lossy(&body)
            );
            log.lock().unwrap().push(line.clone());
            let body: BoxBody<Bytes, Infallible> = if parts.uri.path() == "/stream" {
                let parts = [Bytes::from("part1,"), Bytes::from("part2")];
                BodyExt::boxed(StreamBody::new(stream::iter(
                    parts.map(|b| Ok::<_, Infallible>(Frame::data(b))),
                )))
            } else {
                BodyExt::boxed(Full::new(Bytes::from(line)))
            };
            http::Response::new(body)
        }
    })
    .await;
    (server.addr, log, server)
}

/// An application that answers one request per connection and then closes
/// it without saying so (as an idle timeout does): `200 once`.
async fn closing_app() -> meshward_test_support::app::Server {
    meshward_test_support::app::serve_tcp(|mut s| async move {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 1024];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nonce")
            .await;
    })
    .await
}

struct Pair {
    mesh: Mesh,
    client: ProxyProcess,
    server: ProxyProcess,
    /// The client proxy's outbound listener.
    outbound: SocketAddr,
    /// The server proxy's inbound port (PERMISSIVE: plaintext accepted).
    inbound: SocketAddr,
}

/// One port of the server workload: its name (which gives its protocol,
/// as Istio's port naming does), where peers reach it, and where the
/// application listens.
struct Port<'a> {
    name: &'a str,
    inbound: SocketAddr,
    app: SocketAddr,
}

/// A client workload (`production/frontend`, with the given WorkloadEntry
/// annotations: its listeners) and a server workload (`production/orders`)
/// with `ports`, behind the service `host`. Every port is PERMISSIVE, so
/// tests can also talk plaintext to the server proxy directly. With
/// `policy`, frontend may do anything but `/forbidden` (an HTTP-only rule:
/// TCP is then denied); without, everything is allowed.
fn mesh_yaml(ports: &[Port], frontend_annotations: &[String], host: &str, policy: bool) -> String {
    let join = |f: &dyn Fn(&Port) -> String| ports.iter().map(f).collect::<Vec<_>>().join(", ");
    let app_ports = join(&|p| format!("{}=127.0.0.1:{}", p.name, p.app.port()));
    let wl_ports = join(&|p| format!("{}: {}", p.name, p.inbound.port()));
    let svc_ports = join(&|p| {
        let protocol = match p.name {
            "http2" => "HTTP2",
            "tcp" => "TCP",
            _ => "HTTP",
        };
        format!(
            "{{number: {}, name: {}, protocol: {protocol}}}",
            p.inbound.port(),
            p.name
        )
    });
    let annotations = frontend_annotations.join(", ");
    let mut yaml = format!(
        r#"apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: orders
  namespace: production
  annotations: {{meshward.io/app-ports: "{app_ports}"}}
spec:
  address: 127.0.0.1
  labels: {{app: orders}}
  serviceAccount: orders
  ports: {{{wl_ports}}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: frontend
  namespace: production
  annotations: {{{annotations}}}
spec:
  address: 127.0.0.1
  labels: {{app: frontend}}
  serviceAccount: frontend
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: orders, namespace: production}}
spec:
  hosts: [{host}]
  ports: [{svc_ports}]
  workloadSelector: {{labels: {{app: orders}}}}
  resolution: STATIC
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: default, namespace: production}}
spec: {{mtls: {{mode: PERMISSIVE}}}}
"#
    );
    if policy {
        yaml.push_str(
            r#"---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: orders, namespace: production}
spec:
  selector: {matchLabels: {app: orders}}
  rules:
  - to: [{operation: {notPaths: ["/forbidden"]}}]
"#,
        );
    }
    yaml
}

/// The pair's configuration: one port named `port_name` in front of `app`,
/// the client's outbound HTTP listener, the policy, and the server's
/// service named `host`.
fn mesh_config(
    app: SocketAddr,
    port_name: &str,
    inbound: SocketAddr,
    outbound: SocketAddr,
    host: &str,
) -> String {
    let port = Port {
        name: port_name,
        inbound,
        app,
    };
    let outbound = format!("meshward.io/outbound: \"{outbound}\"");
    mesh_yaml(&[port], &[outbound], host, true)
}

async fn pair(app: SocketAddr, port_name: &str) -> Pair {
    let mesh = Mesh::new();
    let inbound = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let outbound = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let config = mesh_config(app, port_name, inbound, outbound, HOST);
    mesh.write_config("mesh.yaml", &config);
    let server = mesh
        .proxy(
            "production/orders",
            &mesh.issue("orders", "production", "orders"),
        )
        .await;
    let client = mesh
        .proxy(
            "production/frontend",
            &mesh.issue("frontend", "production", "frontend"),
        )
        .await;
    Pair {
        mesh,
        client,
        server,
        outbound,
        inbound,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_pipelining_and_continue_cross_both_proxies_intact() {
    let (app, log, _task) = body_app(false).await;
    let p = pair(app, "http").await;
    let mut c = Raw::connect(p.outbound).await;

    // A chunked request body, and a pipelined second request in the same
    // write: both answered, in order, on one connection.
    c.send(
        format!(
            "POST /echo HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: chunked\r\n\r\n\
             5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nx-trailer: t\r\n\r\n\
             GET /second HTTP/1.1\r\nHost: {HOST}\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    let r = c.response().await;
    assert_eq!((r.status, r.body.as_str()), (200, "POST /echo hello world"));
    let r = c.response().await;
    assert_eq!((r.status, r.body.as_str()), (200, "GET /second "));

    // A chunked response comes back chunked, whole.
    c.send(format!("GET /stream HTTP/1.1\r\nHost: {HOST}\r\n\r\n").as_bytes())
        .await;
    let r = c.response().await;
    assert!(
        r.head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "{}",
        r.head
    );
    assert_eq!(r.body, "part1,part2");

    // Expect: 100-continue is answered by the proxy before the body is sent.
    c.send(
        format!(
            "PUT /upload HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    let interim = c.response().await;
    assert_eq!(interim.status, 100);
    c.send(b"data").await;
    let r = c.response().await;
    assert_eq!((r.status, r.body.as_str()), (200, "PUT /upload data"));

    // A denied request with a body: 403. The server proxy never reads the
    // body, so it closes its connection; the client proxy's connection
    // with the application stays usable.
    let denied =
        format!("POST /forbidden HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 3\r\n\r\nabc");
    c.send(denied.as_bytes()).await;
    let r = c.response().await;
    assert_eq!((r.status, r.body.as_str()), (403, "RBAC: access denied"));
    c.send(format!("GET /after HTTP/1.1\r\nHost: {HOST}\r\n\r\n").as_bytes())
        .await;
    assert_eq!(c.response().await.body, "GET /after ");
    let mut direct = Raw::connect(p.inbound).await;
    direct.send(denied.as_bytes()).await;
    let r = direct.response().await;
    assert_eq!(r.status, 403);
    assert!(
        r.head.to_ascii_lowercase().contains("connection: close"),
        "{}",
        r.head
    );
    assert!(
        direct.closed().await,
        "a denied request's unread body ends the connection"
    );

    // HTTP/1.0: answered, then the connection closes.
    let mut c = Raw::connect(p.outbound).await;
    c.send(format!("GET /old HTTP/1.0\r\nHost: {HOST}\r\n\r\n").as_bytes())
        .await;
    let r = c.response().await;
    assert_eq!((r.status, r.body.as_str()), (200, "GET /old "));
    assert!(c.closed().await);

    // Absolute-form targets are forwarded in origin-form.
    let mut c = Raw::connect(p.outbound).await;
    c.send(format!("GET http://{HOST}/abs?q=1 HTTP/1.1\r\nHost: {HOST}\r\n\r\n").as_bytes())
        .await;
    let r = c.response().await;
    assert_eq!((r.status, r.body.as_str()), (200, "GET /abs?q=1 "));

    assert_eq!(log.lock().unwrap().len(), 7, "{:?}", log.lock().unwrap());
    // Every request crossed the mesh with mTLS (the server proxy saw the
    // frontend's identity).
    p.server
        .log_line("an mTLS request from the frontend", |l| {
            l["path"] == "/upload"
                && l["src.identity"] == "spiffe://cluster.local/ns/production/sa/frontend"
                && l["tls.mode"] == "mutual_tls"
        })
        .await;

    // Body sizes, as Istio reports them: the payload each way (a chunked
    // body without its chunk lines), in the access log of both proxies and
    // in istio_request_bytes / istio_response_bytes.
    let sizes = |l: &serde_json::Value| (l["bytes_received"].clone(), l["bytes_sent"].clone());
    for proxy in [&p.client, &p.server] {
        let line = proxy.log_line("/echo", |l| l["path"] == "/echo").await;
        assert_eq!(sizes(&line), (11.into(), 22.into()), "{line}");
        let line = proxy.log_line("/upload", |l| l["path"] == "/upload").await;
        assert_eq!(sizes(&line), (4.into(), 16.into()), "{line}");
        let line = proxy.log_line("/stream", |l| l["path"] == "/stream").await;
        assert_eq!(sizes(&line), (0.into(), 11.into()), "{line}");
    }
    let denied_line = p
        .server
        .log_line("/forbidden", |l| l["path"] == "/forbidden")
        .await;
    assert_eq!(sizes(&denied_line), (0.into(), 19.into()), "{denied_line}");
    for (proxy, reporter) in [(&p.client, "source"), (&p.server, "destination")] {
        let (_, m) = proxy.admin_get("/stats/prometheus").await;
        let count = |name: &str, code: &str| {
            metric(&m, name, &[("reporter", reporter), ("response_code", code)])
        };
        for code in ["200", "403"] {
            let requests = count("istio_requests_total", code);
            assert!(requests >= 1.0, "{reporter} {code}: {m}");
            assert_eq!(count("istio_request_bytes_count", code), requests, "{m}");
            assert_eq!(count("istio_response_bytes_count", code), requests, "{m}");
        }
        // Every 403 here is the server proxy's own 19-byte body, for
        // `abc`: forwarded by the client proxy, never read by the server.
        let denied = count("istio_requests_total", "403");
        let forwarded = if reporter == "source" { 3.0 } else { 0.0 };
        assert_eq!(
            count("istio_response_bytes_sum", "403"),
            19.0 * denied,
            "{m}"
        );
        assert_eq!(
            count("istio_request_bytes_sum", "403"),
            forwarded * denied,
            "{m}"
        );
        // hello world + data, plus what the other requests carried.
        assert!(count("istio_request_bytes_sum", "200") >= 15.0, "{m}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_or_oversized_requests_are_refused_on_both_sides() {
    let (app, log, _task) = body_app(false).await;
    let p = pair(app, "http").await;
    let big = "x".repeat(70 * 1024);
    let cases: Vec<(String, u16)> = vec![
        (
            format!(
                "POST / HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            ),
            400,
        ),
        (
            format!(
                "POST / HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd"
            ),
            400,
        ),
        // Any Transfer-Encoding but `chunked` alone: 501, as Envoy answers
        // (`identity, chunked` is read as "no coding" by some parsers).
        (
            format!("POST / HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: gzip\r\n\r\n"),
            501,
        ),
        (
            format!(
                "POST / HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: identity, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
            ),
            501,
        ),
        (
            format!(
                "POST / HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: identity\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
            ),
            501,
        ),
        (
            format!(
                "POST / HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
            ),
            501,
        ),
        ("GET / HTTP/1.1\r\n\r\n".to_string(), 400),
        (
            format!("GET / HTTP/1.1\r\nHost: {HOST}\r\nX-Big: {big}\r\n\r\n"),
            431,
        ),
    ];
    for target in [p.outbound, p.inbound] {
        for (req, status) in &cases {
            let mut c = Raw::connect(target).await;
            c.send(req.as_bytes()).await;
            let r = c.response().await;
            assert_eq!(
                r.status,
                *status,
                "{target}: {}",
                &req[..req.len().min(120)]
            );
            assert!(
                c.closed().await,
                "the connection closes after a bad request"
            );
        }
        // A chunked body with an invalid chunk: the request is not
        // completed upstream.
        let mut c = Raw::connect(target).await;
        c.send(format!("POST /bad HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n").as_bytes())
            .await;
        let r = c.response().await;
        assert_eq!(r.status, 400, "{target}");
    }
    assert!(
        log.lock().unwrap().is_empty(),
        "nothing ambiguous reached the application: {:?}",
        log.lock().unwrap()
    );
    let _ = (&p.client, &p.server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_application_closing_idle_connections_is_retried_transparently() {
    let app_server = closing_app().await;
    let app = app_server.addr;
    let p = pair(app, "http").await;
    // Through both proxies and directly to the server proxy: the second
    // request on the connection finds the application's connection closed
    // and goes out again on a new one.
    for target in [p.outbound, p.inbound] {
        let mut c = Raw::connect(target).await;
        for i in 0..3 {
            c.send(format!("GET /{i} HTTP/1.1\r\nHost: {HOST}\r\n\r\n").as_bytes())
                .await;
            let r = c.response().await;
            assert_eq!(
                (r.status, r.body.as_str()),
                (200, "once"),
                "{target} request {i}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http1_client_reaches_an_http2_port() {
    let (app, log, _task) = body_app(true).await;
    let p = pair(app, "http2").await;
    let mut c = Raw::connect(p.outbound).await;
    c.send(format!("POST /h2 HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 2\r\n\r\nhi").as_bytes())
        .await;
    let r = c.response().await;
    assert_eq!((r.status, r.body.as_str()), (200, "POST /h2 hi"));
    c.send(format!("GET /stream HTTP/1.1\r\nHost: {HOST}\r\n\r\n").as_bytes())
        .await;
    let r = c.response().await;
    assert_eq!((r.status, r.body.as_str()), (200, "part1,part2"));
    // A chunked request body cannot be bridged: 411, not a guess.
    c.send(
        format!("POST /h2 HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
            .as_bytes(),
    )
    .await;
    assert_eq!(c.response().await.status, 411);
    assert_eq!(log.lock().unwrap().len(), 2);
    let _ = (&p.client, &p.server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_follow_configuration_changes() {
    let (app, _log, _task) = body_app(false).await;
    let p = pair(app, "http").await;
    let mut c = Raw::connect(p.outbound).await;
    let get = |host: &str| format!("GET /r HTTP/1.1\r\nHost: {host}\r\n\r\n");
    c.send(get(HOST).as_bytes()).await;
    assert_eq!(c.response().await.status, 200);

    // The service is renamed: on the same connection, the old name no
    // longer routes and the new one does.
    let renamed = "renamed.production.svc.cluster.local";
    p.mesh
        .apply(
            "mesh.yaml",
            &mesh_config(app, "http", p.inbound, p.outbound, renamed),
            &[&p.client],
        )
        .await;
    c.send(get(HOST).as_bytes()).await;
    let r = c.response().await;
    assert_eq!((r.status, r.body.as_str()), (404, "no healthy upstream"));
    c.send(get(renamed).as_bytes()).await;
    assert_eq!(c.response().await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_application_gets_the_path_the_decision_saw() {
    let (app, log, _task) = body_app(false).await;
    let p = pair(app, "http").await;
    for target in [p.outbound, p.inbound] {
        let mut c = Raw::connect(target).await;
        // Normalized (BASE: dot segments, %7E) as authorization saw it; the
        // query is forwarded as sent.
        c.send(format!("GET /a/./b/../c%7E?x=/../y HTTP/1.1\r\nHost: {HOST}\r\n\r\n").as_bytes())
            .await;
        let r = c.response().await;
        assert_eq!(
            (r.status, r.body.as_str()),
            (200, "GET /a/c~?x=/../y "),
            "{target}"
        );
        // A detour through dot segments does not escape a deny.
        c.send(format!("GET /public/../forbidden HTTP/1.1\r\nHost: {HOST}\r\n\r\n").as_bytes())
            .await;
        assert_eq!(c.response().await.status, 403, "{target}");
        // A path that cannot be normalized is refused before the app.
        c.send(format!("GET /a%00b HTTP/1.1\r\nHost: {HOST}\r\n\r\n").as_bytes())
            .await;
        let r = c.response().await;
        assert_eq!(
            (r.status, r.body.as_str()),
            (400, "invalid request path"),
            "{target}"
        );
    }
    assert_eq!(log.lock().unwrap().len(), 2, "{:?}", log.lock().unwrap());
}

/// How long `closes_within` waits for the proxy to close an idle
/// connection, measured from the connection's last bytes: the timeout
/// itself plus room for a slow machine.
async fn idle_close_time(s: &mut TcpStream) -> std::time::Duration {
    let last_bytes = std::time::Instant::now();
    let mut chunk = [0u8; 64];
    let n = tokio::time::timeout(patience() + IDLE_SERVER, s.read(&mut chunk))
        .await
        .expect("the idle connection was not closed")
        .unwrap_or(0);
    assert_eq!(n, 0, "unexpected bytes on an idle connection");
    last_bytes.elapsed()
}

#[test]
fn an_invalid_idle_timeout_is_refused_before_anything_starts() {
    for (value, says) in [
        ("0s", "at least 1s"),
        ("366d", "at most 365d"),
        ("400000000000y", "at most 365d"),
        ("soon", "invalid duration"),
    ] {
        let out = std::process::Command::new(bin())
            .args(["proxy", "-c", "none", "-w", "a/b", "--certs", "none"])
            .args(["--idle-timeout", value])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{value}: {err}");
        assert!(
            err.contains("--idle-timeout") && err.contains(says),
            "{value}: {err}"
        );
    }
}

/// An orchestrator stops a sidecar with SIGTERM: the proxy exits with
/// status 0. (`scripts/release.sh` relies on that exit: a profiling
/// build writes its profile when it exits.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_the_proxy_with_status_zero() {
    let (app, _log, _task) = body_app(false).await;
    let mesh = Mesh::new();
    let inbound = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let ports = [Port {
        name: "http",
        inbound,
        app,
    }];
    mesh.write_config("mesh.yaml", &mesh_yaml(&ports, &[], HOST, false));
    let mut proxy = mesh
        .proxy(
            "production/orders",
            &mesh.issue("orders", "production", "orders"),
        )
        .await;
    // A proxy still running after `patience()` is killed: not a success.
    let status = proxy.terminate();
    assert!(status.success(), "{status}\n{}", proxy.logs());
    assert!(proxy.logs().contains("shutting down"), "{}", proxy.logs());
}

const IDLE_CLIENT: std::time::Duration = std::time::Duration::from_secs(1);
const IDLE_SERVER: std::time::Duration = std::time::Duration::from_secs(2);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_after_the_idle_timeout() {
    let (app, _log, _task) = body_app(false).await;
    let echo = Echo::start().await;
    let mesh = Mesh::new();
    let [http_in, tcp_in, outbound, tcp_out] =
        [(); 4].map(|()| SocketAddr::from(([127, 0, 0, 1], free_port())));
    let ports = [
        Port {
            name: "http",
            inbound: http_in,
            app,
        },
        Port {
            name: "tcp",
            inbound: tcp_in,
            app: echo.addr,
        },
    ];
    let listeners = [
        format!("meshward.io/outbound: \"{outbound}\""),
        format!(
            "meshward.io/tcp-outbound: \"{tcp_out}={HOST}:{}\"",
            tcp_in.port()
        ),
    ];
    let config = mesh_yaml(&ports, &listeners, HOST, false);
    mesh.write_config("mesh.yaml", &config);
    let secs = |d: std::time::Duration| format!("{}s", d.as_secs());
    let server = mesh
        .proxy_with(
            "production/orders",
            &mesh.issue("orders", "production", "orders"),
            &["--idle-timeout", &secs(IDLE_SERVER)],
        )
        .await;
    let client = mesh
        .proxy_with(
            "production/frontend",
            &mesh.issue("frontend", "production", "frontend"),
            &["--idle-timeout", &secs(IDLE_CLIENT)],
        )
        .await;

    // HTTP/1.1 keep-alive: requests closer together than the timeout keep
    // the connection; then it is closed one timeout after the last
    // response, without an answer. Through the client proxy (1s) and
    // directly to the server proxy (2s).
    let http = |target: SocketAddr, timeout: std::time::Duration| async move {
        let mut c = Raw::connect(target).await;
        for i in 0..3 {
            if i > 0 {
                tokio::time::sleep(timeout / 2).await;
            }
            c.send(format!("GET /{i} HTTP/1.1\r\nHost: {HOST}\r\n\r\n").as_bytes())
                .await;
            let r = c.response().await;
            assert_eq!(r.status, 200, "{target} request {i} after a pause: {r:?}");
        }
        idle_close_time(&mut c.s).await
    };
    // TCP: bytes in either direction keep the connection; silence closes
    // it. Through the client proxy's TCP listener and directly to the
    // server proxy.
    let tcp = |target: SocketAddr, timeout: std::time::Duration| async move {
        let mut s = TcpStream::connect(target).await.unwrap();
        for i in 0..3u8 {
            if i > 0 {
                tokio::time::sleep(timeout / 2).await;
            }
            s.write_all(&[i; 3]).await.unwrap();
            let mut back = [0u8; 3];
            s.read_exact(&mut back).await.unwrap();
            assert_eq!(back, [i; 3], "{target} echo {i}");
        }
        idle_close_time(&mut s).await
    };
    // HTTP/2 (prior knowledge): the proxy sends GOAWAY and closes.
    let h2 = |target: SocketAddr, timeout: std::time::Duration| async move {
        let tcp = TcpStream::connect(target).await.unwrap();
        let (mut send, conn) = hyper::client::conn::http2::handshake(executor(), TokioIo::new(tcp))
            .await
            .unwrap();
        let conn = tokio::spawn(conn);
        for i in 0..3 {
            if i > 0 {
                tokio::time::sleep(timeout / 2).await;
            }
            let req = http::Request::get(format!("http://{HOST}/h2-{i}"))
                .body(Full::new(Bytes::new()))
                .unwrap();
            let resp = send.send_request(req).await.unwrap();
            assert_eq!(resp.status(), 200, "{target} HTTP/2 request {i}");
            resp.into_body().collect().await.unwrap();
        }
        let last_bytes = std::time::Instant::now();
        let _ = tokio::time::timeout(patience() + IDLE_SERVER, conn)
            .await
            .expect("the idle HTTP/2 connection was not closed");
        last_bytes.elapsed()
    };
    let (via_client, direct, h2_via_client, h2_direct, tcp_via_client, tcp_direct) = tokio::join!(
        http(outbound, IDLE_CLIENT),
        http(http_in, IDLE_SERVER),
        h2(outbound, IDLE_CLIENT),
        h2(http_in, IDLE_SERVER),
        tcp(tcp_out, IDLE_CLIENT),
        tcp(tcp_in, IDLE_SERVER),
    );
    for (what, took, timeout) in [
        ("HTTP via the client proxy", via_client, IDLE_CLIENT),
        ("HTTP to the server proxy", direct, IDLE_SERVER),
        ("HTTP/2 via the client proxy", h2_via_client, IDLE_CLIENT),
        ("HTTP/2 to the server proxy", h2_direct, IDLE_SERVER),
        ("TCP via the client proxy", tcp_via_client, IDLE_CLIENT),
        ("TCP to the server proxy", tcp_direct, IDLE_SERVER),
    ] {
        assert!(
            took >= timeout - std::time::Duration::from_millis(100),
            "{what}: closed {took:?} after its last bytes, before its {timeout:?} idle timeout"
        );
    }
    // Each proxy logs its TCP connection closed as idle, with the bytes it
    // carried (three round trips of three bytes).
    for p in [&client, &server] {
        let line = p
            .tcp_log_line("an idle TCP connection", "idle_timeout")
            .await;
        assert_eq!(
            (line["bytes_sent"].as_u64(), line["bytes_received"].as_u64()),
            (Some(9), Some(9)),
            "{}: {line}",
            p.name
        );
    }
}

/// A WebSocket handshake for `path` on a new connection to `addr`, with
/// the service's name as `Host`.
async fn ws_connect(addr: SocketAddr, path: &str) -> Result<Ws, u16> {
    ws_connect_to(addr, HOST, path).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websockets_cross_both_proxies_and_other_upgrades_are_refused() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let (app, seen, _task) = websocket_app().await;
    let p = pair(app, "http").await;
    let frontend = "spiffe://cluster.local/ns/production/sa/frontend";

    // Two WebSockets at once through the client proxy, the mesh (mTLS) and
    // the server proxy: the application's first frame (sent right after
    // its 101), text both ways, and a message far larger than a TLS record.
    let mut chat = ws_connect(p.outbound, "/chat").await.unwrap();
    let mut feed = ws_connect(p.outbound, "/feed").await.unwrap();
    assert_eq!(ws_text(&mut chat).await, "hello /chat");
    assert_eq!(ws_text(&mut feed).await, "hello /feed");
    chat.send(Message::text("hi")).await.unwrap();
    feed.send(Message::text("there")).await.unwrap();
    assert_eq!(ws_text(&mut feed).await, "echo: there");
    assert_eq!(ws_text(&mut chat).await, "echo: hi");
    let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    chat.send(Message::binary(big.clone())).await.unwrap();
    match chat.next().await {
        Some(Ok(Message::Binary(b))) => assert!(b[..] == big[..], "binary message changed"),
        other => panic!("expected the binary message back, got {other:?}"),
    }
    // The close handshake goes through; the tunnel ends once both sides
    // have closed their connections (the application first, as RFC 6455
    // wants: the client then sees the end of its stream).
    chat.close(None).await.unwrap();
    while let Some(msg) = chat.next().await {
        assert!(matches!(msg, Ok(Message::Close(_))), "after close: {msg:?}");
    }
    let mut rest = Vec::new();
    chat.get_mut().read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty(), "bytes after the close: {rest:?}");
    drop(chat);
    feed.send(Message::text("still")).await.unwrap();
    assert_eq!(ws_text(&mut feed).await, "echo: still");
    drop(feed);
    // A new WebSocket after those: upstream connections taken by tunnels
    // were not handed to anyone else.
    let mut again = ws_connect(p.outbound, "/again").await.unwrap();
    assert_eq!(ws_text(&mut again).await, "hello /again");

    // Straight to the server proxy in plaintext (PERMISSIVE): the inbound
    // side tunnels too, with no client certificate to forward.
    let mut direct = ws_connect(p.inbound, "/direct").await.unwrap();
    assert_eq!(ws_text(&mut direct).await, "hello /direct");
    direct.send(Message::text("x")).await.unwrap();
    assert_eq!(ws_text(&mut direct).await, "echo: x");

    // The handshake is authorized like any request: denied ones get 403
    // and never reach the application.
    assert_eq!(ws_connect(p.outbound, "/forbidden").await.err(), Some(403));
    assert_eq!(ws_connect(p.inbound, "/forbidden").await.err(), Some(403));

    let seen = seen.lock().unwrap().clone();
    let paths: Vec<&str> = seen.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(paths.len(), 4, "{paths:?}");
    for path in ["/chat", "/feed", "/again", "/direct"] {
        assert!(paths.contains(&path), "{path} missing from {paths:?}");
    }
    for (path, xfcc) in &seen {
        if path == "/direct" {
            assert_eq!(xfcc, "", "plaintext: no client certificate to forward");
        } else {
            assert!(xfcc.contains(&format!("URI={frontend}")), "{path}: {xfcc}");
        }
    }

    // Any other upgrade is refused by either proxy, as an Istio sidecar
    // does (only websocket upgrades are enabled), before the application.
    for addr in [p.outbound, p.inbound] {
        let mut c = Raw::connect(addr).await;
        c.send(
            format!(
                "GET /x HTTP/1.1\r\nHost: {HOST}\r\nConnection: Upgrade\r\nUpgrade: foo/1\r\n\r\n"
            )
            .as_bytes(),
        )
        .await;
        let r = c.response().await;
        assert_eq!(r.status, 403, "{addr}: {}", r.head);
        assert!(r.body.contains("only websocket"), "{}", r.body);
    }
    for proxy in [&p.client, &p.server] {
        let line = proxy
            .log_line("the refused upgrade", |l| l["path"] == "/x")
            .await;
        assert_eq!(line["response_code"], 403, "{line}");
        assert!(
            line["reason"].as_str().unwrap().contains("only websocket"),
            "the log says why: {line}"
        );
    }

    // The access logs: a tunnel is one request with status 101, logged
    // when it ends, with the peer's identity on the server side.
    let line = p
        .server
        .log_line("the /chat tunnel, with mTLS", |l| {
            l["path"] == "/chat"
                && l["response_code"] == 101
                && l["src.identity"] == frontend
                && l["tls.mode"] == "mutual_tls"
        })
        .await;
    // Both ways: at least the 200,000-byte message, in frames.
    for way in ["bytes_sent", "bytes_received"] {
        assert!(line[way].as_u64().unwrap() > 200_000, "{way}: {line}");
    }
    let chat = p
        .client
        .log_line("the /chat tunnel", |l| {
            l["path"] == "/chat" && l["response_code"] == 101
        })
        .await;
    assert!(
        chat["reason"]
            .as_str()
            .unwrap()
            .contains("through the tunnel"),
        "{chat}"
    );
    p.server
        .log_line("the denied handshake", |l| {
            l["path"] == "/forbidden" && l["response_code"] == 403
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_change_closes_the_websockets_it_denies() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let (app, _seen, _task) = websocket_app().await;
    let p = pair(app, "http").await;
    let mut chat = ws_connect(p.outbound, "/chat").await.unwrap();
    let mut feed = ws_connect(p.outbound, "/feed").await.unwrap();
    assert_eq!(ws_text(&mut chat).await, "hello /chat");
    assert_eq!(ws_text(&mut feed).await, "hello /feed");

    // The policy now denies /chat: the server proxy closes that tunnel,
    // keeps the other, and refuses a new /chat handshake.
    let config = mesh_config(app, "http", p.inbound, p.outbound, HOST);
    let denied = config.replace(
        r#"notPaths: ["/forbidden"]"#,
        r#"notPaths: ["/forbidden", "/chat"]"#,
    );
    assert_ne!(config, denied, "the policy must change");
    p.mesh.apply("mesh.yaml", &denied, &[&p.server]).await;
    let ended = tokio::time::timeout(patience(), chat.next())
        .await
        .expect("the denied tunnel must end");
    assert!(
        !matches!(ended, Some(Ok(Message::Text(_) | Message::Binary(_)))),
        "{ended:?}"
    );
    feed.send(Message::text("still")).await.unwrap();
    assert_eq!(ws_text(&mut feed).await, "echo: still");
    assert_eq!(ws_connect(p.outbound, "/chat").await.err(), Some(403));
    let line = p
        .server
        .log_line("the closed /chat tunnel", |l| {
            l["path"] == "/chat" && l["response_code"] == 101
        })
        .await;
    assert_eq!(line["decision"], "deny", "{line}");
    assert!(
        line["reason"]
            .as_str()
            .unwrap()
            .starts_with("policy_changed"),
        "{line}"
    );
}

/// A cleartext HTTP/2 application whose every response sends `head,` at
/// once and `tail` only when `release` is notified.
async fn holding_app(
    release: Arc<tokio::sync::Notify>,
) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                return;
            };
            let release = Arc::clone(&release);
            tokio::spawn(async move {
                let svc = service_fn(move |_req: http::Request<Incoming>| {
                    let release = Arc::clone(&release);
                    async move {
                        let frames = stream::unfold(0, move |n| {
                            let release = Arc::clone(&release);
                            async move {
                                let data = match n {
                                    0 => "head,",
                                    1 => {
                                        release.notified().await;
                                        "tail"
                                    }
                                    _ => return None,
                                };
                                Some((Ok::<_, Infallible>(Frame::data(Bytes::from(data))), n + 1))
                            }
                        });
                        let body: BoxBody<Bytes, Infallible> =
                            BodyExt::boxed(StreamBody::new(frames));
                        Ok::<_, Infallible>(http::Response::new(body))
                    }
                });
                let _ = hyper::server::conn::http2::Builder::new(executor())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_http2_response_is_recorded_when_it_ends() {
    let release = Arc::new(tokio::sync::Notify::new());
    let (app, _task) = holding_app(Arc::clone(&release)).await;
    let p = pair(app, "http2").await;
    // HTTP/2 from the client to its proxy too: both proxies serve the
    // request through their HTTP/2 path.
    let tcp = TcpStream::connect(p.outbound).await.unwrap();
    let mut send = h2_handshake(tcp).await;
    let req = http::Request::builder()
        .uri(format!("http://{HOST}/hold"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let head_seen = std::time::Instant::now();

    // The response has begun but not ended: neither proxy has counted it.
    for proxy in [&p.client, &p.server] {
        let (_, m) = proxy.admin_get("/stats/prometheus").await;
        assert_eq!(metric(&m, "istio_requests_total", &[]), 0.0, "{m}");
        assert!(
            proxy.access_log().iter().all(|l| l["path"] != "/hold"),
            "{}",
            proxy.logs()
        );
    }
    let held = head_seen.elapsed();
    release.notify_one();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "head,tail");

    // Now both have, with the whole stream's duration and size, as Envoy
    // records a request at the end of its stream.
    for (proxy, reporter) in [(&p.client, "source"), (&p.server, "destination")] {
        let line = proxy.log_line("/hold", |l| l["path"] == "/hold").await;
        assert_eq!(line["response_code"], 200, "{line}");
        assert_eq!(line["bytes_sent"], 9, "{line}");
        let duration = line["duration_ms"].as_f64().unwrap();
        assert!(
            duration >= held.as_secs_f64() * 1000.0,
            "{reporter}: logged {duration} ms, the body was held {held:?}"
        );
        let (_, m) = proxy.admin_get("/stats/prometheus").await;
        let labels = [("reporter", reporter), ("response_code", "200")];
        assert_eq!(metric(&m, "istio_requests_total", &labels), 1.0, "{m}");
        assert_eq!(metric(&m, "istio_response_bytes_sum", &labels), 9.0, "{m}");
        assert!(
            metric(&m, "istio_request_duration_milliseconds_sum", &labels)
                >= held.as_secs_f64() * 1000.0,
            "{m}"
        );
    }
}

/// A request with a large body refused on an HTTP/2 port (issue 15): the
/// client-side proxy, which cannot bridge a body that large, answers `413`
/// and the server-side proxy (hyper serving HTTP/1.1 there) `403`, and
/// either answer reaches a client that writes its whole body before
/// reading; before, hyper's close reset the connection under the answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_large_body_on_an_http2_port_gets_its_answer() {
    let (app, log, _task) = body_app(true).await;
    let p = pair(app, "http2").await;
    let len = 5 * 1024 * 1024;
    let cases = [
        (p.outbound, 413, "request body too large"),
        (p.inbound, 403, "RBAC: access denied"),
    ];
    for round in 0..3 {
        for (target, status, body) in cases {
            let mut c = Raw::connect(target).await;
            let mut req = format!(
                "POST /forbidden HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: {len}\r\n\r\n"
            )
            .into_bytes();
            req.extend(std::iter::repeat_n(b'x', len));
            c.send(&req).await;
            let r = c.response().await;
            assert_eq!(
                (r.status, r.body.as_str()),
                (status, body),
                "{target} round {round}"
            );
        }
    }
    assert!(log.lock().unwrap().is_empty(), "{:?}", log.lock().unwrap());
    let _ = (&p.client, &p.server);
}
