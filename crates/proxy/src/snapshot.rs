//! What one proxy needs from the mesh configuration: its own workload
//! (ports, where the application listens, its compiled policies) and the
//! services it may call (hosts, ports, endpoints, identities, TLS settings).
//!
//! A snapshot is immutable; a configuration change builds a new one, which
//! is swapped in atomically (see [`crate::state`]).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use meshward_config::model::networking::{ClientTls, TlsMode};
use meshward_config::model::{AppProtocol, ServicePort, WorkloadEntry};
use meshward_config::{ConfigSet, Resource};
use meshward_policy::{PolicyEngine, Workload, WorkloadPolicy, destination_rule, service_visible};

use crate::jwt::{JwksStore, JwtPolicy};

/// Annotation on a WorkloadEntry: where the application listens, per port
/// name: `"http=127.0.0.1:18080,metrics=19090"` (a bare port means
/// 127.0.0.1). Default: 127.0.0.1 and the workload port.
pub const APP_PORTS: &str = "meshward.io/app-ports";
/// Annotation on a WorkloadEntry: `"false"` when the workload runs without a
/// sidecar, so callers send it plaintext under auto-mTLS.
pub const HAS_PROXY: &str = "meshward.io/proxy";
/// Annotation on a WorkloadEntry: the address of its outbound HTTP
/// listener (where the application sends plaintext requests), e.g.
/// `"127.0.0.1:15001"`.
pub const OUTBOUND: &str = "meshward.io/outbound";
/// Annotation on a WorkloadEntry: local TCP listeners for TCP services,
/// `"127.0.0.1:15432=db.prod.svc.cluster.local:5432,..."`.
pub const TCP_OUTBOUND: &str = "meshward.io/tcp-outbound";

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
    pub endpoints: Vec<Endpoint>,
    /// Identities a server of this service may present (secure naming).
    pub identities: Vec<String>,
    /// The DestinationRule that applies to this proxy's calls to the
    /// host (`namespace/name`), chosen as Istio chooses it.
    pub destination_rule: Option<String>,
    /// DestinationRule TLS settings: default and per port.
    #[serde(skip)]
    pub tls: Option<ClientTls>,
    #[serde(skip)]
    pub port_tls: BTreeMap<u16, ClientTls>,
}

impl Service {
    /// The client TLS settings for a service port, if a DestinationRule sets them.
    pub fn tls_for(&self, port: u16) -> Option<&ClientTls> {
        self.port_tls.get(&port).or(self.tls.as_ref())
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
    /// Lower-case host (without port) to service index.
    hosts: BTreeMap<String, usize>,
}

impl Snapshot {
    /// Builds the view of workload `ns/name` (a WorkloadEntry); `jwks`
    /// holds the keys of the `jwksUri`s its rules name.
    pub fn build(
        config: Arc<ConfigSet>,
        workload_name: &str,
        version: u64,
        jwks: &JwksStore,
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
        let app_ports = parse_app_ports(entry).map_err(|r| bad(APP_PORTS, r))?;
        let protocols = port_protocols(&config, entry);
        let mut inbound = Vec::new();
        for (port_name, port) in &entry.spec.ports {
            let app = app_ports
                .get(port_name.as_str())
                .copied()
                .unwrap_or(SocketAddr::new(IpAddr::from([127, 0, 0, 1]), *port));
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
            });
        }
        let outbound = match entry.meta.annotations.get(OUTBOUND) {
            Some(v) => Some(
                v.parse()
                    .map_err(|_| bad(OUTBOUND, format!("\"{v}\" is not an address:port")))?,
            ),
            None => None,
        };
        let tcp_outbound = parse_tcp_outbound(entry).map_err(|r| bad(TCP_OUTBOUND, r))?;
        let workload = Workload::from_entry(entry);
        let identity = format!("spiffe://{}", workload.principal(&config.mesh.trust_domain));
        let engine = PolicyEngine::new(Arc::clone(&config));
        let policy = engine.workload(&workload);
        let jwt = JwtPolicy::compile(engine.request_authentications(&workload), jwks);
        let (services, hosts) = build_services(&config, &workload);
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
            hosts,
            config,
        })
    }

    /// The service a Host header names (port and case ignored).
    pub fn service_for_host(&self, host: &str) -> Option<&Arc<Service>> {
        let bare = strip_port(host).to_ascii_lowercase();
        let bare = bare.trim_end_matches('.');
        self.hosts.get(bare).map(|i| &self.services[*i])
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

/// Protocols of this workload's ports, from the ServiceEntries selecting it.
fn port_protocols(
    config: &ConfigSet,
    entry: &Resource<WorkloadEntry>,
) -> BTreeMap<u16, (Protocol, bool)> {
    let mut out = BTreeMap::new();
    for se in &config.service_entries {
        let selects =
            se.meta.namespace == entry.meta.namespace
                && se.spec.workload_selector.as_ref().is_some_and(|sel| {
                    sel.iter().all(|(k, v)| entry.spec.labels.get(k) == Some(v))
                });
        if !selects {
            continue;
        }
        for p in &se.spec.ports {
            let number = entry
                .spec
                .ports
                .get(&p.name)
                .copied()
                .or(p.target_port)
                .unwrap_or(p.number);
            out.entry(number)
                .or_insert_with(|| inbound_protocol(&p.name, p.protocol.as_deref()));
        }
    }
    out
}

/// The services `client` sees, one per ServiceEntry host (as Istio makes
/// one service per host), each with the DestinationRule that applies to
/// calls from `client` to it.
fn build_services(
    config: &ConfigSet,
    client: &Workload,
) -> (Vec<Arc<Service>>, BTreeMap<String, usize>) {
    let td = &config.mesh.trust_domain;
    let mut services = Vec::new();
    let mut hosts = BTreeMap::new();
    for se in &config.service_entries {
        if !service_visible(&se.spec.export_to, &se.meta.namespace, &client.namespace) {
            continue;
        }
        let mut endpoints = Vec::new();
        let endpoint_of =
            |e: &WorkloadEntry, ns: &str, annotations: Option<&BTreeMap<String, String>>| {
                let address = e.address.as_deref()?.parse().ok()?;
                let sa = e
                    .service_account
                    .clone()
                    .unwrap_or_else(|| "default".to_string());
                let has_proxy = annotations
                    .and_then(|a| a.get(HAS_PROXY))
                    .is_none_or(|v| v != "false");
                Some(Endpoint {
                    address,
                    ports: e.ports.clone(),
                    identity: format!("spiffe://{td}/ns/{ns}/sa/{sa}"),
                    has_proxy,
                })
            };
        match &se.spec.workload_selector {
            Some(sel) => {
                for we in &config.workload_entries {
                    let selected = we.meta.namespace == se.meta.namespace
                        && sel.iter().all(|(k, v)| we.spec.labels.get(k) == Some(v));
                    if selected {
                        endpoints.extend(endpoint_of(
                            &we.spec,
                            &we.meta.namespace,
                            Some(&we.meta.annotations),
                        ));
                    }
                }
            }
            None => {
                for e in &se.spec.endpoints {
                    // Inline endpoints of an external service have no sidecar
                    // unless annotated otherwise on the ServiceEntry.
                    let mut ep = endpoint_of(e, &se.meta.namespace, Some(&se.meta.annotations));
                    if let Some(ep) = ep.as_mut() {
                        ep.has_proxy = se
                            .meta
                            .annotations
                            .get(HAS_PROXY)
                            .is_some_and(|v| v == "true");
                    }
                    endpoints.extend(ep);
                }
            }
        }
        let mut identities: Vec<String> = endpoints.iter().map(|e| e.identity.clone()).collect();
        identities.extend(se.spec.subject_alt_names.iter().cloned());
        identities.sort();
        identities.dedup();
        for host in &se.spec.hosts {
            let host = host.to_ascii_lowercase();
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
            let service = Arc::new(Service {
                namespace: se.meta.namespace.clone(),
                name: se.meta.name.clone(),
                host: host.clone(),
                ports: se.spec.ports.clone(),
                endpoints: endpoints.clone(),
                identities: identities.clone(),
                destination_rule: dr.map(|d| d.source().key()),
                tls,
                port_tls,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(yaml: &str, workload: &str) -> Result<Snapshot, SnapshotError> {
        let mut loader = meshward_config::Loader::new();
        loader.add_source("test.yaml", yaml);
        let config = loader.finish().unwrap_or_else(|d| panic!("{d}")).config;
        Snapshot::build(Arc::new(config), workload, 1, &JwksStore::default())
    }

    const BASE: &str = r#"
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: api
  namespace: prod
  annotations:
    meshward.io/app-ports: "http=127.0.0.1:18080, grpc-api=19090"
    meshward.io/outbound: "127.0.0.1:15001"
    meshward.io/tcp-outbound: "127.0.0.1:15432=DB.prod.svc.cluster.local:5432"
spec:
  address: 127.0.0.1
  labels: {app: api}
  serviceAccount: api-sa
  ports: {http: 8080, grpc-api: 9090, db: 5432, tcp-raw: 7000}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: prod}
spec:
  hosts: [api.prod.svc.cluster.local]
  ports: [{number: 80, name: db, protocol: HTTP, targetPort: 5432}]
  workloadSelector: {labels: {app: api}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: legacy
  namespace: prod
  annotations: {meshward.io/proxy: "false"}
spec: {address: 10.0.0.9, labels: {app: legacy}, ports: {http: 80}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: legacy, namespace: prod}
spec:
  hosts: [legacy.prod.svc.cluster.local]
  ports: [{number: 80, name: http}]
  workloadSelector: {labels: {app: legacy}}
"#;

    #[test]
    fn workload_ports_protocols_and_app_addresses() {
        let s = snapshot(BASE, "prod/api").unwrap();
        assert_eq!(s.identity, "spiffe://cluster.local/ns/prod/sa/api-sa");
        let port = |n: u16| s.inbound_port(n).unwrap().clone();
        assert_eq!(port(8080).protocol, Protocol::Http);
        assert_eq!(port(8080).app, "127.0.0.1:18080".parse().unwrap());
        assert_eq!(port(9090).protocol, Protocol::Http, "grpc prefix");
        assert_eq!(
            port(9090).app,
            "127.0.0.1:19090".parse().unwrap(),
            "bare port means 127.0.0.1"
        );
        assert_eq!(
            port(5432).protocol,
            Protocol::Http,
            "the ServiceEntry protocol wins over the name"
        );
        assert_eq!(port(7000).protocol, Protocol::Tcp);
        assert_eq!(
            port(7000).app,
            "127.0.0.1:7000".parse().unwrap(),
            "default: same port on 127.0.0.1"
        );
        assert_eq!(s.outbound, Some("127.0.0.1:15001".parse().unwrap()));
        assert_eq!(s.tcp_outbound[0].host, "db.prod.svc.cluster.local");
        assert_eq!(s.tcp_outbound[0].port, 5432);
    }

    #[test]
    fn services_hosts_and_auto_mtls() {
        let s = snapshot(BASE, "prod/api").unwrap();
        let legacy = s
            .service_for_host("Legacy.Prod.svc.cluster.local:80")
            .unwrap();
        assert_eq!(
            legacy.endpoints[0].identity,
            "spiffe://cluster.local/ns/prod/sa/default"
        );
        assert!(!legacy.endpoints[0].has_proxy);
        assert_eq!(
            s.tls_mode(legacy, 80, &legacy.endpoints[0]),
            TlsMode::Disable
        );
        let api = s.service_for_host("api.prod.svc.cluster.local").unwrap();
        assert_eq!(s.tls_mode(api, 80, &api.endpoints[0]), TlsMode::IstioMutual);
        assert_eq!(api.endpoint_port(&api.ports[0], &api.endpoints[0]), 5432);
        assert!(s.service_for_host("unknown.host").is_none());
    }

    #[test]
    fn destination_rule_port_settings_override_auto_mtls() {
        let dr = "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: legacy, namespace: prod}\nspec:\n  host: legacy\n  trafficPolicy:\n    tls: {mode: ISTIO_MUTUAL}\n    portLevelSettings:\n    - port: {number: 80}\n      tls: {mode: DISABLE}\n";
        let s = snapshot(&format!("{BASE}{dr}"), "prod/api").unwrap();
        let legacy = s.service_for_host("legacy.prod.svc.cluster.local").unwrap();
        assert_eq!(
            s.tls_mode(legacy, 80, &legacy.endpoints[0]),
            TlsMode::Disable
        );
        assert_eq!(
            s.tls_mode(legacy, 81, &legacy.endpoints[0]),
            TlsMode::IstioMutual
        );
    }

    #[test]
    fn bad_bootstrap_facts_are_errors() {
        assert_eq!(
            snapshot(BASE, "prod/nope").unwrap_err(),
            SnapshotError::UnknownWorkload("prod/nope".into())
        );
        let bad = BASE.replace("http=127.0.0.1:18080, grpc-api=19090", "http=nowhere");
        assert!(matches!(
            snapshot(&bad, "prod/api").unwrap_err(),
            SnapshotError::BadAnnotation {
                annotation: APP_PORTS,
                ..
            }
        ));
        let bad = BASE.replace("http=127.0.0.1:18080, grpc-api=19090", "metrics=9000");
        assert!(
            snapshot(&bad, "prod/api")
                .unwrap_err()
                .to_string()
                .contains("not one of the WorkloadEntry's ports")
        );
        let bad = BASE.replace("\"127.0.0.1:15001\"", "\"localhost\"");
        assert!(matches!(
            snapshot(&bad, "prod/api").unwrap_err(),
            SnapshotError::BadAnnotation {
                annotation: OUTBOUND,
                ..
            }
        ));
        let bad = BASE.replace("=DB.prod.svc.cluster.local:5432", "");
        assert!(matches!(
            snapshot(&bad, "prod/api").unwrap_err(),
            SnapshotError::BadAnnotation {
                annotation: TCP_OUTBOUND,
                ..
            }
        ));
        let bad = BASE.replace("address: 127.0.0.1", "address: api.example.com");
        assert_eq!(
            snapshot(&bad, "prod/api").unwrap_err(),
            SnapshotError::NoAddress("prod/api".into())
        );
    }

    #[test]
    fn hosts_without_ports() {
        assert_eq!(strip_port("a.b:8080"), "a.b");
        assert_eq!(strip_port("a.b"), "a.b");
        assert_eq!(strip_port("[::1]:80"), "::1");
        assert_eq!(inbound_protocol("http-web", None).0, Protocol::Http);
        assert_eq!(
            inbound_protocol("web", Some("grpc")),
            (Protocol::Http, true)
        );
        assert_eq!(inbound_protocol("https", None).0, Protocol::Tcp);
    }
}
