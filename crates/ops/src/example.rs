//! The built-in example `meshward up` runs without a directory: the shop
//! of `examples/shop` (the seed articles' mesh), compiled into the binary.

use std::path::Path;

use crate::OpsError;

/// The shop's configuration files, by name.
pub const POLICIES: &[(&str, &str)] = &[
    (
        "authorization.yaml",
        include_str!("../../../examples/shop/policies/authorization.yaml"),
    ),
    (
        "mesh.yaml",
        include_str!("../../../examples/shop/policies/mesh.yaml"),
    ),
    (
        "peer-authentication.yaml",
        include_str!("../../../examples/shop/policies/peer-authentication.yaml"),
    ),
    (
        "services.yaml",
        include_str!("../../../examples/shop/policies/services.yaml"),
    ),
    (
        "workloads.yaml",
        include_str!("../../../examples/shop/policies/workloads.yaml"),
    ),
];

/// The shop's example calls (`examples/shop/calls.yaml`).
pub const CALLS: &str = include_str!("../../../examples/shop/calls.yaml");

/// Writes the shop's configuration into `dir` (created).
pub fn write_policies(dir: &Path) -> Result<(), OpsError> {
    std::fs::create_dir_all(dir).map_err(|e| OpsError::io(dir.display().to_string(), e))?;
    for (name, text) in POLICIES {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(|e| OpsError::io(path.display().to_string(), e))?;
    }
    Ok(())
}
