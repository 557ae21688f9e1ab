//! `meshConfig.defaultConfig.terminationDrainDuration`, the one field of
//! Istio's `defaultConfig` (ProxyConfig) meshward acts on: how long a
//! proxy told to stop lets its connections finish. Decoded values, the
//! errors that refuse a mesh config (with file, line and field), and the
//! warning that names the other `defaultConfig` fields.

use std::time::Duration;

use meshward_config::{Diagnostics, Loaded, Loader};

/// A MeshConfig document whose `spec` is `spec` (indented by two spaces);
/// `spec:` is on line 6.
fn mesh(spec: &str) -> String {
    format!(
        "apiVersion: meshward.io/v1alpha1\nkind: MeshConfig\nmetadata:\n  name: mesh\n  namespace: istio-system\nspec:\n{spec}"
    )
}

fn load(text: &str) -> Result<Loaded, Diagnostics> {
    let mut l = Loader::new();
    l.add_source("mesh.yaml", text);
    l.finish()
}

fn drain_of(spec: &str) -> Option<Duration> {
    match load(&mesh(spec)) {
        Ok(loaded) => {
            let warnings: Vec<String> = loaded.warnings.0.iter().map(|d| d.to_string()).collect();
            assert!(warnings.is_empty(), "{spec}: {warnings:?}");
            loaded.config.mesh.termination_drain_duration
        }
        Err(d) => panic!("{spec}: {d}"),
    }
}

#[test]
fn the_drain_duration_is_decoded() {
    assert_eq!(drain_of("  trustDomain: cluster.local\n"), None);
    assert_eq!(drain_of("  defaultConfig: {}\n"), None);
    for (text, want) in [
        ("10s", Duration::from_secs(10)),
        ("1500ms", Duration::from_millis(1500)),
        ("1m30s", Duration::from_secs(90)),
        ("0s", Duration::ZERO),
        ("1h", Duration::from_secs(3600)),
    ] {
        let spec = format!("  defaultConfig:\n    terminationDrainDuration: {text}\n");
        assert_eq!(drain_of(&spec), Some(want), "{text}");
    }
}

#[test]
fn a_bad_drain_duration_refuses_the_mesh_config_naming_the_field() {
    for (text, words) in [
        ("\"5\"", "is not a duration"),
        ("5", "expected a string"),
        ("-1s", "is not a duration"),
        ("soon", "is not a duration"),
        ("1h1s", "at most 1h"),
        ("1500us", "millisecond precision"),
        ("[5s]", "expected a string"),
    ] {
        let spec = format!("  defaultConfig:\n    terminationDrainDuration: {text}\n");
        let Err(d) = load(&mesh(&spec)) else {
            panic!("{text} was accepted");
        };
        let errors: Vec<String> =
            d.0.iter()
                .filter(|d| d.is_error())
                .map(|d| d.to_string())
                .collect();
        assert_eq!(errors.len(), 1, "{text}: {errors:?}");
        let e = &errors[0];
        assert!(
            e.starts_with("mesh.yaml:8: ")
                && e.contains("spec.defaultConfig.terminationDrainDuration")
                && e.contains(words),
            "{text}: {e}"
        );
    }
}

#[test]
fn default_config_that_is_not_a_mapping_is_an_error() {
    let Err(d) = load(&mesh("  defaultConfig: 5s\n")) else {
        panic!("accepted");
    };
    assert!(
        d.to_string()
            .contains("spec.defaultConfig: expected a mapping"),
        "{d}"
    );
}

#[test]
fn other_default_config_fields_are_named_in_one_warning() {
    let spec = "  defaultConfig:\n    holdApplicationUntilProxyStarts: true\n    terminationDrainDuration: 7s\n    concurrency: 2\n";
    let loaded = load(&mesh(spec)).unwrap();
    assert_eq!(
        loaded.config.mesh.termination_drain_duration,
        Some(Duration::from_secs(7))
    );
    let warnings: Vec<String> = loaded.warnings.0.iter().map(|d| d.to_string()).collect();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains("spec.defaultConfig")
            && warnings[0].contains(
                "does not act on these defaultConfig settings: holdApplicationUntilProxyStarts, concurrency"
            ),
        "{}",
        warnings[0]
    );
}
