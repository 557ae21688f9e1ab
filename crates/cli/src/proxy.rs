//! `meshward proxy`: the sidecar, fed by the control plane (`--control`)
//! or by static files (`--config` and `--certs`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use meshward_proxy::source::control::{self, ControlOptions};
use meshward_proxy::source::files::{self, FilePaths};
use meshward_proxy::{AccessLogTo, Options};

#[derive(Debug, clap::Args)]
#[command(group(
    clap::ArgGroup::new("source")
        .required(true)
        .args(["control", "config"])
))]
pub struct Args {
    /// Control plane mode: the control plane's gRPC address(es), HOST:PORT,
    /// comma-separated or repeated (replicas: the proxy starts at a random
    /// one and fails over). The proxy generates its key, obtains and renews
    /// its certificate by CSR, and follows its configuration and trust
    /// bundle. Needs --token-file and --root-cert; excludes --config and
    /// --certs.
    #[arg(
        long,
        value_name = "ADDR[,ADDR...]",
        value_delimiter = ',',
        requires_all = ["token_file", "root_cert"],
        conflicts_with_all = ["certs", "mesh_config", "no_watch"]
    )]
    control: Option<Vec<String>>,
    /// Control plane mode: the bootstrap token for the first certificate
    /// (`meshward control token`), read again on each first-issuance attempt.
    #[arg(
        long,
        value_name = "FILE",
        requires = "control",
        conflicts_with = "config"
    )]
    token_file: Option<PathBuf>,
    /// Control plane mode: the mesh root(s) to verify the control plane
    /// with until it pushes its trust bundle (root-cert.pem).
    #[arg(
        long,
        value_name = "FILE",
        requires = "control",
        conflicts_with = "config"
    )]
    root_cert: Option<PathBuf>,
    /// Control plane mode: the certificate lifetime to ask for (e.g. `1h`;
    /// default: the control plane's, 24h unless configured).
    #[arg(
        long,
        value_name = "DUR",
        requires = "control",
        conflicts_with = "config",
        value_parser = parse_cert_ttl
    )]
    cert_ttl: Option<std::time::Duration>,
    /// Control plane mode: the control plane's identity, NAMESPACE/SERVICE_ACCOUNT
    /// in the workload's trust domain, checked against its certificate.
    #[arg(
        long,
        value_name = "NS/SA",
        requires = "control",
        default_value = control::DEFAULT_CONTROL_IDENTITY
    )]
    control_identity: String,
    /// Files mode: files or directories of mesh resources (watched for
    /// changes). Needs --certs.
    #[arg(long = "config", short = 'c', value_name = "PATH", requires = "certs")]
    config: Vec<PathBuf>,
    /// Files mode: mesh settings: a file holding Istio's meshConfig block,
    /// Helm values with `meshConfig:`, or an IstioOperator with
    /// `spec.meshConfig`.
    #[arg(long, value_name = "FILE")]
    mesh_config: Option<PathBuf>,
    /// This workload: namespace/name of its WorkloadEntry.
    #[arg(long, short = 'w', value_name = "NS/NAME")]
    workload: String,
    /// Files mode: directory with key.pem, cert-chain.pem and root-cert.pem
    /// (as `meshward ca issue` writes them; watched for changes).
    #[arg(long, value_name = "DIR", requires = "config")]
    certs: Option<PathBuf>,
    /// Admin endpoints: readiness, config dump, certificates, metrics.
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin: SocketAddr,
    /// Prometheus endpoint (Istio's merged metrics port).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
    /// Do not write the JSON access log to stdout.
    #[arg(long)]
    no_access_log: bool,
    /// Keep the last N access-log entries in memory for the admin
    /// endpoint's `/access_log` (0: none; kept even with --no-access-log).
    #[arg(long, value_name = "N", default_value_t = meshward_proxy::DEFAULT_ACCESS_LOG_BUFFER, value_parser = parse_access_log_buffer)]
    access_log_buffer: usize,
    /// The outbound HTTP listener (where the application sends plaintext
    /// requests), over the WorkloadEntry's `meshward.io/outbound`.
    #[arg(long, value_name = "ADDR")]
    outbound: Option<SocketAddr>,
    /// Where the application listens for the WorkloadEntry port NAME, over
    /// `meshward.io/app-ports` for that name (repeatable). NAME must be a
    /// port of the WorkloadEntry.
    #[arg(long = "app-port", value_name = "NAME=ADDR", value_parser = parse_app_port)]
    app_ports: Vec<(String, SocketAddr)>,
    /// Transparent capture: take the application's traffic through the
    /// namespace's rules instead of local listeners. The outbound capture
    /// listener (15001) routes each connection by its original
    /// destination, the inbound one (15006) serves every workload port,
    /// and the application is reached on its own port of the workload's
    /// address. `install` (the default): the proxy installs the rules once
    /// ready and removes them when it exits (needs CAP_NET_ADMIN);
    /// `external`: `meshward capture install` set them up before, and the
    /// proxy leaves them alone.
    #[arg(long, value_name = "MODE", num_args = 0..=1, default_missing_value = "install")]
    capture: Option<crate::proxy_capture::CaptureMode>,
    /// Under capture: the socket mark of the proxy's own connections, which
    /// the rules let through (needs CAP_NET_ADMIN; a proxy that runs as
    /// the exempt user or group, 1337, needs none).
    #[arg(long, value_name = "N", default_value_t = crate::proxy_capture::DEFAULT_MARK, requires = "capture")]
    capture_mark: u32,
    /// Files mode: do not reload configuration and certificates when files
    /// change.
    #[arg(long)]
    no_watch: bool,
    /// Close a connection idle this long: HTTP with no request in flight
    /// (HTTP/2: GOAWAY first), TCP with no bytes either way (Envoy's
    /// default, `meshward_proxy::DEFAULT_IDLE_TIMEOUT`: 1h).
    #[arg(long, default_value = "1h", value_parser = parse_idle_timeout)]
    idle_timeout: std::time::Duration,
    /// Name server for ServiceEntries with resolution DNS or
    /// DNS_ROUND_ROBIN, as IP or IP:PORT (default port 53); repeat for
    /// several. Replaces the system's settings (/etc/resolv.conf and
    /// /etc/hosts), which are used without it.
    #[arg(long = "dns-server", value_name = "ADDR", value_parser = parse_dns_server)]
    dns_servers: Vec<SocketAddr>,
    /// Serve DNS on ADDR (UDP and TCP, e.g. 127.0.0.1:15053; with
    /// --capture, 127.0.0.1:15053 unless given): the mesh's
    /// hosts (and the short names of name.ns.svc.cluster.local hosts) are
    /// answered from the configuration, other queries forwarded to the
    /// --dns-server name servers, else those of /etc/resolv.conf.
    #[arg(long = "dns-proxy", value_name = "ADDR")]
    dns_proxy: Option<SocketAddr>,
    /// On SIGTERM or SIGINT, let connections finish for this long before
    /// exiting (Istio's `terminationDrainDuration`; a second signal exits
    /// at once). Wins over the mesh setting
    /// `defaultConfig.terminationDrainDuration`; without either, 5s.
    #[arg(long, value_name = "DUR", value_parser = parse_drain_duration)]
    drain_duration: Option<std::time::Duration>,
    /// Worker threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    worker_threads: usize,
    /// Log filter for stderr (tracing syntax, e.g. `info,meshward=debug`).
    #[arg(long, default_value = "info")]
    log: String,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    crate::process::init_logging(&args.log)?;
    // One worker: a current-thread runtime, with no cross-thread wake-ups.
    let mut rt = if args.worker_threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    rt.enable_all();
    if args.worker_threads > 1 {
        rt.worker_threads(args.worker_threads);
    }
    let rt = rt.build().context("cannot start the runtime")?;
    let drain_flag = args.drain_duration;
    let code = rt.block_on(async move {
        // Before anything else: a proxy whose own connections would be
        // captured again must not start.
        if args.capture.is_some() {
            crate::proxy_capture::own_traffic_exempt(args.capture_mark)?;
        }
        if args.capture == Some(crate::proxy_capture::CaptureMode::External) {
            crate::proxy_capture::rules_installed()?;
        }
        let feed = match args.control {
            Some(addresses) => {
                // clap requires both with --control.
                let (Some(token_file), Some(root_cert)) = (args.token_file, args.root_cert) else {
                    anyhow::bail!("--control needs --token-file and --root-cert");
                };
                let mut options =
                    ControlOptions::new(addresses, args.workload.clone(), token_file, root_cert);
                options.cert_ttl = args.cert_ttl;
                options.control_identity = args.control_identity;
                control::start(options)?
            }
            None => {
                // clap requires --certs with --config.
                let Some(certs_dir) = args.certs else {
                    anyhow::bail!("--config needs --certs");
                };
                let paths = FilePaths {
                    config_paths: args.config,
                    mesh_config: args.mesh_config,
                    certs_dir,
                };
                files::start(paths, !args.no_watch)?
            }
        };
        let options = Options {
            workload: args.workload,
            admin: args.admin,
            metrics: args.metrics,
            access_log: if args.no_access_log {
                AccessLogTo::Off
            } else {
                AccessLogTo::Stdout
            },
            idle_timeout: args.idle_timeout,
            dns: if args.dns_servers.is_empty() {
                meshward_proxy::DnsConfig::System
            } else {
                meshward_proxy::DnsConfig::Servers(args.dns_servers)
            },
            access_log_buffer: args.access_log_buffer,
            overrides: meshward_proxy::Overrides {
                outbound: args.outbound,
                app_ports: args.app_ports,
                capture: args
                    .capture
                    .map(|_| meshward_proxy::capture::CaptureListen::default_ports()),
            },
            // Under capture the namespace's DNS queries come to the
            // proxy's DNS port (Istio's 15053) on loopback.
            dns_proxy: args.dns_proxy.or(args.capture.map(|_| {
                SocketAddr::from(([127, 0, 0, 1], meshward_capture::DEFAULT_DNS_PORT))
            })),
        };

        // Taken over before the start, which may wait for a usable
        // configuration for long: a stop signal then ends the wait.
        let mut signals = crate::process::Signals::new()?;
        let proxy = tokio::select! {
            started = meshward_proxy::start(feed, options) => started?,
            stop = signals.next() => {
                tracing::info!(signal = stop.name(), "stopped before the proxy was ready: nothing to drain");
                return Ok(ExitCode::SUCCESS);
            }
        };
        for l in proxy.listeners() {
            eprintln!(
                "{{\"listener\":\"{}\",\"address\":\"{}\"}}",
                l.name, l.address
            );
        }
        // The rules go in once the capture listeners are bound, and come
        // out when the proxy exits, however it gets there.
        // The rules go in once the capture listeners are bound, and come
        // out when the proxy exits (after its drain).
        let _rules = match args.capture {
            Some(crate::proxy_capture::CaptureMode::Install) => Some(
                crate::proxy_capture::Installed::install(&proxy, args.capture_mark)?,
            ),
            _ => None,
        };
        let first = signals.next().await;
        // The flag wins over the mesh setting, read now: the configuration
        // may have changed since the start.
        let deadline = drain_flag
            .or_else(|| proxy.mesh_drain_duration())
            .unwrap_or(meshward_proxy::DEFAULT_DRAIN_DURATION);
        tracing::info!(signal = first.name(), "shutting down: draining first");
        tokio::select! {
            _ = proxy.drain(deadline) => Ok::<_, anyhow::Error>(ExitCode::SUCCESS),
            second = signals.next() => {
                tracing::warn!(signal = second.name(), "second signal: exiting without finishing the drain");
                Ok(ExitCode::from(second.exit_status()))
            }
        }
    });
    // Whatever still runs (the file watcher, a blocking task) is not
    // waited for.
    rt.shutdown_background();
    code
}

fn parse_idle_timeout(s: &str) -> Result<std::time::Duration, String> {
    match meshward_identity::duration::parse_duration(s) {
        Ok(d) if d.is_zero() => Err("must be at least 1s".to_string()),
        Ok(d) if d > meshward_proxy::MAX_IDLE_TIMEOUT => Err("must be at most 365d".to_string()),
        Ok(d) => Ok(d),
        Err(e) => Err(e.to_string()),
    }
}

fn parse_drain_duration(s: &str) -> Result<std::time::Duration, String> {
    match meshward_identity::duration::parse_duration(s) {
        Ok(d) if d > meshward_proxy::MAX_DRAIN_DURATION => Err("must be at most 1h".to_string()),
        Ok(d) => Ok(d),
        Err(e) => Err(e.to_string()),
    }
}

fn parse_cert_ttl(s: &str) -> Result<std::time::Duration, String> {
    match meshward_identity::duration::parse_duration(s) {
        Ok(d) if d.as_secs() == 0 => Err("must be at least 1s".to_string()),
        Ok(d) => Ok(d),
        Err(e) => Err(e.to_string()),
    }
}

fn parse_dns_server(s: &str) -> Result<SocketAddr, String> {
    if let Ok(ip) = s.parse::<std::net::IpAddr>() {
        return Ok(SocketAddr::new(ip, 53));
    }
    s.parse()
        .map_err(|_| format!("\"{s}\" is not an IP address or IP:PORT"))
}

fn parse_access_log_buffer(s: &str) -> Result<usize, String> {
    let n: usize = s
        .parse()
        .map_err(|_| format!("\"{s}\" is not a number of entries"))?;
    if n > meshward_proxy::MAX_ACCESS_LOG_BUFFER {
        return Err(format!(
            "must be at most {}",
            meshward_proxy::MAX_ACCESS_LOG_BUFFER
        ));
    }
    Ok(n)
}

/// `NAME=ADDR`, as `meshward.io/app-ports` writes one port (a bare port
/// means 127.0.0.1).
fn parse_app_port(s: &str) -> Result<(String, SocketAddr), String> {
    let (name, addr) = s
        .split_once('=')
        .filter(|(n, _)| !n.is_empty())
        .ok_or_else(|| format!("\"{s}\" is not NAME=ADDR"))?;
    let addr = match addr.parse::<u16>() {
        Ok(port) => SocketAddr::from(([127, 0, 0, 1], port)),
        Err(_) => addr
            .parse()
            .map_err(|_| format!("\"{addr}\" is not a port or IP:PORT"))?,
    };
    Ok((name.to_string(), addr))
}
