//! `meshward proxy --outbound ADDR --app-port NAME=ADDR`: where this
//! host's outbound listener and application are, over the WorkloadEntry's
//! annotations (as `meshward up` starts each workload's proxy); and
//! `/access_log` of the running process, which `meshward call` reads.

mod support;

use std::net::SocketAddr;
use std::process::Command;

use support::*;

const NS: &str = "production";

/// The orders workload, whose annotations name an outbound listener and an
/// application that the command line overrides, and a ServiceEntry for
/// it, so that a request through its own outbound listener comes back to
/// its inbound port.
fn orders(inbound: u16) -> String {
    let unused = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let orders = WorkloadEntry::new(NS, "orders")
        .port("http", inbound)
        .app_ports(&[("http", unused)])
        .outbound(free_port())
        .yaml();
    let se = mesh::service_entry(
        NS,
        "orders",
        "orders",
        &format!("{{number: {inbound}, name: http, protocol: HTTP}}"),
    );
    format!("{}{orders}{se}", mesh::mesh_strict())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_line_places_the_outbound_listener_and_the_application() {
    let mesh = Mesh::new();
    let inbound = free_port();
    mesh.write_config("mesh.yaml", &orders(inbound));
    let certs = mesh.issue("orders", NS, "orders");
    let app = App::start("from the command line").await;
    let outbound = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let proxy = mesh
        .proxy_with(
            &format!("{NS}/orders"),
            &certs,
            &[
                "--outbound",
                &outbound.to_string(),
                "--app-port",
                &format!("http={}", app.addr),
            ],
        )
        .await;
    let host = format!("orders.{NS}.svc.cluster.local:{inbound}");
    let (status, body) = get(outbound, &host, "/", &[("x-request-id", "cli-1")])
        .await
        .expect("the outbound listener of the command line answers");
    assert_eq!(
        (status, body.as_str()),
        (200, "from the command line"),
        "{}",
        proxy.logs()
    );
    assert_eq!(
        app.last()
            .unwrap()
            .headers
            .get("x-request-id")
            .map(String::as_str),
        Some("cli-1")
    );

    // Both of its entries on /access_log, as stdout has them.
    let entries = eventually("the request's two entries", || async {
        let (status, body) = proxy.admin_get("/access_log?request_id=cli-1").await;
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let e = v["entries"].as_array()?.clone();
        (e.len() == 2).then_some(e)
    })
    .await;
    let logged = eventually("both lines on stdout", || async {
        let l: Vec<serde_json::Value> = proxy
            .access_log()
            .into_iter()
            .filter(|e| e["request_id"] == "cli-1")
            .collect();
        (l.len() == 2).then_some(l)
    })
    .await;
    for e in &entries {
        assert!(logged.contains(e), "{e} is not on stdout: {logged:?}");
    }
}

#[test]
fn an_app_port_for_no_port_of_the_workload_stops_the_proxy_with_why() {
    let mesh = Mesh::new();
    mesh.write_config("mesh.yaml", &orders(free_port()));
    let certs = mesh.issue("orders", NS, "orders");
    let out = Command::new(bin())
        .args(["proxy", "--config"])
        .arg(mesh.config_dir())
        .arg("--certs")
        .arg(&certs)
        .args([
            "-w",
            "production/orders",
            "--admin",
            "127.0.0.1:0",
            "--app-port",
            "grpc=127.0.0.1:9090",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(
            "WorkloadEntry production/orders: --app-port: port \"grpc\" is not one of the WorkloadEntry's ports (http)"
        ),
        "{stderr}"
    );

    // Malformed values are refused before anything starts.
    for (flag, value, says) in [
        ("--app-port", "http", "is not NAME=ADDR"),
        ("--app-port", "http=somewhere", "is not a port or IP:PORT"),
        ("--outbound", "somewhere", "invalid socket address"),
        ("--access-log-buffer", "1000000", "must be at most 100000"),
    ] {
        let out = Command::new(bin())
            .args([
                "proxy", "--config", "c", "--certs", "d", "-w", "ns/w", flag, value,
            ])
            .output()
            .unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(says), "{flag} {value}: {stderr}");
    }
}

/// `--dns-proxy ADDR`: the proxy answers the mesh's names there (the
/// orders ServiceEntry has no `addresses`: its allocated one) and forwards
/// the rest to the `--dns-server`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_line_turns_the_dns_proxy_on() {
    use std::net::Ipv4Addr;
    use support::dns::{DnsAnswer, DnsServer};

    let mesh = Mesh::new();
    mesh.write_config("mesh.yaml", &orders(free_port()));
    let certs = mesh.issue("orders", NS, "orders");
    let external = Ipv4Addr::new(203, 0, 113, 9);
    let upstream = DnsServer::start("external.example.org", DnsAnswer::A(vec![external], 60)).await;
    let dns = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let proxy = mesh
        .proxy_with(
            &format!("{NS}/orders"),
            &certs,
            &[
                "--dns-proxy",
                &dns.to_string(),
                "--dns-server",
                &upstream.addr.to_string(),
            ],
        )
        .await;
    let host = format!("orders.{NS}.svc.cluster.local");
    let (vip, _) = meshward_proxy::vip::addresses_of(meshward_proxy::vip::home_slot(&host));
    for name in [host.as_str(), "orders"] {
        assert_eq!(
            a_query(dns, name).await,
            (0, vec![vip]),
            "{name}: {}",
            proxy.logs()
        );
    }
    assert_eq!(
        a_query(dns, "external.example.org").await,
        (0, vec![external])
    );
    assert_eq!(a_query(dns, "nowhere.example.org").await, (3, vec![]));
    assert_eq!(upstream.queries(), 1);
}

/// An `A` query for `name` over UDP: the response code and the addresses.
async fn a_query(server: SocketAddr, name: &str) -> (u8, Vec<std::net::Ipv4Addr>) {
    let mut q = vec![0x4d, 0x57, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        q.push(u8::try_from(label.len()).unwrap());
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.send_to(&q, server).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let (n, _) = tokio::time::timeout(patience(), sock.recv_from(&mut buf))
        .await
        .expect("a DNS answer")
        .unwrap();
    let r = &buf[..n];
    assert_eq!(r[..2], q[..2], "the query's id");
    let answers = u16::from_be_bytes([r[6], r[7]]);
    // The question comes back as it was sent; then the records.
    let mut i = q.len();
    let mut out = Vec::new();
    for _ in 0..answers {
        // The name: a pointer, or labels.
        while r[i] != 0 && r[i] < 0xc0 {
            i += 1 + usize::from(r[i]);
        }
        i += if r[i] == 0 { 1 } else { 2 };
        let rtype = u16::from_be_bytes([r[i], r[i + 1]]);
        let len = usize::from(u16::from_be_bytes([r[i + 8], r[i + 9]]));
        i += 10;
        if rtype == 1 && len == 4 {
            out.push(std::net::Ipv4Addr::new(r[i], r[i + 1], r[i + 2], r[i + 3]));
        }
        i += len;
    }
    (r[3] & 0x0f, out)
}
