//! `meshward-control-bench`: issue 17's control-plane benchmarks against a
//! real `meshward control` process on 127.0.0.1.
//!
//! - **push**: N simulated proxies in this process (each its own TLS
//!   connection and `StreamConfig` stream, authenticated by a certificate
//!   the control plane issued for its workload's service account) ACK every
//!   version; the control plane's resident memory with all N connected;
//!   then R policy changes concerning every workload, each written with
//!   write-then-rename, timed from the write until the last of the N has
//!   ACKed the version carrying it.
//! - **issuance**: C concurrent callers, each on its own TLS connection,
//!   call `CreateCertificate` for D seconds with CSRs generated before the
//!   timed part, authenticated by bootstrap tokens of many service accounts
//!   (the CA rate-limits each caller identity); certificates per second,
//!   latency percentiles and the control plane's CPU seconds.
//!
//! See `bench/README.md`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use clap::Parser;
use hdrhistogram::Histogram;
use meshward_control::authority::{Authority, CaSource};
use meshward_control::{Metrics, Options};
use meshward_identity::credentials::CurrentCredentials;
use meshward_identity::{
    CredentialResolver, KeyType, SpiffeId, SpiffeServerVerifier, SvidVerifier, TrustBundle,
    TrustDomain, TrustDomains, WorkloadCredentials, WorkloadKey,
};
use meshward_proto::ca::IstioCertificateRequest;
use meshward_proto::ca::istio_certificate_service_client::IstioCertificateServiceClient;
use meshward_proto::config::config_discovery_service_client::ConfigDiscoveryServiceClient;
use meshward_proto::config::{ConfigRequest, ConfigResponse, Node};
use meshward_test_support::mesh;
use meshward_test_support::process::Process;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;
use serde_json::{Value, json};
use tokio::sync::{Notify, Semaphore, mpsc};
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

#[path = "../control/issuance.rs"]
mod issuance;
#[path = "../control/push.rs"]
mod push;
#[path = "../control/report.rs"]
mod report;
// The proxy benchmark's /proc readings (this binary uses a part of them).
#[allow(dead_code)]
#[path = "../procs.rs"]
mod procs;

use issuance::*;
use push::*;
use report::*;

/// Namespace of the simulated proxies' workloads.
const PUSH_NS: &str = "bench";
/// Namespace of the issuance benchmark's service accounts.
const CA_NS: &str = "bench-ca";
/// The policy file every round rewrites.
const ROUND_FILE: &str = "30-round.yaml";
/// The marker of a round's policy (its name is `MARKER<round>`).
const MARKER: &str = "bench-round-";
/// How long one phase may wait for something that must happen.
const PHASE_LIMIT: Duration = Duration::from_secs(120);
/// TLS handshakes the harness runs at once while connecting.
const CONNECT_CONCURRENCY: usize = 32;

/// Control-plane benchmarks: config push to N proxies, memory with N
/// connected, certificate issuance rate.
#[derive(Debug, Parser)]
#[command(name = "meshward-control-bench", version)]
struct Args {
    /// The meshward binary whose `meshward control` is measured.
    #[arg(long, env = "MESHWARD_BIN", default_value = "target/release/meshward")]
    meshward: PathBuf,
    /// Simulated proxies (push benchmark).
    #[arg(long, default_value_t = 1000)]
    proxies: usize,
    /// WorkloadEntries the proxies are spread over (each its own service account).
    #[arg(long, default_value_t = 100)]
    workloads: usize,
    /// Policy changes pushed and timed.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Concurrent CreateCertificate callers (issuance benchmark).
    #[arg(long, default_value_t = 64)]
    callers: usize,
    /// Length of the timed issuance run, seconds.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Service accounts the issuance requests are spread over (the CA allows
    /// each 10 requests/s, burst 20).
    #[arg(long, default_value_t = 2000)]
    identities: usize,
    /// CSRs generated before the timed run (the run stops early when they
    /// are used up; default: 4,000 per second of --duration).
    #[arg(long)]
    csrs: Option<usize>,
    /// How the issuance callers prove their identity: `token` (a bootstrap
    /// token per request, callers on C connections without a client
    /// certificate) or `renewal` (each identity's current certificate over
    /// mTLS: one connection per identity, obtained before the timed part).
    #[arg(long, value_enum, default_value = "token")]
    proof: Proof,
    /// Benchmarks to run.
    #[arg(long, value_delimiter = ',', default_value = "push,issuance")]
    only: Vec<Bench>,
    /// Smoke test: 50 proxies over 10 workloads, 1 round, 2 s of issuance
    /// by 8 callers over 200 identities.
    #[arg(long)]
    quick: bool,
    /// Print JSON instead of the table.
    #[arg(long)]
    json: bool,
    /// The control plane's `--log` filter (its log goes to a file in the
    /// work directory; `info`, the default, logs every issued certificate).
    #[arg(long, default_value = "info")]
    control_log: String,
    /// Keep the work directory (config, state, control log) and print its path.
    #[arg(long)]
    keep: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Proof {
    Token,
    Renewal,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Bench {
    Push,
    Issuance,
}

impl Args {
    fn apply_quick(&mut self) {
        if self.quick {
            self.proxies = 50;
            self.workloads = 10;
            self.rounds = 1;
            self.callers = 8;
            self.duration = 2.0;
            self.identities = 200;
        }
    }

    fn check(&self) -> Result<()> {
        if self.proxies == 0 || self.workloads == 0 || self.workloads > self.proxies {
            bail!("--proxies and --workloads must be at least 1, with --workloads ≤ --proxies");
        }
        if self.callers == 0 || self.identities == 0 {
            bail!("--callers and --identities must be at least 1");
        }
        if !(self.duration.is_finite() && self.duration > 0.0) {
            bail!("--duration must be a positive number of seconds");
        }
        if self.only.is_empty() {
            bail!("--only names no benchmark");
        }
        Ok(())
    }

    fn csr_pool(&self) -> usize {
        self.csrs
            .unwrap_or_else(|| (4000.0 * self.duration).ceil() as usize)
            .max(1)
    }
}

fn main() -> ExitCode {
    let mut args = Args::parse();
    args.apply_quick();
    if let Err(e) = args.check() {
        eprintln!("meshward-control-bench: {e:#}");
        return ExitCode::from(2);
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("meshward-control-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(&args)) {
        Ok(report) => {
            if args.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).unwrap_or_default()
                );
            } else {
                print!("{}", table(&report));
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("meshward-control-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The running control plane and what the harness knows about it.
struct Control {
    process: Process,
    grpc: SocketAddr,
    admin: SocketAddr,
    config_dir: PathBuf,
    authority: Authority,
    bundle: TrustBundle,
    trust_domain: TrustDomain,
    server_id: SpiffeId,
}

async fn run(args: &Args) -> Result<Value> {
    let work = tempfile::Builder::new()
        .prefix("meshward-control-bench")
        .tempdir()
        .context("cannot create the work directory")?;
    let control = start_control(args, work.path()).await?;
    let mut report = json!({
        "machine": machine(),
        "meshward": args.meshward.display().to_string(),
        "control_log": args.control_log,
    });
    let result = async {
        if args.only.contains(&Bench::Push) {
            report["push"] = push_bench(args, &control).await.context("push benchmark")?;
        }
        if args.only.contains(&Bench::Issuance) {
            report["issuance"] = issuance_bench(args, &control)
                .await
                .context("issuance benchmark")?;
        }
        report["machine"]["loadavg_end"] = json!(loadavg());
        report["control_peak_rss_kib"] = json!(proc_status(control.process.pid(), "VmHWM:"));
        Ok::<_, anyhow::Error>(())
    }
    .await;
    let mut control = control;
    if let Err(e) = result {
        eprintln!("control plane log (tail):\n{}", control.process.tail(30));
        return Err(e);
    }
    control
        .process
        .check_alive()
        .map_err(|e| anyhow!("the control plane died during the run: {e}"))?;
    if args.keep {
        let kept = work.keep();
        eprintln!("work directory kept: {}", kept.display());
    }
    Ok(report)
}

/// Starts `meshward control` over a fresh config directory and state
/// directory and waits until it is ready.
async fn start_control(args: &Args, work: &Path) -> Result<Control> {
    let config_dir = work.join("config");
    let state_dir = work.join("state");
    std::fs::create_dir_all(&config_dir)?;
    write_config(&config_dir, args.workloads)?;
    let meshward = args.meshward.canonicalize().with_context(|| {
        format!(
            "meshward binary {} not found (build it with `cargo build --release -p meshward-cli`, or pass --meshward PATH)",
            args.meshward.display()
        )
    })?;
    let mut cmd = Command::new(&meshward);
    cmd.arg("control")
        .arg("--config")
        .arg(&config_dir)
        .arg("--state")
        .arg(&state_dir)
        .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .arg("--log")
        .arg(&args.control_log);
    let log = work.join("control.log");
    let mut process = Process::spawn_logged("meshward control", cmd, &log)
        .with_context(|| format!("cannot start {}", meshward.display()))?;
    // It prints {"grpc":ADDR,"admin":ADDR} once it serves.
    let addrs = || listening_addrs(&std::fs::read_to_string(&log).unwrap_or_default());
    meshward_test_support::wait::for_admin_ready(
        || addrs().map(|(_, admin)| admin),
        "/healthz/ready",
        PHASE_LIMIT,
        Duration::from_millis(20),
        || process.check_alive(),
    )
    .await
    .map_err(|e| anyhow!("meshward control did not become ready: {e}"))?;
    let (grpc, admin) = addrs().ok_or_else(|| anyhow!("meshward control printed no addresses"))?;
    // The state directory now holds the self-signed root: mint tokens with it
    // as `meshward control token --state DIR` does.
    let authority = Authority::load(
        Options::new(CaSource::SelfSigned(state_dir)).authority(),
        Arc::new(Metrics::new()),
    )
    .context("cannot load the control plane's CA from its state directory")?;
    let bundle = TrustBundle::clone(&authority.bundle().borrow());
    let trust_domain = authority.trust_domain().clone();
    let server_id = SpiffeId::workload(&trust_domain, "istio-system", "istiod")
        .map_err(|e| anyhow!("control plane identity: {e}"))?;
    Ok(Control {
        process,
        grpc,
        admin,
        config_dir,
        authority,
        bundle,
        trust_domain,
        server_id,
    })
}

fn listening_addrs(log: &str) -> Option<(SocketAddr, SocketAddr)> {
    log.lines().find_map(|line| {
        let v: Value = serde_json::from_str(line).ok()?;
        let grpc = v.get("grpc")?.as_str()?.parse().ok()?;
        let admin = v.get("admin")?.as_str()?.parse().ok()?;
        Some((grpc, admin))
    })
}

fn workload_name(i: usize) -> String {
    format!("w-{i:04}")
}

/// The workloads (each its own service account), mesh-wide STRICT, and the
/// round-0 policy.
fn write_config(dir: &Path, workloads: usize) -> Result<()> {
    let mut yaml = String::new();
    for i in 0..workloads {
        let name = workload_name(i);
        yaml.push_str(
            &mesh::WorkloadEntry::new(PUSH_NS, &name)
                .service_account(&format!("sa-{name}"))
                .port("http", 8080)
                .yaml(),
        );
    }
    std::fs::write(dir.join("10-workloads.yaml"), yaml)?;
    std::fs::write(dir.join("20-mesh.yaml"), mesh::mesh_strict())?;
    write_round(dir, 0)?;
    Ok(())
}

/// A rustls client config that expects the control plane's SVID and
/// presents `creds` if given.
fn client_config(
    control: &Control,
    creds: Option<WorkloadCredentials>,
) -> Result<rustls::ClientConfig> {
    let verifier = SpiffeServerVerifier::expecting(
        SvidVerifier::new(
            control.bundle.clone(),
            TrustDomains::only([control.trust_domain.clone()]),
        ),
        [control.server_id.clone()],
    );
    let resolver = match creds {
        Some(c) => CredentialResolver::fixed(c),
        None => {
            let (_tx, rx) = tokio::sync::watch::channel::<CurrentCredentials>(None);
            CredentialResolver::new(rx)
        }
    };
    meshward_identity::client_config(verifier, resolver).context("client TLS config")
}

async fn connect(control: &Control, config: rustls::ClientConfig) -> Result<Channel> {
    meshward_control::tls::connect(&control.grpc.to_string(), config)
        .await
        .context("cannot connect to the control plane")
}

fn csr_pem(key: &WorkloadKey, id: &SpiffeId) -> Result<String> {
    Ok(meshward_identity::pem::encode(
        "CERTIFICATE REQUEST",
        &key.csr_der(id).map_err(|e| anyhow!("CSR: {e}"))?,
    ))
}

fn token_request(csr: String, token: &str) -> Result<tonic::Request<IstioCertificateRequest>> {
    let mut r = tonic::Request::new(IstioCertificateRequest {
        csr,
        validity_duration: 0,
        metadata: None,
    });
    r.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}")
            .parse()
            .map_err(|_| anyhow!("token is not valid metadata"))?,
    );
    Ok(r)
}

/// A workload's certificate, obtained with a bootstrap token through
/// `CreateCertificate`, as a proxy does at its first start.
async fn obtain_credentials(
    control: &Control,
    channel: Channel,
    namespace: &str,
    service_account: &str,
) -> Result<WorkloadCredentials> {
    let id = SpiffeId::workload(&control.trust_domain, namespace, service_account)
        .map_err(|e| anyhow!("{namespace}/{service_account}: {e}"))?;
    let token =
        meshward_control::token::mint(&control.authority.ca(), namespace, service_account, None)?;
    let key = WorkloadKey::generate(KeyType::EcP256).map_err(|e| anyhow!("key: {e}"))?;
    let resp = IstioCertificateServiceClient::new(channel)
        .create_certificate(token_request(csr_pem(&key, &id)?, &token)?)
        .await
        .with_context(|| format!("CreateCertificate for {id}"))?
        .into_inner();
    let chain = resp
        .cert_chain
        .iter()
        .map(|p| CertificateDer::from_pem_slice(p.as_bytes()))
        .collect::<Result<Vec<_>, _>>()
        .context("certificate chain in the response")?;
    WorkloadCredentials::new(&key, chain, &id).map_err(|e| anyhow!("issued credentials: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_address_line_is_found_among_log_lines() {
        let log = "{\"level\":\"INFO\",\"fields\":{}}\nnot json\n{\"grpc\":\"127.0.0.1:4000\",\"admin\":\"127.0.0.1:4001\"}\n";
        assert_eq!(
            listening_addrs(log),
            Some((
                "127.0.0.1:4000".parse().unwrap(),
                "127.0.0.1:4001".parse().unwrap()
            ))
        );
        assert_eq!(
            listening_addrs("{\"grpc\":\"nonsense\",\"admin\":\"x\"}"),
            None
        );
    }
}
