//! The example calls `meshward up` makes once the mesh is ready (a YAML
//! file: `calls: [{from, url, method, headers, body, expect}]`), and how a
//! call's outcome is held against what it expects.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::OpsError;
use crate::call::{CallOutcome, CallSpec};

/// One example call.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExampleCall {
    pub from: String,
    pub url: String,
    #[serde(default = "get")]
    pub method: String,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default)]
    pub body: Option<String>,
    #[serde(default)]
    pub expect: Expect,
}

fn get() -> String {
    "GET".to_string()
}

/// What a call must show; every field given must hold.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    /// The response status.
    pub status: Option<u16>,
    /// No response: the connection was refused.
    #[serde(default)]
    pub refused: bool,
    /// `allow` or `deny`, as the destination recorded it.
    pub decision: Option<String>,
    /// The policy that decided, `namespace/name`.
    pub policy: Option<String>,
    /// `mutual_tls` or `none`.
    pub tls: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    calls: Vec<ExampleCall>,
}

/// Parses a calls file; `name` is for error messages.
pub fn parse(name: &str, text: &str) -> Result<Vec<ExampleCall>, OpsError> {
    let node = meshward_config::yaml::parse_one(text)
        .map_err(|e| OpsError::Invalid(format!("{name}: {e}")))?;
    let Some(node) = node else {
        return Ok(Vec::new());
    };
    let file: File = serde_json::from_value(node.to_json())
        .map_err(|e| OpsError::Invalid(format!("{name}: {e}")))?;
    for (i, c) in file.calls.iter().enumerate() {
        crate::call::Url::parse(&c.url)
            .map_err(|e| OpsError::Invalid(format!("{name}: calls[{i}].url: {e}")))?;
        if let Some(d) = &c.expect.decision
            && d != "allow"
            && d != "deny"
        {
            return Err(OpsError::Invalid(format!(
                "{name}: calls[{i}].expect.decision: {d:?} is neither allow nor deny"
            )));
        }
        if c.expect.refused && c.expect.status.is_some() {
            return Err(OpsError::Invalid(format!(
                "{name}: calls[{i}].expect: refused and status exclude each other"
            )));
        }
    }
    Ok(file.calls)
}

impl ExampleCall {
    /// The request to send.
    pub fn spec(&self) -> CallSpec {
        CallSpec {
            from: self.from.clone(),
            url: self.url.clone(),
            method: self.method.clone(),
            headers: self
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            body: self.body.clone().map(String::into_bytes),
        }
    }

    /// What differs between the outcome and what is expected (empty: as
    /// expected).
    pub fn mismatches(&self, got: &CallOutcome) -> Vec<String> {
        let e = &self.expect;
        let mut out = Vec::new();
        match (&got.reply, e.refused) {
            (crate::call::Reply::Failed(why), false) => out.push(format!("no reply ({why})")),
            (crate::call::Reply::Failed(_), true) => {}
            (_, true) => out.push("a reply came, expected the connection refused".to_string()),
            (_, false) => {}
        }
        if let (Some(want), Some(s)) = (e.status, got.status())
            && want != s
        {
            out.push(format!("status {s}, expected {want}"));
        }
        if let Some(want) = &e.decision {
            match got.decision() {
                Some(d) if d == want => {}
                Some(d) => out.push(format!("decision {d}, expected {want}")),
                None => out.push(format!("no decision recorded, expected {want}")),
            }
        }
        if let Some(want) = &e.policy {
            match got.policy() {
                Some(p) if p == want => {}
                Some(p) => out.push(format!("policy {p}, expected {want}")),
                None => out.push(format!("no policy recorded, expected {want}")),
            }
        }
        if let Some(want) = &e.tls {
            match got.tls() {
                Some(t) if t == want => {}
                Some(t) => out.push(format!("tls {t}, expected {want}")),
                None => out.push(format!("tls unknown, expected {want}")),
            }
        }
        out
    }
}

/// One line for a call's outcome: status, decision, policy, TLS.
pub fn summary(got: &CallOutcome) -> String {
    let mut parts = Vec::new();
    match &got.reply {
        crate::call::Reply::Response { status, .. } => parts.push(status.to_string()),
        crate::call::Reply::Bytes { len, .. } => parts.push(format!("connected, {len} bytes back")),
        crate::call::Reply::Failed(_) => parts.push("refused".to_string()),
    }
    match (got.decision(), got.policy()) {
        (Some(d), Some(p)) => parts.push(format!("{} by {p}", d.to_uppercase())),
        (Some(d), None) => {
            let reason = got
                .destination_entry
                .as_ref()
                .and_then(|e| e["reason"].as_str())
                .unwrap_or_default();
            parts.push(format!("{} ({reason})", d.to_uppercase()))
        }
        (None, _) => parts.push("no proxy at the destination".to_string()),
    }
    if let Some(t) = got.tls() {
        parts.push(t.to_string());
    }
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_calls_parse() {
        let calls = parse("calls.yaml", crate::example::CALLS).unwrap();
        assert!(calls.len() >= 6);
        assert!(calls.iter().any(|c| c.expect.refused));
    }

    #[test]
    fn bad_calls_files_say_where() {
        let e = parse("c.yaml", "calls:\n- from: a\n  url: ftp://x\n").unwrap_err();
        assert!(e.to_string().contains("c.yaml: calls[0].url"), "{e}");
        let e = parse(
            "c.yaml",
            "calls:\n- from: a\n  url: http://x\n  expect: {decison: allow}\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("decison"), "{e}");
        let e = parse(
            "c.yaml",
            "calls:\n- from: a\n  url: http://x\n  expect: {decision: maybe}\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("neither allow nor deny"), "{e}");
    }
}
