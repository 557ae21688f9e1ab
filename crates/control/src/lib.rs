//! The meshward control plane (`meshward control`): it watches a config
//! source, runs the mesh CA, and serves two gRPC services over TLS:
//! - Istio's `istio.v1.auth.IstioCertificateService/CreateCertificate`,
//!   which signs a workload's CSR for exactly the identity it proved (a
//!   bootstrap token for the first certificate, its current mesh
//!   certificate for a renewal);
//! - `meshward.control.v1.ConfigDiscoveryService/StreamConfig`, one stream
//!   per proxy, pushing a versioned snapshot of what that workload needs
//!   (its documents, the mesh settings, the trust bundle), which the proxy
//!   ACKs or NACKs.
//!
//! It keeps no state besides its CA material and its source: several
//! replicas over the same plug-in CA and config directory serve the same
//! identities and configuration.

#![forbid(unsafe_code)]

pub mod admin;
pub mod metrics;
pub mod peer;
pub mod push;
pub mod registry;
pub mod snapshot;
pub mod source;

pub use metrics::Metrics;
pub use peer::PeerInfo;
