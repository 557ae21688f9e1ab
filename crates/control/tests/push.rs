//! The config stream over real sockets: a tonic server on 127.0.0.1 with
//! the service behind an interceptor that stands in for the TLS server
//! (it records the identity a test names as the peer's), tonic clients as
//! proxies, a watched temporary directory as the source.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshward_control::admin::{self, Readiness};
use meshward_control::push::ConfigService;
use meshward_control::registry::Registry;
use meshward_control::snapshot::Snapshot;
use meshward_control::source::ConfigSource;
use meshward_control::{Metrics, PeerInfo};
use meshward_identity::{SpiffeId, TrustBundle, TrustDomain};
use meshward_proto::config::config_discovery_service_server::ConfigDiscoveryServiceServer;
use meshward_proto::config::{
    ConfigRequest, ConfigResponse, Node, Status as ProtoStatus,
    config_discovery_service_client::ConfigDiscoveryServiceClient,
};
use meshward_test_support::mesh;
use tokio::sync::{mpsc, watch};
use tonic::codegen::tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::service::interceptor::InterceptedService;
use tonic::{Code, Request, Status, Streaming};

const TD: &str = "cluster.local";
const IDENTITY_HEADER: &str = "x-test-identity";

/// How long a test waits for a response that must come.
const PATIENCE: Duration = Duration::from_secs(10);

fn id(ns: &str, sa: &str) -> String {
    format!("spiffe://{TD}/ns/{ns}/sa/{sa}")
}

/// Stands in for the TLS server: the identity named in a header becomes
/// the peer's proven identity.
fn identify(mut req: Request<()>) -> Result<Request<()>, Status> {
    let identity = req
        .metadata()
        .get(IDENTITY_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| SpiffeId::parse(s).ok());
    let remote = req.remote_addr();
    req.extensions_mut().insert(PeerInfo { remote, identity });
    Ok(req)
}

fn write_base(dir: &Path) {
    let workloads = [
        mesh::WorkloadEntry::new("ns-a", "web").yaml(),
        mesh::WorkloadEntry::new("ns-a", "api").yaml(),
        mesh::WorkloadEntry::new("ns-a", "batch").yaml(),
        mesh::WorkloadEntry::new("ns-b", "db").yaml(),
    ]
    .concat();
    std::fs::write(dir.join("10-workloads.yaml"), workloads).unwrap();
    let policies = [
        mesh::mesh_strict(),
        mesh::allow_from(
            "ns-a",
            "web-allow",
            "web",
            &format!("{TD}/ns/ns-a/sa/api"),
            None,
        ),
        mesh::allow_from(
            "ns-b",
            "db-allow",
            "db",
            &format!("{TD}/ns/ns-a/sa/api"),
            None,
        ),
    ]
    .concat();
    std::fs::write(dir.join("20-policies.yaml"), policies).unwrap();
}

struct Plane {
    dir: tempfile::TempDir,
    addr: SocketAddr,
    admin: SocketAddr,
    metrics: Arc<Metrics>,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    bundle: watch::Sender<Arc<TrustBundle>>,
    _source: ConfigSource,
}

impl Plane {
    async fn start() -> Plane {
        Plane::start_with(|s| s).await
    }

    async fn start_with(adjust: impl FnOnce(ConfigService) -> ConfigService) -> Plane {
        let dir = tempfile::tempdir().unwrap();
        write_base(dir.path());
        let metrics = Arc::new(Metrics::new());
        let (source, snapshots) =
            ConfigSource::start(vec![dir.path().to_path_buf()], None, metrics.clone()).unwrap();
        let pki = meshward_test_support::ca::pki("push-root");
        let roots = TrustBundle::from_pem(pki.ca_pem.as_bytes(), Path::new("root.pem")).unwrap();
        let (bundle, bundle_rx) = watch::channel(Arc::new(roots));
        let registry = Arc::new(Registry::new(metrics.clone()));
        let service: ConfigDiscoveryServiceServer<ConfigService> = adjust(ConfigService::new(
            snapshots.clone(),
            bundle_rx,
            TrustDomain::new(TD).unwrap(),
            registry.clone(),
            metrics.clone(),
        ))
        .into_server();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(InterceptedService::new(service, identify))
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        let admin_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = admin_listener.local_addr().unwrap();
        let readiness = Readiness::new();
        readiness.config_loaded(snapshots.clone());
        tokio::spawn(admin::serve(
            admin_listener,
            registry,
            metrics.clone(),
            readiness,
        ));
        Plane {
            dir,
            addr,
            admin,
            metrics,
            snapshots,
            bundle,
            _source: source,
        }
    }

    fn write(&self, file: &str, content: &str) {
        std::fs::write(self.dir.path().join(file), content).unwrap();
    }

    fn version(&self) -> String {
        self.snapshots.borrow().version().to_string()
    }

    async fn get(&self, path: &str) -> (u16, String) {
        meshward_test_support::http::get(self.admin, "localhost", path, &[])
            .await
            .unwrap_or_else(|| panic!("admin GET {path} failed"))
    }

    async fn subscribe(
        &self,
        identity: Option<&str>,
        workload: &str,
        node_id: &str,
    ) -> Result<Proxy, Status> {
        self.subscribe_with(
            identity,
            ConfigRequest {
                node: Some(Node {
                    id: node_id.to_string(),
                    workload: workload.to_string(),
                    version: "test".to_string(),
                    admin_address: String::new(),
                }),
                ..Default::default()
            },
        )
        .await
    }

    async fn subscribe_with(
        &self,
        identity: Option<&str>,
        first: ConfigRequest,
    ) -> Result<Proxy, Status> {
        let mut client = ConfigDiscoveryServiceClient::connect(format!("http://{}", self.addr))
            .await
            .unwrap();
        let (tx, rx) = mpsc::channel(8);
        tx.send(first).await.unwrap();
        let mut req = Request::new(ReceiverStream::new(rx));
        if let Some(identity) = identity {
            req.metadata_mut()
                .insert(IDENTITY_HEADER, identity.parse().unwrap());
        }
        let inbound = client.stream_config(req).await?.into_inner();
        Ok(Proxy { tx, inbound })
    }
}

/// One simulated proxy's stream.
struct Proxy {
    tx: mpsc::Sender<ConfigRequest>,
    inbound: Streaming<ConfigResponse>,
}

impl Proxy {
    /// The next response, within `limit`.
    async fn next_within(&mut self, limit: Duration) -> Option<Result<ConfigResponse, Status>> {
        match tokio::time::timeout(limit, self.inbound.message()).await {
            Err(_) => None,
            Ok(Ok(Some(r))) => Some(Ok(r)),
            Ok(Ok(None)) => Some(Err(Status::cancelled("stream ended"))),
            Ok(Err(s)) => Some(Err(s)),
        }
    }

    async fn next(&mut self) -> ConfigResponse {
        match self.next_within(PATIENCE).await {
            Some(Ok(r)) => r,
            Some(Err(s)) => panic!("stream failed: {s:?}"),
            None => panic!("no response within {PATIENCE:?}"),
        }
    }

    async fn ack(&self, r: &ConfigResponse) {
        self.tx
            .send(ConfigRequest {
                version_info: r.version_info.clone(),
                response_nonce: r.nonce.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
    }

    async fn nack(&self, r: &ConfigResponse, kept: &str, error: &str) {
        self.tx
            .send(ConfigRequest {
                version_info: kept.to_string(),
                response_nonce: r.nonce.clone(),
                error_detail: Some(ProtoStatus {
                    code: 3,
                    message: error.to_string(),
                }),
                ..Default::default()
            })
            .await
            .unwrap();
    }
}

fn policy_names(r: &ConfigResponse) -> Vec<String> {
    r.documents
        .iter()
        .filter_map(|d| {
            let v: serde_json::Value = serde_json::from_str(&d.content).unwrap();
            (v["kind"] == "AuthorizationPolicy").then(|| {
                format!(
                    "{}/{}",
                    v["metadata"]["namespace"].as_str().unwrap_or("default"),
                    v["metadata"]["name"].as_str().unwrap_or_default()
                )
            })
        })
        .collect()
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test]
async fn a_subscriber_gets_only_its_policies_with_the_trust_bundle() {
    let plane = Plane::start().await;
    let mut web = plane
        .subscribe(Some(&id("ns-a", "web")), "ns-a/web", "web-1")
        .await
        .unwrap();
    let r = web.next().await;
    assert_eq!(policy_names(&r), ["ns-a/web-allow"]);
    assert_eq!(r.trust_bundle.len(), 1);
    assert!(r.trust_bundle[0].starts_with("-----BEGIN CERTIFICATE-----"));
    assert!(!r.version_info.is_empty() && !r.nonce.is_empty());
    // Every workload entry is there (the proxy routes by them); the origin
    // is relative to the configured directory.
    let entries = r
        .documents
        .iter()
        .filter(|d| d.content.contains("\"WorkloadEntry\""))
        .count();
    assert_eq!(entries, 4);
    assert!(r.documents.iter().all(|d| !d.origin.starts_with('/')));
    assert!(
        r.documents[0].origin.starts_with("10-workloads.yaml:"),
        "{:?}",
        r.documents[0].origin
    );
    let (status, ready) = plane.get("/healthz/ready").await;
    assert_eq!((status, ready.as_str()), (200, "ready\n"));
    let (status, cfg) = plane.get("/debug/config").await;
    assert_eq!(status, 200);
    let cfg: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    assert_eq!(cfg["version"], plane.version());
    assert_eq!(cfg["resources"]["WorkloadEntry"], 4);
    assert_eq!(cfg["resources"]["AuthorizationPolicy"], 2);
}

#[tokio::test]
async fn a_policy_written_to_the_directory_reaches_every_subscriber_within_a_second() {
    let plane = Plane::start().await;
    let mut proxies = Vec::new();
    for i in 0..20 {
        let (ns, name) = if i % 2 == 0 {
            ("ns-a", "web")
        } else {
            ("ns-b", "db")
        };
        let mut p = plane
            .subscribe(
                Some(&id(ns, name)),
                &format!("{ns}/{name}"),
                &format!("{name}-{i}"),
            )
            .await
            .unwrap();
        let r = p.next().await;
        p.ack(&r).await;
        proxies.push(p);
    }
    // One policy per namespace, both in one new file.
    let written = Instant::now();
    plane.write(
        "30-new.yaml",
        &(mesh::allow_from(
            "ns-a",
            "web-new",
            "web",
            "cluster.local/ns/ns-b/sa/db",
            None,
        ) + &mesh::allow_from("ns-b", "db-new", "db", "cluster.local/ns/ns-a/sa/web", None)),
    );
    let mut tasks = tokio::task::JoinSet::new();
    for mut p in proxies {
        tasks.spawn(async move {
            let r = p.next().await;
            let elapsed = written.elapsed();
            p.ack(&r).await;
            (elapsed, policy_names(&r), p)
        });
    }
    let mut slowest = Duration::ZERO;
    let mut proxies = Vec::new();
    while let Some(done) = tasks.join_next().await {
        let (elapsed, names, p) = done.unwrap();
        proxies.push(p);
        assert!(
            names.contains(&"ns-a/web-new".to_string())
                || names.contains(&"ns-b/db-new".to_string()),
            "{names:?}"
        );
        slowest = slowest.max(elapsed);
    }
    assert!(
        slowest < Duration::from_secs(1),
        "the slowest subscriber got the change after {slowest:?}"
    );
    let (_, metrics) = plane.get("/metrics").await;
    assert_eq!(metric(&metrics, "pilot_xds"), Some(20.0), "{metrics}");
    assert_eq!(
        metric(&metrics, "pilot_xds_pushes{type=\"config\"}"),
        Some(40.0),
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "meshward_config_accepted_total"),
        Some(2.0),
        "{metrics}"
    );
    // Every ACK is timed: 20 of the first versions, 20 of the change.
    meshward_test_support::wait::eventually("40 ACKs timed", || async {
        let (_, metrics) = plane.get("/metrics").await;
        (metric(&metrics, "pilot_proxy_convergence_time_count") == Some(40.0)).then_some(())
    })
    .await;
    drop(proxies);
}

#[tokio::test]
async fn acks_and_nacks_are_recorded_per_proxy() {
    let plane = Plane::start().await;
    let mut web = plane
        .subscribe(Some(&id("ns-a", "web")), "ns-a/web", "web-ack")
        .await
        .unwrap();
    let v1 = web.next().await;
    web.ack(&v1).await;
    plane.write(
        "30-new.yaml",
        &mesh::allow_from(
            "ns-a",
            "web-new",
            "web",
            "cluster.local/ns/ns-b/sa/db",
            None,
        ),
    );
    let v2 = web.next().await;
    assert_ne!(v1.version_info, v2.version_info);
    assert_ne!(v1.nonce, v2.nonce);
    web.nack(
        &v2,
        &v1.version_info,
        "cannot bind 127.0.0.1:15006: address in use",
    )
    .await;
    let state =
        meshward_test_support::wait::eventually("the NACK in /debug/connections", || async {
            let (_, body) = plane.get("/debug/connections").await;
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            let p = v["proxies"]
                .as_array()?
                .iter()
                .find(|p| p["node_id"] == "web-ack")?
                .clone();
            (!p["last_nack"].is_null()).then_some(p)
        })
        .await;
    assert_eq!(state["connected"], true);
    assert_eq!(state["workload"], "ns-a/web");
    assert_eq!(state["identity"], id("ns-a", "web"));
    assert_eq!(state["version_acked"], v1.version_info.as_str());
    assert_eq!(state["version_sent"], v2.version_info.as_str());
    assert_eq!(state["last_nack"]["version"], v2.version_info.as_str());
    assert_eq!(
        state["last_nack"]["error"],
        "cannot bind 127.0.0.1:15006: address in use"
    );
    let (_, metrics) = plane.get("/metrics").await;
    assert_eq!(
        metric(&metrics, "pilot_total_xds_rejects"),
        Some(1.0),
        "{metrics}"
    );
    // Closing the stream keeps the entry, disconnected.
    drop(web);
    let state = meshward_test_support::wait::eventually("the proxy shown disconnected", || async {
        let (_, body) = plane.get("/debug/connections").await;
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let p = v["proxies"]
            .as_array()?
            .iter()
            .find(|p| p["node_id"] == "web-ack")?
            .clone();
        (p["connected"] == false).then_some(p)
    })
    .await;
    assert_eq!(state["version_acked"], v1.version_info.as_str());
    let (_, metrics) = plane.get("/metrics").await;
    assert_eq!(metric(&metrics, "pilot_xds"), Some(0.0), "{metrics}");
}

#[tokio::test]
async fn an_invalid_change_is_refused_whole_and_the_next_valid_one_is_pushed() {
    let plane = Plane::start().await;
    let mut web = plane
        .subscribe(Some(&id("ns-a", "web")), "ns-a/web", "web-inv")
        .await
        .unwrap();
    let good = web.next().await;
    web.ack(&good).await;
    let version = plane.version();
    // One valid and one invalid policy in one change: neither is taken.
    plane.write(
        "30-new.yaml",
        &(mesh::allow_from(
            "ns-a",
            "web-new",
            "web",
            "cluster.local/ns/ns-b/sa/db",
            None,
        ) + &mesh::authorization_policy(
            "ns-a",
            "broken",
            "  selector: {matchLabels: {app: web}}\n  actionn: DENY\n",
        )),
    );
    meshward_test_support::wait::eventually("the change counted as rejected", || async {
        (plane.metrics.config_rejected.get() == 1).then_some(())
    })
    .await;
    assert_eq!(plane.version(), version);
    assert!(
        web.next_within(Duration::from_millis(300)).await.is_none(),
        "nothing is pushed for a refused change"
    );
    let (_, metrics) = plane.get("/metrics").await;
    assert_eq!(
        metric(&metrics, "meshward_config_rejected_total"),
        Some(1.0),
        "{metrics}"
    );
    // Emptying a file that held documents is taken for a write in progress.
    plane.write("20-policies.yaml", "");
    plane.write(
        "30-new.yaml",
        &mesh::allow_from(
            "ns-a",
            "web-new",
            "web",
            "cluster.local/ns/ns-b/sa/db",
            None,
        ),
    );
    assert!(
        web.next_within(Duration::from_millis(1500)).await.is_none(),
        "an emptied file does not wipe the mesh"
    );
    assert_eq!(plane.version(), version);
    // The file gets its content back (with the fix): pushed.
    write_base(plane.dir.path());
    let next = web.next().await;
    assert_eq!(policy_names(&next), ["ns-a/web-allow", "ns-a/web-new"]);
    assert_ne!(plane.version(), version);
}

#[tokio::test]
async fn subscriptions_that_prove_nothing_or_another_identity_are_refused() {
    let plane = Plane::start().await;
    let code_and_message = |r: Result<Proxy, Status>| match r {
        Ok(_) => panic!("subscription accepted"),
        Err(s) => (s.code(), s.message().to_string()),
    };
    let (code, msg) = code_and_message(plane.subscribe(None, "ns-a/web", "n1").await);
    assert_eq!(code, Code::Unauthenticated, "{msg}");
    // Another service account of the same namespace.
    let (code, msg) = code_and_message(
        plane
            .subscribe(Some(&id("ns-a", "api")), "ns-a/web", "n2")
            .await,
    );
    assert_eq!(code, Code::PermissionDenied, "{msg}");
    assert!(
        msg.contains("certificate names spiffe://cluster.local/ns/ns-a/sa/api")
            && msg.contains("workload ns-a/web runs as ns ns-a sa web"),
        "{msg}"
    );
    // Another namespace: refused before looking the workload up.
    let (code, msg) = code_and_message(
        plane
            .subscribe(Some(&id("ns-a", "db")), "ns-b/db", "n3")
            .await,
    );
    assert_eq!(code, Code::PermissionDenied, "{msg}");
    assert!(msg.contains("namespace ns-b"), "{msg}");
    // Another trust domain.
    let (code, msg) = code_and_message(
        plane
            .subscribe(
                Some("spiffe://other.example/ns/ns-a/sa/web"),
                "ns-a/web",
                "n4",
            )
            .await,
    );
    assert_eq!(code, Code::PermissionDenied, "{msg}");
    // A workload the configuration does not have.
    let (code, msg) = code_and_message(
        plane
            .subscribe(Some(&id("ns-a", "ghost")), "ns-a/ghost", "n5")
            .await,
    );
    assert_eq!(code, Code::NotFound, "{msg}");
    assert!(
        msg.contains("ns-a/ghost is not in the configuration"),
        "{msg}"
    );
    // Malformed subscriptions.
    let (code, msg) =
        code_and_message(plane.subscribe(Some(&id("ns-a", "web")), "web", "n6").await);
    assert_eq!(code, Code::InvalidArgument, "{msg}");
    assert!(msg.contains("NAMESPACE/NAME"), "{msg}");
    let (code, msg) = code_and_message(
        plane
            .subscribe(Some(&id("ns-a", "web")), "ns-a/web", "")
            .await,
    );
    assert_eq!(code, Code::InvalidArgument, "{msg}");
    let (code, msg) = code_and_message(
        plane
            .subscribe_with(Some(&id("ns-a", "web")), ConfigRequest::default())
            .await,
    );
    assert_eq!(code, Code::InvalidArgument, "{msg}");
    let (code, msg) = code_and_message(
        plane
            .subscribe(Some(&id("ns-a", "web")), "ns-a/web", &"x".repeat(1000))
            .await,
    );
    assert_eq!(code, Code::InvalidArgument, "{msg}");
    assert!(msg.contains("node.id is longer than 512"), "{msg}");
    let long = "x".repeat(100_000);
    let (code, msg) = code_and_message(
        plane
            .subscribe(Some(&id("ns-a", "web")), "ns-a/web", &long)
            .await,
    );
    assert_eq!(
        code,
        Code::OutOfRange,
        "an oversized request is refused by the decoder: {msg}"
    );
    // None of them is registered; the service still serves.
    let (_, body) = plane.get("/debug/connections").await;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["proxies"].as_array().unwrap().len(), 0, "{body}");
    let mut web = plane
        .subscribe(Some(&id("ns-a", "web")), "ns-a/web", "ok")
        .await
        .unwrap();
    web.next().await;
}

#[tokio::test]
async fn a_change_that_does_not_concern_a_workload_is_not_pushed_to_it() {
    let plane = Plane::start().await;
    let mut web = plane
        .subscribe(Some(&id("ns-a", "web")), "ns-a/web", "web-u")
        .await
        .unwrap();
    let mut db = plane
        .subscribe(Some(&id("ns-b", "db")), "ns-b/db", "db-u")
        .await
        .unwrap();
    let w1 = web.next().await;
    web.ack(&w1).await;
    let d1 = db.next().await;
    db.ack(&d1).await;
    plane.write(
        "30-db.yaml",
        &mesh::authorization_policy(
            "ns-b",
            "db-deny",
            "  action: DENY\n  rules:\n  - to: [{operation: {methods: [\"DELETE\"]}}]\n",
        ),
    );
    let d2 = db.next().await;
    assert!(policy_names(&d2).contains(&"ns-b/db-deny".to_string()));
    // db has had it; web, which it does not concern, gets nothing.
    assert!(
        web.next_within(Duration::from_millis(300)).await.is_none(),
        "web was pushed a change of another namespace's policy"
    );
    // A change of the trust bundle concerns everyone.
    let pki = meshward_test_support::ca::pki("second-root");
    let mut roots = (**plane.bundle.borrow()).clone();
    roots.merge(&TrustBundle::from_pem(pki.ca_pem.as_bytes(), Path::new("r2.pem")).unwrap());
    plane.bundle.send_replace(Arc::new(roots));
    let w2 = web.next().await;
    assert_eq!(w2.trust_bundle.len(), 2);
    assert_eq!(w2.documents, w1.documents);
    assert_ne!(w2.version_info, w1.version_info);
}

#[tokio::test]
async fn a_workload_removed_from_the_configuration_ends_its_stream() {
    let plane = Plane::start().await;
    let mut batch = plane
        .subscribe(Some(&id("ns-a", "batch")), "ns-a/batch", "batch-1")
        .await
        .unwrap();
    let r = batch.next().await;
    batch.ack(&r).await;
    plane.write(
        "10-workloads.yaml",
        &[
            mesh::WorkloadEntry::new("ns-a", "web").yaml(),
            mesh::WorkloadEntry::new("ns-a", "api").yaml(),
            mesh::WorkloadEntry::new("ns-b", "db").yaml(),
        ]
        .concat(),
    );
    match batch.next_within(PATIENCE).await {
        Some(Err(s)) => {
            assert_eq!(s.code(), Code::NotFound, "{s:?}");
            assert!(
                s.message()
                    .contains("ns-a/batch is not in the configuration"),
                "{s:?}"
            );
        }
        other => panic!("expected the stream to end with NOT_FOUND, got {other:?}"),
    }
    // A service account change is a change of who may subscribe.
    let mut api = plane
        .subscribe(Some(&id("ns-a", "api")), "ns-a/api", "api-1")
        .await
        .unwrap();
    api.next().await;
    plane.write(
        "10-workloads.yaml",
        &[
            mesh::WorkloadEntry::new("ns-a", "web").yaml(),
            mesh::WorkloadEntry::new("ns-a", "api")
                .service_account("api-v2")
                .yaml(),
            mesh::WorkloadEntry::new("ns-b", "db").yaml(),
        ]
        .concat(),
    );
    match api.next_within(PATIENCE).await {
        Some(Err(s)) => assert_eq!(s.code(), Code::PermissionDenied, "{s:?}"),
        other => panic!("expected PERMISSION_DENIED, got {other:?}"),
    }
}

/// Sends one raw gRPC request body to the config stream; the grpc-status
/// and grpc-message the server answers with.
async fn raw_call(plane: &Plane, body: Vec<u8>) -> (String, String) {
    use http_body_util::{BodyExt, Full};
    let stream = tokio::net::TcpStream::connect(plane.addr).await.unwrap();
    let mut send = meshward_test_support::http::h2_handshake(stream).await;
    let req = hyper::Request::builder()
        .method("POST")
        .uri(format!(
            "http://{}/meshward.control.v1.ConfigDiscoveryService/StreamConfig",
            plane.addr
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header(IDENTITY_HEADER, id("ns-a", "web"))
        .body(Full::new(bytes::Bytes::from(body)))
        .unwrap();
    let resp = tokio::time::timeout(PATIENCE, send.send_request(req))
        .await
        .expect("an answer")
        .unwrap();
    let (parts, body) = resp.into_parts();
    let headers = match parts.headers.get("grpc-status") {
        Some(_) => parts.headers,
        None => tokio::time::timeout(PATIENCE, body.collect())
            .await
            .expect("the trailers")
            .unwrap()
            .trailers()
            .cloned()
            .unwrap_or_default(),
    };
    let get = |k: &str| {
        headers
            .get(k)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    (get("grpc-status"), get("grpc-message"))
}

fn frame(flag: u8, declared: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![flag];
    f.extend(declared.to_be_bytes());
    f.extend(payload);
    f
}

#[tokio::test]
async fn crafted_messages_are_refused_and_the_service_keeps_serving() {
    let plane = Plane::start().await;
    let cases: [(&str, Vec<u8>); 4] = [
        ("not protobuf", frame(0, 5, &[0xff; 5])),
        // Field 2 (node), length-delimited, declaring more bytes than sent.
        (
            "a field longer than the message",
            frame(0, 3, &[0x12, 0x7f, 0x01]),
        ),
        ("a truncated frame", frame(0, 100, &[0x12, 0x00])),
        ("compressed without an encoding", frame(1, 2, &[0x12, 0x00])),
    ];
    for (what, body) in cases {
        let (status, message) = raw_call(&plane, body).await;
        assert_eq!(status, "3", "{what}: {message}, expected INVALID_ARGUMENT");
        assert!(
            message.starts_with("malformed%20request"),
            "{what}: {message}"
        );
    }
    let mut web = plane
        .subscribe(Some(&id("ns-a", "web")), "ns-a/web", "after-crafted")
        .await
        .unwrap();
    web.next().await;
}

#[tokio::test]
async fn streams_past_the_bound_are_refused_until_one_closes() {
    let plane = Plane::start_with(|s| s.with_max_streams(2)).await;
    let mut a = plane
        .subscribe(Some(&id("ns-a", "web")), "ns-a/web", "a")
        .await
        .unwrap();
    a.next().await;
    let mut b = plane
        .subscribe(Some(&id("ns-a", "web")), "ns-a/web", "b")
        .await
        .unwrap();
    b.next().await;
    match plane
        .subscribe(Some(&id("ns-a", "web")), "ns-a/web", "c")
        .await
    {
        Err(s) => {
            assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
            assert!(s.message().contains("at most 2 config streams"), "{s:?}");
        }
        Ok(_) => panic!("a third stream was accepted"),
    }
    drop(a);
    let mut c = meshward_test_support::wait::eventually("a stream accepted again", || async {
        plane
            .subscribe(Some(&id("ns-a", "web")), "ns-a/web", "c")
            .await
            .ok()
    })
    .await;
    c.next().await;
}

/// The admin address a proxy reports is shown per proxy, with its workload
/// and identity (the CLI reads the proxy's debug endpoints there); one it
/// learns after subscribing arrives with a later request; a malformed one
/// is refused.
#[tokio::test]
async fn each_proxy_s_admin_address_is_shown_on_debug_connections() {
    let plane = Plane::start().await;
    let node = |id: &str, admin: &str| Node {
        id: id.to_string(),
        workload: "ns-a/web".to_string(),
        version: "test".to_string(),
        admin_address: admin.to_string(),
    };
    let subscribe = |n: Node| ConfigRequest {
        node: Some(n),
        ..Default::default()
    };
    let proxies = async || -> Vec<serde_json::Value> {
        let (_, body) = plane.get("/debug/connections").await;
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["proxies"].as_array().unwrap().clone()
    };
    let web = id("ns-a", "web");
    let mut with = plane
        .subscribe_with(Some(&web), subscribe(node("p1", "127.0.1.5:15000")))
        .await
        .unwrap();
    with.next().await;
    let mut later = plane
        .subscribe_with(Some(&web), subscribe(node("p2", "")))
        .await
        .unwrap();
    let r = later.next().await;
    let shown = proxies().await;
    let by_id = |all: &[serde_json::Value], id: &str| {
        all.iter().find(|p| p["node_id"] == id).unwrap().clone()
    };
    let p1 = by_id(&shown, "p1");
    assert_eq!(p1["admin"], "127.0.1.5:15000", "{p1}");
    assert_eq!(p1["workload"], "ns-a/web", "{p1}");
    assert_eq!(p1["identity"], web, "{p1}");
    assert!(by_id(&shown, "p2")["admin"].is_null());

    // Said with the ACK.
    later
        .tx
        .send(ConfigRequest {
            version_info: r.version_info.clone(),
            response_nonce: r.nonce.clone(),
            node: Some(node("p2", "127.0.1.6:15000")),
            error_detail: None,
        })
        .await
        .unwrap();
    let deadline = Instant::now() + PATIENCE;
    loop {
        let p2 = by_id(&proxies().await, "p2");
        if p2["admin"] == "127.0.1.6:15000" && p2["version_acked"] == r.version_info.as_str() {
            break;
        }
        assert!(Instant::now() < deadline, "{p2}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let Err(refused) = plane
        .subscribe_with(Some(&web), subscribe(node("p3", "nowhere")))
        .await
    else {
        panic!("a malformed admin address was accepted");
    };
    let (code, msg) = (refused.code(), refused.message().to_string());
    assert_eq!(code, Code::InvalidArgument, "{msg}");
    assert!(
        msg.contains("node.admin_address \"nowhere\" is not IP:PORT"),
        "{msg}"
    );
}
