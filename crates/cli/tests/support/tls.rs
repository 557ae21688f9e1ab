//! TLS servers for DestinationRule SIMPLE and MUTUAL, with certificates
//! from a PKI of their own outside the mesh (`meshward_test_support::ca`).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
pub use meshward_test_support::ca::{Pki, client_leaf, der, leaf, leaf_with, pki};

/// The client certificate of each request a TLS server answered (its
/// DER), `None` where the client presented none.
pub type Seen = Arc<Mutex<Vec<Option<Vec<u8>>>>>;

/// A TLS HTTP/1.1 server on `listener` answering `body`; with
/// `client_ca`, clients must present a certificate it signed. Records
/// which certificate each request's client presented.
pub async fn tls_server_on(
    listener: tokio::net::TcpListener,
    (cert_pem, key_pem): (&str, &str),
    client_ca: Option<&str>,
    body: &'static str,
) -> Seen {
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
    let seen: Seen = Arc::default();
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
                let client_cert = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(|c| c.to_vec());
                let svc = service_fn(move |_req| {
                    seen.lock().unwrap().push(client_cert.clone());
                    async move {
                        Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                            Bytes::from_static(body.as_bytes()),
                        )))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    seen
}

/// [`tls_server_on`] an ephemeral port of 127.0.0.1, answering
/// `external`.
pub async fn tls_server(
    cert_pem: &str,
    key_pem: &str,
    client_ca: Option<&str>,
) -> (SocketAddr, Seen) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = tls_server_on(listener, (cert_pem, key_pem), client_ca, "external").await;
    (addr, seen)
}

/// Writes `content` to `dir/name`; returns the path.
pub fn write(dir: &Path, name: &str, content: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, content).unwrap();
    p.to_str().unwrap().to_string()
}
