//! meshward's gRPC APIs, generated at build time from `proto/`:
//! - [`istio::v1::auth`]: Istio's `IstioCertificateService`, wire-compatible
//!   with istio-agent (`CreateCertificate`);
//! - [`meshward::control::v1`]: the control plane's per-proxy config stream.

#![allow(missing_docs, clippy::all, missing_debug_implementations)]

pub mod istio {
    pub mod v1 {
        pub mod auth {
            tonic::include_proto!("istio.v1.auth");
        }
    }
}

pub mod meshward {
    pub mod control {
        pub mod v1 {
            tonic::include_proto!("meshward.control.v1");
        }
    }
}

pub use istio::v1::auth as ca;
pub use meshward::control::v1 as config;
