//! What RequestAuthentication costs per request on the inbound path: a
//! workload with no RequestAuthentication (the common case, which must
//! cost nothing), and valid tokens signed with ES256 (seen before, and new
//! each time) and with HS256.
//!
//! Run: cargo bench -p meshward-proxy --bench jwt

use std::borrow::Cow;
use std::hint::black_box;
use std::time::{SystemTime, UNIX_EPOCH};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
use base64::Engine as _;
use criterion::{Criterion, criterion_group, criterion_main};
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use meshward_proxy::{JwksStore, JwtPolicy};
use serde_json::json;

const ISS: &str = "https://auth.example.com";

struct Req(String);

impl meshward_policy::Headers for Req {
    fn header(&self, name: &str) -> Option<Cow<'_, [u8]>> {
        (name == "authorization").then_some(Cow::Borrowed(self.0.as_bytes()))
    }
}

fn policy(jwks: &serde_json::Value) -> JwtPolicy {
    let set = serde_json::to_string(&json!({ "keys": [jwks] }).to_string()).unwrap();
    let yaml = format!(
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: jwt, namespace: prod}}\nspec:\n  jwtRules:\n  - {{issuer: \"{ISS}\", jwks: {set}, audiences: [orders], outputClaimToHeaders: [{{header: x-sub, claim: sub}}]}}\n"
    );
    let mut loader = meshward_config::Loader::new();
    loader.add_source("bench.yaml", &yaml);
    let config = loader.finish().unwrap().config;
    JwtPolicy::compile(&config.request_authentications, &JwksStore::default())
}

/// A token unlike any other (`jti`), valid for an hour.
fn token(key: &EncodingKey, alg: Algorithm) -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let jti = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = json!({"iss": ISS, "sub": "alice", "aud": "orders", "exp": now + 3600, "scope": "read write", "jti": jti});
    jsonwebtoken::encode(&Header::new(alg), &claims, key).unwrap()
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("jwt_authenticate");
    let none = JwtPolicy::default();
    let req = Req("Bearer x.y.z".into());
    g.bench_function("no_request_authentication", |b| {
        b.iter(|| black_box(none.authenticate(black_box(&req), "/api/v1/orders/7")))
    });

    let pkcs8 =
        EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
            .unwrap();
    let es = EncodingKey::from_ec_der(pkcs8.as_ref());
    let es_policy = policy(
        &serde_json::to_value(Jwk::from_encoding_key(&es, Algorithm::ES256).unwrap()).unwrap(),
    );
    let req = Req(format!("Bearer {}", token(&es, Algorithm::ES256)));
    assert!(es_policy.authenticate(&req, "/").unwrap().auth.is_some());
    // The same token again: its signature was verified once and is
    // remembered; the other checks run.
    g.bench_function("es256_valid_seen_before", |b| {
        b.iter(|| black_box(es_policy.authenticate(black_box(&req), "/api/v1/orders/7")))
    });
    // A token never seen: the ECDSA signature check on every request.
    g.bench_function("es256_valid_first_seen", |b| {
        b.iter_batched(
            || Req(format!("Bearer {}", token(&es, Algorithm::ES256))),
            |req| black_box(es_policy.authenticate(&req, "/api/v1/orders/7")),
            criterion::BatchSize::SmallInput,
        )
    });

    let secret = b"a shared secret of enough length!";
    let oct = json!({"kty": "oct", "alg": "HS256", "k": base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret)});
    let hs_policy = policy(&oct);
    let req = Req(format!(
        "Bearer {}",
        token(&EncodingKey::from_secret(secret), Algorithm::HS256)
    ));
    assert!(hs_policy.authenticate(&req, "/").unwrap().auth.is_some());
    g.bench_function("hs256_valid_seen_before", |b| {
        b.iter(|| black_box(hs_policy.authenticate(black_box(&req), "/api/v1/orders/7")))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
