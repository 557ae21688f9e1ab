//! Shared test helpers: every key and certificate is generated at run time.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use meshward_identity::ca::{CaMaterial, CaOptions, CaSettings, CertificateAuthority, RootCa};
use meshward_identity::issue::{IssuedCertificate, WorkloadKey};
use meshward_identity::keys::KeyType;
use meshward_identity::spiffe::{SpiffeId, TrustDomain};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;

pub const TD: &str = "cluster.local";

pub fn td(name: &str) -> TrustDomain {
    TrustDomain::new(name).unwrap()
}

pub fn opts(trust_domain: &str, key_type: KeyType, lifetime: Duration) -> CaOptions {
    CaOptions {
        trust_domain: td(trust_domain),
        organization: "meshward-test".into(),
        common_name: None,
        key_type,
        lifetime,
    }
}

pub fn days(n: u64) -> Duration {
    Duration::from_secs(n * 86_400)
}

pub fn root(trust_domain: &str, key_type: KeyType) -> RootCa {
    RootCa::generate(&opts(trust_domain, key_type, days(3650))).unwrap()
}

/// A root plus a signing intermediate, as in-memory material.
pub fn material(trust_domain: &str, root_kt: KeyType, int_kt: KeyType) -> (RootCa, CaMaterial) {
    let root = root(trust_domain, root_kt);
    let m = root
        .new_intermediate(&opts(trust_domain, int_kt, days(730)))
        .unwrap();
    (root, m)
}

pub fn ca_from(m: &CaMaterial) -> CertificateAuthority {
    CertificateAuthority::from_material(m, CaSettings::default()).unwrap()
}

pub fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

pub fn workload(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::workload(&td(TD), ns, sa).unwrap()
}

/// Generates a key + CSR for `who` and has `ca` sign it.
pub fn issue(ca: &CertificateAuthority, who: &SpiffeId) -> (WorkloadKey, IssuedCertificate) {
    let key = WorkloadKey::generate(KeyType::EcP256).unwrap();
    let csr = key.csr_der(who).unwrap();
    let issued = ca.sign_csr(&csr, who, None).unwrap();
    (key, issued)
}

pub fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

/// Builds a certificate with arbitrary CA-ish properties, signed by
/// `signer` (cert + key) or self-signed.
pub struct Custom {
    pub cn: &'static str,
    pub is_ca: IsCa,
    pub key_usages: Vec<KeyUsagePurpose>,
    pub uris: Vec<String>,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl Custom {
    pub fn ca(cn: &'static str) -> Self {
        Self {
            cn,
            is_ca: IsCa::Ca(BasicConstraints::Unconstrained),
            key_usages: vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign],
            uris: vec![format!("spiffe://{TD}")],
            not_before: now() - time::Duration::hours(1),
            not_after: now() + time::Duration::days(365),
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

/// The root's key, re-parsed from its PEM (tests sign odd certificates with it).
pub fn root_key(root: &RootCa) -> KeyPair {
    KeyPair::from_pem(&root.key_pem()).unwrap()
}

/// Runs openssl; fails the test with a clear message if it is not installed.
pub fn openssl(args: &[&str], dir: &Path) -> std::process::Output {
    Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!("this test needs the `openssl` command-line tool (apt-get install openssl): {e}")
        })
}

/// Runs openssl and asserts success.
pub fn openssl_ok(args: &[&str], dir: &Path) -> String {
    let out = openssl(args, dir);
    assert!(
        out.status.success(),
        "openssl {} failed:\nstdout: {}\nstderr: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn write(path: &Path, contents: impl AsRef<[u8]>) {
    std::fs::write(path, contents).unwrap();
}

pub fn pem_cert(der: &CertificateDer<'_>) -> String {
    meshward_identity::pem::encode("CERTIFICATE", der)
}
