//! Transparent traffic capture: the netfilter side.
//!
//! This crate owns the rules that send a workload's TCP traffic (and, on
//! request, its DNS queries) through its proxy without any change to the
//! application, as Istio's `istio-iptables` does for a pod: outbound TCP to
//! the outbound capture port (15001), inbound TCP for the workload's ports
//! to the inbound capture port (15006), DNS to 15053, and the proxy's own
//! traffic exempt by user, group and socket mark. The rules live in one
//! nftables table, `inet meshward` (IPv4 and IPv6), installed and removed
//! by running the real `nft` command in the current network namespace.
//!
//! [`CaptureSpec`] holds the settings (Istio's defaults and annotations),
//! [`nft_ruleset`] turns them into an `nft -f` script, and [`install`],
//! [`remove`] and [`show`] apply it. The crate opens no sockets and
//! changes nothing but that one table; recovering a captured connection's
//! original destination is the proxy's business (`meshward-proxy`).

#![forbid(unsafe_code)]

mod nft;
mod rules;
mod spec;

pub use nft::{CaptureError, check, install, remove, show};
pub use rules::{TABLE, nft_ruleset};
pub use spec::{
    BadValue, CaptureSpec, DEFAULT_DNS_PORT, DEFAULT_INBOUND_PORT, DEFAULT_OUTBOUND_PORT,
    DEFAULT_PROXY_ID, DEFAULT_PROXY_MARK, IpRanges, PROXY_PORTS, Ports, Setting, SpecError,
};
