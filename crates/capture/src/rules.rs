//! The nftables script: Istio's `istio-iptables` NAT rules, in one
//! `inet` table (docs/CAPTURE.md maps each rule to Istio's).

use std::collections::BTreeSet;

use ipnet::IpNet;

use crate::spec::{CaptureSpec, IpRanges, PROXY_PORTS, Ports};

/// The nftables table holding every capture rule: `inet meshward`.
pub const TABLE: &str = "meshward";

/// The `nft -f` script that installs the capture `spec` describes, as one
/// transaction: it creates table `inet meshward` if absent, deletes it,
/// and adds it afresh, so running it again gives the same ruleset.
/// Assumes `spec` passed [`CaptureSpec::validate`].
pub fn nft_ruleset(spec: &CaptureSpec) -> String {
    let mut s = String::new();
    let w = &mut s;
    line(
        w,
        0,
        "# meshward traffic capture (meshward capture; docs/CAPTURE.md).",
    );
    line(
        w,
        0,
        "# Adding then deleting the table first makes this idempotent:",
    );
    line(w, 0, "# the whole file is one transaction.");
    line(w, 0, &format!("add table inet {TABLE}"));
    line(w, 0, &format!("delete table inet {TABLE}"));
    line(w, 0, "");
    line(w, 0, &format!("table inet {TABLE} {{"));
    inbound(w, spec);
    output(w, spec);
    if !spec.proxy_uids.is_empty() || !spec.proxy_gids.is_empty() || spec.proxy_mark.is_some() {
        proxy(w, spec);
    }
    outbound_tcp(w, spec);
    if spec.capture_dns {
        outbound_udp(w, spec);
    }
    line(w, 0, "}");
    s
}

fn line(w: &mut String, indent: usize, text: &str) {
    for _ in 0..indent {
        w.push('\t');
    }
    w.push_str(text);
    w.push('\n');
}

/// `{ 1, 2 }`, or the single value alone.
fn set<T: ToString>(values: impl IntoIterator<Item = T>) -> String {
    let v: Vec<String> = values.into_iter().map(|x| x.to_string()).collect();
    if v.len() == 1 {
        v.into_iter().next().unwrap_or_default()
    } else {
        format!("{{ {} }}", v.join(", "))
    }
}

/// `ip daddr NET` or `ip6 daddr NET`; `None` for IPv6 when IPv6 is off.
fn daddr(net: &IpNet, ipv6: bool) -> Option<String> {
    match net {
        IpNet::V4(n) => Some(format!("ip daddr {n}")),
        IpNet::V6(n) if ipv6 => Some(format!("ip6 daddr {n}")),
        IpNet::V6(_) => None,
    }
}

/// The first rule of a base chain when IPv6 is off: IPv6 is left alone.
fn ipv6_off(w: &mut String, spec: &CaptureSpec) {
    if !spec.ipv6 {
        line(w, 2, "meta nfproto ipv6 return # IPv6 is not captured");
    }
}

/// The proxy's sockets, by user, group and mark; each a rule prefix.
fn proxy_matches(spec: &CaptureSpec) -> Vec<String> {
    let mut m = Vec::new();
    if !spec.proxy_uids.is_empty() {
        m.push(format!("meta skuid {}", set(&spec.proxy_uids)));
    }
    if !spec.proxy_gids.is_empty() {
        m.push(format!("meta skgid {}", set(&spec.proxy_gids)));
    }
    if let Some(mark) = spec.proxy_mark {
        m.push(format!("meta mark {mark:#x}"));
    }
    m
}

/// Inbound (Istio's ISTIO_INBOUND): TCP arriving for the workload's
/// ports goes to the inbound capture port. Nothing when no inbound port
/// is captured.
fn inbound(w: &mut String, spec: &CaptureSpec) {
    if spec.include_inbound_ports == Ports::Only(BTreeSet::new()) {
        line(
            w,
            1,
            "# Inbound: no port captured (includeInboundPorts is empty).",
        );
        line(w, 0, "");
        return;
    }
    line(w, 1, "# Inbound TCP (Istio's ISTIO_INBOUND).");
    line(w, 1, "chain prerouting {");
    line(
        w,
        2,
        "type nat hook prerouting priority dstnat; policy accept;",
    );
    ipv6_off(w, spec);
    line(w, 2, "meta l4proto tcp jump inbound");
    line(w, 1, "}");
    line(w, 1, "chain inbound {");
    line(
        w,
        2,
        &format!(
            "tcp dport {} return # the proxy's own ports",
            set(PROXY_PORTS)
        ),
    );
    if !spec.exclude_inbound_ports.is_empty() {
        line(
            w,
            2,
            &format!(
                "tcp dport {} return # excludeInboundPorts",
                set(&spec.exclude_inbound_ports)
            ),
        );
    }
    let to = spec.inbound_port;
    match &spec.include_inbound_ports {
        Ports::All => line(w, 2, &format!("meta l4proto tcp redirect to :{to}")),
        Ports::Only(ports) => line(
            w,
            2,
            &format!(
                "tcp dport {} redirect to :{to} # includeInboundPorts",
                set(ports)
            ),
        ),
    }
    line(w, 1, "}");
    line(w, 0, "");
}

/// The output base chain: locally generated TCP (and DNS over UDP).
fn output(w: &mut String, spec: &CaptureSpec) {
    line(
        w,
        1,
        "# Traffic this namespace sends (Istio's OUTPUT -> ISTIO_OUTPUT).",
    );
    line(w, 1, "chain output {");
    line(w, 2, "type nat hook output priority -100; policy accept;");
    ipv6_off(w, spec);
    line(w, 2, "meta l4proto tcp jump outbound");
    if spec.capture_dns {
        line(w, 2, "meta l4proto udp jump dns");
    }
    line(w, 1, "}");
    line(w, 0, "");
}

/// The proxy's own TCP: to itself over loopback when it calls the
/// workload's own address (an application calling its own service through
/// the mesh); otherwise untouched.
fn proxy(w: &mut String, spec: &CaptureSpec) {
    let tcp = if spec.capture_dns {
        "tcp dport != 53"
    } else {
        "meta l4proto tcp"
    };
    let to = spec.inbound_port;
    line(w, 1, "# The proxy's own TCP (uid, gid or mark).");
    line(w, 1, "chain proxy {");
    line(
        w,
        2,
        &format!("oifname \"lo\" ip daddr != 127.0.0.1 {tcp} redirect to :{to}"),
    );
    if spec.ipv6 {
        line(
            w,
            2,
            &format!("oifname \"lo\" ip6 daddr != ::1 {tcp} redirect to :{to}"),
        );
    }
    line(w, 2, "accept # never captured again: no loop");
    line(w, 1, "}");
    line(w, 0, "");
}

/// Outbound TCP (Istio's ISTIO_OUTPUT), in Istio's order.
fn outbound_tcp(w: &mut String, spec: &CaptureSpec) {
    line(w, 1, "# Outbound TCP, in Istio's ISTIO_OUTPUT order.");
    line(w, 1, "chain outbound {");
    if !spec.exclude_outbound_ports.is_empty() {
        line(
            w,
            2,
            &format!(
                "tcp dport {} return # excludeOutboundPorts",
                set(&spec.exclude_outbound_ports)
            ),
        );
    }
    line(
        w,
        2,
        "oifname \"lo\" ip saddr 127.0.0.6 return # the proxy's inbound passthrough to the application",
    );
    if spec.ipv6 {
        line(w, 2, "oifname \"lo\" ip6 saddr ::6 return");
    }
    for m in proxy_matches(spec) {
        line(w, 2, &format!("{m} jump proxy"));
    }
    if spec.capture_dns {
        line(
            w,
            2,
            &format!("tcp dport 53 redirect to :{} # DNS over TCP", spec.dns_port),
        );
    }
    line(
        w,
        2,
        "oifname \"lo\" return # the application calling itself",
    );
    line(w, 2, "ip daddr 127.0.0.1 return");
    if spec.ipv6 {
        line(w, 2, "ip6 daddr ::1 return");
    }
    for net in &spec.exclude_outbound_ip_ranges {
        if let Some(d) = daddr(net, spec.ipv6) {
            line(w, 2, &format!("{d} return # excludeOutboundIPRanges"));
        }
    }
    let to = spec.outbound_port;
    match &spec.include_outbound_ip_ranges {
        IpRanges::All => line(w, 2, &format!("meta l4proto tcp redirect to :{to}")),
        IpRanges::Only(nets) => {
            for net in nets {
                if let Some(d) = daddr(net, spec.ipv6) {
                    line(
                        w,
                        2,
                        &format!(
                            "{d} meta l4proto tcp redirect to :{to} # includeOutboundIPRanges"
                        ),
                    );
                }
            }
        }
    }
    line(w, 1, "}");
}

/// DNS over UDP from anything but the proxy goes to the proxy's DNS port.
fn outbound_udp(w: &mut String, spec: &CaptureSpec) {
    line(w, 0, "");
    line(w, 1, "# DNS over UDP (Istio's DNS capture).");
    line(w, 1, "chain dns {");
    line(w, 2, "udp dport != 53 return");
    if spec.exclude_outbound_ports.contains(&53) {
        line(w, 2, "return # excludeOutboundPorts has 53");
    }
    for m in proxy_matches(spec) {
        line(w, 2, &format!("{m} return # the proxy's own queries"));
    }
    line(
        w,
        2,
        &format!("meta l4proto udp redirect to :{}", spec.dns_port),
    );
    line(w, 1, "}");
}

#[cfg(test)]
mod tests;
