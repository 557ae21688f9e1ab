//! The proxy's live state: the current snapshot and TLS material, each
//! swapped atomically on change. They are built from what a source
//! publishes ([`crate::source`]); the state never opens a file. A change
//! that cannot be applied is refused and the old state is kept.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use meshward_identity::verify::{Side, SvidError, TrustDomains};
use meshward_identity::{
    CredentialResolver, SpiffeId, SpiffeServerVerifier, SvidVerifier, TrustBundle, TrustDomain,
    WorkloadCredentials,
};
use rustls::{ClientConfig, ServerConfig};

use crate::conns::Conns;
use crate::snapshot::Snapshot;
use crate::source::{ConfigUpdate, Credentials, LocalFiles, SourceInfo};
use crate::telemetry::Metrics;

/// ALPN values Istio sidecars use for mesh mTLS, then plain HTTP ones.
pub const MESH_ALPN: &[&[u8]] = &[b"istio-http/1.1", b"istio", b"http/1.1"];
/// ALPN offered towards HTTP/2 (gRPC) services.
pub const MESH_ALPN_H2: &[&[u8]] = &[b"istio-h2", b"h2"];
/// What the inbound mTLS server accepts.
pub const SERVER_ALPN: &[&[u8]] = &[
    b"h2",
    b"http/1.1",
    b"istio-h2",
    b"istio-http/1.1",
    b"istio-http/1.0",
    b"istio",
    b"istio-peer-exchange",
];

/// Why an update could not be applied (or, for the first one, why the
/// proxy cannot start); the proxy keeps its previous state.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::SnapshotError),
    #[error("certificate {got} does not belong to this workload ({expected})")]
    WrongIdentity { got: String, expected: String },
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("trust domain: {0}")]
    TrustDomain(String),
    /// The workload's own certificate cannot be used: expired, not yet
    /// valid, not chaining to the trust bundle, or not an SVID of an
    /// accepted trust domain. Peers would refuse it, so it is refused here.
    #[error("the workload certificate {id} cannot be used: {reason}")]
    OwnCertificate {
        id: String,
        reason: meshward_identity::verify::SvidError,
    },
}

/// Expected server identities and whether HTTP/2 is offered.
type ClientKey = (Vec<String>, bool);

/// TLS material derived from the certificate directory and the mesh's
/// trust domains.
#[derive(Debug)]
pub struct TlsState {
    pub credentials: Arc<WorkloadCredentials>,
    pub bundle: TrustBundle,
    pub server: Arc<ServerConfig>,
    verifier: SvidVerifier,
    resolver: CredentialResolver,
    /// Client configs per set of expected server identities.
    clients: Mutex<HashMap<ClientKey, Arc<ClientConfig>>>,
    /// When the credentials in use were installed: kept across rebuilds
    /// for a configuration change that leaves the certificate as it was
    /// (`/certs` shows it as `loaded_at`).
    pub loaded_at: std::time::SystemTime,
    /// Larger for a TLS state built later (in this process), so that
    /// the outbound side can tell the newer of two client configs apart
    /// (a certificate or trust bundle rotated in between).
    pub(crate) generation: u64,
}

/// The generation of the next [`TlsState`] built.
static TLS_GENERATION: AtomicU64 = AtomicU64::new(1);

impl TlsState {
    fn build(
        credentials: WorkloadCredentials,
        bundle: TrustBundle,
        domains: Vec<TrustDomain>,
    ) -> Result<TlsState, LoadError> {
        let verifier = SvidVerifier::new(bundle.clone(), TrustDomains::only(domains));
        // The certificate serves both sides of mTLS: check it as a peer
        // would, now, before anything uses it.
        let refused = |reason| LoadError::OwnCertificate {
            id: credentials.id().to_string(),
            reason,
        };
        let (leaf, intermediates) = credentials
            .chain()
            .split_first()
            .ok_or_else(|| refused(SvidError::NoCertificate))?;
        for side in [Side::Server, Side::Client] {
            verifier
                .verify_now(leaf, intermediates, side)
                .map_err(refused)?;
        }
        let resolver = CredentialResolver::fixed(credentials.clone());
        let mut server = meshward_identity::server_config(verifier.clone(), resolver.clone())?;
        server.alpn_protocols = SERVER_ALPN.iter().map(|p| p.to_vec()).collect();
        Ok(TlsState {
            credentials: Arc::new(credentials),
            bundle,
            server: Arc::new(server),
            verifier,
            resolver,
            clients: Mutex::new(HashMap::new()),
            loaded_at: std::time::SystemTime::now(),
            generation: TLS_GENERATION.fetch_add(1, Ordering::Relaxed),
        })
    }

    /// A mesh client config that accepts only servers presenting one of
    /// `identities` (secure naming), offering HTTP/2 or HTTP/1.1; cached.
    pub fn client_for(
        &self,
        identities: &[String],
        h2: bool,
    ) -> Result<Arc<ClientConfig>, LoadError> {
        let mut cache = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        let key = (identities.to_vec(), h2);
        if let Some(c) = cache.get(&key) {
            return Ok(Arc::clone(c));
        }
        let expected: Vec<SpiffeId> = identities
            .iter()
            .filter_map(|i| SpiffeId::parse(i).ok())
            .collect();
        // Secure naming: only these identities. An empty set accepts no server
        // (fail closed); the any-identity verifier is never used for mesh traffic.
        let server_verifier = SpiffeServerVerifier::expecting(self.verifier.clone(), expected);
        let mut config = meshward_identity::client_config(server_verifier, self.resolver.clone())?;
        let alpn = if h2 { MESH_ALPN_H2 } else { MESH_ALPN };
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let config = Arc::new(config);
        cache.insert(key, Arc::clone(&config));
        Ok(config)
    }
}

/// How long an idle connection to the local application is kept (as the
/// outbound side's pools keep theirs, and hyper's default).
const APP_POOL_IDLE: std::time::Duration = std::time::Duration::from_secs(90);

/// Everything a connection handler reads: lock-free loads of the current
/// snapshot and TLS state.
#[derive(Debug)]
pub struct State {
    /// This workload, `namespace/name` of its WorkloadEntry.
    pub workload: String,
    /// The command line's overrides of its annotations, applied to every
    /// snapshot.
    overrides: crate::Overrides,
    snapshot: ArcSwap<Snapshot>,
    tls: ArcSwap<TlsState>,
    version: AtomicU64,
    ready: AtomicBool,
    pub metrics: Arc<Metrics>,
    /// Pooled HTTP/1.1 connections to the local application.
    pub app_client:
        hyper_util::client::legacy::Client<crate::connect::AppConnector, crate::http::Body>,
    /// The same over cleartext HTTP/2 (prior knowledge), for gRPC ports.
    pub app_client_h2:
        hyper_util::client::legacy::Client<crate::connect::AppConnector, crate::http::Body>,
    /// The connector of both, whose connect timeout follows the
    /// snapshot's `app_connect_timeout`.
    app_connector: crate::connect::AppConnector,
    /// Open inbound TCP connections, re-checked when policy changes.
    pub tcp_conns: Conns,
    /// The inbound flow table (`/debug/flows`).
    pub flows: crate::flows::Flows,
    /// The shutdown signal every data-plane connection follows
    /// ([`crate::drain`]).
    pub drain: crate::drain::Drain,
    /// How long a connection may sit idle ([`crate::idle`]).
    pub idle_timeout: std::time::Duration,
    /// The keys of the `jwksUri`s the configuration names, kept across
    /// reloads ([`crate::jwt::JwksStore::run`] fetches them).
    pub jwks: Arc<crate::jwt::JwksStore>,
    /// Client configs from the files DestinationRules name (SIMPLE,
    /// MUTUAL), kept across reloads and built again when the source
    /// publishes new contents.
    pub dr_files: crate::dr_tls::DrFiles,
    /// The addresses of the DNS names of `DNS` and `DNS_ROUND_ROBIN`
    /// services, kept across reloads ([`crate::dns::DnsStore::run`]
    /// looks them up).
    pub dns: Arc<crate::dns::DnsStore>,
    /// Whether what runs is what the sources say ([`crate::apply`] keeps
    /// it).
    pub sources: crate::source::Sources,
    /// The credentials last published, even if refused: a configuration
    /// change (a new trust domain) may make them usable.
    published_credentials: Mutex<Arc<Credentials>>,
}

impl State {
    /// The state for a source's first configuration, credentials and
    /// files; any failure here stops the proxy from starting.
    pub fn new(
        workload: String,
        first: (&ConfigUpdate, Arc<Credentials>, Arc<LocalFiles>),
        info: &SourceInfo,
        metrics: Arc<Metrics>,
        idle_timeout: std::time::Duration,
        dns: crate::dns::DnsConfig,
        overrides: crate::Overrides,
    ) -> Result<Arc<State>, LoadError> {
        let (config, credentials, files) = first;
        let jwks = Arc::new(crate::jwt::JwksStore::default());
        let dns = Arc::new(crate::dns::DnsStore::new(dns));
        let snapshot = build_snapshot((&workload, &overrides), config, 1, &jwks, &dns)?;
        let tls = tls_with(&credentials, &snapshot)?;
        metrics.cert_in_use(credentials.credentials.not_after());
        // Unusable files do not stop the proxy: their DestinationRule's
        // requests fail (503) naming the file, as they are logged here.
        let dr_files = crate::dr_tls::DrFiles::default();
        dr_files.set_files(files);
        dr_files.sync(&snapshot, &metrics);
        let app_connector = crate::connect::AppConnector::new(snapshot.app_connect_timeout);
        // The first configuration is applied (version 1).
        if let Some(outcome) = &config.outcome {
            outcome.report(Ok(1));
        }
        Ok(Arc::new(State {
            snapshot: ArcSwap::from_pointee(snapshot),
            tls: ArcSwap::from_pointee(tls),
            version: AtomicU64::new(1),
            ready: AtomicBool::new(false),
            metrics,
            // With a timer, hyper closes connections to the application
            // idle for `APP_POOL_IDLE` (without one it only skips them when
            // a request asks for a connection again, so they stayed open).
            app_client: hyper_util::client::legacy::Client::builder(
                hyper_util::rt::TokioExecutor::new(),
            )
            .pool_timer(hyper_util::rt::TokioTimer::new())
            .pool_idle_timeout(APP_POOL_IDLE)
            .build(app_connector.clone()),
            app_client_h2: hyper_util::client::legacy::Client::builder(
                hyper_util::rt::TokioExecutor::new(),
            )
            .pool_timer(hyper_util::rt::TokioTimer::new())
            .pool_idle_timeout(APP_POOL_IDLE)
            .http2_only(true)
            .build(app_connector.clone()),
            app_connector,
            tcp_conns: Conns::default(),
            flows: crate::flows::Flows::default(),
            drain: crate::drain::Drain::new(),
            idle_timeout,
            jwks,
            dr_files,
            dns,
            sources: crate::source::Sources::new(info),
            workload,
            overrides,
            published_credentials: Mutex::new(credentials),
        }))
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    pub fn tls(&self) -> Arc<TlsState> {
        self.tls.load_full()
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Why the proxy is not ready, if it is not: still starting, draining
    /// before it exits (as Envoy's `/healthcheck/fail`), or its
    /// certificate has expired (or is not valid yet) since it was loaded.
    /// A proxy whose certificate peers would refuse serves nothing useful.
    pub fn not_ready(&self) -> Option<String> {
        if !self.is_ready() {
            return Some("starting".to_string());
        }
        if self.drain.is_draining() {
            return Some("draining".to_string());
        }
        let tls = self.tls();
        let c = &tls.credentials;
        let now = std::time::SystemTime::now();
        let at = |t: std::time::SystemTime| {
            time::OffsetDateTime::from(t)
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default()
        };
        if now >= c.not_after() {
            Some(format!(
                "the workload certificate {} expired at {}",
                c.id(),
                at(c.not_after())
            ))
        } else if now < c.not_before() {
            Some(format!(
                "the workload certificate {} is not valid before {}",
                c.id(),
                at(c.not_before())
            ))
        } else {
            None
        }
    }

    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    /// Applies a published configuration: compiles it, then swaps it in
    /// with TLS for it; on failure the current snapshot stays. Returns the
    /// new snapshot (its `version` is the configuration version).
    pub fn apply_config(&self, update: &ConfigUpdate) -> Result<Arc<Snapshot>, LoadError> {
        let version = self.version.load(Ordering::Acquire) + 1;
        let snapshot = build_snapshot(
            (&self.workload, &self.overrides),
            update,
            version,
            &self.jwks,
            &self.dns,
        )?;
        // The trust domain may have changed: rebuild TLS for the new
        // snapshot, with the credentials last published, or else with the
        // certificate in use.
        let published = Arc::clone(
            &self
                .published_credentials
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        );
        let current = self.tls();
        let mut tls = match tls_with(&published, &snapshot) {
            Ok(tls) => tls,
            Err(refused) => {
                // The credentials last published cannot be used (half
                // rotated, refused: the certificate source reports why). A
                // policy change must not wait for them: the certificate in
                // use goes on serving if it still fits the new
                // configuration (identity, trust domains).
                let in_use = Credentials {
                    credentials: (*current.credentials).clone(),
                    bundle: current.bundle.clone(),
                };
                tls_with(&in_use, &snapshot).map_err(|_| refused)?
            }
        };
        // The same certificate rebuilt for a new configuration keeps the
        // time it was installed.
        if tls.credentials.chain() == current.credentials.chain() {
            tls.loaded_at = current.loaded_at;
        }
        // DestinationRule files: load new ones (their problems are
        // theirs; they never refuse the configuration).
        self.dr_files.sync(&snapshot, &self.metrics);
        self.version.store(version, Ordering::Release);
        let snapshot = Arc::new(snapshot);
        self.snapshot.store(Arc::clone(&snapshot));
        self.tls.store(Arc::new(tls));
        self.app_connector.set_timeout(snapshot.app_connect_timeout);
        self.dns.forget_unused();
        Ok(snapshot)
    }

    /// Applies published credentials; on failure the current ones stay.
    pub fn apply_credentials(&self, credentials: Arc<Credentials>) -> Result<(), LoadError> {
        *self
            .published_credentials
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Arc::clone(&credentials);
        let tls = tls_with(&credentials, &self.snapshot())?;
        self.tls.store(Arc::new(tls));
        self.metrics
            .cert_in_use(credentials.credentials.not_after());
        Ok(())
    }

    /// Applies the published contents of the files DestinationRules name;
    /// a change that cannot be used is refused (logged, counted) and the
    /// previous client config stays.
    pub fn apply_files(&self, files: Arc<LocalFiles>) {
        self.dr_files.set_files(files);
        self.dr_files.refresh(&self.metrics);
    }
}

fn build_snapshot(
    (workload, overrides): (&str, &crate::Overrides),
    update: &ConfigUpdate,
    version: u64,
    jwks: &crate::jwt::JwksStore,
    dns: &crate::dns::DnsStore,
) -> Result<Snapshot, LoadError> {
    for w in &update.warnings {
        tracing::warn!(target: "meshward::config", "{w}");
    }
    Ok(Snapshot::build_with(
        Arc::new(update.config.clone()),
        workload,
        version,
        (jwks, dns),
        overrides,
    )?)
}

/// TLS for `snapshot` with these credentials and roots: they must be of
/// its workload's identity and one of its trust domains.
fn tls_with(c: &Credentials, snapshot: &Snapshot) -> Result<TlsState, LoadError> {
    let credentials = &c.credentials;
    if credentials.id().as_str() != snapshot.identity {
        return Err(LoadError::WrongIdentity {
            got: credentials.id().to_string(),
            expected: snapshot.identity.clone(),
        });
    }
    let mesh = &snapshot.config.mesh;
    let mut domains = Vec::new();
    for td in std::iter::once(&mesh.trust_domain).chain(&mesh.trust_domain_aliases) {
        domains.push(TrustDomain::new(td).map_err(|e| LoadError::TrustDomain(e.to_string()))?);
    }
    TlsState::build(credentials.clone(), c.bundle.clone(), domains)
}
