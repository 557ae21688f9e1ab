//! SVID verification: each kind of bad peer certificate is refused with its
//! own error; several roots; two clusters under one root.

mod common;

use common::*;
use meshward_identity::bundle::TrustBundle;
use meshward_identity::keys::KeyType;
use meshward_identity::verify::{Side, SvidError, SvidVerifier, TrustDomains, identity_of};
use rcgen::{CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, Issuer, SanType};
use rustls_pki_types::CertificateDer;

fn verifier(roots: &[&CertificateDer<'static>]) -> SvidVerifier {
    SvidVerifier::new(
        TrustBundle::from_roots(roots.iter().map(|r| (*r).clone())).unwrap(),
        TrustDomains::only([td(TD)]),
    )
}

fn check(v: &SvidVerifier, chain: &[CertificateDer<'static>]) -> Result<String, SvidError> {
    let (leaf, rest) = chain.split_first().unwrap();
    let a = v
        .verify_now(leaf, rest, Side::Server)
        .map(|id| id.to_string());
    let b = v
        .verify_now(leaf, rest, Side::Client)
        .map(|id| id.to_string());
    assert_eq!(a, b, "client and server side must agree");
    a
}

#[test]
fn accepts_valid_svid_and_returns_identity() {
    let (root, m) = material(TD, KeyType::EcP256, KeyType::EcP256);
    let ca = ca_from(&m);
    let who = workload("default", "api");
    let (_, issued) = issue(&ca, &who);
    let v = verifier(&[root.cert()]);
    assert_eq!(check(&v, issued.chain()).unwrap(), who.to_string());
    // Works without the root in the presented chain, too.
    assert_eq!(check(&v, &issued.chain()[..2]).unwrap(), who.to_string());
    assert_eq!(identity_of(issued.leaf()).unwrap(), who);
}

#[test]
fn rejects_certificate_from_another_root() {
    let (_root, m) = material(TD, KeyType::EcP256, KeyType::EcP256);
    let other_root = root(TD, KeyType::EcP256);
    let (_, issued) = issue(&ca_from(&m), &workload("default", "api"));
    let v = verifier(&[other_root.cert()]);
    assert_eq!(
        check(&v, issued.chain()).unwrap_err(),
        SvidError::UnknownIssuer
    );
}

#[test]
fn rejects_expired_certificate() {
    let (root, m) = material(TD, KeyType::EcP256, KeyType::EcP256);
    let ca = ca_from(&m);
    let who = workload("default", "api");
    let key = meshward_identity::WorkloadKey::generate(KeyType::EcP256).unwrap();
    let issued = ca
        .sign_csr_at(
            &key.csr_der(&who).unwrap(),
            &who,
            Some(std::time::Duration::from_secs(3600)),
            now() - time::Duration::hours(5),
        )
        .unwrap();
    let v = verifier(&[root.cert()]);
    assert_eq!(check(&v, issued.chain()).unwrap_err(), SvidError::Expired);
}

#[test]
fn rejects_two_uri_sans() {
    let root = root(TD, KeyType::EcP256);
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.subject_alt_names = vec![
        SanType::URI("spiffe://cluster.local/ns/a/sa/a".try_into().unwrap()),
        SanType::URI("spiffe://cluster.local/ns/b/sa/b".try_into().unwrap()),
    ];
    p.is_ca = IsCa::ExplicitNoCa;
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let rk = root_key(&root);
    let issuer = Issuer::from_ca_cert_der(root.cert(), &rk).unwrap();
    let leaf = p.signed_by(&key, &issuer).unwrap().der().clone();
    let v = verifier(&[root.cert()]);
    assert_eq!(
        check(&v, &[leaf]).unwrap_err(),
        SvidError::MultipleUriSans { count: 2 }
    );
}

#[test]
fn rejects_unaccepted_trust_domain() {
    // The root is trusted, but the identity's trust domain is not accepted.
    let (root, m) = material("other.example", KeyType::EcP256, KeyType::EcP256);
    let ca = ca_from(&m);
    let (_, issued) = issue(&ca, &id("spiffe://other.example/ns/default/sa/api"));
    let v = verifier(&[root.cert()]);
    assert_eq!(
        check(&v, issued.chain()).unwrap_err(),
        SvidError::UntrustedTrustDomain {
            trust_domain: "other.example".into()
        }
    );
}

#[test]
fn rejects_ca_certificate_used_as_leaf() {
    let (root, m) = material(TD, KeyType::EcP256, KeyType::EcP256);
    let v = verifier(&[root.cert()]);
    assert_eq!(
        check(&v, &[m.ca_cert.clone(), root.cert().clone()]).unwrap_err(),
        SvidError::CaUsedAsLeaf
    );
    assert_eq!(
        identity_of(&m.ca_cert).unwrap_err(),
        SvidError::CaUsedAsLeaf
    );
}

#[test]
fn rejects_certificate_without_uri_san_and_garbage() {
    let root = root(TD, KeyType::EcP256);
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(vec!["api.example.com".to_owned()]).unwrap();
    p.is_ca = IsCa::ExplicitNoCa;
    let rk = root_key(&root);
    let issuer = Issuer::from_ca_cert_der(root.cert(), &rk).unwrap();
    let leaf = p.signed_by(&key, &issuer).unwrap().der().clone();
    let v = verifier(&[root.cert()]);
    assert_eq!(check(&v, &[leaf]).unwrap_err(), SvidError::NoSpiffeId);
    assert!(matches!(
        check(&v, &[CertificateDer::from(vec![0x30, 0x00])]).unwrap_err(),
        SvidError::Malformed { .. }
    ));
}

#[test]
fn the_rejections_are_distinct() {
    let errors = [
        SvidError::UnknownIssuer,
        SvidError::Expired,
        SvidError::MultipleUriSans { count: 2 },
        SvidError::UntrustedTrustDomain {
            trust_domain: "x".into(),
        },
        SvidError::CaUsedAsLeaf,
    ];
    let names: std::collections::HashSet<_> = errors.iter().map(std::mem::discriminant).collect();
    assert_eq!(names.len(), errors.len());
}

#[test]
fn bundle_with_several_roots_accepts_each() {
    // Root rotation: old and new roots are both trusted during the overlap.
    let (old_root, old_m) = material(TD, KeyType::EcP256, KeyType::EcP256);
    let (new_root, new_m) = material(TD, KeyType::Rsa2048, KeyType::EcP384);
    let (_, old_leaf) = issue(&ca_from(&old_m), &workload("a", "a"));
    let (_, new_leaf) = issue(&ca_from(&new_m), &workload("b", "b"));
    let mut bundle = TrustBundle::from_roots([old_root.cert().clone()]).unwrap();
    assert!(bundle.add(new_root.cert().clone()).unwrap());
    assert!(
        !bundle.add(new_root.cert().clone()).unwrap(),
        "deduplicated"
    );
    let v = SvidVerifier::new(bundle.clone(), TrustDomains::only([td(TD)]));
    check(&v, old_leaf.chain()).unwrap();
    check(&v, new_leaf.chain()).unwrap();

    // End of the overlap: the old root is removed.
    assert!(bundle.remove(old_root.cert()));
    let v = SvidVerifier::new(bundle.clone(), TrustDomains::only([td(TD)]));
    assert_eq!(
        check(&v, old_leaf.chain()).unwrap_err(),
        SvidError::UnknownIssuer
    );
    check(&v, new_leaf.chain()).unwrap();

    // PEM round trip.
    let pem = bundle.to_pem();
    let back = TrustBundle::from_pem(pem.as_bytes(), std::path::Path::new("bundle.pem")).unwrap();
    assert_eq!(back.roots(), bundle.roots());
}

#[test]
fn two_clusters_under_one_root_trust_each_other() {
    let shared = root(TD, KeyType::EcP256);
    let east = ca_from(
        &shared
            .new_intermediate(&opts(TD, KeyType::EcP256, days(365)))
            .unwrap(),
    );
    let west = ca_from(
        &shared
            .new_intermediate(&opts(TD, KeyType::Rsa2048, days(365)))
            .unwrap(),
    );
    let (_, east_leaf) = issue(&east, &workload("east", "api"));
    let (_, west_leaf) = issue(&west, &workload("west", "web"));
    // Each side trusts only the shared root (from its own root-cert.pem).
    let v = verifier(&[shared.cert()]);
    assert_eq!(
        check(&v, east_leaf.chain()).unwrap(),
        "spiffe://cluster.local/ns/east/sa/api"
    );
    assert_eq!(
        check(&v, west_leaf.chain()).unwrap(),
        "spiffe://cluster.local/ns/west/sa/web"
    );
    assert_ne!(east.chain()[0], west.chain()[0]);
}
