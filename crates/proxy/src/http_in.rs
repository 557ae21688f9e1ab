//! The inbound HTTP path: HTTP/1.1 and HTTP/2 from the peer, each request
//! admitted by [`crate::admission`] (one verdict for both transports),
//! refused with the verdict's answer or forwarded to the application with
//! the verdict's header edits and the proxy's own
//! `x-forwarded-client-cert`. What is here is transport work only.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use http::header::{HOST, HeaderValue};
use http::{Request as HttpRequest, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use meshward_policy::Decision;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::Instrument;

use crate::admission::{self, Admitted, Conn, Refused, Reply, Verdict};
use crate::conns::TrackedRequest;
use crate::ext_authz;
use crate::flows::Event;
use crate::h1::codec::{RequestHead, Upgrade};
use crate::h1::{self, XFCC};
use crate::http::{Body, full, request_line, serve_hyper_conn, strip_hop_by_hop};
use crate::idle::IdleTimer;
use crate::outcome::{Flag, LocalFailure, Refusal, RequestEnd};
use crate::rewind::Rewind;
use crate::state::State;
use crate::telemetry::{self, BodyCount, CountedBody, Counts};

mod app;

use app::{AppConn, Exchange};

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

/// A request's span (inside its connection's, which has the addresses,
/// identities and TLS mode): admission records `decision`, `policy` and
/// `reason` on it. At `debug`, so that with the default filter it is
/// never built.
fn request_span(method: &str, path: &str) -> tracing::Span {
    tracing::debug_span!(
        "request",
        method,
        path,
        decision = tracing::field::Empty,
        policy = tracing::field::Empty,
        reason = tracing::field::Empty,
    )
}

/// The request header the access log reports as `request_id` (forwarded
/// unchanged, as Envoy forwards it).
pub(crate) const X_REQUEST_ID: &str = "x-request-id";

/// A request head's `x-request-id`, when it is text.
pub(crate) fn request_id(head: &RequestHead) -> Option<&str> {
    head.header(X_REQUEST_ID)
        .and_then(|v| std::str::from_utf8(v).ok())
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
    let mut idle = IdleTimer::new(state.idle_timeout);
    let drain = state.drain.clone();
    let mut session = H1Session {
        app: AppConn::new(state.idle_timeout, drain.clone()),
        out: Vec::with_capacity(1024),
        xfcc: None,
        state,
        conn,
    };
    loop {
        let peer = session.conn.peer;
        let Some(head) =
            h1::next_request_draining(&mut io, &mut buf, peer, &mut idle, &drain).await
        else {
            return;
        };
        let span = request_span(head.method(), head.target());
        let more = session.request(&mut io, &mut buf, head).instrument(span);
        if !more.await {
            return;
        }
    }
}

/// What one HTTP/1.x connection keeps from one request to the next.
struct H1Session {
    state: Arc<State>,
    conn: Arc<Conn>,
    app: AppConn,
    /// The buffer request heads are written into.
    out: Vec<u8>,
    /// The XFCC value, and the proxy identity it was made for.
    xfcc: Option<(String, String)>,
}

impl H1Session {
    /// Admits one request and forwards it, or answers the refusal. Returns
    /// whether the connection may carry another request.
    async fn request<S>(&mut self, io: &mut S, buf: &mut BytesMut, head: RequestHead) -> bool
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let started = Instant::now();
        let state = &*self.state;
        let conn = &*self.conn;
        let snap = state.snapshot();
        let framing = head.framing();
        let Ok(target) = h1::target(&head) else {
            h1::refuse(io, buf, 405, "method not allowed", framing).await;
            return false;
        };
        let line = [head.method(), &*target.path, target.host];
        let upgrade = head.upgrade();
        let headers = h1::HeaderView(&head);
        let request = admission::HttpRequest {
            method: head.method(),
            path: &target.path,
            host: target.host,
            headers: &headers,
            protocol: "HTTP/1.1",
            unsupported_upgrade: upgrade == Upgrade::Unsupported,
        };
        // A request whose body is not read cannot be followed by another;
        // a draining proxy closes every connection after its response.
        let mut close = !head.keep_alive() || state.drain.is_draining();
        let admitted = match admission::admit_http(&snap, conn, &request).await {
            Verdict::Admitted(a) => a,
            Verdict::Refused(Refused {
                outcome,
                reply,
                decision,
                ext_allowed,
            }) => {
                close |= h1::has_body(framing);
                let status = outcome.status();
                let (sent, sent_bytes) = match &reply {
                    Reply::Provider { fields, body } => {
                        let fields = ext_authz::field_refs(fields);
                        let sent = h1::reply_fields(io, status, &fields, body, close).await;
                        (sent, body.len())
                    }
                    Reply::Local { body, challenge } => {
                        let sent = match challenge {
                            Some(c) => {
                                let fields = [("www-authenticate", c.as_str())];
                                h1::reply_with(io, status, body, &fields, close).await
                            }
                            None => h1::reply(io, status, body, close).await,
                        };
                        (sent, body.len())
                    }
                };
                account(
                    state,
                    conn,
                    &snap.identity,
                    started,
                    (
                        status,
                        &RequestEnd::Refused(outcome),
                        Counts::bytes(0, sent_bytes as u64),
                    ),
                    (decision.as_ref(), ext_allowed.as_deref()),
                    line,
                    request_id(&head),
                );
                if sent.is_err() {
                    return false;
                }
                if close {
                    // The body was never read: it is discarded before the
                    // connection closes, so the refusal reaches the client.
                    h1::end_connection(io, buf, h1::Unread::all(framing)).await;
                    return false;
                }
                return true;
            }
        };
        let Admitted {
            decision,
            forward,
            auth,
            edits,
            ext,
        } = admitted;
        if h1::answer_continue(io, &head).await.is_err() {
            return false;
        }
        if self
            .xfcc
            .as_ref()
            .is_none_or(|(by, _)| *by != snap.identity)
        {
            self.xfcc = Some((snap.identity.clone(), xfcc(&snap.identity, conn)));
        }
        let xfcc = self
            .xfcc
            .as_ref()
            .filter(|_| conn.mtls)
            .map(|(_, value)| value.as_bytes());
        let rewrite = h1::Rewrite::new(&head, &target, xfcc, upgrade);
        let edits = match &edits {
            Some(e) => rewrite.with(&e.remove, &e.add),
            None => rewrite.edits(),
        };
        let to_client = ext
            .as_ref()
            .map_or_else(Vec::new, |x| ext_authz::field_refs(&x.downstream));
        // A WebSocket may become a long-lived tunnel: like a TCP
        // connection, it is decided again on every policy change.
        let tracked = (upgrade == Upgrade::WebSocket).then(|| {
            let request = TrackedRequest {
                head: head.clone(),
                host: target.host.to_string(),
                path: target.path.to_string(),
                auth: auth.as_deref().cloned(),
            };
            let approved = ext.as_ref().map(|x| x.provider.clone());
            state.tcp_conns.track(conn, Some(request), approved)
        });
        // Body bytes: from the client, to it.
        let mut sizes = (0, 0);
        let outcome = self
            .app
            .exchange(
                conn,
                io,
                buf,
                &mut self.out,
                |out| {
                    h1::codec::write_request(
                        &head,
                        &forward,
                        &edits.drop,
                        &edits.added,
                        false,
                        out,
                    );
                },
                (framing, tracked.as_ref().map(|(_, close)| &**close)),
                (head.method(), close, &to_client),
                &mut sizes,
            )
            .await;
        if let Some((id, _)) = tracked {
            state.tcp_conns.untrack(id);
        }
        // What the client may still send of the body when the connection
        // closes.
        let mut unread = h1::Unread::Nothing;
        let (status, end) = match outcome {
            Exchange::Done {
                status,
                close: c,
                early,
            } => {
                close |= c;
                if early {
                    unread = h1::Unread::rest(framing);
                }
                (status, RequestEnd::Exchanged(Flag::None))
            }
            Exchange::Tunneled(t) => {
                close = true;
                let flag = t.flags;
                let reason = t.reason;
                (101, RequestEnd::Tunnel { flag, reason })
            }
            Exchange::NoResponse(status, flag, body) => {
                close = true;
                sizes.1 = body.len() as u64;
                let _ = h1::reply(io, status, body, true).await;
                unread = h1::Unread::rest(framing);
                (status, RequestEnd::Exchanged(flag))
            }
            Exchange::Unreachable(why) => {
                close = true;
                let failure = LocalFailure::ConnectFailed;
                sizes.1 = failure.body().len() as u64;
                let _ = h1::reply(io, failure.status(), failure.body(), true).await;
                (failure.status(), RequestEnd::Unreachable(why))
            }
            Exchange::Aborted(status, flag) => {
                close = true;
                (status, RequestEnd::Exchanged(flag))
            }
        };
        account(
            state,
            conn,
            &snap.identity,
            started,
            (status, &end, Counts::bytes(sizes.0, sizes.1)),
            (Some(&decision), ext.as_ref().map(|x| x.words.as_str())),
            line,
            request_id(&head),
        );
        if close || state.drain.is_draining() {
            h1::end_connection(io, buf, unread).await;
            return false;
        }
        true
    }
}

async fn serve_hyper<S>(state: Arc<State>, conn: Arc<Conn>, io: S)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let timeout = state.idle_timeout;
    let drain = state.drain.clone();
    let svc = move |req: HttpRequest<Incoming>| {
        let span = request_span(req.method().as_str(), req.uri().path());
        handle(Arc::clone(&state), Arc::clone(&conn), req).instrument(span)
    };
    if let Err(e) = serve_hyper_conn(io, (timeout, &drain), svc).await {
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
    // Request body bytes forwarded to the application.
    let request_bytes = Arc::new(BodyCount::default());
    let grpc = telemetry::is_grpc(req.headers().get(http::header::CONTENT_TYPE));
    let (host, path, method) = request_line(&req);
    let request_id = req
        .headers()
        .get(X_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let headers = crate::http::HeaderView(req.headers());
    let request = admission::HttpRequest {
        method: &method,
        path: &path,
        host: &host,
        headers: &headers,
        protocol: if req.version() == Version::HTTP_2 {
            "HTTP/2"
        } else {
            "HTTP/1.1"
        },
        // hyper carries upgrades as it does any request.
        unsupported_upgrade: false,
    };
    let verdict = admission::admit_http(&snap, &conn, &request).await;
    let (resp, end, decision, ext_words) = match verdict {
        Verdict::Refused(refused) => {
            let resp = refusal(&mut req, refused.outcome.status(), refused.reply).await;
            let end = RequestEnd::Refused(refused.outcome);
            (resp, end, refused.decision, refused.ext_allowed)
        }
        Verdict::Admitted(Admitted {
            decision,
            forward,
            edits,
            ext,
            ..
        }) => {
            if let Some(e) = &edits {
                // As the HTTP/1.1 path applies them: names removed from
                // the request as received, then fields added.
                for name in &e.remove {
                    req.headers_mut().remove(name.as_str());
                }
                for (name, value) in &e.add {
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
            let uri = format!("http://{}{forward}", conn.app);
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
            let (resp, end) = match client.request(req).await {
                Ok(mut resp) => {
                    strip_hop_by_hop(resp.headers_mut());
                    if let Some(x) = &ext {
                        for (n, v) in &x.downstream {
                            resp.headers_mut().append(n.clone(), v.clone());
                        }
                    }
                    (resp.map(|b| b.boxed()), RequestEnd::Exchanged(Flag::None))
                }
                Err(e) => {
                    tracing::debug!(error = %e, app = %conn.app, "application unreachable");
                    // hyper's own words say little ("client error
                    // (Connect)"): the cause is what helps.
                    let cause = std::error::Error::source(&e)
                        .map_or_else(|| e.to_string(), |c| c.to_string());
                    let why = format!("application at {} unreachable: {cause}", conn.app);
                    let failure = LocalFailure::ConnectFailed;
                    let status = StatusCode::from_u16(failure.status())
                        .unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
                    (full(status, failure.body()), RequestEnd::Unreachable(why))
                }
            };
            (resp, end, Some(decision), ext.map(|x| x.words))
        }
    };

    // Counted, timed and logged when the response body has gone, as
    // Envoy does at the end of the stream.
    let status = resp.status().as_u16();
    let finish = Box::new(move |counts| {
        account(
            &state,
            &conn,
            &snap.identity,
            started,
            (status, &end, counts),
            (decision.as_ref(), ext_words.as_deref()),
            [&method, &path, &host],
            request_id.as_deref(),
        );
    });
    Ok(resp.map(|body| CountedBody::recording(body, request_bytes, grpc, finish).boxed()))
}

/// The answer to a request admission refused (`status`, `reply`).
async fn refusal(req: &mut HttpRequest<Incoming>, status: u16, reply: Reply) -> Response<Body> {
    // An HTTP/1.x request refused here keeps its body unread, and hyper
    // closes such a connection after the answer: the kernel would reset it
    // as the body kept coming, destroying the answer. So the body is read
    // and discarded first, within the fast path's bounds. (HTTP/2 needs
    // nothing: the answer ends the stream. A client that waits for `100
    // Continue` has sent no body, and is not asked for it.)
    if req.version() < Version::HTTP_2
        && !hyper::body::Body::is_end_stream(req.body())
        && !req
            .headers()
            .get(http::header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
    {
        discard_body(req.body_mut()).await;
    }
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::FORBIDDEN);
    match reply {
        Reply::Local { body, challenge } => {
            let mut resp = full(status, body);
            if let Some(c) = challenge
                && let Ok(v) = HeaderValue::from_str(&c)
            {
                resp.headers_mut().insert(http::header::WWW_AUTHENTICATE, v);
            }
            resp
        }
        Reply::Provider { fields, body } => {
            let mut resp = Response::new(Full::new(body).map_err(|never| match never {}).boxed());
            *resp.status_mut() = status;
            for (n, v) in fields {
                resp.headers_mut().append(n, v);
            }
            strip_hop_by_hop(resp.headers_mut());
            resp.headers_mut().remove(http::header::CONTENT_LENGTH);
            resp
        }
    }
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

/// Records one inbound request: its metrics and, when enabled, its access
/// log line. `line` is the method, path and host; `end`, how it ended
/// (its flag, and what the access log says beyond the decision);
/// `counts`, its body bytes each way (a tunnel's bytes, for a tunnel)
/// and, for gRPC, its messages; `decided`, the decision and the words of
/// an external provider that let it through; `request_id`, its
/// `x-request-id`.
#[allow(clippy::too_many_arguments)]
fn account(
    state: &State,
    conn: &Conn,
    own_identity: &str,
    started: Instant,
    (status, end, counts): (u16, &RequestEnd, Counts),
    (decision, ext_allowed): (Option<&Decision>, Option<&str>),
    [method, path, host]: [&str; 3],
    request_id: Option<&str>,
) {
    let protocol = counts.protocol();
    let flag = end.flag();
    let handles = conn
        .handles
        .get_or_insert((0, protocol), status, flag.as_str(), || {
            let mut labels = conn.labels(state, protocol);
            labels.response_code = status.to_string();
            labels.response_flags = flag.as_str().to_string();
            state.metrics.request_handles(&labels)
        });
    // The flow first: what the metrics show is in the flow table then.
    if let Some(flow) = &conn.flow {
        flow.count(Event::Request);
        if let RequestEnd::Refused(
            Refusal::Rbac | Refusal::ExtAuthz { .. } | Refusal::Unauthenticated { .. },
        ) = end
        {
            flow.count(Event::Denied);
        }
    }
    handles.record(started.elapsed(), counts);
    if !state.metrics.access().enabled() {
        return;
    }
    let mut record = conn.record(own_identity, "http", started, decision);
    (record.bytes_received, record.bytes_sent) = counts.bytes;
    record.method = Some(method.to_string());
    record.path = Some(path.to_string());
    record.authority = Some(host.to_string());
    record.request_id = request_id.map(str::to_string);
    record.response_code = Some(status);
    if let Some(words) = ext_allowed {
        record.reason = format!("{}; {words}", record.reason);
    }
    end.log(&mut record);
    state.metrics.access().write(&record);
}
