//! The outbound HTTP listener: HTTP/1.x on the fast path (a pooled
//! connection per route, the response streamed back; HTTP/1.x to HTTP/2
//! upstreams bridged through hyper), HTTP/2 from the application through
//! hyper; and the metrics and access log of each request.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::header::{HOST, HeaderValue};
use http::{Request as HttpRequest, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use meshward_config::model::networking::TlsMode;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::Instrument;

use super::Outbound;
use super::pool::{BoxError, Origin, Upstream, connect};
use super::route::{
    Route, connection_span, record_route, request_span, route_tag, source_labels, source_record,
};
use crate::h1::codec::{self, Framing, RequestHead, Upgrade};
use crate::h1::{self, Sent, XFCC};
use crate::http::{Body, full, request_line, serve_hyper_conn, strip_hop_by_hop};
use crate::http_in::request_id;
use crate::idle::IdleTimer;
use crate::outcome::{DOWNSTREAM_CLOSED, FORWARDED, Flag, LocalFailure, Refusal};
use crate::rewind::Rewind;
use crate::snapshot::Snapshot;
use crate::state::State;
use crate::telemetry::{self, AccessRecord, BodyCount, CountedBody, Counts};

/// Serves the outbound HTTP listener.
pub async fn serve_http(outbound: Arc<Outbound>, listener: TcpListener) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "outbound accept failed");
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let outbound = Arc::clone(&outbound);
        let span = connection_span(peer, &outbound.state);
        let guard = outbound.state.drain.guard();
        tokio::spawn(
            guard
                .run(serve_connection(outbound, stream, peer, None))
                .instrument(span),
        );
    }
}

/// Serves one HTTP connection of the application: HTTP/1.x or HTTP/2 by
/// its first bytes. `orig` is a captured connection's original
/// destination: a request whose host names no service goes there, and a
/// host without a port means that port.
pub(super) async fn serve_connection(
    outbound: Arc<Outbound>,
    mut stream: TcpStream,
    peer: SocketAddr,
    orig: Option<SocketAddr>,
) {
    let mut buf = BytesMut::with_capacity(h1::READ_BUF);
    match h1::sniff_h2(&mut stream, &mut buf).await {
        Ok(Some(false)) => serve_h1(outbound, peer, orig, stream, buf).await,
        Ok(Some(true)) => {
            serve_hyper(outbound, peer, orig, Rewind::new(buf.to_vec(), stream)).await;
        }
        Ok(None) | Err(_) => {}
    }
}

/// Serves an HTTP/2 connection from the application through hyper.
async fn serve_hyper<S>(outbound: Arc<Outbound>, peer: SocketAddr, orig: Option<SocketAddr>, io: S)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let cache = Arc::new(crate::telemetry::HandleCache::default());
    let timeout = outbound.state.idle_timeout;
    let drain = outbound.state.drain.clone();
    let svc = move |req: HttpRequest<Incoming>| {
        let span = request_span(req.method().as_str(), req.uri().path());
        handle(Arc::clone(&outbound), (peer, orig), Arc::clone(&cache), req).instrument(span)
    };
    if let Err(e) = serve_hyper_conn(io, (timeout, &drain), svc).await {
        tracing::debug!(error = %e, "outbound connection ended with an error");
    }
}

/// The upstream connection a downstream connection is using, and the
/// route (key) it was made for.
type Current = Option<(Arc<Origin>, Upstream)>;

/// The HTTP/1.x fast path from the application: each request is routed by
/// its host, sent on a pooled connection for its route (kept while the
/// next requests go the same way), and its response streamed back.
async fn serve_h1(
    outbound: Arc<Outbound>,
    peer: SocketAddr,
    orig: Option<SocketAddr>,
    mut io: TcpStream,
    mut buf: BytesMut,
) {
    let state = &outbound.state;
    let cache = crate::telemetry::HandleCache::default();
    let mut current: Current = None;
    let mut up_buf = BytesMut::new();
    let mut out = Vec::with_capacity(1024);
    let mut idle = IdleTimer::new(state.idle_timeout);
    let drain = &state.drain;
    loop {
        let Some(head) = h1::next_request_draining(&mut io, &mut buf, peer, &mut idle, drain).await
        else {
            break;
        };
        let started = Instant::now();
        let snap = state.snapshot();
        let Ok(target) = h1::target(&head) else {
            h1::refuse(&mut io, &mut buf, 405, "method not allowed", head.framing()).await;
            break;
        };
        let line = [head.method(), &*target.path, target.host];
        let span = request_span(head.method(), &target.path);
        let framing = head.framing();
        // A draining proxy closes every connection after its response.
        let mut close = !head.keep_alive() || drain.is_draining();
        let route = match outbound.route_request(&snap, target.host, orig) {
            Ok(route) => route,
            Err(e) => {
                let failure = e.failure();
                close |= h1::has_body(framing);
                let body = failure.body();
                let sent = h1::reply(&mut io, failure.status(), body, close)
                    .instrument(span)
                    .await;
                let outcome = (
                    failure.status(),
                    failure.flag(),
                    e.to_string(),
                    Counts::bytes(0, body.len() as u64),
                );
                let id = request_id(&head);
                account(state, &snap, &cache, peer, started, None, outcome, line, id);
                if sent.is_err() {
                    break;
                }
                if close {
                    h1::end_connection(&mut io, &mut buf, h1::Unread::all(framing)).await;
                    break;
                }
                continue;
            }
        };
        if !span.is_disabled() {
            record_route(&span, &route);
        }
        let upgrade = head.upgrade();
        if upgrade != Upgrade::Unsupported && h1::answer_continue(&mut io, &head).await.is_err() {
            break;
        }
        let rewrite = h1::Rewrite::new(&head, &target, None, upgrade);
        let write_head = |out: &mut Vec<u8>| {
            codec::write_request(
                &head,
                &target.path,
                rewrite.drop,
                rewrite.added(),
                false,
                out,
            );
        };
        // Body bytes: from the application, to it.
        let mut sizes = (0, 0);
        // What the application may still send of the body when the
        // connection closes.
        let mut unread = h1::Unread::Nothing;
        let (status, flags, reason, must_close) = if upgrade == Upgrade::Unsupported {
            // Refused before the application, as an Istio sidecar does.
            close |= h1::has_body(framing);
            unread = h1::Unread::all(framing);
            let refusal = Refusal::UpgradeRefused;
            let body = Refusal::UPGRADE_REFUSED;
            let sent = h1::reply(&mut io, refusal.status(), body, close).await;
            sizes.1 = body.len() as u64;
            (
                refusal.status(),
                refusal.flag(),
                body.to_string(),
                close || sent.is_err(),
            )
        } else if route.target.h2 {
            let (status, flags, reason) = bridge_h2(
                &outbound,
                &route,
                (&head, &target),
                &mut io,
                &mut buf,
                (framing, close),
                (&mut sizes, &mut unread),
            )
            .instrument(span)
            .await;
            (status, flags, reason, close)
        } else {
            exchange(
                &outbound,
                &route,
                &mut current,
                (&mut io, &mut buf),
                (&mut up_buf, &mut out),
                write_head,
                (framing, head.method(), close),
                (upgrade == Upgrade::WebSocket).then_some(state.idle_timeout),
                (&mut sizes, &mut unread),
            )
            .instrument(span)
            .await
        };
        if flags != Flag::None || must_close || drain.is_draining() {
            close = true;
        }
        account(
            state,
            &snap,
            &cache,
            peer,
            started,
            Some(&route),
            (status, flags, reason, Counts::bytes(sizes.0, sizes.1)),
            line,
            request_id(&head),
        );
        if close {
            h1::end_connection(&mut io, &mut buf, unread).await;
            break;
        }
    }
    if let Some((origin, up)) = current {
        outbound.checkin(&origin, up);
    }
}

/// Forwards one request and its response on the route's connection: the
/// current one when it is for the same key, else a pooled or new one. A
/// request without a body is retried once on a new connection when a
/// reused one turns out closed. `tunnel` is set for a WebSocket handshake,
/// to the idle timeout of the tunnel a `101` opens (which ends both
/// connections). Returns the status, response flags, the access log
/// reason, and whether the downstream connection must close; `unread`
/// says what is left of the request body when it must.
#[allow(clippy::too_many_arguments)]
async fn exchange(
    outbound: &Outbound,
    route: &Route,
    current: &mut Current,
    (down, down_buf): (&mut TcpStream, &mut BytesMut),
    (up_buf, out): (&mut BytesMut, &mut Vec<u8>),
    write_head: impl Fn(&mut Vec<u8>),
    (framing, method, close_down): (Framing, &str, bool),
    tunnel: Option<Duration>,
    (sizes, unread): (&mut (u64, u64), &mut h1::Unread),
) -> (u16, Flag, String, bool) {
    if current
        .as_ref()
        .is_some_and(|(origin, _)| origin.key != route.key)
        && let Some((origin, up)) = current.take()
    {
        outbound.checkin(&origin, up);
    }
    let mut retried = false;
    let (resp, early) = loop {
        // `up_buf` belongs to the current connection: a connection taken
        // now starts with it empty.
        if current.is_none() {
            up_buf.clear();
        }
        // A retry goes to a new connection, never to another idle one.
        if current.is_none()
            && !retried
            && let Some(up) = outbound.pool.checkout(&route.key)
        {
            *current = Some((Arc::clone(&route.origin), up));
        }
        let reused = current.is_some();
        if current.is_none() {
            match connect(&route.target).await {
                Ok(up) => *current = Some((Arc::clone(&route.origin), up)),
                Err(e) => {
                    let failure = LocalFailure::ConnectFailed;
                    let _ = h1::reply(down, failure.status(), failure.body(), true).await;
                    sizes.1 = failure.body().len() as u64;
                    *unread = h1::Unread::all(framing);
                    let (flag, reason) = route.failure(&e, failure.flag());
                    return (failure.status(), flag, reason, true);
                }
            }
        }
        let Some((_, up)) = current.as_mut() else {
            unreachable!("set above")
        };
        out.clear();
        write_head(out);
        let can_retry = reused && framing == Framing::Empty;
        let upgrade = tunnel.is_some();
        let sent = h1::send(
            up,
            up_buf,
            down,
            down_buf,
            (framing, upgrade),
            out,
            &mut sizes.0,
        );
        let sent = sent.await;
        let failure = match sent {
            Sent::Response(resp) => break (resp, false),
            Sent::Early(resp) => break (resp, true),
            // A TLS failure here is a handshake's end (a TLS 1.3 server
            // sends its refusal of a client certificate in the client's
            // first read): `UF`, as for a failed connect.
            Sent::Lost(e) => route.failure(&e, LocalFailure::Reset.flag()),
            Sent::Refused(failure) => {
                *current = None;
                let body = failure.body();
                let _ = h1::reply(down, failure.status(), body, true).await;
                sizes.1 = body.len() as u64;
                *unread = h1::Unread::rest(framing);
                let reason = format!("{body} ({})", route.addr);
                return (failure.status(), failure.flag(), reason, true);
            }
            Sent::DownstreamBroke => {
                *current = None;
                let (status, flag, reason) = unsent(LocalFailure::DownstreamBroke);
                return (status, flag, reason, true);
            }
        };
        *current = None;
        if can_retry {
            retried = true;
            continue;
        }
        let reset = LocalFailure::Reset;
        let _ = h1::reply(down, reset.status(), reset.body(), true).await;
        sizes.1 = reset.body().len() as u64;
        *unread = h1::Unread::rest(framing);
        let (flag, reason) = failure;
        return (reset.status(), flag, reason, true);
    };
    let Some((_, up)) = current.as_mut() else {
        unreachable!("the response was read from it")
    };
    if let Some(idle_timeout) = tunnel.filter(|_| resp.status() == 101) {
        let ends = (idle_timeout, std::future::pending());
        let t = h1::tunnel(up, up_buf, down, down_buf, &resp, ends, out).await;
        *current = None;
        *sizes = t.bytes;
        let (sent, received) = t.bytes;
        let reason = format!(
            "{} ({sent} bytes sent, {received} received through the tunnel)",
            t.reason
        );
        return (101, t.flags, reason, true);
    }
    // An early answer (a refusal before the body had all gone) ends both
    // connections: the body was cut short. Draining is asked when the
    // response head is written (see `crate::drain`).
    let close_down = close_down || early || outbound.state.drain.is_draining();
    let r = h1::relay(up, up_buf, down, &resp, (method, close_down, &[]), out).await;
    sizes.1 = r.bytes;
    if !r.reusable || early {
        *current = None;
    }
    if early {
        *unread = h1::Unread::rest(framing);
    }
    let reason = match r.flags {
        Flag::None => FORWARDED.to_string(),
        Flag::DownstreamTermination => DOWNSTREAM_CLOSED.to_string(),
        _ => format!("response body from {} broke off", route.addr),
    };
    (r.status, r.flags, reason, r.close)
}

async fn handle(
    outbound: Arc<Outbound>,
    (peer, orig): (SocketAddr, Option<SocketAddr>),
    cache: Arc<crate::telemetry::HandleCache>,
    mut req: HttpRequest<Incoming>,
) -> Result<Response<Body>, std::convert::Infallible> {
    let started = Instant::now();
    let snap = outbound.state.snapshot();
    // Request body bytes forwarded upstream.
    let request_bytes = Arc::new(BodyCount::default());
    let grpc = telemetry::is_grpc(req.headers().get(http::header::CONTENT_TYPE));
    let (host, path, method) = request_line(&req);
    let request_id = req
        .headers()
        .get(crate::http_in::X_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let route = outbound.route_request(&snap, &host, orig);
    let (resp, flags, reason, route) = match route {
        Err(e) => {
            let failure = e.failure();
            (answer(failure), failure.flag(), e.to_string(), None)
        }
        Ok(route) => {
            if let Some(span) = crate::telemetry::current_span() {
                record_route(&span, &route);
            }
            let _in_use = outbound.register(&route);
            // The application must not speak for the mesh.
            req.headers_mut().remove(XFCC);
            strip_hop_by_hop(req.headers_mut());
            if !req.headers().contains_key(HOST)
                && let Ok(v) = HeaderValue::from_str(&host)
            {
                req.headers_mut().insert(HOST, v);
            }
            let target = format!("http://{}{path}", route.key);
            match target.parse::<Uri>() {
                Err(_) => {
                    let failure = LocalFailure::BadH2Path;
                    let reason = failure.reason().to_string();
                    (answer(failure), failure.flag(), reason, Some(route))
                }
                Ok(uri) => {
                    *req.uri_mut() = uri;
                    *req.version_mut() = if route.target.h2 {
                        http::Version::HTTP_2
                    } else {
                        http::Version::HTTP_11
                    };
                    let req =
                        req.map(|b| CountedBody::new(b, Arc::clone(&request_bytes), grpc).boxed());
                    match outbound.client.request(req).await {
                        Ok(mut resp) => (
                            {
                                strip_hop_by_hop(resp.headers_mut());
                                resp.map(|b| b.boxed())
                            },
                            Flag::None,
                            FORWARDED.to_string(),
                            Some(route),
                        ),
                        Err(e) => {
                            let failure = LocalFailure::ConnectFailed;
                            let (flag, reason) = match std::error::Error::source(&e) {
                                Some(source) => route.failure(source, failure.flag()),
                                None => route.failure(&e, failure.flag()),
                            };
                            (answer(failure), flag, reason, Some(route))
                        }
                    }
                }
            }
        }
    };
    // Counted, timed and logged when the response body has gone, as
    // Envoy does at the end of the stream.
    let status = resp.status().as_u16();
    let finish = Box::new(move |counts| {
        account(
            &outbound.state,
            &snap,
            &cache,
            peer,
            started,
            route.as_ref(),
            (status, flags, reason, counts),
            [&method, &path, &host],
            request_id.as_deref(),
        );
    });
    Ok(resp.map(|body| CountedBody::recording(body, request_bytes, grpc, finish).boxed()))
}

/// Largest request body an HTTP/1.x request to an HTTP/2 upstream may have
/// (it is read whole before it is sent).
const BRIDGE_MAX_BODY: u64 = 4 * 1024 * 1024;

/// An HTTP/1.x request to an HTTP/2 upstream (a `grpc`/`http2` port): the
/// body is read whole, the request goes through hyper's HTTP/2 client, and
/// the response is written back as HTTP/1.1 (chunked unless its length is
/// known). Chunked request bodies are not bridged (411).
async fn bridge_h2(
    outbound: &Outbound,
    route: &Route,
    (head, target): (&RequestHead, &h1::Target<'_>),
    io: &mut TcpStream,
    buf: &mut BytesMut,
    (framing, close): (Framing, bool),
    (sizes, unread): (&mut (u64, u64), &mut h1::Unread),
) -> (u16, Flag, String) {
    let len = match framing {
        Framing::Empty => 0,
        Framing::Length(n) if n <= BRIDGE_MAX_BODY => n,
        Framing::Length(_) => {
            *unread = h1::Unread::all(framing);
            return refuse(io, LocalFailure::BodyTooLarge).await;
        }
        Framing::Chunked | Framing::UntilClose => {
            *unread = h1::Unread::all(framing);
            return refuse(io, LocalFailure::LengthRequired).await;
        }
    };
    let mut body = Vec::with_capacity(usize::try_from(len).unwrap_or_default());
    if h1::forward(io, buf, &mut body, framing, &mut Vec::new(), &mut sizes.0)
        .await
        .is_err()
    {
        return unsent(LocalFailure::DownstreamBroke);
    }
    let mut req = HttpRequest::new(Full::new(Bytes::from(body)));
    *req.method_mut() = match http::Method::from_bytes(head.method().as_bytes()) {
        Ok(m) => m,
        Err(_) => return refuse(io, LocalFailure::BadMethod).await,
    };
    match format!("http://{}{}", route.key, target.path).parse::<Uri>() {
        Ok(uri) => *req.uri_mut() = uri,
        Err(_) => return refuse(io, LocalFailure::BadPath).await,
    }
    *req.version_mut() = http::Version::HTTP_2;
    for (name, value) in head.iter() {
        if let (Ok(n), Ok(v)) = (
            http::HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_bytes(value),
        ) {
            req.headers_mut().append(n, v);
        }
    }
    req.headers_mut().remove(XFCC);
    strip_hop_by_hop(req.headers_mut());
    req.headers_mut().remove(http::header::CONTENT_LENGTH);
    if let Ok(v) = HeaderValue::from_str(target.host) {
        req.headers_mut().insert(HOST, v);
    }
    let _in_use = outbound.register(route);
    let resp = match outbound.client_full.request(req).await {
        Ok(resp) => resp,
        Err(e) => {
            let failure = LocalFailure::ConnectFailed;
            let _ = h1::reply(io, failure.status(), failure.body(), true).await;
            let (flag, reason) = route.failure(&e, failure.flag());
            return (failure.status(), flag, reason);
        }
    };
    let status = resp.status().as_u16();
    let close = close || outbound.state.drain.is_draining();
    match write_h1_response(io, resp, head.method() == "HEAD", close, &mut sizes.1).await {
        Ok(()) => (status, Flag::None, FORWARDED.to_string()),
        Err(e) => (
            status,
            Flag::UpstreamProtocolError,
            format!("response from {}: {e}", route.addr),
        ),
    }
}

/// Answers `failure` on `io` and closes: the status, flag and reason to
/// account.
async fn refuse(io: &mut TcpStream, failure: LocalFailure) -> (u16, Flag, String) {
    let _ = h1::reply(io, failure.status(), failure.body(), true).await;
    unsent(failure)
}

/// The status, flag and reason to account for `failure`, when nothing
/// more specific is known.
fn unsent(failure: LocalFailure) -> (u16, Flag, String) {
    (
        failure.status(),
        failure.flag(),
        failure.reason().to_string(),
    )
}

/// The HTTP/2 side's answer for `failure`.
fn answer(failure: LocalFailure) -> Response<Body> {
    let status = StatusCode::from_u16(failure.status()).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    full(status, failure.body())
}

/// Writes a hyper response to an HTTP/1.1 client; `sent` counts its body
/// bytes.
async fn write_h1_response(
    io: &mut TcpStream,
    resp: Response<Incoming>,
    head_request: bool,
    close: bool,
    sent: &mut u64,
) -> Result<(), BoxError> {
    use std::io::Write as _;
    let (mut parts, mut body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let no_body = head_request
        || parts.status.is_informational()
        || parts.status == StatusCode::NO_CONTENT
        || parts.status == StatusCode::NOT_MODIFIED;
    let length = hyper::body::Body::size_hint(&body).exact();
    let chunked = !no_body && length.is_none();
    let mut out = Vec::with_capacity(512);
    write!(
        out,
        "HTTP/1.1 {} {}\r\n",
        parts.status.as_u16(),
        parts.status.canonical_reason().unwrap_or("")
    )?;
    for (name, value) in &parts.headers {
        if name == http::header::CONTENT_LENGTH && !no_body {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    match length {
        _ if no_body => {}
        Some(n) => write!(out, "content-length: {n}\r\n")?,
        None => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    io.write_all(&out).await?;
    if no_body {
        return Ok(io.flush().await?);
    }
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            // Trailers have no place in this response.
            continue;
        };
        if data.is_empty() {
            continue;
        }
        *sent += data.len() as u64;
        if chunked {
            io.write_all(format!("{:x}\r\n", data.len()).as_bytes())
                .await?;
            io.write_all(&data).await?;
            io.write_all(b"\r\n").await?;
        } else {
            io.write_all(&data).await?;
        }
    }
    if chunked {
        io.write_all(b"0\r\n\r\n").await?;
    }
    Ok(io.flush().await?)
}

/// Records one outbound request: its metrics and, when enabled, its access
/// log line. `outcome` is the status, response flags and reason; `line`
/// the method, path and host.
#[allow(clippy::too_many_arguments)]
fn account(
    state: &State,
    snap: &Snapshot,
    cache: &crate::telemetry::HandleCache,
    peer: SocketAddr,
    started: Instant,
    route: Option<&Route>,
    (status, flags, reason, counts): (u16, Flag, String, Counts),
    [method, path, host]: [&str; 3],
    request_id: Option<&str>,
) {
    let mtls = route.is_some_and(|r| r.mode != TlsMode::Disable);
    let protocol = counts.protocol();
    let tag = (route.map_or(0, route_tag), protocol);
    let handles = cache.get_or_insert(tag, status, flags.as_str(), || {
        let mut labels = source_labels(snap, route, protocol, mtls);
        labels.response_code = status.to_string();
        labels.response_flags = flags.as_str().to_string();
        state.metrics.request_handles(&labels)
    });
    handles.record(started.elapsed(), counts);
    if !state.metrics.access().enabled() {
        return;
    }
    // From the application (the downstream here), and to it.
    let (bytes_received, bytes_sent) = counts.bytes;
    state.metrics.access().write(&AccessRecord {
        method: Some(method.to_string()),
        path: Some(path.to_string()),
        authority: Some(host.to_string()),
        request_id: request_id.map(str::to_string),
        response_code: Some(status),
        ..source_record(
            snap,
            peer,
            route,
            mtls,
            "http",
            (flags, reason),
            started,
            (bytes_received, bytes_sent),
        )
    });
}
