//! Rotation under paused tokio time with short-lived certificates and a CA
//! that can be made to fail.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use meshward_identity::ca::CertificateAuthority;
use meshward_identity::keys::KeyType;
use meshward_identity::rotation::{
    BoxFuture, CaClient, CaClientError, LocalCaClient, RotationConfig, spawn_rotation,
};
use meshward_identity::spiffe::SpiffeId;
use rustls_pki_types::CertificateDer;
use tokio::time::Instant;

/// Certificates live TTL + 60 s (the CA backdates by 60 s; the fake CA
/// signs "60 s in the future" so that not_before is now).
const TTL: Duration = Duration::from_secs(40);
const LIFETIME: f64 = 100.0;

/// A CA that answers according to a script: call N (0-based) succeeds if
/// `ok(N)`; every call's tokio instant is recorded.
struct ScriptedCa {
    ca: CertificateAuthority,
    id: SpiffeId,
    calls: AtomicUsize,
    ok: Box<dyn Fn(usize) -> bool + Send + Sync>,
    at: Mutex<Vec<Instant>>,
}

impl ScriptedCa {
    fn new(ok: impl Fn(usize) -> bool + Send + Sync + 'static) -> Arc<Self> {
        let (_, m) = material(TD, KeyType::EcP256, KeyType::EcP256);
        Arc::new(Self {
            ca: ca_from(&m),
            id: workload("default", "api"),
            calls: AtomicUsize::new(0),
            ok: Box::new(ok),
            at: Mutex::new(Vec::new()),
        })
    }

    fn attempts(&self) -> Vec<Instant> {
        self.at.lock().unwrap().clone()
    }
}

impl CaClient for ScriptedCa {
    fn sign(
        &self,
        csr_der: Vec<u8>,
        ttl: Option<Duration>,
    ) -> BoxFuture<'_, Result<Vec<CertificateDer<'static>>, CaClientError>> {
        Box::pin(async move {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            self.at.lock().unwrap().push(Instant::now());
            if !(self.ok)(n) {
                return Err(CaClientError::Unavailable {
                    reason: format!("scripted failure #{n}"),
                });
            }
            let issued = self.ca.sign_csr_at(
                &csr_der,
                &self.id,
                ttl,
                now() + time::Duration::seconds(60),
            )?;
            Ok(issued.chain().to_vec())
        })
    }
}

fn config() -> RotationConfig {
    let mut c = RotationConfig::new(workload("default", "api"));
    c.ttl = Some(TTL);
    c
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

#[tokio::test(start_paused = true)]
async fn renews_between_50_and_60_percent_of_the_lifetime() {
    let ca = ScriptedCa::new(|_| true);
    let rotation = spawn_rotation(config(), ca.clone());
    let mut rx = rotation.subscribe();
    let mut published = Vec::new();
    for _ in 0..4 {
        rx.changed().await.unwrap();
        let creds = rx
            .borrow_and_update()
            .clone()
            .expect("credentials published");
        published.push((Instant::now(), creds));
    }
    for pair in published.windows(2) {
        let gap = secs(pair[1].0 - pair[0].0);
        // X.509 times have one-second resolution, hence the slack.
        assert!(
            (0.5 * LIFETIME - 1.0..=0.6 * LIFETIME + 0.01).contains(&gap),
            "renewed after {gap}s"
        );
        assert_ne!(
            pair[0].1.chain()[0],
            pair[1].1.chain()[0],
            "a new certificate"
        );
    }
    // Fresh key per certificate.
    assert_eq!(ca.attempts().len(), 4);
}

/// A real CA backdates notBefore by 60 s: the lifetime still counts from
/// issuance, so a 10 s certificate is renewed after 5-6 s, not at once.
#[tokio::test]
async fn a_backdated_short_certificate_is_renewed_at_half_its_ttl_not_at_once() {
    let (_, m) = material(TD, KeyType::EcP256, KeyType::EcP256);
    let ca = Arc::new(ca_from(&m));
    let id = workload("default", "api");
    let mut c = RotationConfig::new(id.clone());
    c.ttl = Some(Duration::from_secs(4));
    let rotation = spawn_rotation(c, Arc::new(LocalCaClient::new(ca, id)));
    let mut rx = rotation.subscribe();
    rx.changed().await.unwrap();
    let first = std::time::Instant::now();
    rx.changed().await.unwrap();
    let gap = first.elapsed().as_secs_f64();
    // 50-60% of 4 s, with X.509's one-second resolution as slack.
    assert!((1.0..=3.5).contains(&gap), "renewed after {gap}s");
}

#[tokio::test(start_paused = true)]
async fn keeps_serving_until_expiry_while_the_ca_is_down_with_backoff() {
    // Only the first call succeeds.
    let ca = ScriptedCa::new(|n| n == 0);
    let rotation = spawn_rotation(config(), ca.clone());
    let mut rx = rotation.subscribe();
    rx.changed().await.unwrap();
    let t0 = Instant::now();
    let first = rx.borrow_and_update().clone().expect("first certificate");

    // The next change is the expiry: nothing replaced the certificate before.
    rx.changed().await.unwrap();
    let expired_at = secs(Instant::now() - t0);
    assert!(rx.borrow().is_none(), "expired certificate withdrawn");
    assert!(
        (LIFETIME - 1.5..=LIFETIME + 0.01).contains(&expired_at),
        "withdrawn after {expired_at}s"
    );
    assert_eq!(first.lifetime(), Duration::from_secs(100));

    // Retries: exponential backoff 1, 2, 4, 8, 16, 32 s (+ up to 10% jitter).
    let attempts = ca.attempts();
    let gaps: Vec<f64> = attempts
        .windows(2)
        .skip(1)
        .map(|w| secs(w[1] - w[0]))
        .collect();
    assert!(gaps.len() >= 5, "{gaps:?}");
    for (i, gap) in gaps.iter().take(5).enumerate() {
        let base = f64::from(1u32 << i);
        assert!(
            (base..=base * 1.1 + 0.01).contains(gap),
            "retry gap #{i} = {gap}s, expected ~{base}s ({gaps:?})"
        );
    }
    drop(rotation);
}

#[tokio::test(start_paused = true)]
async fn recovers_when_the_ca_comes_back_without_a_gap() {
    // Calls 1..=3 fail, then the CA is back.
    let ca = ScriptedCa::new(|n| !(1..=3).contains(&n));
    let rotation = spawn_rotation(config(), ca.clone());
    let mut rx = rotation.subscribe();
    rx.changed().await.unwrap();
    let t0 = Instant::now();
    let first = rx.borrow_and_update().clone().unwrap();
    rx.changed().await.unwrap();
    let second = rx.borrow_and_update().clone().expect("never withdrawn");
    let at = secs(Instant::now() - t0);
    // 50-60% of the lifetime, then 1 + 2 + 4 s of backoff (+ jitter).
    assert!(
        (0.5 * LIFETIME + 5.0..=0.6 * LIFETIME + 7.8).contains(&at),
        "{at}"
    );
    assert_ne!(first.chain()[0], second.chain()[0]);
    assert_eq!(ca.attempts().len(), 5);
}

#[tokio::test(start_paused = true)]
async fn starts_without_credentials_until_the_ca_answers() {
    let ca = ScriptedCa::new(|n| n >= 2);
    let rotation = spawn_rotation(config(), ca.clone());
    assert!(rotation.current().is_none());
    let mut rx = rotation.subscribe();
    rx.changed().await.unwrap();
    assert!(rx.borrow().is_some());
    assert_eq!(ca.attempts().len(), 3);
}

#[tokio::test]
async fn local_ca_client_end_to_end() {
    let (_, m) = material(TD, KeyType::EcP256, KeyType::EcP256);
    let ca = Arc::new(ca_from(&m));
    let who = workload("default", "api");
    let rotation = spawn_rotation(
        RotationConfig::new(who.clone()),
        Arc::new(LocalCaClient::new(ca, who.clone())),
    );
    let mut rx = rotation.subscribe();
    rx.changed().await.unwrap();
    let creds = rotation.current().unwrap();
    assert_eq!(creds.id(), &who);
    assert_eq!(creds.lifetime(), Duration::from_secs(24 * 3600 + 60));
}
