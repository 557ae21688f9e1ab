//! Traffic capture, the proxy's side: where the capture listeners are
//! ([`CaptureListen`]), and each redirected connection's original
//! destination (`SO_ORIGINAL_DST` / `IP6T_SO_ORIGINAL_DST`, kept by the
//! kernel's connection tracking when the namespace's rules redirected
//! it). The rules themselves are `meshward-capture`'s.
//!
//! With capture, the proxy has two listeners for the data plane, as
//! Istio's sidecar: the outbound capture listener (15001), which routes
//! each connection by its original destination
//! (`outbound::serve_captured`), and the inbound capture listener (15006),
//! which serves each connection as its original port's
//! (`inbound::serve_captured`). The per-port inbound listeners are not
//! bound: the application listens on its own ports.

use std::io;
use std::net::{Ipv6Addr, SocketAddr};

use tokio::net::TcpStream;

use crate::state::State;

/// Istio's outbound capture port.
pub const OUTBOUND_PORT: u16 = 15001;
/// Istio's inbound capture port.
pub const INBOUND_PORT: u16 = 15006;

/// Where the capture listeners listen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CaptureListen {
    pub outbound: SocketAddr,
    pub inbound: SocketAddr,
}

impl CaptureListen {
    /// Istio's ports on every address (`[::]`, which takes IPv4 too).
    pub fn default_ports() -> CaptureListen {
        let any = std::net::IpAddr::V6(Ipv6Addr::UNSPECIFIED);
        CaptureListen {
            outbound: SocketAddr::new(any, OUTBOUND_PORT),
            inbound: SocketAddr::new(any, INBOUND_PORT),
        }
    }
}

/// The address `stream` was sent to before the rules redirected it. An
/// IPv4 connection on an IPv6 listener (an IPv4-mapped address) is asked
/// with the IPv4 option. Fails for a connection that was not redirected
/// (`ENOENT`: connection tracking has no translation for it).
pub fn original_dst(stream: &TcpStream) -> io::Result<SocketAddr> {
    let sock = socket2::SockRef::from(stream);
    let v4 = match stream.local_addr()? {
        SocketAddr::V4(_) => true,
        SocketAddr::V6(a) => a.ip().to_ipv4_mapped().is_some(),
    };
    let addr = if v4 {
        sock.original_dst_v4()?
    } else {
        sock.original_dst_v6()?
    };
    addr.as_socket()
        .map(|a| match a {
            SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
                Some(ip) => SocketAddr::new(ip.into(), v6.port()),
                None => a,
            },
            a => a,
        })
        .ok_or_else(|| io::Error::other("the original destination is not an IP address"))
}

/// Whether `orig` is one of the capture listeners: a connection dialed
/// to the capture port itself, or one captured twice (a loop).
pub(crate) fn is_own_listener(state: &State, orig: SocketAddr) -> bool {
    state
        .snapshot()
        .capture
        .is_some_and(|c| orig.port() == c.outbound.port() || orig.port() == c.inbound.port())
}
