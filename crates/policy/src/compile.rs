//! Compiling AuthorizationPolicies into matchers, once per policy.
//!
//! A rule becomes `from` entries (OR of AND-ed clauses), `to` entries (the
//! same) and `when` clauses (AND). Each field becomes one clause for its
//! values (any may match) and one negated clause for its `not*` values.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use meshward_config::model::security::{
    Action, AuthorizationPolicy, Condition, Operation, Rule, Source,
};
use meshward_config::values::ConditionKey;
use meshward_config::{MeshConfig, Resource};
use serde_json::Value;

use crate::matcher::{
    Glob, NamespaceMatch, PathMatch, StrMatch, TrustDomainMatch, ip_in, service_account_globs,
};
use crate::request::Request;

/// Which policy decided, for explanations, logs and metrics.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyRef {
    pub namespace: String,
    pub name: String,
    pub action: Action,
    pub dry_run: bool,
}

impl std::fmt::Display for PolicyRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(Debug)]
pub(crate) struct CompiledPolicy {
    pub id: Arc<PolicyRef>,
    pub provider: Option<String>,
    pub rules: Vec<CompiledRule>,
}

#[derive(Debug)]
pub(crate) struct CompiledRule {
    from: Vec<Vec<Clause>>,
    to: Vec<Vec<Clause>>,
    when: Vec<Clause>,
    /// Uses an attribute only HTTP requests have.
    http_only: bool,
    /// Holds something meshward cannot evaluate (an `experimental.*` key).
    /// ALLOW: the rule never matches; DENY-like: the clause is dropped.
    unevaluable: bool,
}

/// The space-delimited JWT claims Istio always splits.
pub(crate) const DEFAULT_SPACE_DELIMITED: [&str; 2] = ["scope", "permission"];

#[derive(Debug)]
struct Clause {
    cond: Cond,
    negate: bool,
}

#[derive(Debug)]
enum Cond {
    Principal(Vec<StrMatch>),
    Namespace(Vec<NamespaceMatch>),
    ServiceAccount(Vec<Glob>),
    TrustDomain(Vec<TrustDomainMatch>),
    RequestPrincipal(Vec<(StrMatch, StrMatch)>),
    SourceIp(Vec<IpNet>),
    RemoteIp(Vec<IpNet>),
    DestinationIp(Vec<IpNet>),
    /// `None` in the list means `*` (header present).
    Host(Vec<Option<StrMatch>>),
    Method(Vec<StrMatch>),
    Path(Vec<PathMatch>),
    Port(Vec<u16>),
    Header(Box<str>, Vec<Option<StrMatch>>),
    Claim(Vec<String>, Vec<StrMatch>),
    Audience(Vec<StrMatch>),
    Presenter(Vec<StrMatch>),
    Sni(Vec<StrMatch>),
}

impl Cond {
    fn http_only(&self) -> bool {
        matches!(
            self,
            Cond::RequestPrincipal(_)
                | Cond::Host(_)
                | Cond::Method(_)
                | Cond::Path(_)
                | Cond::Header(..)
                | Cond::Claim(..)
                | Cond::Audience(_)
                | Cond::Presenter(_)
        )
    }
}

/// Facts precomputed once per request.
pub(crate) struct Facts<'r, 'a> {
    pub req: &'r Request<'a>,
    /// The normalized path, for HTTP.
    pub path: &'r str,
    pub space_delimited: &'r BTreeSet<String>,
}

/// Builds the condition for a list of values of one `when` key.
type CondBuilder<'a> = Box<dyn Fn(&[String]) -> Cond + 'a>;

pub(crate) struct Compiler<'m> {
    pub mesh: &'m MeshConfig,
}

impl Compiler<'_> {
    pub fn policy(&self, p: &Resource<AuthorizationPolicy>) -> CompiledPolicy {
        let dry_run = p
            .meta
            .annotations
            .get(meshward_config::DRY_RUN_ANNOTATION)
            .and_then(|v| meshward_config::parse_go_bool(v))
            .unwrap_or(false)
            && matches!(p.spec.action, Action::Allow | Action::Deny);
        CompiledPolicy {
            id: Arc::new(PolicyRef {
                namespace: p.meta.namespace.clone(),
                name: p.meta.name.clone(),
                action: p.spec.action,
                dry_run,
            }),
            provider: p.spec.provider.clone(),
            rules: p
                .spec
                .rules
                .iter()
                .map(|r| self.rule(r, &p.meta.namespace))
                .collect(),
        }
    }

    fn rule(&self, r: &Rule, policy_ns: &str) -> CompiledRule {
        let from: Vec<Vec<Clause>> = r.from.iter().map(|s| self.source(s, policy_ns)).collect();
        let to: Vec<Vec<Clause>> = r.to.iter().map(|o| self.operation(o)).collect();
        let mut when = Vec::new();
        let mut unevaluable = false;
        for c in &r.when {
            match self.condition(c, policy_ns) {
                Some(clauses) => when.extend(clauses),
                None => unevaluable = true,
            }
        }
        let http_only = from
            .iter()
            .chain(to.iter())
            .flatten()
            .chain(when.iter())
            .any(|c| c.cond.http_only());
        CompiledRule {
            from,
            to,
            when,
            http_only,
            unevaluable,
        }
    }

    fn source(&self, s: &Source, policy_ns: &str) -> Vec<Clause> {
        let mut out = Vec::new();
        let principals = |v: &[String]| Cond::Principal(self.principals(v));
        push(&mut out, &s.principals, &s.not_principals, principals);
        push(
            &mut out,
            &s.request_principals,
            &s.not_request_principals,
            |v| Cond::RequestPrincipal(v.iter().map(|x| request_principal(x)).collect()),
        );
        push(
            &mut out,
            &s.service_accounts,
            &s.not_service_accounts,
            |v| {
                Cond::ServiceAccount(
                    v.iter()
                        .flat_map(|x| service_account(x, policy_ns))
                        .collect(),
                )
            },
        );
        push(&mut out, &s.namespaces, &s.not_namespaces, |v| {
            Cond::Namespace(v.iter().map(|x| NamespaceMatch::new(x)).collect())
        });
        push(&mut out, &s.trust_domains, &s.not_trust_domains, |v| {
            Cond::TrustDomain(self.trust_domains(v))
        });
        push(
            &mut out,
            &s.remote_ip_blocks,
            &s.not_remote_ip_blocks,
            |v| Cond::RemoteIp(nets(v)),
        );
        push(&mut out, &s.ip_blocks, &s.not_ip_blocks, |v| {
            Cond::SourceIp(nets(v))
        });
        out
    }

    fn operation(&self, o: &Operation) -> Vec<Clause> {
        let mut out = Vec::new();
        push(&mut out, &o.hosts, &o.not_hosts, |v| {
            Cond::Host(v.iter().map(|h| host(h)).collect())
        });
        push(&mut out, &o.methods, &o.not_methods, |v| {
            Cond::Method(v.iter().map(|m| StrMatch::new(m)).collect())
        });
        push(&mut out, &o.paths, &o.not_paths, |v| {
            Cond::Path(v.iter().map(|p| PathMatch::new(p)).collect())
        });
        push(&mut out, &o.ports, &o.not_ports, |v| Cond::Port(ports(v)));
        out
    }

    /// `None` when the condition cannot be evaluated by meshward.
    fn condition(&self, c: &Condition, policy_ns: &str) -> Option<Vec<Clause>> {
        let strs = |v: &[String]| v.iter().map(|x| StrMatch::new(x)).collect::<Vec<_>>();
        let build: CondBuilder<'_> = match &c.key {
            ConditionKey::RequestHeader(name) => {
                let name: Box<str> = name.as_str().into();
                Box::new(move |v| {
                    Cond::Header(
                        name.clone(),
                        v.iter()
                            .map(|x| (x != "*").then(|| StrMatch::new(x)))
                            .collect(),
                    )
                })
            }
            ConditionKey::SourceIp => Box::new(|v| Cond::SourceIp(nets(v))),
            ConditionKey::RemoteIp => Box::new(|v| Cond::RemoteIp(nets(v))),
            ConditionKey::DestinationIp => Box::new(|v| Cond::DestinationIp(nets(v))),
            ConditionKey::SourceNamespace => {
                Box::new(|v| Cond::Namespace(v.iter().map(|x| NamespaceMatch::new(x)).collect()))
            }
            ConditionKey::SourcePrincipal => Box::new(|v| Cond::Principal(self.principals(v))),
            ConditionKey::SourceTrustDomain => {
                Box::new(|v| Cond::TrustDomain(self.trust_domains(v)))
            }
            ConditionKey::SourceServiceAccount => {
                let ns = policy_ns.to_string();
                Box::new(move |v| {
                    Cond::ServiceAccount(v.iter().flat_map(|x| service_account(x, &ns)).collect())
                })
            }
            ConditionKey::RequestAuthPrincipal => Box::new(|v| {
                Cond::RequestPrincipal(v.iter().map(|x| request_principal(x)).collect())
            }),
            ConditionKey::RequestAuthAudiences => Box::new(move |v| Cond::Audience(strs(v))),
            ConditionKey::RequestAuthPresenter => Box::new(move |v| Cond::Presenter(strs(v))),
            ConditionKey::RequestAuthClaims(path) => {
                let path = path.clone();
                Box::new(move |v| Cond::Claim(path.clone(), strs(v)))
            }
            ConditionKey::DestinationPort => Box::new(|v| Cond::Port(ports(v))),
            ConditionKey::ConnectionSni => Box::new(move |v| Cond::Sni(strs(v))),
            ConditionKey::Experimental(_) | ConditionKey::Untranslatable(_) => return None,
        };
        let mut out = Vec::new();
        push(&mut out, &c.values, &c.not_values, |v| build(v));
        Some(out)
    }

    /// Trust domains, with Istio's alias expansion
    /// (`ExpandTrustDomainAliases`): a value that is the mesh trust domain
    /// or one of its aliases stands for all of them.
    fn trust_domains(&self, values: &[String]) -> Vec<TrustDomainMatch> {
        let mut domains: Vec<&str> = vec![self.mesh.trust_domain.as_str()];
        domains.extend(self.mesh.trust_domain_aliases.iter().map(String::as_str));
        let mut out: Vec<&str> = Vec::new();
        for v in values {
            let expanded = if domains.contains(&v.as_str()) {
                domains.clone()
            } else {
                vec![v.as_str()]
            };
            for td in expanded {
                if !out.contains(&td) {
                    out.push(td);
                }
            }
        }
        out.into_iter().map(TrustDomainMatch::new).collect()
    }

    /// Principals, with Istio's trust-domain alias expansion: a principal of
    /// exactly five parts whose trust domain is `cluster.local`, the mesh
    /// trust domain or one of its aliases stands for all of them.
    pub(crate) fn principals(&self, values: &[String]) -> Vec<StrMatch> {
        let mut domains: Vec<&str> = vec![self.mesh.trust_domain.as_str()];
        domains.extend(self.mesh.trust_domain_aliases.iter().map(String::as_str));
        let mut out: Vec<String> = Vec::new();
        for v in values {
            let parts: Vec<&str> = v.split('/').collect();
            let local = parts.len() == 5
                && parts[0] != "*"
                && (parts[0] == "cluster.local" || domains.contains(&parts[0]));
            if local {
                let rest = &v[parts[0].len()..];
                for td in &domains {
                    let expanded = format!("{td}{rest}");
                    if !out.contains(&expanded) {
                        out.push(expanded);
                    }
                }
            } else if !out.contains(v) {
                out.push(v.clone());
            }
        }
        out.iter().map(|v| StrMatch::new(v)).collect()
    }
}

fn push(
    out: &mut Vec<Clause>,
    values: &[String],
    not_values: &[String],
    build: impl Fn(&[String]) -> Cond,
) {
    if !values.is_empty() {
        out.push(Clause {
            cond: build(values),
            negate: false,
        });
    }
    if !not_values.is_empty() {
        out.push(Clause {
            cond: build(not_values),
            negate: true,
        });
    }
}

fn nets(values: &[String]) -> Vec<IpNet> {
    // Validated on load; anything unparsable is left out, so it never matches.
    values
        .iter()
        .filter_map(|v| crate::matcher::ip_block(v))
        .collect()
}

fn ports(values: &[String]) -> Vec<u16> {
    values
        .iter()
        .filter_map(|v| meshward_config::values::parse_port(v).ok())
        .collect()
}

fn host(value: &str) -> Option<StrMatch> {
    (value != "*").then(|| StrMatch::new_ignore_case(value))
}

fn service_account(value: &str, policy_ns: &str) -> [Glob; 4] {
    let (ns, sa) = value.split_once('/').unwrap_or((policy_ns, value));
    service_account_globs(ns, sa)
}

/// Istio's request principal matcher: the value splits at its last `/` into
/// issuer and subject, each with `*` prefix/suffix/presence forms.
fn request_principal(value: &str) -> (StrMatch, StrMatch) {
    if value == "*" {
        return (StrMatch::NonEmpty, StrMatch::NonEmpty);
    }
    let split = value.rsplit_once('/');
    if let Some(rest) = value.strip_prefix('*') {
        return match split {
            Some((iss, sub)) => {
                let iss = if iss == "*" {
                    StrMatch::NonEmpty
                } else {
                    StrMatch::Suffix(iss[1..].into())
                };
                (iss, StrMatch::Exact(sub.into()))
            }
            None => (StrMatch::NonEmpty, StrMatch::Suffix(rest.into())),
        };
    }
    if let Some(rest) = value.strip_suffix('*') {
        return match split {
            Some((iss, sub)) => {
                let sub = if sub == "*" {
                    StrMatch::NonEmpty
                } else {
                    StrMatch::Prefix(sub[..sub.len() - 1].into())
                };
                (StrMatch::Exact(iss.into()), sub)
            }
            None => (StrMatch::Prefix(rest.into()), StrMatch::NonEmpty),
        };
    }
    match split {
        Some((iss, sub)) => (StrMatch::Exact(iss.into()), StrMatch::Exact(sub.into())),
        None => (StrMatch::Exact(value.into()), StrMatch::Exact("".into())),
    }
}

impl CompiledRule {
    /// Whether the rule matches. `deny_like` selects how attributes that do
    /// not apply (HTTP-only on TCP, unevaluable keys) are treated: an ALLOW
    /// rule using them never matches, a DENY/AUDIT/CUSTOM rule ignores them.
    pub fn matches(&self, facts: &Facts<'_, '_>, deny_like: bool) -> bool {
        if !deny_like && (self.unevaluable || (self.http_only && facts.req.http.is_none())) {
            return false;
        }
        let all = |clauses: &[Clause]| clauses.iter().all(|c| c.matches(facts));
        (self.from.is_empty() || self.from.iter().any(|s| all(s)))
            && (self.to.is_empty() || self.to.iter().any(|o| all(o)))
            && all(&self.when)
    }
}

impl Clause {
    #[inline]
    fn matches(&self, facts: &Facts<'_, '_>) -> bool {
        if facts.req.http.is_none() && self.cond.http_only() {
            // Only reachable for DENY-like rules: the field is dropped.
            return true;
        }
        self.cond.matches(facts) != self.negate
    }
}

fn any_net(nets: &[IpNet], ip: IpAddr) -> bool {
    nets.iter().any(|n| ip_in(n, ip))
}

impl Cond {
    fn matches(&self, f: &Facts<'_, '_>) -> bool {
        let req = f.req;
        match self {
            Cond::Principal(m) => req
                .principal
                .is_some_and(|p| m.iter().any(|m| m.matches(p))),
            Cond::Namespace(m) => req
                .principal
                .is_some_and(|p| m.iter().any(|m| m.matches(p))),
            Cond::ServiceAccount(g) => req
                .principal
                .is_some_and(|p| g.iter().any(|g| g.matches(p))),
            Cond::TrustDomain(m) => req
                .principal
                .is_some_and(|p| m.iter().any(|m| m.matches(p))),
            Cond::RequestPrincipal(m) => req.http.and_then(|h| h.auth).is_some_and(|a| {
                m.iter()
                    .any(|(mi, ms)| mi.matches(&a.issuer) && ms.matches(&a.subject))
            }),
            Cond::SourceIp(n) => any_net(n, req.source_ip),
            Cond::RemoteIp(n) => any_net(n, req.remote_ip()),
            Cond::DestinationIp(n) => req.destination_ip.is_some_and(|ip| any_net(n, ip)),
            Cond::Host(m) => req.http.is_some_and(|h| {
                m.iter()
                    .any(|m| m.as_ref().is_none_or(|m| m.matches_ignore_case(h.host)))
            }),
            Cond::Method(m) => req
                .http
                .is_some_and(|h| m.iter().any(|m| m.matches(h.method))),
            Cond::Path(m) => req.http.is_some() && m.iter().any(|m| m.matches(f.path)),
            Cond::Port(p) => p.contains(&req.port),
            Cond::Header(name, m) => req.http.is_some_and(|h| {
                h.headers.header(name).is_some_and(|v| {
                    m.iter()
                        .any(|m| m.as_ref().is_none_or(|m| m.matches_bytes(&v)))
                })
            }),
            Cond::Claim(path, m) => req.http.and_then(|h| h.auth).is_some_and(|a| {
                let mut value = a.claims.get(&path[0]);
                for key in &path[1..] {
                    value = value.and_then(|v| v.get(key));
                }
                let split = path.len() == 1 && f.space_delimited.contains(&path[0]);
                value.is_some_and(|v| claim_matches(v, m, split))
            }),
            Cond::Audience(m) => req.http.and_then(|h| h.auth).is_some_and(|a| {
                a.audiences
                    .iter()
                    .any(|aud| m.iter().any(|m| m.matches(aud)))
            }),
            Cond::Presenter(m) => req
                .http
                .and_then(|h| h.auth)
                .and_then(|a| a.presenter.as_deref())
                .is_some_and(|p| m.iter().any(|m| m.matches(p))),
            Cond::Sni(m) => req.sni.is_some_and(|s| m.iter().any(|m| m.matches(s))),
        }
    }
}

/// A claim matches when it is a string matching any value, or a list with a
/// string element matching any value. Space-delimited claims are split first.
fn claim_matches(value: &Value, m: &[StrMatch], split: bool) -> bool {
    match value {
        Value::String(s) if split => s
            .split_whitespace()
            .any(|part| m.iter().any(|m| m.matches(part))),
        Value::String(s) => m.iter().any(|m| m.matches(s)),
        Value::Array(items) => items
            .iter()
            .any(|i| i.as_str().is_some_and(|s| m.iter().any(|m| m.matches(s)))),
        _ => false,
    }
}
