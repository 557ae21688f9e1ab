//! Orchestration: certificates, the app, the proxies (started once, kept
//! for the whole run), then every scenario against every target in turn,
//! each with a warm-up and a measured run whose proxy CPU and peak RSS are
//! read from /proc around it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use http::{Method, StatusCode};
use meshward_test_support::app::{AppSpec, Protocol, ThreadedApp};
use meshward_test_support::envoy::{self as envoy_proc, Envoy};
use meshward_test_support::{Process, free_ports, wait};

use crate::Args;
use crate::certs::{self, Certs};
use crate::envoy::{self, Ports, SERVICE_HOST};
use crate::load::{self, LoadResult, Target};
use crate::meshward;
use crate::procs::{self, Usage};
use crate::report::{self, Measurement, ProcUsage, Scenario, ScenarioResult, TargetKind};

/// Poll interval of readiness checks (bounded by the ready timeout).
const READY_POLL: Duration = Duration::from_millis(50);

#[derive(Debug)]
struct Settings {
    duration: Duration,
    warmup: Duration,
    ready_timeout: Duration,
    request_timeout: Duration,
    scenarios: Vec<Scenario>,
    targets: Vec<TargetKind>,
    max_in_flight: usize,
    body_bytes: usize,
    rounds: usize,
}

fn settings(a: &Args) -> Result<Settings> {
    let secs = |name: &str, v: f64| -> Result<Duration> {
        Duration::try_from_secs_f64(v)
            .ok()
            .filter(|d| !d.is_zero() || name == "warmup")
            .with_context(|| format!("--{name} must be a positive number of seconds"))
    };
    let (duration, warmup) = if a.quick {
        (Duration::from_secs(2), Duration::from_millis(500))
    } else {
        (secs("duration", a.duration)?, secs("warmup", a.warmup)?)
    };
    if a.rate == 0 || a.no_keepalive_rate == 0 {
        bail!("rates must be positive");
    }
    let mut scenarios = Vec::new();
    for s in &a.scenarios {
        scenarios.push(match s.as_str() {
            "keepalive" => Scenario::KeepAlive {
                rate: a.rate,
                connections: a.connections,
            },
            "max" => Scenario::MaxThroughput {
                connections: a.max_connections,
            },
            "no-keepalive" => Scenario::NoKeepAlive {
                rate: a.no_keepalive_rate,
            },
            other => bail!("unknown scenario {other:?} (keepalive, max, no-keepalive)"),
        });
    }
    let mut targets = Vec::new();
    for t in &a.targets {
        targets.push(match t.as_str() {
            "direct" => TargetKind::Direct,
            "relay" => TargetKind::Relay,
            "envoy" => TargetKind::Envoy,
            "meshward" => TargetKind::Meshward,
            "captured" => {
                if std::env::var_os(crate::netns::INSIDE).is_none() {
                    bail!(
                        "target captured needs --netns (as root): it installs nftables rules, which the harness does only in a network namespace of its own"
                    );
                }
                TargetKind::Captured
            }
            other => bail!("unknown target {other:?} (direct, relay, envoy, meshward, captured)"),
        });
    }
    if !targets.contains(&TargetKind::Direct) {
        // Added latency is relative to the direct run.
        targets.insert(0, TargetKind::Direct);
    }
    if a.baseline.is_some() {
        targets.push(TargetKind::Baseline);
    }
    Ok(Settings {
        duration,
        warmup,
        ready_timeout: secs("ready-timeout", a.ready_timeout)?,
        request_timeout: secs("request-timeout", a.request_timeout)?,
        scenarios,
        targets,
        max_in_flight: a.max_in_flight.max(1),
        body_bytes: a.body_bytes,
        rounds: a.rounds.max(1),
    })
}

/// A target with the processes that serve it.
#[derive(Debug)]
struct Deployment {
    kind: TargetKind,
    entry: SocketAddr,
    /// (role, process): "client" and "server".
    procs: Vec<(&'static str, Process)>,
}

impl Deployment {
    fn check_alive(&mut self) -> Result<()> {
        for (_, p) in &mut self.procs {
            p.check_alive().map_err(|e| anyhow!(e))?;
        }
        Ok(())
    }

    fn usage(&self, clk: f64) -> Result<Vec<Usage>> {
        self.procs
            .iter()
            .map(|(_, p)| procs::usage(p.pid(), clk))
            .collect()
    }

    fn print_logs(&self) {
        for (_, p) in &self.procs {
            eprintln!("--- {} log (tail) ---\n{}", p.name, p.tail(30));
        }
    }
}

/// Returns Ok(false) when a required target could not be measured.
pub fn run(args: Args) -> Result<bool> {
    let s = settings(&args)?;
    let work = tempfile::Builder::new()
        .prefix("meshward-bench-")
        .tempdir()
        .context("creating the work directory")?;
    let certs = certs::generate(&work.path().join("certs"))?;
    let app = ThreadedApp::spawn(AppSpec {
        protocol: Protocol::Http1,
        body: vec![b'x'; s.body_bytes].into(),
        content_type: Some("text/plain"),
        record: false,
    })
    .context("starting the upstream app")?;
    // The load generator and the orchestration share this single-threaded
    // runtime on the main thread; the app has its own thread.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the load generator runtime")?;
    let outcome = rt.block_on(run_all(&args, &s, work.path(), &certs, app.addr));
    drop(rt);
    drop(app);
    if args.keep_workdir {
        let kept = work.keep();
        eprintln!("work directory kept: {}", kept.display());
    }
    outcome
}

async fn run_all(
    args: &Args,
    s: &Settings,
    work: &Path,
    certs: &Certs,
    app: SocketAddr,
) -> Result<bool> {
    let clk = procs::clock_ticks();
    let mut notes = Vec::new();
    let mut complete = true;
    let mut deployments = Vec::new();
    let mut skipped: Vec<(TargetKind, String)> = Vec::new();
    let mut envoy_version = None;
    let mut meshward_version = None;
    let target_for = |entry: SocketAddr| Target {
        addr: entry,
        host: SERVICE_HOST.to_owned(),
        request_timeout: s.request_timeout,
        body_len: s.body_bytes,
    };

    for &kind in &s.targets {
        let started = match kind {
            TargetKind::Direct => Ok(Deployment {
                kind,
                entry: app,
                procs: Vec::new(),
            }),
            TargetKind::Relay => start_relay(work, app.port()),
            TargetKind::Envoy => match envoy_binary(args) {
                Ok(bin) => {
                    envoy_version = envoy_proc::version(&bin);
                    start_envoy(&bin, work, certs, app.port(), s).await
                }
                Err(e) => Err(e),
            },
            TargetKind::Meshward | TargetKind::Baseline | TargetKind::Captured => {
                let bin = match (kind, &args.baseline) {
                    (TargetKind::Baseline, Some(b)) => b.clone(),
                    _ => meshward_binary(args),
                };
                if let Some(help) = meshward::proxy_help(&bin) {
                    let version = meshward::version(&bin);
                    if kind == TargetKind::Baseline {
                        notes.push(format!(
                            "{}: {} ({})",
                            kind.label(),
                            version.as_deref().unwrap_or("no version"),
                            bin.display()
                        ));
                    } else {
                        meshward_version = version;
                    }
                    let mut extra = meshward::parity_flags(&help);
                    extra.extend(args.meshward_args.iter().map(String::as_str));
                    if !extra.is_empty() {
                        notes.push(format!("{} started with {}", kind.label(), extra.join(" ")));
                    }
                    if kind == TargetKind::Captured {
                        start_captured(&bin, work, certs, app.port(), s, &extra).await
                    } else {
                        start_meshward(kind, &bin, work, certs, app.port(), s, &extra).await
                    }
                } else {
                    eprintln!(
                        "meshward proxy not available (`{} proxy --help` failed): skipping the meshward pair",
                        bin.display()
                    );
                    if args.require_meshward {
                        complete = false;
                    }
                    skipped.push((kind, "meshward proxy not available".to_owned()));
                    continue;
                }
            }
        };
        let mut dep = match started {
            Ok(d) => d,
            Err(e) => {
                eprintln!("{}: failed to start: {e:#}", kind.label());
                if kind != TargetKind::Meshward || args.require_meshward {
                    complete = false;
                }
                skipped.push((kind, format!("failed to start: {}", first_line(&e))));
                continue;
            }
        };
        let target = target_for(dep.entry);
        match preflight(&mut dep, &target, s).await {
            Ok(note) => {
                notes.extend(note);
                deployments.push(dep);
            }
            Err(e) => {
                eprintln!("{}: preflight failed: {e:#}", kind.label());
                dep.print_logs();
                if kind != TargetKind::Meshward || args.require_meshward {
                    complete = false;
                }
                skipped.push((kind, format!("preflight failed: {}", first_line(&e))));
            }
        }
    }

    let load_before = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut results = Vec::new();
    for &scenario in &s.scenarios {
        eprintln!("== {}", scenario.title());
        let mut sr = ScenarioResult {
            scenario,
            rows: Vec::new(),
            skipped: skipped.clone(),
        };
        // Every round runs every target; rounds are interleaved so that
        // slow phases of a noisy machine hit all targets alike.
        let mut rounds: Vec<Vec<Measurement>> = deployments.iter().map(|_| Vec::new()).collect();
        for round in 0..s.rounds {
            if s.rounds > 1 {
                eprintln!("   round {} of {}", round + 1, s.rounds);
            }
            // The A/B pair runs in turns: first the meshward pair, then the
            // baseline, in odd rounds; the other way round in even ones.
            let mut order: Vec<usize> = (0..deployments.len()).collect();
            if round % 2 == 1 {
                let at = |k| deployments.iter().position(|d| d.kind == k);
                if let (Some(a), Some(b)) = (at(TargetKind::Meshward), at(TargetKind::Baseline)) {
                    order.swap(a, b);
                }
            }
            for i in order {
                let dep = &mut deployments[i];
                let m = measure(dep, scenario, &target_for(dep.entry), s, clk, &mut notes).await?;
                rounds[i].push(m);
            }
        }
        let cpu_of = |k| {
            deployments.iter().position(|d| d.kind == k).map(|i| {
                rounds[i]
                    .iter()
                    .map(Measurement::cpu_per_1k)
                    .collect::<Vec<_>>()
            })
        };
        for (num, den, what) in [
            (
                TargetKind::Meshward,
                TargetKind::Baseline,
                "meshward / baseline",
            ),
            (
                TargetKind::Captured,
                TargetKind::Meshward,
                "captured / explicit outbound listener",
            ),
        ] {
            if let (Some(a), Some(b)) = (cpu_of(num), cpu_of(den)) {
                let ratios: Vec<String> = a
                    .iter()
                    .zip(&b)
                    .filter_map(|(a, b)| Some(format!("{:.3}", (*a)? / (*b)?)))
                    .collect();
                notes.push(format!(
                    "{}: {what} CPU per 1,000 requests, round by round: {}",
                    scenario.title(),
                    ratios.join(", ")
                ));
            }
        }
        for (dep, mut ms) in deployments.iter().zip(rounds) {
            if ms.len() > 1 {
                let cpus: Vec<String> = ms
                    .iter()
                    .filter_map(|m| m.cpu_per_1k())
                    .map(|c| format!("{c:.3}"))
                    .collect();
                if !cpus.is_empty() {
                    notes.push(format!(
                        "{}, {}: CPU s per 1,000 requests by round: {} (the median round is reported)",
                        scenario.title(),
                        dep.kind.label(),
                        cpus.join(", ")
                    ));
                }
            }
            for (round, m) in ms.iter().enumerate() {
                if let Some(sched) = m.sched_per_request() {
                    notes.push(format!(
                        "{}, {}, round {}: {sched}",
                        scenario.title(),
                        dep.kind.label(),
                        round + 1
                    ));
                }
            }
            // Peak memory is the peak over every round, not the median's.
            let peaks: Vec<u64> = (0..dep.procs.len())
                .map(|i| {
                    ms.iter()
                        .map(|m| m.procs[i].peak_rss_kib)
                        .max()
                        .unwrap_or(0)
                })
                .collect();
            ms.sort_by(|a, b| median_key(a).total_cmp(&median_key(b)));
            let mut median = ms.swap_remove(ms.len() / 2);
            for (p, peak) in median.procs.iter_mut().zip(peaks) {
                p.peak_rss_kib = peak;
            }
            sr.rows.push(median);
        }
        results.push(sr);
    }
    let load_after = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();

    notes.sort();
    notes.dedup();
    let mut md = header(
        s,
        envoy_version,
        meshward_version,
        &load_before,
        &load_after,
    );
    for r in &results {
        md.push_str(&report::scenario_table(r));
    }
    md.push_str(&report::targets_table(&results));
    md.push_str(&report::floor_table(&results));
    if !notes.is_empty() {
        md.push_str("Notes:\n\n");
        for n in &notes {
            md.push_str(&format!("- {n}\n"));
        }
        md.push('\n');
    }
    println!("{md}");
    if let Some(out) = &args.out {
        std::fs::write(out, &md).with_context(|| format!("writing {}", out.display()))?;
        eprintln!("report written to {}", out.display());
    }
    Ok(complete)
}

/// One warm-up and one measured run of `scenario` on `dep`.
async fn measure(
    dep: &mut Deployment,
    scenario: Scenario,
    target: &Target,
    s: &Settings,
    clk: f64,
    notes: &mut Vec<String>,
) -> Result<Measurement> {
    if !s.warmup.is_zero() {
        let w = drive(scenario, target, s.warmup, s).await?;
        if w.ok == 0 {
            eprintln!("{}: warm-up had no successful request", dep.kind.label());
        }
    }
    dep.check_alive()?;
    let mut hwm_reset = true;
    for (_, p) in &dep.procs {
        hwm_reset &= procs::reset_peak_rss(p.pid());
    }
    if !hwm_reset {
        notes.push(
            "peak RSS could not be reset per run (clear_refs refused): it is the peak since start"
                .to_owned(),
        );
    }
    let before = dep.usage(clk)?;
    let machine_before = procs::Machine::read();
    let started = std::time::Instant::now();
    let res = drive(scenario, target, s.duration, s).await?;
    let machine =
        procs::Machine::read().cores_since(&machine_before, started.elapsed().as_secs_f64(), clk);
    let after = dep.usage(clk)?;
    dep.check_alive()?;
    let procs = dep
        .procs
        .iter()
        .zip(before.iter().zip(&after))
        .map(|((role, _), (b, a))| ProcUsage {
            role: (*role).to_owned(),
            cpu_secs: a.cpu_secs - b.cpu_secs,
            peak_rss_kib: a.peak_rss_kib,
            sched: a.sched.since(&b.sched),
        })
        .collect();
    eprintln!(
        "   {:<20} {:>8.0} req/s  p50 {:>7.0} µs  p90 {:>7.0} µs  p99 {:>7.0} µs  errors {}",
        dep.kind.label(),
        res.rps(),
        res.quantile_us(0.5),
        res.quantile_us(0.9),
        res.quantile_us(0.99),
        res.errors
    );
    let m = Measurement {
        target: dep.kind,
        load: res,
        procs,
        machine,
    };
    if let (Some(cpu), Some(sched)) = (m.cpu_per_1k(), m.sched_per_request()) {
        eprintln!("   {:<20} CPU {cpu:.3} s per 1,000 requests; {sched}", "");
    }
    let res = &m.load;
    if res.errors > 0 {
        eprintln!(
            "   first error: {}",
            res.first_error.as_deref().unwrap_or("?")
        );
        dep.print_logs();
    }
    Ok(m)
}

/// What a round is ranked by: CPU per 1,000 requests, or the p90 latency
/// for a target without proxies.
fn median_key(m: &Measurement) -> f64 {
    m.cpu_per_1k().unwrap_or_else(|| m.load.quantile_us(0.9))
}

async fn drive(scenario: Scenario, t: &Target, d: Duration, s: &Settings) -> Result<LoadResult> {
    match scenario {
        Scenario::KeepAlive { rate, connections } => {
            load::fixed_rate(t, rate, connections, d).await
        }
        Scenario::MaxThroughput { connections } => load::max_throughput(t, connections, d).await,
        Scenario::NoKeepAlive { rate } => load::no_keepalive(t, rate, d, s.max_in_flight).await,
    }
}

/// A GET must get through (bounded retries: listeners may bind just after
/// readiness); for proxies, a POST must be denied by the policy (403).
async fn preflight(dep: &mut Deployment, t: &Target, s: &Settings) -> Result<Option<String>> {
    let attempts = (s.ready_timeout.as_secs_f64() / READY_POLL.as_secs_f64()).ceil() as u32;
    let mut last = String::new();
    let mut passed = false;
    for _ in 0..attempts.max(1) {
        dep.check_alive()?;
        match load::one_shot(t, Method::GET).await {
            Ok(StatusCode::OK) => {
                passed = true;
                break;
            }
            Ok(st) => last = format!("GET returned {st}"),
            Err(e) => last = format!("{e:#}"),
        }
        tokio::time::sleep(READY_POLL).await;
    }
    if !passed {
        bail!("GET through {} never succeeded: {last}", dep.kind.label());
    }
    if matches!(dep.kind, TargetKind::Direct | TargetKind::Relay) {
        // Nothing to enforce: the relays carry every request.
        return Ok(None);
    }
    let denied = load::one_shot(t, Method::POST).await?;
    Ok(Some(if denied == StatusCode::FORBIDDEN {
        format!(
            "{}: policy enforced (GET allowed, POST denied with 403)",
            dep.kind.label()
        )
    } else {
        format!(
            "{}: **policy not enforced as expected**: POST returned {denied}, expected 403",
            dep.kind.label()
        )
    }))
}

fn ports(n: usize) -> Result<Vec<u16>> {
    free_ports(n).map_err(|e| anyhow!(e))
}

/// Waits until the process' admin `path` answers 200, failing early when
/// it exits.
async fn wait_ready(p: &mut Process, admin: SocketAddr, path: &str, limit: Duration) -> Result<()> {
    let ready =
        wait::for_admin_ready(|| Some(admin), path, limit, READY_POLL, || p.check_alive()).await;
    ready.map_err(|e| anyhow!("{} {e}; log:\n{}", p.name, p.tail(40)))
}

async fn start_envoy(
    bin: &Path,
    work: &Path,
    certs: &Certs,
    app_port: u16,
    s: &Settings,
) -> Result<Deployment> {
    let dir = work.join("envoy");
    std::fs::create_dir_all(&dir)?;
    let ports = ports(2)?;
    let ports = Ports {
        outbound: ports[0],
        inbound: ports[1],
        app: app_port,
    };
    let mut started = Vec::new();
    // Server first, so that the client's first upstream connection finds it.
    for (role, yaml) in [
        ("server", envoy::server_bootstrap(certs, &ports)),
        ("client", envoy::client_bootstrap(certs, &ports)),
    ] {
        let name = format!("envoy-{role}");
        let envoy = Envoy::start(bin, &dir, &name, &yaml, "warn", s.ready_timeout)
            .await
            .map_err(|e| anyhow!(e))?;
        started.push((role, envoy.process));
    }
    started.reverse();
    Ok(Deployment {
        kind: TargetKind::Envoy,
        entry: SocketAddr::from(([127, 0, 0, 1], ports.outbound)),
        procs: started,
    })
}

async fn start_meshward(
    kind: TargetKind,
    bin: &Path,
    work: &Path,
    certs: &Certs,
    app_port: u16,
    s: &Settings,
    extra: &[&str],
) -> Result<Deployment> {
    let (p, procs) = start_pair(kind, bin, (work, certs), app_port, s, (extra, &[])).await?;
    Ok(Deployment {
        kind,
        entry: SocketAddr::from(([127, 0, 0, 1], p.outbound)),
        procs,
    })
}

/// The meshward pair with the client captured: the service gets an
/// address of its own ([`crate::netns::SERVICE_VIP`]), the client proxy runs
/// with `--capture external`, and one rule of the harness's own
/// (`netns::redirect`) sends what the load generator dials there to the
/// client proxy's capture listener. The same traffic as the meshward
/// pair's, so the difference is what capture costs: the redirect, the
/// original destination and the routing by it.
async fn start_captured(
    bin: &Path,
    work: &Path,
    certs: &Certs,
    app_port: u16,
    s: &Settings,
    extra: &[&str],
) -> Result<Deployment> {
    let kind = TargetKind::Captured;
    let (p, procs) = start_pair(
        kind,
        bin,
        (work, certs),
        app_port,
        s,
        (extra, &["--capture", "external"]),
    )
    .await?;
    Ok(Deployment {
        kind,
        entry: SocketAddr::from((crate::netns::SERVICE_VIP, p.inbound)),
        procs,
    })
}

/// Starts a meshward pair (server, then client) of `kind`; `extra` are
/// the arguments of both, then the client's own.
async fn start_pair(
    kind: TargetKind,
    bin: &Path,
    (work, certs): (&Path, &Certs),
    app_port: u16,
    s: &Settings,
    (extra, client_extra): (&[&str], &[&str]),
) -> Result<(Ports, Vec<(&'static str, Process)>)> {
    let dir = work.join(match kind {
        TargetKind::Baseline => "meshward-baseline",
        TargetKind::Captured => "meshward-captured",
        _ => "meshward",
    });
    let config = dir.join("config");
    std::fs::create_dir_all(&config)?;
    let ports = ports(4)?;
    let p = Ports {
        outbound: ports[0],
        inbound: ports[1],
        app: app_port,
    };
    let vip = (kind == TargetKind::Captured).then_some(crate::netns::SERVICE_VIP);
    for (name, text) in meshward::config_files(&p, &certs.client_principal, vip) {
        std::fs::write(config.join(name), text)?;
    }
    if vip.is_some() {
        // The client proxy (`--capture external`) starts only with the
        // rules in place.
        crate::netns::redirect(p.inbound)?;
    }
    let mut started = Vec::new();
    for (role, certs_dir, admin_port) in [
        ("server", &certs.server.dir, ports[2]),
        ("client", &certs.client.dir, ports[3]),
    ] {
        let admin = SocketAddr::from(([127, 0, 0, 1], admin_port));
        let workload = format!("{}/{role}", certs::NAMESPACE);
        let mut args = extra.to_vec();
        if role == "client" {
            args.extend(client_extra);
        }
        let cmd = meshward::command(bin, &config, &workload, certs_dir, admin, &args);
        let name = match kind {
            TargetKind::Baseline => format!("meshward-baseline-{role}"),
            TargetKind::Captured => format!("meshward-captured-{role}"),
            _ => format!("meshward-{role}"),
        };
        let mut proc = spawn(&name, cmd, &dir)?;
        wait_ready(&mut proc, admin, "/healthz/ready", s.ready_timeout).await?;
        started.push((role, proc));
    }
    started.reverse();
    Ok((p, started))
}

/// Two plain TCP relays in a row, client then server, each started like a
/// one-worker proxy. Readiness is the preflight's GET (retried).
fn start_relay(work: &Path, app_port: u16) -> Result<Deployment> {
    let dir = work.join("relay");
    std::fs::create_dir_all(&dir)?;
    let bin = sibling_binary("meshward-relay").context(
        "meshward-relay is not next to the harness (cargo build --release -p meshward-bench)",
    )?;
    let ports = ports(2)?;
    let addr = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
    let mut started = Vec::new();
    for (role, listen, upstream) in [
        ("server", ports[1], app_port),
        ("client", ports[0], ports[1]),
    ] {
        let mut cmd = Command::new(&bin);
        cmd.arg("--listen")
            .arg(addr(listen).to_string())
            .arg("--upstream")
            .arg(addr(upstream).to_string());
        started.push((role, spawn(&format!("relay-{role}"), cmd, &dir)?));
    }
    started.reverse();
    Ok(Deployment {
        kind: TargetKind::Relay,
        entry: addr(ports[0]),
        procs: started,
    })
}

/// A binary built next to this one, if it is there.
fn sibling_binary(name: &str) -> Option<PathBuf> {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join(name)))
        .filter(|p| p.is_file())
}

fn envoy_binary(args: &Args) -> Result<PathBuf> {
    match &args.envoy {
        Some(b) => Ok(b.clone()),
        None => envoy_proc::install().map_err(|e| anyhow!(e)),
    }
}

/// A proxy or relay with its output in `dir/NAME.log`: a graceful stop
/// (SIGTERM, SIGKILL after 5 s) lets a profiling build write its profile.
fn spawn(name: &str, cmd: Command, dir: &Path) -> Result<Process> {
    let log = dir.join(format!("{name}.log"));
    let what = format!("starting {name}: {cmd:?}");
    Ok(Process::spawn_logged(name, cmd, &log)
        .context(what)?
        .with_grace(Duration::from_secs(5)))
}

fn meshward_binary(args: &Args) -> PathBuf {
    if let Some(b) = &args.meshward {
        return b.clone();
    }
    sibling_binary("meshward").unwrap_or_else(|| PathBuf::from("meshward"))
}

fn first_line(e: &anyhow::Error) -> String {
    format!("{e:#}")
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}

fn header(
    s: &Settings,
    envoy_version: Option<String>,
    meshward_version: Option<String>,
    load_before: &str,
    load_after: &str,
) -> String {
    let date = Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let cores = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    // The CPUs this run (and every process it starts) may use: a run under
    // `taskset -c 1` keeps the whole chain on one vCPU, which takes the
    // scheduler's placement out of the CPU figures (docs/PERFORMANCE.md).
    let allowed = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|st| {
            st.lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .map(|v| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned());
    let la = |l: &str| l.split_whitespace().take(3).collect::<Vec<_>>().join(" ");
    format!(
        "## Proxy vs Envoy: loopback benchmark\n\n\
         - Date: {date}; machine: {cores} cores ({cpu}); CPUs this run may use: {allowed}; \
         load average before / after: {} / {}\n\
         - Envoy: {}; meshward: {}\n\
         - Each proxy runs one worker thread (Envoy `--concurrency 1`, meshward `--worker-threads 1`).\n\
         - Measured runs of {:.1} s after {:.1} s warm-ups; {} byte responses; load generator: one thread \
         (tokio current-thread runtime) in the harness; app: one thread, in the harness.\n\
         - Latency is end to end at the load generator; \"added\" = target minus no proxy at the same quantile.\n\
         - CPU = utime + stime of the proxy processes during the measured run; peak RSS = VmHWM, reset before the run.\n\
         - {}\n\n",
        la(load_before),
        la(load_after),
        envoy_version.unwrap_or_else(|| "not run".to_owned()),
        meshward_version.unwrap_or_else(|| "not run".to_owned()),
        s.duration.as_secs_f64(),
        s.warmup.as_secs_f64(),
        s.body_bytes,
        if s.rounds > 1 {
            format!(
                "{} interleaved rounds per scenario; each row is the target's median round by CPU per 1,000 requests \
                 (the direct run: by p90 latency); peak RSS is the peak over all rounds.",
                s.rounds
            )
        } else {
            "One round per scenario.".to_owned()
        },
    )
}
