//! Test certificate authorities, all made at run time (no key is ever
//! committed):
//!
//! - [`MeshCa`]: a mesh root CA (meshward's own CA code, as `meshward ca
//!   init` makes one) that issues SPIFFE workload certificates and writes
//!   them in Istio's layout ([`WorkloadCerts`]: `key.pem`, `cert-chain.pem`
//!   leaf first, `root-cert.pem`);
//! - [`Pki`]: a PKI of its own (rcgen) for services outside the mesh, with
//!   DNS-named leaves;
//! - [`Custom`]: a certificate with arbitrary CA-ish properties, for the
//!   error paths of CA loading and verification.

use std::path::{Path, PathBuf};
use std::time::Duration;

use meshward_identity::ca::{CaOptions, CaSettings, CertificateAuthority, RootCa};
use meshward_identity::issue::{self, IssuedCertificate, WorkloadKey};
use meshward_identity::keys::KeyType;
use meshward_identity::spiffe::{SpiffeId, TrustDomain};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;

/// Whatever a CA step failed with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The trust domain of every test mesh unless a test says otherwise.
pub const TRUST_DOMAIN: &str = "cluster.local";

/// CA options with `organization` `meshward-test` and no common name.
pub fn options(trust_domain: &str, key_type: KeyType, lifetime: Duration) -> CaOptions {
    CaOptions {
        trust_domain: TrustDomain::new(trust_domain).unwrap(),
        organization: "meshward-test".into(),
        common_name: None,
        key_type,
        lifetime,
    }
}

/// Generates a workload key (ECDSA P-256, as `meshward ca issue` does) and
/// a CSR for `who`, and has `ca` sign it, valid for `lifetime` (`None`:
/// the CA's default).
pub fn issue(
    ca: &CertificateAuthority,
    who: &SpiffeId,
    lifetime: Option<Duration>,
) -> Result<(WorkloadKey, IssuedCertificate), BoxError> {
    let key = WorkloadKey::generate(KeyType::EcP256)?;
    let csr = key.csr_der(who)?;
    let issued = ca.sign_csr(&csr, who, lifetime)?;
    Ok((key, issued))
}

/// A directory holding one workload's credentials in Istio's layout.
#[derive(Debug, Clone)]
pub struct WorkloadCerts {
    pub dir: PathBuf,
}

impl WorkloadCerts {
    pub fn key(&self) -> PathBuf {
        self.dir.join("key.pem")
    }
    pub fn chain(&self) -> PathBuf {
        self.dir.join("cert-chain.pem")
    }
    pub fn root(&self) -> PathBuf {
        self.dir.join("root-cert.pem")
    }
}

/// A mesh root CA (self-signed ECDSA P-256, as `meshward ca init` makes)
/// issuing workload certificates valid as long as the root.
pub struct MeshCa {
    trust_domain: TrustDomain,
    lifetime: Duration,
    ca: CertificateAuthority,
}

impl MeshCa {
    /// A root for `trust_domain`, organization `organization`, valid for
    /// `lifetime`.
    pub fn generate(
        trust_domain: &str,
        organization: &str,
        lifetime: Duration,
    ) -> Result<MeshCa, BoxError> {
        let trust_domain = TrustDomain::new(trust_domain)?;
        let root = RootCa::generate(&CaOptions {
            trust_domain: trust_domain.clone(),
            organization: organization.to_owned(),
            common_name: None,
            key_type: KeyType::EcP256,
            lifetime,
        })?;
        Ok(MeshCa {
            trust_domain,
            lifetime,
            ca: root.into_authority(CaSettings::default())?,
        })
    }

    /// `spiffe://TRUST_DOMAIN/ns/NS/sa/SA`.
    pub fn spiffe_uri(&self, ns: &str, sa: &str) -> String {
        format!("spiffe://{}/ns/{ns}/sa/{sa}", self.trust_domain)
    }

    /// Istio's principal form (no scheme): `TRUST_DOMAIN/ns/NS/sa/SA`.
    pub fn principal(&self, ns: &str, sa: &str) -> String {
        format!("{}/ns/{ns}/sa/{sa}", self.trust_domain)
    }

    /// Issues `spiffe://TRUST_DOMAIN/ns/NS/sa/SA` and writes it to `dir`
    /// in Istio's layout.
    pub fn write_workload(
        &self,
        dir: &Path,
        ns: &str,
        sa: &str,
    ) -> Result<WorkloadCerts, BoxError> {
        let id = SpiffeId::workload(&self.trust_domain, ns, sa)?;
        let (key, issued) = issue(&self.ca, &id, Some(self.lifetime))?;
        issue::write_workload_files(dir, &key, &issued, true)?;
        Ok(WorkloadCerts {
            dir: dir.to_owned(),
        })
    }
}

/// A CA outside the mesh: its certificate (PEM) and what signs with it.
pub struct Pki {
    pub ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A self-signed CA named `name`.
pub fn pki(name: &str) -> Pki {
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

/// A leaf certificate for DNS name `dns` and its key (PEM).
pub fn leaf(pki: &Pki, dns: &str) -> (String, String) {
    leaf_with(pki, dns, |_| {})
}

/// A leaf certificate and its key, with `adjust` applied to its params
/// (subject, validity).
pub fn leaf_with(
    pki: &Pki,
    dns: &str,
    adjust: impl FnOnce(&mut CertificateParams),
) -> (String, String) {
    let mut params = CertificateParams::new(vec![dns.to_string()]).unwrap();
    adjust(&mut params);
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &pki.issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// A client certificate named `cn`.
pub fn client_leaf(pki: &Pki, cn: &str) -> (String, String) {
    leaf_with(pki, "client.test", |p| {
        p.distinguished_name.push(DnType::CommonName, cn);
    })
}

/// The DER of a PEM certificate, as a TLS peer sees it.
pub fn der(pem: &str) -> Vec<u8> {
    use rustls_pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

/// A certificate with arbitrary CA-ish properties, signed by `signer`
/// (certificate and key) or self-signed.
pub struct Custom {
    pub cn: &'static str,
    pub is_ca: IsCa,
    pub key_usages: Vec<KeyUsagePurpose>,
    pub uris: Vec<String>,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl Custom {
    /// A valid CA of [`TRUST_DOMAIN`] to start from.
    pub fn ca(cn: &'static str) -> Self {
        let now = OffsetDateTime::now_utc();
        Self {
            cn,
            is_ca: IsCa::Ca(BasicConstraints::Unconstrained),
            key_usages: vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign],
            uris: vec![format!("spiffe://{TRUST_DOMAIN}")],
            not_before: now - time::Duration::hours(1),
            not_after: now + time::Duration::days(365),
        }
    }

    pub fn build(
        &self,
        key: &KeyPair,
        signer: Option<(&CertificateDer<'_>, &KeyPair)>,
    ) -> CertificateDer<'static> {
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, self.cn);
        p.distinguished_name = dn;
        p.is_ca = self.is_ca;
        p.key_usages = self.key_usages.clone();
        p.subject_alt_names = self
            .uris
            .iter()
            .map(|u| SanType::URI(u.as_str().try_into().unwrap()))
            .collect();
        p.not_before = self.not_before;
        p.not_after = self.not_after;
        match signer {
            None => p.self_signed(key).unwrap().der().clone(),
            Some((cert, signer_key)) => {
                let issuer = Issuer::from_ca_cert_der(cert, signer_key).unwrap();
                p.signed_by(key, &issuer).unwrap().der().clone()
            }
        }
    }
}
