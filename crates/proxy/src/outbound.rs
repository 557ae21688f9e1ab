//! Outbound: the application talks plaintext to a local listener; the proxy
//! routes HTTP by `Host` (TCP by a per-service local port) to an endpoint of
//! the destination service and secures the connection as the
//! DestinationRule says (ISTIO_MUTUAL, MUTUAL, SIMPLE, DISABLE) or, without
//! one, by auto-mTLS: mTLS to endpoints that have a proxy, plaintext to
//! those that do not. Under mesh mTLS the server must present one of the
//! service's identities (secure naming).

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::header::{HOST, HeaderValue};
use http::{Request as HttpRequest, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo};
use meshward_config::model::networking::TlsMode;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

use crate::connect::{self, Deadline};
use crate::dr_tls::{self, Loaded, Presented};
use crate::h1::codec::{self, Framing, RequestHead, Upgrade};
use crate::h1::{self, Sent, XFCC};
use crate::http_in::{Body, full, request_line, serve_hyper_conn, strip_hop_by_hop};
use crate::idle::{Activity, Counted, IdleTimer, idle_reason};
use crate::rewind::Rewind;
use crate::snapshot::{Endpoint, Service, Snapshot, TcpOutbound, strip_port};
use crate::state::State;
use crate::telemetry::{
    self, AccessRecord, BodyCount, CountedBody, Counts, TrafficLabels, now_rfc3339, principal_parts,
};

/// Where and how to connect for one upstream authority.
#[derive(Debug, Clone)]
struct Target {
    addr: SocketAddr,
    /// TLS settings, or plaintext.
    tls: Option<(Arc<ClientConfig>, ServerName<'static>)>,
    /// Speak HTTP/2 (gRPC): prior knowledge in plaintext, ALPN under TLS.
    h2: bool,
    /// How long connecting may take, TLS handshake included.
    connect_timeout: Duration,
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
    targets: Arc<Mutex<Targets>>,
}

/// How long a registered key is kept after its last request: well past
/// the hyper pool's idle timeout (90 s), so a key is only forgotten once
/// no pooled connection can still want it; a later request registers it
/// again before it connects.
const TARGET_TTL: Duration = Duration::from_secs(600);

/// The keys known to [`MeshConnector`]. Keys unused for [`TARGET_TTL`] are
/// dropped whenever the map has doubled since the last sweep, so a
/// workload whose endpoints, identities or modes keep changing does not
/// accumulate them for ever.
#[derive(Debug, Default)]
struct Targets {
    by_key: HashMap<String, (Target, Instant)>,
    /// Size at which the next sweep runs.
    sweep_at: usize,
}

/// The smallest map that is swept.
const SWEEP_MIN: usize = 256;

impl Targets {
    fn register(&mut self, key: &str, target: &Target, now: Instant) {
        if let Some((_, used)) = self.by_key.get_mut(key) {
            *used = now;
            return;
        }
        if self.by_key.len() >= self.sweep_at.max(SWEEP_MIN) {
            self.by_key
                .retain(|_, (_, used)| now.duration_since(*used) < TARGET_TTL);
            self.sweep_at = self.by_key.len() * 2;
        }
        self.by_key.insert(key.to_string(), (target.clone(), now));
    }

    fn get(&self, key: &str) -> Option<Target> {
        self.by_key.get(key).map(|(t, _)| t.clone())
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

type BoxError = Box<dyn std::error::Error + Send + Sync>;

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
async fn connect(t: &Target) -> io::Result<Upstream> {
    let deadline = Deadline::after(t.connect_timeout);
    let tcp = deadline
        .run(connect::TCP, TcpStream::connect(t.addr))
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
    idle: Mutex<HashMap<Arc<str>, Vec<Idle>>>,
}

/// An idle connection and when it became idle.
type Idle = (Upstream, Instant);

/// How long an idle upstream connection is kept.
const POOL_IDLE: Duration = Duration::from_secs(90);
/// Idle connections kept per key.
const POOL_MAX_IDLE: usize = 64;

impl Pool {
    /// An idle connection for `key` that is still open, if any.
    fn checkout(&self, key: &str) -> Option<Upstream> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle.get_mut(key)?;
        while let Some((mut up, since)) = list.pop() {
            if since.elapsed() < POOL_IDLE && up.is_open() {
                return Some(up);
            }
        }
        None
    }

    /// Keeps `up` for reuse; connections idle too long are dropped here.
    fn checkin(&self, key: Arc<str>, up: Upstream) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.retain(|_, list| {
            list.retain(|(_, since)| since.elapsed() < POOL_IDLE);
            !list.is_empty()
        });
        let list = idle.entry(key).or_default();
        if list.len() < POOL_MAX_IDLE {
            list.push((up, Instant::now()));
        }
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

/// The outbound side's shared parts: connection pools and prepared routes.
/// (The client configs of DestinationRule files live in
/// [`State::dr_files`].)
#[derive(Debug)]
pub struct Outbound {
    client: Client<MeshConnector, Body>,
    /// For HTTP/1.x requests to HTTP/2 upstreams (bodies buffered).
    client_full: Client<MeshConnector, Full<Bytes>>,
    connector: MeshConnector,
    pool: Pool,
    plans: Mutex<Plans>,
    next: AtomicUsize,
}

impl Default for Outbound {
    fn default() -> Self {
        let connector = MeshConnector::default();
        let client = Client::builder(TokioExecutor::new()).build(connector.clone());
        let client_full = Client::builder(TokioExecutor::new()).build(connector.clone());
        Outbound {
            client,
            client_full,
            connector,
            pool: Pool::default(),
            plans: Mutex::new(Plans::default()),
            next: AtomicUsize::new(0),
        }
    }
}

/// Routes prepared for one configuration snapshot, TLS state,
/// generation of DestinationRule client configs and set of DNS answers
/// (the DNS store's generation): for each (host, port hint) a request
/// named, the route to each endpoint.
#[derive(Debug, Default)]
struct Plans {
    made_for: Option<MadeFor>,
    by_host: HashMap<String, Vec<(Option<u16>, EndpointRoutes)>>,
}

/// What prepared routes were made from: the snapshot, the TLS state, and
/// the generations of the DestinationRule client configs and DNS answers.
type MadeFor = (Arc<Snapshot>, Arc<crate::state::TlsState>, (u64, u64));

/// The route to each endpoint of a service, in endpoint order.
type EndpointRoutes = Arc<[Result<Route, RouteError>]>;

impl Plans {
    fn made_for(
        &self,
        snap: &Arc<Snapshot>,
        tls: &Arc<crate::state::TlsState>,
        generations: (u64, u64),
    ) -> bool {
        self.made_for.as_ref().is_some_and(|(s, t, g)| {
            Arc::ptr_eq(s, snap) && Arc::ptr_eq(t, tls) && *g == generations
        })
    }
}

/// Hosts with prepared routes; past this (an application inventing host
/// names) the plans start over.
const MAX_PLANS: usize = 1024;

/// Why a request could not be routed or secured.
#[derive(Debug, Clone, thiserror::Error)]
enum RouteError {
    #[error("no service for host \"{0}\"")]
    NoService(String),
    /// The service and why it has no endpoint for the request.
    #[error("service {0}: {1}")]
    NoEndpoints(String, String),
    #[error("service {0} has no port {1}")]
    NoPort(String, u16),
    #[error("TLS settings: {0}")]
    Tls(String),
}

impl RouteError {
    /// The status and Envoy response flag a request that cannot be routed
    /// gets: `404 NR` when nothing matches (no route), `503 UH` when the
    /// service has no endpoint to send to (no healthy upstream), `503 NR`
    /// when its TLS settings cannot be used.
    fn status(&self) -> (u16, &'static str) {
        match self {
            RouteError::NoService(_) | RouteError::NoPort(..) => (404, "NR"),
            RouteError::NoEndpoints(..) => (503, "UH"),
            RouteError::Tls(_) => (503, "NR"),
        }
    }
}

/// The chosen upstream for one request or connection.
#[derive(Debug, Clone)]
struct Route {
    svc: Arc<Service>,
    endpoint: Arc<Endpoint>,
    addr: SocketAddr,
    mode: TlsMode,
    target: Target,
    /// Pool key (see [`MeshConnector`]).
    key: Arc<str>,
    /// SIMPLE, MUTUAL: the DestinationRule files' client config in use.
    files: Option<Arc<Loaded>>,
}

impl Route {
    fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// What this proxy presents on the route's TLS connections.
    fn presented(&self) -> Presented<'_> {
        match &self.files {
            Some(files) => Presented::Files(files),
            None => Presented::Workload,
        }
    }

    /// The response flag and access-log reason for a failed upstream
    /// connection or exchange: `UF` for a connect timeout (Envoy's flag
    /// for one) or a TLS failure (with words that say who refused what),
    /// else `flag` and the error as it is.
    fn failure(
        &self,
        err: &(dyn std::error::Error + 'static),
        flag: &'static str,
    ) -> (&'static str, String) {
        if let Some(t) = connect::timeout_of(err) {
            return ("UF", format!("upstream {} failed: {t}", self.addr));
        }
        match dr_tls::tls_failure(err) {
            Some(f) => (
                "UF",
                format!(
                    "upstream {} failed: {}",
                    self.addr,
                    dr_tls::describe_failure(f, self.presented())
                ),
            ),
            None => (flag, format!("upstream {} failed: {err}", self.addr)),
        }
    }
}

/// FNV-1a over NUL-separated parts, for short stable keys.
struct Fnv(u64);

impl Fnv {
    fn new() -> Fnv {
        Fnv(0xcbf29ce484222325)
    }

    fn add(&mut self, part: &[u8]) -> &mut Fnv {
        for b in part.iter().chain(std::iter::once(&0u8)) {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x100000001b3);
        }
        self
    }
}

impl Outbound {
    /// Sends a request of the proxy's own (an external authorization
    /// check) to service `host` on `port` as the outbound listener sends
    /// the application's: to the next endpoint, secured as the
    /// DestinationRule or auto-mTLS says, with secure naming. `req`'s URI
    /// carries the path and query. With `h2` (gRPC), the service port must
    /// speak HTTP/2.
    pub async fn send(
        &self,
        state: &State,
        snap: &Arc<Snapshot>,
        host: &str,
        port: u16,
        mut req: HttpRequest<Body>,
        h2: bool,
    ) -> Result<Response<Incoming>, String> {
        let route = self
            .route(state, snap, host, Some(port))
            .map_err(|e| e.to_string())?;
        if h2 && !route.target.h2 {
            return Err(format!(
                "port {port} of {host} does not speak HTTP/2: declare it with protocol GRPC"
            ));
        }
        self.register(&route);
        let path = req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        *req.uri_mut() = format!("http://{}{path}", route.key)
            .parse()
            .map_err(|e| format!("bad path {path:?}: {e}"))?;
        *req.version_mut() = if route.target.h2 {
            http::Version::HTTP_2
        } else {
            http::Version::HTTP_11
        };
        self.client.request(req).await.map_err(|e| {
            let detail = match dr_tls::tls_failure(&e) {
                Some(f) => dr_tls::describe_failure(f, route.presented()),
                None => {
                    std::error::Error::source(&e).map_or_else(|| e.to_string(), |s| s.to_string())
                }
            };
            format!("{} ({}): {detail}", route.addr, tls_word(route.mode))
        })
    }

    /// The route of one request or connection: the service for `host`,
    /// the next endpoint in round robin, and how to connect to it. Routes
    /// are prepared once per host for a configuration and TLS state, so a
    /// request costs a lookup, not a rebuild.
    fn route(
        &self,
        state: &State,
        snap: &Arc<Snapshot>,
        host: &str,
        port_hint: Option<u16>,
    ) -> Result<Route, RouteError> {
        let tls = state.tls();
        // Read before preparing: a config swapped or an answer changed
        // meanwhile bumps them again, so routes are never kept for
        // generations newer than what they were made from.
        let generations = (state.dr_files.generation(), state.dns.generation());
        let prepared = {
            let mut plans = self.plans.lock().unwrap_or_else(|e| e.into_inner());
            if !plans.made_for(snap, &tls, generations) || plans.by_host.len() >= MAX_PLANS {
                plans.by_host.clear();
                // Holding both keeps their addresses from being reused
                // while the plans made for them are in the map.
                plans.made_for = Some((Arc::clone(snap), Arc::clone(&tls), generations));
            }
            plans
                .by_host
                .get(host)
                .and_then(|ports| ports.iter().find(|(p, _)| *p == port_hint))
                .map(|(_, endpoints)| Arc::clone(endpoints))
        };
        let endpoints = match prepared {
            Some(endpoints) => endpoints,
            None => {
                let (svc, port, endpoints) = self.service(snap, host, port_hint)?;
                let endpoints: EndpointRoutes = endpoints
                    .into_iter()
                    .map(|ep| self.prepare(state, snap, host, svc, port, ep))
                    .collect();
                let mut plans = self.plans.lock().unwrap_or_else(|e| e.into_inner());
                // Only into plans for the same state (another request may
                // have started plans for a newer one meanwhile). Unusable
                // TLS settings are not kept: the next request asks again,
                // so files that become usable are found (see
                // `dr_tls::RETRY_UNUSABLE`).
                let unusable = endpoints
                    .iter()
                    .any(|r| matches!(r, Err(RouteError::Tls(_))));
                if plans.made_for(snap, &tls, generations) && !unusable {
                    let ports = plans.by_host.entry(host.to_string()).or_default();
                    if !ports.iter().any(|(p, _)| *p == port_hint) {
                        ports.push((port_hint, Arc::clone(&endpoints)));
                    }
                }
                endpoints
            }
        };
        let i = self.next.fetch_add(1, Ordering::Relaxed) % endpoints.len();
        endpoints[i].clone()
    }

    /// The service for `host`, the service port the request is for, and
    /// the endpoints it may go to now (never empty).
    fn service<'s>(
        &self,
        snap: &'s Snapshot,
        host: &str,
        port_hint: Option<u16>,
    ) -> Result<(&'s Arc<Service>, u16, Vec<Endpoint>), RouteError> {
        let (svc, original) = match snap.service_for_host(host) {
            Some(svc) => (svc, None),
            None => snap
                .original_destination(host)
                .map(|(svc, ip)| (svc, Some(ip)))
                .ok_or_else(|| RouteError::NoService(host.to_string()))?,
        };
        let svc_port = match port_hint {
            Some(p) => svc
                .ports
                .iter()
                .find(|sp| sp.number == p)
                .ok_or_else(|| RouteError::NoPort(svc.name.clone(), p))?,
            None => svc
                .ports
                .iter()
                .find(|sp| sp.is_http())
                .or(svc.ports.first())
                .ok_or_else(|| RouteError::NoPort(svc.name.clone(), 0))?,
        };
        let endpoints = match original {
            Some(ip) => vec![svc.implicit.at(ip)],
            None => svc.endpoints_for(host).into_owned(),
        };
        if endpoints.is_empty() {
            let service = format!("{}/{}", svc.namespace, svc.name);
            return Err(RouteError::NoEndpoints(service, svc.why_no_endpoint(host)));
        }
        Ok((svc, svc_port.number, endpoints))
    }

    /// The route to `endpoint` of `svc` on service port `port`.
    fn prepare(
        &self,
        state: &State,
        snap: &Snapshot,
        host: &str,
        svc: &Arc<Service>,
        port: u16,
        endpoint: Endpoint,
    ) -> Result<Route, RouteError> {
        let svc_port = svc
            .ports
            .iter()
            .find(|sp| sp.number == port)
            .ok_or_else(|| RouteError::NoPort(svc.name.clone(), port))?;
        let addr = SocketAddr::new(endpoint.address, svc.endpoint_port(svc_port, &endpoint));
        let mode = snap.tls_mode(svc, svc_port.number, &endpoint);
        let mut key = Fnv::new();
        match addr.ip() {
            std::net::IpAddr::V4(ip) => key.add(&ip.octets()),
            std::net::IpAddr::V6(ip) => key.add(&ip.octets()),
        };
        // HTTP/2 end to end for gRPC/HTTP2 ports, except to external TLS
        // services (DestinationRule files carry no ALPN choice).
        let h2 = svc_port.app_protocol() == meshward_config::model::AppProtocol::Http2
            && !matches!(mode, TlsMode::Simple | TlsMode::Mutual);
        // With the connect timeout: a changed one applies to new connections.
        let connect_timeout = svc.connect_timeout_for(svc_port.number);
        key.add(&addr.port().to_be_bytes())
            .add(mode.as_str().as_bytes())
            .add(&[u8::from(h2)])
            .add(&connect_timeout.as_millis().to_be_bytes());
        let mut files = None;
        let tls = match mode {
            TlsMode::Disable => None,
            TlsMode::IstioMutual => {
                let config = state
                    .tls()
                    .client_for(&svc.identities, h2)
                    .map_err(|e| RouteError::Tls(e.to_string()))?;
                for id in &svc.identities {
                    key.add(id.as_bytes());
                }
                Some((config, ServerName::IpAddress(endpoint.address.into())))
            }
            TlsMode::Simple | TlsMode::Mutual => {
                // SIMPLE and MUTUAL come only from a DestinationRule.
                let settings = svc.tls_for(svc_port.number).ok_or_else(|| {
                    RouteError::Tls("no DestinationRule TLS settings".to_string())
                })?;
                let loaded = state
                    .dr_files
                    .client(svc, settings, &state.metrics)
                    .map_err(RouteError::Tls)?;
                let config = Arc::clone(&loaded.config);
                files = Some(loaded);
                let name = settings
                    .sni
                    .clone()
                    .unwrap_or_else(|| strip_port(host).to_string());
                // The config's address: a reloaded one makes a new key, so
                // connections made with the previous certificate are not
                // handed to new requests. (Each pooled connection holds
                // its config, so an address is not reused while one
                // lives.)
                key.add(name.as_bytes())
                    .add(&(Arc::as_ptr(&config) as usize).to_ne_bytes());
                let server_name =
                    ServerName::try_from(name).map_err(|e| RouteError::Tls(e.to_string()))?;
                Some((config, server_name))
            }
        };
        let target = Target {
            addr,
            tls,
            h2,
            connect_timeout,
        };
        let key = format!("m{:016x}.mesh:{}", key.0, addr.port()).into();
        Ok(Route {
            svc: Arc::clone(svc),
            endpoint: Arc::new(endpoint),
            addr,
            mode,
            target,
            key,
            files,
        })
    }

    /// Makes `route`'s key known to the hyper client's connector.
    fn register(&self, route: &Route) {
        self.connector
            .targets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .register(&route.key, &route.target, Instant::now());
    }
}

/// Serves the outbound HTTP listener.
pub async fn serve_http(state: Arc<State>, listener: TcpListener) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "outbound accept failed");
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let mut stream = stream;
            let mut buf = BytesMut::with_capacity(h1::READ_BUF);
            match h1::sniff_h2(&mut stream, &mut buf).await {
                Ok(Some(false)) => serve_h1(state, peer, stream, buf).await,
                Ok(Some(true)) => {
                    serve_hyper(state, peer, Rewind::new(buf.to_vec(), stream)).await;
                }
                Ok(None) | Err(_) => {}
            }
        });
    }
}

/// Serves an HTTP/2 connection from the application through hyper.
async fn serve_hyper<S>(state: Arc<State>, peer: SocketAddr, io: S)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let cache = Arc::new(crate::telemetry::HandleCache::default());
    let timeout = state.idle_timeout;
    let svc = move |req| handle(Arc::clone(&state), peer, Arc::clone(&cache), req);
    if let Err(e) = serve_hyper_conn(io, timeout, svc).await {
        tracing::debug!(error = %e, "outbound connection ended with an error");
    }
}

/// The upstream connection a downstream connection is using, and its key.
type Current = Option<(Arc<str>, Upstream)>;

/// The HTTP/1.x fast path from the application: each request is routed by
/// its host, sent on a pooled connection for its route (kept while the
/// next requests go the same way), and its response streamed back.
async fn serve_h1(state: Arc<State>, peer: SocketAddr, mut io: TcpStream, mut buf: BytesMut) {
    let cache = crate::telemetry::HandleCache::default();
    let mut current: Current = None;
    let mut up_buf = BytesMut::new();
    let mut out = Vec::with_capacity(1024);
    let mut idle = IdleTimer::new(state.idle_timeout);
    loop {
        let Some(head) = h1::next_request(&mut io, &mut buf, peer, &mut idle).await else {
            break;
        };
        let started = Instant::now();
        let snap = state.snapshot();
        let Ok(target) = h1::target(&head) else {
            h1::refuse(&mut io, &mut buf, 405, "method not allowed", head.framing()).await;
            break;
        };
        let line = [head.method(), &*target.path, target.host];
        let port_hint = target
            .host
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse().ok());
        let framing = head.framing();
        let mut close = !head.keep_alive();
        let route = match state.outbound.route(&state, &snap, target.host, port_hint) {
            Ok(route) => route,
            Err(e) => {
                let (status, flags) = e.status();
                close |= h1::has_body(framing);
                let body = "no healthy upstream";
                let sent = h1::reply(&mut io, status, body, close).await;
                let outcome = (
                    status,
                    flags,
                    e.to_string(),
                    Counts::bytes(0, body.len() as u64),
                );
                account(&state, &snap, &cache, peer, started, None, outcome, line);
                if sent.is_err() {
                    break;
                }
                if close {
                    h1::end_connection(&mut io, &mut buf, h1::Unread::all(framing)).await;
                    break;
                }
                continue;
            }
        };
        let upgrade = head.upgrade();
        if upgrade != Upgrade::Unsupported && h1::answer_continue(&mut io, &head).await.is_err() {
            break;
        }
        let rewrite = h1::Rewrite::new(&head, &target, None, upgrade);
        let write_head = |out: &mut Vec<u8>| {
            codec::write_request(
                &head,
                &target.path,
                rewrite.drop,
                rewrite.added(),
                false,
                out,
            );
        };
        // Body bytes: from the application, to it.
        let mut sizes = (0, 0);
        // What the application may still send of the body when the
        // connection closes.
        let mut unread = h1::Unread::Nothing;
        let (status, flags, reason, must_close) = if upgrade == Upgrade::Unsupported {
            // Refused before the application, as an Istio sidecar does.
            close |= h1::has_body(framing);
            unread = h1::Unread::all(framing);
            let sent = h1::reply(&mut io, 403, h1::UPGRADE_REFUSED, close).await;
            sizes.1 = h1::UPGRADE_REFUSED.len() as u64;
            let reason = h1::UPGRADE_REFUSED.to_string();
            (403, "-", reason, close || sent.is_err())
        } else if route.target.h2 {
            let (status, flags, reason) = bridge_h2(
                &state,
                &route,
                (&head, &target),
                &mut io,
                &mut buf,
                (framing, close),
                (&mut sizes, &mut unread),
            )
            .await;
            (status, flags, reason, close)
        } else {
            exchange(
                &state.outbound.pool,
                &route,
                &mut current,
                (&mut io, &mut buf),
                (&mut up_buf, &mut out),
                write_head,
                (framing, head.method(), close),
                (upgrade == Upgrade::WebSocket).then_some(state.idle_timeout),
                (&mut sizes, &mut unread),
            )
            .await
        };
        if flags != "-" || must_close {
            close = true;
        }
        account(
            &state,
            &snap,
            &cache,
            peer,
            started,
            Some(&route),
            (status, flags, reason, Counts::bytes(sizes.0, sizes.1)),
            line,
        );
        if close {
            h1::end_connection(&mut io, &mut buf, unread).await;
            break;
        }
    }
    if let Some((key, up)) = current {
        state.outbound.pool.checkin(key, up);
    }
}

/// Forwards one request and its response on the route's connection: the
/// current one when it is for the same key, else a pooled or new one. A
/// request without a body is retried once on a new connection when a
/// reused one turns out closed. `tunnel` is set for a WebSocket handshake,
/// to the idle timeout of the tunnel a `101` opens (which ends both
/// connections). Returns the status, response flags, the access log
/// reason, and whether the downstream connection must close; `unread`
/// says what is left of the request body when it must.
#[allow(clippy::too_many_arguments)]
async fn exchange(
    pool: &Pool,
    route: &Route,
    current: &mut Current,
    (down, down_buf): (&mut TcpStream, &mut BytesMut),
    (up_buf, out): (&mut BytesMut, &mut Vec<u8>),
    write_head: impl Fn(&mut Vec<u8>),
    (framing, method, close_down): (Framing, &str, bool),
    tunnel: Option<Duration>,
    (sizes, unread): (&mut (u64, u64), &mut h1::Unread),
) -> (u16, &'static str, String, bool) {
    if current.as_ref().is_some_and(|(key, _)| *key != route.key)
        && let Some((key, up)) = current.take()
    {
        pool.checkin(key, up);
    }
    let mut retried = false;
    let (resp, early) = loop {
        // `up_buf` belongs to the current connection: a connection taken
        // now starts with it empty.
        if current.is_none() {
            up_buf.clear();
        }
        // A retry goes to a new connection, never to another idle one.
        if current.is_none()
            && !retried
            && let Some(up) = pool.checkout(&route.key)
        {
            *current = Some((route.key.clone(), up));
        }
        let reused = current.is_some();
        if current.is_none() {
            match connect(&route.target).await {
                Ok(up) => *current = Some((route.key.clone(), up)),
                Err(e) => {
                    let body = "upstream connect error";
                    let _ = h1::reply(down, 503, body, true).await;
                    sizes.1 = body.len() as u64;
                    *unread = h1::Unread::all(framing);
                    let (flag, reason) = route.failure(&e, "UF");
                    return (503, flag, reason, true);
                }
            }
        }
        let Some((_, up)) = current.as_mut() else {
            unreachable!("set above")
        };
        out.clear();
        write_head(out);
        let can_retry = reused && framing == Framing::Empty;
        let upgrade = tunnel.is_some();
        let sent = h1::send(
            up,
            up_buf,
            down,
            down_buf,
            (framing, upgrade),
            out,
            &mut sizes.0,
        );
        let sent = sent.await;
        let failure = match sent {
            Sent::Response(resp) => break (resp, false),
            Sent::Early(resp) => break (resp, true),
            // A TLS failure here is a handshake's end (a TLS 1.3 server
            // sends its refusal of a client certificate in the client's
            // first read): `UF`, as for a failed connect.
            Sent::Lost(e) => route.failure(&e, "UC"),
            Sent::Refused((status, flags, body)) => {
                *current = None;
                let _ = h1::reply(down, status, body, true).await;
                sizes.1 = body.len() as u64;
                *unread = h1::Unread::rest(framing);
                return (status, flags, format!("{body} ({})", route.addr), true);
            }
            Sent::DownstreamBroke => {
                *current = None;
                return (
                    400,
                    "DC",
                    "downstream closed in the request body".to_string(),
                    true,
                );
            }
        };
        *current = None;
        if can_retry {
            retried = true;
            continue;
        }
        let _ = h1::reply(down, 503, h1::UPSTREAM_RESET, true).await;
        sizes.1 = h1::UPSTREAM_RESET.len() as u64;
        *unread = h1::Unread::rest(framing);
        let (flag, reason) = failure;
        return (503, flag, reason, true);
    };
    let Some((_, up)) = current.as_mut() else {
        unreachable!("the response was read from it")
    };
    if let Some(idle_timeout) = tunnel.filter(|_| resp.status() == 101) {
        let ends = (idle_timeout, std::future::pending());
        let t = h1::tunnel(up, up_buf, down, down_buf, &resp, ends, out).await;
        *current = None;
        *sizes = t.bytes;
        let (sent, received) = t.bytes;
        let reason = format!(
            "{} ({sent} bytes sent, {received} received through the tunnel)",
            t.reason
        );
        return (101, t.flags, reason, true);
    }
    // An early answer (a refusal before the body had all gone) ends both
    // connections: the body was cut short.
    let close_down = close_down || early;
    let r = h1::relay(up, up_buf, down, &resp, (method, close_down, &[]), out).await;
    sizes.1 = r.bytes;
    if !r.reusable || early {
        *current = None;
    }
    if early {
        *unread = h1::Unread::rest(framing);
    }
    let reason = match r.flags {
        "-" => "forwarded".to_string(),
        "DC" => "downstream closed".to_string(),
        _ => format!("response body from {} broke off", route.addr),
    };
    (r.status, r.flags, reason, r.close)
}

fn source_labels(
    snap: &Snapshot,
    route: Option<&Route>,
    protocol: &'static str,
    mtls: bool,
) -> TrafficLabels {
    let name = snap
        .workload_name
        .split('/')
        .nth(1)
        .unwrap_or_default()
        .to_string();
    let (dst_ns, _) = route
        .map(|r| principal_parts(&r.endpoint().identity))
        .unwrap_or_else(|| ("unknown".into(), "unknown".into()));
    TrafficLabels {
        reporter: "source",
        source_workload: name,
        source_workload_namespace: snap.workload.namespace.clone(),
        source_principal: snap.identity.clone(),
        destination_workload: "unknown".to_string(),
        destination_workload_namespace: dst_ns,
        destination_principal: route
            .filter(|_| mtls)
            .map(|r| r.endpoint().identity.clone())
            .unwrap_or_else(|| "unknown".to_string()),
        destination_service: route
            .map(|r| r.svc.host.clone())
            .unwrap_or_else(|| "unknown".to_string()),
        destination_service_name: route
            .map(|r| r.svc.name.clone())
            .unwrap_or_else(|| "unknown".to_string()),
        destination_service_namespace: route
            .map(|r| r.svc.namespace.clone())
            .unwrap_or_else(|| "unknown".to_string()),
        request_protocol: protocol,
        response_code: String::new(),
        response_flags: "-".to_string(),
        connection_security_policy: TrafficLabels::security(mtls),
    }
}

async fn handle(
    state: Arc<State>,
    peer: SocketAddr,
    cache: Arc<crate::telemetry::HandleCache>,
    mut req: HttpRequest<Incoming>,
) -> Result<Response<Body>, std::convert::Infallible> {
    let started = Instant::now();
    let snap = state.snapshot();
    // Request body bytes forwarded upstream.
    let request_bytes = Arc::new(BodyCount::default());
    let grpc = telemetry::is_grpc(req.headers().get(http::header::CONTENT_TYPE));
    let (host, path, method) = request_line(&req);
    let port_hint = host.rsplit_once(':').and_then(|(_, p)| p.parse().ok());
    let route = state.outbound.route(&state, &snap, &host, port_hint);
    let (resp, flags, reason, route) = match route {
        Err(e) => {
            let (status, flags) = e.status();
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            (
                full(status, "no healthy upstream"),
                flags,
                e.to_string(),
                None,
            )
        }
        Ok(route) => {
            state.outbound.register(&route);
            // The application must not speak for the mesh.
            req.headers_mut().remove(XFCC);
            strip_hop_by_hop(req.headers_mut());
            if !req.headers().contains_key(HOST)
                && let Ok(v) = HeaderValue::from_str(&host)
            {
                req.headers_mut().insert(HOST, v);
            }
            let target = format!("http://{}{path}", route.key);
            match target.parse::<Uri>() {
                Err(_) => (
                    full(StatusCode::BAD_REQUEST, "bad request path"),
                    "-",
                    "bad path".to_string(),
                    Some(route),
                ),
                Ok(uri) => {
                    *req.uri_mut() = uri;
                    *req.version_mut() = if route.target.h2 {
                        http::Version::HTTP_2
                    } else {
                        http::Version::HTTP_11
                    };
                    let req =
                        req.map(|b| CountedBody::new(b, Arc::clone(&request_bytes), grpc).boxed());
                    match state.outbound.client.request(req).await {
                        Ok(mut resp) => (
                            {
                                strip_hop_by_hop(resp.headers_mut());
                                resp.map(|b| b.boxed())
                            },
                            "-",
                            "forwarded".to_string(),
                            Some(route),
                        ),
                        Err(e) => {
                            let (flag, reason) = match std::error::Error::source(&e) {
                                Some(source) => route.failure(source, "UF"),
                                None => route.failure(&e, "UF"),
                            };
                            (
                                full(StatusCode::SERVICE_UNAVAILABLE, "upstream connect error"),
                                flag,
                                reason,
                                Some(route),
                            )
                        }
                    }
                }
            }
        }
    };
    // Counted, timed and logged when the response body has gone, as
    // Envoy does at the end of the stream.
    let status = resp.status().as_u16();
    let finish = Box::new(move |counts| {
        account(
            &state,
            &snap,
            &cache,
            peer,
            started,
            route.as_ref(),
            (status, flags, reason, counts),
            [&method, &path, &host],
        );
    });
    Ok(resp.map(|body| CountedBody::recording(body, request_bytes, grpc, finish).boxed()))
}

/// Largest request body an HTTP/1.x request to an HTTP/2 upstream may have
/// (it is read whole before it is sent).
const BRIDGE_MAX_BODY: u64 = 4 * 1024 * 1024;

/// An HTTP/1.x request to an HTTP/2 upstream (a `grpc`/`http2` port): the
/// body is read whole, the request goes through hyper's HTTP/2 client, and
/// the response is written back as HTTP/1.1 (chunked unless its length is
/// known). Chunked request bodies are not bridged (411).
async fn bridge_h2(
    state: &State,
    route: &Route,
    (head, target): (&RequestHead, &h1::Target<'_>),
    io: &mut TcpStream,
    buf: &mut BytesMut,
    (framing, close): (Framing, bool),
    (sizes, unread): (&mut (u64, u64), &mut h1::Unread),
) -> (u16, &'static str, String) {
    let refuse = |status: u16, why: &str| (status, "DPE", why.to_string());
    let len = match framing {
        Framing::Empty => 0,
        Framing::Length(n) if n <= BRIDGE_MAX_BODY => n,
        Framing::Length(_) => {
            let _ = h1::reply(io, 413, "request body too large", true).await;
            *unread = h1::Unread::all(framing);
            return refuse(413, "request body too large for an HTTP/2 upstream");
        }
        Framing::Chunked | Framing::UntilClose => {
            let _ = h1::reply(io, 411, "length required", true).await;
            *unread = h1::Unread::all(framing);
            return refuse(411, "chunked request body to an HTTP/2 upstream");
        }
    };
    let mut body = Vec::with_capacity(usize::try_from(len).unwrap_or_default());
    if h1::forward(io, buf, &mut body, framing, &mut Vec::new(), &mut sizes.0)
        .await
        .is_err()
    {
        return (
            400,
            "DC",
            "downstream closed in the request body".to_string(),
        );
    }
    let mut req = HttpRequest::new(Full::new(Bytes::from(body)));
    *req.method_mut() = match http::Method::from_bytes(head.method().as_bytes()) {
        Ok(m) => m,
        Err(_) => {
            let _ = h1::reply(io, 400, "bad request method", true).await;
            return refuse(400, "invalid method");
        }
    };
    match format!("http://{}{}", route.key, target.path).parse::<Uri>() {
        Ok(uri) => *req.uri_mut() = uri,
        Err(_) => {
            let _ = h1::reply(io, 400, "bad request path", true).await;
            return refuse(400, "bad request path");
        }
    }
    *req.version_mut() = http::Version::HTTP_2;
    for (name, value) in head.iter() {
        if let (Ok(n), Ok(v)) = (
            http::HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_bytes(value),
        ) {
            req.headers_mut().append(n, v);
        }
    }
    req.headers_mut().remove(XFCC);
    strip_hop_by_hop(req.headers_mut());
    req.headers_mut().remove(http::header::CONTENT_LENGTH);
    if let Ok(v) = HeaderValue::from_str(target.host) {
        req.headers_mut().insert(HOST, v);
    }
    state.outbound.register(route);
    let resp = match state.outbound.client_full.request(req).await {
        Ok(resp) => resp,
        Err(e) => {
            let _ = h1::reply(io, 503, "upstream connect error", true).await;
            let (flag, reason) = route.failure(&e, "UF");
            return (503, flag, reason);
        }
    };
    let status = resp.status().as_u16();
    match write_h1_response(io, resp, head.method() == "HEAD", close, &mut sizes.1).await {
        Ok(()) => (status, "-", "forwarded".to_string()),
        Err(e) => (status, "UPE", format!("response from {}: {e}", route.addr)),
    }
}

/// Writes a hyper response to an HTTP/1.1 client; `sent` counts its body
/// bytes.
async fn write_h1_response(
    io: &mut TcpStream,
    resp: Response<Incoming>,
    head_request: bool,
    close: bool,
    sent: &mut u64,
) -> Result<(), BoxError> {
    use std::io::Write as _;
    let (mut parts, mut body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let no_body = head_request
        || parts.status.is_informational()
        || parts.status == StatusCode::NO_CONTENT
        || parts.status == StatusCode::NOT_MODIFIED;
    let length = hyper::body::Body::size_hint(&body).exact();
    let chunked = !no_body && length.is_none();
    let mut out = Vec::with_capacity(512);
    write!(
        out,
        "HTTP/1.1 {} {}\r\n",
        parts.status.as_u16(),
        parts.status.canonical_reason().unwrap_or("")
    )?;
    for (name, value) in &parts.headers {
        if name == http::header::CONTENT_LENGTH && !no_body {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    match length {
        _ if no_body => {}
        Some(n) => write!(out, "content-length: {n}\r\n")?,
        None => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    io.write_all(&out).await?;
    if no_body {
        return Ok(io.flush().await?);
    }
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            // Trailers have no place in this response.
            continue;
        };
        if data.is_empty() {
            continue;
        }
        *sent += data.len() as u64;
        if chunked {
            io.write_all(format!("{:x}\r\n", data.len()).as_bytes())
                .await?;
            io.write_all(&data).await?;
            io.write_all(b"\r\n").await?;
        } else {
            io.write_all(&data).await?;
        }
    }
    if chunked {
        io.write_all(b"0\r\n\r\n").await?;
    }
    Ok(io.flush().await?)
}

/// Records one outbound request: its metrics and, when enabled, its access
/// log line. `outcome` is the status, response flags and reason; `line`
/// the method, path and host.
#[allow(clippy::too_many_arguments)]
fn account(
    state: &State,
    snap: &Snapshot,
    cache: &crate::telemetry::HandleCache,
    peer: SocketAddr,
    started: Instant,
    route: Option<&Route>,
    (status, flags, reason, counts): (u16, &'static str, String, Counts),
    [method, path, host]: [&str; 3],
) {
    let mtls = route.is_some_and(|r| r.mode != TlsMode::Disable);
    let protocol = counts.protocol();
    let tag = (route.map_or(0, |r| service_tag(&r.svc)), protocol);
    let handles = cache.get_or_insert(tag, status, flags, || {
        let mut labels = source_labels(snap, route, protocol, mtls);
        labels.response_code = status.to_string();
        labels.response_flags = flags.to_string();
        state.metrics.request_handles(&labels)
    });
    handles.record(started.elapsed(), counts);
    if !state.metrics.access().enabled() {
        return;
    }
    // From the application (the downstream here), and to it.
    let (bytes_received, bytes_sent) = counts.bytes;
    state.metrics.access().write(&AccessRecord {
        time: now_rfc3339(),
        kind: "http",
        reporter: "source",
        src_addr: peer.to_string(),
        src_identity: Some(snap.identity.clone()),
        dst_addr: route.map(|r| r.addr.to_string()).unwrap_or_default(),
        dst_service: route.map(|r| r.svc.host.clone()),
        dst_identity: route
            .filter(|_| mtls)
            .map(|r| r.endpoint().identity.clone()),
        tls_mode: route.map_or("none", |r| tls_word(r.mode)),
        method: Some(method.to_string()),
        path: Some(path.to_string()),
        authority: Some(host.to_string()),
        response_code: Some(status),
        response_flags: flags,
        decision: if flags == "-" { "allow" } else { "error" },
        reason,
        policy: None,
        rule: None,
        explanation: String::new(),
        duration_ms: started.elapsed().as_secs_f64() * 1000.0,
        bytes_sent,
        bytes_received,
    });
}

/// A stable small key for a service (FNV-1a of `namespace/name`), to tell
/// its metric handles apart in a connection's cache.
fn service_tag(svc: &Service) -> usize {
    let h = Fnv::new()
        .add(svc.namespace.as_bytes())
        .add(svc.name.as_bytes())
        .0;
    // Tag 0 means "no route".
    (h as usize) | 1
}

fn tls_word(mode: TlsMode) -> &'static str {
    match mode {
        TlsMode::IstioMutual => "mutual_tls",
        TlsMode::Mutual => "mutual",
        TlsMode::Simple => "simple",
        TlsMode::Disable => "none",
    }
}

/// Copies bytes both ways until either side closes or nothing moves for the
/// idle timeout. Returns the access-log reason and the bytes read from
/// `up`.
async fn relay_tcp<D, U>(
    down: &mut Counted<D>,
    up: &mut Counted<U>,
    activity: &Activity,
    timeout: Duration,
) -> (io::Result<String>, u64)
where
    D: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let r = tokio::select! {
        r = tokio::io::copy_bidirectional(down, up) => r.map(|_| "forwarded".to_string()),
        () = activity.idle(timeout) => Ok(idle_reason(timeout)),
    };
    (r, up.bytes_read())
}

/// Serves one TCP outbound listener: every connection goes to `target`.
pub async fn serve_tcp(state: Arc<State>, target: TcpOutbound, listener: TcpListener) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "TCP outbound accept failed");
                continue;
            }
        };
        let state = Arc::clone(&state);
        let target = target.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let snap = state.snapshot();
            let route = match state
                .outbound
                .route(&state, &snap, &target.host, Some(target.port))
            {
                Ok(r) => r,
                Err(e) => {
                    tracing::info!(target: "meshward::outbound", peer = %peer, host = %target.host, error = %e, "TCP outbound refused");
                    return;
                }
            };
            let mtls = route.mode != TlsMode::Disable;
            let mut labels = source_labels(&snap, Some(&route), "tcp", mtls);
            state.metrics.tcp_opened(&labels);
            let activity = Activity::new();
            let mut down = Counted::new(stream, &activity);
            // A failed connection (refused, timed out, TLS refused) closes
            // the application's connection: flag `UF`, as Envoy's TCP proxy.
            let (result, up_read) = match connect(&route.target).await {
                Ok(up) => {
                    let mut up = Counted::new(up, &activity);
                    let (r, read) =
                        relay_tcp(&mut down, &mut up, &activity, state.idle_timeout).await;
                    // A TLS refusal seen at the first read: `UF` (see `exchange`).
                    (r.map_err(|e| route.failure(&e, "-")), read)
                }
                Err(e) => (Err(route.failure(&e, "UF")), 0),
            };
            let (sent, received) = (down.bytes_read(), up_read);
            let (flags, reason) = match result {
                Ok(reason) => ("-", reason),
                Err(failure) => failure,
            };
            labels.response_flags = flags.to_string();
            state.metrics.tcp_closed(&labels, sent, received);
            state.metrics.access().write(&AccessRecord {
                time: now_rfc3339(),
                kind: "tcp",
                reporter: "source",
                src_addr: peer.to_string(),
                src_identity: Some(snap.identity.clone()),
                dst_addr: route.addr.to_string(),
                dst_service: Some(route.svc.host.clone()),
                dst_identity: mtls.then(|| route.endpoint().identity.clone()),
                tls_mode: tls_word(route.mode),
                method: None,
                path: None,
                authority: None,
                response_code: None,
                response_flags: flags,
                decision: if flags == "-" { "allow" } else { "error" },
                reason,
                policy: None,
                rule: None,
                explanation: String::new(),
                duration_ms: started.elapsed().as_secs_f64() * 1000.0,
                bytes_sent: sent,
                bytes_received: received,
            });
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(port: u16) -> Target {
        Target {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            tls: None,
            h2: true,
            connect_timeout: Duration::from_secs(10),
        }
    }

    #[test]
    fn connector_keys_unused_for_a_while_are_forgotten() {
        let mut t = Targets::default();
        let start = Instant::now();
        // A workload whose upstream keys keep changing: one new key every
        // second for an hour, the first one still in use all along.
        for i in 0..3600u16 {
            let now = start + Duration::from_secs(u64::from(i));
            t.register("steady", &target(1), now);
            t.register(&format!("k{i}"), &target(i), now);
        }
        let now = start + Duration::from_secs(3599);
        // Only keys used within the TTL (and those added since the last
        // sweep) remain, and the steady one always does.
        assert!(t.by_key.len() < 2 * (TARGET_TTL.as_secs() as usize + 1) + SWEEP_MIN);
        assert_eq!(t.get("steady").map(|t| t.addr.port()), Some(1));
        assert_eq!(t.get("k3599").map(|t| t.addr.port()), Some(3599));
        assert!(t.get("k0").is_none(), "a key unused for an hour is kept");
        assert!(
            t.by_key
                .values()
                .all(|(_, used)| now.duration_since(*used) < TARGET_TTL * 3),
            "stale keys survive sweeps"
        );
    }

    #[test]
    fn a_small_set_of_keys_is_never_swept() {
        let mut t = Targets::default();
        let start = Instant::now();
        for i in 0..10u16 {
            t.register(&format!("k{i}"), &target(i), start);
        }
        // Days later, a new key: the map is below the sweep size.
        t.register("new", &target(99), start + Duration::from_secs(86_400));
        assert_eq!(t.by_key.len(), 11);
    }
}
