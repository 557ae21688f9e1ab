//! Inbound: one listener per workload port. Each connection is classified
//! from its first bytes (TLS or plaintext), held to the port's effective
//! PeerAuthentication mode, and handed to the HTTP or TCP path.
//!
//! | mode       | mesh mTLS           | other TLS    | plaintext |
//! |------------|---------------------|--------------|-----------|
//! | STRICT     | terminate, identify | terminate (fails without a mesh certificate) | refuse |
//! | PERMISSIVE | terminate, identify | pass through as TCP | accept |
//! | DISABLE    | pass through as TCP | pass through as TCP | accept |
//!
//! Mesh mTLS is recognised as Istio does, by the `istio*` ALPN values
//! sidecars offer. Every refusal is logged with its reason; nothing is
//! forwarded before the decision allows it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshward_config::model::security::MtlsMode;
use meshward_policy::Decision;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tracing::Instrument;

use crate::admission::{self, TcpVerdict};
use crate::flows::{Event, FlowKey};
use crate::idle::{Activity, Counted};
use crate::outbound::Outbound;
use crate::outcome::{Close, ConnRefusal, TcpEnd};
use crate::rewind::{Rewind, read_client_hello};
use crate::snapshot::Protocol;
use crate::state::State;

pub use crate::admission::Conn;

/// How long a client may take to send its first bytes or finish the TLS
/// handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts connections on one workload port until the listener is closed
/// (a configuration that no longer has the port, or a drain).
pub async fn serve(state: Arc<State>, outbound: Arc<Outbound>, port: u16, listener: TcpListener) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(port, error = %e, "accept failed");
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let conn = handle(
            Arc::clone(&state),
            Arc::clone(&outbound),
            port,
            stream,
            peer,
        );
        spawn_connection(&state, peer, conn);
    }
}

/// Runs one inbound connection's task, counted by the drain from the
/// accept on, in its span.
fn spawn_connection(
    state: &State,
    peer: SocketAddr,
    conn: impl std::future::Future<Output = ()> + Send + 'static,
) {
    // At `debug`, so that with the default filter it is never built.
    let span = tracing::debug_span!(
        "inbound",
        src.addr = %peer,
        src.identity = tracing::field::Empty,
        dst.addr = tracing::field::Empty,
        dst.identity = tracing::field::Empty,
        tls.mode = tracing::field::Empty,
        policy = tracing::field::Empty,
        decision = tracing::field::Empty,
        reason = tracing::field::Empty,
    );
    let guard = state.drain.guard();
    tokio::spawn(guard.run(conn).instrument(span));
}

/// Accepts the connections the capture rules redirect to the inbound
/// capture port (15006) until the listener is closed: each is handled as
/// if it had come to its original destination's port, which selects the
/// workload port, its mTLS mode and its policies. A port the workload
/// does not declare is served as opaque TCP to the application at the
/// original destination under the workload's mTLS mode and policies (as
/// Istio's inbound passthrough).
pub async fn serve_captured(state: Arc<State>, outbound: Arc<Outbound>, listener: TcpListener) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "inbound capture accept failed");
                continue;
            }
        };
        // The listener is dual-stack: an IPv4 client is an IPv4-mapped
        // address, named as IPv4 (peers, logs, policies' ipBlocks).
        let peer = std::net::SocketAddr::new(peer.ip().to_canonical(), peer.port());
        let orig = match crate::capture::original_dst(&stream) {
            Ok(orig) if !crate::capture::is_own_listener(&state, orig) => orig,
            Ok(orig) => {
                tracing::warn!(peer = %peer, destination = %orig, "inbound capture: a connection to the proxy's own listener (a capture loop, or a client dialing 15006); closed");
                continue;
            }
            Err(e) => {
                tracing::warn!(peer = %peer, error = %e, "inbound capture: not a redirected connection (no original destination); closed");
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let conn = handle_at(
            Arc::clone(&state),
            Arc::clone(&outbound),
            orig,
            stream,
            peer,
        );
        spawn_connection(&state, peer, conn);
    }
}

async fn handle(
    state: Arc<State>,
    outbound: Arc<Outbound>,
    port: u16,
    stream: TcpStream,
    peer: SocketAddr,
) {
    let local = stream
        .local_addr()
        .unwrap_or(SocketAddr::from(([0, 0, 0, 0], port)));
    let info = state.snapshot().inbound_port(port).cloned();
    let Some(info) = info else {
        tracing::warn!(
            port,
            "connection on a port the configuration no longer has; closing"
        );
        return;
    };
    serve_conn(state, outbound, (info, local), stream, peer).await;
}

/// A captured connection whose original destination is `orig`.
async fn handle_at(
    state: Arc<State>,
    outbound: Arc<Outbound>,
    orig: SocketAddr,
    stream: TcpStream,
    peer: SocketAddr,
) {
    let info = state
        .snapshot()
        .inbound_port(orig.port())
        .cloned()
        .unwrap_or_else(|| crate::snapshot::InboundPort::passthrough(orig));
    serve_conn(state, outbound, (info, orig), stream, peer).await;
}

/// Serves a connection to workload port `info` at `local` (the address
/// the client dialed).
async fn serve_conn(
    state: Arc<State>,
    outbound: Arc<Outbound>,
    (info, local): (crate::snapshot::InboundPort, SocketAddr),
    stream: TcpStream,
    peer: SocketAddr,
) {
    let started = Instant::now();
    let port = info.port;
    let snap = state.snapshot();
    let mode = snap.policy.mtls(port).mode;
    let app_connect_timeout = snap.app_connect_timeout;
    if let Some(span) = crate::telemetry::current_span() {
        span.record("dst.addr", tracing::field::display(local));
        span.record("dst.identity", snap.identity.as_str());
    }
    // Plaintext peers are known by their address; an mTLS peer is
    // resolved again once its identity is known.
    let source = snap.peers.resolve(None, peer.ip());
    drop(snap);
    let mut conn = Conn {
        peer,
        local,
        port,
        app: info.app,
        app_h2: info.app_h2,
        app_connect_timeout,
        identity: None,
        cert_hash: None,
        sni: None,
        mtls: false,
        source,
        flow: None,
        handles: Default::default(),
        ext_authz: outbound,
    };
    if let Some(span) = crate::telemetry::current_span() {
        span.record("tls.mode", conn.tls_mode());
    }

    let mut first = [0u8; 1];
    let is_tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, stream.peek(&mut first)).await {
        Ok(Ok(0)) | Ok(Err(_)) => return,
        Ok(Ok(_)) => first[0] == 0x16,
        // Nothing sent: a server-first protocol. Only plaintext can be that.
        Err(_) => false,
    };

    if !is_tls {
        if mode == MtlsMode::Strict {
            refuse(
                &state,
                &conn,
                started,
                ConnRefusal::PlaintextRejected,
                format!("plaintext connection refused: mTLS mode STRICT on port {port}"),
            );
            return;
        }
        return dispatch(state, conn, info.protocol, stream, started).await;
    }
    if mode == MtlsMode::Disable {
        // DISABLE: TLS bytes pass through untouched, after the
        // connection-level decision (which sees no peer identity).
        return tcp(state, conn, stream, started).await;
    }

    let mut stream = stream;
    let hello = match tokio::time::timeout(HANDSHAKE_TIMEOUT, read_client_hello(&mut stream)).await
    {
        Ok(Ok(hello)) => hello,
        Ok(Err(e)) => {
            refuse(
                &state,
                &conn,
                started,
                ConnRefusal::TlsError,
                format!("invalid TLS ClientHello: {e}"),
            );
            return;
        }
        Err(_) => {
            refuse(
                &state,
                &conn,
                started,
                ConnRefusal::TlsTimeout,
                "TLS ClientHello timed out".to_string(),
            );
            return;
        }
    };
    conn.sni = hello.sni.clone();
    let stream = Rewind::new(hello.bytes, stream);
    if mode == MtlsMode::Permissive && !hello.mesh_alpn {
        // TLS that is not mesh mTLS (the application's own TLS): passed
        // through untouched in PERMISSIVE mode, as Istio does.
        return tcp(state, conn, stream, started).await;
    }
    let tls = state.tls();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::clone(&tls.server));
    let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            let reason = match e
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            {
                Some(rustls_err) => match meshward_identity::verify::svid_error_of(rustls_err) {
                    Some(svid) => format!("peer certificate rejected: {svid}"),
                    None => format!("TLS handshake failed: {rustls_err}"),
                },
                None => format!("TLS handshake failed: {e}"),
            };
            refuse(
                &state,
                &conn,
                started,
                ConnRefusal::TlsHandshakeFailed,
                reason,
            );
            return;
        }
        Err(_) => {
            refuse(
                &state,
                &conn,
                started,
                ConnRefusal::TlsTimeout,
                "TLS handshake timed out".to_string(),
            );
            return;
        }
    };
    let (_, session) = stream.get_ref();
    let certs = session.peer_certificates();
    match meshward_identity::peer_identity(certs) {
        Ok(id) => conn.identity = Some(id.to_string()),
        Err(e) => {
            refuse(
                &state,
                &conn,
                started,
                ConnRefusal::NoPeerIdentity,
                format!("peer presented no usable SVID: {e}"),
            );
            return;
        }
    }
    conn.cert_hash = certs.and_then(|c| c.first()).map(|leaf| {
        hex::encode(aws_lc_rs::digest::digest(
            &aws_lc_rs::digest::SHA256,
            leaf.as_ref(),
        ))
    });
    conn.mtls = true;
    conn.source = state
        .snapshot()
        .peers
        .resolve(conn.identity.as_deref(), conn.peer.ip());
    if let Some(span) = crate::telemetry::current_span() {
        span.record("src.identity", conn.identity.as_deref());
        span.record("tls.mode", conn.tls_mode());
    }
    dispatch(state, conn, info.protocol, stream, started).await;
}

async fn dispatch<S>(state: Arc<State>, mut conn: Conn, protocol: Protocol, io: S, started: Instant)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    match protocol {
        Protocol::Http => {
            conn.flow = state.flows.open(flow_key(&conn, "http"), Event::Connection);
            crate::http_in::serve(state, Arc::new(conn), io).await
        }
        Protocol::Tcp => tcp(state, conn, io, started).await,
    }
}

/// The TCP path: one admission per connection ([`admission::admit_tcp`]),
/// then bytes both ways until either side is done, the idle timeout, or a
/// policy change that denies the connection.
async fn tcp<S>(state: Arc<State>, mut conn: Conn, io: S, started: Instant)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    conn.flow = state.flows.open(flow_key(&conn, "tcp"), Event::Connection);
    let snap = state.snapshot();
    let verdict = admission::admit_tcp(&snap, &conn).await;
    drop(snap);
    let mut labels = conn.labels(&state, "tcp");
    let (decision, ext) = match verdict {
        TcpVerdict::Admitted { decision, ext } => (decision, ext),
        TcpVerdict::Refused {
            decision,
            outcome,
            ext_allowed,
        } => {
            // Refused by the provider (flag UAEX), or by policy (no flag:
            // Envoy's network RBAC filter sets none).
            labels.response_flags = outcome.flag().as_str().to_string();
            if let Some(flow) = &conn.flow {
                flow.count(Event::Denied);
            }
            state.metrics.tcp_opened(&labels);
            state.metrics.tcp_closed(&labels, 0, 0);
            log_tcp(&state, &conn, &decision, started, (0, 0), |record| {
                append_words(record, ext_allowed.as_deref());
                record.response_flags = outcome.flag().as_str();
                outcome.log(record);
            });
            return;
        }
    };
    let (approved, ext_allowed) = ext.unzip();
    state.metrics.tcp_opened(&labels);
    let (id, close) = state.tcp_conns.track(&conn, None, approved);
    let (sent, received, end) = match crate::connect::app(conn.app, conn.app_connect_timeout).await
    {
        Ok(app) => {
            let activity = Activity::new();
            let mut peer = Counted::new(io, &activity);
            let mut app = Counted::new(app, &activity);
            let end = tokio::select! {
                r = tokio::io::copy_bidirectional(&mut peer, &mut app) => match r {
                    Ok(_) => TcpEnd::Done,
                    Err(e) => TcpEnd::Failed(format!("connection error: {e}")),
                },
                () = close.notified() => {
                    TcpEnd::Closed(Close::PolicyChanged, Close::policy_changed("connection"))
                }
                () = activity.idle(state.idle_timeout) => {
                    TcpEnd::Closed(Close::IdleTimeout, Close::idle(state.idle_timeout))
                }
            };
            (app.bytes_read(), peer.bytes_read(), end)
        }
        Err(e) => (
            0,
            0,
            TcpEnd::Failed(format!("application at {} unreachable: {e}", conn.app)),
        ),
    };
    state.tcp_conns.untrack(id);
    labels.response_flags = end.flag().as_str().to_string();
    state.metrics.tcp_closed(&labels, sent, received);
    log_tcp(
        &state,
        &conn,
        &decision,
        started,
        (sent, received),
        |record| {
            // An error says what happened; the provider's words only a clean
            // end.
            if end == TcpEnd::Done {
                append_words(record, ext_allowed.as_deref());
            }
            end.log(record);
        },
    );
}

/// Adds what an allowing external provider said to a logged reason.
fn append_words(record: &mut crate::telemetry::AccessRecord, words: Option<&str>) {
    if let Some(words) = words {
        record.reason = format!("{}; {words}", record.reason);
    }
}

/// Writes the access log line of a TCP connection: the decision's fields,
/// then what `end` sets.
fn log_tcp(
    state: &State,
    conn: &Conn,
    d: &Decision,
    started: Instant,
    (sent, received): (u64, u64),
    end: impl FnOnce(&mut crate::telemetry::AccessRecord),
) {
    if !state.metrics.access().enabled() {
        return;
    }
    let snap = state.snapshot();
    let mut record = conn.record(&snap.identity, "tcp", started, Some(d));
    end(&mut record);
    record.bytes_sent = sent;
    record.bytes_received = received;
    state.metrics.access().write(&record);
}

/// Logs a connection refused before any decision could be made.
fn refuse(state: &State, conn: &Conn, started: Instant, why: ConnRefusal, explanation: String) {
    if let Some(span) = crate::telemetry::current_span() {
        span.record("decision", crate::outcome::Decision::Deny.as_str());
        span.record("reason", why.as_str());
    }
    let snap = state.snapshot();
    if why == ConnRefusal::PlaintextRejected {
        let protocol = match snap.inbound_port(conn.port).map(|p| p.protocol) {
            Some(Protocol::Http) => "http",
            _ => "tcp",
        };
        state.flows.open(flow_key(conn, protocol), Event::Refused);
    }
    let mut labels = conn.labels(state, "tcp");
    labels.response_flags = why.flag().as_str().to_string();
    state.metrics.tcp_opened(&labels);
    state.metrics.tcp_closed(&labels, 0, 0);
    let mut record = conn.record(&snap.identity, "connection", started, None);
    record.response_flags = why.flag().as_str();
    record.reason = why.as_str().to_string();
    record.explanation = explanation;
    state.metrics.access().write(&record);
}

/// The flow-table key of `conn` ([`crate::flows`]) as `protocol`.
fn flow_key(conn: &Conn, protocol: &'static str) -> FlowKey {
    FlowKey {
        workload: conn
            .source
            .as_ref()
            .map(|m| (m.namespace.clone(), m.name.clone())),
        principal: conn.identity.clone(),
        address: conn.peer.ip(),
        port: conn.port,
        protocol,
        security: conn.tls_mode(),
    }
}
