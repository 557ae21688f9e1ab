//! Names the build in `meshward --version`: `MESHWARD_BUILD` (set by
//! `scripts/release.sh` to `pgo` for the profile-guided release build) is
//! appended in parentheses; a plain `cargo build` prints the bare version.

fn main() {
    println!("cargo:rerun-if-env-changed=MESHWARD_BUILD");
    let version = std::env::var("CARGO_PKG_VERSION").unwrap_or_default();
    let full = match std::env::var("MESHWARD_BUILD") {
        Ok(build) if !build.trim().is_empty() => {
            let build = build.trim();
            // It ends up in a cargo directive and in `--version`: a short
            // word, nothing that could start another line.
            assert!(
                build.len() <= 32
                    && build
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')),
                "MESHWARD_BUILD must be at most 32 letters, digits, '.', '-' or '_', got {build:?}"
            );
            format!("{version} ({build})")
        }
        _ => version,
    };
    println!("cargo:rustc-env=MESHWARD_VERSION={full}");
}
