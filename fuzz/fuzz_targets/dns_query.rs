//! The DNS proxy's handling of one query on arbitrary bytes: it never
//! panics; a reply parses, carries the query's id, and over UDP fits the
//! largest datagram the proxy sends.
#![no_main]

use std::net::IpAddr;

use libfuzzer_sys::fuzz_target;
use meshward_proxy::dns_proxy::{Decision, MAX_QUERY, NameTable, Transport, decide};

fuzz_target!(|data: &[u8]| {
    let addresses: Vec<IpAddr> = (0..60u8)
        .map(|i| IpAddr::from([10, 0, 0, i]))
        .chain([IpAddr::from([0x2001, 0xdb8, 0, 0, 0, 0, 0, 1])])
        .collect();
    let names = NameTable::from_names([
        ("a.example.com", &addresses[..1]),
        ("many.example.com", &addresses[..]),
    ]);
    for transport in [Transport::Udp, Transport::Tcp] {
        if let Decision::Reply(reply) = decide(data, transport, &names) {
            assert!(reply.len() >= 12, "{reply:?}");
            assert_eq!(reply[..2], data[..2], "the query's id");
            assert!(reply[2] & 0x80 != 0, "a response");
            if transport == Transport::Udp {
                assert!(reply.len() <= MAX_QUERY, "{} bytes over UDP", reply.len());
            }
        }
    }
});
