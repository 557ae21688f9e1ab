//! Istio's authorization and peer-authentication rules, one table row per
//! rule: a configuration, a workload, requests and the expected verdict. Each
//! row also checks that the explanation (`Decision`'s `Display`) names what
//! decided: the policy (and rule), or why none did.

use std::net::IpAddr;
use std::sync::Arc;

use meshward_config::Loader;
use meshward_policy::{
    Decision, Headers, HttpAttributes, JwtAuth, PolicyEngine, Reason, Request, Verdict, Workload,
    WorkloadPolicy,
};
use serde_json::json;

use Verdict::{Allow, Deny};

// ------------------------------------------------------------------ helpers

fn indent(text: &str, by: usize) -> String {
    text.lines()
        .map(|l| format!("{}{l}\n", " ".repeat(by)))
        .collect()
}

/// A resource document `ns/name` of `kind` with `spec` (unindented text).
fn doc(kind: &str, ns: &str, name: &str, meta_extra: &str, spec: &str) -> String {
    let api = match kind {
        "MeshConfig" => "meshward.io/v1alpha1",
        "DestinationRule" | "ServiceEntry" | "WorkloadEntry" => "networking.istio.io/v1",
        _ => "security.istio.io/v1",
    };
    format!(
        "---\napiVersion: {api}\nkind: {kind}\nmetadata:\n  name: {name}\n  namespace: {ns}\n{}spec:\n{}",
        indent(meta_extra, 2),
        indent(spec, 2)
    )
}

fn ap(ns: &str, name: &str, spec: &str) -> String {
    doc("AuthorizationPolicy", ns, name, "", spec)
}

fn mesh(spec: &str) -> String {
    doc("MeshConfig", "istio-system", "mesh", "", spec)
}

const EXT_PROVIDER: &str = "extensionProviders:\n- name: ext\n  envoyExtAuthzHttp:\n    service: ext.auth.svc.cluster.local\n    port: 8000\n- name: tracer\n  zipkin:\n    service: zipkin\n    port: 9411\n";

fn engine(config: &str) -> PolicyEngine {
    let mut l = Loader::new();
    l.add_source("test.yaml", config);
    let loaded = l
        .finish()
        .unwrap_or_else(|d| panic!("config does not load:\n{d}\n{config}"));
    PolicyEngine::new(Arc::new(loaded.config))
}

fn wl(ns: &str, sa: &str, labels: &[(&str, &str)]) -> Workload {
    Workload {
        namespace: ns.to_string(),
        service_account: sa.to_string(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

/// Headers as received, names in any case (exercises the pair-list lookup).
struct Pairs(Vec<(String, String)>);

impl Headers for Pairs {
    fn header(&self, name: &str) -> Option<std::borrow::Cow<'_, [u8]>> {
        self.0[..].header(name)
    }
}

#[derive(Clone)]
struct Http {
    method: String,
    path: String,
    host: String,
    headers: Vec<(String, String)>,
    auth: Option<JwtAuth>,
}

/// An owned request description.
#[derive(Clone)]
struct Req {
    principal: Option<String>,
    src: IpAddr,
    remote: Option<IpAddr>,
    dst: Option<IpAddr>,
    port: u16,
    sni: Option<String>,
    http: Option<Http>,
}

const CLIENT: &str = "cluster.local/ns/client/sa/app";

fn tcp(port: u16) -> Req {
    Req {
        principal: Some(CLIENT.to_string()),
        src: "10.0.0.1".parse().unwrap(),
        remote: None,
        dst: None,
        port,
        sni: None,
        http: None,
    }
}

fn http(method: &str, path: &str) -> Req {
    Req {
        http: Some(Http {
            method: method.to_string(),
            path: path.to_string(),
            host: "web.example.com".to_string(),
            headers: Vec::new(),
            auth: None,
        }),
        ..tcp(8080)
    }
}

fn get(path: &str) -> Req {
    http("GET", path)
}

impl Req {
    fn from(mut self, principal: &str) -> Req {
        self.principal = Some(principal.to_string());
        self
    }
    fn plaintext(mut self) -> Req {
        self.principal = None;
        self
    }
    fn src(mut self, ip: &str) -> Req {
        self.src = ip.parse().unwrap();
        self
    }
    fn remote(mut self, ip: &str) -> Req {
        self.remote = Some(ip.parse().unwrap());
        self
    }
    fn dst(mut self, ip: &str) -> Req {
        self.dst = Some(ip.parse().unwrap());
        self
    }
    fn port(mut self, port: u16) -> Req {
        self.port = port;
        self
    }
    fn sni(mut self, sni: &str) -> Req {
        self.sni = Some(sni.to_string());
        self
    }
    fn host(mut self, host: &str) -> Req {
        self.http.as_mut().unwrap().host = host.to_string();
        self
    }
    fn header(mut self, name: &str, value: &str) -> Req {
        self.http
            .as_mut()
            .unwrap()
            .headers
            .push((name.to_string(), value.to_string()));
        self
    }
    fn jwt(mut self, claims: serde_json::Value) -> Req {
        let serde_json::Value::Object(map) = claims else {
            panic!("claims must be an object")
        };
        self.http.as_mut().unwrap().auth = Some(JwtAuth::from_claims(map));
        self
    }

    fn decide(&self, wp: &WorkloadPolicy) -> Decision {
        let headers = self.http.as_ref().map(|h| Pairs(h.headers.clone()));
        let http = self.http.as_ref().map(|h| HttpAttributes {
            method: &h.method,
            path: &h.path,
            host: &h.host,
            headers: headers.as_ref().unwrap(),
            auth: h.auth.as_ref(),
        });
        let req = Request {
            principal: self.principal.as_deref(),
            source_ip: self.src,
            remote_ip: self.remote,
            destination_ip: self.dst,
            port: self.port,
            sni: self.sni.as_deref(),
            http,
        };
        wp.decide(&req)
    }
}

/// `(row name, request, expected verdict, text the explanation must contain)`.
type Row = (&'static str, Req, Verdict, &'static str);

fn check(config: &str, workload: &Workload, rows: Vec<Row>) {
    let e = engine(config);
    let wp = e.workload(workload);
    let mut failures = Vec::new();
    for (name, req, verdict, explain) in rows {
        let d = req.decide(&wp);
        let text = d.to_string();
        if d.verdict != verdict || !text.contains(explain) {
            failures.push(format!(
                "{name}: expected {verdict} with {explain:?}, got: {text}"
            ));
        }
        // An ALLOW or DENY by a matching policy always names it.
        if matches!(d.reason, Reason::AllowMatched | Reason::DenyMatched) {
            let r = d.decided_by.as_ref().expect("matched without decided_by");
            if !text.contains(&format!("policy {}", r.policy)) {
                failures.push(format!(
                    "{name}: explanation does not name {}: {text}",
                    r.policy
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} row(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

fn web() -> Workload {
    wl("prod", "web", &[("app", "web"), ("version", "v1")])
}

// ------------------------------------------------------------------ action order

#[test]
fn custom_then_deny_then_allow() {
    let config = [
        mesh(EXT_PROVIDER),
        ap("prod", "ext", "action: CUSTOM\nprovider:\n  name: ext\nrules:\n- to:\n  - operation:\n      paths: [\"/ext/*\"]\n"),
        ap("prod", "deny-admin", "action: DENY\nrules:\n- to:\n  - operation:\n      paths: [\"/admin*\", \"/ext/secret\"]\n"),
        ap("prod", "allow-get", "action: ALLOW\nrules:\n- to:\n  - operation:\n      methods: [\"GET\"]\n"),
    ]
    .concat();
    check(
        &config,
        &web(),
        vec![
            (
                "CUSTOM match adds the external check to the ALLOW verdict",
                get("/ext/x"),
                Allow,
                "ALLOW: matched rule 0 of ALLOW policy prod/allow-get; also requires external authorization by \"ext\" (rule 0 of CUSTOM policy prod/ext)",
            ),
            (
                "DENY beats ALLOW",
                get("/admin/users"),
                Deny,
                "DENY: matched rule 0 of DENY policy prod/deny-admin",
            ),
            (
                "DENY applies after a CUSTOM match",
                get("/ext/secret"),
                Deny,
                "DENY policy prod/deny-admin",
            ),
            (
                "no ALLOW rule matches",
                http("POST", "/x"),
                Deny,
                "no rule of the ALLOW policies that apply matched (prod/allow-get)",
            ),
            (
                "ALLOW matches",
                get("/x"),
                Allow,
                "matched rule 0 of ALLOW policy prod/allow-get",
            ),
        ],
    );
    // The external check is carried in the decision.
    let e = engine(&config);
    let d = get("/ext/x").decide(&e.workload(&web()));
    let ext = d.ext_authz.as_ref().expect("ext_authz set");
    assert_eq!(ext.provider, "ext");
    assert_eq!(ext.policy.policy.name, "ext");
    assert_eq!(d.with_ext_authz_result(false), Deny);
    assert_eq!(d.with_ext_authz_result(true), Allow);
    assert!(get("/x").decide(&e.workload(&web())).ext_authz.is_none());
}

const GRPC_PROVIDER: &str =
    "- name: opa\n  envoyExtAuthzGrpc:\n    service: opa.auth.svc.cluster.local\n    port: 9191\n";

fn custom(provider: &str, path: &str) -> String {
    format!(
        "action: CUSTOM\nprovider:\n  name: {provider}\nrules:\n- to:\n  - operation:\n      paths: [\"{path}\"]\n"
    )
}

/// A CUSTOM policy whose rule is kept to port 8080 (the HTTP port of the
/// requests here), so that TCP connections to other ports do not match.
fn custom_on_8080(provider: &str, path: &str) -> String {
    format!(
        "action: CUSTOM\nprovider:\n  name: {provider}\nrules:\n- to:\n  - operation:\n      ports: [\"8080\"]\n      paths: [\"{path}\"]\n"
    )
}

/// When Istio cannot build the CUSTOM action (several providers, a provider
/// that is not defined or not an ext-authz one), it installs an RBAC DENY
/// filter made of the CUSTOM rules in its place (`getBadCustomDenyRules`
/// in `buildHTTP`/`buildTCP`, pilot/pkg/security/authz/builder): what they
/// match is denied, first; everything else goes on to DENY and ALLOW.
#[test]
fn custom_with_an_unusable_provider_denies_what_its_rules_match() {
    let meshes = mesh(&format!("{EXT_PROVIDER}{GRPC_PROVIDER}"));
    let others = [
        ap(
            "prod",
            "deny-post",
            "action: DENY\nrules:\n- to:\n  - operation:\n      methods: [\"POST\"]\n      ports: [\"8080\"]\n",
        ),
        ap(
            "prod",
            "allow",
            "rules:\n- to:\n  - operation:\n      paths: [\"/ext*\", \"/b*\", \"/ok*\"]\n- to:\n  - operation:\n      ports: [\"5432\"]\n",
        ),
    ]
    .concat();
    let cases = [
        (
            vec![ap("prod", "ext", &custom_on_8080("missing", "/ext*"))],
            None,
            "provider \"missing\" is not a defined authorization provider",
        ),
        (
            vec![ap("prod", "ext", &custom_on_8080("tracer", "/ext*"))],
            None,
            "provider \"tracer\" is not a defined authorization provider",
        ),
        (
            vec![
                ap("prod", "ext", &custom_on_8080("ext", "/ext*")),
                ap("prod", "b", &custom_on_8080("opa", "/b*")),
            ],
            Some("matched rule 0 of CUSTOM policy prod/b, whose provider cannot be used"),
            "only one provider can be used per workload, found \"ext\", \"opa\"",
        ),
        (
            vec![
                ap("prod", "ext", &custom_on_8080("ext", "/ext*")),
                ap("istio-system", "b", &custom_on_8080("opa", "/b*")),
            ],
            Some("matched rule 0 of CUSTOM policy istio-system/b, whose provider cannot be used"),
            "only one provider can be used per workload, found \"ext\", \"opa\"",
        ),
    ];
    for (custom, second, problem) in cases {
        let config = [meshes.clone(), custom.concat(), others.clone()].concat();
        let mut rows: Vec<Row> = vec![
            (
                "a request the CUSTOM rule matches",
                get("/ext/x"),
                Deny,
                "DENY: matched rule 0 of CUSTOM policy prod/ext, whose provider cannot be used (",
            ),
            (
                "CUSTOM comes before DENY",
                http("POST", "/ext/x"),
                Deny,
                "CUSTOM policy prod/ext, whose provider cannot be used",
            ),
            (
                "no CUSTOM rule matches: ALLOW as usual",
                get("/ok"),
                Allow,
                "ALLOW: matched rule 0 of ALLOW policy prod/allow",
            ),
            (
                "no CUSTOM rule matches: DENY as usual",
                http("POST", "/ok"),
                Deny,
                "DENY: matched rule 0 of DENY policy prod/deny-post",
            ),
            (
                "no CUSTOM rule matches: no ALLOW rule either",
                get("/nope"),
                Deny,
                "no rule of the ALLOW policies that apply matched (prod/allow)",
            ),
            (
                "TCP: the CUSTOM rule's paths are left out, as in a DENY rule",
                tcp(8080),
                Deny,
                // The first CUSTOM policy, root namespace first.
                ", whose provider cannot be used (",
            ),
            (
                "TCP: no CUSTOM rule matches the port: ALLOW as usual",
                tcp(5432),
                Allow,
                "ALLOW: matched rule 1 of ALLOW policy prod/allow",
            ),
        ];
        if let Some(second) = second {
            rows.push(("the other provider's rule", get("/b/x"), Deny, second));
        }
        check(&config, &web(), rows);
        let e = engine(&config);
        let wp = e.workload(&web());
        assert_eq!(wp.custom_problem(), Some(problem));
        for req in [get("/ext/x"), get("/ok"), tcp(8080), tcp(5432)] {
            let d = req.decide(&wp);
            assert!(d.ext_authz.is_none(), "no provider is asked: {d}");
        }
        let d = get("/ext/x").decide(&wp);
        assert_eq!(d.reason.code(), "custom_unusable");
        assert_eq!(
            d.to_string(),
            format!(
                "DENY: matched rule 0 of CUSTOM policy prod/ext, whose provider cannot be used ({problem})"
            )
        );
        // Workloads the CUSTOM policies do not select are not affected.
        let other = wl("other", "api", &[("app", "api")]);
        assert!(e.workload(&other).custom_problem().is_none());
        assert_eq!(get("/ext/x").decide(&e.workload(&other)).verdict, Allow);
    }
}

#[test]
fn custom_policies_of_one_workload_may_name_one_provider_twice() {
    let meshes = mesh(&format!("{EXT_PROVIDER}{GRPC_PROVIDER}"));
    let config = [
        meshes,
        ap("prod", "a", &custom("ext", "/a*")),
        ap("prod", "b", &custom("ext", "/b*")),
        ap("prod", "allow-all", "rules:\n- {}\n"),
    ]
    .concat();
    let e = engine(&config);
    let wp = e.workload(&web());
    assert!(wp.custom_problem().is_none());
    assert_eq!(
        get("/b").decide(&wp).ext_authz.unwrap().policy.policy.name,
        "b"
    );
    assert!(get("/c").decide(&wp).ext_authz.is_none());
}

#[test]
fn custom_on_tcp_asks_only_grpc_providers() {
    let meshes = mesh(&format!("{EXT_PROVIDER}{GRPC_PROVIDER}"));
    for (provider, on_tcp) in [("ext", false), ("opa", true)] {
        let config = [
            meshes.clone(),
            // HTTP-only fields are left out on TCP, as for DENY.
            ap("prod", "ext", &custom(provider, "/admin*")),
        ]
        .concat();
        let e = engine(&config);
        let wp = e.workload(&web());
        let d = tcp(5432).decide(&wp);
        assert_eq!(d.verdict, Allow, "{d}");
        assert_eq!(d.ext_authz.is_some(), on_tcp, "{provider}: {d}");
        assert!(get("/admin").decide(&wp).ext_authz.is_some());
        assert!(get("/other").decide(&wp).ext_authz.is_none());
    }
}

#[test]
fn no_allow_policy_means_allow_and_empty_allow_means_deny() {
    check(
        &ap(
            "prod",
            "deny-post",
            "action: DENY\nrules:\n- to:\n  - operation:\n      methods: [\"POST\"]\n",
        ),
        &web(),
        vec![
            (
                "only a DENY that does not match",
                get("/"),
                Allow,
                "no ALLOW policy applies to this workload and no DENY policy matched",
            ),
            (
                "the DENY matches",
                http("POST", "/"),
                Deny,
                "DENY policy prod/deny-post",
            ),
        ],
    );
    // An ALLOW policy with an empty spec (or no rules) matches nothing: deny all.
    for spec in ["{}\n", "action: ALLOW\n", "rules: []\n"] {
        check(
            &ap("prod", "deny-all", spec),
            &web(),
            vec![
                (
                    "empty ALLOW denies HTTP",
                    get("/"),
                    Deny,
                    "no rule of the ALLOW policies that apply matched (prod/deny-all)",
                ),
                ("empty ALLOW denies TCP", tcp(5432), Deny, "(prod/deny-all)"),
            ],
        );
    }
    // `rules: [{}]` matches every request, HTTP or TCP, mTLS or not.
    let config = [
        ap("prod", "allow-all", "rules:\n- {}\n"),
        ap(
            "prod",
            "allow-get",
            "rules:\n- to:\n  - operation:\n      methods: [\"GET\"]\n",
        ),
    ]
    .concat();
    check(
        &config,
        &web(),
        vec![
            (
                "allow-all HTTP",
                http("DELETE", "/x"),
                Allow,
                "rule 0 of ALLOW policy prod/allow-all",
            ),
            ("allow-all TCP", tcp(5432), Allow, "prod/allow-all"),
            (
                "allow-all plaintext",
                get("/").plaintext(),
                Allow,
                "ALLOW policy",
            ),
        ],
    );
    // `rules: [{}]` in a DENY policy denies everything.
    check(
        &ap("prod", "deny-everything", "action: DENY\nrules:\n- {}\n"),
        &web(),
        vec![
            (
                "deny-all HTTP",
                get("/"),
                Deny,
                "rule 0 of DENY policy prod/deny-everything",
            ),
            ("deny-all TCP", tcp(1), Deny, "prod/deny-everything"),
        ],
    );
}

#[test]
fn audit_does_not_change_the_verdict() {
    let config = [
        ap(
            "prod",
            "audit-all",
            "action: AUDIT\nrules:\n- to:\n  - operation:\n      paths: [\"/a*\"]\n",
        ),
        ap(
            "prod",
            "deny-b",
            "action: DENY\nrules:\n- to:\n  - operation:\n      paths: [\"/ab\"]\n",
        ),
    ]
    .concat();
    check(
        &config,
        &web(),
        vec![
            (
                "audited and allowed",
                get("/a"),
                Allow,
                "no ALLOW policy applies to this workload and no DENY policy matched; audited by rule 0 of AUDIT policy prod/audit-all",
            ),
            (
                "audited and denied",
                get("/ab"),
                Deny,
                "DENY: matched rule 0 of DENY policy prod/deny-b; audited by rule 0 of AUDIT policy prod/audit-all",
            ),
            ("not audited", get("/b"), Allow, "no ALLOW policy applies"),
        ],
    );
    let e = engine(&config);
    let d = get("/a").decide(&e.workload(&web()));
    assert_eq!(d.audit.len(), 1);
    assert!(get("/b").decide(&e.workload(&web())).audit.is_empty());
}

#[test]
fn dry_run_policies_are_reported_not_enforced() {
    let dry = "istio.io/dry-run: \"true\"\n";
    let annotations = format!("annotations:\n{}", indent(dry, 2));
    let config = [
        doc(
            "AuthorizationPolicy",
            "prod",
            "dry-deny",
            &annotations,
            "action: DENY\nrules:\n- to:\n  - operation:\n      paths: [\"/admin\"]\n",
        ),
        doc(
            "AuthorizationPolicy",
            "prod",
            "dry-allow",
            &annotations,
            "rules:\n- to:\n  - operation:\n      methods: [\"GET\"]\n",
        ),
    ]
    .concat();
    check(
        &config,
        &web(),
        vec![
            (
                "dry-run DENY would deny",
                get("/admin"),
                Allow,
                "dry-run: rule 0 of DENY policy prod/dry-deny would DENY",
            ),
            (
                "dry-run ALLOW would allow",
                get("/"),
                Allow,
                "dry-run: rule 0 of ALLOW policy prod/dry-allow would ALLOW",
            ),
            (
                "dry-run ALLOW would deny",
                http("POST", "/"),
                Allow,
                "dry-run: ALLOW policy prod/dry-allow would DENY",
            ),
        ],
    );
    let e = engine(&config);
    let d = get("/admin").decide(&e.workload(&web()));
    assert_eq!(d.reason, Reason::NoAllowPolicies);
    assert_eq!(d.dry_run.len(), 2);
    // `false` enforces the policy.
    let enforced = doc(
        "AuthorizationPolicy",
        "prod",
        "real-deny",
        "annotations:\n  istio.io/dry-run: \"False\"\n",
        "action: DENY\nrules:\n- to:\n  - operation:\n      paths: [\"/admin\"]\n",
    );
    check(
        &enforced,
        &web(),
        vec![(
            "dry-run False enforces",
            get("/admin"),
            Deny,
            "DENY policy prod/real-deny",
        )],
    );
}

// ------------------------------------------------------------------ scope

#[test]
fn root_namespace_policies_apply_to_every_namespace() {
    let config = [
        ap("istio-system", "global-deny", "action: DENY\nrules:\n- to:\n  - operation:\n      paths: [\"/admin*\"]\n"),
        ap("istio-system", "global-allow-web", "selector:\n  matchLabels:\n    app: web\nrules:\n- to:\n  - operation:\n      methods: [\"GET\"]\n"),
        ap("other", "other-deny", "action: DENY\nrules:\n- {}\n"),
    ]
    .concat();
    check(
        &config,
        &web(),
        vec![
            (
                "root DENY applies in prod",
                get("/admin"),
                Deny,
                "DENY policy istio-system/global-deny",
            ),
            (
                "root ALLOW with selector applies",
                get("/"),
                Allow,
                "ALLOW policy istio-system/global-allow-web",
            ),
            (
                "root ALLOW denies the rest",
                http("PUT", "/"),
                Deny,
                "(istio-system/global-allow-web)",
            ),
        ],
    );
    // A workload without the label is governed only by the root DENY.
    check(
        &config,
        &wl("prod", "db", &[("app", "db")]),
        vec![
            (
                "selector does not match",
                http("PUT", "/"),
                Allow,
                "no ALLOW policy applies",
            ),
            (
                "root DENY still applies",
                get("/admin/x"),
                Deny,
                "istio-system/global-deny",
            ),
        ],
    );
    // A policy in another namespace never applies.
    check(
        &config,
        &wl("third", "x", &[]),
        vec![
            (
                "other namespace",
                get("/"),
                Allow,
                "no ALLOW policy applies",
            ),
            // The root DENY uses only HTTP fields: on TCP it denies everything.
            (
                "root HTTP-only DENY on TCP",
                tcp(80),
                Deny,
                "DENY policy istio-system/global-deny",
            ),
        ],
    );
    // With another root namespace, istio-system is an ordinary namespace.
    let moved = [
        mesh("rootNamespace: mesh-root\n"),
        config.clone(),
        ap(
            "mesh-root",
            "root-deny-tcp",
            "action: DENY\nrules:\n- to:\n  - operation:\n      ports: [\"5432\"]\n",
        ),
    ]
    .concat();
    check(
        &moved,
        &web(),
        vec![
            (
                "istio-system no longer root",
                get("/admin"),
                Allow,
                "no ALLOW policy applies",
            ),
            (
                "the configured root applies",
                tcp(5432),
                Deny,
                "DENY policy mesh-root/root-deny-tcp",
            ),
        ],
    );
}

#[test]
fn selectors_match_all_their_labels() {
    let config = ap(
        "prod",
        "web-v1-only",
        "selector:\n  matchLabels:\n    app: web\n    version: v1\nrules:\n- to:\n  - operation:\n      methods: [\"GET\"]\n",
    );
    check(
        &config,
        &web(),
        vec![("both labels", http("POST", "/"), Deny, "(prod/web-v1-only)")],
    );
    check(
        &config,
        &wl("prod", "web", &[("app", "web"), ("version", "v2")]),
        vec![(
            "one label differs",
            http("POST", "/"),
            Allow,
            "no ALLOW policy applies",
        )],
    );
    check(
        &config,
        &wl("prod", "web", &[("app", "web")]),
        vec![(
            "one label missing",
            http("POST", "/"),
            Allow,
            "no ALLOW policy applies",
        )],
    );
    check(
        &config,
        &wl("staging", "web", &[("app", "web"), ("version", "v1")]),
        vec![("other namespace", http("POST", "/"), Allow, "no ALLOW")],
    );
}

#[test]
fn target_ref_policies_are_ignored_for_sidecars() {
    let config = [
        ap("prod", "gw-deny", "targetRefs:\n- kind: Gateway\n  group: gateway.networking.k8s.io\n  name: gw\naction: DENY\nrules:\n- {}\n"),
        ap("prod", "svc-allow", "targetRef:\n  kind: Service\n  name: web\nrules:\n- to:\n  - operation:\n      methods: [\"GET\"]\n"),
    ]
    .concat();
    check(
        &config,
        &web(),
        vec![(
            "targetRef policies skipped",
            http("POST", "/"),
            Allow,
            "no ALLOW policy applies",
        )],
    );
    assert!(engine(&config).workload(&web()).policies().is_empty());
}

// ------------------------------------------------------------------ fields

#[test]
fn not_fields_negate() {
    let config = ap(
        "prod",
        "allow-not",
        "rules:\n- from:\n  - source:\n      notNamespaces: [\"blocked\"]\n  to:\n  - operation:\n      notPaths: [\"/private*\"]\n      notMethods: [\"DELETE\"]\n",
    );
    check(
        &config,
        &web(),
        vec![
            (
                "nothing excluded",
                get("/x"),
                Allow,
                "ALLOW policy prod/allow-not",
            ),
            ("notPaths", get("/private/x"), Deny, "(prod/allow-not)"),
            ("notMethods", http("DELETE", "/x"), Deny, "(prod/allow-not)"),
            (
                "notNamespaces",
                get("/x").from("cluster.local/ns/blocked/sa/a"),
                Deny,
                "(prod/allow-not)",
            ),
            (
                "plaintext is not in a blocked namespace",
                get("/x").plaintext(),
                Allow,
                "prod/allow-not",
            ),
        ],
    );
    let config = ap(
        "prod",
        "deny-untrusted",
        "action: DENY\nrules:\n- from:\n  - source:\n      notPrincipals: [\"cluster.local/ns/trusted/*\"]\n",
    );
    check(
        &config,
        &web(),
        vec![
            (
                "trusted principal passes",
                get("/").from("cluster.local/ns/trusted/sa/a"),
                Allow,
                "no ALLOW policy",
            ),
            (
                "other principal denied",
                get("/"),
                Deny,
                "DENY policy prod/deny-untrusted",
            ),
            (
                "plaintext matches notPrincipals",
                tcp(80).plaintext(),
                Deny,
                "prod/deny-untrusted",
            ),
        ],
    );
    // Values of one field are ORed; fields and not-fields are ANDed.
    let config = ap(
        "prod",
        "mixed",
        "rules:\n- to:\n  - operation:\n      paths: [\"/a*\", \"/b*\"]\n      notPaths: [\"/a/secret\"]\n",
    );
    check(
        &config,
        &web(),
        vec![
            ("first value", get("/a/1"), Allow, "prod/mixed"),
            ("second value", get("/b/1"), Allow, "prod/mixed"),
            ("excluded", get("/a/secret"), Deny, "(prod/mixed)"),
            ("neither", get("/c"), Deny, "(prod/mixed)"),
        ],
    );
}

#[test]
fn from_to_entries_are_ored_and_parts_anded() {
    let config = ap(
        "prod",
        "combo",
        "rules:\n- from:\n  - source:\n      namespaces: [\"a\"]\n  - source:\n      namespaces: [\"b\"]\n  to:\n  - operation:\n      methods: [\"GET\"]\n  - operation:\n      paths: [\"/public*\"]\n  when:\n  - key: request.headers[x-env]\n    values: [\"prod\"]\n",
    );
    let ok = |r: Req| r.header("x-env", "prod");
    check(
        &config,
        &web(),
        vec![
            (
                "from a, GET",
                ok(get("/x").from("td/ns/a/sa/s")),
                Allow,
                "prod/combo",
            ),
            (
                "from b, public POST",
                ok(http("POST", "/public/1").from("td/ns/b/sa/s")),
                Allow,
                "prod/combo",
            ),
            (
                "from c",
                ok(get("/x").from("td/ns/c/sa/s")),
                Deny,
                "(prod/combo)",
            ),
            (
                "POST private",
                ok(http("POST", "/x").from("td/ns/a/sa/s")),
                Deny,
                "(prod/combo)",
            ),
            (
                "condition fails",
                get("/x").from("td/ns/a/sa/s"),
                Deny,
                "(prod/combo)",
            ),
        ],
    );
}

#[test]
fn ports() {
    let config = ap(
        "prod",
        "ports",
        "rules:\n- to:\n  - operation:\n      ports: [\"8080\", \"5432\"]\n      notPorts: [\"5432\"]\n",
    );
    check(
        &config,
        &web(),
        vec![
            ("HTTP on 8080", get("/"), Allow, "prod/ports"),
            ("TCP on 8080", tcp(8080), Allow, "prod/ports"),
            ("TCP on 5432 excluded", tcp(5432), Deny, "(prod/ports)"),
            ("TCP on 9090", tcp(9090), Deny, "(prod/ports)"),
        ],
    );
}

#[test]
fn http_only_fields_on_tcp() {
    // ALLOW: a rule using an HTTP-only field never matches TCP traffic.
    let config = ap(
        "prod",
        "allow",
        "rules:\n- to:\n  - operation:\n      methods: [\"GET\"]\n      ports: [\"9000\"]\n- from:\n  - source:\n      requestPrincipals: [\"*\"]\n- when:\n  - key: request.headers[x-a]\n    values: [\"*\"]\n- to:\n  - operation:\n      ports: [\"9001\"]\n",
    );
    check(
        &config,
        &web(),
        vec![
            (
                "ALLOW methods rule skipped on TCP",
                tcp(9000),
                Deny,
                "(prod/allow)",
            ),
            (
                "ALLOW port-only rule matches TCP",
                tcp(9001),
                Allow,
                "rule 3 of ALLOW policy prod/allow",
            ),
            (
                "same rule on HTTP",
                get("/").port(9000),
                Allow,
                "rule 0 of ALLOW policy prod/allow",
            ),
        ],
    );
    // DENY: the HTTP-only field is dropped and the rest of the rule applies.
    let config = ap(
        "prod",
        "deny",
        "action: DENY\nrules:\n- to:\n  - operation:\n      methods: [\"GET\"]\n      ports: [\"9000\"]\n",
    );
    check(
        &config,
        &web(),
        vec![
            (
                "DENY methods dropped on TCP",
                tcp(9000),
                Deny,
                "DENY policy prod/deny",
            ),
            ("DENY port differs", tcp(9001), Allow, "no ALLOW policy"),
            (
                "DENY on HTTP needs the method",
                http("POST", "/").port(9000),
                Allow,
                "no ALLOW policy",
            ),
            ("DENY on HTTP GET", get("/").port(9000), Deny, "prod/deny"),
        ],
    );
    // A DENY with only HTTP attributes denies every TCP connection.
    let config = [
        ap("prod", "deny-paths", "action: DENY\nrules:\n- to:\n  - operation:\n      notPaths: [\"/ok\"]\n"),
        ap("prod", "deny-jwt", "action: DENY\nrules:\n- from:\n  - source:\n      notRequestPrincipals: [\"*\"]\n  to:\n  - operation:\n      ports: [\"7000\"]\n"),
    ]
    .concat();
    check(
        &config,
        &web(),
        vec![
            (
                "DENY notPaths denies all TCP",
                tcp(1234),
                Deny,
                "DENY policy prod/deny-paths",
            ),
            (
                "DENY notPaths lets HTTP /ok pass",
                get("/ok"),
                Allow,
                "no ALLOW",
            ),
        ],
    );
    check(
        &ap(
            "prod",
            "deny-jwt",
            "action: DENY\nrules:\n- from:\n  - source:\n      notRequestPrincipals: [\"*\"]\n  to:\n  - operation:\n      ports: [\"7000\"]\n",
        ),
        &web(),
        vec![
            (
                "DENY requestPrincipals dropped on TCP",
                tcp(7000),
                Deny,
                "DENY policy prod/deny-jwt",
            ),
            ("DENY port differs", tcp(7001), Allow, "no ALLOW"),
            (
                "HTTP without a JWT denied",
                get("/").port(7000),
                Deny,
                "prod/deny-jwt",
            ),
            (
                "HTTP with a JWT passes",
                get("/").port(7000).jwt(json!({"iss": "i", "sub": "s"})),
                Allow,
                "no ALLOW",
            ),
        ],
    );
}

#[test]
fn principals_namespaces_and_service_accounts() {
    let config = [
        ap("prod", "principals", "rules:\n- from:\n  - source:\n      principals: [\"cluster.local/ns/a/sa/exact\", \"cluster.local/ns/pre/*\", \"*/sa/suffix\"]\n"),
        ap("prod", "namespaces", "rules:\n- from:\n  - source:\n      namespaces: [\"team-*\", \"a.b\"]\n"),
        ap("prod", "sas", "rules:\n- from:\n  - source:\n      serviceAccounts: [\"local\", \"other/remote\"]\n"),
        ap("prod", "any-authenticated", "rules:\n- from:\n  - source:\n      principals: [\"*\"]\n  to:\n  - operation:\n      paths: [\"/authn\"]\n"),
    ]
    .concat();
    check(
        &config,
        &web(),
        vec![
            (
                "exact principal",
                get("/").from("cluster.local/ns/a/sa/exact"),
                Allow,
                "ALLOW policy prod/principals",
            ),
            (
                "principal prefix",
                get("/").from("cluster.local/ns/pre/sa/x"),
                Allow,
                "prod/principals",
            ),
            (
                "principal suffix",
                get("/").from("td/ns/q/sa/suffix"),
                Allow,
                "prod/principals",
            ),
            (
                "principal differs",
                get("/").from("cluster.local/ns/a/sa/exact2"),
                Deny,
                "no rule of the ALLOW policies",
            ),
            (
                "namespace glob",
                get("/").from("td/ns/team-x/sa/y"),
                Allow,
                "ALLOW policy prod/namespaces",
            ),
            (
                "namespace dot is literal",
                get("/").from("td/ns/aXb/sa/y"),
                Deny,
                "no rule",
            ),
            (
                "namespace with dot",
                get("/").from("td/ns/a.b/sa/y"),
                Allow,
                "prod/namespaces",
            ),
            (
                "namespace must be a whole segment",
                get("/").from("td/ns/team/sa/y"),
                Deny,
                "no rule",
            ),
            (
                "bare service account is in the policy namespace",
                get("/").from("td/ns/prod/sa/local"),
                Allow,
                "ALLOW policy prod/sas",
            ),
            (
                "bare service account in another namespace",
                get("/").from("td/ns/client/sa/local"),
                Deny,
                "no rule",
            ),
            (
                "ns/sa service account",
                get("/").from("td/ns/other/sa/remote"),
                Allow,
                "prod/sas",
            ),
            (
                "service account with extra segments",
                get("/").from("td/ns/prod/x/y/sa/local/z"),
                Allow,
                "prod/sas",
            ),
            (
                "service account prefix is not enough",
                get("/").from("td/ns/prod/sa/local2"),
                Deny,
                "no rule",
            ),
            (
                "* needs an authenticated peer",
                get("/authn"),
                Allow,
                "prod/any-authenticated",
            ),
            (
                "* refuses plaintext",
                get("/authn").plaintext(),
                Deny,
                "no rule",
            ),
            (
                "plaintext never has a namespace",
                get("/").plaintext(),
                Deny,
                "no rule",
            ),
        ],
    );
}

#[test]
fn trust_domain_aliases() {
    let config = [
        mesh("trustDomain: td-new\ntrustDomainAliases: [td-old]\n"),
        ap("prod", "by-alias", "rules:\n- from:\n  - source:\n      principals: [\"td-old/ns/client/sa/app\"]\n"),
        ap("prod", "by-cluster-local", "rules:\n- when:\n  - key: source.principal\n    values: [\"cluster.local/ns/c2/sa/app\"]\n"),
        ap("prod", "four-parts", "rules:\n- from:\n  - source:\n      principals: [\"td-old/ns/c3/*\"]\n"),
    ]
    .concat();
    check(
        &config,
        &web(),
        vec![
            (
                "alias matches the mesh trust domain",
                get("/").from("td-new/ns/client/sa/app"),
                Allow,
                "ALLOW policy prod/by-alias",
            ),
            (
                "alias matches itself",
                get("/").from("td-old/ns/client/sa/app"),
                Allow,
                "prod/by-alias",
            ),
            (
                "foreign trust domain",
                get("/").from("evil/ns/client/sa/app"),
                Deny,
                "no rule",
            ),
            (
                "cluster.local means the mesh trust domain",
                get("/").from("td-new/ns/c2/sa/app"),
                Allow,
                "prod/by-cluster-local",
            ),
            (
                "cluster.local means the aliases too",
                get("/").from("td-old/ns/c2/sa/app"),
                Allow,
                "prod/by-cluster-local",
            ),
            (
                "literal cluster.local no longer matches",
                get("/").from("cluster.local/ns/c2/sa/app"),
                Deny,
                "no rule",
            ),
            (
                "four-part principals are not rewritten",
                get("/").from("td-new/ns/c3/sa/x"),
                Deny,
                "no rule",
            ),
            (
                "four-part principals match literally",
                get("/").from("td-old/ns/c3/sa/x"),
                Allow,
                "prod/four-parts",
            ),
        ],
    );
    // notPrincipals are expanded as well.
    let config = [
        mesh("trustDomain: td-new\ntrustDomainAliases: [td-old]\n"),
        ap("prod", "deny-not-old", "action: DENY\nrules:\n- from:\n  - source:\n      notPrincipals: [\"td-old/ns/client/sa/app\"]\n"),
    ]
    .concat();
    check(
        &config,
        &web(),
        vec![
            (
                "notPrincipals alias expanded",
                get("/").from("td-new/ns/client/sa/app"),
                Allow,
                "no ALLOW",
            ),
            (
                "notPrincipals other",
                get("/").from("td-new/ns/client/sa/other"),
                Deny,
                "prod/deny-not-old",
            ),
        ],
    );
}

#[test]
fn request_principals_and_jwt_claims() {
    let config = [
        doc("RequestAuthentication", "prod", "jwt", "", "jwtRules:\n- issuer: https://issuer.example\n  spaceDelimitedClaims: [roles]\n"),
        ap("prod", "rp", "rules:\n- from:\n  - source:\n      requestPrincipals: [\"https://issuer.example/alice\", \"https://other/*\", \"*/bob\"]\n  to:\n  - operation:\n      paths: [\"/rp\"]\n"),
        ap("prod", "groups", "rules:\n- to:\n  - operation:\n      paths: [\"/groups\"]\n  when:\n  - key: request.auth.claims[groups]\n    values: [\"admin\"]\n"),
        ap("prod", "nested", "rules:\n- to:\n  - operation:\n      paths: [\"/nested\"]\n  when:\n  - key: request.auth.claims[org][team]\n    values: [\"core*\"]\n"),
        ap("prod", "scope", "rules:\n- to:\n  - operation:\n      paths: [\"/scope\"]\n  when:\n  - key: request.auth.claims[scope]\n    values: [\"write\"]\n"),
        ap("prod", "roles", "rules:\n- to:\n  - operation:\n      paths: [\"/roles\"]\n  when:\n  - key: request.auth.claims[roles]\n    values: [\"editor\"]\n"),
        ap("prod", "aud", "rules:\n- to:\n  - operation:\n      paths: [\"/aud\"]\n  when:\n  - key: request.auth.audiences\n    values: [\"api\"]\n  - key: request.auth.presenter\n    values: [\"web-*\"]\n"),
        ap("prod", "auth-principal", "rules:\n- to:\n  - operation:\n      paths: [\"/ap\"]\n  when:\n  - key: request.auth.principal\n    values: [\"https://issuer.example/*\"]\n"),
    ]
    .concat();
    let jwt = |path: &str, claims: serde_json::Value| get(path).jwt(claims);
    check(
        &config,
        &web(),
        vec![
            (
                "request principal exact",
                jwt(
                    "/rp",
                    json!({"iss": "https://issuer.example", "sub": "alice"}),
                ),
                Allow,
                "ALLOW policy prod/rp",
            ),
            (
                "request principal wrong sub",
                jwt(
                    "/rp",
                    json!({"iss": "https://issuer.example", "sub": "mallory"}),
                ),
                Deny,
                "no rule",
            ),
            (
                "request principal sub prefix",
                jwt("/rp", json!({"iss": "https://other", "sub": "x"})),
                Allow,
                "prod/rp",
            ),
            (
                "request principal iss suffix",
                jwt("/rp", json!({"iss": "https://any", "sub": "bob"})),
                Allow,
                "prod/rp",
            ),
            ("no JWT", get("/rp"), Deny, "no rule"),
            (
                "list claim",
                jwt("/groups", json!({"groups": ["dev", "admin"]})),
                Allow,
                "ALLOW policy prod/groups",
            ),
            (
                "string claim",
                jwt("/groups", json!({"groups": "admin"})),
                Allow,
                "prod/groups",
            ),
            (
                "list without the value",
                jwt("/groups", json!({"groups": ["dev"]})),
                Deny,
                "no rule",
            ),
            (
                "non-string claims never match",
                jwt("/groups", json!({"groups": [1, true, {"admin": 1}]})),
                Deny,
                "no rule",
            ),
            (
                "claims are case-sensitive",
                jwt("/groups", json!({"groups": "Admin"})),
                Deny,
                "no rule",
            ),
            (
                "nested claim",
                jwt("/nested", json!({"org": {"team": "core-infra"}})),
                Allow,
                "ALLOW policy prod/nested",
            ),
            (
                "nested list claim",
                jwt("/nested", json!({"org": {"team": ["x", "core"]}})),
                Allow,
                "prod/nested",
            ),
            (
                "dotted name is not nesting",
                jwt("/nested", json!({"org.team": "core"})),
                Deny,
                "no rule",
            ),
            (
                "scope is space-delimited",
                jwt("/scope", json!({"scope": "read write"})),
                Allow,
                "ALLOW policy prod/scope",
            ),
            (
                "scope without the value",
                jwt("/scope", json!({"scope": "read writer"})),
                Deny,
                "no rule",
            ),
            (
                "RA spaceDelimitedClaims",
                jwt("/roles", json!({"roles": "viewer editor"})),
                Allow,
                "ALLOW policy prod/roles",
            ),
            (
                "audience and presenter",
                jwt("/aud", json!({"aud": ["x", "api"], "azp": "web-app"})),
                Allow,
                "ALLOW policy prod/aud",
            ),
            (
                "audience string",
                jwt("/aud", json!({"aud": "api", "azp": "web-1"})),
                Allow,
                "prod/aud",
            ),
            (
                "presenter differs",
                jwt("/aud", json!({"aud": "api", "azp": "cli"})),
                Deny,
                "no rule",
            ),
            (
                "request.auth.principal",
                jwt("/ap", json!({"iss": "https://issuer.example", "sub": "x"})),
                Allow,
                "ALLOW policy prod/auth-principal",
            ),
        ],
    );
    // Without a RequestAuthentication listing it, `roles` is one string.
    let no_ra = config.replace("spaceDelimitedClaims: [roles]", "audiences: [x]");
    check(
        &no_ra,
        &web(),
        vec![(
            "roles not split",
            jwt("/roles", json!({"roles": "viewer editor"})),
            Deny,
            "no rule",
        )],
    );
}

#[test]
fn headers_hosts_and_methods() {
    let config = [
        ap("prod", "tenant", "rules:\n- to:\n  - operation:\n      paths: [\"/h\"]\n  when:\n  - key: request.headers[X-Tenant]\n    values: [\"Acme\", \"*-corp\"]\n"),
        ap("prod", "present", "rules:\n- to:\n  - operation:\n      paths: [\"/p\"]\n  when:\n  - key: request.headers[x-present]\n    values: [\"*\"]\n"),
        ap("prod", "hosts", "rules:\n- to:\n  - operation:\n      hosts: [\"API.example.com\", \"*.Internal\", \"admin*\"]\n      paths: [\"/host\"]\n"),
        ap("prod", "methods", "rules:\n- to:\n  - operation:\n      methods: [\"P*\"]\n      paths: [\"/m\"]\n"),
    ]
    .concat();
    check(
        &config,
        &web(),
        vec![
            (
                "header name any case",
                get("/h").header("X-TENANT", "Acme"),
                Allow,
                "ALLOW policy prod/tenant",
            ),
            (
                "header name lower case",
                get("/h").header("x-tenant", "Acme"),
                Allow,
                "prod/tenant",
            ),
            (
                "header value is case-sensitive",
                get("/h").header("x-tenant", "acme"),
                Deny,
                "no rule",
            ),
            (
                "header value suffix",
                get("/h").header("X-Tenant", "big-corp"),
                Allow,
                "prod/tenant",
            ),
            (
                "repeated header joined with a comma",
                get("/h")
                    .header("x-tenant", "a")
                    .header("X-Tenant", "b-corp"),
                Allow,
                "prod/tenant",
            ),
            ("header missing", get("/h"), Deny, "no rule"),
            (
                "* means present, even empty",
                get("/p").header("X-Present", ""),
                Allow,
                "ALLOW policy prod/present",
            ),
            ("* needs the header", get("/p"), Deny, "no rule"),
            (
                "host case-insensitive",
                get("/host").host("api.EXAMPLE.com"),
                Allow,
                "ALLOW policy prod/hosts",
            ),
            (
                "host suffix case-insensitive",
                get("/host").host("svc.INTERNAL"),
                Allow,
                "prod/hosts",
            ),
            (
                "host prefix",
                get("/host").host("Admin.example.com"),
                Allow,
                "prod/hosts",
            ),
            (
                "host with port is a different value",
                get("/host").host("api.example.com:8080"),
                Deny,
                "no rule",
            ),
            (
                "method prefix",
                http("PUT", "/m"),
                Allow,
                "ALLOW policy prod/methods",
            ),
            (
                "methods are case-sensitive",
                http("put", "/m"),
                Deny,
                "no rule",
            ),
        ],
    );
}

#[test]
fn path_normalization_against_deny() {
    let config = [
        ap("prod", "deny-admin", "action: DENY\nrules:\n- to:\n  - operation:\n      paths: [\"/admin*\", \"/exact/\"]\n"),
        ap("prod", "allow-all", "rules:\n- {}\n"),
    ]
    .concat();
    let rows = |extra: Vec<Row>| {
        let mut rows: Vec<Row> = vec![
            (
                "dot-dot traversal",
                get("/public/../admin"),
                Deny,
                "DENY policy prod/deny-admin",
            ),
            (
                "encoded dots",
                get("/public/%2E%2E/admin"),
                Deny,
                "prod/deny-admin",
            ),
            (
                "encoded unreserved letter",
                get("/%61dmin"),
                Deny,
                "prod/deny-admin",
            ),
            (
                "backslash traversal",
                get("/public\\..\\admin"),
                Deny,
                "prod/deny-admin",
            ),
            (
                "single dot segments",
                get("/./admin/./x"),
                Deny,
                "prod/deny-admin",
            ),
            (
                "encoded slash still has the prefix",
                get("/admin%2F"),
                Deny,
                "prod/deny-admin",
            ),
            (
                "query is not part of the path",
                get("/public?x=/admin"),
                Allow,
                "ALLOW policy prod/allow-all",
            ),
            ("query stripped", get("/admin?x=1"), Deny, "prod/deny-admin"),
            (
                "fragment stripped",
                get("/exact/#x"),
                Deny,
                "prod/deny-admin",
            ),
            (
                "case is not normalized",
                get("/ADMIN"),
                Allow,
                "prod/allow-all",
            ),
            (
                "encoded NUL refused",
                get("/x%00"),
                Deny,
                "invalid request path: path contains an encoded NUL (%00)",
            ),
        ];
        rows.extend(extra);
        rows
    };
    check(
        &config,
        &web(),
        rows(vec![
            ("BASE keeps %2F", get("/exact%2F"), Allow, "prod/allow-all"),
            (
                "BASE keeps double slashes",
                get("/exact//"),
                Allow,
                "prod/allow-all",
            ),
        ]),
    );
    let merge = [
        mesh("pathNormalization:\n  normalization: MERGE_SLASHES\n"),
        config.clone(),
    ]
    .concat();
    check(
        &merge,
        &web(),
        rows(vec![
            (
                "MERGE_SLASHES merges",
                get("/exact//"),
                Deny,
                "prod/deny-admin",
            ),
            ("MERGE keeps %2F", get("/exact%2F"), Allow, "allow-all"),
        ]),
    );
    let decode = [
        mesh("pathNormalization:\n  normalization: DECODE_AND_MERGE_SLASHES\n"),
        config.clone(),
    ]
    .concat();
    check(
        &decode,
        &web(),
        rows(vec![
            (
                "DECODE decodes %2F",
                get("/exact%2F"),
                Deny,
                "prod/deny-admin",
            ),
            (
                "DECODE decodes %5C",
                get("/exact%5c"),
                Deny,
                "prod/deny-admin",
            ),
        ]),
    );
    let none = [
        mesh("pathNormalization:\n  normalization: NONE\n"),
        config.clone(),
    ]
    .concat();
    check(
        &none,
        &web(),
        vec![
            (
                "NONE leaves traversal",
                get("/public/../admin"),
                Allow,
                "prod/allow-all",
            ),
            (
                "NONE still strips the query",
                get("/admin?x"),
                Deny,
                "prod/deny-admin",
            ),
        ],
    );
}

#[test]
fn path_templates() {
    let config = ap(
        "prod",
        "tmpl",
        "rules:\n- to:\n  - operation:\n      paths: [\"/api/{*}/items\", \"/files/{**}\", \"/v/{*}/x/{**}/end\"]\n",
    );
    check(
        &config,
        &web(),
        vec![
            (
                "one segment",
                get("/api/v1/items"),
                Allow,
                "ALLOW policy prod/tmpl",
            ),
            ("two segments", get("/api/v1/v2/items"), Deny, "no rule"),
            ("empty segment", get("/api//items"), Deny, "no rule"),
            ("rest", get("/files/a/b/c.txt"), Allow, "prod/tmpl"),
            ("rest may be empty", get("/files/"), Allow, "prod/tmpl"),
            ("rest with a query", get("/files/a?x=1"), Allow, "prod/tmpl"),
            ("mixed", get("/v/1/x/a/b/end"), Allow, "prod/tmpl"),
            ("mixed wrong literal", get("/v/1/y/a/end"), Deny, "no rule"),
        ],
    );
}

#[test]
fn ip_blocks_v4_and_v6() {
    let config = [
        ap("prod", "ips", "rules:\n- from:\n  - source:\n      ipBlocks: [\"2001:db8::/32\", \"10.1.2.3/16\", \"192.0.2.7\"]\n      notIpBlocks: [\"2001:db8:dead::/48\"]\n"),
        ap("prod", "deny-remote", "action: DENY\nrules:\n- from:\n  - source:\n      remoteIpBlocks: [\"203.0.113.0/24\", \"2001:db8:bad::/48\"]\n"),
        ap("prod", "dst", "rules:\n- when:\n  - key: destination.ip\n    values: [\"fd00::/8\"]\n  - key: destination.port\n    values: [\"15000\"]\n"),
    ]
    .concat();
    check(
        &config,
        &web(),
        vec![
            (
                "v6 in block",
                tcp(80).src("2001:db8:1::5"),
                Allow,
                "ALLOW policy prod/ips",
            ),
            ("v6 outside", tcp(80).src("2001:db9::1"), Deny, "no rule"),
            (
                "v6 excluded",
                tcp(80).src("2001:db8:dead::1"),
                Deny,
                "no rule",
            ),
            (
                "v4 host bits ignored",
                tcp(80).src("10.1.200.9"),
                Allow,
                "prod/ips",
            ),
            ("v4 outside", tcp(80).src("10.2.0.1"), Deny, "no rule"),
            (
                "single address",
                tcp(80).src("192.0.2.7"),
                Allow,
                "prod/ips",
            ),
            (
                "v4-mapped v6 compared as v4",
                tcp(80).src("::ffff:10.1.0.1"),
                Allow,
                "prod/ips",
            ),
            (
                "remote address denied",
                tcp(80).src("10.1.0.1").remote("203.0.113.9"),
                Deny,
                "DENY policy prod/deny-remote",
            ),
            (
                "remote v6 denied",
                tcp(80).src("10.1.0.1").remote("2001:db8:bad::1"),
                Deny,
                "prod/deny-remote",
            ),
            (
                "remote falls back to the peer",
                tcp(80).src("203.0.113.1"),
                Deny,
                "prod/deny-remote",
            ),
            (
                "destination ip and port",
                tcp(15000).src("172.16.0.1").dst("fd00::1"),
                Allow,
                "ALLOW policy prod/dst",
            ),
            (
                "destination port differs",
                tcp(15001).src("172.16.0.1").dst("fd00::1"),
                Deny,
                "no rule",
            ),
            (
                "destination unknown",
                tcp(15000).src("172.16.0.1"),
                Deny,
                "no rule",
            ),
        ],
    );
}

#[test]
fn conditions_on_tcp_and_unevaluable_keys() {
    let config = [
        ap("prod", "sni", "rules:\n- when:\n  - key: connection.sni\n    values: [\"*.example.com\"]\n  - key: source.ip\n    notValues: [\"10.9.0.0/16\"]\n"),
        ap("prod", "sa-cond", "rules:\n- when:\n  - key: source.serviceAccount\n    values: [\"client/app\"]\n  - key: source.namespace\n    values: [\"client\"]\n  - key: remote.ip\n    values: [\"10.0.0.0/8\"]\n"),
        ap("prod", "experimental", "rules:\n- when:\n  - key: experimental.envoy.filters.network.mysql_proxy[db.t]\n    values: [\"[update]\"]\n"),
    ]
    .concat();
    check(
        &config,
        &web(),
        vec![
            (
                "sni on TCP",
                tcp(443).sni("db.example.com").from("td/ns/x/sa/y"),
                Allow,
                "ALLOW policy prod/sni",
            ),
            (
                "sni with excluded source",
                tcp(443)
                    .sni("db.example.com")
                    .src("10.9.1.1")
                    .from("td/ns/x/sa/y"),
                Deny,
                "no rule",
            ),
            (
                "source.serviceAccount and namespace",
                tcp(1),
                Allow,
                "ALLOW policy prod/sa-cond",
            ),
            (
                "an unevaluable key never allows",
                tcp(1).from("td/ns/x/sa/y"),
                Deny,
                "no rule",
            ),
        ],
    );
    // In DENY, an unevaluable condition is dropped, so the rule matches.
    check(
        &ap(
            "prod",
            "deny-exp",
            "action: DENY\nrules:\n- to:\n  - operation:\n      ports: [\"3306\"]\n  when:\n  - key: experimental.envoy.filters.network.mysql_proxy[db.t]\n    values: [\"[update]\"]\n",
        ),
        &web(),
        vec![
            (
                "DENY with unevaluable key denies",
                tcp(3306),
                Deny,
                "DENY policy prod/deny-exp",
            ),
            ("DENY other port", tcp(3307), Allow, "no ALLOW"),
        ],
    );
}

// ------------------------------------------------------------------ peer authentication

#[test]
fn strict_mtls_rejects_plaintext() {
    let pa = |ns: &str, name: &str, spec: &str| doc("PeerAuthentication", ns, name, "", spec);
    let config = [
        pa("istio-system", "mesh", "mtls:\n  mode: STRICT\n"),
        pa("prod", "web-ports", "selector:\n  matchLabels:\n    app: web\nmtls:\n  mode: UNSET\nportLevelMtls:\n  8081:\n    mode: PERMISSIVE\n  8082:\n    mode: DISABLE\n"),
        pa("lax", "ns", "mtls:\n  mode: PERMISSIVE\n"),
    ]
    .concat();
    check(
        &config,
        &web(),
        vec![
            (
                "plaintext refused",
                get("/").plaintext(),
                Deny,
                "plaintext connection refused: mTLS mode STRICT from mesh-wide PeerAuthentication istio-system/mesh",
            ),
            ("mTLS accepted", get("/"), Allow, "no ALLOW policy"),
            (
                "port-level PERMISSIVE",
                tcp(8081).plaintext(),
                Allow,
                "no ALLOW policy",
            ),
            (
                "port-level DISABLE",
                tcp(8082).plaintext(),
                Allow,
                "no ALLOW policy",
            ),
            (
                "other port inherits STRICT",
                tcp(8083).plaintext(),
                Deny,
                "mesh-wide PeerAuthentication istio-system/mesh",
            ),
        ],
    );
    check(
        &config,
        &wl("lax", "x", &[]),
        vec![(
            "namespace overrides mesh",
            tcp(1).plaintext(),
            Allow,
            "no ALLOW",
        )],
    );
    // Workload STRICT over a PERMISSIVE namespace.
    let config = [
        pa("prod", "ns", "mtls:\n  mode: PERMISSIVE\n"),
        pa(
            "prod",
            "web-strict",
            "selector:\n  matchLabels:\n    app: web\nmtls:\n  mode: STRICT\n",
        ),
    ]
    .concat();
    check(
        &config,
        &web(),
        vec![(
            "workload STRICT",
            tcp(1).plaintext(),
            Deny,
            "workload PeerAuthentication prod/web-strict",
        )],
    );
    check(
        &config,
        &wl("prod", "db", &[("app", "db")]),
        vec![(
            "namespace PERMISSIVE",
            tcp(1).plaintext(),
            Allow,
            "no ALLOW",
        )],
    );
    // Selector policies in the root namespace are ignored.
    let config = pa(
        "istio-system",
        "root-selector",
        "selector:\n  matchLabels:\n    app: web\nmtls:\n  mode: STRICT\n",
    );
    check(
        &config,
        &web(),
        vec![(
            "root selector ignored",
            tcp(1).plaintext(),
            Allow,
            "no ALLOW",
        )],
    );
    // STRICT refusal comes before authorization.
    let config = [
        pa("prod", "strict", "mtls:\n  mode: STRICT\n"),
        ap("prod", "allow-all", "rules:\n- {}\n"),
    ]
    .concat();
    let e = engine(&config);
    let d = tcp(1).plaintext().decide(&e.workload(&web()));
    assert_eq!(
        d.reason,
        Reason::PlaintextRejected {
            source: "namespace PeerAuthentication prod/strict".into()
        }
    );
    assert_eq!(d.reason.code(), "plaintext_rejected");
}

// ------------------------------------------------------------------ divergences from Istio

/// Istio's `requestPrincipalGenerator` splits the *policy value* at its last
/// `/` and matches the two halves against the JWT's own `iss` and `sub`
/// claims. meshward joins `iss/sub` into one string and splits that again at
/// the last `/` (`JwtAuth::issuer_subject`), so a subject containing `/`
/// shifts into the issuer: the token {iss: "https://a", sub: "x/y"} matches
/// a policy for issuer "https://a/x", subject "y".
#[test]
fn regression_request_principal_subject_with_slash_matches_other_issuer() {
    let config = [
        doc(
            "RequestAuthentication",
            "prod",
            "jwt",
            "",
            "jwtRules:\n- issuer: https://a\n- issuer: https://a/x\n",
        ),
        ap(
            "prod",
            "only-issuer-a-x",
            "rules:\n- from:\n  - source:\n      requestPrincipals: [\"https://a/x/y\"]\n",
        ),
    ]
    .concat();
    check(
        &config,
        &web(),
        vec![
            (
                "the intended token",
                get("/").jwt(json!({"iss": "https://a/x", "sub": "y"})),
                Allow,
                "prod/only-issuer-a-x",
            ),
            (
                "another issuer's subject with a slash",
                get("/").jwt(json!({"iss": "https://a", "sub": "x/y"})),
                Deny,
                "no rule of the ALLOW policies that apply matched (prod/only-issuer-a-x)",
            ),
        ],
    );
}

#[test]
fn helpers_produce_clean_config() {
    // The helpers produce YAML that loads without warnings.
    let mut l = Loader::new();
    l.add_source(
        "t.yaml",
        &[mesh(EXT_PROVIDER), ap("prod", "x", "rules:\n- {}\n")].concat(),
    );
    let loaded = l.finish().unwrap();
    assert!(loaded.warnings.0.is_empty(), "{}", loaded.warnings);
}

#[test]
fn the_forwarded_target_is_the_path_the_decision_saw() {
    let cases = [
        // (pathNormalization, raw target, forwarded)
        ("BASE", "/a/./b/../c?x=/../y#frag", Ok("/a/c?x=/../y")),
        ("BASE", "/%7Euser/x", Ok("/~user/x")),
        ("BASE", "/a//b%2F..", Ok("/a//b%2F..")),
        ("BASE", "/plain?q=1", Ok("/plain?q=1")),
        ("BASE", "/plain#only-a-fragment", Ok("/plain")),
        ("MERGE_SLASHES", "//a///b?k=v", Ok("/a/b?k=v")),
        ("DECODE_AND_MERGE_SLASHES", "/a%2F..%2Fadmin", Ok("/admin")),
        ("NONE", "/a/../b?q", Ok("/a/../b?q")),
        ("BASE", "/a%00b", Err(())),
    ];
    for (mode, raw, expected) in cases {
        let e = engine(&mesh(&format!(
            "pathNormalization: {{normalization: {mode}}}\n"
        )));
        let p = e.workload(&wl("prod", "web", &[]));
        let got = p
            .forwarded_target(raw)
            .map(|t| t.into_owned())
            .map_err(|_| ());
        assert_eq!(got, expected.map(str::to_string), "{mode} {raw}");
    }
}

// ------------------------------------------------------------------ raw header bytes

/// Headers whose values are the bytes as received.
struct Raw(Vec<(&'static str, Vec<u8>)>);

impl Headers for Raw {
    fn header(&self, name: &str) -> Option<std::borrow::Cow<'_, [u8]>> {
        meshward_policy::join_values(
            self.0
                .iter()
                .filter(|(n, _)| *n == name)
                .map(|(_, v)| v.as_slice()),
        )
    }
}

/// Header values that are not UTF-8 (obs-text, which HTTP allows) are
/// matched as bytes, as Envoy matches them: never taken as absent while
/// the proxy forwards them (a DENY on the header's presence was bypassed
/// with `x-block: \xff`).
#[test]
fn header_values_that_are_not_utf8_are_matched_as_bytes() {
    let config = [
        ap("prod", "block", "action: DENY\nrules:\n- when:\n  - key: request.headers[x-block]\n    values: [\"*\"]\n"),
        ap("prod", "deny-prefix", "action: DENY\nrules:\n- when:\n  - key: request.headers[x-prefix]\n    values: [\"evil*\"]\n"),
        ap("prod", "deny-suffix", "action: DENY\nrules:\n- when:\n  - key: request.headers[x-suffix]\n    values: [\"*evil\"]\n"),
        ap("prod", "allow-tenant", "rules:\n- when:\n  - key: request.headers[x-tenant]\n    values: [\"acme\"]\n"),
    ]
    .concat();
    type Fields = Vec<(&'static str, Vec<u8>)>;
    let e = engine(&config);
    let wp = e.workload(&web());
    let decide = |headers: Fields| {
        let headers = Raw(headers);
        let http = HttpAttributes {
            method: "GET",
            path: "/",
            host: "web.example.com",
            headers: &headers,
            auth: None,
        };
        let d = wp.decide(&Request {
            principal: Some(CLIENT),
            source_ip: "10.0.0.1".parse().unwrap(),
            remote_ip: None,
            destination_ip: None,
            port: 8080,
            sni: None,
            http: Some(http),
        });
        (d.verdict, d.to_string())
    };
    let tenant = || ("x-tenant", b"acme".to_vec());
    let rows: Vec<(&str, Fields, Verdict, &str)> = vec![
        ("plain request", vec![tenant()], Allow, "prod/allow-tenant"),
        (
            "present, one byte 0xff",
            vec![tenant(), ("x-block", vec![0xff])],
            Deny,
            "prod/block",
        ),
        (
            "present, ascii",
            vec![tenant(), ("x-block", b"1".to_vec())],
            Deny,
            "prod/block",
        ),
        (
            "prefix before a bad byte",
            vec![tenant(), ("x-prefix", b"evil\xfe".to_vec())],
            Deny,
            "prod/deny-prefix",
        ),
        (
            "suffix after a bad byte",
            vec![tenant(), ("x-suffix", b"\xc3evil".to_vec())],
            Deny,
            "prod/deny-suffix",
        ),
        (
            "repeated, one bad",
            vec![
                tenant(),
                ("x-block", b"a".to_vec()),
                ("x-block", vec![0x80]),
            ],
            Deny,
            "prod/block",
        ),
        (
            "exact value with a trailing bad byte is another value",
            vec![("x-tenant", b"acme\xff".to_vec())],
            Deny,
            "no rule",
        ),
    ];
    let mut failures = Vec::new();
    for (name, headers, verdict, explain) in rows {
        let (v, text) = decide(headers);
        if v != verdict || !text.contains(explain) {
            failures.push(format!(
                "{name}: expected {verdict} with {explain:?}, got: {text}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// ------------------------------------------------------------------ values Istio applies as written

/// A lower-case method is compared as written, as Istio's `:method` header
/// matcher compares it: it never matches a request's upper-case method.
#[test]
fn lower_case_methods_never_match_as_in_istio() {
    check(
        &ap(
            "prod",
            "allow-get",
            "rules:\n- to:\n  - operation:\n      methods: [\"get\"]\n",
        ),
        &web(),
        vec![
            ("ALLOW get never allows GET", get("/"), Deny, "no rule"),
            (
                "it is a literal",
                http("get", "/"),
                Allow,
                "ALLOW policy prod/allow-get",
            ),
        ],
    );
    check(
        &ap(
            "prod",
            "deny-post",
            "action: DENY\nrules:\n- to:\n  - operation:\n      methods: [\"post\"]\n",
        ),
        &web(),
        vec![(
            "DENY post never denies POST",
            http("POST", "/"),
            Allow,
            "no ALLOW",
        )],
    );
    check(
        &ap(
            "prod",
            "deny-not-get",
            "action: DENY\nrules:\n- to:\n  - operation:\n      notMethods: [\"get\"]\n",
        ),
        &web(),
        vec![(
            "notMethods get excludes nothing upper-case",
            get("/"),
            Deny,
            "DENY policy prod/deny-not-get",
        )],
    );
}

/// A `*` that is not the first or last character is a literal character,
/// as in Istio's string, host, header and request-principal matchers; only
/// a leading (else trailing) `*` is a wildcard.
#[test]
fn a_middle_star_is_a_literal_character() {
    let config = [
        ap(
            "prod",
            "principal",
            "rules:\n- from:\n  - source:\n      principals: [\"cluster.local/ns/*/sa/app\"]\n",
        ),
        ap(
            "prod",
            "host",
            "rules:\n- to:\n  - operation:\n      hosts: [\"a.*.com\"]\n",
        ),
        ap(
            "prod",
            "path",
            "rules:\n- to:\n  - operation:\n      paths: [\"/api/*/items\"]\n",
        ),
        ap(
            "prod",
            "suffix",
            "rules:\n- to:\n  - operation:\n      paths: [\"*/x*y\"]\n",
        ),
        ap(
            "prod",
            "method",
            "rules:\n- to:\n  - operation:\n      methods: [\"G*T\"]\n",
        ),
        ap(
            "prod",
            "condition",
            "rules:\n- when:\n  - key: source.principal\n    values: [\"td/ns/a*b/sa/c\"]\n",
        ),
    ]
    .concat();
    check(
        &config,
        &web(),
        vec![
            (
                "principal: not a wildcard",
                get("/").from("cluster.local/ns/client/sa/app"),
                Deny,
                "no rule",
            ),
            (
                "principal: literal star",
                get("/").from("cluster.local/ns/*/sa/app"),
                Allow,
                "ALLOW policy prod/principal",
            ),
            (
                "host: not a wildcard",
                get("/").host("a.b.com"),
                Deny,
                "no rule",
            ),
            (
                "host: literal star, any case",
                get("/").host("A.*.COM"),
                Allow,
                "ALLOW policy prod/host",
            ),
            (
                "path: not a wildcard",
                get("/api/v1/items"),
                Deny,
                "no rule",
            ),
            (
                "path: literal star",
                get("/api/*/items"),
                Allow,
                "ALLOW policy prod/path",
            ),
            (
                "leading star is the wildcard, the other is literal",
                get("/z/x*y"),
                Allow,
                "ALLOW policy prod/suffix",
            ),
            (
                "the other star is no wildcard",
                get("/z/xay"),
                Deny,
                "no rule",
            ),
            ("method: not a wildcard", get("/"), Deny, "no rule"),
            (
                "method: literal star",
                http("G*T", "/"),
                Allow,
                "ALLOW policy prod/method",
            ),
            (
                "condition: literal star",
                get("/").from("td/ns/a*b/sa/c"),
                Allow,
                "ALLOW policy prod/condition",
            ),
            (
                "condition: not a wildcard",
                get("/").from("td/ns/axb/sa/c"),
                Deny,
                "no rule",
            ),
        ],
    );
    // Request principals: `iss/sub` halves, literal stars inside.
    let config = [
        doc(
            "RequestAuthentication",
            "prod",
            "jwt",
            "",
            "jwtRules:\n- issuer: https://iss\n",
        ),
        ap(
            "prod",
            "rp",
            "rules:\n- from:\n  - source:\n      requestPrincipals: [\"https://i*s/sub\"]\n",
        ),
    ]
    .concat();
    check(
        &config,
        &web(),
        vec![
            (
                "request principal: not a wildcard",
                get("/").jwt(json!({"iss": "https://iss", "sub": "sub"})),
                Deny,
                "no rule",
            ),
            (
                "request principal: literal star",
                get("/").jwt(json!({"iss": "https://i*s", "sub": "sub"})),
                Allow,
                "ALLOW policy prod/rp",
            ),
        ],
    );
}

/// An empty `from` or `to` reaches Istio as unset: the rule matches any
/// source or any operation.
#[test]
fn empty_from_and_to_match_anything() {
    check(
        &ap(
            "prod",
            "from-anyone",
            "rules:\n- from: []\n  to:\n  - operation:\n      paths: [\"/open\"]\n",
        ),
        &web(),
        vec![
            (
                "any source",
                get("/open").plaintext(),
                Allow,
                "ALLOW policy prod/from-anyone",
            ),
            ("other path", get("/closed"), Deny, "no rule"),
        ],
    );
    check(
        &ap("prod", "deny-all", "action: DENY\nrules:\n- to: []\n"),
        &web(),
        vec![
            (
                "any operation",
                get("/x"),
                Deny,
                "DENY policy prod/deny-all",
            ),
            ("TCP too", tcp(5432), Deny, "DENY policy prod/deny-all"),
        ],
    );
}

/// `trustDomains`, `notTrustDomains` and `source.trustDomain` (Istio 1.30):
/// the trust domain of the peer's SPIFFE ID, with aliases expanded.
#[test]
fn trust_domains() {
    let config = [
        mesh("trustDomain: td-new\ntrustDomainAliases: [td-old]\n"),
        ap("prod", "partner", "rules:\n- from:\n  - source:\n      trustDomains: [\"*.partner.example\"]\n  to:\n  - operation:\n      paths: [\"/partner\"]\n"),
        ap("prod", "own", "rules:\n- from:\n  - source:\n      trustDomains: [\"td-old\"]\n  to:\n  - operation:\n      paths: [\"/own\"]\n"),
        ap("prod", "cond", "rules:\n- when:\n  - key: source.trustDomain\n    values: [\"exact.example\"]\n"),
        ap("prod", "deny-foreign", "action: DENY\nrules:\n- from:\n  - source:\n      notTrustDomains: [\"td-new\", \"*.partner.example\", \"exact.example\"]\n"),
    ]
    .concat();
    check(
        &config,
        &web(),
        vec![
            (
                "suffix wildcard",
                get("/partner").from("eu.partner.example/ns/a/sa/b"),
                Allow,
                "ALLOW policy prod/partner",
            ),
            (
                "the wildcard stays inside the trust domain",
                get("/partner").from("x/ns/a.partner.example/sa/b"),
                Deny,
                "DENY policy prod/deny-foreign",
            ),
            (
                "an alias stands for the mesh trust domain",
                get("/own").from("td-new/ns/a/sa/b"),
                Allow,
                "ALLOW policy prod/own",
            ),
            (
                "and for itself",
                get("/own").from("td-old/ns/a/sa/b"),
                Allow,
                "ALLOW policy prod/own",
            ),
            (
                "condition",
                get("/x").from("exact.example/ns/a/sa/b"),
                Allow,
                "ALLOW policy prod/cond",
            ),
            (
                "notTrustDomains denies others",
                get("/own").from("evil.example/ns/a/sa/b"),
                Deny,
                "DENY policy prod/deny-foreign",
            ),
            (
                "a plaintext peer has no trust domain",
                get("/own").plaintext(),
                Deny,
                "DENY policy prod/deny-foreign",
            ),
        ],
    );
}

/// Keys Istio's validation admits but its generator cannot translate: an
/// ALLOW rule using one is skipped, a DENY rule drops the condition. A
/// header name in doubled brackets is taken whole, as Istio takes it.
#[test]
fn condition_keys_as_istio_reads_them() {
    check(
        &ap(
            "prod",
            "allow",
            "rules:\n- when:\n  - key: request.headersX[a]\n    values: [\"v\"]\n",
        ),
        &web(),
        vec![(
            "ALLOW rule skipped",
            get("/").header("a", "v"),
            Deny,
            "no rule",
        )],
    );
    check(
        &ap(
            "prod",
            "deny",
            "action: DENY\nrules:\n- to:\n  - operation:\n      paths: [\"/admin\"]\n  when:\n  - key: request.auth.claimsX[a]\n    values: [\"v\"]\n",
        ),
        &web(),
        vec![
            (
                "DENY condition dropped",
                get("/admin"),
                Deny,
                "DENY policy prod/deny",
            ),
            ("DENY other path", get("/"), Allow, "no ALLOW"),
        ],
    );
    check(
        &ap(
            "prod",
            "odd-header",
            "rules:\n- when:\n  - key: request.headers[a][b]\n    notValues: [\"v\"]\n",
        ),
        &web(),
        vec![(
            "header \"a][b\" is never present, so notValues matches",
            get("/").header("a", "v").header("b", "v"),
            Allow,
            "ALLOW policy prod/odd-header",
        )],
    );
}

/// A policy defined twice: the later definition is the one in force.
#[test]
fn a_policy_defined_twice_decides_by_its_later_definition() {
    let config = [
        ap(
            "prod",
            "p",
            "rules:\n- to:\n  - operation:\n      paths: [\"/a\"]\n",
        ),
        ap(
            "prod",
            "p",
            "rules:\n- to:\n  - operation:\n      paths: [\"/b\"]\n",
        ),
    ]
    .concat();
    check(
        &config,
        &web(),
        vec![
            ("earlier definition gone", get("/a"), Deny, "no rule"),
            (
                "later definition in force",
                get("/b"),
                Allow,
                "ALLOW policy prod/p",
            ),
        ],
    );
    // A replaced PeerAuthentication keeps the age of its first definition
    // (`kubectl apply` updates the object the first one created), so it
    // still wins the tie against one created after it.
    let pa = |name: &str, mode: &str| {
        doc(
            "PeerAuthentication",
            "prod",
            name,
            "",
            &format!("mtls:\n  mode: {mode}\n"),
        )
    };
    let config = [pa("a", "STRICT"), pa("b", "PERMISSIVE"), pa("a", "DISABLE")].concat();
    check(
        &config,
        &web(),
        vec![(
            "oldest namespace policy decides",
            tcp(1).plaintext(),
            Allow,
            "no ALLOW",
        )],
    );
    let config = [pa("a", "STRICT"), pa("b", "DISABLE"), pa("a", "STRICT")].concat();
    check(
        &config,
        &web(),
        vec![(
            "oldest namespace policy decides, STRICT",
            tcp(1).plaintext(),
            Deny,
            "prod/a",
        )],
    );
}

/// A provider Istio cannot build (here: no port) is kept out of the mesh
/// settings: the CUSTOM policies naming it deny what their rules match, as
/// Istio's stand-in DENY filter does, and nothing else.
#[test]
fn custom_with_an_unbuildable_provider_denies_what_its_rules_match() {
    let config = [
        mesh("extensionProviders:\n- name: ext\n  envoyExtAuthzHttp:\n    service: ext.auth.svc.cluster.local\n"),
        ap("prod", "ext", &custom("ext", "/ext*")),
    ]
    .concat();
    let e = engine(&config);
    let wp = e.workload(&web());
    // On TCP the rule's paths are left out, so it matches every connection.
    for req in [get("/ext"), tcp(5432)] {
        let d = req.decide(&wp);
        assert_eq!(d.verdict, Deny, "{d}");
        assert_eq!(d.reason.code(), "custom_unusable");
        assert!(
            d.to_string()
                .contains("provider \"ext\" cannot be used: port is required (1-65535)"),
            "{d}"
        );
    }
    let d = get("/other").decide(&wp);
    assert_eq!(d.verdict, Allow, "{d}");
}
