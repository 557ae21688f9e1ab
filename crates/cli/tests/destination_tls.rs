//! DestinationRule TLS towards services outside the mesh: SIMPLE (verify
//! the server against the given CA and SNI) and MUTUAL (also present the
//! given client certificate), through a real `meshward proxy`, to an
//! in-process TLS server with its own PKI (made here with rcgen).

mod support;

use std::net::SocketAddr;

use support::tls::{leaf, pki, tls_server, write};
use support::*;

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
    let files = mesh.path("files");
    std::fs::create_dir_all(&files).unwrap();
    let ca = write(&files, "server-ca.pem", &server_pki.ca_pem);
    let wrong_ca = write(&files, "other-ca.pem", &other_pki.ca_pem);
    let ccert = write(&files, "client.pem", &client_cert);
    let ckey = write(&files, "client-key.pem", &client_key);
    let out = free_port();
    let external = |name: &str, addr: SocketAddr, tls: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {name}, namespace: production}}\nspec:\n  hosts: [{name}.external.test]\n  location: MESH_EXTERNAL\n  resolution: STATIC\n  ports: [{{number: 443, name: https, protocol: HTTPS, targetPort: {port}}}]\n  endpoints: [{{address: 127.0.0.1}}]\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: {name}, namespace: production}}\nspec:\n  host: {name}.external.test\n  trafficPolicy:\n    tls: {tls}\n---\n",
            port = addr.port()
        )
    };
    let mut c = format!(
        "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata:\n  name: frontend\n  namespace: production\n  annotations: {{meshward.io/outbound: \"127.0.0.1:{out}\"}}\nspec: {{address: 127.0.0.1, labels: {{app: frontend}}, serviceAccount: frontend}}\n---\n"
    );
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
    mesh.write_config("external.yaml", &c);
    let front = mesh
        .proxy(
            "production/frontend",
            &mesh.issue("front", "production", "frontend"),
        )
        .await;
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
        [true],
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
}
