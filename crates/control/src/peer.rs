//! Who is on the other end of a gRPC call, as the TLS handshake proved it.

use std::net::SocketAddr;

use meshward_identity::SpiffeId;

/// The peer of one connection. The TLS server puts it into every
/// request's extensions (`tonic::transport::server::Connected`'s connect
/// info); services read it with [`PeerInfo::of`]. A request without it is
/// treated as unauthenticated.
#[derive(Debug, Clone, Default)]
pub struct PeerInfo {
    /// The remote address.
    pub remote: Option<SocketAddr>,
    /// The SPIFFE ID of a client certificate that chained to a root of the
    /// mesh's trust bundle, if the client presented one.
    pub identity: Option<SpiffeId>,
}

impl PeerInfo {
    /// The peer of `request`, if the server recorded one.
    pub fn of<T>(request: &tonic::Request<T>) -> Option<&PeerInfo> {
        request.extensions().get::<PeerInfo>()
    }
}
