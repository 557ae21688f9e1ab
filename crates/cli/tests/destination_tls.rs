//! DestinationRule TLS towards services outside the mesh: SIMPLE (verify
//! the server against the given CA and SNI) and MUTUAL (also present the
//! given client certificate), through a real `meshward proxy`, to an
//! in-process TLS server with its own PKI (made here with rcgen).

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use support::*;

struct Pki {
    ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn pki(name: &str) -> Pki {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    Pki {
        ca_pem: cert.pem(),
        issuer: Issuer::new(params, key),
    }
}

fn leaf(pki: &Pki, dns: &str) -> (String, String) {
    let params = CertificateParams::new(vec![dns.to_string()]).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &pki.issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// A TLS HTTP/1.1 server; records whether the client presented a certificate.
async fn tls_server(
    cert_pem: &str,
    key_pem: &str,
    client_ca: Option<&str>,
) -> (SocketAddr, Arc<Mutex<Vec<bool>>>) {
    use rustls_pki_types::pem::PemObject;
    let certs: Vec<_> = rustls_pki_types::CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .map(|c| c.unwrap())
        .collect();
    let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap();
    let config = match client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in rustls_pki_types::CertificateDer::pem_slice_iter(ca.as_bytes()) {
                roots.add(c.unwrap()).unwrap();
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .unwrap();
            builder
                .with_client_cert_verifier(verifier)
                .with_single_cert(certs, key)
                .unwrap()
        }
        None => builder
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap(),
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Arc<Mutex<Vec<bool>>> = Arc::default();
    let seen2 = Arc::clone(&seen);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let seen = Arc::clone(&seen2);
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let had_cert = tls.get_ref().1.peer_certificates().is_some();
                let svc = service_fn(move |_req| {
                    seen.lock().unwrap().push(had_cert);
                    async move {
                        Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                            Bytes::from_static(b"external"),
                        )))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (addr, seen)
}

fn write(dir: &Path, name: &str, content: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, content).unwrap();
    p.to_str().unwrap().to_string()
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
