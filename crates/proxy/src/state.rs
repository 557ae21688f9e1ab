//! The proxy's live state: the current snapshot and TLS material, each
//! swapped atomically on change, and the loaders that build them from the
//! static bootstrap (a config directory and a certificate directory). A
//! change that fails to load is refused and the old state is kept.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use meshward_config::{Loaded, Loader};
use meshward_identity::verify::{Side, SvidError, TrustDomains};
use meshward_identity::{
    CredentialResolver, SpiffeId, SpiffeServerVerifier, SvidVerifier, TrustBundle, TrustDomain,
    WorkloadCredentials,
};
use rustls::{ClientConfig, ServerConfig};

use crate::snapshot::Snapshot;
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

/// Where the proxy reads its configuration and certificates.
#[derive(Debug, Clone)]
pub struct Bootstrap {
    /// Files or directories of mesh resources.
    pub config_paths: Vec<PathBuf>,
    pub mesh_config: Option<PathBuf>,
    /// This workload, `namespace/name` of its WorkloadEntry.
    pub workload: String,
    /// `key.pem`, `cert-chain.pem`, `root-cert.pem`.
    pub certs_dir: PathBuf,
}

/// Why a load failed; the proxy keeps its previous state.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    #[error("invalid configuration:\n{0}")]
    Config(meshward_config::Diagnostics),
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::SnapshotError),
    #[error("certificates: {0}")]
    Credentials(#[from] meshward_identity::CredentialsFileError),
    #[error("trust bundle: {0}")]
    Bundle(#[from] meshward_identity::bundle::BundleError),
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
    /// A configuration file (or directory) that held documents at the
    /// last load holds none now. A writer that truncates, then writes,
    /// leaves such a file for a moment, and applying it would drop its
    /// policies; so the change waits until the file has content again or
    /// is deleted (which removes its resources).
    #[error(
        "{} is empty but held {documents} document(s) at the last load; taken for {} being written, the change waits until it has content again{}",
        path.display(),
        if *directory { "a directory" } else { "a file" },
        if *directory { "" } else { " or is deleted (deleting it removes its resources)" }
    )]
    Held {
        path: PathBuf,
        documents: usize,
        directory: bool,
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
}

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

/// Everything a connection handler reads: lock-free loads of the current
/// snapshot and TLS state.
#[derive(Debug)]
pub struct State {
    pub bootstrap: Bootstrap,
    snapshot: ArcSwap<Snapshot>,
    tls: ArcSwap<TlsState>,
    version: AtomicU64,
    ready: AtomicBool,
    pub metrics: Arc<Metrics>,
    /// Pooled HTTP/1.1 connections to the local application.
    pub app_client:
        hyper_util::client::legacy::Client<crate::connect::AppConnector, crate::http_in::Body>,
    /// The same over cleartext HTTP/2 (prior knowledge), for gRPC ports.
    pub app_client_h2:
        hyper_util::client::legacy::Client<crate::connect::AppConnector, crate::http_in::Body>,
    /// The connector of both, whose connect timeout follows the
    /// snapshot's `app_connect_timeout`.
    app_connector: crate::connect::AppConnector,
    /// Open inbound TCP connections, re-checked when policy changes.
    pub tcp_conns: TcpTracker,
    /// How long a connection may sit idle ([`crate::idle`]).
    pub idle_timeout: std::time::Duration,
    /// The keys of the `jwksUri`s the configuration names, kept across
    /// reloads ([`crate::jwt::JwksStore::run`] fetches them).
    pub jwks: Arc<crate::jwt::JwksStore>,
    /// Client configs from the files DestinationRules name (SIMPLE,
    /// MUTUAL), kept across reloads and re-read when the files change.
    pub dr_files: crate::dr_tls::DrFiles,
    /// The addresses of the DNS names of `DNS` and `DNS_ROUND_ROBIN`
    /// services, kept across reloads ([`crate::dns::DnsStore::run`]
    /// looks them up).
    pub dns: Arc<crate::dns::DnsStore>,
    /// Whether the configuration and certificate files can be read, and
    /// whether what runs is what they say ([`crate::watch`] keeps it).
    pub sources: crate::source::Sources,
    /// How many documents each configuration file held at the last
    /// successful load, to tell an emptied file ([`LoadError::Held`]).
    documents: Mutex<BTreeMap<String, usize>>,
}

/// An open inbound connection's facts and the signal that closes it.
#[derive(Debug)]
struct Tracked {
    principal: Option<String>,
    peer: std::net::IpAddr,
    local: std::net::IpAddr,
    port: u16,
    sni: Option<String>,
    /// The request that opened a tunnel (a WebSocket), decided again as
    /// it was decided then.
    http: Option<TrackedRequest>,
    /// The external authorization provider that let it through.
    ext_approved: Option<String>,
    close: Arc<tokio::sync::Notify>,
}

/// The request behind a tunnel: its head, and the host and path its
/// decision saw.
#[derive(Debug)]
pub struct TrackedRequest {
    pub head: crate::h1::codec::RequestHead,
    pub host: String,
    pub path: String,
    /// The facts of its valid JWT, if it carried one.
    pub auth: Option<meshward_policy::JwtAuth>,
}

/// The open inbound TCP connections and WebSocket tunnels. A
/// configuration change re-decides each one and closes those no longer
/// allowed, so a revoked permission does not live on in a long-lived
/// connection.
#[derive(Debug, Default)]
pub struct TcpTracker {
    next: AtomicU64,
    conns: Mutex<HashMap<u64, Tracked>>,
}

impl TcpTracker {
    /// Registers a connection (with `http`, the request of a tunnel;
    /// `ext_approved`, the external authorization provider that let it
    /// through, if a CUSTOM policy asked one); the returned `Notify` fires
    /// when it must close.
    pub fn track(
        &self,
        conn: &crate::inbound::Conn,
        http: Option<TrackedRequest>,
        ext_approved: Option<String>,
    ) -> (u64, Arc<tokio::sync::Notify>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let close = Arc::new(tokio::sync::Notify::new());
        let t = Tracked {
            principal: conn.principal().map(str::to_string),
            peer: conn.peer.ip(),
            local: conn.local.ip(),
            port: conn.port,
            sni: conn.sni.clone(),
            http,
            ext_approved,
            close: Arc::clone(&close),
        };
        self.conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, t);
        (id, close)
    }

    pub fn untrack(&self, id: u64) {
        self.conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
    }

    /// Re-decides every open connection against `snapshot`; returns how many
    /// were told to close.
    fn recheck(&self, snapshot: &Snapshot) -> usize {
        let conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        let mut closed = 0;
        for t in conns.values() {
            let headers = t.http.as_ref().map(|h| crate::h1::HeaderView(&h.head));
            let req = meshward_policy::Request {
                principal: t.principal.as_deref(),
                source_ip: t.peer,
                remote_ip: None,
                destination_ip: Some(t.local),
                port: t.port,
                sni: t.sni.as_deref(),
                http: t.http.as_ref().zip(headers.as_ref()).map(|(h, headers)| {
                    meshward_policy::HttpAttributes {
                        method: h.head.method(),
                        path: &h.path,
                        host: &h.host,
                        headers,
                        auth: h.auth.as_ref(),
                    }
                }),
            };
            let d = snapshot.policy.decide(&req);
            // A CUSTOM rule is satisfied by the provider that let the
            // handshake or connection through; one that now names another
            // provider is not (the proxy cannot ask it about a request or
            // connection long past).
            let approved = t.ext_approved.as_deref();
            let ext_ok = d
                .ext_authz
                .as_ref()
                .is_none_or(|x| approved == Some(x.provider.as_str()));
            if !(d.is_allowed() && ext_ok) {
                t.close.notify_one();
                closed += 1;
            }
        }
        closed
    }
}

impl State {
    /// Loads everything once; any failure here stops the proxy from
    /// starting. `watched`: whether the files will be watched for changes.
    pub fn load(
        bootstrap: Bootstrap,
        metrics: Arc<Metrics>,
        idle_timeout: std::time::Duration,
        dns: crate::dns::DnsConfig,
        watched: bool,
    ) -> Result<Arc<State>, LoadError> {
        let jwks = Arc::new(crate::jwt::JwksStore::default());
        let dns = Arc::new(crate::dns::DnsStore::new(dns));
        let loaded = load_config(&bootstrap)?;
        let documents = loaded.documents.clone();
        let snapshot = build_snapshot(&bootstrap, loaded, 1, &jwks, &dns)?;
        let tls = load_tls(&bootstrap, &snapshot)?;
        // Unusable files do not stop the proxy: their DestinationRule's
        // requests fail (503) naming the file, as they are logged here.
        let dr_files = crate::dr_tls::DrFiles::default();
        dr_files.sync(&snapshot, &metrics);
        let app_connector = crate::connect::AppConnector::new(snapshot.app_connect_timeout);
        Ok(Arc::new(State {
            snapshot: ArcSwap::from_pointee(snapshot),
            tls: ArcSwap::from_pointee(tls),
            version: AtomicU64::new(1),
            ready: AtomicBool::new(false),
            metrics,
            app_client: hyper_util::client::legacy::Client::builder(
                hyper_util::rt::TokioExecutor::new(),
            )
            .build(app_connector.clone()),
            app_client_h2: hyper_util::client::legacy::Client::builder(
                hyper_util::rt::TokioExecutor::new(),
            )
            .http2_only(true)
            .build(app_connector.clone()),
            app_connector,
            tcp_conns: TcpTracker::default(),
            idle_timeout,
            jwks,
            dr_files,
            dns,
            sources: crate::source::Sources::new(&bootstrap, watched),
            bootstrap,
            documents: Mutex::new(documents),
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

    /// Why the proxy is not ready, if it is not: still starting, or its
    /// certificate has expired (or is not valid yet) since it was loaded.
    /// A proxy whose certificate peers would refuse serves nothing useful.
    pub fn not_ready(&self) -> Option<String> {
        if !self.is_ready() {
            return Some("starting".to_string());
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

    /// Re-reads the configuration; on failure the current snapshot stays.
    /// A file (or configuration directory) that held documents and is
    /// empty now makes the change wait ([`LoadError::Held`]).
    pub fn reload_config(&self) -> Result<u64, LoadError> {
        let version = self.version.load(Ordering::Acquire) + 1;
        let loaded = load_config(&self.bootstrap)?;
        {
            let before = self.documents.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(held) = emptied(&before, &loaded.documents, &self.bootstrap.config_paths) {
                return Err(held);
            }
        }
        let documents = loaded.documents.clone();
        let snapshot = build_snapshot(&self.bootstrap, loaded, version, &self.jwks, &self.dns)?;
        // The trust domain may have changed: rebuild TLS for the new
        // snapshot, from the files, or else with the certificate in use.
        let tls = match load_tls(&self.bootstrap, &snapshot) {
            Ok(tls) => tls,
            Err(from_files) => {
                // The certificate files cannot be used now (lost, half
                // rotated, refused: the certificate source reports why).
                // A policy change must not wait for them: the certificate
                // in use goes on serving if it still fits the new
                // configuration (identity, trust domains).
                let tls = self.tls();
                tls_with((*tls.credentials).clone(), tls.bundle.clone(), &snapshot)
                    .map_err(|_| from_files)?
            }
        };
        // DestinationRule files: load new ones, re-read the others (their
        // problems are theirs; they never refuse the configuration).
        self.dr_files.sync(&snapshot, &self.metrics);
        self.version.store(version, Ordering::Release);
        *self.documents.lock().unwrap_or_else(|e| e.into_inner()) = documents;
        let snapshot = Arc::new(snapshot);
        self.snapshot.store(Arc::clone(&snapshot));
        self.tls.store(Arc::new(tls));
        self.app_connector.set_timeout(snapshot.app_connect_timeout);
        self.dns.forget_unused();
        let closed = self.tcp_conns.recheck(&snapshot);
        if closed > 0 {
            tracing::info!(target: "meshward::config", closed, "closed TCP connections and WebSocket tunnels the new policy denies");
        }
        Ok(version)
    }

    /// Re-reads the files DestinationRules name; a change that cannot be
    /// used is refused (logged, counted) and the previous client config
    /// stays.
    pub fn reload_dr_files(&self) {
        self.dr_files.refresh(&self.metrics);
    }

    /// Re-reads the certificates; on failure the current ones stay.
    pub fn reload_certs(&self) -> Result<(), LoadError> {
        let tls = load_tls(&self.bootstrap, &self.snapshot())?;
        self.tls.store(Arc::new(tls));
        Ok(())
    }
}

fn load_config(b: &Bootstrap) -> Result<Loaded, LoadError> {
    let mut loader = Loader::new();
    if let Some(mc) = &b.mesh_config {
        loader.add_mesh_config_path(mc);
    }
    for p in &b.config_paths {
        loader.add_path(p);
    }
    loader.finish().map_err(LoadError::Config)
}

/// Why a load must wait: a file that held documents at the last load
/// (`before`) and holds none now (`now`), or a configuration directory
/// that held some and has none in any file. A file absent from `now` was
/// deleted, which removes its resources.
fn emptied(
    before: &BTreeMap<String, usize>,
    now: &BTreeMap<String, usize>,
    config_paths: &[PathBuf],
) -> Option<LoadError> {
    for (file, &n) in now {
        let had = before.get(file).copied().unwrap_or(0);
        if n == 0 && had > 0 {
            return Some(LoadError::Held {
                path: PathBuf::from(file),
                documents: had,
                directory: false,
            });
        }
    }
    let under = |counts: &BTreeMap<String, usize>, dir: &Path| -> usize {
        counts
            .iter()
            .filter(|(f, _)| Path::new(f.as_str()).starts_with(dir))
            .map(|(_, n)| n)
            .sum()
    };
    for dir in config_paths.iter().filter(|p| p.is_dir()) {
        let had = under(before, dir);
        if had > 0 && under(now, dir) == 0 {
            return Some(LoadError::Held {
                path: dir.clone(),
                documents: had,
                directory: true,
            });
        }
    }
    None
}

fn build_snapshot(
    b: &Bootstrap,
    loaded: Loaded,
    version: u64,
    jwks: &crate::jwt::JwksStore,
    dns: &crate::dns::DnsStore,
) -> Result<Snapshot, LoadError> {
    for w in loaded.warnings.warnings() {
        tracing::warn!(target: "meshward::config", "{w}");
    }
    Ok(Snapshot::build(
        Arc::new(loaded.config),
        &b.workload,
        version,
        jwks,
        dns,
    )?)
}

fn load_tls(b: &Bootstrap, snapshot: &Snapshot) -> Result<TlsState, LoadError> {
    let credentials = WorkloadCredentials::from_dir(&b.certs_dir)?;
    let bundle = TrustBundle::from_pem_file(&b.certs_dir.join("root-cert.pem"))?;
    tls_with(credentials, bundle, snapshot)
}

/// TLS for `snapshot` with these credentials and roots: they must be of
/// its workload's identity and one of its trust domains.
fn tls_with(
    credentials: WorkloadCredentials,
    bundle: TrustBundle,
    snapshot: &Snapshot,
) -> Result<TlsState, LoadError> {
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
    TlsState::build(credentials, bundle, domains)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::PathBuf;

    use super::{LoadError, emptied};

    fn counts(entries: &[(&str, usize)]) -> BTreeMap<String, usize> {
        entries.iter().map(|(f, n)| (f.to_string(), *n)).collect()
    }

    #[test]
    fn an_emptied_file_or_directory_holds_the_change_and_a_deleted_file_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let f = |name: &str| root.join(name).display().to_string();
        let roots = [root.clone()];
        let before = counts(&[(&f("a.yaml"), 2), (&f("b.yaml"), 1), (&f("c.yaml"), 0)]);

        // a.yaml emptied: held, naming it and what it had.
        let now = counts(&[(&f("a.yaml"), 0), (&f("b.yaml"), 1), (&f("c.yaml"), 0)]);
        match emptied(&before, &now, &roots) {
            Some(LoadError::Held {
                path,
                documents: 2,
                directory: false,
            }) => assert_eq!(path, PathBuf::from(f("a.yaml"))),
            other => panic!("{other:?}"),
        }
        // a.yaml deleted: its resources go.
        let now = counts(&[(&f("b.yaml"), 1), (&f("c.yaml"), 0)]);
        assert!(emptied(&before, &now, &roots).is_none());
        // A file that was empty, or a new empty one, changes nothing.
        let now = counts(&[(&f("a.yaml"), 2), (&f("b.yaml"), 1), (&f("d.yaml"), 0)]);
        assert!(emptied(&before, &now, &roots).is_none());
        // The directory re-created with nothing in it yet: held.
        let held = emptied(&before, &BTreeMap::new(), &roots).unwrap();
        assert!(
            matches!(&held, LoadError::Held { path, documents: 3, directory: true } if *path == root),
            "{held:?}"
        );
        assert!(
            held.to_string()
                .contains("taken for a directory being written")
        );
    }
}
