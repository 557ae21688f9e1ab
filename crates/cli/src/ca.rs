//! `meshward ca ...`: create a root and signing intermediates in Istio's
//! `cacerts` layout, and issue workload certificates. Parsing and printing
//! only; the CA logic lives in `meshward-identity`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use meshward_identity::ca::{
    self, CaOptions, CaSettings, CertificateAuthority, ChosenTrustDomain, DEFAULT_MAX_WORKLOAD_TTL,
    RootCa,
};
use meshward_identity::duration::parse_duration;
use meshward_identity::issue::{self, WorkloadKey};
use meshward_identity::keys::KeyType;
use meshward_identity::spiffe::{SpiffeId, TrustDomain};

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Create a root CA and a signing intermediate in Istio's `cacerts`
    /// layout (ca-cert.pem, ca-key.pem, root-cert.pem, cert-chain.pem, plus
    /// root-key.pem to be moved offline). With --root, create another
    /// intermediate under an existing root (e.g. for a second cluster).
    Init(InitArgs),
    /// Issue a workload certificate: a key and CSR are generated locally and
    /// the CSR is signed by the CA, as the CA service does. Writes key.pem
    /// (mode 0600), cert-chain.pem (leaf first) and root-cert.pem.
    Issue(IssueArgs),
}

#[derive(Debug, clap::Args)]
pub struct InitArgs {
    /// Directory to write the `cacerts` files into (created if absent).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Existing root directory (root-cert.pem + root-key.pem): create only a new intermediate under it.
    #[arg(long, value_name = "DIR")]
    root: Option<PathBuf>,
    /// Trust domain, written into the CA certificates as spiffe://TRUST_DOMAIN
    /// [default: with --root, the one the root names, else cluster.local].
    #[arg(long, value_parser = parse_trust_domain)]
    trust_domain: Option<TrustDomain>,
    /// Organisation (subject O=) of the CA certificates.
    #[arg(
        long,
        alias = "organisation",
        alias = "organization",
        default_value = "meshward"
    )]
    org: String,
    /// Key type: ec-p256, ec-p384, rsa-2048, rsa-3072, rsa-4096.
    #[arg(long, default_value = "ec-p256", value_parser = parse_key_type)]
    key_type: KeyType,
    /// Root lifetime (e.g. 10y, 3650d).
    #[arg(long, default_value = "10y", value_parser = parse_lifetime)]
    root_lifetime: Duration,
    /// Intermediate lifetime (capped at the root's expiry).
    #[arg(long, alias = "intermediate-lifetime", default_value = "2y", value_parser = parse_lifetime)]
    lifetime: Duration,
    /// Overwrite existing files in --out.
    #[arg(long)]
    force: bool,
}

#[derive(Debug, clap::Args)]
pub struct IssueArgs {
    /// CA directory in the `cacerts` layout.
    #[arg(long, value_name = "DIR")]
    ca: PathBuf,
    /// Workload identity: spiffe://TRUST_DOMAIN/ns/NAMESPACE/sa/SERVICE_ACCOUNT.
    #[arg(long, value_name = "SPIFFE_ID", value_parser = parse_workload_id)]
    id: SpiffeId,
    /// Directory to write key.pem, cert-chain.pem and root-cert.pem into.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Certificate lifetime (capped by --max-ttl and by the CA's expiry).
    #[arg(long, default_value = "24h", value_parser = parse_lifetime)]
    ttl: Duration,
    /// Upper bound for --ttl.
    #[arg(long, value_parser = parse_lifetime)]
    max_ttl: Option<Duration>,
    /// Trust domain of the CA [default: the one ca-cert.pem names in a
    /// spiffe://TRUST_DOMAIN URI SAN, else cluster.local, Istio's default].
    #[arg(long, value_parser = parse_trust_domain)]
    trust_domain: Option<TrustDomain>,
    /// Workload key type.
    #[arg(long, default_value = "ec-p256", value_parser = parse_key_type)]
    key_type: KeyType,
    /// Overwrite existing files in --out.
    #[arg(long)]
    force: bool,
}

pub fn run(cmd: Command) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::Init(args) => init(args),
        Command::Issue(args) => issue(args),
    }
}

/// How an operator overrides the trust domain chosen for them.
const OVERRIDE_HINT: &str = "pass --trust-domain TRUST_DOMAIN to use another";

/// Tells the operator when a CA's trust domain is Istio's default rather
/// than one they or the certificate named.
fn note_default(chosen: &ChosenTrustDomain) {
    if let Some(notice) = chosen.notice(OVERRIDE_HINT) {
        eprintln!("note: {notice}");
    }
}

fn init(args: InitArgs) -> anyhow::Result<ExitCode> {
    // A new root is made for --trust-domain (default cluster.local); under
    // an existing root the trust domain follows the same rule as loading a
    // CA: --trust-domain, else the root's, else cluster.local (with a note).
    let (root, trust_domain) = match &args.root {
        Some(dir) => {
            let root = RootCa::load_dir(dir)
                .with_context(|| format!("loading the root from {}", dir.display()))?;
            let chosen = ChosenTrustDomain::choose(
                args.trust_domain.clone(),
                root.trust_domain(),
                &dir.join(ca::ROOT_CERT_FILE),
            )?;
            note_default(&chosen);
            (Some(root), chosen.trust_domain().clone())
        }
        None => (
            None,
            args.trust_domain
                .clone()
                .unwrap_or_else(TrustDomain::istio_default),
        ),
    };
    let opts = |key_type, lifetime| CaOptions {
        trust_domain: trust_domain.clone(),
        organization: args.org.clone(),
        common_name: None,
        key_type,
        lifetime,
    };
    let (root, new_root) = match root {
        Some(root) => (root, false),
        None => (
            RootCa::generate(&opts(args.key_type, args.root_lifetime))
                .context("creating the root")?,
            true,
        ),
    };
    if new_root && !args.force {
        let p = args.out.join(ca::ROOT_KEY_FILE);
        anyhow::ensure!(
            !p.exists(),
            "{}: already exists (use --force to overwrite)",
            p.display()
        );
    }
    let material = root
        .new_intermediate(&opts(args.key_type, args.lifetime))
        .context("creating the intermediate")?;
    // Validate exactly as a plug-in CA is loaded before writing anything.
    let loaded = CertificateAuthority::from_material(&material, CaSettings::default())
        .context("self-check of the new CA")?;
    material.write_dir(&args.out, args.force)?;
    if new_root {
        root.write_key(&args.out, args.force)?;
    }

    println!(
        "wrote CA for trust domain {} to {}",
        loaded.trust_domain(),
        args.out.display()
    );
    println!(
        "  {}   signing intermediate ({}), valid until {}",
        ca::CA_CERT_FILE,
        args.key_type,
        loaded.not_after()
    );
    println!("  {}    its private key (mode 0600)", ca::CA_KEY_FILE);
    println!(
        "  {}  root, valid until {}",
        ca::ROOT_CERT_FILE,
        root.not_after()
    );
    println!("  {} intermediate then root", ca::CERT_CHAIN_FILE);
    if new_root {
        println!(
            "  {}  root private key (mode 0600): move it offline; it is needed only for `ca init --root`",
            ca::ROOT_KEY_FILE
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn issue(args: IssueArgs) -> anyhow::Result<ExitCode> {
    let settings = CaSettings {
        trust_domain: args.trust_domain.clone(),
        max_ttl: args.max_ttl.unwrap_or(DEFAULT_MAX_WORKLOAD_TTL),
        ..CaSettings::default()
    };
    let ca = CertificateAuthority::load_dir(&args.ca, settings)
        .with_context(|| format!("loading the CA from {}", args.ca.display()))?;
    note_default(ca.chosen_trust_domain());
    // The same path as the CA service: the key stays here, the CA sees a CSR
    // and the identity the caller is entitled to (here: the operator's --id).
    let key = WorkloadKey::generate(args.key_type)?;
    let csr = key.csr_der(&args.id)?;
    let issued = ca.sign_csr(&csr, &args.id, Some(args.ttl))?;
    issue::write_workload_files(&args.out, &key, &issued, args.force)?;
    print_issued(&args.out, &issued);
    Ok(ExitCode::SUCCESS)
}

fn print_issued(out: &Path, issued: &issue::IssuedCertificate) {
    println!("issued {} to {}", issued.id(), out.display());
    println!("  serial     {}", issued.serial());
    let rfc3339 = |t: time::OffsetDateTime| {
        t.replace_nanosecond(0)
            .unwrap_or(t)
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_else(|_| t.to_string())
    };
    println!("  not before {}", rfc3339(issued.not_before()));
    println!("  not after  {}", rfc3339(issued.not_after()));
    println!("  {}    private key (mode 0600)", issue::KEY_FILE);
    println!(
        "  {} leaf + CA chain ({} certificates)",
        issue::WORKLOAD_CHAIN_FILE,
        issued.chain().len()
    );
    println!("  {}  root", issue::WORKLOAD_ROOT_FILE);
}

fn parse_trust_domain(s: &str) -> Result<TrustDomain, String> {
    TrustDomain::new(s).map_err(|e| e.to_string())
}

fn parse_key_type(s: &str) -> Result<KeyType, String> {
    s.parse::<KeyType>().map_err(|e| e.to_string())
}

fn parse_lifetime(s: &str) -> Result<Duration, String> {
    parse_duration(s).map_err(|e| e.to_string())
}

fn parse_workload_id(s: &str) -> Result<SpiffeId, String> {
    SpiffeId::parse_workload(s).map_err(|e| e.to_string())
}
