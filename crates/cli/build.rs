//! Names the build in `meshward --version`: `MESHWARD_BUILD` (set by
//! `scripts/release.sh` to `pgo` for the profile-guided release build) is
//! appended in parentheses; a plain `cargo build` prints the bare version.

fn main() {
    println!("cargo:rerun-if-env-changed=MESHWARD_BUILD");
    let version = std::env::var("CARGO_PKG_VERSION").unwrap_or_default();
    let full = match std::env::var("MESHWARD_BUILD") {
        Ok(build) if !build.trim().is_empty() => format!("{version} ({})", build.trim()),
        _ => version,
    };
    println!("cargo:rustc-env=MESHWARD_VERSION={full}");
}
