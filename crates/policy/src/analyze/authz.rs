//! AuthorizationPolicy and RequestAuthentication checks: identities and
//! namespaces nobody has (IST0101, MW0101, MW0102), unusable CUSTOM
//! providers (MW0107), JWT validation that nothing requires (MW0106), and
//! dry-run policies (MW0109).

use std::collections::{BTreeMap, BTreeSet};

use meshward_config::Resource;
use meshward_config::model::security::{Action, AuthorizationPolicy};
use meshward_config::values::ConditionKey;

use super::codes::{
    DRY_RUN_POLICY, NAMESPACE_WITHOUT_WORKLOADS, REFERENCED_RESOURCE_NOT_FOUND, TOKEN_NOT_REQUIRED,
    UNKNOWN_PRINCIPAL, UNUSABLE_CUSTOM_PROVIDER,
};
use super::{Context, Message, list};
use crate::compile::Compiler;
use crate::matcher::{Glob, service_account_globs};

const AP: &str = "AuthorizationPolicy";

pub(super) fn check(cx: &Context<'_>, out: &mut Vec<Message>) {
    let ids = Identities::new(cx);
    for p in &cx.config.authorization_policies {
        // Without any workload described, every identity is unknown.
        if !cx.workloads.is_empty() {
            peers(cx, &ids, p, out);
        }
        dry_run(p, out);
        if p.spec.action == Action::Custom && p.spec.target_refs.is_empty() {
            custom(cx, p, out);
        }
    }
    tokens(cx, out);
}

/// Who the mesh knows: identities and namespaces.
struct Identities {
    /// `trust-domain/ns/NS/sa/SA` of every workload.
    principals: BTreeSet<String>,
    /// Service accounts per namespace, for hints.
    accounts: BTreeMap<String, BTreeSet<String>>,
    /// Namespaces with a workload.
    workload_namespaces: BTreeSet<String>,
    /// Namespaces any resource is in, and the root namespace.
    namespaces: BTreeSet<String>,
}

impl Identities {
    fn new(cx: &Context<'_>) -> Identities {
        let c = cx.config;
        let td = &c.mesh.trust_domain;
        let mut ids = Identities {
            principals: BTreeSet::new(),
            accounts: BTreeMap::new(),
            workload_namespaces: BTreeSet::new(),
            namespaces: BTreeSet::new(),
        };
        let mut add = |ns: &str, sa: &str| {
            ids.principals.insert(format!("{td}/ns/{ns}/sa/{sa}"));
            ids.accounts
                .entry(ns.to_string())
                .or_default()
                .insert(sa.to_string());
            ids.workload_namespaces.insert(ns.to_string());
        };
        for w in &cx.workloads {
            add(&w.workload.namespace, &w.workload.service_account);
        }
        // Endpoints a ServiceEntry lists run as its namespace's accounts.
        for se in &c.service_entries {
            for e in &se.spec.endpoints {
                if let Some(sa) = &e.service_account {
                    add(&se.meta.namespace, sa);
                }
            }
        }
        let metas = c
            .peer_authentications
            .iter()
            .map(|r| &r.meta)
            .chain(c.authorization_policies.iter().map(|r| &r.meta))
            .chain(c.request_authentications.iter().map(|r| &r.meta))
            .chain(c.destination_rules.iter().map(|r| &r.meta))
            .chain(c.service_entries.iter().map(|r| &r.meta))
            .chain(c.workload_entries.iter().map(|r| &r.meta));
        ids.namespaces = metas.map(|m| m.namespace.clone()).collect();
        ids.namespaces.insert(c.mesh.root_namespace.clone());
        ids
    }
}

/// `principals`, `serviceAccounts`, `namespaces` (their `not*` forms, and
/// the `source.principal`, `source.serviceAccount` and `source.namespace`
/// conditions) against the known workloads.
fn peers(
    cx: &Context<'_>,
    ids: &Identities,
    p: &Resource<AuthorizationPolicy>,
    out: &mut Vec<Message>,
) {
    let compiler = Compiler {
        mesh: &cx.config.mesh,
    };
    let principal = |value: &str, field: String, out: &mut Vec<Message>| {
        if value == "*" {
            return;
        }
        let matchers = compiler.principals(&[value.to_string()]);
        if ids
            .principals
            .iter()
            .any(|known| matchers.iter().any(|m| m.matches(known)))
        {
            return;
        }
        let mut text = format!("No known workload has principal \"{value}\"");
        let parts: Vec<&str> = value.split('/').collect();
        if let [_, "ns", ns, "sa", _] = parts.as_slice()
            && let Some(accounts) = ids.accounts.get(*ns)
        {
            let accounts: Vec<String> = accounts.iter().cloned().collect();
            text.push_str(&format!(
                "; the service accounts of namespace {ns} are {}",
                list(&accounts)
            ));
        }
        // Istio's matcher takes one leading or else one trailing `*`.
        let rest = match value.strip_prefix('*') {
            Some(suffix) => suffix,
            None => value.strip_suffix('*').unwrap_or(value),
        };
        if rest.contains('*') {
            text.push_str(
                " (`*` is a wildcard only as the first or else the last character of a value)",
            );
        }
        out.push(Message::new(UNKNOWN_PRINCIPAL, AP, p, Some(field), text));
    };
    let service_account = |value: &str, field: String, out: &mut Vec<Message>| {
        let (ns, sa) = value
            .split_once('/')
            .unwrap_or((p.meta.namespace.as_str(), value));
        let globs = service_account_globs(ns, sa);
        if ids
            .principals
            .iter()
            .any(|known| globs.iter().any(|g| g.matches(known)))
        {
            return;
        }
        let mut text = format!("No known workload has service account \"{ns}/{sa}\"");
        if let Some(accounts) = ids.accounts.get(ns) {
            let accounts: Vec<String> = accounts.iter().cloned().collect();
            text.push_str(&format!(
                "; the service accounts of namespace {ns} are {}",
                list(&accounts)
            ));
        }
        out.push(Message::new(UNKNOWN_PRINCIPAL, AP, p, Some(field), text));
    };
    let namespace = |value: &str, field: String, out: &mut Vec<Message>| {
        if value == "*" {
            return;
        }
        let glob = Glob::star(value);
        if !ids.namespaces.iter().any(|ns| glob.matches(ns)) {
            out.push(Message::new(
                REFERENCED_RESOURCE_NOT_FOUND,
                AP,
                p,
                Some(field),
                format!("Referenced namespace not found: \"{value}\""),
            ));
        } else if !ids.workload_namespaces.iter().any(|ns| glob.matches(ns)) {
            out.push(Message::new(
                NAMESPACE_WITHOUT_WORKLOADS,
                AP,
                p,
                Some(field),
                format!("No known workload is in namespace \"{value}\""),
            ));
        }
    };
    let mut found = Vec::new();
    for (i, rule) in p.spec.rules.iter().enumerate() {
        for (j, from) in rule.from.iter().enumerate() {
            let base = format!("spec.rules[{i}].from[{j}].source");
            for (name, values) in [
                ("principals", &from.principals),
                ("notPrincipals", &from.not_principals),
            ] {
                for (k, v) in values.iter().enumerate() {
                    principal(v, format!("{base}.{name}[{k}]"), &mut found);
                }
            }
            for (name, values) in [
                ("serviceAccounts", &from.service_accounts),
                ("notServiceAccounts", &from.not_service_accounts),
            ] {
                for (k, v) in values.iter().enumerate() {
                    service_account(v, format!("{base}.{name}[{k}]"), &mut found);
                }
            }
            for (name, values) in [
                ("namespaces", &from.namespaces),
                ("notNamespaces", &from.not_namespaces),
            ] {
                for (k, v) in values.iter().enumerate() {
                    namespace(v, format!("{base}.{name}[{k}]"), &mut found);
                }
            }
        }
        for (j, c) in rule.when.iter().enumerate() {
            let base = format!("spec.rules[{i}].when[{j}]");
            for (name, values) in [("values", &c.values), ("notValues", &c.not_values)] {
                for (k, v) in values.iter().enumerate() {
                    let field = format!("{base}.{name}[{k}]");
                    match c.key {
                        ConditionKey::SourcePrincipal => principal(v, field, &mut found),
                        ConditionKey::SourceServiceAccount => service_account(v, field, &mut found),
                        ConditionKey::SourceNamespace => namespace(v, field, &mut found),
                        _ => {}
                    }
                }
            }
        }
    }
    out.extend(found);
}

/// A dry-run policy is evaluated and logged, never enforced: worth a
/// reminder, as the annotation is easily left behind. (Validation refuses
/// it on actions other than ALLOW and DENY.)
fn dry_run(p: &Resource<AuthorizationPolicy>, out: &mut Vec<Message>) {
    let annotation = meshward_config::DRY_RUN_ANNOTATION;
    let on = p
        .meta
        .annotations
        .get(annotation)
        .and_then(|v| meshward_config::parse_go_bool(v))
        .unwrap_or(false);
    if on {
        out.push(Message::new(
            DRY_RUN_POLICY,
            AP,
            p,
            Some(format!("metadata.annotations[{annotation}]")),
            "The policy is in dry-run mode: it is evaluated and logged, never enforced."
                .to_string(),
        ));
    }
}

/// A CUSTOM policy whose provider is missing, broken or not an authorizer,
/// or whose workloads mix providers: its rules deny instead.
fn custom(cx: &Context<'_>, p: &Resource<AuthorizationPolicy>, out: &mut Vec<Message>) {
    let mesh = &cx.config.mesh;
    let name = p.spec.provider.as_deref().unwrap_or_default();
    let problem = if let Some(why) = mesh.invalid_providers.get(name) {
        Some(format!(
            "Extension provider \"{name}\" cannot be used: {why}"
        ))
    } else {
        match mesh.provider(name) {
            None => Some(format!(
                "Extension provider \"{name}\" is not defined in meshConfig.extensionProviders"
            )),
            Some(prov) if !prov.is_authz() => Some(format!(
                "Extension provider \"{name}\" is a {} provider, not an authorization provider",
                prov.kind
            )),
            Some(_) => None,
        }
    };
    if let Some(problem) = problem {
        out.push(Message::new(
            UNUSABLE_CUSTOM_PROVIDER,
            AP,
            p,
            Some("spec.provider.name".to_string()),
            format!("{problem}; the requests and connections this policy's rules match are denied"),
        ));
        return;
    }
    // The provider is fine; the workloads may still mix providers.
    let ns = p.meta.namespace.as_str();
    let any = ns == cx.root();
    let mut conflicts: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for w in cx.selected(ns, p.spec.selector.as_ref(), any) {
        if let Some(problem) = cx.engine.workload(&w.workload).custom_problem() {
            conflicts
                .entry(problem.to_string())
                .or_default()
                .push(w.key());
        }
    }
    for (problem, workloads) in conflicts {
        out.push(Message::new(
            UNUSABLE_CUSTOM_PROVIDER,
            AP,
            p,
            Some("spec.provider.name".to_string()),
            format!(
                "The CUSTOM policies of {} cannot be enforced ({problem}); the requests and connections their rules match are denied",
                list(&workloads)
            ),
        ));
    }
}

/// A RequestAuthentication only rejects invalid tokens; unless an ALLOW or
/// DENY policy looks at the token, requests without one pass.
fn tokens(cx: &Context<'_>, out: &mut Vec<Message>) {
    for ra in &cx.config.request_authentications {
        if !ra.spec.target_refs.is_empty() {
            continue;
        }
        let ns = ra.meta.namespace.as_str();
        let any = ns == cx.root();
        let selector = ra
            .spec
            .selector
            .as_ref()
            .filter(|s| !s.match_labels.is_empty());
        let mut open = Vec::new();
        for w in cx.selected(ns, selector, any).filter(|w| w.has_proxy) {
            let view = cx.engine.workload(&w.workload);
            let requires = view.policies().iter().any(|pr| {
                !pr.dry_run
                    && matches!(pr.action, Action::Allow | Action::Deny)
                    && cx.config.authorization_policies.iter().any(|ap| {
                        ap.meta.namespace == pr.namespace
                            && ap.meta.name == pr.name
                            && ap.spec.uses_jwt()
                    })
            });
            if !requires {
                open.push(w.key());
            }
        }
        if !open.is_empty() {
            out.push(Message::new(
                TOKEN_NOT_REQUIRED,
                "RequestAuthentication",
                ra,
                Some("spec.jwtRules".to_string()),
                format!(
                    "No ALLOW or DENY AuthorizationPolicy of {} uses requestPrincipals or request.auth.*: requests without a token pass, only invalid tokens are rejected (require one with an ALLOW rule `from: [{{source: {{requestPrincipals: [\"*\"]}}}}]`)",
                    list(&open)
                ),
            ));
        }
    }
}
