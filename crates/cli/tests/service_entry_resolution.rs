//! ServiceEntry `resolution` through a real `meshward proxy`: seed 000's
//! `external-api` ServiceEntry (`resolution: DNS`, no endpoints) and its
//! `MUTUAL` DestinationRule as written, with a DNS server on 127.0.0.1
//! that the test controls (`--dns-server`) and TLS servers that require a
//! client certificate on the loopback addresses the name resolves to; and
//! `resolution: NONE` without traffic capture.

mod support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use serde_json::Value;
use support::dns::{DnsAnswer, DnsServer};
use support::tls::{leaf, pki, tls_server_on, write};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Seed 000's external service, as written (only the files' paths are
/// replaced by the test's).
const SEED: &str = r#"
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata:
  name: external-api-mtls
  namespace: production
spec:
  host: api.external-service.com
  trafficPolicy:
    tls:
      mode: MUTUAL                    # Use mTLS with external service
      clientCertificate: /etc/certs/cert.pem
      privateKey: /etc/certs/key.pem
      caCertificates: /etc/certs/ca.pem

---

# ServiceEntry to register the external service in the mesh
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata:
  name: external-api
  namespace: production
spec:
  hosts:
    - api.external-service.com
  ports:
    - number: 443
      name: https
      protocol: HTTPS
  resolution: DNS
  location: MESH_EXTERNAL
"#;

const HOST: &str = "api.external-service.com";

/// A listener on `port` of a loopback address of its own (127.a.b.c), so
/// that other test runs do not collide. The seed's port has no
/// `targetPort`, so the proxy connects to port 443 of whatever the name
/// resolves to: the test binds 443 where it may (root, as in CI). Where
/// it may not (an unprivileged user), `port` 0 takes an ephemeral port,
/// which the ServiceEntry then names as `targetPort`, the one change to
/// the seed's YAML (see [`targeted`]).
async fn loopback_listener(not: &[IpAddr], port: u16) -> Option<tokio::net::TcpListener> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let mut seed = u64::from(std::process::id()) << 32 | u64::from(nanos);
    for _ in 0..64 {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let b = (seed >> 40).to_be_bytes();
        let ip = Ipv4Addr::new(127, 1 + b[5] % 250, b[6], 1 + b[7] % 254);
        if not.contains(&IpAddr::V4(ip)) {
            continue;
        }
        match tokio::net::TcpListener::bind((ip, port)).await {
            Ok(l) => return Some(l),
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => return None,
            Err(_) => continue,
        }
    }
    panic!("no free loopback address for port {port}");
}

/// Two listeners on one port of two loopback addresses: 443 where the
/// test may bind it, else an ephemeral port (with a note on stderr).
async fn two_listeners() -> (tokio::net::TcpListener, tokio::net::TcpListener) {
    if let Some(l1) = loopback_listener(&[], 443).await {
        let ip1 = l1.local_addr().unwrap().ip();
        let l2 = loopback_listener(&[ip1], 443).await.unwrap();
        return (l1, l2);
    }
    eprintln!(
        "note: binding port 443 needs root or CAP_NET_BIND_SERVICE; the test runs the seed's \
         ServiceEntry with a targetPort instead (CI runs it as written)"
    );
    let l1 = loopback_listener(&[], 0).await.unwrap();
    let (ip1, port) = (
        l1.local_addr().unwrap().ip(),
        l1.local_addr().unwrap().port(),
    );
    let l2 = loopback_listener(&[ip1], port)
        .await
        .expect("an unprivileged port");
    (l1, l2)
}

/// The seed's YAML, with `targetPort` added when the servers are not on
/// port 443.
fn targeted(seed: &str, port: u16) -> String {
    if port == 443 {
        return seed.to_string();
    }
    seed.replace(
        "      protocol: HTTPS\n",
        &format!("      protocol: HTTPS\n      targetPort: {port}\n"),
    )
}

async fn config_dump(p: &ProxyProcess) -> Value {
    let (status, body) = p.admin_get("/config_dump").await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// `/config_dump`'s entry for service `ns/name`.
fn service<'a>(dump: &'a Value, name: &str) -> &'a Value {
    dump["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no service {name} in {dump}"))
}

/// A plaintext HTTP/1.1 request through a TCP outbound listener; the
/// response's body.
async fn through_tcp(listener: SocketAddr) -> String {
    let mut s = tokio::net::TcpStream::connect(listener).await.unwrap();
    s.write_all(format!("GET / HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_external_api_resolves_by_dns_and_keeps_the_last_good_answer() {
    let mesh = Mesh::new();
    let server_pki = pki("external-service.com CA");
    let client_pki = pki("client CA the external service trusts");
    let (cert, key) = leaf(&server_pki, HOST);
    let (client_cert, client_key) = leaf(&client_pki, "frontend.production.client");
    let (l1, l2) = two_listeners().await;
    let (ip1, ip2) = (l1.local_addr().unwrap().ip(), l2.local_addr().unwrap().ip());
    let port = l1.local_addr().unwrap().port();
    let (IpAddr::V4(v4_1), IpAddr::V4(v4_2)) = (ip1, ip2) else {
        unreachable!("bound on IPv4")
    };
    let client_ca = Some(client_pki.ca_pem.as_str());
    let seen1 = tls_server_on(l1, (&cert, &key), client_ca, "first").await;
    let seen2 = tls_server_on(l2, (&cert, &key), client_ca, "second").await;
    let dns = DnsServer::start(HOST, DnsAnswer::A(vec![v4_1], 1)).await;

    let files = mesh.path("files");
    std::fs::create_dir_all(&files).unwrap();
    let seed = targeted(SEED, port)
        .replace(
            "/etc/certs/cert.pem",
            &write(&files, "cert.pem", &client_cert),
        )
        .replace("/etc/certs/key.pem", &write(&files, "key.pem", &client_key))
        .replace(
            "/etc/certs/ca.pem",
            &write(&files, "ca.pem", &server_pki.ca_pem),
        );
    mesh.write_config("external-api.yaml", &seed);
    let (out, tcp) = (free_port(), free_port());
    mesh.write_config(
        "frontend.yaml",
        &format!(
            "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata:\n  name: frontend\n  namespace: production\n  annotations:\n    meshward.io/outbound: \"127.0.0.1:{out}\"\n    meshward.io/tcp-outbound: \"127.0.0.1:{tcp}={HOST}:443\"\nspec: {{address: 127.0.0.1, labels: {{app: frontend}}, serviceAccount: frontend}}\n"
        ),
    );
    let dns_server = dns.addr.to_string();
    let front = mesh
        .proxy_with(
            "production/frontend",
            &mesh.issue("front", "production", "frontend"),
            &["--dns-server", &dns_server],
        )
        .await;
    let local = SocketAddr::from(([127, 0, 0, 1], out));

    // Ready means looked up: the first request goes through. The
    // application sends plaintext HTTP; the proxy originates TLS with the
    // DestinationRule's client certificate to port 443 of the address
    // the name resolved to.
    assert_eq!(
        get(local, HOST, "/", &[]).await,
        Some((200, "first".into()))
    );
    assert_eq!(
        seen1
            .lock()
            .unwrap()
            .iter()
            .map(Option::is_some)
            .collect::<Vec<_>>(),
        [true],
        "client certificate"
    );
    let line = front
        .log_line("call to the external API", |l| l["dst.service"] == HOST)
        .await;
    assert_eq!(line["tls.mode"], "mutual");
    assert_eq!(line["dst.addr"], format!("{ip1}:{port}"));
    // The same through a TCP outbound listener.
    assert!(
        through_tcp(SocketAddr::from(([127, 0, 0, 1], tcp)))
            .await
            .ends_with("first")
    );
    let dump = config_dump(&front).await;
    let svc = service(&dump, "production/external-api");
    assert_eq!(svc["resolution"], "DNS");
    assert_eq!(svc["dns"][0]["name"], HOST);
    assert_eq!(
        svc["dns"][0]["addresses"],
        serde_json::json!([ip1.to_string()])
    );
    assert_eq!(svc["dns"][0]["ttl_s"], 1);
    assert_eq!(svc["dns"][0]["last_error"], Value::Null);

    // The name server fails: the lookups fail (shown with their error)
    // and the last good answer stays in use.
    dns.set(DnsAnswer::ServFail);
    let failing = eventually("a failed lookup in /config_dump", || async {
        let dump = config_dump(&front).await;
        let d = service(&dump, "production/external-api")["dns"][0].clone();
        (d["failures"].as_u64() >= Some(1)).then_some(d)
    })
    .await;
    assert!(failing["last_error"].is_string(), "{failing}");
    assert_eq!(failing["addresses"], serde_json::json!([ip1.to_string()]));
    for _ in 0..3 {
        assert_eq!(
            get(local, HOST, "/", &[]).await,
            Some((200, "first".into()))
        );
    }

    // The name moves to another address: once looked up again, traffic
    // goes there.
    dns.set(DnsAnswer::A(vec![v4_2], 1));
    eventually("requests reach the new address", || async {
        (get(local, HOST, "/", &[]).await == Some((200, "second".into()))).then_some(())
    })
    .await;
    assert!(seen2.lock().unwrap().iter().all(Option::is_some));
    assert!(
        through_tcp(SocketAddr::from(([127, 0, 0, 1], tcp)))
            .await
            .ends_with("second")
    );
    let dump = config_dump(&front).await;
    let d = &service(&dump, "production/external-api")["dns"][0];
    assert_eq!(d["addresses"], serde_json::json!([ip2.to_string()]));
    assert_eq!(d["failures"], 0);
    assert!(dns.queries() >= 3, "{} queries", dns.queries());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolution_none_forwards_to_an_ip_host_and_refuses_a_host_name() {
    let mesh = Mesh::new();
    let app = App::start("legacy").await;
    let port = app.addr.port();
    // Answers only for api.external-service.com: other names are NXDOMAIN.
    let dns = DnsServer::start(HOST, DnsAnswer::A(vec![Ipv4Addr::LOCALHOST], 60)).await;
    let out = free_port();
    mesh.write_config(
        "mesh.yaml",
        &format!(
            r#"apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: frontend
  namespace: production
  annotations: {{meshward.io/outbound: "127.0.0.1:{out}"}}
spec: {{address: 127.0.0.1, labels: {{app: frontend}}, serviceAccount: frontend}}
---
# No resolution: NONE, Istio's default.
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: legacy, namespace: production}}
spec:
  hosts: [legacy.example.com]
  addresses: [127.0.0.0/8]
  ports: [{{number: {port}, name: http}}]
  location: MESH_EXTERNAL
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: missing, namespace: production}}
spec:
  hosts: [missing.example.com]
  ports: [{{number: 80, name: http}}]
  resolution: DNS
  location: MESH_EXTERNAL
"#
        ),
    );
    let dns_server = dns.addr.to_string();
    let front = mesh
        .proxy_with(
            "production/frontend",
            &mesh.issue("front", "production", "frontend"),
            &["--dns-server", &dns_server],
        )
        .await;
    let local = SocketAddr::from(([127, 0, 0, 1], out));

    // An IP in the service's addresses is the original destination.
    let by_ip = format!("127.0.0.1:{port}");
    assert_eq!(
        get(local, &by_ip, "/by-ip", &[]).await,
        Some((200, "legacy".into()))
    );
    assert_eq!(app.last().unwrap().path, "/by-ip");
    let line = front.log_line("by IP", |l| l["authority"] == by_ip).await;
    assert_eq!(line["dst.service"], "legacy.example.com");
    assert_eq!(line["dst.addr"], by_ip);

    // By name there is none: 503 with the reason, never a guess.
    let by_name = format!("legacy.example.com:{port}");
    assert_eq!(
        get(local, &by_name, "/by-name", &[]).await.map(|r| r.0),
        Some(503)
    );
    assert_eq!(app.seen.lock().unwrap().len(), 1);
    let line = front
        .log_line("by name", |l| l["authority"] == by_name)
        .await;
    assert!(
        line["reason"]
            .as_str()
            .unwrap()
            .contains("resolution NONE and no endpoints"),
        "{line}"
    );
    // An IP outside every NONE service's addresses names no service.
    assert_eq!(
        get(local, &format!("[::1]:{port}"), "/", &[])
            .await
            .map(|r| r.0),
        Some(404)
    );

    // A DNS name with no address (NXDOMAIN): 503, with the lookup's error.
    assert_eq!(
        get(local, "missing.example.com", "/", &[])
            .await
            .map(|r| r.0),
        Some(503)
    );
    let line = front
        .log_line("unresolved", |l| l["authority"] == "missing.example.com")
        .await;
    let reason = line["reason"].as_str().unwrap();
    assert!(
        reason.contains("DNS name missing.example.com has no address yet (last lookup:"),
        "{reason}"
    );
    let (_, metrics) = get(front.metrics, "metrics", "/stats/prometheus", &[])
        .await
        .unwrap();
    assert_eq!(
        metric(
            &metrics,
            "istio_requests_total",
            &[("response_code", "503"), ("response_flags", "UH")]
        ),
        2.0,
        "{metrics}"
    );
}
