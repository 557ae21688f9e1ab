//! Mutual TLS checks: DestinationRules whose client TLS the destination
//! cannot accept (MW0103, MW0104) or whose host is no service (IST0174),
//! `portLevelMtls` on ports the workload does not have (MW0105), and
//! plaintext toward STRICT workloads when auto-mTLS is off (MW0108).

use std::collections::BTreeMap;

use meshward_config::Resource;
use meshward_config::model::networking::{
    ClientTls, DestinationRule, ServiceEntry, ServicePort, TlsMode, WorkloadEntry,
};
use meshward_config::model::security::MtlsMode;

use super::codes::{
    AUTO_MTLS_OFF_TOWARD_STRICT, DESTINATION_RULE_TLS_CONFLICT, ISTIO_MUTUAL_WITHOUT_PROXY,
    PORT_LEVEL_MTLS_UNKNOWN_PORT, UNKNOWN_DESTINATION_RULE_HOST,
};
use super::{Context, Message, list};
use crate::Workload;
use crate::destination::{AppliedDestinationRule, host_matches, qualified_host};

pub(super) fn check(cx: &Context<'_>, out: &mut Vec<Message>) {
    for dr in &cx.config.destination_rules {
        destination_rule(cx, dr, out);
    }
    port_level_mtls(cx, out);
    auto_mtls_off(cx, out);
}

/// One endpoint behind a service host.
struct Dest {
    /// `production/orders`, `endpoint 10.0.0.3`, `host api.example.com`.
    name: String,
    /// The workload, when it is one whose inbound mode can be computed.
    workload: Option<Workload>,
    has_proxy: bool,
    /// Its port numbers by service port name.
    ports: BTreeMap<String, u16>,
}

/// The endpoints of a ServiceEntry, with the proxy rules of the data plane:
/// selected WorkloadEntries have a proxy unless told otherwise; listed
/// endpoints and DNS names only when the ServiceEntry says
/// `meshward.io/proxy: "true"`.
fn endpoints(cx: &Context<'_>, se: &Resource<ServiceEntry>) -> Vec<Dest> {
    let ns = &se.meta.namespace;
    let listed_have_proxy = meshward_config::annotations::listed_endpoints_have_proxy(&se.meta);
    if let Some(sel) = &se.spec.workload_selector {
        return cx
            .workloads
            .iter()
            .filter(|w| {
                w.entry.meta.namespace == *ns && super::labels_match(sel, &w.workload.labels)
            })
            .map(|w| Dest {
                name: w.key(),
                workload: Some(w.workload.clone()),
                has_proxy: w.has_proxy,
                ports: w.entry.spec.ports.clone(),
            })
            .collect();
    }
    if se.spec.endpoints.is_empty() {
        return se
            .spec
            .hosts
            .iter()
            .map(|h| Dest {
                name: format!("host {h}"),
                workload: None,
                has_proxy: listed_have_proxy,
                ports: BTreeMap::new(),
            })
            .collect();
    }
    se.spec
        .endpoints
        .iter()
        .map(|e: &WorkloadEntry| Dest {
            name: format!(
                "endpoint {}",
                e.address.as_deref().unwrap_or("(no address)")
            ),
            workload: Some(Workload {
                namespace: ns.clone(),
                service_account: e
                    .service_account
                    .clone()
                    .unwrap_or_else(|| "default".to_string()),
                labels: e.labels.clone(),
            }),
            has_proxy: listed_have_proxy,
            ports: e.ports.clone(),
        })
        .collect()
}

fn destination_rule(cx: &Context<'_>, dr: &Resource<DestinationRule>, out: &mut Vec<Message>) {
    const KIND: &str = "DestinationRule";
    let pattern = qualified_host(dr);
    let services: Vec<(&Resource<ServiceEntry>, String)> = cx
        .config
        .service_entries
        .iter()
        .flat_map(|se| {
            se.spec
                .hosts
                .iter()
                .map(move |h| (se, h.trim_end_matches('.').to_ascii_lowercase()))
        })
        .filter(|(_, h)| host_matches(&pattern, h))
        .collect();
    if services.is_empty() {
        out.push(Message::new(
            UNKNOWN_DESTINATION_RULE_HOST,
            KIND,
            dr,
            Some("spec.host".to_string()),
            format!(
                "The host {} defined in the DestinationRule does not match any services in the mesh.",
                dr.spec.host
            ),
        ));
        return;
    }
    for (se, host) in services {
        let dests = endpoints(cx, se);
        for port in &se.spec.ports {
            let Some((mode, field)) = dr_tls(dr, port.number) else {
                continue;
            };
            match mode {
                TlsMode::Disable | TlsMode::Simple => {
                    let strict = strict_targets(cx, &dests, port);
                    if !strict.is_empty() {
                        let sends = if mode == TlsMode::Disable {
                            "plaintext"
                        } else {
                            "TLS without the mesh client certificate"
                        };
                        out.push(Message::new(
                            DESTINATION_RULE_TLS_CONFLICT,
                            KIND,
                            dr,
                            Some(field),
                            format!(
                                "TLS mode {} sends {sends} to {host} port {}, but STRICT mutual TLS is required on {}: the connections are refused",
                                mode.as_str(),
                                port.number,
                                list(&strict)
                            ),
                        ));
                    }
                }
                TlsMode::IstioMutual => {
                    let bare: Vec<String> = dests
                        .iter()
                        .filter(|d| !d.has_proxy)
                        .map(|d| d.name.clone())
                        .collect();
                    if !bare.is_empty() {
                        out.push(Message::new(
                            ISTIO_MUTUAL_WITHOUT_PROXY,
                            KIND,
                            dr,
                            Some(field),
                            format!(
                                "TLS mode ISTIO_MUTUAL toward {host} port {}, but {} run{} without a proxy and cannot answer the mesh's mutual TLS: the connections fail",
                                port.number,
                                list(&bare),
                                if bare.len() == 1 { "s" } else { "" }
                            ),
                        ));
                    }
                }
                TlsMode::Mutual => {}
            }
        }
    }
}

/// The client TLS mode a DestinationRule sets for service port `port`,
/// with the field that sets it: the `portLevelSettings` entry of the port
/// (which inherits nothing from the rule), else the rule's `tls`.
fn dr_tls(dr: &Resource<DestinationRule>, port: u16) -> Option<(TlsMode, String)> {
    let tp = dr.spec.traffic_policy.as_ref()?;
    let applied = AppliedDestinationRule {
        rules: vec![dr],
        traffic_policy: Some(tp),
    };
    let (default_tls, port_tls) = applied.tls();
    match port_tls.get(&port) {
        Some(tls) => {
            let i = tp
                .port_level_settings
                .iter()
                .position(|s| s.port == port)
                .unwrap_or_default();
            let ClientTls { mode, .. } = tls.as_ref()?;
            Some((
                *mode,
                format!("spec.trafficPolicy.portLevelSettings[{i}].tls.mode"),
            ))
        }
        None => default_tls.map(|t| (t.mode, "spec.trafficPolicy.tls.mode".to_string())),
    }
}

/// The destinations with a proxy whose effective mode on the port the
/// traffic of service port `port` arrives on is STRICT, described as
/// `ns/name port N (the policy that makes it STRICT)`.
fn strict_targets(cx: &Context<'_>, dests: &[Dest], port: &ServicePort) -> Vec<String> {
    dests
        .iter()
        .filter(|d| d.has_proxy)
        .filter_map(|d| {
            let w = d.workload.as_ref()?;
            let target = d
                .ports
                .get(&port.name)
                .copied()
                .or(port.target_port)
                .unwrap_or(port.number);
            let view = cx.engine.workload(w);
            let decision = view.mtls(target);
            (decision.mode == MtlsMode::Strict)
                .then(|| format!("{} port {target} ({})", d.name, decision.source))
        })
        .collect()
}

/// With `enableAutoMtls: false`, a client sends plaintext wherever no
/// DestinationRule sets TLS: a STRICT destination refuses it.
fn auto_mtls_off(cx: &Context<'_>, out: &mut Vec<Message>) {
    if cx.config.mesh.enable_auto_mtls {
        return;
    }
    for se in &cx.config.service_entries {
        let dests = endpoints(cx, se);
        for host in &se.spec.hosts {
            let host = host.trim_end_matches('.').to_ascii_lowercase();
            for (i, port) in se.spec.ports.iter().enumerate() {
                let covered = cx.config.destination_rules.iter().any(|dr| {
                    host_matches(&qualified_host(dr), &host) && dr_tls(dr, port.number).is_some()
                });
                if covered {
                    continue;
                }
                let strict = strict_targets(cx, &dests, port);
                if strict.is_empty() {
                    continue;
                }
                out.push(Message::new(
                    AUTO_MTLS_OFF_TOWARD_STRICT,
                    "ServiceEntry",
                    se,
                    Some(format!("spec.ports[{i}]")),
                    format!(
                        "enableAutoMtls is false and no DestinationRule sets TLS for {host} port {}: clients send plaintext, but STRICT mutual TLS is required on {}: the connections are refused",
                        port.number,
                        list(&strict)
                    ),
                ));
            }
        }
    }
}

/// `portLevelMtls` keys must be ports of the selected workloads (their
/// container ports, in Istio's terms); another port's mode applies to
/// nothing.
fn port_level_mtls(cx: &Context<'_>, out: &mut Vec<Message>) {
    for pa in &cx.config.peer_authentications {
        if pa.spec.port_level_mtls.is_empty() || !pa.spec.target_refs.is_empty() {
            continue;
        }
        let Some(selector) = pa
            .spec
            .selector
            .as_ref()
            .filter(|s| !s.match_labels.is_empty())
        else {
            continue;
        };
        let selected: Vec<_> = cx
            .selected(&pa.meta.namespace, Some(selector), false)
            .collect();
        if selected.is_empty() {
            // IST0127 says so already.
            continue;
        }
        for port in pa.spec.port_level_mtls.keys() {
            if selected.iter().any(|w| w.ports.contains(port)) {
                continue;
            }
            let have: Vec<String> = selected
                .iter()
                .map(|w| {
                    let ports: Vec<String> = w.ports.iter().map(u16::to_string).collect();
                    if ports.is_empty() {
                        format!("{}: no ports", w.key())
                    } else {
                        format!("{}: {}", w.key(), ports.join(", "))
                    }
                })
                .collect();
            out.push(Message::new(
                PORT_LEVEL_MTLS_UNKNOWN_PORT,
                "PeerAuthentication",
                pa,
                Some(format!("spec.portLevelMtls.{port}")),
                format!(
                    "Port {port} is not a port of the selected workloads ({}); its mode applies to nothing (portLevelMtls takes the workload's port, not the service's)",
                    have.join("; ")
                ),
            ));
        }
    }
}
