//! Istio-compatible configuration for meshward.
//!
//! This crate owns the resource model (PeerAuthentication,
//! AuthorizationPolicy, RequestAuthentication, DestinationRule, ServiceEntry,
//! WorkloadEntry and the mesh settings), reading it from the same
//! multi-document YAML users apply to Istio, and validating it by Istio's
//! rules. Every problem is reported with file, line, resource and field path,
//! all of them in one pass, and a set with any error is rejected whole.
//!
//! It performs no policy decisions (see `meshward-policy`) and no network
//! I/O; the only I/O is reading the files it is pointed at.

#![forbid(unsafe_code)]

pub mod annotations;
pub mod decode;
pub mod diag;
mod load;
pub mod model;
mod served;
pub mod values;
pub mod yaml;

pub use diag::{Diagnostic, Diagnostics, Severity};
pub use load::{
    ConfigSet, DRY_RUN_ANNOTATION, Emptied, Kind, Loaded, Loader, MAX_FILE_BYTES, config_files,
    emptied, load_paths, parse_go_bool,
};
pub use model::mesh::{MeshConfig, PathNormalization};
pub use model::{ObjectMeta, Origin, Resource, WorkloadSelector};
pub use served::{MESH_CONFIG_ORIGIN, load_served};
