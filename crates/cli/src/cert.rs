//! `meshward cert ...`: certificate inspection. Parsing and printing only;
//! the facts and the chain verification come from `meshward-identity`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use meshward_identity::bundle::TrustBundle;
use meshward_identity::inspect::{self, InspectReport, Verification};

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Show a certificate (or chain): SPIFFE ID, subject, issuer, serial, key
    /// type, validity, time left and, with --root, whether the chain verifies.
    /// Exits with 1 when verification fails.
    Inspect(InspectArgs),
}

#[derive(Debug, clap::Args)]
pub struct InspectArgs {
    /// PEM file: a certificate, or a chain with the leaf first (e.g. cert-chain.pem).
    file: PathBuf,
    /// PEM file of trusted root(s) to verify the chain against.
    #[arg(long, value_name = "FILE")]
    root: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(cmd: Command) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::Inspect(args) => inspect(args),
    }
}

fn inspect(args: InspectArgs) -> anyhow::Result<ExitCode> {
    let roots = match &args.root {
        Some(path) => Some(
            TrustBundle::from_pem_file(path)
                .with_context(|| format!("loading roots from {}", path.display()))?,
        ),
        None => None,
    };
    let report = inspect::inspect_file(&args.file, roots.as_ref())?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_text(&report);
    }
    Ok(match report.verification {
        Verification::Invalid { .. } => ExitCode::from(1),
        Verification::Valid { .. } | Verification::NotChecked => ExitCode::SUCCESS,
    })
}

fn print_text(report: &InspectReport) {
    for (i, c) in report.certificates.iter().enumerate() {
        let role = match (i, c.is_ca) {
            (0, false) => "leaf",
            (_, true) => "CA",
            _ => "certificate",
        };
        println!("certificate #{i} ({role})");
        println!(
            "  SPIFFE ID:  {}",
            c.spiffe_id.as_deref().unwrap_or("(none)")
        );
        println!("  subject:    {}", empty_as_none(&c.subject));
        println!("  issuer:     {}", empty_as_none(&c.issuer));
        println!("  serial:     {}", c.serial);
        println!("  key type:   {}", c.key_type);
        println!("  not before: {}", c.not_before);
        println!("  not after:  {}", c.not_after);
        println!("  time left:  {}", c.time_left);
    }
    match &report.verification {
        Verification::NotChecked => println!("chain verification: not checked (no --root given)"),
        Verification::Valid { identity: Some(id) } => {
            println!("chain verification: OK (identity {id})")
        }
        Verification::Valid { identity: None } => println!("chain verification: OK"),
        Verification::Invalid { error } => println!("chain verification: FAILED: {error}"),
    }
}

fn empty_as_none(s: &str) -> &str {
    if s.is_empty() { "(empty)" } else { s }
}
