//! The `meshward.io/` annotations: the facts Istio learns from a pod that a
//! WorkloadEntry or ServiceEntry must state outside Kubernetes (README,
//! "Running the sidecar"), and the Istio traffic-capture annotations
//! meshward honours. The proxy, the analysis and the live commands
//! read them through this module, so they agree on what each means.

use crate::ObjectMeta;

/// On a WorkloadEntry: where the application listens, per port name:
/// `"http=127.0.0.1:18080,metrics=19090"` (a bare port means 127.0.0.1).
/// Default: 127.0.0.1 and the workload port.
pub const APP_PORTS: &str = "meshward.io/app-ports";
/// On a WorkloadEntry: `"false"` when the workload runs without a sidecar,
/// so callers send it plaintext under auto-mTLS. On a ServiceEntry:
/// `"true"` when its listed `endpoints` run one.
pub const HAS_PROXY: &str = "meshward.io/proxy";
/// On a WorkloadEntry: the address of its outbound HTTP listener (where
/// the application sends plaintext requests), e.g. `"127.0.0.1:15001"`.
pub const OUTBOUND: &str = "meshward.io/outbound";
/// On a WorkloadEntry: local TCP listeners for TCP services,
/// `"127.0.0.1:15432=db.prod.svc.cluster.local:5432,..."`.
pub const TCP_OUTBOUND: &str = "meshward.io/tcp-outbound";

/// Whether the WorkloadEntry with `meta` runs a sidecar: yes unless
/// annotated `meshward.io/proxy: "false"`.
pub fn workload_has_proxy(meta: &ObjectMeta) -> bool {
    meta.annotations.get(HAS_PROXY).is_none_or(|v| v != "false")
}

/// Whether the endpoints listed in the ServiceEntry with `meta` run a
/// sidecar: only when annotated `meshward.io/proxy: "true"`.
pub fn listed_endpoints_have_proxy(meta: &ObjectMeta) -> bool {
    meta.annotations.get(HAS_PROXY).is_some_and(|v| v == "true")
}

/// Istio's traffic-capture annotation (on a WorkloadEntry here, on a pod
/// in Istio): only outbound traffic to these CIDRs is captured, `*` all
/// (the default), `""` none.
pub const INCLUDE_OUTBOUND_IP_RANGES: &str = "traffic.sidecar.istio.io/includeOutboundIPRanges";
/// Istio's traffic-capture annotation: outbound traffic to these CIDRs is
/// never captured.
pub const EXCLUDE_OUTBOUND_IP_RANGES: &str = "traffic.sidecar.istio.io/excludeOutboundIPRanges";
/// Istio's traffic-capture annotation: outbound traffic to these ports is
/// never captured.
pub const EXCLUDE_OUTBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeOutboundPorts";
/// Istio's traffic-capture annotation: only inbound traffic to these
/// ports is captured, `*` all (meshward's default), `""` none.
pub const INCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/includeInboundPorts";
/// Istio's traffic-capture annotation: inbound traffic to these ports is
/// never captured.
pub const EXCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeInboundPorts";
/// Every traffic-capture annotation meshward honours (read by
/// `meshward-capture`).
pub const CAPTURE: [&str; 5] = [
    INCLUDE_OUTBOUND_IP_RANGES,
    EXCLUDE_OUTBOUND_IP_RANGES,
    EXCLUDE_OUTBOUND_PORTS,
    INCLUDE_INBOUND_PORTS,
    EXCLUDE_INBOUND_PORTS,
];
