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
pub mod h1;
pub mod http_in;
pub mod idle;
pub mod inbound;
pub mod outbound;
mod rewind;
pub mod snapshot;
pub mod state;
pub mod telemetry;
mod watch;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;

pub use state::{Bootstrap, LoadError, State};
pub use telemetry::{AccessLog, Metrics};

/// Starts serving a bound listener.
type Launch = Box<dyn FnOnce(TcpListener) -> tokio::task::JoinHandle<()> + Send>;

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
}

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("cannot listen on {addr} ({what})")]
    Bind {
        addr: SocketAddr,
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot watch files: {0}")]
    Watch(String),
}

/// A running proxy.
#[derive(Debug)]
pub struct Proxy {
    pub state: Arc<State>,
    pub listeners: Arc<Vec<admin::ListenerInfo>>,
    _watcher: Option<watch::Watcher>,
}

impl Proxy {
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|l| l.kind == "admin")
            .map(|l| l.address)
    }
}

async fn bind(addr: SocketAddr, what: &str) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind {
            addr,
            what: what.to_string(),
            source,
        })
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
    let state = State::load(bootstrap, metrics, idle_timeout)?;
    let snap = state.snapshot();
    let mut infos = Vec::new();
    let mut tasks: Vec<(TcpListener, Launch)> = Vec::new();
    for port in &snap.inbound {
        let addr = SocketAddr::new(snap.address, port.port);
        let l = bind(addr, &format!("inbound {}", port.name)).await?;
        infos.push(admin::ListenerInfo {
            name: format!("inbound|{}|{}", port.port, port.name),
            address: l.local_addr().unwrap_or(addr),
            kind: "inbound",
        });
        let (state, port) = (Arc::clone(&state), port.clone());
        tasks.push((
            l,
            Box::new(move |l| tokio::spawn(inbound::serve(state, port, l))),
        ));
    }
    if let Some(addr) = snap.outbound {
        let l = bind(addr, "outbound HTTP").await?;
        infos.push(admin::ListenerInfo {
            name: "outbound|http".to_string(),
            address: l.local_addr().unwrap_or(addr),
            kind: "outbound",
        });
        let state = Arc::clone(&state);
        tasks.push((
            l,
            Box::new(move |l| tokio::spawn(outbound::serve_http(state, l))),
        ));
    }
    for t in &snap.tcp_outbound {
        let l = bind(t.listen, &format!("outbound TCP to {}:{}", t.host, t.port)).await?;
        infos.push(admin::ListenerInfo {
            name: format!("outbound|tcp|{}:{}", t.host, t.port),
            address: l.local_addr().unwrap_or(t.listen),
            kind: "outbound",
        });
        let (state, t) = (Arc::clone(&state), t.clone());
        tasks.push((
            l,
            Box::new(move |l| tokio::spawn(outbound::serve_tcp(state, t, l))),
        ));
    }
    let admin_l = bind(options.admin, "admin").await?;
    infos.push(admin::ListenerInfo {
        name: "admin".to_string(),
        address: admin_l.local_addr().unwrap_or(options.admin),
        kind: "admin",
    });
    let metrics_l = match options.metrics {
        Some(addr) => {
            let l = bind(addr, "metrics").await?;
            infos.push(admin::ListenerInfo {
                name: "metrics".to_string(),
                address: l.local_addr().unwrap_or(addr),
                kind: "metrics",
            });
            Some(l)
        }
        None => None,
    };
    drop(snap);
    let listeners = Arc::new(infos);
    for (l, run) in tasks {
        run(l);
    }
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
    let watcher = if options.watch {
        Some(watch::Watcher::start(Arc::clone(&state)).map_err(StartError::Watch)?)
    } else {
        None
    };
    state.set_ready();
    tracing::info!(workload = %state.bootstrap.workload, listeners = listeners.len(), "proxy ready");
    Ok(Proxy {
        state,
        listeners,
        _watcher: watcher,
    })
}
