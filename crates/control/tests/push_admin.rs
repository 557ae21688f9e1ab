//! The admin listener: readiness before and after the first snapshot and
//! the lead's other conditions, and what it refuses.

use std::sync::Arc;

use meshward_control::Metrics;
use meshward_control::admin::{self, Readiness};
use meshward_control::registry::Registry;
use meshward_control::source::ConfigSource;
use meshward_test_support::http;
use meshward_test_support::mesh;

#[tokio::test]
async fn ready_once_the_config_is_loaded_and_every_condition_holds() {
    let metrics = Arc::new(Metrics::new());
    let registry = Arc::new(Registry::new(metrics.clone()));
    let readiness = Readiness::new();
    let ca = readiness.condition("ca");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(admin::serve(
        listener,
        registry,
        metrics.clone(),
        readiness.clone(),
    ));
    let get = |path: &'static str| async move {
        http::get(addr, "localhost", path, &[])
            .await
            .unwrap_or_else(|| panic!("GET {path}"))
    };
    assert_eq!(
        get("/healthz/ready").await,
        (503, "not ready: config, ca\n".to_string())
    );
    assert_eq!(get("/debug/config").await.0, 503);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("a.yaml"),
        mesh::WorkloadEntry::new("ns-a", "web").yaml(),
    )
    .unwrap();
    let (_source, snapshots) =
        ConfigSource::start(vec![dir.path().to_path_buf()], None, metrics).unwrap();
    readiness.config_loaded(snapshots.clone());
    assert_eq!(
        get("/healthz/ready").await,
        (503, "not ready: ca\n".to_string())
    );
    ca.set(true);
    assert_eq!(get("/healthz/ready").await, (200, "ready\n".to_string()));
    let (status, body) = get("/debug/config").await;
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["version"], snapshots.borrow().version());
    assert_eq!(v["resources"]["WorkloadEntry"], 1);
    assert_eq!(v["root_namespace"], "istio-system");
    let (status, body) = get("/debug/connections").await;
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["connected"], 0);
    assert_eq!(get("/nothing").await.0, 404);
    let (status, _) = http::request(addr, "POST", "localhost", "/healthz/ready", &[])
        .await
        .unwrap();
    assert_eq!(status, 405);
    let (status, text) = get("/metrics").await;
    assert_eq!(status, 200);
    assert!(
        text.contains("# TYPE citadel_server_csr_count counter\ncitadel_server_csr_count 0\n"),
        "{text}"
    );
    assert!(
        text.contains("\nmeshward_config_accepted_total 1\n"),
        "{text}"
    );
}

/// `/debug/configz` serves the configuration whole, in the form proxies
/// load it: loaded back, it is the configuration the directory and the
/// mesh settings file hold.
#[tokio::test]
async fn debug_configz_serves_what_loads_back_as_the_served_configuration() {
    let metrics = Arc::new(Metrics::new());
    let registry = Arc::new(Registry::new(metrics.clone()));
    let readiness = Readiness::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(admin::serve(
        listener,
        registry,
        metrics.clone(),
        readiness.clone(),
    ));
    let (status, _) = http::get(addr, "localhost", "/debug/configz", &[])
        .await
        .unwrap();
    assert_eq!(status, 503, "nothing loaded yet");

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config");
    std::fs::create_dir(&config).unwrap();
    std::fs::write(
        config.join("a.yaml"),
        [
            mesh::WorkloadEntry::new("ns-a", "web")
                .port("http", 8080)
                .yaml(),
            mesh::mesh_strict(),
            mesh::allow_from(
                "ns-a",
                "web-allow",
                "web",
                "cluster.local/ns/ns-a/sa/api",
                None,
            ),
        ]
        .concat(),
    )
    .unwrap();
    let mesh_file = dir.path().join("mesh.yaml");
    std::fs::write(
        &mesh_file,
        "trustDomain: example.org\nrootNamespace: mesh-root\n",
    )
    .unwrap();
    let (_source, snapshots) =
        ConfigSource::start(vec![config.clone()], Some(mesh_file.clone()), metrics).unwrap();
    readiness.config_loaded(snapshots.clone());

    let (status, body) = http::get(addr, "localhost", "/debug/configz", &[])
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(!body.contains("PRIVATE KEY"), "{body}");
    let configz = meshward_control::Configz::from_json(&body).unwrap();
    assert_eq!(configz.version, snapshots.borrow().version());
    assert_eq!(configz.documents.len(), 3);
    assert_eq!(configz.documents[0].origin, "a.yaml:1");
    let served = configz.load().unwrap().config;
    let mut loader = meshward_config::Loader::new();
    loader.add_path(&config);
    loader.add_mesh_config_path(&mesh_file);
    let direct = loader.finish().unwrap().config;
    assert_eq!(served.counts(), direct.counts());
    assert_eq!(served.mesh.trust_domain, "example.org");
    assert_eq!(served.mesh.root_namespace, "mesh-root");
    assert_eq!(
        format!("{:?}", served.authorization_policies[0].spec),
        format!("{:?}", direct.authorization_policies[0].spec)
    );
    assert_eq!(
        format!("{:?}", served.workload_entries[0].spec),
        format!("{:?}", direct.workload_entries[0].spec)
    );

    // What is not /debug/configz is refused, saying so.
    let e = meshward_control::Configz::from_json("{\"version\": 1}").unwrap_err();
    assert!(e.to_string().starts_with("not /debug/configz JSON"), "{e}");
}
