//! DNS for mesh names, as Istio's DNS proxying (`ISTIO_META_DNS_CAPTURE`):
//! a DNS server on UDP and TCP (`Options::dns_proxy`; traffic capture
//! sends the workload's DNS queries to it) that answers `A` and `AAAA`
//! questions for the mesh's hosts from the current snapshot's name table
//! ([`NameTable`]) and forwards everything else to the upstream name
//! servers (those of `/etc/resolv.conf`, or `Options::dns`'s), relaying
//! their answer as it is.
//!
//! - A mesh name's answer is authoritative, TTL 30 s (Istio's); a mesh
//!   host with only IPv4 addresses answers `AAAA` with NOERROR and no
//!   record, and the other way round.
//! - Forwarding keeps the query's id and transport (UDP over UDP, TCP over
//!   TCP), tries each upstream in turn for at most
//!   [`UPSTREAM_TIMEOUT`], and answers SERVFAIL when none answers. Its
//!   sockets are the proxy's own ([`crate::own`]), so that capture does not
//!   send them back here.
//! - Bounded: a UDP query over 512 bytes without EDNS (over
//!   [`MAX_QUERY`] with it), a query that does not parse, or one with
//!   other than one question gets FORMERR; a packet too short for a
//!   header or that is itself a response is dropped. TCP connections
//!   close after [`TCP_IDLE_TIMEOUT`] without a query and on a message
//!   over [`MAX_QUERY`]; at most [`MAX_TCP_CONNECTIONS`] are open and
//!   [`MAX_IN_FLIGHT`] queries forwarded at once (past that: SERVFAIL).

mod names;
mod upstream;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{DNSClass, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;

pub(crate) use names::short_names;
pub use names::{NameEntry, NameTable};
pub(crate) use upstream::Upstreams;

use crate::listeners::BindError;
use crate::state::State;

/// The TTL of the answers for mesh names (Istio's).
pub const TTL: u32 = 30;
/// The largest UDP query without EDNS (RFC 1035).
pub const MAX_PLAIN_UDP: usize = 512;
/// The largest query accepted, over UDP with EDNS or over TCP.
pub const MAX_QUERY: usize = 4096;
/// How long a TCP connection may wait for its next query.
pub const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// How many TCP connections may be open at once.
pub const MAX_TCP_CONNECTIONS: usize = 128;
/// How many queries may be forwarded at once.
pub const MAX_IN_FLIGHT: usize = 256;
/// How long one upstream name server has to answer.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);

/// The transport a query came over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// What to do with a query ([`decide`]).
#[derive(Debug)]
pub enum Decision {
    /// Send this message back.
    Reply(Vec<u8>),
    /// Ask the upstream name servers (the query, parsed).
    Forward(Box<Message>),
    /// Say nothing.
    Drop,
}

/// The DNS proxy: its sockets' tasks hold it.
#[derive(Debug)]
pub(crate) struct DnsProxy {
    state: Arc<State>,
    upstreams: Upstreams,
    in_flight: Arc<Semaphore>,
    tcp_connections: Arc<Semaphore>,
}

/// Binds UDP and TCP on `addr` (the same port for both: port 0 picks one
/// free on both).
pub(crate) async fn bind(addr: SocketAddr) -> Result<(UdpSocket, TcpListener), BindError> {
    let error = |source| BindError {
        addr,
        what: "DNS proxy".to_string(),
        source,
    };
    let mut last = None;
    // With port 0 the UDP port may be taken in TCP: try a few.
    for _ in 0..if addr.port() == 0 { 8 } else { 1 } {
        let udp = UdpSocket::bind(addr).await.map_err(error)?;
        let port = udp.local_addr().map_err(error)?.port();
        match crate::listeners::bind(SocketAddr::new(addr.ip(), port), "DNS proxy") {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| error(std::io::ErrorKind::AddrInUse.into())))
}

impl DnsProxy {
    pub(crate) fn new(state: Arc<State>, upstreams: Upstreams) -> DnsProxy {
        DnsProxy {
            state,
            upstreams,
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            tcp_connections: Arc::new(Semaphore::new(MAX_TCP_CONNECTIONS)),
        }
    }

    /// Serves queries on `udp` until the process ends.
    pub(crate) async fn serve_udp(self: Arc<Self>, udp: UdpSocket) {
        let udp = Arc::new(udp);
        // One byte more than the largest query: a longer datagram is
        // seen as too long instead of cut.
        let mut buf = vec![0u8; MAX_QUERY + 1];
        loop {
            let (n, peer) = match udp.recv_from(&mut buf).await {
                Ok(r) => r,
                Err(e) => {
                    // ICMP errors of earlier replies surface here; the
                    // socket keeps working.
                    tracing::debug!(error = %e, "UDP receive failed");
                    continue;
                }
            };
            let query = &buf[..n];
            match self.decide(query, Transport::Udp) {
                Decision::Reply(reply) => {
                    let _ = udp.send_to(&reply, peer).await;
                }
                Decision::Drop => {}
                Decision::Forward(msg) => {
                    let Ok(permit) = Arc::clone(&self.in_flight).try_acquire_owned() else {
                        self.overloaded(&msg, peer);
                        let _ = udp.send_to(&servfail(&msg), peer).await;
                        continue;
                    };
                    let this = Arc::clone(&self);
                    let udp = Arc::clone(&udp);
                    let query = query.to_vec();
                    tokio::spawn(async move {
                        let reply = this.forward(&msg, &query, Transport::Udp).await;
                        drop(permit);
                        let _ = udp.send_to(&reply, peer).await;
                    });
                }
            }
        }
    }

    /// Accepts TCP connections on `tcp` until the process ends.
    pub(crate) async fn serve_tcp(self: Arc<Self>, tcp: TcpListener) {
        loop {
            let (stream, peer) = match tcp.accept().await {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!(error = %e, "TCP accept failed");
                    // Out of file descriptors: do not spin.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(permit) = Arc::clone(&self.tcp_connections).try_acquire_owned() else {
                tracing::debug!(src.addr = %peer, "too many DNS TCP connections: closed");
                continue;
            };
            let this = Arc::clone(&self);
            tokio::spawn(async move {
                this.connection(stream, peer).await;
                drop(permit);
            });
        }
    }

    /// Answers the queries of one TCP connection, one after the other.
    async fn connection(&self, mut stream: TcpStream, peer: SocketAddr) {
        loop {
            let mut len = [0u8; 2];
            match tokio::time::timeout(TCP_IDLE_TIMEOUT, stream.read_exact(&mut len)).await {
                Ok(Ok(_)) => {}
                _ => return,
            }
            let len = usize::from(u16::from_be_bytes(len));
            if len > MAX_QUERY {
                tracing::debug!(src.addr = %peer, len, "DNS TCP message too long: connection closed");
                return;
            }
            let mut query = vec![0u8; len];
            match tokio::time::timeout(TCP_IDLE_TIMEOUT, stream.read_exact(&mut query)).await {
                Ok(Ok(_)) => {}
                _ => return,
            }
            let reply = match self.decide(&query, Transport::Tcp) {
                Decision::Reply(r) => r,
                Decision::Drop => continue,
                Decision::Forward(msg) => match Arc::clone(&self.in_flight).try_acquire_owned() {
                    Ok(_permit) => self.forward(&msg, &query, Transport::Tcp).await,
                    Err(_) => {
                        self.overloaded(&msg, peer);
                        servfail(&msg)
                    }
                },
            };
            let Ok(len) = u16::try_from(reply.len()) else {
                return;
            };
            let mut out = Vec::with_capacity(reply.len() + 2);
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(&reply);
            if stream.write_all(&out).await.is_err() {
                return;
            }
        }
    }

    fn overloaded(&self, msg: &Message, peer: SocketAddr) {
        tracing::debug!(
            src.addr = %peer,
            id = msg.metadata.id,
            "{MAX_IN_FLIGHT} queries already forwarded: SERVFAIL"
        );
    }

    /// [`decide`] with the current snapshot's names.
    fn decide(&self, bytes: &[u8], transport: Transport) -> Decision {
        self.state.metrics.dns_request();
        decide(bytes, transport, &self.state.snapshot().names)
    }
}

/// What the DNS proxy does with the query `bytes` that came over
/// `transport`, `names` being the mesh's names: answer it (a mesh name,
/// or an error), forward it, or drop it. Never panics, whatever the bytes.
pub fn decide(bytes: &[u8], transport: Transport, names: &NameTable) -> Decision {
    let msg = match Message::from_vec(bytes) {
        Ok(m) => m,
        Err(e) => {
            // A header is 12 bytes; the id is its first two and the
            // QR bit the top one of the third. Responses are never
            // answered (no loops between two servers).
            if bytes.len() < 12 || bytes[2] & 0x80 != 0 {
                return Decision::Drop;
            }
            tracing::debug!(error = %e, "malformed DNS query: FORMERR");
            let id = u16::from_be_bytes([bytes[0], bytes[1]]);
            return Decision::Reply(encode(&Message::error_msg(
                id,
                OpCode::Query,
                ResponseCode::FormErr,
            )));
        }
    };
    if msg.metadata.message_type != MessageType::Query {
        return Decision::Drop;
    }
    let error = |code| Decision::Reply(encode(&error_reply(&msg, code)));
    if msg.metadata.op_code != OpCode::Query {
        return error(ResponseCode::NotImp);
    }
    if msg.queries.len() != 1
        || (transport == Transport::Udp && bytes.len() > MAX_PLAIN_UDP && msg.edns.is_none())
    {
        return error(ResponseCode::FormErr);
    }
    let q = &msg.queries[0];
    let local = q.query_class() == DNSClass::IN
        && matches!(q.query_type(), RecordType::A | RecordType::AAAA);
    if !local {
        return Decision::Forward(Box::new(msg));
    }
    let Some(entry) = names.lookup(&q.name().to_ascii()) else {
        return Decision::Forward(Box::new(msg));
    };
    let reply = answer(&msg, entry);
    let limit = match (transport, &msg.edns) {
        (Transport::Tcp, _) => usize::from(u16::MAX),
        (Transport::Udp, None) => MAX_PLAIN_UDP,
        (Transport::Udp, Some(e)) => usize::from(e.max_payload()).clamp(MAX_PLAIN_UDP, MAX_QUERY),
    };
    let bytes = encode(&reply);
    if bytes.len() > limit {
        // The client asks again over TCP.
        return Decision::Reply(encode(&reply.truncate()));
    }
    Decision::Reply(bytes)
}

impl DnsProxy {
    /// The upstream answer to `query` (its bytes), else SERVFAIL.
    async fn forward(&self, msg: &Message, query: &[u8], transport: Transport) -> Vec<u8> {
        let metrics = &self.state.metrics;
        let result = match transport {
            Transport::Udp => self.upstreams.udp(query, msg.metadata.id, metrics).await,
            Transport::Tcp => self.upstreams.tcp(query, msg.metadata.id, metrics).await,
        };
        match result {
            Ok(reply) => reply,
            Err(e) => {
                tracing::debug!(
                    name = %msg.queries.first().map(|q| q.name().to_ascii()).unwrap_or_default(),
                    error = %e,
                    "no upstream answer: SERVFAIL"
                );
                servfail(msg)
            }
        }
    }
}

/// The answer of a mesh name: its addresses of the question's type.
fn answer(msg: &Message, entry: &NameEntry) -> Message {
    let mut reply = error_reply(msg, ResponseCode::NoError);
    reply.metadata.authoritative = true;
    let q = &msg.queries[0];
    let name = q.name().clone();
    let records: Vec<Record> = match q.query_type() {
        RecordType::A => entry
            .v4
            .iter()
            .map(|ip| Record::from_rdata(name.clone(), TTL, RData::A(A(*ip))))
            .collect(),
        _ => entry
            .v6
            .iter()
            .map(|ip| Record::from_rdata(name.clone(), TTL, RData::AAAA(AAAA(*ip))))
            .collect(),
    };
    reply.add_answers(records);
    reply
}

/// A reply to `msg` with `code`, no records, and its question when it has
/// one (not several: the reply stays smaller than a UDP datagram).
fn error_reply(msg: &Message, code: ResponseCode) -> Message {
    let mut reply = Message::response(msg.metadata.id, msg.metadata.op_code);
    reply.metadata = Metadata::response_from_request(&msg.metadata);
    reply.metadata.recursion_available = true;
    reply.metadata.response_code = code;
    if msg.queries.len() == 1 {
        reply.add_queries(msg.queries.iter().cloned());
    }
    if msg.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(MAX_QUERY as u16);
        reply.set_edns(edns);
    }
    reply
}

fn servfail(msg: &Message) -> Vec<u8> {
    encode(&error_reply(msg, ResponseCode::ServFail))
}

/// The wire form of a message the proxy built (encoding one cannot fail
/// but for a name too long, which a parsed question cannot have): on
/// failure, a bare SERVFAIL header.
fn encode(msg: &Message) -> Vec<u8> {
    msg.to_vec().unwrap_or_else(|_| {
        let id = msg.metadata.id.to_be_bytes();
        // id, QR=1, RCODE=2 (SERVFAIL), no records.
        vec![id[0], id[1], 0x80, 0x02, 0, 0, 0, 0, 0, 0, 0, 0]
    })
}

/// Whether `addr` is one the DNS proxy listens on (an upstream that is the
/// proxy itself would loop).
pub(crate) fn is_self(addr: SocketAddr, listening: SocketAddr) -> bool {
    addr.port() == listening.port()
        && (addr.ip() == listening.ip() || (listening.ip().is_unspecified() && is_local(addr.ip())))
}

fn is_local(ip: IpAddr) -> bool {
    ip.is_loopback() || ip.is_unspecified()
}

#[cfg(test)]
mod tests {
    use hickory_proto::op::Query;
    use hickory_proto::rr::Name;

    use super::*;

    fn query(name: &str, rtype: RecordType) -> Message {
        let mut m = Message::query();
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
        m
    }

    fn reply(d: Decision) -> Message {
        match d {
            Decision::Reply(r) => Message::from_vec(&r).unwrap(),
            other => panic!("not a reply: {other:?}"),
        }
    }

    fn table(n: u8) -> NameTable {
        let many: Vec<IpAddr> = (0..n).map(|i| IpAddr::from([10, 0, 0, i])).collect();
        NameTable::from_names([("many.example.com", &many[..])])
    }

    #[test]
    fn an_answer_too_big_for_udp_is_truncated_and_whole_over_tcp() {
        let names = table(40);
        let q = query("many.example.com.", RecordType::A);
        let bytes = q.to_vec().unwrap();
        let udp = reply(decide(&bytes, Transport::Udp, &names));
        assert!(udp.metadata.truncation);
        assert!(udp.answers.is_empty());
        assert_eq!(udp.metadata.id, q.metadata.id);
        assert_eq!(udp.queries, q.queries);
        let tcp = reply(decide(&bytes, Transport::Tcp, &names));
        assert!(!tcp.metadata.truncation);
        assert_eq!(tcp.answers.len(), 40);
        // With EDNS and a 4096-byte buffer it fits in UDP.
        let mut q = q;
        let mut edns = Edns::new();
        edns.set_max_payload(4096);
        q.set_edns(edns);
        let udp = reply(decide(&q.to_vec().unwrap(), Transport::Udp, &names));
        assert_eq!(udp.answers.len(), 40);
        assert!(udp.edns.is_some());
        // A few fit without EDNS.
        let udp = reply(decide(&bytes, Transport::Udp, &table(3)));
        assert_eq!(udp.answers.len(), 3);
        assert!(udp.metadata.authoritative);
        assert!(udp.answers.iter().all(|r| r.ttl == TTL));
    }

    #[test]
    fn what_is_not_a_standard_query_for_a_mesh_address_is_not_answered_here() {
        let names = table(1);
        // Another class, another type, another name: forwarded.
        let mut chaos = query("many.example.com.", RecordType::A);
        chaos.queries[0].set_query_class(DNSClass::CH);
        for q in [
            chaos,
            query("many.example.com.", RecordType::TXT),
            query("other.example.com.", RecordType::A),
        ] {
            let d = decide(&q.to_vec().unwrap(), Transport::Udp, &names);
            assert!(matches!(d, Decision::Forward(_)), "{d:?}");
        }
        // Another opcode: NOTIMP.
        let mut notify = query("many.example.com.", RecordType::SOA);
        notify.metadata.op_code = OpCode::Notify;
        let r = reply(decide(&notify.to_vec().unwrap(), Transport::Udp, &names));
        assert_eq!(r.metadata.response_code, ResponseCode::NotImp);
        // No question, or two: FORMERR, the questions not echoed.
        let mut two = query("many.example.com.", RecordType::A);
        two.add_query(Query::query(Name::from_ascii("x.").unwrap(), RecordType::A));
        for q in [Message::query(), two] {
            let r = reply(decide(&q.to_vec().unwrap(), Transport::Tcp, &names));
            assert_eq!(r.metadata.response_code, ResponseCode::FormErr);
            assert!(r.queries.is_empty());
        }
        // Responses and runts: dropped.
        let mut response = query("many.example.com.", RecordType::A);
        response.metadata.message_type = MessageType::Response;
        let d = decide(&response.to_vec().unwrap(), Transport::Udp, &names);
        assert!(matches!(d, Decision::Drop), "{d:?}");
        assert!(matches!(
            decide(&[0; 11], Transport::Udp, &names),
            Decision::Drop
        ));
        assert!(matches!(
            decide(&[], Transport::Tcp, &names),
            Decision::Drop
        ));
        // A v4-only name has no AAAA, but exists.
        let q = query("MANY.example.com", RecordType::AAAA);
        let r = reply(decide(&q.to_vec().unwrap(), Transport::Udp, &names));
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        assert!(r.answers.is_empty());
    }

    #[test]
    fn every_byte_of_a_query_changed_never_panics_and_replies_stay_replies() {
        // The fuzz target's properties, on every one-byte change of a
        // query with EDNS and of one for a name with many addresses.
        let names = table(60);
        let mut with_edns = query("many.example.com.", RecordType::A);
        with_edns.set_edns(Edns::new());
        let queries = [
            with_edns.to_vec().unwrap(),
            query("many.example.com.", RecordType::AAAA)
                .to_vec()
                .unwrap(),
        ];
        for q in queries {
            for i in 0..q.len() {
                for v in [0x00, 0x01, 0x3f, 0x40, 0x7f, 0x80, 0xc0, 0xff] {
                    let mut bytes = q.clone();
                    bytes[i] = v;
                    for cut in [bytes.len(), i + 1] {
                        let bytes = &bytes[..cut];
                        for t in [Transport::Udp, Transport::Tcp] {
                            if let Decision::Reply(r) = decide(bytes, t, &names) {
                                assert!(r.len() >= 12);
                                assert_eq!(r[..2], bytes[..2]);
                                assert!(r[2] & 0x80 != 0);
                                if t == Transport::Udp {
                                    assert!(r.len() <= MAX_QUERY);
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn an_empty_table_forwards_every_question() {
        let names = NameTable::default();
        assert!(names.is_empty());
        let q = query("many.example.com.", RecordType::A);
        let d = decide(&q.to_vec().unwrap(), Transport::Udp, &names);
        assert!(matches!(d, Decision::Forward(_)), "{d:?}");
    }

    #[test]
    fn an_upstream_is_never_the_proxy_itself() {
        let me: SocketAddr = "127.0.0.1:15053".parse().unwrap();
        assert!(is_self(me, me));
        assert!(!is_self("127.0.0.1:53".parse().unwrap(), me));
        let any: SocketAddr = "0.0.0.0:15053".parse().unwrap();
        assert!(is_self(me, any));
        assert!(!is_self("10.0.0.2:15053".parse().unwrap(), any));
    }
}
