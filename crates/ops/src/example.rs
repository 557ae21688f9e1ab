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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every file of examples/shop/policies is compiled in, and nothing else.
    #[test]
    fn the_built_in_example_is_the_whole_policies_directory() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/shop/policies");
        let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        on_disk.sort();
        let compiled: Vec<String> = POLICIES.iter().map(|(n, _)| n.to_string()).collect();
        assert_eq!(compiled, on_disk);
    }
}
