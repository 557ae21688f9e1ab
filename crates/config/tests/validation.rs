//! Validation error paths of the loader, table-driven: one row per error
//! site in `crates/config/src` (every `sink.error(` call and the loader's own
//! errors), plus YAML-level problems. Each row checks that the load fails,
//! that one error names the expected field path and says the expected
//! keyword, and (where given) that it points at the right line.
//!
//! Documents built by [`res`] put `spec:` on line 6, so the first spec line is
//! line 7.

use std::fmt::Write as _;

use meshward_config::model::networking::TlsMode;
use meshward_config::model::security::{Action, MtlsMode};
use meshward_config::{
    Diagnostic, Diagnostics, Loaded, Loader, PathNormalization, Severity, load_paths,
};

const AP: (&str, &str) = ("security.istio.io/v1", "AuthorizationPolicy");
const PA: (&str, &str) = ("security.istio.io/v1beta1", "PeerAuthentication");
const RA: (&str, &str) = ("security.istio.io/v1", "RequestAuthentication");
const DR: (&str, &str) = ("networking.istio.io/v1", "DestinationRule");
const SE: (&str, &str) = ("networking.istio.io/v1beta1", "ServiceEntry");
const WE: (&str, &str) = ("networking.istio.io/v1alpha3", "WorkloadEntry");
const MC: (&str, &str) = ("meshward.io/v1alpha1", "MeshConfig");

fn indent(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        if line.is_empty() {
            out.push('\n');
        } else {
            let _ = writeln!(out, "  {line}");
        }
    }
    out
}

/// A resource named `ns/p`; `spec` starts on line 7.
fn res(kind: (&str, &str), spec: &str) -> String {
    format!(
        "apiVersion: {}\nkind: {}\nmetadata:\n  name: p\n  namespace: ns\nspec:\n{}",
        kind.0,
        kind.1,
        indent(spec)
    )
}

fn load(text: &str) -> Result<Loaded, Diagnostics> {
    let mut l = Loader::new();
    l.add_source("test.yaml", text);
    l.finish()
}

fn render(d: &Diagnostics) -> String {
    d.0.iter().map(|d| format!("  {d}\n")).collect()
}

struct Row {
    name: &'static str,
    yaml: String,
    /// Exact field path (empty: the diagnostic has no field).
    field: &'static str,
    keyword: &'static str,
    line: Option<u32>,
}

fn row(
    name: &'static str,
    yaml: String,
    field: &'static str,
    keyword: &'static str,
    line: Option<u32>,
) -> Row {
    Row {
        name,
        yaml,
        field,
        keyword,
        line,
    }
}

/// Whether the diagnostic names `field` exactly (as its own segment of the
/// rendered text) and mentions `keyword`.
fn names(d: &Diagnostic, field: &str, keyword: &str) -> bool {
    let text = d.to_string();
    let field_ok = if field.is_empty() {
        d.field.is_none()
    } else {
        d.field.as_deref() == Some(field) && text.contains(&format!(" {field}: "))
    };
    field_ok && text.contains(keyword)
}

fn check_rows(rows: Vec<Row>) {
    let mut failures = Vec::new();
    let mut with_line = 0;
    for r in &rows {
        match load(&r.yaml) {
            Ok(loaded) => failures.push(format!(
                "{}: loaded without error (warnings: {:?})\n{}",
                r.name,
                loaded
                    .warnings
                    .0
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>(),
                r.yaml
            )),
            Err(d) => {
                let errors: Vec<&Diagnostic> = d.errors().collect();
                let hit = errors.iter().find(|e| names(e, r.field, r.keyword));
                match hit {
                    None => failures.push(format!(
                        "{}: no error with field {:?} and keyword {:?}; got:\n{}",
                        r.name,
                        r.field,
                        r.keyword,
                        render(&d)
                    )),
                    Some(e) => {
                        assert!(e.to_string().starts_with("test.yaml:"), "{}: {e}", r.name);
                        if let Some(line) = r.line {
                            with_line += 1;
                            if e.pos.line != line {
                                failures.push(format!(
                                    "{}: expected line {line}, got {}: {e}",
                                    r.name, e.pos.line
                                ));
                            }
                        }
                    }
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} rows failed:\n{}",
        failures.len(),
        rows.len(),
        failures.join("\n")
    );
    assert!(
        with_line * 2 >= rows.len(),
        "too few rows check the line: {with_line} of {}",
        rows.len()
    );
}

// ------------------------------------------------------------------ AuthorizationPolicy

#[test]
fn authorization_policy_errors() {
    let long_sa = format!("ns/{}", "a".repeat(320));
    let many_sas = (0..17)
        .map(|i| format!("\"sa{i}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let long_label = "v".repeat(64);
    let rows = vec![
        row("unknown action", res(AP, "action: PERMIT\n"), "spec.action", "unknown action \"PERMIT\"", Some(7)),
        row("action not a string", res(AP, "action: 1\n"), "spec.action", "expected a string", Some(7)),
        row(
            "CUSTOM without provider",
            res(AP, "action: CUSTOM\nrules:\n- {}\n"),
            "spec.provider",
            "requires a provider",
            Some(7),
        ),
        row(
            "CUSTOM with empty provider name",
            res(AP, "action: CUSTOM\nprovider: {}\nrules:\n- {}\n"),
            "spec.provider.name",
            "must not be empty",
            Some(8),
        ),
        row(
            "CUSTOM without rules",
            res(AP, "action: CUSTOM\nprovider:\n  name: ext\n"),
            "spec.rules",
            "at least one rule",
            Some(7),
        ),
        row(
            "CUSTOM with empty rules list",
            res(AP, "action: CUSTOM\nprovider:\n  name: ext\nrules: []\n"),
            "spec.rules",
            "at least one rule",
            Some(7),
        ),
        row(
            "CUSTOM with principals",
            res(AP, "action: CUSTOM\nprovider:\n  name: ext\nrules:\n- from:\n  - source:\n      principals: [\"a\"]\n"),
            "spec.rules[0].from[0].source.principals",
            "not supported with the CUSTOM action",
            Some(11),
        ),
        row(
            "CUSTOM with notServiceAccounts",
            res(
                AP,
                "action: CUSTOM\nprovider:\n  name: ext\nrules:\n- from:\n  - source:\n      notServiceAccounts: [\"a\"]\n",
            ),
            "spec.rules[0].from[0].source.notServiceAccounts",
            "not supported with the CUSTOM action",
            Some(11),
        ),
        row(
            "CUSTOM with requestPrincipals",
            res(
                AP,
                "action: CUSTOM\nprovider:\n  name: ext\nrules:\n- from:\n  - source:\n      requestPrincipals: [\"*\"]\n",
            ),
            "spec.rules[0].from[0].source.requestPrincipals",
            "CUSTOM",
            Some(11),
        ),
        row(
            "CUSTOM with request.auth.claims condition",
            res(
                AP,
                "action: CUSTOM\nprovider:\n  name: ext\nrules:\n- when:\n  - key: request.auth.claims[iss]\n    values: [\"x\"]\n",
            ),
            "spec.rules[0].when[0].key",
            "request.auth.claims[iss] is not supported with the CUSTOM action",
            Some(11),
        ),
        row(
            "CUSTOM with source.namespace condition",
            res(
                AP,
                "action: CUSTOM\nprovider:\n  name: ext\nrules:\n- when:\n  - key: source.namespace\n    values: [\"x\"]\n",
            ),
            "spec.rules[0].when[0].key",
            "source.namespace is not supported",
            Some(11),
        ),
        row(
            "provider with ALLOW",
            res(AP, "provider:\n  name: ext\nrules:\n- {}\n"),
            "spec.provider",
            "only be used with the CUSTOM action, not ALLOW",
            Some(8),
        ),
        row(
            "provider with DENY",
            res(AP, "action: DENY\nprovider:\n  name: ext\nrules:\n- {}\n"),
            "spec.provider",
            "not DENY",
            Some(9),
        ),
        row("DENY without rules", res(AP, "action: DENY\n"), "spec.rules", "DENY action requires at least one rule", Some(7)),
        row(
            "DENY with empty rules",
            res(AP, "action: DENY\nrules: []\n"),
            "spec.rules",
            "DENY action requires",
            Some(7),
        ),
        row("null rule", res(AP, "rules:\n- ~\n"), "spec.rules[0]", "rule must not be null", Some(8)),
        row(
            "from without source",
            res(AP, "rules:\n- from:\n  - {}\n"),
            "spec.rules[0].from[0].source",
            "must have a source",
            Some(9),
        ),
        row(
            "to without operation",
            res(AP, "rules:\n- to:\n  - {}\n"),
            "spec.rules[0].to[0].operation",
            "must have an operation",
            Some(9),
        ),
        row(
            "empty source",
            res(AP, "rules:\n- from:\n  - source: {}\n"),
            "spec.rules[0].from[0].source",
            "source must not be empty",
            Some(9),
        ),
        row(
            "empty operation",
            res(AP, "rules:\n- to:\n  - operation: {}\n"),
            "spec.rules[0].to[0].operation",
            "operation must not be empty",
            Some(9),
        ),
        row(
            "empty principal",
            res(AP, "rules:\n- from:\n  - source:\n      principals: [\"a\", \"\"]\n"),
            "spec.rules[0].from[0].source.principals[1]",
            "empty value is not allowed",
            Some(10),
        ),
        row(
            "bad ipBlocks address",
            res(AP, "rules:\n- from:\n  - source:\n      ipBlocks: [\"10.0.0.300\"]\n"),
            "spec.rules[0].from[0].source.ipBlocks[0]",
            "not a valid IP address",
            Some(10),
        ),
        row(
            "bad notIpBlocks prefix length",
            res(AP, "rules:\n- from:\n  - source:\n      notIpBlocks: [\"10.0.0.0/33\"]\n"),
            "spec.rules[0].from[0].source.notIpBlocks[0]",
            "invalid prefix length",
            Some(10),
        ),
        row(
            "bad remoteIpBlocks",
            res(AP, "rules:\n- from:\n  - source:\n      remoteIpBlocks: [\"fe80::zz/64\"]\n"),
            "spec.rules[0].from[0].source.remoteIpBlocks[0]",
            "not a valid IP",
            Some(10),
        ),
        row(
            "bad notRemoteIpBlocks",
            res(AP, "rules:\n- from:\n  - source:\n      notRemoteIpBlocks: [\"2001:db8::/129\"]\n"),
            "spec.rules[0].from[0].source.notRemoteIpBlocks[0]",
            "invalid prefix length",
            Some(10),
        ),
        row(
            "serviceAccount wildcard",
            res(AP, "rules:\n- from:\n  - source:\n      serviceAccounts: [\"ns/*\"]\n"),
            "spec.rules[0].from[0].source.serviceAccounts[0]",
            "wildcard is not allowed",
            Some(10),
        ),
        row(
            "serviceAccount empty namespace",
            res(AP, "rules:\n- from:\n  - source:\n      serviceAccounts: [\"/sa\"]\n"),
            "spec.rules[0].from[0].source.serviceAccounts[0]",
            "empty namespace",
            Some(10),
        ),
        row(
            "serviceAccount empty name",
            res(AP, "rules:\n- from:\n  - source:\n      notServiceAccounts: [\"ns/\"]\n"),
            "spec.rules[0].from[0].source.notServiceAccounts[0]",
            "empty serviceAccount",
            Some(10),
        ),
        row(
            "serviceAccount with two slashes",
            res(AP, "rules:\n- from:\n  - source:\n      serviceAccounts: [\"a/b/c\"]\n"),
            "spec.rules[0].from[0].source.serviceAccounts[0]",
            "expected format 'serviceAccount' or 'namespace/serviceAccount'",
            Some(10),
        ),
        row(
            "serviceAccount too long",
            res(AP, &format!("rules:\n- from:\n  - source:\n      serviceAccounts: [\"{long_sa}\"]\n")),
            "spec.rules[0].from[0].source.serviceAccounts[0]",
            "longer than 320 characters",
            Some(10),
        ),
        row(
            "more than 16 serviceAccounts",
            res(AP, &format!("rules:\n- from:\n  - source:\n      serviceAccounts: [{many_sas}]\n")),
            "spec.rules[0].from[0].source.serviceAccounts",
            "at most 16 service accounts",
            Some(10),
        ),
        row(
            "serviceAccounts with namespaces",
            res(AP, "rules:\n- from:\n  - source:\n      serviceAccounts: [\"sa\"]\n      namespaces: [\"ns\"]\n"),
            "spec.rules[0].from[0].source.serviceAccounts",
            "cannot set serviceAccounts",
            Some(10),
        ),
        row(
            "notServiceAccounts with notPrincipals",
            res(AP, "rules:\n- from:\n  - source:\n      notServiceAccounts: [\"sa\"]\n      notPrincipals: [\"a\"]\n"),
            "spec.rules[0].from[0].source.notServiceAccounts",
            "together with namespaces or principals",
            Some(10),
        ),
        row(
            "unquoted port",
            res(AP, "rules:\n- to:\n  - operation:\n      ports: [8080]\n"),
            "spec.rules[0].to[0].operation.ports[0]",
            "expected a string, found integer 8080 (quote it: \"8080\")",
            Some(10),
        ),
        row(
            "port out of range",
            res(AP, "rules:\n- to:\n  - operation:\n      ports: [\"70000\"]\n"),
            "spec.rules[0].to[0].operation.ports[0]",
            "out of range",
            Some(10),
        ),
        row(
            "port name instead of number",
            res(AP, "rules:\n- to:\n  - operation:\n      notPorts: [\"http\"]\n"),
            "spec.rules[0].to[0].operation.notPorts[0]",
            "not a port number",
            Some(10),
        ),
        row(
            "port range",
            res(AP, "rules:\n- to:\n  - operation:\n      ports: [\"80-90\"]\n"),
            "spec.rules[0].to[0].operation.ports[0]",
            "not a port number",
            Some(10),
        ),
        row(
            "operator after {**}",
            res(AP, "rules:\n- to:\n  - operation:\n      paths: [\"/a/{**}/{*}\"]\n"),
            "spec.rules[0].to[0].operation.paths[0]",
            "must be the last operator",
            Some(10),
        ),
        row(
            "stray brace in path",
            res(AP, "rules:\n- to:\n  - operation:\n      paths: [\"/a{b\"]\n"),
            "spec.rules[0].to[0].operation.paths[0]",
            "only allowed in the operators",
            Some(10),
        ),
        row(
            "template with a glob segment",
            res(AP, "rules:\n- to:\n  - operation:\n      notPaths: [\"/a/{*}/b*\"]\n"),
            "spec.rules[0].to[0].operation.notPaths[0]",
            "not a plain path segment",
            Some(10),
        ),
        row(
            "template with an empty segment",
            res(AP, "rules:\n- to:\n  - operation:\n      paths: [\"/a//{*}\"]\n"),
            "spec.rules[0].to[0].operation.paths[0]",
            "not a plain path segment",
            Some(10),
        ),
        row(
            "empty host",
            res(AP, "rules:\n- to:\n  - operation:\n      hosts: [\"\"]\n"),
            "spec.rules[0].to[0].operation.hosts[0]",
            "empty value",
            Some(10),
        ),
        row(
            "experimental key without brackets",
            res(AP, "rules:\n- when:\n  - key: experimental.envoy.filters.http.foo\n    values: [\"a\"]\n"),
            "spec.rules[0].when[0].key",
            "expected <attribute>[<name>]",
            Some(9),
        ),
        row(
            "meshward-only inline headers key",
            res(AP, "rules:\n- when:\n  - key: request.experimental.inline.headers[x]\n    values: [\"a\"]\n"),
            "spec.rules[0].when[0].key",
            "unknown condition key",
            Some(9),
        ),
        row(
            "empty trustDomains value",
            res(AP, "rules:\n- from:\n  - source:\n      trustDomains: [\"\"]\n"),
            "spec.rules[0].from[0].source.trustDomains[0]",
            "empty value",
            Some(10),
        ),
        row(
            "trustDomains with inner wildcard",
            res(AP, "rules:\n- from:\n  - source:\n      trustDomains: [\"a.*.org\"]\n"),
            "spec.rules[0].from[0].source.trustDomains[0]",
            "only allowed at the start or the end",
            Some(10),
        ),
        row(
            "notTrustDomains with two wildcards",
            res(AP, "rules:\n- from:\n  - source:\n      notTrustDomains: [\"*.org*\"]\n"),
            "spec.rules[0].from[0].source.notTrustDomains[0]",
            "at most one wildcard",
            Some(10),
        ),
        row(
            "trustDomains with a slash",
            res(AP, "rules:\n- from:\n  - source:\n      trustDomains: [\"td/ns\"]\n"),
            "spec.rules[0].from[0].source.trustDomains[0]",
            "must not contain '/'",
            Some(10),
        ),
        row(
            "source.trustDomain with inner wildcard",
            res(AP, "rules:\n- when:\n  - key: source.trustDomain\n    values: [\"a*b\"]\n"),
            "spec.rules[0].when[0].values[0]",
            "only allowed at the start or the end",
            Some(10),
        ),
        row(
            "CUSTOM with trustDomains",
            res(
                AP,
                "action: CUSTOM\nprovider:\n  name: ext\nrules:\n- from:\n  - source:\n      trustDomains: [\"td\"]\n",
            ),
            "spec.rules[0].from[0].source.trustDomains",
            "not supported with the CUSTOM action",
            Some(11),
        ),
        row(
            "CUSTOM with source.trustDomain condition",
            res(
                AP,
                "action: CUSTOM\nprovider:\n  name: ext\nrules:\n- when:\n  - key: source.trustDomain\n    values: [\"td\"]\n",
            ),
            "spec.rules[0].when[0].key",
            "source.trustDomain is not supported",
            Some(11),
        ),
        row(
            "CUSTOM with an untranslatable request.auth key",
            res(
                AP,
                "action: CUSTOM\nprovider:\n  name: ext\nrules:\n- when:\n  - key: request.auth.claimsX[a]\n    values: [\"x\"]\n",
            ),
            "spec.rules[0].when[0].key",
            "is not supported with the CUSTOM action",
            Some(11),
        ),
        row(
            "condition without key",
            res(AP, "rules:\n- when:\n  - values: [\"a\"]\n"),
            "spec.rules[0].when[0]",
            "missing required field \"key\"",
            Some(9),
        ),
        row(
            "condition with empty key",
            res(AP, "rules:\n- when:\n  - key: \"\"\n    values: [\"a\"]\n"),
            "spec.rules[0].when[0].key",
            "key must not be empty",
            Some(9),
        ),
        row(
            "unknown condition key",
            res(AP, "rules:\n- when:\n  - key: source.user\n    values: [\"a\"]\n"),
            "spec.rules[0].when[0].key",
            "unknown condition key \"source.user\"",
            Some(9),
        ),
        row(
            "destination.namespace key",
            res(AP, "rules:\n- when:\n  - key: destination.namespace\n    values: [\"a\"]\n"),
            "spec.rules[0].when[0].key",
            "replaced by metadata.namespace",
            Some(9),
        ),
        row(
            "destination.user key",
            res(AP, "rules:\n- when:\n  - key: destination.user\n    values: [\"a\"]\n"),
            "spec.rules[0].when[0].key",
            "deprecated",
            Some(9),
        ),
        row(
            "destination.labels key",
            res(AP, "rules:\n- when:\n  - key: destination.labels[app]\n    values: [\"a\"]\n"),
            "spec.rules[0].when[0].key",
            "replaced by the workload selector",
            Some(9),
        ),
        row(
            "request.headers without brackets",
            res(AP, "rules:\n- when:\n  - key: request.headers\n    values: [\"a\"]\n"),
            "spec.rules[0].when[0].key",
            "invalid key \"request.headers\": expected <attribute>[<name>]",
            Some(9),
        ),
        row(
            "request.headers with empty name",
            res(AP, "rules:\n- when:\n  - key: request.headers[]\n    values: [\"a\"]\n"),
            "spec.rules[0].when[0].key",
            "invalid key \"request.headers[]\": expected <attribute>[<name>]",
            Some(9),
        ),
        row(
            "request.headers unbalanced",
            res(AP, "rules:\n- when:\n  - key: request.headers[x-a\n    values: [\"a\"]\n"),
            "spec.rules[0].when[0].key",
            "invalid key \"request.headers[x-a\": expected <attribute>[<name>]",
            Some(9),
        ),
        row(
            "experimental key without filter",
            res(AP, "rules:\n- when:\n  - key: experimental.envoy.filters.\n    values: [\"a\"]\n"),
            "spec.rules[0].when[0].key",
            "invalid key",
            Some(9),
        ),
        row(
            "condition without values",
            res(AP, "rules:\n- when:\n  - key: source.ip\n"),
            "spec.rules[0].when[0]",
            "must set at least one of values or notValues",
            Some(9),
        ),
        row(
            "condition with empty values",
            res(AP, "rules:\n- when:\n  - key: source.ip\n    values: []\n"),
            "spec.rules[0].when[0]",
            "at least one of values or notValues",
            Some(9),
        ),
        row(
            "source.ip bad value",
            res(AP, "rules:\n- when:\n  - key: source.ip\n    values: [\"1.2.3\"]\n"),
            "spec.rules[0].when[0].values[0]",
            "not a valid IP",
            Some(10),
        ),
        row(
            "destination.port bad notValue",
            res(AP, "rules:\n- when:\n  - key: destination.port\n    notValues: [\"https\"]\n"),
            "spec.rules[0].when[0].notValues[0]",
            "not a port number",
            Some(10),
        ),
        row(
            "source.serviceAccount wildcard",
            res(AP, "rules:\n- when:\n  - key: source.serviceAccount\n    values: [\"ns/*\"]\n"),
            "spec.rules[0].when[0].values[0]",
            "wildcard is not allowed",
            Some(10),
        ),
        row(
            "condition value empty",
            res(AP, "rules:\n- when:\n  - key: request.headers[x]\n    values: [\"\"]\n"),
            "spec.rules[0].when[0].values[0]",
            "empty value",
            Some(10),
        ),
        row(
            "selector empty key",
            res(AP, "selector:\n  matchLabels:\n    \"\": x\n"),
            "spec.selector.matchLabels.",
            "empty key is not supported in selector",
            Some(8),
        ),
        row(
            "selector wildcard value",
            res(AP, "selector:\n  matchLabels:\n    app: \"web-*\"\n"),
            "spec.selector.matchLabels.app",
            "wildcard is not supported in selector",
            Some(8),
        ),
        row(
            "selector wildcard key",
            res(AP, "selector:\n  matchLabels:\n    \"a*\": x\n"),
            "spec.selector.matchLabels.a*",
            "wildcard",
            Some(8),
        ),
        row(
            "selector value too long",
            res(AP, &format!("selector:\n  matchLabels:\n    app: {long_label}\n")),
            "spec.selector.matchLabels.app",
            "longer than 63 characters",
            Some(8),
        ),
        row(
            "selector value unquoted number",
            res(AP, "selector:\n  matchLabels:\n    version: 2\n"),
            "spec.selector.matchLabels.version",
            "expected a string",
            Some(9),
        ),
        row(
            "selector not a mapping",
            res(AP, "selector: app\n"),
            "spec.selector",
            "expected a mapping, found string",
            Some(7),
        ),
        row(
            "selector and targetRef",
            res(AP, "selector:\n  matchLabels:\n    app: a\ntargetRef:\n  kind: Gateway\n  name: gw\n"),
            "spec",
            "only one of selector or targetRefs",
            Some(7),
        ),
        row(
            "targetRef and targetRefs",
            res(AP, "targetRef:\n  kind: Gateway\n  name: gw\ntargetRefs:\n- kind: Service\n  name: svc\n"),
            "spec.targetRefs",
            "only one of targetRef or targetRefs",
            Some(7),
        ),
        row(
            "targetRef without kind",
            res(AP, "targetRef:\n  name: gw\n"),
            "spec.targetRef",
            "missing required field \"kind\"",
            Some(8),
        ),
        row(
            "targetRefs entry without name",
            res(AP, "targetRefs:\n- kind: Gateway\n"),
            "spec.targetRefs[0]",
            "missing required field \"name\"",
            Some(8),
        ),
        row(
            "targetRef unknown field",
            res(AP, "targetRef:\n  kind: Gateway\n  name: gw\n  sectionName: x\n"),
            "spec.targetRef.sectionName",
            "unknown field",
            Some(10),
        ),
        row("unknown spec field", res(AP, "actions: DENY\n"), "spec.actions", "unknown field \"actions\"", Some(7)),
        row(
            "unknown rule field",
            res(AP, "rules:\n- form:\n  - source:\n      principals: [\"a\"]\n"),
            "spec.rules[0].form",
            "unknown field \"form\"",
            Some(8),
        ),
        row(
            "unknown source field",
            res(AP, "rules:\n- from:\n  - source:\n      principal: [\"a\"]\n"),
            "spec.rules[0].from[0].source.principal",
            "unknown field \"principal\"",
            Some(10),
        ),
        row(
            "unknown operation field",
            res(AP, "rules:\n- to:\n  - operation:\n      methods: [\"GET\"]\n      method: [\"GET\"]\n"),
            "spec.rules[0].to[0].operation.method",
            "unknown field \"method\"",
            Some(11),
        ),
        row(
            "unknown condition field",
            res(AP, "rules:\n- when:\n  - key: source.ip\n    value: [\"1.2.3.4\"]\n"),
            "spec.rules[0].when[0].value",
            "unknown field \"value\"",
            Some(10),
        ),
        row(
            "unknown provider field",
            res(AP, "action: CUSTOM\nprovider:\n  name: ext\n  service: x\nrules:\n- {}\n"),
            "spec.provider.service",
            "unknown field",
            Some(10),
        ),
        row("rules not a list", res(AP, "rules: {}\n"), "spec.rules", "expected a list, found mapping", Some(7)),
        row(
            "principals not a list",
            res(AP, "rules:\n- from:\n  - source:\n      principals: a\n"),
            "spec.rules[0].from[0].source.principals",
            "expected a list",
            Some(10),
        ),
        row(
            "spec not a mapping",
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: p\nspec: [a]\n".to_string(),
            "spec",
            "expected a mapping, found list",
            Some(5),
        ),
    ];
    check_rows(rows);
}

// ------------------------------------------------------------------ PeerAuthentication

#[test]
fn peer_authentication_errors() {
    let sel = "selector:\n  matchLabels:\n    app: a\n";
    let rows = vec![
        row(
            "unknown mode",
            res(PA, "mtls:\n  mode: STRICTER\n"),
            "spec.mtls.mode",
            "unknown mode \"STRICTER\"",
            Some(8),
        ),
        row(
            "lower-case mode",
            res(PA, "mtls:\n  mode: strict\n"),
            "spec.mtls.mode",
            "unknown mode",
            Some(8),
        ),
        row(
            "mtls not a mapping",
            res(PA, "mtls: STRICT\n"),
            "spec.mtls",
            "expected a mapping",
            Some(7),
        ),
        row(
            "unknown mtls field",
            res(PA, "mtls:\n  mod: STRICT\n"),
            "spec.mtls.mod",
            "unknown field",
            Some(8),
        ),
        row(
            "port out of range",
            res(
                PA,
                &format!("{sel}portLevelMtls:\n  70000:\n    mode: STRICT\n"),
            ),
            "spec.portLevelMtls[70000]",
            "out of range (1-65535)",
            Some(11),
        ),
        row(
            "port zero",
            res(
                PA,
                &format!("{sel}portLevelMtls:\n  0:\n    mode: STRICT\n"),
            ),
            "spec.portLevelMtls[0]",
            "out of range",
            Some(11),
        ),
        row(
            "port not a number",
            res(
                PA,
                &format!("{sel}portLevelMtls:\n  http:\n    mode: STRICT\n"),
            ),
            "spec.portLevelMtls[http]",
            "\"http\" is not a port number",
            Some(11),
        ),
        row(
            "port without mode",
            res(PA, &format!("{sel}portLevelMtls:\n  8080:\n")),
            "spec.portLevelMtls[8080]",
            "must set a mode",
            None,
        ),
        row(
            "port with unknown mode",
            res(PA, &format!("{sel}portLevelMtls:\n  8080:\n    mode: ON\n")),
            "spec.portLevelMtls[8080].mode",
            "unknown mode",
            Some(12),
        ),
        row(
            "portLevelMtls without selector",
            res(PA, "portLevelMtls:\n  8080:\n    mode: STRICT\n"),
            "spec.portLevelMtls",
            "requires a workload selector",
            Some(8),
        ),
        row(
            "portLevelMtls with empty selector",
            res(
                PA,
                "selector: {}\nportLevelMtls:\n  8080:\n    mode: STRICT\n",
            ),
            "spec.portLevelMtls",
            "requires a workload selector",
            Some(9),
        ),
        row(
            "portLevelMtls with targetRefs",
            res(
                PA,
                "targetRefs:\n- kind: Service\n  name: s\nportLevelMtls:\n  8080:\n    mode: STRICT\n",
            ),
            "spec.portLevelMtls",
            "cannot be used with targetRefs",
            Some(11),
        ),
        row(
            "portLevelMtls a list",
            res(PA, &format!("{sel}portLevelMtls:\n- 8080\n")),
            "spec.portLevelMtls",
            "expected a mapping of port to mtls settings",
            Some(11),
        ),
        row(
            "selector wildcard",
            res(PA, "selector:\n  matchLabels:\n    app: \"*\"\n"),
            "spec.selector.matchLabels.app",
            "wildcard",
            Some(8),
        ),
    ];
    check_rows(rows);
}

// ------------------------------------------------------------------ RequestAuthentication

#[test]
fn request_authentication_errors() {
    let iss = "jwtRules:\n- issuer: https://issuer.example\n";
    let rows = vec![
        row(
            "header source without name",
            res(
                RA,
                &format!("{iss}  fromHeaders:\n  - prefix: \"Bearer \"\n"),
            ),
            "spec.jwtRules[0].fromHeaders[0].name",
            "header name must not be empty",
            Some(10),
        ),
        row(
            "empty claim-to-header header",
            res(
                RA,
                &format!("{iss}  outputClaimToHeaders:\n  - claim: sub\n"),
            ),
            "spec.jwtRules[0].outputClaimToHeaders[0].header",
            "header must not be empty",
            Some(10),
        ),
        row(
            "claim output to a framing header",
            res(
                RA,
                &format!(
                    "{iss}  outputClaimToHeaders:\n  - header: Content-Length\n    claim: sub\n"
                ),
            ),
            "spec.jwtRules[0].outputClaimToHeaders[0].header",
            "is set by the proxy",
            Some(10),
        ),
        row(
            "payload output to the routing header",
            res(RA, &format!("{iss}  outputPayloadToHeader: host\n")),
            "spec.jwtRules[0].outputPayloadToHeader",
            "is set by the proxy",
            Some(9),
        ),
        row(
            "pseudo-header output",
            res(
                RA,
                &format!(
                    "{iss}  outputClaimToHeaders:\n  - header: \":authority\"\n    claim: sub\n"
                ),
            ),
            "spec.jwtRules[0].outputClaimToHeaders[0].header",
            "pseudo-header",
            Some(10),
        ),
        row(
            "dot in output header",
            res(
                RA,
                &format!("{iss}  outputClaimToHeaders:\n  - header: x.sub\n    claim: sub\n"),
            ),
            "spec.jwtRules[0].outputClaimToHeaders[0].header",
            "not a valid header name",
            Some(10),
        ),
        row(
            "empty claim",
            res(
                RA,
                &format!("{iss}  outputClaimToHeaders:\n  - header: x-sub\n"),
            ),
            "spec.jwtRules[0].outputClaimToHeaders[0].claim",
            "claim must not be empty",
            Some(10),
        ),
        row(
            "bad timeout",
            res(RA, &format!("{iss}  timeout: soon\n")),
            "spec.jwtRules[0].timeout",
            "not a duration",
            Some(9),
        ),
        row(
            "timeout below 1ms",
            res(RA, &format!("{iss}  timeout: 500us\n")),
            "spec.jwtRules[0].timeout",
            "at least 1ms",
            Some(9),
        ),
        row(
            "timeout unquoted number",
            res(RA, &format!("{iss}  timeout: 5\n")),
            "spec.jwtRules[0].timeout",
            "expected a string",
            Some(9),
        ),
        row(
            "no issuer and no jwksUri",
            res(RA, "jwtRules:\n- audiences: [\"a\"]\n"),
            "spec.jwtRules[0].issuer",
            "issuer or jwksUri must be set",
            Some(8),
        ),
        row(
            "jwksUri without scheme",
            res(RA, &format!("{iss}  jwksUri: issuer.example/keys\n")),
            "spec.jwtRules[0].jwksUri",
            "is not a URL",
            Some(9),
        ),
        row(
            "jwksUri with ftp scheme",
            res(RA, &format!("{iss}  jwksUri: ftp://issuer.example/keys\n")),
            "spec.jwtRules[0].jwksUri",
            "unsupported scheme \"ftp\"",
            Some(9),
        ),
        row(
            "jwksUri with a port that is not a number",
            res(
                RA,
                &format!("{iss}  jwksUri: https://issuer.example:https/keys\n"),
            ),
            "spec.jwtRules[0].jwksUri",
            "invalid port \"https\"",
            Some(9),
        ),
        row(
            "jwksUri and jwks_uri",
            res(
                RA,
                &format!(
                    "{iss}  jwksUri: https://a.example/keys\n  jwks_uri: https://b.example/keys\n"
                ),
            ),
            "spec.jwtRules[0].jwks_uri",
            "only one of jwksUri or jwks_uri",
            Some(8),
        ),
        row(
            "jwks and jwksUri",
            res(
                RA,
                &format!(
                    "{iss}  jwksUri: https://issuer.example/keys\n  jwks: '{{\"keys\": []}}'\n"
                ),
            ),
            "spec.jwtRules[0].jwks",
            "cannot both be set",
            Some(8),
        ),
        row(
            "jwks not JSON",
            res(RA, &format!("{iss}  jwks: not-json\n")),
            "spec.jwtRules[0].jwks",
            "not a valid JSON Web Key Set",
            Some(9),
        ),
        row(
            "jwks without keys",
            res(RA, &format!("{iss}  jwks: '{{\"kty\": \"RSA\"}}'\n")),
            "spec.jwtRules[0].jwks",
            "\"keys\" list",
            Some(9),
        ),
        row(
            "empty audience",
            res(RA, &format!("{iss}  audiences: [\"\"]\n")),
            "spec.jwtRules[0].audiences[0]",
            "empty value",
            Some(9),
        ),
        row(
            "empty fromParams",
            res(RA, &format!("{iss}  fromParams: [\"\"]\n")),
            "spec.jwtRules[0].fromParams[0]",
            "empty value",
            Some(9),
        ),
        row(
            "empty fromCookies",
            res(RA, &format!("{iss}  fromCookies: [\"\"]\n")),
            "spec.jwtRules[0].fromCookies[0]",
            "empty value",
            Some(9),
        ),
        row(
            "empty spaceDelimitedClaims",
            res(RA, &format!("{iss}  spaceDelimitedClaims: [\"\"]\n")),
            "spec.jwtRules[0].spaceDelimitedClaims[0]",
            "empty value",
            Some(9),
        ),
        row(
            "forwardOriginalToken as yes",
            res(RA, &format!("{iss}  forwardOriginalToken: yes\n")),
            "spec.jwtRules[0].forwardOriginalToken",
            "expected true or false",
            Some(9),
        ),
        row(
            "unknown jwt rule field",
            res(RA, &format!("{iss}  jwks_url: x\n")),
            "spec.jwtRules[0].jwks_url",
            "unknown field",
            Some(9),
        ),
        row(
            "jwtRules not a list",
            res(RA, "jwtRules: x\n"),
            "spec.jwtRules",
            "expected a list",
            Some(7),
        ),
    ];
    check_rows(rows);
}

// ------------------------------------------------------------------ DestinationRule

#[test]
fn destination_rule_errors() {
    let h = "host: svc.ns.svc.cluster.local\n";
    let rows = vec![
        row(
            "missing host",
            res(DR, "exportTo: [\".\"]\n"),
            "spec",
            "missing required field \"host\"",
            Some(7),
        ),
        row(
            "empty host",
            res(DR, "host: \"\"\n"),
            "spec.host",
            "host must not be empty",
            Some(7),
        ),
        row(
            "unknown TLS mode",
            res(DR, &format!("{h}trafficPolicy:\n  tls:\n    mode: MTLS\n")),
            "spec.trafficPolicy.tls.mode",
            "unknown TLS mode \"MTLS\"",
            Some(10),
        ),
        row(
            "MUTUAL without client certificate",
            res(
                DR,
                &format!("{h}trafficPolicy:\n  tls:\n    mode: MUTUAL\n    privateKey: /k.pem\n"),
            ),
            "spec.trafficPolicy.tls.clientCertificate",
            "MUTUAL TLS requires clientCertificate",
            Some(10),
        ),
        row(
            "MUTUAL without private key",
            res(
                DR,
                &format!(
                    "{h}trafficPolicy:\n  tls:\n    mode: MUTUAL\n    clientCertificate: /c.pem\n"
                ),
            ),
            "spec.trafficPolicy.tls.privateKey",
            "requires privateKey",
            Some(10),
        ),
        row(
            "MUTUAL credentialName with certificate",
            res(
                DR,
                &format!(
                    "{h}trafficPolicy:\n  tls:\n    mode: MUTUAL\n    credentialName: c\n    caCertificates: /ca.pem\n"
                ),
            ),
            "spec.trafficPolicy.tls.caCertificates",
            "cannot be set together with credentialName",
            Some(10),
        ),
        row(
            "insecureSkipVerify with caCertificates",
            res(
                DR,
                &format!(
                    "{h}trafficPolicy:\n  tls:\n    mode: SIMPLE\n    caCertificates: /ca.pem\n    insecureSkipVerify: true\n"
                ),
            ),
            "spec.trafficPolicy.tls.insecureSkipVerify",
            "when insecureSkipVerify is true",
            Some(10),
        ),
        row(
            "MUTUAL insecureSkipVerify with subjectAltNames",
            res(
                DR,
                &format!(
                    "{h}trafficPolicy:\n  tls:\n    mode: MUTUAL\n    credentialName: c\n    subjectAltNames: [a]\n    insecureSkipVerify: true\n"
                ),
            ),
            "spec.trafficPolicy.tls.insecureSkipVerify",
            "cannot specify caCertificates",
            Some(10),
        ),
        row(
            "insecureSkipVerify quoted",
            res(
                DR,
                &format!(
                    "{h}trafficPolicy:\n  tls:\n    mode: SIMPLE\n    insecureSkipVerify: \"true\"\n"
                ),
            ),
            "spec.trafficPolicy.tls.insecureSkipVerify",
            "expected true or false",
            Some(11),
        ),
        row(
            "portLevelSettings without port",
            res(
                DR,
                &format!(
                    "{h}trafficPolicy:\n  portLevelSettings:\n  - tls:\n      mode: ISTIO_MUTUAL\n"
                ),
            ),
            "spec.trafficPolicy.portLevelSettings[0].port",
            "port is required",
            Some(10),
        ),
        row(
            "portLevelSettings negative port",
            res(
                DR,
                &format!("{h}trafficPolicy:\n  portLevelSettings:\n  - port:\n      number: -1\n"),
            ),
            "spec.trafficPolicy.portLevelSettings[0].port.number",
            "out of range (0-4294967295)",
            Some(11),
        ),
        row(
            "portLevelSettings port quoted",
            res(
                DR,
                &format!(
                    "{h}trafficPolicy:\n  portLevelSettings:\n  - port:\n      number: \"80\"\n"
                ),
            ),
            "spec.trafficPolicy.portLevelSettings[0].port.number",
            "expected an integer, found string",
            Some(11),
        ),
        row(
            "portLevelSettings port overflowing i64",
            res(
                DR,
                &format!(
                    "{h}trafficPolicy:\n  portLevelSettings:\n  - port:\n      number: !!int 99999999999999999999\n"
                ),
            ),
            "spec.trafficPolicy.portLevelSettings[0].port.number",
            "integer 99999999999999999999 is out of range",
            Some(11),
        ),
        row(
            "subset without name",
            res(DR, &format!("{h}subsets:\n- labels:\n    version: v1\n")),
            "spec.subsets[0].name",
            "subset name must not be empty",
            Some(9),
        ),
        row(
            "unknown subset field",
            res(
                DR,
                &format!("{h}subsets:\n- name: v1\n  label:\n    version: v1\n"),
            ),
            "spec.subsets[0].label",
            "unknown field",
            Some(10),
        ),
        row(
            "unknown traffic policy field",
            res(
                DR,
                &format!("{h}trafficPolicy:\n  tsl:\n    mode: SIMPLE\n"),
            ),
            "spec.trafficPolicy.tsl",
            "unknown field",
            Some(9),
        ),
        // connectionPool, as Istio's validateConnectionPool and its CRD
        // schema check it (spec: line 7, trafficPolicy 8, connectionPool
        // 9, tcp/http 10, their fields 11).
        row(
            "connectTimeout under 1ms",
            res(
                DR,
                &format!(
                    "{h}trafficPolicy:\n  connectionPool:\n    tcp:\n      connectTimeout: 500us\n"
                ),
            ),
            "spec.trafficPolicy.connectionPool.tcp.connectTimeout",
            "must be at least 1ms",
            Some(11),
        ),
        row(
            "connectTimeout of zero",
            res(
                DR,
                &format!(
                    "{h}trafficPolicy:\n  connectionPool:\n    tcp:\n      connectTimeout: 0s\n"
                ),
            ),
            "spec.trafficPolicy.connectionPool.tcp.connectTimeout",
            "must be at least 1ms",
            Some(11),
        ),
        row(
            "connectTimeout finer than 1ms",
            res(
                DR,
                &format!(
                    "{h}trafficPolicy:\n  connectionPool:\n    tcp:\n      connectTimeout: 1500us\n"
                ),
            ),
            "spec.trafficPolicy.connectionPool.tcp.connectTimeout",
            "millisecond precision",
            Some(11),
        ),
        row(
            "connectTimeout negative",
            res(
                DR,
                &format!(
                    "{h}trafficPolicy:\n  connectionPool:\n    tcp:\n      connectTimeout: -1s\n"
                ),
            ),
            "spec.trafficPolicy.connectionPool.tcp.connectTimeout",
            "is not a duration",
            Some(11),
        ),
        row(
            "connectTimeout not a duration",
            res(
                DR,
                &format!(
                    "{h}trafficPolicy:\n  connectionPool:\n    tcp:\n      connectTimeout: 10 seconds\n"
                ),
            ),
            "spec.trafficPolicy.connectionPool.tcp.connectTimeout",
            "is not a duration",
            Some(11),
        ),
        row(
            "connectTimeout as a number",
            res(
                DR,
                &format!(
                    "{h}trafficPolicy:\n  connectionPool:\n    tcp:\n      connectTimeout: 10\n"
                ),
            ),
            "spec.trafficPolicy.connectionPool.tcp.connectTimeout",
            "expected a string",
            Some(11),
        ),
        row(
            "empty connectionPool",
            res(DR, &format!("{h}trafficPolicy:\n  connectionPool: {{}}\n")),
            "spec.trafficPolicy.connectionPool",
            "connection pool must have at least one field",
            Some(9),
        ),
        row(
            "misspelt connectTimeout",
            res(
                DR,
                &format!(
                    "{h}trafficPolicy:\n  connectionPool:\n    tcp:\n      connectTimout: 1s\n"
                ),
            ),
            "spec.trafficPolicy.connectionPool.tcp.connectTimout",
            "unknown field",
            Some(11),
        ),
        row(
            "negative maxConnections",
            res(
                DR,
                &format!(
                    "{h}trafficPolicy:\n  connectionPool:\n    tcp:\n      maxConnections: -1\n"
                ),
            ),
            "spec.trafficPolicy.connectionPool.tcp.maxConnections",
            "must be non-negative",
            Some(11),
        ),
        row(
            "maxRetries beyond int32",
            res(
                DR,
                &format!(
                    "{h}trafficPolicy:\n  connectionPool:\n    http:\n      maxRetries: 2147483648\n"
                ),
            ),
            "spec.trafficPolicy.connectionPool.http.maxRetries",
            "out of range (int32)",
            Some(11),
        ),
        row(
            "tcp idleTimeout negative",
            res(
                DR,
                &format!(
                    "{h}trafficPolicy:\n  connectionPool:\n    tcp:\n      idleTimeout: -5s\n"
                ),
            ),
            "spec.trafficPolicy.connectionPool.tcp.idleTimeout",
            "is not a duration",
            Some(11),
        ),
        row(
            "http idleTimeout of zero",
            res(
                DR,
                &format!(
                    "{h}trafficPolicy:\n  connectionPool:\n    http:\n      idleTimeout: 0s\n"
                ),
            ),
            "spec.trafficPolicy.connectionPool.http.idleTimeout",
            "must be at least 1ms",
            Some(11),
        ),
        row(
            "keepalive probes negative",
            res(
                DR,
                &format!(
                    "{h}trafficPolicy:\n  connectionPool:\n    tcp:\n      tcpKeepalive:\n        probes: -1\n"
                ),
            ),
            "spec.trafficPolicy.connectionPool.tcp.tcpKeepalive.probes",
            "out of range",
            Some(12),
        ),
        row(
            "http2 keepalive without timeout",
            res(
                DR,
                &format!(
                    "{h}trafficPolicy:\n  connectionPool:\n    http:\n      http2KeepAlive:\n        interval: 1s\n"
                ),
            ),
            "spec.trafficPolicy.connectionPool.http.http2KeepAlive.timeout",
            "http2 keepalive timeout is required",
            Some(12),
        ),
        row(
            "useClientProtocol with UPGRADE",
            res(
                DR,
                &format!(
                    "{h}trafficPolicy:\n  connectionPool:\n    http:\n      h2UpgradePolicy: UPGRADE\n      useClientProtocol: true\n"
                ),
            ),
            "spec.trafficPolicy.connectionPool.http.useClientProtocol",
            "must not be true when h2UpgradePolicy is UPGRADE",
            Some(12),
        ),
        row(
            "unknown h2UpgradePolicy",
            res(
                DR,
                &format!(
                    "{h}trafficPolicy:\n  connectionPool:\n    http:\n      h2UpgradePolicy: ALWAYS\n"
                ),
            ),
            "spec.trafficPolicy.connectionPool.http.h2UpgradePolicy",
            "unknown h2UpgradePolicy \"ALWAYS\"",
            Some(11),
        ),
        row(
            "port-level connectTimeout under 1ms",
            res(
                DR,
                &format!(
                    "{h}trafficPolicy:\n  portLevelSettings:\n  - port:\n      number: 80\n    connectionPool:\n      tcp:\n        connectTimeout: 0.1ms\n"
                ),
            ),
            "spec.trafficPolicy.portLevelSettings[0].connectionPool.tcp.connectTimeout",
            "must be at least 1ms",
            Some(14),
        ),
        row(
            "subset connectTimeout not a duration",
            res(
                DR,
                &format!(
                    "{h}subsets:\n- name: v1\n  trafficPolicy:\n    connectionPool:\n      tcp:\n        connectTimeout: soon\n"
                ),
            ),
            "spec.subsets[0].trafficPolicy.connectionPool.tcp.connectTimeout",
            "is not a duration",
            Some(13),
        ),
        row(
            "workloadSelector wildcard",
            res(
                DR,
                &format!("{h}workloadSelector:\n  matchLabels:\n    app: \"*\"\n"),
            ),
            "spec.workloadSelector.matchLabels.app",
            "wildcard",
            Some(9),
        ),
    ];
    check_rows(rows);
}

// ------------------------------------------------------------------ ServiceEntry / WorkloadEntry

#[test]
fn service_entry_errors() {
    let h = "hosts: [api.example.com]\n";
    let rows = vec![
        row(
            "no hosts",
            res(SE, "location: MESH_EXTERNAL\n"),
            "spec.hosts",
            "at least one host is required",
            Some(7),
        ),
        row(
            "wildcard host",
            res(SE, "hosts: [\"*\"]\n"),
            "spec.hosts[0]",
            "invalid host \"*\"",
            Some(7),
        ),
        row(
            "empty host",
            res(SE, "hosts: [\"\"]\n"),
            "spec.hosts[0]",
            "invalid host",
            Some(7),
        ),
        row(
            "bad address",
            res(SE, &format!("{h}addresses: [\"10.0.0.0/40\"]\n")),
            "spec.addresses[0]",
            "invalid prefix length",
            Some(7),
        ),
        row(
            "duplicate port name",
            res(
                SE,
                &format!("{h}ports:\n- number: 80\n  name: http\n- number: 81\n  name: http\n"),
            ),
            "spec.ports[1].name",
            "port name \"http\" is used more than once",
            Some(11),
        ),
        row(
            "duplicate port number",
            res(
                SE,
                &format!("{h}ports:\n- number: 80\n  name: http\n- number: 80\n  name: http2\n"),
            ),
            "spec.ports[1].number",
            "port number 80 is used more than once",
            Some(11),
        ),
        row(
            "unknown location",
            res(SE, &format!("{h}location: EXTERNAL\n")),
            "spec.location",
            "unknown value \"EXTERNAL\"",
            Some(8),
        ),
        row(
            "unknown resolution",
            res(SE, &format!("{h}resolution: DYNAMIC\n")),
            "spec.resolution",
            "unknown value \"DYNAMIC\"",
            Some(8),
        ),
        row(
            "port zero",
            res(SE, &format!("{h}ports:\n- number: 0\n  name: http\n")),
            "spec.ports[0].number",
            "port 0 is out of range",
            Some(9),
        ),
        row(
            "targetPort too large",
            res(
                SE,
                &format!("{h}ports:\n- number: 80\n  name: http\n  targetPort: 70000\n"),
            ),
            "spec.ports[0].targetPort",
            "out of range",
            Some(11),
        ),
        row(
            "unknown protocol",
            res(
                SE,
                &format!("{h}ports:\n- number: 21\n  name: ftp\n  protocol: FTP\n"),
            ),
            "spec.ports[0].protocol",
            "unknown protocol \"FTP\"",
            Some(11),
        ),
        row(
            "port without name",
            res(SE, &format!("{h}ports:\n- number: 80\n")),
            "spec.ports[0]",
            "missing required field \"name\"",
            Some(9),
        ),
        row(
            "port number quoted",
            res(SE, &format!("{h}ports:\n- number: \"80\"\n  name: http\n")),
            "spec.ports[0].number",
            "expected an integer",
            Some(9),
        ),
        row(
            "workloadSelector and endpoints",
            res(
                SE,
                &format!(
                    "{h}workloadSelector:\n  labels:\n    app: a\nendpoints:\n- address: 10.0.0.1\n"
                ),
            ),
            "spec.workloadSelector",
            "only one of workloadSelector or endpoints",
            Some(7),
        ),
        row(
            "endpoint without address",
            res(SE, &format!("{h}endpoints:\n- labels:\n    app: a\n")),
            "spec.endpoints[0].address",
            "address is required",
            Some(9),
        ),
        row(
            "endpoint bad label",
            res(
                SE,
                &format!("{h}endpoints:\n- address: 10.0.0.1\n  labels:\n    app: \"a b\"\n"),
            ),
            "spec.endpoints[0].labels.app",
            "invalid label value",
            Some(9),
        ),
        row(
            "unknown endpoint field",
            res(
                SE,
                &format!("{h}endpoints:\n- address: 10.0.0.1\n  port: 80\n"),
            ),
            "spec.endpoints[0].port",
            "unknown field",
            Some(10),
        ),
        // Istio's resolution rules (ValidateServiceEntry).
        row(
            "endpoints with the default resolution NONE",
            res(SE, &format!("{h}endpoints:\n- address: 10.0.0.1\n")),
            "spec.endpoints",
            "no endpoints should be provided for resolution type NONE",
            Some(9),
        ),
        row(
            "endpoints with resolution NONE",
            res(
                SE,
                &format!("{h}resolution: NONE\nendpoints:\n- address: 10.0.0.1\n"),
            ),
            "spec.endpoints",
            "resolution type NONE",
            Some(10),
        ),
        row(
            "STATIC endpoint with a host name",
            res(
                SE,
                &format!(
                    "{h}resolution: STATIC\nendpoints:\n- address: 10.0.0.1\n- address: api.internal\n"
                ),
            ),
            "spec.endpoints[1].address",
            "endpoint address \"api.internal\" is not a valid IP address",
            Some(11),
        ),
        row(
            "STATIC unix socket endpoint",
            res(
                SE,
                &format!("{h}resolution: STATIC\nendpoints:\n- address: unix:///var/run/a.sock\n"),
            ),
            "spec.endpoints[0].address",
            "unix domain socket",
            Some(10),
        ),
        row(
            "DNS without endpoints and a wildcard host",
            res(SE, "hosts: [\"*.example.com\"]\nresolution: DNS\n"),
            "spec.hosts[0]",
            "hosts must be FQDN if no endpoints are provided for resolution mode DNS",
            Some(7),
        ),
        row(
            "DNS_ROUND_ROBIN without endpoints and a wildcard host",
            res(
                SE,
                "hosts: [\"*.example.com\"]\nresolution: DNS_ROUND_ROBIN\n",
            ),
            "spec.hosts[0]",
            "resolution mode DNS_ROUND_ROBIN",
            Some(7),
        ),
        row(
            "DNS endpoint that is neither a name nor an IP",
            res(
                SE,
                &format!("{h}resolution: DNS\nendpoints:\n- address: \"bad_name.example.com\"\n"),
            ),
            "spec.endpoints[0].address",
            "is not a valid FQDN or an IP address",
            Some(10),
        ),
        row(
            "DNS_ROUND_ROBIN with two endpoints",
            res(
                SE,
                &format!(
                    "{h}resolution: DNS_ROUND_ROBIN\nendpoints:\n- address: a.example.com\n- address: b.example.com\n"
                ),
            ),
            "spec.endpoints",
            "there must only be 0 or 1 endpoint for resolution mode DNS_ROUND_ROBIN",
            Some(10),
        ),
        row(
            "DNS with CIDR addresses",
            res(
                SE,
                &format!("{h}addresses: [10.0.0.0/24]\nresolution: DNS\n"),
            ),
            "spec.addresses",
            "CIDR addresses are allowed only for NONE/STATIC resolution types",
            Some(7),
        ),
    ];
    check_rows(rows);
}

#[test]
fn service_entry_resolutions_that_load() {
    // Seed 000's external service, as written, and the other forms Istio
    // accepts: DNS endpoints that are names or IPs, one DNS_ROUND_ROBIN
    // endpoint, a NONE service with CIDR addresses.
    let docs = [
        "hosts: [api.external-service.com]\nports:\n- number: 443\n  name: https\n  protocol: HTTPS\nresolution: DNS\nlocation: MESH_EXTERNAL\n",
        "hosts: [api.example.com]\nresolution: DNS\nendpoints:\n- address: a.example.com\n- address: 10.0.0.1\n",
        "hosts: [\"*.example.com\"]\nresolution: DNS_ROUND_ROBIN\nendpoints:\n- address: lb.example.com.\n",
        "hosts: [api.example.com]\naddresses: [10.0.0.0/8]\nresolution: NONE\n",
        "hosts: [api.example.com]\nresolution: STATIC\nendpoints:\n- address: \"2001:db8::1\"\n",
    ];
    for spec in docs {
        let yaml = res(SE, spec);
        if let Err(d) = load(&yaml) {
            panic!("{spec}\n{}", render(&d));
        }
    }
}

#[test]
fn workload_entry_errors() {
    let a = "address: 10.0.0.1\n";
    let rows = vec![
        row(
            "no address",
            res(WE, "labels:\n  app: a\n"),
            "spec.address",
            "address is required (unless network is set)",
            Some(7),
        ),
        row(
            "empty address",
            res(WE, "address: \"\"\n"),
            "spec.address",
            "address is required",
            Some(7),
        ),
        row(
            "ports as a list",
            res(WE, &format!("{a}ports: [80]\n")),
            "spec.ports",
            "expected a mapping of port name to number",
            Some(8),
        ),
        row(
            "port zero",
            res(WE, &format!("{a}ports:\n  http: 0\n")),
            "spec.ports.http",
            "out of range",
            Some(9),
        ),
        row(
            "port quoted",
            res(WE, &format!("{a}ports:\n  http: \"80\"\n")),
            "spec.ports.http",
            "expected an integer",
            Some(9),
        ),
        row(
            "bad label key",
            res(WE, &format!("{a}labels:\n  -bad: x\n")),
            "spec.labels.-bad",
            "invalid label key",
            Some(7),
        ),
        row(
            "bad label key prefix",
            res(WE, &format!("{a}labels:\n  Example.COM/app: x\n")),
            "spec.labels.Example.COM/app",
            "prefix must be a DNS subdomain",
            Some(7),
        ),
        row(
            "bad label value",
            res(WE, &format!("{a}labels:\n  app: \"a b\"\n")),
            "spec.labels.app",
            "invalid label value",
            Some(7),
        ),
        row(
            "wildcard label value",
            res(WE, &format!("{a}labels:\n  app: \"a*\"\n")),
            "spec.labels.app",
            "wildcard",
            Some(7),
        ),
        row(
            "service account that cannot be in a SPIFFE ID",
            res(WE, &format!("{a}serviceAccount: \"bad sa\"\n")),
            "spec.serviceAccount",
            "cannot be part of a SPIFFE ID",
            Some(7),
        ),
        row(
            "weight not a number",
            res(WE, &format!("{a}weight: heavy\n")),
            "spec.weight",
            "expected an integer",
            Some(8),
        ),
        row(
            "unknown field",
            res(WE, &format!("{a}adress: 10.0.0.2\n")),
            "spec.adress",
            "unknown field",
            Some(8),
        ),
    ];
    check_rows(rows);
}

// ------------------------------------------------------------------ MeshConfig

#[test]
fn mesh_config_errors() {
    let ext = "extensionProviders:\n";
    let rows = vec![
        row(
            "bad trust domain",
            res(MC, "trustDomain: Example.COM\n"),
            "spec.trustDomain",
            "not a valid trust domain",
            Some(7),
        ),
        row(
            "bad trust domain alias",
            res(MC, "trustDomainAliases:\n- old.local\n- \"bad domain\"\n"),
            "spec.trustDomainAliases[1]",
            "not a valid trust domain",
            Some(7),
        ),
        row(
            "unknown path normalization",
            res(MC, "pathNormalization:\n  normalization: MERGE\n"),
            "spec.pathNormalization.normalization",
            "unknown normalization \"MERGE\"",
            Some(8),
        ),
        row(
            "bad cert ttl",
            res(MC, "workloadCertTtl: forever\n"),
            "spec.workloadCertTtl",
            "not a duration",
            Some(7),
        ),
        row(
            "connectTimeout of zero",
            res(MC, "connectTimeout: 0s\n"),
            "spec.connectTimeout",
            "must be at least 1ms",
            Some(7),
        ),
        row(
            "connectTimeout over an hour",
            res(MC, "connectTimeout: 2h\n"),
            "spec.connectTimeout",
            "at most 1h",
            Some(7),
        ),
        row(
            "connectTimeout finer than 1ms",
            res(MC, "connectTimeout: 1.0005s\n"),
            "spec.connectTimeout",
            "millisecond precision",
            Some(7),
        ),
        row(
            "connectTimeout not a duration",
            res(MC, "connectTimeout: fast\n"),
            "spec.connectTimeout",
            "is not a duration",
            Some(7),
        ),
        row(
            "enableAutoMtls as yes",
            res(MC, "enableAutoMtls: yes\n"),
            "spec.enableAutoMtls",
            "expected true or false",
            Some(7),
        ),
        row(
            "provider with two types",
            res(
                MC,
                &format!(
                    "{ext}- name: ext\n  envoyExtAuthzGrpc:\n    service: a\n    port: 9000\n  envoyExtAuthzHttp:\n    service: a\n    port: 9000\n"
                ),
            ),
            "spec.extensionProviders[0]",
            "must set exactly one provider type, found 2",
            Some(8),
        ),
        row(
            "ext authz with a request body",
            res(
                MC,
                &format!(
                    "{ext}- name: ext\n  envoyExtAuthzHttp:\n    service: a\n    port: 9000\n    includeRequestBodyInCheck: {{maxRequestBytes: 100}}\n"
                ),
            ),
            "spec.extensionProviders[0].envoyExtAuthzHttp.includeRequestBodyInCheck",
            "does not send the request body",
            Some(12),
        ),
        row(
            "ext authz timeout",
            res(
                MC,
                &format!(
                    "{ext}- name: ext\n  envoyExtAuthzHttp:\n    service: a\n    port: 9000\n    timeout: soon\n"
                ),
            ),
            "spec.extensionProviders[0].envoyExtAuthzHttp.timeout",
            "soon",
            Some(12),
        ),
        row(
            "ext authz additional header name",
            res(
                MC,
                &format!(
                    "{ext}- name: ext\n  envoyExtAuthzHttp:\n    service: a\n    port: 9000\n    includeAdditionalHeadersInCheck: {{\"bad header\": x}}\n"
                ),
            ),
            "spec.extensionProviders[0].envoyExtAuthzHttp",
            "is not a header name",
            Some(10),
        ),
        row(
            "ext authz sets a framing header",
            res(
                MC,
                &format!(
                    "{ext}- name: ext\n  envoyExtAuthzHttp:\n    service: a\n    port: 9000\n    headersToUpstreamOnAllow: [x-user, Transfer-Encoding]\n"
                ),
            ),
            "spec.extensionProviders[0].envoyExtAuthzHttp",
            "is set by the proxy",
            Some(10),
        ),
    ];
    check_rows(rows);
}

// ------------------------------------------------------------------ metadata, documents, YAML

#[test]
fn document_and_metadata_errors() {
    let pa = |meta: &str| {
        format!(
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n{meta}spec:\n  mtls:\n    mode: STRICT\n"
        )
    };
    let alias_bomb = {
        let mut t = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..10 {
            let p = i - 1;
            let refs = vec![format!("*a{p}"); 10].join(", ");
            let _ = writeln!(t, "a{i}: &a{i} [{refs}]");
        }
        t
    };
    let rows = vec![
        row("missing metadata", pa(""), "metadata", "missing required field \"metadata\"", Some(1)),
        row("missing name", pa("metadata:\n  namespace: ns\n"), "metadata", "missing required field \"name\"", Some(4)),
        row("invalid name", pa("metadata:\n  name: Bad_Name\n"), "metadata.name", "is not a valid name", Some(4)),
        row("name too long", pa(&format!("metadata:\n  name: {}\n", "a".repeat(254))), "metadata.name", "not a valid name", Some(4)),
        row("name not a string", pa("metadata:\n  name: 123\n"), "metadata.name", "expected a string", Some(4)),
        row(
            "invalid namespace",
            pa("metadata:\n  name: p\n  namespace: Prod\n"),
            "metadata.namespace",
            "not a valid namespace",
            Some(4),
        ),
        row(
            "dotted namespace",
            pa("metadata:\n  name: p\n  namespace: a.b\n"),
            "metadata.namespace",
            "not a valid namespace",
            Some(4),
        ),
        row("unknown metadata field", pa("metadata:\n  name: p\n  labls: {}\n"), "metadata.labls", "unknown field", Some(5)),
        row(
            "labels not a mapping",
            pa("metadata:\n  name: p\n  labels: [a]\n"),
            "metadata.labels",
            "expected a mapping",
            Some(5),
        ),
        row(
            "unquoted boolean annotation",
            pa("metadata:\n  name: p\n  annotations:\n    istio.io/dry-run: true\n"),
            "metadata.annotations.istio.io/dry-run",
            "expected a string",
            Some(6),
        ),
        row("metadata a string", pa("metadata: p\n"), "metadata", "expected a mapping", Some(3)),
        row("unknown top-level field", format!("{}specs: {{}}\n", pa("metadata:\n  name: p\n")), "specs", "unknown field", Some(8)),
        row(
            "unsupported version",
            "apiVersion: security.istio.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata:\n  name: p\n".to_string(),
            "apiVersion",
            "is not served in security.istio.io/v1alpha1 (supported: security.istio.io/v1, security.istio.io/v1beta1)",
            Some(1),
        ),
        row(
            "unsupported networking version",
            "apiVersion: networking.istio.io/v2\nkind: DestinationRule\nmetadata:\n  name: p\nspec:\n  host: a\n".to_string(),
            "apiVersion",
            "not served",
            Some(1),
        ),
        row(
            "unsupported mesh version",
            "apiVersion: meshward.io/v1\nkind: MeshConfig\nmetadata:\n  name: mesh\n".to_string(),
            "apiVersion",
            "meshward.io/v1alpha1",
            Some(1),
        ),
        row(
            "missing kind",
            "apiVersion: security.istio.io/v1\nmetadata:\n  name: p\n".to_string(),
            "",
            "apiVersion and kind",
            Some(1),
        ),
        row("kind not a string", "apiVersion: v1\nkind: 3\n".to_string(), "", "apiVersion and kind", Some(1)),
        row("document is a list", "- a\n- b\n".to_string(), "", "expected a Kubernetes resource", Some(1)),
        row(
            "document is a scalar",
            "---\nhello\n".to_string(),
            "",
            "expected a Kubernetes resource (a mapping with apiVersion and kind), found string",
            Some(2),
        ),
        row("List items not a list", "apiVersion: v1\nkind: List\nitems: {}\n".to_string(), "", "List.items must be a list", Some(3)),
        row(
            "error inside List item",
            format!("apiVersion: v1\nkind: List\nitems:\n- {}", indent(&pa("metadata:\n  name: Bad\n")).trim_start()),
            "metadata.name",
            "not a valid name",
            Some(7),
        ),
        row(
            "two MeshConfigs",
            "apiVersion: meshward.io/v1alpha1\nkind: MeshConfig\nmetadata:\n  name: a\n---\napiVersion: meshward.io/v1alpha1\nkind: MeshConfig\nmetadata:\n  name: b\n".to_string(),
            "",
            "mesh settings are already defined at test.yaml:1; only one MeshConfig is allowed",
            Some(6),
        ),
        row(
            "dry-run on PeerAuthentication",
            pa("metadata:\n  name: p\n  annotations:\n    istio.io/dry-run: \"true\"\n"),
            "metadata.annotations[istio.io/dry-run]",
            "PeerAuthentication does not support the istio.io/dry-run annotation",
            Some(1),
        ),
        row(
            "dry-run on DestinationRule",
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  name: p\n  annotations:\n    istio.io/dry-run: \"false\"\nspec:\n  host: a\n".to_string(),
            "metadata.annotations[istio.io/dry-run]",
            "does not support",
            Some(1),
        ),
        row(
            "dry-run on AUDIT",
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: p\n  annotations:\n    istio.io/dry-run: \"true\"\nspec:\n  action: AUDIT\n  rules:\n  - {}\n".to_string(),
            "metadata.annotations[istio.io/dry-run]",
            "only supports ALLOW and DENY policies, found AUDIT",
            Some(1),
        ),
        row(
            "dry-run false on CUSTOM",
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: p\n  annotations:\n    istio.io/dry-run: \"false\"\nspec:\n  action: CUSTOM\n  provider:\n    name: ext\n  rules:\n  - {}\n".to_string(),
            "metadata.annotations[istio.io/dry-run]",
            "found CUSTOM",
            Some(1),
        ),
        row(
            "dry-run not a Go bool",
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: p\n  annotations:\n    istio.io/dry-run: \"yes\"\nspec:\n  action: DENY\n  rules:\n  - {}\n".to_string(),
            "metadata.annotations[istio.io/dry-run]",
            "\"yes\" is not a boolean",
            Some(1),
        ),
        // YAML level: the whole file is refused with one syntax error.
        row("unclosed flow sequence", "a: [1, 2\nb: c\n".to_string(), "", "invalid YAML", None),
        row("bad indentation", "apiVersion: v1\n kind: x\nmetadata: y\n".to_string(), "", "invalid YAML", Some(2)),
        row(
            "duplicate key",
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nkind: PeerAuthentication\n".to_string(),
            "",
            "invalid YAML: duplicate mapping key \"kind\"",
            Some(3),
        ),
        row(
            "nested duplicate key",
            res(AP, "rules:\n- to:\n  - operation:\n      paths: [\"/a\"]\n      paths: [\"/b\"]\n"),
            "",
            "duplicate mapping key \"paths\"",
            Some(11),
        ),
        row("unsupported tag", "a: !!binary aGVsbG8=\n".to_string(), "", "unsupported tag !!binary", Some(1)),
        row("local tag", "a: !secret x\n".to_string(), "", "unsupported tag", Some(1)),
        row("unknown alias", "a: *nothing\n".to_string(), "", "invalid YAML", Some(1)),
        row("complex key", "? [a, b]\n: c\n".to_string(), "", "mapping keys must be scalars", Some(1)),
        row("deep nesting", "a: ".to_string() + &"[".repeat(100), "", "nesting deeper than 64 levels", Some(1)),
        row("alias bomb", alias_bomb, "", "alias expansion makes the document too large", None),
    ];
    check_rows(rows);
}

/// The rendered form is `file:line: Kind ns/name: field: message`.
#[test]
fn diagnostic_rendering() {
    let d = load(&res(
        AP,
        "rules:\n- to:\n  - operation:\n      methods: [\"GET\", \"get\"]\n      ports: [\"http\"]\n",
    ))
    .unwrap_err();
    let all: Vec<String> = d.0.iter().map(ToString::to_string).collect();
    assert_eq!(
        all,
        [
            "test.yaml:10: warning: AuthorizationPolicy ns/p: spec.rules[0].to[0].operation.methods[1]: \"get\" never matches: methods are case-sensitive and requests use upper case (\"GET\")",
            "test.yaml:11: AuthorizationPolicy ns/p: spec.rules[0].to[0].operation.ports[0]: \"http\" is not a port number",
        ]
    );
    let e = d.errors().next().unwrap();
    assert_eq!(e.severity, Severity::Error);
    assert_eq!(&*e.file, "test.yaml");
    assert_eq!(e.resource.as_deref(), Some("AuthorizationPolicy ns/p"));
    assert_eq!(
        e.field.as_deref(),
        Some("spec.rules[0].to[0].operation.ports[0]")
    );
    assert_eq!(d.warnings().count(), 1);
    // The whole set renders one diagnostic per line.
    assert_eq!(d.to_string(), format!("{}\n{}\n", all[0], all[1]));
}

#[test]
fn all_errors_of_a_file_are_reported() {
    let text = format!(
        "{}---\n{}",
        res(
            AP,
            "action: DENY\nrules:\n- from:\n  - source:\n      principals: [\"\"]\n      ipBlocks: [\"300.0.0.1\"]\n      namespaces: [\"ns\"]\n  to:\n  - operation:\n      ports: [8080, \"http\"]\n      methods: [get]\n      paths: [\"/x\"]\n  when:\n  - key: bogus\n    values: [\"x\"]\n  extra: 1\n"
        ),
        res(DR, "host: a\ntrafficPolicy:\n  tls:\n    mode: MUTUAL\n")
    );
    let d = load(&text).unwrap_err();
    let errors: Vec<String> = d.errors().map(ToString::to_string).collect();
    // principals[0], ipBlocks[0], ports[0], ports[1], when key, extra,
    // and in the DestinationRule clientCertificate and privateKey; the
    // lower-case method is a warning.
    assert_eq!(errors.len(), 8, "{}", errors.join("\n"));
    assert!(
        d.warnings()
            .any(|w| w.to_string().contains("methods[0]: \"get\" never matches"))
    );
    for needle in [
        "principals[0]: empty value",
        "ipBlocks[0]:",
        "ports[0]: expected a string",
        "ports[1]: \"http\" is not a port number",
        "when[0].key: unknown condition key",
        "spec.rules[0].extra: unknown field",
        "DestinationRule ns/p: spec.trafficPolicy.tls.clientCertificate",
        "DestinationRule ns/p: spec.trafficPolicy.tls.privateKey",
    ] {
        assert!(
            errors.iter().any(|e| e.contains(needle)),
            "missing {needle:?} in:\n{}",
            errors.join("\n")
        );
    }
    // In input order.
    let lines: Vec<u32> = d.errors().map(|e| e.pos.line).collect();
    assert!(lines.windows(2).all(|w| w[0] <= w[1]), "{lines:?}");
}

#[test]
fn errors_across_sources_are_all_reported() {
    let mut l = Loader::new();
    l.add_source("a.yaml", &res(AP, "action: NOPE\n"));
    l.add_source("b.yaml", "a: [\n");
    l.add_source("c.yaml", &res(PA, "mtls:\n  mode: X\n"));
    let d = l.finish().unwrap_err();
    let files: Vec<&str> = d.errors().map(|e| &*e.file).collect();
    assert_eq!(files, ["a.yaml", "b.yaml", "c.yaml"], "{d}");
}

#[test]
fn one_bad_document_rejects_the_whole_set() {
    let good = res(PA, "mtls:\n  mode: STRICT\n");
    let bad = res(AP, "action: DENY\n").replace("name: p", "name: q");
    let text = format!("{good}---\n{bad}---\n{}", res(DR, "host: a\n"));
    let d = load(&text).unwrap_err();
    assert_eq!(d.errors().count(), 1, "{d}");
    // Only diagnostics come back; nothing of the valid documents is returned.
    let result: Result<Loaded, Diagnostics> = load(&text);
    assert!(result.is_err());
    // Each document alone is fine except the bad one.
    assert!(load(&good).is_ok());
    assert!(load(&res(DR, "host: a\n")).is_ok());
}

// ------------------------------------------------------------------ warnings

fn warnings(text: &str) -> Vec<String> {
    let loaded = load(text).unwrap_or_else(|d| panic!("unexpected errors:\n{d}"));
    assert!(
        loaded
            .warnings
            .0
            .iter()
            .all(|w| w.severity == Severity::Warning)
    );
    loaded.warnings.0.iter().map(ToString::to_string).collect()
}

#[test]
fn unknown_kinds_are_skipped_with_one_warning() {
    let text = "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: d\n---\n\
                apiVersion: v1\nkind: Service\nmetadata:\n  name: s\n---\n\
                apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: d2\n---\n\
                apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: vs\nspec:\n  anything: [goes]\n---\n"
        .to_string()
        + &res(PA, "mtls:\n  mode: STRICT\n");
    let loaded = load(&text).unwrap();
    assert_eq!(loaded.config.peer_authentications.len(), 1);
    let w: Vec<String> = loaded.warnings.0.iter().map(ToString::to_string).collect();
    assert_eq!(w.len(), 1, "{w:?}");
    assert_eq!(
        w[0],
        "test.yaml:1: warning: skipped 4 resource(s) of kinds meshward does not act on: Deployment apps/v1 (2), Service v1 (1), VirtualService networking.istio.io/v1 (1)"
    );
}

#[test]
fn known_kind_in_wrong_group_is_skipped_with_a_warning() {
    // A known kind under another API group is not the Istio kind: it is
    // skipped like any other foreign kind, and the warning names it.
    let w = warnings(
        "apiVersion: security.example.com/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: p\n",
    );
    assert_eq!(w.len(), 1);
    assert!(
        w[0].contains("AuthorizationPolicy security.example.com/v1 (1)"),
        "{w:?}"
    );
}

#[test]
fn request_principals_without_request_authentication_warn() {
    let ap = res(
        AP,
        "rules:\n- from:\n  - source:\n      requestPrincipals: [\"*\"]\n",
    );
    let w = warnings(&ap);
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(
        w[0].starts_with(
            "test.yaml:1: warning: AuthorizationPolicy ns/p: spec.rules: uses requestPrincipals"
        ),
        "{w:?}"
    );
    assert!(
        w[0].contains("no RequestAuthentication exists in namespace \"ns\""),
        "{w:?}"
    );

    let claims = res(
        AP,
        "rules:\n- when:\n  - key: request.auth.claims[groups]\n    values: [\"admin\"]\n",
    );
    assert_eq!(warnings(&claims).len(), 1);

    // A RequestAuthentication in the same namespace or the root namespace
    // silences it.
    let ra = res(RA, "jwtRules:\n- issuer: https://issuer.example\n");
    assert!(warnings(&format!("{ap}---\n{ra}")).is_empty());
    let ra_root = ra.replace("namespace: ns", "namespace: istio-system");
    assert!(warnings(&format!("{ap}---\n{ra_root}")).is_empty());
    let ra_other = ra.replace("namespace: ns", "namespace: other");
    assert_eq!(warnings(&format!("{ap}---\n{ra_other}")).len(), 1);
}

#[test]
fn custom_provider_warnings() {
    let custom = res(
        AP,
        "action: CUSTOM\nprovider:\n  name: opa\nrules:\n- to:\n  - operation:\n      paths: [\"/x\"]\n",
    );
    let w = warnings(&custom);
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(
        w[0].contains(
            "spec.provider.name: extension provider \"opa\" is not defined in the mesh config; the requests and connections this policy's rules match will be denied"
        ),
        "{w:?}"
    );

    let tracing = res(
        MC,
        "extensionProviders:\n- name: opa\n  zipkin:\n    service: z\n    port: 9411\n",
    )
    .replace("name: p", "name: mesh");
    let w = warnings(&format!("{custom}---\n{tracing}"));
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(
        w[0].contains("is a zipkin provider, not an authorization provider; the requests and connections this policy's rules match will be denied"),
        "{w:?}"
    );

    let authz = res(
        MC,
        "extensionProviders:\n- name: opa\n  envoyExtAuthzGrpc:\n    service: opa.ns.svc.cluster.local\n    port: 9191\n",
    );
    assert!(warnings(&format!("{custom}---\n{authz}")).is_empty());
}

#[test]
fn custom_policies_naming_several_providers_for_one_workload_warn() {
    let providers = res(
        MC,
        "extensionProviders:\n- name: a\n  envoyExtAuthzHttp:\n    service: a.ns.svc.cluster.local\n    port: 80\n- name: b\n  envoyExtAuthzGrpc:\n    service: b.ns.svc.cluster.local\n    port: 80\n",
    )
    .replace("name: p\n  namespace: ns", "name: mesh\n  namespace: istio-system");
    let custom = |name: &str, selector: &str, provider: &str| {
        res(
            AP,
            &format!("{selector}action: CUSTOM\nprovider:\n  name: {provider}\nrules:\n- {{}}\n"),
        )
        .replace("name: p", &format!("name: {name}"))
    };
    let web = res(
        WE,
        "address: 10.0.0.1\nlabels:\n  app: web\nserviceAccount: web\n",
    )
    .replace("name: p", "name: web");
    let api = web.replace("web", "api").replace("10.0.0.1", "10.0.0.2");
    let with = |docs: &[String]| {
        warnings(
            &[&[providers.clone(), web.clone(), api.clone()], docs]
                .concat()
                .join("---\n"),
        )
    };
    // One provider, or two for workloads that do not share one.
    assert!(with(&[custom("x", "", "a"), custom("y", "", "a")]).is_empty());
    let w = with(&[
        custom("x", "selector:\n  matchLabels:\n    app: web\n", "a"),
        custom("y", "selector:\n  matchLabels:\n    app: api\n", "b"),
    ]);
    assert!(w.is_empty(), "{w:?}");
    // Two for one workload: that workload is named.
    let w = with(&[
        custom("x", "", "a"),
        custom("y", "selector:\n  matchLabels:\n    app: api\n", "b"),
    ]);
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(w[0].contains("WorkloadEntry ns/api"), "{w:?}");
    assert!(
        w[0].contains("name \"a\", \"b\"; only one provider can be used per workload, so the requests and connections their rules match will be denied"),
        "{w:?}"
    );
}

#[test]
fn empty_selector_warns() {
    let w = warnings(&res(AP, "selector: {}\nrules:\n- {}\n"));
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(
        w[0].contains("spec.selector: selector has no labels"),
        "{w:?}"
    );
    let w = warnings(&res(AP, "selector:\n  matchLabels: {}\nrules:\n- {}\n"));
    assert_eq!(w.len(), 1, "{w:?}");
}

#[test]
fn other_warnings_do_not_fail_the_load() {
    // Mesh settings meshward does not act on.
    let w = warnings(&res(
        MC,
        "accessLogFile: /dev/stdout\nenableTracing: true\n",
    ));
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(
        w[0].contains("does not act on these mesh settings: accessLogFile, enableTracing"),
        "{w:?}"
    );
    // Certificates with ISTIO_MUTUAL are ignored with a warning.
    let w = warnings(&res(
        DR,
        "host: a\ntrafficPolicy:\n  tls:\n    mode: ISTIO_MUTUAL\n    clientCertificate: /c.pem\n",
    ));
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(w[0].contains("spec.trafficPolicy.tls.clientCertificate: clientCertificate is ignored with ISTIO_MUTUAL"), "{w:?}");
}

// ------------------------------------------------------------------ files and directories

#[test]
fn directory_loading_is_recursive_sorted_and_filtered() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    std::fs::create_dir_all(p.join("b/nested")).unwrap();
    std::fs::create_dir_all(p.join(".hidden")).unwrap();
    let ap = |name: &str| res(AP, "rules:\n- {}\n").replace("name: p", &format!("name: {name}"));
    std::fs::write(p.join("z.yaml"), ap("z")).unwrap();
    std::fs::write(p.join("a.yml"), ap("a")).unwrap();
    std::fs::write(p.join("b/nested/c.yaml"), ap("c")).unwrap();
    std::fs::write(
        p.join("b/m.json"),
        r#"{"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy", "metadata": {"name": "m", "namespace": "ns"}, "spec": {"rules": [{}]}}"#,
    )
    .unwrap();
    // Not configuration: ignored even though they would not parse.
    std::fs::write(p.join("README.md"), "# not: [yaml").unwrap();
    std::fs::write(p.join("notes.txt"), "kind: [").unwrap();
    std::fs::write(p.join("b/x.yaml.bak"), "kind: [").unwrap();
    std::fs::write(p.join(".hidden/h.yaml"), "kind: [").unwrap();
    std::fs::write(p.join(".dot.yaml"), "kind: [").unwrap();

    let loaded = load_paths(&[p]).unwrap_or_else(|d| panic!("{d}"));
    let names: Vec<&str> = loaded
        .config
        .authorization_policies
        .iter()
        .map(|r| r.meta.name.as_str())
        .collect();
    // Sorted by path: a.yml, b/m.json, b/nested/c.yaml, z.yaml.
    assert_eq!(names, ["a", "m", "c", "z"]);
    let orders: Vec<u32> = loaded
        .config
        .authorization_policies
        .iter()
        .map(|r| r.origin.order)
        .collect();
    assert!(orders.windows(2).all(|w| w[0] < w[1]), "{orders:?}");
    assert!(
        loaded.config.authorization_policies[2]
            .origin
            .file
            .ends_with("c.yaml")
    );
    assert!(loaded.warnings.0.is_empty());

    // A file named explicitly is read whatever its extension.
    let loaded = load_paths(&[p.join("z.yaml"), p.join("notes.txt")]);
    let d = loaded.unwrap_err();
    assert!(
        d.errors()
            .any(|e| e.file.ends_with("notes.txt") && e.message.contains("invalid YAML")),
        "{d}"
    );
}

#[test]
fn errors_in_directory_files_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ok.yaml"), res(AP, "rules:\n- {}\n")).unwrap();
    std::fs::write(
        dir.path().join("bad.yaml"),
        res(PA, "mtls:\n  mode: NOPE\n"),
    )
    .unwrap();
    let d = load_paths(&[dir.path()]).unwrap_err();
    let e: Vec<String> = d.errors().map(ToString::to_string).collect();
    assert_eq!(e.len(), 1, "{e:?}");
    let expected = format!(
        "{}:8: PeerAuthentication ns/p: spec.mtls.mode: unknown mode \"NOPE\"",
        dir.path().join("bad.yaml").display()
    );
    assert!(e[0].starts_with(&expected), "{e:?}");
}

#[test]
fn unreadable_path_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.yaml");
    let d = load_paths(&[&missing]).unwrap_err();
    let e: Vec<&Diagnostic> = d.errors().collect();
    assert_eq!(e.len(), 1);
    assert!(e[0].file.ends_with("missing.yaml"));
    assert!(e[0].message.starts_with("cannot read:"), "{}", e[0]);
    assert!(e[0].to_string().contains("missing.yaml"));
}

#[test]
fn invalid_utf8_file_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("bin.yaml"), b"a: \xff\xfe\n").unwrap();
    let d = load_paths(&[dir.path()]).unwrap_err();
    assert!(
        d.errors()
            .any(|e| e.message == "file is not valid UTF-8" && e.pos.line == 1),
        "{d}"
    );
}

/// A watcher tells an emptied file (no documents) from a deleted one (not
/// read at all) by what the loader read; `config_files` lists what
/// `add_path` reads (hidden entries, such as a Kubernetes volume's
/// `..data`, skipped; symbolic links followed).
#[test]
fn the_loader_counts_the_documents_of_each_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let policy = res(AP, "action: DENY\nrules: [{}]");
    std::fs::write(
        d.join("a.yaml"),
        format!("{policy}---\n{}", policy.replace("name: p", "name: q")),
    )
    .unwrap();
    std::fs::write(d.join("empty.yaml"), "").unwrap();
    std::fs::write(d.join("blank.yml"), "# nothing yet\n---\n\n...\n").unwrap();
    std::fs::write(d.join("notes.txt"), "not read").unwrap();
    std::fs::create_dir(d.join("..2026_01_01")).unwrap();
    std::fs::write(
        d.join("..2026_01_01/hidden.yaml"),
        policy.replace("name: p", "name: r"),
    )
    .unwrap();
    std::os::unix::fs::symlink("..2026_01_01", d.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/hidden.yaml", d.join("linked.yaml")).unwrap();
    let mesh = d.join("mesh.yaml");
    std::fs::write(&mesh, "# mesh settings to come\n").unwrap();

    let files = meshward_config::config_files(d).unwrap();
    let names: Vec<_> = files
        .iter()
        .map(|f| f.file_name().unwrap().to_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "a.yaml",
            "blank.yml",
            "empty.yaml",
            "linked.yaml",
            "mesh.yaml"
        ]
    );
    std::fs::remove_file(&mesh).unwrap();

    let mut l = Loader::new();
    l.add_path(d);
    let loaded = l.finish().unwrap();
    let count = |f: &str| {
        loaded
            .documents
            .get(&d.join(f).display().to_string())
            .copied()
    };
    assert_eq!(count("a.yaml"), Some(2));
    assert_eq!(count("empty.yaml"), Some(0));
    assert_eq!(count("blank.yml"), Some(0));
    assert_eq!(count("linked.yaml"), Some(1));
    assert_eq!(count("notes.txt"), None);
    assert_eq!(loaded.config.authorization_policies.len(), 3);

    let mut l = Loader::new();
    l.add_mesh_config_source("mesh.yaml", "# none yet\n");
    assert_eq!(l.finish().unwrap().documents["mesh.yaml"], 0);
}

#[test]
fn oversized_file_is_refused_without_reading_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("huge.yaml");
    let f = std::fs::File::create(&path).unwrap();
    // Sparse: no disk space used, but the size is over the limit.
    f.set_len(17 * 1024 * 1024).unwrap();
    let d = load_paths(&[dir.path()]).unwrap_err();
    assert!(
        d.errors()
            .any(|e| e.message.contains("file is larger than 16777216 bytes")),
        "{d}"
    );
}

/// Documents are decoded as they are parsed (one tree in memory at a
/// time); a file that turns out not to parse still reports only its
/// syntax error, not what its earlier documents said.
#[test]
fn a_file_that_does_not_parse_reports_only_its_syntax_error() {
    let mut l = Loader::new();
    l.add_source(
        "a.yaml",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a, namespace: n}\nspec: {bogus: 1}\n---\nkey: [unclosed\n",
    );
    let d = l.finish().unwrap_err();
    let all: Vec<_> = d.0.iter().collect();
    assert_eq!(all.len(), 1, "{d}");
    assert!(all[0].message.starts_with("invalid YAML"), "{d}");
}

/// A file whose size says nothing (a device, a pipe) is read only up to
/// the bound: `/dev/zero` would otherwise be read until memory runs out.
#[cfg(target_os = "linux")]
#[test]
fn an_endless_file_is_refused_after_the_bound() {
    let d = load_paths(&[std::path::Path::new("/dev/zero")]).unwrap_err();
    assert!(
        d.errors()
            .any(|e| e.message.contains("file is larger than 16777216 bytes")),
        "{d}"
    );
}

#[test]
fn mesh_config_block_source() {
    let mut l = Loader::new();
    l.add_mesh_config_source(
        "mesh.yaml",
        "rootNamespace: mesh-root\ntrustDomain: example.org\n",
    );
    let loaded = l.finish().unwrap();
    assert_eq!(loaded.config.mesh.root_namespace, "mesh-root");
    assert_eq!(loaded.config.mesh.trust_domain, "example.org");

    // A second mesh definition is refused, whichever way it comes.
    let mut l = Loader::new();
    l.add_mesh_config_source("mesh.yaml", "trustDomain: example.org\n");
    l.add_source("m.yaml", &res(MC, "trustDomain: other.org\n"));
    let d = l.finish().unwrap_err();
    assert!(
        d.errors().any(|e| e.to_string() == "m.yaml:1: mesh settings are already defined at mesh.yaml:1; only one MeshConfig is allowed"),
        "{d}"
    );

    let mut l = Loader::new();
    l.add_mesh_config_source("mesh.yaml", "trustDomain: [x\n");
    let d = l.finish().unwrap_err();
    assert!(
        d.errors().any(|e| e.message.starts_with("invalid YAML")),
        "{d}"
    );

    let mut l = Loader::new();
    l.add_mesh_config_source("mesh.yaml", "trustDomain: BAD\n");
    let d = l.finish().unwrap_err();
    assert!(
        d.errors().any(|e| e
            .to_string()
            .starts_with("mesh.yaml:1: meshConfig: trustDomain: ")),
        "{d}"
    );
}

fn mesh_file(text: &str) -> Result<Loaded, Diagnostics> {
    let mut l = Loader::new();
    l.add_mesh_config_source("mesh.yaml", text);
    l.finish()
}

fn only(d: &Diagnostics, severity: Severity) -> Vec<String> {
    d.0.iter()
        .filter(|x| x.severity == severity)
        .map(ToString::to_string)
        .collect()
}

/// `--mesh-config` takes the shapes users keep mesh settings in: a bare
/// `meshConfig` block, Helm values, or an IstioOperator.
#[test]
fn mesh_config_file_shapes() {
    let provider = "extensionProviders:\n- name: opa\n  envoyExtAuthzGrpc:\n    service: opa.istio-system.svc.cluster.local\n    port: 9191\n    timeout: 500ms\n";
    let check = |loaded: &Loaded| {
        let mesh = &loaded.config.mesh;
        assert_eq!(mesh.trust_domain, "example.org");
        let opa = mesh.provider("opa").expect("provider opa");
        assert_eq!(opa.port, Some(9191));
        assert_eq!(opa.authz.as_ref().unwrap().timeout_ms, 500);
    };

    // A bare block: no warning.
    let bare = format!("trustDomain: example.org\n{provider}");
    let loaded = mesh_file(&bare).unwrap_or_else(|d| panic!("{d}"));
    check(&loaded);
    assert!(loaded.warnings.0.is_empty(), "{}", loaded.warnings);

    // Helm values: the other top-level keys are skipped with one warning.
    let helm = format!(
        "global:\n  hub: docker.io/istio\npilot:\n  autoscaleEnabled: false\nmeshConfig:\n{}",
        indent(&format!("trustDomain: example.org\n{provider}"))
    );
    let loaded = mesh_file(&helm).unwrap_or_else(|d| panic!("{d}"));
    check(&loaded);
    assert_eq!(
        only(&loaded.warnings, Severity::Warning),
        [
            "mesh.yaml:1: warning: Helm values: skipped `global`, `pilot`: meshward reads only the mesh settings (meshConfig)"
        ]
    );

    // An IstioOperator: spec keys other than meshConfig are skipped with
    // one warning.
    let iop = format!(
        "apiVersion: install.istio.io/v1alpha1\nkind: IstioOperator\nmetadata:\n  name: control-plane\n  namespace: istio-system\nspec:\n  profile: default\n  components:\n    pilot:\n      enabled: true\n  values:\n    global:\n      meshID: mesh1\n  meshConfig:\n{}",
        indent(&indent(&format!("trustDomain: example.org\n{provider}")))
    );
    let loaded = mesh_file(&iop).unwrap_or_else(|d| panic!("{d}"));
    check(&loaded);
    assert_eq!(
        only(&loaded.warnings, Severity::Warning),
        [
            "mesh.yaml:7: warning: IstioOperator istio-system/control-plane: spec: skipped `profile`, `components`, `values`: meshward reads only the mesh settings (spec.meshConfig)"
        ]
    );

    // A bad field keeps its file, line and path in each shape.
    let bad = "extensionProviders:\n- name: opa\n  envoyExtAuthzGrpc:\n    service: opa\n    port: 9191\n    failOpen: \"no\"\n";
    let d = mesh_file(bad).unwrap_err();
    assert_eq!(
        only(&d, Severity::Error),
        [
            "mesh.yaml:6: meshConfig: extensionProviders[0].envoyExtAuthzGrpc.failOpen: expected true or false, found string"
        ]
    );
    let d = mesh_file(&format!("global: {{}}\nmeshConfig:\n{}", indent(bad))).unwrap_err();
    assert_eq!(
        only(&d, Severity::Error),
        [
            "mesh.yaml:8: Helm values: meshConfig.extensionProviders[0].envoyExtAuthzGrpc.failOpen: expected true or false, found string"
        ]
    );
    let d = mesh_file(&format!(
        "apiVersion: install.istio.io/v1alpha1\nkind: IstioOperator\nmetadata:\n  name: cp\nspec:\n  meshConfig:\n{}",
        indent(&indent(bad))
    ))
    .unwrap_err();
    assert_eq!(
        only(&d, Severity::Error),
        [
            "mesh.yaml:12: IstioOperator istio-system/cp: spec.meshConfig.extensionProviders[0].envoyExtAuthzGrpc.failOpen: expected true or false, found string"
        ]
    );

    // Mesh settings kept under spec.values are named, not read.
    let d = mesh_file(
        "apiVersion: install.istio.io/v1alpha1\nkind: IstioOperator\nspec:\n  values:\n    meshConfig:\n      trustDomain: example.org\n  meshConfig:\n    rootNamespace: mesh-root\n",
    )
    .unwrap();
    assert_eq!(d.config.mesh.trust_domain, "cluster.local");
    assert!(
        d.warnings.0.iter().any(|w| w
            .message
            .contains("`values.meshConfig` (put mesh settings in spec.meshConfig)")),
        "{}",
        d.warnings
    );

    // An IstioOperator without mesh settings, or another kind, is refused.
    let d = mesh_file(
        "apiVersion: install.istio.io/v1alpha1\nkind: IstioOperator\nmetadata:\n  name: cp\nspec:\n  profile: demo\n",
    )
    .unwrap_err();
    assert_eq!(
        only(&d, Severity::Error),
        [
            "mesh.yaml:6: IstioOperator istio-system/cp: spec.meshConfig: missing: the IstioOperator sets no mesh settings"
        ]
    );
    let d = mesh_file("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: istio\n").unwrap_err();
    assert!(
        only(&d, Severity::Error)[0].contains("found ConfigMap v1"),
        "{d}"
    );
}

#[test]
fn parse_bounds_hostile_input() {
    use meshward_config::yaml::parse_stream;
    let deep = "[".repeat(100_000);
    // saphyr's own recursion limit (at depth 256) or meshward's (64) stops it.
    let err = parse_stream(&deep).unwrap_err();
    assert!(
        err.message.contains("nesting") || err.message.contains("recursion limit"),
        "{err:?}"
    );
    let deep_map = (0..200)
        .map(|i| format!("{}k:\n", " ".repeat(i)))
        .collect::<String>();
    assert!(parse_stream(&deep_map).is_err());
    // A modest alias use is fine.
    let docs = parse_stream("a: &x [1, 2]\nb: *x\nc: *x\n").unwrap();
    assert_eq!(
        docs[0].root.get("c").unwrap().to_json(),
        serde_json::json!([1, 2])
    );
    // Aliases do not leak across documents.
    assert!(parse_stream("a: &x 1\n---\nb: *x\n").is_err());
}

// ------------------------------------------------------------------ valid input

#[test]
fn valid_resources_of_every_kind_load_with_their_values() {
    let text = r#"
apiVersion: meshward.io/v1alpha1
kind: MeshConfig
metadata:
  name: mesh
spec:
  rootNamespace: mesh-root
  trustDomain: example.org
  trustDomainAliases: [old.example.org]
  enableAutoMtls: false
  pathNormalization:
    normalization: MERGE_SLASHES
  workloadCertTtl: 24h
  extensionProviders:
  - name: ext
    envoyExtAuthzGrpc:
      service: ext.auth.svc.cluster.local
      port: 9000
---
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata:
  name: strict
  namespace: prod
  creationTimestamp: "2024-01-02T03:04:05Z"
spec:
  selector:
    matchLabels:
      app: web
  mtls:
    mode: STRICT
  portLevelMtls:
    8080:
      mode: PERMISSIVE
    "9090":
      mode: DISABLE
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-web
  namespace: prod
  labels:
    team: a
  annotations:
    istio.io/dry-run: "true"
spec:
  selector:
    matchLabels:
      app: web
  action: DENY
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/a/sa/b", "*-suffix"]
        notIpBlocks: ["10.0.0.0/8", "2001:db8::/32"]
    - source:
        serviceAccounts: ["sa", "other/sa2"]
        requestPrincipals: ["https://issuer/*"]
    to:
    - operation:
        hosts: ["*.example.com"]
        ports: ["8080", "0"]
        methods: ["GET", "P*"]
        paths: ["/api/{*}/items/{**}", "/public*"]
        notPaths: ["*.png"]
    when:
    - key: request.headers[X-Token]
      values: ["a"]
    - key: request.auth.claims[groups][name]
      notValues: ["guest"]
    - key: experimental.envoy.filters.network.mysql_proxy[db.table]
      values: ["[update]"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: ext
  namespace: prod
spec:
  action: CUSTOM
  provider:
    name: ext
  rules:
  - to:
    - operation:
        paths: ["/ext/*"]
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata:
  name: jwt
  namespace: prod
spec:
  jwtRules:
  - issuer: https://issuer.example
    audiences: [a, b]
    jwksUri: https://issuer.example:8443/keys
    fromHeaders:
    - name: x-jwt
      prefix: "Bearer "
    fromParams: [token]
    fromCookies: [session]
    outputPayloadToHeader: x-payload
    forwardOriginalToken: true
    outputClaimToHeaders:
    - header: x-sub
      claim: sub
    timeout: 1.5s
    spaceDelimitedClaims: [roles]
  - jwks: '{"keys": []}'
    issuer: other
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: dr
  namespace: prod
spec:
  host: web.prod.svc.cluster.local
  trafficPolicy:
    loadBalancer:
      simple: ROUND_ROBIN
    tls:
      mode: ISTIO_MUTUAL
    portLevelSettings:
    - port:
        number: 443
      tls:
        mode: MUTUAL
        clientCertificate: /c.pem
        privateKey: /k.pem
        sni: web.example
        subjectAltNames: [web]
  subsets:
  - name: v1
    labels:
      version: v1
    trafficPolicy:
      tls:
        mode: SIMPLE
        credentialName: cred
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: se
  namespace: prod
spec:
  hosts: [api.example.com]
  addresses: [192.0.2.0/24]
  ports:
  - number: 443
    name: https
    protocol: tls
    targetPort: 8443
  location: MESH_EXTERNAL
  resolution: STATIC
  endpoints:
  - address: 192.0.2.10
    ports:
      https: 8443
    labels:
      app: api
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: vm
  namespace: prod
spec:
  address: vm1.example.com
  ports:
    http: 8080
  labels:
    app: web
    example.com/tier: front
  network: net1
  locality: us-east/1
  weight: 10
  serviceAccount: web
---
apiVersion: v1
kind: List
items:
- apiVersion: security.istio.io/v1
  kind: PeerAuthentication
  metadata:
    name: ns-wide
    namespace: prod
  spec:
    mtls: {}
"#;
    let loaded = load(text).unwrap_or_else(|d| panic!("{d}"));
    // Only the `experimental.*` key meshward cannot evaluate is worth a word.
    assert!(
        loaded
            .warnings
            .0
            .iter()
            .all(|w| w.message.contains("cannot evaluate \"experimental.")),
        "{}",
        loaded.warnings
    );
    let c = &loaded.config;

    // MeshConfig
    assert_eq!(c.mesh.root_namespace, "mesh-root");
    assert_eq!(c.mesh.trust_domain, "example.org");
    assert_eq!(c.mesh.trust_domain_aliases, ["old.example.org"]);
    assert!(!c.mesh.enable_auto_mtls);
    assert_eq!(c.mesh.path_normalization, PathNormalization::MergeSlashes);
    assert_eq!(c.mesh.workload_cert_ttl.as_deref(), Some("24h"));
    let ext = c.mesh.provider("ext").unwrap();
    assert!(ext.is_authz());
    assert_eq!(ext.kind, "envoyExtAuthzGrpc");
    assert_eq!(ext.service.as_deref(), Some("ext.auth.svc.cluster.local"));
    assert_eq!(ext.port, Some(9000));

    // PeerAuthentication
    assert_eq!(c.peer_authentications.len(), 2);
    let pa = &c.peer_authentications[0];
    assert_eq!(pa.key(), "prod/strict");
    assert_eq!(
        pa.meta.creation_timestamp.as_deref(),
        Some("2024-01-02T03:04:05Z")
    );
    assert_eq!(pa.spec.mode(), MtlsMode::Strict);
    assert_eq!(
        pa.spec.selector.as_ref().unwrap().match_labels["app"],
        "web"
    );
    assert_eq!(
        pa.spec.port_level_mtls.get(&8080),
        Some(&MtlsMode::Permissive)
    );
    assert_eq!(pa.spec.port_level_mtls.get(&9090), Some(&MtlsMode::Disable));
    assert_eq!(pa.origin.line, 20);
    let ns_wide = &c.peer_authentications[1];
    assert_eq!(ns_wide.key(), "prod/ns-wide");
    assert_eq!(ns_wide.spec.mode(), MtlsMode::Unset);
    assert!(ns_wide.spec.selector.is_none());
    assert!(pa.is_older_than(ns_wide));

    // AuthorizationPolicy
    assert_eq!(c.authorization_policies.len(), 2);
    let ap = &c.authorization_policies[0];
    assert_eq!(ap.meta.labels["team"], "a");
    assert_eq!(ap.meta.annotations["istio.io/dry-run"], "true");
    assert_eq!(ap.spec.action, Action::Deny);
    assert_eq!(ap.spec.rules.len(), 1);
    let rule = &ap.spec.rules[0];
    assert_eq!(rule.from.len(), 2);
    assert_eq!(
        rule.from[0].principals,
        ["cluster.local/ns/a/sa/b", "*-suffix"]
    );
    assert_eq!(rule.from[0].not_ip_blocks, ["10.0.0.0/8", "2001:db8::/32"]);
    assert_eq!(rule.from[1].service_accounts, ["sa", "other/sa2"]);
    assert_eq!(rule.from[1].request_principals, ["https://issuer/*"]);
    let op = &rule.to[0];
    assert_eq!(op.hosts, ["*.example.com"]);
    assert_eq!(op.ports, ["8080", "0"]);
    assert_eq!(op.methods, ["GET", "P*"]);
    assert_eq!(op.paths, ["/api/{*}/items/{**}", "/public*"]);
    assert_eq!(op.not_paths, ["*.png"]);
    assert_eq!(rule.when.len(), 3);
    assert_eq!(rule.when[0].key_text, "request.headers[X-Token]");
    assert_eq!(
        rule.when[0].key,
        meshward_config::values::ConditionKey::RequestHeader("x-token".into())
    );
    assert_eq!(
        rule.when[1].key,
        meshward_config::values::ConditionKey::RequestAuthClaims(vec![
            "groups".into(),
            "name".into()
        ])
    );
    assert_eq!(rule.when[1].not_values, ["guest"]);
    assert!(ap.spec.uses_jwt());
    let custom = &c.authorization_policies[1];
    assert_eq!(custom.spec.action, Action::Custom);
    assert_eq!(custom.spec.provider.as_deref(), Some("ext"));

    // RequestAuthentication
    let ra = &c.request_authentications[0].spec;
    assert_eq!(ra.jwt_rules.len(), 2);
    let j = &ra.jwt_rules[0];
    assert_eq!(j.issuer, "https://issuer.example");
    assert_eq!(j.audiences, ["a", "b"]);
    assert_eq!(
        j.jwks_uri.as_deref(),
        Some("https://issuer.example:8443/keys")
    );
    assert_eq!(j.from_headers[0].name, "x-jwt");
    assert_eq!(j.from_headers[0].prefix, "Bearer ");
    assert_eq!(j.from_params, ["token"]);
    assert_eq!(j.from_cookies, ["session"]);
    assert_eq!(j.output_payload_to_header.as_deref(), Some("x-payload"));
    assert!(j.forward_original_token);
    assert_eq!(j.output_claim_to_headers[0].header, "x-sub");
    assert_eq!(j.timeout.as_deref(), Some("1.5s"));
    assert_eq!(j.space_delimited_claims, ["roles"]);
    assert_eq!(ra.jwt_rules[1].jwks.as_deref(), Some("{\"keys\": []}"));

    // DestinationRule
    let dr = &c.destination_rules[0].spec;
    assert_eq!(dr.host, "web.prod.svc.cluster.local");
    let tp = dr.traffic_policy.as_ref().unwrap();
    assert_eq!(tp.tls.as_ref().unwrap().mode, TlsMode::IstioMutual);
    assert_eq!(tp.port_level_settings[0].port, 443);
    let tls = tp.port_level_settings[0].tls.as_ref().unwrap();
    assert_eq!(tls.mode, TlsMode::Mutual);
    assert_eq!(tls.client_certificate.as_deref(), Some("/c.pem"));
    assert_eq!(tls.sni.as_deref(), Some("web.example"));
    assert_eq!(tls.subject_alt_names, ["web"]);
    assert_eq!(dr.subsets[0].name, "v1");
    assert_eq!(dr.subsets[0].labels["version"], "v1");
    let sub_tls = dr.subsets[0]
        .traffic_policy
        .as_ref()
        .unwrap()
        .tls
        .as_ref()
        .unwrap();
    assert_eq!(sub_tls.mode, TlsMode::Simple);
    assert_eq!(sub_tls.credential_name.as_deref(), Some("cred"));

    // ServiceEntry
    let se = &c.service_entries[0].spec;
    assert_eq!(se.hosts, ["api.example.com"]);
    assert_eq!(se.addresses, ["192.0.2.0/24"]);
    assert_eq!(se.ports[0].number, 443);
    assert_eq!(se.ports[0].protocol.as_deref(), Some("TLS"));
    assert_eq!(se.ports[0].target_port, Some(8443));
    assert!(!se.ports[0].is_http());
    assert_eq!(se.location.as_deref(), Some("MESH_EXTERNAL"));
    assert_eq!(se.resolution.as_deref(), Some("STATIC"));
    assert_eq!(se.endpoints[0].address.as_deref(), Some("192.0.2.10"));
    assert_eq!(se.endpoints[0].ports["https"], 8443);

    // WorkloadEntry
    let we = &c.workload_entries[0].spec;
    assert_eq!(we.address.as_deref(), Some("vm1.example.com"));
    assert_eq!(we.ports["http"], 8080);
    assert_eq!(we.labels["example.com/tier"], "front");
    assert_eq!(we.network.as_deref(), Some("net1"));
    assert_eq!(we.locality.as_deref(), Some("us-east/1"));
    assert_eq!(we.weight, Some(10));
    assert_eq!(we.service_account.as_deref(), Some("web"));

    let counts = c.counts();
    assert_eq!(counts.len(), 6);
}

#[test]
fn defaults_when_fields_are_absent() {
    let loaded = load(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: p\n---\n\
         apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: p\nspec:\n  mtls:\n    mode: UNSET\n",
    )
    .unwrap();
    let c = &loaded.config;
    let ap = &c.authorization_policies[0];
    assert_eq!(ap.meta.namespace, "default");
    assert_eq!(ap.spec.action, Action::Allow);
    assert!(ap.spec.rules.is_empty());
    assert!(ap.spec.selector.is_none());
    assert_eq!(c.peer_authentications[0].spec.mode(), MtlsMode::Unset);
    assert_eq!(c.mesh.root_namespace, "istio-system");
    assert_eq!(c.mesh.trust_domain, "cluster.local");
    assert_eq!(c.mesh.path_normalization, PathNormalization::Base);
}

/// `connectionPool.tcp.connectTimeout` of a DestinationRule (its own and
/// per port) and `meshConfig.connectTimeout` (10 s unless set), decoded
/// to what the proxy uses; no warning for `connectTimeout` alone.
#[test]
fn connect_timeouts_are_decoded() {
    use std::time::Duration;
    let dr = res(
        DR,
        "host: web.prod.svc.cluster.local\ntrafficPolicy:\n  connectionPool:\n    tcp:\n      connectTimeout: 1.5s\n  portLevelSettings:\n  - port: {number: 8080}\n    connectionPool:\n      tcp: {connectTimeout: 250ms}\n  - port: {number: 9090}\n    connectionPool:\n      http: {}\n",
    );
    let loaded = load(&dr).unwrap();
    assert!(
        loaded.warnings.warnings().next().is_none(),
        "{}",
        render(&loaded.warnings)
    );
    let c = &loaded.config;
    assert_eq!(c.mesh.connect_timeout, Duration::from_secs(10));
    let tp = c.destination_rules[0].spec.traffic_policy.as_ref().unwrap();
    let of =
        |p: &Option<meshward_config::model::ConnectionPool>| p.as_ref().unwrap().connect_timeout;
    assert_eq!(of(&tp.connection_pool), Some(Duration::from_millis(1500)));
    assert_eq!(
        of(&tp.port_level_settings[0].connection_pool),
        Some(Duration::from_millis(250))
    );
    assert_eq!(of(&tp.port_level_settings[1].connection_pool), None);

    let mesh = load(&res(MC, "connectTimeout: 750ms\n")).unwrap();
    assert_eq!(mesh.config.mesh.connect_timeout, Duration::from_millis(750));
    assert!(
        mesh.warnings.warnings().next().is_none(),
        "{}",
        render(&mesh.warnings)
    );
    let hour = load(&res(MC, "connectTimeout: 1h\n")).unwrap();
    assert_eq!(hour.config.mesh.connect_timeout, Duration::from_secs(3600));
}

#[test]
fn dry_run_values_accepted_as_go_parse_bool() {
    for v in [
        "1", "t", "T", "TRUE", "true", "True", "0", "f", "F", "FALSE", "false", "False",
    ] {
        let text = format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: p\n  annotations:\n    istio.io/dry-run: \"{v}\"\nspec:\n  action: DENY\n  rules:\n  - {{}}\n"
        );
        assert!(load(&text).is_ok(), "{v}");
    }
}

#[test]
fn duplicates_are_per_kind_and_namespace() {
    let pa = res(PA, "mtls:\n  mode: STRICT\n");
    let ap = res(AP, "rules:\n- {}\n");
    let other_ns = pa.replace("namespace: ns", "namespace: other");
    let loaded = load(&format!("{pa}---\n{ap}---\n{other_ns}")).unwrap();
    assert!(loaded.warnings.0.is_empty(), "{}", loaded.warnings);
    assert_eq!(loaded.config.peer_authentications.len(), 2);
}

/// Two definitions of one resource: `kubectl apply` of both files leaves
/// the later content on the object the earlier one created. meshward keeps
/// the later definition and warns, naming both places.
#[test]
fn a_resource_defined_twice_is_replaced_by_the_later_definition() {
    let strict = res(PA, "mtls:\n  mode: STRICT\n");
    let disable = res(PA, "mtls:\n  mode: DISABLE\n");
    let mut l = Loader::new();
    l.add_source("one.yaml", &strict);
    l.add_source("two.yaml", &disable);
    let loaded = l.finish().unwrap_or_else(|d| panic!("{d}"));
    let pas = &loaded.config.peer_authentications;
    assert_eq!(pas.len(), 1);
    assert_eq!(pas[0].spec.mode(), MtlsMode::Disable);
    assert_eq!(&*pas[0].origin.file, "two.yaml");
    let warnings: Vec<String> = loaded
        .warnings
        .warnings()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        warnings,
        [
            "two.yaml:1: warning: PeerAuthentication ns/p: metadata.name: PeerAuthentication ns/p is also defined at one.yaml:1; this definition replaces that one, as `kubectl apply` of both would"
        ]
    );
}

/// The object `kubectl apply` updates keeps its creation time, so a
/// replaced resource keeps the age of the first definition when ties
/// between policies are broken.
#[test]
fn a_replaced_resource_keeps_the_age_of_the_first_definition() {
    let named = |name: &str, mode: &str| {
        res(PA, &format!("mtls:\n  mode: {mode}\n")).replace("name: p", &format!("name: {name}"))
    };
    let text = format!(
        "{}---\n{}---\n{}",
        named("a", "STRICT"),
        named("b", "PERMISSIVE"),
        named("a", "DISABLE")
    );
    let loaded = load(&text).unwrap_or_else(|d| panic!("{d}"));
    let pas = &loaded.config.peer_authentications;
    let a = pas.iter().find(|p| p.meta.name == "a").unwrap();
    let b = pas.iter().find(|p| p.meta.name == "b").unwrap();
    assert_eq!(a.spec.mode(), MtlsMode::Disable);
    assert!(a.is_older_than(b), "a was created first");
    assert!(!b.is_older_than(a));
    // A creation timestamp of the first definition stays too.
    let stamped = named("a", "STRICT").replace(
        "metadata:\n",
        "metadata:\n  creationTimestamp: \"2020-01-01T00:00:00Z\"\n",
    );
    let text = format!(
        "{stamped}---\n{}---\n{}",
        named("b", "PERMISSIVE").replace(
            "metadata:\n",
            "metadata:\n  creationTimestamp: \"2021-01-01T00:00:00Z\"\n"
        ),
        named("a", "DISABLE").replace(
            "metadata:\n",
            "metadata:\n  creationTimestamp: \"2022-01-01T00:00:00Z\"\n"
        )
    );
    let loaded = load(&text).unwrap_or_else(|d| panic!("{d}"));
    let pas = &loaded.config.peer_authentications;
    let a = pas.iter().find(|p| p.meta.name == "a").unwrap();
    let b = pas.iter().find(|p| p.meta.name == "b").unwrap();
    assert_eq!(a.spec.mode(), MtlsMode::Disable);
    assert!(a.is_older_than(b));
}

// ------------------------------------------------------------------ accepted with a warning

/// Input Istio applies but meshward used to refuse: it loads, with a
/// warning that names the file, the line and the field, and is decided as
/// Istio decides it (see `crates/policy/tests/matching.rs`).
#[test]
fn accepted_with_a_warning() {
    let iss = "jwtRules:\n- issuer: https://issuer.example\n";
    let h = "host: svc.ns.svc.cluster.local\n";
    let ext = "extensionProviders:\n";
    let rows = vec![
        row(
            "lower-case method",
            res(
                AP,
                "rules:\n- to:\n  - operation:\n      methods: [\"GET\", \"get\"]\n",
            ),
            "spec.rules[0].to[0].operation.methods[1]",
            "\"get\" never matches: methods are case-sensitive and requests use upper case",
            Some(10),
        ),
        row(
            "lower-case notMethod",
            res(
                AP,
                "action: DENY\nrules:\n- to:\n  - operation:\n      notMethods: [\"post\"]\n",
            ),
            "spec.rules[0].to[0].operation.notMethods[0]",
            "\"post\" never matches",
            Some(11),
        ),
        row(
            "method with a space",
            res(
                AP,
                "rules:\n- to:\n  - operation:\n      methods: [\"GE T\"]\n",
            ),
            "spec.rules[0].to[0].operation.methods[0]",
            "it is not an HTTP method",
            Some(10),
        ),
        row(
            "method with a middle star",
            res(
                AP,
                "rules:\n- to:\n  - operation:\n      methods: [\"G*T\"]\n",
            ),
            "spec.rules[0].to[0].operation.methods[0]",
            "here it is a literal character, as in Istio",
            Some(10),
        ),
        row(
            "principal with a middle star",
            res(
                AP,
                "rules:\n- from:\n  - source:\n      principals:\n      - a\n      - cluster.local/ns/*/sa/x\n",
            ),
            "spec.rules[0].from[0].source.principals[1]",
            "matches only the exact text \"cluster.local/ns/*/sa/x\"",
            Some(12),
        ),
        row(
            "notPrincipal with a second star",
            res(
                AP,
                "action: DENY\nrules:\n- from:\n  - source:\n      notPrincipals: [\"*/ns/*\"]\n",
            ),
            "spec.rules[0].from[0].source.notPrincipals[0]",
            "only the leading '*' is a wildcard",
            Some(11),
        ),
        row(
            "request principal with a middle star",
            res(
                AP,
                "rules:\n- from:\n  - source:\n      requestPrincipals: [\"https://iss*/sub\"]\n",
            ),
            "spec.rules[0].from[0].source.requestPrincipals[0]",
            "literal character",
            Some(10),
        ),
        row(
            "host with a middle star",
            res(
                AP,
                "rules:\n- to:\n  - operation:\n      notHosts: [\"a.*.com\"]\n",
            ),
            "spec.rules[0].to[0].operation.notHosts[0]",
            "literal character",
            Some(10),
        ),
        row(
            "path with a middle star",
            res(
                AP,
                "rules:\n- to:\n  - operation:\n      paths: [\"/api/*/items\"]\n",
            ),
            "spec.rules[0].to[0].operation.paths[0]",
            "matches only the exact text \"/api/*/items\"",
            Some(10),
        ),
        row(
            "source.principal condition with a middle star",
            res(
                AP,
                "rules:\n- when:\n  - key: source.principal\n    values: [\"a*b\"]\n",
            ),
            "spec.rules[0].when[0].values[0]",
            "literal character",
            Some(10),
        ),
        row(
            "empty from",
            res(
                AP,
                "rules:\n- from: []\n  to:\n  - operation:\n      paths: [\"/x\"]\n",
            ),
            "spec.rules[0].from",
            "an empty `from` is ignored, as in Istio: the rule matches any source",
            Some(8),
        ),
        row(
            "empty to",
            res(AP, "action: DENY\nrules:\n- to: []\n"),
            "spec.rules[0].to",
            "an empty `to` is ignored, as in Istio: the rule matches any operation",
            Some(9),
        ),
        row(
            "header key Istio cannot translate",
            res(
                AP,
                "rules:\n- when:\n  - key: request.headersX[a]\n    values: [\"x\"]\n",
            ),
            "spec.rules[0].when[0].key",
            "Istio cannot translate \"request.headersX[a]\"",
            Some(9),
        ),
        row(
            "experimental key",
            res(
                AP,
                "action: DENY\nrules:\n- when:\n  - key: experimental.envoy.filters.a.b[c]\n    values: [\"x\"]\n",
            ),
            "spec.rules[0].when[0].key",
            "meshward cannot evaluate",
            Some(10),
        ),
        row(
            "jwksUri without host",
            res(RA, &format!("{iss}  jwksUri: https:///keys\n")),
            "spec.jwtRules[0].jwksUri",
            "has no host: its keys can never be fetched, so tokens of this issuer are always refused (401)",
            Some(9),
        ),
        row(
            "jwksUri without //",
            res(
                RA,
                &format!("{iss}  jwksUri: \"https:issuer.example/keys\"\n"),
            ),
            "spec.jwtRules[0].jwksUri",
            "has no host",
            Some(9),
        ),
        row(
            "jwksUri with a port out of range",
            res(
                RA,
                &format!("{iss}  jwksUri: https://issuer.example:99999/keys\n"),
            ),
            "spec.jwtRules[0].jwksUri",
            "port 99999 is out of range",
            Some(9),
        ),
        row(
            "portLevelSettings port without number",
            res(
                DR,
                &format!("{h}trafficPolicy:\n  portLevelSettings:\n  - port: {{}}\n"),
            ),
            "spec.trafficPolicy.portLevelSettings[0].port.number",
            "port 0 is no service port (1-65535), so these settings never apply",
            Some(10),
        ),
        row(
            "portLevelSettings port 70000",
            res(
                DR,
                &format!(
                    "{h}trafficPolicy:\n  portLevelSettings:\n  - port:\n      number: 70000\n"
                ),
            ),
            "spec.trafficPolicy.portLevelSettings[0].port.number",
            "port 70000 is no service port",
            Some(11),
        ),
        row(
            "portLevelSettings duplicate port",
            res(
                DR,
                &format!(
                    "{h}trafficPolicy:\n  portLevelSettings:\n  - port:\n      number: 80\n  - port:\n      number: 80\n"
                ),
            ),
            "spec.trafficPolicy.portLevelSettings[1].port",
            "port 80 is already listed at spec.trafficPolicy.portLevelSettings[0]; as in Istio, only that first entry applies",
            Some(12),
        ),
        row(
            "root namespace no namespace can have",
            res(MC, "rootNamespace: Istio_System\n"),
            "spec.rootNamespace",
            "not a valid namespace (a DNS label: lower-case alphanumerics and '-', at most 63 characters): no namespace has this name, so no policy applies mesh-wide",
            Some(7),
        ),
        row(
            "service account that is no Kubernetes name",
            res(WE, "address: 10.0.0.1\nserviceAccount: Batch_Runner\n"),
            "spec.serviceAccount",
            "kept as written, as in Istio, so the workload's identity ends in /sa/Batch_Runner",
            Some(7),
        ),
        row(
            "unknown mesh field",
            res(MC, "rootNamespce: x\n"),
            "spec",
            "unknown field \"rootNamespce\" ignored: Istio ignores mesh settings it does not know",
            Some(7),
        ),
        row(
            "unknown pathNormalization field",
            res(MC, "pathNormalization:\n  mode: BASE\n"),
            "spec.pathNormalization",
            "unknown field \"mode\" ignored",
            Some(8),
        ),
        row(
            "unknown ext authz field",
            res(
                MC,
                &format!(
                    "{ext}- name: ext\n  envoyExtAuthzHttp:\n    service: a\n    port: 9000\n    headersToUpstreamOnAlow: [x-user]\n"
                ),
            ),
            "spec.extensionProviders[0].envoyExtAuthzHttp",
            "unknown field \"headersToUpstreamOnAlow\" ignored",
            Some(12),
        ),
        row(
            "duplicate provider",
            res(
                MC,
                &format!(
                    "{ext}- name: ext\n  envoyExtAuthzGrpc:\n    service: a.ns.svc.cluster.local\n    port: 9000\n- name: ext\n  envoyExtAuthzGrpc:\n    service: b.ns.svc.cluster.local\n    port: 9000\n"
                ),
            ),
            "spec.extensionProviders[1].name",
            "is also defined at spec.extensionProviders[0]; this definition replaces that one, as in Istio",
            Some(12),
        ),
        row(
            "provider without name",
            res(
                MC,
                &format!("{ext}- envoyExtAuthzGrpc:\n    service: a\n    port: 9000\n"),
            ),
            "spec.extensionProviders[0].name",
            "name must not be empty; as in Istio, extension provider \"\" cannot be used",
            Some(8),
        ),
        row(
            "provider name Istio refuses",
            res(
                MC,
                &format!(
                    "{ext}- name: My_Authz\n  envoyExtAuthzGrpc:\n    service: a\n    port: 9000\n"
                ),
            ),
            "spec.extensionProviders[0].name",
            "is not valid",
            Some(8),
        ),
        row(
            "provider without type",
            res(MC, &format!("{ext}- name: ext\n")),
            "spec.extensionProviders[0]",
            "sets no provider type; as in Istio, extension provider \"ext\" cannot be used, and requests to workloads whose CUSTOM policies name it are denied",
            Some(8),
        ),
        row(
            "ext authz without service",
            res(
                MC,
                &format!("{ext}- name: ext\n  envoyExtAuthzHttp:\n    port: 9000\n"),
            ),
            "spec.extensionProviders[0].envoyExtAuthzHttp.service",
            "service is required; as in Istio",
            Some(10),
        ),
        row(
            "ext authz without port",
            res(
                MC,
                &format!("{ext}- name: ext\n  envoyExtAuthzGrpc:\n    service: a\n"),
            ),
            "spec.extensionProviders[0].envoyExtAuthzGrpc.port",
            "port is required (1-65535); as in Istio",
            Some(10),
        ),
        row(
            "ext authz with port 70000",
            res(
                MC,
                &format!(
                    "{ext}- name: ext\n  envoyExtAuthzGrpc:\n    service: a\n    port: 70000\n"
                ),
            ),
            "spec.extensionProviders[0].envoyExtAuthzGrpc.port",
            "port 70000 is out of range (1-65535)",
            Some(11),
        ),
        row(
            "ext authz status on error",
            res(
                MC,
                &format!(
                    "{ext}- name: ext\n  envoyExtAuthzGrpc:\n    service: a\n    port: 9000\n    statusOnError: \"forbidden\"\n"
                ),
            ),
            "spec.extensionProviders[0].envoyExtAuthzGrpc.statusOnError",
            "not an HTTP status code",
            Some(12),
        ),
        row(
            "ext authz path prefix",
            res(
                MC,
                &format!(
                    "{ext}- name: ext\n  envoyExtAuthzHttp:\n    service: a\n    port: 9000\n    pathPrefix: check\n"
                ),
            ),
            "spec.extensionProviders[0].envoyExtAuthzHttp.pathPrefix",
            "must start with /",
            Some(12),
        ),
        row(
            "ext authz header list with a lone star",
            res(
                MC,
                &format!(
                    "{ext}- name: ext\n  envoyExtAuthzHttp:\n    service: a\n    port: 9000\n    includeRequestHeadersInCheck: [\"*\"]\n"
                ),
            ),
            "spec.extensionProviders[0].envoyExtAuthzHttp.includeRequestHeadersInCheck[0]",
            "a single \"*\" is not supported",
            Some(12),
        ),
        row(
            "ext authz header name",
            res(
                MC,
                &format!(
                    "{ext}- name: ext\n  envoyExtAuthzHttp:\n    service: a\n    port: 9000\n    headersToDownstreamOnDeny: [\"bad header\"]\n"
                ),
            ),
            "spec.extensionProviders[0].envoyExtAuthzHttp.headersToDownstreamOnDeny[0]",
            "never matches a header",
            Some(12),
        ),
        row(
            "gRPC ext authz has no header lists",
            res(
                MC,
                &format!(
                    "{ext}- name: ext\n  envoyExtAuthzGrpc:\n    service: a\n    port: 9000\n    pathPrefix: /check\n"
                ),
            ),
            "spec.extensionProviders[0].envoyExtAuthzGrpc",
            "unknown field \"pathPrefix\" ignored",
            Some(12),
        ),
        row(
            "connectionPool settings meshward does not act on",
            res(
                DR,
                &format!(
                    "{h}trafficPolicy:\n  connectionPool:\n    tcp:\n      connectTimeout: 250ms\n      maxConnections: 100\n      idleTimeout: 0s\n    http:\n      http2KeepAlive: {{interval: 1s, timeout: 2s}}\n"
                ),
            ),
            "spec.trafficPolicy.connectionPool",
            "these settings are accepted and have no effect: tcp.maxConnections, tcp.idleTimeout, http.http2KeepAlive",
            Some(10),
        ),
    ];
    check_warning_rows(rows);
}

fn check_warning_rows(rows: Vec<Row>) {
    let mut failures = Vec::new();
    for r in &rows {
        match load(&r.yaml) {
            Err(d) => failures.push(format!("{}: refused:\n{}", r.name, render(&d))),
            Ok(loaded) => {
                let hit = loaded
                    .warnings
                    .warnings()
                    .find(|w| names(w, r.field, r.keyword));
                match (hit, r.line) {
                    (None, _) => failures.push(format!(
                        "{}: no warning with field {:?} and keyword {:?}; got:\n{}",
                        r.name,
                        r.field,
                        r.keyword,
                        render(&loaded.warnings)
                    )),
                    (Some(w), Some(line)) => {
                        let prefix = format!("test.yaml:{line}: warning: ");
                        if w.pos.line != line || !w.to_string().starts_with(&prefix) {
                            failures.push(format!("{}: expected line {line}: {w}", r.name));
                        }
                    }
                    (Some(_), None) => {}
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} rows failed:\n{}",
        failures.len(),
        rows.len(),
        failures.join("\n")
    );
}

/// What the warned values become: kept as written, so the policy engine
/// matches them as Istio does; empty `from`/`to` read as absent; a port
/// entry that never applies, or a second one for a port, is left out.
#[test]
fn warned_values_are_kept_as_istio_reads_them() {
    let text = res(
        AP,
        "rules:\n- from: []\n  to:\n  - operation:\n      methods: [\"get\", \"G*T\"]\n      hosts: [\"a.*.com\"]\n      paths: [\"/api/*/x\"]\n- when:\n  - key: request.headers[a][b]\n    values: [\"v\"]\n  - key: request.auth.claims[a][]\n    notValues: [\"v\"]\n",
    );
    let loaded = load(&text).unwrap_or_else(|d| panic!("{d}"));
    let rules = &loaded.config.authorization_policies[0].spec.rules;
    assert!(rules[0].from.is_empty());
    let op = &rules[0].to[0];
    assert_eq!(op.methods, ["get", "G*T"]);
    assert_eq!(op.hosts, ["a.*.com"]);
    assert_eq!(op.paths, ["/api/*/x"]);
    use meshward_config::values::ConditionKey;
    assert_eq!(
        rules[1].when[0].key,
        ConditionKey::RequestHeader("a][b".into())
    );
    assert_eq!(
        rules[1].when[1].key,
        ConditionKey::RequestAuthClaims(vec!["a".into(), String::new()])
    );

    let dr = res(
        DR,
        "host: a\ntrafficPolicy:\n  portLevelSettings:\n  - port: {number: 0}\n    tls: {mode: SIMPLE}\n  - port: {number: 80}\n    tls: {mode: DISABLE}\n  - port: {number: 80}\n    tls: {mode: ISTIO_MUTUAL}\n",
    );
    let loaded = load(&dr).unwrap_or_else(|d| panic!("{d}"));
    let tp = loaded.config.destination_rules[0]
        .spec
        .traffic_policy
        .as_ref()
        .unwrap();
    assert_eq!(tp.port_level_settings.len(), 1);
    assert_eq!(tp.port_level_settings[0].port, 80);
    assert_eq!(
        tp.port_level_settings[0].tls.as_ref().unwrap().mode,
        TlsMode::Disable
    );

    // Header names as Istio takes them: `_` in a claim header, any token
    // for the payload header.
    let ra = res(
        RA,
        "jwtRules:\n- issuer: https://issuer.example\n  outputPayloadToHeader: x_jwt.payload\n  outputClaimToHeaders:\n  - header: x_sub\n    claim: sub\n",
    );
    let loaded = load(&ra).unwrap_or_else(|d| panic!("{d}"));
    assert!(loaded.warnings.0.is_empty(), "{}", loaded.warnings);

    // The scheme of a jwksUri is read as Go reads it: in any case.
    let ra = res(
        RA,
        "jwtRules:\n- issuer: https://issuer.example\n  jwks_uri: HTTPS://issuer.example/keys\n",
    );
    let loaded = load(&ra).unwrap_or_else(|d| panic!("{d}"));
    assert!(loaded.warnings.0.is_empty(), "{}", loaded.warnings);
    assert_eq!(
        loaded.config.request_authentications[0].spec.jwt_rules[0]
            .jwks_uri
            .as_deref(),
        Some("https://issuer.example/keys")
    );

    // Extension providers: a later definition replaces an earlier one; one
    // with a problem is left out and remembered as unusable.
    let mc = res(
        MC,
        "extensionProviders:\n- name: a\n  envoyExtAuthzGrpc: {service: one, port: 9000}\n- name: b\n  envoyExtAuthzGrpc: {service: x}\n- name: a\n  envoyExtAuthzGrpc: {service: two, port: 9001}\n",
    );
    let loaded = load(&mc).unwrap_or_else(|d| panic!("{d}"));
    let mesh = &loaded.config.mesh;
    assert_eq!(mesh.extension_providers.len(), 1);
    assert_eq!(mesh.provider("a").unwrap().service.as_deref(), Some("two"));
    assert!(mesh.provider("b").is_none());
    assert_eq!(
        mesh.invalid_providers.get("b").map(String::as_str),
        Some("port is required (1-65535)")
    );
}

// ------------------------------------------------------------------ divergences from Istio

/// Istio `ValidateTLS`: for SIMPLE *or* MUTUAL, once `credentialName` is set,
/// none of clientCertificate, caCertificates, privateKey or caCrl may be set
/// ("cannot specify client certificates or CA certificate or CA CRL If
/// credentialName is set"). meshward only checks MUTUAL.
#[test]
fn regression_simple_tls_credential_name_with_ca_certificates_is_accepted() {
    let text = res(
        DR,
        "host: a\ntrafficPolicy:\n  tls:\n    mode: SIMPLE\n    credentialName: cred\n    caCertificates: /ca.pem\n",
    );
    let result = load(&text);
    assert!(
        result.is_err(),
        "SIMPLE + credentialName + caCertificates must be rejected as in Istio's ValidateTLS"
    );
}

/// Same rule: `caCrl` is part of the exclusion with `credentialName`.
#[test]
fn regression_mutual_tls_credential_name_with_ca_crl_is_accepted() {
    let text = res(
        DR,
        "host: a\ntrafficPolicy:\n  tls:\n    mode: MUTUAL\n    credentialName: cred\n    caCrl: /crl.pem\n",
    );
    assert!(
        load(&text).is_err(),
        "MUTUAL + credentialName + caCrl must be rejected as in Istio's ValidateTLS"
    );
}

/// Istio `ValidateDuration`: "only durations to ms precision are supported".
#[test]
fn regression_sub_millisecond_timeout_is_accepted() {
    let text = res(
        RA,
        "jwtRules:\n- issuer: https://issuer.example\n  timeout: 1500us\n",
    );
    assert!(
        load(&text).is_err(),
        "a 1.5ms timeout must be rejected (ms precision only)"
    );
}

/// `namespaces` accepts `*` anywhere (Istio turns each into `.*`, and the
/// code says so in `check_namespace_value`), but the equivalent `when` key
/// `source.namespace` refuses the same value.
#[test]
fn regression_source_namespace_condition_rejects_inner_wildcard_that_namespaces_accepts() {
    let in_source = res(
        AP,
        "rules:\n- from:\n  - source:\n      namespaces: [\"team-*-prod\"]\n",
    );
    assert!(load(&in_source).is_ok());
    let in_when = res(
        AP,
        "rules:\n- when:\n  - key: source.namespace\n    values: [\"team-*-prod\"]\n",
    );
    assert!(load(&in_when).is_ok(), "{}", load(&in_when).unwrap_err());
}

#[test]
fn ext_authz_settings_are_decoded() {
    let text = "apiVersion: meshward.io/v1alpha1\nkind: MeshConfig\nmetadata: {name: mesh, namespace: istio-system}\nspec:\n  extensionProviders:\n  - name: http\n    envoyExtAuthzHttp:\n      service: authz.ns.svc.cluster.local\n      port: 8000\n      timeout: 250ms\n      failOpen: true\n      statusOnError: \"503\"\n      pathPrefix: /check\n      includeRequestHeadersInCheck: [authorization, x-auth-*]\n      includeHeadersInCheck: [cookie]\n      includeAdditionalHeadersInCheck: {x-from: mesh}\n      headersToUpstreamOnAllow: [x-user]\n      headersToDownstreamOnDeny: [set-cookie, '*-reason']\n      headersToDownstreamOnAllow: [x-session]\n  - name: grpc\n    envoyExtAuthzGrpc: {service: authz.ns.svc.cluster.local, port: 9000}\n";
    let loaded = load(text).unwrap_or_else(|d| panic!("{d}"));
    let http = loaded.config.mesh.provider("http").unwrap();
    let a = http.authz.as_ref().unwrap();
    assert_eq!(a.timeout_ms, 250);
    assert!(a.fail_open);
    assert_eq!(a.status_on_error, 503);
    assert_eq!(a.path_prefix, "/check");
    assert_eq!(
        a.include_request_headers,
        ["authorization", "x-auth-*", "cookie"]
    );
    assert_eq!(a.include_additional_headers["x-from"], "mesh");
    assert_eq!(a.headers_to_upstream_on_allow, ["x-user"]);
    assert_eq!(a.headers_to_downstream_on_allow, ["x-session"]);
    use meshward_config::model::mesh::header_listed;
    assert!(header_listed(
        &a.include_request_headers,
        "X-Auth-Request-User"
    ));
    assert!(header_listed(
        &a.headers_to_downstream_on_deny,
        "x-deny-reason"
    ));
    assert!(!header_listed(&a.include_request_headers, "x-other"));
    // Istio's defaults.
    let grpc = loaded.config.mesh.provider("grpc").unwrap();
    let d = grpc.authz.as_ref().unwrap();
    assert_eq!(
        (d.timeout_ms, d.fail_open, d.status_on_error),
        (600_000, false, 403)
    );
}

/// `outboundTrafficPolicy.mode`: ALLOW_ANY unless set; REGISTRY_ONLY
/// read; anything else refused as Istio's mesh validation refuses it.
#[test]
fn outbound_traffic_policy_is_decoded() {
    use meshward_config::model::OutboundTrafficPolicy;
    let none = load(&res(MC, "connectTimeout: 1s\n")).unwrap();
    assert_eq!(
        none.config.mesh.outbound_traffic_policy,
        OutboundTrafficPolicy::AllowAny
    );
    let strict = load(&res(MC, "outboundTrafficPolicy:\n  mode: REGISTRY_ONLY\n")).unwrap();
    assert_eq!(
        strict.config.mesh.outbound_traffic_policy,
        OutboundTrafficPolicy::RegistryOnly
    );
    assert!(
        strict.warnings.warnings().next().is_none(),
        "{}",
        render(&strict.warnings)
    );
    let any = load(&res(MC, "outboundTrafficPolicy: {mode: ALLOW_ANY}\n")).unwrap();
    assert_eq!(
        any.config.mesh.outbound_traffic_policy,
        OutboundTrafficPolicy::AllowAny
    );
    let bad = load(&res(MC, "outboundTrafficPolicy:\n  mode: DENY\n")).unwrap_err();
    assert!(
        render(&bad).contains("outboundTrafficPolicy.mode: unknown mode \"DENY\""),
        "{}",
        render(&bad)
    );
}
