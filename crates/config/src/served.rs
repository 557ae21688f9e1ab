//! Configuration as a control plane serves it: documents, each with the
//! origin it was read from (`policies/a.yaml:3`), and the mesh settings
//! text. The proxy loads what its config stream pushes with this, and the
//! CLI loads what `/debug/configz` shows with it, so both read exactly
//! what the control plane serves, the same way.

use crate::{Diagnostics, Loaded, Loader};

/// The name mesh settings are reported under in diagnostics.
pub const MESH_CONFIG_ORIGIN: &str = "mesh_config";

/// Loads `documents` (`(origin, content)`, in the control plane's load
/// order) and the mesh settings text `mesh_config` (Istio's meshConfig
/// block or another shape `--mesh-config` takes; empty or blank for the
/// defaults), validated whole as any load is.
pub fn load_served<'a>(
    documents: impl IntoIterator<Item = (&'a str, &'a str)>,
    mesh_config: &str,
) -> Result<Loaded, Diagnostics> {
    let mut loader = Loader::new();
    for (origin, content) in documents {
        loader.add_source(origin, content);
    }
    if !mesh_config.trim().is_empty() {
        loader.add_mesh_config_source(MESH_CONFIG_ORIGIN, mesh_config);
    }
    let mut loaded = loader.finish()?;
    let c = &mut loaded.config;
    restore_origins(&mut c.peer_authentications);
    restore_origins(&mut c.authorization_policies);
    restore_origins(&mut c.request_authentications);
    restore_origins(&mut c.destination_rules);
    restore_origins(&mut c.service_entries);
    restore_origins(&mut c.workload_entries);
    Ok(loaded)
}

/// Each document is loaded under its origin `FILE:LINE` as if that were a
/// file name, the document starting at its line 1: give each resource the
/// file and line it was written at, so that what points at it (logs,
/// `/config_dump`, `meshward analyze --live`, `describe`) says where.
fn restore_origins<T>(resources: &mut [crate::Resource<T>]) {
    for r in resources {
        let o = &mut r.origin;
        if let Some((file, line)) = o.file.rsplit_once(':')
            && let Ok(start) = line.parse::<u32>()
        {
            o.line = start.saturating_add(o.line.saturating_sub(1));
            o.file = std::sync::Arc::from(file);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_and_mesh_settings_load_and_errors_name_their_origin() {
        let pa = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: istio-system}\nspec: {mtls: {mode: STRICT}}\n";
        let loaded =
            load_served([("policies/pa.yaml:1", pa)], "trustDomain: example.org\n").unwrap();
        assert_eq!(loaded.config.mesh.trust_domain, "example.org");
        assert_eq!(loaded.config.peer_authentications.len(), 1);
        let origin = &loaded.config.peer_authentications[0].origin;
        assert_eq!((&*origin.file, origin.line), ("policies/pa.yaml", 1));
        let later = load_served([("policies/pa.yaml:12", pa)], "").unwrap();
        let origin = &later.config.peer_authentications[0].origin;
        assert_eq!((&*origin.file, origin.line), ("policies/pa.yaml", 12));
        let defaults = load_served([("policies/pa.yaml:1", pa)], "  \n").unwrap();
        assert_eq!(defaults.config.mesh.trust_domain, "cluster.local");

        let bad = pa.replace("STRICT", "SOMETIMES");
        let e = load_served([("policies/pa.yaml:7", bad.as_str())], "").unwrap_err();
        assert!(e.to_string().contains("policies/pa.yaml:7"), "{e}");
    }
}
