//! Which DestinationRule applies to a call, as Istio chooses it: one row
//! per rule of istiod's lookup (client namespace, then the service's, then
//! the root namespace; `exportTo`; the most specific host; short names;
//! merging; `workloadSelector`).

use std::collections::BTreeMap;

use meshward_config::{ConfigSet, Loader};
use meshward_policy::{Workload, destination_rule};

/// A DestinationRule `ns/name` for `host` with TLS `mode`, plus extra spec
/// lines (`exportTo`, `workloadSelector`).
fn dr(ns: &str, name: &str, host: &str, mode: Option<&str>, extra: &str) -> String {
    let tp = mode
        .map(|m| format!("  trafficPolicy:\n    tls: {{mode: {m}}}\n"))
        .unwrap_or_default();
    format!(
        "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  host: \"{host}\"\n{tp}{extra}"
    )
}

fn config(docs: &[String]) -> ConfigSet {
    let mut loader = Loader::new();
    loader.add_source("test.yaml", &docs.concat());
    loader.finish().unwrap_or_else(|d| panic!("{d}")).config
}

fn client(ns: &str, labels: &[(&str, &str)]) -> Workload {
    Workload {
        namespace: ns.to_string(),
        service_account: "default".to_string(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>(),
    }
}

/// The rule (`ns/name`) and TLS mode that apply, or `None`.
fn applied(c: &ConfigSet, from: &Workload, host: &str, svc_ns: &str) -> Option<(String, String)> {
    destination_rule(c, from, host, svc_ns).map(|d| {
        let mode = d
            .tls()
            .0
            .map_or("none".to_string(), |t| t.mode.as_str().to_string());
        (d.source().key(), mode)
    })
}

fn rule(key: &str, mode: &str) -> Option<(String, String)> {
    Some((key.to_string(), mode.to_string()))
}

const DB: &str = "database.legacy.svc.cluster.local";

#[test]
fn seed_001_a_rule_in_the_clients_namespace_applies_to_a_host_of_another() {
    // Seed 001's `external-database`: namespace production, the legacy
    // namespace's database, plaintext.
    let c = config(&[dr(
        "production",
        "external-database",
        DB,
        Some("DISABLE"),
        "",
    )]);
    let prod = client("production", &[("app", "frontend")]);
    assert_eq!(
        applied(&c, &prod, DB, "legacy"),
        rule("production/external-database", "DISABLE")
    );
    // A client elsewhere is not affected by production's rule.
    assert_eq!(applied(&c, &client("development", &[]), DB, "legacy"), None);
}

#[test]
fn client_namespace_then_service_namespace_then_root() {
    let c = config(&[
        dr("istio-system", "mesh", DB, Some("ISTIO_MUTUAL"), ""),
        dr("legacy", "own", DB, Some("SIMPLE"), ""),
        dr("production", "mine", DB, Some("DISABLE"), ""),
    ]);
    assert_eq!(
        applied(&c, &client("production", &[]), DB, "legacy"),
        rule("production/mine", "DISABLE")
    );
    assert_eq!(
        applied(&c, &client("development", &[]), DB, "legacy"),
        rule("legacy/own", "SIMPLE")
    );
    let root_only = config(&[dr("istio-system", "mesh", DB, Some("ISTIO_MUTUAL"), "")]);
    assert_eq!(
        applied(&root_only, &client("development", &[]), DB, "legacy"),
        rule("istio-system/mesh", "ISTIO_MUTUAL")
    );
}

#[test]
fn the_first_namespace_with_a_rule_wins_even_with_a_less_specific_host() {
    // The client's namespace has only a wildcard, the service's namespace
    // the exact host: the level decides before the host does.
    let c = config(&[
        dr("legacy", "exact", DB, Some("SIMPLE"), ""),
        dr(
            "production",
            "wide",
            "*.svc.cluster.local",
            Some("DISABLE"),
            "",
        ),
    ]);
    assert_eq!(
        applied(&c, &client("production", &[]), DB, "legacy"),
        rule("production/wide", "DISABLE")
    );
}

#[test]
fn export_to_limits_who_sees_a_rule() {
    let c = config(&[
        dr("istio-system", "mesh", DB, Some("ISTIO_MUTUAL"), ""),
        dr(
            "legacy",
            "private",
            DB,
            Some("DISABLE"),
            "  exportTo: [\".\"]\n",
        ),
    ]);
    // Private to legacy: its own clients see it, others fall to the root's.
    assert_eq!(
        applied(&c, &client("legacy", &[]), DB, "legacy"),
        rule("legacy/private", "DISABLE")
    );
    assert_eq!(
        applied(&c, &client("production", &[]), DB, "legacy"),
        rule("istio-system/mesh", "ISTIO_MUTUAL")
    );
    // Exported to one namespace only.
    let c = config(&[dr(
        "legacy",
        "for-prod",
        DB,
        Some("DISABLE"),
        "  exportTo: [production]\n",
    )]);
    assert_eq!(
        applied(&c, &client("production", &[]), DB, "legacy"),
        rule("legacy/for-prod", "DISABLE")
    );
    assert_eq!(applied(&c, &client("development", &[]), DB, "legacy"), None);
    // A rule of the client's namespace exported only elsewhere is not
    // the client's own.
    let c = config(&[dr(
        "production",
        "for-dev",
        DB,
        Some("DISABLE"),
        "  exportTo: [development]\n",
    )]);
    assert_eq!(applied(&c, &client("production", &[]), DB, "legacy"), None);
}

#[test]
fn most_specific_host_wins_within_a_namespace() {
    let c = config(&[
        dr("production", "all", "*", Some("ISTIO_MUTUAL"), ""),
        dr(
            "production",
            "svc",
            "*.svc.cluster.local",
            Some("SIMPLE"),
            "",
        ),
        dr(
            "production",
            "legacy",
            "*.legacy.svc.cluster.local",
            Some("DISABLE"),
            "",
        ),
        dr("production", "api", "api.example.com", Some("DISABLE"), ""),
    ]);
    let prod = client("production", &[]);
    assert_eq!(
        applied(&c, &prod, DB, "legacy"),
        rule("production/legacy", "DISABLE")
    );
    assert_eq!(
        applied(&c, &prod, "cart.production.svc.cluster.local", "production"),
        rule("production/svc", "SIMPLE")
    );
    assert_eq!(
        applied(&c, &prod, "api.example.com", "production"),
        rule("production/api", "DISABLE")
    );
    assert_eq!(
        applied(&c, &prod, "www.example.org", "production"),
        rule("production/all", "ISTIO_MUTUAL")
    );
    // `*.example.com` does not cover `example.com`.
    let c = config(&[dr("production", "sub", "*.example.com", Some("SIMPLE"), "")]);
    assert_eq!(applied(&c, &prod, "example.com", "production"), None);
    assert_eq!(
        applied(&c, &prod, "API.Example.com", "production"),
        rule("production/sub", "SIMPLE")
    );
}

#[test]
fn short_hosts_are_qualified_with_the_rules_namespace() {
    let c = config(&[
        dr("legacy", "short", "database", Some("DISABLE"), ""),
        dr("production", "short", "database", Some("SIMPLE"), ""),
    ]);
    // production's `database` is database.production..., not legacy's.
    assert_eq!(
        applied(&c, &client("production", &[]), DB, "legacy"),
        rule("legacy/short", "DISABLE")
    );
    assert_eq!(
        applied(
            &c,
            &client("production", &[]),
            "database.production.svc.cluster.local",
            "production"
        ),
        rule("production/short", "SIMPLE")
    );
}

#[test]
fn rules_for_one_host_merge_oldest_traffic_policy_first() {
    let c = config(&[
        dr("legacy", "subsets-only", DB, None, ""),
        dr("legacy", "tls", DB, Some("DISABLE"), ""),
        dr("legacy", "later", DB, Some("SIMPLE"), ""),
    ]);
    assert_eq!(
        applied(&c, &client("production", &[]), DB, "legacy"),
        rule("legacy/tls", "DISABLE")
    );
}

#[test]
fn workload_selector_rules_apply_to_the_selected_clients_of_their_namespace() {
    let sel = "  workloadSelector: {matchLabels: {app: reports}}\n";
    let c = config(&[
        dr("production", "everyone", DB, Some("ISTIO_MUTUAL"), ""),
        dr("production", "reports", DB, Some("DISABLE"), sel),
    ]);
    assert_eq!(
        applied(
            &c,
            &client("production", &[("app", "reports")]),
            DB,
            "legacy"
        ),
        rule("production/reports", "DISABLE")
    );
    assert_eq!(
        applied(&c, &client("production", &[("app", "cart")]), DB, "legacy"),
        rule("production/everyone", "ISTIO_MUTUAL")
    );
    // Never exported: a client in another namespace does not get it.
    let c = config(&[dr("legacy", "reports", DB, Some("DISABLE"), sel)]);
    assert_eq!(
        applied(
            &c,
            &client("production", &[("app", "reports")]),
            DB,
            "legacy"
        ),
        None
    );
    // Only selector rules for the host in the client's namespace, none
    // selecting it: no rule applies (the lookup stops at that namespace,
    // as in Istio), even though the root namespace has one.
    let c = config(&[
        dr("istio-system", "mesh", DB, Some("SIMPLE"), ""),
        dr("production", "reports", DB, Some("DISABLE"), sel),
    ]);
    assert_eq!(
        applied(&c, &client("production", &[("app", "cart")]), DB, "legacy"),
        None
    );
}

#[test]
fn a_client_in_the_root_namespace_sees_its_private_rules_first() {
    let c = config(&[
        dr("legacy", "own", DB, Some("SIMPLE"), ""),
        dr(
            "istio-system",
            "private",
            DB,
            Some("DISABLE"),
            "  exportTo: [\".\"]\n",
        ),
    ]);
    assert_eq!(
        applied(&c, &client("istio-system", &[]), DB, "legacy"),
        rule("istio-system/private", "DISABLE")
    );
    // A public root rule comes after the service's namespace.
    let c = config(&[
        dr("legacy", "own", DB, Some("SIMPLE"), ""),
        dr("istio-system", "public", DB, Some("DISABLE"), ""),
    ]);
    assert_eq!(
        applied(&c, &client("istio-system", &[]), DB, "legacy"),
        rule("legacy/own", "SIMPLE")
    );
}

#[test]
fn port_level_settings_do_not_inherit_the_rules_tls() {
    // Istio's MergeTrafficPolicy: a port-level entry replaces the rule's
    // settings for that port; without `tls` the port has none (auto-mTLS).
    let extra = "    portLevelSettings:\n    - port: {number: 8080}\n      tls: {mode: ISTIO_MUTUAL}\n    - port: {number: 9090}\n      connectionPool: {tcp: {maxConnections: 10}}\n    - port: {number: 8080}\n      tls: {mode: SIMPLE}\n";
    let c = config(&[dr("legacy", "db", DB, Some("DISABLE"), extra)]);
    let d = destination_rule(&c, &client("production", &[]), DB, "legacy").unwrap();
    let (default, ports) = d.tls();
    assert_eq!(default.map(|t| t.mode.as_str()), Some("DISABLE"));
    let mode = |p: u16| ports.get(&p).map(|t| t.as_ref().map(|t| t.mode.as_str()));
    assert_eq!(
        mode(8080),
        Some(Some("ISTIO_MUTUAL")),
        "the first entry for a port counts"
    );
    assert_eq!(mode(9090), Some(None), "an entry without tls has none");
    assert_eq!(mode(7000), None, "other ports take the rule's");
}

#[test]
fn connect_timeouts_come_from_the_rule_that_applies_and_port_settings_inherit_nothing() {
    use std::time::Duration;
    let pool = "  trafficPolicy:\n    connectionPool:\n      tcp: {connectTimeout: 2s}\n    portLevelSettings:\n    - port: {number: 8080}\n      connectionPool:\n        tcp: {connectTimeout: 250ms}\n    - port: {number: 9090}\n      tls: {mode: ISTIO_MUTUAL}\n";
    let c = config(&[
        dr("legacy", "timeouts", DB, None, pool),
        // The client's own namespace has a rule without a pool: it wins,
        // and the legacy namespace's timeouts do not apply.
        dr("production", "plain", DB, Some("DISABLE"), ""),
    ]);
    let timeouts = |from: &Workload| {
        destination_rule(&c, from, DB, "legacy")
            .map(|d| d.connect_timeouts())
            .unwrap_or_default()
    };
    let (own, ports) = timeouts(&client("development", &[]));
    assert_eq!(own, Some(Duration::from_secs(2)));
    assert_eq!(ports[&8080], Some(Duration::from_millis(250)));
    // A port entry without a pool takes the mesh default, not the rule's
    // 2s (Istio's `GetPortLevelTrafficPolicy`).
    assert_eq!(ports[&9090], None);
    assert_eq!(
        timeouts(&client("production", &[])),
        (None, BTreeMap::new())
    );
}
