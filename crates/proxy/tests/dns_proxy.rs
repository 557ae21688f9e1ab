//! The DNS proxy (`Options::dns_proxy`), queried over UDP and TCP with
//! DNS messages built by hickory-proto: mesh hosts answered from the
//! configuration (allocated or explicit addresses, short names), other
//! names forwarded to a small upstream name server the test runs, SERVFAIL
//! when the upstream does not answer, and bad input answered or dropped
//! while the server keeps serving.

mod support;

use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicUsize, Ordering};

use hickory_proto::op::{Edns, Message, MessageType, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use meshward_proxy::DnsConfig;
use tokio::net::{TcpListener, TcpStream, UdpSocket};

use support::*;

/// The upstream's one record.
const UPSTREAM_NAME: &str = "upstream.example.org.";
const UPSTREAM_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);

const SERVICES: &str = r#"
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: catalog, namespace: production}
spec:
  hosts: [catalog.production.svc.cluster.local]
  ports: [{number: 8080, name: http}]
  resolution: STATIC
  endpoints: [{address: 10.20.0.1}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: legacy, namespace: production}
spec:
  hosts: [legacy.example.com]
  addresses: [192.0.2.44]
  ports: [{number: 80, name: http}]
  resolution: STATIC
  endpoints: [{address: 10.20.0.2}]
"#;

/// A name server on 127.0.0.1 (UDP and TCP, one port) that knows
/// [`UPSTREAM_NAME`] and answers NXDOMAIN for the rest.
struct Upstream {
    addr: SocketAddr,
    queries: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn upstream_answer(query: &Message) -> Message {
    let mut reply = Message::response(query.metadata.id, query.metadata.op_code);
    reply.add_queries(query.queries.iter().cloned());
    let q = &query.queries[0];
    if q.name().to_ascii() == UPSTREAM_NAME && q.query_type() == RecordType::A {
        reply.add_answer(Record::from_rdata(
            q.name().clone(),
            60,
            RData::A(A(UPSTREAM_IP)),
        ));
    } else {
        reply.metadata.response_code = ResponseCode::NXDomain;
    }
    reply
}

impl Upstream {
    async fn start() -> Upstream {
        let (udp, tcp) = loop {
            let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            if let Ok(tcp) = TcpListener::bind(udp.local_addr().unwrap()).await {
                break (udp, tcp);
            }
        };
        let addr = udp.local_addr().unwrap();
        let queries = Arc::new(AtomicUsize::new(0));
        let seen = Arc::clone(&queries);
        let udp_task = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let (n, peer) = udp.recv_from(&mut buf).await.unwrap();
                seen.fetch_add(1, Ordering::SeqCst);
                let q = Message::from_vec(&buf[..n]).unwrap();
                let reply = upstream_answer(&q).to_vec().unwrap();
                udp.send_to(&reply, peer).await.unwrap();
            }
        });
        let seen = Arc::clone(&queries);
        let tcp_task = tokio::spawn(async move {
            loop {
                let (mut s, _) = tcp.accept().await.unwrap();
                seen.fetch_add(1, Ordering::SeqCst);
                let q = read_tcp_message(&mut s).await.unwrap();
                let reply = upstream_answer(&Message::from_vec(&q).unwrap());
                write_tcp_message(&mut s, &reply.to_vec().unwrap()).await;
            }
        });
        Upstream {
            addr,
            queries,
            tasks: vec![udp_task, tcp_task],
        }
    }
}

async fn read_tcp_message(s: &mut TcpStream) -> Option<Vec<u8>> {
    let mut len = [0u8; 2];
    s.read_exact(&mut len).await.ok()?;
    let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
    s.read_exact(&mut msg).await.ok()?;
    Some(msg)
}

async fn write_tcp_message(s: &mut TcpStream, msg: &[u8]) {
    let mut out = u16::try_from(msg.len()).unwrap().to_be_bytes().to_vec();
    out.extend_from_slice(msg);
    s.write_all(&out).await.unwrap();
}

/// The proxy with the DNS proxy on and `upstream` as its only name server.
async fn start(upstream: SocketAddr) -> (Harness, SocketAddr) {
    let h = Harness::try_start(SERVICES, |o| {
        o.dns_proxy = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
        o.dns = DnsConfig::Servers(vec![upstream]);
    })
    .await
    .unwrap();
    let dns = h
        .proxy
        .listeners()
        .into_iter()
        .find(|l| l.kind == "dns")
        .expect("a dns listener")
        .address;
    (h, dns)
}

fn question(name: &str, rtype: RecordType) -> Message {
    let mut m = Message::query();
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
    m.metadata.recursion_desired = true;
    m
}

/// Sends `bytes` over UDP and waits for one datagram back (at most 10 s).
async fn udp_raw(server: SocketAddr, bytes: &[u8]) -> Option<Vec<u8>> {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.connect(server).await.unwrap();
    sock.send(bytes).await.unwrap();
    let mut buf = vec![0u8; 65535];
    let n = tokio::time::timeout(Duration::from_secs(10), sock.recv(&mut buf))
        .await
        .ok()?
        .unwrap();
    buf.truncate(n);
    Some(buf)
}

async fn udp(server: SocketAddr, query: &Message) -> Message {
    let reply = udp_raw(server, &query.to_vec().unwrap())
        .await
        .expect("an answer over UDP");
    let reply = Message::from_vec(&reply).unwrap();
    assert_eq!(reply.metadata.id, query.metadata.id, "the query's id");
    assert_eq!(reply.metadata.message_type, MessageType::Response);
    reply
}

async fn tcp(server: SocketAddr, query: &Message) -> Message {
    let mut s = TcpStream::connect(server).await.unwrap();
    write_tcp_message(&mut s, &query.to_vec().unwrap()).await;
    let reply = tokio::time::timeout(Duration::from_secs(10), read_tcp_message(&mut s))
        .await
        .expect("an answer over TCP in time")
        .expect("an answer over TCP");
    let reply = Message::from_vec(&reply).unwrap();
    assert_eq!(reply.metadata.id, query.metadata.id, "the query's id");
    reply
}

/// The addresses of an answer, with their TTLs.
fn records(m: &Message) -> Vec<(IpAddr, u32)> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some((IpAddr::V4(a.0), r.ttl)),
            RData::AAAA(a) => Some((IpAddr::V6(a.0), r.ttl)),
            _ => None,
        })
        .collect()
}

fn allocated(host: &str) -> (IpAddr, IpAddr) {
    let (v4, v6) = meshward_proxy::vip::addresses_of(meshward_proxy::vip::home_slot(host));
    (IpAddr::V4(v4), IpAddr::V6(v6))
}

#[tokio::test]
async fn mesh_hosts_and_their_short_names_are_answered_from_the_configuration() {
    let upstream = Upstream::start().await;
    let (h, dns) = start(upstream.addr).await;
    let (v4, v6) = allocated("catalog.production.svc.cluster.local");

    // A and AAAA of an entry without addresses: the allocated ones,
    // authoritative, TTL 30 s.
    for name in [
        "catalog.production.svc.cluster.local.",
        "CATALOG.production.svc.cluster.local.",
        "catalog.production.svc.",
        "catalog.production.",
        "catalog.",
    ] {
        let a = udp(dns, &question(name, RecordType::A)).await;
        assert_eq!(a.metadata.response_code, ResponseCode::NoError, "{name}");
        assert!(a.metadata.authoritative, "{name}");
        assert_eq!(records(&a), [(v4, 30)], "{name}");
        let aaaa = tcp(dns, &question(name, RecordType::AAAA)).await;
        assert_eq!(records(&aaaa), [(v6, 30)], "{name}");
    }
    // Explicit IPv4 only: AAAA is NOERROR without records, not NXDOMAIN.
    let a = udp(dns, &question("legacy.example.com.", RecordType::A)).await;
    assert_eq!(records(&a), [(IpAddr::from([192, 0, 2, 44]), 30)]);
    let aaaa = udp(dns, &question("legacy.example.com.", RecordType::AAAA)).await;
    assert_eq!(aaaa.metadata.response_code, ResponseCode::NoError);
    assert!(aaaa.answers.is_empty());
    // With EDNS the answer has EDNS too.
    let mut q = question("catalog.", RecordType::A);
    q.set_edns(Edns::new());
    let a = udp(dns, &q).await;
    assert!(a.edns.is_some());
    assert_eq!(records(&a), [(v4, 30)]);
    assert_eq!(
        upstream.queries.load(Ordering::SeqCst),
        0,
        "nothing forwarded"
    );

    // /config_dump shows the allocated addresses and the table's size
    // (2 hosts, and 3 short names of the Kubernetes-style one).
    let dump: serde_json::Value = serde_json::from_str(&h.admin("/config_dump").await).unwrap();
    let catalog = dump["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["host"] == "catalog.production.svc.cluster.local")
        .unwrap();
    assert_eq!(
        catalog["allocated_addresses"],
        serde_json::json!([v4.to_string(), v6.to_string()])
    );
    assert_eq!(dump["dns_names"], 5);

    // A service added later is answered once its snapshot is in.
    h.push(&format!(
        "{SERVICES}---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: new, namespace: production}}\nspec:\n  hosts: [new.example.com]\n  ports: [{{number: 80, name: http}}]\n  resolution: DNS\n"
    ));
    let (new_v4, _) = allocated("new.example.com");
    eventually("the new service in the DNS proxy", || async {
        let a = udp(dns, &question("new.example.com.", RecordType::A)).await;
        (records(&a) == [(new_v4, 30)]).then_some(())
    })
    .await;
    // The older host kept its address.
    let a = udp(dns, &question("catalog.", RecordType::A)).await;
    assert_eq!(records(&a), [(v4, 30)]);
}

#[tokio::test]
async fn other_names_and_types_are_forwarded_upstream_over_the_same_transport() {
    let upstream = Upstream::start().await;
    let (h, dns) = start(upstream.addr).await;
    let a = udp(dns, &question(UPSTREAM_NAME, RecordType::A)).await;
    assert_eq!(a.metadata.response_code, ResponseCode::NoError);
    assert_eq!(
        records(&a),
        [(IpAddr::V4(UPSTREAM_IP), 60)],
        "relayed as is"
    );
    assert!(!a.metadata.authoritative);
    let a = tcp(dns, &question(UPSTREAM_NAME, RecordType::A)).await;
    assert_eq!(records(&a), [(IpAddr::V4(UPSTREAM_IP), 60)]);
    // Unknown names get the upstream's NXDOMAIN; so do other types of a
    // mesh host (only A and AAAA are answered locally).
    let nx = udp(dns, &question("nowhere.example.org.", RecordType::A)).await;
    assert_eq!(nx.metadata.response_code, ResponseCode::NXDomain);
    let mx = tcp(dns, &question("catalog.", RecordType::MX)).await;
    assert_eq!(mx.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(upstream.queries.load(Ordering::SeqCst), 4);
    // Istio's agent counters.
    let metrics = h.admin("/stats/prometheus").await;
    let value = |name: &str| {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .map(|v| v.trim().parse::<f64>().unwrap())
    };
    assert_eq!(value("istio_agent_dns_requests_total"), Some(4.0));
    assert_eq!(value("istio_agent_dns_upstream_requests_total"), Some(4.0));
    assert_eq!(value("istio_agent_dns_upstream_failures_total"), Some(0.0));
}

#[tokio::test]
async fn an_upstream_that_does_not_answer_gets_servfail() {
    // Bound but silent, on UDP and TCP (accepted, never answered).
    let silent_udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let silent = silent_udp.local_addr().unwrap();
    let silent_tcp = TcpListener::bind(silent).await.unwrap();
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent_tcp.accept().await {
            held.push(s);
        }
    });
    let (h, dns) = start(silent).await;
    let started = std::time::Instant::now();
    let (qa, qaaaa) = (
        question(UPSTREAM_NAME, RecordType::A),
        question(UPSTREAM_NAME, RecordType::AAAA),
    );
    let (u, t) = tokio::join!(udp(dns, &qa), tcp(dns, &qaaaa));
    assert_eq!(u.metadata.response_code, ResponseCode::ServFail);
    assert_eq!(t.metadata.response_code, ResponseCode::ServFail);
    assert_eq!(u.queries.len(), 1, "the question is kept");
    assert!(started.elapsed() < Duration::from_secs(8), "bounded wait");
    // Mesh names are still answered.
    let a = udp(dns, &question("catalog.", RecordType::A)).await;
    assert_eq!(records(&a).len(), 1);
    let metrics = h.admin("/stats/prometheus").await;
    assert!(
        metrics.contains("istio_agent_dns_upstream_failures_total 2"),
        "{metrics}"
    );
    hold.abort();
    drop(silent_udp);
}

#[tokio::test]
async fn malformed_and_oversized_queries_are_refused_and_the_server_keeps_serving() {
    let upstream = Upstream::start().await;
    let (_h, dns) = start(upstream.addr).await;
    // A header with an id and a question that does not parse: FORMERR.
    let mut garbage = vec![0x12, 0x34, 0x01, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0];
    garbage.extend_from_slice(&[0xff; 20]);
    let reply = udp_raw(dns, &garbage).await.expect("a FORMERR");
    let reply = Message::from_vec(&reply).unwrap();
    assert_eq!(reply.metadata.id, 0x1234);
    assert_eq!(reply.metadata.response_code, ResponseCode::FormErr);
    // Too short for a header, and a response sent to the server: dropped
    // (the next query's answer is the first datagram back).
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.connect(dns).await.unwrap();
    sock.send(&[1, 2, 3]).await.unwrap();
    let mut response = question("catalog.", RecordType::A);
    response.metadata.message_type = MessageType::Response;
    sock.send(&response.to_vec().unwrap()).await.unwrap();
    let q = question("catalog.", RecordType::A);
    sock.send(&q.to_vec().unwrap()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), sock.recv(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let first = Message::from_vec(&buf[..n]).unwrap();
    assert_eq!(first.metadata.id, q.metadata.id);
    assert_eq!(records(&first).len(), 1);
    // Two questions: FORMERR.
    let mut two = question("catalog.", RecordType::A);
    two.add_query(Query::query(
        Name::from_ascii("legacy.example.com.").unwrap(),
        RecordType::A,
    ));
    assert_eq!(
        udp(dns, &two).await.metadata.response_code,
        ResponseCode::FormErr
    );
    // Over 512 bytes over UDP without EDNS: FORMERR (nothing forwarded).
    let mut big = question(UPSTREAM_NAME, RecordType::A);
    for i in 0..40 {
        big.add_additional(Record::from_rdata(
            Name::from_ascii(UPSTREAM_NAME).unwrap(),
            1,
            RData::A(A(Ipv4Addr::new(10, 0, 0, i))),
        ));
    }
    assert!(big.to_vec().unwrap().len() > 512);
    assert_eq!(
        udp(dns, &big).await.metadata.response_code,
        ResponseCode::FormErr
    );
    assert_eq!(upstream.queries.load(Ordering::SeqCst), 0);
    // TCP: a length over the cap closes the connection; others still work.
    let mut s = TcpStream::connect(dns).await.unwrap();
    s.write_all(&[0xff, 0xff]).await.unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "closed: {closed:?}"
    );
    let a = tcp(dns, &question("catalog.", RecordType::A)).await;
    assert_eq!(records(&a).len(), 1);
    // Garbage over TCP: FORMERR on the same connection, which stays open.
    let mut s = TcpStream::connect(dns).await.unwrap();
    write_tcp_message(&mut s, &garbage).await;
    let reply = Message::from_vec(&read_tcp_message(&mut s).await.unwrap()).unwrap();
    assert_eq!(reply.metadata.response_code, ResponseCode::FormErr);
    let q = question("legacy.example.com.", RecordType::A);
    write_tcp_message(&mut s, &q.to_vec().unwrap()).await;
    let reply = Message::from_vec(&read_tcp_message(&mut s).await.unwrap()).unwrap();
    assert_eq!(records(&reply), [(IpAddr::from([192, 0, 2, 44]), 30)]);
}

#[tokio::test]
async fn a_dns_address_in_use_stops_the_start_with_the_address() {
    let taken = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = taken.local_addr().unwrap();
    let err = Harness::try_start(SERVICES, |o| o.dns_proxy = Some(addr))
        .await
        .err()
        .expect("the start fails");
    let msg = err.to_string();
    assert!(
        msg.contains(&addr.to_string()) && msg.contains("DNS proxy"),
        "{msg}"
    );
}

#[tokio::test]
async fn past_the_in_flight_limit_forwarded_queries_get_servfail_at_once() {
    // A silent upstream holds every forwarded query for the upstream
    // timeout (2 s); the queries past the limit are answered at once.
    let silent_udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let (_h, dns) = start(silent_udp.local_addr().unwrap()).await;
    let limit = meshward_proxy::dns_proxy::MAX_IN_FLIGHT;
    let extra = 20;
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.connect(dns).await.unwrap();
    let started = std::time::Instant::now();
    for i in 0..limit + extra {
        let mut q = question(&format!("n{i}.example.org."), RecordType::A);
        q.metadata.id = u16::try_from(i).unwrap();
        sock.send(&q.to_vec().unwrap()).await.unwrap();
    }
    let mut buf = vec![0u8; 4096];
    let mut early = 0;
    while early < extra {
        let n = tokio::time::timeout(Duration::from_secs(10), sock.recv(&mut buf))
            .await
            .expect("SERVFAILs")
            .unwrap();
        let reply = Message::from_vec(&buf[..n]).unwrap();
        assert_eq!(reply.metadata.response_code, ResponseCode::ServFail);
        early += 1;
    }
    assert!(
        started.elapsed() < meshward_proxy::dns_proxy::UPSTREAM_TIMEOUT,
        "the queries past the limit were answered before the upstream timeout ({:?})",
        started.elapsed()
    );
}
