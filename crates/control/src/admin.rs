//! The control plane's admin listener (plain HTTP/1.1, meant for
//! localhost or a cluster-internal port):
//! - `/healthz/ready`: 200 once the first snapshot is loaded and every
//!   other readiness condition holds, else 503 naming what is missing;
//! - `/metrics`: Prometheus text (classic format, istiod's names);
//! - `/debug/connections`: every proxy and its state (istiod's name);
//! - `/debug/config`: the current snapshot's version and resource counts;
//! - `/debug/configz`: the configuration served, whole ([`crate::configz`]).
//!
//! Nothing here shows key material: the registry holds identities,
//! versions and the admin addresses proxies report (informational), the
//! snapshot summary holds counts, `/debug/configz` the documents and the
//! mesh settings.

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::snapshot::Snapshot;

/// How long a client may take to send its request head.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// What `/healthz/ready` waits for: the config source's first snapshot
/// ([`Readiness::config_loaded`]) and any named conditions (the CA's, for
/// instance) added with [`Readiness::condition`].
#[derive(Debug, Clone, Default)]
pub struct Readiness {
    inner: Arc<Mutex<ReadinessInner>>,
}

#[derive(Debug, Default)]
struct ReadinessInner {
    config: Option<watch::Receiver<Arc<Snapshot>>>,
    conditions: Vec<(String, Arc<AtomicBool>)>,
}

/// One named readiness condition, not met until [`ReadyFlag::set`].
#[derive(Debug, Clone)]
pub struct ReadyFlag(Arc<AtomicBool>);

impl ReadyFlag {
    /// Marks the condition met (`true`) or not (`false`).
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Release);
    }
}

impl Readiness {
    /// Nothing loaded yet: not ready.
    pub fn new() -> Readiness {
        Readiness::default()
    }

    /// The config source loaded its first snapshot; `/debug/config` shows
    /// the latest of `snapshots`.
    pub fn config_loaded(&self, snapshots: watch::Receiver<Arc<Snapshot>>) {
        self.lock().config = Some(snapshots);
    }

    /// Adds a condition named `name`, not met until its flag is set.
    pub fn condition(&self, name: &str) -> ReadyFlag {
        let flag = Arc::new(AtomicBool::new(false));
        self.lock()
            .conditions
            .push((name.to_string(), Arc::clone(&flag)));
        ReadyFlag(flag)
    }

    /// What is not ready yet (empty when ready).
    pub fn missing(&self) -> Vec<String> {
        let inner = self.lock();
        let mut out = Vec::new();
        if inner.config.is_none() {
            out.push("config".to_string());
        }
        for (name, flag) in &inner.conditions {
            if !flag.load(Ordering::Acquire) {
                out.push(name.clone());
            }
        }
        out
    }

    fn snapshot(&self) -> Option<Arc<Snapshot>> {
        self.lock().config.as_ref().map(|rx| rx.borrow().clone())
    }

    fn lock(&self) -> MutexGuard<'_, ReadinessInner> {
        // Plain data: a panic elsewhere leaves it usable.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[derive(Debug, Clone)]
struct Admin {
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    readiness: Readiness,
}

/// Serves the admin endpoints on `listener` until the future is dropped.
pub fn serve(
    listener: TcpListener,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    readiness: Readiness,
) -> impl Future<Output = ()> + Send + 'static {
    let admin = Admin {
        registry,
        metrics,
        readiness,
    };
    async move {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors, typically: wait a little
                    // rather than spin.
                    tracing::warn!(error = %e, "admin listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let admin = admin.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let admin = admin.clone();
                    async move { Ok::<_, Infallible>(admin.handle(&req)) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    }
}

impl Admin {
    fn handle<B>(&self, req: &Request<B>) -> Response<Full<Bytes>> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".to_string());
        }
        match req.uri().path() {
            "/healthz/ready" => {
                let missing = self.readiness.missing();
                if missing.is_empty() {
                    text(StatusCode::OK, "ready\n".to_string())
                } else {
                    text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("not ready: {}\n", missing.join(", ")),
                    )
                }
            }
            "/metrics" => {
                let mut r = text(StatusCode::OK, self.metrics.encode());
                r.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static(
                        "text/plain; version=0.0.4; charset=utf-8",
                    ),
                );
                r
            }
            "/debug/connections" => json_response(&self.registry.to_json()),
            "/debug/config" => match self.readiness.snapshot() {
                None => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "no configuration loaded yet\n".to_string(),
                ),
                Some(s) => {
                    let counts: serde_json::Map<String, serde_json::Value> = s
                        .config()
                        .counts()
                        .into_iter()
                        .map(|(k, n)| (k.as_str().to_string(), json!(n)))
                        .collect();
                    let accepted = s
                        .accepted_wall()
                        .duration_since(UNIX_EPOCH)
                        .map(|d| d.as_secs_f64())
                        .unwrap_or_default();
                    json_response(&json!({
                        "version": s.version(),
                        "accepted_at": accepted,
                        "documents": s.document_count(),
                        "resources": counts,
                        "root_namespace": s.config().mesh.root_namespace,
                    }))
                }
            },
            "/debug/configz" => match self.readiness.snapshot() {
                None => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "no configuration loaded yet\n".to_string(),
                ),
                Some(s) => match serde_json::to_value(crate::configz::Configz::of(&s)) {
                    Ok(v) => json_response(&v),
                    Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
                },
            },
            _ => text(StatusCode::NOT_FOUND, "not found\n".to_string()),
        }
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn json_response(v: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(format!("{v:#}\n"))));
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}
