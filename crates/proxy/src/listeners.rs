//! The data-plane listeners, kept in step with the configuration.
//!
//! Which listeners a proxy has follows from its snapshot: one per inbound
//! port of the workload (on the workload's address), the outbound HTTP
//! listener, and one per TCP service the application reaches through a
//! local port. They are bound at start; after every configuration change
//! [`Listeners::reconcile`] binds the new ones and closes those the
//! configuration no longer has, as Envoy does with listeners it gets over
//! LDS. A listener whose address and purpose did not change is left alone.
//! Closing a listener stops new connections only: connections it accepted
//! keep running, each under the configuration it now finds.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::net::{TcpListener, TcpSocket};
use tokio::task::JoinHandle;

use crate::inbound;
use crate::outbound::{self, Outbound};
use crate::snapshot::{Snapshot, TcpOutbound};
use crate::state::State;

/// The listen backlog of every listener.
const BACKLOG: u32 = 1024;

/// A listener of the proxy, for `/listeners`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ListenerInfo {
    pub name: String,
    pub address: SocketAddr,
    pub kind: &'static str,
}

/// What a data-plane listener serves. With its address, this is what
/// decides whether a configuration change needs a new socket.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Serves {
    /// An inbound port of the workload (its settings are read from the
    /// snapshot on every connection).
    Inbound(u16),
    /// The outbound HTTP listener.
    OutboundHttp,
    /// A TCP service reached through a local port.
    OutboundTcp(TcpOutbound),
    /// Traffic capture's outbound listener (15001).
    CapturedOutbound,
    /// Traffic capture's inbound listener (15006): inbound, for drains.
    CapturedInbound,
}

/// A listener the configuration asks for.
#[derive(Debug, Clone)]
struct Wanted {
    serves: Serves,
    info: ListenerInfo,
    /// What it is for, in bind errors.
    what: String,
}

/// A data-plane listener that is serving.
#[derive(Debug)]
struct Running {
    serves: Serves,
    /// The configured address (`info` has the bound one).
    addr: SocketAddr,
    info: ListenerInfo,
    task: JoinHandle<()>,
}

impl Running {
    fn is(&self, w: &Wanted) -> bool {
        self.serves == w.serves && self.addr == w.info.address
    }
}

/// A listener that could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr} ({what})")]
pub struct BindError {
    pub addr: SocketAddr,
    pub what: String,
    #[source]
    pub source: std::io::Error,
}

/// A listener as `/listeners` shows it: `error` says why one the
/// configuration has could not be bound.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ListenerStatus {
    #[serde(flatten)]
    pub info: ListenerInfo,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Every listener of the proxy: the data-plane ones, which follow the
/// configuration, and the admin and metrics ones, which are fixed.
#[derive(Debug)]
pub struct Listeners {
    state: Arc<State>,
    /// The outbound side, which the outbound listeners serve (and the
    /// inbound ones ask external authorization providers through).
    outbound: Arc<Outbound>,
    runtime: tokio::runtime::Handle,
    fixed: Vec<ListenerInfo>,
    running: Mutex<Vec<Running>>,
    /// Listeners of the current configuration that could not be bound.
    failed: Mutex<Vec<ListenerStatus>>,
    /// Set (under the `running` lock) by [`Listeners::close_inbound`]: no
    /// data-plane listener is bound again.
    closed: std::sync::atomic::AtomicBool,
}

impl Listeners {
    /// Binds and starts every data-plane listener of the current snapshot;
    /// the first that cannot be bound is an error (and none is left
    /// serving). `fixed` are the admin and metrics listeners, for
    /// [`Listeners::infos`]. Must be called within the proxy's runtime.
    pub fn start(
        state: Arc<State>,
        outbound: Arc<Outbound>,
        fixed: Vec<ListenerInfo>,
    ) -> Result<Listeners, BindError> {
        let listeners = Listeners {
            runtime: tokio::runtime::Handle::current(),
            state,
            outbound,
            fixed,
            running: Mutex::new(Vec::new()),
            failed: Mutex::new(Vec::new()),
            closed: std::sync::atomic::AtomicBool::new(false),
        };
        let wanted = wanted(&listeners.state.snapshot());
        let mut bound = Vec::new();
        for w in wanted {
            bound.push((bind(w.info.address, &w.what)?, w));
        }
        let running = bound
            .into_iter()
            .map(|(l, w)| listeners.launch(l, w))
            .collect();
        *listeners.lock_running() = running;
        Ok(listeners)
    }

    /// Brings the data-plane listeners in line with the current snapshot:
    /// closes those it no longer has (waiting until their sockets are
    /// closed, so that their addresses can be reused at once), then binds
    /// and starts the new ones. A listener that cannot be bound is logged,
    /// listed by `/listeners` with the error, and tried again at the next
    /// change; the rest of the change stands.
    ///
    /// Called by the applier on the blocking pool, never from a runtime
    /// worker thread: it blocks until the closed listeners' tasks have ended. Called after
    /// each configuration swap, it also has the outbound side forget what
    /// the configuration no longer has ([`Outbound::retain`]). After
    /// [`Listeners::close_inbound`] it binds nothing.
    pub fn reconcile(&self) {
        let snap = self.state.snapshot();
        // The outbound side forgets the routes, targets and idle
        // connections of services and endpoints that have gone.
        self.outbound.retain(&snap);
        if self.is_closed() {
            // Draining: no listener comes back.
            return;
        }
        let wanted = wanted(&snap);
        // The lock is never held while waiting: `/listeners` takes it on a
        // runtime thread, which is what ends the closed listeners' tasks.
        let closed = {
            let mut running = self.lock_running();
            let (kept, closed) = std::mem::take(&mut *running)
                .into_iter()
                .partition(|r| wanted.iter().any(|w| r.is(w)));
            *running = kept;
            closed
        };
        for r in closed {
            r.task.abort();
            // The socket is closed when the aborted task is dropped.
            let _ = self.runtime.block_on(r.task);
            tracing::info!(target: "meshward::config", listener = %r.info.name, address = %r.info.address, "listener closed: the configuration no longer has it");
        }
        let missing: Vec<Wanted> = {
            let running = self.lock_running();
            wanted
                .iter()
                .filter(|w| !running.iter().any(|r| r.is(w)))
                .cloned()
                .collect()
        };
        let mut added = Vec::new();
        let mut failed = Vec::new();
        let _entered = self.runtime.enter();
        for w in missing {
            match bind(w.info.address, &w.what) {
                Ok(l) => {
                    tracing::info!(target: "meshward::config", listener = %w.info.name, address = %w.info.address, "listener added");
                    added.push(self.launch(l, w));
                }
                Err(e) => {
                    tracing::error!(target: "meshward::config", listener = %w.info.name, error = %e, source = %e.source, "listener not added; tried again at the next configuration change");
                    failed.push(ListenerStatus {
                        info: w.info,
                        error: Some(e.source.to_string()),
                    });
                }
            }
        }
        let mut running = self.lock_running();
        if self.is_closed() {
            // Closed for a drain while this change was being applied:
            // the listeners just bound stop at once.
            drop(running);
            for r in added {
                r.task.abort();
            }
            return;
        }
        let mut all: Vec<Running> = std::mem::take(&mut *running)
            .into_iter()
            .chain(added)
            .collect();
        // In the configuration's order, with its names.
        for w in &wanted {
            if let Some(i) = all.iter().position(|r| r.is(w)) {
                let mut r = all.swap_remove(i);
                r.info.name.clone_from(&w.info.name);
                running.push(r);
            }
        }
        drop(running);
        *self.failed.lock().unwrap_or_else(PoisonError::into_inner) = failed;
    }

    /// Closes the inbound listeners for good (a drain, as Istio's agent
    /// drains `inboundonly`): new connections to the workload's ports are
    /// refused from when this returns (their sockets are closed);
    /// connections accepted before go on. The outbound listeners keep
    /// accepting, so that the application can still call other services
    /// while it finishes its requests. Later configuration changes bind
    /// and close nothing. Returns how many were closed.
    pub async fn close_inbound(&self) -> usize {
        let closed = {
            let mut running = self.lock_running();
            self.closed
                .store(true, std::sync::atomic::Ordering::Release);
            let (inbound, outbound) = std::mem::take(&mut *running)
                .into_iter()
                .partition(|r| matches!(r.serves, Serves::Inbound(_) | Serves::CapturedInbound));
            *running = outbound;
            inbound
        };
        let n = closed.len();
        for r in closed {
            r.task.abort();
            // The socket is closed when the aborted task is dropped.
            let _ = r.task.await;
        }
        n
    }

    fn is_closed(&self) -> bool {
        self.closed.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Every listener: bound ones (data plane, then admin and metrics),
    /// then those of the current configuration that could not be bound,
    /// with the error.
    pub fn infos(&self) -> Vec<ListenerStatus> {
        let failed = self.failed.lock().unwrap_or_else(PoisonError::into_inner);
        self.bound()
            .into_iter()
            .map(|info| ListenerStatus { info, error: None })
            .chain(failed.iter().cloned())
            .collect()
    }

    /// The bound listeners, in the order of [`Listeners::infos`].
    pub fn bound(&self) -> Vec<ListenerInfo> {
        let running = self.lock_running();
        running
            .iter()
            .map(|r| r.info.clone())
            .chain(self.fixed.iter().cloned())
            .collect()
    }

    fn launch(&self, l: TcpListener, mut w: Wanted) -> Running {
        let addr = w.info.address;
        if let Ok(bound) = l.local_addr() {
            w.info.address = bound;
        }
        let state = Arc::clone(&self.state);
        let out = Arc::clone(&self.outbound);
        let task = match &w.serves {
            Serves::Inbound(port) => self.runtime.spawn(inbound::serve(state, out, *port, l)),
            Serves::OutboundHttp => self.runtime.spawn(outbound::serve_http(out, l)),
            Serves::OutboundTcp(t) => self.runtime.spawn(outbound::serve_tcp(out, t.clone(), l)),
            Serves::CapturedOutbound => self.runtime.spawn(outbound::serve_captured(out, l)),
            Serves::CapturedInbound => self.runtime.spawn(inbound::serve_captured(state, out, l)),
        };
        Running {
            serves: w.serves,
            addr,
            info: w.info,
            task,
        }
    }

    fn lock_running(&self) -> std::sync::MutexGuard<'_, Vec<Running>> {
        self.running.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The data-plane listeners `snap` asks for.
fn wanted(snap: &Snapshot) -> Vec<Wanted> {
    // Under capture the inbound capture listener serves every port.
    let per_port = if snap.capture.is_some() {
        &[][..]
    } else {
        &snap.inbound[..]
    };
    let captured = snap.capture.iter().flat_map(|c| {
        [
            Wanted {
                serves: Serves::CapturedInbound,
                info: ListenerInfo {
                    name: "inbound|capture".to_string(),
                    address: c.inbound,
                    kind: "inbound",
                },
                what: "inbound capture".to_string(),
            },
            Wanted {
                serves: Serves::CapturedOutbound,
                info: ListenerInfo {
                    name: "outbound|capture".to_string(),
                    address: c.outbound,
                    kind: "outbound",
                },
                what: "outbound capture".to_string(),
            },
        ]
    });
    let inbound = per_port.iter().map(|p| Wanted {
        serves: Serves::Inbound(p.port),
        info: ListenerInfo {
            name: format!("inbound|{}|{}", p.port, p.name),
            address: SocketAddr::new(snap.address, p.port),
            kind: "inbound",
        },
        what: format!("inbound {}", p.name),
    });
    let http = snap.outbound.map(|addr| Wanted {
        serves: Serves::OutboundHttp,
        info: ListenerInfo {
            name: "outbound|http".to_string(),
            address: addr,
            kind: "outbound",
        },
        what: "outbound HTTP".to_string(),
    });
    let tcp = snap.tcp_outbound.iter().map(|t| Wanted {
        serves: Serves::OutboundTcp(t.clone()),
        info: ListenerInfo {
            name: format!("outbound|tcp|{}:{}", t.host, t.port),
            address: t.listen,
            kind: "outbound",
        },
        what: format!("outbound TCP to {}:{}", t.host, t.port),
    });
    captured.chain(inbound).chain(http).chain(tcp).collect()
}

/// Binds a listener (with `SO_REUSEADDR`, so that connections of an
/// earlier listener in TIME_WAIT do not hold its address). Must be called
/// within the runtime.
pub(crate) fn bind(addr: SocketAddr, what: &str) -> Result<TcpListener, BindError> {
    let listen = || {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(BACKLOG)
    };
    listen().map_err(|source| BindError {
        addr,
        what: what.to_string(),
        source,
    })
}
