//! Shared test helpers: every key and certificate is generated at run time
//! (the test CA pieces come from `meshward_test_support::ca`).
// Each test binary uses a part of this module.
#![allow(dead_code, unused_imports)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use meshward_identity::ca::{CaMaterial, CaOptions, CaSettings, CertificateAuthority, RootCa};
use meshward_identity::issue::{IssuedCertificate, WorkloadKey};
use meshward_identity::keys::KeyType;
use meshward_identity::spiffe::{SpiffeId, TrustDomain};
pub use meshward_test_support::ca::{Custom, TRUST_DOMAIN as TD};
use rcgen::KeyPair;
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;

pub fn td(name: &str) -> TrustDomain {
    TrustDomain::new(name).unwrap()
}

pub fn opts(trust_domain: &str, key_type: KeyType, lifetime: Duration) -> CaOptions {
    meshward_test_support::ca::options(trust_domain, key_type, lifetime)
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
    meshward_test_support::ca::issue(ca, who, None).unwrap()
}

pub fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
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
