//! A mesh peer's mTLS client: a workload's credentials (Istio's layout),
//! the mesh roots, any SPIFFE server identity of any trust domain (tests
//! check the identity they expect themselves).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

/// An mTLS connection made by [`mtls_connect`].
pub type MtlsStream = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// An mTLS connection to `addr` with the credentials in `dir`, trusting `root`.
pub async fn mtls_connect(
    dir: &std::path::Path,
    root: &std::path::Path,
    addr: SocketAddr,
    alpn: &[u8],
) -> Result<MtlsStream, String> {
    mtls_connect_from(None, dir, root, addr, alpn).await
}

/// [`mtls_connect`] from local address `from` (a loopback address such as
/// `127.0.2.2`, standing for a workload's address) when given.
pub async fn mtls_connect_from(
    from: Option<IpAddr>,
    dir: &std::path::Path,
    root: &std::path::Path,
    addr: SocketAddr,
    alpn: &[u8],
) -> Result<MtlsStream, String> {
    use meshward_identity::verify::TrustDomains;
    let creds = meshward_identity::WorkloadCredentials::from_dir(dir).map_err(|e| e.to_string())?;
    let bundle = meshward_identity::TrustBundle::from_pem_file(root).map_err(|e| e.to_string())?;
    let verifier = meshward_identity::SpiffeServerVerifier::new(
        meshward_identity::SvidVerifier::new(bundle, TrustDomains::any()),
    );
    let mut config = meshward_identity::client_config(
        verifier,
        meshward_identity::CredentialResolver::fixed(creds),
    )
    .map_err(|e| e.to_string())?;
    config.alpn_protocols = vec![alpn.to_vec()];
    let tcp = crate::http::tcp_from(from, addr).await?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(
            rustls_pki_types::ServerName::IpAddress(addr.ip().into()),
            tcp,
        )
        .await
        .map_err(|e| e.to_string())
}
