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

/// A namespace-wide policy (it selects every workload of the namespace)
/// named for `round`, written next to its file and renamed over it.
fn write_round(dir: &Path, round: usize) -> Result<()> {
    let policy = mesh::authorization_policy(
        PUSH_NS,
        &format!("{MARKER}{round}"),
        &format!(
            "  rules:\n  - from: [{{source: {{namespaces: [\"{PUSH_NS}\"]}}}}]\n    to: [{{operation: {{paths: [\"/round/{round}/*\"]}}}}]\n"
        ),
    );
    let tmp = dir.join(format!(".{ROUND_FILE}.tmp"));
    std::fs::write(&tmp, policy)?;
    std::fs::rename(&tmp, dir.join(ROUND_FILE))?;
    Ok(())
}

/// What a response carries: documents, mesh settings and roots, in bytes.
fn payload_bytes(resp: &ConfigResponse) -> usize {
    resp.documents
        .iter()
        .map(|d| d.origin.len() + d.content.len())
        .sum::<usize>()
        + resp.mesh_config.len()
        + resp.trust_bundle.iter().map(String::len).sum::<usize>()
}

/// The round whose policy a response carries.
fn round_of(resp: &ConfigResponse) -> Option<usize> {
    resp.documents
        .iter()
        .filter_map(|d| {
            let at = d.content.find(MARKER)? + MARKER.len();
            let digits: String = d.content[at..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            digits.parse().ok()
        })
        .max()
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

/// What the simulated proxies report to the coordinator.
struct PushState {
    /// Per round: proxies that ACKed a version carrying its policy.
    acked: Vec<AtomicUsize>,
    /// Per round: when the last of the N ACKed.
    all_acked_at: Vec<OnceLock<Instant>>,
    /// Responses received and ACKed, over all proxies.
    responses: AtomicUsize,
    /// The largest response's documents, mesh settings and roots, bytes.
    payload_max: AtomicUsize,
    failed: AtomicBool,
    first_error: Mutex<Option<String>>,
    changed: Notify,
    proxies: usize,
}

impl PushState {
    fn fail(&self, error: String) {
        let mut first = self.first_error.lock().unwrap_or_else(|e| e.into_inner());
        first.get_or_insert(error);
        self.failed.store(true, Ordering::SeqCst);
        self.changed.notify_one();
    }

    /// Waits until every proxy has ACKed `round`; the instant the last did.
    async fn all_acked(&self, round: usize, limit: Duration) -> Result<Instant> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if self.failed.load(Ordering::SeqCst) {
                let error = self
                    .first_error
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone()
                    .unwrap_or_default();
                bail!("a simulated proxy failed: {error}");
            }
            if let Some(at) = self.all_acked_at[round].get() {
                return Ok(*at);
            }
            if tokio::time::timeout_at(deadline, self.changed.notified())
                .await
                .is_err()
            {
                bail!(
                    "round {round}: {} of {} proxies ACKed within {limit:?}",
                    self.acked[round].load(Ordering::SeqCst),
                    self.proxies
                );
            }
        }
    }
}

/// One simulated proxy: subscribes as `workload`, ACKs every response,
/// counts the rounds it has seen.
async fn simulated_proxy(
    channel: Channel,
    node_id: String,
    workload: String,
    state: Arc<PushState>,
) {
    let result = async {
        let (tx, rx) = mpsc::channel(4);
        tx.send(ConfigRequest {
            node: Some(Node {
                id: node_id.clone(),
                workload,
                version: "meshward-control-bench".into(),
            }),
            ..Default::default()
        })
        .await
        .map_err(|_| anyhow!("request channel closed"))?;
        let mut inbound = ConfigDiscoveryServiceClient::new(channel)
            .stream_config(ReceiverStream::new(rx))
            .await?
            .into_inner();
        let mut last_round: Option<usize> = None;
        while let Some(resp) = inbound.message().await? {
            let round = round_of(&resp);
            tx.send(ConfigRequest {
                version_info: resp.version_info.clone(),
                response_nonce: resp.nonce.clone(),
                ..Default::default()
            })
            .await
            .map_err(|_| anyhow!("request channel closed"))?;
            state.responses.fetch_add(1, Ordering::Relaxed);
            state
                .payload_max
                .fetch_max(payload_bytes(&resp), Ordering::Relaxed);
            if let Some(r) = round.filter(|r| Some(*r) != last_round && *r < state.acked.len()) {
                last_round = Some(r);
                if state.acked[r].fetch_add(1, Ordering::SeqCst) + 1 == state.proxies {
                    let _ = state.all_acked_at[r].set(Instant::now());
                    state.changed.notify_one();
                }
            }
        }
        Err::<(), _>(anyhow!("the control plane ended the stream"))
    }
    .await;
    if let Err(e) = result {
        state.fail(format!("{node_id}: {e:#}"));
    }
}

async fn push_bench(args: &Args, control: &Control) -> Result<Value> {
    let rss_before = proc_status(control.process.pid(), "VmRSS:");
    // One certificate per workload (its service account), by token.
    eprintln!("push: obtaining {} workload certificates", args.workloads);
    let ca_channel = connect(control, client_config(control, None)?).await?;
    let mut configs = Vec::with_capacity(args.workloads);
    for i in 0..args.workloads {
        let name = workload_name(i);
        let creds =
            obtain_credentials(control, ca_channel.clone(), PUSH_NS, &format!("sa-{name}")).await?;
        configs.push(client_config(control, Some(creds))?);
    }
    drop(ca_channel);

    let state = Arc::new(PushState {
        acked: (0..=args.rounds).map(|_| AtomicUsize::new(0)).collect(),
        all_acked_at: (0..=args.rounds).map(|_| OnceLock::new()).collect(),
        responses: AtomicUsize::new(0),
        payload_max: AtomicUsize::new(0),
        failed: AtomicBool::new(false),
        first_error: Mutex::new(None),
        changed: Notify::new(),
        proxies: args.proxies,
    });
    eprintln!("push: connecting {} proxies", args.proxies);
    let connected_at = Instant::now();
    let gate = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    let mut tasks = Vec::with_capacity(args.proxies);
    let addr = control.grpc.to_string();
    for p in 0..args.proxies {
        let w = p % args.workloads;
        let (gate, config, addr, state) = (
            gate.clone(),
            configs[w].clone(),
            addr.clone(),
            state.clone(),
        );
        let node_id = format!("bench-proxy-{p:05}");
        tasks.push(tokio::spawn(async move {
            let channel = {
                let _permit = gate.acquire_owned().await;
                meshward_control::tls::connect(&addr, config).await
            };
            match channel {
                Ok(channel) => {
                    let workload = format!("{PUSH_NS}/{}", workload_name(w));
                    simulated_proxy(channel, node_id, workload, state).await;
                }
                Err(e) => state.fail(format!("{node_id}: cannot connect: {e}")),
            }
        }));
    }
    state.all_acked(0, PHASE_LIMIT).await?;
    let subscribe_secs = connected_at.elapsed().as_secs_f64();
    let rss_connected = proc_status(control.process.pid(), "VmRSS:");
    let connected = metric_value(control, "pilot_xds ").await;
    eprintln!(
        "push: {} proxies connected and ACKed in {subscribe_secs:.2} s; control RSS {} KiB",
        args.proxies,
        rss_connected.unwrap_or(0)
    );

    let mut latencies = Vec::with_capacity(args.rounds);
    for round in 1..=args.rounds {
        let written = Instant::now();
        write_round(&control.config_dir, round)?;
        let last = state.all_acked(round, PHASE_LIMIT).await?;
        let ms = last.duration_since(written).as_secs_f64() * 1000.0;
        eprintln!(
            "push: round {round}: all {} ACKed after {ms:.1} ms",
            args.proxies
        );
        latencies.push(ms);
    }
    // The control plane counts an ACK when it has read it, a little after
    // the proxy sent it: wait (bounded) until it has counted them all.
    let responses = state.responses.load(Ordering::SeqCst) as f64;
    let counted = Instant::now();
    let convergence = loop {
        let h = metric_histogram(control, "pilot_proxy_convergence_time").await;
        if h["count"].as_f64().unwrap_or(0.0) >= responses
            || counted.elapsed() > Duration::from_secs(5)
        {
            break h;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // Only now: a proxy dropped at once may reset its stream before its last
    // ACK has left.
    for t in &tasks {
        t.abort();
    }
    let mut sorted = latencies.clone();
    sorted.sort_by(f64::total_cmp);
    Ok(json!({
        "proxies": args.proxies,
        "workloads": args.workloads,
        "rounds": args.rounds,
        "subscribe_all_s": round3(subscribe_secs),
        "push_all_acked_ms": latencies.iter().map(|v| round3(*v)).collect::<Vec<_>>(),
        "push_all_acked_median_ms": round3(median(&sorted)),
        "push_all_acked_max_ms": round3(sorted.last().copied().unwrap_or(0.0)),
        "responses_acked": state.responses.load(Ordering::Relaxed),
        "response_payload_max_bytes": state.payload_max.load(Ordering::Relaxed),
        "pilot_xds": connected,
        "pilot_proxy_convergence_time": convergence,
        "control_rss_before_kib": rss_before,
        "control_rss_connected_kib": rss_connected,
        "control_rss_connected_mib": rss_connected.map(|k| round3(k as f64 / 1024.0)),
    }))
}

/// Counts of a phase's outcomes, by gRPC code.
type Outcomes = BTreeMap<String, u64>;

async fn issuance_bench(args: &Args, control: &Control) -> Result<Value> {
    let pool = args.csr_pool();
    eprintln!(
        "issuance: minting {} tokens and generating {pool} P-256 CSRs",
        args.identities
    );
    let ca = control.authority.ca();
    let mut ids = Vec::with_capacity(args.identities);
    let mut tokens = Vec::with_capacity(args.identities);
    for i in 0..args.identities {
        let sa = format!("sa-{i:05}");
        ids.push(
            SpiffeId::workload(&control.trust_domain, CA_NS, &sa)
                .map_err(|e| anyhow!("{CA_NS}/{sa}: {e}"))?,
        );
        tokens.push(meshward_control::token::mint(
            &ca,
            CA_NS,
            &sa,
            Some(Duration::from_secs(3600)),
        )?);
    }
    let generated = Instant::now();
    let csrs = Arc::new(generate_csrs(&ids, pool)?);
    eprintln!(
        "issuance: {pool} CSRs in {:.1} s",
        generated.elapsed().as_secs_f64()
    );
    let tokens = Arc::new(tokens);

    // Token: each caller its own connection. Renewal: each identity its own
    // mTLS connection, which any caller uses for that identity's requests.
    let mut channels = Vec::with_capacity(args.callers);
    let renewal = match args.proof {
        Proof::Token => {
            let config = client_config(control, None)?;
            for _ in 0..args.callers {
                channels.push(connect(control, config.clone()).await?);
            }
            None
        }
        Proof::Renewal => {
            eprintln!(
                "issuance: obtaining {} certificates and opening their mTLS connections",
                args.identities
            );
            Some(Arc::new(renewal_channels(control, args.identities).await?))
        }
    };
    let issued_before = metric_value(control, "citadel_server_success_cert_issuance_count").await;
    let next = Arc::new(AtomicUsize::new(0));
    let cpu_before = proc_cpu_seconds(control.process.pid());
    let self_before = proc_cpu_seconds(std::process::id());
    let started = Instant::now();
    let end = started + Duration::from_secs_f64(args.duration);
    let mut tasks = Vec::with_capacity(args.callers);
    for c in 0..args.callers {
        let (csrs, tokens, next) = (csrs.clone(), tokens.clone(), next.clone());
        let own = channels.get(c).cloned();
        let renewal = renewal.clone();
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)
                .map_err(|e| anyhow!("histogram: {e}"))?;
            let mut outcomes = Outcomes::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= csrs.len() || Instant::now() >= end {
                    break;
                }
                let identity = i % tokens.len();
                let (channel, req) = match (&renewal, &own) {
                    (Some(by_identity), _) => (
                        by_identity[identity].clone(),
                        tonic::Request::new(IstioCertificateRequest {
                            csr: csrs[i].clone(),
                            validity_duration: 0,
                            metadata: None,
                        }),
                    ),
                    (None, Some(own)) => (
                        own.clone(),
                        token_request(csrs[i].clone(), &tokens[identity])?,
                    ),
                    (None, None) => bail!("caller {c} has no connection"),
                };
                let mut client = IstioCertificateServiceClient::new(channel);
                let t0 = Instant::now();
                let result = client.create_certificate(req).await;
                let us = t0.elapsed().as_micros().try_into().unwrap_or(u64::MAX);
                let key = match result {
                    Ok(resp) if !resp.get_ref().cert_chain.is_empty() => {
                        hist.saturating_record(us);
                        "ok".to_string()
                    }
                    Ok(_) => "empty_chain".to_string(),
                    Err(status) => format!("{:?}", status.code()),
                };
                *outcomes.entry(key).or_default() += 1;
            }
            Ok::<_, anyhow::Error>((hist, outcomes, Instant::now()))
        }));
    }
    let mut hist = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)
        .map_err(|e| anyhow!("histogram: {e}"))?;
    let mut outcomes = Outcomes::new();
    let mut finished = started;
    for t in tasks {
        let (h, o, at) = t.await??;
        hist.add(&h).map_err(|e| anyhow!("histogram: {e}"))?;
        for (k, v) in o {
            *outcomes.entry(k).or_default() += v;
        }
        finished = finished.max(at);
    }
    let elapsed = finished.duration_since(started).as_secs_f64();
    let cpu_after = proc_cpu_seconds(control.process.pid());
    let self_after = proc_cpu_seconds(std::process::id());
    let issued_after = metric_value(control, "citadel_server_success_cert_issuance_count").await;
    let ok = outcomes.get("ok").copied().unwrap_or(0);
    let attempted: u64 = outcomes.values().sum();
    let control_cpu = cpu_before.zip(cpu_after).map(|(b, a)| a - b);
    let harness_cpu = self_before.zip(self_after).map(|(b, a)| a - b);
    Ok(json!({
        "callers": args.callers,
        "identities": args.identities,
        "proof": format!("{:?}", args.proof).to_lowercase(),
        "connections": renewal.as_ref().map_or(args.callers, |r| r.len()),
        "duration_s": round3(elapsed),
        "csr_pool": pool,
        "csr_pool_exhausted": attempted as usize >= pool,
        "requests": attempted,
        "outcomes": outcomes,
        "certificates": ok,
        "certificates_per_s": round3(ok as f64 / elapsed.max(f64::EPSILON)),
        "latency_p50_ms": round3(hist.value_at_quantile(0.50) as f64 / 1000.0),
        "latency_p99_ms": round3(hist.value_at_quantile(0.99) as f64 / 1000.0),
        "latency_max_ms": round3(hist.max() as f64 / 1000.0),
        "control_cpu_s": control_cpu.map(round3),
        "control_cpu_ms_per_certificate": control_cpu
            .filter(|_| ok > 0)
            .map(|c| round3(c * 1000.0 / ok as f64)),
        "harness_cpu_s": harness_cpu.map(round3),
        "citadel_server_success_cert_issuance_count_delta": issued_before
            .zip(issued_after)
            .map(|(b, a)| a - b),
    }))
}

/// One mTLS connection per identity of the issuance benchmark, each
/// presenting a certificate obtained with a token (before the timed part).
async fn renewal_channels(control: &Control, identities: usize) -> Result<Vec<Channel>> {
    let ca_channel = connect(control, client_config(control, None)?).await?;
    let gate = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    let mut tasks = Vec::with_capacity(identities);
    for i in 0..identities {
        let (gate, ca_channel) = (gate.clone(), ca_channel.clone());
        let sa = format!("sa-{i:05}");
        let creds = async move {
            let _permit = gate.acquire_owned().await;
            obtain_credentials(control, ca_channel, CA_NS, &sa).await
        };
        tasks.push(creds);
    }
    let mut channels = Vec::with_capacity(identities);
    for creds in futures_util::future::join_all(tasks).await {
        let config = client_config(control, Some(creds?))?;
        channels.push(config);
    }
    let channels = futures_util::future::join_all(channels.into_iter().map(|config| {
        let gate = gate.clone();
        async move {
            let _permit = gate.acquire_owned().await;
            connect(control, config).await
        }
    }))
    .await;
    channels.into_iter().collect()
}

/// `pool` CSRs with fresh P-256 keys, CSR `i` for identity `i % ids.len()`,
/// generated on every core.
fn generate_csrs(ids: &[SpiffeId], pool: usize) -> Result<Vec<String>> {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let chunk = pool.div_ceil(threads);
    let parts: Vec<Result<Vec<String>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    (t * chunk..((t + 1) * chunk).min(pool))
                        .map(|i| {
                            let key = WorkloadKey::generate(KeyType::EcP256)
                                .map_err(|e| anyhow!("key: {e}"))?;
                            csr_pem(&key, &ids[i % ids.len()])
                        })
                        .collect()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow!("CSR thread panicked")))
            })
            .collect()
    });
    let mut all = Vec::with_capacity(pool);
    for p in parts {
        all.extend(p?);
    }
    Ok(all)
}

fn median(sorted: &[f64]) -> f64 {
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// A `/proc/PID/status` field in KiB (`VmRSS:`, `VmHWM:`).
fn proc_status(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// User plus system CPU seconds of a process (`/proc/PID/stat`).
fn proc_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command (which may hold spaces) start at state (3).
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / clock_ticks())
}

fn clock_ticks() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .filter(|t: &f64| *t > 0.0)
            .unwrap_or(100.0)
    })
}

async fn metrics_text(control: &Control) -> Option<String> {
    let (status, body) =
        meshward_test_support::http::get(control.admin, "localhost", "/metrics", &[]).await?;
    (status == 200).then_some(body)
}

/// The value of the first metric line starting with `prefix`.
async fn metric_value(control: &Control, prefix: &str) -> Option<f64> {
    let text = metrics_text(control).await?;
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// A histogram's count and sum (and the mean) from `/metrics`.
async fn metric_histogram(control: &Control, name: &str) -> Value {
    let Some(text) = metrics_text(control).await else {
        return Value::Null;
    };
    let find = |suffix: &str| -> Option<f64> {
        let prefix = format!("{name}{suffix}");
        text.lines()
            .find(|l| l.starts_with(&prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    };
    match (find("_count"), find("_sum")) {
        (Some(count), Some(sum)) => json!({
            "count": count,
            "sum_s": round3(sum),
            "mean_ms": if count > 0.0 { round3(sum / count * 1000.0) } else { 0.0 },
        }),
        _ => Value::Null,
    }
}

/// The 1-, 5- and 15-minute load averages (other load on the machine
/// shows in the numbers).
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn machine() -> Value {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_default();
    json!({ "cpus": cpus, "cpu_model": model, "loadavg_start": loadavg() })
}

/// The plain-text report: one row per metric, with its target.
fn table(report: &Value) -> String {
    let mut rows: Vec<(String, String, String)> = Vec::new();
    let fmt = |v: &Value| match v {
        Value::Null => "n/a".to_string(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    if let Some(p) = report.get("push") {
        rows.push((
            "push: proxies connected (workloads)".into(),
            format!("{} ({})", fmt(&p["proxies"]), fmt(&p["workloads"])),
            String::new(),
        ));
        rows.push((
            "push: all subscribed and ACKed, s".into(),
            fmt(&p["subscribe_all_s"]),
            String::new(),
        ));
        rows.push((
            "push: change → all ACKed, median ms".into(),
            fmt(&p["push_all_acked_median_ms"]),
            "≤ 1000".into(),
        ));
        rows.push((
            "push: change → all ACKed, max ms".into(),
            fmt(&p["push_all_acked_max_ms"]),
            "≤ 1000".into(),
        ));
        rows.push((
            "push: rounds, ms".into(),
            fmt(&p["push_all_acked_ms"]),
            String::new(),
        ));
        rows.push((
            "push: largest response payload, bytes".into(),
            fmt(&p["response_payload_max_bytes"]),
            String::new(),
        ));
        rows.push((
            "push: pilot_xds (connected)".into(),
            fmt(&p["pilot_xds"]),
            String::new(),
        ));
        rows.push((
            "memory: control RSS with N connected, MiB".into(),
            fmt(&p["control_rss_connected_mib"]),
            "≤ 100".into(),
        ));
    }
    if let Some(i) = report.get("issuance") {
        rows.push((
            "issuance: proof (connections)".into(),
            format!("{} ({})", fmt(&i["proof"]), fmt(&i["connections"])),
            String::new(),
        ));
        rows.push((
            "issuance: certificates/s".into(),
            fmt(&i["certificates_per_s"]),
            "≥ 2000".into(),
        ));
        rows.push((
            "issuance: certificates (requests)".into(),
            format!("{} ({})", fmt(&i["certificates"]), fmt(&i["requests"])),
            String::new(),
        ));
        rows.push((
            "issuance: outcomes".into(),
            fmt(&i["outcomes"]),
            String::new(),
        ));
        rows.push((
            "issuance: latency p50 / p99 ms".into(),
            format!(
                "{} / {}",
                fmt(&i["latency_p50_ms"]),
                fmt(&i["latency_p99_ms"])
            ),
            String::new(),
        ));
        rows.push((
            "issuance: control CPU s (ms/cert)".into(),
            format!(
                "{} ({})",
                fmt(&i["control_cpu_s"]),
                fmt(&i["control_cpu_ms_per_certificate"])
            ),
            String::new(),
        ));
        rows.push((
            "issuance: harness CPU s".into(),
            fmt(&i["harness_cpu_s"]),
            String::new(),
        ));
    }
    rows.push((
        "memory: control peak RSS (VmHWM), KiB".into(),
        fmt(&report["control_peak_rss_kib"]),
        String::new(),
    ));
    let w0 = rows.iter().map(|r| r.0.chars().count()).max().unwrap_or(0);
    let w1 = rows.iter().map(|r| r.1.chars().count()).max().unwrap_or(0);
    let mut out = format!(
        "meshward control benchmarks ({} CPUs, {}; load average {} before, {} after)\n",
        fmt(&report["machine"]["cpus"]),
        fmt(&report["machine"]["cpu_model"]),
        fmt(&report["machine"]["loadavg_start"]),
        fmt(&report["machine"]["loadavg_end"]),
    );
    for (name, value, target) in rows {
        out.push_str(&format!("{name:<w0$}  {value:>w1$}  {target}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshward_proto::config::Document;

    fn response(contents: &[&str]) -> ConfigResponse {
        ConfigResponse {
            documents: contents
                .iter()
                .map(|c| Document {
                    origin: "f.yaml:1".into(),
                    content: (*c).into(),
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn a_response_carries_the_round_of_its_newest_policy() {
        assert_eq!(round_of(&response(&["kind: WorkloadEntry"])), None);
        assert_eq!(
            round_of(&response(&[
                "name: bench-round-3, x",
                "name: bench-round-12"
            ])),
            Some(12)
        );
        assert_eq!(round_of(&response(&["bench-round-"])), None);
    }

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

    #[test]
    fn medians() {
        assert_eq!(median(&[]), 0.0);
        assert_eq!(median(&[1.0, 2.0, 9.0]), 2.0);
        assert_eq!(median(&[1.0, 2.0, 4.0, 9.0]), 3.0);
    }

    #[test]
    fn this_process_has_cpu_time_and_memory() {
        assert!(proc_cpu_seconds(std::process::id()).is_some());
        assert!(proc_status(std::process::id(), "VmRSS:").is_some_and(|k| k > 0));
        assert_eq!(proc_status(std::process::id(), "NoSuchField:"), None);
    }

    #[test]
    fn the_policy_file_is_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        write_round(dir.path(), 1).unwrap();
        write_round(dir.path(), 2).unwrap();
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, [ROUND_FILE]);
        let policy = std::fs::read_to_string(dir.path().join(ROUND_FILE)).unwrap();
        assert!(policy.contains("bench-round-2") && !policy.contains("bench-round-1"));
    }
}
