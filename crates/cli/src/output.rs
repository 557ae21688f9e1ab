//! Shared helpers: loading config for a command and printing diagnostics.

use std::path::PathBuf;

use anyhow::{Context, bail};
use meshward_config::{Diagnostics, Loaded, Loader};

/// Paths of resources plus an optional Istio `meshConfig` file.
#[derive(Debug, clap::Args)]
pub struct ConfigArgs {
    /// Files or directories of Istio resources (multi-document YAML).
    #[arg(long = "config", short = 'c', value_name = "PATH", required = true)]
    pub config: Vec<PathBuf>,
    /// Mesh settings (rootNamespace, trustDomain, extensionProviders, ...):
    /// a file holding Istio's meshConfig block, Helm values with
    /// `meshConfig:`, or an IstioOperator with `spec.meshConfig`.
    #[arg(long, value_name = "FILE")]
    pub mesh_config: Option<PathBuf>,
}

/// Loads the config all-or-nothing; prints warnings to stderr.
pub fn load(paths: &[PathBuf], mesh_config: Option<&PathBuf>) -> Result<Loaded, Diagnostics> {
    let mut loader = Loader::new();
    if let Some(mc) = mesh_config {
        loader.add_mesh_config_path(mc);
    }
    for p in paths {
        loader.add_path(p);
    }
    loader.finish()
}

/// Loads for commands that need a valid set: errors become a failure.
pub fn load_or_fail(args: &ConfigArgs) -> anyhow::Result<Loaded> {
    match load(&args.config, args.mesh_config.as_ref()) {
        Ok(loaded) => {
            print_warnings(&loaded.warnings);
            Ok(loaded)
        }
        Err(diags) => {
            eprint!("{diags}");
            bail!(
                "the configuration is invalid ({} errors); nothing was evaluated",
                diags.errors().count()
            )
        }
    }
}

pub fn print_warnings(d: &Diagnostics) {
    for w in d.warnings() {
        eprintln!("{w}");
    }
}

/// Parses `key=value`.
pub fn key_value(s: &str) -> anyhow::Result<(String, String)> {
    let (k, v) = s
        .split_once('=')
        .with_context(|| format!("expected key=value, got \"{s}\""))?;
    Ok((k.to_string(), v.to_string()))
}

/// How a command names the destination workload.
#[derive(Debug, clap::Args)]
pub struct WorkloadArgs {
    /// Namespace of the workload (with --label / --service-account), when it
    /// is not named as a WorkloadEntry.
    #[arg(long, short = 'n', value_name = "NS")]
    pub namespace: Option<String>,
    /// A pod label of the workload, `key=value`; repeat for several.
    #[arg(long = "label", short = 'l', value_name = "KEY=VALUE", value_parser = key_value)]
    pub labels: Vec<(String, String)>,
    /// The workload's service account.
    #[arg(long, value_name = "SA")]
    pub service_account: Option<String>,
}

/// Resolves a workload: `ns/name` of a WorkloadEntry in the config, else the
/// namespace, labels and service account given as flags (a bare `ns/name`
/// with no matching WorkloadEntry means labels `app=name`).
pub fn resolve_workload(
    config: &meshward_config::ConfigSet,
    name: Option<&str>,
    args: &WorkloadArgs,
) -> anyhow::Result<meshward_policy::Workload> {
    let mut workload = meshward_policy::Workload::default();
    if let Some(name) = name {
        let (ns, n) = name
            .split_once('/')
            .with_context(|| format!("workload \"{name}\" must be written namespace/name"))?;
        match config
            .workload_entries
            .iter()
            .find(|e| e.meta.namespace == ns && e.meta.name == n)
        {
            Some(entry) => workload = meshward_policy::Workload::from_entry(entry),
            None => {
                workload.namespace = ns.to_string();
                workload.service_account = n.to_string();
                if args.labels.is_empty() {
                    workload.labels.insert("app".to_string(), n.to_string());
                    eprintln!(
                        "note: no WorkloadEntry {name}; assuming labels app={n} and service account {n}"
                    );
                }
            }
        }
    } else {
        workload.namespace = args
            .namespace
            .clone()
            .context("name the workload: --workload NS/NAME, or --namespace with --label")?;
        workload.service_account = "default".to_string();
    }
    if let Some(ns) = &args.namespace
        && name.is_some()
        && ns != &workload.namespace
    {
        bail!(
            "--namespace {ns} contradicts workload {}",
            name.unwrap_or_default()
        );
    }
    workload.labels.extend(args.labels.iter().cloned());
    if let Some(sa) = &args.service_account {
        workload.service_account = sa.clone();
    }
    Ok(workload)
}

/// How a live command prints its result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Tables and sentences.
    Text,
    /// JSON, for scripts.
    Json,
}
