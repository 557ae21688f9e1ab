//! Forwarding a query to the upstream name servers: each in turn, within
//! [`UPSTREAM_TIMEOUT`] each, over the transport the query came on, from
//! a socket that is the proxy's own.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use socket2::SockRef;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, UdpSocket};

use super::UPSTREAM_TIMEOUT;
use crate::dns::DnsConfig;
use crate::telemetry::Metrics;

/// The upstream name servers.
#[derive(Debug)]
pub(crate) struct Upstreams {
    config: DnsConfig,
    /// The DNS proxy's own address, never an upstream.
    listening: SocketAddr,
    /// Read from `/etc/resolv.conf` on first use (kept once read).
    servers: Mutex<Option<Arc<[SocketAddr]>>>,
}

impl Upstreams {
    pub(crate) fn new(config: DnsConfig, listening: SocketAddr) -> Upstreams {
        Upstreams {
            config,
            listening,
            servers: Mutex::new(None),
        }
    }

    /// The name servers, in order.
    fn servers(&self) -> Result<Arc<[SocketAddr]>, String> {
        let mut slot = self.servers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = slot.as_ref() {
            return Ok(Arc::clone(s));
        }
        let all: Vec<SocketAddr> = match &self.config {
            DnsConfig::Servers(s) => s.clone(),
            DnsConfig::System => {
                let (conf, _) = hickory_resolver::system_conf::read_system_conf()
                    .map_err(|e| format!("reading /etc/resolv.conf: {e}"))?;
                let mut out = Vec::new();
                for ns in conf.name_servers() {
                    let port = ns.connections.first().map_or(53, |c| c.port);
                    let addr = SocketAddr::new(ns.ip, port);
                    if !out.contains(&addr) {
                        out.push(addr);
                    }
                }
                out
            }
        };
        let servers: Vec<SocketAddr> = all
            .into_iter()
            .filter(|a| !super::is_self(*a, self.listening))
            .collect();
        if servers.is_empty() {
            return Err("no upstream name server (none configured but the proxy itself)".into());
        }
        let servers: Arc<[SocketAddr]> = Arc::from(servers);
        *slot = Some(Arc::clone(&servers));
        Ok(servers)
    }

    /// The first answer to `query` (id `id`) over UDP.
    pub(crate) async fn udp(&self, query: &[u8], id: u16, m: &Metrics) -> Result<Vec<u8>, String> {
        let mut errors = Vec::new();
        for server in self.servers()?.iter() {
            m.dns_upstream_request();
            match tokio::time::timeout(UPSTREAM_TIMEOUT, udp_once(*server, query, id)).await {
                Ok(Ok(reply)) => return Ok(reply),
                Ok(Err(e)) => errors.push(format!("{server}: {e}")),
                Err(_) => errors.push(format!("{server}: no answer within {UPSTREAM_TIMEOUT:?}")),
            }
            m.dns_upstream_failure();
        }
        Err(errors.join("; "))
    }

    /// The first answer to `query` (id `id`) over TCP.
    pub(crate) async fn tcp(&self, query: &[u8], id: u16, m: &Metrics) -> Result<Vec<u8>, String> {
        let mut errors = Vec::new();
        for server in self.servers()?.iter() {
            m.dns_upstream_request();
            match tokio::time::timeout(UPSTREAM_TIMEOUT, tcp_once(*server, query, id)).await {
                Ok(Ok(reply)) => return Ok(reply),
                Ok(Err(e)) => errors.push(format!("{server}: {e}")),
                Err(_) => errors.push(format!("{server}: no answer within {UPSTREAM_TIMEOUT:?}")),
            }
            m.dns_upstream_failure();
        }
        Err(errors.join("; "))
    }
}

fn unspecified(server: SocketAddr) -> SocketAddr {
    let ip = match server {
        SocketAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        SocketAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    SocketAddr::new(ip, 0)
}

/// Whether `reply` is a response with id `id`.
fn answers(reply: &[u8], id: u16) -> bool {
    reply.len() >= 12 && reply[0..2] == id.to_be_bytes() && reply[2] & 0x80 != 0
}

async fn udp_once(server: SocketAddr, query: &[u8], id: u16) -> io::Result<Vec<u8>> {
    let sock = UdpSocket::bind(unspecified(server)).await?;
    crate::own::own(SockRef::from(&sock))?;
    // Connected: only the server's datagrams are received.
    sock.connect(server).await?;
    sock.send(query).await?;
    let mut buf = vec![0u8; usize::from(u16::MAX)];
    loop {
        let n = sock.recv(&mut buf).await?;
        if answers(&buf[..n], id) {
            buf.truncate(n);
            return Ok(buf);
        }
    }
}

async fn tcp_once(server: SocketAddr, query: &[u8], id: u16) -> io::Result<Vec<u8>> {
    let sock = if server.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    crate::own::own(SockRef::from(&sock))?;
    let mut stream = sock.connect(server).await?;
    let len = u16::try_from(query.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "query too long"))?;
    let mut out = Vec::with_capacity(query.len() + 2);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(query);
    stream.write_all(&out).await?;
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).await?;
    let mut reply = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut reply).await?;
    if !answers(&reply, id) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the answer is not a response to the query",
        ));
    }
    Ok(reply)
}
