//! `meshward control`: the control plane (CA service and config push), and
//! `meshward control token`: a bootstrap token for one service account.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use meshward_control::authority::{Authority, CaSource};
use meshward_control::{Metrics, Options};
use meshward_identity::TrustDomain;
use meshward_identity::duration::parse_duration;

/// The state directory of the self-signed root, under the working directory.
const DEFAULT_STATE_DIR: &str = "meshward-control";

#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Mint a bootstrap token that lets one service account obtain its
    /// first certificate (printed on stdout).
    Token(TokenArgs),
}

/// Where the CA comes from (shared by `control` and `control token`).
#[derive(Debug, clap::Args)]
struct CaArgs {
    /// Plug-in CA in Istio's cacerts layout (ca-cert.pem, ca-key.pem,
    /// root-cert.pem, cert-chain.pem); re-read when its files change.
    #[arg(long, value_name = "DIR", conflicts_with = "state")]
    ca: Option<PathBuf>,
    /// Without --ca: the directory of the self-signed root (created on
    /// first start, reused after).
    #[arg(long, value_name = "DIR", default_value = DEFAULT_STATE_DIR)]
    state: PathBuf,
    /// Trust domain (default: the CA certificate's, else cluster.local).
    #[arg(long, value_name = "NAME")]
    trust_domain: Option<TrustDomain>,
}

impl CaArgs {
    fn source(&self) -> CaSource {
        match &self.ca {
            Some(dir) => CaSource::PlugIn(dir.clone()),
            None => CaSource::SelfSigned(self.state.clone()),
        }
    }
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// Files or directories of mesh resources (the watched source).
    #[arg(long = "config", short = 'c', value_name = "PATH")]
    config: Vec<PathBuf>,
    /// Mesh settings (Istio's meshConfig block).
    #[arg(long, value_name = "FILE")]
    mesh_config: Option<PathBuf>,
    #[command(flatten)]
    ca: CaArgs,
    /// gRPC listener (CA and config push, over TLS); port 0 for an ephemeral one.
    #[arg(long, default_value_t = meshward_control::DEFAULT_LISTEN)]
    listen: SocketAddr,
    /// Admin listener: readiness, debug, metrics.
    #[arg(long, default_value_t = meshward_control::DEFAULT_ADMIN)]
    admin: SocketAddr,
    /// The control plane's own identity, NAMESPACE/SERVICE_ACCOUNT.
    #[arg(long, value_name = "NS/SA", default_value = "istio-system/istiod", value_parser = parse_identity)]
    identity: (String, String),
    /// Extra DNS name or IP of the server certificate (repeatable).
    #[arg(long = "san", value_name = "NAME|IP")]
    sans: Vec<String>,
    /// Workload certificate lifetime when the request asks for none.
    #[arg(long, default_value = "24h", value_parser = parse_ttl)]
    default_cert_ttl: Duration,
    /// Requested workload certificate lifetimes are capped to this.
    #[arg(long, default_value = "90d", value_parser = parse_ttl)]
    max_cert_ttl: Duration,
    /// Log filter for stderr (tracing syntax, e.g. `info,meshward=debug`).
    #[arg(long, default_value = "info")]
    log: String,
}

#[derive(Debug, clap::Args)]
struct TokenArgs {
    /// The workload's namespace.
    #[arg(long, short = 'n')]
    namespace: String,
    /// The workload's service account.
    #[arg(long, short = 's')]
    service_account: String,
    /// Token lifetime (at most 24h).
    #[arg(long, default_value = "1h", value_parser = parse_token_ttl)]
    ttl: Duration,
    #[command(flatten)]
    ca: CaArgs,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    match args.command {
        Some(Command::Token(t)) => token(t),
        None => serve(args.serve),
    }
}

fn token(args: TokenArgs) -> anyhow::Result<ExitCode> {
    let source = args.ca.source();
    if let CaSource::SelfSigned(dir) = &source
        && !dir.join(meshward_identity::ca::CA_CERT_FILE).exists()
    {
        anyhow::bail!(
            "{}: no CA here: start `meshward control` once to create its root (or pass --ca DIR or --state DIR)",
            dir.display()
        );
    }
    let mut options = Options::new(source);
    options.trust_domain = args.ca.trust_domain;
    let authority = Authority::load(options.authority(), Arc::new(Metrics::new()))?;
    let token = meshward_control::token::mint(
        &authority.ca(),
        &args.namespace,
        &args.service_account,
        Some(args.ttl),
    )?;
    println!("{token}");
    Ok(ExitCode::SUCCESS)
}

fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    crate::process::init_logging(&args.log)?;
    if args.default_cert_ttl > args.max_cert_ttl {
        anyhow::bail!("--default-cert-ttl must not exceed --max-cert-ttl");
    }
    let mut options = Options::new(args.ca.source());
    options.config = args.config;
    options.mesh_config = args.mesh_config;
    options.trust_domain = args.ca.trust_domain;
    options.listen = args.listen;
    options.admin = args.admin;
    options.identity = args.identity;
    options.sans = args.sans;
    options.default_cert_ttl = args.default_cert_ttl;
    options.max_cert_ttl = args.max_cert_ttl;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    rt.block_on(async move {
        let cp = meshward_control::start(options).await?;
        eprintln!(
            "{{\"grpc\":\"{}\",\"admin\":\"{}\"}}",
            cp.grpc_addr(),
            cp.admin_addr()
        );
        let mut signals = crate::process::Signals::new()?;
        let stop = signals.next().await;
        tracing::info!(signal = stop.name(), "shutting down");
        cp.shutdown().await;
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(ExitCode::SUCCESS)
}

fn parse_identity(s: &str) -> Result<(String, String), String> {
    match s.split_once('/') {
        Some((ns, sa)) if !ns.is_empty() && !sa.is_empty() && !sa.contains('/') => {
            Ok((ns.to_owned(), sa.to_owned()))
        }
        _ => Err(format!(
            "\"{s}\" is not NAMESPACE/SERVICE_ACCOUNT (e.g. istio-system/istiod)"
        )),
    }
}

fn parse_ttl(s: &str) -> Result<Duration, String> {
    match parse_duration(s) {
        Ok(d) if d.is_zero() => Err("must be at least 1s".into()),
        Ok(d) => Ok(d),
        Err(e) => Err(e.to_string()),
    }
}

fn parse_token_ttl(s: &str) -> Result<Duration, String> {
    let d = parse_ttl(s)?;
    if d > meshward_control::token::MAX_TOKEN_TTL {
        return Err("must be at most 24h".into());
    }
    Ok(d)
}
