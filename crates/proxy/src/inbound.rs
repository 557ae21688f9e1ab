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

use crate::idle::{Activity, Counted, IDLE_TIMEOUT, idle_reason};
use crate::rewind::{Rewind, read_client_hello};
use meshward_config::model::security::MtlsMode;
use meshward_policy::{Decision, Request};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};

use crate::ext_authz;
use crate::outbound::Outbound;
use crate::snapshot::Protocol;
use crate::state::State;
use crate::telemetry::{AccessRecord, TrafficLabels, now_rfc3339, principal_parts};

/// How long a client may take to send its first bytes or finish the TLS
/// handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Facts about one accepted inbound connection.
#[derive(Debug)]
pub struct Conn {
    pub peer: SocketAddr,
    pub local: SocketAddr,
    pub port: u16,
    pub app: SocketAddr,
    /// The application speaks cleartext HTTP/2 on this port (gRPC).
    pub app_h2: bool,
    /// How long connecting to the application may take
    /// (`meshConfig.connectTimeout`).
    pub app_connect_timeout: Duration,
    /// `spiffe://...` of the mTLS peer.
    pub identity: Option<String>,
    /// SHA-256 of the peer's leaf certificate, hex (for XFCC).
    pub cert_hash: Option<String>,
    pub sni: Option<String>,
    pub mtls: bool,
    /// Request metric handles of this connection, by response code.
    pub handles: crate::telemetry::HandleCache,
    /// The outbound side, through which the external authorization
    /// checks of this connection and its requests reach their provider.
    pub ext_authz: Arc<Outbound>,
}

impl Conn {
    /// An access record of this connection (reporter destination), with the
    /// decision's fields when there is one, and a deny otherwise.
    pub fn record(
        &self,
        own_identity: &str,
        kind: &'static str,
        started: Instant,
        d: Option<&Decision>,
    ) -> AccessRecord {
        let (decision, reason) = d.map_or(("deny", String::new()), decision_words);
        AccessRecord {
            time: now_rfc3339(),
            kind,
            reporter: "destination",
            src_addr: self.peer.to_string(),
            src_identity: self.identity.clone(),
            dst_addr: self.local.to_string(),
            dst_service: None,
            dst_identity: Some(own_identity.to_string()),
            tls_mode: if self.mtls { "mutual_tls" } else { "none" },
            method: None,
            path: None,
            authority: None,
            response_code: None,
            response_flags: "-",
            decision,
            reason,
            policy: d
                .and_then(|d| d.decided_by.as_ref())
                .map(|r| r.policy.to_string()),
            rule: d.and_then(|d| d.decided_by.as_ref()).map(|r| r.rule),
            explanation: d.map(ToString::to_string).unwrap_or_default(),
            duration_ms: started.elapsed().as_secs_f64() * 1000.0,
            bytes_sent: 0,
            bytes_received: 0,
        }
    }

    /// The facts a decision about this connection (and, for HTTP, one of
    /// its requests) is made on. No forwarded client address is trusted.
    pub fn facts<'a>(&'a self, http: Option<meshward_policy::HttpAttributes<'a>>) -> Request<'a> {
        Request {
            principal: self.principal(),
            source_ip: self.peer.ip(),
            remote_ip: None,
            destination_ip: Some(self.local.ip()),
            port: self.port,
            sni: self.sni.as_deref(),
            http,
        }
    }

    /// The external authorization check of this connection (`http`: of one
    /// of its requests) to this workload, `own_identity`.
    pub fn ext_check<'a>(
        &'a self,
        own_identity: &'a str,
        http: Option<ext_authz::HttpCheck<'a>>,
    ) -> ext_authz::Check<'a> {
        ext_authz::Check {
            http,
            source: (self.peer, self.identity.as_deref()),
            destination: (self.local, own_identity),
        }
    }

    /// The principal as policies spell it (no `spiffe://`).
    pub fn principal(&self) -> Option<&str> {
        self.identity
            .as_deref()
            .map(|i| i.strip_prefix("spiffe://").unwrap_or(i))
    }

    /// Labels for this connection (reporter destination); the response code
    /// and protocol are filled in per request.
    pub fn labels(&self, state: &State, protocol: &'static str) -> TrafficLabels {
        let snap = state.snapshot();
        let (src_ns, src_sa) = match &self.identity {
            Some(id) => principal_parts(id),
            None => ("unknown".to_string(), "unknown".to_string()),
        };
        let _ = src_sa;
        let name = snap
            .workload_name
            .split('/')
            .nth(1)
            .unwrap_or_default()
            .to_string();
        TrafficLabels {
            reporter: "destination",
            source_workload: "unknown".to_string(),
            source_workload_namespace: src_ns,
            source_principal: self
                .identity
                .clone()
                .unwrap_or_else(|| "unknown".to_string()),
            destination_workload: name.clone(),
            destination_workload_namespace: snap.workload.namespace.clone(),
            destination_principal: snap.identity.clone(),
            destination_service: "unknown".to_string(),
            destination_service_name: name,
            destination_service_namespace: snap.workload.namespace.clone(),
            request_protocol: protocol,
            response_code: String::new(),
            response_flags: "-".to_string(),
            connection_security_policy: TrafficLabels::security(self.mtls),
        }
    }
}

/// Accepts connections on one workload port until the listener fails.
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
        let state = Arc::clone(&state);
        let outbound = Arc::clone(&outbound);
        tokio::spawn(async move {
            handle(state, outbound, port, stream, peer).await;
        });
    }
}

async fn handle(
    state: Arc<State>,
    outbound: Arc<Outbound>,
    port: u16,
    stream: TcpStream,
    peer: SocketAddr,
) {
    let started = Instant::now();
    let snap = state.snapshot();
    let Some(info) = snap.inbound_port(port).cloned() else {
        tracing::warn!(
            port,
            "connection on a port the configuration no longer has; closing"
        );
        return;
    };
    let local = stream
        .local_addr()
        .unwrap_or(SocketAddr::from(([0, 0, 0, 0], port)));
    let mode = snap.policy.mtls(port).mode;
    let app_connect_timeout = snap.app_connect_timeout;
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
        handles: Default::default(),
        ext_authz: outbound,
    };

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
                "plaintext_rejected",
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
                "tls_error",
                format!("invalid TLS ClientHello: {e}"),
            );
            return;
        }
        Err(_) => {
            refuse(
                &state,
                &conn,
                started,
                "tls_timeout",
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
            refuse(&state, &conn, started, "tls_handshake_failed", reason);
            return;
        }
        Err(_) => {
            refuse(
                &state,
                &conn,
                started,
                "tls_timeout",
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
                "no_peer_identity",
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
    dispatch(state, conn, info.protocol, stream, started).await;
}

async fn dispatch<S>(state: Arc<State>, conn: Conn, protocol: Protocol, io: S, started: Instant)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    match protocol {
        Protocol::Http => crate::http_in::serve(state, Arc::new(conn), io).await,
        Protocol::Tcp => tcp(state, conn, io, started).await,
    }
}

/// The TCP path: one decision per connection, then bytes both ways. A
/// CUSTOM policy with a gRPC provider that matches the connection has the
/// provider asked first, as Envoy's network ext_authz filter does.
async fn tcp<S>(state: Arc<State>, conn: Conn, io: S, started: Instant)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let snap = state.snapshot();
    let decision = snap.policy.decide(&conn.facts(None));
    let ext = match &decision.ext_authz {
        Some(x) => {
            let check = conn.ext_check(&snap.identity, None);
            Some((
                x,
                ext_authz::check(&conn.ext_authz, &snap, &x.provider, check).await,
            ))
        }
        None => None,
    };
    drop(snap);
    let mut labels = conn.labels(&state, "tcp");
    // Refused by the provider (flag UAEX), or by policy (no flag: Envoy's
    // network RBAC filter sets none).
    let refused = match &ext {
        Some((x, outcome)) if !outcome.allows() => {
            labels.response_flags = "UAEX".to_string();
            // A connection has no HTTP status to tell.
            let words = match outcome {
                ext_authz::Outcome::Deny { .. } => format!("ext_authz {}: denied", x.provider),
                o => o.reason(&x.provider),
            };
            Some(Some(TcpEnd::ExtAuthz(x, words)))
        }
        _ if !decision.is_allowed() => Some(
            ext.as_ref()
                .map(|(x, o)| TcpEnd::ExtAllowed(o.reason(&x.provider))),
        ),
        _ => None,
    };
    if let Some(ended) = refused {
        state.metrics.tcp_opened(&labels);
        state.metrics.tcp_closed(&labels, 0, 0);
        log_tcp(&state, &conn, &decision, started, (0, 0), ended);
        return;
    }
    let approved = ext.as_ref().map(|(x, _)| x.provider.clone());
    let ext_allowed = ext.map(|(x, o)| o.reason(&x.provider));
    state.metrics.tcp_opened(&labels);
    let (id, close) = state.tcp_conns.track(&conn, None, approved);
    let (sent, received, error) = match crate::connect::tcp(conn.app, conn.app_connect_timeout)
        .await
    {
        Ok(app) => {
            let activity = Activity::new();
            let mut peer = Counted::new(io, &activity);
            let mut app = Counted::new(app, &activity);
            let error = tokio::select! {
                r = tokio::io::copy_bidirectional(&mut peer, &mut app) => {
                    r.err().map(|e| format!("connection error: {e}"))
                }
                () = close.notified() => Some(format!("{POLICY_CHANGED}: the new policy denies this connection")),
                () = activity.idle(state.idle_timeout) => Some(idle_reason(state.idle_timeout)),
            };
            (app.bytes_read(), peer.bytes_read(), error)
        }
        Err(e) => (
            0,
            0,
            Some(format!("application at {} unreachable: {e}", conn.app)),
        ),
    };
    state.tcp_conns.untrack(id);
    let flags = match error.as_deref() {
        Some(e) if !e.starts_with(IDLE_TIMEOUT) => "UF",
        _ => "-",
    };
    labels.response_flags = flags.to_string();
    state.metrics.tcp_closed(&labels, sent, received);
    let ended = match (error, ext_allowed) {
        (Some(e), _) => Some(TcpEnd::Error(e, flags)),
        (None, allowed) => allowed.map(TcpEnd::ExtAllowed),
    };
    log_tcp(&state, &conn, &decision, started, (sent, received), ended);
}

/// What a TCP connection's decision alone does not tell of how it ended.
enum TcpEnd<'a> {
    /// Closed with this error (and these response flags), or by a policy
    /// change.
    Error(String, &'static str),
    /// The external provider of the CUSTOM rule refused it (or could not
    /// be asked), in these words.
    ExtAuthz(&'a meshward_policy::ExtAuthzCheck, String),
    /// The external provider let it through, in these words.
    ExtAllowed(String),
}

fn log_tcp(
    state: &State,
    conn: &Conn,
    d: &Decision,
    started: Instant,
    (sent, received): (u64, u64),
    ended: Option<TcpEnd<'_>>,
) {
    if !state.metrics.access().enabled() {
        return;
    }
    let snap = state.snapshot();
    let mut record = conn.record(&snap.identity, "tcp", started, Some(d));
    match ended {
        Some(TcpEnd::Error(e, flags)) => {
            if e.starts_with(POLICY_CHANGED) {
                record.decision = "deny";
            }
            record.response_flags = flags;
            record.reason = e;
        }
        Some(TcpEnd::ExtAuthz(x, reason)) => {
            record.decision = "deny";
            record.response_flags = "UAEX";
            record.reason = reason;
            record.policy = Some(x.policy.policy.to_string());
            record.rule = Some(x.policy.rule);
        }
        Some(TcpEnd::ExtAllowed(reason)) => record.reason = format!("{}; {reason}", record.reason),
        None => {}
    }
    record.bytes_sent = sent;
    record.bytes_received = received;
    state.metrics.access().write(&record);
}

/// The access-log reason of a TCP connection or tunnel closed because a
/// policy change denies it.
pub const POLICY_CHANGED: &str = "policy_changed";

/// The access-log `decision` and `reason` of a decision of meshward's own
/// policies (what an external provider said is added by the caller).
pub fn decision_words(d: &Decision) -> (&'static str, String) {
    (
        if d.is_allowed() { "allow" } else { "deny" },
        d.reason.code().to_string(),
    )
}

/// Logs a connection refused before any decision could be made.
fn refuse(state: &State, conn: &Conn, started: Instant, reason: &str, explanation: String) {
    let snap = state.snapshot();
    let mut labels = conn.labels(state, "tcp");
    labels.response_flags = "UAEX".to_string();
    state.metrics.tcp_opened(&labels);
    state.metrics.tcp_closed(&labels, 0, 0);
    let mut record = conn.record(&snap.identity, "connection", started, None);
    record.response_flags = "UAEX";
    record.reason = reason.to_string();
    record.explanation = explanation;
    state.metrics.access().write(&record);
}
