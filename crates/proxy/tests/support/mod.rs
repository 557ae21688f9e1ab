//! The in-process proxy tests' harness: a proxy for `production/orders`
//! fed by the memory source, its applications, callers' credentials.

// Each test binary uses part of it.
#![allow(dead_code, unused_imports)]

pub use std::net::SocketAddr;
pub use std::time::Duration;

pub use std::sync::{Arc, Mutex};

pub use bytes::Bytes;
pub use http_body_util::{BodyExt, Full};
pub use meshward_proxy::source::memory::MemorySource;
pub use meshward_proxy::{AccessLogTo, Options, Proxy};
pub use meshward_test_support::ca::{MeshCa, WorkloadCerts};
pub use meshward_test_support::http::{get, h2_handshake};
pub use meshward_test_support::mesh::{self, WorkloadEntry};
pub use meshward_test_support::tls::{MtlsStream, mtls_connect};
pub use meshward_test_support::{App, Echo, eventually, free_port, patience};
pub use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const NS: &str = "production";

/// A DENY of connections from `production/<sa>`.
pub fn deny_from(sa: &str) -> String {
    mesh::authorization_policy(
        NS,
        &format!("deny-{sa}"),
        &format!(
            "  action: DENY\n  rules: [{{from: [{{source: {{principals: [\"cluster.local/ns/{NS}/sa/{sa}\"]}}}}]}}]"
        ),
    )
}

/// A proxy for `production/orders` fed by a memory source.
pub struct Harness {
    pub source: MemorySource,
    pub proxy: Proxy,
    pub ca: MeshCa,
    pub dir: tempfile::TempDir,
    /// The orders workload's TCP port, on its proxy.
    pub inbound: SocketAddr,
    /// Its proxy's outbound listener.
    pub outbound: SocketAddr,
    /// Its HTTP port.
    pub inbound_http: SocketAddr,
    /// The TCP port's application, an echo server.
    pub echo: Echo,
    /// The HTTP port's application.
    pub app: App,
    /// The access log's lines.
    pub access_log: Arc<Mutex<Vec<String>>>,
}

impl Harness {
    /// Starts the proxy with mesh-wide STRICT mTLS, the orders
    /// WorkloadEntry (TCP port `tcp` to an echo application, HTTP port
    /// `http` to an HTTP/1.1 application) and `extra` resources.
    pub async fn start(extra: &str) -> Harness {
        Harness::try_start(extra, |_| {}).await.unwrap()
    }

    /// [`Harness::start`] with the proxy's options changed by `tweak`;
    /// the proxy's start error if it does not start.
    pub async fn try_start(
        extra: &str,
        tweak: impl FnOnce(&mut Options),
    ) -> Result<Harness, meshward_proxy::StartError> {
        let ca =
            MeshCa::generate("cluster.local", "meshward-test", Duration::from_secs(3600)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let inbound = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let inbound_http = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let outbound = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let echo = Echo::start().await;
        let app = App::start("orders").await;
        let ports = Ports {
            tcp: (inbound, echo.addr),
            http: (inbound_http, app.addr),
            outbound,
        };
        let access_log = Arc::new(Mutex::new(Vec::new()));
        let (source, feed) = MemorySource::new();
        source
            .push_yaml(&[("mesh.yaml", &config(&ports, extra))])
            .unwrap();
        let orders = ca
            .write_workload(&dir.path().join("orders-1"), NS, "orders")
            .unwrap();
        push_credentials(&source, &orders).unwrap();
        let mut options = Options {
            workload: format!("{NS}/orders"),
            admin: SocketAddr::from(([127, 0, 0, 1], 0)),
            metrics: None,
            access_log: AccessLogTo::Memory(Arc::clone(&access_log)),
            idle_timeout: meshward_proxy::DEFAULT_IDLE_TIMEOUT,
            dns: meshward_proxy::DnsConfig::System,
            access_log_buffer: meshward_proxy::DEFAULT_ACCESS_LOG_BUFFER,
            overrides: Default::default(),
            dns_proxy: None,
        };
        tweak(&mut options);
        let proxy = meshward_proxy::start(feed, options).await?;
        Ok(Harness {
            source,
            proxy,
            ca,
            dir,
            inbound,
            outbound,
            inbound_http,
            echo,
            app,
            access_log,
        })
    }

    pub fn ports(&self) -> Ports {
        Ports {
            tcp: (self.inbound, self.echo.addr),
            http: (self.inbound_http, self.app.addr),
            outbound: self.outbound,
        }
    }

    /// Pushes the configuration again, with `extra` resources.
    pub fn push(&self, extra: &str) {
        self.source
            .push_yaml(&[("mesh.yaml", &config(&self.ports(), extra))])
            .unwrap();
    }

    /// The access log's entries of HTTP requests so far.
    pub fn http_entries(&self) -> Vec<serde_json::Value> {
        let lines = self.access_log.lock().unwrap().clone();
        lines
            .iter()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|e| e["kind"] == "http")
            .collect()
    }

    /// Issues credentials for `production/<sa>` (a new key and
    /// certificate each time).
    pub fn issue(&self, sa: &str) -> WorkloadCerts {
        let n = std::fs::read_dir(self.dir.path()).unwrap().count();
        self.ca
            .write_workload(&self.dir.path().join(format!("{sa}-{n}")), NS, sa)
            .unwrap()
    }

    /// An mTLS connection to the orders TCP port as `production/<sa>`.
    pub async fn connect_as(&self, caller: &WorkloadCerts) -> MtlsStream {
        mtls_connect(&caller.dir, &caller.root(), self.inbound, b"istio")
            .await
            .unwrap()
    }

    /// `GET path` on the admin endpoint: the body.
    pub async fn admin(&self, path: &str) -> String {
        let admin = self.proxy.admin_addr().unwrap();
        let (status, body) = get(admin, "admin", path, &[]).await.unwrap();
        assert_eq!(status, 200, "{path}: {body}");
        body
    }

    /// `/config_dump`'s `source.<which>`.
    pub async fn source_state(&self, which: &str) -> serde_json::Value {
        let dump: serde_json::Value =
            serde_json::from_str(&self.admin("/config_dump").await).unwrap();
        dump["source"][which].clone()
    }

    /// `meshward_config_rejected_total`.
    pub async fn rejected(&self) -> f64 {
        let m = self.admin("/stats/prometheus").await;
        m.lines()
            .find_map(|l| l.strip_prefix("meshward_config_rejected_total "))
            .map_or(0.0, |v| v.trim().parse().unwrap())
    }
}

/// The orders workload's ports on its proxy, each with its application.
pub struct Ports {
    pub tcp: (SocketAddr, SocketAddr),
    pub http: (SocketAddr, SocketAddr),
    /// The outbound listener.
    pub outbound: SocketAddr,
}

/// The mesh: STRICT mTLS mesh-wide, the orders workload, `extra`.
pub fn config(ports: &Ports, extra: &str) -> String {
    let orders = WorkloadEntry::new(NS, "orders")
        .port("tcp", ports.tcp.0.port())
        .port("http", ports.http.0.port())
        .app_ports(&[("tcp", ports.tcp.1), ("http", ports.http.1)])
        .outbound(ports.outbound.port())
        .yaml();
    format!("{}{orders}{extra}", mesh::mesh_strict())
}

pub fn push_credentials(
    source: &MemorySource,
    certs: &WorkloadCerts,
) -> Result<(), meshward_proxy::source::memory::PushError> {
    let read = |p: std::path::PathBuf| std::fs::read_to_string(p).unwrap();
    source.push_credentials_pem(
        &read(certs.chain()),
        &read(certs.key()),
        &read(certs.root()),
    )
}

/// Sends `text` and reads it back from the echo application.
pub async fn echo_back(conn: &mut MtlsStream, text: &str) -> Result<(), String> {
    conn.write_all(text.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; text.len()];
    match tokio::time::timeout(patience(), conn.read_exact(&mut buf)).await {
        Ok(Ok(_)) if buf == text.as_bytes() => Ok(()),
        Ok(Ok(_)) => Err(format!("got {:?}", String::from_utf8_lossy(&buf))),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer".to_string()),
    }
}

/// Whether the proxy closed `conn` (end of stream or an error), waiting
/// at most the test patience.
pub async fn closed(conn: &mut MtlsStream) -> bool {
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(patience(), conn.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}

/// The leaf certificate the proxy presented on `conn`.
pub fn presented(conn: &MtlsStream) -> Vec<u8> {
    conn.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

/// The DER of the leaf in `certs`' chain file.
pub fn leaf_of(certs: &WorkloadCerts) -> Vec<u8> {
    let pem = std::fs::read(certs.chain()).unwrap();
    meshward_identity::pem::certs_from_pem(&pem, &certs.chain()).unwrap()[0].to_vec()
}

/// The orders credentials the harness started with.
pub fn orders_now(h: &Harness) -> WorkloadCerts {
    WorkloadCerts {
        dir: h.dir.path().join("orders-1"),
    }
}
