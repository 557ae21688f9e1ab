//! The Envoy pair, configured the way Istio configures sidecars (static
//! bootstrap instead of xDS): the client-side Envoy takes plaintext HTTP
//! from the load generator and originates mTLS (TLS 1.3, client SVID,
//! secure naming on the server's SPIFFE ID); the server-side Envoy
//! terminates mTLS (client certificate required, chained to the root),
//! applies an RBAC filter equivalent to the bench AuthorizationPolicy and
//! forwards to the app. One worker thread each (`--concurrency 1`).
//!
//! Left out compared with a real istio-proxy: the telemetry filters
//! (`istio.stats`, metadata exchange) and xDS. That makes this Envoy a bit
//! cheaper than a real sidecar, i.e. a conservative baseline for meshward.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::certs::{self, Certs, WorkloadCerts};

pub const SERVICE_HOST: &str = "server.bench.svc.cluster.local";

/// Ports and paths one Envoy bootstrap needs.
#[derive(Debug)]
pub struct Ports {
    pub outbound: u16,
    pub inbound: u16,
    pub app: u16,
}

fn tls_params() -> &'static str {
    "tls_params: {tls_minimum_protocol_version: TLSv1_3, tls_maximum_protocol_version: TLSv1_3}"
}

fn tls_certificate(c: &WorkloadCerts) -> String {
    format!(
        "tls_certificates:\n\
         \x20           - certificate_chain: {{filename: \"{}\"}}\n\
         \x20             private_key: {{filename: \"{}\"}}",
        c.chain().display(),
        c.key().display()
    )
}

fn admin() -> &'static str {
    "admin:\n  address: {socket_address: {address: 127.0.0.1, port_value: 0}}\n"
}

/// Bootstrap of the client-side (outbound) Envoy.
pub fn client_bootstrap(certs: &Certs, p: &Ports) -> String {
    let server_id = certs::spiffe_uri(certs::SERVER_SA);
    let cluster = format!("outbound|{}||{SERVICE_HOST}", p.inbound);
    format!(
        r#"{admin}node: {{id: sidecar~127.0.0.1~client.bench~bench.svc.cluster.local, cluster: client.bench}}
static_resources:
  listeners:
  - name: outbound_{out}
    address: {{socket_address: {{address: 127.0.0.1, port_value: {out}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: outbound_{out}
          codec_type: HTTP1
          route_config:
            name: "{inb}"
            virtual_hosts:
            - name: "{host}:{inb}"
              domains: ["{host}", "{host}:{inb}"]
              routes:
              - match: {{prefix: "/"}}
                route: {{cluster: "{cluster}", timeout: 0s}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: "{cluster}"
    type: STATIC
    connect_timeout: 10s
    load_assignment:
      cluster_name: "{cluster}"
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {inb}}}}}}}
    circuit_breakers:
      thresholds: [{{max_connections: 4294967295, max_pending_requests: 4294967295, max_requests: 4294967295, max_retries: 4294967295}}]
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: "outbound_.{inb}_._.{host}"
        common_tls_context:
          {tls_params}
          {tls_cert}
          validation_context:
            trusted_ca: {{filename: "{root}"}}
            match_typed_subject_alt_names:
            - san_type: URI
              matcher: {{exact: "{server_id}"}}
"#,
        admin = admin(),
        out = p.outbound,
        inb = p.inbound,
        host = SERVICE_HOST,
        tls_params = tls_params(),
        tls_cert = tls_certificate(&certs.client),
        root = certs.client.root().display(),
    )
}

/// Bootstrap of the server-side (inbound) Envoy, with the RBAC filter that
/// Istio generates for the bench AuthorizationPolicy (ALLOW principal
/// `cluster.local/ns/bench/sa/client`, methods `[GET]`, paths `["/*"]`).
pub fn server_bootstrap(certs: &Certs, p: &Ports) -> String {
    let client_id = certs::spiffe_uri(certs::CLIENT_SA);
    format!(
        r#"{admin}node: {{id: sidecar~127.0.0.1~server.bench~bench.svc.cluster.local, cluster: server.bench}}
static_resources:
  listeners:
  - name: virtualInbound_{inb}
    address: {{socket_address: {{address: 127.0.0.1, port_value: {inb}}}}}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
          common_tls_context:
            {tls_params}
            {tls_cert}
            validation_context:
              trusted_ca: {{filename: "{root}"}}
              match_typed_subject_alt_names:
              - san_type: URI
                matcher: {{prefix: "spiffe://{td}/"}}
      filters:
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
          route_config:
            name: "inbound|{inb}||"
            virtual_hosts:
            - name: "inbound|http|{inb}"
              domains: ["*"]
              routes:
              - match: {{prefix: "/"}}
                route: {{cluster: "inbound|{inb}||", timeout: 0s}}
          http_filters:
          - name: envoy.filters.http.rbac
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC
              rules:
                action: ALLOW
                policies:
                  ns[bench]-policy[server-allow]-rule[0]:
                    permissions:
                    - and_rules:
                        rules:
                        - or_rules:
                            rules:
                            - header: {{name: ":method", string_match: {{exact: GET}}}}
                        - or_rules:
                            rules:
                            - url_path: {{path: {{prefix: "/"}}}}
                    principals:
                    - and_ids:
                        ids:
                        - or_ids:
                            ids:
                            - authenticated: {{principal_name: {{exact: "{client_id}"}}}}
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: "inbound|{inb}||"
    type: STATIC
    connect_timeout: 10s
    load_assignment:
      cluster_name: "inbound|{inb}||"
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {app}}}}}}}
    circuit_breakers:
      thresholds: [{{max_connections: 4294967295, max_pending_requests: 4294967295, max_requests: 4294967295, max_retries: 4294967295}}]
"#,
        admin = admin(),
        inb = p.inbound,
        app = p.app,
        td = certs::TRUST_DOMAIN,
        tls_params = tls_params(),
        tls_cert = tls_certificate(&certs.server),
        root = certs.server.root().display(),
    )
}

/// The command line of one Envoy: one worker thread, no hot restart (so
/// several can run side by side), admin address written to a file.
pub fn command(envoy: &Path, bootstrap: &Path, admin_address_file: &Path) -> Command {
    let mut cmd = Command::new(envoy);
    cmd.arg("-c")
        .arg(bootstrap)
        .args([
            "--concurrency",
            "1",
            "--disable-hot-restart",
            "--log-level",
            "warn",
        ])
        .arg("--admin-address-path")
        .arg(admin_address_file);
    cmd
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

/// The default Envoy: what `bench/install-envoy.sh` installs and prints.
pub fn install_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("install-envoy.sh")
}
