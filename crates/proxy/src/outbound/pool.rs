//! Connecting and pooling: where and how to connect for a pool key
//! ([`Target`]), the hyper client's connector that looks keys up
//! ([`MeshConnector`]), the upstream connection type ([`Upstream`]), and the
//! fast path's pool of idle HTTP/1.1 connections ([`Pool`]).

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::connect::{self, Deadline};

/// Where and how to connect for one upstream authority.
#[derive(Debug, Clone)]
pub(super) struct Target {
    pub(super) addr: SocketAddr,
    /// The local address to connect from (the workload's own,
    /// [`crate::snapshot::Snapshot::source_address`]), else any.
    pub(super) source: Option<std::net::IpAddr>,
    /// TLS settings, or plaintext.
    pub(super) tls: Option<(Arc<ClientConfig>, ServerName<'static>)>,
    /// Speak HTTP/2 (gRPC): prior knowledge in plaintext, ALPN under TLS.
    pub(super) h2: bool,
    /// How long connecting may take, TLS handshake included.
    pub(super) connect_timeout: Duration,
    /// The generation of the TLS state the route was made with
    /// ([`crate::state::TlsState`]): of two targets for one key, the one
    /// with the larger generation has the current client config.
    pub(super) generation: u64,
}

/// Connects to the target registered under the request's authority (a
/// key, `m<hash>.mesh:<port>`): its address, plaintext or TLS, HTTP/1.1 or
/// HTTP/2. The key names the
/// address *and* what the server must prove (mode, expected identities,
/// DestinationRule files), so the connection pool, which is keyed by
/// authority, never hands a connection verified for one service to a
/// request for another that expects a different identity.
#[derive(Clone, Default)]
pub struct MeshConnector {
    pub(super) targets: Arc<Mutex<Targets>>,
}

/// How long a registered key is kept after its last request: well past
/// the hyper pool's idle timeout (90 s), so a key is only forgotten once
/// no pooled connection can still want it; a later request registers it
/// again before it connects.
pub(super) const TARGET_TTL: Duration = Duration::from_secs(600);

/// The keys known to [`MeshConnector`]. Keys unused for [`TARGET_TTL`] are
/// dropped whenever the map has doubled since the last sweep, so a
/// workload whose endpoints, identities or modes keep changing does not
/// accumulate them for ever; and a configuration change drops those whose
/// routes it no longer makes ([`Targets::retain`]).
#[derive(Debug, Default)]
pub(super) struct Targets {
    pub(super) by_key: HashMap<String, Known>,
    /// Size at which the next sweep runs.
    sweep_at: usize,
}

/// A registered key.
#[derive(Debug)]
pub(super) struct Known {
    target: Target,
    /// When a request last registered it.
    pub(super) used: Instant,
    /// The routes it was made from.
    origins: Vec<Arc<Origin>>,
    /// Cloned into the [`InUse`] of each request that may still connect
    /// with it.
    in_use: Arc<()>,
}

/// Held by a request from registering its key until its response head
/// has come (hyper has connected for it by then): the key is not
/// forgotten meanwhile, so a configuration change never makes a request
/// already routed fail for want of its target.
#[derive(Debug)]
pub(super) struct InUse {
    _token: Arc<()>,
}

/// The smallest map that is swept.
pub(super) const SWEEP_MIN: usize = 256;

impl Targets {
    pub(super) fn register(
        &mut self,
        key: &str,
        target: &Target,
        origin: &Arc<Origin>,
        now: Instant,
    ) -> InUse {
        if let Some(known) = self.by_key.get_mut(key) {
            known.used = now;
            note(&mut known.origins, origin);
            // A mesh key does not name the client config (it would change
            // with every configuration applied): after a certificate or
            // trust bundle rotation the same key comes with a newer one,
            // which new connections must use. Connections already made
            // (in hyper's pool) carry on with theirs. A route made before
            // the rotation and registered late never puts the older one
            // back.
            if target.generation > known.target.generation {
                known.target = target.clone();
            }
            return InUse {
                _token: Arc::clone(&known.in_use),
            };
        }
        if self.by_key.len() >= self.sweep_at.max(SWEEP_MIN) {
            self.by_key.retain(|_, k| {
                now.duration_since(k.used) < TARGET_TTL || Arc::strong_count(&k.in_use) > 1
            });
            self.sweep_at = self.by_key.len() * 2;
        }
        let in_use = Arc::new(());
        let token = Arc::clone(&in_use);
        self.by_key.insert(
            key.to_string(),
            Known {
                target: target.clone(),
                used: now,
                origins: vec![Arc::clone(origin)],
                in_use,
            },
        );
        InUse { _token: token }
    }

    pub(super) fn get(&self, key: &str) -> Option<Target> {
        self.by_key.get(key).map(|k| k.target.clone())
    }

    /// Forgets the keys none of whose routes `keep` keeps, except those a
    /// request is using; returns how many were forgotten.
    pub(super) fn retain(&mut self, keep: &mut impl FnMut(&Arc<Origin>) -> bool) -> usize {
        let before = self.by_key.len();
        self.by_key.retain(|_, k| {
            k.origins.retain(|o| keep(o));
            !k.origins.is_empty() || Arc::strong_count(&k.in_use) > 1
        });
        before - self.by_key.len()
    }
}

/// What a pool key was made from: the host (and port) a request named,
/// the endpoint's address, and the hash of everything the key says but a
/// DestinationRule file's client config. A configuration change keeps the
/// key's target and idle connections only if it still makes such a route
/// (see `Outbound::still_made`).
#[derive(Debug)]
pub(super) struct Origin {
    pub(super) key: Arc<str>,
    pub(super) host: Box<str>,
    pub(super) port_hint: Option<u16>,
    pub(super) endpoint: IpAddr,
    pub(super) spec: u64,
    /// The version of the snapshot the route was made for.
    pub(super) version: u64,
}

impl Origin {
    fn same_route(&self, other: &Origin) -> bool {
        self.key == other.key
            && self.host == other.host
            && self.port_hint == other.port_hint
            && self.endpoint == other.endpoint
            && self.spec == other.spec
    }
}

/// Routes remembered per key: several hosts (or spellings of one) may
/// make the same key; past this many, more are not remembered (a key
/// forgotten for want of one is registered again by its next request).
const MAX_ORIGINS: usize = 8;

/// Adds `origin` to `origins` unless the same route is there.
fn note(origins: &mut Vec<Arc<Origin>>, origin: &Arc<Origin>) {
    if origins.len() < MAX_ORIGINS && !origins.iter().any(|o| o.same_route(origin)) {
        origins.push(Arc::clone(origin));
    }
}

impl std::fmt::Debug for MeshConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshConnector").finish_non_exhaustive()
    }
}

/// A plaintext or TLS upstream connection.
#[derive(Debug)]
pub enum Upstream {
    /// Plaintext; `true` for HTTP/2 with prior knowledge.
    Plain(TcpStream, bool),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Connection for Upstream {
    fn connected(&self) -> Connected {
        let h2 = match self {
            Upstream::Plain(_, h2) => *h2,
            Upstream::Tls(s) => matches!(s.get_ref().1.alpn_protocol(), Some(b"h2" | b"istio-h2")),
        };
        if h2 {
            Connected::new().negotiated_h2()
        } else {
            Connected::new()
        }
    }
}

impl AsyncRead for Upstream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Upstream::Plain(s, _) => Pin::new(s).poll_read(cx, buf),
            Upstream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Upstream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Upstream::Plain(s, _) => Pin::new(s).poll_write(cx, buf),
            Upstream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Upstream::Plain(s, _) => Pin::new(s).poll_flush(cx),
            Upstream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Upstream::Plain(s, _) => Pin::new(s).poll_shutdown(cx),
            Upstream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

pub(super) type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower_service::Service<Uri> for MeshConnector {
    type Response = TokioIo<Upstream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let authority = uri.authority().map(|a| a.to_string()).unwrap_or_default();
        let target = self
            .targets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&authority);
        Box::pin(async move {
            // Unknown key: never guess where or how to connect.
            let t = target.ok_or_else(|| format!("no upstream registered for {authority}"))?;
            Ok(TokioIo::new(connect(&t).await?))
        })
    }
}

/// Opens a connection to `t`: TCP, then TLS when its settings say so
/// (verifying the server as they require), within its connect timeout.
pub(super) async fn connect(t: &Target) -> io::Result<Upstream> {
    let deadline = Deadline::after(t.connect_timeout);
    let tcp = deadline
        .run(connect::TCP, connect::tcp_from(t.source, t.addr))
        .await?;
    let _ = tcp.set_nodelay(true);
    match &t.tls {
        None => Ok(Upstream::Plain(tcp, t.h2)),
        Some((config, server_name)) => {
            let handshake = tokio_rustls::TlsConnector::from(Arc::clone(config))
                .connect(server_name.clone(), tcp);
            let s = deadline.run(connect::TLS, handshake).await?;
            Ok(Upstream::Tls(Box::new(s)))
        }
    }
}

/// Idle HTTP/1.1 upstream connections of the fast path, by pool key (the
/// same key as [`MeshConnector`]'s: address, mode and expected
/// identities), so a connection verified for one service is only reused
/// for requests that expect the same server.
#[derive(Debug, Default)]
pub struct Pool {
    idle: Mutex<HashMap<Arc<str>, Parked>>,
}

/// The idle connections of one key, and the routes it was made from.
#[derive(Debug, Default)]
struct Parked {
    origins: Vec<Arc<Origin>>,
    conns: Vec<Idle>,
}

/// An idle connection and when it became idle.
type Idle = (Upstream, Instant);

/// How long an idle upstream connection is kept.
pub(super) const POOL_IDLE: Duration = Duration::from_secs(90);
/// Idle connections kept per key.
const POOL_MAX_IDLE: usize = 64;

impl Pool {
    /// An idle connection for `key` that is still open, if any.
    pub(super) fn checkout(&self, key: &str) -> Option<Upstream> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let list = &mut idle.get_mut(key)?.conns;
        while let Some((mut up, since)) = list.pop() {
            if since.elapsed() < POOL_IDLE && up.is_open() {
                return Some(up);
            }
        }
        None
    }

    /// Keeps `up`, a connection of the route `origin`, for reuse if `keep`
    /// says the route is still made (asked under the pool's lock, so a
    /// configuration change's [`Pool::retain`] sees it either before or
    /// after); otherwise `up` is closed. Connections idle too long are
    /// dropped here.
    pub(super) fn checkin(
        &self,
        origin: &Arc<Origin>,
        up: Upstream,
        keep: impl FnOnce(&Origin) -> bool,
    ) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.retain(|_, parked| {
            parked
                .conns
                .retain(|(_, since)| since.elapsed() < POOL_IDLE);
            !parked.conns.is_empty()
        });
        if !keep(origin) {
            return;
        }
        let parked = idle.entry(Arc::clone(&origin.key)).or_default();
        note(&mut parked.origins, origin);
        if parked.conns.len() < POOL_MAX_IDLE {
            parked.conns.push((up, Instant::now()));
        }
    }

    /// Closes the idle connections of the keys none of whose routes
    /// `keep` keeps; returns how many were closed. Connections in use are
    /// not here: they go on serving their request (see [`Pool::checkin`]).
    pub(super) fn retain(&self, keep: &mut impl FnMut(&Arc<Origin>) -> bool) -> usize {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let mut closed = 0;
        idle.retain(|_, parked| {
            parked.origins.retain(|o| keep(o));
            if parked.origins.is_empty() {
                closed += parked.conns.len();
                return false;
            }
            true
        });
        closed
    }

    /// Closes every idle connection; returns how many were closed.
    pub(super) fn clear(&self) -> usize {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let closed = idle.values().map(|p| p.conns.len()).sum();
        idle.clear();
        closed
    }

    /// How many idle connections are kept.
    #[cfg(test)]
    pub(super) fn idle_count(&self) -> usize {
        let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.values().map(|p| p.conns.len()).sum()
    }
}

impl Upstream {
    /// Whether an idle connection is still usable: reading it must find
    /// nothing to read yet. End of stream, an error or unexpected bytes all
    /// mean it must not carry another request. (Under TLS, post-handshake
    /// messages such as session tickets are consumed on the way.)
    fn is_open(&mut self) -> bool {
        let mut probe = [0u8; 1];
        let mut buf = ReadBuf::new(&mut probe);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        matches!(Pin::new(self).poll_read(&mut cx, &mut buf), Poll::Pending)
    }
}
