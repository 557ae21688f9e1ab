//! The control-plane source (`meshward proxy --control ADDR[,ADDR...]`):
//! the workload's identity from the control plane's CA, its configuration
//! and trust bundle from the control plane's config stream.
//!
//! - Identity: the key is generated here and never leaves the process; a
//!   CSR goes to Istio's `IstioCertificateService/CreateCertificate`
//!   (`ca.rs`), authenticated by the bootstrap token (`--token-file`, read
//!   again for every first issuance) or, for a renewal, by the current
//!   certificate (mTLS). `meshward_identity`'s rotation renews at 50% of
//!   the lifetime plus jitter and retries with backoff, keeping the
//!   still-valid certificate meanwhile.
//! - Configuration: one `ConfigDiscoveryService/StreamConfig` stream
//!   (`stream.rs`), over mTLS with the current certificate. Every response
//!   is loaded whole: published and ACKed, or NACKed with its diagnostics
//!   while what runs stays.
//! - Trust bundle: the `--root-cert` file at first, then the roots the CA
//!   and the config stream return; it verifies the control plane too.
//! - Addresses: the first one tried is picked at random (proxies spread
//!   over replicas); a connection failure or UNAVAILABLE moves to the next
//!   one. While none answers, the source publishes the config source as
//!   lost (the proxy keeps serving what it applied) and reconnects with
//!   exponential backoff and jitter, at most [`ControlOptions::max_backoff`]
//!   apart, resubscribing when one answers (the control plane then sends
//!   its current view).

mod ca;
mod connect;
mod stream;
mod token;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use meshward_identity::credentials::CurrentCredentials;
use meshward_identity::{RotationConfig, SpiffeId, TrustBundle, spawn_rotation};
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use token::TokenError;

use self::connect::Address;
use super::{Credentials, Feed, Publisher, Source, SourceInfo, SourceState};

/// The control plane's default identity (namespace/service account), as
/// istiod's.
pub const DEFAULT_CONTROL_IDENTITY: &str = "istio-system/istiod";

/// The longest wait between two attempts to reach the control plane.
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(5);

/// How the proxy reaches its control plane.
#[derive(Debug, Clone)]
pub struct ControlOptions {
    /// `host:port` of each replica.
    pub addresses: Vec<String>,
    /// This workload, `namespace/name` of its WorkloadEntry.
    pub workload: String,
    /// The bootstrap token (a JWT minted by `meshward control token`).
    pub token_file: PathBuf,
    /// The roots to trust until the control plane pushes its bundle.
    pub root_cert: PathBuf,
    /// The certificate lifetime to ask for (`None`: the CA's default).
    pub cert_ttl: Option<Duration>,
    /// The control plane's `namespace/service-account`, checked against
    /// its certificate (in the workload's trust domain).
    pub control_identity: String,
    /// The longest wait between reconnection attempts.
    pub max_backoff: Duration,
    /// How long a TCP and TLS connection may take.
    pub connect_timeout: Duration,
    /// The index in `addresses` to try first (`None`: one at random, so
    /// that proxies spread over the replicas).
    pub first_address: Option<usize>,
}

impl ControlOptions {
    /// Options with the defaults: istiod's identity, the CA's TTL,
    /// [`DEFAULT_MAX_BACKOFF`], a 3 s connect timeout.
    pub fn new(
        addresses: Vec<String>,
        workload: String,
        token_file: PathBuf,
        root_cert: PathBuf,
    ) -> ControlOptions {
        ControlOptions {
            addresses,
            workload,
            token_file,
            root_cert,
            cert_ttl: None,
            control_identity: DEFAULT_CONTROL_IDENTITY.to_string(),
            max_backoff: DEFAULT_MAX_BACKOFF,
            connect_timeout: Duration::from_secs(3),
            first_address: None,
        }
    }
}

/// Why the control-plane source cannot start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    #[error("no control plane address given")]
    NoAddress,
    #[error("control plane address {address:?}: {reason}")]
    Address { address: String, reason: String },
    #[error("workload {workload:?}: expected NAMESPACE/NAME")]
    Workload { workload: String },
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error(
        "the bootstrap token grants {id}, in namespace {token_namespace:?}, but this proxy serves {workload:?} in namespace {workload_namespace:?}"
    )]
    TokenNamespace {
        id: String,
        token_namespace: String,
        workload: String,
        workload_namespace: String,
    },
    #[error("root certificates {path}: {reason}")]
    RootCert { path: String, reason: String },
    #[error("root certificates {path}: the file holds no certificate")]
    NoRoots { path: String },
    #[error("control plane identity {value:?}: {reason}")]
    ControlIdentity { value: String, reason: String },
}

/// What the tasks share: where the control plane is, who it must be, what
/// the proxy trusts and presents now, and where to publish.
#[derive(Debug)]
pub(crate) struct Shared {
    addresses: Vec<Address>,
    /// The address to try first (the last one that answered).
    preferred: AtomicUsize,
    /// The control plane's SPIFFE ID.
    control_id: SpiffeId,
    /// The trust bundle now.
    bundle: watch::Sender<Arc<TrustBundle>>,
    /// The workload's certificate now (`None` before the first one and
    /// after the last one expired).
    credentials: watch::Sender<CurrentCredentials>,
    publisher: Publisher,
    workload: String,
    token_file: PathBuf,
    connect_timeout: Duration,
    max_backoff: Duration,
}

impl Shared {
    /// The addresses in the order to try them now: the preferred one first.
    fn addresses_in_order(&self) -> impl Iterator<Item = (usize, &Address)> {
        let n = self.addresses.len();
        let start = self.preferred.load(Ordering::Relaxed) % n;
        (0..n).map(move |k| {
            let i = (start + k) % n;
            (i, &self.addresses[i])
        })
    }

    /// Remembers that address `i` answered.
    fn answered(&self, i: usize) {
        self.preferred.store(i, Ordering::Relaxed);
    }

    /// Replaces the trust bundle, if `bundle` differs (it is then
    /// published with the credentials).
    fn set_bundle(&self, bundle: TrustBundle) {
        self.bundle.send_if_modified(|current| {
            if current.roots() == bundle.roots() {
                false
            } else {
                tracing::info!(target: "meshward::certs", roots = bundle.len(), "trust bundle updated by the control plane");
                *current = Arc::new(bundle);
                true
            }
        });
    }

    /// The current certificate, if it is still valid (to authenticate a
    /// renewal with).
    fn valid_credentials(&self) -> CurrentCredentials {
        let current = self.credentials.borrow().clone();
        current.filter(|c| c.not_after() > SystemTime::now())
    }
}

/// Starts the source: reads the token and the roots (a problem with
/// either fails here, with what is wrong), then obtains the certificate
/// and subscribes to the configuration in the background. Must be called
/// within a Tokio runtime; the proxy starts once both have arrived.
pub fn start(options: ControlOptions) -> Result<Feed, ControlError> {
    let (shared, feed, id) = prepare(&options)?;
    let shared = Arc::new(shared);
    let mut rotation = RotationConfig::new(id.clone());
    rotation.ttl = options.cert_ttl;
    rotation.initial_backoff = Duration::from_millis(500).min(options.max_backoff);
    rotation.max_backoff = options.max_backoff;
    let rotation = spawn_rotation(rotation, Arc::new(ca::GrpcCa::new(Arc::clone(&shared))));
    let credentials = tokio::spawn(publish_credentials(
        Arc::clone(&shared),
        rotation.subscribe(),
    ));
    let config = tokio::spawn(stream::run(Arc::clone(&shared), node_id(&options.workload)));
    tracing::info!(
        target: "meshward::certs",
        identity = %id,
        control_plane = %shared.control_id,
        addresses = ?options.addresses,
        "obtaining the workload certificate and configuration from the control plane"
    );
    Ok(feed.with_guard(Tasks {
        _rotation: rotation,
        tasks: vec![credentials, config],
    }))
}

/// Checks the options and reads what the source starts from.
fn prepare(options: &ControlOptions) -> Result<(Shared, Feed, SpiffeId), ControlError> {
    if options.addresses.iter().all(|a| a.trim().is_empty()) {
        return Err(ControlError::NoAddress);
    }
    let addresses = options
        .addresses
        .iter()
        .map(|a| {
            Address::parse(a).map_err(|reason| ControlError::Address {
                address: a.clone(),
                reason,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let workload_namespace = match options.workload.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => ns,
        _ => {
            return Err(ControlError::Workload {
                workload: options.workload.clone(),
            });
        }
    };
    let token = token::read(&options.token_file)?;
    let token_namespace = token.id.namespace().unwrap_or_default();
    if token_namespace != workload_namespace {
        return Err(ControlError::TokenNamespace {
            id: token.id.to_string(),
            token_namespace: token_namespace.to_owned(),
            workload: options.workload.clone(),
            workload_namespace: workload_namespace.to_owned(),
        });
    }
    let control_id = match options.control_identity.split_once('/') {
        Some((ns, sa)) => SpiffeId::workload(&token.id.trust_domain(), ns, sa).map_err(|e| {
            ControlError::ControlIdentity {
                value: options.control_identity.clone(),
                reason: e.to_string(),
            }
        })?,
        None => {
            return Err(ControlError::ControlIdentity {
                value: options.control_identity.clone(),
                reason: "expected NAMESPACE/SERVICE_ACCOUNT".to_string(),
            });
        }
    };
    let root_path = options.root_cert.display().to_string();
    let bundle =
        TrustBundle::from_pem_file(&options.root_cert).map_err(|e| ControlError::RootCert {
            path: root_path.clone(),
            reason: e.to_string(),
        })?;
    if bundle.is_empty() {
        return Err(ControlError::NoRoots { path: root_path });
    }
    let shown: Vec<String> = addresses.iter().map(|a| a.text.clone()).collect();
    let (publisher, feed) = Publisher::new(SourceInfo {
        kind: "control",
        config: shown.clone(),
        credentials: shown,
        watched: true,
        rescan: None,
    });
    let n = addresses.len();
    let shared = Shared {
        addresses,
        // Proxies started together spread over the replicas.
        preferred: AtomicUsize::new(
            options
                .first_address
                .unwrap_or_else(|| random_u32() as usize)
                % n,
        ),
        control_id,
        bundle: watch::Sender::new(Arc::new(bundle)),
        credentials: watch::Sender::new(None),
        publisher,
        workload: options.workload.clone(),
        token_file: options.token_file.clone(),
        connect_timeout: options.connect_timeout,
        max_backoff: options.max_backoff,
    };
    Ok((shared, feed, token.id))
}

/// Publishes the credentials on every new certificate and every bundle
/// change.
async fn publish_credentials(
    shared: Arc<Shared>,
    mut rotation: watch::Receiver<CurrentCredentials>,
) {
    let mut bundle = shared.bundle.subscribe();
    loop {
        tokio::select! {
            r = rotation.changed() => {
                if r.is_err() {
                    return;
                }
                let current = rotation.borrow_and_update().clone();
                shared.credentials.send_replace(current.clone());
                if current.is_none() {
                    shared.publisher.problem(
                        Source::Certs,
                        SourceState::Lost,
                        "the workload certificate expired and no control plane renewed it".to_string(),
                    );
                    continue;
                }
            }
            r = bundle.changed() => {
                if r.is_err() {
                    return;
                }
            }
        }
        let roots = Arc::clone(&bundle.borrow_and_update());
        let current = shared.credentials.borrow().clone();
        if let Some(credentials) = current {
            shared.publisher.credentials(Credentials {
                credentials: (*credentials).clone(),
                bundle: (*roots).clone(),
            });
        }
    }
}

/// Keeps the source's tasks running as long as the proxy; stops them
/// when dropped.
#[derive(Debug)]
struct Tasks {
    _rotation: meshward_identity::Rotation,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// A node ID unique per proxy process: `NS/NAME~PID~RANDOM`.
fn node_id(workload: &str) -> String {
    format!("{workload}~{}~{:08x}", std::process::id(), random_u32())
}

/// A random number (for spreading and jitter; zero if the system RNG
/// fails, which only loses the spreading).
pub(crate) fn random_u32() -> u32 {
    let mut b = [0u8; 4];
    if rustls::crypto::aws_lc_rs::default_provider()
        .secure_random
        .fill(&mut b)
        .is_err()
    {
        return 0;
    }
    u32::from_le_bytes(b)
}

/// `d` with up to 20% added at random.
pub(crate) fn jittered(d: Duration) -> Duration {
    d.mul_f64(1.0 + 0.2 * f64::from(random_u32()) / f64::from(u32::MAX))
}
