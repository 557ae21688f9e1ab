//! `meshward up`: a whole mesh on one host, without root. A control plane
//! (its CA and the configuration directory), one proxy per WorkloadEntry
//! that has one, and an echo application for every workload that declares
//! no application address, each a real process or listener. Every workload
//! lives on its own loopback address, as a pod has its own IP: its proxy's
//! inbound ports are on `ADDRESS:PORT`, its outbound listener on
//! `ADDRESS:15001`, admin on `ADDRESS:15000` and metrics on `ADDRESS:15020`.

pub mod calls;
mod procs;
mod table;

use std::collections::BTreeSet;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use meshward_config::ConfigSet;

use crate::OpsError;
use crate::echo::{Echo, is_http_port};
use crate::live::Live;
use crate::mesh::{MeshWorkload, workloads};
use procs::Child;

/// The proxy ports every workload gets on its own address, as in a pod.
pub const ADMIN_PORT: u16 = 15000;
pub const OUTBOUND_PORT: u16 = 15001;
pub const METRICS_PORT: u16 = 15020;

/// What to run.
#[derive(Debug, Clone)]
pub struct UpOptions {
    /// The `meshward` executable to start the control plane and proxies with.
    pub binary: PathBuf,
    /// The configuration directory; `None`: the built-in example.
    pub config: Option<PathBuf>,
    /// The example calls; `None`: the built-in example's (with no
    /// directory), else none.
    pub calls: Option<PathBuf>,
    /// Where certificates, tokens and logs go; `None`: a temporary
    /// directory removed at exit.
    pub state: Option<PathBuf>,
    pub control_listen: SocketAddr,
    pub control_admin: SocketAddr,
    /// How long the mesh may take to be ready.
    pub ready_timeout: Duration,
}

/// A running mesh.
#[derive(Debug)]
pub struct Mesh {
    pub control_admin: SocketAddr,
    pub config_dir: PathBuf,
    pub logs: PathBuf,
    pub config: ConfigSet,
    pub workloads: Vec<MeshWorkload>,
    control: Child,
    proxies: Vec<Child>,
    _echoes: Vec<Echo>,
    _temp: Option<tempfile::TempDir>,
}

/// Starts the mesh and waits until every proxy is ready and has applied
/// the configuration. `out` gets progress lines.
pub async fn start(opts: &UpOptions, out: &mut dyn Write) -> Result<Mesh, OpsError> {
    let (temp, state) = match &opts.state {
        Some(dir) => (None, dir.clone()),
        None => {
            let t = tempfile::Builder::new()
                .prefix("meshward-up-")
                .tempdir()
                .map_err(|e| OpsError::io("temporary directory", e))?;
            let p = t.path().to_path_buf();
            (Some(t), p)
        }
    };
    let logs = state.join("logs");
    let tokens = state.join("tokens");
    for d in [&logs, &tokens] {
        std::fs::create_dir_all(d).map_err(|e| OpsError::io(d.display().to_string(), e))?;
    }
    let config_dir = match &opts.config {
        Some(dir) => dir.clone(),
        None => {
            let dir = state.join("config");
            crate::example::write_policies(&dir)?;
            dir
        }
    };
    let config = load(&config_dir)?;
    let all = workloads(&config);
    plan_check(&all, opts)?;
    let trust_domain = config.mesh.trust_domain.clone();

    // The control plane.
    let control_state = state.join("control");
    let mut control = Child::spawn(
        "control plane",
        &opts.binary,
        &[
            "control".into(),
            "--config".into(),
            config_dir.display().to_string(),
            "--state".into(),
            control_state.display().to_string(),
            "--trust-domain".into(),
            trust_domain.clone(),
            "--listen".into(),
            opts.control_listen.to_string(),
            "--admin".into(),
            opts.control_admin.to_string(),
        ],
        &logs.join("control.log"),
    )?;
    procs::wait_ready(
        &mut control,
        crate::admin::Side::Control,
        opts.control_admin,
        opts.ready_timeout,
    )
    .await?;
    let _ = writeln!(
        out,
        "control plane ready: gRPC {}, admin {} (CA and certificates in {})",
        opts.control_listen,
        opts.control_admin,
        control_state.display()
    );

    // Echo applications, then the proxies.
    let mut echoes = Vec::new();
    let mut proxies = Vec::new();
    let authority = authority(&control_state, &trust_domain)?;
    for w in &all {
        let Some(addr) = w.address else { continue };
        let declared = w
            .annotations
            .contains_key(meshward_config::annotations::APP_PORTS);
        let mut app_ports = Vec::new();
        if !declared {
            for (name, port) in &w.ports {
                // Without a proxy the application itself is on the
                // workload's port; with one, beside it.
                let at = SocketAddr::new(addr, if w.has_proxy { 0 } else { *port });
                let echo = Echo::start(at, &w.key(), is_http_port(name)).await?;
                app_ports.push(format!("{name}={}", echo.addr));
                echoes.push(echo);
            }
        }
        if !w.has_proxy {
            continue;
        }
        let token = meshward_control::token::mint(
            &authority.ca(),
            &w.namespace,
            &w.service_account,
            Some(Duration::from_secs(3600)),
        )
        .map_err(|e| OpsError::Process(format!("bootstrap token for {}: {e}", w.key())))?;
        let token_file = tokens.join(format!("{}.{}.token", w.namespace, w.name));
        std::fs::write(&token_file, token)
            .map_err(|e| OpsError::io(token_file.display().to_string(), e))?;
        let mut args: Vec<String> = vec![
            "proxy".into(),
            "--control".into(),
            opts.control_listen.to_string(),
            "--workload".into(),
            w.key(),
            "--token-file".into(),
            token_file.display().to_string(),
            "--root-cert".into(),
            control_state.join("root-cert.pem").display().to_string(),
            "--admin".into(),
            SocketAddr::new(addr, ADMIN_PORT).to_string(),
            "--metrics".into(),
            SocketAddr::new(addr, METRICS_PORT).to_string(),
            "--drain-duration".into(),
            "1s".into(),
        ];
        if !w
            .annotations
            .contains_key(meshward_config::annotations::OUTBOUND)
        {
            args.push("--outbound".into());
            args.push(SocketAddr::new(addr, OUTBOUND_PORT).to_string());
        }
        for p in &app_ports {
            args.push("--app-port".into());
            args.push(p.clone());
        }
        let log = logs.join(format!("{}.{}.log", w.namespace, w.name));
        let child = Child::spawn(&format!("proxy of {}", w.key()), &opts.binary, &args, &log)?;
        proxies.push((child, SocketAddr::new(addr, ADMIN_PORT)));
    }
    for (child, admin) in &mut proxies {
        procs::wait_ready(child, crate::admin::Side::Proxy, *admin, opts.ready_timeout).await?;
    }
    let proxies: Vec<Child> = proxies.into_iter().map(|(child, _)| child).collect();
    let expected: BTreeSet<String> = all
        .iter()
        .filter(|w| w.has_proxy && w.address.is_some())
        .map(MeshWorkload::key)
        .collect();
    procs::wait_synced(opts.control_admin, &expected, opts.ready_timeout).await?;
    let _ = writeln!(
        out,
        "{} proxies ready and in sync; logs in {}",
        proxies.len(),
        logs.display()
    );
    Ok(Mesh {
        control_admin: opts.control_admin,
        config_dir,
        logs,
        config,
        workloads: all,
        control,
        proxies,
        _echoes: echoes,
        _temp: temp,
    })
}

impl Mesh {
    /// The table of workloads: SPIFFE ID, ports with their mTLS mode (as
    /// each proxy enforces it), outbound listener.
    pub async fn table(&self) -> Result<String, OpsError> {
        let live = Live::fetch(self.control_admin).await?;
        table::render(&live, &self.workloads).await
    }

    /// Stops every process, proxies first (they drain), then the control
    /// plane.
    pub async fn stop(self) {
        let mut proxies = self.proxies;
        for p in &mut proxies {
            p.terminate();
        }
        for p in &mut proxies {
            p.wait(Duration::from_secs(5)).await;
        }
        let mut control = self.control;
        control.terminate();
        control.wait(Duration::from_secs(5)).await;
    }

    /// A process that exited on its own, with the tail of its log.
    pub fn exited(&mut self) -> Option<String> {
        std::iter::once(&mut self.control)
            .chain(self.proxies.iter_mut())
            .find_map(Child::exited)
    }
}

fn load(dir: &Path) -> Result<ConfigSet, OpsError> {
    let mut loader = meshward_config::Loader::new();
    loader.add_path(dir);
    loader
        .finish()
        .map(|l| l.config)
        .map_err(|d| OpsError::Config(d.to_string()))
}

fn authority(state: &Path, trust_domain: &str) -> Result<meshward_control::Authority, OpsError> {
    let mut options =
        meshward_control::Options::new(meshward_control::CaSource::SelfSigned(state.to_path_buf()));
    options.trust_domain = trust_domain.parse().ok();
    meshward_control::Authority::load(
        options.authority(),
        Arc::new(meshward_control::Metrics::new()),
    )
    .map_err(|e| {
        OpsError::Process(format!(
            "the control plane's CA in {}: {e}",
            state.display()
        ))
    })
}

/// Refuses, before anything starts, a mesh that cannot run on this host:
/// a workload without a loopback address, two workloads on one address, an
/// address or port already taken.
fn plan_check(all: &[MeshWorkload], opts: &UpOptions) -> Result<(), OpsError> {
    if all.is_empty() {
        return Err(OpsError::Invalid(
            "the configuration has no WorkloadEntry: nothing to run".into(),
        ));
    }
    let mut problems = Vec::new();
    let mut seen: Vec<(IpAddr, String)> = Vec::new();
    let mut binds = vec![
        (opts.control_listen, "the control plane's gRPC".to_string()),
        (opts.control_admin, "the control plane's admin".to_string()),
    ];
    for w in all {
        let Some(addr) = w.address else {
            problems.push(format!("WorkloadEntry {} has no address", w.key()));
            continue;
        };
        if !addr.is_loopback() {
            problems.push(format!(
                "WorkloadEntry {}: address {addr} is not a loopback address: `meshward up` runs every workload on this host, each on its own 127.x.y.z",
                w.key()
            ));
            continue;
        }
        if let Some((_, other)) = seen.iter().find(|(a, _)| *a == addr) {
            problems.push(format!(
                "WorkloadEntries {other} and {} share the address {addr}: give each workload its own loopback address (127.0.1.1, 127.0.1.2, ...)",
                w.key()
            ));
            continue;
        }
        seen.push((addr, w.key()));
        for port in w.ports.values() {
            binds.push((
                SocketAddr::new(addr, *port),
                format!("{} port {port}", w.key()),
            ));
        }
        if w.has_proxy {
            let mut ports = vec![(ADMIN_PORT, "admin"), (METRICS_PORT, "metrics")];
            if !w
                .annotations
                .contains_key(meshward_config::annotations::OUTBOUND)
            {
                ports.push((OUTBOUND_PORT, "outbound"));
            }
            for (port, what) in ports {
                binds.push((
                    SocketAddr::new(addr, port),
                    format!("{}'s proxy {what}", w.key()),
                ));
            }
        }
    }
    for (addr, what) in &binds {
        if let Err(e) = std::net::TcpListener::bind(addr) {
            problems.push(format!(
                "{what}: cannot listen on {addr}: {e} (is another mesh running?)"
            ));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(OpsError::Invalid(problems.join("\n")))
    }
}

/// The example calls to make: from `opts.calls`, else the built-in
/// example's when running it, else none.
pub fn example_calls(opts: &UpOptions) -> Result<Vec<calls::ExampleCall>, OpsError> {
    match (&opts.calls, &opts.config) {
        (Some(path), _) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| OpsError::io(path.display().to_string(), e))?;
            calls::parse(&path.display().to_string(), &text)
        }
        (None, None) => calls::parse("built-in example calls", crate::example::CALLS),
        (None, Some(_)) => Ok(Vec::new()),
    }
}

/// Makes each call and prints a line per call (`ok` or `FAIL` against what
/// it expects, with the differences); returns how many failed.
pub async fn run_calls(
    control_admin: SocketAddr,
    example: &[calls::ExampleCall],
    out: &mut dyn Write,
) -> Result<usize, OpsError> {
    if example.is_empty() {
        return Ok(0);
    }
    let live = Live::fetch(control_admin).await?;
    let mut failed = 0;
    for c in example {
        let got = crate::call::call(&live, &c.spec()).await?;
        let wrong = c.mismatches(&got);
        let mark = if wrong.is_empty() { "ok  " } else { "FAIL" };
        let _ = writeln!(
            out,
            "{mark} meshward call {} {}{}{}\n       {}",
            c.from,
            if c.method == "GET" {
                String::new()
            } else {
                format!("-X {} ", c.method)
            },
            c.url,
            c.body
                .as_ref()
                .map(|b| format!(" -d '{b}'"))
                .unwrap_or_default(),
            calls::summary(&got)
        );
        for w in &wrong {
            let _ = writeln!(out, "       expected otherwise: {w}");
        }
        if !wrong.is_empty() {
            failed += 1;
        }
    }
    Ok(failed)
}
