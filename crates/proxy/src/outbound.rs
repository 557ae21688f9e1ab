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
use std::time::Instant;

use http::header::{HOST, HeaderValue};
use http::{Request as HttpRequest, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo};
use meshward_config::model::networking::{ClientTls, TlsMode};
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

use crate::http_in::{Body, XFCC, full, request_line, strip_hop_by_hop};
use crate::snapshot::{Endpoint, Service, Snapshot, TcpOutbound, strip_port};
use crate::state::State;
use crate::telemetry::{AccessRecord, TrafficLabels, now_rfc3339, principal_parts};

/// Where and how to connect for one upstream authority.
#[derive(Clone)]
struct Target {
    addr: SocketAddr,
    /// TLS settings, or plaintext.
    tls: Option<(Arc<ClientConfig>, ServerName<'static>)>,
    /// Speak HTTP/2 (gRPC): prior knowledge in plaintext, ALPN under TLS.
    h2: bool,
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
    targets: Arc<Mutex<HashMap<String, Target>>>,
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
            .get(&authority)
            .cloned();
        Box::pin(async move {
            // Unknown key: never guess where or how to connect.
            let t = target.ok_or_else(|| format!("no upstream registered for {authority}"))?;
            let tcp = TcpStream::connect(t.addr).await?;
            let _ = tcp.set_nodelay(true);
            match t.tls {
                None => Ok(TokioIo::new(Upstream::Plain(tcp, t.h2))),
                Some((config, server_name)) => {
                    let s = tokio_rustls::TlsConnector::from(config)
                        .connect(server_name, tcp)
                        .await?;
                    Ok(TokioIo::new(Upstream::Tls(Box::new(s))))
                }
            }
        })
    }
}

/// The outbound side's shared parts: connection pools and DestinationRule
/// TLS configs.
#[derive(Debug)]
pub struct Outbound {
    client: Client<MeshConnector, Incoming>,
    connector: MeshConnector,
    next: AtomicUsize,
    /// Client configs built from DestinationRule files, by settings.
    file_configs: Mutex<HashMap<String, Arc<ClientConfig>>>,
}

impl Default for Outbound {
    fn default() -> Self {
        let connector = MeshConnector::default();
        let client = Client::builder(TokioExecutor::new()).build(connector.clone());
        Outbound {
            client,
            connector,
            next: AtomicUsize::new(0),
            file_configs: Mutex::new(HashMap::new()),
        }
    }
}

/// Why a request could not be routed or secured.
#[derive(Debug, thiserror::Error)]
enum RouteError {
    #[error("no service for host \"{0}\"")]
    NoService(String),
    #[error("service {0} has no endpoints")]
    NoEndpoints(String),
    #[error("service {0} has no port {1}")]
    NoPort(String, u16),
    #[error("TLS settings: {0}")]
    Tls(String),
}

/// The chosen upstream for one request or connection.
struct Route {
    svc: Arc<Service>,
    /// Index into `svc.endpoints`.
    endpoint: usize,
    addr: SocketAddr,
    mode: TlsMode,
    target: Target,
    /// Pool key (see [`MeshConnector`]).
    key: String,
}

impl Route {
    fn endpoint(&self) -> &Endpoint {
        &self.svc.endpoints[self.endpoint]
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
    fn route(
        &self,
        state: &State,
        snap: &Snapshot,
        host: &str,
        port_hint: Option<u16>,
    ) -> Result<Route, RouteError> {
        let svc = snap
            .service_for_host(host)
            .ok_or_else(|| RouteError::NoService(host.to_string()))?;
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
        if svc.endpoints.is_empty() {
            return Err(RouteError::NoEndpoints(svc.name.clone()));
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % svc.endpoints.len();
        let endpoint = &svc.endpoints[i];
        let addr = SocketAddr::new(endpoint.address, svc.endpoint_port(svc_port, endpoint));
        let mode = snap.tls_mode(svc, svc_port.number, endpoint);
        let mut key = Fnv::new();
        match addr.ip() {
            std::net::IpAddr::V4(ip) => key.add(&ip.octets()),
            std::net::IpAddr::V6(ip) => key.add(&ip.octets()),
        };
        // HTTP/2 end to end for gRPC/HTTP2 ports, except to external TLS
        // services (DestinationRule files carry no ALPN choice).
        let h2 = svc_port.app_protocol() == meshward_config::model::AppProtocol::Http2
            && !matches!(mode, TlsMode::Simple | TlsMode::Mutual);
        key.add(&addr.port().to_be_bytes())
            .add(mode.as_str().as_bytes())
            .add(&[u8::from(h2)]);
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
                let settings = svc.tls_for(svc_port.number).cloned().ok_or_else(|| {
                    RouteError::Tls("no DestinationRule TLS settings".to_string())
                })?;
                let config = self.file_config(&settings)?;
                let name = settings
                    .sni
                    .clone()
                    .unwrap_or_else(|| strip_port(host).to_string());
                key.add(name.as_bytes())
                    .add(&(Arc::as_ptr(&config) as usize).to_ne_bytes());
                let server_name =
                    ServerName::try_from(name).map_err(|e| RouteError::Tls(e.to_string()))?;
                Some((config, server_name))
            }
        };
        let target = Target { addr, tls, h2 };
        let key = format!("m{:016x}.mesh:{}", key.0, addr.port());
        {
            let mut targets = self
                .connector
                .targets
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if !targets.contains_key(&key) {
                targets.insert(key.clone(), target.clone());
            }
        }
        Ok(Route {
            svc: Arc::clone(svc),
            endpoint: i,
            addr,
            mode,
            target,
            key,
        })
    }

    /// A client config from a DestinationRule's files (SIMPLE, MUTUAL).
    fn file_config(&self, tls: &ClientTls) -> Result<Arc<ClientConfig>, RouteError> {
        let key = format!(
            "{:?}",
            (
                tls.mode,
                &tls.ca_certificates,
                &tls.client_certificate,
                &tls.private_key,
                &tls.subject_alt_names
            )
        );
        if let Some(c) = self
            .file_configs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            return Ok(Arc::clone(c));
        }
        let read_certs = |path: &str| {
            meshward_identity::pem::read_certs(std::path::Path::new(path))
                .map_err(|e| RouteError::Tls(e.to_string()))
        };
        let mut roots = rustls::RootCertStore::empty();
        match &tls.ca_certificates {
            Some(ca) => {
                for c in read_certs(ca)? {
                    roots.add(c).map_err(|e| RouteError::Tls(e.to_string()))?;
                }
            }
            None => {
                return Err(RouteError::Tls(
                    "caCertificates is required (no system trust store is used)".to_string(),
                ));
            }
        }
        let builder = ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| RouteError::Tls(e.to_string()))?
        .with_root_certificates(roots);
        let config = if tls.mode == TlsMode::Mutual {
            let cert = tls
                .client_certificate
                .as_deref()
                .ok_or_else(|| RouteError::Tls("clientCertificate missing".into()))?;
            let key_path = tls
                .private_key
                .as_deref()
                .ok_or_else(|| RouteError::Tls("privateKey missing".into()))?;
            let chain = read_certs(cert)?;
            let key = meshward_identity::pem::read_file(std::path::Path::new(key_path))
                .and_then(|pem| {
                    meshward_identity::pem::key_from_pem(&pem, std::path::Path::new(key_path))
                })
                .map_err(|e| RouteError::Tls(e.to_string()))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| RouteError::Tls(e.to_string()))?
        } else {
            builder.with_no_client_auth()
        };
        let config = Arc::new(config);
        self.file_configs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, Arc::clone(&config));
        Ok(config)
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
            let cache = Arc::new(crate::telemetry::HandleCache::default());
            let svc =
                service_fn(move |req| handle(Arc::clone(&state), peer, Arc::clone(&cache), req));
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            if let Err(e) = builder.serve_connection(TokioIo::new(stream), svc).await {
                tracing::debug!(error = %e, "outbound connection ended with an error");
            }
        });
    }
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
            .and_then(|r| r.svc.hosts.first().cloned())
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
    let (host, path, method) = request_line(&req);
    let port_hint = host.rsplit_once(':').and_then(|(_, p)| p.parse().ok());
    let route = state.outbound.route(&state, &snap, &host, port_hint);
    let (resp, flags, reason, route) = match route {
        Err(e) => {
            let status = if matches!(e, RouteError::NoService(_) | RouteError::NoPort(..)) {
                StatusCode::NOT_FOUND
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            (
                full(status, "no healthy upstream"),
                "NR",
                e.to_string(),
                None,
            )
        }
        Ok(route) => {
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
                            let detail = std::error::Error::source(&e)
                                .map(|s| s.to_string())
                                .unwrap_or_else(|| e.to_string());
                            (
                                full(StatusCode::SERVICE_UNAVAILABLE, "upstream connect error"),
                                "UF",
                                format!("upstream {} failed: {detail}", route.addr),
                                Some(route),
                            )
                        }
                    }
                }
            }
        }
    };
    let mtls = route.as_ref().is_some_and(|r| r.mode != TlsMode::Disable);
    let status = resp.status().as_u16();
    let tag = route.as_ref().map_or(0, |r| service_tag(&r.svc));
    let handles = cache.get_or_insert(tag, status, flags, || {
        let mut labels = source_labels(&snap, route.as_ref(), "http", mtls);
        labels.response_code = status.to_string();
        labels.response_flags = flags.to_string();
        state.metrics.request_handles(&labels)
    });
    handles.record(started.elapsed());
    if !state.metrics.access().enabled() {
        return Ok(resp);
    }
    state.metrics.access().write(&AccessRecord {
        time: now_rfc3339(),
        kind: "http",
        reporter: "source",
        src_addr: peer.to_string(),
        src_identity: Some(snap.identity.clone()),
        dst_addr: route
            .as_ref()
            .map(|r| r.addr.to_string())
            .unwrap_or_default(),
        dst_service: route.as_ref().and_then(|r| r.svc.hosts.first().cloned()),
        dst_identity: route
            .as_ref()
            .filter(|_| mtls)
            .map(|r| r.endpoint().identity.clone()),
        tls_mode: route.as_ref().map_or("none", |r| tls_word(r.mode)),
        method: Some(method),
        path: Some(path),
        authority: Some(host),
        response_code: Some(status),
        decision: if flags == "-" { "allow" } else { "error" },
        reason,
        policy: None,
        rule: None,
        explanation: String::new(),
        duration_ms: started.elapsed().as_secs_f64() * 1000.0,
        bytes_sent: 0,
        bytes_received: 0,
    });
    Ok(resp)
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

/// Serves one TCP outbound listener: every connection goes to `target`.
pub async fn serve_tcp(state: Arc<State>, target: TcpOutbound, listener: TcpListener) {
    loop {
        let (mut stream, peer) = match listener.accept().await {
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
            let labels = source_labels(&snap, Some(&route), "tcp", mtls);
            state.metrics.tcp_opened(&labels);
            let result = async {
                let tcp = TcpStream::connect(route.addr).await?;
                let _ = tcp.set_nodelay(true);
                match &route.target.tls {
                    None => {
                        let mut tcp = tcp;
                        tokio::io::copy_bidirectional(&mut stream, &mut tcp).await
                    }
                    Some((config, server_name)) => {
                        let mut tls = tokio_rustls::TlsConnector::from(Arc::clone(config))
                            .connect(server_name.clone(), tcp)
                            .await?;
                        tokio::io::copy_bidirectional(&mut stream, &mut tls).await
                    }
                }
            }
            .await;
            let (sent, received, reason) = match result {
                Ok((up, down)) => (down, up, "forwarded".to_string()),
                Err(e) => (0, 0, format!("upstream {} failed: {e}", route.addr)),
            };
            state.metrics.tcp_closed(&labels, sent, received);
            state.metrics.access().write(&AccessRecord {
                time: now_rfc3339(),
                kind: "tcp",
                reporter: "source",
                src_addr: peer.to_string(),
                src_identity: Some(snap.identity.clone()),
                dst_addr: route.addr.to_string(),
                dst_service: route.svc.hosts.first().cloned(),
                dst_identity: mtls.then(|| route.endpoint().identity.clone()),
                tls_mode: tls_word(route.mode),
                method: None,
                path: None,
                authority: None,
                response_code: None,
                decision: "allow",
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
