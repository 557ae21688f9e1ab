//! The CA side of the control plane, in process: `start()` over real TLS on
//! 127.0.0.1, called with tonic over tokio-rustls as a proxy would.

use std::path::Path;
use std::time::Duration;

use meshward_control::authority::CaSource;
use meshward_control::{ControlPlane, Options, RateLimit, token};
use meshward_identity::ca::{CaMaterial, CaOptions, RootCa};
use meshward_identity::credentials::CurrentCredentials;
use meshward_identity::{
    CredentialResolver, KeyType, Side, SpiffeId, SpiffeServerVerifier, SvidVerifier, TrustBundle,
    TrustDomain, TrustDomains, WorkloadCredentials, WorkloadKey,
};
use meshward_proto::ca::istio_certificate_service_client::IstioCertificateServiceClient;
use meshward_proto::ca::{IstioCertificateRequest, IstioCertificateResponse};
use meshward_test_support::wait::eventually;
use rcgen::{BasicConstraints, CertificateParams, DistinguishedName, IsCa, KeyPair, SanType};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;
use tonic::Code;
use tonic::transport::Channel;
use x509_parser::prelude::*;

const TD: &str = "cluster.local";

fn td() -> TrustDomain {
    TrustDomain::new(TD).unwrap()
}

fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::workload(&td(), ns, sa).unwrap()
}

fn root(key_type: KeyType) -> RootCa {
    RootCa::generate(&CaOptions {
        trust_domain: td(),
        organization: TD.into(),
        common_name: None,
        key_type,
        lifetime: Duration::from_secs(30 * 24 * 3600),
    })
    .unwrap()
}

fn intermediate(root: &RootCa, key_type: KeyType) -> CaMaterial {
    root.new_intermediate(&CaOptions {
        trust_domain: td(),
        organization: TD.into(),
        common_name: None,
        key_type,
        lifetime: Duration::from_secs(7 * 24 * 3600),
    })
    .unwrap()
}

/// A plug-in CA directory: a root and an intermediate under it.
fn plugin_dir(key_type: KeyType) -> (tempfile::TempDir, RootCa) {
    let dir = tempfile::tempdir().unwrap();
    let root = root(key_type);
    intermediate(&root, key_type)
        .write_dir(dir.path(), false)
        .unwrap();
    (dir, root)
}

fn options(source: CaSource) -> Options {
    let mut o = Options::new(source);
    o.listen = "127.0.0.1:0".parse().unwrap();
    o.admin = "127.0.0.1:0".parse().unwrap();
    o.ca_poll_interval = Duration::from_millis(100);
    o
}

async fn start_plugin(dir: &Path) -> ControlPlane {
    meshward_control::start(options(CaSource::PlugIn(dir.to_owned())))
        .await
        .unwrap()
}

/// A client that verifies the control plane's SVID (secure naming: it
/// must be istiod's) and presents `creds` if given.
async fn client(
    cp: &ControlPlane,
    creds: Option<WorkloadCredentials>,
) -> IstioCertificateServiceClient<Channel> {
    let bundle = TrustBundle::clone(&cp.authority().bundle().borrow());
    let verifier = SpiffeServerVerifier::expecting(
        SvidVerifier::new(bundle, TrustDomains::only([td()])),
        [id("istio-system", "istiod")],
    );
    let resolver = match creds {
        Some(c) => CredentialResolver::fixed(c),
        None => {
            let (_tx, rx) = tokio::sync::watch::channel::<CurrentCredentials>(None);
            CredentialResolver::new(rx)
        }
    };
    let config = meshward_identity::client_config(verifier, resolver).unwrap();
    let channel = meshward_control::tls::connect(&cp.grpc_addr().to_string(), config)
        .await
        .unwrap();
    IstioCertificateServiceClient::new(channel)
}

fn csr_pem(key: &WorkloadKey, who: &SpiffeId) -> String {
    meshward_identity::pem::encode("CERTIFICATE REQUEST", &key.csr_der(who).unwrap())
}

fn custom_csr(f: impl FnOnce(&mut CertificateParams)) -> String {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    f(&mut p);
    p.serialize_request(&key).unwrap().pem().unwrap()
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().unwrap())
}

fn request(csr: String, ttl: i64, token: Option<&str>) -> tonic::Request<IstioCertificateRequest> {
    let mut r = tonic::Request::new(IstioCertificateRequest {
        csr,
        validity_duration: ttl,
        metadata: None,
    });
    if let Some(t) = token {
        r.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    r
}

fn certs(pems: &[String]) -> Vec<CertificateDer<'static>> {
    pems.iter()
        .map(|p| CertificateDer::from_pem_slice(p.as_bytes()).unwrap())
        .collect()
}

/// The URI SANs of a certificate.
fn uris(cert: &CertificateDer<'_>) -> Vec<String> {
    let (_, c) = X509Certificate::from_der(cert).unwrap();
    c.subject_alternative_name()
        .unwrap()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some((*u).to_owned()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default()
}

fn lifetime(cert: &CertificateDer<'_>) -> i64 {
    let (_, c) = X509Certificate::from_der(cert).unwrap();
    c.validity().not_after.timestamp() - c.validity().not_before.timestamp()
}

/// Verifies the response's chain against `roots` and returns the identity.
fn verify(resp: &IstioCertificateResponse, roots: &[CertificateDer<'static>]) -> SpiffeId {
    let chain = certs(&resp.cert_chain);
    let bundle = TrustBundle::from_roots(roots.iter().cloned()).unwrap();
    SvidVerifier::new(bundle, TrustDomains::only([td()]))
        .verify_now(&chain[0], &chain[1..], Side::Client)
        .unwrap()
}

fn mint(cp: &ControlPlane, ns: &str, sa: &str) -> String {
    token::mint(&cp.authority().ca(), ns, sa, None).unwrap()
}

fn metric(cp: &ControlPlane, line_start: &str) -> f64 {
    let text = cp.metrics().encode();
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn token_gives_a_certificate_and_the_certificate_renews_it() {
    let (dir, root) = plugin_dir(KeyType::EcP256);
    let cp = start_plugin(dir.path()).await;
    let api = id("default", "api");

    // First issuance: token, no client certificate.
    let key = WorkloadKey::generate(KeyType::EcP256).unwrap();
    let token = mint(&cp, "default", "api");
    let resp = client(&cp, None)
        .await
        .create_certificate(request(csr_pem(&key, &api), 0, Some(&token)))
        .await
        .unwrap()
        .into_inner();
    // Leaf then the intermediate; the root travels apart.
    assert_eq!(resp.cert_chain.len(), 2);
    let roots = certs(&resp.root_cert.as_ref().unwrap().ca_cert);
    assert_eq!(roots, [root.cert().clone()]);
    let chain = certs(&resp.cert_chain);
    assert_eq!(uris(&chain[0]), [api.to_string()]);
    assert_eq!(verify(&resp, &roots), api);
    assert_eq!(lifetime(&chain[0]), 24 * 3600 + 60, "24h by default");

    // Renewal: authenticated by that certificate alone, 10 s asked for.
    let creds = WorkloadCredentials::new(&key, chain.clone(), &api).unwrap();
    let key2 = WorkloadKey::generate(KeyType::EcP256).unwrap();
    let renewed = client(&cp, Some(creds))
        .await
        .create_certificate(request(csr_pem(&key2, &api), 10, None))
        .await
        .unwrap()
        .into_inner();
    let chain2 = certs(&renewed.cert_chain);
    assert_ne!(chain2[0], chain[0]);
    assert_eq!(verify(&renewed, &roots), api);
    assert_eq!(lifetime(&chain2[0]), 10 + 60, "10 s (plus the backdate)");

    assert_eq!(metric(&cp, "citadel_server_csr_count"), 2.0);
    assert_eq!(
        metric(&cp, "citadel_server_success_cert_issuance_count"),
        2.0
    );
    let (_, r) = X509Certificate::from_der(root.cert()).unwrap();
    assert_eq!(
        metric(&cp, "citadel_server_root_cert_expiry_timestamp") as i64,
        r.validity().not_after.timestamp()
    );
    assert!(metric(&cp, "citadel_server_cert_chain_expiry_timestamp") > 0.0);
}

#[tokio::test]
async fn rsa_plugin_ca_signs_and_its_tokens_verify() {
    let (dir, root) = plugin_dir(KeyType::Rsa2048);
    let cp = start_plugin(dir.path()).await;
    let api = id("default", "api");
    let key = WorkloadKey::generate(KeyType::EcP256).unwrap();
    let resp = client(&cp, None)
        .await
        .create_certificate(request(
            csr_pem(&key, &api),
            0,
            Some(&mint(&cp, "default", "api")),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(verify(&resp, &[root.cert().clone()]), api);
}

/// Expects a refusal with `code` whose message contains `needle`.
async fn refused(
    client: &mut IstioCertificateServiceClient<Channel>,
    req: tonic::Request<IstioCertificateRequest>,
    code: Code,
    needle: &str,
) {
    let status = client
        .create_certificate(req)
        .await
        .expect_err("must be refused");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(needle),
        "message {:?} should contain {needle:?}",
        status.message()
    );
}

#[tokio::test]
async fn the_ca_signs_exactly_the_proven_identity() {
    let (dir, _root) = plugin_dir(KeyType::EcP256);
    let cp = start_plugin(dir.path()).await;
    let mut c = client(&cp, None).await;
    let api = id("default", "api");
    let token = mint(&cp, "default", "api");
    let t = Some(token.as_str());
    let key = WorkloadKey::generate(KeyType::EcP256).unwrap();

    refused(
        &mut c,
        request(csr_pem(&key, &api), 0, None),
        Code::Unauthenticated,
        "no identity proven",
    )
    .await;
    refused(
        &mut c,
        request(csr_pem(&key, &id("default", "admin")), 0, t),
        Code::PermissionDenied,
        "the CSR requests spiffe://cluster.local/ns/default/sa/admin but the caller proved spiffe://cluster.local/ns/default/sa/api",
    )
    .await;
    refused(
        &mut c,
        request(
            custom_csr(|p| p.subject_alt_names = vec![uri("spiffe://other.td/ns/default/sa/api")]),
            0,
            t,
        ),
        Code::PermissionDenied,
        "in trust domain \"other.td\" but this CA signs for \"cluster.local\" only",
    )
    .await;
    refused(
        &mut c,
        request(
            custom_csr(|p| {
                p.subject_alt_names =
                    vec![uri(api.as_str()), uri("spiffe://cluster.local/ns/x/sa/y")]
            }),
            0,
            t,
        ),
        Code::PermissionDenied,
        "requests 2 URI SANs",
    )
    .await;
    refused(
        &mut c,
        request(custom_csr(|_| {}), 0, t),
        Code::PermissionDenied,
        "requests no SPIFFE ID",
    )
    .await;
    refused(
        &mut c,
        request(
            custom_csr(|p| {
                p.subject_alt_names = vec![
                    uri(api.as_str()),
                    SanType::DnsName("evil.example".try_into().unwrap()),
                    SanType::IpAddress("10.1.2.3".parse().unwrap()),
                ]
            }),
            0,
            t,
        ),
        Code::PermissionDenied,
        "requests DNS:evil.example, IP:10.1.2.3 besides the SPIFFE ID",
    )
    .await;
    refused(
        &mut c,
        request(
            custom_csr(|p| {
                p.subject_alt_names = vec![uri(api.as_str())];
                p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            }),
            0,
            t,
        ),
        Code::PermissionDenied,
        "requests a CA certificate",
    )
    .await;
    refused(
        &mut c,
        request(csr_pem(&key, &api), -5, t),
        Code::InvalidArgument,
        "negative",
    )
    .await;

    // The same rules for a renewal over mTLS.
    let issued = c
        .create_certificate(request(csr_pem(&key, &api), 0, t))
        .await
        .unwrap()
        .into_inner();
    let creds = WorkloadCredentials::new(&key, certs(&issued.cert_chain), &api).unwrap();
    let mut mtls = client(&cp, Some(creds)).await;
    refused(
        &mut mtls,
        request(csr_pem(&key, &id("kube-system", "admin")), 0, None),
        Code::PermissionDenied,
        "but the caller proved spiffe://cluster.local/ns/default/sa/api",
    )
    .await;
    // A token for another account does not override the certificate.
    refused(
        &mut mtls,
        request(
            csr_pem(&key, &id("kube-system", "admin")),
            0,
            Some(&mint(&cp, "kube-system", "admin")),
        ),
        Code::PermissionDenied,
        "but the caller proved spiffe://cluster.local/ns/default/sa/api",
    )
    .await;
    assert_eq!(
        metric(
            &cp,
            "meshward_ca_refused_total{reason=\"permission_denied\"}"
        ),
        8.0
    );
    assert_eq!(
        metric(&cp, "citadel_server_authentication_failure_count"),
        1.0
    );
}

#[tokio::test]
async fn bad_tokens_are_refused() {
    let (dir, _root) = plugin_dir(KeyType::EcP256);
    let cp = start_plugin(dir.path()).await;
    let mut c = client(&cp, None).await;
    let api = id("default", "api");
    let key = WorkloadKey::generate(KeyType::EcP256).unwrap();
    let csr = || csr_pem(&key, &api);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = token::Claims {
        iss: token::ISSUER.into(),
        aud: token::AUDIENCE.into(),
        sub: token::subject("default", "api"),
        spiffe: api.to_string(),
        iat: now,
        nbf: now,
        exp: now + 600,
        jti: "t".into(),
    };
    let ca = cp.authority().ca();
    let signed = |c: &token::Claims| token::encode(&ca, c).unwrap();

    let expired = signed(&token::Claims {
        exp: now - 300,
        ..claims.clone()
    });
    refused(
        &mut c,
        request(csr(), 0, Some(&expired)),
        Code::Unauthenticated,
        "token expired",
    )
    .await;
    let wrong_aud = signed(&token::Claims {
        aud: "kubernetes".into(),
        ..claims.clone()
    });
    refused(
        &mut c,
        request(csr(), 0, Some(&wrong_aud)),
        Code::Unauthenticated,
        "audience",
    )
    .await;
    // Signed by another CA.
    let (other_dir, _) = plugin_dir(KeyType::EcP256);
    let other = meshward_identity::CertificateAuthority::load_dir(
        other_dir.path(),
        meshward_identity::CaSettings::default(),
    )
    .unwrap();
    let foreign = token::mint(&other, "default", "api", None).unwrap();
    refused(
        &mut c,
        request(csr(), 0, Some(&foreign)),
        Code::Unauthenticated,
        "signature does not verify",
    )
    .await;
    refused(
        &mut c,
        request(csr(), 0, Some("not.a.jwt")),
        Code::Unauthenticated,
        "malformed token",
    )
    .await;
    let huge = "a".repeat(9000);
    refused(
        &mut c,
        request(csr(), 0, Some(&huge)),
        Code::Unauthenticated,
        "more than the 8192 accepted",
    )
    .await;
    // A valid token still works afterwards.
    c.create_certificate(request(csr(), 0, Some(&signed(&claims))))
        .await
        .unwrap();
}

#[tokio::test]
async fn garbage_and_oversized_input_is_refused_and_the_server_keeps_serving() {
    let (dir, _root) = plugin_dir(KeyType::EcP256);
    let cp = start_plugin(dir.path()).await;
    let mut c = client(&cp, None).await;
    let api = id("default", "api");
    let token = mint(&cp, "default", "api");
    let t = Some(token.as_str());

    refused(
        &mut c,
        request("garbage".into(), 0, t),
        Code::InvalidArgument,
        "not a PEM \"CERTIFICATE REQUEST\"",
    )
    .await;
    let bogus =
        "-----BEGIN CERTIFICATE REQUEST-----\nAAAAAAAA\n-----END CERTIFICATE REQUEST-----\n";
    refused(
        &mut c,
        request(bogus.into(), 0, t),
        Code::InvalidArgument,
        "malformed CSR",
    )
    .await;
    assert_eq!(metric(&cp, "citadel_server_csr_parsing_err_count"), 2.0);
    let big = format!(
        "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
        "A".repeat(20_000)
    );
    refused(
        &mut c,
        request(big, 0, t),
        Code::InvalidArgument,
        "more than the 16384 accepted",
    )
    .await;
    // Beyond the 64 KiB message bound: refused by the codec.
    let status = c
        .create_certificate(request("x".repeat(100_000), 0, t))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");

    // Still serving, on the same connection and a new one.
    let key = WorkloadKey::generate(KeyType::EcP256).unwrap();
    c.create_certificate(request(csr_pem(&key, &api), 0, t))
        .await
        .unwrap();
    client(&cp, None)
        .await
        .create_certificate(request(csr_pem(&key, &api), 0, t))
        .await
        .unwrap();
}

#[tokio::test]
async fn requests_per_caller_are_rate_limited() {
    let (dir, _root) = plugin_dir(KeyType::EcP256);
    let mut o = options(CaSource::PlugIn(dir.path().to_owned()));
    o.rate_limit = RateLimit {
        burst: 3,
        per_second: 0.01,
    };
    let cp = meshward_control::start(o).await.unwrap();
    let mut c = client(&cp, None).await;
    let api = id("default", "api");
    let key = WorkloadKey::generate(KeyType::EcP256).unwrap();
    let token = mint(&cp, "default", "api");
    for _ in 0..3 {
        c.create_certificate(request(csr_pem(&key, &api), 0, Some(&token)))
            .await
            .unwrap();
    }
    refused(
        &mut c,
        request(csr_pem(&key, &api), 0, Some(&token)),
        Code::ResourceExhausted,
        "too many certificate requests for spiffe://cluster.local/ns/default/sa/api",
    )
    .await;
    // Another caller has its own bucket.
    let web = id("default", "web");
    c.create_certificate(request(
        csr_pem(&key, &web),
        0,
        Some(&mint(&cp, "default", "web")),
    ))
    .await
    .unwrap();
    assert_eq!(
        metric(&cp, "meshward_ca_refused_total{reason=\"rate_limited\"}"),
        1.0
    );
}

async fn issue_with_token(cp: &ControlPlane) -> IstioCertificateResponse {
    let api = id("default", "api");
    let key = WorkloadKey::generate(KeyType::EcP256).unwrap();
    client(cp, None)
        .await
        .create_certificate(request(
            csr_pem(&key, &api),
            0,
            Some(&mint(cp, "default", "api")),
        ))
        .await
        .unwrap()
        .into_inner()
}

async fn wait_generation(cp: &ControlPlane, generation: u64) {
    let mut status = cp.authority().status();
    eventually(&format!("CA generation {generation}"), || {
        let g = status.borrow_and_update().generation;
        async move { (g >= generation).then_some(()) }
    })
    .await;
}

#[tokio::test]
async fn plugin_ca_reload_rotates_the_root_and_refuses_broken_sets() {
    let (dir, old_root) = plugin_dir(KeyType::EcP256);
    let cp = start_plugin(dir.path()).await;
    let mut bundle = cp.authority().bundle();
    assert_eq!(bundle.borrow_and_update().len(), 1);
    let root_file = dir.path().join("root-cert.pem");
    let new_root = root(KeyType::EcP256);

    // (a) New root appended: the bundle has both; leaves still chain to the old.
    let both = format!("{}{}", old_root.cert_pem(), new_root.cert_pem());
    std::fs::write(&root_file, &both).unwrap();
    tokio::time::timeout(Duration::from_secs(10), bundle.changed())
        .await
        .expect("bundle update within 10 s")
        .unwrap();
    assert_eq!(
        bundle.borrow_and_update().roots(),
        [old_root.cert().clone(), new_root.cert().clone()]
    );
    let resp = issue_with_token(&cp).await;
    assert_eq!(certs(&resp.root_cert.as_ref().unwrap().ca_cert).len(), 2);
    verify(&resp, &[old_root.cert().clone()]);

    // (b) An intermediate under the new root, root-cert.pem still holds both.
    let generation = cp.authority().status().borrow().generation;
    let m = intermediate(&new_root, KeyType::EcP256);
    m.write_dir(dir.path(), true).unwrap();
    std::fs::write(&root_file, &both).unwrap();
    wait_generation(&cp, generation + 1).await;
    eventually("the new intermediate signs", || async {
        let resp = issue_with_token(&cp).await;
        (certs(&resp.cert_chain)[1] == m.ca_cert).then_some(())
    })
    .await;
    let resp = issue_with_token(&cp).await;
    verify(&resp, &[new_root.cert().clone()]);

    // A broken set is refused, naming the file; the CA in force keeps signing.
    let failures = cp.authority().status().borrow().failures;
    std::fs::write(
        dir.path().join("ca-key.pem"),
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let mut status = cp.authority().status();
    let err = eventually("the broken set refused", || {
        let s = status.borrow_and_update().clone();
        async move { (s.failures > failures).then_some(s.last_error) }
    })
    .await
    .unwrap();
    assert!(err.contains("ca-key.pem"), "{err}");
    let resp = issue_with_token(&cp).await;
    verify(&resp, &[new_root.cert().clone()]);
    assert_eq!(certs(&resp.cert_chain)[1], m.ca_cert);

    // (c) Repaired, then the old root retired: the bundle holds the new one only.
    m.write_dir(dir.path(), true).unwrap();
    std::fs::write(&root_file, new_root.cert_pem()).unwrap();
    let new_cert = new_root.cert().clone();
    let new_cert = &new_cert;
    eventually("the old root retired", || {
        let roots = bundle.borrow_and_update().roots().to_vec();
        async move { (roots == [new_cert.clone()]).then_some(()) }
    })
    .await;
    let resp = issue_with_token(&cp).await;
    assert_eq!(
        certs(&resp.root_cert.as_ref().unwrap().ca_cert),
        [new_root.cert().clone()]
    );
}

#[tokio::test]
async fn server_certificate_follows_the_new_root() {
    let (dir, old_root) = plugin_dir(KeyType::EcP256);
    let cp = start_plugin(dir.path()).await;
    let new_root = root(KeyType::EcP256);
    let m = intermediate(&new_root, KeyType::EcP256);
    m.write_dir(dir.path(), true).unwrap();
    std::fs::write(
        dir.path().join("root-cert.pem"),
        format!("{}{}", old_root.cert_pem(), new_root.cert_pem()),
    )
    .unwrap();
    wait_generation(&cp, 2).await;
    // A client trusting only the new root reaches the control plane once
    // its certificate was re-issued.
    let only_new = TrustBundle::from_roots([new_root.cert().clone()]).unwrap();
    let verifier = SpiffeServerVerifier::expecting(
        SvidVerifier::new(only_new, TrustDomains::only([td()])),
        [id("istio-system", "istiod")],
    );
    let (_tx, rx) = tokio::sync::watch::channel::<CurrentCredentials>(None);
    let config = meshward_identity::client_config(verifier, CredentialResolver::new(rx)).unwrap();
    let addr = cp.grpc_addr().to_string();
    let token = mint(&cp, "default", "api");
    eventually("a handshake verified by the new root", || {
        let (config, addr, token) = (config.clone(), addr.clone(), token.clone());
        async move {
            let channel = meshward_control::tls::connect(&addr, config).await.ok()?;
            let api = id("default", "api");
            let key = WorkloadKey::generate(KeyType::EcP256).unwrap();
            IstioCertificateServiceClient::new(channel)
                .create_certificate(request(csr_pem(&key, &api), 0, Some(&token)))
                .await
                .ok()
                .map(drop)
        }
    })
    .await;
}

#[tokio::test]
async fn self_signed_root_is_kept_across_restarts() {
    let state = tempfile::tempdir().unwrap();
    let dir = state.path().join("meshward-control");
    let cp = meshward_control::start(options(CaSource::SelfSigned(dir.clone())))
        .await
        .unwrap();
    let first: Vec<_> = cp.authority().bundle().borrow().roots().to_vec();
    assert_eq!(first.len(), 1);
    let resp = issue_with_token(&cp).await;
    verify(&resp, &first);
    cp.shutdown().await;

    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(dir.join("ca-key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    let cp = meshward_control::start(options(CaSource::SelfSigned(dir.clone())))
        .await
        .unwrap();
    assert_eq!(cp.authority().bundle().borrow().roots(), first.as_slice());
    let resp = issue_with_token(&cp).await;
    verify(&resp, &first);
    // A self-signed CA: the chain is the leaf alone.
    assert_eq!(resp.cert_chain.len(), 1);
}

#[tokio::test]
async fn missing_or_broken_plugin_ca_is_a_clear_start_error() {
    let (dir, _root) = plugin_dir(KeyType::EcP256);
    std::fs::remove_file(dir.path().join("ca-key.pem")).unwrap();
    let err = meshward_control::start(options(CaSource::PlugIn(dir.path().to_owned())))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("ca-key.pem"), "{err}");

    let empty = tempfile::tempdir().unwrap();
    let err = meshward_control::start(options(CaSource::PlugIn(empty.path().to_owned())))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("ca-cert.pem"), "{err}");
}

#[tokio::test]
async fn connections_and_handshakes_are_bounded() {
    use tokio::io::AsyncReadExt as _;
    let (dir, _root) = plugin_dir(KeyType::EcP256);
    let mut o = options(CaSource::PlugIn(dir.path().to_owned()));
    o.limits.max_connections = 1;
    o.limits.handshake_timeout = Duration::from_secs(2);
    let cp = meshward_control::start(o).await.unwrap();

    // A client that never says hello is dropped after the handshake timeout.
    let mut silent = tokio::net::TcpStream::connect(cp.grpc_addr())
        .await
        .unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf))
        .await
        .expect("closed within the handshake timeout")
        .unwrap_or(0);
    assert_eq!(n, 0, "closed without a byte");
    drop(silent);

    // One connection at a time: a second one is closed at once.
    let first = eventually("the slot is free again", || async {
        let channel = client(&cp, None).await;
        Some(channel)
    })
    .await;
    let mut first = first;
    first
        .create_certificate(request(
            csr_pem(
                &WorkloadKey::generate(KeyType::EcP256).unwrap(),
                &id("default", "api"),
            ),
            0,
            Some(&mint(&cp, "default", "api")),
        ))
        .await
        .unwrap();
    let mut second = tokio::net::TcpStream::connect(cp.grpc_addr())
        .await
        .unwrap();
    let n = tokio::time::timeout(Duration::from_secs(5), second.read(&mut buf))
        .await
        .expect("closed at once")
        .unwrap_or(0);
    assert_eq!(n, 0);
}

/// The leaf certificate the control plane presents now.
async fn server_leaf(cp: &ControlPlane) -> CertificateDer<'static> {
    let bundle = TrustBundle::clone(&cp.authority().bundle().borrow());
    let verifier = SpiffeServerVerifier::expecting(
        SvidVerifier::new(bundle, TrustDomains::only([td()])),
        [id("istio-system", "istiod")],
    );
    let (_tx, rx) = tokio::sync::watch::channel::<CurrentCredentials>(None);
    let config = meshward_identity::client_config(verifier, CredentialResolver::new(rx)).unwrap();
    let tcp = tokio::net::TcpStream::connect(cp.grpc_addr())
        .await
        .unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].clone()
}

#[tokio::test]
async fn server_certificate_is_renewed_at_half_its_lifetime() {
    let (dir, _root) = plugin_dir(KeyType::EcP256);
    let mut o = options(CaSource::PlugIn(dir.path().to_owned()));
    // The server certificate takes the CA's default lifetime.
    o.default_cert_ttl = Duration::from_secs(4);
    let cp = meshward_control::start(o).await.unwrap();
    let first = server_leaf(&cp).await;
    assert_eq!(uris(&first), [id("istio-system", "istiod").to_string()]);
    assert_eq!(lifetime(&first), 4 + 60);
    let renewed = eventually("a renewed server certificate", || async {
        let now = server_leaf(&cp).await;
        (now != first).then_some(now)
    })
    .await;
    assert_eq!(uris(&renewed), [id("istio-system", "istiod").to_string()]);
}
