//! The Envoy pair, configured the way Istio configures sidecars (static
//! bootstrap instead of xDS, `meshward_test_support::envoy`): the
//! client-side Envoy takes plaintext HTTP from the load generator and
//! originates mTLS to the server-side Envoy, which applies an RBAC filter
//! equivalent to the bench AuthorizationPolicy and forwards to the app. One
//! worker thread each (`--concurrency 1`).
//!
//! Left out compared with a real istio-proxy: the telemetry filters
//! (`istio.stats`, metadata exchange) and xDS. That makes this Envoy a bit
//! cheaper than a real sidecar, i.e. a conservative baseline for meshward.

use meshward_test_support::envoy::{Allow, Client, Server, Sidecar};

use crate::certs::{self, Certs};

pub const SERVICE_HOST: &str = "server.bench.svc.cluster.local";

/// Ports the pair needs.
#[derive(Debug)]
pub struct Ports {
    pub outbound: u16,
    pub inbound: u16,
    pub app: u16,
}

/// Bootstrap of the client-side (outbound) Envoy.
pub fn client_bootstrap(certs: &Certs, p: &Ports) -> String {
    Client {
        sidecar: sidecar(certs::CLIENT_SA, &certs.client),
        listen: p.outbound,
        host: Some(SERVICE_HOST),
        routes: &[("/", p.inbound)],
        server_id: &certs.server_id,
    }
    .bootstrap()
}

/// Bootstrap of the server-side (inbound) Envoy, with the RBAC filter that
/// Istio generates for the bench AuthorizationPolicy (ALLOW principal
/// `cluster.local/ns/bench/sa/client`, methods `[GET]`, paths `["/*"]`).
pub fn server_bootstrap(certs: &Certs, p: &Ports) -> String {
    Server {
        sidecar: sidecar(certs::SERVER_SA, &certs.server),
        listen: p.inbound,
        routes: &[("/", p.app)],
        allow: Allow {
            policy: "ns[bench]-policy[server-allow]-rule[0]",
            principal: &certs.client_id,
            methods: &["GET"],
            path_prefix: Some("/"),
        },
    }
    .bootstrap()
}

fn sidecar<'a>(name: &'a str, certs: &'a meshward_test_support::ca::WorkloadCerts) -> Sidecar<'a> {
    Sidecar {
        namespace: certs::NAMESPACE,
        name,
        certs,
        alpn: &[],
        websocket: false,
    }
}
