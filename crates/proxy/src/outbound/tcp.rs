//! The outbound TCP listeners: every connection of one goes to its
//! service, bytes relayed both ways until either side closes or the
//! connection sits idle.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::net::SocketAddr;

use meshward_config::model::networking::TlsMode;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tracing::Instrument;

use super::Outbound;
use super::pool::connect;
use super::route::{connection_span, record_route, source_labels, source_record};
use crate::idle::{Activity, Counted, idle_reason};
use crate::outcome::{FORWARDED, Flag, LocalFailure};
use crate::snapshot::TcpOutbound;

/// Copies bytes both ways until either side closes or nothing moves for the
/// idle timeout. Returns the access-log reason and the bytes read from
/// `up`.
pub(super) async fn relay_tcp<D, U>(
    down: &mut Counted<D>,
    up: &mut Counted<U>,
    activity: &Activity,
    timeout: Duration,
) -> (io::Result<String>, u64)
where
    D: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let r = tokio::select! {
        r = tokio::io::copy_bidirectional(down, up) => r.map(|_| FORWARDED.to_string()),
        () = activity.idle(timeout) => Ok(idle_reason(timeout)),
    };
    (r, up.bytes_read())
}

/// Serves one TCP outbound listener: every connection goes to `target`.
pub async fn serve_tcp(outbound: Arc<Outbound>, target: TcpOutbound, listener: TcpListener) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "TCP outbound accept failed");
                continue;
            }
        };
        let outbound = Arc::clone(&outbound);
        let span = connection_span(peer, &outbound.state);
        // Until the drain deadline: a TCP connection is never told to end.
        let guard = outbound.state.drain.guard();
        tokio::spawn(
            guard
                .run(tcp_connection(
                    outbound,
                    stream,
                    peer,
                    target.host.clone(),
                    target.port,
                ))
                .instrument(span),
        );
    }
}

/// Relays one TCP connection of the application to service `host` (a
/// name, or an address of the mesh: see `service`) on `port`.
pub(super) async fn tcp_connection(
    outbound: Arc<Outbound>,
    stream: TcpStream,
    peer: SocketAddr,
    host: String,
    port: u16,
) {
    let started = Instant::now();
    let state = &outbound.state;
    let snap = state.snapshot();
    let route = match outbound.route(&snap, &host, Some(port)) {
        Ok(r) => r,
        Err(e) => {
            tracing::info!(target: "meshward::outbound", peer = %peer, host = %host, error = %e, "TCP outbound refused");
            return;
        }
    };
    if let Some(span) = crate::telemetry::current_span() {
        record_route(&span, &route);
    }
    let mtls = route.mode != TlsMode::Disable;
    let mut labels = source_labels(&snap, Some(&route), "tcp", mtls);
    state.metrics.tcp_opened(&labels);
    let activity = Activity::new();
    let mut down = Counted::new(stream, &activity);
    // A failed connection (refused, timed out, TLS refused) closes
    // the application's connection: flag `UF`, as Envoy's TCP proxy.
    let (result, up_read) = match connect(&route.target).await {
        Ok(up) => {
            let mut up = Counted::new(up, &activity);
            let (r, read) = relay_tcp(&mut down, &mut up, &activity, state.idle_timeout).await;
            // A TLS refusal seen at the first read: `UF` (see `exchange`).
            (r.map_err(|e| route.failure(&e, Flag::None)), read)
        }
        Err(e) => (
            Err(route.failure(&e, LocalFailure::ConnectFailed.flag())),
            0,
        ),
    };
    let (sent, received) = (down.bytes_read(), up_read);
    let (flags, reason) = match result {
        Ok(reason) => (Flag::None, reason),
        Err(failure) => failure,
    };
    labels.response_flags = flags.as_str().to_string();
    state.metrics.tcp_closed(&labels, sent, received);
    state.metrics.access().write(&source_record(
        &snap,
        peer,
        Some(&route),
        mtls,
        "tcp",
        (flags, reason),
        started,
        (received, sent),
    ));
}
