//! `meshward.control.v1.ConfigDiscoveryService/StreamConfig`: one stream
//! per proxy, authenticated by its mesh certificate, that pushes the view
//! of its workload whenever that view changes.
//!
//! The first request names the node and its workload (`NS/NAME`); the
//! workload's WorkloadEntry must run as the identity of the caller's
//! certificate (same trust domain, namespace and service account), else
//! the stream is refused with PERMISSION_DENIED saying why. Each stream
//! runs in its own task and watches the latest snapshot and trust bundle
//! (`watch` channels: latest wins, so a slow proxy skips versions instead
//! of holding anyone up). Following requests are ACKs or NACKs, xDS style
//! (see the `.proto`), recorded in the [`Registry`]. If the workload leaves
//! the configuration, or its service account changes, the stream ends
//! with an error status.
//!
//! Bounds: requests are at most [`MAX_REQUEST_BYTES`] (use
//! [`ConfigService::into_server`], which sets it), the first request must
//! come within [`FIRST_REQUEST_TIMEOUT`], and at most
//! [`DEFAULT_MAX_STREAMS`] streams are open at once (RESOURCE_EXHAUSTED
//! past it; [`ConfigService::with_max_streams`]). A malformed request gets
//! INVALID_ARGUMENT.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use meshward_identity::{SpiffeId, TrustBundle, TrustDomain};
use meshward_proto::config::config_discovery_service_server::{
    ConfigDiscoveryService, ConfigDiscoveryServiceServer,
};
use meshward_proto::config::{ConfigRequest, ConfigResponse, Node};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::metrics::Metrics;
use crate::peer::PeerInfo;
use crate::registry::{Connection, Registry, Subscriber};
use crate::snapshot::Snapshot;

/// The largest request accepted (a request carries a node and at most an
/// error message).
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// The longest node id, workload or version string accepted.
pub const MAX_FIELD_CHARS: usize = 512;

/// How many config streams are open at most, by default (a proxy holds
/// one; a stream past the bound is refused with RESOURCE_EXHAUSTED).
pub const DEFAULT_MAX_STREAMS: usize = 20_000;

/// How long a new stream may take to send its first request.
pub const FIRST_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a proxy may take to receive one response (its HTTP/2 window
/// full, a proxy that stopped reading): past it the stream is closed, and
/// the proxy subscribes again when it can. A stuck stream holds no one
/// else up either way; this frees what it holds.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(60);

/// The config stream service.
#[derive(Debug, Clone)]
pub struct ConfigService {
    snapshots: watch::Receiver<Arc<Snapshot>>,
    bundle: watch::Receiver<Arc<TrustBundle>>,
    trust_domain: TrustDomain,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    nonces: Arc<AtomicU64>,
    streams: Arc<Semaphore>,
    max_streams: usize,
}

impl ConfigService {
    /// A service pushing views of the latest `snapshots` with the latest
    /// `bundle`, to callers of `trust_domain`.
    pub fn new(
        snapshots: watch::Receiver<Arc<Snapshot>>,
        bundle: watch::Receiver<Arc<TrustBundle>>,
        trust_domain: TrustDomain,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
    ) -> ConfigService {
        ConfigService {
            snapshots,
            bundle,
            trust_domain,
            registry,
            metrics,
            nonces: Arc::new(AtomicU64::new(0)),
            streams: Arc::new(Semaphore::new(DEFAULT_MAX_STREAMS)),
            max_streams: DEFAULT_MAX_STREAMS,
        }
    }

    /// Bounds the open streams to `max` (default [`DEFAULT_MAX_STREAMS`]).
    pub fn with_max_streams(mut self, max: usize) -> ConfigService {
        self.streams = Arc::new(Semaphore::new(max));
        self.max_streams = max;
        self
    }

    /// The service as a tonic server, with its request size bounded by
    /// [`MAX_REQUEST_BYTES`].
    pub fn into_server(self) -> ConfigDiscoveryServiceServer<ConfigService> {
        ConfigDiscoveryServiceServer::new(self).max_decoding_message_size(MAX_REQUEST_BYTES)
    }

    fn nonce(&self) -> String {
        // Unique per process; the process start makes it unique across
        // restarts and replicas too, so that an old ACK never matches.
        let n = self.nonces.fetch_add(1, Ordering::Relaxed);
        format!("{:x}-{n}", start_stamp())
    }
}

/// The subscription a first request asks for.
#[derive(Debug, Clone)]
struct Subscription {
    node_id: String,
    namespace: String,
    name: String,
    proxy_version: String,
    /// The proxy's admin listener, as it says (informational only).
    admin: Option<SocketAddr>,
}

fn parse_first(req: &ConfigRequest) -> Result<Subscription, Status> {
    let Some(node) = &req.node else {
        return Err(Status::invalid_argument(
            "the first request must carry `node` (id and workload)",
        ));
    };
    for (field, value) in [
        ("node.id", &node.id),
        ("node.workload", &node.workload),
        ("node.version", &node.version),
        ("node.admin_address", &node.admin_address),
    ] {
        if value.chars().count() > MAX_FIELD_CHARS {
            return Err(Status::invalid_argument(format!(
                "{field} is longer than {MAX_FIELD_CHARS} characters"
            )));
        }
    }
    if node.id.is_empty() {
        return Err(Status::invalid_argument("node.id is empty"));
    }
    let Some((namespace, name)) = node
        .workload
        .split_once('/')
        .filter(|(ns, n)| !ns.is_empty() && !n.is_empty() && !n.contains('/'))
    else {
        return Err(Status::invalid_argument(format!(
            "node.workload {:?} is not NAMESPACE/NAME",
            node.workload
        )));
    };
    Ok(Subscription {
        node_id: node.id.clone(),
        namespace: namespace.to_string(),
        name: name.to_string(),
        proxy_version: node.version.clone(),
        admin: admin_address(node)?,
    })
}

/// `node.admin_address`: empty, or `IP:PORT`. The address is only shown
/// (`/debug/connections`, for the CLI to read the proxy's debug
/// endpoints); it is trusted for nothing else.
fn admin_address(node: &Node) -> Result<Option<SocketAddr>, Status> {
    if node.admin_address.is_empty() {
        return Ok(None);
    }
    node.admin_address.parse().map(Some).map_err(|_| {
        Status::invalid_argument(format!(
            "node.admin_address {:?} is not IP:PORT",
            node.admin_address
                .chars()
                .take(MAX_FIELD_CHARS)
                .collect::<String>()
        ))
    })
}

/// Checks that the caller's identity may subscribe as the workload:
/// `Ok(())`, or the status that ends the stream.
fn authorize(
    snapshot: &Snapshot,
    trust_domain: &TrustDomain,
    identity: &SpiffeId,
    sub: &Subscription,
) -> Result<(), Status> {
    let workload = format!("{}/{}", sub.namespace, sub.name);
    // The namespace first: a caller learns nothing about the workloads of
    // namespaces that are not its own.
    if identity.trust_domain_str() != trust_domain.as_str()
        || identity.namespace() != Some(sub.namespace.as_str())
    {
        return Err(Status::permission_denied(format!(
            "certificate names {identity}, which may not subscribe as workload {workload}: the mesh is {}, the workload is in namespace {}",
            trust_domain.as_str(),
            sub.namespace
        )));
    }
    let Some(w) = snapshot.workload(&sub.namespace, &sub.name) else {
        return Err(Status::not_found(format!(
            "workload {workload} is not in the configuration (version {})",
            snapshot.version()
        )));
    };
    if identity.service_account() != Some(w.service_account.as_str()) {
        return Err(Status::permission_denied(format!(
            "certificate names {identity}, workload {workload} runs as ns {} sa {} (spiffe://{}/ns/{}/sa/{})",
            w.namespace,
            w.service_account,
            trust_domain.as_str(),
            w.namespace,
            w.service_account
        )));
    }
    Ok(())
}

#[tonic::async_trait]
impl ConfigDiscoveryService for ConfigService {
    type StreamConfigStream = ReceiverStream<Result<ConfigResponse, Status>>;

    async fn stream_config(
        &self,
        request: Request<Streaming<ConfigRequest>>,
    ) -> Result<Response<Self::StreamConfigStream>, Status> {
        let peer = PeerInfo::of(&request).cloned().unwrap_or_default();
        let Some(identity) = peer.identity.clone() else {
            return Err(Status::unauthenticated(
                "no mesh certificate: the config stream needs a client certificate of the mesh",
            ));
        };
        // Taken before the first request is awaited, so that streams that
        // never subscribe count too.
        let Ok(permit) = Arc::clone(&self.streams).try_acquire_owned() else {
            return Err(Status::resource_exhausted(format!(
                "the control plane serves at most {} config streams",
                self.max_streams
            )));
        };
        let mut inbound = request.into_inner();
        let first = match tokio::time::timeout(FIRST_REQUEST_TIMEOUT, inbound.message()).await {
            Err(_) => {
                return Err(Status::deadline_exceeded(format!(
                    "no subscription request within {FIRST_REQUEST_TIMEOUT:?}"
                )));
            }
            Ok(Err(status)) => return Err(invalid(status)),
            Ok(Ok(None)) => {
                return Err(Status::invalid_argument(
                    "the stream closed before its subscription request",
                ));
            }
            Ok(Ok(Some(first))) => first,
        };
        let sub = parse_first(&first)?;
        let snapshot = self.snapshots.borrow().clone();
        if let Err(status) = authorize(&snapshot, &self.trust_domain, &identity, &sub) {
            tracing::warn!(
                src.identity = %identity,
                src.addr = ?peer.remote,
                workload = %format!("{}/{}", sub.namespace, sub.name),
                reason = status.message(),
                "config subscription refused"
            );
            return Err(status);
        }
        let connection = self.registry.connect(Subscriber {
            node_id: sub.node_id.clone(),
            workload: format!("{}/{}", sub.namespace, sub.name),
            identity: identity.to_string(),
            remote: peer.remote,
            proxy_version: sub.proxy_version.clone(),
            admin: sub.admin,
        });
        tracing::info!(
            node = %sub.node_id,
            workload = %format!("{}/{}", sub.namespace, sub.name),
            src.identity = %identity,
            "proxy subscribed"
        );
        let (tx, rx) = mpsc::channel(1);
        let stream = Stream {
            service: self.clone(),
            identity,
            sub,
            connection,
            tx,
            inbound,
            _permit: permit,
        };
        tokio::spawn(stream.run());
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// A malformed message is the caller's fault: INVALID_ARGUMENT, with the
/// decoder's reason.
fn invalid(status: Status) -> Status {
    match status.code() {
        tonic::Code::Internal | tonic::Code::Unknown => {
            Status::invalid_argument(format!("malformed request: {}", status.message()))
        }
        _ => status,
    }
}

/// One subscribed stream.
struct Stream {
    service: ConfigService,
    identity: SpiffeId,
    sub: Subscription,
    connection: Connection,
    tx: mpsc::Sender<Result<ConfigResponse, Status>>,
    inbound: Streaming<ConfigRequest>,
    /// Released when the stream ends.
    _permit: OwnedSemaphorePermit,
}

impl Stream {
    async fn run(mut self) {
        let mut snapshots = self.service.snapshots.clone();
        let mut bundles = self.service.bundle.clone();
        let mut sent: Option<String> = None;
        let mut cause = Instant::now();
        // The view is computed again only when the snapshot or the bundle
        // changed, not for every ACK.
        let mut stale = true;
        loop {
            if stale {
                stale = false;
                let snapshot = snapshots.borrow_and_update().clone();
                let bundle = bundles.borrow_and_update().clone();
                if let Err(status) = self.push(&snapshot, &bundle, &mut sent, cause).await {
                    if let Some(status) = status {
                        tracing::warn!(
                            node = %self.sub.node_id,
                            reason = status.message(),
                            "config stream ended"
                        );
                        self.end(status).await;
                    }
                    return;
                }
            }
            tokio::select! {
                changed = snapshots.changed() => {
                    if changed.is_err() {
                        self.end(Status::unavailable("the control plane is stopping")).await;
                        return;
                    }
                    cause = snapshots.borrow().accepted_at();
                    stale = true;
                }
                changed = bundles.changed() => {
                    if changed.is_err() {
                        self.end(Status::unavailable("the control plane is stopping")).await;
                        return;
                    }
                    cause = Instant::now();
                    stale = true;
                }
                msg = self.inbound.message() => match msg {
                    Ok(Some(req)) => {
                        if let Err(status) = self.receive(req) {
                            self.end(status).await;
                            return;
                        }
                    }
                    // The proxy closed its side, or the connection broke.
                    Ok(None) | Err(_) => return,
                },
                () = self.tx.closed() => return,
            }
        }
    }

    /// Ends the stream with `status` (bounded: a proxy that does not read
    /// gets its stream closed without it).
    async fn end(&self, status: Status) {
        let _ = tokio::time::timeout(Duration::from_secs(5), self.tx.send(Err(status))).await;
    }

    /// Sends the view if its version differs from the last one sent.
    /// `Err(Some(status))` ends the stream with that status; `Err(None)`
    /// ends it because the proxy is gone.
    async fn push(
        &mut self,
        snapshot: &Snapshot,
        bundle: &TrustBundle,
        sent: &mut Option<String>,
        cause: Instant,
    ) -> Result<(), Option<Status>> {
        // The configuration may have changed who the workload runs as.
        authorize(
            snapshot,
            &self.service.trust_domain,
            &self.identity,
            &self.sub,
        )
        .map_err(Some)?;
        let view = snapshot
            .for_workload(&self.sub.namespace, &self.sub.name, bundle)
            .map_err(|e| Some(Status::not_found(e.to_string())))?;
        if sent.as_deref() == Some(view.version.as_str()) {
            return Ok(());
        }
        let nonce = self.service.nonce();
        let response = view.to_response(nonce.clone());
        match tokio::time::timeout(SEND_TIMEOUT, self.tx.send(Ok(response))).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(None),
            Err(_) => {
                tracing::warn!(
                    node = %self.sub.node_id,
                    "proxy did not take a config response within {SEND_TIMEOUT:?}; closing its stream"
                );
                return Err(None);
            }
        }
        self.connection.sent(&view.version, &nonce, cause);
        self.service.metrics.count_push("config");
        tracing::debug!(node = %self.sub.node_id, version = %view.version, "config pushed");
        *sent = Some(view.version);
        Ok(())
    }

    /// An ACK or a NACK (xDS rules: the nonce says which response it
    /// answers; `error_detail` makes it a NACK).
    fn receive(&self, req: ConfigRequest) -> Result<(), Status> {
        if let Some(node) = &req.node
            && (node.id != self.sub.node_id
                || node.workload != format!("{}/{}", self.sub.namespace, self.sub.name))
        {
            return Err(Status::invalid_argument(
                "node.id and node.workload cannot change within a stream",
            ));
        }
        // A proxy may learn its admin address after subscribing (it binds
        // it once it has a configuration): a later request says it.
        if let Some(node) = &req.node
            && !node.admin_address.is_empty()
        {
            if node.admin_address.chars().count() > MAX_FIELD_CHARS {
                return Err(Status::invalid_argument(format!(
                    "node.admin_address is longer than {MAX_FIELD_CHARS} characters"
                )));
            }
            self.connection.admin(admin_address(node)?);
        }
        if req.version_info.chars().count() > MAX_FIELD_CHARS
            || req.response_nonce.chars().count() > MAX_FIELD_CHARS
        {
            return Err(Status::invalid_argument(format!(
                "version_info and response_nonce are at most {MAX_FIELD_CHARS} characters"
            )));
        }
        if req.response_nonce.is_empty() {
            self.connection.seen();
            return Ok(());
        }
        match &req.error_detail {
            Some(error) => {
                tracing::warn!(
                    node = %self.sub.node_id,
                    workload = %format!("{}/{}", self.sub.namespace, self.sub.name),
                    nonce = %req.response_nonce,
                    error = %error.message.chars().take(crate::registry::MAX_ERROR_CHARS).collect::<String>(),
                    "proxy refused a config version (NACK)"
                );
                self.connection.nack(&req.response_nonce, &error.message);
            }
            None => self.connection.ack(&req.version_info, &req.response_nonce),
        }
        Ok(())
    }
}

/// The process start time in nanoseconds, computed once.
fn start_stamp() -> u128 {
    static START: std::sync::OnceLock<u128> = std::sync::OnceLock::new();
    *START.get_or_init(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default()
    })
}
