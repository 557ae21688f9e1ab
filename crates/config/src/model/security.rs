//! `security.istio.io` kinds: PeerAuthentication, AuthorizationPolicy,
//! RequestAuthentication, with Istio's validation rules.

use std::collections::BTreeMap;

use crate::decode::{self, Fields};
use crate::diag::Sink;
use crate::model::{TargetRef, WorkloadSelector, decode_attachment};
use crate::values::{self, ConditionKey, Lint};
use crate::yaml::Node;

// ---------------------------------------------------------------- PeerAuthentication

/// A PeerAuthentication mTLS mode. `Unset` inherits from the parent scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MtlsMode {
    Unset,
    Disable,
    Permissive,
    Strict,
}

impl MtlsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            MtlsMode::Unset => "UNSET",
            MtlsMode::Disable => "DISABLE",
            MtlsMode::Permissive => "PERMISSIVE",
            MtlsMode::Strict => "STRICT",
        }
    }

    pub fn parse(s: &str) -> Option<MtlsMode> {
        Some(match s {
            "UNSET" => MtlsMode::Unset,
            "DISABLE" => MtlsMode::Disable,
            "PERMISSIVE" => MtlsMode::Permissive,
            "STRICT" => MtlsMode::Strict,
            _ => return None,
        })
    }
}

impl std::fmt::Display for MtlsMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PeerAuthentication {
    pub selector: Option<WorkloadSelector>,
    pub target_refs: Vec<TargetRef>,
    /// `mtls.mode`; `Unset` when `mtls` or its mode is absent.
    pub mode: Option<MtlsMode>,
    pub port_level_mtls: BTreeMap<u16, MtlsMode>,
}

impl PeerAuthentication {
    /// The mode of the whole policy, `Unset` when not given.
    pub fn mode(&self) -> MtlsMode {
        self.mode.unwrap_or(MtlsMode::Unset)
    }

    pub(crate) fn decode(sink: &mut Sink<'_>, node: &Node, path: &str) -> PeerAuthentication {
        let mut f = Fields::new(sink, node, path);
        let (selector, target_refs) = decode_attachment(sink, &mut f);
        let mode = f
            .take("mtls")
            .and_then(|n| decode_mtls(sink, n, &format!("{path}.mtls")));
        let mut port_level_mtls = BTreeMap::new();
        let plm_path = f.field_path("portLevelMtls");
        if let Some(plm) = f.take("portLevelMtls") {
            match &plm.value {
                crate::yaml::Value::Map(entries) => {
                    for (k, v) in entries {
                        let key_text = k.scalar_text().unwrap_or_default();
                        let field = format!("{plm_path}[{key_text}]");
                        let port = match crate::yaml::parse_int(key_text) {
                            Some(p) if (1..=65535).contains(&p) => Some(p as u16),
                            Some(_) => {
                                sink.error(
                                    k.pos,
                                    &field,
                                    format!("port {key_text} is out of range (1-65535)"),
                                );
                                None
                            }
                            None => {
                                sink.error(
                                    k.pos,
                                    &field,
                                    format!("\"{key_text}\" is not a port number"),
                                );
                                None
                            }
                        };
                        let mode = decode_mtls(sink, v, &field);
                        if v.is_null() {
                            sink.error(v.pos, &field, "port-level mtls must set a mode");
                        }
                        if let (Some(port), Some(mode)) = (port, mode) {
                            port_level_mtls.insert(port, mode);
                        }
                    }
                    if !entries.is_empty()
                        && selector.as_ref().is_none_or(|s| s.match_labels.is_empty())
                    {
                        sink.error(
                            plm.pos,
                            &plm_path,
                            "portLevelMtls requires a workload selector with matchLabels",
                        );
                    }
                    if !entries.is_empty() && !target_refs.is_empty() {
                        sink.error(
                            plm.pos,
                            &plm_path,
                            "portLevelMtls cannot be used with targetRefs",
                        );
                    }
                }
                _ => sink.error(
                    plm.pos,
                    &plm_path,
                    format!(
                        "expected a mapping of port to mtls settings, found {}",
                        plm.type_name()
                    ),
                ),
            }
        }
        f.finish(sink);
        PeerAuthentication {
            selector,
            target_refs,
            mode,
            port_level_mtls,
        }
    }
}

fn decode_mtls(sink: &mut Sink<'_>, node: &Node, path: &str) -> Option<MtlsMode> {
    let mut f = Fields::new(sink, node, path);
    let mode_path = f.field_path("mode");
    let mode = f.take("mode").and_then(|n| {
        let s = decode::string(sink, n, &mode_path)?;
        MtlsMode::parse(&s).or_else(|| {
            sink.error(
                n.pos,
                &mode_path,
                format!("unknown mode \"{s}\" (expected UNSET, DISABLE, PERMISSIVE or STRICT)"),
            );
            None
        })
    });
    f.finish(sink);
    Some(mode.unwrap_or(MtlsMode::Unset))
}

// ---------------------------------------------------------------- AuthorizationPolicy

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    Allow,
    Deny,
    Audit,
    Custom,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "ALLOW",
            Action::Deny => "DENY",
            Action::Audit => "AUDIT",
            Action::Custom => "CUSTOM",
        }
    }
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthorizationPolicy {
    pub selector: Option<WorkloadSelector>,
    pub target_refs: Vec<TargetRef>,
    pub action: Action,
    /// `provider.name`, for CUSTOM.
    pub provider: Option<String>,
    pub rules: Vec<Rule>,
}

/// One rule: every present part (`from`, `to`, `when`) must match.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Rule {
    pub from: Vec<Source>,
    pub to: Vec<Operation>,
    pub when: Vec<Condition>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Source {
    pub principals: Vec<String>,
    pub not_principals: Vec<String>,
    pub request_principals: Vec<String>,
    pub not_request_principals: Vec<String>,
    pub namespaces: Vec<String>,
    pub not_namespaces: Vec<String>,
    pub service_accounts: Vec<String>,
    pub not_service_accounts: Vec<String>,
    pub ip_blocks: Vec<String>,
    pub not_ip_blocks: Vec<String>,
    pub remote_ip_blocks: Vec<String>,
    pub not_remote_ip_blocks: Vec<String>,
    /// Istio 1.30+: the trust domain of the peer's SPIFFE ID.
    pub trust_domains: Vec<String>,
    pub not_trust_domains: Vec<String>,
}

impl Source {
    pub fn uses_request_principals(&self) -> bool {
        !self.request_principals.is_empty() || !self.not_request_principals.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Operation {
    pub hosts: Vec<String>,
    pub not_hosts: Vec<String>,
    pub ports: Vec<String>,
    pub not_ports: Vec<String>,
    pub methods: Vec<String>,
    pub not_methods: Vec<String>,
    pub paths: Vec<String>,
    pub not_paths: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    /// The key as written.
    pub key_text: String,
    pub key: ConditionKey,
    pub values: Vec<String>,
    pub not_values: Vec<String>,
}

impl AuthorizationPolicy {
    pub(crate) fn decode(sink: &mut Sink<'_>, node: &Node, path: &str) -> AuthorizationPolicy {
        let mut f = Fields::new(sink, node, path);
        let (selector, target_refs) = decode_attachment(sink, &mut f);
        let action_path = f.field_path("action");
        let action_node = f.take("action");
        let action = action_node
            .and_then(|n| {
                let s = decode::string(sink, n, &action_path)?;
                Some(match s.as_str() {
                    "ALLOW" => Action::Allow,
                    "DENY" => Action::Deny,
                    "AUDIT" => Action::Audit,
                    "CUSTOM" => Action::Custom,
                    other => {
                        sink.error(
                            n.pos,
                            &action_path,
                            format!(
                                "unknown action \"{other}\" (expected ALLOW, DENY, AUDIT or CUSTOM)"
                            ),
                        );
                        return None;
                    }
                })
            })
            .unwrap_or(Action::Allow);
        let provider_path = f.field_path("provider");
        let provider_node = f.take("provider");
        let provider = provider_node.map(|n| {
            let mut pf = Fields::new(sink, n, &provider_path);
            let name = pf.string(sink, "name").unwrap_or_default();
            pf.finish(sink);
            name
        });
        let rules_node = f.take("rules");
        let rules_path = f.field_path("rules");
        let rules: Vec<Rule> = rules_node
            .map(|n| decode::list(sink, n, &rules_path, decode_rule))
            .unwrap_or_default();
        let has_rules = rules_node
            .is_some_and(|n| matches!(&n.value, crate::yaml::Value::Seq(s) if !s.is_empty()));
        let pos = f.pos();
        match action {
            Action::Custom => {
                match provider.as_deref() {
                    None => sink.error(pos, &provider_path, "CUSTOM action requires a provider"),
                    Some("") => sink.error(
                        provider_node.map_or(pos, |n| n.pos),
                        &format!("{provider_path}.name"),
                        "provider name must not be empty",
                    ),
                    Some(_) => {}
                }
                if !has_rules {
                    sink.error(pos, &rules_path, "CUSTOM action requires at least one rule (use `rules: [{}]` to send every request to the provider)");
                }
                check_custom_rules(sink, &rules, rules_node, &rules_path);
            }
            _ => {
                if let Some(n) = provider_node {
                    sink.error(
                        n.pos,
                        &provider_path,
                        format!("provider can only be used with the CUSTOM action, not {action}"),
                    );
                }
                if action == Action::Deny && !has_rules {
                    sink.error(action_node.map_or(pos, |n| n.pos), &rules_path, "DENY action requires at least one rule (a DENY policy without rules never matches; use `rules: [{}]` to deny everything)");
                }
            }
        }
        f.finish(sink);
        AuthorizationPolicy {
            selector,
            target_refs,
            action,
            provider,
            rules,
        }
    }

    /// Whether the policy uses request principals or `request.auth.*` keys,
    /// which need a RequestAuthentication to ever be satisfied.
    pub fn uses_jwt(&self) -> bool {
        self.rules.iter().any(|r| {
            r.from.iter().any(Source::uses_request_principals)
                || r.when.iter().any(|c| c.key.needs_jwt())
        })
    }
}

/// CUSTOM rules are evaluated before the peer identity and JWT are taken
/// into account by the external authorizer, so Istio refuses identity fields.
fn check_custom_rules(sink: &mut Sink<'_>, rules: &[Rule], node: Option<&Node>, path: &str) {
    let pos = node.map(|n| n.pos).unwrap_or_default();
    for (i, rule) in rules.iter().enumerate() {
        for (j, src) in rule.from.iter().enumerate() {
            for (field, set) in [
                ("principals", !src.principals.is_empty()),
                ("notPrincipals", !src.not_principals.is_empty()),
                ("requestPrincipals", !src.request_principals.is_empty()),
                (
                    "notRequestPrincipals",
                    !src.not_request_principals.is_empty(),
                ),
                ("namespaces", !src.namespaces.is_empty()),
                ("notNamespaces", !src.not_namespaces.is_empty()),
                ("serviceAccounts", !src.service_accounts.is_empty()),
                ("notServiceAccounts", !src.not_service_accounts.is_empty()),
                ("trustDomains", !src.trust_domains.is_empty()),
                ("notTrustDomains", !src.not_trust_domains.is_empty()),
            ] {
                if set {
                    sink.error(
                        pos,
                        &format!("{path}[{i}].from[{j}].source.{field}"),
                        format!("{field} is not supported with the CUSTOM action"),
                    );
                }
            }
        }
        for (j, cond) in rule.when.iter().enumerate() {
            // Istio refuses every `request.auth.` key here, even one it
            // could not translate.
            if matches!(
                cond.key,
                ConditionKey::SourceNamespace
                    | ConditionKey::SourcePrincipal
                    | ConditionKey::SourceServiceAccount
                    | ConditionKey::SourceTrustDomain
            ) || cond.key_text.starts_with("request.auth.")
            {
                sink.error(
                    pos,
                    &format!("{path}[{i}].when[{j}].key"),
                    format!("{} is not supported with the CUSTOM action", cond.key_text),
                );
            }
        }
    }
}

fn decode_rule(sink: &mut Sink<'_>, node: &Node, path: &str) -> Option<Rule> {
    if node.is_null() {
        sink.error(
            node.pos,
            path,
            "rule must not be null (write {} for a rule that matches every request)",
        );
        return None;
    }
    let mut f = Fields::new(sink, node, path);
    // Istio's webhook refuses an empty `from`/`to` only in theory: the list
    // reaches it through protobuf's JSON decoding, which leaves an empty
    // list unset, so it is applied as if absent (any source, any operation).
    for key in ["from", "to"] {
        if let Some(n) = f
            .peek(key)
            .filter(|n| matches!(&n.value, crate::yaml::Value::Seq(s) if s.is_empty()))
        {
            let what = if key == "from" {
                "any source"
            } else {
                "any operation"
            };
            sink.warn(
                n.pos,
                &f.field_path(key),
                format!("an empty `{key}` is ignored, as in Istio: the rule matches {what}"),
            );
        }
    }
    let from = f.list(sink, "from", decode_from).unwrap_or_default();
    let to = f.list(sink, "to", decode_to).unwrap_or_default();
    let when = f.list(sink, "when", decode_condition).unwrap_or_default();
    f.finish(sink);
    Some(Rule { from, to, when })
}

fn decode_from(sink: &mut Sink<'_>, node: &Node, path: &str) -> Option<Source> {
    let mut f = Fields::new(sink, node, path);
    let src_path = f.field_path("source");
    let source = match f.take("source") {
        Some(n) => decode_source(sink, n, &src_path),
        None => {
            sink.error(
                node.pos,
                &src_path,
                "from entry must have a source (\"source\" is required)",
            );
            None
        }
    };
    f.finish(sink);
    source
}

fn decode_to(sink: &mut Sink<'_>, node: &Node, path: &str) -> Option<Operation> {
    let mut f = Fields::new(sink, node, path);
    let op_path = f.field_path("operation");
    let op = match f.take("operation") {
        Some(n) => decode_operation(sink, n, &op_path),
        None => {
            sink.error(
                node.pos,
                &op_path,
                "to entry must have an operation (\"operation\" is required)",
            );
            None
        }
    };
    f.finish(sink);
    op
}

/// Reads a list of non-empty strings, checking each with `check`: a
/// rejected value is an error and left out, a warned one is kept.
fn checked_strings(
    sink: &mut Sink<'_>,
    f: &mut Fields<'_>,
    key: &str,
    check: impl Fn(&str) -> Result<(), Lint>,
) -> Vec<String> {
    let path = f.field_path(key);
    let Some(node) = f.take(key) else {
        return Vec::new();
    };
    decode::list(sink, node, &path, |sink, n, p| {
        let s = decode::string(sink, n, p)?;
        if s.is_empty() {
            sink.error(n.pos, p, "empty value is not allowed");
            return None;
        }
        match check(&s) {
            Ok(()) => {}
            Err(Lint::Warn(w)) => sink.warn(n.pos, p, w),
            Err(Lint::Reject(e)) => {
                sink.error(n.pos, p, e);
                return None;
            }
        }
        Some(s)
    })
}

fn no_check(_: &str) -> Result<(), Lint> {
    Ok(())
}

fn check_ip(s: &str) -> Result<(), Lint> {
    values::parse_ip_block(s)?;
    Ok(())
}

fn check_port(s: &str) -> Result<(), Lint> {
    values::parse_port(s)?;
    Ok(())
}

/// `ns/sa` or `sa` (the policy's namespace), as Istio's `CheckServiceAccount`.
fn check_service_account(s: &str) -> Result<(), Lint> {
    if s.contains('*') {
        return Err(Lint::Reject(format!(
            "wildcard is not allowed in service account \"{s}\""
        )));
    }
    if s.len() > 320 {
        return Err(Lint::Reject(format!(
            "service account \"{s}\" is longer than 320 characters"
        )));
    }
    Ok(check_service_account_form(s)?)
}

fn check_service_account_form(s: &str) -> Result<(), String> {
    match s.split('/').collect::<Vec<_>>().as_slice() {
        [_] => Ok(()),
        ["", _] => Err(format!(
            "expected format 'serviceAccount' or 'namespace/serviceAccount', found empty namespace in \"{s}\""
        )),
        [_, ""] => Err(format!(
            "expected format 'serviceAccount' or 'namespace/serviceAccount', found empty serviceAccount in \"{s}\""
        )),
        [_, _] => Ok(()),
        _ => Err(format!(
            "expected format 'serviceAccount' or 'namespace/serviceAccount', found \"{s}\""
        )),
    }
}

/// In namespaces `*` may appear anywhere (Istio turns each into `.*`).
fn check_namespace_value(_: &str) -> Result<(), Lint> {
    Ok(())
}

/// Istio's `CheckWildcardValues`, for trust domains: at most one `*`, at
/// the start or the end of the value (or alone).
fn check_wildcard_strict(s: &str) -> Result<(), Lint> {
    let stars = s.matches('*').count();
    if stars > 1 {
        return Err(Lint::Reject(format!(
            "\"{s}\": at most one wildcard is allowed"
        )));
    }
    if stars == 1 && !s.starts_with('*') && !s.ends_with('*') {
        return Err(Lint::Reject(format!(
            "\"{s}\": a wildcard is only allowed at the start or the end"
        )));
    }
    Ok(())
}

/// Istio's `CheckTrustDomainValues`: wildcard rules, and no `/`.
fn check_trust_domain_value(s: &str) -> Result<(), Lint> {
    check_wildcard_strict(s)?;
    if s.contains('/') {
        return Err(Lint::Reject(format!(
            "\"{s}\": a trust domain must not contain '/'"
        )));
    }
    Ok(())
}

const MAX_SERVICE_ACCOUNTS: usize = 16;

fn decode_source(sink: &mut Sink<'_>, node: &Node, path: &str) -> Option<Source> {
    let mut f = Fields::new(sink, node, path);
    let s = Source {
        principals: checked_strings(sink, &mut f, "principals", values::check_literal_star),
        not_principals: checked_strings(sink, &mut f, "notPrincipals", values::check_literal_star),
        request_principals: checked_strings(
            sink,
            &mut f,
            "requestPrincipals",
            values::check_literal_star,
        ),
        not_request_principals: checked_strings(
            sink,
            &mut f,
            "notRequestPrincipals",
            values::check_literal_star,
        ),
        namespaces: checked_strings(sink, &mut f, "namespaces", check_namespace_value),
        not_namespaces: checked_strings(sink, &mut f, "notNamespaces", check_namespace_value),
        service_accounts: checked_strings(sink, &mut f, "serviceAccounts", check_service_account),
        not_service_accounts: checked_strings(
            sink,
            &mut f,
            "notServiceAccounts",
            check_service_account,
        ),
        ip_blocks: checked_strings(sink, &mut f, "ipBlocks", check_ip),
        not_ip_blocks: checked_strings(sink, &mut f, "notIpBlocks", check_ip),
        remote_ip_blocks: checked_strings(sink, &mut f, "remoteIpBlocks", check_ip),
        not_remote_ip_blocks: checked_strings(sink, &mut f, "notRemoteIpBlocks", check_ip),
        trust_domains: checked_strings(sink, &mut f, "trustDomains", check_trust_domain_value),
        not_trust_domains: checked_strings(
            sink,
            &mut f,
            "notTrustDomains",
            check_trust_domain_value,
        ),
    };
    f.finish(sink);
    if s == Source::default() {
        sink.error(
            node.pos,
            path,
            "source must not be empty: set at least one field",
        );
        return None;
    }
    let uses_sa = !s.service_accounts.is_empty() || !s.not_service_accounts.is_empty();
    let uses_identity = !s.principals.is_empty()
        || !s.not_principals.is_empty()
        || !s.namespaces.is_empty()
        || !s.not_namespaces.is_empty();
    if uses_sa && uses_identity {
        let field = if s.service_accounts.is_empty() {
            "notServiceAccounts"
        } else {
            "serviceAccounts"
        };
        sink.error(node.pos, &format!("{path}.{field}"), "cannot set serviceAccounts (or notServiceAccounts) together with namespaces or principals (or their not* forms)");
    }
    for (field, list) in [
        ("serviceAccounts", &s.service_accounts),
        ("notServiceAccounts", &s.not_service_accounts),
    ] {
        if list.len() > MAX_SERVICE_ACCOUNTS {
            sink.error(
                node.pos,
                &format!("{path}.{field}"),
                format!(
                    "at most {MAX_SERVICE_ACCOUNTS} service accounts are allowed, found {}",
                    list.len()
                ),
            );
        }
    }
    Some(s)
}

fn decode_operation(sink: &mut Sink<'_>, node: &Node, path: &str) -> Option<Operation> {
    let mut f = Fields::new(sink, node, path);
    let op = Operation {
        hosts: checked_strings(sink, &mut f, "hosts", values::check_literal_star),
        not_hosts: checked_strings(sink, &mut f, "notHosts", values::check_literal_star),
        ports: checked_strings(sink, &mut f, "ports", check_port),
        not_ports: checked_strings(sink, &mut f, "notPorts", check_port),
        methods: checked_strings(sink, &mut f, "methods", values::check_method),
        not_methods: checked_strings(sink, &mut f, "notMethods", values::check_method),
        paths: checked_strings(sink, &mut f, "paths", check_path_value),
        not_paths: checked_strings(sink, &mut f, "notPaths", check_path_value),
    };
    f.finish(sink);
    if op == Operation::default() {
        sink.error(
            node.pos,
            path,
            "operation must not be empty: set at least one field",
        );
        return None;
    }
    Some(op)
}

/// Paths: Istio's template rules (`CheckValidPathTemplate`), then the
/// literal-`*` warning for plain paths (a template has no `*` left).
fn check_path_value(s: &str) -> Result<(), Lint> {
    values::check_path(s)?;
    if s.contains("{*}") || s.contains("{**}") {
        return Ok(());
    }
    values::check_literal_star(s)
}

fn decode_condition(sink: &mut Sink<'_>, node: &Node, path: &str) -> Option<Condition> {
    let mut f = Fields::new(sink, node, path);
    let key_path = f.field_path("key");
    let key_text = f
        .require(sink, "key")
        .and_then(|n| decode::string(sink, n, &key_path));
    let key = key_text
        .as_deref()
        .and_then(|k| match values::parse_condition_key(k) {
            Ok(key) => Some(key),
            Err(e) => {
                sink.error(node.pos, &key_path, e);
                None
            }
        });
    if let (Some(w), Some(n)) = (key.as_ref().and_then(ConditionKey::warning), f.peek("key")) {
        sink.warn(n.pos, &key_path, w);
    }
    let check: fn(&str) -> Result<(), Lint> = match &key {
        Some(ConditionKey::SourceIp | ConditionKey::RemoteIp | ConditionKey::DestinationIp) => {
            check_ip
        }
        Some(ConditionKey::DestinationPort) => check_port,
        Some(ConditionKey::SourceServiceAccount) => check_service_account,
        Some(ConditionKey::SourcePrincipal) => values::check_literal_star,
        Some(ConditionKey::SourceTrustDomain) => check_wildcard_strict,
        Some(ConditionKey::SourceNamespace) => check_namespace_value,
        _ => no_check,
    };
    let has_values = has_items(&f, "values");
    let has_not_values = has_items(&f, "notValues");
    let values = checked_strings(sink, &mut f, "values", check);
    let not_values = checked_strings(sink, &mut f, "notValues", check);
    f.finish(sink);
    if !has_values && !has_not_values {
        sink.error(
            node.pos,
            path,
            format!(
                "condition on \"{}\" must set at least one of values or notValues",
                key_text.as_deref().unwrap_or_default()
            ),
        );
        return None;
    }
    Some(Condition {
        key_text: key_text?,
        key: key?,
        values,
        not_values,
    })
}

fn has_items(f: &Fields<'_>, key: &str) -> bool {
    f.peek(key)
        .is_some_and(|n| matches!(&n.value, crate::yaml::Value::Seq(s) if !s.is_empty()))
}

// ---------------------------------------------------------------- RequestAuthentication

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RequestAuthentication {
    pub selector: Option<WorkloadSelector>,
    pub target_refs: Vec<TargetRef>,
    pub jwt_rules: Vec<JwtRule>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct JwtHeader {
    pub name: String,
    pub prefix: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClaimToHeader {
    pub header: String,
    pub claim: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct JwtRule {
    pub issuer: String,
    pub audiences: Vec<String>,
    pub jwks_uri: Option<String>,
    pub jwks: Option<String>,
    pub from_headers: Vec<JwtHeader>,
    pub from_params: Vec<String>,
    pub from_cookies: Vec<String>,
    pub output_payload_to_header: Option<String>,
    pub forward_original_token: bool,
    pub output_claim_to_headers: Vec<ClaimToHeader>,
    pub timeout: Option<String>,
    pub space_delimited_claims: Vec<String>,
}

impl RequestAuthentication {
    pub(crate) fn decode(sink: &mut Sink<'_>, node: &Node, path: &str) -> RequestAuthentication {
        let mut f = Fields::new(sink, node, path);
        let (selector, target_refs) = decode_attachment(sink, &mut f);
        let jwt_rules = f
            .list(sink, "jwtRules", decode_jwt_rule)
            .unwrap_or_default();
        f.finish(sink);
        RequestAuthentication {
            selector,
            target_refs,
            jwt_rules,
        }
    }
}

fn non_empty_strings(sink: &mut Sink<'_>, f: &mut Fields<'_>, key: &str) -> Vec<String> {
    checked_strings(sink, f, key, no_check)
}

fn decode_jwt_rule(sink: &mut Sink<'_>, node: &Node, path: &str) -> Option<JwtRule> {
    let mut f = Fields::new(sink, node, path);
    let issuer = f.string(sink, "issuer").unwrap_or_default();
    let audiences = non_empty_strings(sink, &mut f, "audiences");
    // `jwks_uri` is the old spelling, still in Istio's schema; the schema
    // allows only one of the two (and `jwks`).
    let uri_key = if f.peek("jwksUri").is_none() && f.peek("jwks_uri").is_some() {
        "jwks_uri"
    } else {
        "jwksUri"
    };
    let jwks_uri_path = f.field_path(uri_key);
    let jwks_uri_node = f.take(uri_key);
    let mut jwks_uri = jwks_uri_node.and_then(|n| decode::string(sink, n, &jwks_uri_path));
    if uri_key == "jwksUri" && f.peek("jwks_uri").is_some() {
        sink.error(
            node.pos,
            &f.field_path("jwks_uri"),
            "only one of jwksUri or jwks_uri can be set",
        );
        f.ignore("jwks_uri");
    }
    let jwks_path = f.field_path("jwks");
    let jwks_node = f.take("jwks");
    let jwks = jwks_node.and_then(|n| decode::string(sink, n, &jwks_path));
    let from_headers = f
        .list(sink, "fromHeaders", |sink, n, p| {
            let mut hf = Fields::new(sink, n, p);
            let name = hf.string(sink, "name").unwrap_or_default();
            let prefix = hf.string(sink, "prefix").unwrap_or_default();
            hf.finish(sink);
            if name.is_empty() {
                sink.error(n.pos, &format!("{p}.name"), "header name must not be empty");
            }
            Some(JwtHeader { name, prefix })
        })
        .unwrap_or_default();
    let from_params = non_empty_strings(sink, &mut f, "fromParams");
    let from_cookies = non_empty_strings(sink, &mut f, "fromCookies");
    let payload_header_pos = f.peek("outputPayloadToHeader").map(|n| n.pos);
    let output_payload_to_header = f.string(sink, "outputPayloadToHeader");
    if let (Some(h), Some(pos)) = (&output_payload_to_header, payload_header_pos)
        && let Err(e) = check_header_name(h, HeaderRule::Token)
    {
        sink.error(pos, &f.field_path("outputPayloadToHeader"), e);
    }
    let forward_original_token = f.bool(sink, "forwardOriginalToken").unwrap_or(false);
    let output_claim_to_headers = f
        .list(sink, "outputClaimToHeaders", |sink, n, p| {
            let mut cf = Fields::new(sink, n, p);
            let header = cf.string(sink, "header").unwrap_or_default();
            let claim = cf.string(sink, "claim").unwrap_or_default();
            cf.finish(sink);
            if let Err(e) = check_header_name(&header, HeaderRule::Strict) {
                sink.error(n.pos, &format!("{p}.header"), e);
            }
            if claim.is_empty() {
                sink.error(n.pos, &format!("{p}.claim"), "claim must not be empty");
            }
            Some(ClaimToHeader { header, claim })
        })
        .unwrap_or_default();
    let timeout_path = f.field_path("timeout");
    let timeout_node = f.take("timeout");
    let timeout = timeout_node.and_then(|n| decode::string(sink, n, &timeout_path));
    if let (Some(t), Some(n)) = (&timeout, timeout_node)
        && let Err(e) = check_duration(t)
    {
        sink.error(n.pos, &timeout_path, e);
    }
    let space_delimited_claims = non_empty_strings(sink, &mut f, "spaceDelimitedClaims");
    f.finish(sink);

    if issuer.is_empty() && jwks_uri.as_deref().is_none_or(str::is_empty) {
        sink.error(
            node.pos,
            &format!("{path}.issuer"),
            "issuer or jwksUri must be set",
        );
    }
    if let (Some(uri), Some(n)) = (&mut jwks_uri, jwks_uri_node) {
        match check_jwks_uri(uri) {
            Ok(()) => {}
            Err(Lint::Warn(w)) => sink.warn(n.pos, &jwks_uri_path, w),
            Err(Lint::Reject(e)) => sink.error(n.pos, &jwks_uri_path, e),
        }
        // Go's URL parser lower-cases the scheme; so does meshward, so
        // that the proxy fetches `HTTPS://...` as Istio does.
        if let Some((scheme, rest)) = uri.split_once(':')
            && scheme.bytes().any(|b| b.is_ascii_uppercase())
        {
            *uri = format!("{}:{rest}", scheme.to_ascii_lowercase());
        }
    }
    if jwks_uri.is_some() && jwks.is_some() {
        sink.error(node.pos, &jwks_path, "jwks and jwksUri cannot both be set");
    }
    if let (Some(text), Some(n)) = (&jwks, jwks_node)
        && let Err(e) = check_jwks(text)
    {
        sink.error(n.pos, &jwks_path, e);
    }
    Some(JwtRule {
        issuer,
        audiences,
        jwks_uri,
        jwks,
        from_headers,
        from_params,
        from_cookies,
        output_payload_to_header,
        forward_original_token,
        output_claim_to_headers,
        timeout,
        space_delimited_claims,
    })
}

/// Which header names a field takes.
#[derive(Clone, Copy)]
enum HeaderRule {
    /// `outputClaimToHeaders`: Istio's `ValidateStrictHTTPHeaderName`
    /// (`^[-_A-Za-z0-9]+$`, also the schema's pattern).
    Strict,
    /// `outputPayloadToHeader`: Istio checks nothing; any HTTP token
    /// (RFC 9110) is a header Envoy can write.
    Token,
}

/// HTTP header names are tokens (RFC 9110); pseudo-headers such as
/// `:authority` cannot be written by a filter.
fn check_header_name(name: &str, rule: HeaderRule) -> Result<(), String> {
    if name.is_empty() {
        return Err("header must not be empty".to_string());
    }
    if name.starts_with(':') {
        return Err(format!(
            "header \"{name}\" is a pseudo-header and cannot be set"
        ));
    }
    let (valid, allowed) = match rule {
        HeaderRule::Strict => (
            name.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
            "letters, digits, '-' and '_'",
        ),
        HeaderRule::Token => (
            name.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)),
            "an HTTP token",
        ),
    };
    if !valid {
        return Err(format!(
            "header \"{name}\" is not a valid header name ({allowed})"
        ));
    }
    if PROXY_OWNED_HEADERS
        .iter()
        .any(|h| h.eq_ignore_ascii_case(name))
    {
        return Err(format!(
            "header \"{name}\" is set by the proxy (framing, routing or identity) and cannot be output"
        ));
    }
    Ok(())
}

/// Headers only the proxy writes: message framing, hop-by-hop fields, the
/// routing `Host`, and the proxy's own `x-forwarded-client-cert`. A value
/// from a token or an external provider must never replace them (a second
/// `Content-Length` would let a request be smuggled past the proxy).
pub const PROXY_OWNED_HEADERS: &[&str] = &[
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "upgrade",
    "te",
    "trailer",
    "host",
    "x-forwarded-client-cert",
];

/// A `jwksUri` as Istio's `ParseJwksURI` (Go's `url.Parse`) reads it: the
/// scheme must be http or https (any case) and a port, if any, digits.
/// Istio also applies a URI with no host or with a port above 65535; its
/// keys can never be fetched, so the issuer's tokens are refused, as
/// meshward refuses them while a `jwksUri` cannot be reached (a warning).
fn check_jwks_uri(uri: &str) -> Result<(), Lint> {
    let (scheme, rest) = uri
        .split_once(':')
        .filter(|(s, _)| !s.is_empty() && !s.contains(['/', '?', '#']))
        .ok_or_else(|| format!("jwksUri \"{uri}\" is not a URL (expected http:// or https://)"))?;
    if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
        return Err(Lint::Reject(format!(
            "jwksUri \"{uri}\": unsupported scheme \"{scheme}\" (expected http or https)"
        )));
    }
    let never = "its keys can never be fetched, so tokens of this issuer are always refused (401), as in Istio";
    let Some(rest) = rest.strip_prefix("//") else {
        return Err(Lint::Warn(format!(
            "jwksUri \"{uri}\" has no host: {never}"
        )));
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let (host, port) = if let Some(bracketed) = host_port.strip_prefix('[') {
        let (h, after) = bracketed.split_once(']').unwrap_or((bracketed, ""));
        (h, after.strip_prefix(':'))
    } else {
        match host_port.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (host_port, None),
        }
    };
    if let Some(port) = port.filter(|p| !p.is_empty()) {
        if !port.bytes().all(|b| b.is_ascii_digit()) {
            return Err(Lint::Reject(format!(
                "jwksUri \"{uri}\": invalid port \"{port}\""
            )));
        }
        if values::parse_port(port).is_err() {
            return Err(Lint::Warn(format!(
                "jwksUri \"{uri}\": port {port} is out of range: {never}"
            )));
        }
    }
    if host.is_empty() {
        return Err(Lint::Warn(format!(
            "jwksUri \"{uri}\" has no host: {never}"
        )));
    }
    Ok(())
}

fn check_jwks(text: &str) -> Result<(), String> {
    let value: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| format!("jwks is not a valid JSON Web Key Set: {e}"))?;
    if value.get("keys").is_some_and(serde_json::Value::is_array) {
        Ok(())
    } else {
        Err(
            "jwks is not a valid JSON Web Key Set: expected an object with a \"keys\" list"
                .to_string(),
        )
    }
}

/// Go/protobuf durations: `1.5s`, `300ms`, `1m30s`; at least 1ms.
pub fn check_duration(text: &str) -> Result<(), String> {
    let secs = parse_duration(text)?;
    if secs < 0.001 {
        return Err(format!("duration \"{text}\" must be at least 1ms"));
    }
    let ms = secs * 1000.0;
    if (ms - ms.round()).abs() > 1e-6 {
        return Err(format!(
            "duration \"{text}\": only durations to millisecond precision are supported"
        ));
    }
    Ok(())
}

/// Parses a Go-style duration into seconds.
pub fn parse_duration(text: &str) -> Result<f64, String> {
    let err = || format!("\"{text}\" is not a duration (for example \"5s\", \"300ms\", \"1h30m\")");
    let mut rest = text;
    let mut total = 0.0;
    if rest.is_empty() {
        return Err(err());
    }
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(err)?;
        if num_len == 0 {
            return Err(err());
        }
        let n: f64 = rest[..num_len].parse().map_err(|_| err())?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let factor = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(err()),
        };
        total += n * factor;
        rest = &rest[unit_len..];
    }
    Ok(total)
}
