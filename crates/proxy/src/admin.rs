//! Admin endpoints (default 127.0.0.1:15000), the offline counterparts of
//! `istioctl proxy-config`:
//!
//! - `GET /healthz/ready`: 200 once listeners are bound and config and
//!   certificates are loaded, 503 before, and 503 `draining` from the
//!   start of a drain until the proxy exits;
//! - `GET /config_dump`: the effective configuration (version, workload,
//!   inbound ports with their mTLS mode, outbound listeners, the
//!   authorization policies and JWT rules that apply, the services known,
//!   with the current answer of each DNS name: addresses, TTL, expiry and
//!   the last failed lookup, per set of DestinationRule files the
//!   client certificate loaded and the last load error, and the `source`
//!   of the configuration and certificates: their paths, whether what
//!   runs is what the files say or why not, the last successful load);
//! - `GET /listeners`: every listener the proxy has bound, and those of
//!   the current configuration it could not bind (with the error);
//! - `GET /certs`: the loaded workload certificate and trust roots, as
//!   facts and as PEM (never the key), and when they were installed;
//! - `GET /access_log`: the recent access-log entries (`request_id`, `src`
//!   and `limit` filters; see [`crate::recent`]);
//! - `GET /debug/flows`: the inbound flow table (per source workload,
//!   principal and address, port, protocol and security: connections,
//!   requests, denials, refusals, per minute for the last hour), which
//!   `meshward mtls report` reads;
//! - `GET /stats/prometheus` (also `/metrics`): Prometheus metrics.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use tokio::net::TcpListener;

use crate::http::Body;
use crate::listeners::Listeners;
use crate::state::State;

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    r
}

fn json_response(value: serde_json::Value) -> Response<Body> {
    text(
        StatusCode::OK,
        "application/json",
        serde_json::to_string_pretty(&value).unwrap_or_default(),
    )
}

/// Serves the admin (or metrics-only) endpoints.
pub async fn serve(
    state: Arc<State>,
    listener: TcpListener,
    listeners: Arc<Listeners>,
    metrics_only: bool,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let state = Arc::clone(&state);
        let listeners = Arc::clone(&listeners);
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let state = Arc::clone(&state);
                let listeners = Arc::clone(&listeners);
                async move { Ok::<_, Infallible>(route(&state, &listeners, req, metrics_only)) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn route(
    state: &State,
    listeners: &Listeners,
    req: Request<Incoming>,
    metrics_only: bool,
) -> Response<Body> {
    if req.method() != Method::GET {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "only GET\n".into(),
        );
    }
    match (req.uri().path(), metrics_only) {
        ("/stats/prometheus" | "/metrics", _) => text(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            state.metrics.encode(),
        ),
        ("/healthz/ready", _) => match state.not_ready() {
            None => text(StatusCode::OK, "text/plain", "ready\n".into()),
            Some(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("not ready: {why}\n"),
            ),
        },
        (_, true) => text(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
        ("/config_dump", false) => json_response(config_dump(state)),
        ("/listeners", false) => json_response(json!(listeners.infos())),
        ("/certs", false) => json_response(certs(state)),
        ("/access_log", false) => access_log(state, req.uri().query().unwrap_or_default()),
        ("/debug/flows", false) => {
            let snap = state.snapshot();
            json_response(state.flows.json(&snap.workload_name, &snap.identity))
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "text/plain",
            "endpoints: /healthz/ready /config_dump /listeners /certs /access_log /debug/flows /stats/prometheus\n"
                .into(),
        ),
    }
}

fn config_dump(state: &State) -> serde_json::Value {
    let snap = state.snapshot();
    let inbound: Vec<_> = snap
        .inbound
        .iter()
        .map(|p| {
            let d = snap.policy.mtls(p.port);
            json!({"name": p.name, "port": p.port, "protocol": p.protocol, "app": p.app, "app_connect_timeout_ms": snap.app_connect_timeout.as_millis(), "mtls_mode": d.mode.as_str(), "mtls_source": d.source.to_string()})
        })
        .collect();
    let policies: Vec<_> = snap
        .policy
        .policies()
        .iter()
        .map(|p| json!({"namespace": p.namespace, "name": p.name, "action": p.action.as_str(), "dry_run": p.dry_run}))
        .collect();
    let now = tokio::time::Instant::now();
    let services: Vec<_> = snap
        .services
        .iter()
        .map(|s| {
            // DNS names with their current answer: addresses, TTL, when it
            // expires, and the last failed lookup.
            let dns: Vec<_> = s
                .dns
                .iter()
                .map(|d| {
                    let mut v = d.name.answer().describe(d.name.name(), now);
                    v["for_host"] = json!(d.for_host);
                    v
                })
                .collect();
            json!({
                "name": format!("{}/{}", s.namespace, s.name),
                "host": s.host,
                "destination_rule": s.destination_rule,
                "ports": s.ports.iter().map(|p| json!({"name": p.name, "number": p.number, "protocol": p.protocol, "connect_timeout_ms": s.connect_timeout_for(p.number).as_millis()})).collect::<Vec<_>>(),
                "resolution": s.resolution.as_str(),
                "addresses": s.addresses.iter().map(ToString::to_string).collect::<Vec<_>>(),
                // Allocated by meshward (crate::vip) when it has none.
                "allocated_addresses": s.allocated,
                "endpoints": s.endpoints,
                "dns": dns,
                "identities": s.identities,
                "tls": s.tls.as_ref().map(|t| t.mode.as_str()),
            })
        })
        .collect();
    json!({
        "version": snap.version,
        "workload": snap.workload_name,
        "identity": snap.identity,
        "labels": snap.workload.labels,
        "inbound": inbound,
        "outbound": {"http": snap.outbound, "tcp": snap.tcp_outbound},
        "authorization_policies": policies,
        // Set when the CUSTOM policies cannot be enforced (what their
        // rules match is then denied, no provider asked).
        "custom_problem": snap.policy.custom_problem(),
        "request_authentication": snap.jwt.describe(),
        "services": services,
        // The DNS proxy's name table (mesh hosts and short names).
        "dns_names": snap.names.len(),
        // SIMPLE and MUTUAL settings' files: what is loaded, and why a
        // change was refused or nothing could be loaded.
        "destination_rule_tls": state.dr_files.describe(),
        // Where the configuration and certificates come from, and whether
        // what runs is what the files say (`ok`, `lost`, `held`,
        // `refused`), with the last successful load.
        "source": state.sources.describe(),
    })
}

/// `/access_log?request_id=ID&src=IP[:PORT]&limit=N`: the recent entries.
fn access_log(state: &State, query: &str) -> Response<Body> {
    let Some(recent) = state.metrics.access().recent() else {
        return text(
            StatusCode::NOT_FOUND,
            "text/plain",
            "no access-log entries are kept (--access-log-buffer 0)\n".into(),
        );
    };
    match crate::recent::Query::parse(query) {
        Ok(q) => text(StatusCode::OK, "application/json", recent.render(&q)),
        Err(e) => text(
            StatusCode::BAD_REQUEST,
            "text/plain",
            format!("/access_log: {e}\n"),
        ),
    }
}

fn certs(state: &State) -> serde_json::Value {
    let tls = state.tls();
    let now = time::OffsetDateTime::now_utc();
    let origin = std::path::Path::new("certs");
    let chain = meshward_identity::inspect::inspect_certs(
        tls.credentials.chain(),
        origin,
        Some(&tls.bundle),
        now,
    );
    let roots = meshward_identity::inspect::inspect_certs(tls.bundle.roots(), origin, None, now);
    let loaded_at = time::OffsetDateTime::from(tls.loaded_at)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    json!({
        "identity": tls.credentials.id().to_string(),
        "chain": chain.map(|r| json!(r)).unwrap_or_else(|e| json!({"error": e.to_string()})),
        "roots": roots.map(|r| json!(r.certificates)).unwrap_or_else(|e| json!({"error": e.to_string()})),
        // The certificates themselves (public: what the proxy presents
        // and trusts), for `meshward proxy-config secret`. Never the key.
        "pem": {
            "chain": meshward_identity::pem::encode_certs(tls.credentials.chain()),
            "roots": tls.bundle.to_pem(),
        },
        "loaded_at": loaded_at,
    })
}
