//! The proxy's own sockets under traffic capture.
//!
//! With capture on, the workload's network namespace sends every TCP
//! connection (and, with DNS capture, every DNS query) to the proxy,
//! except those of the proxy itself: the rules exempt its user and group
//! (Istio's 1337) and packets carrying its socket mark. A proxy that runs
//! as another user marks every socket it opens towards an upstream, so
//! that its own connections are never captured again (a loop).
//! [`set_mark`] is called once at start; [`own`] on every upstream
//! socket before it connects.

use std::io;
use std::sync::OnceLock;

static MARK: OnceLock<u32> = OnceLock::new();

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
