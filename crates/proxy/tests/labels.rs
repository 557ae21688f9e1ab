//! Istio's workload labels on the metrics, the outbound source address
//! and the inbound flow table (`/debug/flows`), on real proxies: each
//! workload on its own loopback address, as `meshward up` runs them, so
//! that a peer's address names its workload.

mod support;

use std::net::IpAddr;

use support::*;

const ORDERS_IP: &str = "127.0.1.5";
const FRONTEND_IP: &str = "127.0.3.1";
const BILLING_IP: &str = "127.0.4.1";
const UNKNOWN_IP: &str = "127.0.9.9";
const HOST: &str = "orders.production.svc.cluster.local";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Two proxies, `production/orders` (HTTP port PERMISSIVE, TCP port
/// STRICT, `/admin` denied) and `production/frontend` (an outbound
/// listener), and workloads without a proxy of theirs in the registry:
/// `legacy/billing`, and `production/pay-a` and `pay-b`, which share
/// service account `pay`.
struct Mesh {
    ca: MeshCa,
    dir: tempfile::TempDir,
    orders: Proxy,
    frontend: Proxy,
    _sources: [MemorySource; 2],
    orders_log: Arc<Mutex<Vec<String>>>,
    /// The orders ports on its proxy.
    http: SocketAddr,
    tcp: SocketAddr,
    /// The frontend proxy's outbound listener.
    outbound: SocketAddr,
    _app: App,
    _echo: Echo,
}

impl Mesh {
    /// The mesh, with `extra` resources.
    async fn start(extra: &str) -> Mesh {
        let ca =
            MeshCa::generate("cluster.local", "meshward-test", Duration::from_secs(3600)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let app = App::start("orders").await;
        let echo = Echo::start().await;
        let http = SocketAddr::new(ip(ORDERS_IP), free_port());
        let tcp = SocketAddr::new(ip(ORDERS_IP), free_port());
        let outbound = SocketAddr::new(ip(FRONTEND_IP), free_port());
        let we = |name: &str, address: &str| WorkloadEntry::new(NS, name).address(address);
        let yaml = [
            we("orders", ORDERS_IP)
                .label("version", "v1")
                .port("http", http.port())
                .port("tcp", tcp.port())
                .app_ports(&[("http", app.addr), ("tcp", echo.addr)])
                .yaml(),
            we("frontend", FRONTEND_IP)
                .label("version", "v2")
                .annotation("meshward.io/outbound", &outbound.to_string())
                .yaml(),
            WorkloadEntry::new("legacy", "billing")
                .address(BILLING_IP)
                .annotation("meshward.io/proxy", "false")
                .port("http", 8080)
                .yaml(),
            we("pay-a", "127.0.2.1").service_account("pay").app("pay").yaml(),
            we("pay-b", "127.0.2.2").service_account("pay").app("pay").yaml(),
            mesh::service_entry(
                NS,
                "orders",
                "orders",
                "{number: 8080, name: http, protocol: HTTP}, {number: 9000, name: tcp, protocol: TCP}",
            ),
            format!(
                "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: orders, namespace: {NS}}}\nspec:\n  selector: {{matchLabels: {{app: orders}}}}\n  mtls: {{mode: PERMISSIVE}}\n  portLevelMtls: {{{}: {{mode: STRICT}}}}\n---\n",
                tcp.port()
            ),
            // On the HTTP port only: on a TCP port, a DENY ignores the
            // HTTP fields it cannot match, and denies every connection.
            mesh::authorization_policy(
                NS,
                "no-admin",
                &format!(
                    "  selector: {{matchLabels: {{app: orders}}}}\n  action: DENY\n  rules: [{{to: [{{operation: {{ports: [\"{}\"], paths: [\"/admin\"]}}}}]}}]",
                    http.port()
                ),
            ),
            extra.to_string(),
        ]
        .concat();
        let start = |name: &'static str, log: Arc<Mutex<Vec<String>>>| {
            let (source, feed) = MemorySource::new();
            source.push_yaml(&[("mesh.yaml", &yaml)]).unwrap();
            let certs = ca.write_workload(&dir.path().join(name), NS, name).unwrap();
            push_credentials(&source, &certs).unwrap();
            let options = Options {
                workload: format!("{NS}/{name}"),
                admin: SocketAddr::from(([127, 0, 0, 1], 0)),
                metrics: None,
                access_log: AccessLogTo::Memory(log),
                idle_timeout: meshward_proxy::DEFAULT_IDLE_TIMEOUT,
                dns: meshward_proxy::DnsConfig::System,
                access_log_buffer: meshward_proxy::DEFAULT_ACCESS_LOG_BUFFER,
                overrides: Default::default(),
                dns_proxy: None,
            };
            (source, meshward_proxy::start(feed, options))
        };
        let orders_log = Arc::new(Mutex::new(Vec::new()));
        let (orders_source, orders) = start("orders", Arc::clone(&orders_log));
        let (frontend_source, frontend) = start("frontend", Arc::default());
        let (orders, frontend) = (orders.await.unwrap(), frontend.await.unwrap());
        Mesh {
            ca,
            dir,
            orders,
            frontend,
            _sources: [orders_source, frontend_source],
            orders_log,
            http,
            tcp,
            outbound,
            _app: app,
            _echo: echo,
        }
    }

    async fn admin(proxy: &Proxy, path: &str) -> String {
        let (status, body) = get(proxy.admin_addr().unwrap(), "admin", path, &[])
            .await
            .unwrap();
        assert_eq!(status, 200, "{path}: {body}");
        body
    }

    /// The orders proxy's `/debug/flows`.
    async fn flows(&self) -> serde_json::Value {
        serde_json::from_str(&Mesh::admin(&self.orders, "/debug/flows").await).unwrap()
    }

    /// Waits until `proxy`'s metrics have a `name` series with `labels`
    /// that has counted something; returns its value.
    async fn series(&self, proxy: &Proxy, name: &str, labels: &[(&str, &str)]) -> f64 {
        let what = format!("{name} with {labels:?}");
        eventually(&what, || async {
            let metrics = Mesh::admin(proxy, "/stats/prometheus").await;
            find_series(&metrics, name, labels).filter(|v| *v > 0.0)
        })
        .await
    }
}

/// The value of the first series of `name` that has all of `labels`.
fn find_series(metrics: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    metrics.lines().find_map(|l| {
        let rest = l.strip_prefix(name)?.strip_prefix('{')?;
        let (set, value) = rest.rsplit_once("} ")?;
        labels
            .iter()
            .all(|(k, v)| set.split(',').any(|kv| kv == format!("{k}=\"{v}\"")))
            .then(|| value.trim().parse().ok())?
    })
}

/// The flow of `flows` from `address` to `port`.
fn flow<'a>(
    flows: &'a serde_json::Value,
    address: &str,
    port: u16,
) -> Option<&'a serde_json::Value> {
    flows["flows"]
        .as_array()?
        .iter()
        .find(|f| f["source"]["address"] == address && f["port"] == port)
}

/// A GET over mTLS from `from` as workload `sa`, on a new connection:
/// its status.
async fn mtls_get(m: &Mesh, from: &str, sa: &str) -> u16 {
    let certs =
        m.ca.write_workload(&m.dir.path().join(format!("{sa}-{from}")), NS, sa)
            .unwrap();
    let tls = meshward_test_support::tls::mtls_connect_from(
        Some(ip(from)),
        &certs.dir,
        &certs.root(),
        m.http,
        b"istio-http/1.1",
    )
    .await
    .unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    meshward_test_support::http::send_on(&mut send, "GET", HOST, "/api", &[])
        .await
        .unwrap()
        .0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mtls_callers_metrics_name_both_workloads_and_it_calls_from_its_own_address() {
    let m = Mesh::start("").await;
    let (status, body) = get(m.outbound, HOST, "/api", &[]).await.unwrap();
    assert_eq!((status, body.as_str()), (200, "orders"));

    // The destination names the caller from its identity, and itself.
    let frontend_id = "spiffe://cluster.local/ns/production/sa/frontend";
    m.series(
        &m.orders,
        "istio_requests_total",
        &[
            ("reporter", "destination"),
            ("source_workload", "frontend"),
            ("source_workload_namespace", NS),
            ("source_principal", frontend_id),
            ("source_app", "frontend"),
            ("source_version", "v2"),
            ("source_canonical_service", "frontend"),
            ("source_canonical_revision", "v2"),
            ("destination_workload", "orders"),
            ("destination_app", "orders"),
            ("destination_version", "v1"),
            ("destination_canonical_service", "orders"),
            ("destination_canonical_revision", "v1"),
            ("destination_service", HOST),
            ("destination_service_name", "orders"),
            ("destination_service_namespace", NS),
            ("connection_security_policy", "mutual_tls"),
            ("response_code", "200"),
        ],
    )
    .await;
    // The caller names the destination workload from its endpoint.
    m.series(
        &m.frontend,
        "istio_requests_total",
        &[
            ("reporter", "source"),
            ("source_workload", "frontend"),
            ("source_app", "frontend"),
            ("source_version", "v2"),
            ("destination_workload", "orders"),
            ("destination_workload_namespace", NS),
            ("destination_app", "orders"),
            ("destination_version", "v1"),
            ("destination_canonical_service", "orders"),
            ("destination_service", HOST),
            ("destination_service_name", "orders"),
            ("destination_service_namespace", NS),
            ("connection_security_policy", "mutual_tls"),
        ],
    )
    .await;

    // The frontend proxy connected from the frontend workload's address.
    let src = eventually("the request in the orders access log", || async {
        let lines = m.orders_log.lock().unwrap().clone();
        lines.iter().find_map(|l| {
            let e: serde_json::Value = serde_json::from_str(l).unwrap();
            (e["kind"] == "http").then(|| e["src.addr"].as_str().unwrap().to_string())
        })
    })
    .await;
    assert!(src.starts_with(&format!("{FRONTEND_IP}:")), "{src}");
    let flows = m.flows().await;
    let f = flow(&flows, FRONTEND_IP, m.http.port()).unwrap_or_else(|| panic!("{flows:#}"));
    assert_eq!(
        f["source"],
        serde_json::json!({"workload": "frontend", "namespace": NS, "principal": frontend_id, "address": FRONTEND_IP})
    );
    assert_eq!(
        (
            &f["protocol"],
            &f["security"],
            &f["connections"],
            &f["requests"],
            &f["denied"]
        ),
        (
            &"http".into(),
            &"mutual_tls".into(),
            &1.into(),
            &1.into(),
            &0.into()
        ),
        "{f:#}"
    );
    assert_eq!(flows["workload"], "production/orders");
    assert_eq!(
        flows["identity"],
        "spiffe://cluster.local/ns/production/sa/orders"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_callers_are_named_by_address_and_counted_in_the_flow_table() {
    let m = Mesh::start("").await;
    let from = |a: &str| Some(ip(a));
    let send = |a: &'static str, path: &'static str| {
        meshward_test_support::http::request_from(from(a), m.http, "GET", HOST, path, &[])
    };
    assert_eq!(send(BILLING_IP, "/api").await.unwrap().0, 200);
    assert_eq!(send(BILLING_IP, "/admin").await.unwrap().0, 403);
    assert_eq!(send(UNKNOWN_IP, "/api").await.unwrap().0, 200);
    // Plaintext on the STRICT port is refused.
    let mut conn = meshward_test_support::http::tcp_from(from(BILLING_IP), m.tcp)
        .await
        .unwrap();
    conn.write_all(b"hello").await.unwrap();
    let mut buf = [0u8; 8];
    let read = tokio::time::timeout(patience(), conn.read(&mut buf))
        .await
        .expect("the refused connection is closed");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");

    let billing = [
        ("reporter", "destination"),
        ("source_workload", "billing"),
        ("source_workload_namespace", "legacy"),
        ("source_principal", "unknown"),
        ("source_app", "billing"),
        ("source_canonical_service", "billing"),
        ("destination_workload", "orders"),
        ("connection_security_policy", "none"),
    ];
    let with = |extra: (&'static str, &'static str)| {
        let mut l = billing.to_vec();
        l.push(extra);
        l
    };
    assert_eq!(
        m.series(
            &m.orders,
            "istio_requests_total",
            &with(("response_code", "200"))
        )
        .await,
        1.0
    );
    assert_eq!(
        m.series(
            &m.orders,
            "istio_requests_total",
            &with(("response_code", "403"))
        )
        .await,
        1.0
    );
    // The seed's query names the plaintext caller refused on the STRICT port.
    m.series(
        &m.orders,
        "istio_tcp_connections_opened_total",
        &with(("destination_service", HOST)),
    )
    .await;
    m.series(
        &m.orders,
        "istio_requests_total",
        &[
            ("source_workload", "unknown"),
            ("source_workload_namespace", "unknown"),
            ("source_app", "unknown"),
            ("connection_security_policy", "none"),
            ("response_code", "200"),
        ],
    )
    .await;

    let flows = m.flows().await;
    let http = flow(&flows, BILLING_IP, m.http.port()).unwrap_or_else(|| panic!("{flows:#}"));
    assert_eq!(
        http["source"],
        serde_json::json!({"workload": "billing", "namespace": "legacy", "principal": null, "address": BILLING_IP})
    );
    let counts = |f: &serde_json::Value| {
        ["connections", "requests", "denied", "refused"].map(|k| f[k].as_u64().unwrap())
    };
    assert_eq!(
        (&http["protocol"], &http["security"]),
        (&"http".into(), &"none".into())
    );
    assert_eq!(counts(http), [2, 2, 1, 0], "{http:#}");
    let refused = flow(&flows, BILLING_IP, m.tcp.port()).unwrap_or_else(|| panic!("{flows:#}"));
    assert_eq!(refused["protocol"], "tcp");
    assert_eq!(counts(refused), [0, 0, 0, 1], "{refused:#}");
    let unknown = flow(&flows, UNKNOWN_IP, m.http.port()).unwrap_or_else(|| panic!("{flows:#}"));
    assert_eq!(
        unknown["source"],
        serde_json::json!({"workload": null, "namespace": null, "principal": null, "address": UNKNOWN_IP})
    );
    // The minutes add up to the totals, each starting on a minute, within
    // the hour before `now`.
    let now = flows["now"].as_i64().unwrap();
    assert_eq!(flows["window_minutes"], 60);
    assert_eq!(flows["overflow"], 0);
    assert!(flows["started"].as_i64().unwrap() <= now);
    let minutes = http["minutes"].as_array().unwrap();
    assert!(!minutes.is_empty() && minutes.len() <= 2, "{http:#}");
    let mut sum = [0; 4];
    for b in minutes {
        let start = b["start"].as_i64().unwrap();
        assert_eq!(start % 60, 0);
        assert!(start <= now && now - start < 3600);
        for (s, n) in sum.iter_mut().zip(counts(b)) {
            *s += n;
        }
    }
    assert_eq!(sum, counts(http));
    assert!(http["first_seen"].as_i64().unwrap() <= http["last_seen"].as_i64().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workloads_sharing_a_service_account_are_told_apart_by_address() {
    let m = Mesh::start("").await;
    assert_eq!(mtls_get(&m, "127.0.2.2", "pay").await, 200);
    assert_eq!(mtls_get(&m, "127.0.2.1", "pay").await, 200);
    assert_eq!(mtls_get(&m, "127.0.0.1", "pay").await, 200);
    for (workload, version) in [("pay-a", "unknown"), ("pay-b", "unknown")] {
        m.series(
            &m.orders,
            "istio_requests_total",
            &[
                ("source_workload", workload),
                ("source_workload_namespace", NS),
                ("source_app", "pay"),
                ("source_version", version),
                ("connection_security_policy", "mutual_tls"),
            ],
        )
        .await;
    }
    // From an address neither has: the identity's namespace, no workload.
    m.series(
        &m.orders,
        "istio_requests_total",
        &[
            ("source_workload", "unknown"),
            ("source_workload_namespace", NS),
            (
                "source_principal",
                "spiffe://cluster.local/ns/production/sa/pay",
            ),
        ],
    )
    .await;
    let flows = m.flows().await;
    let b = flow(&flows, "127.0.2.2", m.http.port()).unwrap_or_else(|| panic!("{flows:#}"));
    assert_eq!(b["source"]["workload"], "pay-b");
    let none = flow(&flows, "127.0.0.1", m.http.port()).unwrap_or_else(|| panic!("{flows:#}"));
    assert_eq!(none["source"]["workload"], serde_json::Value::Null);
    assert_eq!(
        none["source"]["principal"],
        "spiffe://cluster.local/ns/production/sa/pay"
    );
}

/// A connection to the frontend's outbound listener whose requests go to
/// two workloads of one service: each request's reporter=source series
/// names the workload it went to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_on_one_connection_name_the_endpoint_workload_each_went_to() {
    // orders-v2 runs without a proxy, on its own address.
    let listener = tokio::net::TcpListener::bind("127.0.1.6:0").await.unwrap();
    let v2 = listener.local_addr().unwrap();
    let server = tokio::spawn(meshward_test_support::app::serve_on(
        listener,
        meshward_test_support::app::Protocol::Http1,
        |_req| async { http::Response::new(Full::new(Bytes::from_static(b"v2"))) },
    ));
    let extra = WorkloadEntry::new(NS, "orders-v2")
        .address("127.0.1.6")
        .app("orders")
        .label("version", "v2")
        .annotation("meshward.io/proxy", "false")
        .port("http", v2.port())
        .yaml();
    let m = Mesh::start(&extra).await;
    let mut conn = meshward_test_support::http::connect(m.outbound).await;
    let mut bodies = Vec::new();
    for _ in 0..4 {
        let (status, body) =
            meshward_test_support::http::send_on(&mut conn, "GET", HOST, "/api", &[])
                .await
                .unwrap();
        assert_eq!(status, 200);
        bodies.push(body);
    }
    bodies.sort();
    bodies.dedup();
    assert_eq!(bodies, ["orders", "v2"]);
    for (workload, version, security) in
        [("orders", "v1", "mutual_tls"), ("orders-v2", "v2", "none")]
    {
        let labels = [
            ("reporter", "source"),
            ("destination_workload", workload),
            ("destination_version", version),
            ("destination_service", HOST),
            ("connection_security_policy", security),
        ];
        // Round robin: two requests each (counted once their response
        // has gone).
        eventually(&format!("two requests to {workload}"), || async {
            let metrics = Mesh::admin(&m.frontend, "/stats/prometheus").await;
            (find_series(&metrics, "istio_requests_total", &labels) == Some(2.0)).then_some(())
        })
        .await;
    }
    server.abort();
}

/// TCP flows over mTLS: one allowed (its caller named by identity alone,
/// from an address that is not its workload's), one denied by policy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_flows_over_mtls_count_connections_and_denials() {
    let m = Mesh::start(&deny_from("intruder")).await;
    let connect = |sa: &'static str| {
        let certs =
            m.ca.write_workload(&m.dir.path().join(format!("tcp-{sa}")), NS, sa)
                .unwrap();
        async move {
            mtls_connect(&certs.dir, &certs.root(), m.tcp, b"istio")
                .await
                .unwrap()
        }
    };
    let mut allowed = connect("frontend").await;
    echo_back(&mut allowed, "ping").await.unwrap();
    let mut denied = connect("intruder").await;
    assert!(echo_back(&mut denied, "ping").await.is_err());
    drop(allowed);

    let flows = m.flows().await;
    let of = |sa: &str| {
        flows["flows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| {
                f["port"] == m.tcp.port()
                    && f["source"]["principal"] == format!("spiffe://cluster.local/ns/{NS}/sa/{sa}")
            })
            .unwrap_or_else(|| panic!("{sa}: {flows:#}"))
            .clone()
    };
    let frontend = of("frontend");
    assert_eq!(frontend["source"]["workload"], "frontend", "{frontend:#}");
    assert_eq!(frontend["source"]["address"], "127.0.0.1");
    assert_eq!(
        (&frontend["protocol"], &frontend["security"]),
        (&"tcp".into(), &"mutual_tls".into())
    );
    assert_eq!(
        (
            &frontend["connections"],
            &frontend["requests"],
            &frontend["denied"]
        ),
        (&1.into(), &0.into(), &0.into())
    );
    let intruder = of("intruder");
    assert_eq!(intruder["source"]["workload"], serde_json::Value::Null);
    assert_eq!(intruder["source"]["namespace"], serde_json::Value::Null);
    assert_eq!(
        (&intruder["connections"], &intruder["denied"]),
        (&1.into(), &1.into()),
        "{intruder:#}"
    );
    // The metrics name the identified caller on the TCP series too.
    m.series(
        &m.orders,
        "istio_tcp_connections_opened_total",
        &[
            ("source_workload", "frontend"),
            ("destination_workload", "orders"),
            ("destination_service", HOST),
            ("connection_security_policy", "mutual_tls"),
        ],
    )
    .await;
}
