//! `meshward validate PATH...`

use std::path::PathBuf;
use std::process::ExitCode;

use crate::output;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Files or directories of Istio resources.
    #[arg(required = true, value_name = "PATH")]
    paths: Vec<PathBuf>,
    /// Mesh settings: a file holding Istio's meshConfig block, Helm values
    /// with `meshConfig:`, or an IstioOperator with `spec.meshConfig`.
    #[arg(long, value_name = "FILE")]
    mesh_config: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    match output::load(&args.paths, args.mesh_config.as_ref()) {
        Ok(loaded) => {
            output::print_warnings(&loaded.warnings);
            let counts = loaded.config.counts();
            let total: usize = counts.iter().map(|(_, n)| n).sum();
            let parts: Vec<String> = counts.iter().map(|(k, n)| format!("{n} {k}")).collect();
            let warnings = loaded.warnings.warnings().count();
            println!(
                "valid: {total} resources{}{}",
                if parts.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", parts.join(", "))
                },
                if warnings > 0 {
                    format!(", {warnings} warnings")
                } else {
                    String::new()
                }
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(diags) => {
            for d in &diags.0 {
                println!("{d}");
            }
            let errors = diags.errors().count();
            println!(
                "invalid: {errors} error{}; nothing was accepted",
                if errors == 1 { "" } else { "s" }
            );
            Ok(ExitCode::from(1))
        }
    }
}
