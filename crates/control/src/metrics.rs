//! The control plane's metrics, with Istio's names where istiod has them
//! (`citadel_server_*` for the CA, `pilot_*` for the config push), so that
//! existing dashboards and alerts work. Served as Prometheus text on the
//! admin listener's `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Label of `pilot_xds_pushes` (Istio: `type`).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PushLabels {
    /// What was pushed (`config`).
    pub r#type: String,
}

/// Label of `meshward_ca_refused_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    /// Why (`unauthenticated`, `permission_denied`, `rate_limited`,
    /// `invalid_argument`).
    pub reason: String,
}

/// Every metric of the control plane, registered once.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// `citadel_server_csr_count`: CSRs received.
    pub csr_count: Counter,
    /// `citadel_server_success_cert_issuance_count`: certificates issued.
    pub success_cert_issuance_count: Counter,
    /// `citadel_server_csr_parsing_err_count`: CSRs that did not parse.
    pub csr_parsing_err_count: Counter,
    /// `citadel_server_authentication_failure_count`: callers that proved
    /// no identity.
    pub authentication_failure_count: Counter,
    /// `meshward_ca_refused_total{reason}`: requests refused, by reason.
    pub ca_refused: Family<RefusalLabels, Counter>,
    /// `citadel_server_root_cert_expiry_timestamp`: when the earliest root
    /// of the trust bundle expires (Unix seconds).
    pub root_cert_expiry_timestamp: Gauge,
    /// `citadel_server_cert_chain_expiry_timestamp`: when the signing CA's
    /// own certificate expires (Unix seconds).
    pub cert_chain_expiry_timestamp: Gauge,
    /// `pilot_xds`: connected proxies.
    pub xds_connected: Gauge,
    /// `pilot_xds_pushes{type}`: responses sent.
    pub xds_pushes: Family<PushLabels, Counter>,
    /// `pilot_total_xds_rejects`: NACKs received.
    pub xds_rejects: Counter,
    /// `pilot_proxy_convergence_time`: seconds from a change of the
    /// source to the proxy's ACK of it.
    pub proxy_convergence_time: Histogram,
    /// `meshward_config_rejected_total`: source changes that failed
    /// validation (the last good snapshot kept being served).
    pub config_rejected: Counter,
    /// `meshward_config_version_info`: 1, for the version served now
    /// (set by the source; the label changes with each accepted change).
    pub config_accepted: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let m = Metrics {
            csr_count: Counter::default(),
            success_cert_issuance_count: Counter::default(),
            csr_parsing_err_count: Counter::default(),
            authentication_failure_count: Counter::default(),
            ca_refused: Family::default(),
            root_cert_expiry_timestamp: Gauge::default(),
            cert_chain_expiry_timestamp: Gauge::default(),
            xds_connected: Gauge::default(),
            xds_pushes: Family::default(),
            xds_rejects: Counter::default(),
            proxy_convergence_time: Histogram::new([
                0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            config_rejected: Counter::default(),
            config_accepted: Counter::default(),
            registry: Registry::default(),
        };
        registry.register(
            "citadel_server_csr_count",
            "CSRs received by the CA",
            m.csr_count.clone(),
        );
        registry.register(
            "citadel_server_success_cert_issuance_count",
            "Certificates issued",
            m.success_cert_issuance_count.clone(),
        );
        registry.register(
            "citadel_server_csr_parsing_err_count",
            "CSRs that did not parse",
            m.csr_parsing_err_count.clone(),
        );
        registry.register(
            "citadel_server_authentication_failure_count",
            "CSR requests whose caller proved no identity",
            m.authentication_failure_count.clone(),
        );
        registry.register(
            "meshward_ca_refused",
            "CSR requests refused, by reason",
            m.ca_refused.clone(),
        );
        registry.register(
            "citadel_server_root_cert_expiry_timestamp",
            "Unix time at which the earliest trusted root expires",
            m.root_cert_expiry_timestamp.clone(),
        );
        registry.register(
            "citadel_server_cert_chain_expiry_timestamp",
            "Unix time at which the signing CA certificate expires",
            m.cert_chain_expiry_timestamp.clone(),
        );
        registry.register("pilot_xds", "Connected proxies", m.xds_connected.clone());
        registry.register(
            "pilot_xds_pushes",
            "Config responses sent to proxies",
            m.xds_pushes.clone(),
        );
        registry.register(
            "pilot_total_xds_rejects",
            "Config versions proxies refused (NACK)",
            m.xds_rejects.clone(),
        );
        registry.register(
            "pilot_proxy_convergence_time",
            "Seconds from an accepted source change to a proxy's ACK of it",
            m.proxy_convergence_time.clone(),
        );
        registry.register(
            "meshward_config_rejected",
            "Source changes refused by validation (the last good snapshot is kept)",
            m.config_rejected.clone(),
        );
        registry.register(
            "meshward_config_accepted",
            "Source changes accepted",
            m.config_accepted.clone(),
        );
        Metrics { registry, ..m }
    }

    /// The metrics in Prometheus' text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
