//! The open inbound TCP connections and WebSocket tunnels, and their
//! re-check when the configuration changes: each one is decided again
//! against the new policy, and those no longer allowed are told to close,
//! so a revoked permission does not live on in a long-lived connection.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::snapshot::Snapshot;

/// What the re-check needs to know of a connection.
pub trait ConnFacts {
    /// The peer's SPIFFE identity, for mTLS connections.
    fn principal(&self) -> Option<&str>;
    fn peer_ip(&self) -> std::net::IpAddr;
    fn local_ip(&self) -> std::net::IpAddr;
    /// The workload port it came in on.
    fn port(&self) -> u16;
    fn sni(&self) -> Option<&str>;
}

impl<T: ConnFacts> ConnFacts for Arc<T> {
    fn principal(&self) -> Option<&str> {
        (**self).principal()
    }
    fn peer_ip(&self) -> std::net::IpAddr {
        (**self).peer_ip()
    }
    fn local_ip(&self) -> std::net::IpAddr {
        (**self).local_ip()
    }
    fn port(&self) -> u16 {
        (**self).port()
    }
    fn sni(&self) -> Option<&str> {
        (**self).sni()
    }
}

/// An open inbound connection's facts and the signal that closes it.
#[derive(Debug)]
struct Tracked {
    principal: Option<String>,
    peer: std::net::IpAddr,
    local: std::net::IpAddr,
    port: u16,
    sni: Option<String>,
    /// The request that opened a tunnel (a WebSocket), decided again as
    /// it was decided then.
    http: Option<TrackedRequest>,
    /// The external authorization provider that let it through.
    ext_approved: Option<String>,
    close: Arc<tokio::sync::Notify>,
}

/// The request behind a tunnel: its head, and the host and path its
/// decision saw.
#[derive(Debug)]
pub struct TrackedRequest {
    pub head: crate::h1::codec::RequestHead,
    pub host: String,
    pub path: String,
    /// The facts of its valid JWT, if it carried one.
    pub auth: Option<meshward_policy::JwtAuth>,
}

/// The open inbound TCP connections and WebSocket tunnels. A
/// configuration change re-decides each one and closes those no longer
/// allowed, so a revoked permission does not live on in a long-lived
/// connection.
#[derive(Debug, Default)]
pub struct Conns {
    next: AtomicU64,
    conns: Mutex<HashMap<u64, Tracked>>,
}

impl Conns {
    /// Registers a connection (with `http`, the request of a tunnel;
    /// `ext_approved`, the external authorization provider that let it
    /// through, if a CUSTOM policy asked one); the returned `Notify` fires
    /// when it must close.
    pub fn track(
        &self,
        conn: &impl ConnFacts,
        http: Option<TrackedRequest>,
        ext_approved: Option<String>,
    ) -> (u64, Arc<tokio::sync::Notify>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let close = Arc::new(tokio::sync::Notify::new());
        let t = Tracked {
            principal: conn.principal().map(str::to_string),
            peer: conn.peer_ip(),
            local: conn.local_ip(),
            port: conn.port(),
            sni: conn.sni().map(str::to_string),
            http,
            ext_approved,
            close: Arc::clone(&close),
        };
        self.conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, t);
        (id, close)
    }

    pub fn untrack(&self, id: u64) {
        self.conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
    }

    /// Re-decides every open connection against `snapshot`; returns how many
    /// were told to close.
    pub fn recheck(&self, snapshot: &Snapshot) -> usize {
        let conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        let mut closed = 0;
        for t in conns.values() {
            let headers = t.http.as_ref().map(|h| crate::h1::HeaderView(&h.head));
            let req = meshward_policy::Request {
                principal: t.principal.as_deref(),
                source_ip: t.peer,
                remote_ip: None,
                destination_ip: Some(t.local),
                port: t.port,
                sni: t.sni.as_deref(),
                http: t.http.as_ref().zip(headers.as_ref()).map(|(h, headers)| {
                    meshward_policy::HttpAttributes {
                        method: h.head.method(),
                        path: &h.path,
                        host: &h.host,
                        headers,
                        auth: h.auth.as_ref(),
                    }
                }),
            };
            let d = snapshot.policy.decide(&req);
            // A CUSTOM rule is satisfied by the provider that let the
            // handshake or connection through; one that now names another
            // provider is not (the proxy cannot ask it about a request or
            // connection long past).
            let approved = t.ext_approved.as_deref();
            let ext_ok = d
                .ext_authz
                .as_ref()
                .is_none_or(|x| approved == Some(x.provider.as_str()));
            if !(d.is_allowed() && ext_ok) {
                t.close.notify_one();
                closed += 1;
            }
        }
        closed
    }
}
