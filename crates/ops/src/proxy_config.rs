//! `meshward proxy-config secret|listeners|endpoints|authz WORKLOAD`: what
//! a running proxy holds, from its admin endpoint, as `istioctl
//! proxy-config` shows Envoy's. `secret -o json` has the shape of
//! `istioctl proxy-config secret -o json` (Envoy's secrets config dump), so
//! the pipelines written for Istio work unchanged.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};

use crate::OpsError;
use crate::admin::{Side, get_json};
use crate::live::Live;
use crate::text::columns;

/// What to show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    Secret,
    Listeners,
    Endpoints,
    Authz,
}

/// A section as JSON and as text.
#[derive(Debug, Clone)]
pub struct Shown {
    pub json: Value,
    pub text: String,
}

/// Asks the proxy of `workload` for `section`.
pub async fn show(live: &Live, workload: &str, section: Section) -> Result<Shown, OpsError> {
    let proxy = live.proxy(workload)?;
    let admin = proxy
        .admin
        .expect("reachable proxies have an admin address");
    match section {
        Section::Secret => Ok(secret(&get_json(Side::Proxy, admin, "/certs").await?)),
        Section::Listeners => {
            let (listeners, dump) = tokio::join!(
                get_json(Side::Proxy, admin, "/listeners"),
                get_json(Side::Proxy, admin, "/config_dump")
            );
            Ok(listeners_of(&listeners?, &dump?))
        }
        Section::Endpoints => Ok(endpoints(
            &get_json(Side::Proxy, admin, "/config_dump").await?,
        )),
        Section::Authz => Ok(authz(
            live,
            &get_json(Side::Proxy, admin, "/config_dump").await?,
        )),
    }
}

/// Envoy's redaction of a private key, as istioctl prints it.
const REDACTED: &str = "[redacted]";
const SECRET_TYPE: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// The workload certificate (`default`) and the trust roots (`ROOTCA`), as
/// Envoy's `SecretsConfigDump`.
pub fn secret(certs: &Value) -> Shown {
    let chain_pem = certs["pem"]["chain"].as_str().unwrap_or_default();
    let roots_pem = certs["pem"]["roots"].as_str().unwrap_or_default();
    let loaded = certs["loaded_at"].as_str().unwrap_or_default();
    let leaf = &certs["chain"]["certificates"][0];
    let json = json!({
        "dynamicActiveSecrets": [
            {
                "name": "default",
                "versionInfo": leaf["serial"],
                "lastUpdated": loaded,
                "secret": {
                    "@type": SECRET_TYPE,
                    "name": "default",
                    "tlsCertificate": {
                        "certificateChain": {"inlineBytes": STANDARD.encode(chain_pem)},
                        "privateKey": {"inlineBytes": STANDARD.encode(REDACTED)},
                    },
                },
            },
            {
                "name": "ROOTCA",
                "versionInfo": loaded,
                "lastUpdated": loaded,
                "secret": {
                    "@type": SECRET_TYPE,
                    "name": "ROOTCA",
                    "validationContext": {
                        "trustedCa": {"inlineBytes": STANDARD.encode(roots_pem)},
                    },
                },
            },
        ]
    });
    let mut rows = vec![[
        "RESOURCE NAME".to_string(),
        "TYPE".to_string(),
        "STATUS".to_string(),
        "VALID CERT".to_string(),
        "SERIAL NUMBER".to_string(),
        "NOT AFTER".to_string(),
        "NOT BEFORE".to_string(),
    ]];
    let valid_chain = certs["chain"]["verification"]["status"] == "valid"
        || certs["chain"]["verification"].get("Valid").is_some();
    let row = |name: &str, kind: &str, c: &Value, valid: bool| {
        [
            name.to_string(),
            kind.to_string(),
            "ACTIVE".to_string(),
            valid.to_string(),
            c["serial"].as_str().unwrap_or("-").to_string(),
            c["not_after"].as_str().unwrap_or("-").to_string(),
            c["not_before"].as_str().unwrap_or("-").to_string(),
        ]
    };
    rows.push(row("default", "Cert Chain", leaf, valid_chain));
    for r in certs["roots"].as_array().into_iter().flatten() {
        let valid = r["seconds_left"].as_i64().is_some_and(|s| s > 0);
        rows.push(row("ROOTCA", "CA", r, valid));
    }
    let mut text = columns(&rows);
    if let Some(id) = certs["identity"].as_str() {
        text.push_str(&format!("\nidentity: {id}\n"));
    }
    Shown { json, text }
}

/// The bound listeners, with each inbound port's protocol and mTLS mode.
fn listeners_of(listeners: &Value, dump: &Value) -> Shown {
    let inbound = dump["inbound"].as_array().cloned().unwrap_or_default();
    let mut rows = vec![[
        "ADDRESS:PORT".to_string(),
        "KIND".to_string(),
        "NAME".to_string(),
        "PROTOCOL".to_string(),
        "MTLS".to_string(),
        "DESTINATION".to_string(),
    ]];
    let mut out = Vec::new();
    for l in listeners.as_array().into_iter().flatten() {
        let addr = l["address"].as_str().unwrap_or("-");
        let port = addr
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse::<u64>().ok());
        let kind = l["kind"].as_str().unwrap_or("-");
        let inb = inbound
            .iter()
            .find(|p| kind.starts_with("inbound") && p["port"].as_u64() == port);
        let (protocol, mtls, dest) = match inb {
            Some(p) => (
                p["protocol"].as_str().unwrap_or("-").to_string(),
                format!(
                    "{} ({})",
                    p["mtls_mode"].as_str().unwrap_or("-"),
                    p["mtls_source"].as_str().unwrap_or("-")
                ),
                format!("app {}", p["app"].as_str().unwrap_or("-")),
            ),
            None => (
                "-".to_string(),
                "-".to_string(),
                l["name"].as_str().unwrap_or("-").to_string(),
            ),
        };
        if let Some(err) = l["error"].as_str() {
            rows.push([
                addr.into(),
                kind.into(),
                l["name"].as_str().unwrap_or("-").into(),
                protocol.clone(),
                mtls.clone(),
                format!("NOT BOUND: {err}"),
            ]);
        } else {
            rows.push([
                addr.into(),
                kind.into(),
                l["name"].as_str().unwrap_or("-").into(),
                protocol.clone(),
                mtls.clone(),
                dest,
            ]);
        }
        let mut v = l.clone();
        if let Some(p) = inb {
            v["protocol"] = p["protocol"].clone();
            v["mtls_mode"] = p["mtls_mode"].clone();
            v["mtls_source"] = p["mtls_source"].clone();
            v["app"] = p["app"].clone();
        }
        out.push(v);
    }
    Shown {
        json: Value::Array(out),
        text: columns(&rows),
    }
}

/// The services the proxy routes to and their endpoints, with the identity
/// each must present and how the connection is secured.
fn endpoints(dump: &Value) -> Shown {
    let mut rows = vec![[
        "ENDPOINT".to_string(),
        "SERVICE".to_string(),
        "IDENTITY".to_string(),
        "TLS".to_string(),
        "DESTINATION RULE".to_string(),
    ]];
    let mut out = Vec::new();
    for s in dump["services"].as_array().into_iter().flatten() {
        let host = s["host"].as_str().unwrap_or("-");
        let dr = s["destination_rule"]
            .as_str()
            .map(str::to_string)
            .or_else(|| s["destination_rule"]["name"].as_str().map(str::to_string))
            .unwrap_or_else(|| "-".to_string());
        for p in s["ports"].as_array().into_iter().flatten() {
            let number = p["number"].as_u64().unwrap_or(0);
            let name = p["name"].as_str().unwrap_or_default();
            for e in s["endpoints"].as_array().into_iter().flatten() {
                let target = e["ports"][name].as_u64().unwrap_or(number);
                let ep = format!("{}:{target}", e["address"].as_str().unwrap_or("?"));
                let tls = match s["tls"].as_str() {
                    Some(mode) => mode.to_string(),
                    None if e["has_proxy"] == true => "ISTIO_MUTUAL (auto)".to_string(),
                    None => "DISABLE (auto: no proxy)".to_string(),
                };
                let identity = if e["has_proxy"] == true || s["tls"].is_string() {
                    e["identity"].as_str().unwrap_or("-").to_string()
                } else {
                    "-".to_string()
                };
                rows.push([
                    ep.clone(),
                    format!("{host}:{number}"),
                    identity.clone(),
                    tls.clone(),
                    dr.clone(),
                ]);
                out.push(json!({"endpoint": ep, "service": s["name"], "host": host, "port": number, "identity": identity, "tls": tls, "destination_rule": s["destination_rule"]}));
            }
        }
    }
    Shown {
        json: Value::Array(out),
        text: columns(&rows),
    }
}

/// The authorization policies the proxy enforces, in evaluation order,
/// with their rule counts and origins from the configuration served.
fn authz(live: &Live, dump: &Value) -> Shown {
    let mut rows = vec![[
        "ACTION".to_string(),
        "AuthorizationPolicy".to_string(),
        "RULES".to_string(),
        "FROM".to_string(),
    ]];
    let mut out = Vec::new();
    for p in dump["authorization_policies"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let (ns, name) = (
            p["namespace"].as_str().unwrap_or_default(),
            p["name"].as_str().unwrap_or_default(),
        );
        let (rules, origin) = live.authorization_policy(ns, name);
        let mut action = p["action"].as_str().unwrap_or("?").to_string();
        if p["dry_run"] == true {
            action.push_str(" (dry-run)");
        }
        rows.push([
            action,
            format!("{ns}/{name}"),
            rules.to_string(),
            origin.clone(),
        ]);
        let mut v = p.clone();
        v["rules"] = json!(rules);
        v["origin"] = json!(origin);
        out.push(v);
    }
    let mut text = columns(&rows);
    if let Some(problem) = dump["custom_problem"].as_str() {
        text.push_str(&format!(
            "\nthe CUSTOM policies cannot be enforced ({problem}): what their rules match is denied\n"
        ));
    }
    Shown {
        json: json!({"policies": out, "custom_problem": dump["custom_problem"]}),
        text,
    }
}
