//! The meshward control plane (`meshward control`): it watches a config
//! source, runs the mesh CA, and serves two gRPC services over TLS:
//! - Istio's `istio.v1.auth.IstioCertificateService/CreateCertificate`,
//!   which signs a workload's CSR for exactly the identity it proved (a
//!   bootstrap token for the first certificate, its current mesh
//!   certificate for a renewal);
//! - `meshward.control.v1.ConfigDiscoveryService/StreamConfig`, one stream
//!   per proxy, pushing a versioned snapshot of what that workload needs
//!   (its documents, the mesh settings, the trust bundle), which the proxy
//!   ACKs or NACKs.
//!
//! It keeps no state besides its CA material and its source: several
//! replicas over the same plug-in CA and config directory serve the same
//! identities and configuration.

#![forbid(unsafe_code)]

pub mod admin;
pub mod authority;
pub mod ca_service;
pub mod configz;
pub mod metrics;
pub mod peer;
pub mod push;
pub mod registry;
pub mod server;
pub mod snapshot;
pub mod source;
pub mod tls;
pub mod token;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use meshward_identity::ca::{DEFAULT_MAX_WORKLOAD_TTL, DEFAULT_WORKLOAD_TTL};
use meshward_identity::{SpiffeId, TrustDomain};
use tokio::sync::watch;

pub use authority::{Authority, AuthorityError, AuthorityOptions, CaSource};
pub use ca_service::{CaService, Lifetimes, RateLimit};
pub use configz::{Configz, ConfigzDocument, ConfigzError};
pub use metrics::Metrics;
pub use peer::PeerInfo;
pub use push::ConfigService;
pub use registry::Registry;
pub use server::{Limits, ServerNames};
pub use source::ConfigSource;

/// istiod's gRPC port (XDS and CA over TLS).
pub const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 15012);
/// istiod's monitoring port.
pub const DEFAULT_ADMIN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 15014);
/// The control plane's own namespace and service account (Istio's).
pub const DEFAULT_IDENTITY: (&str, &str) = ("istio-system", "istiod");
/// How often a plug-in CA directory is compared with what was loaded.
pub const DEFAULT_CA_POLL_INTERVAL: Duration = Duration::from_secs(2);

/// Everything `meshward control` is started with.
#[derive(Debug, Clone)]
pub struct Options {
    /// Config directories or files (the watched source).
    pub config: Vec<PathBuf>,
    /// Mesh settings file.
    pub mesh_config: Option<PathBuf>,
    /// Where the CA material comes from.
    pub ca: CaSource,
    /// The trust domain; `None`: the CA certificate's, else `cluster.local`.
    pub trust_domain: Option<TrustDomain>,
    /// The gRPC listener (`127.0.0.1:0` for an ephemeral port).
    pub listen: SocketAddr,
    /// The admin listener (readiness, debug, metrics).
    pub admin: SocketAddr,
    /// The control plane's own namespace and service account.
    pub identity: (String, String),
    /// Extra SANs (DNS names or IPs) of the server certificate.
    pub sans: Vec<String>,
    /// Leaf lifetime when a request asks for none.
    pub default_cert_ttl: Duration,
    /// Requested leaf lifetimes are capped to this.
    pub max_cert_ttl: Duration,
    /// How often the plug-in CA directory is re-read.
    pub ca_poll_interval: Duration,
    /// CSR rate per caller.
    pub rate_limit: RateLimit,
    /// Listener bounds.
    pub limits: Limits,
}

impl Options {
    /// Defaults (Istio's where Istio has them) for a CA source.
    pub fn new(ca: CaSource) -> Self {
        Self {
            config: Vec::new(),
            mesh_config: None,
            ca,
            trust_domain: None,
            listen: DEFAULT_LISTEN,
            admin: DEFAULT_ADMIN,
            identity: (DEFAULT_IDENTITY.0.to_owned(), DEFAULT_IDENTITY.1.to_owned()),
            sans: Vec::new(),
            default_cert_ttl: DEFAULT_WORKLOAD_TTL,
            max_cert_ttl: DEFAULT_MAX_WORKLOAD_TTL,
            ca_poll_interval: DEFAULT_CA_POLL_INTERVAL,
            rate_limit: RateLimit::default(),
            limits: Limits::default(),
        }
    }

    /// The options of the CA material alone (also what `meshward control
    /// token` loads).
    pub fn authority(&self) -> AuthorityOptions {
        AuthorityOptions {
            source: self.ca.clone(),
            trust_domain: self.trust_domain.clone(),
            default_cert_ttl: self.default_cert_ttl,
            max_cert_ttl: self.max_cert_ttl,
            poll_interval: self.ca_poll_interval,
        }
    }
}

/// Why the control plane did not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The CA material.
    #[error(transparent)]
    Authority(#[from] AuthorityError),
    /// `--identity` does not form a SPIFFE ID.
    #[error("control plane identity {namespace}/{service_account}: {reason}")]
    Identity {
        /// Namespace.
        namespace: String,
        /// Service account.
        service_account: String,
        /// Why.
        reason: String,
    },
    /// The server certificate.
    #[error(transparent)]
    ServerCert(#[from] server::ServerCertError),
    /// The config source's first load.
    #[error("configuration: {0}")]
    Config(#[from] source::SourceError),
    /// The gRPC or admin listener.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// A running control plane; dropping it stops everything.
#[derive(Debug)]
pub struct ControlPlane {
    grpc_addr: SocketAddr,
    identity: SpiffeId,
    authority: Authority,
    admin_addr: SocketAddr,
    metrics: Arc<Metrics>,
    registry: Arc<Registry>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    _source: ConfigSource,
}

impl ControlPlane {
    /// The bound gRPC address.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// The bound admin address (readiness, metrics, debug).
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// Every proxy that subscribed, with its state.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// The control plane's own SPIFFE ID (its server certificate's).
    pub fn identity(&self) -> &SpiffeId {
        &self.identity
    }

    /// The CA material and trust bundle.
    pub fn authority(&self) -> &Authority {
        &self.authority
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Stops accepting, lets the server finish, and waits for every task.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        for task in std::mem::take(&mut self.tasks) {
            let _ = task.await;
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Loads the configuration and the CA, issues the control plane's
/// certificate, binds the gRPC and admin listeners and serves.
pub async fn start(options: Options) -> Result<ControlPlane, StartError> {
    // The effective configuration (it holds no secrets: paths and limits).
    tracing::info!(
        ca = ?options.ca,
        trust_domain = ?options.trust_domain,
        listen = %options.listen,
        admin = %options.admin,
        identity = %format_args!("{}/{}", options.identity.0, options.identity.1),
        sans = ?options.sans,
        default_cert_ttl = ?options.default_cert_ttl,
        max_cert_ttl = ?options.max_cert_ttl,
        rate_limit = ?options.rate_limit,
        limits = ?options.limits,
        "starting the control plane"
    );
    let metrics = Arc::new(Metrics::new());
    let (source, snapshots) = {
        let (config, mesh_config, metrics) = (
            options.config.clone(),
            options.mesh_config.clone(),
            metrics.clone(),
        );
        tokio::task::spawn_blocking(move || ConfigSource::start(config, mesh_config, metrics))
            .await
            .map_err(|e| {
                StartError::Config(source::SourceError::Thread(std::io::Error::other(
                    e.to_string(),
                )))
            })??
    };
    let authority_options = options.authority();
    let authority = {
        let metrics = metrics.clone();
        // Reading files and generating a root: off the async threads.
        tokio::task::spawn_blocking(move || Authority::load(authority_options, metrics))
            .await
            .map_err(|e| {
                StartError::Authority(AuthorityError::Create {
                    dir: PathBuf::new(),
                    reason: format!("loader task failed: {e}"),
                })
            })??
    };
    let (namespace, service_account) = options.identity.clone();
    let identity = SpiffeId::workload(authority.trust_domain(), &namespace, &service_account)
        .map_err(|e| StartError::Identity {
            namespace,
            service_account,
            reason: e.to_string(),
        })?;

    let listener = tokio::net::TcpListener::bind(options.listen)
        .await
        .map_err(|source| StartError::Bind {
            addr: options.listen,
            source,
        })?;
    let grpc_addr = listener.local_addr().map_err(|source| StartError::Bind {
        addr: options.listen,
        source,
    })?;
    let names = ServerNames::for_listener(grpc_addr, &options.sans);
    let tls = Arc::new(server::ServerTls::issue(&authority, &identity, &names)?);

    let (shutdown, shutdown_rx) = watch::channel(false);
    let mut tasks = vec![authority.spawn_tasks(shutdown_rx.clone())];
    tasks.push(tls.clone().spawn_renewal(
        authority.clone(),
        identity.clone(),
        names,
        shutdown_rx.clone(),
    ));

    let registry = Arc::new(Registry::new(metrics.clone()));
    let admin_listener = tokio::net::TcpListener::bind(options.admin)
        .await
        .map_err(|source| StartError::Bind {
            addr: options.admin,
            source,
        })?;
    let admin_addr = admin_listener
        .local_addr()
        .map_err(|source| StartError::Bind {
            addr: options.admin,
            source,
        })?;
    let readiness = admin::Readiness::new();
    readiness.config_loaded(snapshots.clone());
    let serving = readiness.condition("grpc");
    {
        let serve = admin::serve(admin_listener, registry.clone(), metrics.clone(), readiness);
        let mut stop = shutdown_rx.clone();
        tasks.push(tokio::spawn(async move {
            tokio::select! {
                () = serve => {}
                _ = stop.wait_for(|s| *s) => {}
            }
        }));
    }

    // Every gRPC service is added here.
    let mut routes = tonic::service::RoutesBuilder::default();
    routes.add_service(
        ConfigService::new(
            snapshots,
            authority.bundle(),
            authority.trust_domain().clone(),
            registry.clone(),
            metrics.clone(),
        )
        .into_server(),
    );
    routes.add_service(
        CaService::new(
            authority.clone(),
            metrics.clone(),
            Lifetimes {
                default_ttl: options.default_cert_ttl,
                max_ttl: options.max_cert_ttl,
            },
            options.rate_limit,
        )
        .into_server(),
    );
    tasks.push(server::spawn(
        listener,
        routes.routes(),
        tls,
        options.limits,
        shutdown_rx,
    ));
    serving.set(true);
    tracing::info!(grpc = %grpc_addr, admin = %admin_addr, identity = %identity, "control plane serving");
    Ok(ControlPlane {
        grpc_addr,
        identity,
        authority,
        admin_addr,
        metrics,
        registry,
        shutdown,
        tasks,
        _source: source,
    })
}
