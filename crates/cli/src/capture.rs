//! `meshward capture install|remove|show`: the traffic-capture rules of
//! the current network namespace (the init step of a workload, run with
//! privileges the proxy does not keep). The rules are `meshward-capture`'s.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use meshward_capture::{CaptureSpec, Setting, TABLE};

use crate::output::{self, ConfigArgs};

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Install capture in this network namespace (replacing any installed
    /// before): outbound TCP to the proxy's outbound port, inbound TCP to
    /// its inbound port, DNS to its DNS port, the proxy's own traffic
    /// exempt. Needs CAP_NET_ADMIN here.
    Install(Box<InstallArgs>),
    /// Remove capture from this network namespace (table inet meshward);
    /// nothing else changes. Succeeds when none is installed.
    Remove,
    /// Print the capture rules installed in this network namespace.
    Show,
}

/// `meshward capture install`.
#[derive(Debug, clap::Args)]
pub struct InstallArgs {
    /// Print the nft script and change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Files or directories of mesh resources holding the workload's
    /// WorkloadEntry (with --workload).
    #[arg(
        long = "config",
        short = 'c',
        value_name = "PATH",
        requires = "workload"
    )]
    config: Vec<PathBuf>,
    /// The workload as NAMESPACE/NAME of its WorkloadEntry, whose Istio
    /// traffic annotations apply (with --config).
    #[arg(long, value_name = "NS/NAME", requires = "config")]
    workload: Option<String>,
    #[command(flatten)]
    flags: CaptureFlags,
}

/// The capture settings as flags (for `capture install`, and for any
/// command that installs capture itself). Settings default to Istio's; a
/// WorkloadEntry's `traffic.sidecar.istio.io/` annotations apply over
/// them, and these flags over both. List flags take Istio's annotation
/// syntax.
#[derive(Debug, Default, clap::Args)]
pub struct CaptureFlags {
    /// The proxy's outbound capture port.
    #[arg(long, value_name = "PORT")]
    outbound_port: Option<u16>,
    /// The proxy's inbound capture port.
    #[arg(long, value_name = "PORT")]
    inbound_port: Option<u16>,
    /// The proxy's DNS port.
    #[arg(long, value_name = "PORT")]
    dns_port: Option<u16>,
    /// Capture DNS queries (UDP and TCP port 53) to the DNS port (default true).
    #[arg(long, value_name = "BOOL")]
    capture_dns: Option<bool>,
    /// Capture IPv6 too (default true); when false IPv6 is left alone.
    #[arg(long, value_name = "BOOL")]
    ipv6: Option<bool>,
    /// The proxy's user ids, exempt from capture (default 1337).
    #[arg(long, value_name = "UID[,UID...]", value_delimiter = ',')]
    proxy_uid: Option<Vec<u32>>,
    /// The proxy's group ids, exempt from capture (default 1337).
    #[arg(long, value_name = "GID[,GID...]", value_delimiter = ',')]
    proxy_gid: Option<Vec<u32>>,
    /// The mark on the proxy's own sockets, exempt from capture (default
    /// 1337 = 0x539).
    #[arg(long, value_name = "MARK", value_parser = parse_mark)]
    proxy_mark: Option<u32>,
    /// Outbound destinations captured: CIDRs, `*` for all, `""` for none
    /// (includeOutboundIPRanges).
    #[arg(long, value_name = "CIDRS")]
    include_outbound_ip_ranges: Option<String>,
    /// Outbound destinations never captured: CIDRs (excludeOutboundIPRanges).
    #[arg(long, value_name = "CIDRS")]
    exclude_outbound_ip_ranges: Option<String>,
    /// Outbound ports never captured (excludeOutboundPorts).
    #[arg(long, value_name = "PORTS")]
    exclude_outbound_ports: Option<String>,
    /// Inbound ports captured: ports, `*` for all, `""` for none
    /// (includeInboundPorts).
    #[arg(long, value_name = "PORTS")]
    include_inbound_ports: Option<String>,
    /// Inbound ports never captured, besides the proxy's own
    /// (excludeInboundPorts).
    #[arg(long, value_name = "PORTS")]
    exclude_inbound_ports: Option<String>,
}

pub fn run(cmd: Command) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::Install(args) => install(*args),
        Command::Remove => {
            if meshward_capture::remove()? {
                println!("removed traffic capture (table inet {TABLE})");
            } else {
                println!(
                    "no traffic capture was installed (no table inet {TABLE}); nothing to remove"
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Show => {
            match meshward_capture::show()? {
                Some(rules) => print!("{rules}"),
                None => println!(
                    "no traffic capture installed in this network namespace (no table inet {TABLE})"
                ),
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn install(args: InstallArgs) -> anyhow::Result<ExitCode> {
    let spec = spec(&args)?;
    if args.dry_run {
        print!("{}", meshward_capture::nft_ruleset(&spec));
        return Ok(ExitCode::SUCCESS);
    }
    meshward_capture::install(&spec)?;
    println!(
        "installed traffic capture (table inet {TABLE}): outbound TCP -> :{}, inbound TCP -> :{}{}",
        spec.outbound_port,
        spec.inbound_port,
        if spec.capture_dns {
            format!(", DNS -> :{}", spec.dns_port)
        } else {
            String::new()
        }
    );
    Ok(ExitCode::SUCCESS)
}

/// Istio's defaults, then the WorkloadEntry's annotations, then flags.
fn spec(args: &InstallArgs) -> anyhow::Result<CaptureSpec> {
    let mut spec = CaptureSpec::default();
    if let Some(name) = &args.workload {
        let (ns, n) = name
            .split_once('/')
            .with_context(|| format!("workload \"{name}\" must be written namespace/name"))?;
        let loaded = output::load_or_fail(&ConfigArgs {
            config: args.config.clone(),
            mesh_config: None,
        })?;
        let Some(entry) = loaded
            .config
            .workload_entries
            .iter()
            .find(|e| e.meta.namespace == ns && e.meta.name == n)
        else {
            bail!("no WorkloadEntry {name} in the configuration");
        };
        spec = spec.with_annotations(&entry.meta)?;
    }
    args.flags.apply(spec)
}

impl CaptureFlags {
    /// `spec` with these flags applied over it, validated. Every bad list
    /// item is reported, naming its flag.
    pub fn apply(&self, mut spec: CaptureSpec) -> anyhow::Result<CaptureSpec> {
        let lists = [
            (
                Setting::IncludeOutboundIpRanges,
                "--include-outbound-ip-ranges",
                &self.include_outbound_ip_ranges,
            ),
            (
                Setting::ExcludeOutboundIpRanges,
                "--exclude-outbound-ip-ranges",
                &self.exclude_outbound_ip_ranges,
            ),
            (
                Setting::ExcludeOutboundPorts,
                "--exclude-outbound-ports",
                &self.exclude_outbound_ports,
            ),
            (
                Setting::IncludeInboundPorts,
                "--include-inbound-ports",
                &self.include_inbound_ports,
            ),
            (
                Setting::ExcludeInboundPorts,
                "--exclude-inbound-ports",
                &self.exclude_inbound_ports,
            ),
        ];
        let mut bad = Vec::new();
        for (setting, flag, value) in lists {
            if let Some(value) = value {
                bad.extend(spec.set(setting, value, &format!("flag {flag}")));
            }
        }
        if !bad.is_empty() {
            return Err(meshward_capture::SpecError::BadValues(bad).into());
        }
        if let Some(p) = self.outbound_port {
            spec.outbound_port = p;
        }
        if let Some(p) = self.inbound_port {
            spec.inbound_port = p;
        }
        if let Some(p) = self.dns_port {
            spec.dns_port = p;
        }
        if let Some(b) = self.capture_dns {
            spec.capture_dns = b;
        }
        if let Some(b) = self.ipv6 {
            spec.ipv6 = b;
        }
        if let Some(u) = &self.proxy_uid {
            spec.proxy_uids = u.clone();
        }
        if let Some(g) = &self.proxy_gid {
            spec.proxy_gids = g.clone();
        }
        if let Some(m) = self.proxy_mark {
            spec.proxy_mark = Some(m);
        }
        spec.validate()?;
        Ok(spec)
    }
}

/// A mark in decimal or `0x` hex.
fn parse_mark(s: &str) -> Result<u32, String> {
    let parsed = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    };
    parsed.map_err(|_| format!("\"{s}\" is not a mark (a 32-bit number, decimal or 0x hex)"))
}
