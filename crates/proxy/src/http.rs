//! HTTP pieces both directions use: the boxed body type, proxy-made
//! responses, hop-by-hop stripping, the request line of a hyper request,
//! and serving one connection through hyper with the idle timeout.

use std::borrow::Cow;
use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{HOST, HeaderValue};
use http::{HeaderMap, Request as HttpRequest, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::idle::Streams;

pub type Body = BoxBody<Bytes, hyper::Error>;

/// Request headers as the policy engine reads them.
#[derive(Debug)]
pub struct HeaderView<'a>(pub &'a HeaderMap);

impl meshward_policy::Headers for HeaderView<'_> {
    fn header(&self, name: &str) -> Option<Cow<'_, [u8]>> {
        meshward_policy::join_values(self.0.get_all(name).iter().map(|v| v.as_bytes()))
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

/// Serves one connection through hyper (HTTP/1.x or HTTP/2, by what the
/// peer speaks), each request answered by `handle`; once no request has
/// been in flight for `idle_timeout`, or when the proxy drains, the
/// connection is shut down gracefully: HTTP/2 sends GOAWAY and finishes
/// the streams it has; HTTP/1.x closes when idle, or after the response
/// in flight (which says `Connection: close`).
pub async fn serve_hyper_conn<S, F, Fut>(
    io: S,
    (idle_timeout, drain): (std::time::Duration, &crate::drain::Drain),
    handle: F,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn(HttpRequest<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Response<Body>, Infallible>> + Send + 'static,
{
    let streams = Streams::new();
    let in_flight = Arc::clone(&streams);
    let svc = service_fn(move |req| {
        let guard = in_flight.start();
        let resp = handle(req);
        async move { Ok::<_, Infallible>(resp.await?.map(|b| Body::new(guard.hold(b)))) }
    });
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    let served = builder.serve_connection(TokioIo::new(io), svc);
    let mut served = std::pin::pin!(served);
    // The connection is polled first: one accepted just before a drain
    // began gets past hyper's protocol detection before it is shut down
    // when its first bytes are at hand (after `h1::sniff_h2`), so the
    // request it carries is served rather than dropped.
    tokio::select! {
        biased;
        r = served.as_mut() => r,
        () = streams.idle(idle_timeout) => {
            served.as_mut().graceful_shutdown();
            served.await
        }
        () = drain.draining() => {
            served.as_mut().graceful_shutdown();
            served.await
        }
    }
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
