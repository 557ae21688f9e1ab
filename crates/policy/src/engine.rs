//! The policy index and per-workload compiled policy.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use meshward_config::model::security::{Action, MtlsMode, RequestAuthentication};
use meshward_config::{ConfigSet, MeshConfig, PathNormalization, Resource};

use crate::compile::{CompiledPolicy, Compiler, DEFAULT_SPACE_DELIMITED, Facts, PolicyRef};
use crate::decision::{Decision, DryRunResult, ExtAuthzCheck, Reason, RuleRef, Verdict};
use crate::normalize::{PathError, normalize_path};
use crate::peer::{PeerDecision, PeerModes};
use crate::request::Request;

/// The destination workload a decision is made for.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Workload {
    pub namespace: String,
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
}

impl Workload {
    /// The workload a WorkloadEntry describes (service account `default`
    /// when none is given, as in Kubernetes).
    pub fn from_entry(
        entry: &meshward_config::Resource<meshward_config::model::WorkloadEntry>,
    ) -> Workload {
        Workload {
            namespace: entry.meta.namespace.clone(),
            service_account: entry
                .spec
                .service_account
                .clone()
                .unwrap_or_else(|| "default".to_string()),
            labels: entry.spec.labels.clone(),
        }
    }

    /// `ns/sa` rendered as this workload's principal in `trust_domain`.
    pub fn principal(&self, trust_domain: &str) -> String {
        format!(
            "{trust_domain}/ns/{}/sa/{}",
            self.namespace, self.service_account
        )
    }
}

impl std::fmt::Display for Workload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let labels: Vec<String> = self
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        write!(
            f,
            "namespace {}, service account {}, labels {{{}}}",
            self.namespace,
            self.service_account,
            labels.join(", ")
        )
    }
}

#[derive(Debug)]
struct IndexedPolicy {
    compiled: Arc<CompiledPolicy>,
    /// `None`: selects every workload in scope.
    selector: Option<BTreeMap<String, String>>,
}

/// All policies of a mesh, compiled once and indexed by namespace, so that
/// compiling the view of one workload only looks at its namespace and the
/// root namespace.
#[derive(Debug)]
pub struct PolicyEngine {
    config: Arc<ConfigSet>,
    by_namespace: HashMap<String, Vec<IndexedPolicy>>,
}

impl PolicyEngine {
    pub fn new(config: Arc<ConfigSet>) -> PolicyEngine {
        let compiler = Compiler { mesh: &config.mesh };
        let mut by_namespace: HashMap<String, Vec<IndexedPolicy>> = HashMap::new();
        for p in &config.authorization_policies {
            // Policies attached with targetRefs apply to gateways and
            // waypoints, never to sidecar workloads.
            if !p.spec.target_refs.is_empty() {
                continue;
            }
            by_namespace
                .entry(p.meta.namespace.clone())
                .or_default()
                .push(IndexedPolicy {
                    compiled: Arc::new(compiler.policy(p)),
                    selector: p.spec.selector.as_ref().map(|s| s.match_labels.clone()),
                });
        }
        PolicyEngine {
            config,
            by_namespace,
        }
    }

    pub fn config(&self) -> &ConfigSet {
        &self.config
    }

    pub fn mesh(&self) -> &MeshConfig {
        &self.config.mesh
    }

    /// The RequestAuthentications that apply to workload `w`: those of the
    /// root namespace and of its own whose selector matches it (none
    /// means all). Unlike PeerAuthentication, all of them apply at once.
    /// Those attached with `targetRefs` are for gateways and waypoints.
    pub fn request_authentications<'a>(
        &'a self,
        w: &'a Workload,
    ) -> impl Iterator<Item = &'a Resource<RequestAuthentication>> + 'a {
        let root = &self.config.mesh.root_namespace;
        self.config
            .request_authentications
            .iter()
            .filter(move |ra| {
                ra.spec.target_refs.is_empty()
                    && (ra.meta.namespace == *root || ra.meta.namespace == w.namespace)
                    && ra
                        .spec
                        .selector
                        .as_ref()
                        .is_none_or(|s| s.matches(&w.labels))
            })
    }

    /// Compiles the policy view of one workload.
    pub fn workload(&self, w: &Workload) -> WorkloadPolicy {
        let root = &self.config.mesh.root_namespace;
        let mut view = WorkloadPolicy {
            workload: w.clone(),
            peer: PeerModes::compute(&self.config, root, w),
            custom: Vec::new(),
            deny: Vec::new(),
            allow: Vec::new(),
            audit: Vec::new(),
            dry_run: Vec::new(),
            space_delimited: DEFAULT_SPACE_DELIMITED
                .iter()
                .map(|s| s.to_string())
                .collect(),
            normalization: self.config.mesh.path_normalization,
            custom_problem: None,
            mesh: Arc::clone(&self.config),
        };
        let namespaces: &[&str] = if *root == w.namespace {
            &[root.as_str()]
        } else {
            &[root.as_str(), w.namespace.as_str()]
        };
        for ns in namespaces {
            for p in self.by_namespace.get(*ns).into_iter().flatten() {
                let selected = p.selector.as_ref().is_none_or(|sel| {
                    sel.iter()
                        .all(|(k, v)| w.labels.get(k).is_some_and(|l| l == v))
                });
                if !selected {
                    continue;
                }
                let c = Arc::clone(&p.compiled);
                match (c.id.action, c.id.dry_run) {
                    (_, true) => view.dry_run.push(c),
                    (Action::Custom, _) => view.custom.push(c),
                    (Action::Deny, _) => view.deny.push(c),
                    (Action::Allow, _) => view.allow.push(c),
                    (Action::Audit, _) => view.audit.push(c),
                }
            }
        }
        for ra in self.request_authentications(w) {
            for rule in &ra.spec.jwt_rules {
                view.space_delimited
                    .extend(rule.space_delimited_claims.iter().cloned());
            }
        }
        view.custom_problem = custom_problem(&self.config.mesh, &view.custom);
        view
    }
}

/// Why the CUSTOM policies of a workload cannot be enforced, if they
/// cannot: as in Istio, every CUSTOM policy of a workload must name the
/// same provider, and that provider must be a defined ext-authz provider
/// (`getExtAuthz` in Istio's `pilot/pkg/security/authz/builder`; several
/// providers per workload need a feature flag that is off by default).
/// When they cannot, their rules deny instead (see
/// [`WorkloadPolicy::authorize`]).
fn custom_problem(mesh: &MeshConfig, custom: &[Arc<CompiledPolicy>]) -> Option<String> {
    let first = custom.first()?;
    let provider = first.provider.as_deref().unwrap_or_default();
    let named: BTreeSet<&str> = custom
        .iter()
        .map(|p| p.provider.as_deref().unwrap_or_default())
        .collect();
    if named.len() > 1 {
        let named: Vec<String> = named.iter().map(|n| format!("\"{n}\"")).collect();
        Some(format!(
            "only one provider can be used per workload, found {}",
            named.join(", ")
        ))
    } else if let Some(problem) = mesh.invalid_providers.get(provider) {
        Some(format!("provider \"{provider}\" cannot be used: {problem}"))
    } else if !mesh.provider(provider).is_some_and(|p| p.is_authz()) {
        Some(format!(
            "provider \"{provider}\" is not a defined authorization provider"
        ))
    } else {
        None
    }
}

/// The compiled policies that apply to one workload. Deciding costs only
/// what these policies cost, whatever the size of the mesh.
#[derive(Debug)]
pub struct WorkloadPolicy {
    workload: Workload,
    peer: PeerModes,
    custom: Vec<Arc<CompiledPolicy>>,
    /// Root-namespace policies come first, as Istio orders them.
    deny: Vec<Arc<CompiledPolicy>>,
    allow: Vec<Arc<CompiledPolicy>>,
    audit: Vec<Arc<CompiledPolicy>>,
    dry_run: Vec<Arc<CompiledPolicy>>,
    space_delimited: BTreeSet<String>,
    normalization: PathNormalization,
    /// Why the CUSTOM policies cannot be enforced, when they cannot: their
    /// rules then deny what they match.
    custom_problem: Option<String>,
    mesh: Arc<ConfigSet>,
}

impl WorkloadPolicy {
    pub fn workload(&self) -> &Workload {
        &self.workload
    }

    pub fn peer_modes(&self) -> &PeerModes {
        &self.peer
    }

    /// Why this workload's CUSTOM policies cannot be enforced, if they
    /// cannot. The requests and connections their rules match are then
    /// denied; the others go on to DENY and ALLOW.
    pub fn custom_problem(&self) -> Option<&str> {
        self.custom_problem.as_deref()
    }

    /// The request-target to forward for `raw`: its path normalized as
    /// authorization sees it (`meshConfig.pathNormalization`), then the
    /// query as sent. The application must get the path the decision was
    /// made on, as Envoy forwards its normalized `:path`. An error is a
    /// path refused outright (400).
    pub fn forwarded_target<'a>(&self, raw: &'a str) -> Result<Cow<'a, str>, PathError> {
        let path = normalize_path(raw, self.normalization)?;
        let query = raw.find(['?', '#']).map(|i| &raw[i..]);
        let query = query
            .filter(|q| q.starts_with('?'))
            .map(|q| match q.find('#') {
                Some(end) => &q[..end],
                None => q,
            });
        Ok(match (path, query) {
            (Cow::Borrowed(p), None) => Cow::Borrowed(p),
            // Unchanged path: the target as sent, minus any fragment.
            (Cow::Borrowed(p), Some(q)) if raw.len() == p.len() + q.len() => Cow::Borrowed(raw),
            (p, None) => p,
            (p, Some(q)) => Cow::Owned(format!("{p}{q}")),
        })
    }

    /// The effective mTLS mode on a workload port.
    pub fn mtls(&self, port: u16) -> &PeerDecision {
        self.peer.for_port(port)
    }

    /// Every authorization policy that applies, in evaluation order.
    pub fn policies(&self) -> Vec<Arc<PolicyRef>> {
        self.custom
            .iter()
            .chain(&self.audit)
            .chain(&self.deny)
            .chain(&self.allow)
            .chain(&self.dry_run)
            .map(|p| Arc::clone(&p.id))
            .collect()
    }

    /// The full inbound decision: the peer-authentication mode of the port
    /// (STRICT refuses plaintext), then authorization.
    pub fn decide(&self, req: &Request<'_>) -> Decision {
        let peer = self.mtls(req.port);
        if peer.mode == MtlsMode::Strict && req.principal.is_none() {
            return Decision::new(
                Verdict::Deny,
                Reason::PlaintextRejected {
                    source: peer.source.to_string(),
                },
            );
        }
        self.authorize(req)
    }

    /// The authorization decision alone: CUSTOM, then DENY, then ALLOW;
    /// AUDIT and dry-run policies are evaluated and reported only.
    pub fn authorize(&self, req: &Request<'_>) -> Decision {
        let path = match req.http {
            Some(h) => match normalize_path(h.path, self.normalization) {
                Ok(p) => p,
                Err(e) => return Decision::new(Verdict::Deny, Reason::InvalidPath(e.to_string())),
            },
            None => std::borrow::Cow::Borrowed(""),
        };
        let facts = Facts {
            req,
            path: &path,
            space_delimited: &self.space_delimited,
        };

        let mut ext_authz = None;
        if let Some(problem) = &self.custom_problem {
            // No provider to ask: Istio builds an RBAC filter with action
            // DENY from the CUSTOM rules in place of ext_authz
            // (`getBadCustomDenyRules` in `buildHTTP` and `buildTCP`), so
            // what they match is denied, before DENY and ALLOW, and the
            // rest goes on. On TCP every CUSTOM rule counts, whatever its
            // provider's kind, with HTTP-only conditions left out as for
            // DENY (the rules are generated with action DENY). AUDIT and
            // dry-run results are not gathered: Envoy's later filters
            // never see the request.
            for p in &self.custom {
                if let Some(rule) = first_match(p, &facts, true) {
                    let reason = Reason::CustomUnusable {
                        problem: problem.clone(),
                    };
                    return Decision::new(Verdict::Deny, reason).with_policy(p, rule);
                }
            }
        } else {
            for p in &self.custom {
                // An HTTP provider cannot judge a TCP connection: Istio
                // leaves such CUSTOM policies out of TCP filter chains.
                if req.http.is_none() && !self.provider_judges_tcp(p) {
                    continue;
                }
                if let Some(rule) = first_match(p, &facts, true) {
                    ext_authz = Some(ExtAuthzCheck {
                        provider: p.provider.clone().unwrap_or_default(),
                        policy: RuleRef {
                            policy: Arc::clone(&p.id),
                            rule,
                        },
                    });
                    break;
                }
            }
        }

        let mut decision = self.enforce(&facts);
        decision.ext_authz = ext_authz;
        for p in &self.audit {
            if let Some(rule) = first_match(p, &facts, true) {
                decision.audit.push(RuleRef {
                    policy: Arc::clone(&p.id),
                    rule,
                });
            }
        }
        if !self.dry_run.is_empty() {
            decision.dry_run = self.dry_run_results(&facts);
        }
        decision
    }

    /// Whether the provider of CUSTOM policy `p` checks TCP connections
    /// too (`envoyExtAuthzGrpc`, as Envoy's network ext_authz filter).
    fn provider_judges_tcp(&self, p: &CompiledPolicy) -> bool {
        self.mesh
            .mesh
            .provider(p.provider.as_deref().unwrap_or_default())
            .is_some_and(|prov| prov.kind == "envoyExtAuthzGrpc")
    }

    fn enforce(&self, facts: &Facts<'_, '_>) -> Decision {
        for p in &self.deny {
            if let Some(rule) = first_match(p, facts, true) {
                return Decision::new(Verdict::Deny, Reason::DenyMatched).with_policy(p, rule);
            }
        }
        if self.allow.is_empty() {
            return Decision::new(Verdict::Allow, Reason::NoAllowPolicies);
        }
        for p in &self.allow {
            if let Some(rule) = first_match(p, facts, false) {
                return Decision::new(Verdict::Allow, Reason::AllowMatched).with_policy(p, rule);
            }
        }
        Decision::new(
            Verdict::Deny,
            Reason::NoAllowMatched {
                policies: self.allow.iter().map(|p| p.id.to_string()).collect(),
            },
        )
    }

    fn dry_run_results(&self, facts: &Facts<'_, '_>) -> Vec<DryRunResult> {
        let mut out = Vec::new();
        let mut allow_seen = false;
        let mut allow_matched = false;
        for p in &self.dry_run {
            let deny_like = p.id.action == Action::Deny;
            let matched = first_match(p, facts, deny_like);
            if !deny_like {
                allow_seen = true;
            }
            if let Some(rule) = matched {
                allow_matched |= !deny_like;
                let would = if deny_like {
                    Verdict::Deny
                } else {
                    Verdict::Allow
                };
                out.push(DryRunResult {
                    rule: RuleRef {
                        policy: Arc::clone(&p.id),
                        rule,
                    },
                    would,
                });
            }
        }
        if allow_seen
            && !allow_matched
            && let Some(p) = self.dry_run.iter().find(|p| p.id.action == Action::Allow)
        {
            out.push(DryRunResult {
                rule: RuleRef {
                    policy: Arc::clone(&p.id),
                    rule: usize::MAX,
                },
                would: Verdict::Deny,
            });
        }
        out
    }
}

fn first_match(p: &CompiledPolicy, facts: &Facts<'_, '_>, deny_like: bool) -> Option<usize> {
    p.rules.iter().position(|r| r.matches(facts, deny_like))
}
