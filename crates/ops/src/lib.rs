//! Live operations on a running mesh, the part of the `meshward` CLI that
//! talks to running processes:
//!
//! - [`up`]: a whole mesh on one host (control plane, one proxy per
//!   workload, echo applications), from a configuration directory or the
//!   built-in example;
//! - [`call`]: one request as a workload, through its sidecar, with the
//!   decision the destination recorded;
//! - [`live`]: what the control plane knows (proxies, their admin
//!   addresses, the configuration it serves), which the read-only
//!   commands (`status`, `proxy-config`, `describe`, `mtls report`) start
//!   from, as `istioctl` starts from istiod.
//!
//! Everything here is a client of the admin endpoints the control plane
//! and the proxies serve; nothing decides policy (that is
//! `meshward-policy`'s) or enforces it (`meshward-proxy`'s).

pub mod admin;
pub mod call;
pub mod echo;
pub mod example;
pub mod live;
pub mod mesh;
pub mod proxy_config;
pub mod report;
pub mod status;
pub mod text;
pub mod up;

/// Why an operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpsError {
    /// An admin endpoint could not be reached or answered badly.
    #[error("{what} {addr}{path}: {reason}")]
    Admin {
        what: &'static str,
        addr: std::net::SocketAddr,
        path: String,
        reason: String,
    },
    /// The user asked for something that does not exist or is ambiguous.
    #[error("{0}")]
    NotFound(String),
    /// Input that cannot be used (a URL, a header, a calls file).
    #[error("{0}")]
    Invalid(String),
    /// The configuration does not load.
    #[error("the configuration does not load:\n{0}")]
    Config(String),
    /// Starting or running a process of the mesh failed.
    #[error("{0}")]
    Process(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl OpsError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> OpsError {
        OpsError::Io {
            context: context.into(),
            source,
        }
    }
}
