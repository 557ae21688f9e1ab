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
