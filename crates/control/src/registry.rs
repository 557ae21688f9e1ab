//! What the control plane knows of each proxy: which workload it serves,
//! who it proved to be, whether it is connected, and which versions it was
//! sent, ACKed and refused. Served as JSON on `/debug/connections`; feeds
//! `pilot_xds`, `pilot_total_xds_rejects` and `pilot_proxy_convergence_time`.
//!
//! Entries of disconnected proxies are kept (the last [`MAX_DISCONNECTED`])
//! so that an operator can see a proxy that went away and what it last
//! refused.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use crate::metrics::Metrics;

/// How many entries of disconnected proxies are kept.
pub const MAX_DISCONNECTED: usize = 10_000;

/// The longest NACK message kept (longer ones are cut).
pub const MAX_ERROR_CHARS: usize = 1024;

/// A version a proxy refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nack {
    /// The refused version.
    pub version: String,
    /// The proxy's error message.
    pub error: String,
    /// When the NACK arrived.
    pub at: SystemTime,
}

/// The state of one proxy.
#[derive(Debug, Clone)]
pub struct ProxyStatus {
    /// The node id it subscribed with.
    pub node_id: String,
    /// Its workload, `NS/NAME`.
    pub workload: String,
    /// The SPIFFE ID of its certificate.
    pub identity: String,
    /// Its address.
    pub remote: Option<SocketAddr>,
    /// The proxy's version string.
    pub proxy_version: String,
    /// Its admin listener, as it says: informational only (the CLI reads
    /// the proxy's debug endpoints there; nothing else trusts it).
    pub admin: Option<SocketAddr>,
    /// Whether its stream is open.
    pub connected: bool,
    /// When its (latest) stream opened.
    pub connected_since: SystemTime,
    /// When it last sent anything (or its stream closed).
    pub last_seen: SystemTime,
    /// The version last sent, and its nonce.
    pub version_sent: Option<String>,
    /// The nonce of the last response sent.
    pub nonce_sent: Option<String>,
    /// The last version it ACKed.
    pub version_acked: Option<String>,
    /// The last version it refused.
    pub last_nack: Option<Nack>,
}

/// Who subscribes: recorded when a stream opens.
#[derive(Debug, Clone)]
pub struct Subscriber {
    /// The node id.
    pub node_id: String,
    /// `NS/NAME`.
    pub workload: String,
    /// The SPIFFE ID of its certificate.
    pub identity: String,
    /// Its address.
    pub remote: Option<SocketAddr>,
    /// The proxy's version string.
    pub proxy_version: String,
    /// Its admin listener, as it says (informational only).
    pub admin: Option<SocketAddr>,
}

/// An entry's key: the node id and the identity that subscribed with it,
/// so that a proxy cannot take over another identity's entry by naming its
/// node id.
type Key = (String, String);

/// Every proxy known, by node id and identity.
#[derive(Debug)]
pub struct Registry {
    inner: Mutex<Inner>,
    metrics: Arc<Metrics>,
}

#[derive(Debug, Default)]
struct Inner {
    proxies: HashMap<Key, Entry>,
    /// Disconnected entries, oldest first, with their stream number (an
    /// entry reconnected since then is not evicted by a stale record).
    disconnected: VecDeque<(Key, u64)>,
    next_stream: u64,
}

#[derive(Debug)]
struct Entry {
    status: ProxyStatus,
    /// The stream that owns the entry now.
    stream: u64,
    /// When the cause of the last response happened (the source change, or
    /// the subscription), for the convergence time of its ACK.
    cause: Option<Instant>,
}

impl Registry {
    /// An empty registry reporting to `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> Registry {
        Registry {
            inner: Mutex::new(Inner::default()),
            metrics,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain data behind; the
        // registry is informational, so it keeps serving it.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records a stream opening; the handle records what happens on it and
    /// marks the proxy disconnected when dropped. A second stream of the
    /// same node id and identity takes the entry over.
    pub fn connect(self: &Arc<Self>, who: Subscriber) -> Connection {
        let now = SystemTime::now();
        let mut inner = self.lock();
        inner.next_stream += 1;
        let stream = inner.next_stream;
        let key = (who.node_id.clone(), who.identity.clone());
        let status = ProxyStatus {
            node_id: who.node_id.clone(),
            workload: who.workload,
            identity: who.identity,
            remote: who.remote,
            proxy_version: who.proxy_version,
            admin: who.admin,
            connected: true,
            connected_since: now,
            last_seen: now,
            version_sent: None,
            nonce_sent: None,
            version_acked: None,
            last_nack: None,
        };
        inner.proxies.insert(
            key.clone(),
            Entry {
                status,
                stream,
                cause: None,
            },
        );
        drop(inner);
        self.metrics.xds_connected.inc();
        Connection {
            registry: Arc::clone(self),
            key,
            stream,
        }
    }

    /// Every proxy, connected first, then by node id.
    pub fn list(&self) -> Vec<ProxyStatus> {
        let inner = self.lock();
        let mut out: Vec<ProxyStatus> = inner.proxies.values().map(|e| e.status.clone()).collect();
        out.sort_by(|a, b| {
            b.connected
                .cmp(&a.connected)
                .then_with(|| a.node_id.cmp(&b.node_id))
        });
        out
    }

    /// The state of the proxy with `node_id` (the connected one, if
    /// several identities used that id).
    pub fn get(&self, node_id: &str) -> Option<ProxyStatus> {
        self.list().into_iter().find(|s| s.node_id == node_id)
    }

    /// How many proxies are connected.
    pub fn connected(&self) -> usize {
        self.lock()
            .proxies
            .values()
            .filter(|e| e.status.connected)
            .count()
    }

    /// `/debug/connections`: every proxy and its state, as JSON.
    pub fn to_json(&self) -> Value {
        let proxies: Vec<Value> = self.list().iter().map(status_json).collect();
        json!({
            "connected": proxies.iter().filter(|p| p["connected"] == true).count(),
            "proxies": proxies,
        })
    }

    fn update(&self, key: &Key, stream: u64, f: impl FnOnce(&mut Entry)) {
        let mut inner = self.lock();
        if let Some(e) = inner.proxies.get_mut(key).filter(|e| e.stream == stream) {
            e.status.last_seen = SystemTime::now();
            f(e);
        }
    }
}

/// One open stream's handle on its registry entry.
#[derive(Debug)]
pub struct Connection {
    registry: Arc<Registry>,
    key: Key,
    stream: u64,
}

impl Connection {
    /// A response was sent: `version` with `nonce`, caused by something
    /// that happened at `cause` (a source change, or the subscription).
    pub fn sent(&self, version: &str, nonce: &str, cause: Instant) {
        self.registry.update(&self.key, self.stream, |e| {
            e.status.version_sent = Some(version.to_string());
            e.status.nonce_sent = Some(nonce.to_string());
            // A response superseded before its ACK keeps the earlier cause:
            // the convergence time runs from the first unacknowledged change.
            if e.cause.is_none() {
                e.cause = Some(cause);
            }
        });
    }

    /// The proxy ACKed the response with `nonce`, which carried `version`.
    /// An ACK of an older response (another nonce) only counts as seen.
    pub fn ack(&self, version: &str, nonce: &str) {
        let metrics = &self.registry.metrics;
        self.registry.update(&self.key, self.stream, |e| {
            if e.status.nonce_sent.as_deref() != Some(nonce) {
                return;
            }
            e.status.version_acked = Some(version.to_string());
            if let Some(cause) = e.cause.take() {
                metrics
                    .proxy_convergence_time
                    .observe(cause.elapsed().as_secs_f64());
            }
        });
    }

    /// The proxy refused the response with `nonce`: the version that
    /// response carried is recorded as refused (a NACK's own
    /// `version_info` names the version the proxy kept).
    pub fn nack(&self, nonce: &str, error: &str) {
        let metrics = &self.registry.metrics;
        self.registry.update(&self.key, self.stream, |e| {
            if e.status.nonce_sent.as_deref() != Some(nonce) {
                return;
            }
            metrics.xds_rejects.inc();
            e.cause = None;
            e.status.last_nack = Some(Nack {
                version: e.status.version_sent.clone().unwrap_or_default(),
                error: error.chars().take(MAX_ERROR_CHARS).collect(),
                at: SystemTime::now(),
            });
        });
    }

    /// The proxy said where its admin listener is (after subscribing).
    pub fn admin(&self, admin: Option<SocketAddr>) {
        self.registry.update(&self.key, self.stream, |e| {
            e.status.admin = admin;
        });
    }

    /// The proxy sent something (e.g. a stale ACK).
    pub fn seen(&self) {
        self.registry.update(&self.key, self.stream, |_| {});
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.registry.metrics.xds_connected.dec();
        let mut inner = self.registry.lock();
        let Some(e) = inner
            .proxies
            .get_mut(&self.key)
            .filter(|e| e.stream == self.stream)
        else {
            return;
        };
        e.status.connected = false;
        e.status.last_seen = SystemTime::now();
        e.cause = None;
        inner
            .disconnected
            .push_back((self.key.clone(), self.stream));
        while inner.disconnected.len() > MAX_DISCONNECTED {
            let Some((key, stream)) = inner.disconnected.pop_front() else {
                break;
            };
            if inner
                .proxies
                .get(&key)
                .is_some_and(|e| e.stream == stream && !e.status.connected)
            {
                inner.proxies.remove(&key);
            }
        }
    }
}

fn unix(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

fn status_json(s: &ProxyStatus) -> Value {
    json!({
        "node_id": s.node_id,
        "workload": s.workload,
        "identity": s.identity,
        "remote": s.remote.map(|a| a.to_string()),
        "proxy_version": s.proxy_version,
        // Where the CLI reads the proxy's debug endpoints; not trusted.
        "admin": s.admin.map(|a| a.to_string()),
        "connected": s.connected,
        "connected_since": unix(s.connected_since),
        "last_seen": unix(s.last_seen),
        "version_sent": s.version_sent,
        "nonce_sent": s.nonce_sent,
        "version_acked": s.version_acked,
        "last_nack": s.last_nack.as_ref().map(|n| json!({
            "version": n.version,
            "error": n.error,
            "at": unix(n.at),
        })),
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Instant;

    use super::{Registry, Subscriber};
    use crate::metrics::Metrics;

    fn who(id: &str) -> Subscriber {
        Subscriber {
            node_id: id.to_string(),
            workload: "ns/a".to_string(),
            identity: "spiffe://td/ns/ns/sa/a".to_string(),
            remote: None,
            proxy_version: "test".to_string(),
            admin: None,
        }
    }

    #[test]
    fn acks_nacks_and_disconnects_are_recorded() {
        let metrics = Arc::new(Metrics::new());
        let reg = Arc::new(Registry::new(metrics.clone()));
        let c = reg.connect(who("p1"));
        c.sent("v1", "n1", Instant::now());
        c.ack("v1", "n1");
        c.sent("v2", "n2", Instant::now());
        c.ack("v1", "n1"); // stale: ignored
        c.nack("n2", "bad policy");
        let s = reg.get("p1").unwrap();
        assert_eq!(s.version_acked.as_deref(), Some("v1"));
        assert_eq!(s.last_nack.as_ref().unwrap().error, "bad policy");
        assert_eq!(s.last_nack.as_ref().unwrap().version, "v2");
        assert_eq!(metrics.xds_rejects.get(), 1);
        assert_eq!(metrics.xds_connected.get(), 1);
        drop(c);
        assert!(!reg.get("p1").unwrap().connected);
        assert_eq!(metrics.xds_connected.get(), 0);
    }

    #[test]
    fn another_identity_naming_the_same_node_id_gets_its_own_entry() {
        let reg = Arc::new(Registry::new(Arc::new(Metrics::new())));
        let a = reg.connect(who("p1"));
        let mut other = who("p1");
        other.identity = "spiffe://td/ns/ns/sa/b".to_string();
        let b = reg.connect(other);
        a.sent("v1", "n1", Instant::now());
        drop(b);
        let s = reg.get("p1").unwrap();
        assert!(s.connected);
        assert_eq!(s.version_sent.as_deref(), Some("v1"));
        assert_eq!(reg.list().len(), 2);
    }

    #[test]
    fn disconnected_entries_are_bounded() {
        let reg = Arc::new(Registry::new(Arc::new(Metrics::new())));
        for i in 0..super::MAX_DISCONNECTED + 5 {
            drop(reg.connect(who(&format!("p{i}"))));
        }
        let kept = reg.connect(who("live"));
        assert_eq!(reg.list().len(), super::MAX_DISCONNECTED + 1);
        assert!(reg.get("live").unwrap().connected);
        assert!(reg.get("p0").is_none());
        drop(kept);
    }

    #[test]
    fn a_reconnection_owns_the_entry_and_the_old_stream_cannot_touch_it() {
        let reg = Arc::new(Registry::new(Arc::new(Metrics::new())));
        let old = reg.connect(who("p1"));
        let new = reg.connect(who("p1"));
        old.sent("v9", "n9", Instant::now());
        drop(old);
        let s = reg.get("p1").unwrap();
        assert!(s.connected);
        assert_eq!(s.version_sent, None);
        drop(new);
        assert!(!reg.get("p1").unwrap().connected);
    }
}
