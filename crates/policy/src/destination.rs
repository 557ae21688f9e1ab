//! Which DestinationRule applies to a call, and which services a workload
//! sees, as Istio decides them (istiod's `PushContext.destinationRule`,
//! `SetDestinationRules` and `initServiceRegistry`).
//!
//! For a client in namespace `C` calling host `H` of a service in namespace
//! `S`, the first of these that has a rule for `H` wins, and the rules of
//! the later ones are not looked at:
//!
//! 1. the rules in `C` that `C` itself can see (`exportTo` empty, `*`,
//!    `.` or `C`); for a client in the root namespace, the root
//!    namespace's private rules (`exportTo: ["."]`);
//! 2. the rules in `S` exported to `C` (`exportTo` empty, `*` or naming
//!    `C`; private rules are not exported);
//! 3. the rules in the root namespace exported to `C`.
//!
//! Within a namespace the most specific host wins: the exact host, else the
//! longest wildcard (`*.legacy.svc.cluster.local` before `*.svc.cluster.local`
//! before `*`). A short host (no dot) is `host.<rule namespace>.svc.cluster.local`.
//! Several rules for the same host in one namespace are merged: the oldest
//! one's `trafficPolicy` applies, a later one's only when the older ones
//! have none. A rule with a `workloadSelector` applies only to the
//! workloads of its own namespace that it selects and is never exported;
//! it is preferred over a rule for the same host without one.

use std::collections::BTreeMap;
use std::time::Duration;

use meshward_config::model::networking::{ClientTls, DestinationRule, TrafficPolicy};
use meshward_config::{ConfigSet, Resource};

use crate::Workload;

/// The DestinationRule(s) that apply to one host for one client.
#[derive(Debug, Clone)]
pub struct AppliedDestinationRule<'c> {
    /// The rules merged for the host, oldest first (`namespace/name`).
    pub rules: Vec<&'c Resource<DestinationRule>>,
    /// The traffic policy that applies: the oldest rule's that has one.
    pub traffic_policy: Option<&'c TrafficPolicy>,
}

impl AppliedDestinationRule<'_> {
    /// The rule whose traffic policy applies, else the oldest: the one to
    /// name in explanations.
    pub fn source(&self) -> &Resource<DestinationRule> {
        self.rules
            .iter()
            .find(|r| {
                self.traffic_policy
                    .is_some_and(|tp| r.spec.traffic_policy.as_ref() == Some(tp))
            })
            .unwrap_or(&self.rules[0])
    }

    /// Client TLS settings: the default, and per port. A port listed in
    /// `portLevelSettings` takes that entry's `tls`, or none when the entry
    /// has none: port-level settings do not inherit the rule's (Istio's
    /// `MergeTrafficPolicy`, "port level policies do not inherit"). The
    /// first entry for a port counts.
    pub fn tls(&self) -> (Option<ClientTls>, BTreeMap<u16, Option<ClientTls>>) {
        let Some(tp) = self.traffic_policy else {
            return (None, BTreeMap::new());
        };
        let mut port_tls = BTreeMap::new();
        for p in &tp.port_level_settings {
            port_tls.entry(p.port).or_insert_with(|| p.tls.clone());
        }
        (tp.tls.clone(), port_tls)
    }

    /// `connectionPool.tcp.connectTimeout`: the rule's, and per port
    /// (`None`: the mesh default). A port listed in `portLevelSettings`
    /// takes its entry's value, or the mesh default when the entry sets
    /// none: Istio's port-level settings replace the rule's whole, they
    /// inherit nothing from it (`GetPortLevelTrafficPolicy`). The first
    /// entry for a port counts.
    pub fn connect_timeouts(&self) -> (Option<Duration>, BTreeMap<u16, Option<Duration>>) {
        let Some(tp) = self.traffic_policy else {
            return (None, BTreeMap::new());
        };
        let of = |pool: &Option<meshward_config::model::ConnectionPool>| {
            pool.as_ref().and_then(|p| p.connect_timeout)
        };
        let mut per_port = BTreeMap::new();
        for p in &tp.port_level_settings {
            per_port
                .entry(p.port)
                .or_insert_with(|| of(&p.connection_pool));
        }
        (of(&tp.connection_pool), per_port)
    }
}

/// The DestinationRule that applies when `client` calls `host`, a host of
/// a service (ServiceEntry) in namespace `service_ns`. `None` when no rule
/// applies (auto-mTLS then decides).
pub fn destination_rule<'c>(
    config: &'c ConfigSet,
    client: &Workload,
    host: &str,
    service_ns: &str,
) -> Option<AppliedDestinationRule<'c>> {
    let root = config.mesh.root_namespace.as_str();
    let host = host.to_ascii_lowercase();
    let rules = &config.destination_rules;
    let local: Vec<_> = if client.namespace != root {
        rules
            .iter()
            .filter(|r| r.meta.namespace == client.namespace && visible_locally(r))
            .collect()
    } else {
        rules
            .iter()
            .filter(|r| r.meta.namespace == root && private_only(r))
            .collect()
    };
    if let Some(found) = most_specific(&local, &host) {
        return select(found, client);
    }
    for ns in [service_ns, root] {
        let exported: Vec<_> = rules
            .iter()
            .filter(|r| r.meta.namespace == ns && !private_only(r))
            .collect();
        if let Some(found) = most_specific(&exported, &host) {
            let visible: Vec<_> = found
                .into_iter()
                .filter(|r| exported_to(&r.spec.export_to, &client.namespace))
                .collect();
            if !visible.is_empty() {
                return select(visible, client);
            }
        }
    }
    None
}

/// Whether a service (ServiceEntry) of namespace `ns` with `export_to` is
/// visible to workloads in `client_ns`: `*` or nothing is every namespace,
/// `~` none, `.` or its own name its own namespace, any other name that
/// namespace.
pub fn service_visible(export_to: &[String], ns: &str, client_ns: &str) -> bool {
    if export_to.is_empty() || export_to.iter().any(|e| e == "*") {
        return true;
    }
    if export_to.iter().any(|e| e == "~") {
        return false;
    }
    export_to
        .iter()
        .any(|e| e == client_ns || ((e == "." || e == ns) && ns == client_ns))
}

/// The rule's host, short names qualified with its namespace.
pub(crate) fn qualified_host(r: &Resource<DestinationRule>) -> String {
    let h = r.spec.host.to_ascii_lowercase();
    if h == "*" || h.contains('.') || h.parse::<std::net::IpAddr>().is_ok() {
        h
    } else {
        format!("{h}.{}.svc.cluster.local", r.meta.namespace)
    }
}

/// A rule with a selector is private to its namespace.
fn private_only(r: &Resource<DestinationRule>) -> bool {
    let e = &r.spec.export_to;
    r.spec.workload_selector.is_some()
        || (e.len() == 1 && (e[0] == "." || e[0] == r.meta.namespace))
}

/// Visible to a client of the rule's own namespace.
fn visible_locally(r: &Resource<DestinationRule>) -> bool {
    let e = &r.spec.export_to;
    r.spec.workload_selector.is_some()
        || e.is_empty()
        || e.iter()
            .any(|x| x == "*" || x == "." || *x == r.meta.namespace)
}

fn exported_to(export_to: &[String], client_ns: &str) -> bool {
    export_to.is_empty() || export_to.iter().any(|e| e == "*" || e == client_ns)
}

/// The rules of `candidates` for the most specific host matching `host`:
/// the exact host, else the longest matching wildcard (Istio's
/// `MostSpecificHostMatch`). In load order.
fn most_specific<'c>(
    candidates: &[&'c Resource<DestinationRule>],
    host: &str,
) -> Option<Vec<&'c Resource<DestinationRule>>> {
    let mut best: Option<String> = None;
    for r in candidates {
        let h = qualified_host(r);
        let better = match (&best, host_matches(&h, host)) {
            (_, false) => false,
            (None, true) => true,
            (Some(b), true) => more_specific(&h, b),
        };
        if better {
            best = Some(h);
        }
    }
    let best = best?;
    let mut found: Vec<_> = candidates
        .iter()
        .copied()
        .filter(|r| qualified_host(r) == best)
        .collect();
    found.sort_by(|a, b| {
        if a.is_older_than(b) {
            std::cmp::Ordering::Less
        } else if b.is_older_than(a) {
            std::cmp::Ordering::Greater
        } else {
            std::cmp::Ordering::Equal
        }
    });
    Some(found)
}

/// Whether rule host `pattern` covers service host `host` (either may be
/// a wildcard `*.suffix`; `*` covers everything).
pub(crate) fn host_matches(pattern: &str, host: &str) -> bool {
    if pattern == host {
        return true;
    }
    match pattern.strip_prefix('*') {
        // `*.example.com` covers `a.example.com` and `*.a.example.com`,
        // not `example.com`.
        Some(suffix) => {
            let h = host.strip_prefix('*').unwrap_or(host);
            suffix.is_empty() || (h.len() > suffix.len() && h.ends_with(suffix))
        }
        None => false,
    }
}

/// An exact host beats a wildcard; a longer wildcard beats a shorter one.
fn more_specific(a: &str, b: &str) -> bool {
    match (a.starts_with('*'), b.starts_with('*')) {
        (false, true) => true,
        (true, false) => false,
        _ => a.len() > b.len(),
    }
}

/// Among the rules for one host of one namespace: the ones whose selector
/// selects the client (with the same selector as the oldest of them), else
/// the ones without a selector; merged.
fn select<'c>(
    found: Vec<&'c Resource<DestinationRule>>,
    client: &Workload,
) -> Option<AppliedDestinationRule<'c>> {
    let catch_all: Vec<_> = found
        .iter()
        .copied()
        .filter(|r| r.spec.workload_selector.is_none())
        .collect();
    let selected = found.iter().copied().find(|r| {
        r.meta.namespace == client.namespace
            && r.spec
                .workload_selector
                .as_ref()
                .is_some_and(|s| s.matches(&client.labels))
    });
    let rules: Vec<_> = match selected {
        Some(first) => {
            let same = |r: &&Resource<DestinationRule>| {
                r.spec.workload_selector == first.spec.workload_selector
            };
            let mut rules: Vec<_> = found.iter().copied().filter(same).collect();
            // A selected rule without a traffic policy takes the one of the
            // rules for every workload (Istio merges them).
            rules.extend(catch_all);
            rules
        }
        None => catch_all,
    };
    if rules.is_empty() {
        return None;
    }
    let traffic_policy = rules.iter().find_map(|r| r.spec.traffic_policy.as_ref());
    Some(AppliedDestinationRule {
        rules,
        traffic_policy,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_cover_subdomains_only() {
        assert!(host_matches("*.example.com", "api.example.com"));
        assert!(host_matches("*.example.com", "a.b.example.com"));
        assert!(host_matches("*.example.com", "*.a.example.com"));
        assert!(!host_matches("*.example.com", "example.com"));
        assert!(!host_matches("*.example.com", "api.example.org"));
        assert!(host_matches("*", "anything.at.all"));
        assert!(host_matches(
            "db.legacy.svc.cluster.local",
            "db.legacy.svc.cluster.local"
        ));
        assert!(!host_matches(
            "db.legacy.svc.cluster.local",
            "*.legacy.svc.cluster.local"
        ));
    }

    #[test]
    fn exact_beats_wildcard_and_longer_wildcard_beats_shorter() {
        assert!(more_specific("a.example.com", "*.example.com"));
        assert!(more_specific("*.a.example.com", "*.example.com"));
        assert!(!more_specific("*", "*.com"));
    }

    #[test]
    fn service_visibility_follows_export_to() {
        let v = |e: &[&str], client| {
            let e: Vec<String> = e.iter().map(|s| s.to_string()).collect();
            service_visible(&e, "legacy", client)
        };
        assert!(v(&[], "production"));
        assert!(v(&["*"], "production"));
        assert!(!v(&["."], "production"));
        assert!(v(&["."], "legacy"));
        assert!(v(&["legacy"], "legacy"));
        assert!(!v(&["legacy"], "production"));
        assert!(v(&["production"], "production"));
        assert!(!v(&["~"], "legacy"));
    }
}
