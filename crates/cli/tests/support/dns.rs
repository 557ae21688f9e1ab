//! A DNS server on 127.0.0.1 that the test controls: it answers A queries
//! for one name (other names: NXDOMAIN; other types: no records) with the
//! addresses and TTL the test sets, or SERVFAIL, or nothing at all.
//! Plain UDP and byte handling: enough for a stub resolver's queries.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// What the server answers for its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DnsAnswer {
    /// These addresses, with this TTL (seconds).
    A(Vec<Ipv4Addr>, u32),
    /// Response code 2, SERVFAIL.
    ServFail,
    /// No response: the client times out.
    Silent,
}

pub struct DnsServer {
    pub addr: SocketAddr,
    answer: Arc<Mutex<DnsAnswer>>,
    queries: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl DnsServer {
    /// Serves `name` (compared without case) on an ephemeral UDP port.
    pub async fn start(name: &str, answer: DnsAnswer) -> DnsServer {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let answer = Arc::new(Mutex::new(answer));
        let queries = Arc::new(AtomicUsize::new(0));
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        let task = {
            let answer = Arc::clone(&answer);
            let queries = Arc::clone(&queries);
            tokio::spawn(async move {
                let mut buf = [0u8; 1500];
                loop {
                    let Ok((n, from)) = socket.recv_from(&mut buf).await else {
                        return;
                    };
                    let current = answer.lock().unwrap().clone();
                    if let Some((qname, _)) = question(&buf[..n])
                        && qname == name
                    {
                        queries.fetch_add(1, Ordering::SeqCst);
                    }
                    if let Some(reply) = reply(&buf[..n], &name, &current) {
                        let _ = socket.send_to(&reply, from).await;
                    }
                }
            })
        };
        DnsServer {
            addr,
            answer,
            queries,
            task,
        }
    }

    pub fn set(&self, answer: DnsAnswer) {
        *self.answer.lock().unwrap() = answer;
    }

    /// Queries for the served name so far.
    pub fn queries(&self) -> usize {
        self.queries.load(Ordering::SeqCst)
    }
}

/// The question's name (lower case, no final dot) and type, and where the
/// question ends.
fn question(query: &[u8]) -> Option<(String, (u16, usize))> {
    if query.len() < 12 || u16::from_be_bytes([query[4], query[5]]) != 1 {
        return None;
    }
    let mut labels = Vec::new();
    let mut i = 12;
    loop {
        let len = usize::from(*query.get(i)?);
        i += 1;
        if len == 0 {
            break;
        }
        // Compression pointers never appear in a question we are sent.
        if len > 63 {
            return None;
        }
        labels.push(String::from_utf8_lossy(query.get(i..i + len)?).to_ascii_lowercase());
        i += len;
    }
    let qtype = u16::from_be_bytes([*query.get(i)?, *query.get(i + 1)?]);
    Some((labels.join("."), (qtype, i + 4)))
}

/// The response to `query`, or none (malformed, or `Silent`).
fn reply(query: &[u8], name: &str, answer: &DnsAnswer) -> Option<Vec<u8>> {
    let (qname, (qtype, end)) = question(query)?;
    if query.len() < end {
        return None;
    }
    let (rcode, addresses, ttl) = match answer {
        DnsAnswer::Silent => return None,
        _ if qname != name => (3u16, &[][..], 0),
        DnsAnswer::ServFail => (2, &[][..], 0),
        // AAAA and other types: the name exists, without such records.
        DnsAnswer::A(_, _) if qtype != 1 => (0, &[][..], 0),
        DnsAnswer::A(ips, ttl) => (0, ips.as_slice(), *ttl),
    };
    let flags = u16::from_be_bytes([query[2], query[3]]);
    // QR, the query's opcode and RD, RA, the response code.
    let flags = 0x8000 | (flags & 0x7900) | 0x0080 | rcode;
    let mut out = Vec::with_capacity(end + addresses.len() * 16);
    out.extend_from_slice(&query[..2]);
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&(addresses.len() as u16).to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(&query[12..end]);
    for ip in addresses {
        // The question's name (a pointer to offset 12), A, IN, TTL, 4 bytes.
        out.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1]);
        out.extend_from_slice(&ttl.to_be_bytes());
        out.extend_from_slice(&4u16.to_be_bytes());
        out.extend_from_slice(&ip.octets());
    }
    Some(out)
}
