//! Connect timeouts of upstream connections: to other workloads (the
//! DestinationRule's `connectionPool.tcp.connectTimeout`, else
//! `meshConfig.connectTimeout`) and to the local application
//! (`meshConfig.connectTimeout`), 10 s by default as in Istio.
//!
//! One deadline covers the TCP connect and the TLS handshake on it, as
//! Envoy's cluster `connect_timeout` does: its TLS socket reports the
//! connection connected only once the handshake is done, and the timer
//! stops then. So a server that accepts connections and never answers
//! (frozen, or an attacker holding requests) costs a request at most the
//! timeout. On expiry the request gets `503` with response flag `UF`, as
//! Envoy reports a connection timeout.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;

/// A connection that was not done within its connect timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("connection timeout: no {during} within {after:?} (connectTimeout)")]
pub struct ConnectTimeout {
    pub after: Duration,
    /// What was still going on: the TCP connection or the TLS handshake.
    pub during: &'static str,
}

/// What [`ConnectTimeout::during`] names.
pub const TCP: &str = "TCP connection";
pub const TLS: &str = "TLS handshake";

/// The deadline of one connection: every step of it must be done by then.
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    at: Instant,
    timeout: Duration,
}

impl Deadline {
    pub fn after(timeout: Duration) -> Deadline {
        Deadline {
            at: Instant::now() + timeout,
            timeout,
        }
    }

    /// Runs `step` (`during`: what it is, for the error) until the
    /// deadline; past it, fails with a [`ConnectTimeout`] of kind
    /// `TimedOut`.
    pub async fn run<T>(
        &self,
        during: &'static str,
        step: impl Future<Output = io::Result<T>>,
    ) -> io::Result<T> {
        match tokio::time::timeout_at(self.at, step).await {
            Ok(r) => r,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                ConnectTimeout {
                    after: self.timeout,
                    during,
                },
            )),
        }
    }
}

/// A TCP connection to `addr` within `timeout`, with `TCP_NODELAY`.
pub async fn tcp(addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let s = Deadline::after(timeout)
        .run(TCP, tcp_from(None, addr))
        .await?;
    let _ = s.set_nodelay(true);
    Ok(s)
}

/// A TCP connection to the local application at `addr` within
/// `timeout` (from the capture source under capture, see
/// [`crate::own::app_source`]).
pub async fn app(addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let s = Deadline::after(timeout)
        .run(TCP, tcp_from(crate::own::app_source(addr.ip()), addr))
        .await?;
    let _ = s.set_nodelay(true);
    Ok(s)
}

/// A TCP connection to `addr`, from `source` (port chosen by the system)
/// when given, so the peer sees that address. Every upstream connection
/// of the proxy is made here: under traffic capture its socket carries
/// the proxy's mark ([`crate::own`]), so that it is not captured again.
pub async fn tcp_from(source: Option<IpAddr>, addr: SocketAddr) -> io::Result<TcpStream> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    crate::own::own(socket2::SockRef::from(&socket))?;
    if let Some(source) = source.filter(|s| s.is_ipv4() == addr.is_ipv4()) {
        socket.bind(SocketAddr::new(source, 0))?;
    }
    socket.connect(addr).await
}

/// The connect timeout in `err`'s chain, if that is why it failed.
pub fn timeout_of(err: &(dyn std::error::Error + 'static)) -> Option<ConnectTimeout> {
    let mut e = Some(err);
    while let Some(cur) = e {
        if let Some(t) = cur.downcast_ref::<ConnectTimeout>() {
            return Some(*t);
        }
        if let Some(inner) = cur
            .downcast_ref::<io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|i| i.downcast_ref::<ConnectTimeout>())
        {
            return Some(*inner);
        }
        e = cur.source();
    }
    None
}

/// The hyper client's connector to the local application (the URI's
/// authority is its address): plaintext TCP within the mesh's connect
/// timeout, which a configuration change may change for new connections.
#[derive(Debug, Clone)]
pub struct AppConnector {
    timeout_ms: Arc<AtomicU64>,
}

impl AppConnector {
    pub fn new(timeout: Duration) -> AppConnector {
        let c = AppConnector {
            timeout_ms: Arc::new(AtomicU64::new(0)),
        };
        c.set_timeout(timeout);
        c
    }

    /// The timeout of the connections made from now on (clones share it).
    pub fn set_timeout(&self, timeout: Duration) {
        let ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        self.timeout_ms.store(ms, Ordering::Relaxed);
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms.load(Ordering::Relaxed))
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower_service::Service<Uri> for AppConnector {
    type Response = TokioIo<TcpStream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let timeout = self.timeout();
        Box::pin(async move {
            // The proxy writes these URIs from the application's
            // `SocketAddr`, so the authority is always `ip:port`.
            let addr: SocketAddr = uri
                .authority()
                .map(|a| a.as_str())
                .unwrap_or_default()
                .parse()
                .map_err(|_| format!("no application address in {uri}"))?;
            Ok(TokioIo::new(app(addr, timeout).await?))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_step_past_the_deadline_fails_naming_the_timeout_and_the_step() {
        let d = Deadline::after(Duration::from_millis(500));
        let err = d
            .run(TLS, std::future::pending::<io::Result<()>>())
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(
            err.to_string(),
            "connection timeout: no TLS handshake within 500ms (connectTimeout)"
        );
        let found = timeout_of(&err).unwrap();
        assert_eq!(
            (found.after, found.during),
            (Duration::from_millis(500), TLS)
        );
        // Steps share the deadline: a later one gets what is left.
        let d = Deadline::after(Duration::from_secs(1));
        tokio::time::sleep(Duration::from_millis(900)).await;
        let started = Instant::now();
        let r = d.run(TCP, std::future::pending::<io::Result<()>>()).await;
        assert!(r.is_err());
        assert_eq!(started.elapsed(), Duration::from_millis(100));
    }

    #[tokio::test(start_paused = true)]
    async fn other_errors_are_not_timeouts() {
        let refused = io::Error::new(io::ErrorKind::ConnectionRefused, "refused");
        assert_eq!(timeout_of(&refused), None);
        let ok = Deadline::after(Duration::from_secs(1))
            .run(TCP, async { Ok(7) })
            .await
            .unwrap();
        assert_eq!(ok, 7);
    }

    #[test]
    fn the_app_connector_timeout_follows_the_configuration() {
        let c = AppConnector::new(Duration::from_secs(10));
        let clone = c.clone();
        c.set_timeout(Duration::from_millis(250));
        assert_eq!(clone.timeout(), Duration::from_millis(250));
    }
}
