//! mTLS between two rustls endpoints over loopback with issued SVIDs.

mod common;

use std::sync::Arc;

use common::*;
use meshward_identity::bundle::TrustBundle;
use meshward_identity::credentials::{
    CredentialResolver, WorkloadCredentials, client_config, server_config,
};
use meshward_identity::keys::KeyType;
use meshward_identity::spiffe::SpiffeId;
use meshward_identity::verify::{
    SpiffeServerVerifier, SvidError, SvidVerifier, TrustDomains, peer_identity, svid_error_of,
};
use meshward_identity::{CertificateAuthority, WorkloadKey};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

fn creds(ca: &CertificateAuthority, who: &SpiffeId) -> WorkloadCredentials {
    let key = WorkloadKey::generate(KeyType::EcP256).unwrap();
    let issued = ca.sign_csr(&key.csr_der(who).unwrap(), who, None).unwrap();
    WorkloadCredentials::new(&key, issued.chain().to_vec(), who).unwrap()
}

fn svid_verifier(roots: &[&rustls_pki_types::CertificateDer<'static>]) -> SvidVerifier {
    SvidVerifier::new(
        TrustBundle::from_roots(roots.iter().map(|r| (*r).clone())).unwrap(),
        TrustDomains::only([td(TD)]),
    )
}

struct Outcome {
    /// The server's identity and leaf, as the client saw them.
    client: Result<(SpiffeId, Vec<u8>), String>,
    server: Result<SpiffeId, rustls::Error>,
}

/// One handshake + a ping/pong; each side reports the peer identity it saw.
async fn handshake(server_cfg: rustls::ServerConfig, client_cfg: rustls::ClientConfig) -> Outcome {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_cfg));
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        match acceptor.accept(tcp).await {
            Ok(mut tls) => {
                let id = peer_identity(tls.get_ref().1.peer_certificates()).unwrap();
                let mut buf = [0u8; 4];
                tls.read_exact(&mut buf).await.unwrap();
                tls.write_all(b"pong").await.unwrap();
                tls.shutdown().await.unwrap();
                Ok(id)
            }
            Err(e) => {
                let inner = e
                    .get_ref()
                    .and_then(|i| i.downcast_ref::<rustls::Error>())
                    .cloned()
                    .unwrap_or_else(|| rustls::Error::General(e.to_string()));
                Err(inner)
            }
        }
    });
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_cfg));
    let tcp = TcpStream::connect(addr).await.unwrap();
    // SVIDs carry no DNS name; the name is only used for SNI.
    let name = ServerName::try_from("api.default.svc").unwrap();
    let client = match connector.connect(name, tcp).await {
        Ok(mut tls) => {
            let id = peer_identity(tls.get_ref().1.peer_certificates()).unwrap();
            let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
            tls.write_all(b"ping").await.unwrap();
            let mut buf = Vec::new();
            match tls.read_to_end(&mut buf).await {
                Ok(_) if buf == b"pong" => Ok((id, leaf)),
                Ok(_) => Err(format!("unexpected reply {buf:?}")),
                Err(e) => Err(e.to_string()),
            }
        }
        Err(e) => Err(
            match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                Some(r) => match svid_error_of(r) {
                    Some(svid) => format!("svid:{svid:?}"),
                    None => r.to_string(),
                },
                None => e.to_string(),
            },
        ),
    };
    Outcome {
        client,
        server: server.await.unwrap(),
    }
}

#[tokio::test]
async fn mutual_tls_sees_both_identities() {
    let (root, m) = material(TD, KeyType::EcP256, KeyType::EcP256);
    let ca = ca_from(&m);
    let api = workload("default", "api");
    let web = workload("frontend", "web");
    let server_cfg = server_config(
        svid_verifier(&[root.cert()]),
        CredentialResolver::fixed(creds(&ca, &api)),
    )
    .unwrap();
    let client_cfg = client_config(
        SpiffeServerVerifier::expecting(svid_verifier(&[root.cert()]), [api.clone()]),
        CredentialResolver::fixed(creds(&ca, &web)),
    )
    .unwrap();
    let out = handshake(server_cfg, client_cfg).await;
    assert_eq!(
        out.client.unwrap().0,
        api,
        "client sees the server's identity"
    );
    assert_eq!(
        out.server.unwrap(),
        web,
        "server sees the client's identity"
    );
}

#[tokio::test]
async fn rsa_intermediates_of_two_clusters_interoperate() {
    let shared = root(TD, KeyType::Rsa2048);
    let east = ca_from(
        &shared
            .new_intermediate(&opts(TD, KeyType::Rsa2048, days(30)))
            .unwrap(),
    );
    let west = ca_from(
        &shared
            .new_intermediate(&opts(TD, KeyType::EcP384, days(30)))
            .unwrap(),
    );
    let api = workload("east", "api");
    let web = workload("west", "web");
    let out = handshake(
        server_config(
            svid_verifier(&[shared.cert()]),
            CredentialResolver::fixed(creds(&east, &api)),
        )
        .unwrap(),
        client_config(
            SpiffeServerVerifier::new(svid_verifier(&[shared.cert()])),
            CredentialResolver::fixed(creds(&west, &web)),
        )
        .unwrap(),
    )
    .await;
    assert_eq!(out.client.unwrap().0, api);
    assert_eq!(out.server.unwrap(), web);
}

#[tokio::test]
async fn server_rejects_client_from_another_root() {
    let (root, m) = material(TD, KeyType::EcP256, KeyType::EcP256);
    let (_other_root, other_m) = material(TD, KeyType::EcP256, KeyType::EcP256);
    let ca = ca_from(&m);
    let other = ca_from(&other_m);
    let api = workload("default", "api");
    let out = handshake(
        server_config(
            svid_verifier(&[root.cert()]),
            CredentialResolver::fixed(creds(&ca, &api)),
        )
        .unwrap(),
        client_config(
            SpiffeServerVerifier::new(svid_verifier(&[root.cert()])),
            CredentialResolver::fixed(creds(&other, &workload("evil", "mallory"))),
        )
        .unwrap(),
    )
    .await;
    let server_err = out.server.unwrap_err();
    assert_eq!(svid_error_of(&server_err), Some(&SvidError::UnknownIssuer));
    assert!(out.client.is_err());
}

#[tokio::test]
async fn client_enforces_secure_naming() {
    let (root, m) = material(TD, KeyType::EcP256, KeyType::EcP256);
    let ca = ca_from(&m);
    let out = handshake(
        server_config(
            svid_verifier(&[root.cert()]),
            CredentialResolver::fixed(creds(&ca, &workload("default", "impostor"))),
        )
        .unwrap(),
        client_config(
            SpiffeServerVerifier::expecting(
                svid_verifier(&[root.cert()]),
                [workload("default", "api")],
            ),
            CredentialResolver::fixed(creds(&ca, &workload("frontend", "web"))),
        )
        .unwrap(),
    )
    .await;
    let err = out.client.unwrap_err();
    assert!(err.starts_with("svid:UnexpectedIdentity"), "{err}");
}

#[tokio::test]
async fn published_credentials_swap_for_new_handshakes() {
    let (root, m) = material(TD, KeyType::EcP256, KeyType::EcP256);
    let ca = ca_from(&m);
    let api = workload("default", "api");
    let first = Arc::new(creds(&ca, &api));
    let (tx, rx) = watch::channel(Some(first.clone()));
    let server_cfg =
        server_config(svid_verifier(&[root.cert()]), CredentialResolver::new(rx)).unwrap();
    let client = || {
        client_config(
            SpiffeServerVerifier::new(svid_verifier(&[root.cert()])),
            CredentialResolver::fixed(creds(&ca, &workload("frontend", "web"))),
        )
        .unwrap()
    };
    let out = handshake(server_cfg.clone(), client()).await;
    assert_eq!(out.client.unwrap().1, first.chain()[0].to_vec());

    let second = Arc::new(creds(&ca, &api));
    assert_ne!(first.chain()[0], second.chain()[0]);
    tx.send_replace(Some(second.clone()));
    // The same ServerConfig now serves the new certificate.
    let out = handshake(server_cfg.clone(), client()).await;
    assert_eq!(out.client.unwrap().1, second.chain()[0].to_vec());

    // No credentials: handshakes fail rather than serve nothing valid.
    tx.send_replace(None);
    let out = handshake(server_cfg, client()).await;
    assert!(out.client.is_err());
    assert!(out.server.is_err());
}
