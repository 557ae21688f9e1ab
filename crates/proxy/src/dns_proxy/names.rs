//! The DNS proxy's name table, built once per configuration snapshot from
//! the services the workload sees, as Istio's `NameTable` is built for a
//! sidecar:
//!
//! - a host answers with its service's DNS addresses
//!   ([`Service::dns_addresses`]: the ServiceEntry's single-IP
//!   `addresses`, else the allocated ones);
//! - a `resolution: NONE` service with neither (Istio's "headless" case)
//!   answers with its endpoints' IP addresses; a service that has no
//!   address at all is not in the table (its queries go upstream);
//! - wildcard hosts are not in the table;
//! - a Kubernetes-style host `name.ns.svc.cluster.local` also answers as
//!   `name.ns.svc` and `name.ns`, and as `name` for a workload in
//!   namespace `ns` (Istio's agent generates the same alternative names
//!   for the services of its cluster domain). A full host wins over
//!   another service's alternative name; among alternative names the first
//!   service in configuration order wins.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use meshward_config::model::networking::Resolution;

use crate::snapshot::Service;

/// The Kubernetes service domain whose hosts get short names.
const SERVICE_DOMAIN: &str = ".svc.cluster.local";

/// The addresses one name answers with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameEntry {
    /// The service's host (for logs and `/config_dump`).
    pub host: String,
    pub v4: Vec<Ipv4Addr>,
    pub v6: Vec<Ipv6Addr>,
}

/// Lower-case names (no final dot) to their addresses.
#[derive(Debug, Clone, Default)]
pub struct NameTable {
    names: HashMap<String, Arc<NameEntry>>,
}

impl NameTable {
    /// A table of the given names and addresses (no short names), for
    /// tests and the fuzz target.
    pub fn from_names<'a>(names: impl IntoIterator<Item = (&'a str, &'a [IpAddr])>) -> NameTable {
        let mut table = HashMap::new();
        for (name, addresses) in names {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            let (v4, v6) = split(addresses.iter().copied());
            let entry = NameEntry {
                host: name.clone(),
                v4,
                v6,
            };
            table.insert(name, Arc::new(entry));
        }
        NameTable { names: table }
    }

    /// The table of `services` for a workload in namespace `client_ns`.
    pub(crate) fn build(services: &[Arc<Service>], client_ns: &str) -> NameTable {
        let mut names: HashMap<String, Arc<NameEntry>> = HashMap::new();
        let mut entries = Vec::new();
        for svc in services {
            if svc.host.starts_with('*') {
                continue;
            }
            let mut addresses = svc.dns_addresses();
            if addresses.is_empty() && svc.resolution == Resolution::None {
                addresses = svc.endpoints.iter().map(|e| e.address).collect();
            }
            let (v4, v6) = split(addresses);
            if v4.is_empty() && v6.is_empty() {
                continue;
            }
            let entry = Arc::new(NameEntry {
                host: svc.host.clone(),
                v4,
                v6,
            });
            names
                .entry(svc.host.clone())
                .or_insert_with(|| Arc::clone(&entry));
            entries.push(entry);
        }
        for entry in entries {
            for alt in short_names(&entry.host, client_ns) {
                names.entry(alt).or_insert_with(|| Arc::clone(&entry));
            }
        }
        NameTable { names }
    }

    /// The entry of `name` (any case, with or without a final dot).
    pub fn lookup(&self, name: &str) -> Option<&Arc<NameEntry>> {
        let name = name.strip_suffix('.').unwrap_or(name);
        if name.bytes().any(|b| b.is_ascii_uppercase()) {
            self.names.get(&name.to_ascii_lowercase())
        } else {
            self.names.get(name)
        }
    }

    /// How many names the table holds (short names included).
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Whether the table holds no name.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

/// IPv4 and IPv6 addresses apart, each once, in order.
fn split(addresses: impl IntoIterator<Item = IpAddr>) -> (Vec<Ipv4Addr>, Vec<Ipv6Addr>) {
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    for a in addresses {
        match a {
            IpAddr::V4(a) if !v4.contains(&a) => v4.push(a),
            IpAddr::V6(a) if !v6.contains(&a) => v6.push(a),
            _ => {}
        }
    }
    (v4, v6)
}

/// The alternative names of a `name.ns.svc.cluster.local` host, as seen
/// from namespace `client_ns`; none for other hosts. The DNS proxy answers
/// them, and a request's `Host` may name them (`crate::snapshot`), as
/// Istio's virtual hosts list them.
pub(crate) fn short_names(host: &str, client_ns: &str) -> Vec<String> {
    let Some(rest) = host.strip_suffix(SERVICE_DOMAIN) else {
        return Vec::new();
    };
    let Some((name, ns)) = rest.split_once('.') else {
        return Vec::new();
    };
    if name.is_empty() || ns.is_empty() || ns.contains('.') {
        return Vec::new();
    }
    let mut out = vec![format!("{name}.{ns}.svc"), format!("{name}.{ns}")];
    if ns == client_ns {
        out.push(name.to_string());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubernetes_hosts_have_short_names_the_bare_name_only_in_the_same_namespace() {
        assert_eq!(
            short_names("catalog.production.svc.cluster.local", "production"),
            ["catalog.production.svc", "catalog.production", "catalog"]
        );
        assert_eq!(
            short_names("catalog.production.svc.cluster.local", "billing"),
            ["catalog.production.svc", "catalog.production"]
        );
        assert!(short_names("api.example.com", "production").is_empty());
        assert!(short_names("a.b.c.svc.cluster.local", "b").is_empty());
        assert!(short_names("svc.cluster.local", "b").is_empty());
    }
}
