//! The proxy driven in-process through the test source
//! (`source::memory::MemorySource`, feature `test-util`): configuration
//! and credentials pushed as the control plane will push them, and what a
//! peer of the proxy observes on real sockets.

use std::net::SocketAddr;
use std::time::Duration;

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use meshward_proxy::source::memory::MemorySource;
use meshward_proxy::{AccessLogTo, Options, Proxy};
use meshward_test_support::ca::{MeshCa, WorkloadCerts};
use meshward_test_support::http::{get, h2_handshake};
use meshward_test_support::mesh::{self, WorkloadEntry};
use meshward_test_support::tls::{MtlsStream, mtls_connect};
use meshward_test_support::{App, Echo, eventually, free_port, patience};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const NS: &str = "production";

/// A DENY of connections from `production/<sa>`.
fn deny_from(sa: &str) -> String {
    mesh::authorization_policy(
        NS,
        &format!("deny-{sa}"),
        &format!(
            "  action: DENY\n  rules: [{{from: [{{source: {{principals: [\"cluster.local/ns/{NS}/sa/{sa}\"]}}}}]}}]"
        ),
    )
}

/// A proxy for `production/orders` fed by a memory source.
struct Harness {
    source: MemorySource,
    proxy: Proxy,
    ca: MeshCa,
    dir: tempfile::TempDir,
    /// The orders workload's TCP port, on its proxy.
    inbound: SocketAddr,
    /// Its proxy's outbound listener.
    outbound: SocketAddr,
    /// Its HTTP port.
    inbound_http: SocketAddr,
    /// The TCP port's application, an echo server.
    echo: Echo,
    /// The HTTP port's application.
    app: App,
    /// The access log's lines.
    access_log: Arc<Mutex<Vec<String>>>,
}

impl Harness {
    /// Starts the proxy with mesh-wide STRICT mTLS, the orders
    /// WorkloadEntry (TCP port `tcp` to an echo application, HTTP port
    /// `http` to an HTTP/1.1 application) and `extra` resources.
    async fn start(extra: &str) -> Harness {
        let ca =
            MeshCa::generate("cluster.local", "meshward-test", Duration::from_secs(3600)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let inbound = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let inbound_http = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let outbound = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let echo = Echo::start().await;
        let app = App::start("orders").await;
        let ports = Ports {
            tcp: (inbound, echo.addr),
            http: (inbound_http, app.addr),
            outbound,
        };
        let access_log = Arc::new(Mutex::new(Vec::new()));
        let (source, feed) = MemorySource::new();
        source
            .push_yaml(&[("mesh.yaml", &config(&ports, extra))])
            .unwrap();
        let orders = ca
            .write_workload(&dir.path().join("orders-1"), NS, "orders")
            .unwrap();
        push_credentials(&source, &orders).unwrap();
        let options = Options {
            workload: format!("{NS}/orders"),
            admin: SocketAddr::from(([127, 0, 0, 1], 0)),
            metrics: None,
            access_log: AccessLogTo::Memory(Arc::clone(&access_log)),
            idle_timeout: meshward_proxy::DEFAULT_IDLE_TIMEOUT,
            dns: meshward_proxy::DnsConfig::System,
        };
        let proxy = meshward_proxy::start(feed, options).await.unwrap();
        Harness {
            source,
            proxy,
            ca,
            dir,
            inbound,
            outbound,
            inbound_http,
            echo,
            app,
            access_log,
        }
    }

    fn ports(&self) -> Ports {
        Ports {
            tcp: (self.inbound, self.echo.addr),
            http: (self.inbound_http, self.app.addr),
            outbound: self.outbound,
        }
    }

    /// Pushes the configuration again, with `extra` resources.
    fn push(&self, extra: &str) {
        self.source
            .push_yaml(&[("mesh.yaml", &config(&self.ports(), extra))])
            .unwrap();
    }

    /// The access log's entries of HTTP requests so far.
    fn http_entries(&self) -> Vec<serde_json::Value> {
        let lines = self.access_log.lock().unwrap().clone();
        lines
            .iter()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|e| e["kind"] == "http")
            .collect()
    }

    /// Issues credentials for `production/<sa>` (a new key and
    /// certificate each time).
    fn issue(&self, sa: &str) -> WorkloadCerts {
        let n = std::fs::read_dir(self.dir.path()).unwrap().count();
        self.ca
            .write_workload(&self.dir.path().join(format!("{sa}-{n}")), NS, sa)
            .unwrap()
    }

    /// An mTLS connection to the orders TCP port as `production/<sa>`.
    async fn connect_as(&self, caller: &WorkloadCerts) -> MtlsStream {
        mtls_connect(&caller.dir, &caller.root(), self.inbound, b"istio")
            .await
            .unwrap()
    }

    /// `GET path` on the admin endpoint: the body.
    async fn admin(&self, path: &str) -> String {
        let admin = self.proxy.admin_addr().unwrap();
        let (status, body) = get(admin, "admin", path, &[]).await.unwrap();
        assert_eq!(status, 200, "{path}: {body}");
        body
    }

    /// `/config_dump`'s `source.<which>`.
    async fn source_state(&self, which: &str) -> serde_json::Value {
        let dump: serde_json::Value =
            serde_json::from_str(&self.admin("/config_dump").await).unwrap();
        dump["source"][which].clone()
    }

    /// `meshward_config_rejected_total`.
    async fn rejected(&self) -> f64 {
        let m = self.admin("/stats/prometheus").await;
        m.lines()
            .find_map(|l| l.strip_prefix("meshward_config_rejected_total "))
            .map_or(0.0, |v| v.trim().parse().unwrap())
    }
}

/// The orders workload's ports on its proxy, each with its application.
struct Ports {
    tcp: (SocketAddr, SocketAddr),
    http: (SocketAddr, SocketAddr),
    /// The outbound listener.
    outbound: SocketAddr,
}

/// The mesh: STRICT mTLS mesh-wide, the orders workload, `extra`.
fn config(ports: &Ports, extra: &str) -> String {
    let orders = WorkloadEntry::new(NS, "orders")
        .port("tcp", ports.tcp.0.port())
        .port("http", ports.http.0.port())
        .app_ports(&[("tcp", ports.tcp.1), ("http", ports.http.1)])
        .outbound(ports.outbound.port())
        .yaml();
    format!("{}{orders}{extra}", mesh::mesh_strict())
}

fn push_credentials(
    source: &MemorySource,
    certs: &WorkloadCerts,
) -> Result<(), meshward_proxy::source::memory::PushError> {
    let read = |p: std::path::PathBuf| std::fs::read_to_string(p).unwrap();
    source.push_credentials_pem(
        &read(certs.chain()),
        &read(certs.key()),
        &read(certs.root()),
    )
}

/// Sends `text` and reads it back from the echo application.
async fn echo_back(conn: &mut MtlsStream, text: &str) -> Result<(), String> {
    conn.write_all(text.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; text.len()];
    match tokio::time::timeout(patience(), conn.read_exact(&mut buf)).await {
        Ok(Ok(_)) if buf == text.as_bytes() => Ok(()),
        Ok(Ok(_)) => Err(format!("got {:?}", String::from_utf8_lossy(&buf))),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer".to_string()),
    }
}

/// Whether the proxy closed `conn` (end of stream or an error), waiting
/// at most the test patience.
async fn closed(conn: &mut MtlsStream) -> bool {
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(patience(), conn.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}

/// The leaf certificate the proxy presented on `conn`.
fn presented(conn: &MtlsStream) -> Vec<u8> {
    conn.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

/// The DER of the leaf in `certs`' chain file.
fn leaf_of(certs: &WorkloadCerts) -> Vec<u8> {
    let pem = std::fs::read(certs.chain()).unwrap();
    meshward_identity::pem::certs_from_pem(&pem, &certs.chain()).unwrap()[0].to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_change_closes_an_open_tcp_connection_the_new_policy_denies() {
    let h = Harness::start("").await;
    let frontend = h.issue("frontend");
    let reports = h.issue("reports");
    let mut denied_later = h.connect_as(&frontend).await;
    let mut still_allowed = h.connect_as(&reports).await;
    echo_back(&mut denied_later, "before").await.unwrap();
    echo_back(&mut still_allowed, "before").await.unwrap();

    h.push(&deny_from("frontend"));
    assert!(
        closed(&mut denied_later).await,
        "the connection the new policy denies stays open"
    );
    // The other one is untouched, and a new frontend connection refused.
    echo_back(&mut still_allowed, "after").await.unwrap();
    let mut again = h.connect_as(&frontend).await;
    assert!(echo_back(&mut again, "again").await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_update_is_presented_on_the_next_handshake_while_open_connections_stay() {
    let h = Harness::start("").await;
    let frontend = h.issue("frontend");
    let mut open = h.connect_as(&frontend).await;
    echo_back(&mut open, "one").await.unwrap();
    let first = presented(&open);

    let renewed = h.issue("orders");
    push_credentials(&h.source, &renewed).unwrap();
    let want = leaf_of(&renewed);
    assert_ne!(first, want);
    eventually("the renewed certificate on a new handshake", || async {
        let conn = h.connect_as(&frontend).await;
        (presented(&conn) == want).then_some(())
    })
    .await;
    // The connection made before the renewal goes on.
    echo_back(&mut open, "two").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_update_is_refused_counted_and_the_previous_state_keeps_serving() {
    let h = Harness::start(&deny_from("intruder")).await;
    let frontend = h.issue("frontend");
    let intruder = h.issue("intruder");
    assert_eq!(h.rejected().await, 0.0);

    // Serves what it had: frontend through, intruder refused.
    let serves_as_before = || async {
        let mut ok = h.connect_as(&frontend).await;
        echo_back(&mut ok, "ping").await.unwrap();
        let mut refused = h.connect_as(&intruder).await;
        assert!(echo_back(&mut refused, "ping").await.is_err());
        assert_eq!(presented(&ok), leaf_of(&orders_now(&h)));
    };

    // 1. Resources that do not validate (a DENY without rules' list).
    let invalid = mesh::authorization_policy(NS, "broken", "  action: DENY\n  rules: 7");
    assert!(
        h.source
            .push_yaml(&[("mesh.yaml", &config(&h.ports(), &invalid))])
            .is_err()
    );
    eventually("the first refusal counted", || async {
        (h.rejected().await == 1.0).then_some(())
    })
    .await;
    let s = h.source_state("config").await;
    assert_eq!(s["state"], "refused", "{s}");
    serves_as_before().await;

    // 2. Valid resources the proxy cannot apply: no WorkloadEntry for it.
    h.source
        .push_yaml(&[("mesh.yaml", &mesh::mesh_strict())])
        .unwrap();
    eventually("the second refusal counted", || async {
        (h.rejected().await == 2.0).then_some(())
    })
    .await;
    let s = h.source_state("config").await;
    assert_eq!(s["state"], "refused", "{s}");
    assert!(
        s["error"].as_str().is_some_and(|e| e.contains("orders")),
        "{s}"
    );
    serves_as_before().await;

    // 3. Credentials of another workload.
    push_credentials(&h.source, &h.issue("frontend")).unwrap();
    eventually("the third refusal counted", || async {
        (h.rejected().await == 3.0).then_some(())
    })
    .await;
    let s = h.source_state("certs").await;
    assert_eq!(s["state"], "refused", "{s}");
    serves_as_before().await;

    // A good update after them applies.
    h.push("");
    eventually("the intruder let in by the next good update", || async {
        let mut c = h.connect_as(&intruder).await;
        echo_back(&mut c, "ping").await.ok()
    })
    .await;
    assert_eq!(h.source_state("config").await["state"], "ok");
}

/// The orders credentials the harness started with.
fn orders_now(h: &Harness) -> WorkloadCerts {
    WorkloadCerts {
        dir: h.dir.path().join("orders-1"),
    }
}

/// A request the policy denies is refused identically over HTTP/1.1 and
/// HTTP/2: one admission path decides both (status, body, response flag,
/// and the access log's decision, reason and policy).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_request_is_refused_identically_over_http1_and_http2() {
    let h = Harness::start(&mesh::authorization_policy(
        NS,
        "no-admin",
        "  action: DENY\n  rules: [{to: [{operation: {paths: [\"/admin\"]}}]}]",
    ))
    .await;
    let frontend = h.issue("frontend");
    let host = "orders.production.svc.cluster.local";

    let tls = mtls_connect(
        &frontend.dir,
        &frontend.root(),
        h.inbound_http,
        b"istio-http/1.1",
    )
    .await
    .unwrap();
    let (mut h1, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let tls = mtls_connect(&frontend.dir, &frontend.root(), h.inbound_http, b"h2")
        .await
        .unwrap();
    let mut h2 = h2_handshake(tls).await;

    let mut answers = Vec::new();
    for (version, path) in [
        (http::Version::HTTP_11, "/api"),
        (http::Version::HTTP_11, "/admin"),
        (http::Version::HTTP_2, "/api"),
        (http::Version::HTTP_2, "/admin"),
    ] {
        let uri = if version == http::Version::HTTP_2 {
            format!("http://{host}{path}")
        } else {
            path.to_string()
        };
        let req = http::Request::builder()
            .uri(uri)
            .header("host", host)
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = if version == http::Version::HTTP_2 {
            h2.ready().await.unwrap();
            h2.send_request(req).await.unwrap()
        } else {
            h1.ready().await.unwrap();
            h1.send_request(req).await.unwrap()
        };
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        answers.push((path, status, body));
    }
    assert_eq!(answers[0].1, 200, "HTTP/1.1 /api");
    assert_eq!(answers[2].1, 200, "HTTP/2 /api");
    assert_eq!(answers[1].1, 403, "HTTP/1.1 /admin");
    assert_eq!(
        (answers[1].1, &answers[1].2),
        (answers[3].1, &answers[3].2),
        "the refusals differ (HTTP/1.1, then HTTP/2)"
    );

    let entries = eventually("four access-log entries", || async {
        let e = h.http_entries();
        (e.len() == 4).then_some(e)
    })
    .await;
    let denied: Vec<&serde_json::Value> =
        entries.iter().filter(|e| e["path"] == "/admin").collect();
    assert_eq!(denied.len(), 2, "{entries:?}");
    for field in [
        "response_code",
        "response_flags",
        "decision",
        "reason",
        "policy",
        "rule",
    ] {
        assert_eq!(
            denied[0][field], denied[1][field],
            "{field} differs between HTTP/1.1 and HTTP/2: {denied:?}"
        );
    }
    let d = denied[0];
    assert_eq!(
        (
            &d["decision"],
            &d["reason"],
            &d["policy"],
            &d["response_code"],
            &d["response_flags"]
        ),
        (
            &serde_json::json!("deny"),
            &serde_json::json!("deny_matched"),
            &serde_json::json!("production/no-admin"),
            &serde_json::json!(403),
            &serde_json::json!("-"),
        ),
        "{d}"
    );
}

/// A mesh workload's HTTP/2 server (mTLS with `certs`, ALPN `h2`) that
/// answers one request per connection and then closes it, so that every
/// request after the first comes on a new connection; it records the
/// leaf certificate each client presented, in order.
struct MeshH2Server {
    addr: SocketAddr,
    clients: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl MeshH2Server {
    async fn start(certs: &WorkloadCerts) -> MeshH2Server {
        use meshward_identity::verify::TrustDomains;
        let creds = meshward_identity::WorkloadCredentials::from_dir(&certs.dir).unwrap();
        let bundle = meshward_identity::TrustBundle::from_pem_file(&certs.root()).unwrap();
        let verifier = meshward_identity::SvidVerifier::new(bundle, TrustDomains::any());
        let mut config = meshward_identity::server_config(
            verifier,
            meshward_identity::CredentialResolver::fixed(creds),
        )
        .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let clients = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&clients);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let seen = Arc::clone(&seen);
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    if let Some(leaf) = tls.get_ref().1.peer_certificates().and_then(|c| c.first())
                    {
                        seen.lock().unwrap().push(leaf.to_vec());
                    }
                    serve_one_h2(tls).await;
                });
            }
        });
        MeshH2Server { addr, clients }
    }

    /// The certificate the last client presented.
    fn last_client(&self) -> Option<Vec<u8>> {
        self.clients.lock().unwrap().last().cloned()
    }
}

/// Serves HTTP/2 on `io` until one request is answered, then closes the
/// connection gracefully (GOAWAY).
async fn serve_one_h2<T>(io: T)
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (done, answered) = tokio::sync::oneshot::channel::<()>();
    let done = Mutex::new(Some(done));
    let svc = hyper::service::service_fn(move |_req| {
        if let Some(done) = done.lock().unwrap().take() {
            let _ = done.send(());
        }
        async {
            Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from_static(
                b"ratings",
            ))))
        }
    });
    let conn = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
        .serve_connection(hyper_util::rt::TokioIo::new(io), svc);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => return,
        _ = answered => {}
    }
    conn.as_mut().graceful_shutdown();
    let _ = conn.await;
}

/// After a certificate rotation, a new outbound connection to an HTTP/2
/// (gRPC) service presents the new certificate. (Connections through
/// hyper's client once kept the client config their pool key was first
/// registered with, so they presented the old certificate, and would
/// have until it expired.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_outbound_h2_connection_presents_the_rotated_certificate() {
    let h = Harness::start("").await;
    let ratings = MeshH2Server::start(&h.issue("ratings")).await;
    h.push(&format!(
        "{}{}",
        WorkloadEntry::new(NS, "ratings")
            .port("grpc", ratings.addr.port())
            .yaml(),
        mesh::service_entry(
            NS,
            "ratings",
            "ratings",
            "{number: 9090, name: grpc, protocol: GRPC}"
        ),
    ));
    let host = "ratings.production.svc.cluster.local:9090";
    let through = || async {
        get(h.outbound, host, "/", &[])
            .await
            .filter(|(status, body)| *status == 200 && body == "ratings")
    };
    eventually("a request through to ratings", through).await;
    assert_eq!(ratings.last_client(), Some(leaf_of(&orders_now(&h))));

    let renewed = h.issue("orders");
    push_credentials(&h.source, &renewed).unwrap();
    let want = leaf_of(&renewed);
    eventually(
        "the renewed certificate on a new upstream connection",
        || async {
            through().await?;
            (ratings.last_client() == Some(want.clone())).then_some(())
        },
    )
    .await;
}

/// A `std::io::Write` into a shared buffer, for a test's log subscriber.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    /// The spans closed so far (`FmtSpan::CLOSE` events): each one's
    /// fields, with its `name`, and the spans it was in (`parents`,
    /// outermost first).
    fn closed_spans(&self) -> Vec<serde_json::Value> {
        let bytes = self.0.lock().unwrap().clone();
        String::from_utf8_lossy(&bytes)
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|e| e["fields"]["message"] == "close")
            .map(|e| {
                let mut span = e["span"].clone();
                // The spans it was in (the closed one is not listed).
                span["parents"] = e["spans"].clone();
                span
            })
            .collect()
    }
}

/// Each connection and each request runs in a span with STYLE.md's
/// fields: inbound (`src.addr`, `src.identity`, `dst.addr`,
/// `dst.identity`, `tls.mode`, and per request `decision`, `policy`,
/// `reason`) and outbound (the destination a request was routed to).
/// A current-thread runtime: every task of the proxy runs on this thread,
/// under this test's subscriber.
#[tokio::test]
async fn connections_and_requests_run_in_spans_with_the_style_fields() {
    use tracing_subscriber::fmt::format::FmtSpan;
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .json()
        .with_max_level(tracing::Level::DEBUG)
        .with_span_events(FmtSpan::CLOSE)
        .with_writer(move || writer.clone())
        .finish();
    let _default = tracing::subscriber::set_default(subscriber);

    let h = Harness::start(&format!(
        "{}{}",
        mesh::authorization_policy(
            NS,
            "no-admin",
            "  action: DENY\n  rules: [{to: [{operation: {paths: [\"/admin\"]}}]}]",
        ),
        mesh::service_entry(
            NS,
            "orders",
            "orders",
            "{number: 8080, name: http, protocol: HTTP}"
        ),
    ))
    .await;
    let host = "orders.production.svc.cluster.local:8080";
    // Through the outbound listener to the orders service (this same
    // proxy's inbound port, over mesh mTLS): one allowed, one denied.
    let (ok, _) = get(h.outbound, host, "/api", &[]).await.unwrap();
    let (denied, _) = get(h.outbound, host, "/admin", &[]).await.unwrap();
    assert_eq!((ok, denied), (200, 403));

    let orders = format!("spiffe://cluster.local/ns/{NS}/sa/orders");
    // The requests' spans close with their requests; the inbound
    // connection (pooled by the outbound side) stays open, so its fields
    // are read as a request span's parent.
    let spans = eventually("the requests' spans closed", || async {
        let spans = captured.closed_spans();
        let requests = spans.iter().filter(|s| s["name"] == "request").count();
        let outbound = spans.iter().filter(|s| s["name"] == "outbound").count();
        (requests >= 4 && outbound >= 2).then_some(spans)
    })
    .await;
    let request = |path: &str, side: &str| {
        spans
            .iter()
            .find(|s| s["name"] == "request" && s["path"] == path && s.get(side).is_some())
            .unwrap_or_else(|| panic!("no request span for {path} with {side}: {spans:?}"))
            .clone()
    };
    let refused = request("/admin", "decision");
    let inbound = refused["parents"]
        .as_array()
        .and_then(|p| p.iter().find(|s| s["name"] == "inbound"))
        .unwrap_or_else(|| panic!("the request span is not in an inbound span: {refused}"))
        .clone();
    assert_eq!(inbound["src.identity"], orders.as_str(), "{inbound}");
    assert_eq!(inbound["dst.identity"], orders.as_str(), "{inbound}");
    assert_eq!(inbound["tls.mode"], "mutual_tls", "{inbound}");
    assert_eq!(inbound["dst.addr"], h.inbound_http.to_string(), "{inbound}");
    assert!(inbound["src.addr"].is_string(), "{inbound}");
    assert_eq!(refused["decision"], "deny", "{refused}");
    assert_eq!(refused["policy"], "production/no-admin", "{refused}");
    assert_eq!(refused["reason"], "deny_matched", "{refused}");
    let admitted = request("/api", "decision");
    assert_eq!(admitted["decision"], "allow", "{admitted}");

    let routed = request("/api", "dst.service");
    assert_eq!(
        routed["dst.service"], "orders.production.svc.cluster.local",
        "{routed}"
    );
    assert_eq!(routed["dst.identity"], orders.as_str(), "{routed}");
    assert_eq!(routed["tls.mode"], "mutual_tls", "{routed}");
    assert_eq!(routed["dst.addr"], h.inbound_http.to_string(), "{routed}");
    let outbound = spans.iter().find(|s| s["name"] == "outbound").unwrap();
    assert_eq!(outbound["src.identity"], orders.as_str(), "{outbound}");
}
