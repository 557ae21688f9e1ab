//! The inbound HTTP path: HTTP/1.1 and HTTP/2 from the peer, one
//! authorization decision per request, `403 RBAC: access denied` on deny,
//! and forwarding to the application over HTTP/1.1 with the proxy's own
//! `x-forwarded-client-cert`.

use std::borrow::Cow;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use http::header::{HOST, HeaderValue};
use http::{HeaderMap, Request as HttpRequest, Response, StatusCode, Uri, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use meshward_policy::{Decision, HttpAttributes};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::h1::codec::{self, Framing, Upgrade};
use crate::h1::{self, Sent, XFCC};
use crate::idle::{IdleTimer, Streams};
use crate::inbound::{Conn, POLICY_CHANGED};
use crate::rewind::Rewind;
use crate::state::{State, TrackedRequest};
use crate::telemetry::{self, BodyCount, CountedBody, Counts};
use crate::{ext_authz, jwt};

pub type Body = BoxBody<Bytes, hyper::Error>;

/// Request headers as the policy engine reads them.
struct HeaderView<'a>(&'a HeaderMap);

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

/// Serves HTTP on one accepted (and, when mTLS, authenticated) connection:
/// HTTP/1.x on the fast path ([`crate::h1`]); HTTP/2 (recognised by its
/// preface, with or without TLS) and ports whose application speaks
/// HTTP/2 through hyper.
pub async fn serve<S>(state: Arc<State>, conn: Arc<Conn>, mut io: S)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    if conn.app_h2 {
        return serve_hyper(state, conn, io).await;
    }
    let mut buf = BytesMut::with_capacity(h1::READ_BUF);
    match h1::sniff_h2(&mut io, &mut buf).await {
        Ok(Some(true)) => serve_hyper(state, conn, Rewind::new(buf.to_vec(), io)).await,
        Ok(Some(false)) => serve_h1(state, conn, io, buf).await,
        Ok(None) | Err(_) => {}
    }
}

/// The `x-forwarded-client-cert` value for a request on `conn` (Istio's
/// format: the proxy's identity, the peer certificate's hash and URI).
fn xfcc(own_identity: &str, conn: &Conn) -> String {
    format!(
        "By={own_identity};Hash={};Subject=\"\";URI={}",
        conn.cert_hash.as_deref().unwrap_or_default(),
        conn.identity.as_deref().unwrap_or_default()
    )
}

/// The HTTP/1.x fast path: requests are read, decided and forwarded one at
/// a time (pipelined requests wait their turn) over one connection to the
/// application, opened on first use and reopened when the application
/// closes it.
async fn serve_h1<S>(state: Arc<State>, conn: Arc<Conn>, mut io: S, mut buf: BytesMut)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut app = AppConn::new(state.idle_timeout);
    let mut out = Vec::with_capacity(1024);
    // The XFCC value, and the proxy identity it was made for.
    let mut xfcc_cache: Option<(String, String)> = None;
    let mut idle = IdleTimer::new(state.idle_timeout);
    loop {
        let Some(head) = h1::next_request(&mut io, &mut buf, conn.peer, &mut idle).await else {
            return;
        };
        let started = Instant::now();
        let snap = state.snapshot();
        let framing = head.framing();
        let Ok(target) = h1::target(&head) else {
            h1::refuse(&mut io, &mut buf, 405, "method not allowed", framing).await;
            return;
        };
        // RequestAuthentication first, then authorization, as Envoy's
        // jwt_authn and RBAC filters run.
        let authn = snap.jwt.authenticate(&h1::HeaderView(&head), &target.path);
        let decision = authn.as_ref().ok().map(|a| {
            snap.policy.decide(&conn.facts(Some(HttpAttributes {
                method: head.method(),
                path: &target.path,
                host: target.host,
                headers: &h1::HeaderView(&head),
                auth: a.auth.as_deref(),
            })))
        });
        let line = [head.method(), &*target.path, target.host];
        // A request whose body is not read cannot be followed by another.
        let mut close = !head.keep_alive();
        // The application gets the path the decision saw. A path that
        // cannot be normalized is denied by the policy engine too, and
        // answered 400 as Envoy does.
        let forward = snap.policy.forwarded_target(&target.path);
        // CUSTOM first: the external provider is asked before the DENY
        // and ALLOW policies count, as Istio orders them.
        let ext = match (
            &forward,
            decision.as_ref().and_then(|d| d.ext_authz.as_ref()),
        ) {
            (Ok(path), Some(x)) => {
                let check = conn.ext_check(
                    &snap.identity,
                    Some(ext_authz::HttpCheck {
                        method: head.method(),
                        host: target.host,
                        path,
                        headers: head.iter().collect(),
                        protocol: "HTTP/1.1",
                    }),
                );
                Some((
                    x,
                    ext_authz::check(&conn.ext_authz, &snap, &x.provider, check).await,
                ))
            }
            _ => None,
        };
        if let Some((x, outcome)) = &ext
            && let Some((status, headers, body)) = outcome.refusal()
        {
            close |= h1::has_body(framing);
            let fields = ext_authz::field_refs(headers);
            let sent = h1::reply_fields(&mut io, status, &fields, body, close).await;
            let reason = outcome.reason(&x.provider);
            account(
                &state,
                &conn,
                &snap.identity,
                started,
                (
                    status,
                    "UAEX",
                    Some(Ended::ExtAuthz(x, &reason)),
                    Counts::bytes(0, body.len() as u64),
                ),
                (decision.as_ref(), None),
                line,
            );
            if sent.is_err() {
                return;
            }
            if close {
                // The body was never read: it is discarded before the
                // connection closes, so the refusal reaches the client.
                h1::end_connection(&mut io, &mut buf, h1::Unread::all(framing)).await;
                return;
            }
            continue;
        }
        // What an allowing provider said, for the access log.
        let ext_allowed = ext.as_ref().map(|(x, o)| o.reason(&x.provider));
        let denied = decision.as_ref().is_some_and(|d| !d.is_allowed());
        let upgrade = head.upgrade();
        let forward = match (forward, &authn) {
            (Ok(forward), Ok(_)) if !denied && upgrade != Upgrade::Unsupported => forward,
            (bad, authn) => {
                close |= h1::has_body(framing);
                let (status, body, ended) = match (bad, authn) {
                    (Err(_), _) => (400, "invalid request path", None),
                    (Ok(_), Err(r)) => (401, r.message, Some(Ended::Unauthenticated(r))),
                    (Ok(_), Ok(_)) if denied => (403, "RBAC: access denied", None),
                    (Ok(_), Ok(_)) => (
                        403,
                        h1::UPGRADE_REFUSED,
                        Some(Ended::Refused(h1::UPGRADE_REFUSED)),
                    ),
                };
                let sent = if status == 401 {
                    let challenge = jwt::challenge(target.host, &target.path);
                    let fields = [("www-authenticate", challenge.as_str())];
                    h1::reply_with(&mut io, status, body, &fields, close).await
                } else {
                    h1::reply(&mut io, status, body, close).await
                };
                account(
                    &state,
                    &conn,
                    &snap.identity,
                    started,
                    (status, "-", ended, Counts::bytes(0, body.len() as u64)),
                    (decision.as_ref(), ext_allowed.as_deref()),
                    line,
                );
                if sent.is_err() {
                    return;
                }
                if close {
                    h1::end_connection(&mut io, &mut buf, h1::Unread::all(framing)).await;
                    return;
                }
                continue;
            }
        };
        if h1::answer_continue(&mut io, &head).await.is_err() {
            return;
        }
        if xfcc_cache
            .as_ref()
            .is_none_or(|(by, _)| *by != snap.identity)
        {
            xfcc_cache = Some((snap.identity.clone(), xfcc(&snap.identity, &conn)));
        }
        let xfcc = xfcc_cache
            .as_ref()
            .filter(|_| conn.mtls)
            .map(|(_, value)| value.as_bytes());
        let rewrite = h1::Rewrite::new(&head, &target, xfcc, upgrade);
        let ext_outcome = ext.as_ref().map(|(_, o)| o);
        let owned_edits = request_edits(authn.as_ref().ok(), ext_outcome);
        let edits = match &owned_edits {
            Some(e) => rewrite.with(&e.remove, &e.add),
            None => rewrite.edits(),
        };
        let to_client = match ext_outcome {
            Some(ext_authz::Outcome::Allow { downstream, .. }) => ext_authz::field_refs(downstream),
            _ => Vec::new(),
        };
        // A WebSocket may become a long-lived tunnel: like a TCP
        // connection, it is decided again on every policy change.
        let tracked = (upgrade == Upgrade::WebSocket).then(|| {
            let request = TrackedRequest {
                head: head.clone(),
                host: target.host.to_string(),
                path: target.path.to_string(),
                auth: authn.as_ref().ok().and_then(|a| a.auth.as_deref().cloned()),
            };
            let approved = ext.as_ref().map(|(x, _)| x.provider.clone());
            state.tcp_conns.track(&conn, Some(request), approved)
        });
        // Body bytes: from the client, to it.
        let mut sizes = (0, 0);
        let outcome = app
            .exchange(
                &conn,
                &mut io,
                &mut buf,
                &mut out,
                |out| {
                    codec::write_request(&head, &forward, &edits.drop, &edits.added, false, out);
                },
                (framing, tracked.as_ref().map(|(_, close)| &**close)),
                (head.method(), close, &to_client),
                &mut sizes,
            )
            .await;
        if let Some((id, _)) = tracked {
            state.tcp_conns.untrack(id);
        }
        let mut tunneled = None;
        let mut unreachable = None;
        // What the client may still send of the body when the connection
        // closes.
        let mut unread = h1::Unread::Nothing;
        let (status, flags) = match outcome {
            Exchange::Done {
                status,
                close: c,
                early,
            } => {
                close |= c;
                if early {
                    unread = h1::Unread::rest(framing);
                }
                (status, "-")
            }
            Exchange::Tunneled(t) => {
                close = true;
                let flags = t.flags;
                tunneled = Some(t);
                (101, flags)
            }
            Exchange::NoResponse(status, flags, body) => {
                close = true;
                sizes.1 = body.len() as u64;
                let _ = h1::reply(&mut io, status, body, true).await;
                unread = h1::Unread::rest(framing);
                (status, flags)
            }
            Exchange::Unreachable(why) => {
                close = true;
                let body = "upstream connect error";
                sizes.1 = body.len() as u64;
                let _ = h1::reply(&mut io, 503, body, true).await;
                unreachable = Some(why);
                (503, "UF")
            }
            Exchange::Aborted(status, flags) => {
                close = true;
                (status, flags)
            }
        };
        account(
            &state,
            &conn,
            &snap.identity,
            started,
            (
                status,
                flags,
                match (&tunneled, &unreachable) {
                    (Some(t), _) => Some(Ended::Tunnel(t)),
                    (None, Some(why)) => Some(Ended::Unreachable(why)),
                    (None, None) => None,
                },
                Counts::bytes(sizes.0, sizes.1),
            ),
            (decision.as_ref(), ext_allowed.as_deref()),
            line,
        );
        if close {
            h1::end_connection(&mut io, &mut buf, unread).await;
            return;
        }
    }
}

/// How one forwarded exchange ended.
enum Exchange {
    /// A WebSocket handshake was answered `101` and the tunnel it opened
    /// has ended; the downstream connection closes.
    Tunneled(h1::Tunneled),
    /// The response was forwarded; `close`: the downstream connection must
    /// close after it; `early`: it came before the request body had all
    /// gone (the rest was not read).
    Done {
        status: u16,
        close: bool,
        early: bool,
    },
    /// No response came: answer with this status, flags and body, then
    /// close.
    NoResponse(u16, &'static str, &'static str),
    /// The application could not be connected to (why): `503 UF`, close.
    Unreachable(String),
    /// The exchange broke after the response started (or while the request
    /// body was read): nothing more can be sent; close.
    Aborted(u16, &'static str),
}

/// The connection to the application of one downstream connection.
struct AppConn {
    stream: Option<TcpStream>,
    buf: BytesMut,
    /// The stream served an earlier request (it may have been closed by the
    /// application since).
    reused: bool,
    /// How long an upgraded connection may stay silent.
    idle_timeout: std::time::Duration,
}

impl AppConn {
    fn new(idle_timeout: std::time::Duration) -> AppConn {
        AppConn {
            stream: None,
            buf: BytesMut::new(),
            reused: false,
            idle_timeout,
        }
    }

    /// Forwards one request (head written by `write_head`, body framed by
    /// `framing`) and its response. A request without a body on a reused
    /// connection that the application had closed is retried once on a new
    /// connection. With `tunnel` (a WebSocket handshake, and the signal of
    /// a policy change that denies it), a `101` turns both connections
    /// into a tunnel, which ends them. `sizes` gets the body bytes
    /// forwarded each way (a tunnel's bytes, for a tunnel).
    #[allow(clippy::too_many_arguments)]
    async fn exchange<S>(
        &mut self,
        conn: &Conn,
        down: &mut S,
        down_buf: &mut BytesMut,
        out: &mut Vec<u8>,
        write_head: impl Fn(&mut Vec<u8>),
        (framing, tunnel): (Framing, Option<&tokio::sync::Notify>),
        (method, close_down, extra): (&str, bool, &[(&str, &[u8])]),
        sizes: &mut (u64, u64),
    ) -> Exchange
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let mut retried = false;
        let (resp, early) = loop {
            if self.stream.is_none() {
                match crate::connect::tcp(conn.app, conn.app_connect_timeout).await {
                    Ok(s) => {
                        self.stream = Some(s);
                        self.buf.clear();
                        self.reused = false;
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, app = %conn.app, "application unreachable");
                        return Exchange::Unreachable(format!(
                            "application at {} unreachable: {e}",
                            conn.app
                        ));
                    }
                }
            }
            let Some(up) = self.stream.as_mut() else {
                unreachable!("connected above")
            };
            out.clear();
            write_head(out);
            let can_retry = self.reused && !retried && framing == Framing::Empty;
            let upgrade = tunnel.is_some();
            let sent = h1::send(
                up,
                &mut self.buf,
                down,
                down_buf,
                (framing, upgrade),
                out,
                &mut sizes.0,
            );
            match sent.await {
                Sent::Response(resp) => break (resp, false),
                Sent::Early(resp) => break (resp, true),
                Sent::Lost(_) if can_retry => {
                    retried = true;
                    self.stream = None;
                }
                Sent::Lost(_) => {
                    self.stream = None;
                    return Exchange::NoResponse(503, "UC", h1::UPSTREAM_RESET);
                }
                Sent::Refused((status, flags, body)) => {
                    self.stream = None;
                    return Exchange::NoResponse(status, flags, body);
                }
                Sent::DownstreamBroke => {
                    self.stream = None;
                    return Exchange::Aborted(400, "DC");
                }
            }
        };
        let Some(up) = self.stream.as_mut() else {
            unreachable!("the response was read from it")
        };
        if let Some(revoked) = tunnel.filter(|_| resp.status() == 101) {
            let stop = async {
                revoked.notified().await;
                format!("{POLICY_CHANGED}: the new policy denies this WebSocket")
            };
            let ends = (self.idle_timeout, stop);
            let t = h1::tunnel(up, &mut self.buf, down, down_buf, &resp, ends, out).await;
            self.stream = None;
            *sizes = t.bytes;
            tracing::debug!(app = %conn.app, reason = %t.reason, bytes = ?t.bytes, "tunnel closed");
            return Exchange::Tunneled(t);
        }
        // After an early answer, neither connection can carry another
        // request: the body was cut short.
        let r = h1::relay(
            up,
            &mut self.buf,
            down,
            &resp,
            (method, close_down || early, extra),
            out,
        )
        .await;
        sizes.1 = r.bytes;
        self.reused = true;
        if !r.reusable || early {
            self.stream = None;
        }
        match r.flags {
            "-" => Exchange::Done {
                status: r.status,
                close: r.close,
                early,
            },
            flags => Exchange::Aborted(r.status, flags),
        }
    }
}

async fn serve_hyper<S>(state: Arc<State>, conn: Arc<Conn>, io: S)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let timeout = state.idle_timeout;
    let svc = move |req| handle(Arc::clone(&state), Arc::clone(&conn), req);
    if let Err(e) = serve_hyper_conn(io, timeout, svc).await {
        tracing::debug!(error = %e, "inbound HTTP connection ended with an error");
    }
}

/// Serves one connection through hyper (HTTP/1.x or HTTP/2, by what the
/// peer speaks), each request answered by `handle`; once no request has
/// been in flight for `idle_timeout`, the connection is shut down
/// gracefully (HTTP/2: GOAWAY).
pub async fn serve_hyper_conn<S, F, Fut>(
    io: S,
    idle_timeout: std::time::Duration,
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
    tokio::select! {
        r = served.as_mut() => r,
        () = streams.idle(idle_timeout) => {
            served.as_mut().graceful_shutdown();
            served.await
        }
    }
}

async fn handle(
    state: Arc<State>,
    conn: Arc<Conn>,
    mut req: HttpRequest<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let started = Instant::now();
    let snap = state.snapshot();
    // Request body bytes forwarded to the application.
    let request_bytes = Arc::new(BodyCount::default());
    let grpc = telemetry::is_grpc(req.headers().get(http::header::CONTENT_TYPE));
    let (host, path, method) = request_line(&req);
    // RequestAuthentication first, then authorization, as Envoy's
    // jwt_authn and RBAC filters run.
    let authn = snap.jwt.authenticate(&HeaderView(req.headers()), &path);
    let decision = authn.as_ref().ok().map(|a| {
        let headers = HeaderView(req.headers());
        let facts = conn.facts(Some(HttpAttributes {
            method: &method,
            path: &path,
            host: &host,
            headers: &headers,
            auth: a.auth.as_deref(),
        }));
        snap.policy.decide(&facts)
    });
    let allowed = decision.as_ref().is_some_and(Decision::is_allowed);

    let forward = snap.policy.forwarded_target(&path);
    // CUSTOM first: the external provider is asked before the DENY and
    // ALLOW policies count, as Istio orders them.
    let ext = match (
        &forward,
        decision.as_ref().and_then(|d| d.ext_authz.as_ref()),
    ) {
        (Ok(forwarded), Some(x)) => {
            let check = conn.ext_check(
                &snap.identity,
                Some(ext_authz::HttpCheck {
                    method: &method,
                    host: &host,
                    path: forwarded,
                    headers: req
                        .headers()
                        .iter()
                        .map(|(n, v)| (n.as_str(), v.as_bytes()))
                        .collect(),
                    protocol: if req.version() == Version::HTTP_2 {
                        "HTTP/2"
                    } else {
                        "HTTP/1.1"
                    },
                }),
            );
            let outcome = ext_authz::check(&conn.ext_authz, &snap, &x.provider, check).await;
            Some((x.clone(), outcome))
        }
        _ => None,
    };
    // Why the application could not be reached, for the access log.
    let mut unreachable = None;
    // An HTTP/1.x request refused here keeps its body unread, and hyper
    // closes such a connection after the answer: the kernel would reset
    // it as the body kept coming, destroying the answer. So the body is
    // read and discarded first, within the fast path's bounds. (HTTP/2
    // needs nothing: the answer ends the stream. A client that waits for
    // `100 Continue` has sent no body, and is not asked for it.)
    let refused =
        forward.is_err() || !allowed || ext.as_ref().is_some_and(|(_, o)| o.refusal().is_some());
    if refused
        && req.version() < Version::HTTP_2
        && !hyper::body::Body::is_end_stream(req.body())
        && !req
            .headers()
            .get(http::header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
    {
        discard_body(req.body_mut()).await;
    }
    let (resp, flags) = if let Err(e) = &forward {
        tracing::debug!(error = %e, "invalid request path");
        (full(StatusCode::BAD_REQUEST, "invalid request path"), "-")
    } else if let Err(r) = &authn {
        let mut resp = full(StatusCode::UNAUTHORIZED, r.message);
        if let Ok(v) = HeaderValue::from_str(&jwt::challenge(&host, &path)) {
            resp.headers_mut().insert(http::header::WWW_AUTHENTICATE, v);
        }
        (resp, "-")
    } else if let Some((status, headers, body)) = ext.as_ref().and_then(|(_, o)| o.refusal()) {
        let mut resp = Response::new(
            Full::new(Bytes::copy_from_slice(body))
                .map_err(|never| match never {})
                .boxed(),
        );
        *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::FORBIDDEN);
        for (n, v) in headers {
            resp.headers_mut().append(n.clone(), v.clone());
        }
        strip_hop_by_hop(resp.headers_mut());
        resp.headers_mut().remove(http::header::CONTENT_LENGTH);
        (resp, "UAEX")
    } else if !allowed {
        (full(StatusCode::FORBIDDEN, "RBAC: access denied"), "-")
    } else {
        if let Some((
            _,
            ext_authz::Outcome::Allow {
                remove,
                set,
                append,
                ..
            },
        )) = &ext
        {
            for n in remove {
                req.headers_mut().remove(n);
            }
            for (n, v) in set {
                req.headers_mut().insert(n.clone(), v.clone());
            }
            for (n, v) in append {
                req.headers_mut().append(n.clone(), v.clone());
            }
        }
        if let Ok(a) = &authn {
            for name in &a.remove {
                req.headers_mut().remove(name.as_str());
            }
            for (name, value) in &a.add {
                if let (Ok(n), Ok(v)) = (
                    http::HeaderName::from_bytes(name.as_bytes()),
                    HeaderValue::from_str(value),
                ) {
                    req.headers_mut().append(n, v);
                }
            }
        }
        // Replace whatever XFCC the caller sent with our own.
        req.headers_mut().remove(XFCC);
        strip_hop_by_hop(req.headers_mut());
        if conn.mtls
            && let Ok(v) = HeaderValue::from_str(&xfcc(&snap.identity, &conn))
        {
            req.headers_mut().insert(XFCC, v);
        }
        if !req.headers().contains_key(HOST)
            && let Ok(v) = HeaderValue::from_str(&host)
        {
            req.headers_mut().insert(HOST, v);
        }
        // The path the decision saw (see `forwarded_target`).
        let uri = format!("http://{}{}", conn.app, forward.as_deref().unwrap_or(&path));
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
        let req = req.map(|b| CountedBody::new(b, Arc::clone(&request_bytes), grpc).boxed());
        match client.request(req).await {
            Ok(mut resp) => {
                strip_hop_by_hop(resp.headers_mut());
                if let Some((_, ext_authz::Outcome::Allow { downstream, .. })) = &ext {
                    for (n, v) in downstream {
                        resp.headers_mut().append(n.clone(), v.clone());
                    }
                }
                (resp.map(|b| b.boxed()), "-")
            }
            Err(e) => {
                tracing::debug!(error = %e, app = %conn.app, "application unreachable");
                // hyper's own words say little ("client error (Connect)"):
                // the cause is what helps.
                let cause =
                    std::error::Error::source(&e).map_or_else(|| e.to_string(), |c| c.to_string());
                unreachable = Some(format!("application at {} unreachable: {cause}", conn.app));
                (
                    full(StatusCode::SERVICE_UNAVAILABLE, "upstream connect error"),
                    "UF",
                )
            }
        }
    };

    // Counted, timed and logged when the response body has gone, as
    // Envoy does at the end of the stream.
    let status = resp.status().as_u16();
    let rejected = authn.err();
    let (ext_refused, ext_allowed) = match ext {
        Some((x, o)) if !o.allows() => {
            let reason = o.reason(&x.provider);
            (Some((x, reason)), None)
        }
        Some((x, o)) => (None, Some(o.reason(&x.provider))),
        None => (None, None),
    };
    let finish = Box::new(move |counts| {
        let ended = match (&rejected, &ext_refused) {
            (Some(r), _) => Some(Ended::Unauthenticated(r)),
            (None, Some((x, reason))) => Some(Ended::ExtAuthz(x, reason)),
            (None, None) => unreachable.as_deref().map(Ended::Unreachable),
        };
        account(
            &state,
            &conn,
            &snap.identity,
            started,
            (status, flags, ended, counts),
            (decision.as_ref(), ext_allowed.as_deref()),
            [&method, &path, &host],
        );
    });
    Ok(resp.map(|body| CountedBody::recording(body, request_bytes, grpc, finish).boxed()))
}

/// Reads and throws away a request body, until it ends or one of the
/// bounds of [`h1::linger`] is reached.
async fn discard_body(body: &mut Incoming) {
    let until = tokio::time::Instant::now() + h1::LINGER_MAX_TIME;
    let mut discarded = 0u64;
    while discarded < h1::LINGER_MAX_BYTES {
        let quiet =
            h1::LINGER_QUIET.min(until.saturating_duration_since(tokio::time::Instant::now()));
        match tokio::time::timeout(quiet, body.frame()).await {
            Ok(Some(Ok(frame))) => {
                discarded += frame.data_ref().map_or(0, |d| d.len() as u64);
            }
            _ => return,
        }
    }
}

/// The header edits of a request the fast path forwards, when it has any:
/// names to remove and fields to add. RequestAuthentication's (tokens not
/// forwarded, output headers a client sent, then payload and claims) and
/// an allowing external provider's (its removals, its replacements, its
/// additions).
fn request_edits(
    authn: Option<&jwt::Authenticated>,
    ext: Option<&ext_authz::Outcome>,
) -> Option<HeaderEdits> {
    let jwt = authn.filter(|a| !a.remove.is_empty());
    let ext = match ext {
        Some(ext_authz::Outcome::Allow {
            remove,
            set,
            append,
            ..
        }) if !(remove.is_empty() && set.is_empty() && append.is_empty()) => {
            Some((remove, set, append))
        }
        _ => None,
    };
    if jwt.is_none() && ext.is_none() {
        return None;
    }
    let (mut remove, mut add) =
        jwt.map_or_else(Default::default, |a| (a.remove.clone(), a.add.clone()));
    if let Some((gone, set, append)) = ext {
        remove.extend(gone.iter().map(|n| n.as_str().to_string()));
        remove.extend(set.iter().map(|(n, _)| n.as_str().to_string()));
        for (n, v) in set.iter().chain(append) {
            if let Ok(v) = v.to_str() {
                add.push((n.as_str().to_string(), v.to_string()));
            }
        }
    }
    Some(HeaderEdits { remove, add })
}

/// Header names to remove from a request, and fields to add.
#[derive(Debug)]
struct HeaderEdits {
    remove: Vec<String>,
    add: Vec<(String, String)>,
}

/// What the access log must say of a request beyond its decision.
#[derive(Debug, Clone, Copy)]
enum Ended<'a> {
    /// The policy allowed it, the proxy refused it (the reason).
    Refused(&'static str),
    /// It opened a tunnel, which ended so: when a policy change closed
    /// it, a deny with that reason.
    Tunnel(&'a h1::Tunneled),
    /// RequestAuthentication refused its token (`401`); authorization
    /// never saw it.
    Unauthenticated(&'a jwt::Rejected),
    /// The external provider of a CUSTOM policy refused it (or could not
    /// be asked): the rule that asked, and what happened.
    ExtAuthz(&'a meshward_policy::ExtAuthzCheck, &'a str),
    /// Allowed, but the application could not be connected to (why).
    Unreachable(&'a str),
}

/// Records one inbound request: its metrics and, when enabled, its access
/// log line. `line` is the method, path and host; `ended`, what the
/// decision alone does not tell of how the request ended; `counts`, its
/// body bytes each way (a tunnel's bytes, for a tunnel) and, for gRPC, its
/// messages; `decided`, the
/// decision and the words of an external provider that let it through.
fn account(
    state: &State,
    conn: &Conn,
    own_identity: &str,
    started: Instant,
    (status, flags, ended, counts): (u16, &'static str, Option<Ended<'_>>, Counts),
    (decision, ext_allowed): (Option<&Decision>, Option<&str>),
    [method, path, host]: [&str; 3],
) {
    let protocol = counts.protocol();
    let handles = conn
        .handles
        .get_or_insert((0, protocol), status, flags, || {
            let mut labels = conn.labels(state, protocol);
            labels.response_code = status.to_string();
            labels.response_flags = flags.to_string();
            state.metrics.request_handles(&labels)
        });
    handles.record(started.elapsed(), counts);
    if !state.metrics.access().enabled() {
        return;
    }
    let mut record = conn.record(own_identity, "http", started, decision);
    (record.bytes_received, record.bytes_sent) = counts.bytes;
    record.method = Some(method.to_string());
    record.path = Some(path.to_string());
    record.authority = Some(host.to_string());
    record.response_code = Some(status);
    record.response_flags = flags;
    if let Some(words) = ext_allowed {
        record.reason = format!("{}; {words}", record.reason);
    }
    match ended {
        Some(Ended::Refused(reason)) => record.reason = reason.to_string(),
        Some(Ended::Tunnel(t)) if t.reason.starts_with(POLICY_CHANGED) => {
            record.decision = "deny";
            record.reason.clone_from(&t.reason);
        }
        Some(Ended::Unauthenticated(r)) => {
            record.decision = "deny";
            record.reason = format!("RequestAuthentication: {}", r.message);
            record.policy.clone_from(&r.policy);
            record.rule = None;
        }
        Some(Ended::ExtAuthz(x, reason)) => {
            record.decision = "deny";
            record.reason = reason.to_string();
            record.policy = Some(x.policy.policy.to_string());
            record.rule = Some(x.policy.rule);
        }
        Some(Ended::Unreachable(why)) => record.reason = format!("{}; {why}", record.reason),
        Some(Ended::Tunnel(_)) | None => {}
    }
    state.metrics.access().write(&record);
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
