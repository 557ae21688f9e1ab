//! The mesh certificate authority: creating a root and signing
//! intermediates (`meshward ca init`), and loading a signing CA, either a
//! freshly made self-signed root or a plug-in CA in Istio's `cacerts` layout.
//!
//! Loading validates everything an operator can get wrong and names the file
//! and the reason: unreadable PEM, a key that does not match its certificate,
//! a certificate that is not a CA or lacks keyCertSign, an expired or
//! not-yet-valid certificate, and a `cert-chain.pem` that does not lead from
//! `ca-cert.pem` to `root-cert.pem`. A loaded CA then signs a test leaf and
//! verifies it against the root before it is returned, so that a CA that
//! loads is a CA that works.
//!
//! The trust domain a CA signs for is chosen by one rule,
//! [`ChosenTrustDomain::choose`], for every consumer: the configured one,
//! else the one the CA certificate names, else Istio's default
//! `cluster.local` (plug-in CAs made with plain OpenSSL name none).

use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer as _;

use crate::keys::{KeyGenError, KeyType, PublicKeyKind};
use crate::pem::{self, FileKind, PemError};
use crate::spiffe::{DEFAULT_TRUST_DOMAIN, SpiffeId, TrustDomain};

/// `cacerts` layout file names (Istio's plug-in CA).
pub const CA_CERT_FILE: &str = "ca-cert.pem";
/// The signing CA's private key.
pub const CA_KEY_FILE: &str = "ca-key.pem";
/// The root certificate.
pub const ROOT_CERT_FILE: &str = "root-cert.pem";
/// The signing CA certificate, then any further intermediates, then the root.
pub const CERT_CHAIN_FILE: &str = "cert-chain.pem";
/// The root's private key, written by `meshward ca init` beside the others, to be stored offline.
pub const ROOT_KEY_FILE: &str = "root-key.pem";

/// Default workload certificate lifetime (Istio's `DEFAULT_WORKLOAD_CERT_TTL`).
pub const DEFAULT_WORKLOAD_TTL: Duration = Duration::from_secs(24 * 3600);
/// Default upper bound for requested workload lifetimes (Istio's `MAX_WORKLOAD_CERT_TTL`).
pub const DEFAULT_MAX_WORKLOAD_TTL: Duration = Duration::from_secs(90 * 24 * 3600);
/// Default root lifetime for `ca init`: 10 years.
pub const DEFAULT_ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Default intermediate lifetime for `ca init`: 2 years.
pub const DEFAULT_INTERMEDIATE_LIFETIME: Duration = Duration::from_secs(2 * 365 * 24 * 3600);

/// CA certificates are backdated by this much to tolerate clock skew between hosts.
const CA_BACKDATE: time::Duration = time::Duration::minutes(5);

/// Why a CA (or root) directory cannot be loaded. Every variant names the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaLoadError {
    /// Unreadable file or PEM without the expected block.
    #[error(transparent)]
    File(#[from] PemError),
    #[error("{}: not a valid X.509 certificate: {reason}", path.display())]
    BadCertificate { path: PathBuf, reason: String },
    #[error("{}: not a usable private key: {reason}", path.display())]
    BadKey { path: PathBuf, reason: String },
    #[error(
        "{}: unsupported CA key {kind}: expected RSA 2048-4096 or ECDSA P-256/P-384",
        path.display()
    )]
    UnsupportedKey { path: PathBuf, kind: String },
    #[error("{}: private key does not match the certificate in {}", key_path.display(), cert_path.display())]
    KeyMismatch {
        key_path: PathBuf,
        cert_path: PathBuf,
    },
    #[error("{}: certificate {subject:?} is not a CA (basicConstraints CA:TRUE missing)", path.display())]
    NotCa { path: PathBuf, subject: String },
    #[error("{}: certificate {subject:?} lacks the keyCertSign key usage", path.display())]
    MissingKeyCertSign { path: PathBuf, subject: String },
    #[error("{}: certificate {subject:?} expired at {not_after}", path.display())]
    Expired {
        path: PathBuf,
        subject: String,
        not_after: OffsetDateTime,
    },
    #[error("{}: certificate {subject:?} is not valid before {not_before}", path.display())]
    NotYetValid {
        path: PathBuf,
        subject: String,
        not_before: OffsetDateTime,
    },
    #[error("{}: root certificate is not self-signed: {reason}", path.display())]
    RootNotSelfSigned { path: PathBuf, reason: String },
    #[error("{}: first certificate is not the one in {CA_CERT_FILE}", path.display())]
    ChainDoesNotStartAtCaCert { path: PathBuf },
    #[error("{}: chain does not end at a root in {ROOT_CERT_FILE}", path.display())]
    ChainDoesNotEndAtRoot { path: PathBuf },
    #[error("{}: certificate #{index} is not signed by certificate #{}: {reason}", path.display(), index + 1)]
    ChainBroken {
        path: PathBuf,
        index: usize,
        reason: String,
    },
    #[error("{}: CA certificate is for trust domain {in_cert:?} but {configured:?} is configured", path.display())]
    TrustDomainMismatch {
        path: PathBuf,
        in_cert: String,
        configured: String,
    },
    #[error("{}: the CA failed its self-test (signing and verifying a test certificate): {reason}", path.display())]
    SelfTest { path: PathBuf, reason: String },
}

/// Why creating a root or an intermediate failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaError {
    #[error(transparent)]
    KeyGen(#[from] KeyGenError),
    #[error("cannot create certificate: {reason}")]
    Sign { reason: String },
    #[error("lifetime must be at least one second")]
    ZeroLifetime,
    #[error("the root expires at {root_not_after}: it cannot sign a new intermediate")]
    RootExpired { root_not_after: OffsetDateTime },
}

/// Options for creating a root or intermediate CA.
#[derive(Debug, Clone)]
pub struct CaOptions {
    /// Written into the CA certificate as the URI SAN `spiffe://TRUST_DOMAIN`.
    pub trust_domain: TrustDomain,
    /// Subject `O=`.
    pub organization: String,
    /// Subject `CN=`; a default naming the role is used when `None`.
    pub common_name: Option<String>,
    pub key_type: KeyType,
    pub lifetime: Duration,
}

/// Where a CA's trust domain came from (see [`ChosenTrustDomain::choose`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TrustDomainSource {
    /// Configured by the operator (e.g. `--trust-domain`).
    Configured,
    /// The CA certificate's `spiffe://TRUST_DOMAIN` URI SAN.
    Certificate,
    /// Neither: Istio's default, [`DEFAULT_TRUST_DOMAIN`].
    IstioDefault,
}

/// The trust domain a CA signs for, and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChosenTrustDomain {
    trust_domain: TrustDomain,
    source: TrustDomainSource,
    /// The CA certificate that was consulted (named in errors and the notice).
    certificate: PathBuf,
}

impl ChosenTrustDomain {
    /// The rule every consumer of a CA follows (`ca issue`, `ca init --root`,
    /// anything that loads a plug-in CA): `configured` if given, else
    /// `in_cert` (the trust domain named by the CA `certificate`'s
    /// `spiffe://TRUST_DOMAIN` URI SAN), else Istio's default
    /// `cluster.local`. Istio itself takes the trust domain from the mesh
    /// config (default `cluster.local`) and never reads it from the CA, so
    /// plug-in CAs made with plain OpenSSL carry none. A configured trust
    /// domain that contradicts the certificate's is refused: the operator
    /// is pointing at the wrong CA, or the wrong flag.
    pub fn choose(
        configured: Option<TrustDomain>,
        in_cert: Option<TrustDomain>,
        certificate: &Path,
    ) -> Result<Self, CaLoadError> {
        let (trust_domain, source) = match (configured, in_cert) {
            (Some(configured), Some(in_cert)) if configured != in_cert => {
                return Err(CaLoadError::TrustDomainMismatch {
                    path: certificate.to_owned(),
                    in_cert: in_cert.to_string(),
                    configured: configured.to_string(),
                });
            }
            (Some(td), _) => (td, TrustDomainSource::Configured),
            (None, Some(td)) => (td, TrustDomainSource::Certificate),
            (None, None) => (
                TrustDomain::istio_default(),
                TrustDomainSource::IstioDefault,
            ),
        };
        Ok(Self {
            trust_domain,
            source,
            certificate: certificate.to_owned(),
        })
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// Where it came from.
    pub fn source(&self) -> TrustDomainSource {
        self.source
    }

    /// When Istio's default was taken, the line to show the operator (it is
    /// a guess they should know about); `how_to_override` tells them how to
    /// choose another, e.g. "pass --trust-domain TRUST_DOMAIN to use another".
    pub fn notice(&self, how_to_override: &str) -> Option<String> {
        (self.source == TrustDomainSource::IstioDefault).then(|| {
            format!(
                "{} names no trust domain (no spiffe://TRUST_DOMAIN URI SAN): using the mesh default trust domain {DEFAULT_TRUST_DOMAIN}, as Istio does; {how_to_override}",
                self.certificate.display()
            )
        })
    }
}

/// Limits applied by a signing CA.
#[derive(Debug, Clone)]
pub struct CaSettings {
    /// The trust domain the CA signs for; `None`: the one the CA certificate
    /// names, else `cluster.local` (see [`ChosenTrustDomain::choose`]).
    pub trust_domain: Option<TrustDomain>,
    /// Lifetime when the caller asks for none.
    pub default_ttl: Duration,
    /// Requested lifetimes are capped to this.
    pub max_ttl: Duration,
}

impl Default for CaSettings {
    fn default() -> Self {
        Self {
            trust_domain: None,
            default_ttl: DEFAULT_WORKLOAD_TTL,
            max_ttl: DEFAULT_MAX_WORKLOAD_TTL,
        }
    }
}

/// A root CA with its key (used by `ca init` to make intermediates, and as
/// a self-signed signing CA).
pub struct RootCa {
    cert: CertificateDer<'static>,
    key: KeyPair,
    key_type: KeyType,
    not_after: OffsetDateTime,
}

impl std::fmt::Debug for RootCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RootCa")
            .field("key_type", &self.key_type)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl RootCa {
    /// Generates a new self-signed root.
    pub fn generate(opts: &CaOptions) -> Result<Self, CaError> {
        Self::generate_at(opts, OffsetDateTime::now_utc())
    }

    /// As [`RootCa::generate`], with the current time given (tests).
    pub fn generate_at(opts: &CaOptions, now: OffsetDateTime) -> Result<Self, CaError> {
        let key = opts.key_type.generate()?;
        let not_after = now + to_time(opts.lifetime)?;
        let params = ca_params(opts, "meshward root CA", None, now - CA_BACKDATE, not_after)?;
        let cert = params
            .self_signed(&key)
            .map_err(|e| CaError::Sign {
                reason: e.to_string(),
            })?
            .der()
            .clone();
        Ok(Self {
            cert,
            key,
            key_type: opts.key_type,
            not_after,
        })
    }

    /// Loads `root-cert.pem` and `root-key.pem` from `dir` and validates them
    /// (self-signed CA with keyCertSign, currently valid, key matches).
    pub fn load_dir(dir: &Path) -> Result<Self, CaLoadError> {
        let cert_path = dir.join(ROOT_CERT_FILE);
        let key_path = dir.join(ROOT_KEY_FILE);
        let now = OffsetDateTime::now_utc();
        let cert = first_cert(&cert_path)?;
        let parsed = parse_cert(&cert, &cert_path)?;
        check_ca_cert(&parsed, &cert_path, now)?;
        check_self_signed(&parsed, &cert_path)?;
        let (key, key_type) = load_matching_key(&key_path, &parsed, &cert_path)?;
        let not_after = parsed.validity().not_after.to_datetime();
        Ok(Self {
            cert,
            key,
            key_type,
            not_after,
        })
    }

    /// The root certificate.
    pub fn cert(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// The trust domain the root certificate names in a
    /// `spiffe://TRUST_DOMAIN` URI SAN (meshward's roots do; OpenSSL-made
    /// roots do not).
    pub fn trust_domain(&self) -> Option<TrustDomain> {
        // The certificate parsed when it was made or loaded; a parse failure
        // here cannot happen and would only mean "names none".
        let (_, parsed) = X509Certificate::from_der(&self.cert).ok()?;
        trust_domain_of(&parsed)
    }

    /// The root certificate as PEM.
    pub fn cert_pem(&self) -> String {
        pem::encode("CERTIFICATE", &self.cert)
    }

    /// The root key as PKCS#8 PEM. Store it offline.
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// Writes `root-key.pem` (mode 0600) into `dir`.
    pub fn write_key(&self, dir: &Path, overwrite: bool) -> Result<(), PemError> {
        pem::write_file(
            &dir.join(ROOT_KEY_FILE),
            self.key_pem().as_bytes(),
            FileKind::Secret,
            overwrite,
        )
    }

    /// The root's expiry.
    pub fn not_after(&self) -> OffsetDateTime {
        self.not_after
    }

    /// Creates a signing intermediate under this root; its lifetime is capped
    /// at the root's expiry.
    pub fn new_intermediate(&self, opts: &CaOptions) -> Result<CaMaterial, CaError> {
        self.new_intermediate_at(opts, OffsetDateTime::now_utc())
    }

    /// As [`RootCa::new_intermediate`], with the current time given (tests).
    pub fn new_intermediate_at(
        &self,
        opts: &CaOptions,
        now: OffsetDateTime,
    ) -> Result<CaMaterial, CaError> {
        if now >= self.not_after {
            return Err(CaError::RootExpired {
                root_not_after: self.not_after,
            });
        }
        let key = opts.key_type.generate()?;
        let not_after = (now + to_time(opts.lifetime)?).min(self.not_after);
        let params = ca_params(
            opts,
            "meshward intermediate CA",
            Some(0),
            now - CA_BACKDATE,
            not_after,
        )?;
        let issuer =
            Issuer::from_ca_cert_der(&self.cert, &self.key).map_err(|e| CaError::Sign {
                reason: e.to_string(),
            })?;
        let cert = params
            .signed_by(&key, &issuer)
            .map_err(|e| CaError::Sign {
                reason: e.to_string(),
            })?
            .der()
            .clone();
        Ok(CaMaterial {
            ca_cert: cert.clone(),
            ca_key_pem: key.serialize_pem(),
            root_cert: self.cert.clone(),
            chain: vec![cert, self.cert.clone()],
        })
    }

    /// Turns this root into a signing CA that signs workloads directly (the
    /// "self-signed root created on first start" mode).
    pub fn into_authority(self, settings: CaSettings) -> Result<CertificateAuthority, CaLoadError> {
        let material = CaMaterial {
            ca_cert: self.cert.clone(),
            ca_key_pem: self.key.serialize_pem(),
            root_cert: self.cert.clone(),
            chain: vec![self.cert],
        };
        CertificateAuthority::from_material(&material, settings)
    }
}

/// The contents of a `cacerts` directory.
#[derive(Clone)]
pub struct CaMaterial {
    /// `ca-cert.pem`: the signing certificate.
    pub ca_cert: CertificateDer<'static>,
    /// `ca-key.pem`: its private key.
    pub ca_key_pem: String,
    /// `root-cert.pem`.
    pub root_cert: CertificateDer<'static>,
    /// `cert-chain.pem`: the signing certificate, further intermediates, the root.
    pub chain: Vec<CertificateDer<'static>>,
}

impl std::fmt::Debug for CaMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaMaterial")
            .field("chain_len", &self.chain.len())
            .finish_non_exhaustive()
    }
}

impl CaMaterial {
    /// Writes the four `cacerts` files into `dir` (created if absent); the
    /// key with mode 0600. Refuses to overwrite existing files unless `overwrite`.
    pub fn write_dir(&self, dir: &Path, overwrite: bool) -> Result<(), PemError> {
        std::fs::create_dir_all(dir).map_err(|source| PemError::Write {
            path: dir.to_owned(),
            source,
        })?;
        if !overwrite {
            for f in [CA_CERT_FILE, CA_KEY_FILE, ROOT_CERT_FILE, CERT_CHAIN_FILE] {
                let p = dir.join(f);
                if p.exists() {
                    return Err(PemError::Exists { path: p });
                }
            }
        }
        pem::write_file(
            &dir.join(CA_KEY_FILE),
            self.ca_key_pem.as_bytes(),
            FileKind::Secret,
            overwrite,
        )?;
        pem::write_file(
            &dir.join(CA_CERT_FILE),
            pem::encode("CERTIFICATE", &self.ca_cert).as_bytes(),
            FileKind::Public,
            overwrite,
        )?;
        pem::write_file(
            &dir.join(ROOT_CERT_FILE),
            pem::encode("CERTIFICATE", &self.root_cert).as_bytes(),
            FileKind::Public,
            overwrite,
        )?;
        pem::write_file(
            &dir.join(CERT_CHAIN_FILE),
            pem::encode_certs(&self.chain).as_bytes(),
            FileKind::Public,
            overwrite,
        )
    }
}

/// A signing CA, ready to sign workload CSRs (see `issue.rs`).
pub struct CertificateAuthority {
    pub(crate) trust_domain: ChosenTrustDomain,
    pub(crate) issuer: Issuer<'static, KeyPair>,
    pub(crate) key_type: KeyType,
    /// Signing certificate first, root last (a self-signed CA: just the root).
    pub(crate) chain: Vec<CertificateDer<'static>>,
    pub(crate) root: CertificateDer<'static>,
    /// Every root of `root-cert.pem`; `root` is one of them.
    pub(crate) trusted_roots: Vec<CertificateDer<'static>>,
    /// The signing key's DER, in the encoding it was loaded from.
    pub(crate) signing_key_der: rustls_pki_types::PrivateKeyDer<'static>,
    /// The earliest expiry in the chain: no leaf outlives it.
    pub(crate) not_after: OffsetDateTime,
    pub(crate) settings: CaSettings,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("trust_domain", &self.trust_domain.trust_domain)
            .field("key_type", &self.key_type)
            .field("chain_len", &self.chain.len())
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// Loads a plug-in CA from a directory in Istio's `cacerts` layout.
    pub fn load_dir(dir: &Path, settings: CaSettings) -> Result<Self, CaLoadError> {
        Self::load_dir_at(dir, settings, OffsetDateTime::now_utc())
    }

    /// As [`CertificateAuthority::load_dir`], with the current time given (tests).
    pub fn load_dir_at(
        dir: &Path,
        settings: CaSettings,
        now: OffsetDateTime,
    ) -> Result<Self, CaLoadError> {
        let paths = Paths::in_dir(dir);
        let ca_cert = first_cert(&paths.ca_cert)?;
        let key_pem = pem::read_file(&paths.ca_key)?;
        let roots = pem::read_certs(&paths.root_cert)?;
        let chain = pem::read_certs(&paths.chain)?;
        Self::assemble(&paths, ca_cert, &key_pem, roots, chain, settings, now)
    }

    /// Builds a CA from in-memory material (validated exactly as files are;
    /// errors name the `cacerts` file names).
    pub fn from_material(material: &CaMaterial, settings: CaSettings) -> Result<Self, CaLoadError> {
        Self::assemble(
            &Paths::in_dir(Path::new("")),
            material.ca_cert.clone(),
            material.ca_key_pem.as_bytes(),
            vec![material.root_cert.clone()],
            material.chain.clone(),
            settings,
            OffsetDateTime::now_utc(),
        )
    }

    /// The trust domain this CA signs for.
    pub fn trust_domain(&self) -> &TrustDomain {
        self.trust_domain.trust_domain()
    }

    /// The trust domain with where it came from (for
    /// [`ChosenTrustDomain::notice`]).
    pub fn chosen_trust_domain(&self) -> &ChosenTrustDomain {
        &self.trust_domain
    }

    /// The root certificate this CA's chain ends at.
    pub fn root(&self) -> &CertificateDer<'static> {
        &self.root
    }

    /// Every root of `root-cert.pem` (validated: self-signed CAs, valid
    /// now), in file order; the root of the signing chain is one of them.
    /// During a root rotation the file holds the old and the new root, and
    /// peers must trust both: this is the trust bundle the CA publishes.
    pub fn trusted_roots(&self) -> &[CertificateDer<'static>] {
        &self.trusted_roots
    }

    /// The signing certificate (`ca-cert.pem`; the root for a self-signed CA).
    pub fn signing_cert(&self) -> &CertificateDer<'static> {
        // `assemble` checked that the chain starts with the signing certificate.
        &self.chain[0]
    }

    /// The signing key as loaded (PKCS#8, PKCS#1 or SEC1 DER), for signing
    /// the control plane's bootstrap tokens with the CA key, so that every
    /// replica over the same plug-in CA accepts the others' tokens. Never
    /// log or write it.
    pub fn signing_key_der(&self) -> &rustls_pki_types::PrivateKeyDer<'static> {
        &self.signing_key_der
    }

    /// The chain appended to every issued leaf: signing certificate first, root last.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// The signing key type.
    pub fn key_type(&self) -> KeyType {
        self.key_type
    }

    /// The earliest expiry in the CA chain; leaves never outlive it.
    pub fn not_after(&self) -> OffsetDateTime {
        self.not_after
    }

    /// The TTL limits in force.
    pub fn settings(&self) -> &CaSettings {
        &self.settings
    }

    fn assemble(
        paths: &Paths,
        ca_cert: CertificateDer<'static>,
        key_pem: &[u8],
        roots: Vec<CertificateDer<'static>>,
        chain: Vec<CertificateDer<'static>>,
        mut settings: CaSettings,
        now: OffsetDateTime,
    ) -> Result<Self, CaLoadError> {
        // The signing certificate and its key.
        let ca_parsed = parse_cert(&ca_cert, &paths.ca_cert)?;
        check_ca_cert(&ca_parsed, &paths.ca_cert, now)?;
        let key_der = pem::key_from_pem(key_pem, &paths.ca_key)?;
        let (key, key_type) = key_matching(&key_der, &paths.ca_key, &ca_parsed, &paths.ca_cert)?;

        // The roots: `root-cert.pem` may hold several (root rotation: the
        // old and the new root overlap); each must be a valid self-signed CA.
        for root in &roots {
            let root_parsed = parse_cert(root, &paths.root_cert)?;
            check_ca_cert(&root_parsed, &paths.root_cert, now)?;
            check_self_signed(&root_parsed, &paths.root_cert)?;
        }

        // The chain: ca-cert, intermediates..., root; each signed by the next.
        if chain.first() != Some(&ca_cert) {
            return Err(CaLoadError::ChainDoesNotStartAtCaCert {
                path: paths.chain.clone(),
            });
        }
        // The chain must end at one of the roots (during a rotation, the
        // signing CA may already be under the new root).
        let Some(root) = chain.last().filter(|last| roots.contains(last)).cloned() else {
            return Err(CaLoadError::ChainDoesNotEndAtRoot {
                path: paths.chain.clone(),
            });
        };
        let parsed_chain = chain
            .iter()
            .map(|c| parse_cert(c, &paths.chain))
            .collect::<Result<Vec<_>, _>>()?;
        let mut not_after = ca_parsed.validity().not_after.to_datetime();
        for (index, pair) in parsed_chain.windows(2).enumerate() {
            let [child, parent] = pair else { continue };
            check_ca_cert(parent, &paths.chain, now)?;
            if child.issuer().as_raw() != parent.subject().as_raw() {
                return Err(CaLoadError::ChainBroken {
                    path: paths.chain.clone(),
                    index,
                    reason: format!(
                        "issuer {:?} is not the next certificate's subject {:?}",
                        child.issuer().to_string(),
                        parent.subject().to_string()
                    ),
                });
            }
            child
                .verify_signature(Some(parent.public_key()))
                .map_err(|e| CaLoadError::ChainBroken {
                    path: paths.chain.clone(),
                    index,
                    reason: format!("signature does not verify: {e}"),
                })?;
            not_after = not_after.min(parent.validity().not_after.to_datetime());
        }

        let trust_domain = ChosenTrustDomain::choose(
            settings.trust_domain.take(),
            trust_domain_of(&ca_parsed),
            &paths.ca_cert,
        )?;
        settings.trust_domain = Some(trust_domain.trust_domain().clone());

        // rcgen re-encodes the issuer name from the parsed subject; it
        // supports only single-valued RDNs (and would panic on an empty one).
        if ca_parsed
            .subject()
            .iter()
            .any(|rdn| rdn.iter().count() != 1)
        {
            return Err(CaLoadError::BadCertificate {
                path: paths.ca_cert.clone(),
                reason: "multi-valued or empty RDNs in the subject are not supported".into(),
            });
        }
        let issuer =
            Issuer::from_ca_cert_der(&ca_cert, key).map_err(|e| CaLoadError::BadCertificate {
                path: paths.ca_cert.clone(),
                reason: e.to_string(),
            })?;
        let ca = Self {
            trust_domain,
            issuer,
            key_type,
            chain,
            root,
            trusted_roots: roots,
            signing_key_der: key_der.clone_key(),
            not_after,
            settings,
        };
        ca.self_test(now).map_err(|reason| CaLoadError::SelfTest {
            path: paths.ca_cert.clone(),
            reason,
        })?;
        Ok(ca)
    }

    /// Signs a throw-away leaf through the normal path and verifies it
    /// against the root: catches name re-encoding or key problems that the
    /// checks above cannot see.
    fn self_test(&self, now: OffsetDateTime) -> Result<(), String> {
        let id = SpiffeId::workload(self.trust_domain(), "meshward-selftest", "selftest")
            .map_err(|e| e.to_string())?;
        let key =
            crate::issue::WorkloadKey::generate(KeyType::EcP256).map_err(|e| e.to_string())?;
        let csr = key.csr_der(&id).map_err(|e| e.to_string())?;
        let issued = self
            .sign_csr_at(&csr, &id, Some(Duration::from_secs(60)), now)
            .map_err(|e| e.to_string())?;
        let bundle = crate::bundle::TrustBundle::from_roots([self.root.clone()])
            .map_err(|e| e.to_string())?;
        let verifier = crate::verify::SvidVerifier::new(bundle, crate::verify::TrustDomains::any());
        let (leaf, rest) = (issued.leaf(), issued.ca_chain());
        let unix = rustls_pki_types::UnixTime::since_unix_epoch(Duration::from_secs(
            u64::try_from(now.unix_timestamp()).unwrap_or_default(),
        ));
        verifier
            .verify(leaf, rest, unix, crate::verify::Side::Server)
            .map_err(|e| e.to_string())?;
        Ok(())
    }
}

struct Paths {
    ca_cert: PathBuf,
    ca_key: PathBuf,
    root_cert: PathBuf,
    chain: PathBuf,
}

impl Paths {
    fn in_dir(dir: &Path) -> Self {
        Self {
            ca_cert: dir.join(CA_CERT_FILE),
            ca_key: dir.join(CA_KEY_FILE),
            root_cert: dir.join(ROOT_CERT_FILE),
            chain: dir.join(CERT_CHAIN_FILE),
        }
    }
}

pub(crate) fn to_time(d: Duration) -> Result<time::Duration, CaError> {
    if d.as_secs() == 0 {
        return Err(CaError::ZeroLifetime);
    }
    time::Duration::try_from(d).map_err(|_| CaError::Sign {
        reason: "lifetime too large".into(),
    })
}

/// A random positive 128-bit serial number (RFC 5280: at most 20 bytes,
/// positive; CA/B forum: at least 64 bits of randomness).
pub(crate) fn random_serial() -> Result<SerialNumber, String> {
    let mut bytes = [0u8; 16];
    rustls::crypto::aws_lc_rs::default_provider()
        .secure_random
        .fill(&mut bytes)
        .map_err(|e| format!("no randomness: {e:?}"))?;
    // Clear the top bit so the DER INTEGER stays positive without padding,
    // and set the next so the serial keeps its full length.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

fn ca_params(
    opts: &CaOptions,
    default_cn: &str,
    path_len: Option<u8>,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<CertificateParams, CaError> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, opts.organization.as_str());
    dn.push(
        DnType::CommonName,
        opts.common_name.as_deref().unwrap_or(default_cn),
    );
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(match path_len {
        Some(n) => BasicConstraints::Constrained(n),
        None => BasicConstraints::Unconstrained,
    });
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let uri = rcgen::string::Ia5String::try_from(opts.trust_domain.id_uri()).map_err(|e| {
        CaError::Sign {
            reason: e.to_string(),
        }
    })?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    params.not_before = not_before;
    params.not_after = not_after;
    params.serial_number = Some(random_serial().map_err(|reason| CaError::Sign { reason })?);
    params.use_authority_key_identifier_extension = path_len.is_some();
    Ok(params)
}

fn first_cert(path: &Path) -> Result<CertificateDer<'static>, CaLoadError> {
    let mut certs = pem::read_certs(path)?;
    // `read_certs` never returns an empty list.
    Ok(certs.swap_remove(0))
}

pub(crate) fn parse_cert<'a>(
    der: &'a CertificateDer<'_>,
    path: &Path,
) -> Result<X509Certificate<'a>, CaLoadError> {
    match X509Certificate::from_der(der) {
        Ok(([], cert)) => Ok(cert),
        Ok(_) => Err(CaLoadError::BadCertificate {
            path: path.to_owned(),
            reason: "trailing data after the certificate".into(),
        }),
        Err(e) => Err(CaLoadError::BadCertificate {
            path: path.to_owned(),
            reason: e.to_string(),
        }),
    }
}

/// CA:TRUE, keyCertSign (when a keyUsage extension is present; RFC 5280
/// allows it to be absent, as in `openssl req -x509` roots), and valid now.
pub(crate) fn check_ca_cert(
    cert: &X509Certificate<'_>,
    path: &Path,
    now: OffsetDateTime,
) -> Result<(), CaLoadError> {
    let subject = cert.subject().to_string();
    let bad_ext = |e: x509_parser::error::X509Error| CaLoadError::BadCertificate {
        path: path.to_owned(),
        reason: e.to_string(),
    };
    let is_ca = cert
        .basic_constraints()
        .map_err(bad_ext)?
        .is_some_and(|bc| bc.value.ca);
    if !is_ca {
        return Err(CaLoadError::NotCa {
            path: path.to_owned(),
            subject,
        });
    }
    if let Some(ku) = cert.key_usage().map_err(bad_ext)?
        && !ku.value.key_cert_sign()
    {
        return Err(CaLoadError::MissingKeyCertSign {
            path: path.to_owned(),
            subject,
        });
    }
    let validity = cert.validity();
    let not_before = validity.not_before.to_datetime();
    let not_after = validity.not_after.to_datetime();
    if now < not_before {
        return Err(CaLoadError::NotYetValid {
            path: path.to_owned(),
            subject,
            not_before,
        });
    }
    if now > not_after {
        return Err(CaLoadError::Expired {
            path: path.to_owned(),
            subject,
            not_after,
        });
    }
    Ok(())
}

fn check_self_signed(cert: &X509Certificate<'_>, path: &Path) -> Result<(), CaLoadError> {
    if cert.subject().as_raw() != cert.issuer().as_raw() {
        return Err(CaLoadError::RootNotSelfSigned {
            path: path.to_owned(),
            reason: format!(
                "issuer {:?} differs from subject {:?}",
                cert.issuer().to_string(),
                cert.subject().to_string()
            ),
        });
    }
    cert.verify_signature(None)
        .map_err(|e| CaLoadError::RootNotSelfSigned {
            path: path.to_owned(),
            reason: format!("self-signature does not verify: {e}"),
        })
}

fn load_matching_key(
    key_path: &Path,
    cert: &X509Certificate<'_>,
    cert_path: &Path,
) -> Result<(KeyPair, KeyType), CaLoadError> {
    let key_pem = pem::read_file(key_path)?;
    let key_der = pem::key_from_pem(&key_pem, key_path)?;
    key_matching(&key_der, key_path, cert, cert_path)
}

fn key_matching(
    key_der: &rustls_pki_types::PrivateKeyDer<'_>,
    key_path: &Path,
    cert: &X509Certificate<'_>,
    cert_path: &Path,
) -> Result<(KeyPair, KeyType), CaLoadError> {
    let kind = PublicKeyKind::of(cert.public_key());
    let key_type = kind.key_type().ok_or_else(|| CaLoadError::UnsupportedKey {
        path: cert_path.to_owned(),
        kind: kind.to_string(),
    })?;
    let key =
        KeyPair::from_der_and_sign_algo(key_der, key_type.signature_algorithm()).map_err(|e| {
            // A key of another type than the certificate's cannot be parsed as that type.
            CaLoadError::BadKey {
                path: key_path.to_owned(),
                reason: format!(
                    "cannot use it as a {key_type} key (the certificate's key type): {e}"
                ),
            }
        })?;
    if key.public_key_raw() != cert.public_key().subject_public_key.data.as_ref() {
        return Err(CaLoadError::KeyMismatch {
            key_path: key_path.to_owned(),
            cert_path: cert_path.to_owned(),
        });
    }
    Ok((key, key_type))
}

fn trust_domain_of(cert: &X509Certificate<'_>) -> Option<TrustDomain> {
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|name| match name {
        x509_parser::extensions::GeneralName::URI(uri) => {
            let id = SpiffeId::parse(uri).ok()?;
            id.path().is_empty().then(|| id.trust_domain())
        }
        _ => None,
    })
}
