//! What one proxy needs from the mesh configuration: its own workload
//! (ports, where the application listens, its compiled policies) and the
//! services it may call (hosts, ports, endpoints, identities, TLS settings).
//!
//! A snapshot is immutable; a configuration change builds a new one, which
//! is swapped in atomically (see [`crate::state`]).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use meshward_config::model::networking::{ClientTls, Resolution, TlsMode};
use meshward_config::model::{AppProtocol, ServicePort, WorkloadEntry};
use meshward_config::{ConfigSet, Resource};
use meshward_policy::{PolicyEngine, Workload, WorkloadPolicy, destination_rule, service_visible};

pub use self::by_address::Owner;
use crate::dns::{DnsName, DnsStore};
use crate::dns_proxy::NameTable;
use crate::jwt::{JwksStore, JwtPolicy};
use crate::peers::{Registry, ServiceName, WorkloadMeta};

use meshward_config::annotations::{APP_PORTS, OUTBOUND, TCP_OUTBOUND};

/// Why a snapshot cannot be built for this proxy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    #[error("no WorkloadEntry {0} in the configuration")]
    UnknownWorkload(String),
    #[error("WorkloadEntry {workload}: {annotation}: {reason}")]
    BadAnnotation {
        workload: String,
        annotation: &'static str,
        reason: String,
    },
    #[error("WorkloadEntry {0} has no address")]
    NoAddress(String),
    /// A command-line override that does not fit the WorkloadEntry.
    #[error("WorkloadEntry {workload}: {flag}: {reason}")]
    BadOverride {
        workload: String,
        flag: &'static str,
        reason: String,
    },
}

/// How traffic on a port is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Http,
    Tcp,
}

/// One inbound port of this workload.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct InboundPort {
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
    /// Where the application listens.
    pub app: SocketAddr,
    /// The application speaks HTTP/2 (cleartext, prior knowledge) on this
    /// port: protocol `GRPC` or `HTTP2`.
    pub app_h2: bool,
    /// The service this port serves (`destination_service`): the first
    /// host of the ServiceEntries that select the workload and have it.
    pub service: Option<ServiceName>,
}

impl InboundPort {
    /// A port the workload does not declare, reached through capture at
    /// `orig`: opaque TCP to the application at that address (Istio's
    /// inbound passthrough).
    pub fn passthrough(orig: SocketAddr) -> InboundPort {
        InboundPort {
            name: "passthrough".to_string(),
            port: orig.port(),
            protocol: Protocol::Tcp,
            app: orig,
            app_h2: false,
            service: None,
        }
    }
}

/// One endpoint of a service.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Endpoint {
    pub address: IpAddr,
    /// Port name to number (the endpoint's own ports).
    pub ports: BTreeMap<String, u16>,
    /// `spiffe://...` identity the endpoint must present.
    pub identity: String,
    pub has_proxy: bool,
    /// The WorkloadEntry it is, when it is one (`destination_workload`
    /// and the other workload labels of the reporter=source metrics);
    /// `namespace/name` in `/config_dump`.
    #[serde(serialize_with = "workload_key")]
    pub workload: Option<Arc<WorkloadMeta>>,
}

fn workload_key<S: serde::Serializer>(
    w: &Option<Arc<WorkloadMeta>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match w {
        Some(m) => s.serialize_str(&format!("{}/{}", m.namespace, m.name)),
        None => s.serialize_none(),
    }
}

/// The facts of an endpoint whose address is not known when the snapshot
/// is built: one a DNS name stands for, or the original destination of a
/// request to a `NONE` service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointFacts {
    pub ports: BTreeMap<String, u16>,
    pub identity: String,
    pub has_proxy: bool,
    pub workload: Option<Arc<WorkloadMeta>>,
}

impl EndpointFacts {
    pub fn at(&self, address: IpAddr) -> Endpoint {
        Endpoint {
            address,
            ports: self.ports.clone(),
            identity: self.identity.clone(),
            has_proxy: self.has_proxy,
            workload: self.workload.clone(),
        }
    }
}

/// An endpoint whose address is a DNS name, resolved in the background
/// ([`crate::dns`]): each address of the current answer is an endpoint
/// with these facts.
#[derive(Debug, Clone)]
pub struct DnsEndpoint {
    pub name: Arc<DnsName>,
    /// A ServiceEntry without endpoints resolves each of its hosts for the
    /// requests that name that host (Istio makes a service per host); an
    /// endpoint's name serves every request (`None`).
    pub for_host: Option<String>,
    pub facts: EndpointFacts,
}

impl PartialEq for DnsEndpoint {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.name, &other.name)
            && self.for_host == other.for_host
            && self.facts == other.facts
    }
}

/// A service the workload may call.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    /// The host this service is called by (a ServiceEntry with several
    /// hosts is one service per host, as in Istio, since each host may
    /// have a DestinationRule of its own).
    pub host: String,
    #[serde(skip)]
    pub ports: Vec<ServicePort>,
    /// The endpoints with an IP address.
    pub endpoints: Vec<Endpoint>,
    /// The ServiceEntry's `resolution`.
    #[serde(skip)]
    pub resolution: Resolution,
    /// Endpoints that are DNS names (`DNS`, `DNS_ROUND_ROBIN`).
    #[serde(skip)]
    pub dns: Vec<DnsEndpoint>,
    /// The ServiceEntry's `addresses`: under `NONE`, a request whose host
    /// is an IP in one of them goes to that IP.
    #[serde(skip)]
    pub addresses: Vec<ipnet::IpNet>,
    /// The addresses meshward allocated to the host (IPv4 and IPv6, see
    /// [`crate::vip`]) when its ServiceEntry has no `addresses`, its
    /// resolution is not `NONE` and the host is not a wildcard; else empty.
    #[serde(skip)]
    pub allocated: Vec<IpAddr>,
    /// The facts of an endpoint the ServiceEntry does not list.
    #[serde(skip)]
    pub implicit: EndpointFacts,
    /// Identities a server of this service may present (secure naming).
    pub identities: Vec<String>,
    /// The DestinationRule that applies to this proxy's calls to the
    /// host (`namespace/name`), chosen as Istio chooses it.
    pub destination_rule: Option<String>,
    /// DestinationRule TLS settings: default and per port.
    #[serde(skip)]
    pub tls: Option<ClientTls>,
    #[serde(skip)]
    /// Per port: the port-level entry's settings, `None` when it has none
    /// (it does not inherit the rule's).
    pub port_tls: BTreeMap<u16, Option<ClientTls>>,
    /// How long a connection to an endpoint may take, TLS handshake
    /// included: the DestinationRule's `connectTimeout`, else the mesh's.
    #[serde(skip)]
    pub connect_timeout: Duration,
    /// The same for the ports the DestinationRule's `portLevelSettings`
    /// list (which inherit nothing from the rule's own settings).
    #[serde(skip)]
    pub port_connect_timeout: BTreeMap<u16, Duration>,
}

impl Service {
    /// The `addresses` that are single IPs (not CIDR blocks).
    pub fn explicit_addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.addresses
            .iter()
            .filter(|n| n.prefix_len() == n.max_prefix_len())
            .map(|n| n.addr())
    }

    /// The addresses a DNS query for the host is answered with: the
    /// ServiceEntry's single-IP `addresses`, else the allocated ones
    /// (empty when it has neither).
    pub fn dns_addresses(&self) -> Vec<IpAddr> {
        let explicit: Vec<IpAddr> = self.explicit_addresses().collect();
        if explicit.is_empty() {
            self.allocated.clone()
        } else {
            explicit
        }
    }

    /// The endpoints a request for `host` may go to now: those with an IP
    /// address, then the current addresses of the DNS names that serve
    /// `host` (all of them under `DNS`, as Envoy's STRICT_DNS cluster; only
    /// the first under `DNS_ROUND_ROBIN`, as its LOGICAL_DNS cluster). Reads
    /// the DNS slots, never waits on DNS.
    pub fn endpoints_for(&self, host: &str) -> Cow<'_, [Endpoint]> {
        if self.dns.is_empty() {
            return Cow::Borrowed(&self.endpoints);
        }
        let host = bare_host(host);
        let mut out = self.endpoints.clone();
        for d in &self.dns {
            if d.for_host.as_deref().is_some_and(|h| h != host) {
                continue;
            }
            let addresses = d.name.addresses();
            let take = match self.resolution {
                Resolution::DnsRoundRobin => 1,
                _ => addresses.len(),
            };
            out.extend(addresses.iter().take(take).map(|a| d.facts.at(*a)));
        }
        Cow::Owned(out)
    }

    /// The DNS names that serve `host`.
    pub fn dns_names_for(&self, host: &str) -> impl Iterator<Item = &Arc<DnsName>> {
        let host = bare_host(host);
        self.dns
            .iter()
            .filter(move |d| d.for_host.as_deref().is_none_or(|h| h == host))
            .map(|d| &d.name)
    }

    /// Why a request for `host` has no endpoint now (for its `503` and
    /// its log line).
    pub fn why_no_endpoint(&self, host: &str) -> String {
        let names: Vec<_> = self.dns_names_for(host).collect();
        if !names.is_empty() {
            let list: Vec<&str> = names.iter().map(|n| n.name()).collect();
            let error = names
                .iter()
                .find_map(|n| n.answer().last_error.clone())
                .map(|(e, _)| format!(" (last lookup: {e})"));
            return format!(
                "DNS name {} has no address yet{}",
                list.join(", "),
                error.unwrap_or_default()
            );
        }
        if self.resolution == Resolution::None && self.dns.is_empty() {
            return "resolution NONE and no endpoints: without traffic capture the proxy \
                    knows no original destination for a request by host name (send it to \
                    an IP of the service's addresses, or use resolution STATIC or DNS)"
                .to_string();
        }
        "no endpoints".to_string()
    }

    /// How long a connection to an endpoint of service port `port` may
    /// take (TCP connect and TLS handshake).
    pub fn connect_timeout_for(&self, port: u16) -> Duration {
        self.port_connect_timeout
            .get(&port)
            .copied()
            .unwrap_or(self.connect_timeout)
    }

    /// The client TLS settings for a service port, if a DestinationRule sets them.
    pub fn tls_for(&self, port: u16) -> Option<&ClientTls> {
        match self.port_tls.get(&port) {
            Some(port_level) => port_level.as_ref(),
            None => self.tls.as_ref(),
        }
    }

    /// The endpoint port for a service port: the same name on the endpoint,
    /// else the target port, else the service port number.
    pub fn endpoint_port(&self, svc_port: &ServicePort, ep: &Endpoint) -> u16 {
        ep.ports
            .get(&svc_port.name)
            .copied()
            .or(svc_port.target_port)
            .unwrap_or(svc_port.number)
    }
}

/// A TCP outbound listener: local address to service host and port.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TcpOutbound {
    pub listen: SocketAddr,
    pub host: String,
    pub port: u16,
}

/// This proxy's view of the mesh.
#[derive(Debug)]
pub struct Snapshot {
    pub version: u64,
    pub config: Arc<ConfigSet>,
    pub workload_name: String,
    pub workload: Workload,
    pub identity: String,
    pub address: IpAddr,
    pub inbound: Vec<InboundPort>,
    pub outbound: Option<SocketAddr>,
    pub tcp_outbound: Vec<TcpOutbound>,
    pub policy: WorkloadPolicy,
    /// The workload's RequestAuthentication rules.
    pub jwt: JwtPolicy,
    pub services: Vec<Arc<Service>>,
    /// How long a connection to the application may take
    /// (`meshConfig.connectTimeout`).
    pub app_connect_timeout: Duration,
    /// Every workload of the mesh, to name peers ([`crate::peers`]).
    pub peers: Registry,
    /// This workload's metric labels.
    pub own: Arc<WorkloadMeta>,
    /// The local address outbound connections to other workloads are made
    /// from: the workload's address when it is assigned to this host (as
    /// a pod's connections come from the pod IP), so that a destination
    /// sees the caller's workload address as its peer.
    pub source_address: Option<IpAddr>,
    /// The DNS proxy's names: each visible mesh host (and the short names
    /// of `name.ns.svc.cluster.local` hosts) with its addresses.
    pub names: NameTable,
    /// Lower-case host (without port), and the short names of
    /// Kubernetes-style hosts, to service index.
    hosts: BTreeMap<String, usize>,
    /// Traffic capture's listeners, when capture is on.
    pub capture: Option<crate::capture::CaptureListen>,
    /// Service addresses (single-IP `addresses`, allocated ones) and
    /// endpoint addresses to their owners.
    by_address: by_address::AddressIndex,
}

impl Snapshot {
    /// The workload's name without its namespace (`name` of
    /// `namespace/name`; empty when it has no namespace part), as Istio's
    /// `*_workload` metric labels show it.
    pub fn workload_short_name(&self) -> &str {
        self.workload_name.split('/').nth(1).unwrap_or_default()
    }

    /// Builds the view of workload `ns/name` (a WorkloadEntry); `jwks`
    /// holds the keys of the `jwksUri`s its rules name, `dns` the
    /// addresses of the DNS names its services name.
    #[cfg(test)]
    pub fn build(
        config: Arc<ConfigSet>,
        workload_name: &str,
        version: u64,
        jwks: &JwksStore,
        dns: &DnsStore,
    ) -> Result<Snapshot, SnapshotError> {
        let none = crate::Overrides::default();
        Snapshot::build_with(config, workload_name, version, (jwks, dns), &none)
    }

    /// `Snapshot::build` with the command line's `overrides` of the
    /// WorkloadEntry's annotations (`--outbound`, `--app-port`).
    pub fn build_with(
        config: Arc<ConfigSet>,
        workload_name: &str,
        version: u64,
        (jwks, dns): (&JwksStore, &DnsStore),
        overrides: &crate::Overrides,
    ) -> Result<Snapshot, SnapshotError> {
        let (ns, name) = workload_name
            .split_once('/')
            .unwrap_or(("default", workload_name));
        let entry = config
            .workload_entries
            .iter()
            .find(|e| e.meta.namespace == ns && e.meta.name == name)
            .ok_or_else(|| SnapshotError::UnknownWorkload(workload_name.to_string()))?;
        let bad = |annotation: &'static str, reason: String| SnapshotError::BadAnnotation {
            workload: workload_name.to_string(),
            annotation,
            reason,
        };
        let address: IpAddr = entry
            .spec
            .address
            .as_deref()
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| SnapshotError::NoAddress(workload_name.to_string()))?;
        let mut app_ports = parse_app_ports(entry).map_err(|r| bad(APP_PORTS, r))?;
        for (port_name, addr) in &overrides.app_ports {
            if !entry.spec.ports.contains_key(port_name) {
                let known: Vec<&str> = entry.spec.ports.keys().map(String::as_str).collect();
                return Err(SnapshotError::BadOverride {
                    workload: workload_name.to_string(),
                    flag: "--app-port",
                    reason: format!(
                        "port \"{port_name}\" is not one of the WorkloadEntry's ports ({})",
                        known.join(", ")
                    ),
                });
            }
            app_ports.insert(port_name.clone(), *addr);
        }
        let protocols = port_protocols(&config, entry);
        let mut port_services = crate::peers::port_services(&config, entry);
        let mut inbound = Vec::new();
        for (port_name, port) in &entry.spec.ports {
            // Under capture the application listens on its own port of
            // the workload's address (Istio sends inbound traffic to the
            // pod IP); else on loopback.
            let default_app = match overrides.capture {
                Some(_) => address,
                None => IpAddr::from([127, 0, 0, 1]),
            };
            let app = app_ports
                .get(port_name.as_str())
                .copied()
                .unwrap_or(SocketAddr::new(default_app, *port));
            let (protocol, app_h2) = protocols
                .get(port)
                .copied()
                .unwrap_or_else(|| inbound_protocol(port_name, None));
            inbound.push(InboundPort {
                name: port_name.clone(),
                port: *port,
                protocol,
                app,
                app_h2,
                service: port_services.remove(port),
            });
        }
        let outbound = match entry.meta.annotations.get(OUTBOUND) {
            Some(v) => Some(
                v.parse()
                    .map_err(|_| bad(OUTBOUND, format!("\"{v}\" is not an address:port")))?,
            ),
            None => None,
        };
        let outbound = overrides.outbound.or(outbound);
        let tcp_outbound = parse_tcp_outbound(entry).map_err(|r| bad(TCP_OUTBOUND, r))?;
        let workload = Workload::from_entry(entry);
        let identity = format!("spiffe://{}", workload.principal(&config.mesh.trust_domain));
        let engine = PolicyEngine::new(Arc::clone(&config));
        let policy = engine.workload(&workload);
        let jwt = JwtPolicy::compile(engine.request_authentications(&workload), jwks);
        let peers = Registry::build(&config);
        let allocation = crate::vip::Allocation::of(&config);
        let (services, mut hosts) = build_services(&config, &workload, dns, &peers, &allocation);
        // A request may name a Kubernetes-style host by its short names
        // (`catalog`, `catalog.production`), as the DNS proxy answers
        // them: a full host wins, then the first service.
        for (i, svc) in services.iter().enumerate() {
            for alt in crate::dns_proxy::short_names(&svc.host, &workload.namespace) {
                hosts.entry(alt).or_insert(i);
            }
        }
        let by_address = by_address::AddressIndex::build(&services);
        let names = NameTable::build(&services, &workload.namespace);
        let own = peers
            .named(ns, name)
            .cloned()
            .unwrap_or_else(|| Arc::new(WorkloadMeta::of(entry)));
        Ok(Snapshot {
            version,
            workload_name: workload_name.to_string(),
            workload,
            identity,
            address,
            inbound,
            outbound,
            tcp_outbound,
            policy,
            jwt,
            services,
            app_connect_timeout: config.mesh.connect_timeout,
            peers,
            own,
            source_address: source_address(address),
            capture: overrides.capture,
            by_address,
            names,
            hosts,
            config,
        })
    }

    /// The service a Host header names (port and case ignored).
    pub fn service_for_host(&self, host: &str) -> Option<&Arc<Service>> {
        self.hosts.get(&bare_host(host)).map(|i| &self.services[*i])
    }

    /// A request whose host is an IP address (`10.1.2.3:8080`) has that
    /// address as its original destination: the first `resolution: NONE`
    /// service whose `addresses` contain it, and the IP.
    pub fn original_destination(&self, host: &str) -> Option<(&Arc<Service>, IpAddr)> {
        let ip: IpAddr = strip_port(host).parse().ok()?;
        self.services
            .iter()
            .find(|s| {
                s.resolution == Resolution::None && s.addresses.iter().any(|n| n.contains(&ip))
            })
            .map(|s| (s, ip))
    }

    /// The service or endpoint that owns `ip`:`port`, the original
    /// destination of a captured connection ([`by_address`]).
    pub fn owner_of(&self, ip: IpAddr, port: u16) -> Option<Owner<'_>> {
        self.by_address.owner(&self.services, ip, port)
    }

    pub fn inbound_port(&self, port: u16) -> Option<&InboundPort> {
        self.inbound.iter().find(|p| p.port == port)
    }

    /// The effective client TLS mode towards an endpoint: the
    /// DestinationRule's, else auto-mTLS (mTLS when the endpoint has a
    /// proxy, plaintext when it does not).
    pub fn tls_mode(&self, svc: &Service, port: u16, ep: &Endpoint) -> TlsMode {
        match svc.tls_for(port) {
            Some(tls) => tls.mode,
            None if ep.has_proxy && self.config.mesh.enable_auto_mtls => TlsMode::IstioMutual,
            None => TlsMode::Disable,
        }
    }
}

/// `address` when a socket can be bound to it on this host (it is one of
/// the host's addresses, as each workload's loopback address is under
/// `meshward up`), else `None`, said once at INFO.
fn source_address(address: IpAddr) -> Option<IpAddr> {
    if address.is_unspecified() {
        return None;
    }
    match std::net::TcpListener::bind(SocketAddr::new(address, 0)) {
        Ok(_) => Some(address),
        Err(e) => {
            tracing::info!(
                target: "meshward::outbound",
                address = %address,
                error = %e,
                "the workload's address is not one of this host's: outbound connections are made from an address the system picks"
            );
            None
        }
    }
}

/// A host as services are keyed: no port, lower case, no final dot.
fn bare_host(host: &str) -> String {
    strip_port(host).trim_end_matches('.').to_ascii_lowercase()
}

/// `host:port` or `[v6]:port` to host.
pub fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

/// The inbound handling of a port (HTTP or TCP) and whether the
/// application speaks HTTP/2, from Istio's protocol selection.
fn inbound_protocol(name: &str, protocol: Option<&str>) -> (Protocol, bool) {
    let p = AppProtocol::select(name, protocol);
    let handling = if p.is_http() {
        Protocol::Http
    } else {
        Protocol::Tcp
    };
    (handling, p == AppProtocol::Http2)
}

fn parse_app_ports(
    entry: &Resource<WorkloadEntry>,
) -> Result<BTreeMap<String, SocketAddr>, String> {
    let mut out = BTreeMap::new();
    let Some(v) = entry.meta.annotations.get(APP_PORTS) else {
        return Ok(out);
    };
    for item in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (name, addr) = item
            .split_once('=')
            .ok_or_else(|| format!("\"{item}\" is not name=address"))?;
        if !entry.spec.ports.contains_key(name) {
            return Err(format!(
                "port \"{name}\" is not one of the WorkloadEntry's ports"
            ));
        }
        let addr = match addr.parse::<u16>() {
            Ok(p) => SocketAddr::new(IpAddr::from([127, 0, 0, 1]), p),
            Err(_) => addr
                .parse()
                .map_err(|_| format!("\"{addr}\" is not a port or address:port"))?,
        };
        out.insert(name.to_string(), addr);
    }
    Ok(out)
}

fn parse_tcp_outbound(entry: &Resource<WorkloadEntry>) -> Result<Vec<TcpOutbound>, String> {
    let mut out = Vec::new();
    let Some(v) = entry.meta.annotations.get(TCP_OUTBOUND) else {
        return Ok(out);
    };
    for item in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (listen, target) = item
            .split_once('=')
            .ok_or_else(|| format!("\"{item}\" is not listen=host:port"))?;
        let listen = listen
            .parse()
            .map_err(|_| format!("\"{listen}\" is not an address:port"))?;
        let (host, port) = target
            .rsplit_once(':')
            .ok_or_else(|| format!("\"{target}\" is not host:port"))?;
        let port = port
            .parse()
            .map_err(|_| format!("\"{port}\" is not a port"))?;
        out.push(TcpOutbound {
            listen,
            host: host.to_ascii_lowercase(),
            port,
        });
    }
    Ok(out)
}

/// The ports of the ServiceEntries that select workload `entry` (in its
/// namespace, by `workloadSelector`), each with the workload port it
/// reaches: the WorkloadEntry's port of that name, else `targetPort`, else
/// the service port's number.
pub(crate) fn selected_service_ports<'a>(
    config: &'a ConfigSet,
    entry: &'a Resource<WorkloadEntry>,
) -> impl Iterator<
    Item = (
        &'a Resource<meshward_config::model::ServiceEntry>,
        &'a ServicePort,
        u16,
    ),
> + 'a {
    config
        .service_entries
        .iter()
        .filter(move |se| {
            se.meta.namespace == entry.meta.namespace
                && se
                    .spec
                    .workload_selector
                    .as_ref()
                    .is_some_and(|sel| sel.iter().all(|(k, v)| entry.spec.labels.get(k) == Some(v)))
        })
        .flat_map(move |se| {
            se.spec.ports.iter().map(move |p| {
                let number = entry
                    .spec
                    .ports
                    .get(&p.name)
                    .copied()
                    .or(p.target_port)
                    .unwrap_or(p.number);
                (se, p, number)
            })
        })
}

/// Protocols of this workload's ports, from the ServiceEntries selecting it.
fn port_protocols(
    config: &ConfigSet,
    entry: &Resource<WorkloadEntry>,
) -> BTreeMap<u16, (Protocol, bool)> {
    let mut out = BTreeMap::new();
    for (_, p, number) in selected_service_ports(config, entry) {
        out.entry(number)
            .or_insert_with(|| inbound_protocol(&p.name, p.protocol.as_deref()));
    }
    out
}

/// The services `client` sees, one per ServiceEntry host (as Istio makes
/// one service per host), each with the DestinationRule that applies to
/// calls from `client` to it.
fn build_services(
    config: &ConfigSet,
    client: &Workload,
    dns: &DnsStore,
    peers: &Registry,
    allocation: &crate::vip::Allocation,
) -> (Vec<Arc<Service>>, BTreeMap<String, usize>) {
    let td = &config.mesh.trust_domain;
    let mut services = Vec::new();
    let mut hosts = BTreeMap::new();
    for se in &config.service_entries {
        if !service_visible(&se.spec.export_to, &se.meta.namespace, &client.namespace) {
            continue;
        }
        let ns = &se.meta.namespace;
        let resolution = se.spec.resolution();
        let by_dns = matches!(resolution, Resolution::Dns | Resolution::DnsRoundRobin);
        // Endpoints the entry lists have no sidecar unless the ServiceEntry
        // is annotated otherwise; selected WorkloadEntries have one unless
        // they are.
        let external_has_proxy =
            meshward_config::annotations::listed_endpoints_have_proxy(&se.meta);
        let facts = |e: &WorkloadEntry, ns: &str, has_proxy: bool| EndpointFacts {
            workload: None,
            ports: e.ports.clone(),
            identity: format!(
                "spiffe://{td}/ns/{ns}/sa/{}",
                e.service_account.as_deref().unwrap_or("default")
            ),
            has_proxy,
        };
        let implicit = facts(&WorkloadEntry::default(), ns, external_has_proxy);
        let mut endpoints = Vec::new();
        let mut dns_endpoints = Vec::new();
        let mut add = |e: &WorkloadEntry,
                       ns: &str,
                       has_proxy: bool,
                       workload: Option<Arc<WorkloadMeta>>| {
            let Some(address) = e.address.as_deref().filter(|a| !a.is_empty()) else {
                return;
            };
            let facts = EndpointFacts {
                workload,
                ..facts(e, ns, has_proxy)
            };
            match address.parse::<IpAddr>() {
                Ok(ip) => endpoints.push(facts.at(ip)),
                Err(_) if by_dns => dns_endpoints.push(DnsEndpoint {
                    name: dns.get(address),
                    for_host: None,
                    facts,
                }),
                Err(_) => tracing::warn!(
                    target: "meshward::config",
                    service = %format!("{ns}/{}", se.meta.name),
                    address,
                    "endpoint skipped: its address is a host name, which only resolution DNS or DNS_ROUND_ROBIN resolves"
                ),
            }
        };
        match &se.spec.workload_selector {
            Some(sel) => {
                for we in &config.workload_entries {
                    let selected = &we.meta.namespace == ns
                        && sel.iter().all(|(k, v)| we.spec.labels.get(k) == Some(v));
                    if selected {
                        let has_proxy = meshward_config::annotations::workload_has_proxy(&we.meta);
                        add(
                            &we.spec,
                            &we.meta.namespace,
                            has_proxy,
                            peers.named(&we.meta.namespace, &we.meta.name).cloned(),
                        );
                    }
                }
            }
            // Istio resolves the hosts themselves when a DNS entry lists
            // no endpoints and selects none, each for its own requests.
            None if by_dns && se.spec.endpoints.is_empty() => {
                for h in &se.spec.hosts {
                    dns_endpoints.push(DnsEndpoint {
                        name: dns.get(h),
                        for_host: Some(bare_host(h)),
                        facts: implicit.clone(),
                    });
                }
            }
            None => {
                for e in &se.spec.endpoints {
                    add(e, ns, external_has_proxy, None);
                }
            }
        }
        if resolution == Resolution::None
            && endpoints.is_empty()
            && se.spec.workload_selector.is_none()
        {
            tracing::info!(
                target: "meshward::config",
                service = %format!("{ns}/{}", se.meta.name),
                "resolution NONE without endpoints: requests naming its hosts get 503 (UH), as the proxy knows no original destination without traffic capture; a request to an IP in its addresses goes to that IP"
            );
        }
        let mut identities: Vec<String> = endpoints
            .iter()
            .map(|e| e.identity.clone())
            .chain(dns_endpoints.iter().map(|d| d.facts.identity.clone()))
            .collect();
        identities.extend(se.spec.subject_alt_names.iter().cloned());
        identities.sort();
        identities.dedup();
        let addresses: Vec<ipnet::IpNet> = se
            .spec
            .addresses
            .iter()
            .filter_map(|a| meshward_config::values::parse_ip_block(a).ok())
            .collect();
        for original in &se.spec.hosts {
            let host = bare_host(original);
            // One ServiceEntry owns a host: the client's own namespace's,
            // else the oldest, as Istio's sidecar scope picks it.
            let slot = match hosts.get(&host) {
                None => services.len(),
                Some(&i) => {
                    let owner: &Arc<Service> = &services[i];
                    if owner.namespace == client.namespace || se.meta.namespace != client.namespace
                    {
                        continue;
                    }
                    i
                }
            };
            let dr = destination_rule(config, client, &host, &se.meta.namespace);
            let (tls, port_tls) = dr.as_ref().map(|d| d.tls()).unwrap_or_default();
            let mesh_timeout = config.mesh.connect_timeout;
            let (timeout, port_timeouts) = dr
                .as_ref()
                .map(|d| d.connect_timeouts())
                .unwrap_or_default();
            let service = Arc::new(Service {
                namespace: se.meta.namespace.clone(),
                name: se.meta.name.clone(),
                host: host.clone(),
                ports: se.spec.ports.clone(),
                endpoints: endpoints.clone(),
                resolution,
                dns: dns_endpoints
                    .iter()
                    .filter(|d| d.for_host.as_ref().is_none_or(|h| *h == host))
                    .cloned()
                    .collect(),
                addresses: addresses.clone(),
                allocated: if crate::vip::eligible(&se.spec, original) {
                    allocation
                        .addresses(&host)
                        .map(Vec::from)
                        .unwrap_or_default()
                } else {
                    Vec::new()
                },
                implicit: implicit.clone(),
                identities: identities.clone(),
                destination_rule: dr.map(|d| d.source().key()),
                tls,
                port_tls,
                connect_timeout: timeout.unwrap_or(mesh_timeout),
                port_connect_timeout: port_timeouts
                    .into_iter()
                    .map(|(port, t)| (port, t.unwrap_or(mesh_timeout)))
                    .collect(),
            });
            if slot == services.len() {
                hosts.insert(host, slot);
                services.push(service);
            } else {
                services[slot] = service;
            }
        }
    }
    (services, hosts)
}

pub mod by_address;
#[cfg(test)]
mod tests;
