//! Addresses for ServiceEntries that give none, as Istio's DNS proxying
//! auto-allocates them (`ISTIO_META_DNS_AUTO_ALLOCATE`): with traffic
//! capture, an application that resolves such a host through the proxy's
//! DNS server gets a virtual IP, connects to it, and the proxy knows the
//! service from the connection's original destination.
//!
//! Which hosts get one is Istio's rule: a ServiceEntry without
//! `addresses`, whose resolution is not `NONE` (under `NONE` the
//! connection goes to the address the application asked for, so a made-up
//! one would lead nowhere), and a host that is not a wildcard.
//!
//! Where the address comes from differs from Istio, which allocates in the
//! control plane: every meshward proxy derives it from the host alone, so
//! that all proxies agree without asking anyone, and a host keeps its
//! address when other services come and go (an application may have
//! cached the answer). The rule:
//!
//! - the address space is [`SLOTS`] slots; slot `s` is IPv4
//!   `240.240.(s / 254).(s % 254 + 1)` (Class E, never routed; no `.0` or
//!   `.255` last octet) and IPv6 `2001:2::f0f0:XXYY` (in the benchmarking
//!   range `2001:2::/48`), `XX.YY` being the last two octets of the IPv4
//!   address;
//! - a host's home slot is the 64-bit FNV-1a hash of its lower-case name,
//!   modulo [`SLOTS`];
//! - the eligible hosts of the whole configuration (every namespace, so
//!   that proxies whose visible services differ still agree) are placed in
//!   the order (home slot, name): each takes the first free slot from its
//!   home on (linear probing, wrapping at the end).
//!
//! So a host sits at its home slot unless another host hashes to the same
//! slot (or a run of taken slots reaches it) and comes first in that order;
//! only such a neighbour's arrival or departure moves it. With `n` hosts
//! that concerns about `n / 65,024` of them.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use meshward_config::ConfigSet;
use meshward_config::model::ServiceEntry;
use meshward_config::model::networking::Resolution;

/// The number of addresses: 256 values of the third octet times 254 of
/// the fourth (1..=254).
pub const SLOTS: u32 = 256 * 254;

/// Whether Istio would allocate an address for `host` of `se`: no
/// `addresses`, resolution other than `NONE`, not a wildcard.
pub fn eligible(se: &ServiceEntry, host: &str) -> bool {
    se.addresses.is_empty() && se.resolution() != Resolution::None && !host.starts_with('*')
}

/// The IPv4 and IPv6 address of slot `slot` (below [`SLOTS`]).
pub fn addresses_of(slot: u32) -> (Ipv4Addr, Ipv6Addr) {
    let slot = slot % SLOTS;
    // Both below 256 by construction.
    let third = u8::try_from(slot / 254).unwrap_or(u8::MAX);
    let fourth = u8::try_from(slot % 254 + 1).unwrap_or(u8::MAX);
    let v4 = Ipv4Addr::new(240, 240, third, fourth);
    let v6 = Ipv6Addr::new(
        0x2001,
        0x2,
        0,
        0,
        0,
        0,
        0xf0f0,
        u16::from_be_bytes([third, fourth]),
    );
    (v4, v6)
}

/// A host's home slot.
pub fn home_slot(host: &str) -> u32 {
    // FNV-1a, 64 bits (offset basis and prime from the FNV specification).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in host.bytes() {
        h ^= u64::from(b.to_ascii_lowercase());
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // Below SLOTS, so it fits.
    u32::try_from(h % u64::from(SLOTS)).unwrap_or(0)
}

/// The allocated addresses of every eligible host of a configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allocation {
    slots: HashMap<String, u32>,
}

impl Allocation {
    /// Allocates for the eligible hosts of `config` (all namespaces).
    pub fn of(config: &ConfigSet) -> Allocation {
        let hosts = config.service_entries.iter().flat_map(|se| {
            se.spec
                .hosts
                .iter()
                .filter(|h| eligible(&se.spec, h))
                .map(String::as_str)
        });
        Allocation::for_hosts(hosts)
    }

    /// Allocates for `hosts` (compared without case or a final dot;
    /// duplicates count once). Hosts past [`SLOTS`] get nothing.
    pub fn for_hosts<'a>(hosts: impl IntoIterator<Item = &'a str>) -> Allocation {
        let mut hosts: Vec<(u32, String)> = hosts
            .into_iter()
            .map(|h| {
                let h = h.trim_end_matches('.').to_ascii_lowercase();
                (home_slot(&h), h)
            })
            .collect();
        hosts.sort();
        hosts.dedup();
        let mut taken = vec![false; SLOTS as usize];
        let mut slots = HashMap::with_capacity(hosts.len());
        for (home, host) in hosts {
            if slots.len() >= SLOTS as usize {
                tracing::warn!(
                    target: "meshward::config",
                    host = %host,
                    "no address left to allocate (all {SLOTS} are taken): the host is not answered by the DNS proxy"
                );
                continue;
            }
            let mut slot = home;
            while taken[slot as usize] {
                slot = (slot + 1) % SLOTS;
            }
            taken[slot as usize] = true;
            slots.insert(host, slot);
        }
        Allocation { slots }
    }

    /// The addresses allocated to `host` (lower case, no final dot), IPv4
    /// then IPv6.
    pub fn addresses(&self, host: &str) -> Option<[IpAddr; 2]> {
        self.slots.get(host).map(|s| {
            let (v4, v6) = addresses_of(*s);
            [IpAddr::V4(v4), IpAddr::V6(v6)]
        })
    }

    /// How many hosts have addresses.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether no host has an address.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(a: &Allocation, host: &str) -> [IpAddr; 2] {
        a.addresses(host).unwrap()
    }

    #[test]
    fn slots_map_into_the_class_e_and_benchmarking_ranges_without_0_or_255() {
        let v4net: ipnet::Ipv4Net = "240.240.0.0/16".parse().unwrap();
        let v6net: ipnet::Ipv6Net = "2001:2::/48".parse().unwrap();
        let mut seen = std::collections::HashSet::new();
        for s in 0..SLOTS {
            let (v4, v6) = addresses_of(s);
            assert!(v4net.contains(&v4), "{v4}");
            assert!(v6net.contains(&v6), "{v6}");
            let last = v4.octets()[3];
            assert!(last != 0 && last != 255, "{v4}");
            assert_eq!(v6.segments()[7].to_be_bytes(), [v4.octets()[2], last]);
            assert!(seen.insert(v4), "{v4} twice");
        }
        assert_eq!(addresses_of(0).0, Ipv4Addr::new(240, 240, 0, 1));
        assert_eq!(addresses_of(SLOTS - 1).0, Ipv4Addr::new(240, 240, 255, 254));
        assert_eq!(
            addresses_of(255).1,
            "2001:2::f0f0:102".parse::<Ipv6Addr>().unwrap()
        );
    }

    #[test]
    fn the_rule_is_pinned_so_every_version_of_the_proxy_agrees() {
        // The README's example; a change here changes every allocated
        // address in running meshes (applications may have cached them).
        let a = Allocation::for_hosts(["catalog.production.svc.cluster.local"]);
        assert_eq!(
            addrs(&a, "catalog.production.svc.cluster.local"),
            [
                IpAddr::V4(Ipv4Addr::new(240, 240, 212, 233)),
                IpAddr::V6("2001:2::f0f0:d4e9".parse().unwrap())
            ]
        );
    }

    #[test]
    fn a_host_gets_its_home_slot_in_v4_and_v6_whatever_else_is_there() {
        let host = "api.example.com";
        let alone = Allocation::for_hosts([host]);
        let (v4, v6) = addresses_of(home_slot(host));
        assert_eq!(addrs(&alone, host), [IpAddr::V4(v4), IpAddr::V6(v6)]);
        // Adding and removing other hosts (none of them colliding) leaves
        // it where it is: the same for every proxy, in any order.
        let others: Vec<String> = (0..500).map(|i| format!("svc-{i}.example.org")).collect();
        let mut with: Vec<&str> = others.iter().map(String::as_str).collect();
        with.push(host);
        let crowded = Allocation::for_hosts(with.iter().copied());
        with.reverse();
        let reversed = Allocation::for_hosts(with.iter().copied());
        assert_eq!(crowded, reversed);
        let fewer = Allocation::for_hosts(others[..250].iter().map(String::as_str).chain([host]));
        let colliding = |a: &Allocation| {
            others
                .iter()
                .filter(|o| a.addresses(o).is_some())
                .any(|o| home_slot(o) == home_slot(host))
        };
        assert!(!colliding(&crowded), "pick other names: one collides");
        assert_eq!(addrs(&crowded, host), addrs(&alone, host));
        assert_eq!(addrs(&fewer, host), addrs(&alone, host));
        // Case and a final dot do not matter.
        let upper = Allocation::for_hosts(["API.Example.com."]);
        assert_eq!(addrs(&upper, host), addrs(&alone, host));
        assert_eq!(Allocation::for_hosts([host, host]).len(), 1);
    }

    #[test]
    fn colliding_hosts_probe_to_the_next_free_slot_in_name_order() {
        // Find two hosts with the same home slot.
        let mut by_slot = HashMap::new();
        let (a, b) = (0..)
            .find_map(|i| {
                let h = format!("h{i}.test");
                by_slot
                    .insert(home_slot(&h), h.clone())
                    .map(|prev| (prev, h))
            })
            .unwrap();
        let (first, second) = if a < b { (a, b) } else { (b, a) };
        let home = home_slot(&first);
        let both = Allocation::for_hosts([second.as_str(), first.as_str()]);
        let (v4, _) = addresses_of(home);
        let (next, _) = addresses_of((home + 1) % SLOTS);
        assert_eq!(addrs(&both, &first)[0], IpAddr::V4(v4));
        assert_eq!(addrs(&both, &second)[0], IpAddr::V4(next));
        // Alone, the second one is at home.
        let alone = Allocation::for_hosts([second.as_str()]);
        assert_eq!(addrs(&alone, &second)[0], IpAddr::V4(v4));
        // Slot numbers wrap.
        assert_eq!(addresses_of(SLOTS), addresses_of(0));
    }

    #[test]
    fn only_entries_without_addresses_not_none_and_not_wildcard_are_eligible() {
        let se = |addresses: &[&str], resolution: Option<&str>| ServiceEntry {
            hosts: vec!["h".into()],
            addresses: addresses.iter().map(|s| s.to_string()).collect(),
            resolution: resolution.map(str::to_string),
            ..Default::default()
        };
        assert!(eligible(&se(&[], Some("STATIC")), "a.example.com"));
        assert!(eligible(&se(&[], Some("DNS")), "a.example.com"));
        assert!(eligible(&se(&[], Some("DNS_ROUND_ROBIN")), "a.example.com"));
        assert!(!eligible(&se(&[], Some("DNS")), "*.example.com"));
        assert!(!eligible(&se(&[], Some("NONE")), "a.example.com"));
        assert!(!eligible(&se(&[], None), "a.example.com"));
        assert!(!eligible(
            &se(&["10.0.0.1"], Some("STATIC")),
            "a.example.com"
        ));
    }
}
