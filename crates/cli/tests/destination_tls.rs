//! DestinationRule TLS towards services outside the mesh: SIMPLE (verify
//! the server against the given CA and SNI) and MUTUAL (also present the
//! given client certificate), through a real `meshward proxy`, to an
//! in-process TLS server with its own PKI (made here with rcgen). The
//! files are re-read when they change; a local file that cannot be used
//! is reported as a problem of that file.

mod support;

use std::net::SocketAddr;

use rcgen::DnType;
use support::tls::{client_leaf, der, leaf, leaf_with, pki, tls_server, write};
use support::*;

/// A ServiceEntry for `NAME.external.test` on 127.0.0.1 at `addr`'s port,
/// and a DestinationRule setting its `tls` (a flow mapping).
fn external(name: &str, addr: SocketAddr, tls: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {name}, namespace: production}}\nspec:\n  hosts: [{name}.external.test]\n  location: MESH_EXTERNAL\n  resolution: STATIC\n  ports: [{{number: 443, name: https, protocol: HTTPS, targetPort: {port}}}]\n  endpoints: [{{address: 127.0.0.1}}]\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: {name}, namespace: production}}\nspec:\n  host: {name}.external.test\n  trafficPolicy:\n    tls: {tls}\n---\n",
        port = addr.port()
    )
}

/// Writes `config` (the frontend and the external services) and starts
/// the frontend's proxy.
async fn start_frontend(mesh: &Mesh, config: &str) -> ProxyProcess {
    mesh.write_config("external.yaml", config);
    mesh.proxy(
        "production/frontend",
        &mesh.issue("front", "production", "frontend"),
    )
    .await
}

/// The directory of the DestinationRules' files.
fn files_dir(mesh: &Mesh) -> std::path::PathBuf {
    let files = mesh.path("files");
    std::fs::create_dir_all(&files).unwrap();
    files
}

/// The frontend workload, whose outbound listener is 127.0.0.1:`out`.
fn frontend(out: u16) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata:\n  name: frontend\n  namespace: production\n  annotations: {{meshward.io/outbound: \"127.0.0.1:{out}\"}}\nspec: {{address: 127.0.0.1, labels: {{app: frontend}}, serviceAccount: frontend}}\n---\n"
    )
}

/// `meshward_config_rejected_total` of `proxy`.
async fn rejected(proxy: &ProxyProcess) -> f64 {
    let (_, m) = proxy.admin_get("/stats/prometheus").await;
    metric(&m, "meshward_config_rejected_total", &[])
}

/// The `/config_dump` entry for the files of DestinationRule
/// `production/NAME`.
async fn dr_files_entry(proxy: &ProxyProcess, name: &str) -> serde_json::Value {
    let (_, body) = proxy.admin_get("/config_dump").await;
    let dump: serde_json::Value = serde_json::from_str(&body).unwrap();
    dump["destination_rule_tls"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["destination_rules"][0] == format!("production/{name}"))
        .cloned()
        .unwrap_or_else(|| panic!("no destination_rule_tls entry for {name}: {dump}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simple_and_mutual_tls_to_external_services() {
    let mesh = Mesh::new();
    let server_pki = pki("external server CA");
    let client_pki = pki("external client CA");
    let other_pki = pki("some other CA");
    let (cert, key) = leaf(&server_pki, "api.external.test");
    let (simple_addr, _) = tls_server(&cert, &key, None).await;
    let (mutual_addr, mutual_seen) = tls_server(&cert, &key, Some(&client_pki.ca_pem)).await;
    let (client_cert, client_key) = leaf(&client_pki, "frontend.client.test");
    let files = files_dir(&mesh);
    let ca = write(&files, "server-ca.pem", &server_pki.ca_pem);
    let wrong_ca = write(&files, "other-ca.pem", &other_pki.ca_pem);
    let ccert = write(&files, "client.pem", &client_cert);
    let ckey = write(&files, "client-key.pem", &client_key);
    let out = free_port();
    let mut c = frontend(out);
    c += &external(
        "simple",
        simple_addr,
        &format!("{{mode: SIMPLE, caCertificates: \"{ca}\", sni: api.external.test}}"),
    );
    c += &external(
        "mutual",
        mutual_addr,
        &format!(
            "{{mode: MUTUAL, caCertificates: \"{ca}\", sni: api.external.test, clientCertificate: \"{ccert}\", privateKey: \"{ckey}\"}}"
        ),
    );
    c += &external(
        "untrusted",
        simple_addr,
        &format!("{{mode: SIMPLE, caCertificates: \"{wrong_ca}\", sni: api.external.test}}"),
    );
    c += &external(
        "wrongname",
        simple_addr,
        &format!("{{mode: SIMPLE, caCertificates: \"{ca}\", sni: other.external.test}}"),
    );
    let front = start_frontend(&mesh, &c).await;
    let local = SocketAddr::from(([127, 0, 0, 1], out));

    assert_eq!(
        get(local, "simple.external.test", "/", &[]).await,
        Some((200, "external".into()))
    );
    assert_eq!(
        get(local, "mutual.external.test", "/", &[]).await,
        Some((200, "external".into()))
    );
    assert_eq!(
        mutual_seen.lock().unwrap().as_slice(),
        [Some(der(&client_cert))],
        "MUTUAL presents the configured client certificate"
    );
    // A server the configured CA did not sign, or whose name differs from
    // the SNI, is refused.
    assert_eq!(
        get(local, "untrusted.external.test", "/", &[])
            .await
            .map(|r| r.0),
        Some(503)
    );
    assert_eq!(
        get(local, "wrongname.external.test", "/", &[])
            .await
            .map(|r| r.0),
        Some(503)
    );
    let line = front
        .log_line("SIMPLE call", |l| {
            l["dst.service"] == "simple.external.test"
        })
        .await;
    assert_eq!(line["tls.mode"], "simple");
    let line = front
        .log_line("MUTUAL call", |l| {
            l["dst.service"] == "mutual.external.test"
        })
        .await;
    assert_eq!(line["tls.mode"], "mutual");
    // A server certificate this proxy refused is said to be one.
    let line = front
        .log_line("untrusted server", |l| {
            l["dst.service"] == "untrusted.external.test"
        })
        .await;
    let reason = line["reason"].as_str().unwrap();
    assert!(
        reason.contains("the server's certificate failed this proxy's verification"),
        "{reason}"
    );
    let (_, m) = front.admin_get("/stats/prometheus").await;
    let failed = [
        ("destination_service", "untrusted.external.test"),
        ("response_flags", "UF"),
    ];
    assert_eq!(metric(&m, "istio_requests_total", &failed), 1.0, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_client_certificate_files_are_reloaded_when_they_change() {
    let mesh = Mesh::new();
    let server_pki = pki("external server CA");
    let client_pki = pki("external client CA");
    let (cert, key) = leaf(&server_pki, "api.external.test");
    let (addr, seen) = tls_server(&cert, &key, Some(&client_pki.ca_pem)).await;
    let (cert_a, key_a) = client_leaf(&client_pki, "client A");
    let (cert_b, key_b) = client_leaf(&client_pki, "client B");
    let files = files_dir(&mesh);
    let ca = write(&files, "server-ca.pem", &server_pki.ca_pem);
    let ccert = write(&files, "client.pem", &cert_a);
    let ckey = write(&files, "client-key.pem", &key_a);
    let out = free_port();
    let mut c = frontend(out);
    c += &external(
        "mutual",
        addr,
        &format!(
            "{{mode: MUTUAL, caCertificates: \"{ca}\", sni: api.external.test, clientCertificate: \"{ccert}\", privateKey: \"{ckey}\"}}"
        ),
    );
    let front = start_frontend(&mesh, &c).await;
    let local = SocketAddr::from(([127, 0, 0, 1], out));
    let last_seen = || seen.lock().unwrap().last().cloned().flatten();
    assert_eq!(
        get(local, "mutual.external.test", "/", &[]).await,
        Some((200, "external".into()))
    );
    assert_eq!(last_seen(), Some(der(&cert_a)));

    // The files are rewritten in place (no configuration change): new
    // requests present B.
    let version = front.config_version().await;
    std::fs::write(&ccert, &cert_b).unwrap();
    std::fs::write(&ckey, &key_b).unwrap();
    eventually("requests to present client certificate B", || async {
        let r = get(local, "mutual.external.test", "/", &[]).await;
        (r == Some((200, "external".into())) && last_seen() == Some(der(&cert_b))).then_some(())
    })
    .await;
    assert_eq!(front.config_version().await, version, "not a config reload");
    let entry = dr_files_entry(&front, "mutual").await;
    assert_eq!(entry["status"], "loaded", "{entry}");
    assert!(
        entry["client_certificate"]["subject"]
            .as_str()
            .unwrap()
            .contains("client B"),
        "{entry}"
    );

    // An expired certificate is refused: a WARN names the file and the
    // reason, the refusal is counted, and B stays in use.
    let before = rejected(&front).await;
    let (expired, expired_key) = leaf_with(&client_pki, "client.test", |p| {
        p.distinguished_name.push(DnType::CommonName, "client C");
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2021, 1, 1);
    });
    std::fs::write(&ccert, &expired).unwrap();
    std::fs::write(&ckey, &expired_key).unwrap();
    let warn = front
        .event("the expired certificate refused", |e| {
            e["level"] == "WARN"
                && e["fields"]["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("expired at 2021-01-01"))
        })
        .await;
    assert_eq!(warn["fields"]["file"], ccert.as_str(), "{warn}");
    let message = warn["fields"]["message"].as_str().unwrap();
    assert!(
        message.starts_with(&format!(
            "DestinationRule production/mutual: clientCertificate {ccert}: certificate expired at"
        )),
        "{message}"
    );
    assert!(
        message.contains("keeping the previous client config"),
        "{message}"
    );
    assert!(rejected(&front).await > before);
    assert_eq!(
        get(local, "mutual.external.test", "/", &[]).await,
        Some((200, "external".into()))
    );
    assert_eq!(last_seen(), Some(der(&cert_b)));

    // A certificate with a key that is not its own: refused the same way.
    let before = rejected(&front).await;
    std::fs::write(&ccert, &cert_b).unwrap();
    std::fs::write(&ckey, &key_a).unwrap();
    let warn = front
        .event("the mismatched key refused", |e| {
            e["level"] == "WARN"
                && e["fields"]["reason"].as_str().is_some_and(|r| {
                    r == format!("does not match the public key of clientCertificate {ccert}")
                })
        })
        .await;
    assert_eq!(warn["fields"]["file"], ckey.as_str(), "{warn}");
    assert!(rejected(&front).await > before);
    assert_eq!(
        get(local, "mutual.external.test", "/", &[]).await,
        Some((200, "external".into()))
    );
    assert_eq!(last_seen(), Some(der(&cert_b)));
    let entry = dr_files_entry(&front, "mutual").await;
    assert_eq!(entry["status"], "loaded", "{entry}");
    assert!(
        entry["last_error"]["message"]
            .as_str()
            .unwrap()
            .contains("does not match"),
        "{entry}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_local_client_certificates_are_named_as_such() {
    let mesh = Mesh::new();
    let server_pki = pki("external server CA");
    let client_pki = pki("external client CA");
    let other_pki = pki("a CA the server does not trust");
    let (cert, key) = leaf(&server_pki, "api.external.test");
    let (addr, seen) = tls_server(&cert, &key, Some(&client_pki.ca_pem)).await;
    let (expired, expired_key) = leaf_with(&client_pki, "client.test", |p| {
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2021, 1, 1);
    });
    let (foreign, foreign_key) = client_leaf(&other_pki, "foreign client");
    let files = files_dir(&mesh);
    let ca = write(&files, "server-ca.pem", &server_pki.ca_pem);
    let expired = write(&files, "expired.pem", &expired);
    let expired_key = write(&files, "expired-key.pem", &expired_key);
    let foreign = write(&files, "foreign.pem", &foreign);
    let foreign_key = write(&files, "foreign-key.pem", &foreign_key);
    let out = free_port();
    let mutual = |cert: &str, key: &str| {
        format!(
            "{{mode: MUTUAL, caCertificates: \"{ca}\", sni: api.external.test, clientCertificate: \"{cert}\", privateKey: \"{key}\"}}"
        )
    };
    let mut c = frontend(out);
    c += &external("expired", addr, &mutual(&expired, &expired_key));
    c += &external("foreign", addr, &mutual(&foreign, &foreign_key));
    let front = start_frontend(&mesh, &c).await;
    let local = SocketAddr::from(([127, 0, 0, 1], out));

    // Expired from the start: 503, and the log names the local file.
    assert_eq!(
        get(local, "expired.external.test", "/", &[])
            .await
            .map(|r| r.0),
        Some(503)
    );
    assert!(
        seen.lock().unwrap().is_empty(),
        "nothing reached the server"
    );
    let line = front
        .log_line("the expired DR's request", |l| {
            l["dst.service"].is_null() && l["authority"] == "expired.external.test"
        })
        .await;
    let reason = line["reason"].as_str().unwrap();
    assert!(
        reason.contains(&format!(
            "DestinationRule production/expired: clientCertificate {expired}: certificate expired at 2021-01-01"
        )),
        "{reason}"
    );
    assert!(!reason.contains("invalid peer certificate"), "{reason}");
    let warn = front
        .event("the expired certificate reported at load", |e| {
            e["level"] == "WARN" && e["fields"]["file"] == expired.as_str()
        })
        .await;
    assert!(
        warn["fields"]["reason"]
            .as_str()
            .unwrap()
            .starts_with("certificate expired at"),
        "{warn}"
    );
    let entry = dr_files_entry(&front, "expired").await;
    assert_eq!(entry["status"], "unusable", "{entry}");
    assert!(
        entry["last_error"]["message"]
            .as_str()
            .unwrap()
            .contains(&expired),
        "{entry}"
    );

    // A certificate that is fine here but that the server refuses: the
    // server's refusal, naming the certificate presented.
    assert_eq!(
        get(local, "foreign.external.test", "/", &[])
            .await
            .map(|r| r.0),
        Some(503)
    );
    let line = front
        .log_line("the foreign certificate's request", |l| {
            l["dst.service"] == "foreign.external.test"
        })
        .await;
    let reason = line["reason"].as_str().unwrap();
    assert!(
        reason.contains("the server refused the client certificate"),
        "{reason}"
    );
    assert!(
        reason.contains(&format!(
            "DestinationRule production/foreign: clientCertificate {foreign}"
        )),
        "{reason}"
    );
    let (_, m) = front.admin_get("/stats/prometheus").await;
    let refused = [
        ("destination_service", "foreign.external.test"),
        ("response_flags", "UF"),
    ];
    assert_eq!(metric(&m, "istio_requests_total", &refused), 1.0, "{m}");
}

/// `subjectAltNames` pins the server: its certificate must carry one of
/// them (the SNI is then not what is checked), as the SAN matchers Istio
/// gives Envoy require. It was ignored: any certificate the CA signed for
/// the SNI was accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subject_alt_names_pin_the_server_certificate() {
    let mesh = Mesh::new();
    let server_pki = pki("external server CA");
    let (cert, key) = leaf(&server_pki, "api.external.test");
    let (addr, _) = tls_server(&cert, &key, None).await;
    let files = files_dir(&mesh);
    let ca = write(&files, "server-ca.pem", &server_pki.ca_pem);
    let out = free_port();
    let simple = |sni: &str, sans: &str| {
        format!("{{mode: SIMPLE, caCertificates: \"{ca}\", sni: {sni}, subjectAltNames: [{sans}]}}")
    };
    let mut c = frontend(out);
    c += &external(
        "pinned",
        addr,
        &simple("api.external.test", "API.external.test"),
    );
    c += &external(
        "elsewhere",
        addr,
        &simple("api.external.test", "billing.external.test"),
    );
    c += &external(
        "named",
        addr,
        &simple("other.external.test", "api.external.test"),
    );
    let front = start_frontend(&mesh, &c).await;
    let local = SocketAddr::from(([127, 0, 0, 1], out));
    assert_eq!(
        get(local, "pinned.external.test", "/", &[]).await,
        Some((200, "external".into())),
        "a listed DNS name (any case)"
    );
    assert_eq!(
        get(local, "elsewhere.external.test", "/", &[])
            .await
            .map(|r| r.0),
        Some(503),
        "a certificate valid for the SNI but carrying none of subjectAltNames"
    );
    let line = front
        .log_line("the refused server", |l| {
            l["dst.service"] == "elsewhere.external.test"
        })
        .await;
    assert!(
        line["reason"]
            .as_str()
            .is_some_and(|r| r.contains("NotValidForName")),
        "{line}"
    );
    assert_eq!(
        get(local, "named.external.test", "/", &[]).await,
        Some((200, "external".into())),
        "the names decide, not the SNI"
    );
}
