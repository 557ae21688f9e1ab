//! The meshward pair: the Istio YAML both proxies read, and their command
//! line (`meshward proxy --config DIR --workload NS/NAME --certs DIR
//! --admin 127.0.0.1:PORT --worker-threads 1`, ready when
//! `GET /healthz/ready` on the admin address returns 200).

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};

use crate::certs::{self, NAMESPACE};
use crate::envoy::{Ports, SERVICE_HOST};

/// The mesh configuration, one file per resource kind. The policy is the
/// one the server-side Envoy's RBAC filter implements.
pub fn config_files(p: &Ports) -> Vec<(&'static str, String)> {
    let client = certs::principal(certs::CLIENT_SA);
    vec![
        (
            "peer-authentication.yaml",
            format!(
                r#"apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: default
  namespace: {NAMESPACE}
spec:
  mtls:
    mode: STRICT
"#
            ),
        ),
        (
            "authorization-policy.yaml",
            format!(
                r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: server-allow
  namespace: {NAMESPACE}
spec:
  selector:
    matchLabels:
      app: server
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["{client}"]
    to:
    - operation:
        methods: ["GET"]
        paths: ["/*"]
"#
            ),
        ),
        (
            "workload-entries.yaml",
            format!(
                r#"apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: server
  namespace: {NAMESPACE}
  annotations:
    meshward.io/app-ports: "http=127.0.0.1:{app}"
spec:
  address: 127.0.0.1
  labels:
    app: server
  serviceAccount: server
  ports:
    http: {inb}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: client
  namespace: {NAMESPACE}
  annotations:
    meshward.io/outbound: "127.0.0.1:{out}"
spec:
  address: 127.0.0.1
  labels:
    app: client
  serviceAccount: client
"#,
                app = p.app,
                inb = p.inbound,
                out = p.outbound,
            ),
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
  location: MESH_INTERNAL
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
/// and the Envoy pair is configured without one.
pub fn parity_flags(help: &str) -> Vec<&'static str> {
    ["--no-access-log"]
        .into_iter()
        .filter(|f| help.contains(f))
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
        for (name, text) in config_files(&ports) {
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
