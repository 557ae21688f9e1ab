//! The meshward sidecar proxy.
//!
//! Inbound, it terminates mesh mTLS on every workload port (TLS detected
//! from the first bytes), holds each connection to the port's effective
//! PeerAuthentication mode, authorizes every HTTP request or TCP connection
//! with `meshward-policy`, and forwards to the application. Outbound, it
//! routes the application's plaintext requests to the destination service
//! and secures them (DestinationRule or auto-mTLS, secure naming). It keeps
//! Istio-compatible metrics and a JSON access log, serves admin endpoints,
//! swaps configuration and certificates without dropping connections, and
//! drains its connections before it stops ([`Proxy::drain`]).
//!
//! Configuration and credentials come from a source ([`source`]): files
//! on disk ([`source::files`]), an in-process source in tests, the control
//! plane. The proxy takes what the source publishes through one path
//! (`apply`) into its `State`, and never opens a file itself.

#![forbid(unsafe_code)]

mod admin;
mod admission;
mod apply;
pub mod capture;
mod connect;
mod conns;
mod dns;
// The DNS proxy; its query handling is public for its fuzz target.
pub mod dns_proxy;
mod dr_tls;
mod drain;
mod ext_authz;
mod flows;
mod h1;
mod http;
mod http_in;
mod idle;
mod inbound;
mod jwt;
mod listeners;
mod outbound;
mod outcome;
pub mod own;
mod peers;
mod recent;
mod rewind;
mod snapshot;
pub mod source;
mod state;
mod telemetry;
pub mod vip;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

pub use dns::DnsConfig;
pub use ext_authz::proto as ext_authz_proto;
/// The HTTP/1.x codec, for its fuzz target.
pub use h1::codec as h1_codec;
pub use idle::{DEFAULT_IDLE_TIMEOUT, MAX_IDLE_TIMEOUT};
/// RequestAuthentication's compiled form, for its benchmark.
pub use jwt::{JwksStore, JwtPolicy};
pub use listeners::{BindError, ListenerInfo};
use listeners::{Listeners, bind};
pub use recent::{
    DEFAULT_CAPACITY as DEFAULT_ACCESS_LOG_BUFFER, MAX_CAPACITY as MAX_ACCESS_LOG_BUFFER,
};
pub use source::Feed;

pub use state::LoadError;
use state::State;
use telemetry::{AccessLog, Metrics};

/// Runtime options besides the bootstrap.
#[derive(Debug, Clone)]
pub struct Options {
    /// This workload, `namespace/name` of its WorkloadEntry.
    pub workload: String,
    pub admin: SocketAddr,
    /// Prometheus-only endpoint (Istio's merged metrics port 15020).
    pub metrics: Option<SocketAddr>,
    pub access_log: AccessLogTo,
    /// How long a connection may sit idle (at most [`MAX_IDLE_TIMEOUT`]).
    pub idle_timeout: std::time::Duration,
    /// The resolver for `DNS` and `DNS_ROUND_ROBIN` ServiceEntries.
    pub dns: dns::DnsConfig,
    /// How many recent access-log entries `/access_log` keeps (0: none;
    /// at most [`MAX_ACCESS_LOG_BUFFER`]). They are kept even when
    /// `access_log` is off.
    pub access_log_buffer: usize,
    /// Local overrides of the WorkloadEntry's annotations.
    pub overrides: Overrides,
    /// Where the DNS proxy listens (UDP and TCP, one port), off when
    /// `None`: it answers the mesh's hosts and forwards other queries to
    /// the name servers of `dns` ([`DnsConfig::System`]: those of
    /// `/etc/resolv.conf`). Port 0 picks a port free in both.
    pub dns_proxy: Option<SocketAddr>,
}

/// What `meshward proxy` says about where things are on this host, over
/// the WorkloadEntry's annotations: applied whenever a snapshot is built.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    /// The outbound HTTP listener (over `meshward.io/outbound`).
    pub outbound: Option<SocketAddr>,
    /// Where the application listens, per WorkloadEntry port name (over
    /// `meshward.io/app-ports` for that name). A name that is not a port
    /// of the WorkloadEntry makes every snapshot fail, with the reason.
    pub app_ports: Vec<(String, SocketAddr)>,
    /// Traffic capture: the capture listeners replace the per-port
    /// inbound listeners, and the application is reached at the
    /// workload's own address unless `app_ports` says otherwise.
    pub capture: Option<capture::CaptureListen>,
}

/// Where the access log goes.
#[derive(Debug, Clone)]
pub enum AccessLogTo {
    Off,
    /// One JSON object per line on standard output.
    Stdout,
    /// The JSON lines kept in memory, for in-process tests (feature
    /// `test-util`).
    #[cfg(any(test, feature = "test-util"))]
    Memory(Arc<std::sync::Mutex<Vec<String>>>),
}

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error("the {0} source closed before publishing anything")]
    SourceClosed(&'static str),
}

/// Istio's default `terminationDrainDuration`: how long a proxy told to
/// stop lets its connections finish ([`Proxy::drain`]).
pub const DEFAULT_DRAIN_DURATION: Duration = Duration::from_secs(5);

/// The longest drain: `meshward proxy --drain-duration` and the mesh
/// setting accept no more, and [`Proxy::drain`] cuts a longer deadline
/// to it.
pub const MAX_DRAIN_DURATION: Duration = meshward_config::model::MAX_TERMINATION_DRAIN_DURATION;

/// A running proxy.
#[derive(Debug)]
pub struct Proxy {
    state: Arc<State>,
    listeners: Arc<Listeners>,
    outbound: Arc<outbound::Outbound>,
    /// Keeps the source running.
    _source: Option<Box<dyn std::fmt::Debug + Send + Sync>>,
}

/// How a drain went ([`Proxy::drain`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Drained {
    /// Connections open when the drain began.
    pub open_at_start: usize,
    /// Connections still open at the deadline, which were cut.
    pub cut: usize,
    /// How long it took.
    pub elapsed: Duration,
}

impl Proxy {
    /// The listeners bound now (the admin and metrics ones, and those of
    /// the configuration).
    pub fn listeners(&self) -> Vec<ListenerInfo> {
        self.listeners.bound()
    }

    /// The workload this proxy serves (`namespace/name`).
    pub fn workload(&self) -> &str {
        &self.state.workload
    }

    /// The metadata of this workload's WorkloadEntry in the current
    /// configuration (its annotations say how traffic capture applies).
    pub fn workload_meta(&self) -> Option<meshward_config::model::ObjectMeta> {
        let snap = self.state.snapshot();
        let (ns, name) = snap.workload_name.split_once('/')?;
        snap.config
            .workload_entries
            .iter()
            .find(|e| e.meta.namespace == ns && e.meta.name == name)
            .map(|e| e.meta.clone())
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.listeners
            .bound()
            .into_iter()
            .find(|l| l.kind == "admin")
            .map(|l| l.address)
    }

    /// The drain duration the mesh settings ask for
    /// (`defaultConfig.terminationDrainDuration`), if they set one.
    pub fn mesh_drain_duration(&self) -> Option<Duration> {
        self.state.snapshot().config.mesh.termination_drain_duration
    }

    /// Shuts down gracefully, as Istio's sidecar does on SIGTERM: stops
    /// accepting on the inbound listeners (new connections are refused;
    /// the outbound ones keep accepting, so that the application can
    /// finish its requests), answers `/healthz/ready` with 503
    /// `draining`, closes the idle pooled upstream connections, and tells
    /// every open connection to finish: HTTP/2 gets GOAWAY (streams in
    /// flight finish), HTTP/1.1 says `Connection: close` on its next
    /// response and idle keep-alive connections close at once. Requests
    /// in flight and TCP connections run on until `deadline` has passed;
    /// what is still open then is cut. Returns when no connection is left.
    /// The admin listener serves until the proxy is dropped. A `deadline`
    /// past [`MAX_DRAIN_DURATION`] is cut to it.
    pub async fn drain(self, deadline: Duration) -> Drained {
        let deadline = deadline.min(MAX_DRAIN_DURATION);
        let started = tokio::time::Instant::now();
        let drain = &self.state.drain;
        drain.begin();
        let open_at_start = drain.open();
        let listeners = self.listeners.close_inbound().await;
        let idle_upstream = self.outbound.close_idle();
        // Logged once new connections are refused.
        tracing::info!(
            deadline_ms = u64::try_from(deadline.as_millis()).unwrap_or(u64::MAX),
            connections = open_at_start,
            listeners_closed = listeners,
            idle_upstream_closed = idle_upstream,
            "draining"
        );
        let mut cut = 0;
        if tokio::time::timeout_at(started + deadline, drain.all_closed())
            .await
            .is_err()
        {
            cut = drain.open();
            tracing::warn!(
                connections = cut,
                "drain deadline passed: closing the connections still open"
            );
            drain.cut();
            // Each connection ends when its task next runs; the bound
            // only guards against a task that never yields.
            let _ = tokio::time::timeout(CUT_GRACE, drain.all_closed()).await;
        }
        let elapsed = started.elapsed();
        tracing::info!(
            elapsed_ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
            cut,
            "drained"
        );
        Drained {
            open_at_start,
            cut,
            elapsed,
        }
    }
}

/// How long [`Proxy::drain`] waits for the connections it cut to close.
const CUT_GRACE: Duration = Duration::from_secs(1);

/// Waits for the source's first configuration and credentials, binds every
/// listener, and starts serving. The proxy is ready (`/healthz/ready`) when
/// this returns.
pub async fn start(feed: Feed, options: Options) -> Result<Proxy, StartError> {
    let Feed {
        mut config,
        mut credentials,
        mut files,
        info,
        guard,
        admin,
    } = feed;
    let (config_revision, first_config) = first(&mut config, source::Source::Config).await?;
    let (credentials_revision, first_credentials) =
        first(&mut credentials, source::Source::Certs).await?;
    let first_files = Arc::clone(&files.borrow_and_update());
    let access = match &options.access_log {
        AccessLogTo::Off => AccessLog::Off,
        AccessLogTo::Stdout => AccessLog::stdout(),
        #[cfg(any(test, feature = "test-util"))]
        AccessLogTo::Memory(lines) => AccessLog::Memory(Arc::clone(lines)),
    };
    let sources = source::Source::ALL.map(source::Source::as_str);
    let access = recent::AccessLogger::new(access, options.access_log_buffer);
    let metrics = Arc::new(Metrics::new(access, &sources));
    let idle_timeout = options.idle_timeout.min(idle::MAX_IDLE_TIMEOUT);
    // Bound before the first configuration is applied, so that the
    // source's answer to it (the control plane's ACK) can say where it is.
    let admin_l = bind(options.admin, "admin")?;
    let admin_addr = admin_l.local_addr().unwrap_or(options.admin);
    let _ = admin.set(admin_addr);
    let state = State::new(
        options.workload.clone(),
        (&first_config, first_credentials, Arc::clone(&first_files)),
        &info,
        metrics,
        idle_timeout,
        options.dns.clone(),
        options.overrides.clone(),
    )?;
    let mut fixed = Vec::new();
    fixed.push(listeners::ListenerInfo {
        name: "admin".to_string(),
        address: admin_addr,
        kind: "admin",
    });
    let dns_l = match options.dns_proxy {
        Some(addr) => {
            let (udp, tcp) = dns_proxy::bind(addr).await?;
            let bound = udp.local_addr().unwrap_or(addr);
            for name in ["dns-udp", "dns-tcp"] {
                fixed.push(listeners::ListenerInfo {
                    name: name.to_string(),
                    address: bound,
                    kind: "dns",
                });
            }
            Some((udp, tcp, bound))
        }
        None => None,
    };
    let metrics_l = match options.metrics {
        Some(addr) => {
            let l = bind(addr, "metrics")?;
            fixed.push(listeners::ListenerInfo {
                name: "metrics".to_string(),
                address: l.local_addr().unwrap_or(addr),
                kind: "metrics",
            });
            Some(l)
        }
        None => None,
    };
    // The data-plane listeners start serving here: all of them or none.
    // The outbound side holds the state it reads; the state never holds it.
    let outbound = Arc::new(outbound::Outbound::new(Arc::clone(&state)));
    let listeners = Arc::new(Listeners::start(
        Arc::clone(&state),
        Arc::clone(&outbound),
        fixed,
    )?);
    tokio::spawn(admin::serve(
        Arc::clone(&state),
        admin_l,
        Arc::clone(&listeners),
        false,
    ));
    if let Some((udp, tcp, bound)) = dns_l {
        let upstreams = dns_proxy::Upstreams::new(options.dns.clone(), bound);
        let server = Arc::new(dns_proxy::DnsProxy::new(Arc::clone(&state), upstreams));
        tokio::spawn(Arc::clone(&server).serve_udp(udp));
        tokio::spawn(server.serve_tcp(tcp));
        tracing::info!(address = %bound, "DNS proxy listening (UDP and TCP)");
    }
    if let Some(l) = metrics_l {
        tokio::spawn(admin::serve(
            Arc::clone(&state),
            l,
            Arc::clone(&listeners),
            true,
        ));
    }
    tokio::spawn(
        apply::Applier {
            // What the state was built from: anything published since is
            // applied, however soon after the start it came.
            seen: (config_revision, credentials_revision),
            files_seen: first_files,
            config,
            credentials,
            files,
            state: Arc::clone(&state),
            listeners: Arc::clone(&listeners),
        }
        .run(),
    );
    // Tokens of a `jwksUri` issuer can be checked from the start: ready
    // once each URI has been tried (a failed one is retried every few
    // seconds, its tokens refused meanwhile). Likewise DNS services can be
    // routed to from the start: ready once each name has been looked up
    // (at most `dns::LOOKUP_TIMEOUT`; a failed one is retried, its
    // requests answered 503 meanwhile).
    tokio::spawn(Arc::clone(&state.dns).run());
    tokio::join!(state.jwks.fetch_due(), state.dns.first_lookups());
    tokio::spawn(Arc::clone(&state.jwks).run());
    state.set_ready();
    tracing::info!(workload = %state.workload, listeners = listeners.bound().len(), "proxy ready");
    Ok(Proxy {
        state,
        listeners,
        outbound,
        _source: guard,
    })
}

/// The first content `rx` publishes, with its revision. A problem before
/// it is logged and waited out: the proxy is not ready until it has
/// something to enforce.
async fn first<T>(
    rx: &mut tokio::sync::watch::Receiver<source::Published<T>>,
    which: source::Source,
) -> Result<(u64, Arc<T>), StartError> {
    loop {
        let now = rx.borrow_and_update().clone();
        match now {
            source::Published::Update { revision, content } => return Ok((revision, content)),
            source::Published::Problem { state, error, .. } => {
                tracing::warn!(source = which.as_str(), state = state.as_str(), error = %error, "waiting for the source's first usable content");
            }
            source::Published::Pending => {}
        }
        if rx.changed().await.is_err() {
            return Err(StartError::SourceClosed(which.as_str()));
        }
    }
}
