//! TLS for the control plane's gRPC listener, and a client connector for
//! whoever calls it (proxies, tests).
//!
//! Server side: the control plane's own certificate (issued by the mesh CA),
//! ALPN `h2`, and client certificates that are optional (a first issuance
//! comes with a token and no certificate) but, when presented, must be
//! SVIDs chaining to the current trust bundle.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;
use meshward_identity::{
    SpiffeClientVerifier, SvidVerifier, TrustBundle, TrustDomain, TrustDomains,
};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// ALPN protocol of gRPC.
const H2: &[u8] = b"h2";

/// A rustls server config: our chain and key, optional client SVIDs from
/// `bundle` in `trust_domain`, ALPN `h2`.
pub fn server_config(
    bundle: &TrustBundle,
    trust_domain: &TrustDomain,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<rustls::ServerConfig, rustls::Error> {
    let verifier = SvidVerifier::new(bundle.clone(), TrustDomains::only([trust_domain.clone()]));
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_client_cert_verifier(Arc::new(OptionalClientSvid(SpiffeClientVerifier::new(
        verifier,
    ))))
    .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![H2.to_vec()];
    Ok(config)
}

/// Client certificates optional; a presented one must be a valid SVID.
#[derive(Debug)]
struct OptionalClientSvid(SpiffeClientVerifier);

impl ClientCertVerifier for OptionalClientSvid {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.0.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.0.verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// Connects a tonic [`Channel`] to a control plane at `addr` (`HOST:PORT`)
/// over TLS with `config` (e.g. `meshward_identity::client_config` with a
/// `SpiffeServerVerifier` expecting the control plane's identity; the
/// connector sets ALPN `h2`).
pub async fn connect(
    addr: &str,
    mut config: rustls::ClientConfig,
) -> Result<Channel, tonic::transport::Error> {
    config.alpn_protocols = vec![H2.to_vec()];
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(std::time::Duration::from_secs(5));
    endpoint
        .connect_with_connector(TlsConnector {
            config: Arc::new(config),
        })
        .await
}

/// A tower connector: TCP to the URI's host and port, then TLS.
#[derive(Debug, Clone)]
pub struct TlsConnector {
    config: Arc<rustls::ClientConfig>,
}

impl TlsConnector {
    /// A connector with `config` (set ALPN `h2` in it).
    pub fn new(config: Arc<rustls::ClientConfig>) -> Self {
        Self { config }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower_service::Service<Uri> for TlsConnector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let config = self.config.clone();
        Box::pin(async move {
            let host = uri
                .host()
                .ok_or("control plane address has no host")?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            let port = uri.port_u16().unwrap_or(15012);
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let name = ServerName::try_from(host)?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await?;
            Ok(TokioIo::new(tls))
        })
    }
}
