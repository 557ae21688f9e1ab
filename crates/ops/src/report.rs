//! `meshward mtls report`: the migration report from every proxy's flow
//! table (`/debug/flows`): per source, destination workload and port, the
//! connections and requests over mTLS and in plaintext; the plaintext
//! callers by name; the workloads without a proxy; and, for `--if-strict
//! NS`, the flows STRICT would refuse there.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use meshward_config::model::MtlsMode;
use meshward_policy::{PolicyEngine, Workload};
use serde_json::{Value, json};

use crate::admin::{Side, get_json};
use crate::live::Live;
use crate::text::columns;

/// What to report on.
#[derive(Debug, Clone, Default)]
pub struct ReportOptions {
    /// Only flows into this namespace.
    pub namespace: Option<String>,
    /// Only what happened this recently (minute buckets; at most the
    /// proxies' window).
    pub since: Option<Duration>,
    /// Which flows STRICT in this namespace would refuse.
    pub if_strict: Option<String>,
}

/// Who called.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Source {
    /// A known workload, `namespace/name`.
    Workload(String),
    /// A mesh identity no known workload has.
    Identity(String),
    /// A plaintext caller no known workload has, by address.
    Address(String),
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Workload(w) => f.write_str(w),
            Source::Identity(i) => write!(f, "{i} (unknown workload)"),
            Source::Address(a) => write!(f, "{a} (unknown workload)"),
        }
    }
}

/// Counts of one (source, destination, port).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts {
    pub mtls_connections: u64,
    pub mtls_requests: u64,
    pub plaintext_connections: u64,
    pub plaintext_requests: u64,
    pub denied: u64,
    /// Plaintext connections refused by a STRICT port.
    pub refused: u64,
}

impl Counts {
    fn plaintext(&self) -> bool {
        self.plaintext_connections + self.plaintext_requests + self.refused > 0
    }
}

/// What `--if-strict` says of a plaintext flow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IfStrict {
    /// Refused today already (the port is STRICT).
    AlreadyRefused,
    /// Would be refused.
    WouldBeRefused,
    /// Kept by a more specific policy (its description).
    Kept(String),
}

/// One row of the report.
#[derive(Debug, Clone)]
pub struct Flow {
    pub source: Source,
    pub destination: String,
    pub port: u16,
    pub counts: Counts,
    pub if_strict: Option<IfStrict>,
}

/// The report.
#[derive(Debug, Clone)]
pub struct Report {
    pub flows: Vec<Flow>,
    /// Workloads that run without a proxy (annotation), and those that
    /// should have one but have none connected.
    pub without_proxy: Vec<(String, &'static str)>,
    /// Proxies whose flows could not be read, with the reason.
    pub unreachable: Vec<(String, String)>,
    pub options: ReportOptions,
}

/// Reads every proxy's flows and builds the report.
pub async fn report(live: &Live, options: ReportOptions) -> Report {
    let mut rows: BTreeMap<(Source, String, u16), Counts> = BTreeMap::new();
    let mut unreachable = Vec::new();
    for (proxy, admin) in live.reachable() {
        if let Some(ns) = &options.namespace
            && proxy.workload.split('/').next() != Some(ns.as_str())
        {
            continue;
        }
        let flows = match get_json(Side::Proxy, admin, "/debug/flows").await {
            Ok(f) => f,
            Err(e) => {
                unreachable.push((proxy.workload.clone(), e.to_string()));
                continue;
            }
        };
        let now = flows["now"].as_u64().unwrap_or(0);
        let since = options.since.map(|d| now.saturating_sub(d.as_secs()));
        for f in flows["flows"].as_array().into_iter().flatten() {
            let Some(port) = f["port"].as_u64().and_then(|p| u16::try_from(p).ok()) else {
                continue;
            };
            let (c, r, d, x) = match since {
                None => (
                    f["connections"].as_u64().unwrap_or(0),
                    f["requests"].as_u64().unwrap_or(0),
                    f["denied"].as_u64().unwrap_or(0),
                    f["refused"].as_u64().unwrap_or(0),
                ),
                Some(from) => f["minutes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|m| m["start"].as_u64().unwrap_or(0) + 60 > from)
                    .fold((0, 0, 0, 0), |(c, r, d, x), m| {
                        (
                            c + m["connections"].as_u64().unwrap_or(0),
                            r + m["requests"].as_u64().unwrap_or(0),
                            d + m["denied"].as_u64().unwrap_or(0),
                            x + m["refused"].as_u64().unwrap_or(0),
                        )
                    }),
            };
            if c + r + d + x == 0 {
                continue;
            }
            let s = &f["source"];
            let source = match (s["namespace"].as_str(), s["workload"].as_str()) {
                (Some(ns), Some(w)) => Source::Workload(format!("{ns}/{w}")),
                _ => match s["principal"].as_str() {
                    Some(p) => Source::Identity(p.to_string()),
                    None => Source::Address(s["address"].as_str().unwrap_or("?").to_string()),
                },
            };
            let e = rows
                .entry((source, proxy.workload.clone(), port))
                .or_default();
            if f["security"] == "mutual_tls" {
                e.mtls_connections += c;
                e.mtls_requests += r;
            } else {
                e.plaintext_connections += c;
                e.plaintext_requests += r;
            }
            e.denied += d;
            e.refused += x;
        }
    }
    let judge = options.if_strict.as_ref().map(|ns| Judge::new(live, ns));
    let flows = rows
        .into_iter()
        .map(|((source, destination, port), counts)| {
            let if_strict = judge
                .as_ref()
                .filter(|_| counts.plaintext())
                .and_then(|j| j.judge(&destination, port));
            Flow {
                source,
                destination,
                port,
                counts,
                if_strict,
            }
        })
        .collect();
    let mut without_proxy = Vec::new();
    for w in live.workloads() {
        if let Some(ns) = &options.namespace
            && &w.namespace != ns
        {
            continue;
        }
        if !w.has_proxy {
            without_proxy.push((
                w.key(),
                "runs without a proxy (meshward.io/proxy: \"false\")",
            ));
        } else if !live
            .proxies
            .iter()
            .any(|p| p.connected && p.workload == w.key())
        {
            without_proxy.push((w.key(), "no proxy connected to the control plane"));
        }
    }
    Report {
        flows,
        without_proxy,
        unreachable,
        options,
    }
}

/// Decides `--if-strict` from the configuration served, as it is and as it
/// would be.
struct Judge {
    namespace: String,
    now: PolicyEngine,
    then: PolicyEngine,
    workloads: Vec<crate::mesh::MeshWorkload>,
}

impl Judge {
    fn new(live: &Live, namespace: &str) -> Judge {
        let then = meshward_policy::what_if::with_namespace_mode(
            &live.config,
            namespace,
            MtlsMode::Strict,
        );
        Judge {
            namespace: namespace.to_string(),
            now: PolicyEngine::new(Arc::new(live.config.clone())),
            then: PolicyEngine::new(Arc::new(then)),
            workloads: live.workloads(),
        }
    }

    fn judge(&self, destination: &str, port: u16) -> Option<IfStrict> {
        let w = self.workloads.iter().find(|w| w.key() == destination)?;
        if w.namespace != self.namespace {
            return None;
        }
        let workload = Workload {
            namespace: w.namespace.clone(),
            service_account: w.service_account.clone(),
            labels: w.labels.clone(),
        };
        let now = self.now.workload(&workload);
        if now.mtls(port).mode == MtlsMode::Strict {
            return Some(IfStrict::AlreadyRefused);
        }
        let then = self.then.workload(&workload);
        let then = then.mtls(port);
        Some(if then.mode == MtlsMode::Strict {
            IfStrict::WouldBeRefused
        } else {
            IfStrict::Kept(format!("{} by {}", then.mode.as_str(), then.source))
        })
    }
}

impl Report {
    /// As text: the flows, the plaintext callers, the workloads without a
    /// proxy, and the `--if-strict` verdicts.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let window = match self.options.since {
            Some(d) => format!(
                "in the last {}",
                meshward_identity::duration::format_duration(d)
            ),
            None => "since each proxy started".to_string(),
        };
        out.push_str(&format!("mTLS migration report ({window})\n\n"));
        let mut rows = vec![[
            "SOURCE".to_string(),
            "DESTINATION".to_string(),
            "PORT".to_string(),
            "MTLS conn/req".to_string(),
            "PLAINTEXT conn/req".to_string(),
            "DENIED".to_string(),
            "REFUSED".to_string(),
        ]];
        for f in &self.flows {
            let c = &f.counts;
            rows.push([
                f.source.to_string(),
                f.destination.clone(),
                f.port.to_string(),
                format!("{}/{}", c.mtls_connections, c.mtls_requests),
                format!("{}/{}", c.plaintext_connections, c.plaintext_requests),
                c.denied.to_string(),
                c.refused.to_string(),
            ]);
        }
        if self.flows.is_empty() {
            out.push_str("no traffic recorded\n");
        } else {
            out.push_str(&columns(&rows));
        }
        let plaintext: Vec<&Flow> = self.flows.iter().filter(|f| f.counts.plaintext()).collect();
        out.push_str("\nPlaintext callers:\n");
        if plaintext.is_empty() {
            out.push_str("  none\n");
        }
        for f in &plaintext {
            out.push_str(&format!(
                "  {} -> {}:{} ({} connections, {} requests{})\n",
                f.source,
                f.destination,
                f.port,
                f.counts.plaintext_connections,
                f.counts.plaintext_requests,
                if f.counts.refused > 0 {
                    format!(", {} refused by STRICT", f.counts.refused)
                } else {
                    String::new()
                }
            ));
        }
        out.push_str("\nWorkloads without a proxy:\n");
        if self.without_proxy.is_empty() {
            out.push_str("  none\n");
        }
        for (w, why) in &self.without_proxy {
            out.push_str(&format!("  {w}: {why}\n"));
        }
        if let Some(ns) = &self.options.if_strict {
            out.push_str(&format!(
                "\nIf namespace {ns} switched to STRICT (a namespace-wide PeerAuthentication):\n"
            ));
            let mut any = false;
            for f in &plaintext {
                let line = match &f.if_strict {
                    Some(IfStrict::WouldBeRefused) => "WOULD BE REFUSED".to_string(),
                    Some(IfStrict::AlreadyRefused) => "refused already (STRICT today)".to_string(),
                    Some(IfStrict::Kept(why)) => format!("kept: {why}"),
                    None => continue,
                };
                any = true;
                out.push_str(&format!(
                    "  {} -> {}:{}: {line}\n",
                    f.source, f.destination, f.port
                ));
            }
            if !any {
                out.push_str(&format!(
                    "  no plaintext flow into {ns}: nothing would be refused\n"
                ));
            }
        }
        for (w, e) in &self.unreachable {
            out.push_str(&format!(
                "\nwarning: the flows of {w} could not be read: {e}\n"
            ));
        }
        out
    }

    /// As JSON.
    pub fn to_json(&self) -> Value {
        json!({
            "since_seconds": self.options.since.map(|d| d.as_secs()),
            "namespace": self.options.namespace,
            "flows": self.flows.iter().map(|f| {
                let (kind, name) = match &f.source {
                    Source::Workload(w) => ("workload", w),
                    Source::Identity(i) => ("identity", i),
                    Source::Address(a) => ("address", a),
                };
                json!({
                    "source": {"kind": kind, "name": name},
                    "destination": f.destination,
                    "port": f.port,
                    "mtls": {"connections": f.counts.mtls_connections, "requests": f.counts.mtls_requests},
                    "plaintext": {"connections": f.counts.plaintext_connections, "requests": f.counts.plaintext_requests},
                    "denied": f.counts.denied,
                    "refused": f.counts.refused,
                    "if_strict": f.if_strict.as_ref().map(|v| match v {
                        IfStrict::WouldBeRefused => json!({"verdict": "would_be_refused"}),
                        IfStrict::AlreadyRefused => json!({"verdict": "refused_already"}),
                        IfStrict::Kept(why) => json!({"verdict": "kept", "by": why}),
                    }),
                })
            }).collect::<Vec<_>>(),
            "without_proxy": self.without_proxy.iter().map(|(w, why)| json!({"workload": w, "why": why})).collect::<Vec<_>>(),
            "if_strict": self.options.if_strict,
            "unreachable": self.unreachable.iter().map(|(w, e)| json!({"workload": w, "error": e})).collect::<Vec<_>>(),
        })
    }
}
