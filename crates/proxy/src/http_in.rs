//! The inbound HTTP path: HTTP/1.1 and HTTP/2 from the peer, one
//! authorization decision per request, `403 RBAC: access denied` on deny,
//! and forwarding to the application over HTTP/1.1 with the proxy's own
//! `x-forwarded-client-cert`.

use std::borrow::Cow;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{HOST, HeaderValue};
use http::{HeaderMap, Request as HttpRequest, Response, StatusCode, Uri, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use meshward_policy::HttpAttributes;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::inbound::Conn;
use crate::state::State;

pub type Body = BoxBody<Bytes, hyper::Error>;

pub const XFCC: &str = "x-forwarded-client-cert";

/// Request headers as the policy engine reads them.
struct HeaderView<'a>(&'a HeaderMap);

impl meshward_policy::Headers for HeaderView<'_> {
    fn header(&self, name: &str) -> Option<Cow<'_, str>> {
        meshward_policy::join_values(self.0.get_all(name).iter().filter_map(|v| v.to_str().ok()))
    }
}

/// `Host` (or the HTTP/2 `:authority`), the request target and the method.
pub fn request_line(req: &HttpRequest<Incoming>) -> (String, String, String) {
    let host = req
        .headers()
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
        .unwrap_or_default();
    let path = req
        .uri()
        .path_and_query()
        .map_or_else(|| "/".to_string(), |p| p.as_str().to_string());
    (host, path, req.method().as_str().to_string())
}

/// Removes hop-by-hop headers (RFC 9110 section 7.6.1): they describe one
/// connection and must not be forwarded, or a `Connection: close` from one
/// side would tear down the proxy's pooled connection on the other.
/// `te: trailers` is kept (gRPC needs it).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<http::HeaderName> = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| http::HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        if name != http::header::TE {
            headers.remove(name);
        }
    }
    for name in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "upgrade",
        "trailer",
    ] {
        headers.remove(name);
    }
    let te_trailers = headers
        .get(http::header::TE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    if !te_trailers {
        headers.remove(http::header::TE);
    }
}

pub fn full(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut resp = Response::new(
        Full::new(Bytes::from_static(body.as_bytes()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain"),
    );
    resp
}

/// Serves HTTP on one accepted (and, when mTLS, authenticated) connection.
pub async fn serve<S>(state: Arc<State>, conn: Arc<Conn>, io: S)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = service_fn(move |req| handle(Arc::clone(&state), Arc::clone(&conn), req));
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    if let Err(e) = builder.serve_connection(TokioIo::new(io), svc).await {
        tracing::debug!(error = %e, "inbound HTTP connection ended with an error");
    }
}

async fn handle(
    state: Arc<State>,
    conn: Arc<Conn>,
    mut req: HttpRequest<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let started = Instant::now();
    let snap = state.snapshot();
    let (host, path, method) = request_line(&req);
    let decision = {
        let headers = HeaderView(req.headers());
        let facts = conn.facts(Some(HttpAttributes {
            method: &method,
            path: &path,
            host: &host,
            headers: &headers,
            auth: None,
        }));
        snap.policy.decide(&facts)
    };
    // CUSTOM (external authorization) is not available in this proxy yet:
    // a request that needs it is denied rather than let through.
    let ext_missing = decision.ext_authz.is_some();
    let allowed = decision.is_allowed() && !ext_missing;

    let (resp, flags) = if !allowed {
        (full(StatusCode::FORBIDDEN, "RBAC: access denied"), "-")
    } else {
        // Replace whatever XFCC the caller sent with our own.
        req.headers_mut().remove(XFCC);
        strip_hop_by_hop(req.headers_mut());
        if conn.mtls {
            let value = format!(
                "By={};Hash={};Subject=\"\";URI={}",
                snap.identity,
                conn.cert_hash.as_deref().unwrap_or_default(),
                conn.identity.as_deref().unwrap_or_default()
            );
            if let Ok(v) = HeaderValue::from_str(&value) {
                req.headers_mut().insert(XFCC, v);
            }
        }
        if !req.headers().contains_key(HOST)
            && let Ok(v) = HeaderValue::from_str(&host)
        {
            req.headers_mut().insert(HOST, v);
        }
        let uri = format!("http://{}{}", conn.app, path);
        match uri.parse::<Uri>() {
            Ok(uri) => *req.uri_mut() = uri,
            Err(_) => return Ok(full(StatusCode::BAD_REQUEST, "bad request path")),
        }
        let client = if conn.app_h2 {
            *req.version_mut() = Version::HTTP_2;
            &state.app_client_h2
        } else {
            *req.version_mut() = Version::HTTP_11;
            &state.app_client
        };
        match client.request(req).await {
            Ok(mut resp) => {
                strip_hop_by_hop(resp.headers_mut());
                (resp.map(|b| b.boxed()), "-")
            }
            Err(e) => {
                tracing::debug!(error = %e, app = %conn.app, "application unreachable");
                (
                    full(StatusCode::SERVICE_UNAVAILABLE, "upstream connect error"),
                    "UF",
                )
            }
        }
    };

    let status = resp.status().as_u16();
    let handles = conn.handles.get_or_insert(0, status, flags, || {
        let mut labels = conn.labels(&state, "http");
        labels.response_code = status.to_string();
        labels.response_flags = flags.to_string();
        state.metrics.request_handles(&labels)
    });
    handles.record(started.elapsed());
    if !state.metrics.access().enabled() {
        return Ok(resp);
    }
    let mut record = conn.record(&snap.identity, "http", started, Some(&decision));
    record.method = Some(method);
    record.path = Some(path);
    record.authority = Some(host);
    record.response_code = Some(status);
    state.metrics.access().write(&record);
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_not_forwarded() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("connection", "close, x-private"),
            ("keep-alive", "timeout=5"),
            ("x-private", "secret"),
            ("upgrade", "websocket"),
            ("proxy-connection", "keep-alive"),
            ("te", "gzip"),
            ("x-kept", "yes"),
        ] {
            h.insert(
                http::HeaderName::from_static(k),
                HeaderValue::from_static(v),
            );
        }
        strip_hop_by_hop(&mut h);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-kept"]);
        let mut h = HeaderMap::new();
        h.insert(http::header::TE, HeaderValue::from_static("trailers"));
        strip_hop_by_hop(&mut h);
        assert!(
            h.contains_key(http::header::TE),
            "te: trailers is kept for gRPC"
        );
    }
}
