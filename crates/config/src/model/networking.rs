//! `networking.istio.io` kinds that matter for security: DestinationRule (its
//! client TLS settings), ServiceEntry and WorkloadEntry (workloads and
//! services outside Kubernetes).

use std::collections::BTreeMap;
use std::time::Duration;

use crate::decode::{self, Fields};
use crate::diag::Sink;
use crate::model::{WorkloadSelector, check_label_key, check_label_value, check_name};
use crate::values;
use crate::yaml::Node;

/// Fields Istio defines that carry no security meaning; they are accepted
/// and ignored so that users can apply their existing manifests.
const IGNORED_TRAFFIC_POLICY: &[&str] = &[
    "loadBalancer",
    "outlierDetection",
    "tunnel",
    "proxyProtocol",
    "retryBudget",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TlsMode {
    Disable,
    Simple,
    Mutual,
    IstioMutual,
}

impl TlsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            TlsMode::Disable => "DISABLE",
            TlsMode::Simple => "SIMPLE",
            TlsMode::Mutual => "MUTUAL",
            TlsMode::IstioMutual => "ISTIO_MUTUAL",
        }
    }
}

/// `ClientTLSSettings`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTls {
    pub mode: TlsMode,
    pub client_certificate: Option<String>,
    pub private_key: Option<String>,
    pub ca_certificates: Option<String>,
    pub credential_name: Option<String>,
    pub subject_alt_names: Vec<String>,
    pub sni: Option<String>,
    pub insecure_skip_verify: bool,
    pub ca_crl: Option<String>,
}

/// `ConnectionPoolSettings`. meshward acts on `tcp.connectTimeout`; the
/// other settings are validated as Istio validates them, and otherwise
/// left alone (with a warning).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConnectionPool {
    /// `tcp.connectTimeout`: how long the proxy may take to connect to an
    /// endpoint, TLS handshake included (unset: `meshConfig.connectTimeout`).
    pub connect_timeout: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PortTrafficPolicy {
    pub port: u16,
    pub tls: Option<ClientTls>,
    pub connection_pool: Option<ConnectionPool>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TrafficPolicy {
    pub tls: Option<ClientTls>,
    pub connection_pool: Option<ConnectionPool>,
    pub port_level_settings: Vec<PortTrafficPolicy>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Subset {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub traffic_policy: Option<TrafficPolicy>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DestinationRule {
    pub host: String,
    pub traffic_policy: Option<TrafficPolicy>,
    pub subsets: Vec<Subset>,
    pub export_to: Vec<String>,
    pub workload_selector: Option<WorkloadSelector>,
}

impl DestinationRule {
    pub(crate) fn decode(sink: &mut Sink<'_>, node: &Node, path: &str) -> DestinationRule {
        let mut f = Fields::new(sink, node, path);
        let host_path = f.field_path("host");
        let host = f
            .require(sink, "host")
            .and_then(|n| decode::string(sink, n, &host_path))
            .unwrap_or_default();
        if host.is_empty() {
            sink.error(f.pos(), &host_path, "host must not be empty");
        }
        let tp_path = f.field_path("trafficPolicy");
        let traffic_policy = f
            .take("trafficPolicy")
            .map(|n| decode_traffic_policy(sink, n, &tp_path));
        let subsets = f
            .list(sink, "subsets", |sink, n, p| {
                let mut sf = Fields::new(sink, n, p);
                let name = sf.string(sink, "name").unwrap_or_default();
                if name.is_empty() {
                    sink.error(n.pos, &format!("{p}.name"), "subset name must not be empty");
                }
                let labels = sf.string_map(sink, "labels");
                let tp = format!("{p}.trafficPolicy");
                let traffic_policy = sf
                    .take("trafficPolicy")
                    .map(|n| decode_traffic_policy(sink, n, &tp));
                sf.finish(sink);
                Some(Subset {
                    name,
                    labels,
                    traffic_policy,
                })
            })
            .unwrap_or_default();
        let export_to = f.strings(sink, "exportTo");
        let ws_path = f.field_path("workloadSelector");
        let workload_selector = f
            .take("workloadSelector")
            .map(|n| WorkloadSelector::decode(sink, n, &ws_path));
        f.finish(sink);
        DestinationRule {
            host,
            traffic_policy,
            subsets,
            export_to,
            workload_selector,
        }
    }
}

fn decode_traffic_policy(sink: &mut Sink<'_>, node: &Node, path: &str) -> TrafficPolicy {
    let mut f = Fields::new(sink, node, path);
    for key in IGNORED_TRAFFIC_POLICY {
        f.ignore(key);
    }
    let tls_path = f.field_path("tls");
    let tls = f
        .take("tls")
        .and_then(|n| decode_client_tls(sink, n, &tls_path));
    let pool_path = f.field_path("connectionPool");
    let connection_pool = f
        .take("connectionPool")
        .map(|n| decode_connection_pool(sink, n, &pool_path));
    let mut seen = BTreeMap::new();
    let port_level_settings = f
        .list(sink, "portLevelSettings", |sink, n, p| {
            let mut pf = Fields::new(sink, n, p);
            for key in IGNORED_TRAFFIC_POLICY {
                pf.ignore(key);
            }
            let port_path = format!("{p}.port");
            // Istio's schema takes any uint32 here, and a missing number
            // is 0; a number that is no port (0, or above 65535) matches no
            // service port, so the entry never applies (a warning).
            let port = match pf.take("port") {
                Some(pn) => {
                    let mut nf = Fields::new(sink, pn, &port_path);
                    let num_path = format!("{port_path}.number");
                    let number = match nf.take("number") {
                        Some(x) => decode::integer(sink, x, &num_path),
                        None => Some(0),
                    };
                    nf.finish(sink);
                    match number {
                        Some(v) if (1..=65535).contains(&v) => Some(v as u16),
                        Some(v) if (0..=i64::from(u32::MAX)).contains(&v) => {
                            sink.warn(
                                pn.pos,
                                &num_path,
                                format!("port {v} is no service port (1-65535), so these settings never apply"),
                            );
                            None
                        }
                        Some(v) => {
                            sink.error(
                                pn.pos,
                                &num_path,
                                format!("port {v} is out of range (0-4294967295)"),
                            );
                            None
                        }
                        None => None,
                    }
                }
                None => {
                    sink.error(n.pos, &port_path, "port is required in portLevelSettings");
                    None
                }
            };
            let tls_path = format!("{p}.tls");
            let tls = pf
                .take("tls")
                .and_then(|t| decode_client_tls(sink, t, &tls_path));
            let pool_path = format!("{p}.connectionPool");
            let connection_pool = pf
                .take("connectionPool")
                .map(|c| decode_connection_pool(sink, c, &pool_path));
            pf.finish(sink);
            let port = port?;
            // Istio uses the first entry for a port (`GetPortLevelTrafficPolicy`
            // stops at it); a later one for the same port is never used.
            if let Some(first) = seen.insert(port, p.to_string()) {
                sink.warn(
                    n.pos,
                    &port_path,
                    format!("port {port} is already listed at {first}; as in Istio, only that first entry applies and this one is ignored"),
                );
                seen.insert(port, first);
                return None;
            }
            Some(PortTrafficPolicy {
                port,
                tls,
                connection_pool,
            })
        })
        .unwrap_or_default();
    f.finish(sink);
    TrafficPolicy {
        tls,
        connection_pool,
        port_level_settings,
    }
}

/// Decodes `connectionPool` with the checks of Istio's
/// `validateConnectionPool` (and the types of its CRD schema): counts are
/// non-negative int32s, durations at least 1ms in whole milliseconds (a
/// TCP `idleTimeout` of 0 turns it off), an HTTP/2 keepalive needs both
/// its interval and its timeout. Only `tcp.connectTimeout` is acted on;
/// any other setting present is named in one warning.
fn decode_connection_pool(sink: &mut Sink<'_>, node: &Node, path: &str) -> ConnectionPool {
    let mut f = Fields::new(sink, node, path);
    let mut pool = ConnectionPool::default();
    // Settings present that meshward does not act on, by field path.
    let mut ignored: Vec<String> = Vec::new();
    let (tcp_node, http_node) = (f.take("tcp"), f.take("http"));
    if tcp_node.is_none() && http_node.is_none() {
        sink.error(
            node.pos,
            path,
            "connection pool must have at least one field (tcp or http)",
        );
    }
    if let Some(n) = tcp_node {
        let mut t = Fields::new(sink, n, &decode::child(path, "tcp"));
        pool.connect_timeout = pool_duration(sink, &mut t, "connectTimeout", false);
        if pool_count(sink, &mut t, "maxConnections") {
            ignored.push("tcp.maxConnections".to_string());
        }
        for key in ["maxConnectionDuration", "idleTimeout"] {
            if pool_duration(sink, &mut t, key, key == "idleTimeout").is_some() {
                ignored.push(format!("tcp.{key}"));
            }
        }
        let ka_path = t.field_path("tcpKeepalive");
        if let Some(ka) = t.take("tcpKeepalive") {
            ignored.push("tcp.tcpKeepalive".to_string());
            let mut k = Fields::new(sink, ka, &ka_path);
            let probes_path = k.field_path("probes");
            if let Some(p) = k.take("probes")
                && let Some(v) = decode::integer(sink, p, &probes_path)
                && !(0..=i64::from(u32::MAX)).contains(&v)
            {
                sink.error(
                    p.pos,
                    &probes_path,
                    format!("probes {v} is out of range (0-4294967295)"),
                );
            }
            pool_duration(sink, &mut k, "time", false);
            pool_duration(sink, &mut k, "interval", false);
            k.finish(sink);
        }
        t.finish(sink);
    }
    if let Some(n) = http_node {
        let mut h = Fields::new(sink, n, &decode::child(path, "http"));
        for key in [
            "http1MaxPendingRequests",
            "http2MaxRequests",
            "maxRequestsPerConnection",
            "maxRetries",
            "maxConcurrentStreams",
        ] {
            if pool_count(sink, &mut h, key) {
                ignored.push(format!("http.{key}"));
            }
        }
        if pool_duration(sink, &mut h, "idleTimeout", false).is_some() {
            ignored.push("http.idleTimeout".to_string());
        }
        let policy_path = h.field_path("h2UpgradePolicy");
        let upgrade = match h.take("h2UpgradePolicy") {
            None => false,
            Some(p) => {
                ignored.push("http.h2UpgradePolicy".to_string());
                match decode::string(sink, p, &policy_path).as_deref() {
                    Some("UPGRADE") => true,
                    Some("DEFAULT" | "DO_NOT_UPGRADE") | None => false,
                    Some(other) => {
                        sink.error(p.pos, &policy_path, format!("unknown h2UpgradePolicy \"{other}\" (expected DEFAULT, DO_NOT_UPGRADE or UPGRADE)"));
                        false
                    }
                }
            }
        };
        let ucp_pos = h.peek("useClientProtocol").map_or(h.pos(), |n| n.pos);
        if let Some(use_client) = h.bool(sink, "useClientProtocol") {
            ignored.push("http.useClientProtocol".to_string());
            if use_client && upgrade {
                sink.error(
                    ucp_pos,
                    &h.field_path("useClientProtocol"),
                    "use client protocol must not be true when h2UpgradePolicy is UPGRADE",
                );
            }
        }
        let ka_path = h.field_path("http2KeepAlive");
        if let Some(ka) = h.take("http2KeepAlive") {
            ignored.push("http.http2KeepAlive".to_string());
            let mut k = Fields::new(sink, ka, &ka_path);
            for key in ["interval", "timeout"] {
                if k.peek(key).is_none() {
                    sink.error(
                        ka.pos,
                        &k.field_path(key),
                        format!("http2 keepalive {key} is required"),
                    );
                }
                pool_duration(sink, &mut k, key, false);
            }
            k.finish(sink);
        }
        h.finish(sink);
    }
    f.finish(sink);
    if !ignored.is_empty() {
        sink.warn(
            node.pos,
            path,
            format!(
                "meshward acts only on tcp.connectTimeout here; these settings are accepted and have no effect: {}",
                ignored.join(", ")
            ),
        );
    }
    pool
}

/// A non-negative int32 count of `connectionPool`; whether it is present.
fn pool_count(sink: &mut Sink<'_>, f: &mut Fields<'_>, key: &str) -> bool {
    let path = f.field_path(key);
    let Some(n) = f.take(key) else {
        return false;
    };
    match decode::integer(sink, n, &path) {
        Some(v) if v < 0 => sink.error(
            n.pos,
            &path,
            format!("{key} must be non-negative, found {v}"),
        ),
        Some(v) if v > i64::from(i32::MAX) => {
            sink.error(n.pos, &path, format!("{key} {v} is out of range (int32)"));
        }
        _ => {}
    }
    true
}

/// A duration of `connectionPool` (Istio's `ValidateDuration`: at least
/// 1ms, whole milliseconds; `zero_disables`: 0 is allowed too).
fn pool_duration(
    sink: &mut Sink<'_>,
    f: &mut Fields<'_>,
    key: &str,
    zero_disables: bool,
) -> Option<Duration> {
    let pos = f.peek(key).map_or(f.pos(), |n| n.pos);
    let path = f.field_path(key);
    let text = f.string(sink, key)?;
    let checked = super::security::parse_duration(&text).and_then(|secs| {
        if zero_disables && secs == 0.0 {
            Ok(secs)
        } else {
            super::security::check_duration(&text).map(|()| secs)
        }
    });
    match checked {
        Ok(secs) => Some(Duration::from_millis((secs * 1000.0).round() as u64)),
        Err(e) => {
            sink.error(pos, &path, e);
            None
        }
    }
}

fn decode_client_tls(sink: &mut Sink<'_>, node: &Node, path: &str) -> Option<ClientTls> {
    let mut f = Fields::new(sink, node, path);
    let mode_path = f.field_path("mode");
    let mode = match f.take("mode") {
        None => Some(TlsMode::Disable),
        Some(n) => decode::string(sink, n, &mode_path).and_then(|s| {
            Some(match s.as_str() {
                "DISABLE" => TlsMode::Disable,
                "SIMPLE" => TlsMode::Simple,
                "MUTUAL" => TlsMode::Mutual,
                "ISTIO_MUTUAL" => TlsMode::IstioMutual,
                _ => {
                    sink.error(n.pos, &mode_path, format!("unknown TLS mode \"{s}\" (expected DISABLE, SIMPLE, MUTUAL or ISTIO_MUTUAL)"));
                    return None;
                }
            })
        }),
    };
    let tls = ClientTls {
        mode: mode.unwrap_or(TlsMode::Disable),
        client_certificate: f.string(sink, "clientCertificate"),
        private_key: f.string(sink, "privateKey"),
        ca_certificates: f.string(sink, "caCertificates"),
        credential_name: f.string(sink, "credentialName"),
        subject_alt_names: f.strings(sink, "subjectAltNames"),
        sni: f.string(sink, "sni"),
        insecure_skip_verify: f.bool(sink, "insecureSkipVerify").unwrap_or(false),
        ca_crl: f.string(sink, "caCrl"),
    };
    f.finish(sink);
    let set = |o: &Option<String>| o.as_deref().is_some_and(|s| !s.is_empty());
    match tls.mode {
        TlsMode::IstioMutual => {
            for (name, v) in [
                ("clientCertificate", &tls.client_certificate),
                ("privateKey", &tls.private_key),
                ("caCertificates", &tls.ca_certificates),
                ("credentialName", &tls.credential_name),
            ] {
                if set(v) {
                    sink.warn(node.pos, &format!("{path}.{name}"), format!("{name} is ignored with ISTIO_MUTUAL (the mesh supplies the certificates)"));
                }
            }
        }
        TlsMode::Simple | TlsMode::Mutual if set(&tls.credential_name) => {
            for (name, v) in [
                ("clientCertificate", &tls.client_certificate),
                ("privateKey", &tls.private_key),
                ("caCertificates", &tls.ca_certificates),
                ("caCrl", &tls.ca_crl),
            ] {
                if set(v) {
                    sink.error(
                        node.pos,
                        &format!("{path}.{name}"),
                        format!("{name} cannot be set together with credentialName"),
                    );
                }
            }
        }
        TlsMode::Mutual => {
            for (name, v) in [
                ("clientCertificate", &tls.client_certificate),
                ("privateKey", &tls.private_key),
            ] {
                if !set(v) {
                    sink.error(
                        node.pos,
                        &format!("{path}.{name}"),
                        format!("MUTUAL TLS requires {name} (or credentialName)"),
                    );
                }
            }
        }
        TlsMode::Simple | TlsMode::Disable => {}
    }
    if tls.insecure_skip_verify {
        let conflict = match tls.mode {
            TlsMode::Simple => {
                set(&tls.ca_certificates)
                    || set(&tls.credential_name)
                    || !tls.subject_alt_names.is_empty()
            }
            TlsMode::Mutual => set(&tls.ca_certificates) || !tls.subject_alt_names.is_empty(),
            _ => false,
        };
        if conflict {
            sink.error(node.pos, &format!("{path}.insecureSkipVerify"), "cannot specify caCertificates, credentialName or subjectAltNames when insecureSkipVerify is true");
        }
    }
    mode.map(|_| tls)
}

// ---------------------------------------------------------------- ServiceEntry

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ServicePort {
    pub number: u16,
    /// Upper-cased protocol (`HTTP`, `HTTP2`, `GRPC`, `TCP`, `TLS`, ...), if given.
    pub protocol: Option<String>,
    pub name: String,
    pub target_port: Option<u16>,
}

/// How traffic on a port is handled, by Istio's protocol selection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AppProtocol {
    /// HTTP/1.1 (`http`, `grpc-web`).
    Http,
    /// HTTP/2 end to end (`http2`, `grpc`).
    Http2,
    /// Anything else is opaque TCP.
    Tcp,
}

impl AppProtocol {
    /// An explicit protocol wins, else the port name's prefix (`http-web`,
    /// `grpc`, ...), case-insensitively.
    pub fn select(name: &str, protocol: Option<&str>) -> AppProtocol {
        let p = protocol.map(str::to_ascii_uppercase).unwrap_or_else(|| {
            name.split('-')
                .next()
                .unwrap_or_default()
                .to_ascii_uppercase()
        });
        match p.as_str() {
            "HTTP" | "HTTP_PROXY" | "GRPC-WEB" => AppProtocol::Http,
            "HTTP2" | "GRPC" => AppProtocol::Http2,
            _ => AppProtocol::Tcp,
        }
    }

    pub fn is_http(self) -> bool {
        self != AppProtocol::Tcp
    }
}

impl ServicePort {
    /// How traffic on this port is handled.
    pub fn app_protocol(&self) -> AppProtocol {
        AppProtocol::select(&self.name, self.protocol.as_deref())
    }

    /// Whether traffic on this port is handled as HTTP.
    pub fn is_http(&self) -> bool {
        self.app_protocol().is_http()
    }
}

/// The protocols Istio's `protocol.Parse` knows (case-insensitively).
const PROTOCOLS: &[&str] = &[
    "HTTP",
    "HTTP_PROXY",
    "HTTPS",
    "GRPC",
    "GRPC-WEB",
    "HTTP2",
    "MONGO",
    "REDIS",
    "MYSQL",
    "TCP",
    "TLS",
    "UDP",
];

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ServiceEntry {
    pub hosts: Vec<String>,
    pub addresses: Vec<String>,
    pub ports: Vec<ServicePort>,
    pub location: Option<String>,
    pub resolution: Option<String>,
    pub endpoints: Vec<WorkloadEntry>,
    pub workload_selector: Option<BTreeMap<String, String>>,
    pub export_to: Vec<String>,
    pub subject_alt_names: Vec<String>,
}

impl ServiceEntry {
    pub(crate) fn decode(sink: &mut Sink<'_>, node: &Node, path: &str) -> ServiceEntry {
        let mut f = Fields::new(sink, node, path);
        let hosts_path = f.field_path("hosts");
        let hosts = f.strings(sink, "hosts");
        if hosts.is_empty() {
            sink.error(f.pos(), &hosts_path, "at least one host is required");
        }
        for (i, h) in hosts.iter().enumerate() {
            if h == "*" || h.is_empty() {
                sink.error(
                    f.pos(),
                    &format!("{hosts_path}[{i}]"),
                    format!("invalid host \"{h}\""),
                );
            }
        }
        let addresses = f.strings(sink, "addresses");
        for (i, a) in addresses.iter().enumerate() {
            if let Err(e) = values::parse_ip_block(a) {
                sink.error(f.pos(), &format!("{}[{i}]", f.field_path("addresses")), e);
            }
        }
        let mut names = BTreeMap::new();
        let mut numbers = BTreeMap::new();
        let ports = f
            .list(sink, "ports", |sink, n, p| {
                let port = decode_service_port(sink, n, p)?;
                if names.insert(port.name.clone(), ()).is_some() {
                    sink.error(
                        n.pos,
                        &format!("{p}.name"),
                        format!("port name \"{}\" is used more than once", port.name),
                    );
                }
                if numbers.insert(port.number, ()).is_some() {
                    sink.error(
                        n.pos,
                        &format!("{p}.number"),
                        format!("port number {} is used more than once", port.number),
                    );
                }
                Some(port)
            })
            .unwrap_or_default();
        let location = enum_field(
            sink,
            &mut f,
            "location",
            &["MESH_EXTERNAL", "MESH_INTERNAL"],
        );
        let resolution = enum_field(
            sink,
            &mut f,
            "resolution",
            &["NONE", "STATIC", "DNS", "DNS_ROUND_ROBIN", "DYNAMIC_DNS"],
        );
        let endpoints_path = f.field_path("endpoints");
        let endpoints_pos = f.peek("endpoints").map(|n| n.pos);
        let mut endpoint_pos = Vec::new();
        let endpoints = f
            .list(sink, "endpoints", |sink, n, p| {
                endpoint_pos.push(n.pos);
                Some(WorkloadEntry::decode(sink, n, p))
            })
            .unwrap_or_default();
        let ws_path = f.field_path("workloadSelector");
        let workload_selector = f.take("workloadSelector").map(|n| {
            let mut wf = Fields::new(sink, n, &ws_path);
            let labels = wf.string_map(sink, "labels");
            wf.finish(sink);
            labels
        });
        if workload_selector.is_some() && !endpoints.is_empty() {
            sink.error(
                f.pos(),
                &ws_path,
                "only one of workloadSelector or endpoints can be set",
            );
        }
        let export_to = f.strings(sink, "exportTo");
        let subject_alt_names = f.strings(sink, "subjectAltNames");
        let se = ServiceEntry {
            hosts,
            addresses,
            ports,
            location,
            resolution,
            endpoints,
            workload_selector,
            export_to,
            subject_alt_names,
        };
        let at = |i: usize| endpoint_pos.get(i).copied().unwrap_or(f.pos());
        se.check_resolution(
            sink,
            (f.pos(), &hosts_path),
            (endpoints_pos.unwrap_or(f.pos()), &endpoints_path),
            at,
            &f.field_path("addresses"),
        );
        f.finish(sink);
        se
    }

    /// How the proxy finds this service's endpoints (`resolution`,
    /// default `NONE` as in Istio).
    pub fn resolution(&self) -> Resolution {
        match self.resolution.as_deref() {
            Some("STATIC") => Resolution::Static,
            Some("DNS") => Resolution::Dns,
            Some("DNS_ROUND_ROBIN") => Resolution::DnsRoundRobin,
            _ => Resolution::None,
        }
    }

    /// Istio's rules for `resolution` (its `ValidateServiceEntry`): `NONE`
    /// takes no endpoints; `STATIC` endpoints are IP addresses; `DNS` and
    /// `DNS_ROUND_ROBIN` resolve their hosts when they have no endpoints
    /// (so those must be DNS names) and their endpoints' addresses
    /// otherwise (IPs or DNS names); `DNS_ROUND_ROBIN` takes at most one
    /// endpoint; CIDR `addresses` only go with `NONE` and `STATIC`.
    fn check_resolution(
        &self,
        sink: &mut Sink<'_>,
        (hosts_pos, hosts_path): (crate::yaml::Pos, &str),
        (endpoints_pos, endpoints_path): (crate::yaml::Pos, &str),
        endpoint_pos: impl Fn(usize) -> crate::yaml::Pos,
        addresses_path: &str,
    ) {
        let resolution = self.resolution();
        let name = resolution.as_str();
        let dns = matches!(resolution, Resolution::Dns | Resolution::DnsRoundRobin);
        if self.addresses.iter().any(|a| a.contains('/')) && dns {
            sink.error(
                hosts_pos,
                addresses_path,
                format!(
                    "CIDR addresses are allowed only for NONE/STATIC resolution types, not {name}"
                ),
            );
        }
        match resolution {
            Resolution::None if !self.endpoints.is_empty() => sink.error(
                endpoints_pos,
                endpoints_path,
                "no endpoints should be provided for resolution type NONE (the default): set resolution STATIC or DNS",
            ),
            Resolution::None => {}
            Resolution::Static => {
                for (i, e) in self.endpoints.iter().enumerate() {
                    let Some(addr) = e.address.as_deref().filter(|a| !a.is_empty()) else {
                        continue;
                    };
                    let path = format!("{endpoints_path}[{i}].address");
                    if addr.starts_with("unix://") {
                        sink.error(
                            endpoint_pos(i),
                            &path,
                            format!("endpoint address \"{addr}\": meshward does not support unix domain socket endpoints"),
                        );
                    } else if addr.parse::<std::net::IpAddr>().is_err() {
                        sink.error(
                            endpoint_pos(i),
                            &path,
                            format!("endpoint address \"{addr}\" is not a valid IP address (resolution STATIC; use DNS to resolve a host name)"),
                        );
                    }
                }
            }
            Resolution::Dns | Resolution::DnsRoundRobin => {
                if self.endpoints.is_empty() {
                    for (i, h) in self.hosts.iter().enumerate() {
                        if let Err(e) = values::check_fqdn(h) {
                            sink.error(
                                hosts_pos,
                                &format!("{hosts_path}[{i}]"),
                                format!("hosts must be FQDN if no endpoints are provided for resolution mode {name}: {e}"),
                            );
                        }
                    }
                }
                if resolution == Resolution::DnsRoundRobin && self.endpoints.len() > 1 {
                    sink.error(
                        endpoints_pos,
                        endpoints_path,
                        format!("there must only be 0 or 1 endpoint for resolution mode {name}"),
                    );
                }
                for (i, e) in self.endpoints.iter().enumerate() {
                    let Some(addr) = e.address.as_deref().filter(|a| !a.is_empty()) else {
                        continue;
                    };
                    if addr.parse::<std::net::IpAddr>().is_err() && values::check_fqdn(addr).is_err() {
                        sink.error(
                            endpoint_pos(i),
                            &format!("{endpoints_path}[{i}].address"),
                            format!("endpoint address \"{addr}\" is not a valid FQDN or an IP address"),
                        );
                    }
                }
            }
        }
    }
}

/// A ServiceEntry's `resolution`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Resolution {
    /// Connections go to the address the application asked for.
    None,
    /// The endpoints' IP addresses.
    Static,
    /// All the addresses the hosts (or endpoints) resolve to.
    Dns,
    /// One address of the host (or endpoint) per new connection.
    DnsRoundRobin,
}

impl Resolution {
    pub fn as_str(self) -> &'static str {
        match self {
            Resolution::None => "NONE",
            Resolution::Static => "STATIC",
            Resolution::Dns => "DNS",
            Resolution::DnsRoundRobin => "DNS_ROUND_ROBIN",
        }
    }
}

fn enum_field(
    sink: &mut Sink<'_>,
    f: &mut Fields<'_>,
    key: &str,
    allowed: &[&str],
) -> Option<String> {
    let path = f.field_path(key);
    let node = f.take(key)?;
    let s = decode::string(sink, node, &path)?;
    if allowed.contains(&s.as_str()) {
        Some(s)
    } else {
        sink.error(
            node.pos,
            &path,
            format!(
                "unknown value \"{s}\" (expected one of {})",
                allowed.join(", ")
            ),
        );
        None
    }
}

fn port_number(sink: &mut Sink<'_>, node: &Node, path: &str) -> Option<u16> {
    let v = decode::integer(sink, node, path)?;
    if (1..=65535).contains(&v) {
        Some(v as u16)
    } else {
        sink.error(
            node.pos,
            path,
            format!("port {v} is out of range (1-65535)"),
        );
        None
    }
}

fn decode_service_port(sink: &mut Sink<'_>, node: &Node, path: &str) -> Option<ServicePort> {
    let mut f = Fields::new(sink, node, path);
    let num_path = f.field_path("number");
    let number = f
        .require(sink, "number")
        .and_then(|n| port_number(sink, n, &num_path));
    let proto_path = f.field_path("protocol");
    let protocol = f.take("protocol").and_then(|n| {
        let s = decode::string(sink, n, &proto_path)?;
        let upper = s.to_ascii_uppercase();
        if PROTOCOLS.contains(&upper.as_str()) {
            Some(upper)
        } else {
            sink.error(
                n.pos,
                &proto_path,
                format!(
                    "unknown protocol \"{s}\" (expected one of {})",
                    PROTOCOLS.join(", ")
                ),
            );
            None
        }
    });
    let name_path = f.field_path("name");
    let name = f
        .require(sink, "name")
        .and_then(|n| decode::string(sink, n, &name_path))
        .unwrap_or_default();
    let tp_path = f.field_path("targetPort");
    let target_port = f
        .take("targetPort")
        .and_then(|n| port_number(sink, n, &tp_path));
    f.finish(sink);
    Some(ServicePort {
        number: number?,
        protocol,
        name,
        target_port,
    })
}

// ---------------------------------------------------------------- WorkloadEntry

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WorkloadEntry {
    pub address: Option<String>,
    pub ports: BTreeMap<String, u16>,
    pub labels: BTreeMap<String, String>,
    pub network: Option<String>,
    pub locality: Option<String>,
    pub weight: Option<u32>,
    pub service_account: Option<String>,
}

impl WorkloadEntry {
    pub(crate) fn decode(sink: &mut Sink<'_>, node: &Node, path: &str) -> WorkloadEntry {
        let mut f = Fields::new(sink, node, path);
        let address = f.string(sink, "address");
        let mut ports = BTreeMap::new();
        let ports_path = f.field_path("ports");
        if let Some(pn) = f.take("ports") {
            if let crate::yaml::Value::Map(entries) = &pn.value {
                for (k, v) in entries {
                    let name = k.scalar_text().unwrap_or_default().to_string();
                    if let Some(p) = port_number(sink, v, &format!("{ports_path}.{name}")) {
                        ports.insert(name, p);
                    }
                }
            } else {
                sink.error(
                    pn.pos,
                    &ports_path,
                    format!(
                        "expected a mapping of port name to number, found {}",
                        pn.type_name()
                    ),
                );
            }
        }
        let labels = f.string_map(sink, "labels");
        for (k, v) in &labels {
            let field = format!("{}.{k}", f.field_path("labels"));
            if let Err(e) = check_label_key(k).and_then(|_| check_label_value(v)) {
                sink.error(f.pos(), &field, e);
            }
        }
        let network = f.string(sink, "network");
        let locality = f.string(sink, "locality");
        let weight_path = f.field_path("weight");
        let weight = f
            .take("weight")
            .and_then(|n| decode::integer(sink, n, &weight_path))
            .and_then(|w| u32::try_from(w).ok());
        let sa_path = f.field_path("serviceAccount");
        let service_account = f.string(sink, "serviceAccount");
        if let Some(sa) = &service_account
            && let Err(e) = check_name(sa)
        {
            // Istio takes any string of at most 253 characters; what it can
            // become is a SPIFFE ID path segment.
            let segment = !sa.is_empty()
                && sa != "."
                && sa != ".."
                && sa
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
            if segment && sa.len() <= 253 {
                sink.warn(
                    f.pos(),
                    &sa_path,
                    format!("{e}; it is kept as written, as in Istio, so the workload's identity ends in /sa/{sa}"),
                );
            } else {
                sink.error(
                    f.pos(),
                    &sa_path,
                    format!(
                        "{e}, and cannot be part of a SPIFFE ID (letters, digits, '.', '-' and '_')"
                    ),
                );
            }
        }
        if address.as_deref().is_none_or(str::is_empty) && network.is_none() {
            sink.error(
                f.pos(),
                &f.field_path("address"),
                "address is required (unless network is set)",
            );
        }
        f.finish(sink);
        WorkloadEntry {
            address,
            ports,
            labels,
            network,
            locality,
            weight,
            service_account,
        }
    }
}
