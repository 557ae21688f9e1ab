//! The workloads and services of a configuration, as the live commands
//! need them: where each workload is, whether it runs a proxy, and which
//! workloads a service name reaches.

use std::collections::BTreeMap;
use std::net::IpAddr;

use meshward_config::ConfigSet;

use crate::OpsError;

/// One workload (WorkloadEntry) of the mesh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshWorkload {
    pub namespace: String,
    pub name: String,
    pub address: Option<IpAddr>,
    /// Port name to number.
    pub ports: BTreeMap<String, u16>,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub service_account: String,
    /// False when annotated `meshward.io/proxy: "false"`.
    pub has_proxy: bool,
}

impl MeshWorkload {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The SPIFFE ID its proxy is issued in `trust_domain`.
    pub fn spiffe_id(&self, trust_domain: &str) -> String {
        format!(
            "spiffe://{trust_domain}/ns/{}/sa/{}",
            self.namespace, self.service_account
        )
    }
}

/// Every WorkloadEntry of `config`, in `namespace/name` order.
pub fn workloads(config: &ConfigSet) -> Vec<MeshWorkload> {
    let mut out: Vec<MeshWorkload> = config
        .workload_entries
        .iter()
        .map(|we| MeshWorkload {
            namespace: we.meta.namespace.clone(),
            name: we.meta.name.clone(),
            address: we.spec.address.as_deref().and_then(|a| a.parse().ok()),
            ports: we.spec.ports.clone(),
            labels: we.spec.labels.clone(),
            annotations: we.meta.annotations.clone(),
            service_account: we
                .spec
                .service_account
                .clone()
                .unwrap_or_else(|| "default".to_string()),
            has_proxy: meshward_config::annotations::workload_has_proxy(&we.meta),
        })
        .collect();
    out.sort_by_key(MeshWorkload::key);
    out
}

/// The workload named `name`: `NAMESPACE/NAME`, or a `NAME` only one
/// namespace has.
pub fn find<'a>(workloads: &'a [MeshWorkload], name: &str) -> Result<&'a MeshWorkload, OpsError> {
    if let Some((ns, n)) = name.split_once('/') {
        return workloads
            .iter()
            .find(|w| w.namespace == ns && w.name == n)
            .ok_or_else(|| not_found(workloads, name));
    }
    let matches: Vec<_> = workloads.iter().filter(|w| w.name == name).collect();
    match matches.as_slice() {
        [one] => Ok(one),
        [] => Err(not_found(workloads, name)),
        many => Err(OpsError::NotFound(format!(
            "workload {name} is ambiguous: {}; say NAMESPACE/NAME",
            many.iter().map(|w| w.key()).collect::<Vec<_>>().join(", ")
        ))),
    }
}

fn not_found(workloads: &[MeshWorkload], name: &str) -> OpsError {
    OpsError::NotFound(format!(
        "no workload {name} in the mesh (workloads: {})",
        workloads
            .iter()
            .map(|w| w.key())
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

/// Where a service name leads: the service and the workloads behind the
/// requested port, each with the port it listens on.
#[derive(Debug, Clone)]
pub struct Destination {
    /// `namespace/name` of the ServiceEntry.
    pub service: String,
    pub host: String,
    pub port: u16,
    pub endpoints: Vec<(MeshWorkload, u16)>,
}

/// The ServiceEntry with `host` and `port`, and the WorkloadEntries its
/// `workloadSelector` picks (in the service's namespace), as a proxy
/// routes a request to `host:port`.
pub fn destination(config: &ConfigSet, host: &str, port: u16) -> Option<Destination> {
    let all = workloads(config);
    config.service_entries.iter().find_map(|se| {
        if !se.spec.hosts.iter().any(|h| h.eq_ignore_ascii_case(host)) {
            return None;
        }
        let sp = se.spec.ports.iter().find(|p| p.number == port)?;
        let selector = se.spec.workload_selector.as_ref()?;
        let endpoints = all
            .iter()
            .filter(|w| {
                w.namespace == se.meta.namespace
                    && selector.iter().all(|(k, v)| w.labels.get(k) == Some(v))
            })
            .map(|w| {
                let target = w
                    .ports
                    .get(&sp.name)
                    .copied()
                    .or(sp.target_port)
                    .unwrap_or(sp.number);
                (w.clone(), target)
            })
            .collect();
        Some(Destination {
            service: se.key(),
            host: host.to_string(),
            port,
            endpoints,
        })
    })
}
