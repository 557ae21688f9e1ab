//! The mesh's workloads as the metrics name them: every WorkloadEntry of
//! the configuration, with Istio's standard workload labels (`app`,
//! `version`, canonical service and revision), found by identity (an mTLS
//! peer) or by address (a plaintext peer, or a peer whose service account
//! several workloads share).
//!
//! Built once per snapshot; a connection resolves its peer once.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use meshward_config::ConfigSet;
use meshward_config::Resource;
use meshward_config::model::WorkloadEntry;

/// What Istio's metrics say of a workload when it is not known.
pub const UNKNOWN: &str = "unknown";

/// Label: Istio's canonical service of a workload.
pub const CANONICAL_NAME: &str = "service.istio.io/canonical-name";
/// Label: Istio's canonical revision of a workload.
pub const CANONICAL_REVISION: &str = "service.istio.io/canonical-revision";
const K8S_NAME: &str = "app.kubernetes.io/name";
const K8S_VERSION: &str = "app.kubernetes.io/version";

/// One workload (a WorkloadEntry) as Istio's standard metric labels name
/// it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct WorkloadMeta {
    /// The WorkloadEntry's `metadata.name` (`*_workload`).
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    /// Label `app`, else `app.kubernetes.io/name`, else `unknown`.
    pub app: String,
    /// Label `version`, else `app.kubernetes.io/version`, else `unknown`.
    pub version: String,
    /// Label `service.istio.io/canonical-name`, else
    /// `app.kubernetes.io/name`, else `app`, else the workload's name.
    pub canonical_service: String,
    /// Label `service.istio.io/canonical-revision`, else
    /// `app.kubernetes.io/version`, else `version`, else `latest`.
    pub canonical_revision: String,
    /// Its address, when it is an IP.
    pub address: Option<IpAddr>,
}

impl WorkloadMeta {
    /// The metadata of a WorkloadEntry; its `spec.labels` first, then its
    /// `metadata.labels`.
    pub fn of(entry: &Resource<WorkloadEntry>) -> WorkloadMeta {
        let label = |key: &str| {
            entry
                .spec
                .labels
                .get(key)
                .or_else(|| entry.meta.labels.get(key))
                .filter(|v| !v.is_empty())
                .cloned()
        };
        let first = |keys: &[&str]| keys.iter().find_map(|k| label(k));
        WorkloadMeta {
            name: entry.meta.name.clone(),
            namespace: entry.meta.namespace.clone(),
            service_account: entry
                .spec
                .service_account
                .clone()
                .unwrap_or_else(|| "default".to_string()),
            app: first(&["app", K8S_NAME]).unwrap_or_else(|| UNKNOWN.to_string()),
            version: first(&["version", K8S_VERSION]).unwrap_or_else(|| UNKNOWN.to_string()),
            canonical_service: first(&[CANONICAL_NAME, K8S_NAME, "app"])
                .unwrap_or_else(|| entry.meta.name.clone()),
            canonical_revision: first(&[CANONICAL_REVISION, K8S_VERSION, "version"])
                .unwrap_or_else(|| "latest".to_string()),
            address: entry.spec.address.as_deref().and_then(|a| a.parse().ok()),
        }
    }
}

/// The workload labels of one side of a request, as the metrics write
/// them (`unknown` where nothing is known).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadLabels {
    pub workload: String,
    pub namespace: String,
    pub app: String,
    pub version: String,
    pub canonical_service: String,
    pub canonical_revision: String,
}

impl WorkloadLabels {
    /// The labels of `meta`, or of an unknown workload in `namespace`
    /// (`unknown` when that is not known either).
    pub fn of(meta: Option<&WorkloadMeta>, namespace: Option<&str>) -> WorkloadLabels {
        match meta {
            Some(m) => WorkloadLabels {
                workload: m.name.clone(),
                namespace: m.namespace.clone(),
                app: m.app.clone(),
                version: m.version.clone(),
                canonical_service: m.canonical_service.clone(),
                canonical_revision: m.canonical_revision.clone(),
            },
            None => {
                let unknown = || UNKNOWN.to_string();
                WorkloadLabels {
                    workload: unknown(),
                    namespace: namespace.map_or_else(unknown, str::to_string),
                    app: unknown(),
                    version: unknown(),
                    canonical_service: unknown(),
                    canonical_revision: unknown(),
                }
            }
        }
    }
}

/// The service a workload port belongs to, as `destination_service*`
/// name it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ServiceName {
    /// The ServiceEntry's host (`destination_service`).
    pub host: String,
    /// Its short name (`destination_service_name`): the first label of a
    /// `NAME.NAMESPACE.svc...` host, else the host.
    pub name: String,
    /// The ServiceEntry's namespace.
    pub namespace: String,
}

impl ServiceName {
    pub fn new(host: &str, namespace: &str) -> ServiceName {
        let short = match host.split_once('.') {
            Some((first, rest))
                if rest
                    .strip_prefix(namespace)
                    .is_some_and(|r| r.starts_with(".svc")) =>
            {
                first
            }
            _ => host,
        };
        ServiceName {
            host: host.to_string(),
            name: short.to_string(),
            namespace: namespace.to_string(),
        }
    }
}

/// Every workload of the mesh, by identity and by address.
#[derive(Debug, Default)]
pub struct Registry {
    /// By namespace, then service account (looked up without allocating).
    by_identity: HashMap<String, HashMap<String, Vec<Arc<WorkloadMeta>>>>,
    by_address: HashMap<IpAddr, Vec<Arc<WorkloadMeta>>>,
    by_name: HashMap<(String, String), Arc<WorkloadMeta>>,
    /// The trust domains whose identities name workloads of this mesh
    /// (the mesh's and its aliases).
    trust_domains: Vec<String>,
}

impl Registry {
    /// The workloads of `config`.
    pub fn build(config: &ConfigSet) -> Registry {
        let mut r = Registry {
            trust_domains: std::iter::once(&config.mesh.trust_domain)
                .chain(&config.mesh.trust_domain_aliases)
                .cloned()
                .collect(),
            ..Registry::default()
        };
        for entry in &config.workload_entries {
            let meta = Arc::new(WorkloadMeta::of(entry));
            r.by_identity
                .entry(meta.namespace.clone())
                .or_default()
                .entry(meta.service_account.clone())
                .or_default()
                .push(Arc::clone(&meta));
            if let Some(ip) = meta.address {
                r.by_address.entry(ip).or_default().push(Arc::clone(&meta));
            }
            r.by_name
                .insert((meta.namespace.clone(), meta.name.clone()), meta);
        }
        r
    }

    /// The workload `namespace/name`.
    pub fn named(&self, namespace: &str, name: &str) -> Option<&Arc<WorkloadMeta>> {
        self.by_name.get(&(namespace.to_string(), name.to_string()))
    }

    /// The workload a peer is: for an mTLS peer (`identity`,
    /// `spiffe://TD/ns/NS/sa/SA` of an accepted trust domain) the one
    /// workload with that namespace and service account, or among several
    /// the one at the peer's address; for a plaintext peer the one
    /// workload at its address. `None` when that is not exactly one.
    pub fn resolve(&self, identity: Option<&str>, ip: IpAddr) -> Option<Arc<WorkloadMeta>> {
        let at_ip = |list: &[Arc<WorkloadMeta>]| {
            let mut found = list.iter().filter(|m| m.address == Some(ip));
            match (found.next(), found.next()) {
                (Some(one), None) => Some(Arc::clone(one)),
                _ => None,
            }
        };
        match identity {
            Some(id) => {
                let (td, ns, sa) = spiffe_parts(id)?;
                if !self.trust_domains.iter().any(|t| t == td) {
                    return None;
                }
                let list = self.by_identity.get(ns)?.get(sa)?;
                match list.as_slice() {
                    [one] => Some(Arc::clone(one)),
                    several => at_ip(several),
                }
            }
            None => at_ip(self.by_address.get(&ip)?),
        }
    }
}

/// `spiffe://TD/ns/NS/sa/SA` to (TD, NS, SA).
fn spiffe_parts(id: &str) -> Option<(&str, &str, &str)> {
    let rest = id.strip_prefix("spiffe://")?;
    let mut parts = rest.split('/');
    match (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) {
        (Some(td), Some("ns"), Some(ns), Some("sa"), Some(sa), None) => Some((td, ns, sa)),
        _ => None,
    }
}

/// The service of each port of workload `entry`: the host of the
/// ServiceEntry that selects it and has the port (the first host in
/// sorted order when several do), by the workload's port number.
pub fn port_services(
    config: &ConfigSet,
    entry: &Resource<WorkloadEntry>,
) -> BTreeMap<u16, ServiceName> {
    let mut candidates: BTreeMap<u16, Vec<ServiceName>> = BTreeMap::new();
    for (se, _, number) in crate::snapshot::selected_service_ports(config, entry) {
        for host in &se.spec.hosts {
            let host = host.trim_end_matches('.').to_ascii_lowercase();
            candidates
                .entry(number)
                .or_default()
                .push(ServiceName::new(&host, &se.meta.namespace));
        }
    }
    candidates
        .into_iter()
        .filter_map(|(port, mut list)| {
            list.sort_by(|a, b| a.host.cmp(&b.host));
            list.into_iter().next().map(|s| (port, s))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(yaml: &str) -> ConfigSet {
        let mut loader = meshward_config::Loader::new();
        loader.add_source("mesh.yaml", yaml);
        loader.finish().unwrap_or_else(|d| panic!("{d}")).config
    }

    fn we(ns: &str, name: &str, sa: &str, address: &str, labels: &str) -> String {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {{address: {address}, serviceAccount: {sa}, labels: {{{labels}}}}}\n---\n"
        )
    }

    #[test]
    fn labels_follow_istios_fallbacks() {
        let c = config(&[
            we("prod", "orders-v1", "orders", "127.0.1.5", "app: orders, version: v1"),
            we(
                "prod",
                "k8s",
                "k8s",
                "127.0.1.6",
                "app.kubernetes.io/name: shop, app.kubernetes.io/version: \"2\"",
            ),
            we(
                "prod",
                "canon",
                "canon",
                "127.0.1.7",
                "app: a, service.istio.io/canonical-name: c, service.istio.io/canonical-revision: r",
            ),
            we("prod", "bare", "bare", "127.0.1.8", ""),
        ]
        .concat());
        let r = Registry::build(&c);
        let m = |n: &str| r.named("prod", n).unwrap().clone();
        let o = m("orders-v1");
        assert_eq!(
            (
                &*o.app,
                &*o.version,
                &*o.canonical_service,
                &*o.canonical_revision
            ),
            ("orders", "v1", "orders", "v1")
        );
        let k = m("k8s");
        assert_eq!(
            (
                &*k.app,
                &*k.version,
                &*k.canonical_service,
                &*k.canonical_revision
            ),
            ("shop", "2", "shop", "2")
        );
        let c = m("canon");
        assert_eq!(
            (
                &*c.app,
                &*c.version,
                &*c.canonical_service,
                &*c.canonical_revision
            ),
            ("a", "unknown", "c", "r")
        );
        let b = m("bare");
        assert_eq!(
            (
                &*b.app,
                &*b.version,
                &*b.canonical_service,
                &*b.canonical_revision
            ),
            ("unknown", "unknown", "bare", "latest")
        );
    }

    #[test]
    fn peers_resolve_by_identity_then_address() {
        let c = config(
            &[
                we("prod", "orders", "orders", "127.0.1.5", "app: orders"),
                we("prod", "pay-a", "pay", "127.0.2.1", "app: pay"),
                we("prod", "pay-b", "pay", "127.0.2.2", "app: pay"),
                we("legacy", "billing", "billing", "127.0.4.1", "app: billing"),
            ]
            .concat(),
        );
        let r = Registry::build(&c);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let name = |m: Option<Arc<WorkloadMeta>>| m.map(|m| m.name.clone());
        let id = |ns: &str, sa: &str| format!("spiffe://cluster.local/ns/{ns}/sa/{sa}");
        // One workload with the identity: it, from any address.
        assert_eq!(
            name(r.resolve(Some(&id("prod", "orders")), ip("10.0.0.1"))),
            Some("orders".into())
        );
        // Several: the one at the peer's address, else none.
        assert_eq!(
            name(r.resolve(Some(&id("prod", "pay")), ip("127.0.2.2"))),
            Some("pay-b".into())
        );
        assert_eq!(
            name(r.resolve(Some(&id("prod", "pay")), ip("127.0.1.5"))),
            None
        );
        // Another trust domain, an unknown identity, a malformed one.
        assert_eq!(
            name(r.resolve(Some("spiffe://other.td/ns/prod/sa/orders"), ip("127.0.1.5"))),
            None
        );
        assert_eq!(
            name(r.resolve(Some(&id("prod", "nobody")), ip("127.0.1.5"))),
            None
        );
        assert_eq!(
            name(r.resolve(Some("spiffe://cluster.local/x"), ip("127.0.1.5"))),
            None
        );
        // Plaintext: by address only.
        assert_eq!(
            name(r.resolve(None, ip("127.0.4.1"))),
            Some("billing".into())
        );
        assert_eq!(name(r.resolve(None, ip("127.0.9.9"))), None);
    }

    #[test]
    fn a_port_service_is_the_first_host_of_the_entries_selecting_it() {
        let se = |name: &str, hosts: &str, port: u16| {
            format!(
                "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {name}, namespace: prod}}\nspec: {{hosts: [{hosts}], ports: [{{number: {port}, name: http, protocol: HTTP}}], workloadSelector: {{labels: {{app: orders}}}}, resolution: STATIC}}\n---\n"
            )
        };
        let c = config(
            &[
                we("prod", "orders", "orders", "127.0.1.5", "app: orders"),
                se("b", "orders.prod.svc.cluster.local", 8080),
                se("a", "z.example.com, api.example.com", 8080),
                se("c", "other.prod.svc.cluster.local", 9090),
            ]
            .concat(),
        );
        let entry = &c.workload_entries[0];
        let s = port_services(&c, entry);
        assert_eq!(s[&8080], ServiceName::new("api.example.com", "prod"));
        assert_eq!(s[&8080].name, "api.example.com");
        assert_eq!(s[&9090].name, "other");
        assert_eq!(
            ServiceName::new("orders.prod.svc.cluster.local", "prod").name,
            "orders"
        );
        assert_eq!(
            ServiceName::new("orders.other.svc.cluster.local", "prod").name,
            "orders.other.svc.cluster.local"
        );
    }
}
