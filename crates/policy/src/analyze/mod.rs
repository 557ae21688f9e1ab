//! Configuration analysis: checks that find configuration which loads but
//! cannot do what its author meant, in the manner of `istioctl analyze`.
//!
//! The input is a validated [`ConfigSet`] and, when known, facts about the
//! running mesh ([`Facts`]); the output is a list of [`Message`]s, sorted by
//! where the resource is written. Messages use Istio's analyzer codes
//! (`IST0127`, ...) where Istio has an equivalent check, and meshward's own
//! `MW01xx` codes where it has none (see [`codes`]), sorted as istioctl
//! sorts them. Pure: no I/O.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

use meshward_config::model::WorkloadEntry;
use meshward_config::{ConfigSet, Diagnostic, Diagnostics, Resource, WorkloadSelector};

use crate::{PolicyEngine, Workload};

mod authz;
mod selectors;
mod tls;

#[cfg(test)]
mod tests;

/// The annotation with which a resource silences messages about itself,
/// as in Istio: a comma-separated list of codes, or `*` for every code.
pub const SUPPRESS_ANNOTATION: &str = "galley.istio.io/analyze-suppress";

/// How serious a message is, as istioctl grades them. Ordered from the
/// least to the most serious, so `level >= threshold` selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// Worth knowing; nothing fails because of it.
    Info,
    /// Probably not what the author meant.
    Warning,
    /// Traffic fails or a policy cannot work as written.
    Error,
}

impl Level {
    /// istioctl's spelling: `Info`, `Warning`, `Error`.
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Info => "Info",
            Level::Warning => "Warning",
            Level::Error => "Error",
        }
    }

    /// Parses istioctl's level names, case-insensitively.
    pub fn parse(s: &str) -> Option<Level> {
        match s.to_ascii_lowercase().as_str() {
            "info" => Some(Level::Info),
            "warning" | "warn" => Some(Level::Warning),
            "error" => Some(Level::Error),
            _ => None,
        }
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The message codes, with their names and levels.
pub mod codes {
    use super::Level;

    /// One kind of message: its code, its name (Istio's where the code is
    /// Istio's) and its level.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct Code {
        /// `IST0127`, `MW0103`, ...
        pub code: &'static str,
        /// `NoMatchingWorkloadsFound`, ...
        pub name: &'static str,
        /// The level every message of this code has.
        pub level: Level,
    }

    /// Istio's: a `namespaces`/`notNamespaces` value names a namespace in
    /// which the configuration holds nothing at all.
    pub const REFERENCED_RESOURCE_NOT_FOUND: Code = Code {
        code: "IST0101",
        name: "ReferencedResourceNotFound",
        level: Level::Error,
    };
    /// Istio's: a resource is invalid. meshward loads all or nothing, so
    /// the other checks do not run on a set with this message.
    pub const SCHEMA_VALIDATION_ERROR: Code = Code {
        code: "IST0106",
        name: "SchemaValidationError",
        level: Level::Error,
    };
    /// Istio's: a selector (or a namespace-wide policy) matches no workload.
    pub const NO_MATCHING_WORKLOADS_FOUND: Code = Code {
        code: "IST0127",
        name: "NoMatchingWorkloadsFound",
        level: Level::Warning,
    };
    /// Istio's: a policy has no effect: it selects only workloads without
    /// a proxy, or it is a PeerAuthentication with a selector in the root
    /// namespace.
    pub const INEFFECTIVE_POLICY: Code = Code {
        code: "IST0167",
        name: "IneffectivePolicy",
        level: Level::Warning,
    };
    /// Istio's: a DestinationRule host matches no service.
    pub const UNKNOWN_DESTINATION_RULE_HOST: Code = Code {
        code: "IST0174",
        name: "UnknownDestinationRuleHost",
        level: Level::Warning,
    };
    /// A `principals` or `serviceAccounts` value (or their `not*` forms,
    /// or a `source.principal` / `source.serviceAccount` condition value)
    /// that no known workload has.
    pub const UNKNOWN_PRINCIPAL: Code = Code {
        code: "MW0101",
        name: "UnknownPrincipal",
        level: Level::Warning,
    };
    /// A `namespaces`/`notNamespaces` (or `source.namespace`) value naming
    /// namespaces that have configuration but no workload.
    pub const NAMESPACE_WITHOUT_WORKLOADS: Code = Code {
        code: "MW0102",
        name: "NamespaceWithoutWorkloads",
        level: Level::Warning,
    };
    /// A DestinationRule sends plaintext or simple TLS to a workload port
    /// whose effective mTLS mode is STRICT: the connections are refused
    /// (Istio's retired IST0113 MTLSPolicyConflict).
    pub const DESTINATION_RULE_TLS_CONFLICT: Code = Code {
        code: "MW0103",
        name: "DestinationRuleTlsConflict",
        level: Level::Error,
    };
    /// A DestinationRule sends ISTIO_MUTUAL to a destination without a
    /// proxy, which cannot answer the mesh TLS handshake.
    pub const ISTIO_MUTUAL_WITHOUT_PROXY: Code = Code {
        code: "MW0104",
        name: "IstioMutualWithoutProxy",
        level: Level::Error,
    };
    /// `portLevelMtls` names a port the selected workloads do not have.
    pub const PORT_LEVEL_MTLS_UNKNOWN_PORT: Code = Code {
        code: "MW0105",
        name: "PortLevelMtlsUnknownPort",
        level: Level::Warning,
    };
    /// A RequestAuthentication without any ALLOW or DENY policy that looks
    /// at the token: requests without a token pass.
    pub const TOKEN_NOT_REQUIRED: Code = Code {
        code: "MW0106",
        name: "TokenNotRequired",
        level: Level::Warning,
    };
    /// A CUSTOM AuthorizationPolicy whose provider cannot be used: what its
    /// rules match is denied.
    pub const UNUSABLE_CUSTOM_PROVIDER: Code = Code {
        code: "MW0107",
        name: "UnusableCustomProvider",
        level: Level::Error,
    };
    /// With `enableAutoMtls: false`, no DestinationRule sets TLS toward a
    /// service port whose workloads are STRICT: clients send plaintext,
    /// which is refused.
    pub const AUTO_MTLS_OFF_TOWARD_STRICT: Code = Code {
        code: "MW0108",
        name: "AutoMtlsOffTowardStrict",
        level: Level::Error,
    };
    /// An AuthorizationPolicy in dry-run mode (`istio.io/dry-run: "true"`):
    /// evaluated and logged, never enforced.
    pub const DRY_RUN_POLICY: Code = Code {
        code: "MW0109",
        name: "DryRunPolicy",
        level: Level::Info,
    };

    /// Every code, in code order.
    pub const ALL: [Code; 14] = [
        REFERENCED_RESOURCE_NOT_FOUND,
        SCHEMA_VALIDATION_ERROR,
        NO_MATCHING_WORKLOADS_FOUND,
        INEFFECTIVE_POLICY,
        UNKNOWN_DESTINATION_RULE_HOST,
        UNKNOWN_PRINCIPAL,
        NAMESPACE_WITHOUT_WORKLOADS,
        DESTINATION_RULE_TLS_CONFLICT,
        ISTIO_MUTUAL_WITHOUT_PROXY,
        PORT_LEVEL_MTLS_UNKNOWN_PORT,
        TOKEN_NOT_REQUIRED,
        UNUSABLE_CUSTOM_PROVIDER,
        AUTO_MTLS_OFF_TOWARD_STRICT,
        DRY_RUN_POLICY,
    ];
}

pub use codes::Code;

/// One finding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// `IST0127`, `MW0103`, ...
    pub code: &'static str,
    /// The level of the code.
    pub level: Level,
    /// `Kind namespace/name`.
    pub resource: String,
    /// `file:line` of the resource.
    pub origin: String,
    /// The field the message is about, e.g. `spec.selector`.
    pub field: Option<String>,
    /// What is wrong, in the code's wording.
    pub message: String,
    /// For sorting: the file and the line, apart.
    file: Arc<str>,
    line: u32,
    /// The resource carries [`SUPPRESS_ANNOTATION`] for this code.
    suppressed: bool,
}

impl Message {
    fn new<T>(
        code: Code,
        kind: &str,
        r: &Resource<T>,
        field: Option<String>,
        message: String,
    ) -> Message {
        Message {
            code: code.code,
            level: code.level,
            resource: format!("{kind} {}", r.key()),
            origin: format!("{}:{}", r.origin.file, r.origin.line),
            field,
            message,
            file: r.origin.file.clone(),
            line: r.origin.line,
            suppressed: r
                .meta
                .annotations
                .get(SUPPRESS_ANNOTATION)
                .is_some_and(|codes| {
                    codes
                        .split(',')
                        .map(str::trim)
                        .any(|c| c == "*" || c == code.code)
                }),
        }
    }
}

impl Message {
    /// The load errors of an invalid set that lie in a resource, as
    /// IST0106 SchemaValidationError. Errors outside any resource (a file
    /// that cannot be read or parsed) are returned apart: istioctl reports
    /// those as files it could not parse.
    pub fn from_load_errors(diags: &Diagnostics) -> (Vec<Message>, Vec<&Diagnostic>) {
        let mut messages = Vec::new();
        let mut unparsed = Vec::new();
        for d in diags.errors() {
            let Some(resource) = &d.resource else {
                unparsed.push(d);
                continue;
            };
            let field = d.field.clone().filter(|f| !f.is_empty());
            let detail = match &field {
                Some(f) => format!("{f}: {}", d.message),
                None => d.message.clone(),
            };
            messages.push(Message {
                code: codes::SCHEMA_VALIDATION_ERROR.code,
                level: codes::SCHEMA_VALIDATION_ERROR.level,
                resource: resource.clone(),
                origin: format!("{}:{}", d.file, d.pos.line),
                field,
                message: format!("Schema validation error: {detail}"),
                file: d.file.clone(),
                line: d.pos.line,
                suppressed: false,
            });
        }
        sort(&mut messages);
        (messages, unparsed)
    }

    /// Istio's documentation page for an `IST` code; none for meshward's.
    pub fn documentation_url(&self) -> Option<String> {
        self.code.starts_with("IST").then(|| {
            format!(
                "https://istio.io/latest/docs/reference/config/analysis/{}/",
                self.code.to_ascii_lowercase()
            )
        })
    }
}

/// istioctl's text form: `Warning [IST0127] (AuthorizationPolicy ns/name
/// file:line) message`.
impl fmt::Display for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} [{}] ({} {}) {}",
            self.level, self.code, self.resource, self.origin, self.message
        )
    }
}

/// What is known about the running mesh beyond its configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Facts {
    /// The workloads (namespace, WorkloadEntry name) that actually run a
    /// proxy, when known (from the control plane's connected proxies).
    /// `None`: offline; a WorkloadEntry has a proxy unless annotated
    /// `meshward.io/proxy: "false"`.
    pub workloads_with_proxy: Option<BTreeSet<(String, String)>>,
}

/// Runs every check on `config`; the messages come sorted as istioctl
/// sorts them: errors first, then by code, then by resource. Messages a
/// resource suppresses with [`SUPPRESS_ANNOTATION`] are left out.
///
/// A configuration without any WorkloadEntry (policies kept apart from
/// the workloads they are for) gets none of the checks that compare
/// against workloads: selectors (IST0127, IST0167 for missing proxies)
/// and identities and namespaces (IST0101, MW0101, MW0102); see
/// [`compares_with_workloads`].
pub fn analyze(config: &ConfigSet, facts: &Facts) -> Vec<Message> {
    let cx = Context::new(config, facts);
    let mut out = Vec::new();
    selectors::check(&cx, &mut out);
    authz::check(&cx, &mut out);
    tls::check(&cx, &mut out);
    out.retain(|m| !m.suppressed);
    sort(&mut out);
    out
}

/// istioctl's order (`diag.Messages.Sort`): by level, errors first, then
/// code, then resource; then where, for a stable order within a resource.
fn sort(messages: &mut Vec<Message>) {
    type Key<'m> = (
        std::cmp::Reverse<Level>,
        &'static str,
        &'m str,
        &'m str,
        u32,
        Option<&'m str>,
        &'m str,
    );
    fn key(m: &Message) -> Key<'_> {
        (
            std::cmp::Reverse(m.level),
            m.code,
            &m.resource,
            &m.file,
            m.line,
            m.field.as_deref(),
            &m.message,
        )
    }
    messages.sort_by(|a, b| key(a).cmp(&key(b)));
    messages.dedup();
}

/// Whether [`analyze`] compares selectors, identities and namespaces with
/// the workloads: only when the configuration describes some.
pub fn compares_with_workloads(config: &ConfigSet) -> bool {
    !config.workload_entries.is_empty()
}

/// A workload of the configuration, with what the checks need to know.
#[derive(Debug)]
struct Known<'c> {
    entry: &'c Resource<WorkloadEntry>,
    workload: Workload,
    has_proxy: bool,
    /// The ports its proxy (or application) listens on: the entry's port
    /// numbers and those of the ServiceEntries that select it.
    ports: BTreeSet<u16>,
}

impl Known<'_> {
    fn key(&self) -> String {
        self.entry.key()
    }
}

/// Shared lookups for the checks.
struct Context<'c> {
    config: &'c ConfigSet,
    engine: PolicyEngine,
    workloads: Vec<Known<'c>>,
}

impl<'c> Context<'c> {
    fn new(config: &'c ConfigSet, facts: &Facts) -> Context<'c> {
        let workloads = config
            .workload_entries
            .iter()
            .map(|entry| {
                let has_proxy = match &facts.workloads_with_proxy {
                    Some(set) => {
                        set.contains(&(entry.meta.namespace.clone(), entry.meta.name.clone()))
                    }
                    None => meshward_config::annotations::workload_has_proxy(&entry.meta),
                };
                let mut ports: BTreeSet<u16> = entry.spec.ports.values().copied().collect();
                for se in &config.service_entries {
                    let selects = se.meta.namespace == entry.meta.namespace
                        && se
                            .spec
                            .workload_selector
                            .as_ref()
                            .is_some_and(|sel| labels_match(sel, &entry.spec.labels));
                    if selects {
                        ports.extend(se.spec.ports.iter().map(|p| {
                            entry
                                .spec
                                .ports
                                .get(&p.name)
                                .copied()
                                .or(p.target_port)
                                .unwrap_or(p.number)
                        }));
                    }
                }
                Known {
                    entry,
                    workload: Workload::from_entry(entry),
                    has_proxy,
                    ports,
                }
            })
            .collect();
        Context {
            config,
            // The engine clones the set once; analysis is not a hot path.
            engine: PolicyEngine::new(Arc::new(config.clone())),
            workloads,
        }
    }

    fn root(&self) -> &str {
        &self.config.mesh.root_namespace
    }

    /// The workloads a selector picks for a policy of namespace `ns`:
    /// those of `ns`, or of every namespace when `any_namespace`.
    fn selected<'a>(
        &'a self,
        ns: &'a str,
        selector: Option<&'a WorkloadSelector>,
        any_namespace: bool,
    ) -> impl Iterator<Item = &'a Known<'c>> + 'a {
        self.workloads.iter().filter(move |w| {
            (any_namespace || w.entry.meta.namespace == ns)
                && selector.is_none_or(|s| s.matches(&w.entry.spec.labels))
        })
    }
}

fn labels_match(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// `k1=v1,k2=v2`, as Kubernetes prints a label selector.
fn selector_text(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// `a, b and c` for lists in messages; past [`LIST_MAX`] items, the first
/// ones and how many more.
fn list(items: &[String]) -> String {
    match items {
        [] => String::new(),
        [one] => one.clone(),
        many if many.len() > LIST_MAX => format!(
            "{} and {} more",
            many[..LIST_MAX].join(", "),
            many.len() - LIST_MAX
        ),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}

/// The most items [`list`] names.
const LIST_MAX: usize = 5;
