//! Workload-side certificate rotation.
//!
//! [`spawn_rotation`] runs a task that generates a fresh key and CSR,
//! obtains a certificate from a [`CaClient`], publishes the credentials on a
//! `tokio::sync::watch` channel, and renews at 50% of the certificate's
//! lifetime plus up to 10% jitter (so that a fleet started together does not
//! renew together). When the CA is unreachable it retries with exponential
//! backoff (with jitter), keeps serving the current certificate while it is
//! valid, and publishes `None` only once it has expired. All timing uses
//! tokio's clock, so tests run it under paused time.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls_pki_types::CertificateDer;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::ca::CertificateAuthority;
use crate::credentials::{
    CredentialResolver, CredentialsError, CurrentCredentials, WorkloadCredentials,
};
use crate::issue::{IssueError, WorkloadKey};
use crate::keys::{KeyGenError, KeyType};
use crate::spiffe::SpiffeId;

/// A boxed future (keeps [`CaClient`] object-safe).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why the CA did not return a certificate.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum CaClientError {
    #[error("CA unreachable: {reason}")]
    Unavailable { reason: String },
    #[error("CA refused the request: {0}")]
    Refused(#[from] IssueError),
}

/// Something that signs a workload's CSR: the control plane's CA service
/// over gRPC in production, an in-process CA in local mode and tests.
pub trait CaClient: Send + Sync + 'static {
    /// Sends a DER CSR; returns the chain, leaf first.
    fn sign(
        &self,
        csr_der: Vec<u8>,
        ttl: Option<Duration>,
    ) -> BoxFuture<'_, Result<Vec<CertificateDer<'static>>, CaClientError>>;
}

/// A [`CaClient`] backed by an in-process CA, signing for a fixed
/// authenticated identity (local mode, tests).
#[derive(Debug, Clone)]
pub struct LocalCaClient {
    ca: Arc<CertificateAuthority>,
    authenticated: SpiffeId,
}

impl LocalCaClient {
    /// Signs for `authenticated` with `ca`.
    pub fn new(ca: Arc<CertificateAuthority>, authenticated: SpiffeId) -> Self {
        Self { ca, authenticated }
    }
}

impl CaClient for LocalCaClient {
    fn sign(
        &self,
        csr_der: Vec<u8>,
        ttl: Option<Duration>,
    ) -> BoxFuture<'_, Result<Vec<CertificateDer<'static>>, CaClientError>> {
        Box::pin(async move {
            let issued = self.ca.sign_csr(&csr_der, &self.authenticated, ttl)?;
            Ok(issued.chain().to_vec())
        })
    }
}

/// Rotation parameters.
#[derive(Debug, Clone)]
pub struct RotationConfig {
    /// The identity to request.
    pub id: SpiffeId,
    /// Key type for each new key (a fresh key per certificate).
    pub key_type: KeyType,
    /// TTL to ask for (`None`: the CA's default).
    pub ttl: Option<Duration>,
    /// Fraction of the lifetime after which to renew (0.5).
    pub renew_at: f64,
    /// Extra random fraction of the lifetime added to `renew_at` (0.1).
    pub jitter: f64,
    /// First retry delay after a failure (1 s), doubled per failure.
    pub initial_backoff: Duration,
    /// Retry delay cap (60 s).
    pub max_backoff: Duration,
}

impl RotationConfig {
    /// Defaults for `id`.
    pub fn new(id: SpiffeId) -> Self {
        Self {
            id,
            key_type: KeyType::EcP256,
            ttl: None,
            renew_at: 0.5,
            jitter: 0.1,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
        }
    }
}

/// Why one rotation attempt failed (logged; the task retries).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RotationError {
    #[error(transparent)]
    KeyGen(#[from] KeyGenError),
    #[error(transparent)]
    Csr(#[from] IssueError),
    #[error(transparent)]
    Ca(#[from] CaClientError),
    #[error(transparent)]
    Credentials(#[from] CredentialsError),
}

/// A running rotation; dropping it stops the task.
#[derive(Debug)]
pub struct Rotation {
    rx: watch::Receiver<CurrentCredentials>,
    task: JoinHandle<()>,
}

impl Rotation {
    /// A receiver of every published credential change.
    pub fn subscribe(&self) -> watch::Receiver<CurrentCredentials> {
        self.rx.clone()
    }

    /// A rustls resolver that always serves the latest credentials.
    pub fn resolver(&self) -> CredentialResolver {
        CredentialResolver::new(self.rx.clone())
    }

    /// The current credentials, if any.
    pub fn current(&self) -> CurrentCredentials {
        self.rx.borrow().clone()
    }
}

impl Drop for Rotation {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts rotating credentials for `config.id` on the current tokio runtime.
pub fn spawn_rotation(config: RotationConfig, client: Arc<dyn CaClient>) -> Rotation {
    let (tx, rx) = watch::channel(None);
    let task = tokio::spawn(run(config, client, tx));
    Rotation { rx, task }
}

async fn run(
    config: RotationConfig,
    client: Arc<dyn CaClient>,
    tx: watch::Sender<CurrentCredentials>,
) {
    let mut backoff = config.initial_backoff;
    // When the published certificate stops being valid, on tokio's clock.
    let mut expires_at: Option<Instant> = None;
    loop {
        match fetch(&config, client.as_ref()).await {
            Ok(creds) => {
                let now = Instant::now();
                let now_sys = SystemTime::now();
                let remaining = creds
                    .not_after()
                    .duration_since(now_sys)
                    .unwrap_or_default();
                // The lifetime counts from when the certificate arrived: a
                // CA backdates notBefore against clock skew (meshward's by
                // `LEAF_BACKDATE`, 60 s), and counting from it would renew
                // a 10 s certificate at once, again and again. A notBefore
                // in the future (skew the other way) counts from there.
                let start = creds.not_before().max(now_sys);
                let lifetime = creds.not_after().duration_since(start).unwrap_or_default();
                let elapsed = now_sys.duration_since(start).unwrap_or_default();
                let fraction = config.renew_at + config.jitter * random_unit();
                let renew_in = lifetime
                    .mul_f64(fraction.clamp(0.0, 1.0))
                    .saturating_sub(elapsed)
                    .min(remaining);
                tracing::info!(
                    identity = %creds.id(),
                    expires_in_s = remaining.as_secs(),
                    renew_in_s = renew_in.as_secs(),
                    "workload certificate rotated"
                );
                expires_at = Some(now + remaining);
                tx.send_replace(Some(Arc::new(creds)));
                backoff = config.initial_backoff;
                tokio::time::sleep_until(now + renew_in).await;
            }
            Err(error) => {
                let delay = backoff.mul_f64(1.0 + 0.1 * random_unit());
                backoff = (backoff * 2).min(config.max_backoff);
                let wake = Instant::now() + delay;
                match expires_at {
                    Some(exp) if exp <= wake => {
                        tracing::warn!(%error, retry_in_ms = delay.as_millis() as u64, "certificate renewal failed; current certificate expires before the retry");
                        tokio::time::sleep_until(exp).await;
                        tracing::error!(identity = %config.id, "workload certificate expired; no valid certificate to serve");
                        expires_at = None;
                        tx.send_replace(None);
                        tokio::time::sleep_until(wake).await;
                    }
                    _ => {
                        tracing::warn!(%error, retry_in_ms = delay.as_millis() as u64, "certificate renewal failed; keeping the current certificate");
                        tokio::time::sleep_until(wake).await;
                    }
                }
            }
        }
    }
}

async fn fetch(
    config: &RotationConfig,
    client: &dyn CaClient,
) -> Result<WorkloadCredentials, RotationError> {
    let key = WorkloadKey::generate(config.key_type)?;
    let csr = key.csr_der(&config.id)?;
    let chain = client.sign(csr, config.ttl).await?;
    Ok(WorkloadCredentials::new(&key, chain, &config.id)?)
}

/// A uniform random number in [0, 1).
fn random_unit() -> f64 {
    let mut b = [0u8; 4];
    // On failure of the system RNG the jitter is zero, which only loses spreading.
    if rustls::crypto::aws_lc_rs::default_provider()
        .secure_random
        .fill(&mut b)
        .is_err()
    {
        return 0.0;
    }
    f64::from(u32::from_le_bytes(b)) / (f64::from(u32::MAX) + 1.0)
}
