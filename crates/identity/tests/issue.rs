//! Issuance: what the CA refuses, and what an issued leaf contains.

mod common;

use std::time::Duration;

use common::*;
use meshward_identity::ca::{CaSettings, CertificateAuthority};
use meshward_identity::issue::{IssueError, WorkloadKey};
use meshward_identity::keys::KeyType;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};
use x509_parser::prelude::*;

fn ca() -> CertificateAuthority {
    let (_, m) = material(TD, KeyType::EcP256, KeyType::EcP256);
    ca_from(&m)
}

fn csr_with(key: &KeyPair, f: impl FnOnce(&mut CertificateParams)) -> Vec<u8> {
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    f(&mut p);
    p.serialize_request(key).unwrap().der().to_vec()
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().unwrap())
}

#[test]
fn leaf_has_exactly_the_granted_properties() {
    let ca = ca();
    let who = workload("default", "api");
    let key = KeyPair::generate().unwrap();
    // The CSR asks for extra things: a DNS name, code signing, a subject.
    let csr = csr_with(&key, |p| {
        p.subject_alt_names = vec![
            uri(who.as_str()),
            SanType::DnsName("evil.example.com".try_into().unwrap()),
        ];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::CodeSigning];
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "admin");
    });
    let issued = ca.sign_csr(&csr, &who, None).unwrap();
    let (_, leaf) = X509Certificate::from_der(issued.leaf()).unwrap();

    let sans: Vec<_> = leaf
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .clone();
    assert_eq!(sans, vec![GeneralName::URI(who.as_str())]);
    assert_eq!(
        leaf.subject().iter().count(),
        0,
        "subject must not be copied"
    );
    let bc = leaf.basic_constraints().unwrap().unwrap().value;
    assert!(!bc.ca);
    let ku = leaf.key_usage().unwrap().unwrap().value;
    assert!(ku.digital_signature());
    assert!(!ku.key_encipherment(), "EC leaf: no keyEncipherment");
    assert!(!ku.key_cert_sign());
    let eku = leaf.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
    assert!(!eku.code_signing);
    // Public key from the CSR.
    assert_eq!(
        leaf.public_key().subject_public_key.data.as_ref(),
        key.public_key_raw()
    );
    // 24h by default (plus the 60s backdate).
    let life = issued.not_after() - issued.not_before();
    assert_eq!(life.whole_seconds(), 24 * 3600 + 60);
    assert_eq!(issued.chain().len(), 3);
    assert_eq!(issued.chain().last(), Some(issued.root()));
}

#[test]
fn rsa_leaf_gets_key_encipherment() {
    let ca = ca();
    let who = workload("default", "api");
    let key = WorkloadKey::generate(KeyType::Rsa2048).unwrap();
    let issued = ca
        .sign_csr(&key.csr_der(&who).unwrap(), &who, None)
        .unwrap();
    let (_, leaf) = X509Certificate::from_der(issued.leaf()).unwrap();
    let ku = leaf.key_usage().unwrap().unwrap().value;
    assert!(ku.digital_signature() && ku.key_encipherment());
}

#[test]
fn p384_leaf() {
    let ca = ca();
    let who = workload("default", "api");
    let key = WorkloadKey::generate(KeyType::EcP384).unwrap();
    let issued = ca
        .sign_csr(&key.csr_der(&who).unwrap(), &who, None)
        .unwrap();
    let (_, leaf) = X509Certificate::from_der(issued.leaf()).unwrap();
    assert_eq!(
        meshward_identity::keys::PublicKeyKind::of(leaf.public_key()),
        meshward_identity::keys::PublicKeyKind::EcP384
    );
}

#[test]
fn ttl_is_capped_by_max_and_by_ca_expiry() {
    let (_, m) = material(TD, KeyType::EcP256, KeyType::EcP256);
    let ca = CertificateAuthority::from_material(
        &m,
        CaSettings {
            max_ttl: Duration::from_secs(3600),
            ..CaSettings::default()
        },
    )
    .unwrap();
    let who = workload("default", "api");
    let key = WorkloadKey::generate(KeyType::EcP256).unwrap();
    let csr = key.csr_der(&who).unwrap();
    let issued = ca
        .sign_csr(&csr, &who, Some(Duration::from_secs(10 * 86_400)))
        .unwrap();
    assert_eq!(
        (issued.not_after() - issued.not_before()).whole_seconds(),
        3600 + 60
    );

    let short = ca
        .sign_csr(&csr, &who, Some(Duration::from_secs(600)))
        .unwrap();
    assert_eq!(
        (short.not_after() - short.not_before()).whole_seconds(),
        600 + 60
    );

    // Never past the CA: an intermediate that expires in 2 hours.
    let root = root(TD, KeyType::EcP256);
    let m = root
        .new_intermediate(&opts(TD, KeyType::EcP256, Duration::from_secs(7200)))
        .unwrap();
    let ca = ca_from(&m);
    let issued = ca.sign_csr(&csr, &who, None).unwrap();
    assert_eq!(issued.not_after(), ca.not_after());
    assert!(issued.not_after() < now() + ::time::Duration::hours(3));

    assert_eq!(
        ca.sign_csr(&csr, &who, Some(Duration::ZERO)).unwrap_err(),
        IssueError::ZeroTtl
    );
}

#[test]
fn refuses_another_identity() {
    let ca = ca();
    let key = WorkloadKey::generate(KeyType::EcP256).unwrap();
    let csr = key.csr_der(&workload("prod", "admin")).unwrap();
    let err = ca
        .sign_csr(&csr, &workload("default", "api"), None)
        .unwrap_err();
    assert!(matches!(err, IssueError::IdentityMismatch { .. }), "{err}");
}

#[test]
fn refuses_another_trust_domain() {
    let ca = ca();
    let key = WorkloadKey::generate(KeyType::EcP256).unwrap();
    let foreign = id("spiffe://other.example/ns/default/sa/api");
    // The CSR asks for a foreign identity while authenticated locally.
    let csr = key.csr_der(&foreign).unwrap();
    let err = ca
        .sign_csr(&csr, &workload("default", "api"), None)
        .unwrap_err();
    assert!(
        matches!(err, IssueError::ForeignTrustDomain { .. }),
        "{err}"
    );
    // The caller is authenticated in another trust domain.
    let err = ca.sign_csr(&csr, &foreign, None).unwrap_err();
    assert!(
        matches!(err, IssueError::ForeignTrustDomain { .. }),
        "{err}"
    );
}

#[test]
fn refuses_several_uri_sans() {
    let ca = ca();
    let who = workload("default", "api");
    let key = KeyPair::generate().unwrap();
    let csr = csr_with(&key, |p| {
        p.subject_alt_names = vec![uri(who.as_str()), uri("spiffe://cluster.local/ns/x/sa/y")];
    });
    let err = ca.sign_csr(&csr, &who, None).unwrap_err();
    assert_eq!(err, IssueError::MultipleUriSans { count: 2 });
}

#[test]
fn refuses_a_ca_request() {
    let ca = ca();
    let who = workload("default", "api");
    let key = KeyPair::generate().unwrap();
    let csr = csr_with(&key, |p| {
        p.subject_alt_names = vec![uri(who.as_str())];
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    });
    assert_eq!(
        ca.sign_csr(&csr, &who, None).unwrap_err(),
        IssueError::CaRequested
    );
    let csr = csr_with(&key, |p| {
        p.subject_alt_names = vec![uri(who.as_str())];
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    });
    assert_eq!(
        ca.sign_csr(&csr, &who, None).unwrap_err(),
        IssueError::CaRequested
    );
}

#[test]
fn refuses_non_spiffe_uri_and_non_workload_identity() {
    let ca = ca();
    let who = workload("default", "api");
    let key = KeyPair::generate().unwrap();
    let csr = csr_with(&key, |p| {
        p.subject_alt_names = vec![uri("https://example.com/x")]
    });
    assert!(matches!(
        ca.sign_csr(&csr, &who, None).unwrap_err(),
        IssueError::InvalidRequestedId { .. }
    ));
    let csr = csr_with(&key, |_| {});
    // A CSR without a URI SAN gets the authenticated identity.
    let issued = ca.sign_csr(&csr, &who, None).unwrap();
    assert_eq!(issued.id(), &who);
    // The authenticated identity must be ns/sa shaped.
    let err = ca
        .sign_csr(&csr, &id("spiffe://cluster.local/admin"), None)
        .unwrap_err();
    assert!(
        matches!(err, IssueError::NotWorkloadIdentity { .. }),
        "{err}"
    );
}

#[test]
fn refuses_bad_csrs() {
    let ca = ca();
    let who = workload("default", "api");
    assert!(matches!(
        ca.sign_csr(b"\x30\x00", &who, None).unwrap_err(),
        IssueError::MalformedCsr { .. }
    ));
    assert!(matches!(
        ca.sign_csr(b"", &who, None).unwrap_err(),
        IssueError::MalformedCsr { .. }
    ));
    // Tamper with the signature (last byte) of a valid CSR.
    let key = WorkloadKey::generate(KeyType::EcP256).unwrap();
    let mut csr = key.csr_der(&who).unwrap();
    let last = csr.len() - 1;
    csr[last] ^= 0x55;
    let err = ca.sign_csr(&csr, &who, None).unwrap_err();
    assert!(
        matches!(
            err,
            IssueError::BadCsrSignature | IssueError::MalformedCsr { .. }
        ),
        "{err}"
    );
}

#[test]
fn pem_csr_and_pem_outputs() {
    let ca = ca();
    let who = workload("default", "api");
    let key = WorkloadKey::generate(KeyType::EcP256).unwrap();
    let csr_pem =
        meshward_identity::pem::encode("CERTIFICATE REQUEST", &key.csr_der(&who).unwrap());
    let issued = ca.sign_csr_pem(&csr_pem, &who, None).unwrap();
    assert_eq!(issued.chain_pem().matches("BEGIN CERTIFICATE").count(), 3);
    assert_eq!(issued.root_pem().matches("BEGIN CERTIFICATE").count(), 1);
    assert!(key.private_key_pem().contains("BEGIN PRIVATE KEY"));
    assert_eq!(issued.serial().len(), 32);
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
    #[test]
    fn garbage_csrs_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400)) {
        let ca = CA.with(|c| c.clone());
        let _ = ca.sign_csr(&bytes, &workload("default", "api"), None);
    }
}

thread_local! {
    static CA: std::sync::Arc<CertificateAuthority> = std::sync::Arc::new(ca());
}

#[test]
fn server_certificate_has_the_svid_and_the_listen_names() {
    let ca = ca();
    let who = workload("istio-system", "istiod");
    let key = WorkloadKey::generate(KeyType::EcP256).unwrap();
    let ips = ["127.0.0.1".parse().unwrap(), "::1".parse().unwrap()];
    let issued = ca
        .issue_server_cert(
            &key,
            &who,
            &["localhost".to_owned(), "istiod.example".to_owned()],
            &ips,
            Some(Duration::from_secs(3600)),
        )
        .unwrap();
    let (_, leaf) = X509Certificate::from_der(issued.leaf()).unwrap();
    let sans = leaf
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .clone();
    assert_eq!(
        sans,
        vec![
            GeneralName::URI(who.as_str()),
            GeneralName::DNSName("localhost"),
            GeneralName::DNSName("istiod.example"),
            GeneralName::IPAddress(&[127, 0, 0, 1]),
            GeneralName::IPAddress(&std::net::Ipv6Addr::LOCALHOST.octets()),
        ]
    );
    assert!(!leaf.basic_constraints().unwrap().unwrap().value.ca);
    let life = issued.not_after() - issued.not_before();
    assert_eq!(life.whole_seconds(), 3600 + 60);
    // The peer identity is still the one SPIFFE ID.
    assert_eq!(
        meshward_identity::verify::identity_of(issued.leaf()).unwrap(),
        who
    );
}

#[test]
fn server_certificate_only_for_workload_ids_of_the_trust_domain() {
    let ca = ca();
    let key = WorkloadKey::generate(KeyType::EcP256).unwrap();
    let foreign = id("spiffe://other.domain/ns/a/sa/b");
    assert!(matches!(
        ca.issue_server_cert(&key, &foreign, &[], &[], None),
        Err(IssueError::ForeignTrustDomain { .. })
    ));
    let not_workload = id(&format!("spiffe://{TD}/something"));
    assert!(matches!(
        ca.issue_server_cert(&key, &not_workload, &[], &[], None),
        Err(IssueError::NotWorkloadIdentity { .. })
    ));
}

#[test]
fn inspect_csr_reports_every_requested_name_and_ca_requests() {
    use meshward_identity::issue::inspect_csr;
    let key = KeyPair::generate().unwrap();
    let csr = csr_with(&key, |p| {
        p.subject_alt_names = vec![
            uri("spiffe://td/ns/a/sa/b"),
            uri("spiffe://td/ns/c/sa/d"),
            SanType::DnsName("x.example".try_into().unwrap()),
            SanType::IpAddress("10.0.0.1".parse().unwrap()),
            SanType::Rfc822Name("a@b.example".try_into().unwrap()),
        ];
    });
    let req = inspect_csr(&csr).unwrap();
    assert_eq!(req.uris, ["spiffe://td/ns/a/sa/b", "spiffe://td/ns/c/sa/d"]);
    assert_eq!(
        req.other_names,
        ["DNS:x.example", "IP:10.0.0.1", "email:a@b.example"]
    );
    assert!(!req.ca);

    let ca_csr = csr_with(&key, |p| {
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    });
    assert!(inspect_csr(&ca_csr).unwrap().ca);
    let ku_csr = csr_with(&key, |p| {
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    });
    assert!(inspect_csr(&ku_csr).unwrap().ca);

    // Garbage and truncated input are errors, never panics.
    assert!(matches!(
        inspect_csr(b"not a csr"),
        Err(IssueError::MalformedCsr { .. })
    ));
    assert!(inspect_csr(&csr[..csr.len() / 2]).is_err());
    let mut tampered = csr.clone();
    let n = tampered.len();
    tampered[n - 3] ^= 0xff;
    assert!(inspect_csr(&tampered).is_err());
}

/// The CA service's path: the CSR is parsed and its signature verified
/// once (`check_csr`), then signed (`sign_checked`), which still refuses
/// what the caller did not prove.
#[test]
fn a_checked_csr_is_signed_for_the_proven_identity_only() {
    use meshward_identity::issue::check_csr;
    let ca = ca();
    let key = KeyPair::generate().unwrap();
    let id = format!("spiffe://{TD}/ns/a/sa/b");
    let csr = csr_with(&key, |p| p.subject_alt_names = vec![uri(&id)]);
    let checked = check_csr(&csr).unwrap();
    assert_eq!(checked.request.uris, [id.as_str()]);
    let proven = meshward_identity::SpiffeId::parse(&id).unwrap();
    let issued = ca.sign_checked(&checked, &proven, None).unwrap();
    assert_eq!(issued.id(), &proven);

    let other = meshward_identity::SpiffeId::parse(&format!("spiffe://{TD}/ns/x/sa/y")).unwrap();
    assert!(matches!(
        ca.sign_checked(&checked, &other, None),
        Err(IssueError::IdentityMismatch { .. })
    ));

    let mut tampered = csr.clone();
    let n = tampered.len();
    tampered[n - 3] ^= 0xff;
    assert!(check_csr(&tampered).is_err());
}
