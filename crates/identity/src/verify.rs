//! X.509-SVID verification, and rustls verifiers built on it.
//!
//! A peer is accepted only if its chain verifies to a root of the
//! [`TrustBundle`] (webpki path building, signatures, validity at the
//! handshake time, EKU for the side), the leaf is not a CA, and it carries
//! exactly one URI SAN which is a SPIFFE ID of an accepted trust domain.
//! Every refusal is a distinct [`SvidError`] variant; through rustls it
//! travels as `CertificateError::Other` wrapping the `SvidError`
//! (see [`svid_error_of`]).
//!
//! SPIFFE certificates have no DNS name, so the server name a client
//! connects to is ignored; secure naming is enforced instead by the set of
//! identities [`SpiffeServerVerifier`] expects.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer as _;

use crate::bundle::TrustBundle;
use crate::spiffe::{SpiffeId, SpiffeIdError, TrustDomain};

/// Why a peer certificate is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SvidError {
    #[error("peer presented no certificate")]
    NoCertificate,
    #[error("malformed certificate: {reason}")]
    Malformed { reason: String },
    /// No trusted root signed this chain: an unknown issuer name, or a
    /// CA with a trusted name whose key did not sign it (another root with
    /// the same subject, as Istio roots often share `O=cluster.local`).
    #[error("certificate does not chain to a trusted root")]
    UnknownIssuer,
    #[error("certificate (or its chain) has expired")]
    Expired,
    #[error("certificate (or its chain) is not valid yet")]
    NotYetValid,
    #[error("a CA certificate was presented as an end-entity certificate")]
    CaUsedAsLeaf,
    #[error("certificate is not valid for {usage} (extended key usage)")]
    WrongUsage { usage: &'static str },
    #[error("chain verification failed: {reason}")]
    InvalidChain { reason: String },
    #[error("certificate has no URI SAN, so no SPIFFE ID")]
    NoSpiffeId,
    #[error("certificate has {count} URI SANs; an SVID has exactly one")]
    MultipleUriSans { count: usize },
    #[error("URI SAN {uri:?} is not a SPIFFE ID: {source}")]
    InvalidSpiffeId {
        uri: String,
        #[source]
        source: SpiffeIdError,
    },
    #[error("trust domain {trust_domain:?} is not accepted")]
    UntrustedTrustDomain { trust_domain: String },
    #[error("peer identity {id} is not one of the expected identities")]
    UnexpectedIdentity { id: String },
}

/// Which side's certificate is being verified (selects the EKU required).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// A server's certificate, verified by a client: EKU serverAuth.
    Server,
    /// A client's certificate, verified by a server: EKU clientAuth.
    Client,
}

/// The trust domains whose identities are accepted.
#[derive(Debug, Clone)]
pub struct TrustDomains(Option<Vec<TrustDomain>>);

impl TrustDomains {
    /// Only these trust domains.
    pub fn only(domains: impl IntoIterator<Item = TrustDomain>) -> Self {
        Self(Some(domains.into_iter().collect()))
    }

    /// Any trust domain whose certificates chain to the bundle (for
    /// inspection and CA self-tests; meshes list their domains).
    pub fn any() -> Self {
        Self(None)
    }

    /// Whether `td` is accepted.
    pub fn accepts(&self, td: &str) -> bool {
        match &self.0 {
            None => true,
            Some(list) => list.iter().any(|d| d.as_str() == td),
        }
    }
}

/// Verifies X.509-SVIDs against a trust bundle.
#[derive(Debug, Clone)]
pub struct SvidVerifier {
    bundle: Arc<TrustBundle>,
    domains: TrustDomains,
    algs: WebPkiSupportedAlgorithms,
}

impl SvidVerifier {
    /// A verifier trusting `bundle`'s roots for identities in `domains`.
    pub fn new(bundle: TrustBundle, domains: TrustDomains) -> Self {
        Self {
            bundle: Arc::new(bundle),
            domains,
            algs: rustls::crypto::aws_lc_rs::default_provider().signature_verification_algorithms,
        }
    }

    /// The trust bundle.
    pub fn bundle(&self) -> &TrustBundle {
        &self.bundle
    }

    /// Verifies a peer's chain at `now` and returns its SPIFFE ID.
    pub fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        side: Side,
    ) -> Result<SpiffeId, SvidError> {
        let ee = webpki::EndEntityCert::try_from(end_entity).map_err(|e| SvidError::Malformed {
            reason: e.to_string(),
        })?;
        let result = match side {
            Side::Server => ee.verify_for_usage(
                self.algs.all,
                self.bundle.anchors(),
                intermediates,
                now,
                webpki::KeyUsage::server_auth(),
                None,
                None,
            ),
            Side::Client => ee.verify_for_usage(
                self.algs.all,
                self.bundle.anchors(),
                intermediates,
                now,
                webpki::KeyUsage::client_auth(),
                None,
                None,
            ),
        };
        result.map_err(|e| map_webpki(e, side))?;
        let id = identity_of(end_entity)?;
        if !self.domains.accepts(id.trust_domain_str()) {
            return Err(SvidError::UntrustedTrustDomain {
                trust_domain: id.trust_domain_str().to_owned(),
            });
        }
        Ok(id)
    }

    /// As [`SvidVerifier::verify`] at the current time.
    pub fn verify_now(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        side: Side,
    ) -> Result<SpiffeId, SvidError> {
        self.verify(end_entity, intermediates, UnixTime::now(), side)
    }
}

/// The SPIFFE ID of a certificate: its only URI SAN. Refuses CA
/// certificates. Does not verify the chain: use it on certificates a
/// verifier has accepted (e.g. `peer_certificates()` after a handshake).
pub fn identity_of(cert: &CertificateDer<'_>) -> Result<SpiffeId, SvidError> {
    let parsed = match X509Certificate::from_der(cert) {
        Ok((_, c)) => c,
        Err(e) => {
            return Err(SvidError::Malformed {
                reason: e.to_string(),
            });
        }
    };
    identity_of_parsed(&parsed)
}

pub(crate) fn identity_of_parsed(parsed: &X509Certificate<'_>) -> Result<SpiffeId, SvidError> {
    let malformed = |e: x509_parser::error::X509Error| SvidError::Malformed {
        reason: e.to_string(),
    };
    if parsed
        .basic_constraints()
        .map_err(malformed)?
        .is_some_and(|bc| bc.value.ca)
    {
        return Err(SvidError::CaUsedAsLeaf);
    }
    let uris: Vec<&str> = match parsed.subject_alternative_name().map_err(malformed)? {
        Some(san) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::URI(u) => Some(*u),
                _ => None,
            })
            .collect(),
        None => Vec::new(),
    };
    match uris.as_slice() {
        [] => Err(SvidError::NoSpiffeId),
        [uri] => SpiffeId::parse(uri).map_err(|source| SvidError::InvalidSpiffeId {
            uri: (*uri).to_owned(),
            source,
        }),
        many => Err(SvidError::MultipleUriSans { count: many.len() }),
    }
}

/// The peer identity after a handshake, from `peer_certificates()`.
pub fn peer_identity(
    peer_certificates: Option<&[CertificateDer<'_>]>,
) -> Result<SpiffeId, SvidError> {
    match peer_certificates.and_then(|c| c.first()) {
        Some(leaf) => identity_of(leaf),
        None => Err(SvidError::NoCertificate),
    }
}

/// Recovers the [`SvidError`] from a rustls error produced by the verifiers
/// of this module (e.g. the error of a failed handshake).
pub fn svid_error_of(err: &rustls::Error) -> Option<&SvidError> {
    match err {
        rustls::Error::InvalidCertificate(CertificateError::Other(other)) => {
            other.0.downcast_ref::<SvidError>()
        }
        _ => None,
    }
}

fn map_webpki(e: webpki::Error, side: Side) -> SvidError {
    use webpki::Error as W;
    match e {
        W::UnknownIssuer => SvidError::UnknownIssuer,
        W::CertExpired { .. } => SvidError::Expired,
        W::CertNotValidYet { .. } => SvidError::NotYetValid,
        W::CaUsedAsEndEntity => SvidError::CaUsedAsLeaf,
        // Path building tries every CA whose name matches; a signature that
        // does not verify means that CA did not issue the certificate.
        W::InvalidSignatureForPublicKey
        | W::UnsupportedSignatureAlgorithmForPublicKeyContext(_) => SvidError::UnknownIssuer,
        W::RequiredEkuNotFoundContext(_) => SvidError::WrongUsage {
            usage: match side {
                Side::Server => "serverAuth",
                Side::Client => "clientAuth",
            },
        },
        W::BadDer | W::BadDerTime | W::TrailingData(_) | W::MalformedExtensions => {
            SvidError::Malformed {
                reason: e.to_string(),
            }
        }
        other => SvidError::InvalidChain {
            reason: other.to_string(),
        },
    }
}

fn to_rustls(e: SvidError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(e))))
}

/// rustls client-side verifier: checks the server's SVID (ignoring the DNS
/// server name) and, if configured, that its identity is one of the
/// destination's expected identities (secure naming).
#[derive(Debug, Clone)]
pub struct SpiffeServerVerifier {
    inner: SvidVerifier,
    expected: Option<Vec<SpiffeId>>,
}

impl SpiffeServerVerifier {
    /// Accepts any identity of the verifier's trust domains.
    pub fn new(inner: SvidVerifier) -> Self {
        Self {
            inner,
            expected: None,
        }
    }

    /// Accepts only these identities (the destination service's accounts).
    pub fn expecting(inner: SvidVerifier, expected: impl IntoIterator<Item = SpiffeId>) -> Self {
        Self {
            inner,
            expected: Some(expected.into_iter().collect()),
        }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let id = self
            .inner
            .verify(end_entity, intermediates, now, Side::Server)
            .map_err(to_rustls)?;
        if let Some(expected) = &self.expected
            && !expected.contains(&id)
        {
            return Err(to_rustls(SvidError::UnexpectedIdentity {
                id: id.to_string(),
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.inner.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.inner.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.algs.supported_schemes()
    }
}

/// rustls server-side verifier: requires a client certificate that is a
/// valid SVID. The caller reads the identity with [`peer_identity`] after
/// the handshake and authorizes it.
#[derive(Debug, Clone)]
pub struct SpiffeClientVerifier {
    inner: SvidVerifier,
    hints: Vec<DistinguishedName>,
}

impl SpiffeClientVerifier {
    /// A mandatory-client-auth verifier.
    pub fn new(inner: SvidVerifier) -> Self {
        let hints = inner
            .bundle
            .anchors()
            .iter()
            // Trust anchors hold the Name's contents; the wire form needs the
            // outer SEQUENCE (BoringSSL rejects the message otherwise).
            .map(|a| DistinguishedName::in_sequence(a.subject.as_ref()))
            .collect();
        Self { inner, hints }
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.hints
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify(end_entity, intermediates, now, Side::Client)
            .map_err(to_rustls)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.inner.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.inner.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.algs.supported_schemes()
    }
}
