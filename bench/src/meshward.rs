//! The meshward pair: the Istio YAML both proxies read, and their command
//! line (`meshward proxy --config DIR --workload NS/NAME --certs DIR
//! --admin 127.0.0.1:PORT --worker-threads 1`, ready when
//! `GET /healthz/ready` on the admin address returns 200).

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};

use meshward_test_support::mesh::{self, WorkloadEntry};

use crate::certs::{self, NAMESPACE};
use crate::envoy::{Ports, SERVICE_HOST};

/// The mesh configuration, one file per resource kind. The policy is the
/// one the server-side Envoy's RBAC filter implements: `client` (Istio's
/// principal form) may GET any path.
/// With `vip`, the service has that address (the captured pair's).
pub fn config_files(
    p: &Ports,
    client: &str,
    vip: Option<std::net::Ipv4Addr>,
) -> Vec<(&'static str, String)> {
    let addresses = vip
        .map(|a| format!("  addresses: [{a}]\n"))
        .unwrap_or_default();
    let app = SocketAddr::from(([127, 0, 0, 1], p.app));
    vec![
        (
            "peer-authentication.yaml",
            mesh::peer_authentication(NAMESPACE, "default", "STRICT"),
        ),
        (
            "authorization-policy.yaml",
            mesh::allow_from(
                NAMESPACE,
                "server-allow",
                certs::SERVER_SA,
                client,
                Some(r#"[{operation: {methods: ["GET"], paths: ["/*"]}}]"#),
            ),
        ),
        (
            "workload-entries.yaml",
            WorkloadEntry::new(NAMESPACE, certs::SERVER_SA)
                .app_ports(&[("http", app)])
                .port("http", p.inbound)
                .yaml()
                + &WorkloadEntry::new(NAMESPACE, certs::CLIENT_SA)
                    .outbound(p.outbound)
                    .yaml(),
        ),
        (
            "service-entry.yaml",
            format!(
                r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: server
  namespace: {NAMESPACE}
spec:
  hosts:
  - {SERVICE_HOST}
{addresses}  location: MESH_INTERNAL
  ports:
  - number: {inb}
    name: http
    protocol: HTTP
  workloadSelector:
    labels:
      app: server
  resolution: STATIC
"#,
                inb = p.inbound,
            ),
        ),
    ]
}

/// The command line of one meshward proxy.
pub fn command(
    meshward: &Path,
    config_dir: &Path,
    workload: &str,
    certs_dir: &Path,
    admin: SocketAddr,
    extra: &[&str],
) -> Command {
    let mut cmd = Command::new(meshward);
    cmd.arg("proxy")
        .arg("--config")
        .arg(config_dir)
        .args(["--workload", workload])
        .arg("--certs")
        .arg(certs_dir)
        .arg("--admin")
        .arg(admin.to_string())
        .args(["--worker-threads", "1"])
        .args(extra);
    cmd
}

/// The `meshward proxy --help` text, or `None` if this meshward binary has
/// no working `proxy` subcommand.
pub fn proxy_help(meshward: &Path) -> Option<String> {
    let out = Command::new(meshward)
        .args(["proxy", "--help"])
        .stdin(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Flags beyond the contract that make the comparison like for like, if
/// this build has them: Istio's default mesh config writes no access log,
/// and the Envoy pair is configured without one (nor keeps recent
/// entries in memory).
pub fn parity_flags(help: &str) -> Vec<&'static str> {
    [&["--no-access-log"][..], &["--access-log-buffer", "0"][..]]
        .into_iter()
        .filter(|f| help.contains(f[0]))
        .flatten()
        .copied()
        .collect()
}

/// `meshward --version`, if it has one.
pub fn version(meshward: &Path) -> Option<String> {
    let out = Command::new(meshward).arg("--version").output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_is_valid_istio_yaml_for_meshward() {
        let dir = tempfile::tempdir().unwrap();
        let ports = Ports {
            outbound: 15001,
            inbound: 15006,
            app: 8080,
        };
        for (name, text) in config_files(&ports, "cluster.local/ns/bench/sa/client", None) {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        match meshward_config::load_paths(&[dir.path()]) {
            Ok(loaded) => {
                assert!(loaded.config.counts().iter().map(|(_, n)| n).sum::<usize>() >= 5)
            }
            Err(diags) => panic!("invalid bench config: {diags:?}"),
        }
    }
}
