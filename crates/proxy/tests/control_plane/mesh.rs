//! The mesh of the control-source tests: the orders proxy's
//! applications, the control plane's config and CA directories, the
//! proxy's token and roots, the callers' credentials; and what the tests
//! read from the proxy and the control plane.

use std::path::{Path, PathBuf};

use meshward_control::authority::{Authority, AuthorityOptions, CaSource};
use meshward_identity::ca::{CaMaterial, CaSettings, CertificateAuthority, ROOT_CERT_FILE, RootCa};
use meshward_identity::issue;
use meshward_identity::{KeyType, SpiffeId, TrustDomain};
use meshward_proxy::source::control::{self, ControlOptions};

use super::{FakeStream, Replica};
use crate::support::*;

pub const TOKEN_TTL_ASKED: Duration = Duration::from_secs(4);

pub fn orders_id() -> String {
    format!("spiffe://cluster.local/ns/{NS}/sa/orders")
}

/// A mesh around the orders proxy: its applications, the control plane's
/// config and CA directories, the proxy's token and roots, the callers'
/// credentials.
pub struct Mesh {
    pub dir: tempfile::TempDir,
    pub ports: Ports,
    ca_source: CaSource,
    /// The CA the mesh started with (its callers' certificates).
    pub ca: CertificateAuthority,
    /// The orders applications, serving as long as the mesh.
    _apps: (Echo, App),
}

impl Mesh {
    /// A mesh whose control plane keeps a self-signed root in its state
    /// directory.
    pub async fn new() -> Mesh {
        Mesh::create(false).await
    }

    /// A mesh whose control plane uses a plug-in CA directory (Istio's
    /// cacerts layout), which the test edits.
    pub async fn with_plug_in_ca() -> Mesh {
        Mesh::create(true).await
    }

    async fn create(plug_in: bool) -> Mesh {
        let echo = Echo::start().await;
        let app = App::start("orders").await;
        let ports = Ports {
            tcp: (SocketAddr::from(([127, 0, 0, 1], free_port())), echo.addr),
            http: (SocketAddr::from(([127, 0, 0, 1], free_port())), app.addr),
            outbound: SocketAddr::from(([127, 0, 0, 1], free_port())),
        };
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        // The self-signed root as the control plane creates it on its
        // first start; a plug-in directory in the same layout.
        Authority::load(
            AuthorityOptions {
                source: CaSource::SelfSigned(ca_dir.clone()),
                trust_domain: None,
                default_cert_ttl: Duration::from_secs(3600),
                max_cert_ttl: Duration::from_secs(3600),
                poll_interval: Duration::from_secs(3600),
            },
            Arc::new(meshward_control::Metrics::new()),
        )
        .unwrap();
        let ca = CertificateAuthority::load_dir(&ca_dir, CaSettings::default()).unwrap();
        let ca_source = if plug_in {
            CaSource::PlugIn(ca_dir.clone())
        } else {
            CaSource::SelfSigned(ca_dir.clone())
        };
        std::fs::create_dir(dir.path().join("config")).unwrap();
        let token = meshward_control::token::mint(&ca, NS, "orders", None).unwrap();
        std::fs::write(dir.path().join("token"), format!("{token}\n")).unwrap();
        std::fs::copy(
            ca_dir.join(ROOT_CERT_FILE),
            dir.path().join("root-cert.pem"),
        )
        .unwrap();
        let mesh = Mesh {
            dir,
            ports,
            ca_source,
            ca,
            _apps: (echo, app),
        };
        mesh.serve("");
        mesh
    }

    pub fn ca_dir(&self) -> PathBuf {
        self.dir.path().join("ca")
    }

    /// Replaces `path` at once (the control plane never reads half a file).
    pub fn replace(&self, path: &Path, content: &[u8]) {
        let tmp = self.dir.path().join(".replacing");
        std::fs::write(&tmp, content).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }

    /// Writes `name` in the watched config directory.
    pub fn write_config(&self, name: &str, content: &str) {
        self.replace(
            &self.dir.path().join("config").join(name),
            content.as_bytes(),
        );
    }

    /// The orders mesh with `extra`, in the config directory.
    pub fn serve(&self, extra: &str) {
        self.write_config("mesh.yaml", &config(&self.ports, extra));
    }

    /// Replaces the files `names` of the CA directory with those of `from`
    /// (Istio's layout), one at a time.
    pub fn install_ca_files(&self, from: &Path, names: &[&str]) {
        for name in names {
            let content = std::fs::read(from.join(name)).unwrap();
            self.replace(&self.ca_dir().join(name), &content);
        }
    }

    /// The control plane's options: the mesh's config and CA, on
    /// `listen`, the CA directory re-read every 100 ms.
    pub fn control_options(&self, listen: SocketAddr) -> meshward_control::Options {
        let mut o = meshward_control::Options::new(self.ca_source.clone());
        o.config = vec![self.dir.path().join("config")];
        o.listen = listen;
        o.admin = SocketAddr::from(([127, 0, 0, 1], 0));
        o.ca_poll_interval = Duration::from_millis(100);
        o
    }

    /// A control plane on an ephemeral port.
    pub async fn plane(&self) -> Replica {
        self.plane_at(SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    pub async fn plane_at(&self, listen: SocketAddr) -> Replica {
        Replica::start(self.control_options(listen)).await
    }

    pub fn options(&self, addresses: &[SocketAddr]) -> ControlOptions {
        self.options_at(addresses.iter().map(|a| a.to_string()).collect())
    }

    pub fn options_at(&self, addresses: Vec<String>) -> ControlOptions {
        let mut o = ControlOptions::new(
            addresses,
            format!("{NS}/orders"),
            self.dir.path().join("token"),
            self.dir.path().join("root-cert.pem"),
        );
        o.cert_ttl = Some(TOKEN_TTL_ASKED);
        o.max_backoff = Duration::from_millis(500);
        o
    }

    pub async fn proxy(&self, addresses: &[SocketAddr]) -> Proxy {
        self.start_proxy(self.options(addresses)).await
    }

    pub async fn proxy_at(&self, addresses: Vec<String>) -> Proxy {
        self.start_proxy(self.options_at(addresses)).await
    }

    pub async fn start_proxy(&self, options: ControlOptions) -> Proxy {
        let feed = control::start(options).unwrap();
        let options = Options {
            workload: format!("{NS}/orders"),
            admin: SocketAddr::from(([127, 0, 0, 1], 0)),
            metrics: None,
            access_log: AccessLogTo::Off,
            idle_timeout: meshward_proxy::DEFAULT_IDLE_TIMEOUT,
            dns: meshward_proxy::DnsConfig::System,
            access_log_buffer: meshward_proxy::DEFAULT_ACCESS_LOG_BUFFER,
            overrides: Default::default(),
            dns_proxy: None,
        };
        tokio::time::timeout(patience(), meshward_proxy::start(feed, options))
            .await
            .expect("the proxy started from the control plane in time")
            .unwrap()
    }

    /// Credentials for `production/<sa>` from the mesh's first CA.
    pub fn caller(&self, sa: &str) -> WorkloadCerts {
        write_workload(&self.ca, &self.dir.path().join(format!("caller-{sa}")), sa)
    }

    /// Whether `caller` gets an echo through the orders TCP port (the
    /// proxy's certificate verified with the mesh's first root).
    pub async fn passes(&self, caller: &WorkloadCerts) -> bool {
        self.passes_trusting(caller, &self.dir.path().join("root-cert.pem"))
            .await
    }

    /// As [`Mesh::passes`], verifying the proxy with the roots in `roots`.
    pub async fn passes_trusting(&self, caller: &WorkloadCerts, roots: &Path) -> bool {
        match mtls_connect(&caller.dir, roots, self.ports.tcp.0, b"istio").await {
            Ok(mut c) => echo_back(&mut c, "ping").await.is_ok(),
            Err(_) => false,
        }
    }
}

/// Credentials for `production/<sa>` from `ca`, in Istio's layout in `dir`.
pub fn write_workload(ca: &CertificateAuthority, dir: &Path, sa: &str) -> WorkloadCerts {
    let id = SpiffeId::workload(&TrustDomain::new("cluster.local").unwrap(), NS, sa).unwrap();
    let (key, issued) =
        meshward_test_support::ca::issue(ca, &id, Some(Duration::from_secs(3600))).unwrap();
    issue::write_workload_files(dir, &key, &issued, true).unwrap();
    WorkloadCerts {
        dir: dir.to_owned(),
    }
}

/// A new root (for a root rotation), and the CA material in Istio's
/// layout under `dir`: the root signing itself, or an intermediate under
/// it.
pub struct NewRoot {
    pub dir: PathBuf,
    pub pem: String,
    pub ca: CertificateAuthority,
}

impl NewRoot {
    pub fn generate(dir: PathBuf, intermediate: bool) -> NewRoot {
        let options = meshward_test_support::ca::options(
            "cluster.local",
            KeyType::EcP256,
            Duration::from_secs(24 * 3600),
        );
        let root = RootCa::generate(&options).unwrap();
        let material = if intermediate {
            root.new_intermediate(&options).unwrap()
        } else {
            CaMaterial {
                ca_cert: root.cert().clone(),
                ca_key_pem: root.key_pem(),
                root_cert: root.cert().clone(),
                chain: vec![root.cert().clone()],
            }
        };
        material.write_dir(&dir, false).unwrap();
        NewRoot {
            pem: meshward_identity::pem::encode("CERTIFICATE", root.cert()),
            ca: CertificateAuthority::from_material(&material, CaSettings::default()).unwrap(),
            dir,
        }
    }
}

pub async fn admin(proxy: &Proxy, path: &str) -> String {
    let (status, body) = get(proxy.admin_addr().unwrap(), "admin", path, &[])
        .await
        .unwrap();
    assert_eq!(status, 200, "{path}: {body}");
    body
}

pub async fn source(proxy: &Proxy) -> serde_json::Value {
    serde_json::from_str::<serde_json::Value>(&admin(proxy, "/config_dump").await).unwrap()
        ["source"]
        .clone()
}

/// The NACKs and ACKs the fake stream received (not the subscriptions).
pub fn answers(fake: &FakeStream) -> Vec<meshward_proto::config::ConfigRequest> {
    fake.requests()
        .into_iter()
        .filter(|r| !r.response_nonce.is_empty())
        .collect()
}

/// Waits until the proxy connected to `plane` ACKed the version last sent
/// to it, other than `not`; returns it.
pub async fn acked(plane: &Replica, not: Option<&str>) -> String {
    let mut version = String::new();
    until("the version sent ACKed", async || match plane.connected() {
        Some(p) if p.version_sent.is_some() && p.version_acked == p.version_sent => {
            version = p.version_acked.unwrap();
            Some(version.as_str()) != not
        }
        _ => false,
    })
    .await;
    version
}

/// Polls `check` until it holds, failing the test after the patience.
pub async fn until(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = std::time::Instant::now() + patience();
    while !check().await {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A CA outside the mesh (it signs forged tokens).
pub fn other_ca() -> CertificateAuthority {
    let options = meshward_test_support::ca::options(
        "cluster.local",
        KeyType::EcP256,
        Duration::from_secs(3600),
    );
    RootCa::generate(&options)
        .unwrap()
        .into_authority(CaSettings::default())
        .unwrap()
}
