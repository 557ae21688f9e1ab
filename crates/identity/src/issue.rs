//! Workload certificate issuance.
//!
//! The workload generates its key and a CSR ([`WorkloadKey`]); the private
//! key never leaves it. The CA ([`CertificateAuthority::sign_csr`]) takes the
//! CSR together with the identity the caller has *proven* (authenticated by
//! the transport, never read from the CSR), checks that the CSR asks for
//! nothing else, and signs a certificate built only from what it decided:
//! one URI SAN (the authenticated SPIFFE ID), not a CA, digitalSignature
//! (+ keyEncipherment for RSA keys), EKU serverAuth + clientAuth, the capped
//! TTL. Nothing requested in the CSR (names, usages, subject) is copied.

use std::time::Duration;

use rcgen::{
    CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
    PublicKeyData, SanType,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::FromDer as _;

use crate::ca::{CertificateAuthority, random_serial};
use crate::keys::{KeyGenError, KeyType, PublicKeyKind};
use crate::pem;
use crate::spiffe::{SpiffeId, SpiffeIdError};

/// File names written by [`write_workload_files`] (Istio's workload file names).
pub const KEY_FILE: &str = "key.pem";
/// The leaf then the CA chain.
pub const WORKLOAD_CHAIN_FILE: &str = "cert-chain.pem";
/// The root.
pub const WORKLOAD_ROOT_FILE: &str = "root-cert.pem";

/// Leaves are backdated by this much to tolerate clock skew between hosts
/// (the lifetime counted from "now" is unchanged).
pub const LEAF_BACKDATE: Duration = Duration::from_secs(60);

/// Why a CSR was refused or could not be signed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IssueError {
    #[error("malformed CSR: {reason}")]
    MalformedCsr { reason: String },
    #[error("CSR signature does not verify (proof of possession failed)")]
    BadCsrSignature,
    #[error("unsupported key in CSR: {kind} (expected ECDSA P-256/P-384 or RSA 2048-4096)")]
    UnsupportedKey { kind: String },
    #[error("CSR asks for {count} URI SANs; a workload certificate has exactly one SPIFFE ID")]
    MultipleUriSans { count: usize },
    #[error("CSR asks for URI SAN {uri:?}, which is not a SPIFFE ID: {source}")]
    InvalidRequestedId {
        uri: String,
        #[source]
        source: SpiffeIdError,
    },
    #[error("CSR asks for identity {requested} but the caller is authenticated as {authenticated}")]
    IdentityMismatch {
        requested: String,
        authenticated: String,
    },
    #[error("identity {id} is in trust domain {requested:?}; this CA signs for {ca:?} only")]
    ForeignTrustDomain {
        id: String,
        requested: String,
        ca: String,
    },
    #[error("identity {id} is not a workload identity (spiffe://TD/ns/NS/sa/SA): {source}")]
    NotWorkloadIdentity {
        id: String,
        #[source]
        source: SpiffeIdError,
    },
    #[error("CSR asks for a CA certificate; workload certificates are never CAs")]
    CaRequested,
    #[error("requested lifetime is zero")]
    ZeroTtl,
    #[error("the CA expired at {not_after}; it cannot issue")]
    CaExpired { not_after: OffsetDateTime },
    #[error("signing failed: {reason}")]
    Sign { reason: String },
}

/// A signed workload certificate and its chain.
#[derive(Debug, Clone)]
pub struct IssuedCertificate {
    id: SpiffeId,
    leaf: CertificateDer<'static>,
    /// Leaf first, then the CA chain (signing CA, intermediates, root last).
    chain: Vec<CertificateDer<'static>>,
    root: CertificateDer<'static>,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    serial: String,
}

impl IssuedCertificate {
    /// The identity written into the certificate.
    pub fn id(&self) -> &SpiffeId {
        &self.id
    }

    /// The leaf certificate.
    pub fn leaf(&self) -> &CertificateDer<'static> {
        &self.leaf
    }

    /// Leaf first, then the CA chain (signing CA, intermediates, root last).
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// The chain without the leaf (what a TLS peer needs as intermediates).
    pub fn ca_chain(&self) -> &[CertificateDer<'static>] {
        self.chain.get(1..).unwrap_or_default()
    }

    /// The root this chain ends at.
    pub fn root(&self) -> &CertificateDer<'static> {
        &self.root
    }

    /// Start of validity (backdated by [`LEAF_BACKDATE`]).
    pub fn not_before(&self) -> OffsetDateTime {
        self.not_before
    }

    /// End of validity.
    pub fn not_after(&self) -> OffsetDateTime {
        self.not_after
    }

    /// Serial number, lower-case hex.
    pub fn serial(&self) -> &str {
        &self.serial
    }

    /// The chain as PEM, leaf first (`cert-chain.pem`).
    pub fn chain_pem(&self) -> String {
        pem::encode_certs(&self.chain)
    }

    /// The root as PEM (`root-cert.pem`).
    pub fn root_pem(&self) -> String {
        pem::encode("CERTIFICATE", &self.root)
    }
}

/// A workload's private key, generated where the workload runs.
pub struct WorkloadKey {
    key: KeyPair,
    key_type: KeyType,
}

impl std::fmt::Debug for WorkloadKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadKey")
            .field("key_type", &self.key_type)
            .finish_non_exhaustive()
    }
}

impl WorkloadKey {
    /// Generates a key (ECDSA P-256 is the default type).
    pub fn generate(key_type: KeyType) -> Result<Self, KeyGenError> {
        Ok(Self {
            key: key_type.generate()?,
            key_type,
        })
    }

    /// The key type.
    pub fn key_type(&self) -> KeyType {
        self.key_type
    }

    /// A DER CSR asking for `id` as the only URI SAN, with an empty subject.
    pub fn csr_der(&self, id: &SpiffeId) -> Result<Vec<u8>, IssueError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(ia5(id.as_str())?)];
        let csr = params
            .serialize_request(&self.key)
            .map_err(|e| IssueError::Sign {
                reason: e.to_string(),
            })?;
        Ok(csr.der().to_vec())
    }

    /// The private key as PKCS#8 DER (for rustls).
    pub fn private_key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.serialize_der()))
    }

    /// The private key as PKCS#8 PEM (`key.pem`).
    pub fn private_key_pem(&self) -> String {
        self.key.serialize_pem()
    }
}

/// Writes `key.pem` (mode 0600), `cert-chain.pem` (leaf first) and
/// `root-cert.pem` into `dir` (created if absent). Refuses to overwrite
/// unless `overwrite`.
pub fn write_workload_files(
    dir: &std::path::Path,
    key: &WorkloadKey,
    issued: &IssuedCertificate,
    overwrite: bool,
) -> Result<(), pem::PemError> {
    std::fs::create_dir_all(dir).map_err(|source| pem::PemError::Write {
        path: dir.to_owned(),
        source,
    })?;
    if !overwrite {
        for f in [KEY_FILE, WORKLOAD_CHAIN_FILE, WORKLOAD_ROOT_FILE] {
            let p = dir.join(f);
            if p.exists() {
                return Err(pem::PemError::Exists { path: p });
            }
        }
    }
    pem::write_file(
        &dir.join(KEY_FILE),
        key.private_key_pem().as_bytes(),
        pem::FileKind::Secret,
        overwrite,
    )?;
    pem::write_file(
        &dir.join(WORKLOAD_CHAIN_FILE),
        issued.chain_pem().as_bytes(),
        pem::FileKind::Public,
        overwrite,
    )?;
    pem::write_file(
        &dir.join(WORKLOAD_ROOT_FILE),
        issued.root_pem().as_bytes(),
        pem::FileKind::Public,
        overwrite,
    )
}

/// The subject public key of a CSR, in the form rcgen needs to embed it.
struct CsrPublicKey {
    raw: Vec<u8>,
    alg: &'static rcgen::SignatureAlgorithm,
}

impl PublicKeyData for CsrPublicKey {
    fn der_bytes(&self) -> &[u8] {
        &self.raw
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        self.alg
    }
}

impl CertificateAuthority {
    /// Signs a workload CSR (DER) for `authenticated`, the identity the
    /// caller has proven. `ttl` defaults to the CA's default TTL and is
    /// capped at its maximum and at the CA chain's expiry.
    pub fn sign_csr(
        &self,
        csr_der: &[u8],
        authenticated: &SpiffeId,
        ttl: Option<Duration>,
    ) -> Result<IssuedCertificate, IssueError> {
        self.sign_csr_at(csr_der, authenticated, ttl, OffsetDateTime::now_utc())
    }

    /// As [`CertificateAuthority::sign_csr`] with a PEM CSR (`CERTIFICATE REQUEST`),
    /// as Istio's `CreateCertificate` carries it.
    pub fn sign_csr_pem(
        &self,
        csr_pem: &str,
        authenticated: &SpiffeId,
        ttl: Option<Duration>,
    ) -> Result<IssuedCertificate, IssueError> {
        use rustls_pki_types::pem::PemObject as _;
        let der =
            rustls_pki_types::CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes())
                .map_err(|e| IssueError::MalformedCsr {
                    reason: e.to_string(),
                })?;
        self.sign_csr(&der, authenticated, ttl)
    }

    /// As [`CertificateAuthority::sign_csr`], with the current time given.
    pub fn sign_csr_at(
        &self,
        csr_der: &[u8],
        authenticated: &SpiffeId,
        ttl: Option<Duration>,
        now: OffsetDateTime,
    ) -> Result<IssuedCertificate, IssueError> {
        // 2. Parse the CSR and check proof of possession.
        let csr = parse_csr(csr_der)?;
        self.sign_parsed(&csr, authenticated, ttl, now)
    }

    /// Signs a CSR that [`check_csr`] parsed and whose signature it
    /// verified (the CA service inspects what a CSR asks for before it
    /// signs; the signature is not verified a second time). What the CSR
    /// asks for is checked again, as by [`CertificateAuthority::sign_csr`].
    pub fn sign_checked(
        &self,
        csr: &CheckedCsr<'_>,
        authenticated: &SpiffeId,
        ttl: Option<Duration>,
    ) -> Result<IssuedCertificate, IssueError> {
        self.sign_parsed(&csr.csr, authenticated, ttl, OffsetDateTime::now_utc())
    }

    /// Signs a parsed CSR whose signature was verified.
    fn sign_parsed(
        &self,
        csr: &X509CertificationRequest<'_>,
        authenticated: &SpiffeId,
        ttl: Option<Duration>,
        now: OffsetDateTime,
    ) -> Result<IssuedCertificate, IssueError> {
        // 1. The authenticated identity must be a workload of our trust domain.
        SpiffeId::parse_workload(authenticated.as_str()).map_err(|source| {
            IssueError::NotWorkloadIdentity {
                id: authenticated.to_string(),
                source,
            }
        })?;
        if authenticated.trust_domain_str() != self.trust_domain().as_str() {
            return Err(IssueError::ForeignTrustDomain {
                id: authenticated.to_string(),
                requested: authenticated.trust_domain_str().to_owned(),
                ca: self.trust_domain().to_string(),
            });
        }

        // 3. What the CSR asks for may only be a subset of what we grant.
        check_requested(csr, authenticated, self.trust_domain())?;

        // 4. The key.
        let spki = &csr.certification_request_info.subject_pki;
        let kind = PublicKeyKind::of(spki);
        let key_type = kind.key_type().ok_or_else(|| IssueError::UnsupportedKey {
            kind: kind.to_string(),
        })?;
        let public_key = CsrPublicKey {
            raw: spki.subject_public_key.data.to_vec(),
            alg: key_type.signature_algorithm(),
        };
        self.sign_leaf(&public_key, key_type, authenticated, Vec::new(), ttl, now)
    }

    /// Issues the certificate of a server that is itself part of the mesh
    /// (the control plane): the SVID `id` (a workload identity of this CA's
    /// trust domain) plus DNS names and IP addresses as further SANs, so
    /// that clients can verify it by SPIFFE ID or by the name they dialled.
    /// The key is the caller's own (generated where the server runs).
    pub fn issue_server_cert(
        &self,
        key: &WorkloadKey,
        id: &SpiffeId,
        dns_names: &[String],
        ips: &[std::net::IpAddr],
        ttl: Option<Duration>,
    ) -> Result<IssuedCertificate, IssueError> {
        SpiffeId::parse_workload(id.as_str()).map_err(|source| {
            IssueError::NotWorkloadIdentity {
                id: id.to_string(),
                source,
            }
        })?;
        if id.trust_domain_str() != self.trust_domain().as_str() {
            return Err(IssueError::ForeignTrustDomain {
                id: id.to_string(),
                requested: id.trust_domain_str().to_owned(),
                ca: self.trust_domain().to_string(),
            });
        }
        let mut extra = Vec::with_capacity(dns_names.len() + ips.len());
        for name in dns_names {
            extra.push(SanType::DnsName(ia5(name)?));
        }
        extra.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        self.sign_leaf(
            &key.key,
            key.key_type,
            id,
            extra,
            ttl,
            OffsetDateTime::now_utc(),
        )
    }

    /// Builds and signs a leaf from the CA's decisions only: `id` as the
    /// only URI SAN (then `extra_sans`), not a CA, the capped TTL.
    fn sign_leaf(
        &self,
        public_key: &impl PublicKeyData,
        key_type: KeyType,
        id: &SpiffeId,
        extra_sans: Vec<SanType>,
        ttl: Option<Duration>,
        now: OffsetDateTime,
    ) -> Result<IssuedCertificate, IssueError> {
        // 5. Lifetime: requested or default, capped by policy and by the CA.
        let ttl = ttl
            .unwrap_or(self.settings.default_ttl)
            .min(self.settings.max_ttl);
        if ttl.as_secs() == 0 {
            return Err(IssueError::ZeroTtl);
        }
        if now >= self.not_after {
            return Err(IssueError::CaExpired {
                not_after: self.not_after,
            });
        }
        let ttl = time::Duration::try_from(ttl).map_err(|_| IssueError::Sign {
            reason: "lifetime too large".into(),
        })?;
        let not_after = now.saturating_add(ttl).min(self.not_after);
        let not_before =
            now.saturating_sub(time::Duration::seconds(LEAF_BACKDATE.as_secs() as i64));

        // 6. Build the certificate from our decisions only.
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(ia5(id.as_str())?)];
        params.subject_alt_names.extend(extra_sans);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = if key_type.is_rsa() {
            vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyEncipherment,
            ]
        } else {
            vec![KeyUsagePurpose::DigitalSignature]
        };
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = not_before;
        params.not_after = not_after;
        let serial = random_serial().map_err(|reason| IssueError::Sign { reason })?;
        let serial_hex = hex(&serial.to_bytes());
        params.serial_number = Some(serial);
        params.use_authority_key_identifier_extension = true;

        let leaf = params
            .signed_by(public_key, &self.issuer)
            .map_err(|e| IssueError::Sign {
                reason: e.to_string(),
            })?;
        let mut chain = Vec::with_capacity(self.chain.len() + 1);
        chain.push(leaf.der().clone());
        chain.extend(self.chain.iter().cloned());
        Ok(IssuedCertificate {
            id: id.clone(),
            leaf: leaf.der().clone(),
            chain,
            root: self.root.clone(),
            not_before,
            not_after,
            serial: serial_hex,
        })
    }
}

/// What a CSR asks for, as a CA service needs it to decide whether to
/// refuse it (the CA never copies any of it into a certificate).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CsrRequest {
    /// The requested URI SANs, in order.
    pub uris: Vec<String>,
    /// Other requested SANs, as `DNS:name`, `IP:addr`, `email:addr` or the
    /// SAN type's name.
    pub other_names: Vec<String>,
    /// Whether it asks for a CA (basicConstraints CA:TRUE, or keyCertSign /
    /// cRLSign key usages).
    pub ca: bool,
}

/// Parses a DER CSR (nothing may follow it) and checks its signature:
/// proof of possession of the key it carries.
fn parse_csr(csr_der: &[u8]) -> Result<X509CertificationRequest<'_>, IssueError> {
    let csr = match X509CertificationRequest::from_der(csr_der) {
        Ok(([], csr)) => csr,
        Ok(_) => {
            return Err(IssueError::MalformedCsr {
                reason: "trailing data".into(),
            });
        }
        Err(e) => {
            return Err(IssueError::MalformedCsr {
                reason: e.to_string(),
            });
        }
    };
    csr.verify_signature()
        .map_err(|_| IssueError::BadCsrSignature)?;
    Ok(csr)
}

/// A CSR parsed and with its signature verified ([`check_csr`]): what it
/// asks for, and what [`CertificateAuthority::sign_checked`] signs.
#[derive(Debug)]
pub struct CheckedCsr<'a> {
    csr: X509CertificationRequest<'a>,
    /// What it asks for.
    pub request: CsrRequest,
}

/// Parses a DER CSR, checks its signature (proof of possession) and
/// returns it with what it asks for. Never panics on any input.
pub fn check_csr(csr_der: &[u8]) -> Result<CheckedCsr<'_>, IssueError> {
    let csr = parse_csr(csr_der)?;
    let request = requested(&csr);
    Ok(CheckedCsr { csr, request })
}

/// Parses a DER CSR, checks its signature (proof of possession) and
/// returns what it asks for. Never panics on any input.
pub fn inspect_csr(csr_der: &[u8]) -> Result<CsrRequest, IssueError> {
    check_csr(csr_der).map(|c| c.request)
}

/// What a parsed CSR asks for.
fn requested(csr: &X509CertificationRequest<'_>) -> CsrRequest {
    let mut request = CsrRequest::default();
    for ext in csr.requested_extensions().into_iter().flatten() {
        match ext {
            ParsedExtension::SubjectAlternativeName(san) => {
                for name in &san.general_names {
                    match name {
                        GeneralName::URI(u) => request.uris.push((*u).to_owned()),
                        GeneralName::DNSName(d) => request.other_names.push(format!("DNS:{d}")),
                        GeneralName::RFC822Name(e) => {
                            request.other_names.push(format!("email:{e}"))
                        }
                        GeneralName::IPAddress(ip) => request.other_names.push(ip_name(ip)),
                        other => request
                            .other_names
                            .push(general_name_kind(other).to_owned()),
                    }
                }
            }
            ParsedExtension::BasicConstraints(bc) if bc.ca => request.ca = true,
            ParsedExtension::KeyUsage(ku) if ku.key_cert_sign() || ku.crl_sign() => {
                request.ca = true
            }
            _ => {}
        }
    }
    request
}

fn ip_name(bytes: &[u8]) -> String {
    if let Ok(v4) = <[u8; 4]>::try_from(bytes) {
        format!("IP:{}", std::net::Ipv4Addr::from(v4))
    } else if let Ok(v6) = <[u8; 16]>::try_from(bytes) {
        format!("IP:{}", std::net::Ipv6Addr::from(v6))
    } else {
        format!("IP:{} bytes", bytes.len())
    }
}

fn general_name_kind(name: &GeneralName<'_>) -> &'static str {
    match name {
        GeneralName::OtherName(..) => "otherName",
        GeneralName::X400Address(_) => "x400Address",
        GeneralName::DirectoryName(_) => "dirName",
        GeneralName::EDIPartyName(_) => "ediPartyName",
        GeneralName::RegisteredID(_) => "registeredID",
        _ => "SAN",
    }
}

/// Checks the CSR's requested extensions: at most one URI SAN, equal to the
/// authenticated identity; no CA. Other SAN types and usages are ignored
/// (they are never copied into the certificate).
fn check_requested(
    csr: &X509CertificationRequest<'_>,
    authenticated: &SpiffeId,
    ca_domain: &crate::spiffe::TrustDomain,
) -> Result<(), IssueError> {
    let Some(extensions) = csr.requested_extensions() else {
        return Ok(());
    };
    let mut uris = Vec::new();
    for ext in extensions {
        match ext {
            ParsedExtension::SubjectAlternativeName(san) => {
                uris.extend(san.general_names.iter().filter_map(|n| match n {
                    GeneralName::URI(u) => Some(*u),
                    _ => None,
                }));
            }
            ParsedExtension::BasicConstraints(bc) if bc.ca => return Err(IssueError::CaRequested),
            ParsedExtension::KeyUsage(ku) if ku.key_cert_sign() || ku.crl_sign() => {
                return Err(IssueError::CaRequested);
            }
            _ => {}
        }
    }
    match uris.as_slice() {
        [] => Ok(()),
        [uri] => {
            let requested =
                SpiffeId::parse(uri).map_err(|source| IssueError::InvalidRequestedId {
                    uri: (*uri).to_owned(),
                    source,
                })?;
            if requested.trust_domain_str() != ca_domain.as_str() {
                return Err(IssueError::ForeignTrustDomain {
                    id: requested.to_string(),
                    requested: requested.trust_domain_str().to_owned(),
                    ca: ca_domain.to_string(),
                });
            }
            if requested != *authenticated {
                return Err(IssueError::IdentityMismatch {
                    requested: requested.to_string(),
                    authenticated: authenticated.to_string(),
                });
            }
            Ok(())
        }
        many => Err(IssueError::MultipleUriSans { count: many.len() }),
    }
}

fn ia5(s: &str) -> Result<rcgen::string::Ia5String, IssueError> {
    rcgen::string::Ia5String::try_from(s).map_err(|e| IssueError::Sign {
        reason: e.to_string(),
    })
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}
