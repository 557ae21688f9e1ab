//! `meshward proxy --capture`: the proxy's own traffic kept out of the
//! capture rules, and (mode `install`) the rules installed once the
//! proxy is ready and removed when it exits.

use std::io;

use anyhow::Context;

/// Who sets up the capture rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CaptureMode {
    /// The proxy installs them when ready and removes them at exit.
    Install,
    /// An init step (`meshward capture install`) did; the proxy leaves
    /// them alone.
    External,
}

/// Istio's mark and proxy user and group: 1337.
pub const DEFAULT_MARK: u32 = 1337;
/// The user and group the rules exempt by default.
pub const EXEMPT_ID: u32 = 1337;

/// Makes sure the proxy's own connections are not captured again: its
/// sockets carry `mark` when it may set marks (CAP_NET_ADMIN), else it
/// must run as the exempt user or group. Fails closed otherwise, saying
/// what to change.
pub fn own_traffic_exempt(mark: u32) -> anyhow::Result<()> {
    let probe = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
        .context("--capture: cannot open a socket")?;
    match probe.set_mark(mark) {
        Ok(()) => {
            meshward_proxy::own::set_capture(Some(mark));
            tracing::info!(
                mark,
                "capture: the proxy's own connections carry the exempt mark"
            );
            Ok(())
        }
        Err(e) => {
            let (uid, gid) = effective_ids().context("--capture: cannot read /proc/self/status")?;
            if uid == EXEMPT_ID || gid == EXEMPT_ID {
                meshward_proxy::own::set_capture(None);
                tracing::info!(
                    uid,
                    gid,
                    "capture: the proxy runs as the exempt user or group"
                );
                return Ok(());
            }
            anyhow::bail!(
                "--capture: the proxy's own connections would be captured again (a loop): it cannot mark its sockets with {mark} ({e}; SO_MARK needs CAP_NET_ADMIN) and does not run as the exempt user or group {EXEMPT_ID} (it runs as uid {uid}, gid {gid}); give it CAP_NET_ADMIN or run it as uid {EXEMPT_ID}"
            )
        }
    }
}

/// The effective user and group of this process (`/proc/self/status`).
fn effective_ids() -> io::Result<(u32, u32)> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| io::Error::other(format!("no {name} line")))
    };
    Ok((field("Uid:")?, field("Gid:")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn effective_ids_are_this_process() {
        let (uid, gid) = effective_ids().unwrap();
        let meta = std::fs::metadata("/proc/self").unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!((uid, gid), (meta.uid(), meta.gid()));
    }
}

/// Capture rules the proxy installed (`--capture`, mode `install`):
/// removed when dropped, so they go when the proxy exits (a proxy killed
/// outright leaves them: `meshward capture remove` takes them out).
#[derive(Debug)]
pub struct Installed(());

impl Installed {
    /// Installs the rules for `proxy`'s workload: Istio's defaults, the
    /// WorkloadEntry's traffic annotations, and `mark` on the proxy's own
    /// sockets.
    pub fn install(proxy: &meshward_proxy::Proxy, mark: u32) -> anyhow::Result<Installed> {
        let mut spec = meshward_capture::CaptureSpec::default();
        spec.proxy_mark = Some(mark);
        if let Some(meta) = proxy.workload_meta() {
            spec = spec.with_annotations(&meta)?;
        }
        meshward_capture::install(&spec).context("--capture")?;
        tracing::info!(
            table = meshward_capture::TABLE,
            outbound = spec.outbound_port,
            inbound = spec.inbound_port,
            dns = spec.capture_dns.then_some(spec.dns_port),
            "capture rules installed"
        );
        Ok(Installed(()))
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        match meshward_capture::remove() {
            Ok(_) => tracing::info!("capture rules removed"),
            Err(e) => {
                tracing::error!(error = %e, "capture rules not removed: run `meshward capture remove` in the workload's network namespace")
            }
        }
    }
}

/// `--capture external`: the init step must have installed the rules, or
/// the application's traffic would bypass the proxy (inbound plaintext
/// straight to the application). Refused when they are visibly missing;
/// a proxy that may not read the rules (no CAP_NET_ADMIN, as an
/// unprivileged sidecar runs) says so and trusts the init step.
pub fn rules_installed() -> anyhow::Result<()> {
    match meshward_capture::show() {
        Ok(Some(_)) => Ok(()),
        Ok(None) => anyhow::bail!(
            "--capture external: no capture rules in this network namespace (no table inet {}): run `meshward capture install` first, or use --capture to let the proxy install them",
            meshward_capture::TABLE
        ),
        Err(e) => {
            tracing::warn!(error = %e, "--capture external: cannot read the capture rules; trusting the init step that installed them");
            Ok(())
        }
    }
}
