//! Where the proxy's configuration and credentials come from: the one seam
//! between whatever provides them (files on disk today, an in-process
//! source in tests, the control plane next) and the proxy that enforces
//! them.
//!
//! A source publishes on three [`tokio::sync::watch`] channels, bundled as
//! a [`Feed`]:
//! - `config`: the validated mesh resources ([`ConfigUpdate`]);
//! - `credentials`: the workload's certificate chain, key and trust bundle
//!   ([`Credentials`]);
//! - `files`: the contents of the local files DestinationRules name
//!   (`caCertificates`, `clientCertificate`, `privateKey`; [`LocalFiles`]),
//!   which Istio's agent serves its sidecar over SDS.
//!
//! Each publication is a [`Published`]: new content with the source's
//! revision, or a problem (the source is lost, holds a change back, or
//! refuses what it found), after which the proxy keeps what it has. The
//! proxy never opens a file: its applier (`apply.rs`) takes each publication,
//! validates and compiles it, swaps it in atomically, re-checks open
//! connections and reconciles listeners. A source only has to publish.

pub mod control;
pub mod files;
#[cfg(any(test, feature = "test-util"))]
pub mod memory;
mod scan;
mod status;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use meshward_config::ConfigSet;
use meshward_identity::{TrustBundle, WorkloadCredentials};
use tokio::sync::watch;

pub(crate) use status::Sources;
pub use status::{Source, SourceState};

/// The mesh resources a source found valid, with the warnings of their
/// validation (logged when applied).
#[derive(Debug)]
pub struct ConfigUpdate {
    pub config: ConfigSet,
    pub warnings: Vec<String>,
    /// Where the proxy says whether it applied this update, for a source
    /// that answers for it (the control plane's ACK or NACK); `None` for
    /// the others.
    pub outcome: Option<Outcome>,
}

impl From<meshward_config::Loaded> for ConfigUpdate {
    fn from(loaded: meshward_config::Loaded) -> ConfigUpdate {
        ConfigUpdate {
            warnings: loaded.warnings.warnings().map(|w| w.to_string()).collect(),
            config: loaded.config,
            outcome: None,
        }
    }
}

/// Whether the proxy applied a configuration update: the configuration
/// version it made, or why it refused it. An update superseded before the
/// proxy took it up reports nothing (the receiver sees the sender dropped).
pub type Applied = Result<u64, String>;

/// The proxy's end of an update's [`Applied`] report.
pub struct Outcome(std::sync::Mutex<Option<tokio::sync::oneshot::Sender<Applied>>>);

impl Outcome {
    /// An outcome to attach to an update, and where its report arrives.
    pub fn new() -> (Outcome, tokio::sync::oneshot::Receiver<Applied>) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        (Outcome(std::sync::Mutex::new(Some(tx))), rx)
    }

    /// Reports the outcome (once; later reports are ignored).
    pub(crate) fn report(&self, applied: Applied) {
        let sender = self.0.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(tx) = sender {
            // The source may have stopped waiting.
            let _ = tx.send(applied);
        }
    }
}

impl std::fmt::Debug for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outcome").finish_non_exhaustive()
    }
}

/// The workload's credentials: its certificate chain and key, and the
/// roots it trusts.
#[derive(Debug)]
pub struct Credentials {
    pub credentials: WorkloadCredentials,
    pub bundle: TrustBundle,
}

/// Local files by the path a DestinationRule names them by: their bytes,
/// or why they could not be read.
pub type LocalFiles = BTreeMap<String, Result<Arc<[u8]>, String>>;

/// One publication of a source.
#[derive(Debug)]
pub enum Published<T> {
    /// Nothing yet: a source still connecting. The proxy starts once
    /// every channel has content.
    Pending,
    /// New content; `revision` grows with each publication.
    Update { revision: u64, content: Arc<T> },
    /// The source cannot provide content now (`state`: lost, held or
    /// refused, never ok); the proxy keeps what it has.
    Problem {
        revision: u64,
        state: SourceState,
        error: String,
    },
}

impl<T> Published<T> {
    /// The publication's revision (0 while pending).
    pub fn revision(&self) -> u64 {
        match self {
            Published::Pending => 0,
            Published::Update { revision, .. } | Published::Problem { revision, .. } => *revision,
        }
    }
}

// Not derived: `T` need not be `Clone` behind its `Arc`.
impl<T> Clone for Published<T> {
    fn clone(&self) -> Self {
        match self {
            Published::Pending => Published::Pending,
            Published::Update { revision, content } => Published::Update {
                revision: *revision,
                content: Arc::clone(content),
            },
            Published::Problem {
                revision,
                state,
                error,
            } => Published::Problem {
                revision: *revision,
                state: *state,
                error: error.clone(),
            },
        }
    }
}

/// What a source says of itself, for `/config_dump`.
#[derive(Debug, Clone)]
pub struct SourceInfo {
    /// `files`, `memory`, ...
    pub kind: &'static str,
    /// Where configuration comes from (paths, an address).
    pub config: Vec<String>,
    /// Where credentials come from.
    pub credentials: Vec<String>,
    /// Whether changes are followed after the first load.
    pub watched: bool,
    /// How often a source that polls looks again.
    pub rescan: Option<Duration>,
}

/// The receiving ends of a source's channels, and what keeps the source
/// running (dropped with the proxy).
#[derive(Debug)]
pub struct Feed {
    pub config: watch::Receiver<Published<ConfigUpdate>>,
    pub credentials: watch::Receiver<Published<Credentials>>,
    pub files: watch::Receiver<Arc<LocalFiles>>,
    pub info: SourceInfo,
    pub(crate) guard: Option<Box<dyn std::fmt::Debug + Send + Sync>>,
    /// Where the proxy says its admin listener's bound address, for a
    /// source that reports it (the control plane shows it).
    pub(crate) admin: Arc<OnceLock<SocketAddr>>,
}

/// The sending ends, for a source's implementation.
#[derive(Debug)]
pub struct Publisher {
    config: watch::Sender<Published<ConfigUpdate>>,
    credentials: watch::Sender<Published<Credentials>>,
    files: watch::Sender<Arc<LocalFiles>>,
    revision: std::sync::atomic::AtomicU64,
    admin: Arc<OnceLock<SocketAddr>>,
}

impl Publisher {
    /// A publisher and the feed it publishes to; every channel starts
    /// [`Published::Pending`] (files: none).
    pub fn new(info: SourceInfo) -> (Publisher, Feed) {
        let (config, config_rx) = watch::channel(Published::Pending);
        let (credentials, credentials_rx) = watch::channel(Published::Pending);
        let (files, files_rx) = watch::channel(Arc::new(LocalFiles::new()));
        let admin = Arc::new(OnceLock::new());
        (
            Publisher {
                config,
                credentials,
                files,
                revision: std::sync::atomic::AtomicU64::new(0),
                admin: Arc::clone(&admin),
            },
            Feed {
                config: config_rx,
                credentials: credentials_rx,
                files: files_rx,
                info,
                guard: None,
                admin,
            },
        )
    }

    fn next_revision(&self) -> u64 {
        self.revision
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1
    }

    pub fn config(&self, update: ConfigUpdate) {
        let revision = self.next_revision();
        self.config.send_replace(Published::Update {
            revision,
            content: Arc::new(update),
        });
    }

    pub fn credentials(&self, update: Credentials) {
        let revision = self.next_revision();
        self.credentials.send_replace(Published::Update {
            revision,
            content: Arc::new(update),
        });
    }

    /// Publishes the files' contents, if they differ from the last ones.
    pub fn files(&self, files: LocalFiles) {
        self.files.send_if_modified(|current| {
            if **current == files {
                false
            } else {
                *current = Arc::new(files);
                true
            }
        });
    }

    /// Says `source` cannot provide content now.
    pub fn problem(&self, source: Source, state: SourceState, error: String) {
        debug_assert!(state != SourceState::Ok);
        let revision = self.next_revision();
        match source {
            Source::Config => {
                self.config.send_replace(Published::Problem {
                    revision,
                    state,
                    error,
                });
            }
            Source::Certs => {
                self.credentials.send_replace(Published::Problem {
                    revision,
                    state,
                    error,
                });
            }
        }
    }

    /// The proxy's admin listener as bound, once it is (`None` before, and
    /// for a proxy without one).
    pub fn admin_address(&self) -> Option<SocketAddr> {
        self.admin.get().copied()
    }

    /// Whether the proxy still listens (it has not been dropped).
    pub fn is_closed(&self) -> bool {
        self.config.is_closed()
    }
}

impl Feed {
    /// Keeps `guard` (the source's thread or task handle) alive as long as
    /// the proxy.
    pub fn with_guard(mut self, guard: impl std::fmt::Debug + Send + Sync + 'static) -> Feed {
        self.guard = Some(Box::new(guard));
        self
    }
}
