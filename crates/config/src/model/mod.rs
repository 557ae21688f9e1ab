//! Typed resources, decoded from YAML with every field checked.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::decode::Fields;
use crate::diag::Sink;
use crate::yaml::Node;

pub mod mesh;
pub mod networking;
pub mod security;

pub use mesh::{
    ExtAuthz, ExtensionProvider, MAX_TERMINATION_DRAIN_DURATION, MeshConfig, OutboundTrafficPolicy,
    header_listed,
};
pub use networking::{
    AppProtocol, ClientTls, ConnectionPool, DestinationRule, PortTrafficPolicy, ServiceEntry,
    ServicePort, TlsMode, TrafficPolicy, WorkloadEntry,
};
pub use security::{
    Action, AuthorizationPolicy, Condition, JwtHeader, JwtRule, MtlsMode, Operation,
    PeerAuthentication, RequestAuthentication, Rule, Source,
};

/// Where a resource came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub file: Arc<str>,
    pub line: u32,
    /// Position in load order (files in sorted path order, documents in file
    /// order). Used to break ties between policies, see [`Resource::is_older_than`].
    pub order: u32,
}

/// The part of Kubernetes `metadata` meshward uses.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ObjectMeta {
    pub name: String,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// RFC 3339 timestamp, as Kubernetes writes it (`2024-01-02T03:04:05Z`).
    pub creation_timestamp: Option<String>,
}

/// A decoded resource with its metadata and origin.
#[derive(Debug, Clone, PartialEq)]
pub struct Resource<T> {
    pub meta: ObjectMeta,
    pub origin: Origin,
    pub spec: T,
}

impl<T> Resource<T> {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.meta.namespace, self.meta.name)
    }

    /// Istio resolves conflicts between policies of equal rank in favour of
    /// the oldest one (creation time, then name). Files have no creation
    /// time, so meshward uses `metadata.creationTimestamp` when both carry
    /// one, and otherwise the load order: the policy read first is the older.
    /// RFC 3339 UTC timestamps in Kubernetes' fixed format sort as strings.
    pub fn is_older_than<U>(&self, other: &Resource<U>) -> bool {
        match (
            &self.meta.creation_timestamp,
            &other.meta.creation_timestamp,
        ) {
            (Some(a), Some(b)) if a != b => a < b,
            _ => self.origin.order < other.origin.order,
        }
    }
}

/// `selector.matchLabels`. An empty selector selects every workload in scope.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WorkloadSelector {
    pub match_labels: BTreeMap<String, String>,
}

impl WorkloadSelector {
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k).is_some_and(|l| l == v))
    }

    pub(crate) fn decode(sink: &mut Sink<'_>, node: &Node, path: &str) -> WorkloadSelector {
        let mut f = Fields::new(sink, node, path);
        let match_labels = f.string_map(sink, "matchLabels");
        for (k, v) in &match_labels {
            let field = format!("{}.matchLabels.{k}", f.path());
            if let Err(e) = check_selector_label(k, v) {
                sink.error(f.pos(), &field, e);
            }
        }
        f.finish(sink);
        WorkloadSelector { match_labels }
    }
}

/// `targetRef` / `targetRefs` (Gateway API attachment). Policies attached this
/// way apply to gateways and waypoints, never to sidecar workloads.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TargetRef {
    pub group: String,
    pub kind: String,
    pub name: String,
    pub namespace: Option<String>,
}

impl TargetRef {
    pub(crate) fn decode(sink: &mut Sink<'_>, node: &Node, path: &str) -> Option<TargetRef> {
        let mut f = Fields::new(sink, node, path);
        let r = TargetRef {
            group: f.string(sink, "group").unwrap_or_default(),
            kind: f
                .require(sink, "kind")
                .and_then(|n| crate::decode::string(sink, n, &format!("{path}.kind")))
                .unwrap_or_default(),
            name: f
                .require(sink, "name")
                .and_then(|n| crate::decode::string(sink, n, &format!("{path}.name")))
                .unwrap_or_default(),
            namespace: f.string(sink, "namespace"),
        };
        f.finish(sink);
        Some(r)
    }
}

/// Reads `selector`, `targetRef` and `targetRefs`, which every policy kind
/// shares, and checks that a selector and a target reference are not both set.
pub(crate) fn decode_attachment(
    sink: &mut Sink<'_>,
    f: &mut Fields<'_>,
) -> (Option<WorkloadSelector>, Vec<TargetRef>) {
    let sel_path = f.field_path("selector");
    let selector = f
        .take("selector")
        .map(|n| WorkloadSelector::decode(sink, n, &sel_path));
    let mut refs = Vec::new();
    let ref_path = f.field_path("targetRef");
    if let Some(n) = f.take("targetRef") {
        refs.extend(TargetRef::decode(sink, n, &ref_path));
    }
    let had_single = !refs.is_empty();
    if let Some(list) = f.list(sink, "targetRefs", TargetRef::decode) {
        if had_single && !list.is_empty() {
            sink.error(
                f.pos(),
                &f.field_path("targetRefs"),
                "only one of targetRef or targetRefs can be set",
            );
        }
        refs.extend(list);
    }
    if selector.is_some() && !refs.is_empty() {
        sink.error(
            f.pos(),
            f.path(),
            "only one of selector or targetRefs can be set (targetRef/targetRefs and selector are exclusive)",
        );
    }
    (selector, refs)
}

/// Selector labels, checked as Istio does: no empty key, no wildcard, values
/// at most 63 characters.
pub fn check_selector_label(key: &str, value: &str) -> Result<(), String> {
    if key.is_empty() {
        return Err(format!(
            "empty key is not supported in selector: \"={value}\""
        ));
    }
    if key.contains('*') || value.contains('*') {
        return Err(format!(
            "wildcard is not supported in selector: \"{key}={value}\""
        ));
    }
    if value.len() > 63 {
        return Err(format!(
            "label value for \"{key}\" is longer than 63 characters"
        ));
    }
    Ok(())
}

/// Kubernetes label keys: optional DNS-subdomain prefix and `/`, then a name
/// of at most 63 characters of alphanumerics, `-`, `_`, `.`, starting and
/// ending alphanumeric.
pub fn check_label_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix
        && (p.is_empty() || p.len() > 253 || !p.split('.').all(is_dns_label))
    {
        return Err(format!(
            "invalid label key \"{key}\": prefix must be a DNS subdomain"
        ));
    }
    if !is_label_name(name) {
        return Err(format!(
            "invalid label key \"{key}\": name must be 1-63 characters of [A-Za-z0-9_.-], starting and ending alphanumeric"
        ));
    }
    Ok(())
}

/// Label values: empty, or like a label name. Istio also refuses wildcards.
pub fn check_label_value(value: &str) -> Result<(), String> {
    if value.contains('*') {
        return Err(format!(
            "wildcard is not supported in selector label value \"{value}\""
        ));
    }
    if value.is_empty() || is_label_name(value) {
        Ok(())
    } else {
        Err(format!(
            "invalid label value \"{value}\": must be at most 63 characters of [A-Za-z0-9_.-], starting and ending alphanumeric"
        ))
    }
}

fn is_label_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

/// Names and namespaces are DNS-1123 subdomains/labels in Kubernetes.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.len() <= 253 && name.split('.').all(is_dns_label) {
        Ok(())
    } else {
        Err(format!(
            "\"{name}\" is not a valid name (lower-case alphanumerics, '-' and '.', at most 253 characters)"
        ))
    }
}

pub fn check_namespace(ns: &str) -> Result<(), String> {
    if is_dns_label(ns) {
        Ok(())
    } else {
        Err(format!(
            "\"{ns}\" is not a valid namespace (a DNS label: lower-case alphanumerics and '-', at most 63 characters)"
        ))
    }
}
