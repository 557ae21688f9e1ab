//! The meshward sidecar proxy.
//!
//! Inbound, it terminates mesh mTLS on every workload port (TLS detected
//! from the first bytes), holds each connection to the port's effective
//! PeerAuthentication mode, authorizes every HTTP request or TCP connection
//! with `meshward-policy`, and forwards to the application. Outbound, it
//! routes the application's plaintext requests to the destination service
//! and secures them (DestinationRule or auto-mTLS, secure naming). It keeps
//! Istio-compatible metrics and a JSON access log, serves admin endpoints,
//! and swaps configuration and certificates without dropping connections.
//!
//! Configuration comes from a static bootstrap ([`Bootstrap`]); all of it
//! goes through [`State`], the one seam a control-plane source will replace.

#![forbid(unsafe_code)]

pub mod admin;
pub mod connect;
pub mod dns;
pub mod dr_tls;
pub mod ext_authz;
pub mod h1;
pub mod http_in;
pub mod idle;
pub mod inbound;
pub mod jwt;
pub mod listeners;
pub mod outbound;
mod rewind;
pub mod snapshot;
pub mod source;
pub mod state;
pub mod telemetry;
pub mod watch;

use std::net::SocketAddr;
use std::sync::Arc;

use listeners::bind;
pub use listeners::{BindError, Listeners};
pub use state::{Bootstrap, LoadError, State};
pub use telemetry::{AccessLog, Metrics};

/// Runtime options besides the bootstrap.
#[derive(Debug, Clone)]
pub struct Options {
    pub admin: SocketAddr,
    /// Prometheus-only endpoint (Istio's merged metrics port 15020).
    pub metrics: Option<SocketAddr>,
    pub access_log: bool,
    /// Re-read configuration and certificates when their files change.
    pub watch: bool,
    /// How long a connection may sit idle ([`idle`]; at most
    /// [`idle::MAX_IDLE_TIMEOUT`]).
    pub idle_timeout: std::time::Duration,
    /// The resolver for `DNS` and `DNS_ROUND_ROBIN` ServiceEntries.
    pub dns: dns::DnsConfig,
}

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error("cannot start the reload thread: {0}")]
    Watch(String),
}

/// A running proxy.
#[derive(Debug)]
pub struct Proxy {
    pub state: Arc<State>,
    pub listeners: Arc<Listeners>,
    _watcher: Option<watch::Watcher>,
}

impl Proxy {
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.listeners
            .bound()
            .into_iter()
            .find(|l| l.kind == "admin")
            .map(|l| l.address)
    }
}

/// Loads everything, binds every listener, and starts serving. The proxy is
/// ready (`/healthz/ready`) when this returns.
pub async fn start(bootstrap: Bootstrap, options: Options) -> Result<Proxy, StartError> {
    let access = if options.access_log {
        AccessLog::stdout()
    } else {
        AccessLog::Off
    };
    let metrics = Arc::new(Metrics::new(access));
    let idle_timeout = options.idle_timeout.min(idle::MAX_IDLE_TIMEOUT);
    // What the files hold before they are loaded: a change made while
    // they load is then seen by the first look.
    let mut scanner = watch::Scanner::default();
    let first = options.watch.then(|| scanner.scan(&bootstrap));
    let state = State::load(
        bootstrap,
        metrics,
        idle_timeout,
        options.dns.clone(),
        options.watch,
    )?;
    let mut fixed = Vec::new();
    let admin_l = bind(options.admin, "admin")?;
    fixed.push(admin::ListenerInfo {
        name: "admin".to_string(),
        address: admin_l.local_addr().unwrap_or(options.admin),
        kind: "admin",
    });
    let metrics_l = match options.metrics {
        Some(addr) => {
            let l = bind(addr, "metrics")?;
            fixed.push(admin::ListenerInfo {
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
    let listeners = Arc::new(Listeners::start(Arc::clone(&state), outbound, fixed)?);
    tokio::spawn(admin::serve(
        Arc::clone(&state),
        admin_l,
        Arc::clone(&listeners),
        false,
    ));
    if let Some(l) = metrics_l {
        tokio::spawn(admin::serve(
            Arc::clone(&state),
            l,
            Arc::clone(&listeners),
            true,
        ));
    }
    let watcher = match first {
        Some(first) => Some(
            watch::Watcher::start(Arc::clone(&state), Arc::clone(&listeners), scanner, first)
                .map_err(StartError::Watch)?,
        ),
        None => None,
    };
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
    tracing::info!(workload = %state.bootstrap.workload, listeners = listeners.bound().len(), "proxy ready");
    Ok(Proxy {
        state,
        listeners,
        _watcher: watcher,
    })
}
