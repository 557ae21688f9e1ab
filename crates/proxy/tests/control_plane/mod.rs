//! The control planes of the control-source tests.
//!
//! - [`Replica`]: the real control plane (`meshward_control::start`), in
//!   process, on a runtime of its own thread: stopping it drops its
//!   listeners and every connection at once, as a killed process would. Its
//!   log (JSON lines) is kept, for the tests to read what it says of each
//!   certificate it issued.
//! - [`FakeStream`]: a config stream that pushes whatever the test says,
//!   beside the real CA service. It exists for one thing the real control
//!   plane cannot be made to do: push a version the proxy's own loader
//!   refuses. The real one validates every change before pushing it (a
//!   document that does not validate never leaves it) and ends the stream
//!   of a workload that left the configuration instead of pushing a view
//!   without it; so the proxy's NACK of such a version, as it is on the
//!   wire (code, the version it names, the message), is only seen here.

pub mod mesh;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::Stream;
use meshward_control::authority::{Authority, AuthorityOptions, CaSource};
use meshward_control::registry::{ProxyStatus, Registry};
use meshward_control::{CaService, Lifetimes, Metrics, Options, PeerInfo, RateLimit};
use meshward_identity::{KeyType, SpiffeId, WorkloadKey};
use meshward_proto::config::config_discovery_service_server::{
    ConfigDiscoveryService, ConfigDiscoveryServiceServer,
};
use meshward_proto::config::{ConfigRequest, ConfigResponse, Document};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, oneshot, watch};
use tonic::transport::server::Connected;
use tonic::{Request, Response, Status, Streaming};

/// A real control plane, serving until stopped or dropped.
pub struct Replica {
    /// Its gRPC address.
    pub addr: SocketAddr,
    /// Its admin listener (`/debug/connections`, `/debug/configz`).
    pub admin: SocketAddr,
    /// Every proxy that subscribed, with its state.
    pub registry: Arc<Registry>,
    /// Its metrics.
    pub metrics: Arc<Metrics>,
    log: Arc<Mutex<Vec<u8>>>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Appends what the replica logs to a buffer.
struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Replica {
    /// Starts a control plane with `options`.
    pub async fn start(options: Options) -> Replica {
        let log = Arc::new(Mutex::new(Vec::new()));
        let (ready, started) = oneshot::channel();
        let (stop, stopped) = oneshot::channel::<()>();
        let writer = Arc::clone(&log);
        let thread = std::thread::spawn(move || {
            let subscriber = tracing_subscriber::fmt()
                .json()
                .with_writer(move || LogWriter(Arc::clone(&writer)))
                .finish();
            // Every task of a current-thread runtime runs on this thread.
            let _log = tracing::subscriber::set_default(subscriber);
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                match meshward_control::start(options).await {
                    Ok(cp) => {
                        let _ = ready.send(Ok((
                            (cp.grpc_addr(), cp.admin_addr()),
                            Arc::clone(cp.registry()),
                            Arc::clone(cp.metrics()),
                        )));
                        let _ = stopped.await;
                        drop(cp);
                    }
                    Err(e) => {
                        let _ = ready.send(Err(e.to_string()));
                    }
                }
            });
            // Dropping the runtime drops every connection it holds.
            rt.shutdown_timeout(Duration::from_secs(1));
        });
        let ((addr, admin), registry, metrics) = started
            .await
            .expect("the control plane's thread")
            .expect("the control plane started");
        Replica {
            addr,
            admin,
            registry,
            metrics,
            log,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Every certificate issued so far, as the control plane logged it:
    /// how the caller proved its identity (`token` or `renewal`) and the
    /// identity signed.
    pub fn issued(&self) -> Vec<(String, String)> {
        let log = String::from_utf8(self.log.lock().unwrap().clone()).unwrap();
        log.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|e| e["fields"]["message"] == "certificate issued")
            .map(|e| {
                let field = |f: &str| e["fields"][f].as_str().unwrap_or_default().to_string();
                (field("proof"), field("src.identity"))
            })
            .collect()
    }

    /// The one proxy connected to it, if one is.
    pub fn connected(&self) -> Option<ProxyStatus> {
        self.registry.list().into_iter().find(|p| p.connected)
    }

    /// Stops the replica: its listeners and every connection close.
    pub fn stop(mut self) -> SocketAddr {
        tokio::task::block_in_place(|| self.shutdown());
        self.addr
    }

    fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// What the fake stream pushes now.
#[derive(Debug, Clone, Default)]
struct Pushed {
    version: u64,
    /// `(origin, content)`.
    documents: Vec<(String, String)>,
}

/// A config stream pushing what the test says (and recording every
/// request it receives), with the real CA service of the mesh's CA beside
/// it, over TLS with a certificate of istiod from that CA.
pub struct FakeStream {
    /// Its address.
    pub addr: SocketAddr,
    pushed: watch::Sender<Pushed>,
    requests: Arc<Mutex<Vec<ConfigRequest>>>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeStream {
    /// Serves on an ephemeral port, signing with the plug-in CA in
    /// `ca_dir`.
    pub async fn start(ca_dir: &std::path::Path) -> FakeStream {
        let metrics = Arc::new(Metrics::new());
        let lifetimes = Lifetimes {
            default_ttl: Duration::from_secs(3600),
            max_ttl: Duration::from_secs(3600),
        };
        let authority = Authority::load(
            AuthorityOptions {
                source: CaSource::PlugIn(ca_dir.to_owned()),
                trust_domain: None,
                default_cert_ttl: lifetimes.default_ttl,
                max_cert_ttl: lifetimes.max_ttl,
                poll_interval: Duration::from_secs(3600),
            },
            Arc::clone(&metrics),
        )
        .unwrap();
        let istiod =
            SpiffeId::workload(authority.trust_domain(), "istio-system", "istiod").unwrap();
        let key = WorkloadKey::generate(KeyType::EcP256).unwrap();
        let issued = authority
            .ca()
            .issue_server_cert(&key, &istiod, &["localhost".to_string()], &[], None)
            .unwrap();
        let tls = meshward_control::tls::server_config(
            &authority.current().bundle,
            authority.trust_domain(),
            issued.chain().to_vec(),
            key.private_key_der(),
        )
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let ca = CaService::new(authority, metrics, lifetimes, RateLimit::default());
        let (pushed, _) = watch::channel(Pushed::default());
        let requests = Arc::new(Mutex::new(Vec::new()));
        let config = Config {
            pushed: pushed.clone(),
            requests: Arc::clone(&requests),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = mpsc::channel::<std::io::Result<Conn>>(16);
        let task = tokio::spawn(async move {
            tokio::spawn(async move {
                while let Ok((tcp, remote)) = listener.accept().await {
                    let (acceptor, tx) = (acceptor.clone(), tx.clone());
                    tokio::spawn(async move {
                        if let Ok(tls) = acceptor.accept(tcp).await {
                            let identity = meshward_identity::peer_identity(
                                tls.get_ref().1.peer_certificates(),
                            )
                            .ok();
                            let peer = PeerInfo {
                                remote: Some(remote),
                                identity,
                            };
                            let _ = tx.send(Ok(Conn { tls, peer })).await;
                        }
                    });
                }
            });
            let incoming = futures_util::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|c| (c, rx))
            });
            let _ = tonic::transport::Server::builder()
                .add_service(ca.into_server())
                .add_service(ConfigDiscoveryServiceServer::new(config))
                .serve_with_incoming(incoming)
                .await;
        });
        FakeStream {
            addr,
            pushed,
            requests,
            task,
        }
    }

    /// Pushes a new version: `documents` (one `FILE:1` origin each).
    /// Returns the version.
    pub fn push(&self, documents: &[(&str, &str)]) -> u64 {
        let mut version = 0;
        self.pushed.send_modify(|p| {
            p.version += 1;
            version = p.version;
            p.documents = documents
                .iter()
                .map(|(f, c)| (format!("{f}:1"), (*c).to_owned()))
                .collect();
        });
        version
    }

    /// Every request received so far: subscriptions, ACKs and NACKs.
    pub fn requests(&self) -> Vec<ConfigRequest> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for FakeStream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One TLS connection with the peer its handshake proved (what the CA
/// service reads).
struct Conn {
    tls: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    peer: PeerInfo,
}

impl Connected for Conn {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.peer.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tls).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tls).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tls).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tls).poll_shutdown(cx)
    }
}

/// The fake config stream service.
#[derive(Clone)]
struct Config {
    pushed: watch::Sender<Pushed>,
    requests: Arc<Mutex<Vec<ConfigRequest>>>,
}

type Responses = Pin<Box<dyn Stream<Item = Result<ConfigResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ConfigDiscoveryService for Config {
    type StreamConfigStream = Responses;

    async fn stream_config(
        &self,
        request: Request<Streaming<ConfigRequest>>,
    ) -> Result<Response<Responses>, Status> {
        let mut inbound = request.into_inner();
        let requests = Arc::clone(&self.requests);
        tokio::spawn(async move {
            while let Ok(Some(request)) = inbound.message().await {
                requests.lock().unwrap().push(request);
            }
        });
        let rx = self.pushed.subscribe();
        let responses = futures_util::stream::unfold((rx, 0u64), |(mut rx, n)| async move {
            if n > 0 && rx.changed().await.is_err() {
                return None;
            }
            let p = rx.borrow_and_update().clone();
            let response = ConfigResponse {
                version_info: p.version.to_string(),
                documents: p
                    .documents
                    .iter()
                    .map(|(origin, content)| Document {
                        origin: origin.clone(),
                        content: content.clone(),
                    })
                    .collect(),
                mesh_config: String::new(),
                nonce: format!("nonce-{}", n + 1),
                trust_bundle: Vec::new(),
            };
            Some((Ok(response), (rx, n + 1)))
        });
        Ok(Response::new(Box::pin(responses)))
    }
}
