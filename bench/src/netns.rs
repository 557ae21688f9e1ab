//! `--netns`: the whole run inside a network namespace of the harness's
//! own (needs root), so that the captured target may install its
//! redirect rule without touching the machine's own namespace. Every
//! target then runs in that namespace, under the same conditions.

use std::net::Ipv4Addr;
use std::process::{Command, ExitCode};

use anyhow::{Context, Result, bail};

/// Set (to the namespace's name) in the harness re-run inside it.
pub const INSIDE: &str = "MESHWARD_BENCH_NETNS";

/// The captured pair's service address: the load generator dials it.
pub const SERVICE_VIP: Ipv4Addr = Ipv4Addr::new(127, 0, 9, 1);

/// The client proxy's outbound capture port (Istio's 15001).
const CAPTURE_PORT: u16 = 15001;
/// The mark the proxy gives its own sockets (exempt from the rule).
const PROXY_MARK: u32 = 1337;

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {} (--netns needs root)",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Runs this harness again, with the same arguments but `--netns`, in a
/// new network namespace with `lo` up, and deletes the namespace after.
pub fn rerun_inside() -> Result<ExitCode> {
    let ns = format!("meshward-bench-{}", std::process::id());
    ip(&["netns", "add", &ns])?;
    let result = (|| {
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        let me = std::env::current_exe().context("finding the harness binary")?;
        let status = Command::new("ip")
            .args(["netns", "exec", &ns])
            .arg(me)
            .args(std::env::args_os().skip(1).filter(|a| a != "--netns"))
            .env(INSIDE, &ns)
            .status()
            .context("running the harness in its namespace")?;
        Ok(ExitCode::from(
            status
                .code()
                .and_then(|c| u8::try_from(c).ok())
                .unwrap_or(1),
        ))
    })();
    let _ = ip(&["netns", "del", &ns]);
    result
}

/// Sends TCP connections to [`SERVICE_VIP`]:`port` (but the proxy's own)
/// to the client proxy's capture listener: the one rule the captured
/// target needs, in the table a capture init step would install
/// (`inet meshward`, which `--capture external` checks for; gone with the
/// namespace).
pub fn redirect(port: u16) -> Result<()> {
    let script = format!(
        "table inet meshward {{\n  chain output {{\n    type nat hook output priority -100; policy accept;\n    meta mark {PROXY_MARK} return\n    ip daddr {SERVICE_VIP} tcp dport {port} redirect to :{CAPTURE_PORT}\n  }}\n}}\n"
    );
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .context("running nft (install the nftables package)")?;
    std::io::Write::write_all(
        child.stdin.as_mut().context("nft's standard input")?,
        script.as_bytes(),
    )?;
    drop(child.stdin.take());
    if !child.wait()?.success() {
        bail!("nft refused the redirect rule:\n{script}");
    }
    Ok(())
}
