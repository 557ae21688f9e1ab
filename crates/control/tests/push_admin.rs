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
