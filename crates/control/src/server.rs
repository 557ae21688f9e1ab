//! The gRPC listener: TLS with tokio-rustls (handshakes spawned with a
//! timeout, never inline), tonic's `serve_with_incoming`, each request
//! carrying the [`PeerInfo`] of its connection. Bounded: concurrent
//! connections, streams per connection, message sizes (set on each
//! service), HTTP/2 keepalive.
//!
//! The server certificate is the control plane's own SVID plus the DNS
//! names and IPs it listens on, issued by the mesh CA at start, renewed at
//! half its lifetime and re-issued when the signing CA or the bundle change.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use meshward_identity::{KeyType, SpiffeId, WorkloadKey, peer_identity};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio_rustls::server::TlsStream;
use tonic::service::Routes;
use tonic::transport::server::Connected;

use crate::authority::Authority;
use crate::peer::PeerInfo;

/// Limits of the gRPC listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Concurrent connections; further ones are closed at once.
    pub max_connections: usize,
    /// Concurrent HTTP/2 streams per connection.
    pub max_concurrent_streams: u32,
    /// A TLS handshake not done by then is dropped.
    pub handshake_timeout: Duration,
    /// HTTP/2 PING interval on idle connections.
    pub keepalive_interval: Duration,
    /// A PING not answered by then closes the connection.
    pub keepalive_timeout: Duration,
    /// At shutdown, requests in flight get this long to finish (Istio's
    /// `terminationDrainDuration` default); then the server stops anyway.
    pub drain: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 4096,
            max_concurrent_streams: 100,
            handshake_timeout: Duration::from_secs(10),
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
            drain: Duration::from_secs(5),
        }
    }
}

/// Why the server certificate could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerCertError {
    /// Key generation or signing failed.
    #[error("cannot issue the control plane's certificate for {id}: {reason}")]
    Issue {
        /// The control plane's identity.
        id: String,
        /// Why.
        reason: String,
    },
}

/// The names the server certificate carries besides the SVID.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerNames {
    /// DNS names.
    pub dns: Vec<String>,
    /// IP addresses.
    pub ips: Vec<IpAddr>,
}

impl ServerNames {
    /// The names for a listener on `listen` plus `extra` (each an IP or a
    /// DNS name): the listen IP if specific; `localhost`, 127.0.0.1 and ::1
    /// for a loopback or unspecified address.
    pub fn for_listener(listen: SocketAddr, extra: &[String]) -> Self {
        let mut names = ServerNames::default();
        let ip = listen.ip();
        if ip.is_loopback() || ip.is_unspecified() {
            names.dns.push("localhost".to_owned());
            names.ips.push(IpAddr::V4(Ipv4Addr::LOCALHOST));
            names.ips.push(IpAddr::V6(Ipv6Addr::LOCALHOST));
        }
        if !ip.is_unspecified() && !names.ips.contains(&ip) {
            names.ips.push(ip);
        }
        for e in extra {
            match e.parse::<IpAddr>() {
                Ok(ip) if !names.ips.contains(&ip) => names.ips.push(ip),
                Ok(_) => {}
                Err(_) if !names.dns.contains(e) => names.dns.push(e.clone()),
                Err(_) => {}
            }
        }
        names
    }
}

/// The server's current rustls config, swapped when the certificate is
/// renewed or the bundle changes (each new handshake reads the latest).
#[derive(Debug)]
pub(crate) struct ServerTls {
    config: ArcSwap<rustls::ServerConfig>,
    not_after: ArcSwap<time::OffsetDateTime>,
}

impl ServerTls {
    /// Issues the first certificate.
    pub(crate) fn issue(
        authority: &Authority,
        id: &SpiffeId,
        names: &ServerNames,
    ) -> Result<Self, ServerCertError> {
        let (config, not_after) = build(authority, id, names)?;
        Ok(Self {
            config: ArcSwap::from_pointee(config),
            not_after: ArcSwap::from_pointee(not_after),
        })
    }

    fn current(&self) -> Arc<rustls::ServerConfig> {
        self.config.load_full()
    }

    /// Keeps the certificate fresh until `shutdown` fires.
    pub(crate) fn spawn_renewal(
        self: Arc<Self>,
        authority: Authority,
        id: SpiffeId,
        names: ServerNames,
        mut shutdown: watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        let mut status = authority.status();
        let mut bundle = authority.bundle();
        tokio::spawn(async move {
            let mut issued_at = time::OffsetDateTime::now_utc();
            let mut retry = Duration::from_secs(1);
            loop {
                let not_after = **self.not_after.load();
                let half = (not_after - issued_at) / 2;
                let wait = Duration::try_from(half).unwrap_or(Duration::from_secs(1));
                tokio::select! {
                    _ = tokio::time::sleep(wait.max(Duration::from_secs(1))) => {}
                    r = status.changed() => if r.is_err() { break },
                    r = bundle.changed() => if r.is_err() { break },
                    _ = shutdown.changed() => break,
                }
                status.borrow_and_update();
                bundle.borrow_and_update();
                match build(&authority, &id, &names) {
                    Ok((config, not_after)) => {
                        self.config.store(Arc::new(config));
                        self.not_after.store(Arc::new(not_after));
                        issued_at = time::OffsetDateTime::now_utc();
                        retry = Duration::from_secs(1);
                        tracing::info!(identity = %id, %not_after, "control plane certificate renewed");
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cannot renew the control plane's certificate; retrying");
                        tokio::time::sleep(retry).await;
                        retry = (retry * 2).min(Duration::from_secs(60));
                    }
                }
            }
        })
    }
}

fn build(
    authority: &Authority,
    id: &SpiffeId,
    names: &ServerNames,
) -> Result<(rustls::ServerConfig, time::OffsetDateTime), ServerCertError> {
    let err = |reason: String| ServerCertError::Issue {
        id: id.to_string(),
        reason,
    };
    let signing = authority.current();
    let key = WorkloadKey::generate(KeyType::EcP256).map_err(|e| err(e.to_string()))?;
    // The CA's default lifetime (24h by default, capped by the CA chain).
    let issued = signing
        .ca
        .issue_server_cert(&key, id, &names.dns, &names.ips, None)
        .map_err(|e| err(e.to_string()))?;
    let config = crate::tls::server_config(
        &signing.bundle,
        authority.trust_domain(),
        issued.chain().to_vec(),
        key.private_key_der(),
    )
    .map_err(|e| err(e.to_string()))?;
    Ok((config, issued.not_after()))
}

/// One accepted TLS connection, with the peer it proved.
struct TlsConnection {
    io: TlsStream<TcpStream>,
    peer: PeerInfo,
    /// Released when the connection is dropped.
    _permit: OwnedSemaphorePermit,
}

impl Connected for TlsConnection {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.peer.clone()
    }
}

impl AsyncRead for TlsConnection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConnection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Serves `routes` on `listener` until `shutdown` fires.
pub(crate) fn spawn(
    listener: TcpListener,
    routes: Routes,
    tls: Arc<ServerTls>,
    limits: Limits,
    mut shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let (tx, mut rx) = mpsc::channel::<TlsConnection>(64);
    let accept_shutdown = shutdown.clone();
    let accept = tokio::spawn(accept_loop(listener, tx, tls, limits, accept_shutdown));
    let incoming = futures_util::stream::poll_fn(move |cx| {
        rx.poll_recv(cx).map(|c| c.map(Ok::<_, io::Error>))
    });
    let mut drain_signal = shutdown.clone();
    tokio::spawn(async move {
        let serve = tonic::transport::Server::builder()
            .max_concurrent_streams(limits.max_concurrent_streams)
            .http2_keepalive_interval(Some(limits.keepalive_interval))
            .http2_keepalive_timeout(Some(limits.keepalive_timeout))
            .add_routes(routes)
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = shutdown.changed().await;
            });
        // Graceful shutdown sends GOAWAY and waits for the connections to
        // finish; a client that never closes must not hold the control
        // plane up beyond the drain duration.
        let drained = async move {
            let _ = drain_signal.changed().await;
            tokio::time::sleep(limits.drain).await;
        };
        tokio::select! {
            result = serve => if let Err(e) = result {
                tracing::error!(error = %e, "gRPC server failed");
            },
            _ = drained => tracing::warn!(
                drain = ?limits.drain,
                "connections still open after the drain duration: stopping anyway"
            ),
        }
        accept.abort();
    })
}

async fn accept_loop(
    listener: TcpListener,
    tx: mpsc::Sender<TlsConnection>,
    tls: Arc<ServerTls>,
    limits: Limits,
    mut shutdown: watch::Receiver<bool>,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let (tcp, remote) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::warn!(src.addr = %remote, max = limits.max_connections, "too many connections: closed");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.current());
        let tx = tx.clone();
        tokio::spawn(async move {
            let io =
                match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(io)) => io,
                    Ok(Err(e)) => {
                        tracing::debug!(src.addr = %remote, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(src.addr = %remote, "TLS handshake timed out");
                        return;
                    }
                };
            let identity = peer_identity(io.get_ref().1.peer_certificates()).ok();
            let peer = PeerInfo {
                remote: Some(remote),
                identity,
            };
            let _ = tx
                .send(TlsConnection {
                    io,
                    peer,
                    _permit: permit,
                })
                .await;
        });
    }
}
