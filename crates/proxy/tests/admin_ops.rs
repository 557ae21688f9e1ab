//! What the live operations read from a running proxy (`meshward call`,
//! `meshward proxy-config`): `/certs` with PEM, `/access_log` with the
//! recent entries and their `request_id`, and the command line's
//! overrides of where the outbound listener and the application are.

mod support;

use std::net::SocketAddr;

use meshward_proxy::Overrides;
use support::*;

/// The host of a ServiceEntry for the orders workload itself, so that a
/// request through its outbound listener comes back to its own inbound
/// HTTP port over mTLS (reporter `source`, then `destination`).
fn orders_service(h: &Harness) -> (String, String) {
    let port = h.inbound_http.port();
    let se = mesh::service_entry(
        NS,
        "orders",
        "orders",
        &format!("{{number: {port}, name: http, protocol: HTTP}}"),
    );
    (se, format!("orders.{NS}.svc.cluster.local:{port}"))
}

async fn admin_get(h: &Harness, path: &str) -> (u16, String) {
    get(h.proxy.admin_addr().unwrap(), "admin", path, &[])
        .await
        .unwrap()
}

async fn access_log(h: &Harness, query: &str) -> Vec<serde_json::Value> {
    let body = h.admin(&format!("/access_log?{query}")).await;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["entries"].as_array().unwrap().clone()
}

fn der_of(pem: &str) -> Vec<Vec<u8>> {
    meshward_identity::pem::certs_from_pem(pem.as_bytes(), std::path::Path::new("pem"))
        .unwrap()
        .into_iter()
        .map(|c| c.to_vec())
        .collect()
}

fn file_der(path: std::path::PathBuf) -> Vec<Vec<u8>> {
    der_of(&std::fs::read_to_string(path).unwrap())
}

async fn certs(h: &Harness) -> serde_json::Value {
    serde_json::from_str(&h.admin("/certs").await).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certs_carry_the_chain_and_roots_as_pem_and_when_they_were_installed() {
    let h = Harness::start("").await;
    let body = h.admin("/certs").await;
    assert!(!body.contains("PRIVATE KEY"), "key material shown: {body}");
    let c: serde_json::Value = serde_json::from_str(&body).unwrap();
    let orders = h.dir.path().join("orders-1");
    let issued = WorkloadCerts { dir: orders };
    assert_eq!(
        der_of(c["pem"]["chain"].as_str().unwrap()),
        file_der(issued.chain()),
        "the chain, leaf first"
    );
    assert_eq!(
        der_of(c["pem"]["roots"].as_str().unwrap()),
        file_der(issued.root())
    );
    let rfc3339 = &time::format_description::well_known::Rfc3339;
    let loaded = c["loaded_at"].as_str().unwrap().to_string();
    let at = time::OffsetDateTime::parse(&loaded, rfc3339).unwrap();
    assert!((time::OffsetDateTime::now_utc() - at).whole_seconds().abs() < 300);

    // A configuration change keeps the certificate, and its time.
    h.push(&deny_from("intruder"));
    eventually("the configuration change applied", || async {
        let dump: serde_json::Value = serde_json::from_str(&h.admin("/config_dump").await).unwrap();
        (dump["authorization_policies"].as_array()?.len() == 1).then_some(())
    })
    .await;
    assert_eq!(certs(&h).await["loaded_at"], loaded.as_str());

    // New credentials: their PEM, and a later time.
    let renewed = h.issue("orders");
    push_credentials(&h.source, &renewed).unwrap();
    let want = file_der(renewed.chain());
    let now = eventually("the renewed chain on /certs", || async {
        let c = certs(&h).await;
        (der_of(c["pem"]["chain"].as_str()?) == want).then_some(c)
    })
    .await;
    let later = time::OffsetDateTime::parse(now["loaded_at"].as_str().unwrap(), rfc3339).unwrap();
    assert!(later >= at, "{later} before {at}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_keeps_request_ids_and_serves_recent_entries_filtered() {
    let h = Harness::start("").await;
    let (se, host) = orders_service(&h);
    h.push(&se);
    eventually("a request through the outbound listener", || async {
        get(h.outbound, &host, "/warm-up", &[])
            .await
            .filter(|(status, _)| *status == 200)
    })
    .await;

    let (status, body) = get(
        h.outbound,
        &host,
        "/orders/1",
        &[("x-request-id", "req-42")],
    )
    .await
    .unwrap();
    assert_eq!((status, body.as_str()), (200, "orders"));
    // Forwarded unchanged, outbound and inbound.
    let seen = h.app.last().unwrap();
    assert_eq!(
        seen.headers.get("x-request-id").map(String::as_str),
        Some("req-42")
    );

    // Both sides' entries, as the log wrote them.
    let entries = eventually("both entries of the request", || async {
        let e = access_log(&h, "request_id=req-42").await;
        (e.len() == 2).then_some(e)
    })
    .await;
    let mut reporters: Vec<&str> = entries
        .iter()
        .map(|e| e["reporter"].as_str().unwrap())
        .collect();
    reporters.sort_unstable();
    assert_eq!(reporters, ["destination", "source"]);
    let dest = entries
        .iter()
        .find(|e| e["reporter"] == "destination")
        .unwrap();
    assert_eq!(dest["decision"], "allow", "{dest}");
    assert_eq!(dest["tls.mode"], "mutual_tls", "{dest}");
    assert_eq!(dest["path"], "/orders/1", "{dest}");
    assert_eq!(
        dest["src.identity"],
        format!("spiffe://cluster.local/ns/{NS}/sa/orders")
    );
    let logged: Vec<serde_json::Value> = h
        .access_log
        .lock()
        .unwrap()
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|e: &serde_json::Value| e["request_id"] == "req-42")
        .collect();
    for e in &entries {
        assert!(logged.contains(e), "{e} is not what the log wrote");
    }

    // Without the header: `null`; `limit` takes the newest.
    get(h.outbound, &host, "/no-id", &[]).await.unwrap();
    let newest = eventually("the entries of the request without an id", || async {
        let e = access_log(&h, "limit=2").await;
        e.iter().all(|e| e["path"] == "/no-id").then_some(e)
    })
    .await;
    assert_eq!(newest.len(), 2);
    for e in &newest {
        assert!(e["request_id"].is_null(), "{e}");
    }
    let all = access_log(&h, "").await;
    assert!(all.len() >= 6, "{all:?}");
    assert_eq!(all.last().unwrap()["path"], "/no-id", "oldest first");

    // Bad filters are refused, saying what is wrong.
    let (status, body) = admin_get(&h, "/access_log?src=nowhere").await;
    assert_eq!(status, 400);
    assert!(
        body.contains("src: \"nowhere\" is not an IP or IP:PORT"),
        "{body}"
    );
    let (status, body) = admin_get(&h, "/access_log?since=1m").await;
    assert_eq!(status, 400);
    assert!(body.contains("unknown parameter \"since\""), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plaintext_caller_refused_by_strict_is_found_by_its_address() {
    let h = Harness::start("").await;
    let mut plain = tokio::net::TcpStream::connect(h.inbound_http)
        .await
        .unwrap();
    let src = plain.local_addr().unwrap();
    plain
        .write_all(b"GET / HTTP/1.1\r\nhost: orders\r\nx-request-id: plain-1\r\n\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let _ = plain.read_to_end(&mut rest).await;
    assert!(rest.is_empty(), "plaintext got an answer on a STRICT port");

    let entries = eventually("the refusal's entry", || async {
        let e = access_log(&h, &format!("src={src}")).await;
        (!e.is_empty()).then_some(e)
    })
    .await;
    assert_eq!(entries.len(), 1, "{entries:?}");
    let e = &entries[0];
    assert_eq!(e["src.addr"], src.to_string());
    assert_eq!(e["decision"], "deny");
    assert_eq!(e["reason"], "plaintext_rejected");
    assert_eq!(e["tls.mode"], "none");
    assert!(e["explanation"].as_str().unwrap().contains("STRICT"), "{e}");
    // By IP alone too; another address finds nothing.
    assert_eq!(access_log(&h, &format!("src={}", src.ip())).await.len(), 1);
    assert!(
        access_log(
            &h,
            &format!("src={}:{}", src.ip(), src.port().wrapping_add(1))
        )
        .await
        .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_buffer_keeps_nothing_and_says_so() {
    let h = Harness::try_start("", |o| o.access_log_buffer = 0)
        .await
        .unwrap();
    let (status, body) = admin_get(&h, "/access_log").await;
    assert_eq!(status, 404);
    assert!(body.contains("--access-log-buffer 0"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_line_overrides_move_the_outbound_listener_and_the_application() {
    let other = App::start("other").await;
    let outbound = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let h = Harness::try_start("", |o| {
        o.overrides = Overrides {
            outbound: Some(outbound),
            app_ports: vec![("http".to_string(), other.addr)],
            ..Overrides::default()
        };
    })
    .await
    .unwrap();
    let (se, host) = orders_service(&h);
    h.push(&se);
    // Through the outbound listener of the command line, to the
    // application of the command line.
    let (status, body) = eventually("a request through the overridden listener", || async {
        get(outbound, &host, "/", &[])
            .await
            .filter(|(status, _)| *status == 200)
    })
    .await;
    assert_eq!((status, body.as_str()), (200, "other"));
    assert!(
        h.app.last().is_none(),
        "the annotation's application was called"
    );
    // The annotation's outbound address is not listened on.
    assert!(tokio::net::TcpStream::connect(h.outbound).await.is_err());
    let dump: serde_json::Value = serde_json::from_str(&h.admin("/config_dump").await).unwrap();
    assert_eq!(dump["outbound"]["http"], outbound.to_string());
    let http = dump["inbound"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "http")
        .unwrap();
    assert_eq!(http["app"], other.addr.to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_port_override_naming_no_port_of_the_workload_is_refused() {
    let err = Harness::try_start("", |o| {
        o.overrides.app_ports = vec![("grpc".to_string(), "127.0.0.1:9".parse().unwrap())];
    })
    .await
    .err()
    .expect("the proxy started with an --app-port for no port");
    assert_eq!(
        err.to_string(),
        format!(
            "WorkloadEntry {NS}/orders: --app-port: port \"grpc\" is not one of the WorkloadEntry's ports (http, tcp)"
        )
    );
}

/// HTTP/2 requests (the hyper path) carry their `x-request-id` to the
/// application and into their entries too, allowed or denied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_requests_are_logged_with_their_request_id() {
    let h = Harness::start(&mesh::authorization_policy(
        NS,
        "no-admin",
        "  action: DENY\n  rules: [{to: [{operation: {paths: [\"/admin\"]}}]}]",
    ))
    .await;
    let frontend = h.issue("frontend");
    let tls = mtls_connect(&frontend.dir, &frontend.root(), h.inbound_http, b"h2")
        .await
        .unwrap();
    let mut h2 = h2_handshake(tls).await;
    let host = "orders.production.svc.cluster.local";
    for (path, id, status) in [("/api", "h2-ok", 200), ("/admin", "h2-denied", 403)] {
        let req = http::Request::builder()
            .uri(format!("http://{host}{path}"))
            .header("x-request-id", id)
            .body(Full::new(Bytes::new()))
            .unwrap();
        h2.ready().await.unwrap();
        let resp = h2.send_request(req).await.unwrap();
        assert_eq!(resp.status().as_u16(), status, "{path}");
        resp.into_body().collect().await.unwrap();
        let entries = eventually("the request's entry", || async {
            let e = access_log(&h, &format!("request_id={id}")).await;
            (e.len() == 1).then_some(e)
        })
        .await;
        assert_eq!(entries[0]["path"], path);
        assert_eq!(
            entries[0]["decision"],
            if status == 200 { "allow" } else { "deny" }
        );
    }
    assert_eq!(
        h.app
            .last()
            .unwrap()
            .headers
            .get("x-request-id")
            .map(String::as_str),
        Some("h2-ok")
    );
}
