//! The proxy's own sockets under traffic capture.
//!
//! With capture on, the workload's network namespace sends every TCP
//! connection (and, with DNS capture, every DNS query) to the proxy,
//! except those of the proxy itself: the rules exempt its user and group
//! (Istio's 1337) and packets carrying its socket mark. A proxy that runs
//! as another user marks every socket it opens towards an upstream, so
//! that its own connections are never captured again (a loop).
//! [`set_capture`] is called once at start; `own` on every upstream
//! socket before it connects.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::OnceLock;

/// Set once when capture is on: the mark of the proxy's own sockets, or
/// `None` when the rules exempt it by its user or group instead.
static CAPTURE: OnceLock<Option<u32>> = OnceLock::new();

/// The source of the proxy's connections to its application under
/// capture (Istio's inbound passthrough source): the rules let traffic
/// from it on `lo` through, so that the connection to the application's
/// address is not redirected to the inbound capture port again.
pub const APP_SOURCE_V4: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);
/// The same for IPv6 (`::6`, which must be an address of `lo`: Istio's
/// init adds it; meshward's installer does not yet).
pub const APP_SOURCE_V6: Ipv6Addr = Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6);

/// Capture is on for this process from now on: every upstream socket
/// carries `mark` (`SO_MARK`) when given, and connections to the
/// application come from the capture source ([`APP_SOURCE_V4`]). Returns
/// false when it was set differently before (one process, one setting).
pub fn set_capture(mark: Option<u32>) -> bool {
    *CAPTURE.get_or_init(|| mark) == mark
}

/// The mark set by [`set_capture`], if any.
pub fn mark() -> Option<u32> {
    CAPTURE.get().copied().flatten()
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

/// Where a connection to the application at `app` comes from under
/// capture ([`set_capture`]), else wherever the system says.
pub(crate) fn app_source(app: IpAddr) -> Option<IpAddr> {
    app_source_under(CAPTURE.get().is_some(), app)
}

/// Under capture, a connection to an application address that is not
/// loopback (the workload's own, as Istio's inbound passthrough connects
/// to the pod IP) comes from [`APP_SOURCE_V4`] / [`APP_SOURCE_V6`], which
/// the rules let through: from the workload's address it would be the
/// proxy's own traffic to a local address, which the rules send to the
/// inbound capture port again (a loop), whether the proxy is exempt by
/// its mark or by its user.
fn app_source_under(capture: bool, app: IpAddr) -> Option<IpAddr> {
    if !capture || app.is_loopback() {
        return None;
    }
    Some(match app {
        IpAddr::V4(_) => IpAddr::V4(APP_SOURCE_V4),
        IpAddr::V6(_) => IpAddr::V6(APP_SOURCE_V6),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn under_capture_the_application_is_called_from_the_passthrough_source() {
        let pod: IpAddr = "10.89.0.3".parse().unwrap();
        let pod6: IpAddr = "fd89::3".parse().unwrap();
        assert_eq!(app_source_under(false, pod), None);
        assert_eq!(app_source_under(true, pod), Some(IpAddr::V4(APP_SOURCE_V4)));
        assert_eq!(
            app_source_under(true, pod6),
            Some(IpAddr::V6(APP_SOURCE_V6))
        );
        // An application on loopback is not captured: no source needed.
        assert_eq!(app_source_under(true, "127.0.0.1".parse().unwrap()), None);
    }
}
