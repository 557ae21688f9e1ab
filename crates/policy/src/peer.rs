//! Effective PeerAuthentication mode for a workload port.
//!
//! Scopes, most specific first: workload (a selector with labels, not in the
//! root namespace), namespace (no selector, or one without labels), mesh (a
//! namespace-scope policy in the root namespace). The most specific policy
//! that sets a mode replaces the others; `UNSET` inherits from the parent;
//! with nothing set the mode is PERMISSIVE. Port-level modes come only from
//! the chosen workload policy. Within one scope the oldest policy wins.

use std::collections::BTreeMap;

use meshward_config::model::security::{MtlsMode, PeerAuthentication};
use meshward_config::{ConfigSet, Resource};

use crate::Workload;

/// Where an effective mode came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModeSource {
    /// No policy set a mode: PERMISSIVE.
    Default,
    Mesh(String),
    Namespace(String),
    Workload(String),
    /// `portLevelMtls` of the workload policy.
    Port(String),
}

impl std::fmt::Display for ModeSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ModeSource::Default => f.write_str("default (no PeerAuthentication sets a mode)"),
            ModeSource::Mesh(p) => write!(f, "mesh-wide PeerAuthentication {p}"),
            ModeSource::Namespace(p) => write!(f, "namespace PeerAuthentication {p}"),
            ModeSource::Workload(p) => write!(f, "workload PeerAuthentication {p}"),
            ModeSource::Port(p) => write!(f, "port-level mtls of PeerAuthentication {p}"),
        }
    }
}

/// Builds the [`ModeSource`] of a scope from the policy's `namespace/name`.
type ScopeKind = fn(String) -> ModeSource;

/// The effective mode of one port, with its origin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerDecision {
    pub mode: MtlsMode,
    pub source: ModeSource,
}

/// Effective modes for a workload: a default and per-port overrides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerModes {
    pub workload: PeerDecision,
    pub ports: BTreeMap<u16, PeerDecision>,
}

impl PeerModes {
    pub fn for_port(&self, port: u16) -> &PeerDecision {
        self.ports.get(&port).unwrap_or(&self.workload)
    }

    pub(crate) fn compute(config: &ConfigSet, root_ns: &str, w: &Workload) -> PeerModes {
        let mut mesh: Option<&Resource<PeerAuthentication>> = None;
        let mut namespace: Option<&Resource<PeerAuthentication>> = None;
        let mut workload: Option<&Resource<PeerAuthentication>> = None;
        for p in &config.peer_authentications {
            let labels_empty = p
                .spec
                .selector
                .as_ref()
                .is_none_or(|s| s.match_labels.is_empty());
            if !p.spec.target_refs.is_empty() {
                continue;
            }
            if labels_empty {
                if p.meta.namespace == root_ns {
                    older(&mut mesh, p);
                }
                if p.meta.namespace == w.namespace && w.namespace != root_ns {
                    older(&mut namespace, p);
                }
            } else if p.meta.namespace == w.namespace
                && p.meta.namespace != root_ns
                && p.spec
                    .selector
                    .as_ref()
                    .is_some_and(|s| s.matches(&w.labels))
            {
                older(&mut workload, p);
            }
        }
        let mut effective = PeerDecision {
            mode: MtlsMode::Permissive,
            source: ModeSource::Default,
        };
        let scopes: [(Option<&Resource<PeerAuthentication>>, ScopeKind); 3] = [
            (mesh, ModeSource::Mesh),
            (namespace, ModeSource::Namespace),
            (workload, ModeSource::Workload),
        ];
        for (policy, source) in scopes {
            if let Some(p) = policy
                && p.spec.mode() != MtlsMode::Unset
            {
                effective = PeerDecision {
                    mode: p.spec.mode(),
                    source: source(p.key()),
                };
            }
        }
        let mut ports = BTreeMap::new();
        if let Some(p) = workload {
            for (port, mode) in &p.spec.port_level_mtls {
                if *mode != MtlsMode::Unset {
                    ports.insert(
                        *port,
                        PeerDecision {
                            mode: *mode,
                            source: ModeSource::Port(p.key()),
                        },
                    );
                }
            }
        }
        PeerModes {
            workload: effective,
            ports,
        }
    }
}

fn older<'a>(
    slot: &mut Option<&'a Resource<PeerAuthentication>>,
    p: &'a Resource<PeerAuthentication>,
) {
    if slot.is_none_or(|cur| p.is_older_than(cur)) {
        *slot = Some(p);
    }
}
