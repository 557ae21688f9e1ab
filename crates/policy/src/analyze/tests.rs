//! One test per check: a minimal configuration that triggers it, and one
//! that does not.

use std::collections::BTreeSet;

use meshward_config::{ConfigSet, Loader};

use super::{Facts, Level, Message, analyze};

const ORDERS: &str = r#"
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: orders, namespace: production}
spec:
  address: 127.0.1.5
  labels: {app: orders}
  serviceAccount: orders
  ports: {http: 8080, http-metrics: 9090}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: frontend, namespace: production}
spec:
  address: 127.0.1.6
  labels: {app: frontend}
  serviceAccount: frontend
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: legacy
  namespace: legacy
  annotations: {meshward.io/proxy: "false"}
spec:
  address: 127.0.1.7
  labels: {app: legacy}
  serviceAccount: legacy
  ports: {http: 8080}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: orders, namespace: production}
spec:
  hosts: [orders.production.svc.cluster.local]
  ports: [{number: 80, name: http, protocol: HTTP, targetPort: 8080}]
  workloadSelector: {labels: {app: orders}}
  resolution: STATIC
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: legacy, namespace: legacy}
spec:
  hosts: [legacy.legacy.svc.cluster.local]
  ports: [{number: 8080, name: http, protocol: HTTP}]
  workloadSelector: {labels: {app: legacy}}
  resolution: STATIC
"#;

fn load(extra: &str) -> ConfigSet {
    let mut loader = Loader::new();
    loader.add_source("workloads.yaml", ORDERS);
    loader.add_source("test.yaml", extra);
    match loader.finish() {
        Ok(loaded) => loaded.config,
        Err(d) => panic!("test config is invalid:\n{d}"),
    }
}

fn run(extra: &str) -> Vec<Message> {
    analyze(&load(extra), &Facts::default())
}

fn codes(messages: &[Message]) -> Vec<&'static str> {
    messages.iter().map(|m| m.code).collect()
}

fn only(messages: &[Message], code: &str) -> Message {
    let found: Vec<_> = messages.iter().filter(|m| m.code == code).collect();
    assert_eq!(found.len(), 1, "one {code} expected in {messages:#?}");
    found[0].clone()
}

#[test]
fn the_base_configuration_is_clean() {
    assert_eq!(run(""), vec![]);
}

#[test]
fn selector_matching_no_workload_is_ist0127() {
    let m = run(r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: typo, namespace: production}
spec:
  selector: {matchLabels: {app: order, version: v1}}
  rules: [{}]
"#);
    let m = only(&m, "IST0127");
    assert_eq!(m.level, Level::Warning);
    assert_eq!(m.resource, "AuthorizationPolicy production/typo");
    assert_eq!(m.origin, "test.yaml:2");
    assert_eq!(m.field.as_deref(), Some("spec.selector.matchLabels"));
    assert_eq!(
        m.to_string(),
        "Warning [IST0127] (AuthorizationPolicy production/typo test.yaml:2) No matching workloads for this resource with the following labels: app=order,version=v1"
    );
    // The same selector in another namespace than the workload's.
    let other_ns = run(r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: p, namespace: legacy}
spec:
  selector: {matchLabels: {app: orders}}
  mtls: {mode: STRICT}
"#);
    assert_eq!(codes(&other_ns), ["IST0127"]);
}

#[test]
fn selectors_that_match_are_silent() {
    let m = run(r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ok, namespace: production}
spec:
  selector: {matchLabels: {app: orders}}
  rules: [{}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: mesh-wide, namespace: istio-system}
spec:
  selector: {matchLabels: {app: frontend}}
  rules: [{}]
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec:
  mtls: {mode: STRICT}
"#);
    assert_eq!(m, vec![]);
}

#[test]
fn every_selector_kind_is_checked() {
    let m = run(r#"
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: ra, namespace: production}
spec:
  selector: {matchLabels: {app: nobody}}
  jwtRules: [{issuer: "https://issuer.example"}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: dr, namespace: production}
spec:
  host: orders.production.svc.cluster.local
  workloadSelector: {matchLabels: {app: nobody}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: se, namespace: production}
spec:
  hosts: [nobody.production.svc.cluster.local]
  ports: [{number: 80, name: http, protocol: HTTP}]
  workloadSelector: {labels: {app: nobody}}
  resolution: STATIC
"#);
    let kinds: BTreeSet<&str> = m
        .iter()
        .filter(|m| m.code == "IST0127")
        .map(|m| m.resource.split(' ').next().unwrap_or_default())
        .collect();
    assert_eq!(
        kinds,
        BTreeSet::from(["RequestAuthentication", "DestinationRule", "ServiceEntry"])
    );
}

#[test]
fn namespace_wide_policy_in_a_namespace_without_workloads_is_ist0127() {
    let m = run(r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-all, namespace: staging}
spec: {}
"#);
    let m = only(&m, "IST0127");
    assert!(m.message.ends_with("the following labels: "), "{m}");
    assert_eq!(m.field, None);
}

#[test]
fn policy_selecting_only_workloads_without_a_proxy_is_ist0167() {
    let m = run(r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: legacy, namespace: legacy}
spec:
  selector: {matchLabels: {app: legacy}}
  rules: [{}]
"#);
    let m = only(&m, "IST0167");
    assert_eq!(
        m.message,
        "The policy has no impact: the selector (app=legacy) matches only legacy/legacy, which runs without a proxy."
    );

    // Live facts: the proxy of legacy/legacy does run after all, and
    // production/orders' does not.
    let config = load(
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: legacy, namespace: legacy}
spec:
  selector: {matchLabels: {app: legacy}}
  rules: [{}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: orders, namespace: production}
spec:
  selector: {matchLabels: {app: orders}}
  rules: [{}]
"#,
    );
    let facts = Facts {
        workloads_with_proxy: Some(BTreeSet::from([
            ("legacy".to_string(), "legacy".to_string()),
            ("production".to_string(), "frontend".to_string()),
        ])),
    };
    let m = analyze(&config, &facts);
    let m = only(&m, "IST0167");
    assert_eq!(m.resource, "AuthorizationPolicy production/orders");
}

#[test]
fn principal_no_workload_has_is_mw0101() {
    let m = run(r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: production}
spec:
  selector: {matchLabels: {app: orders}}
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/production/sa/fronted", "cluster.local/ns/production/sa/frontend"]
        notPrincipals: ["*/sa/legacy", "other.domain/ns/legacy/sa/legacy"]
  - when:
    - key: source.principal
      values: ["cluster.local/ns/production/sa/front*", "spiffe-less/nobody"]
"#);
    let found: Vec<(&str, Option<&str>)> = m.iter().map(|m| (m.code, m.field.as_deref())).collect();
    assert_eq!(
        found,
        [
            (
                "MW0101",
                Some("spec.rules[0].from[0].source.notPrincipals[1]")
            ),
            ("MW0101", Some("spec.rules[0].from[0].source.principals[0]")),
            ("MW0101", Some("spec.rules[1].when[0].values[1]")),
        ]
    );
    let typo = m
        .iter()
        .find(|m| m.field.as_deref() == Some("spec.rules[0].from[0].source.principals[0]"));
    assert!(
        typo.is_some_and(|m| m.message.contains("frontend and orders")),
        "the hint names the namespace's service accounts: {m:#?}"
    );
}

#[test]
fn principals_of_a_trust_domain_alias_and_wildcards_are_known() {
    let m = run(r#"
apiVersion: meshward.io/v1alpha1
kind: MeshConfig
metadata: {name: mesh, namespace: istio-system}
spec:
  trustDomain: example.org
  trustDomainAliases: [old.example.org]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: production}
spec:
  selector: {matchLabels: {app: orders}}
  rules:
  - from:
    - source:
        principals:
        - "old.example.org/ns/production/sa/frontend"
        - "cluster.local/ns/production/sa/frontend"
        - "example.org/ns/legacy/sa/legacy"
        - "*"
        - "*/sa/orders"
        - "example.org/ns/legacy/*"
"#);
    assert_eq!(m, vec![]);
}

#[test]
fn a_wildcard_inside_a_principal_is_literal() {
    let m = run(r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: production}
spec:
  selector: {matchLabels: {app: orders}}
  rules:
  - from:
    - source:
        principals: ["*/ns/production/sa/*"]
"#);
    let m = only(&m, "MW0101");
    assert!(
        m.message.contains("only as the first or else the last"),
        "{m}"
    );
}

#[test]
fn unknown_namespace_is_ist0101_and_namespace_without_workloads_mw0102() {
    let m = run(r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: production}
spec:
  selector: {matchLabels: {app: orders}}
  rules:
  - from:
    - source:
        namespaces: ["prodution", "prod*", "*", "istio-system"]
        notNamespaces: ["legacy"]
"#);
    let found: Vec<(&str, Level, Option<&str>)> = m
        .iter()
        .map(|m| (m.code, m.level, m.field.as_deref()))
        .collect();
    assert_eq!(
        found,
        [
            (
                "IST0101",
                Level::Error,
                Some("spec.rules[0].from[0].source.namespaces[0]")
            ),
            (
                "MW0102",
                Level::Warning,
                Some("spec.rules[0].from[0].source.namespaces[3]")
            ),
        ]
    );
    assert_eq!(
        m[0].message,
        "Referenced namespace not found: \"prodution\""
    );
}

#[test]
fn destination_rule_disable_toward_strict_is_mw0103() {
    let strict = r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec:
  mtls: {mode: STRICT}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: plain, namespace: production}
spec:
  host: orders.production.svc.cluster.local
  trafficPolicy:
    tls: {mode: DISABLE}
"#;
    let m = run(strict);
    let m = only(&m, "MW0103");
    assert_eq!(m.level, Level::Error);
    assert_eq!(m.field.as_deref(), Some("spec.trafficPolicy.tls.mode"));
    assert!(
        m.message.contains("production/orders port 8080")
            && m.message.contains("istio-system/default"),
        "{m}"
    );

    // PERMISSIVE on the target port (a port-level exception): plaintext works.
    let permissive = format!(
        "{strict}---\n{}",
        r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: orders, namespace: production}
spec:
  selector: {matchLabels: {app: orders}}
  portLevelMtls:
    8080: {mode: PERMISSIVE}
"#
    );
    assert_eq!(run(&permissive), vec![]);
}

#[test]
fn port_level_tls_of_a_destination_rule_counts_per_port() {
    let m = run(r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: production}
spec:
  mtls: {mode: STRICT}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: plain, namespace: production}
spec:
  host: orders
  trafficPolicy:
    tls: {mode: ISTIO_MUTUAL}
    portLevelSettings:
    - port: {number: 80}
      tls: {mode: SIMPLE}
"#);
    let m = only(&m, "MW0103");
    assert_eq!(
        m.field.as_deref(),
        Some("spec.trafficPolicy.portLevelSettings[0].tls.mode")
    );
    assert!(m.message.starts_with("TLS mode SIMPLE"), "{m}");
}

#[test]
fn istio_mutual_toward_a_workload_without_proxy_is_mw0104() {
    let m = run(r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: legacy, namespace: legacy}
spec:
  host: legacy.legacy.svc.cluster.local
  trafficPolicy:
    tls: {mode: ISTIO_MUTUAL}
"#);
    let m = only(&m, "MW0104");
    assert_eq!(m.level, Level::Error);
    assert!(
        m.message.contains("legacy/legacy runs without a proxy"),
        "{m}"
    );

    // Toward a workload with a proxy: what auto-mTLS would do anyway.
    let fine = run(r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: orders, namespace: production}
spec:
  host: "*.production.svc.cluster.local"
  trafficPolicy:
    tls: {mode: ISTIO_MUTUAL}
"#);
    assert_eq!(fine, vec![]);
}

#[test]
fn destination_rule_host_matching_no_service_is_ist0174() {
    let m = run(r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: typo, namespace: production}
spec:
  host: order.production.svc.cluster.local
  trafficPolicy:
    tls: {mode: ISTIO_MUTUAL}
"#);
    let m = only(&m, "IST0174");
    assert_eq!(
        m.message,
        "The host order.production.svc.cluster.local defined in the DestinationRule does not match any services in the mesh."
    );
}

#[test]
fn port_level_mtls_on_a_port_the_workload_lacks_is_mw0105() {
    let m = run(r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: orders, namespace: production}
spec:
  selector: {matchLabels: {app: orders}}
  mtls: {mode: STRICT}
  portLevelMtls:
    80: {mode: PERMISSIVE}
    8080: {mode: PERMISSIVE}
    9090: {mode: DISABLE}
"#);
    let m = only(&m, "MW0105");
    assert_eq!(m.field.as_deref(), Some("spec.portLevelMtls.80"));
    assert!(m.message.contains("production/orders: 8080, 9090"), "{m}");
}

#[test]
fn request_authentication_without_a_policy_requiring_a_token_is_mw0106() {
    let ra = r#"
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: jwt, namespace: production}
spec:
  selector: {matchLabels: {app: orders}}
  jwtRules: [{issuer: "https://issuer.example", jwksUri: "https://issuer.example/jwks"}]
"#;
    let m = run(ra);
    let m = only(&m, "MW0106");
    assert!(m.message.contains("production/orders"), "{m}");

    let required = format!(
        "{ra}---\n{}",
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: require-jwt, namespace: production}
spec:
  selector: {matchLabels: {app: orders}}
  action: DENY
  rules:
  - from:
    - source:
        notRequestPrincipals: ["*"]
"#
    );
    assert_eq!(run(&required), vec![]);
}

#[test]
fn unusable_custom_provider_is_mw0107() {
    let m = run(r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext, namespace: production}
spec:
  selector: {matchLabels: {app: orders}}
  action: CUSTOM
  provider: {name: missing}
  rules: [{to: [{operation: {paths: ["/admin"]}}]}]
"#);
    let m = only(&m, "MW0107");
    assert_eq!(m.level, Level::Error);
    assert_eq!(m.field.as_deref(), Some("spec.provider.name"));
    assert!(m.message.contains("\"missing\" is not defined"), "{m}");
}

#[test]
fn custom_policies_mixing_providers_on_one_workload_are_mw0107() {
    let mesh = r#"
apiVersion: meshward.io/v1alpha1
kind: MeshConfig
metadata: {name: mesh, namespace: istio-system}
spec:
  extensionProviders:
  - name: a
    envoyExtAuthzHttp: {service: a.example, port: 9000}
  - name: b
    envoyExtAuthzHttp: {service: b.example, port: 9000}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext-a, namespace: production}
spec:
  selector: {matchLabels: {app: orders}}
  action: CUSTOM
  provider: {name: a}
  rules: [{to: [{operation: {paths: ["/a"]}}]}]
"#;
    assert_eq!(run(mesh), vec![]);
    let both = format!(
        "{mesh}---\n{}",
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext-b, namespace: production}
spec:
  action: CUSTOM
  provider: {name: b}
  rules: [{to: [{operation: {paths: ["/b"]}}]}]
"#
    );
    let m = run(&both);
    // Both policies are reported: each names the workload.
    assert_eq!(codes(&m), ["MW0107", "MW0107"]);
    assert!(m.iter().all(|m| m.message.contains("production/orders")));
}

#[test]
fn messages_are_sorted_as_istioctl_sorts_them() {
    let m = run(r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: b, namespace: production}
spec:
  selector: {matchLabels: {app: nobody}}
  rules:
  - from: [{source: {namespaces: ["nowhere"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: a, namespace: production}
spec:
  selector: {matchLabels: {app: nobody}}
"#);
    let order: Vec<(&str, &str)> = m.iter().map(|m| (m.origin.as_str(), m.code)).collect();
    // Errors first, then by code, then by resource (production/a before
    // production/b, whatever the file order).
    assert_eq!(
        order,
        [
            ("test.yaml:2", "IST0101"),
            ("test.yaml:10", "IST0127"),
            ("test.yaml:2", "IST0127"),
        ]
    );
}

#[test]
fn load_errors_in_a_resource_are_ist0106_and_the_others_unparsed() {
    let mut loader = Loader::new();
    loader.add_source(
        "bad.yaml",
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: production}
spec:
  action: ALOW
"#,
    );
    loader.add_source("broken.yaml", "key: [unclosed\n");
    let Err(diags) = loader.finish() else {
        panic!("the set must be invalid");
    };
    let (messages, unparsed) = Message::from_load_errors(&diags);
    assert_eq!(messages.len(), 1, "{messages:#?}");
    let m = &messages[0];
    assert_eq!((m.code, m.level), ("IST0106", Level::Error));
    assert_eq!(m.resource, "AuthorizationPolicy production/p");
    assert!(m.origin.starts_with("bad.yaml:"), "{m}");
    assert!(
        m.message
            .starts_with("Schema validation error: spec.action: "),
        "{m}"
    );
    assert_eq!(
        m.documentation_url().as_deref(),
        Some("https://istio.io/latest/docs/reference/config/analysis/ist0106/")
    );
    assert_eq!(unparsed.len(), 1, "{unparsed:#?}");
    assert_eq!(&*unparsed[0].file, "broken.yaml");
}

#[test]
fn peer_authentication_with_a_selector_in_the_root_namespace_is_ist0167() {
    let all = run(r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: orders, namespace: istio-system}
spec:
  selector: {matchLabels: {app: orders}}
  mtls: {mode: STRICT}
"#);
    assert_eq!(codes(&all), ["IST0167"]);
    assert!(
        all[0].message.contains("root namespace (istio-system)"),
        "{}",
        all[0]
    );
}

#[test]
fn service_account_no_workload_has_is_mw0101() {
    let m = run(r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: production}
spec:
  selector: {matchLabels: {app: orders}}
  rules:
  - from:
    - source:
        serviceAccounts: ["frontend", "legacy/legacy", "production/fronted"]
  - when:
    - key: source.serviceAccount
      notValues: ["legacy"]
"#);
    let found: Vec<(&str, Option<&str>)> = m.iter().map(|m| (m.code, m.field.as_deref())).collect();
    assert_eq!(
        found,
        [
            (
                "MW0101",
                Some("spec.rules[0].from[0].source.serviceAccounts[2]")
            ),
            ("MW0101", Some("spec.rules[1].when[0].notValues[0]")),
        ]
    );
    assert_eq!(
        m[1].message,
        "No known workload has service account \"production/legacy\"; the service accounts of namespace production are frontend and orders"
    );
}

#[test]
fn long_lists_are_cut() {
    let items: Vec<String> = (1..=7).map(|i| format!("w{i}")).collect();
    assert_eq!(super::list(&items[..2]), "w1 and w2");
    assert_eq!(super::list(&items[..5]), "w1, w2, w3, w4 and w5");
    assert_eq!(super::list(&items), "w1, w2, w3, w4, w5 and 2 more");
}

#[test]
fn a_resource_suppresses_codes_with_istios_annotation() {
    let policy = |codes: &str| {
        format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: typo\n  namespace: production\n  annotations: {{galley.istio.io/analyze-suppress: \"{codes}\"}}\nspec:\n  selector: {{matchLabels: {{app: order}}}}\n  rules: [{{from: [{{source: {{namespaces: [nowhere]}}}}]}}]\n"
        )
    };
    assert_eq!(codes(&run(&policy("MW0101"))), ["IST0101", "IST0127"]);
    assert_eq!(codes(&run(&policy("IST0127"))), ["IST0101"]);
    assert_eq!(codes(&run(&policy("IST0101, IST0127"))), Vec::<&str>::new());
    assert_eq!(codes(&run(&policy("*"))), Vec::<&str>::new());
}

#[test]
fn plaintext_toward_strict_with_auto_mtls_off_is_mw0108() {
    let off = r#"
apiVersion: meshward.io/v1alpha1
kind: MeshConfig
metadata: {name: mesh, namespace: istio-system}
spec:
  enableAutoMtls: false
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec:
  mtls: {mode: STRICT}
"#;
    let m = run(off);
    let m = only(&m, "MW0108");
    assert_eq!(m.level, Level::Error);
    assert_eq!(m.resource, "ServiceEntry production/orders");
    assert_eq!(m.field.as_deref(), Some("spec.ports[0]"));
    assert!(
        m.message
            .contains("orders.production.svc.cluster.local port 80")
            && m.message.contains("production/orders port 8080"),
        "{m}"
    );

    // A DestinationRule that sets mTLS for the service: nothing to say.
    let with_rule = format!(
        "{off}---\n{}",
        r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: orders, namespace: production}
spec:
  host: orders
  trafficPolicy:
    tls: {mode: ISTIO_MUTUAL}
"#
    );
    assert_eq!(run(&with_rule), vec![]);
}

#[test]
fn dry_run_policy_is_mw0109_info() {
    let policy = |action: &str, value: &str| {
        format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: trial\n  namespace: production\n  annotations: {{istio.io/dry-run: \"{value}\"}}\nspec:\n  selector: {{matchLabels: {{app: orders}}}}\n  action: {action}\n  rules: [{{to: [{{operation: {{paths: [\"/admin\"]}}}}]}}]\n"
        )
    };
    let m = run(&policy("DENY", "true"));
    let m = only(&m, "MW0109");
    assert_eq!(m.level, Level::Info);
    assert_eq!(
        m.field.as_deref(),
        Some("metadata.annotations[istio.io/dry-run]")
    );
    assert!(m.message.contains("never enforced"), "{m}");
    assert_eq!(codes(&run(&policy("ALLOW", "1"))), ["MW0109"]);
    assert_eq!(run(&policy("DENY", "false")), vec![]);
}

#[test]
fn without_workloads_nothing_is_compared_with_workloads() {
    let mut loader = Loader::new();
    loader.add_source(
        "policies.yaml",
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: production}
spec:
  selector: {matchLabels: {app: nobody}}
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/elsewhere/sa/nobody"]
        namespaces: ["elsewhere"]
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: root-selector, namespace: istio-system}
spec:
  selector: {matchLabels: {app: nobody}}
"#,
    );
    let config = match loader.finish() {
        Ok(l) => l.config,
        Err(d) => panic!("{d}"),
    };
    assert!(!super::compares_with_workloads(&config));
    // Only what holds whatever the workloads: the root-namespace selector.
    assert_eq!(codes(&analyze(&config, &Facts::default())), ["IST0167"]);
}
