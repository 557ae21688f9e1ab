//! The script for representative specs, each also accepted by the real
//! `nft --check` (needs root and nftables: without them these tests fail,
//! saying so).

use std::collections::BTreeSet;

use meshward_config::{ObjectMeta, annotations};

use super::*;
use crate::check;

/// The script for `spec`, after `nft --check` accepted it.
fn checked(spec: &CaptureSpec) -> String {
    if let Err(e) = check(spec) {
        panic!(
            "nft --check refused the script (this test needs root and the nftables package): {e}\n{}",
            nft_ruleset(spec)
        );
    }
    nft_ruleset(spec)
}

/// The rules of `chain` in `script`, trimmed, comments dropped.
fn chain(script: &str, chain: &str) -> Vec<String> {
    let start = format!("chain {chain} {{");
    script
        .lines()
        .map(str::trim)
        .skip_while(|l| *l != start)
        .skip(1)
        .take_while(|l| *l != "}")
        .map(|l| l.split(" #").next().unwrap_or(l).trim().to_string())
        .collect()
}

fn annotated(pairs: &[(&str, &str)]) -> CaptureSpec {
    let meta = ObjectMeta {
        name: "catalog".into(),
        namespace: "production".into(),
        annotations: pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..ObjectMeta::default()
    };
    CaptureSpec::default().with_annotations(&meta).unwrap()
}

#[test]
fn defaults_mirror_istio() {
    let s = checked(&CaptureSpec::default());
    assert!(s.starts_with("# meshward traffic capture"));
    assert!(
        s.contains("add table inet meshward\ndelete table inet meshward\n\ntable inet meshward {")
    );
    assert_eq!(
        chain(&s, "prerouting"),
        [
            "type nat hook prerouting priority dstnat; policy accept;",
            "meta l4proto tcp jump inbound"
        ]
    );
    assert_eq!(
        chain(&s, "inbound"),
        [
            "tcp dport { 15000, 15001, 15006, 15020, 15021, 15053, 15090 } return",
            "meta l4proto tcp redirect to :15006",
        ]
    );
    assert_eq!(
        chain(&s, "output"),
        [
            "type nat hook output priority -100; policy accept;",
            "meta l4proto tcp jump outbound",
            "meta l4proto udp jump dns",
        ]
    );
    assert_eq!(
        chain(&s, "proxy"),
        [
            "oifname \"lo\" ip daddr != 127.0.0.1 tcp dport != 53 redirect to :15006",
            "oifname \"lo\" ip6 daddr != ::1 tcp dport != 53 redirect to :15006",
            "accept",
        ]
    );
    assert_eq!(
        chain(&s, "outbound"),
        [
            "oifname \"lo\" ip saddr 127.0.0.6 return",
            "oifname \"lo\" ip6 saddr ::6 return",
            "meta skuid 1337 jump proxy",
            "meta skgid 1337 jump proxy",
            "meta mark 0x539 jump proxy",
            "tcp dport 53 redirect to :15053",
            "oifname \"lo\" return",
            "ip daddr 127.0.0.1 return",
            "ip6 daddr ::1 return",
            "meta l4proto tcp redirect to :15001",
        ]
    );
    assert_eq!(
        chain(&s, "dns"),
        [
            "udp dport != 53 return",
            "meta skuid 1337 return",
            "meta skgid 1337 return",
            "meta mark 0x539 return",
            "meta l4proto udp redirect to :15053",
        ]
    );
}

#[test]
fn outbound_ranges_and_ports() {
    let spec = annotated(&[
        (
            annotations::INCLUDE_OUTBOUND_IP_RANGES,
            "10.0.0.0/8,fd00::/8",
        ),
        (
            annotations::EXCLUDE_OUTBOUND_IP_RANGES,
            "10.96.0.0/12,fd00:1::/64",
        ),
        (annotations::EXCLUDE_OUTBOUND_PORTS, "5432,6379"),
    ]);
    let s = checked(&spec);
    let out = chain(&s, "outbound");
    assert_eq!(
        out[0], "tcp dport { 5432, 6379 } return",
        "excluded ports first, as Istio"
    );
    let tail: Vec<&str> = out.iter().rev().take(4).rev().map(String::as_str).collect();
    assert_eq!(
        tail,
        [
            "ip daddr 10.96.0.0/12 return",
            "ip6 daddr fd00:1::/64 return",
            "ip daddr 10.0.0.0/8 meta l4proto tcp redirect to :15001",
            "ip6 daddr fd00::/8 meta l4proto tcp redirect to :15001",
        ]
    );
    assert!(!out.contains(&"meta l4proto tcp redirect to :15001".to_string()));
}

#[test]
fn empty_outbound_ranges_capture_no_outbound() {
    let s = checked(&annotated(&[(annotations::INCLUDE_OUTBOUND_IP_RANGES, "")]));
    let out = chain(&s, "outbound");
    assert!(out.iter().all(|r| !r.contains(":15001")), "{out:?}");
    // The proxy's loopback path to the inbound port and DNS stay.
    assert!(s.contains("redirect to :15006"));
    assert!(s.contains("tcp dport 53 redirect to :15053"));
}

#[test]
fn inbound_ports_included_and_excluded() {
    let s = checked(&annotated(&[
        (annotations::INCLUDE_INBOUND_PORTS, "8080,9090"),
        (annotations::EXCLUDE_INBOUND_PORTS, "9090"),
    ]));
    assert_eq!(
        chain(&s, "inbound"),
        [
            "tcp dport { 15000, 15001, 15006, 15020, 15021, 15053, 15090 } return",
            "tcp dport 9090 return",
            "tcp dport { 8080, 9090 } redirect to :15006",
        ]
    );
    let s = checked(&annotated(&[(
        annotations::EXCLUDE_INBOUND_PORTS,
        "22,2222",
    )]));
    assert_eq!(chain(&s, "inbound")[1], "tcp dport { 22, 2222 } return");
    assert_eq!(
        chain(&s, "inbound")[2],
        "meta l4proto tcp redirect to :15006"
    );
}

#[test]
fn empty_inbound_ports_capture_no_inbound() {
    let s = checked(&annotated(&[(annotations::INCLUDE_INBOUND_PORTS, "")]));
    assert!(chain(&s, "prerouting").is_empty(), "{s}");
    assert!(chain(&s, "inbound").is_empty(), "{s}");
}

#[test]
fn ipv4_only_leaves_ipv6_alone() {
    let spec = CaptureSpec {
        ipv6: false,
        include_outbound_ip_ranges: IpRanges::Only(vec![
            "10.0.0.0/8".parse().unwrap(),
            "fd00::/8".parse().unwrap(),
        ]),
        ..CaptureSpec::default()
    };
    let s = checked(&spec);
    assert!(!s.contains("ip6 "), "{s}");
    assert_eq!(chain(&s, "prerouting")[1], "meta nfproto ipv6 return");
    assert_eq!(chain(&s, "output")[1], "meta nfproto ipv6 return");
    assert!(s.contains("ip daddr 10.0.0.0/8 meta l4proto tcp redirect to :15001"));
    assert!(!s.contains("fd00"));
}

#[test]
fn without_dns_capture() {
    let spec = CaptureSpec {
        capture_dns: false,
        ..CaptureSpec::default()
    };
    let s = checked(&spec);
    assert!(!s.contains("redirect to :15053"), "{s}");
    assert!(chain(&s, "dns").is_empty());
    assert!(!chain(&s, "output").iter().any(|r| r.contains("udp")));
    assert_eq!(
        chain(&s, "proxy")[0],
        "oifname \"lo\" ip daddr != 127.0.0.1 meta l4proto tcp redirect to :15006"
    );
}

#[test]
fn custom_ports_ids_and_mark() {
    let spec = CaptureSpec {
        outbound_port: 16001,
        inbound_port: 16006,
        dns_port: 16053,
        proxy_uids: vec![1337, 2000],
        proxy_gids: vec![],
        proxy_mark: Some(0xff00),
        exclude_outbound_ports: BTreeSet::from([53]),
        ..CaptureSpec::default()
    };
    let s = checked(&spec);
    let out = chain(&s, "outbound");
    assert!(out.contains(&"meta skuid { 1337, 2000 } jump proxy".to_string()));
    assert!(!s.contains("skgid"));
    assert!(out.contains(&"meta mark 0xff00 jump proxy".to_string()));
    assert!(out.contains(&"meta l4proto tcp redirect to :16001".to_string()));
    assert!(s.contains("redirect to :16006"));
    // Port 53 excluded: DNS is not captured, as Istio's excludeOutboundPorts.
    assert_eq!(chain(&s, "dns")[1], "return");
}

#[test]
fn only_a_mark_exempts_the_proxy() {
    let spec = CaptureSpec {
        proxy_uids: vec![],
        proxy_gids: vec![],
        ..CaptureSpec::default()
    };
    let s = checked(&spec);
    assert!(!s.contains("skuid") && !s.contains("skgid"));
    assert!(s.contains("meta mark 0x539 jump proxy"));
}
