//! Policy test suites: the case format of Istio's conformance corpus, which
//! `meshward policy test` runs and users write to unit-test their policies.
//!
//! A file is a mapping with `cases` (and an informational `source`); each
//! case has a `name`, a `kind` (`authz`, `peer` or `validate`) and a
//! `config` block holding the resources, plus what to check.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use meshward_config::decode::{self, Fields};
use meshward_config::diag::{Diagnostic, Diagnostics, Sink};
use meshward_config::model::security::MtlsMode;
use meshward_config::yaml::{self, Node, Pos, Value};
use meshward_config::{Loader, Severity};

use crate::{Decision, HttpAttributes, JwtAuth, PolicyEngine, Request, Verdict, Workload};

/// A parsed suite file.
#[derive(Debug, Clone)]
pub struct Suite {
    pub file: String,
    pub cases: Vec<Case>,
}

#[derive(Debug, Clone)]
pub struct Case {
    pub name: String,
    pub line: u32,
    /// Inline resources (`config: |`).
    pub config: String,
    /// meshward extension: files or directories of resources, relative to
    /// the test file (`configPaths: [../policies]`), loaded before `config`.
    pub config_paths: Vec<String>,
    pub check: CaseKind,
}

#[derive(Debug, Clone)]
pub enum CaseKind {
    Authz {
        workload: Workload,
        requests: Vec<RequestCase>,
    },
    Peer {
        workload: Workload,
        checks: Vec<PeerCheck>,
    },
    Validate {
        expect_valid: bool,
        error_contains: Option<String>,
        /// meshward extension: with `expect_valid: true`, a warning must
        /// mention this (input Istio applies but that cannot do what it
        /// seems to, such as a lower-case method).
        warning_contains: Option<String>,
    },
}

#[derive(Debug, Clone)]
pub struct PeerCheck {
    pub port: u16,
    pub expect: MtlsMode,
}

/// One request of an `authz` case.
#[derive(Debug, Clone)]
pub struct RequestCase {
    pub name: String,
    pub principal: Option<String>,
    pub source_ip: IpAddr,
    pub remote_ip: Option<IpAddr>,
    pub destination_ip: Option<IpAddr>,
    pub port: u16,
    pub sni: Option<String>,
    /// `None` for TCP.
    pub http: Option<HttpCase>,
    pub auth: Option<JwtAuth>,
    pub expect: Verdict,
}

#[derive(Debug, Clone)]
pub struct HttpCase {
    pub method: String,
    pub path: String,
    pub host: String,
    pub headers: BTreeMap<String, String>,
}

impl RequestCase {
    /// Evaluates the request against a workload's policies.
    pub fn decide(&self, policy: &crate::WorkloadPolicy) -> Decision {
        let http = self.http.as_ref().map(|h| HttpAttributes {
            method: &h.method,
            path: &h.path,
            host: &h.host,
            headers: &h.headers,
            auth: self.auth.as_ref(),
        });
        let req = Request {
            principal: self.principal.as_deref(),
            source_ip: self.source_ip,
            remote_ip: self.remote_ip,
            destination_ip: self.destination_ip,
            port: self.port,
            sni: self.sni.as_deref(),
            http,
        };
        policy.decide(&req)
    }
}

/// The result of one check (a request, a port, or a validation).
#[derive(Debug, Clone)]
pub struct CheckResult {
    pub case: String,
    /// Request name, `port N`, or `validate`.
    pub check: String,
    pub passed: bool,
    pub expected: String,
    pub actual: String,
    pub explanation: String,
}

/// Parses a suite. Every problem is reported, as for resources.
pub fn parse_suite(file: &str, text: &str) -> Result<Suite, Diagnostics> {
    let mut out = Vec::new();
    let file_arc: Arc<str> = Arc::from(file);
    let mut sink = Sink {
        file: file_arc.clone(),
        resource: None,
        out: &mut out,
    };
    let root = match yaml::parse_one(text) {
        Ok(Some(root)) => root,
        Ok(None) => {
            sink.error(Pos { line: 1, col: 1 }, "", "empty test file");
            return Err(Diagnostics(out));
        }
        Err(e) => {
            sink.error(e.pos, "", format!("invalid YAML: {}", e.message));
            return Err(Diagnostics(out));
        }
    };
    let mut f = Fields::new(&mut sink, &root, "");
    f.ignore("source");
    let cases = f.list(&mut sink, "cases", parse_case).unwrap_or_default();
    if cases.is_empty() {
        sink.error(
            root.pos,
            "cases",
            "a test file needs a non-empty `cases` list",
        );
    }
    f.finish(&mut sink);
    let mut seen = BTreeMap::new();
    for c in &cases {
        if let Some(line) = seen.insert(c.name.clone(), c.line) {
            sink.error(
                Pos {
                    line: c.line,
                    col: 1,
                },
                "",
                format!(
                    "case name \"{}\" is used twice (first at line {line})",
                    c.name
                ),
            );
        }
    }
    if out.iter().any(Diagnostic::is_error) {
        Err(Diagnostics(out))
    } else {
        Ok(Suite {
            file: file.to_string(),
            cases,
        })
    }
}

fn parse_case(sink: &mut Sink<'_>, node: &Node, path: &str) -> Option<Case> {
    let mut f = Fields::new(sink, node, path);
    let name = f
        .require(sink, "name")
        .and_then(|n| decode::string(sink, n, &format!("{path}.name")));
    sink.resource = name.as_ref().map(|n| format!("case {n}"));
    let kind = f
        .require(sink, "kind")
        .and_then(|n| decode::string(sink, n, &format!("{path}.kind")));
    let config = f.string(sink, "config");
    let config_paths = f.strings(sink, "configPaths");
    if config.is_none() && config_paths.is_empty() {
        sink.error(
            node.pos,
            &format!("{path}.config"),
            "a case needs `config` (inline resources) or `configPaths`",
        );
    }
    let check = match kind.as_deref() {
        Some("authz") => {
            let workload = f
                .require(sink, "workload")
                .map(|n| parse_workload(sink, n, &format!("{path}.workload")));
            let requests = f.list(sink, "requests", parse_request).unwrap_or_default();
            if requests.is_empty() {
                sink.error(
                    node.pos,
                    &format!("{path}.requests"),
                    "an authz case needs at least one request",
                );
            }
            workload.map(|workload| CaseKind::Authz { workload, requests })
        }
        Some("peer") => {
            let workload = f
                .require(sink, "workload")
                .map(|n| parse_workload(sink, n, &format!("{path}.workload")));
            let checks = f.list(sink, "checks", parse_peer_check).unwrap_or_default();
            if checks.is_empty() {
                sink.error(
                    node.pos,
                    &format!("{path}.checks"),
                    "a peer case needs at least one check",
                );
            }
            workload.map(|workload| CaseKind::Peer { workload, checks })
        }
        Some("validate") => {
            let expect_valid = f
                .require(sink, "expect_valid")
                .and_then(|n| decode::boolean(sink, n, &format!("{path}.expect_valid")));
            let error_contains = f.string(sink, "error_contains");
            let warning_contains = f.string(sink, "warning_contains");
            expect_valid.map(|expect_valid| CaseKind::Validate {
                expect_valid,
                error_contains,
                warning_contains,
            })
        }
        Some(other) => {
            sink.error(
                node.pos,
                &format!("{path}.kind"),
                format!("unknown case kind \"{other}\" (expected authz, peer or validate)"),
            );
            None
        }
        None => None,
    };
    f.finish(sink);
    sink.resource = None;
    Some(Case {
        name: name?,
        line: node.pos.line,
        config: config.unwrap_or_default(),
        config_paths,
        check: check?,
    })
}

fn parse_workload(sink: &mut Sink<'_>, node: &Node, path: &str) -> Workload {
    let mut f = Fields::new(sink, node, path);
    let namespace = f
        .require(sink, "namespace")
        .and_then(|n| decode::string(sink, n, &format!("{path}.namespace")))
        .unwrap_or_default();
    let service_account = f
        .string(sink, "serviceAccount")
        .unwrap_or_else(|| "default".to_string());
    let labels = f.string_map(sink, "labels");
    f.finish(sink);
    Workload {
        namespace,
        service_account,
        labels,
    }
}

fn parse_peer_check(sink: &mut Sink<'_>, node: &Node, path: &str) -> Option<PeerCheck> {
    let mut f = Fields::new(sink, node, path);
    let port = f
        .require(sink, "port")
        .and_then(|n| port(sink, n, &format!("{path}.port")));
    let mode_path = format!("{path}.expect_mode");
    let expect = f.require(sink, "expect_mode").and_then(|n| {
        let s = decode::string(sink, n, &mode_path)?;
        match MtlsMode::parse(&s) {
            Some(MtlsMode::Unset) | None => {
                sink.error(
                    n.pos,
                    &mode_path,
                    format!("\"{s}\" is not an effective mode (STRICT, PERMISSIVE or DISABLE)"),
                );
                None
            }
            Some(m) => Some(m),
        }
    });
    f.finish(sink);
    Some(PeerCheck {
        port: port?,
        expect: expect?,
    })
}

fn port(sink: &mut Sink<'_>, node: &Node, path: &str) -> Option<u16> {
    let v = decode::integer(sink, node, path)?;
    u16::try_from(v).ok().or_else(|| {
        sink.error(node.pos, path, format!("port {v} is out of range"));
        None
    })
}

fn ip(sink: &mut Sink<'_>, f: &mut Fields<'_>, key: &str) -> Option<IpAddr> {
    let path = f.field_path(key);
    let node = f.take(key)?;
    let s = decode::string(sink, node, &path)?;
    s.parse()
        .map_err(|_| sink.error(node.pos, &path, format!("\"{s}\" is not an IP address")))
        .ok()
}

/// Any scalar as its text: header values, paths and claims are strings.
fn text(sink: &mut Sink<'_>, node: &Node, path: &str) -> Option<String> {
    match &node.value {
        Value::Scalar { text, .. } => Some(text.clone()),
        _ => {
            sink.error(
                node.pos,
                path,
                format!("expected a string, found {}", node.type_name()),
            );
            None
        }
    }
}

fn text_field(sink: &mut Sink<'_>, f: &mut Fields<'_>, key: &str) -> Option<String> {
    let path = f.field_path(key);
    f.require(sink, key).and_then(|n| text(sink, n, &path))
}

/// Claims keep their structure; every scalar becomes a string.
fn claims_json(node: &Node) -> serde_json::Value {
    match &node.value {
        Value::Scalar { text, .. } => serde_json::Value::String(text.clone()),
        Value::Seq(items) => serde_json::Value::Array(items.iter().map(claims_json).collect()),
        Value::Map(entries) => serde_json::Value::Object(
            entries
                .iter()
                .map(|(k, v)| {
                    (
                        k.scalar_text().unwrap_or_default().to_string(),
                        claims_json(v),
                    )
                })
                .collect(),
        ),
    }
}

fn parse_request(sink: &mut Sink<'_>, node: &Node, path: &str) -> Option<RequestCase> {
    let mut f = Fields::new(sink, node, path);
    let name = f
        .require(sink, "name")
        .and_then(|n| decode::string(sink, n, &format!("{path}.name")));

    let src_path = format!("{path}.source");
    let src = f.require(sink, "source");
    let (mut principal, mut source_ip, mut remote_ip) = (None, None, None);
    if let Some(src) = src {
        let mut sf = Fields::new(sink, src, &src_path);
        principal = sf.string(sink, "principal");
        sf.ignore("namespace");
        source_ip = ip(sink, &mut sf, "ip");
        if source_ip.is_none() && sf.peek("ip").is_none() {
            sink.error(
                src.pos,
                &format!("{src_path}.ip"),
                "missing required field \"ip\"",
            );
        }
        remote_ip = ip(sink, &mut sf, "remote_ip");
        sf.finish(sink);
    }

    let req_path = format!("{path}.request");
    let (mut port_num, mut http, mut sni, mut destination_ip) = (None, None, None, None);
    if let Some(r) = f.require(sink, "request") {
        let mut rf = Fields::new(sink, r, &req_path);
        let protocol = rf
            .require(sink, "protocol")
            .and_then(|n| decode::string(sink, n, &format!("{req_path}.protocol")));
        port_num = rf
            .require(sink, "port")
            .and_then(|n| port(sink, n, &format!("{req_path}.port")));
        sni = rf.string(sink, "sni");
        destination_ip = ip(sink, &mut rf, "destination_ip");
        match protocol.as_deref() {
            Some("http") => {
                let method = text_field(sink, &mut rf, "method");
                let path_v = text_field(sink, &mut rf, "path");
                let host = text_field(sink, &mut rf, "host");
                let mut headers = BTreeMap::new();
                let hp = rf.field_path("headers");
                if let Some(h) = rf.take("headers") {
                    if let Value::Map(entries) = &h.value {
                        for (k, v) in entries {
                            let key = k.scalar_text().unwrap_or_default().to_ascii_lowercase();
                            if let Some(v) = text(sink, v, &format!("{hp}.{key}")) {
                                headers.insert(key, v);
                            }
                        }
                    } else {
                        sink.error(h.pos, &hp, "expected a mapping of header name to value");
                    }
                }
                if let (Some(method), Some(path), Some(host)) = (method, path_v, host) {
                    http = Some(HttpCase {
                        method,
                        path,
                        host,
                        headers,
                    });
                }
            }
            Some("tcp") => {}
            Some(other) => sink.error(
                r.pos,
                &format!("{req_path}.protocol"),
                format!("unknown protocol \"{other}\" (expected http or tcp)"),
            ),
            None => {}
        }
        rf.finish(sink);
    }

    let auth_path = format!("{path}.auth");
    let auth = f.take("auth").map(|a| {
        let mut af = Fields::new(sink, a, &auth_path);
        let principal = af.string(sink, "principal").unwrap_or_default();
        let audiences = af.strings(sink, "audiences");
        let presenter = af.string(sink, "presenter");
        let claims = match af.take("claims").map(claims_json) {
            Some(serde_json::Value::Object(m)) => m,
            Some(_) => {
                sink.error(
                    a.pos,
                    &format!("{auth_path}.claims"),
                    "claims must be a mapping",
                );
                serde_json::Map::new()
            }
            None => serde_json::Map::new(),
        };
        af.finish(sink);
        JwtAuth {
            audiences,
            presenter,
            claims,
            ..JwtAuth::from_principal(&principal)
        }
    });
    if auth.is_some() && http.is_none() {
        sink.error(
            node.pos,
            &auth_path,
            "a JWT (auth) can only accompany an HTTP request",
        );
    }

    let expect_path = format!("{path}.expect");
    let expect = f.require(sink, "expect").and_then(|n| {
        match decode::string(sink, n, &expect_path)?.as_str() {
            "allow" => Some(Verdict::Allow),
            "deny" => Some(Verdict::Deny),
            other => {
                sink.error(
                    n.pos,
                    &expect_path,
                    format!("\"{other}\" is not a verdict (allow or deny)"),
                );
                None
            }
        }
    });
    f.finish(sink);
    Some(RequestCase {
        name: name?,
        principal,
        source_ip: source_ip?,
        remote_ip,
        destination_ip,
        port: port_num?,
        sni,
        http,
        auth,
        expect: expect?,
    })
}

/// Adds the resources a case names by path to a loader. The caller owns file
/// access (this crate does no I/O); see `meshward policy test`.
pub type PathLoader<'a> = &'a dyn Fn(&mut Loader, &str);

/// Loads a case's config; `Err` holds the rendered errors.
fn load_config(
    suite: &Suite,
    case: &Case,
    paths: PathLoader<'_>,
) -> Result<meshward_config::Loaded, Diagnostics> {
    let mut loader = Loader::new();
    for p in &case.config_paths {
        paths(&mut loader, p);
    }
    if case.config.trim().is_empty() {
        return loader.finish();
    }
    loader.add_source(
        &format!("{} [case {} config]", suite.file, case.name),
        &case.config,
    );
    loader.finish()
}

fn errors_text(d: &Diagnostics) -> String {
    d.0.iter()
        .filter(|d| d.severity == Severity::Error)
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Runs every check of a suite; `paths` loads `configPaths` entries.
pub fn run_suite(suite: &Suite, paths: PathLoader<'_>) -> Vec<CheckResult> {
    let mut results = Vec::new();
    for case in &suite.cases {
        let result =
            |check: String, passed: bool, expected: String, actual: String, explanation: String| {
                CheckResult {
                    case: case.name.clone(),
                    check,
                    passed,
                    expected,
                    actual,
                    explanation,
                }
            };
        match &case.check {
            CaseKind::Validate {
                expect_valid,
                error_contains,
                warning_contains,
            } => {
                let outcome = load_config(suite, case, paths);
                let mentions = |text: &str, k: &str| {
                    text.to_ascii_lowercase().contains(&k.to_ascii_lowercase())
                };
                let (passed, actual, explanation) = match (&outcome, expect_valid) {
                    (Ok(loaded), true) => {
                        let warnings: Vec<String> =
                            loaded.warnings.warnings().map(|w| w.to_string()).collect();
                        let text = warnings.join("\n");
                        match warning_contains {
                            Some(k) if !mentions(&text, k) => {
                                (false, "valid, without such a warning".to_string(), text)
                            }
                            Some(_) => (true, "valid, with the warning".to_string(), text),
                            None => (true, "valid".to_string(), String::new()),
                        }
                    }
                    (Ok(_), false) => (
                        false,
                        "valid".to_string(),
                        "the resource was accepted".to_string(),
                    ),
                    (Err(d), true) => (false, "invalid".to_string(), errors_text(d)),
                    (Err(d), false) => {
                        let text = errors_text(d);
                        let contains = error_contains.as_deref().is_none_or(|k| mentions(&text, k));
                        let actual = if contains {
                            "invalid".to_string()
                        } else {
                            "invalid, without the keyword".to_string()
                        };
                        (contains, actual, text)
                    }
                };
                let expected = match (expect_valid, error_contains) {
                    (true, _) => match warning_contains {
                        Some(k) => format!("valid, with a warning mentioning \"{k}\""),
                        None => "valid".to_string(),
                    },
                    (false, Some(k)) => format!("invalid, error mentioning \"{k}\""),
                    (false, None) => "invalid".to_string(),
                };
                results.push(result(
                    "validate".to_string(),
                    passed,
                    expected,
                    actual,
                    explanation,
                ));
            }
            CaseKind::Authz { workload, requests } => match load_config(suite, case, paths) {
                Err(d) => {
                    for r in requests {
                        results.push(result(
                            r.name.clone(),
                            false,
                            r.expect.to_string(),
                            "config rejected".to_string(),
                            errors_text(&d),
                        ));
                    }
                }
                Ok(loaded) => {
                    let engine = PolicyEngine::new(Arc::new(loaded.config));
                    let policy = engine.workload(workload);
                    for r in requests {
                        let d = r.decide(&policy);
                        results.push(result(
                            r.name.clone(),
                            d.verdict == r.expect,
                            r.expect.to_string(),
                            d.verdict.to_string(),
                            d.to_string(),
                        ));
                    }
                }
            },
            CaseKind::Peer { workload, checks } => match load_config(suite, case, paths) {
                Err(d) => {
                    for c in checks {
                        results.push(result(
                            format!("port {}", c.port),
                            false,
                            c.expect.to_string(),
                            "config rejected".to_string(),
                            errors_text(&d),
                        ));
                    }
                }
                Ok(loaded) => {
                    let engine = PolicyEngine::new(Arc::new(loaded.config));
                    let policy = engine.workload(workload);
                    for c in checks {
                        let d = policy.mtls(c.port);
                        results.push(result(
                            format!("port {}", c.port),
                            d.mode == c.expect,
                            c.expect.to_string(),
                            d.mode.to_string(),
                            format!("{} from {}", d.mode, d.source),
                        ));
                    }
                }
            },
        }
    }
    results
}
