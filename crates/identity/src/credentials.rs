//! A workload's current credentials (key + SVID chain) and the rustls
//! plumbing that serves them: [`CredentialResolver`] reads the latest value
//! of a `tokio::sync::watch` channel at each handshake, so a rotation swaps
//! the certificate atomically for both TLS sides without rebuilding configs
//! or touching open connections.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::client::ResolvesClientCert;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, ServerConfig, SignatureScheme};
use rustls_pki_types::CertificateDer;
use tokio::sync::watch;
use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer as _;

use crate::issue::WorkloadKey;
use crate::spiffe::SpiffeId;
use crate::verify::{
    SpiffeClientVerifier, SpiffeServerVerifier, SvidError, SvidVerifier, identity_of_parsed,
};

/// Why an issued chain cannot be used with a key.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum CredentialsError {
    #[error("the CA returned an empty certificate chain")]
    EmptyChain,
    #[error("leaf certificate is malformed: {reason}")]
    Malformed { reason: String },
    #[error("leaf certificate is not an SVID: {0}")]
    NotSvid(#[from] SvidError),
    #[error("leaf certificate is for {got}, expected {expected}")]
    WrongIdentity { got: String, expected: String },
    #[error("leaf certificate does not carry this workload's public key")]
    KeyMismatch,
    #[error("private key unusable by rustls: {reason}")]
    Key { reason: String },
}

/// Why credentials files cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CredentialsFileError {
    #[error(transparent)]
    Pem(#[from] crate::pem::PemError),
    #[error("{path}: {source}")]
    Invalid {
        path: String,
        source: CredentialsError,
    },
}

/// A workload's key and certificate chain, ready for rustls.
#[derive(Debug, Clone)]
pub struct WorkloadCredentials {
    id: SpiffeId,
    chain: Vec<CertificateDer<'static>>,
    not_before: SystemTime,
    not_after: SystemTime,
    certified: Arc<CertifiedKey>,
}

impl WorkloadCredentials {
    /// Pairs `key` with the chain the CA returned (leaf first), checking that
    /// the leaf is an SVID for `expected` carrying `key`'s public key.
    pub fn new(
        key: &WorkloadKey,
        chain: Vec<CertificateDer<'static>>,
        expected: &SpiffeId,
    ) -> Result<Self, CredentialsError> {
        Self::from_parts(key.private_key_der(), chain, Some(expected))
    }

    /// Loads `key.pem` and `cert-chain.pem` (leaf first) from a directory,
    /// as `meshward ca issue` writes them; the identity is the leaf's.
    pub fn from_dir(dir: &std::path::Path) -> Result<Self, CredentialsFileError> {
        let key_path = dir.join("key.pem");
        let chain_path = dir.join("cert-chain.pem");
        let key = crate::pem::key_from_pem(&crate::pem::read_file(&key_path)?, &key_path)?;
        let chain = crate::pem::read_certs(&chain_path)?;
        Self::from_parts(key, chain, None).map_err(|source| CredentialsFileError::Invalid {
            path: chain_path.display().to_string(),
            source,
        })
    }

    /// Pairs a private key with a chain (leaf first); when `expected` is
    /// given the leaf must be an SVID for it.
    pub fn from_parts(
        key: rustls_pki_types::PrivateKeyDer<'static>,
        chain: Vec<CertificateDer<'static>>,
        expected: Option<&SpiffeId>,
    ) -> Result<Self, CredentialsError> {
        let leaf = chain.first().ok_or(CredentialsError::EmptyChain)?;
        let parsed = match X509Certificate::from_der(leaf) {
            Ok((_, c)) => c,
            Err(e) => {
                return Err(CredentialsError::Malformed {
                    reason: e.to_string(),
                });
            }
        };
        let id = identity_of_parsed(&parsed)?;
        if let Some(expected) = expected
            && id != *expected
        {
            return Err(CredentialsError::WrongIdentity {
                got: id.to_string(),
                expected: expected.to_string(),
            });
        }
        let signing_key = rustls::crypto::aws_lc_rs::default_provider()
            .key_provider
            .load_private_key(key)
            .map_err(|e| CredentialsError::Key {
                reason: e.to_string(),
            })?;
        if let Some(spki) = signing_key.public_key()
            && spki.as_ref() != parsed.public_key().raw
        {
            return Err(CredentialsError::KeyMismatch);
        }
        let validity = parsed.validity();
        let to_system = |t: x509_parser::time::ASN1Time| {
            let secs = t.timestamp();
            if secs >= 0 {
                SystemTime::UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
            } else {
                SystemTime::UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
            }
        };
        let not_before = to_system(validity.not_before);
        let not_after = to_system(validity.not_after);
        let certified = Arc::new(CertifiedKey::new(chain.clone(), signing_key));
        Ok(Self {
            id,
            chain,
            not_before,
            not_after,
            certified,
        })
    }

    /// The workload identity.
    pub fn id(&self) -> &SpiffeId {
        &self.id
    }

    /// The chain, leaf first.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// Start of the leaf's validity.
    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    /// End of the leaf's validity.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// The leaf's total lifetime.
    pub fn lifetime(&self) -> Duration {
        self.not_after
            .duration_since(self.not_before)
            .unwrap_or_default()
    }

    /// The rustls certified key.
    pub fn certified_key(&self) -> Arc<CertifiedKey> {
        self.certified.clone()
    }
}

/// What a rotation publishes: the current credentials, or `None` before the
/// first certificate and after the last one expired.
pub type CurrentCredentials = Option<Arc<WorkloadCredentials>>;

/// Serves the latest published credentials to rustls, client and server side.
#[derive(Debug, Clone)]
pub struct CredentialResolver {
    rx: watch::Receiver<CurrentCredentials>,
}

impl CredentialResolver {
    /// Follows a rotation's watch channel.
    pub fn new(rx: watch::Receiver<CurrentCredentials>) -> Self {
        Self { rx }
    }

    /// Serves fixed credentials (tests, `ca issue` output).
    pub fn fixed(creds: WorkloadCredentials) -> Self {
        let (_tx, rx) = watch::channel(Some(Arc::new(creds)));
        // A receiver keeps the last value after the sender is dropped.
        Self { rx }
    }

    fn current(&self) -> Option<Arc<CertifiedKey>> {
        self.rx.borrow().as_ref().map(|c| c.certified_key())
    }
}

impl ResolvesServerCert for CredentialResolver {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current()
    }
}

impl ResolvesClientCert for CredentialResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.current()
    }

    fn has_certs(&self) -> bool {
        self.rx.borrow().is_some()
    }
}

/// A mesh server config: mandatory client SVIDs, our SVID from `resolver`.
pub fn server_config(
    verifier: SvidVerifier,
    resolver: CredentialResolver,
) -> Result<ServerConfig, rustls::Error> {
    Ok(
        ServerConfig::builder_with_provider(
            Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
        )
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(Arc::new(SpiffeClientVerifier::new(verifier)))
        .with_cert_resolver(Arc::new(resolver)),
    )
}

/// A mesh client config: the server must present an SVID accepted by
/// `verifier` (and, with `SpiffeServerVerifier::expecting`, one of the
/// destination's identities); we present ours from `resolver`.
pub fn client_config(
    verifier: SpiffeServerVerifier,
    resolver: CredentialResolver,
) -> Result<ClientConfig, rustls::Error> {
    Ok(
        ClientConfig::builder_with_provider(
            Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
        )
        .with_safe_default_protocol_versions()?
        .dangerous()
        // Not a weakening: SpiffeServerVerifier verifies the full chain and the
        // SPIFFE identity; it only replaces DNS-name matching, which SVIDs lack.
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(Arc::new(resolver)),
    )
}
