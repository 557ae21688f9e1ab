//! What a workload is pushed, loaded again with the proxy's loader, gives
//! the same resources and the same policy view as loading the directory;
//! versions depend on content only.

use std::path::Path;
use std::sync::Arc;

use meshward_config::{ConfigSet, Loader, Resource};
use meshward_control::Metrics;
use meshward_control::snapshot::{Snapshot, ViewError, WorkloadView};
use meshward_control::source::ConfigSource;
use meshward_identity::TrustBundle;
use meshward_policy::{PolicyEngine, Workload};
use meshward_test_support::mesh;

/// A directory that exercises what the snapshot must keep: a `List`, a
/// policy redefined in a later file (which keeps the first one's place and
/// creation time), root-namespace and namespace policies with and without
/// selectors, a workload-scoped PeerAuthentication, a RequestAuthentication,
/// a DestinationRule, and a kind meshward skips.
fn write_mesh(dir: &Path) {
    let workloads = [
        mesh::WorkloadEntry::new("ns-a", "web")
            .port("http", 8080)
            .yaml(),
        mesh::WorkloadEntry::new("ns-a", "api").yaml(),
        mesh::WorkloadEntry::new("ns-b", "db").yaml(),
    ]
    .concat();
    std::fs::write(dir.join("10-workloads.yaml"), workloads).unwrap();
    let services = [
        mesh::service_entry("ns-a", "web", "web", "{number: 8080, name: http, protocol: HTTP}"),
        mesh::service_entry("ns-b", "db", "db", "{number: 5432, name: tcp, protocol: TCP}"),
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: db, namespace: ns-b}\nspec:\n  host: db.ns-b.svc.cluster.local\n  exportTo: [\".\"]\n  trafficPolicy: {tls: {mode: ISTIO_MUTUAL}}\n---\n".to_string(),
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: skipped, namespace: ns-a}\ndata: {a: b}\n---\n".to_string(),
    ]
    .concat();
    std::fs::write(dir.join("20-services.yaml"), services).unwrap();
    let policies = [
        mesh::mesh_strict(),
        mesh::peer_authentication("ns-b", "ns-b-permissive", "PERMISSIVE"),
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: web-port, namespace: ns-a}\nspec:\n  selector: {matchLabels: {app: web}}\n  mtls: {mode: STRICT}\n  portLevelMtls: {8080: {mode: PERMISSIVE}}\n---\n".to_string(),
        mesh::allow_from("ns-a", "web-allow", "web", "cluster.local/ns/ns-a/sa/api", None),
        mesh::allow_from("ns-a", "api-allow", "api", "cluster.local/ns/ns-a/sa/web", None),
        mesh::allow_from("ns-b", "db-allow", "db", "cluster.local/ns/ns-a/sa/api", None),
        mesh::authorization_policy("istio-system", "mesh-deny-debug", "  action: DENY\n  rules:\n  - to: [{operation: {paths: [\"/debug\"]}}]\n"),
        mesh::authorization_policy("istio-system", "root-web-only", "  selector: {matchLabels: {app: web}}\n  action: DENY\n  rules:\n  - to: [{operation: {methods: [\"DELETE\"]}}]\n"),
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: jwt, namespace: ns-a}\nspec:\n  selector: {matchLabels: {app: web}}\n  jwtRules: [{issuer: \"https://issuer.test\", jwksUri: \"https://issuer.test/jwks\"}]\n---\n".to_string(),
        // The same name in ns-a as the earlier web-allow, with a timestamp.
        "apiVersion: v1\nkind: List\nitems:\n- apiVersion: security.istio.io/v1\n  kind: AuthorizationPolicy\n  metadata: {name: tie-a, namespace: ns-a, creationTimestamp: \"2024-01-01T00:00:00Z\"}\n  spec: {selector: {matchLabels: {app: web}}, action: DENY, rules: [{to: [{operation: {ports: [\"9999\"]}}]}]}\n- apiVersion: security.istio.io/v1\n  kind: AuthorizationPolicy\n  metadata: {name: tie-b, namespace: ns-a}\n  spec: {action: ALLOW, rules: [{from: [{source: {namespaces: [\"ns-a\"]}}]}]}\n".to_string(),
    ]
    .concat();
    std::fs::write(dir.join("30-policies.yaml"), policies).unwrap();
    // Redefines web-allow: the later definition replaces the earlier in
    // its place; and tie-a without a timestamp keeps the earlier one's.
    let later = [
        mesh::allow_from("ns-a", "web-allow", "web", "cluster.local/ns/ns-b/sa/db", Some("[{operation: {methods: [\"GET\"]}}]")),
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: tie-a, namespace: ns-a}\nspec: {selector: {matchLabels: {app: web}}, action: DENY, rules: [{to: [{operation: {ports: [\"9998\"]}}]}]}\n---\n".to_string(),
    ]
    .concat();
    std::fs::write(dir.join("40-later.yaml"), later).unwrap();
}

fn bundle() -> TrustBundle {
    let pki = meshward_test_support::ca::pki("view-root");
    TrustBundle::from_pem(pki.ca_pem.as_bytes(), Path::new("root.pem")).unwrap()
}

/// Loads a view the way a proxy does: one source per document, in order.
fn load_view(view: &WorkloadView) -> ConfigSet {
    let mut loader = Loader::new();
    for d in &view.documents {
        loader.add_source(&d.origin, &d.content);
    }
    if !view.mesh_config.is_empty() {
        loader.add_mesh_config_source("mesh", &view.mesh_config);
    }
    match loader.finish() {
        Ok(l) => l.config,
        Err(d) => panic!("the pushed documents do not load:\n{d}"),
    }
}

/// Resources without their origin (which names where they were read).
fn strip<T: Clone>(list: &[Resource<T>]) -> Vec<(meshward_config::ObjectMeta, T)> {
    list.iter()
        .map(|r| (r.meta.clone(), r.spec.clone()))
        .collect()
}

fn assert_same_view(full: &Arc<ConfigSet>, pushed: ConfigSet, ns: &str, name: &str) {
    let entry = full
        .workload_entries
        .iter()
        .find(|w| w.meta.namespace == ns && w.meta.name == name)
        .unwrap();
    let w = Workload::from_entry(entry);
    let a = PolicyEngine::new(Arc::clone(full));
    let pushed = Arc::new(pushed);
    let b = PolicyEngine::new(Arc::clone(&pushed));
    let (va, vb) = (a.workload(&w), b.workload(&w));
    assert_eq!(va.policies(), vb.policies(), "{ns}/{name}: policies");
    assert_eq!(va.peer_modes(), vb.peer_modes(), "{ns}/{name}: mTLS modes");
    let ras = |e: &PolicyEngine| -> Vec<String> {
        e.request_authentications(&w).map(|r| r.key()).collect()
    };
    assert_eq!(ras(&a), ras(&b), "{ns}/{name}: RequestAuthentications");
    // What the proxy routes by is all there, equal up to origin.
    assert_eq!(
        strip(&full.workload_entries),
        strip(&pushed.workload_entries)
    );
    assert_eq!(strip(&full.service_entries), strip(&pushed.service_entries));
    assert_eq!(
        strip(&full.destination_rules),
        strip(&pushed.destination_rules)
    );
    assert_eq!(full.mesh, pushed.mesh, "{ns}/{name}: mesh settings");
    // Each pushed policy is the directory's, content and creation time.
    for p in &pushed.authorization_policies {
        let original = full
            .authorization_policies
            .iter()
            .find(|o| o.key() == p.key())
            .unwrap();
        assert_eq!((&original.meta, &original.spec), (&p.meta, &p.spec));
    }
}

#[test]
fn pushed_documents_load_to_the_same_view_as_the_directory() {
    let dir = tempfile::tempdir().unwrap();
    write_mesh(dir.path());
    let (_source, rx) = ConfigSource::start(
        vec![dir.path().to_path_buf()],
        None,
        Arc::new(Metrics::new()),
    )
    .unwrap();
    let snap = rx.borrow().clone();
    let bundle = bundle();
    for (ns, name) in [("ns-a", "web"), ("ns-a", "api"), ("ns-b", "db")] {
        let view = snap.for_workload(ns, name, &bundle).unwrap();
        assert_eq!(view.trust_bundle.len(), 1);
        assert!(view.trust_bundle[0].starts_with("-----BEGIN CERTIFICATE-----"));
        assert_same_view(snap.config(), load_view(&view), ns, name);
    }
    // Only what selects the workload: web gets its own and the root
    // namespace's policies, not api's or another namespace's.
    let web = snap.for_workload("ns-a", "web", &bundle).unwrap();
    let loaded = load_view(&web);
    let names: Vec<String> = loaded
        .authorization_policies
        .iter()
        .map(|p| p.key())
        .collect();
    assert_eq!(
        names,
        [
            "ns-a/web-allow",
            "istio-system/mesh-deny-debug",
            "istio-system/root-web-only",
            "ns-a/tie-a",
            "ns-a/tie-b"
        ],
        "in load order, a redefinition in its first place"
    );
    let db = load_view(&snap.for_workload("ns-b", "db", &bundle).unwrap());
    let names: Vec<String> = db.authorization_policies.iter().map(|p| p.key()).collect();
    assert_eq!(names, ["ns-b/db-allow", "istio-system/mesh-deny-debug"]);
    let pas: Vec<String> = db.peer_authentications.iter().map(|p| p.key()).collect();
    assert_eq!(pas, ["istio-system/default", "ns-b/ns-b-permissive"]);
    assert!(db.request_authentications.is_empty());
    // The skipped kind is not pushed.
    assert!(
        web.documents
            .iter()
            .all(|d| !d.content.contains("ConfigMap"))
    );
}

#[test]
fn the_mesh_settings_file_is_pushed_and_moves_the_root_namespace() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config");
    std::fs::create_dir(&config).unwrap();
    write_mesh(&config);
    std::fs::write(
        config.join("50-root.yaml"),
        mesh::authorization_policy("mesh-root", "root-allow-nothing", "{}"),
    )
    .unwrap();
    let mesh_file = dir.path().join("mesh.yaml");
    std::fs::write(&mesh_file, "rootNamespace: mesh-root\n").unwrap();
    let (_source, rx) = ConfigSource::start(
        vec![config.clone()],
        Some(mesh_file),
        Arc::new(Metrics::new()),
    )
    .unwrap();
    let snap = rx.borrow().clone();
    let view = snap.for_workload("ns-b", "db", &bundle()).unwrap();
    assert_eq!(view.mesh_config, "rootNamespace: mesh-root\n");
    let loaded = load_view(&view);
    assert_eq!(loaded.mesh.root_namespace, "mesh-root");
    let names: Vec<String> = loaded
        .authorization_policies
        .iter()
        .map(|p| p.key())
        .collect();
    // istio-system is an ordinary namespace now: its policies are gone.
    assert_eq!(names, ["ns-b/db-allow", "mesh-root/root-allow-nothing"]);
    assert_same_view(snap.config(), loaded, "ns-b", "db");
}

#[test]
fn an_unknown_workload_has_no_view() {
    let dir = tempfile::tempdir().unwrap();
    write_mesh(dir.path());
    let (_source, rx) = ConfigSource::start(
        vec![dir.path().to_path_buf()],
        None,
        Arc::new(Metrics::new()),
    )
    .unwrap();
    let snap = rx.borrow().clone();
    match snap.for_workload("ns-a", "ghost", &bundle()) {
        Err(e @ ViewError::UnknownWorkload { .. }) => {
            assert!(
                e.to_string()
                    .contains("ns-a/ghost is not in the configuration"),
                "{e}"
            );
        }
        other => panic!("expected UnknownWorkload, got {other:?}"),
    }
}

#[test]
fn versions_depend_on_content_only() {
    // Two replicas over the same directory, and a copy mounted elsewhere.
    let dir = tempfile::tempdir().unwrap();
    write_mesh(dir.path());
    let copy = tempfile::tempdir().unwrap();
    write_mesh(copy.path());
    let start = |p: &Path| {
        ConfigSource::start(vec![p.to_path_buf()], None, Arc::new(Metrics::new())).unwrap()
    };
    let (_a, ra) = start(dir.path());
    let (_b, rb) = start(dir.path());
    let (_c, rc) = start(copy.path());
    let (a, b, c) = (
        ra.borrow().clone(),
        rb.borrow().clone(),
        rc.borrow().clone(),
    );
    assert_eq!(a.version(), b.version());
    assert_eq!(a.version(), c.version());
    let bundle = bundle();
    let view = |s: &Snapshot| s.for_workload("ns-a", "web", &bundle).unwrap();
    assert_eq!(view(&a), view(&b));
    assert_eq!(view(&a), view(&c));
    // Another bundle is another version of the view, not of the snapshot.
    let other = view(&a);
    let unbundled = a.for_workload("ns-a", "web", &TrustBundle::new()).unwrap();
    assert_ne!(other.version, unbundled.version);
}

#[test]
fn a_first_load_with_errors_names_every_one_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    write_mesh(dir.path());
    std::fs::write(
        dir.path().join("90-bad.yaml"),
        mesh::authorization_policy("ns-a", "bad", "  action: ALLOW\n  bogus: 1\n")
            + &mesh::authorization_policy("ns-a", "bad2", "  action: MAYBE\n"),
    )
    .unwrap();
    let err = ConfigSource::start(
        vec![dir.path().to_path_buf()],
        None,
        Arc::new(Metrics::new()),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("90-bad.yaml:1"), "{err}");
    assert!(err.contains("bogus"), "{err}");
    assert!(err.contains("90-bad.yaml:6"), "{err}");
    assert!(err.contains("MAYBE"), "{err}");
}
