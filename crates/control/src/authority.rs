//! The control plane's CA material and the trust bundle it publishes.
//!
//! Two sources: a plug-in CA in Istio's `cacerts` layout (`--ca DIR`),
//! which must exist and is re-read when its files change, or a self-signed
//! ECDSA root created on first start in a state directory and reused on
//! every later start (a restart keeps the same root).
//!
//! The trust bundle is every certificate of `root-cert.pem` plus the root of
//! the signing chain. Root rotation without downtime is three edits of the
//! plug-in directory, each picked up by the poller: (a) append the new root
//! to `root-cert.pem` (the bundle holds both); (b) replace `ca-cert.pem`,
//! `ca-key.pem` and `cert-chain.pem` with an intermediate under the new root
//! (new leaves chain to it); (c) remove the old root from `root-cert.pem`.
//! A set that does not load (half-written, broken) is refused with an error
//! naming the file, and the previous CA keeps signing.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use meshward_identity::ca::{
    CA_CERT_FILE, CA_KEY_FILE, CERT_CHAIN_FILE, DEFAULT_ROOT_LIFETIME, ROOT_CERT_FILE,
};
use meshward_identity::{
    CaLoadError, CaMaterial, CaOptions, CaSettings, CertificateAuthority, KeyType, RootCa,
    TrustBundle, TrustDomain,
};
use time::OffsetDateTime;
use tokio::sync::watch;
use x509_parser::prelude::FromDer as _;

use crate::metrics::Metrics;

/// The four files of Istio's `cacerts` layout, in the order they are read.
const CA_FILES: [&str; 4] = [CA_CERT_FILE, CA_KEY_FILE, ROOT_CERT_FILE, CERT_CHAIN_FILE];

/// Expiry closer than this is logged as a warning, at start and hourly.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(30 * 24 * 3600);

/// How often the expiry check runs.
const EXPIRY_CHECK_INTERVAL: Duration = Duration::from_secs(3600);

/// Where the CA material comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaSource {
    /// A plug-in CA in Istio's `cacerts` layout; must exist; re-read when
    /// its files change.
    PlugIn(PathBuf),
    /// A self-signed root kept in this state directory (created on first
    /// start, in the same layout, key mode 0600).
    SelfSigned(PathBuf),
}

/// What the authority is built from.
#[derive(Debug, Clone)]
pub struct AuthorityOptions {
    /// Where the CA material comes from.
    pub source: CaSource,
    /// The trust domain; `None`: the CA certificate's, else `cluster.local`.
    pub trust_domain: Option<TrustDomain>,
    /// Leaf lifetime when the caller asks for none.
    pub default_cert_ttl: Duration,
    /// Requested leaf lifetimes are capped to this.
    pub max_cert_ttl: Duration,
    /// How often the plug-in directory is compared with what was loaded.
    pub poll_interval: Duration,
}

/// Why the CA material cannot be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthorityError {
    /// A file is missing, unreadable or invalid (the error names it).
    #[error(transparent)]
    Load(#[from] CaLoadError),
    /// The self-signed root could not be created or written.
    #[error("{}: cannot create the self-signed root: {reason}", dir.display())]
    Create {
        /// The state directory.
        dir: PathBuf,
        /// What failed.
        reason: String,
    },
    /// The roots cannot form a trust bundle.
    #[error("{}: {reason}", path.display())]
    Bundle {
        /// `root-cert.pem`.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A reloaded CA signs for another trust domain than the running one.
    #[error(
        "{}: the new CA signs for trust domain {new:?} but this control plane serves {running:?}; restart it to change the trust domain",
        path.display()
    )]
    TrustDomainChanged {
        /// `ca-cert.pem`.
        path: PathBuf,
        /// The new CA's trust domain.
        new: String,
        /// The running one.
        running: String,
    },
}

/// The signing CA and the bundle, swapped together.
#[derive(Debug)]
pub struct Signing {
    /// The CA that signs leaves now.
    pub ca: Arc<CertificateAuthority>,
    /// Every root proxies must trust now.
    pub bundle: Arc<TrustBundle>,
    /// Counts successful loads (1 for the first).
    pub generation: u64,
}

/// The result of the latest reload attempt (for logs, tests and the admin
/// endpoint).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadStatus {
    /// The generation of the CA in use.
    pub generation: u64,
    /// Reload attempts that failed since start.
    pub failures: u64,
    /// The last failure's message (naming the file), if the latest attempt
    /// failed; `None` once a reload succeeded.
    pub last_error: Option<String>,
}

/// The CA material of a running control plane: cheap to clone.
#[derive(Debug, Clone)]
pub struct Authority {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    current: ArcSwap<Signing>,
    bundle_tx: watch::Sender<Arc<TrustBundle>>,
    status_tx: watch::Sender<ReloadStatus>,
    trust_domain: TrustDomain,
    options: AuthorityOptions,
    metrics: Arc<Metrics>,
    /// Contents of the four files as of the last load attempt.
    seen: std::sync::Mutex<Vec<Option<Vec<u8>>>>,
}

impl Authority {
    /// Loads (or, for a self-signed state directory seen for the first
    /// time, creates) the CA material.
    pub fn load(options: AuthorityOptions, metrics: Arc<Metrics>) -> Result<Self, AuthorityError> {
        let settings = CaSettings {
            trust_domain: options.trust_domain.clone(),
            default_ttl: options.default_cert_ttl,
            max_ttl: options.max_cert_ttl,
        };
        let dir = match &options.source {
            CaSource::PlugIn(dir) => dir.clone(),
            CaSource::SelfSigned(dir) => {
                if !CA_FILES.iter().any(|f| dir.join(f).exists()) {
                    create_self_signed(dir, options.trust_domain.clone())?;
                }
                dir.clone()
            }
        };
        let seen = read_files(&dir);
        let ca = CertificateAuthority::load_dir(&dir, settings)?;
        if let Some(notice) = ca
            .chosen_trust_domain()
            .notice("pass --trust-domain TRUST_DOMAIN to use another")
        {
            tracing::warn!("{notice}");
        }
        let bundle = bundle_of(&ca, &dir)?;
        let trust_domain = ca.trust_domain().clone();
        let signing = Signing {
            ca: Arc::new(ca),
            bundle: Arc::new(bundle),
            generation: 1,
        };
        let (bundle_tx, _) = watch::channel(signing.bundle.clone());
        let (status_tx, _) = watch::channel(ReloadStatus {
            generation: 1,
            ..ReloadStatus::default()
        });
        let authority = Self {
            inner: Arc::new(Inner {
                current: ArcSwap::from_pointee(signing),
                bundle_tx,
                status_tx,
                trust_domain,
                options,
                metrics,
                seen: std::sync::Mutex::new(seen),
            }),
        };
        let current = authority.current();
        tracing::info!(
            ca.dir = %dir.display(),
            trust_domain = %authority.inner.trust_domain,
            key_type = %current.ca.key_type(),
            roots = current.bundle.len(),
            not_after = %current.ca.not_after(),
            "CA loaded"
        );
        authority.update_expiry(&current);
        Ok(authority)
    }

    /// The signing CA and the bundle in force now (a consistent pair).
    pub fn current(&self) -> Arc<Signing> {
        self.inner.current.load_full()
    }

    /// The signing CA in force now.
    pub fn ca(&self) -> Arc<CertificateAuthority> {
        self.current().ca.clone()
    }

    /// The trust bundle, as it changes (the config push sends it to proxies).
    pub fn bundle(&self) -> watch::Receiver<Arc<TrustBundle>> {
        self.inner.bundle_tx.subscribe()
    }

    /// The trust domain this control plane serves (fixed for its lifetime).
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.inner.trust_domain
    }

    /// The result of the latest reload attempt, as it changes.
    pub fn status(&self) -> watch::Receiver<ReloadStatus> {
        self.inner.status_tx.subscribe()
    }

    /// The directory the CA material is read from.
    pub fn dir(&self) -> &Path {
        match &self.inner.options.source {
            CaSource::PlugIn(dir) | CaSource::SelfSigned(dir) => dir,
        }
    }

    /// Compares the plug-in directory with what was last loaded and, if it
    /// changed, loads it: a valid set replaces the CA and bundle atomically;
    /// an invalid one is refused (error logged and returned) and the
    /// current CA keeps signing. Returns whether a new CA is in force.
    /// The poller calls this; a self-signed state directory is never
    /// re-read.
    pub fn reload_if_changed(&self) -> Result<bool, AuthorityError> {
        let CaSource::PlugIn(dir) = &self.inner.options.source else {
            return Ok(false);
        };
        let contents = read_files(dir);
        {
            let mut seen = lock(&self.inner.seen);
            if *seen == contents {
                return Ok(false);
            }
            *seen = contents;
        }
        match self.load_again(dir) {
            Ok(signing) => {
                let signing = Arc::new(signing);
                let bundle_changed = signing.bundle.roots() != self.current().bundle.roots();
                self.inner.current.store(signing.clone());
                if bundle_changed {
                    self.inner.bundle_tx.send_replace(signing.bundle.clone());
                }
                self.inner.status_tx.send_modify(|s| {
                    s.generation = signing.generation;
                    s.last_error = None;
                });
                tracing::info!(
                    ca.dir = %dir.display(),
                    generation = signing.generation,
                    roots = signing.bundle.len(),
                    not_after = %signing.ca.not_after(),
                    "CA reloaded: the new CA signs from now on"
                );
                self.update_expiry(&signing);
                Ok(true)
            }
            Err(err) => {
                tracing::error!(
                    ca.dir = %dir.display(),
                    error = %err,
                    "CA files changed but do not load: refused, the previous CA keeps signing"
                );
                self.inner.status_tx.send_modify(|s| {
                    s.failures += 1;
                    s.last_error = Some(err.to_string());
                });
                Err(err)
            }
        }
    }

    fn load_again(&self, dir: &Path) -> Result<Signing, AuthorityError> {
        let settings = CaSettings {
            trust_domain: Some(self.inner.trust_domain.clone()),
            default_ttl: self.inner.options.default_cert_ttl,
            max_ttl: self.inner.options.max_cert_ttl,
        };
        let ca = CertificateAuthority::load_dir(dir, settings).map_err(|e| match e {
            CaLoadError::TrustDomainMismatch {
                path,
                in_cert,
                configured,
            } => AuthorityError::TrustDomainChanged {
                path,
                new: in_cert,
                running: configured,
            },
            other => AuthorityError::Load(other),
        })?;
        let bundle = bundle_of(&ca, dir)?;
        Ok(Signing {
            ca: Arc::new(ca),
            bundle: Arc::new(bundle),
            generation: self.current().generation + 1,
        })
    }

    /// Sets the expiry gauges and warns when the earliest root or the
    /// signing chain expires within [`EXPIRY_WARNING`].
    fn update_expiry(&self, signing: &Signing) {
        let root_expiry = earliest_expiry(signing.bundle.roots());
        let chain_expiry = signing.ca.not_after();
        let metrics = &self.inner.metrics;
        if let Some(root_expiry) = root_expiry {
            metrics
                .root_cert_expiry_timestamp
                .set(root_expiry.unix_timestamp());
        }
        metrics
            .cert_chain_expiry_timestamp
            .set(chain_expiry.unix_timestamp());
        warn_if_expiring(root_expiry, chain_expiry, self.dir());
    }

    /// The poller of the plug-in directory and the hourly expiry check,
    /// until `shutdown` fires.
    pub(crate) fn spawn_tasks(
        &self,
        mut shutdown: watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        let authority = self.clone();
        tokio::spawn(async move {
            let mut poll = tokio::time::interval(authority.inner.options.poll_interval);
            poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut expiry = tokio::time::interval(EXPIRY_CHECK_INTERVAL);
            expiry.tick().await;
            loop {
                tokio::select! {
                    _ = poll.tick() => {
                        // Errors are logged and counted by reload_if_changed.
                        let a = authority.clone();
                        let _ = tokio::task::spawn_blocking(move || a.reload_if_changed()).await;
                    }
                    _ = expiry.tick() => {
                        let current = authority.current();
                        authority.update_expiry(&current);
                    }
                    _ = shutdown.changed() => break,
                }
            }
        })
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding this lock leaves plain data behind: keep using it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn read_files(dir: &Path) -> Vec<Option<Vec<u8>>> {
    CA_FILES
        .iter()
        .map(|f| std::fs::read(dir.join(f)).ok())
        .collect()
}

/// Every root of `root-cert.pem` plus the root of the signing chain.
fn bundle_of(ca: &CertificateAuthority, dir: &Path) -> Result<TrustBundle, AuthorityError> {
    let roots = ca
        .trusted_roots()
        .iter()
        .chain(std::iter::once(ca.root()))
        .cloned();
    TrustBundle::from_roots(roots).map_err(|e| AuthorityError::Bundle {
        path: dir.join(ROOT_CERT_FILE),
        reason: e.to_string(),
    })
}

fn create_self_signed(dir: &Path, trust_domain: Option<TrustDomain>) -> Result<(), AuthorityError> {
    let trust_domain = trust_domain.unwrap_or_else(TrustDomain::istio_default);
    let opts = CaOptions {
        organization: trust_domain.to_string(),
        trust_domain,
        common_name: Some("meshward control plane root CA".to_owned()),
        key_type: KeyType::EcP256,
        lifetime: DEFAULT_ROOT_LIFETIME,
    };
    let create_err = |reason: String| AuthorityError::Create {
        dir: dir.to_owned(),
        reason,
    };
    let root = RootCa::generate(&opts).map_err(|e| create_err(e.to_string()))?;
    let material = CaMaterial {
        ca_cert: root.cert().clone(),
        ca_key_pem: root.key_pem(),
        root_cert: root.cert().clone(),
        chain: vec![root.cert().clone()],
    };
    material
        .write_dir(dir, false)
        .map_err(|e| create_err(e.to_string()))?;
    tracing::info!(
        state.dir = %dir.display(),
        not_after = %root.not_after(),
        "created a self-signed root (kept for later starts)"
    );
    Ok(())
}

/// The earliest `notAfter` of `certs` (unparseable ones are skipped: the
/// bundle was validated when it was built).
pub(crate) fn earliest_expiry(
    certs: &[rustls_pki_types::CertificateDer<'_>],
) -> Option<OffsetDateTime> {
    certs
        .iter()
        .filter_map(|c| x509_parser::certificate::X509Certificate::from_der(c).ok())
        .map(|(_, c)| c.validity().not_after.to_datetime())
        .min()
}

fn warn_if_expiring(root: Option<OffsetDateTime>, chain: OffsetDateTime, dir: &Path) {
    let now = OffsetDateTime::now_utc();
    let horizon = now + EXPIRY_WARNING;
    if let Some(root) = root
        && root < horizon
    {
        tracing::warn!(
            ca.dir = %dir.display(),
            not_after = %root,
            days_left = (root - now).whole_days(),
            "a root of the trust bundle expires within 30 days: rotate the root"
        );
    }
    if chain < horizon {
        tracing::warn!(
            ca.dir = %dir.display(),
            not_after = %chain,
            days_left = (chain - now).whole_days(),
            "the signing CA certificate expires within 30 days: replace ca-cert.pem, ca-key.pem and cert-chain.pem"
        );
    }
}
