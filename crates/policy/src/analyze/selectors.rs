//! Selectors that select nothing: IST0127 NoMatchingWorkloadsFound; and
//! IST0167 IneffectivePolicy for policies whose workloads all lack the
//! proxy that would enforce them, and for PeerAuthentications with a
//! selector in the root namespace, which Istio ignores.

use meshward_config::{Resource, WorkloadSelector};

use super::codes::{INEFFECTIVE_POLICY, NO_MATCHING_WORKLOADS_FOUND};
use super::{Context, Message, selector_text};

/// How a kind's selector scopes, and whether a proxy must enforce it.
struct Scope<'a> {
    kind: &'static str,
    field: &'static str,
    /// A selector in the root namespace selects in every namespace
    /// (AuthorizationPolicy, RequestAuthentication).
    root_selects_everywhere: bool,
    /// A policy without a selector outside the root namespace applies to
    /// its whole namespace, which must then hold a workload.
    namespace_wide: bool,
    /// The resource does something only where a proxy runs.
    needs_proxy: bool,
    selector: Option<&'a WorkloadSelector>,
}

pub(super) fn check(cx: &Context<'_>, out: &mut Vec<Message>) {
    for p in &cx.config.peer_authentications {
        let with_labels = p
            .spec
            .selector
            .as_ref()
            .is_some_and(|s| !s.match_labels.is_empty());
        if p.spec.target_refs.is_empty() && with_labels && p.meta.namespace == cx.root() {
            // Istio composes workload policies only from the workload's
            // own namespace: this one applies to no workload.
            out.push(Message::new(
                INEFFECTIVE_POLICY,
                "PeerAuthentication",
                p,
                Some("spec.selector".to_string()),
                format!(
                    "The policy has no impact: a PeerAuthentication with a selector in the root namespace ({}) applies to no workload; put it in the namespace of the workloads it is for.",
                    cx.root()
                ),
            ));
            continue;
        }
        if p.spec.target_refs.is_empty() {
            let scope = Scope {
                kind: "PeerAuthentication",
                field: "spec.selector",
                root_selects_everywhere: false,
                namespace_wide: true,
                needs_proxy: true,
                selector: p.spec.selector.as_ref(),
            };
            one(cx, p, &scope, out);
        }
    }
    for p in &cx.config.authorization_policies {
        if p.spec.target_refs.is_empty() {
            let scope = Scope {
                kind: "AuthorizationPolicy",
                field: "spec.selector",
                root_selects_everywhere: true,
                namespace_wide: true,
                needs_proxy: true,
                selector: p.spec.selector.as_ref(),
            };
            one(cx, p, &scope, out);
        }
    }
    for p in &cx.config.request_authentications {
        if p.spec.target_refs.is_empty() {
            let scope = Scope {
                kind: "RequestAuthentication",
                field: "spec.selector",
                root_selects_everywhere: true,
                namespace_wide: true,
                needs_proxy: true,
                selector: p.spec.selector.as_ref(),
            };
            one(cx, p, &scope, out);
        }
    }
    for r in &cx.config.destination_rules {
        if r.spec.workload_selector.is_some() {
            let scope = Scope {
                kind: "DestinationRule",
                field: "spec.workloadSelector",
                root_selects_everywhere: false,
                namespace_wide: false,
                // The selected workloads are clients: only a proxy applies
                // a DestinationRule.
                needs_proxy: true,
                selector: r.spec.workload_selector.as_ref(),
            };
            one(cx, r, &scope, out);
        }
    }
    for se in &cx.config.service_entries {
        if let Some(labels) = &se.spec.workload_selector {
            let selector = WorkloadSelector {
                match_labels: labels.clone(),
            };
            let scope = Scope {
                kind: "ServiceEntry",
                field: "spec.workloadSelector",
                root_selects_everywhere: false,
                namespace_wide: false,
                // Endpoints without a proxy are endpoints all the same.
                needs_proxy: false,
                selector: Some(&selector),
            };
            one(cx, se, &scope, out);
        }
    }
}

fn one<T>(cx: &Context<'_>, r: &Resource<T>, scope: &Scope<'_>, out: &mut Vec<Message>) {
    if cx.workloads.is_empty() {
        // No workload is described: nothing to match against.
        return;
    }
    let ns = r.meta.namespace.as_str();
    let in_root = ns == cx.root();
    // An empty selector selects like none.
    let selector = scope.selector.filter(|s| !s.match_labels.is_empty());
    let labels = match selector {
        Some(s) => selector_text(&s.match_labels),
        // Mesh-wide: applies wherever there are workloads, now or later.
        None if in_root || !scope.namespace_wide => return,
        None => String::new(),
    };
    let any_namespace = in_root && scope.root_selects_everywhere;
    let selected: Vec<_> = cx.selected(ns, selector, any_namespace).collect();
    if selected.is_empty() {
        out.push(Message::new(
            NO_MATCHING_WORKLOADS_FOUND,
            scope.kind,
            r,
            selector.map(|_| format!("{}.matchLabels", scope.field)),
            format!("No matching workloads for this resource with the following labels: {labels}"),
        ));
        return;
    }
    if scope.needs_proxy && selected.iter().all(|w| !w.has_proxy) {
        let names: Vec<String> = selected.iter().map(|w| w.key()).collect();
        let what = if selector.is_some() {
            format!("the selector ({labels}) matches")
        } else {
            format!("namespace {ns} has")
        };
        let verb = if names.len() == 1 { "runs" } else { "run" };
        out.push(Message::new(
            INEFFECTIVE_POLICY,
            scope.kind,
            r,
            selector.map(|_| format!("{}.matchLabels", scope.field)),
            format!(
                "The policy has no impact: {what} only {}, which {verb} without a proxy.",
                super::list(&names),
            ),
        ));
    }
}
