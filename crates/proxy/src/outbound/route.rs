//! Routing: the service a request's host names, the next endpoint in
//! round robin, and how to reach it ([`Route`]: address, TLS mode and
//! settings, pool key), prepared once per host and configuration
//! ([`Plans`]); and the metric labels of a route.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use meshward_config::model::networking::{ClientTls, Resolution, TlsMode};
use rustls_pki_types::ServerName;

use super::Outbound;
use super::pool::{Origin, Target};
use crate::connect;
use crate::dr_tls::{self, Loaded, Presented};
use crate::outcome::Decision;
use crate::outcome::{Flag, LocalFailure};
use crate::peers::{ServiceName, UNKNOWN, WorkloadLabels};
use crate::snapshot::{Endpoint, Owner, Service, Snapshot, strip_port};
use crate::telemetry::{AccessRecord, TrafficLabels, now_rfc3339, principal_parts};

/// Routes prepared for one configuration snapshot, TLS state,
/// generation of DestinationRule client configs and set of DNS answers
/// (the DNS store's generation): for each (host, port hint) a request
/// named, the route to each endpoint.
#[derive(Debug, Default)]
pub(super) struct Plans {
    made_for: Option<MadeFor>,
    pub(super) by_host: HashMap<String, Vec<(Option<u16>, EndpointRoutes)>>,
}

/// What prepared routes were made from: the snapshot, the TLS state, and
/// the generations of the DestinationRule client configs and DNS answers.
type MadeFor = (Arc<Snapshot>, Arc<crate::state::TlsState>, (u64, u64));

/// The route to each endpoint of a service, in endpoint order.
type EndpointRoutes = Arc<[Result<Route, RouteError>]>;

impl Plans {
    /// Drops plans made for a snapshot other than `snap` (and with them
    /// that snapshot, its services and their client configs).
    pub(super) fn retain(&mut self, snap: &Arc<Snapshot>) {
        if self
            .made_for
            .as_ref()
            .is_some_and(|(s, ..)| !Arc::ptr_eq(s, snap))
        {
            self.made_for = None;
            self.by_host.clear();
        }
    }

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
pub(super) const MAX_PLANS: usize = 1024;

/// Why a request could not be routed or secured.
#[derive(Debug, Clone, thiserror::Error)]
pub(super) enum RouteError {
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
    /// The answer a request that cannot be routed gets: no route when
    /// nothing matches, no healthy upstream when the service has no
    /// endpoint to send to, unusable TLS settings.
    pub(super) fn failure(&self) -> LocalFailure {
        match self {
            RouteError::NoService(_) | RouteError::NoPort(..) => LocalFailure::NoRoute,
            RouteError::NoEndpoints(..) => LocalFailure::NoHealthyUpstream,
            RouteError::Tls(_) => LocalFailure::UnusableTls,
        }
    }
}

/// The chosen upstream for one request or connection.
#[derive(Debug, Clone)]
pub(super) struct Route {
    pub(super) svc: Arc<Service>,
    endpoint: Arc<Endpoint>,
    pub(super) addr: SocketAddr,
    pub(super) mode: TlsMode,
    pub(super) target: Target,
    /// Pool key (see [`MeshConnector`]).
    pub(super) key: Arc<str>,
    /// SIMPLE, MUTUAL: the DestinationRule files' client config in use.
    files: Option<Arc<Loaded>>,
    /// What the key was made from, to tell whether a later configuration
    /// still makes it.
    pub(super) origin: Arc<Origin>,
}

impl Route {
    pub(super) fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// What this proxy presents on the route's TLS connections.
    pub(super) fn presented(&self) -> Presented<'_> {
        match &self.files {
            Some(files) => Presented::Files(files),
            None => Presented::Workload,
        }
    }

    /// The response flag and access-log reason for a failed upstream
    /// connection or exchange: `UF` for a connect timeout (Envoy's flag
    /// for one) or a TLS failure (with words that say who refused what),
    /// else `flag` and the error as it is.
    pub(super) fn failure(
        &self,
        err: &(dyn std::error::Error + 'static),
        flag: Flag,
    ) -> (Flag, String) {
        let connect_failed = LocalFailure::ConnectFailed.flag();
        if let Some(t) = connect::timeout_of(err) {
            return (
                connect_failed,
                format!("upstream {} failed: {t}", self.addr),
            );
        }
        match dr_tls::tls_failure(err) {
            Some(f) => (
                connect_failed,
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
#[derive(Debug, Clone, Copy)]
pub(super) struct Fnv(pub(super) u64);

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
    /// The route of one request or connection: the service for `host`,
    /// the next endpoint in round robin, and how to connect to it. Routes
    /// are prepared once per host for a configuration and TLS state, so a
    /// request costs a lookup, not a rebuild.
    pub(super) fn route(
        &self,
        snap: &Arc<Snapshot>,
        host: &str,
        port_hint: Option<u16>,
    ) -> Result<Route, RouteError> {
        let state = &self.state;
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
                let (svc, port, endpoints) = service(snap, host, port_hint)?;
                let endpoints: EndpointRoutes = endpoints
                    .into_iter()
                    .map(|ep| self.prepare(snap, (host, port_hint), svc, port, ep))
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

    /// The route of an HTTP request for `host` (`name[:port]`). On a
    /// captured connection (`orig`, its original destination), a host
    /// without a port means the port dialed, and a host that names no
    /// service (an address, or a name the mesh does not know) goes to the
    /// original destination's owner.
    pub(super) fn route_request(
        &self,
        snap: &Arc<Snapshot>,
        host: &str,
        orig: Option<SocketAddr>,
    ) -> Result<Route, RouteError> {
        let port_hint = host
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse().ok())
            .or(orig.map(|o| o.port()));
        match (self.route(snap, host, port_hint), orig) {
            (Err(RouteError::NoService(_) | RouteError::NoPort(..)), Some(o)) => {
                self.route(snap, &address_host(o.ip()), Some(o.port()))
            }
            (r, _) => r,
        }
    }

    /// The route to `endpoint` of `svc` on service port `port`, for a
    /// request that named `host` (and `port_hint`).
    fn prepare(
        &self,
        snap: &Snapshot,
        (host, port_hint): (&str, Option<u16>),
        svc: &Arc<Service>,
        port: u16,
        endpoint: Endpoint,
    ) -> Result<Route, RouteError> {
        let state = &self.state;
        let shape = Shape::of(snap, host, svc, port, &endpoint)?;
        let Shape {
            addr,
            mode,
            h2,
            connect_timeout,
            ..
        } = shape;
        let mut key = shape.key;
        let mut files = None;
        let tls_state = state.tls();
        let tls = match shape.files {
            None if mode == TlsMode::Disable => None,
            None => {
                let config = tls_state
                    .client_for(&svc.identities, h2)
                    .map_err(|e| RouteError::Tls(e.to_string()))?;
                Some((config, ServerName::IpAddress(endpoint.address.into())))
            }
            Some((settings, name)) => {
                let loaded = state
                    .dr_files
                    .client(svc, settings, &state.metrics)
                    .map_err(RouteError::Tls)?;
                let config = Arc::clone(&loaded.config);
                files = Some(loaded);
                // The config's address: a reloaded one makes a new key, so
                // connections made with the previous certificate are not
                // handed to new requests. (Each pooled connection holds
                // its config, so an address is not reused while one
                // lives.)
                key.add(&(Arc::as_ptr(&config) as usize).to_ne_bytes());
                let server_name =
                    ServerName::try_from(name).map_err(|e| RouteError::Tls(e.to_string()))?;
                Some((config, server_name))
            }
        };
        // Connections to another workload come from this workload's
        // address (a loopback one only towards loopback: a packet from
        // 127.x cannot leave the host). Connections from another source
        // address are others: the workload's address changed.
        let source = snap.source_address.filter(|s| {
            endpoint.workload.is_some() && s.is_loopback() == endpoint.address.is_loopback()
        });
        if let Some(source) = source {
            match source {
                std::net::IpAddr::V4(a) => key.add(&a.octets()),
                std::net::IpAddr::V6(a) => key.add(&a.octets()),
            };
        }
        let target = Target {
            addr,
            source,
            tls,
            h2,
            connect_timeout,
            generation: tls_state.generation,
        };
        let key: Arc<str> = format!("m{:016x}.mesh:{}", key.0, addr.port()).into();
        let origin = Arc::new(Origin {
            key: Arc::clone(&key),
            host: host.into(),
            port_hint,
            endpoint: endpoint.address,
            spec: shape.key.0,
            version: snap.version,
        });
        Ok(Route {
            svc: Arc::clone(svc),
            endpoint: Arc::new(endpoint),
            addr,
            mode,
            target,
            key,
            files,
            origin,
        })
    }
}

/// Whether `snap` still makes the route `origin` was taken from: the
/// host still names a service with an endpoint at that address, for
/// which the key would say the same (address, port, mode, protocol,
/// connect timeout, expected identities or server name). A
/// DestinationRule file's client config is left out: a reloaded file
/// is the DestinationRule files' business, not a configuration change.
pub(super) fn still_made(snap: &Snapshot, origin: &Origin) -> bool {
    let Ok((svc, port, endpoints)) = service(snap, &origin.host, origin.port_hint) else {
        return false;
    };
    endpoints
        .iter()
        .filter(|ep| ep.address == origin.endpoint)
        .any(|ep| {
            Shape::of(snap, &origin.host, svc, port, ep).is_ok_and(|s| s.key.0 == origin.spec)
        })
}

/// The service for `host`, the service port the request is for, and
/// the endpoints it may go to now (never empty).
pub(super) fn service<'s>(
    snap: &'s Snapshot,
    host: &str,
    port_hint: Option<u16>,
) -> Result<(&'s Arc<Service>, u16, Vec<Endpoint>), RouteError> {
    // A host that is an address of the mesh (a service's VIP or an
    // endpoint's address: a captured connection's original destination,
    // or a request naming the address) goes to its owner.
    if let (Some(port), Ok(ip)) = (port_hint, strip_port(host).parse::<std::net::IpAddr>())
        && let Some(owner) = snap.owner_of(ip, port)
    {
        let svc = owner.service();
        let endpoints = match owner {
            Owner::Endpoint { endpoint, .. } => vec![endpoint.clone()],
            // NONE: to the address the application asked for.
            Owner::Service { .. } if svc.resolution == Resolution::None => {
                vec![svc.implicit.at(ip)]
            }
            Owner::Service { .. } => svc.endpoints_for(&svc.host).into_owned(),
        };
        if endpoints.is_empty() {
            let service = format!("{}/{}", svc.namespace, svc.name);
            return Err(RouteError::NoEndpoints(
                service,
                svc.why_no_endpoint(&svc.host),
            ));
        }
        return Ok((svc, owner.port(), endpoints));
    }
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
    // By the service's own host: `host` may be a short name of it.
    let endpoints = match original {
        Some(ip) => vec![svc.implicit.at(ip)],
        None => svc.endpoints_for(&svc.host).into_owned(),
    };
    if endpoints.is_empty() {
        let service = format!("{}/{}", svc.namespace, svc.name);
        return Err(RouteError::NoEndpoints(
            service,
            svc.why_no_endpoint(&svc.host),
        ));
    }
    Ok((svc, svc_port.number, endpoints))
}

/// A route before its TLS client config: where and how to connect, and
/// the pool key's hash of all that (everything but the client config of
/// a DestinationRule's files).
pub(super) struct Shape<'s> {
    pub(super) addr: SocketAddr,
    mode: TlsMode,
    h2: bool,
    connect_timeout: Duration,
    /// SIMPLE, MUTUAL: the DestinationRule's settings and the server name.
    files: Option<(&'s ClientTls, String)>,
    pub(super) key: Fnv,
}

impl<'s> Shape<'s> {
    /// The shape of the route to `endpoint` of `svc` on service port
    /// `port`, for a request that named `host`.
    pub(super) fn of(
        snap: &Snapshot,
        host: &str,
        svc: &'s Service,
        port: u16,
        endpoint: &Endpoint,
    ) -> Result<Shape<'s>, RouteError> {
        let svc_port = svc
            .ports
            .iter()
            .find(|sp| sp.number == port)
            .ok_or_else(|| RouteError::NoPort(svc.name.clone(), port))?;
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
        // With the connect timeout: a changed one applies to new connections.
        let connect_timeout = svc.connect_timeout_for(svc_port.number);
        key.add(&addr.port().to_be_bytes())
            .add(mode.as_str().as_bytes())
            .add(&[u8::from(h2)])
            .add(&connect_timeout.as_millis().to_be_bytes());
        let files = match mode {
            TlsMode::Disable => None,
            TlsMode::IstioMutual => {
                for id in &svc.identities {
                    key.add(id.as_bytes());
                }
                None
            }
            TlsMode::Simple | TlsMode::Mutual => {
                // SIMPLE and MUTUAL come only from a DestinationRule.
                let settings = svc.tls_for(svc_port.number).ok_or_else(|| {
                    RouteError::Tls("no DestinationRule TLS settings".to_string())
                })?;
                let name = settings
                    .sni
                    .clone()
                    .unwrap_or_else(|| strip_port(host).to_string());
                key.add(name.as_bytes());
                Some((settings, name))
            }
        };
        Ok(Shape {
            addr,
            mode,
            h2,
            connect_timeout,
            files,
            key,
        })
    }
}

/// The access record of an outbound connection or request (reporter
/// source) to `route`, without its HTTP fields: `flags` and `reason` say
/// how it ended; `bytes` are (received from the application, sent to it).
#[allow(clippy::too_many_arguments)]
pub(super) fn source_record(
    snap: &Snapshot,
    peer: SocketAddr,
    route: Option<&Route>,
    mtls: bool,
    kind: &'static str,
    (flags, reason): (Flag, String),
    started: std::time::Instant,
    (bytes_received, bytes_sent): (u64, u64),
) -> AccessRecord {
    AccessRecord {
        time: now_rfc3339(),
        kind,
        reporter: "source",
        src_addr: peer.to_string(),
        src_identity: Some(snap.identity.clone()),
        dst_addr: route.map(|r| r.addr.to_string()).unwrap_or_default(),
        dst_service: route.map(|r| r.svc.host.clone()),
        dst_identity: route
            .filter(|_| mtls)
            .map(|r| r.endpoint().identity.clone()),
        tls_mode: route.map_or("none", |r| tls_word(r.mode)),
        method: None,
        path: None,
        authority: None,
        request_id: None,
        response_code: None,
        response_flags: flags.as_str(),
        decision: Decision::carried(flags).as_str(),
        reason,
        policy: None,
        rule: None,
        explanation: String::new(),
        duration_ms: started.elapsed().as_secs_f64() * 1000.0,
        bytes_sent,
        bytes_received,
    }
}

pub(super) fn source_labels(
    snap: &Snapshot,
    route: Option<&Route>,
    protocol: &'static str,
    mtls: bool,
) -> TrafficLabels {
    let unknown = || UNKNOWN.to_string();
    let endpoint = route.map(|r| r.endpoint());
    let dst_ns = endpoint.map(|e| principal_parts(&e.identity).0);
    let destination = WorkloadLabels::of(
        endpoint.and_then(|e| e.workload.as_deref()),
        dst_ns.as_deref(),
    );
    let service = match route {
        Some(r) => {
            // Named as the destination proxy names it.
            let s = ServiceName::new(&r.svc.host, &r.svc.namespace);
            [s.host, s.name, s.namespace]
        }
        None => [unknown(), unknown(), unknown()],
    };
    TrafficLabels::new(
        "source",
        WorkloadLabels::of(Some(&snap.own), None),
        destination,
        (
            snap.identity.clone(),
            endpoint
                .filter(|_| mtls)
                .map_or_else(unknown, |e| e.identity.clone()),
        ),
        service,
        (protocol, mtls),
    )
}

/// A stable small key for a route's metric labels (FNV-1a of the
/// service's `namespace/name` and the endpoint's address, which decides
/// the `destination_workload` and principal), to tell its metric handles
/// apart in a connection's cache.
pub(super) fn route_tag(route: &Route) -> usize {
    let mut h = Fnv::new();
    h.add(route.svc.namespace.as_bytes())
        .add(route.svc.name.as_bytes());
    match route.endpoint().address {
        std::net::IpAddr::V4(a) => h.add(&a.octets()),
        std::net::IpAddr::V6(a) => h.add(&a.octets()),
    };
    // Tag 0 means "no route".
    (h.0 as usize) | 1
}

/// An outbound connection's span: the application's address and this
/// workload's identity; the destination fields are recorded once routed
/// ([`record_route`]). At `debug`, so that with the default filter it is
/// never built.
pub(super) fn connection_span(peer: SocketAddr, state: &crate::state::State) -> tracing::Span {
    if !tracing::level_enabled!(tracing::Level::DEBUG) {
        return tracing::Span::none();
    }
    tracing::debug_span!(
        "outbound",
        src.addr = %peer,
        src.identity = state.snapshot().identity.as_str(),
        dst.service = tracing::field::Empty,
        dst.addr = tracing::field::Empty,
        dst.identity = tracing::field::Empty,
        tls.mode = tracing::field::Empty,
    )
}

/// An outbound request's span (inside its connection's).
pub(super) fn request_span(method: &str, path: &str) -> tracing::Span {
    tracing::debug_span!(
        "request",
        method,
        path,
        dst.service = tracing::field::Empty,
        dst.addr = tracing::field::Empty,
        dst.identity = tracing::field::Empty,
        tls.mode = tracing::field::Empty,
    )
}

/// Records where `route` goes on `span` (an enabled one: see
/// `telemetry::current_span`).
pub(super) fn record_route(span: &tracing::Span, route: &Route) {
    span.record("dst.service", route.svc.host.as_str());
    span.record("dst.addr", tracing::field::display(route.addr));
    if route.mode != TlsMode::Disable {
        span.record("dst.identity", route.endpoint().identity.as_str());
    }
    span.record("tls.mode", tls_word(route.mode));
}

pub(super) fn tls_word(mode: TlsMode) -> &'static str {
    match mode {
        TlsMode::IstioMutual => "mutual_tls",
        TlsMode::Mutual => "mutual",
        TlsMode::Simple => "simple",
        TlsMode::Disable => "none",
    }
}

/// An address as a request's host names it (`10.0.0.1`, `[fd00::1]`).
pub(super) fn address_host(ip: std::net::IpAddr) -> String {
    match ip {
        std::net::IpAddr::V4(a) => a.to_string(),
        std::net::IpAddr::V6(a) => format!("[{a}]"),
    }
}
