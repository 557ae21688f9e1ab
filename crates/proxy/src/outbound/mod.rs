//! Outbound: the application talks plaintext to a local listener; the proxy
//! routes HTTP by `Host` (TCP by a per-service local port) to an endpoint of
//! the destination service and secures the connection as the
//! DestinationRule says (ISTIO_MUTUAL, MUTUAL, SIMPLE, DISABLE) or, without
//! one, by auto-mTLS: mTLS to endpoints that have a proxy, plaintext to
//! those that do not. Under mesh mTLS the server must present one of the
//! service's identities (secure naming).

mod captured;
mod http;
mod pool;
mod route;
mod tcp;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicUsize;
use std::time::Instant;

use ::http::{Request as HttpRequest, Response};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

pub use self::captured::serve_captured;
pub use self::http::serve_http;
use self::pool::{InUse, Origin, POOL_IDLE};
pub use self::pool::{MeshConnector, Pool, Upstream};
use self::route::{Plans, Route, still_made, tls_word};
pub use self::tcp::serve_tcp;
use crate::dr_tls;
use crate::http::Body;
use crate::snapshot::Snapshot;
use crate::state::State;

/// The outbound side: the application's requests and connections routed
/// to the services of the configuration, and the proxy's own requests (an
/// external authorization check, [`Outbound::send`]). It reads the proxy's
/// [`State`] (snapshot, TLS state, DestinationRule files, DNS answers,
/// metrics) and keeps what it derives from them: prepared routes and
/// connection pools. (The client configs of DestinationRule files live in
/// [`State::dr_files`].) One is made at start and handed to the outbound
/// listeners; the state never holds it.
#[derive(Debug)]
pub struct Outbound {
    state: Arc<State>,
    client: Client<MeshConnector, Body>,
    /// For HTTP/1.x requests to HTTP/2 upstreams (bodies buffered).
    client_full: Client<MeshConnector, Full<Bytes>>,
    connector: MeshConnector,
    pool: Pool,
    plans: Mutex<Plans>,
    next: AtomicUsize,
}

impl Outbound {
    /// The outbound side of the proxy whose state is `state`.
    pub fn new(state: Arc<State>) -> Outbound {
        let connector = MeshConnector::default();
        // With a timer, hyper closes connections idle for `POOL_IDLE`
        // (without one it only skips them when their key is asked for
        // again, so those of routes no longer used stayed open).
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE)
            .build(connector.clone());
        let client_full = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE)
            .build(connector.clone());
        Outbound {
            state,
            client,
            client_full,
            connector,
            pool: Pool::default(),
            plans: Mutex::new(Plans::default()),
            next: AtomicUsize::new(0),
        }
    }

    /// Sends a request of the proxy's own (an external authorization
    /// check) to service `host` on `port` as the outbound listener sends
    /// the application's: to the next endpoint, secured as the
    /// DestinationRule or auto-mTLS says, with secure naming. `req`'s URI
    /// carries the path and query. With `h2` (gRPC), the service port must
    /// speak HTTP/2.
    pub async fn send(
        &self,
        snap: &Arc<Snapshot>,
        host: &str,
        port: u16,
        mut req: HttpRequest<Body>,
        h2: bool,
    ) -> Result<Response<Incoming>, String> {
        let route = self
            .route(snap, host, Some(port))
            .map_err(|e| e.to_string())?;
        if h2 && !route.target.h2 {
            return Err(format!(
                "port {port} of {host} does not speak HTTP/2: declare it with protocol GRPC"
            ));
        }
        let _in_use = self.register(&route);
        let path = req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        *req.uri_mut() = format!("http://{}{path}", route.key)
            .parse()
            .map_err(|e| format!("bad path {path:?}: {e}"))?;
        *req.version_mut() = if route.target.h2 {
            ::http::Version::HTTP_2
        } else {
            ::http::Version::HTTP_11
        };
        self.client.request(req).await.map_err(|e| {
            let detail = match dr_tls::tls_failure(&e) {
                Some(f) => dr_tls::describe_failure(f, route.presented()),
                None => {
                    std::error::Error::source(&e).map_or_else(|| e.to_string(), |s| s.to_string())
                }
            };
            format!("{} ({}): {detail}", route.addr, tls_word(route.mode))
        })
    }

    /// Makes `route`'s key known to the hyper client's connector; the
    /// request holds the returned token until its response head has come.
    fn register(&self, route: &Route) -> InUse {
        self.connector
            .targets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .register(&route.key, &route.target, &route.origin, Instant::now())
    }

    /// Returns a connection the fast path is done with to the pool, or
    /// closes it if a configuration applied since its route was made no
    /// longer makes that route. (It carried its requests to the end: a
    /// configuration change never cuts a request short.)
    fn checkin(&self, origin: &Arc<Origin>, up: Upstream) {
        self.pool.checkin(origin, up, |origin| {
            // A draining proxy keeps no connection for later.
            if self.state.drain.is_draining() {
                return false;
            }
            let snap = self.state.snapshot();
            origin.version == snap.version || still_made(&snap, origin)
        });
    }

    /// Closes every idle pooled connection of the HTTP/1.1 fast path (a
    /// drain; connections in use are closed when their request is done,
    /// see `Outbound::checkin`); returns how many were closed. hyper's
    /// pools (HTTP/2 upstreams, the proxy's own requests) close theirs
    /// when the proxy is dropped.
    pub fn close_idle(&self) -> usize {
        self.pool.clear()
    }

    /// Forgets what the configuration in `snap` no longer has: routes
    /// prepared for earlier snapshots, and the connector's keys and the
    /// idle pooled connections whose routes `snap` no longer makes (a
    /// service or endpoint gone, or its settings changed), with the TLS
    /// client configs they hold. Requests in flight keep their
    /// connections (see `Outbound::checkin` and `InUse`). Called after
    /// each configuration swap; idle connections of hyper's pools (HTTP/2
    /// and the proxy's own requests) are closed by hyper after
    /// `POOL_IDLE` idle.
    pub fn retain(&self, snap: &Arc<Snapshot>) {
        self.plans
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(snap);
        // Each route is judged once, however many keys share it.
        let mut judged: HashMap<*const Origin, bool> = HashMap::new();
        let mut keep = |o: &Arc<Origin>| {
            *judged
                .entry(Arc::as_ptr(o))
                .or_insert_with(|| still_made(snap, o))
        };
        let targets = self
            .connector
            .targets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(&mut keep);
        let idle = self.pool.retain(&mut keep);
        if targets + idle > 0 {
            tracing::debug!(target: "meshward::config", version = snap.version, targets, idle, "outbound: forgot upstreams the configuration no longer has");
        }
    }
}
