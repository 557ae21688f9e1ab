//! The table `meshward up` prints once the mesh is ready.

use crate::OpsError;
use crate::admin::{Side, get_json};
use crate::live::Live;
use crate::mesh::MeshWorkload;
use crate::text::columns;

/// Workload, SPIFFE ID, ports with the mTLS mode each proxy enforces, and
/// the outbound listener, one row per workload.
pub async fn render(live: &Live, workloads: &[MeshWorkload]) -> Result<String, OpsError> {
    let td = &live.config.mesh.trust_domain;
    let mut rows = vec![[
        "WORKLOAD".to_string(),
        "SPIFFE ID".to_string(),
        "PORTS (mTLS mode)".to_string(),
        "OUTBOUND".to_string(),
    ]];
    for w in workloads {
        if !w.has_proxy {
            let ports: Vec<String> = w
                .ports
                .iter()
                .map(|(name, port)| format!("{port}/{name} plaintext"))
                .collect();
            rows.push([
                w.key(),
                "(no proxy)".to_string(),
                ports.join(", "),
                "-".to_string(),
            ]);
            continue;
        }
        let proxy = live.proxy(&w.key())?;
        let admin = proxy.admin.expect("reachable");
        let dump = get_json(Side::Proxy, admin, "/config_dump").await?;
        let ports: Vec<String> = dump["inbound"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| {
                format!(
                    "{}/{} {}",
                    p["port"],
                    p["name"].as_str().unwrap_or("?"),
                    p["mtls_mode"].as_str().unwrap_or("?")
                )
            })
            .collect();
        rows.push([
            w.key(),
            proxy.identity.clone().unwrap_or_else(|| w.spiffe_id(td)),
            if ports.is_empty() {
                "-".to_string()
            } else {
                ports.join(", ")
            },
            dump["outbound"]["http"].as_str().unwrap_or("-").to_string(),
        ]);
    }
    Ok(columns(&rows))
}
