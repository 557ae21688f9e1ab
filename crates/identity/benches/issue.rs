//! Certificate issuance throughput: CSR parse + signature check + policy
//! checks + leaf signing + DER encoding, as the CA service does per request.
//!
//! Run: `cargo bench -p meshward-identity --bench issue`

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use meshward_identity::ca::{CaOptions, CaSettings, CertificateAuthority, RootCa};
use meshward_identity::issue::WorkloadKey;
use meshward_identity::keys::KeyType;
use meshward_identity::spiffe::{SpiffeId, TrustDomain};

fn authority(key_type: KeyType) -> CertificateAuthority {
    let opts = |key_type| CaOptions {
        trust_domain: TrustDomain::new("cluster.local").unwrap(),
        organization: "bench".into(),
        common_name: None,
        key_type,
        lifetime: Duration::from_secs(365 * 86_400),
    };
    let root = RootCa::generate(&opts(KeyType::EcP256)).unwrap();
    let material = root.new_intermediate(&opts(key_type)).unwrap();
    CertificateAuthority::from_material(&material, CaSettings::default()).unwrap()
}

fn bench_issue(c: &mut Criterion) {
    let id = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/api").unwrap();
    let key = WorkloadKey::generate(KeyType::EcP256).unwrap();
    let csr = key.csr_der(&id).unwrap();

    let mut group = c.benchmark_group("issue");
    group.throughput(Throughput::Elements(1));
    for (name, ca_key) in [
        ("ec-p256-ca", KeyType::EcP256),
        ("rsa-2048-ca", KeyType::Rsa2048),
    ] {
        let ca = authority(ca_key);
        group.bench_function(name, |b| {
            b.iter(|| {
                let issued = ca.sign_csr(black_box(&csr), &id, None).unwrap();
                black_box(issued.chain_pem())
            })
        });
    }
    group.finish();

    // The workload side, for reference: key generation + CSR.
    c.bench_function("workload_keygen_and_csr_p256", |b| {
        b.iter(|| {
            let key = WorkloadKey::generate(KeyType::EcP256).unwrap();
            black_box(key.csr_der(&id).unwrap())
        })
    });
}

criterion_group!(benches, bench_issue);
criterion_main!(benches);
