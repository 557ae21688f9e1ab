//! Plug-in CA loading: the happy paths for every key type and every error path.

mod common;

use std::path::Path;

use common::*;
use meshward_identity::ca::{
    CaLoadError, CaSettings, CertificateAuthority, RootCa, TrustDomainSource,
};
use meshward_identity::keys::KeyType;
use meshward_identity::pem::PemError;
use rcgen::{IsCa, KeyPair, KeyUsagePurpose};

fn load(dir: &Path) -> Result<CertificateAuthority, CaLoadError> {
    CertificateAuthority::load_dir(dir, CaSettings::default())
}

fn written(root_kt: KeyType, int_kt: KeyType) -> (tempfile::TempDir, RootCa) {
    let dir = tempfile::tempdir().unwrap();
    let (root, m) = material(TD, root_kt, int_kt);
    m.write_dir(dir.path(), false).unwrap();
    (dir, root)
}

fn names(err: &CaLoadError, file: &str) {
    let msg = err.to_string();
    assert!(msg.contains(file), "error {msg:?} should name {file}");
}

#[test]
fn loads_every_supported_key_type() {
    for (root_kt, int_kt) in [
        (KeyType::EcP256, KeyType::EcP256),
        (KeyType::EcP384, KeyType::EcP384),
        (KeyType::Rsa2048, KeyType::EcP256),
        (KeyType::EcP256, KeyType::Rsa2048),
        (KeyType::Rsa3072, KeyType::Rsa3072),
    ] {
        let (dir, _root) = written(root_kt, int_kt);
        let ca = load(dir.path()).unwrap_or_else(|e| panic!("{root_kt}/{int_kt}: {e}"));
        assert_eq!(ca.key_type(), int_kt);
        assert_eq!(ca.trust_domain().as_str(), TD);
        assert_eq!(ca.chain().len(), 2);
        let (_, issued) = issue(&ca, &workload("default", "api"));
        assert_eq!(issued.chain().len(), 3);
    }
}

#[test]
fn rsa_4096_ca_loads() {
    let (dir, _root) = written(KeyType::Rsa4096, KeyType::Rsa4096);
    assert_eq!(load(dir.path()).unwrap().key_type(), KeyType::Rsa4096);
}

#[test]
fn key_files_are_private() {
    use std::os::unix::fs::PermissionsExt as _;
    let (dir, _root) = written(KeyType::EcP256, KeyType::EcP256);
    let mode = std::fs::metadata(dir.path().join("ca-key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn write_refuses_to_overwrite() {
    let (dir, _root) = written(KeyType::EcP256, KeyType::EcP256);
    let (_, m) = material(TD, KeyType::EcP256, KeyType::EcP256);
    assert!(matches!(
        m.write_dir(dir.path(), false),
        Err(PemError::Exists { .. })
    ));
}

#[test]
fn missing_file() {
    let (dir, _root) = written(KeyType::EcP256, KeyType::EcP256);
    std::fs::remove_file(dir.path().join("cert-chain.pem")).unwrap();
    let err = load(dir.path()).unwrap_err();
    assert!(
        matches!(err, CaLoadError::File(PemError::Read { .. })),
        "{err}"
    );
    names(&err, "cert-chain.pem");
}

#[test]
fn unreadable_pem() {
    for file in ["ca-cert.pem", "root-cert.pem", "cert-chain.pem"] {
        let (dir, _root) = written(KeyType::EcP256, KeyType::EcP256);
        write(&dir.path().join(file), "not a certificate\n");
        let err = load(dir.path()).unwrap_err();
        assert!(
            matches!(err, CaLoadError::File(PemError::Missing { .. })),
            "{err}"
        );
        names(&err, file);
    }
    let (dir, _root) = written(KeyType::EcP256, KeyType::EcP256);
    write(
        &dir.path().join("ca-cert.pem"),
        "-----BEGIN CERTIFICATE-----\n$$$$\n-----END CERTIFICATE-----\n",
    );
    let err = load(dir.path()).unwrap_err();
    assert!(
        matches!(err, CaLoadError::File(PemError::Invalid { .. })),
        "{err}"
    );
    names(&err, "ca-cert.pem");

    let (dir, _root) = written(KeyType::EcP256, KeyType::EcP256);
    write(&dir.path().join("ca-key.pem"), "garbage");
    let err = load(dir.path()).unwrap_err();
    assert!(
        matches!(err, CaLoadError::File(PemError::Missing { .. })),
        "{err}"
    );
    names(&err, "ca-key.pem");
}

#[test]
fn certificate_that_is_not_x509() {
    let (dir, _root) = written(KeyType::EcP256, KeyType::EcP256);
    write(
        &dir.path().join("ca-cert.pem"),
        meshward_identity::pem::encode("CERTIFICATE", b"\x30\x03\x02\x01\x01"),
    );
    let err = load(dir.path()).unwrap_err();
    assert!(matches!(err, CaLoadError::BadCertificate { .. }), "{err}");
    names(&err, "ca-cert.pem");
}

#[test]
fn key_does_not_match_certificate() {
    let (dir, _root) = written(KeyType::EcP256, KeyType::EcP256);
    let other = KeyPair::generate().unwrap();
    write(&dir.path().join("ca-key.pem"), other.serialize_pem());
    let err = load(dir.path()).unwrap_err();
    assert!(matches!(err, CaLoadError::KeyMismatch { .. }), "{err}");
    names(&err, "ca-key.pem");
    names(&err, "ca-cert.pem");
}

#[test]
fn key_of_another_type() {
    let (dir, _root) = written(KeyType::EcP256, KeyType::EcP256);
    let rsa = KeyType::Rsa2048.generate().unwrap();
    write(&dir.path().join("ca-key.pem"), rsa.serialize_pem());
    let err = load(dir.path()).unwrap_err();
    assert!(matches!(err, CaLoadError::BadKey { .. }), "{err}");
    names(&err, "ca-key.pem");
}

/// Writes a cacerts dir whose ca-cert.pem is `ca` (key `key`) under `root`.
fn write_custom(
    dir: &Path,
    root: &RootCa,
    ca: &rustls_pki_types::CertificateDer<'_>,
    key: &KeyPair,
) {
    write(&dir.join("ca-cert.pem"), pem_cert(ca));
    write(&dir.join("ca-key.pem"), key.serialize_pem());
    write(&dir.join("root-cert.pem"), root.cert_pem());
    write(&dir.join("cert-chain.pem"), pem_cert(ca) + &root.cert_pem());
}

#[test]
fn certificate_that_is_not_a_ca() {
    let dir = tempfile::tempdir().unwrap();
    let root = root(TD, KeyType::EcP256);
    let key = KeyPair::generate().unwrap();
    let mut c = Custom::ca("not a CA");
    c.is_ca = IsCa::ExplicitNoCa;
    c.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let cert = c.build(&key, Some((root.cert(), &root_key(&root))));
    write_custom(dir.path(), &root, &cert, &key);
    let err = load(dir.path()).unwrap_err();
    assert!(matches!(err, CaLoadError::NotCa { .. }), "{err}");
    names(&err, "ca-cert.pem");

    // No basicConstraints at all is not a CA either.
    c.is_ca = IsCa::NoCa;
    let cert = c.build(&key, Some((root.cert(), &root_key(&root))));
    write_custom(dir.path(), &root, &cert, &key);
    assert!(matches!(
        load(dir.path()).unwrap_err(),
        CaLoadError::NotCa { .. }
    ));
}

#[test]
fn ca_without_key_cert_sign() {
    let dir = tempfile::tempdir().unwrap();
    let root = root(TD, KeyType::EcP256);
    let key = KeyPair::generate().unwrap();
    let mut c = Custom::ca("no keyCertSign");
    c.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::CrlSign];
    let cert = c.build(&key, Some((root.cert(), &root_key(&root))));
    write_custom(dir.path(), &root, &cert, &key);
    let err = load(dir.path()).unwrap_err();
    assert!(
        matches!(err, CaLoadError::MissingKeyCertSign { .. }),
        "{err}"
    );
    names(&err, "ca-cert.pem");
}

#[test]
fn expired_ca() {
    let dir = tempfile::tempdir().unwrap();
    let past = now() - time::Duration::days(3 * 365);
    let root = RootCa::generate_at(&opts(TD, KeyType::EcP256, days(3650)), past).unwrap();
    let m = root
        .new_intermediate_at(&opts(TD, KeyType::EcP256, days(365)), past)
        .unwrap();
    m.write_dir(dir.path(), false).unwrap();
    let err = load(dir.path()).unwrap_err();
    assert!(matches!(err, CaLoadError::Expired { .. }), "{err}");
    names(&err, "ca-cert.pem");

    // An expired root (the intermediate is still valid by its own dates).
    let dir = tempfile::tempdir().unwrap();
    let root = RootCa::generate_at(&opts(TD, KeyType::EcP256, days(365)), past).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = Custom::ca("valid int").build(&key, Some((root.cert(), &root_key(&root))));
    write_custom(dir.path(), &root, &cert, &key);
    let err = load(dir.path()).unwrap_err();
    assert!(matches!(err, CaLoadError::Expired { .. }), "{err}");
    names(&err, "root-cert.pem");
}

#[test]
fn not_yet_valid_ca() {
    let dir = tempfile::tempdir().unwrap();
    let root = root(TD, KeyType::EcP256);
    let m = root
        .new_intermediate_at(
            &opts(TD, KeyType::EcP256, days(365)),
            now() + time::Duration::days(2),
        )
        .unwrap();
    m.write_dir(dir.path(), false).unwrap();
    let err = load(dir.path()).unwrap_err();
    assert!(matches!(err, CaLoadError::NotYetValid { .. }), "{err}");
    names(&err, "ca-cert.pem");
}

#[test]
fn chain_that_does_not_end_at_the_root() {
    // cert-chain.pem ends at another root.
    let (dir, _root) = written(KeyType::EcP256, KeyType::EcP256);
    let other = root(TD, KeyType::EcP256);
    let ca_cert = std::fs::read_to_string(dir.path().join("ca-cert.pem")).unwrap();
    write(
        &dir.path().join("cert-chain.pem"),
        ca_cert + &other.cert_pem(),
    );
    let err = load(dir.path()).unwrap_err();
    assert!(
        matches!(err, CaLoadError::ChainDoesNotEndAtRoot { .. }),
        "{err}"
    );
    names(&err, "cert-chain.pem");

    // root-cert.pem is another root than the chain's.
    let (dir, _root) = written(KeyType::EcP256, KeyType::EcP256);
    write(&dir.path().join("root-cert.pem"), other.cert_pem());
    let err = load(dir.path()).unwrap_err();
    assert!(
        matches!(err, CaLoadError::ChainDoesNotEndAtRoot { .. }),
        "{err}"
    );
}

#[test]
fn chain_whose_links_do_not_verify() {
    // Both files agree on a root that did not sign the intermediate.
    let (dir, _root) = written(KeyType::EcP256, KeyType::EcP256);
    let other = root(TD, KeyType::EcP256);
    let ca_cert = std::fs::read_to_string(dir.path().join("ca-cert.pem")).unwrap();
    write(&dir.path().join("root-cert.pem"), other.cert_pem());
    write(
        &dir.path().join("cert-chain.pem"),
        ca_cert + &other.cert_pem(),
    );
    let err = load(dir.path()).unwrap_err();
    assert!(
        matches!(err, CaLoadError::ChainBroken { index: 0, .. }),
        "{err}"
    );
    names(&err, "cert-chain.pem");
}

#[test]
fn chain_that_does_not_start_at_ca_cert() {
    let (dir, root) = written(KeyType::EcP256, KeyType::EcP256);
    write(&dir.path().join("cert-chain.pem"), root.cert_pem());
    let err = load(dir.path()).unwrap_err();
    assert!(
        matches!(err, CaLoadError::ChainDoesNotStartAtCaCert { .. }),
        "{err}"
    );
}

#[test]
fn root_that_is_not_self_signed() {
    let (dir, _root) = written(KeyType::EcP256, KeyType::EcP256);
    // Use the intermediate as "root": chain [int] starts at ca-cert and ends at "root".
    let ca_cert = std::fs::read_to_string(dir.path().join("ca-cert.pem")).unwrap();
    write(&dir.path().join("root-cert.pem"), &ca_cert);
    write(&dir.path().join("cert-chain.pem"), &ca_cert);
    let err = load(dir.path()).unwrap_err();
    assert!(
        matches!(err, CaLoadError::RootNotSelfSigned { .. }),
        "{err}"
    );
    names(&err, "root-cert.pem");
}

#[test]
fn trust_domain_is_configured_named_or_istio_default() {
    let (dir, _root) = written(KeyType::EcP256, KeyType::EcP256);
    let err = CertificateAuthority::load_dir(
        dir.path(),
        CaSettings {
            trust_domain: Some(td("other.example")),
            ..CaSettings::default()
        },
    )
    .unwrap_err();
    assert!(
        matches!(err, CaLoadError::TrustDomainMismatch { .. }),
        "{err}"
    );

    let dir = tempfile::tempdir().unwrap();
    let root = root(TD, KeyType::EcP256);
    let key = KeyPair::generate().unwrap();
    let mut c = Custom::ca("no SAN");
    c.uris.clear();
    let cert = c.build(&key, Some((root.cert(), &root_key(&root))));
    write_custom(dir.path(), &root, &cert, &key);
    // No spiffe://TD SAN and nothing configured: Istio's default, with a notice.
    let ca = load(dir.path()).unwrap();
    assert_eq!(ca.trust_domain().as_str(), "cluster.local");
    let chosen = ca.chosen_trust_domain();
    assert_eq!(chosen.source(), TrustDomainSource::IstioDefault);
    let notice = chosen.notice("say how").unwrap();
    assert!(notice.contains("ca-cert.pem"), "{notice}");
    assert!(notice.contains("cluster.local"), "{notice}");
    assert!(notice.ends_with("say how"), "{notice}");
    let (_, issued) = issue(&ca, &id("spiffe://cluster.local/ns/default/sa/api"));
    assert_eq!(issued.id().trust_domain_str(), "cluster.local");
    // Configured: that one, silently.
    let ca = CertificateAuthority::load_dir(
        dir.path(),
        CaSettings {
            trust_domain: Some(td("example.org")),
            ..CaSettings::default()
        },
    )
    .unwrap();
    assert_eq!(ca.trust_domain().as_str(), "example.org");
    assert_eq!(
        ca.chosen_trust_domain().source(),
        TrustDomainSource::Configured
    );
    assert_eq!(ca.chosen_trust_domain().notice("say how"), None);

    // Named by the certificate: that one, silently.
    let (dir, _root) = written(KeyType::EcP256, KeyType::EcP256);
    let ca = load(dir.path()).unwrap();
    assert_eq!(ca.trust_domain().as_str(), TD);
    assert_eq!(
        ca.chosen_trust_domain().source(),
        TrustDomainSource::Certificate
    );
    assert_eq!(ca.chosen_trust_domain().notice("say how"), None);
}

#[test]
fn root_names_its_trust_domain() {
    assert_eq!(
        root("example.org", KeyType::EcP256).trust_domain(),
        Some(td("example.org"))
    );
}

#[test]
fn root_dir_loading() {
    let dir = tempfile::tempdir().unwrap();
    let root = root(TD, KeyType::EcP256);
    write(&dir.path().join("root-cert.pem"), root.cert_pem());
    write(&dir.path().join("root-key.pem"), root.key_pem());
    let loaded = RootCa::load_dir(dir.path()).unwrap();
    assert_eq!(loaded.cert(), root.cert());
    write(
        &dir.path().join("root-key.pem"),
        KeyPair::generate().unwrap().serialize_pem(),
    );
    let err = RootCa::load_dir(dir.path()).unwrap_err();
    assert!(matches!(err, CaLoadError::KeyMismatch { .. }), "{err}");
}

#[test]
fn self_signed_root_as_signing_ca() {
    let root = root(TD, KeyType::EcP256);
    let root_der = root.cert().clone();
    let ca = root.into_authority(CaSettings::default()).unwrap();
    assert_eq!(ca.chain(), std::slice::from_ref(&root_der));
    let (_, issued) = issue(&ca, &workload("default", "api"));
    assert_eq!(issued.chain().len(), 2);
    assert_eq!(issued.root(), &root_der);
}

/// Root rotation: `root-cert.pem` holds the old and the new root while the
/// signing CA is already an intermediate under the new one.
#[test]
fn root_file_with_several_roots_and_chain_to_the_second() {
    let (dir, old_root) = written(KeyType::EcP256, KeyType::EcP256);
    let (new_root, new_m) = material(TD, KeyType::EcP256, KeyType::EcP256);
    let both = format!("{}{}", old_root.cert_pem(), new_root.cert_pem());
    // (a) new root appended: the old intermediate still loads, both trusted.
    write(&dir.path().join("root-cert.pem"), &both);
    let ca = load(dir.path()).unwrap();
    assert_eq!(
        ca.trusted_roots(),
        [old_root.cert().clone(), new_root.cert().clone()]
    );
    assert_eq!(ca.root(), old_root.cert());
    // (b) intermediate under the new root, root file still holds both.
    new_m.write_dir(dir.path(), true).unwrap();
    write(&dir.path().join("root-cert.pem"), &both);
    let ca = load(dir.path()).unwrap();
    assert_eq!(ca.root(), new_root.cert());
    assert_eq!(ca.trusted_roots().len(), 2);
    let (_, issued) = issue(&ca, &workload("default", "api"));
    assert_eq!(issued.chain().last(), Some(new_root.cert()));
    // A chain that ends at neither root is refused, naming the chain file.
    write(&dir.path().join("root-cert.pem"), old_root.cert_pem());
    let err = load(dir.path()).unwrap_err();
    assert!(
        matches!(err, CaLoadError::ChainDoesNotEndAtRoot { .. }),
        "{err}"
    );
    names(&err, "cert-chain.pem");
}

#[test]
fn signing_key_is_the_loaded_one() {
    let (dir, _root) = written(KeyType::EcP256, KeyType::Rsa2048);
    let ca = load(dir.path()).unwrap();
    let pem = std::fs::read(dir.path().join("ca-key.pem")).unwrap();
    let key = meshward_identity::pem::key_from_pem(&pem, Path::new("ca-key.pem")).unwrap();
    assert_eq!(ca.signing_key_der().secret_der(), key.secret_der());
    assert_eq!(ca.signing_cert(), &ca.chain()[0]);
}
