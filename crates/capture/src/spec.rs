//! The capture settings: Istio's defaults, its `traffic.sidecar.istio.io/`
//! annotations on a WorkloadEntry, and flags that override them.

use std::collections::BTreeSet;
use std::fmt;

use ipnet::IpNet;
use meshward_config::ObjectMeta;
use meshward_config::annotations;

/// Istio's outbound capture port (Envoy's `virtualOutbound` listener).
pub const DEFAULT_OUTBOUND_PORT: u16 = 15001;
/// Istio's inbound capture port (Envoy's `virtualInbound` listener).
pub const DEFAULT_INBOUND_PORT: u16 = 15006;
/// Istio's DNS proxy port.
pub const DEFAULT_DNS_PORT: u16 = 15053;
/// Istio's proxy user and group id (`istio-proxy`, 1337).
pub const DEFAULT_PROXY_ID: u32 = 1337;
/// The socket mark of the proxy's own connections (1337 = 0x539, as
/// Istio's).
pub const DEFAULT_PROXY_MARK: u32 = 1337;
/// The proxy's own ports, never captured inbound whatever the settings
/// say: admin 15000, outbound 15001, inbound 15006, merged metrics 15020,
/// health 15021, DNS 15053, Envoy-style stats 15090 (Istio excludes its
/// own the same way).
pub const PROXY_PORTS: [u16; 7] = [15000, 15001, 15006, 15020, 15021, 15053, 15090];

/// Destination ranges: every address, or only those listed (none when
/// the list is empty).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IpRanges {
    /// `*`: every destination.
    All,
    /// Only these CIDRs; an empty list captures nothing.
    Only(Vec<IpNet>),
}

/// Ports: every port, or only those listed (none when the set is empty).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ports {
    /// `*`: every port.
    All,
    /// Only these ports; an empty set captures nothing.
    Only(BTreeSet<u16>),
}

/// How a workload's traffic is captured. `Default` is Istio's defaults
/// (all outbound TCP, all inbound TCP but the proxy's own ports, IPv6 too)
/// plus DNS capture, which meshward's proxy answers.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct CaptureSpec {
    /// Where captured outbound TCP goes (the proxy's outbound listener).
    pub outbound_port: u16,
    /// Where captured inbound TCP goes (the proxy's inbound listener).
    pub inbound_port: u16,
    /// Where captured DNS queries go (the proxy's DNS server).
    pub dns_port: u16,
    /// Whether DNS queries (UDP and TCP to port 53) are captured.
    pub capture_dns: bool,
    /// The proxy's user ids: their traffic is never captured outbound.
    pub proxy_uids: Vec<u32>,
    /// The proxy's group ids: their traffic is never captured outbound.
    pub proxy_gids: Vec<u32>,
    /// The proxy's socket mark: marked traffic is never captured
    /// outbound. `None`: exempt by user and group only.
    pub proxy_mark: Option<u32>,
    /// Outbound destinations captured (`includeOutboundIPRanges`).
    pub include_outbound_ip_ranges: IpRanges,
    /// Outbound destinations never captured (`excludeOutboundIPRanges`).
    pub exclude_outbound_ip_ranges: Vec<IpNet>,
    /// Outbound destination ports never captured (`excludeOutboundPorts`).
    pub exclude_outbound_ports: BTreeSet<u16>,
    /// Inbound ports captured (`includeInboundPorts`); [`PROXY_PORTS`]
    /// never are.
    pub include_inbound_ports: Ports,
    /// Inbound ports never captured (`excludeInboundPorts`), besides
    /// [`PROXY_PORTS`].
    pub exclude_inbound_ports: BTreeSet<u16>,
    /// Whether IPv6 traffic is captured too; when off it is left alone.
    pub ipv6: bool,
}

impl Default for CaptureSpec {
    fn default() -> Self {
        CaptureSpec {
            outbound_port: DEFAULT_OUTBOUND_PORT,
            inbound_port: DEFAULT_INBOUND_PORT,
            dns_port: DEFAULT_DNS_PORT,
            capture_dns: true,
            proxy_uids: vec![DEFAULT_PROXY_ID],
            proxy_gids: vec![DEFAULT_PROXY_ID],
            proxy_mark: Some(DEFAULT_PROXY_MARK),
            include_outbound_ip_ranges: IpRanges::All,
            exclude_outbound_ip_ranges: Vec::new(),
            exclude_outbound_ports: BTreeSet::new(),
            include_inbound_ports: Ports::All,
            exclude_inbound_ports: BTreeSet::new(),
            ipv6: true,
        }
    }
}

/// One of the list settings Istio exposes as annotations, which flags
/// can set as well.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Setting {
    /// `traffic.sidecar.istio.io/includeOutboundIPRanges`: CIDRs, `*`, or
    /// `""` for none.
    IncludeOutboundIpRanges,
    /// `traffic.sidecar.istio.io/excludeOutboundIPRanges`: CIDRs.
    ExcludeOutboundIpRanges,
    /// `traffic.sidecar.istio.io/excludeOutboundPorts`: ports.
    ExcludeOutboundPorts,
    /// `traffic.sidecar.istio.io/includeInboundPorts`: ports, `*`, or `""`
    /// for none.
    IncludeInboundPorts,
    /// `traffic.sidecar.istio.io/excludeInboundPorts`: ports.
    ExcludeInboundPorts,
}

impl Setting {
    /// Every setting, in the order they are applied.
    pub const ALL: [Setting; 5] = [
        Setting::IncludeOutboundIpRanges,
        Setting::ExcludeOutboundIpRanges,
        Setting::ExcludeOutboundPorts,
        Setting::IncludeInboundPorts,
        Setting::ExcludeInboundPorts,
    ];

    /// Istio's annotation for this setting.
    pub fn annotation(self) -> &'static str {
        match self {
            Setting::IncludeOutboundIpRanges => annotations::INCLUDE_OUTBOUND_IP_RANGES,
            Setting::ExcludeOutboundIpRanges => annotations::EXCLUDE_OUTBOUND_IP_RANGES,
            Setting::ExcludeOutboundPorts => annotations::EXCLUDE_OUTBOUND_PORTS,
            Setting::IncludeInboundPorts => annotations::INCLUDE_INBOUND_PORTS,
            Setting::ExcludeInboundPorts => annotations::EXCLUDE_INBOUND_PORTS,
        }
    }
}

/// One bad item of a setting, and where the setting came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadValue {
    /// Where the value came from: `WorkloadEntry NS/NAME: annotation
    /// traffic.sidecar.istio.io/...`, or `flag --...`.
    pub origin: String,
    /// The bad item, as written.
    pub item: String,
    /// What is wrong with it.
    pub reason: String,
}

impl fmt::Display for BadValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {:?} {}", self.origin, self.item, self.reason)
    }
}

/// Capture settings that cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SpecError {
    /// Values that do not parse, every one of them.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    BadValues(Vec<BadValue>),
    /// Settings that parse but do not fit together.
    #[error("capture settings: {0}")]
    Inconsistent(String),
}

impl CaptureSpec {
    /// Applies Istio's traffic annotations of the WorkloadEntry with
    /// `meta` over `self`. Every bad value is reported, each naming the
    /// workload, the annotation and the bad item.
    pub fn with_annotations(mut self, meta: &ObjectMeta) -> Result<Self, SpecError> {
        let mut bad = Vec::new();
        for setting in Setting::ALL {
            let name = setting.annotation();
            if let Some(value) = meta.annotations.get(name) {
                let origin = format!(
                    "WorkloadEntry {}/{}: annotation {name}",
                    meta.namespace, meta.name
                );
                bad.extend(self.set(setting, value, &origin));
            }
        }
        if bad.is_empty() {
            Ok(self)
        } else {
            Err(SpecError::BadValues(bad))
        }
    }

    /// Sets `setting` from `value`, written as Istio's annotation is
    /// (comma-separated; `*` where Istio allows it; empty items skipped),
    /// replacing what was there. Returns the bad items, with `origin`
    /// saying where the value came from; on any, nothing is changed.
    pub fn set(&mut self, setting: Setting, value: &str, origin: &str) -> Vec<BadValue> {
        let mut bad = Vec::new();
        let mut report = |item: &str, reason: &str| {
            bad.push(BadValue {
                origin: origin.to_string(),
                item: item.to_string(),
                reason: reason.to_string(),
            })
        };
        match setting {
            Setting::IncludeOutboundIpRanges => {
                if let Some(r) = ranges(value, true, &mut report) {
                    self.include_outbound_ip_ranges = r;
                }
            }
            Setting::ExcludeOutboundIpRanges => {
                if let Some(IpRanges::Only(r)) = ranges(value, false, &mut report) {
                    self.exclude_outbound_ip_ranges = r;
                }
            }
            Setting::ExcludeOutboundPorts => {
                if let Some(Ports::Only(p)) = ports(value, false, &mut report) {
                    self.exclude_outbound_ports = p;
                }
            }
            Setting::IncludeInboundPorts => {
                if let Some(p) = ports(value, true, &mut report) {
                    self.include_inbound_ports = p;
                }
            }
            Setting::ExcludeInboundPorts => {
                if let Some(Ports::Only(p)) = ports(value, false, &mut report) {
                    self.exclude_inbound_ports = p;
                }
            }
        }
        bad
    }

    /// Checks that the settings fit together: capture ports set and
    /// distinct, and some way to recognise the proxy's own traffic (else
    /// the proxy's upstream connections would be captured again, a loop).
    pub fn validate(&self) -> Result<(), SpecError> {
        let ports = [
            ("outbound", self.outbound_port),
            ("inbound", self.inbound_port),
            ("DNS", self.dns_port),
        ];
        for (what, port) in ports {
            if port == 0 {
                return Err(SpecError::Inconsistent(format!(
                    "the {what} capture port is 0; it must be 1-65535"
                )));
            }
        }
        if self.outbound_port == self.inbound_port
            || (self.capture_dns
                && (self.dns_port == self.outbound_port || self.dns_port == self.inbound_port))
        {
            return Err(SpecError::Inconsistent(format!(
                "the capture ports must differ (outbound {}, inbound {}, DNS {})",
                self.outbound_port, self.inbound_port, self.dns_port
            )));
        }
        if self.proxy_mark == Some(0) {
            return Err(SpecError::Inconsistent(
                "the proxy mark is 0, which every unmarked socket carries; use another mark or none"
                    .into(),
            ));
        }
        if self.proxy_uids.is_empty() && self.proxy_gids.is_empty() && self.proxy_mark.is_none() {
            return Err(SpecError::Inconsistent(
                "no proxy user, group or mark: the proxy's own connections would be captured again (a loop)"
                    .into(),
            ));
        }
        Ok(())
    }
}

/// The items of a comma-separated value, trimmed, empty ones skipped (as
/// istio-iptables reads them).
fn items(value: &str) -> impl Iterator<Item = &str> {
    value.split(',').map(str::trim).filter(|s| !s.is_empty())
}

fn ranges(value: &str, wildcard: bool, report: &mut impl FnMut(&str, &str)) -> Option<IpRanges> {
    if value.trim() == "*" {
        if wildcard {
            return Some(IpRanges::All);
        }
        report("*", "is not allowed here (a list of CIDRs)");
        return None;
    }
    let mut out = Vec::new();
    let mut ok = true;
    for item in items(value) {
        if item == "*" {
            report(item, "must stand alone (\"*\" means every address)");
            ok = false;
            continue;
        }
        match item.parse::<IpNet>() {
            // Host bits are dropped, as Go's netip.Prefix.Masked() does.
            Ok(net) => out.push(net.trunc()),
            Err(_) => {
                report(item, "is not a CIDR (e.g. 10.0.0.0/8 or fd00::/8)");
                ok = false;
            }
        }
    }
    ok.then_some(IpRanges::Only(out))
}

fn ports(value: &str, wildcard: bool, report: &mut impl FnMut(&str, &str)) -> Option<Ports> {
    if value.trim() == "*" {
        if wildcard {
            return Some(Ports::All);
        }
        report("*", "is not allowed here (a list of ports)");
        return None;
    }
    let mut out = BTreeSet::new();
    let mut ok = true;
    for item in items(value) {
        match item.parse::<u16>() {
            Ok(port) if port != 0 => {
                out.insert(port);
            }
            _ => {
                let reason = if item == "*" {
                    "must stand alone (\"*\" means every port)"
                } else {
                    "is not a port (1-65535)"
                };
                report(item, reason);
                ok = false;
            }
        }
    }
    ok.then_some(Ports::Only(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(annotations: &[(&str, &str)]) -> ObjectMeta {
        ObjectMeta {
            name: "catalog".into(),
            namespace: "production".into(),
            annotations: annotations
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..ObjectMeta::default()
        }
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn defaults_are_istios() {
        let s = CaptureSpec::default();
        assert_eq!(
            (s.outbound_port, s.inbound_port, s.dns_port),
            (15001, 15006, 15053)
        );
        assert_eq!(s.proxy_uids, vec![1337]);
        assert_eq!(s.proxy_gids, vec![1337]);
        assert_eq!(s.proxy_mark, Some(0x539));
        assert_eq!(s.include_outbound_ip_ranges, IpRanges::All);
        assert_eq!(s.include_inbound_ports, Ports::All);
        assert!(s.ipv6);
        s.validate().unwrap();
    }

    #[test]
    fn each_annotation_is_read() {
        let s = CaptureSpec::default()
            .with_annotations(&meta(&[
                (
                    annotations::INCLUDE_OUTBOUND_IP_RANGES,
                    "10.0.0.0/8, fd00::/8",
                ),
                (
                    annotations::EXCLUDE_OUTBOUND_IP_RANGES,
                    "10.96.0.1/32,10.1.2.3/16",
                ),
                (annotations::EXCLUDE_OUTBOUND_PORTS, "5432, 6379,5432"),
                (annotations::INCLUDE_INBOUND_PORTS, "8080,9090"),
                (annotations::EXCLUDE_INBOUND_PORTS, "22"),
            ]))
            .unwrap();
        assert_eq!(
            s.include_outbound_ip_ranges,
            IpRanges::Only(vec![net("10.0.0.0/8"), net("fd00::/8")])
        );
        // Host bits dropped.
        assert_eq!(
            s.exclude_outbound_ip_ranges,
            vec![net("10.96.0.1/32"), net("10.1.0.0/16")]
        );
        assert_eq!(s.exclude_outbound_ports, BTreeSet::from([5432, 6379]));
        assert_eq!(
            s.include_inbound_ports,
            Ports::Only(BTreeSet::from([8080, 9090]))
        );
        assert_eq!(s.exclude_inbound_ports, BTreeSet::from([22]));
    }

    #[test]
    fn empty_and_wildcard_mean_what_istio_says() {
        let none = CaptureSpec::default()
            .with_annotations(&meta(&[
                (annotations::INCLUDE_OUTBOUND_IP_RANGES, ""),
                (annotations::INCLUDE_INBOUND_PORTS, ""),
            ]))
            .unwrap();
        assert_eq!(none.include_outbound_ip_ranges, IpRanges::Only(vec![]));
        assert_eq!(none.include_inbound_ports, Ports::Only(BTreeSet::new()));
        let all = none
            .with_annotations(&meta(&[
                (annotations::INCLUDE_OUTBOUND_IP_RANGES, " * "),
                (annotations::INCLUDE_INBOUND_PORTS, "*"),
            ]))
            .unwrap();
        assert_eq!(all.include_outbound_ip_ranges, IpRanges::All);
        assert_eq!(all.include_inbound_ports, Ports::All);
    }

    #[test]
    fn bad_values_name_workload_annotation_and_item() {
        let err = CaptureSpec::default()
            .with_annotations(&meta(&[
                (annotations::EXCLUDE_OUTBOUND_PORTS, "5432,70000"),
                (
                    annotations::INCLUDE_OUTBOUND_IP_RANGES,
                    "10.0.0.0/8,10.0.0.300/8",
                ),
                (annotations::EXCLUDE_INBOUND_PORTS, "*"),
                (annotations::INCLUDE_INBOUND_PORTS, "80,*"),
                (annotations::EXCLUDE_OUTBOUND_IP_RANGES, "0"),
            ]))
            .unwrap_err()
            .to_string();
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 5, "{err}");
        assert!(err.contains(
            "WorkloadEntry production/catalog: annotation traffic.sidecar.istio.io/excludeOutboundPorts: \"70000\" is not a port (1-65535)"
        ), "{err}");
        assert!(
            err.contains("includeOutboundIPRanges: \"10.0.0.300/8\" is not a CIDR"),
            "{err}"
        );
        assert!(
            err.contains("excludeInboundPorts: \"*\" is not allowed here"),
            "{err}"
        );
        assert!(
            err.contains("includeInboundPorts: \"*\" must stand alone"),
            "{err}"
        );
        assert!(
            err.contains("excludeOutboundIPRanges: \"0\" is not a CIDR"),
            "{err}"
        );
    }

    #[test]
    fn port_zero_and_names_are_refused() {
        let mut s = CaptureSpec::default();
        for bad in ["0", "http", "-1", "65536"] {
            let errs = s.set(
                Setting::ExcludeOutboundPorts,
                bad,
                "flag --exclude-outbound-ports",
            );
            assert_eq!(errs.len(), 1, "{bad}");
            assert_eq!(
                errs[0].to_string(),
                format!("flag --exclude-outbound-ports: \"{bad}\" is not a port (1-65535)")
            );
        }
        assert!(
            s.exclude_outbound_ports.is_empty(),
            "nothing changed on error"
        );
    }

    #[test]
    fn inconsistent_settings_are_refused() {
        let mut s = CaptureSpec::default();
        s.inbound_port = s.outbound_port;
        assert!(
            s.validate()
                .unwrap_err()
                .to_string()
                .contains("must differ")
        );
        let s = CaptureSpec {
            proxy_mark: Some(0),
            ..CaptureSpec::default()
        };
        assert!(s.validate().unwrap_err().to_string().contains("mark is 0"));
        let mut s = CaptureSpec::default();
        s.proxy_uids.clear();
        s.proxy_gids.clear();
        s.proxy_mark = None;
        assert!(s.validate().unwrap_err().to_string().contains("loop"));
        let s = CaptureSpec {
            outbound_port: 0,
            ..CaptureSpec::default()
        };
        assert!(s.validate().unwrap_err().to_string().contains("is 0"));
    }
}
