//! Test hosts in network namespaces: a LAN (a bridge in a namespace of
//! its own) and hosts on it, each a namespace with `lo` up, one veth
//! (`eth0`) to the bridge, an IPv4 and an IPv6 address and a default
//! route, as a pod or a small VM has. Everything is deleted on drop.
//!
//! Needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN) and `ip` (iproute2): a
//! test that cannot have them fails with [`Lan::new`]'s message, never
//! passes silently. Traffic stays inside the namespaces the test made.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A LAN of test hosts: 10.89.0.0/24 and fd89::/64, one per test (each
/// LAN is its own namespaces, so the addresses repeat freely).
pub struct Lan {
    bridge: String,
    hosts: Vec<String>,
}

/// A host on a [`Lan`].
#[derive(Debug, Clone)]
pub struct Host {
    /// The namespace's name.
    pub ns: String,
    pub ip: Ipv4Addr,
    pub ip6: Ipv6Addr,
}

fn ip(args: &[&str]) -> Result<Output, String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run `ip` (install iproute2): {e}"))?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Lan {
    /// A new LAN; `tag` names its namespaces (with this process's id).
    pub fn new(tag: &str) -> Result<Lan, String> {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let bridge = format!("mw-{tag}-{}-{n}", std::process::id());
        ip(&["netns", "add", &bridge]).map_err(|e| {
            format!(
                "this test needs network namespaces, so root (CAP_SYS_ADMIN, CAP_NET_ADMIN): {e}"
            )
        })?;
        let lan = Lan {
            bridge,
            hosts: Vec::new(),
        };
        let b = lan.bridge.as_str();
        ip(&["-n", b, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", b, "link", "set", "br0", "up"])?;
        ip(&["-n", b, "link", "set", "lo", "up"])?;
        Ok(lan)
    }

    /// Host number `n` (2 to 254): 10.89.0.`n` and fd89::`n`.
    pub fn host(&mut self, name: &str, n: u8) -> Result<Host, String> {
        let ns = format!("{}-{name}", self.bridge);
        ip(&["netns", "add", &ns])?;
        self.hosts.push(ns.clone());
        let peer = format!("v{n}");
        ip(&[
            "link",
            "add",
            "eth0",
            "netns",
            &ns,
            "type",
            "veth",
            "peer",
            "name",
            &peer,
            "netns",
            &self.bridge,
        ])?;
        ip(&["-n", &self.bridge, "link", "set", &peer, "master", "br0"])?;
        ip(&["-n", &self.bridge, "link", "set", &peer, "up"])?;
        let v4 = Ipv4Addr::new(10, 89, 0, n);
        let v6 = Ipv6Addr::new(0xfd89, 0, 0, 0, 0, 0, 0, u16::from(n));
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        ip(&["-n", &ns, "addr", "add", &format!("{v4}/24"), "dev", "eth0"])?;
        ip(&[
            "-n",
            &ns,
            "-6",
            "addr",
            "add",
            &format!("{v6}/64"),
            "dev",
            "eth0",
            "nodad",
        ])?;
        ip(&["-n", &ns, "route", "add", "default", "dev", "eth0"])?;
        // `ip netns exec` puts /etc/netns/NS/resolv.conf over the host's:
        // a name server on the LAN that nobody runs, so that no query
        // leaves the test's namespaces (under DNS capture the proxy
        // answers the mesh's names).
        let etc = std::path::Path::new("/etc/netns").join(&ns);
        std::fs::create_dir_all(&etc).map_err(|e| format!("{}: {e}", etc.display()))?;
        std::fs::write(etc.join("resolv.conf"), "nameserver 10.89.0.1\n")
            .map_err(|e| format!("{}: {e}", etc.display()))?;
        ip(&["-n", &ns, "-6", "route", "add", "default", "dev", "eth0"])?;
        Ok(Host {
            ns,
            ip: v4,
            ip6: v6,
        })
    }
}

impl Host {
    /// `program` run inside this host's namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns]).arg(program);
        c
    }

    /// Runs `program args` inside the namespace and returns its output.
    pub fn run(&self, program: &str, args: &[&str]) -> Output {
        self.command(program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {program} in {}: {e}", self.ns))
    }

    pub fn addr(&self) -> IpAddr {
        IpAddr::V4(self.ip)
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for ns in self.hosts.iter().rev().chain(std::iter::once(&self.bridge)) {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
            let _ = std::fs::remove_dir_all(std::path::Path::new("/etc/netns").join(ns));
        }
    }
}
