//! The proxy's own sockets under traffic capture.
//!
//! With capture on, the workload's network namespace sends every TCP
//! connection (and, with DNS capture, every DNS query) to the proxy,
//! except those of the proxy itself: the rules exempt its user and group
//! (Istio's 1337) and packets carrying its socket mark. A proxy that runs
//! as another user marks every socket it opens towards an upstream, so
//! that its own connections are never captured again (a loop).
//! [`set_mark`] is called once at start; `own` on every upstream
//! socket before it connects.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::OnceLock;

static MARK: OnceLock<u32> = OnceLock::new();

/// The source of the proxy's connections to its application under
/// capture (Istio's inbound passthrough source): the rules let traffic
/// from it on `lo` through, so that the connection to the application's
/// address is not redirected to the inbound capture port again.
pub const APP_SOURCE_V4: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);
/// The same for IPv6 (`::6`, which the capture rules' installer adds to
/// `lo`).
pub const APP_SOURCE_V6: Ipv6Addr = Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6);

/// From now on, every upstream socket of this process carries `mark`
/// (`SO_MARK`). Returns false when a different mark was set before
/// (one process, one mark).
pub fn set_mark(mark: u32) -> bool {
    *MARK.get_or_init(|| mark) == mark
}

/// The mark set by [`set_mark`], if any.
pub fn mark() -> Option<u32> {
    MARK.get().copied()
}

/// Marks `socket` as the proxy's own, when a mark is set. Needs
/// `CAP_NET_ADMIN`: the error says so.
pub(crate) fn own(socket: socket2::SockRef<'_>) -> io::Result<()> {
    let Some(mark) = mark() else {
        return Ok(());
    };
    socket.set_mark(mark).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "cannot mark the proxy's own socket with {mark} (SO_MARK needs CAP_NET_ADMIN): {e}"
            ),
        )
    })
}

/// Where a connection to the application at `app` comes from: under
/// capture, to an address that is not loopback (the workload's own, as
/// Istio's inbound passthrough connects to the pod IP), from
/// [`APP_SOURCE_V4`] / [`APP_SOURCE_V6`]; else wherever the system says.
pub(crate) fn app_source(app: IpAddr) -> Option<IpAddr> {
    if mark().is_none() || app.is_loopback() {
        return None;
    }
    Some(match app {
        IpAddr::V4(_) => IpAddr::V4(APP_SOURCE_V4),
        IpAddr::V6(_) => IpAddr::V6(APP_SOURCE_V6),
    })
}
