//! `meshward status`, as `istioctl proxy-status`: every proxy the control
//! plane knows, whether it is connected, whether it runs the configuration
//! served now (or the error of its last NACK), and when its certificate
//! expires.

use serde_json::{Value, json};

use crate::admin::{Side, get_json};
use crate::live::Live;
use crate::text::columns;

/// One proxy's status.
#[derive(Debug, Clone)]
pub struct ProxyStatus {
    pub workload: String,
    pub node_id: String,
    pub connected: bool,
    /// `SYNCED`, `STALE`, `NACKED` or `NOT SENT`.
    pub sync: &'static str,
    pub version_acked: Option<String>,
    pub last_nack: Option<(String, String)>,
    /// The workload certificate's `notAfter` and the time left.
    pub cert_expiry: Option<(String, String)>,
    pub proxy_version: Option<String>,
}

/// The status of every proxy, and the workloads that should have a proxy
/// but have none connected (`connected: false`, no node).
pub async fn status(live: &Live) -> Vec<ProxyStatus> {
    let mut out = Vec::new();
    for p in &live.proxies {
        let sync = match (&p.version_sent, &p.version_acked, &p.last_nack) {
            (None, ..) => "NOT SENT",
            (Some(sent), _, Some((nacked, _))) if nacked == sent => "NACKED",
            (Some(sent), Some(acked), _) if acked == sent => "SYNCED",
            _ => "STALE",
        };
        let cert_expiry = match (p.connected, p.admin) {
            (true, Some(admin)) => {
                get_json(Side::Proxy, admin, "/certs")
                    .await
                    .ok()
                    .and_then(|c| {
                        let leaf = &c["chain"]["certificates"][0];
                        Some((
                            leaf["not_after"].as_str()?.to_string(),
                            leaf["time_left"].as_str().unwrap_or_default().to_string(),
                        ))
                    })
            }
            _ => None,
        };
        out.push(ProxyStatus {
            workload: p.workload.clone(),
            node_id: p.node_id.clone(),
            connected: p.connected,
            sync,
            version_acked: p.version_acked.clone(),
            last_nack: p.last_nack.clone(),
            cert_expiry,
            proxy_version: p.proxy_version.clone(),
        });
    }
    for w in live.workloads().into_iter().filter(|w| w.has_proxy) {
        if !out.iter().any(|s| s.workload == w.key()) {
            out.push(ProxyStatus {
                workload: w.key(),
                node_id: String::new(),
                connected: false,
                sync: "NOT SENT",
                version_acked: None,
                last_nack: None,
                cert_expiry: None,
                proxy_version: None,
            });
        }
    }
    out
}

fn short(v: &str) -> String {
    v.chars().take(12).collect()
}

/// As a table.
pub fn render(live: &Live, rows: &[ProxyStatus]) -> String {
    let mut table = vec![[
        "NAME".to_string(),
        "CONNECTED".to_string(),
        "CONFIG".to_string(),
        "VERSION".to_string(),
        "CERT EXPIRES".to_string(),
        "NODE".to_string(),
    ]];
    for r in rows {
        table.push([
            r.workload.clone(),
            if r.connected { "yes" } else { "no" }.to_string(),
            r.sync.to_string(),
            r.version_acked
                .as_deref()
                .map(short)
                .unwrap_or_else(|| "-".into()),
            r.cert_expiry
                .as_ref()
                .map(|(at, left)| format!("{at} ({left})"))
                .unwrap_or_else(|| "-".into()),
            if r.node_id.is_empty() {
                "(no proxy connected)".to_string()
            } else {
                r.node_id.clone()
            },
        ]);
    }
    let mut out = format!(
        "control plane {} (configuration {}; each proxy's version is a hash of its own view)\n\n",
        live.control_admin,
        short(&live.version)
    );
    out.push_str(&columns(&table));
    for r in rows {
        if let Some((v, e)) = &r.last_nack {
            out.push_str(&format!(
                "\n{} refused version {}: {e}",
                r.workload,
                short(v)
            ));
        }
    }
    if rows.iter().any(|r| r.last_nack.is_some()) {
        out.push('\n');
    }
    out
}

/// As JSON.
pub fn to_json(live: &Live, rows: &[ProxyStatus]) -> Value {
    json!({
        "control_admin": live.control_admin.to_string(),
        "version": live.version,
        "proxies": rows.iter().map(|r| json!({
            "workload": r.workload,
            "node_id": r.node_id,
            "connected": r.connected,
            "config": r.sync,
            "version_acked": r.version_acked,
            "last_nack": r.last_nack.as_ref().map(|(v, e)| json!({"version": v, "error": e})),
            "cert_not_after": r.cert_expiry.as_ref().map(|(a, _)| a),
            "cert_time_left": r.cert_expiry.as_ref().map(|(_, l)| l),
            "proxy_version": r.proxy_version,
        })).collect::<Vec<_>>(),
    })
}
