//! What-if questions about peer authentication: the configuration as it
//! would be if a namespace switched mode, for the migration report
//! (`meshward mtls report --if-strict NS`).

use std::sync::Arc;

use meshward_config::model::MtlsMode;
use meshward_config::model::security::PeerAuthentication;
use meshward_config::{ConfigSet, ObjectMeta, Origin, Resource};

/// The name of the PeerAuthentication [`with_namespace_mode`] adds.
pub const WHAT_IF_NAME: &str = "what-if";

/// `config` as if namespace `namespace` had one namespace-wide
/// PeerAuthentication of mode `mode` in place of its own (those without a
/// selector or target): as `kubectl apply` of a namespace `default` policy
/// would make it. Workload and port-level policies are kept, so whatever
/// they set still wins, as it would in Istio.
pub fn with_namespace_mode(config: &ConfigSet, namespace: &str, mode: MtlsMode) -> ConfigSet {
    let mut out = config.clone();
    out.peer_authentications.retain(|pa| {
        pa.meta.namespace != namespace
            || pa.spec.selector.is_some()
            || !pa.spec.target_refs.is_empty()
    });
    out.peer_authentications.push(Resource {
        meta: ObjectMeta {
            name: WHAT_IF_NAME.to_string(),
            namespace: namespace.to_string(),
            ..ObjectMeta::default()
        },
        origin: Origin {
            file: Arc::from("what-if"),
            line: 0,
            order: 0,
        },
        spec: PeerAuthentication {
            selector: None,
            target_refs: Vec::new(),
            mode: Some(mode),
            port_level_mtls: Default::default(),
        },
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{PolicyEngine, Workload};

    fn load(yaml: &str) -> ConfigSet {
        let mut l = meshward_config::Loader::new();
        l.add_source("t.yaml", yaml);
        l.finish().unwrap().config
    }

    const CONFIG: &str = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: production}\nspec: {mtls: {mode: PERMISSIVE}}\n---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: pay, namespace: production}\nspec:\n  selector: {matchLabels: {app: pay}}\n  mtls: {mode: UNSET}\n  portLevelMtls: {9090: {mode: PERMISSIVE}}\n";

    fn mode(config: ConfigSet, app: &str, port: u16) -> MtlsMode {
        let engine = PolicyEngine::new(Arc::new(config));
        let w = Workload {
            namespace: "production".into(),
            service_account: app.into(),
            labels: [("app".to_string(), app.to_string())].into(),
        };
        engine.workload(&w).mtls(port).mode
    }

    #[test]
    fn a_namespace_switched_to_strict_keeps_its_workload_exceptions() {
        let config = load(CONFIG);
        assert_eq!(mode(config.clone(), "orders", 8080), MtlsMode::Permissive);
        let strict = with_namespace_mode(&config, "production", MtlsMode::Strict);
        assert_eq!(mode(strict.clone(), "orders", 8080), MtlsMode::Strict);
        // UNSET inherits the new namespace mode; the port-level exception stays.
        assert_eq!(mode(strict.clone(), "pay", 8080), MtlsMode::Strict);
        assert_eq!(mode(strict, "pay", 9090), MtlsMode::Permissive);
    }
}
