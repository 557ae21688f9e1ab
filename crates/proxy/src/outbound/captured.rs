//! The outbound capture listener (15001): every connection the
//! application makes, redirected by the namespace's rules, routed by its
//! original destination. The owner of that address and port
//! ([`crate::snapshot::Owner`]: a service address or an endpoint's
//! address) decides: an HTTP port is served as HTTP (routed by `Host`,
//! falling back to the original destination), any other as TCP to the
//! owner. An address the mesh does not own goes out untouched under
//! `outboundTrafficPolicy` ALLOW_ANY (Istio's `PassthroughCluster`) and is
//! refused under REGISTRY_ONLY (its `BlackHoleCluster`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use meshward_config::model::OutboundTrafficPolicy;
use tokio::net::{TcpListener, TcpStream};
use tracing::Instrument;

use super::Outbound;
use super::route::{address_host, connection_span, source_labels, source_record};
use super::tcp::relay_tcp;
use crate::idle::{Activity, Counted};
use crate::outcome::{FORWARDED, Flag, LocalFailure};
use crate::snapshot::Snapshot;

/// What Istio names the cluster of a destination outside the mesh.
pub const PASSTHROUGH: &str = "PassthroughCluster";
/// What Istio names the cluster that refuses it under REGISTRY_ONLY.
pub const BLACKHOLE: &str = "BlackHoleCluster";

/// Serves the outbound capture listener.
pub async fn serve_captured(outbound: Arc<Outbound>, listener: TcpListener) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "outbound capture accept failed");
                continue;
            }
        };
        // The listener is dual-stack: an IPv4 client is an IPv4-mapped
        // address, named as IPv4 (peers, logs, policies' ipBlocks).
        let peer = std::net::SocketAddr::new(peer.ip().to_canonical(), peer.port());
        let orig = match crate::capture::original_dst(&stream) {
            Ok(orig) if !crate::capture::is_own_listener(&outbound.state, orig) => orig,
            Ok(orig) => {
                tracing::warn!(peer = %peer, destination = %orig, "outbound capture: a connection to the proxy's own listener (a capture loop, or a client dialing 15001); closed");
                continue;
            }
            Err(e) => {
                tracing::warn!(peer = %peer, error = %e, "outbound capture: not a redirected connection (no original destination); closed");
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let outbound = Arc::clone(&outbound);
        let span = connection_span(peer, &outbound.state);
        let guard = outbound.state.drain.guard();
        tokio::spawn(
            guard
                .run(captured(outbound, stream, peer, orig))
                .instrument(span),
        );
    }
}

async fn captured(outbound: Arc<Outbound>, stream: TcpStream, peer: SocketAddr, orig: SocketAddr) {
    let snap = outbound.state.snapshot();
    let http = snap.owner_of(orig.ip(), orig.port()).map(|o| o.is_http());
    match http {
        Some(true) => {
            drop(snap);
            super::http::serve_connection(outbound, stream, peer, Some(orig)).await;
        }
        Some(false) => {
            drop(snap);
            let host = address_host(orig.ip());
            super::tcp::tcp_connection(outbound, stream, peer, host, orig.port()).await;
        }
        None => outside(&outbound, &snap, stream, peer, orig).await,
    }
}

/// A destination no service or endpoint of the mesh owns.
async fn outside(
    outbound: &Outbound,
    snap: &Arc<Snapshot>,
    stream: TcpStream,
    peer: SocketAddr,
    orig: SocketAddr,
) {
    let started = Instant::now();
    let state = &outbound.state;
    let policy = snap.config.mesh.outbound_traffic_policy;
    let mut labels = source_labels(snap, None, "tcp", false);
    labels.destination_service = orig.to_string();
    let cluster = match policy {
        OutboundTrafficPolicy::AllowAny => PASSTHROUGH,
        OutboundTrafficPolicy::RegistryOnly => BLACKHOLE,
    };
    labels.destination_service_name = cluster.to_string();
    let record = |flags: Flag, reason: String, (received, sent): (u64, u64)| {
        let mut r = source_record(
            snap,
            peer,
            None,
            false,
            "tcp",
            (flags, reason),
            started,
            (received, sent),
        );
        r.dst_addr = orig.to_string();
        r.dst_service = Some(cluster.to_string());
        r
    };
    state.metrics.tcp_opened(&labels);
    if policy == OutboundTrafficPolicy::RegistryOnly {
        tracing::info!(target: "meshward::outbound", peer = %peer, destination = %orig, "refused: no service of the mesh has this address and port, and outboundTrafficPolicy is REGISTRY_ONLY");
        let flag = LocalFailure::NoRoute.flag();
        labels.response_flags = flag.as_str().to_string();
        state.metrics.tcp_closed(&labels, 0, 0);
        let reason = format!(
            "{orig} is outside the mesh and outboundTrafficPolicy is REGISTRY_ONLY ({BLACKHOLE})"
        );
        state.metrics.access().write(&record(flag, reason, (0, 0)));
        return;
    }
    let timeout = snap.config.mesh.connect_timeout;
    let activity = Activity::new();
    let mut down = Counted::new(stream, &activity);
    let (flags, reason, up_read) = match crate::connect::tcp(orig, timeout).await {
        Ok(up) => {
            let mut up = Counted::new(up, &activity);
            let (r, read) = relay_tcp(&mut down, &mut up, &activity, state.idle_timeout).await;
            match r {
                Ok(reason) => (Flag::None, reason, read),
                Err(e) => (Flag::None, format!("{FORWARDED} ({e})"), read),
            }
        }
        Err(e) => (
            LocalFailure::ConnectFailed.flag(),
            format!("{PASSTHROUGH}: cannot connect to {orig}: {e}"),
            0,
        ),
    };
    let sent = down.bytes_read();
    labels.response_flags = flags.as_str().to_string();
    state.metrics.tcp_closed(&labels, sent, up_read);
    state
        .metrics
        .access()
        .write(&record(flags, reason, (up_read, sent)));
}
