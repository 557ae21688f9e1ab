//! A small control plane for the control-source tests: Istio's
//! `IstioCertificateService` and meshward's `ConfigDiscoveryService` over
//! tonic and tokio-rustls, signing for real with `meshward_identity`. It
//! records what each proxy sent (how a CSR was authenticated, every ACK
//! and NACK) for the tests to assert on. Each server runs on a runtime of
//! its own thread: stopping it drops every connection at once, as a
//! killed process would.

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use base64::Engine as _;
use futures_util::Stream;
use meshward_identity::ca::{CaSettings, CertificateAuthority, RootCa};
use meshward_identity::issue::{self, IssuedCertificate, WorkloadKey};
use meshward_identity::keys::KeyType;
use meshward_identity::{SpiffeId, TrustDomain};
use meshward_proto::ca::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use meshward_proto::ca::{IstioCertificateRequest, IstioCertificateResponse, Roots};
use meshward_proto::config::config_discovery_service_server::{
    ConfigDiscoveryService, ConfigDiscoveryServiceServer,
};
use meshward_proto::config::{ConfigRequest, ConfigResponse, Document};
use meshward_test_support::ca::WorkloadCerts;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, oneshot, watch};
use tonic::transport::server::Connected;
use tonic::{Request, Response, Status, Streaming};

pub const TD: &str = "cluster.local";

/// A mesh CA: a self-signed root that signs workload certificates.
pub struct Ca {
    pub ca: CertificateAuthority,
}

impl Ca {
    /// A self-signed root that signs workloads itself.
    pub fn generate() -> Ca {
        Ca {
            ca: Self::new_root()
                .into_authority(CaSettings::default())
                .unwrap(),
        }
    }

    /// A new root, and an intermediate under it that signs workloads (as
    /// a plug-in CA in Istio's cacerts layout would be).
    pub fn intermediate_under_new_root() -> Ca {
        let root = Self::new_root();
        let material = root.new_intermediate(&Self::options()).unwrap();
        Ca {
            ca: CertificateAuthority::from_material(&material, CaSettings::default()).unwrap(),
        }
    }

    fn options() -> meshward_identity::CaOptions {
        meshward_test_support::ca::options(TD, KeyType::EcP256, Duration::from_secs(24 * 3600))
    }

    fn new_root() -> RootCa {
        RootCa::generate(&Self::options()).unwrap()
    }

    pub fn root(&self) -> &CertificateDer<'static> {
        self.ca.root()
    }

    pub fn root_pem(&self) -> String {
        meshward_identity::pem::encode("CERTIFICATE", self.ca.root())
    }

    pub fn issue(&self, ns: &str, sa: &str, ttl: Duration) -> (WorkloadKey, IssuedCertificate) {
        let id = SpiffeId::workload(&TrustDomain::new(TD).unwrap(), ns, sa).unwrap();
        meshward_test_support::ca::issue(&self.ca, &id, Some(ttl)).unwrap()
    }

    /// Credentials for `NS/SA` in Istio's layout under `dir`.
    pub fn write_workload(&self, dir: &std::path::Path, ns: &str, sa: &str) -> WorkloadCerts {
        let (key, issued) = self.issue(ns, sa, Duration::from_secs(3600));
        issue::write_workload_files(dir, &key, &issued, true).unwrap();
        WorkloadCerts {
            dir: dir.to_owned(),
        }
    }
}

/// A bootstrap token for `spiffe://cluster.local/ns/NS/sa/SA`: a JWT
/// whose signature this control plane does not check (it knows its
/// tokens by value).
pub fn token(ns: &str, sa: &str) -> String {
    let b = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let payload = format!(
        r#"{{"iss":"test-control","aud":["meshward-ca"],"sub":"system:serviceaccount:{ns}:{sa}","spiffe":"spiffe://{TD}/ns/{ns}/sa/{sa}","exp":4102444800}}"#
    );
    format!(
        "{}.{}.{}",
        b(r#"{"alg":"ES256","typ":"JWT"}"#),
        b(&payload),
        b("not-checked-here")
    )
}

/// What the control plane serves now.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub version: u64,
    /// `(origin, content)`.
    pub documents: Vec<(String, String)>,
    pub mesh_config: String,
    /// PEM roots; empty: none sent.
    pub bundle: Vec<String>,
}

/// One thing a proxy did.
#[derive(Debug, Clone)]
pub enum Seen {
    Csr {
        server: &'static str,
        client_cert: Option<SpiffeId>,
        bearer: Option<String>,
        validity: i64,
    },
    Subscribed {
        server: &'static str,
        peer: Option<SpiffeId>,
    },
    Request {
        server: &'static str,
        request: ConfigRequest,
    },
}

/// The control plane's state, shared by its replicas.
pub struct Plane {
    /// The CA the mesh started with.
    pub ca: Ca,
    /// The CA that signs now, when not `ca` (a root rotation).
    pub signer: Mutex<Option<Arc<Ca>>>,
    /// What the CA returns as `root_cert` (the CA's root when empty).
    pub ca_roots: Mutex<Vec<String>>,
    tokens: Mutex<HashMap<String, SpiffeId>>,
    /// The control plane's own certificate chain and key.
    server: Mutex<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    pub snapshot: watch::Sender<Snapshot>,
    pub seen: Mutex<Vec<Seen>>,
}

impl Plane {
    pub fn new() -> Arc<Plane> {
        let ca = Ca::generate();
        let server = Self::server_credentials(&ca);
        Arc::new(Plane {
            server: Mutex::new(server),
            ca,
            signer: Mutex::new(None),
            ca_roots: Mutex::new(Vec::new()),
            tokens: Mutex::new(HashMap::new()),
            snapshot: watch::Sender::new(Snapshot::default()),
            seen: Mutex::new(Vec::new()),
        })
    }

    /// The control plane's certificate (istio-system/istiod) from `ca`.
    fn server_credentials(ca: &Ca) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let (key, issued) = ca.issue("istio-system", "istiod", Duration::from_secs(3600));
        (issued.chain().to_vec(), key.private_key_der())
    }

    /// Signs with `ca` from now on, and serves with a certificate of it
    /// (servers started from now on).
    pub fn switch_ca(&self, ca: Arc<Ca>) {
        *self.server.lock().unwrap() = Self::server_credentials(&ca);
        *self.signer.lock().unwrap() = Some(ca);
    }

    /// Accepts `token` as proof of `NS/SA`.
    pub fn allow_token(&self, token: &str, ns: &str, sa: &str) {
        let id = SpiffeId::workload(&TrustDomain::new(TD).unwrap(), ns, sa).unwrap();
        self.tokens.lock().unwrap().insert(token.to_owned(), id);
    }

    /// Serves a new version: `documents` (one `FILE:1` origin each),
    /// with `bundle` as the trust bundle.
    pub fn push(&self, documents: &[(&str, &str)], bundle: &[String]) -> u64 {
        let mut version = 0;
        self.snapshot.send_modify(|s| {
            s.version += 1;
            version = s.version;
            s.documents = documents
                .iter()
                .map(|(f, c)| (format!("{f}:1"), (*c).to_owned()))
                .collect();
            s.bundle = bundle.to_vec();
        });
        version
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn record(&self, s: Seen) {
        self.seen.lock().unwrap().push(s);
    }

    /// The config requests received so far (subscriptions, ACKs, NACKs).
    pub fn requests(&self) -> Vec<(&'static str, ConfigRequest)> {
        self.seen()
            .into_iter()
            .filter_map(|s| match s {
                Seen::Request { server, request } => Some((server, request)),
                _ => None,
            })
            .collect()
    }

    fn server_config(&self) -> rustls::ServerConfig {
        let server = {
            let s = self.server.lock().unwrap();
            (s.0.clone(), s.1.clone_key())
        };
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.root().clone()).unwrap();
        if let Some(signer) = self.signer.lock().unwrap().as_ref() {
            roots.add(signer.root().clone()).unwrap();
        }
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::clone(&provider),
        )
        // A first certificate is asked for without one.
        .allow_unauthenticated()
        .build()
        .unwrap();
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(server.0, server.1)
            .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec()];
        config
    }
}

/// Who is on the other end of a connection, as its handshake proved.
#[derive(Debug, Clone)]
struct Peer(Option<SpiffeId>);

struct Conn {
    tls: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    peer: Peer,
}

impl Connected for Conn {
    type ConnectInfo = Peer;
    fn connect_info(&self) -> Peer {
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

#[derive(Clone)]
struct Services {
    plane: Arc<Plane>,
    name: &'static str,
}

fn peer_of<T>(r: &Request<T>) -> Option<SpiffeId> {
    r.extensions().get::<Peer>().and_then(|p| p.0.clone())
}

#[tonic::async_trait]
impl IstioCertificateService for Services {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let client_cert = peer_of(&request);
        let bearer = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_owned);
        let r = request.into_inner();
        self.plane.record(Seen::Csr {
            server: self.name,
            client_cert: client_cert.clone(),
            bearer: bearer.clone(),
            validity: r.validity_duration,
        });
        let who = match (client_cert, bearer) {
            (Some(id), _) => id,
            (None, Some(token)) => self
                .plane
                .tokens
                .lock()
                .unwrap()
                .get(&token)
                .cloned()
                .ok_or_else(|| Status::permission_denied("unknown bootstrap token"))?,
            (None, None) => return Err(Status::unauthenticated("no certificate and no token")),
        };
        let ttl = (r.validity_duration > 0)
            .then(|| Duration::from_secs(r.validity_duration.unsigned_abs()));
        let signer = self.plane.signer.lock().unwrap().clone();
        let ca = signer.as_ref().map_or(&self.plane.ca.ca, |s| &s.ca);
        let issued = ca
            .sign_csr_pem(&r.csr, &who, ttl)
            .map_err(|e| Status::permission_denied(e.to_string()))?;
        let root = issued.root().clone();
        let chain = issued
            .chain()
            .iter()
            .filter(|c| **c != root)
            .map(|c| meshward_identity::pem::encode("CERTIFICATE", c))
            .collect();
        let mut roots = self.plane.ca_roots.lock().unwrap().clone();
        if roots.is_empty() {
            roots.push(meshward_identity::pem::encode("CERTIFICATE", ca.root()));
        }
        Ok(Response::new(IstioCertificateResponse {
            cert_chain: chain,
            root_cert: Some(Roots { ca_cert: roots }),
        }))
    }
}

type Responses = Pin<Box<dyn Stream<Item = Result<ConfigResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ConfigDiscoveryService for Services {
    type StreamConfigStream = Responses;

    async fn stream_config(
        &self,
        request: Request<Streaming<ConfigRequest>>,
    ) -> Result<Response<Responses>, Status> {
        let peer = peer_of(&request);
        self.plane.record(Seen::Subscribed {
            server: self.name,
            peer: peer.clone(),
        });
        if peer.is_none() {
            return Err(Status::unauthenticated(
                "the config stream needs a mesh certificate",
            ));
        }
        let mut inbound = request.into_inner();
        let (plane, name) = (Arc::clone(&self.plane), self.name);
        tokio::spawn(async move {
            while let Ok(Some(request)) = inbound.message().await {
                plane.record(Seen::Request {
                    server: name,
                    request,
                });
            }
        });
        let rx = self.plane.snapshot.subscribe();
        let responses = futures_util::stream::unfold((rx, 0u64), |(mut rx, n)| async move {
            if n > 0 && rx.changed().await.is_err() {
                return None;
            }
            let s = rx.borrow_and_update().clone();
            let response = ConfigResponse {
                version_info: s.version.to_string(),
                documents: s
                    .documents
                    .iter()
                    .map(|(origin, content)| Document {
                        origin: origin.clone(),
                        content: content.clone(),
                    })
                    .collect(),
                mesh_config: s.mesh_config.clone(),
                nonce: format!("nonce-{}", n + 1),
                trust_bundle: s.bundle.clone(),
            };
            Some((Ok(response), (rx, n + 1)))
        });
        Ok(Response::new(Box::pin(responses)))
    }
}

/// One replica, serving until dropped.
pub struct Server {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    /// Serves `plane` on `addr` (port 0: any) as replica `name`.
    pub fn start(plane: &Arc<Plane>, name: &'static str, addr: SocketAddr) -> Server {
        let listener = std::net::TcpListener::bind(addr).unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let services = Services {
            plane: Arc::clone(plane),
            name,
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(plane.server_config()));
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let (tx, rx) = mpsc::channel::<std::io::Result<Conn>>(16);
                tokio::spawn(async move {
                    loop {
                        let Ok((tcp, _)) = listener.accept().await else {
                            continue;
                        };
                        let (acceptor, tx) = (acceptor.clone(), tx.clone());
                        tokio::spawn(async move {
                            let handshake =
                                tokio::time::timeout(Duration::from_secs(5), acceptor.accept(tcp));
                            if let Ok(Ok(tls)) = handshake.await {
                                let peer = meshward_identity::peer_identity(
                                    tls.get_ref().1.peer_certificates(),
                                )
                                .ok();
                                let _ = tx
                                    .send(Ok(Conn {
                                        tls,
                                        peer: Peer(peer),
                                    }))
                                    .await;
                            }
                        });
                    }
                });
                let incoming = futures_util::stream::unfold(rx, |mut rx| async move {
                    rx.recv().await.map(|c| (c, rx))
                });
                let serve = tonic::transport::Server::builder()
                    .add_service(IstioCertificateServiceServer::new(services.clone()))
                    .add_service(ConfigDiscoveryServiceServer::new(services))
                    .serve_with_incoming(incoming);
                tokio::select! {
                    _ = serve => {}
                    _ = stopped => {}
                }
            });
            // Dropping the runtime drops every connection it holds.
            drop(rt);
        });
        Server {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Stops the replica: its listener and every connection close.
    pub fn stop(mut self) -> SocketAddr {
        self.shutdown();
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

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown();
    }
}
