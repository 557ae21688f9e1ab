//! `meshward`: the command-line entry point. This file parses arguments and
//! dispatches; each subcommand lives in its own module and calls into the
//! library crates, which own all the logic.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod analyze;
mod ca;
mod call;
mod capture;
mod cert;
mod control;
mod describe;
mod live;
mod mtls;
mod output;
mod policy;
mod process;
mod proxy;
mod proxy_capture;
mod proxy_config;
mod status;
mod up;
mod validate;

/// The version, with the kind of build when it is not a plain `cargo
/// build` (see build.rs).
const VERSION: &str = env!("MESHWARD_VERSION");

#[derive(Debug, Parser)]
#[command(
    name = "meshward",
    version = VERSION,
    about = "Zero-trust service-to-service security: Istio-compatible policies, mTLS and a built-in CA"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a whole mesh on this host: a control plane, a proxy per
    /// workload, echo applications; the built-in example without DIR.
    Up(Box<up::Args>),
    /// Send one request as a workload, through its sidecar, and show the
    /// decision the destination recorded.
    Call(Box<call::Args>),
    /// Every proxy the control plane knows: connected, configuration in
    /// sync (or its last NACK), certificate expiry (as istioctl proxy-status).
    Status(status::Args),
    /// What a running proxy holds: its certificates, listeners, endpoints
    /// or authorization policies (as istioctl proxy-config).
    ProxyConfig(Box<proxy_config::Args>),
    /// mTLS operations: the migration report.
    #[command(subcommand)]
    Mtls(mtls::Command),
    /// Validate Istio security and networking resources; print every error.
    Validate(validate::Args),
    /// Find configuration that loads but cannot do what its author meant
    /// (istioctl analyze): message codes IST0127, MW0103, ...; exit status
    /// 79 when issues at or above --failure-threshold are found.
    Analyze(Box<analyze::Args>),
    /// Test and evaluate authorization and peer-authentication policies offline.
    #[command(subcommand)]
    Policy(policy::Command),
    /// Show the effective mTLS mode and the policies that apply to one workload.
    Describe(Box<describe::Args>),
    /// Run the sidecar proxy for one workload.
    Proxy(Box<proxy::Args>),
    /// Certificate authority operations (create a root/intermediate, issue workload certificates).
    #[command(subcommand)]
    Ca(ca::Command),
    /// Traffic capture in this network namespace: install, remove or show
    /// the rules that send the workload's traffic through its proxy.
    #[command(subcommand)]
    Capture(capture::Command),
    /// Certificate inspection.
    #[command(subcommand)]
    Cert(cert::Command),
    /// Run the control plane: the mesh CA (Istio's certificate service) and
    /// the config push to proxies; `control token` mints bootstrap tokens.
    Control(Box<control::Args>),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Validate(args) => validate::run(args),
        Command::Analyze(args) => analyze::run(*args),
        Command::Policy(cmd) => policy::run(cmd),
        Command::Describe(args) => describe::run(*args),
        Command::Proxy(args) => proxy::run(*args),
        Command::Ca(cmd) => ca::run(cmd),
        Command::Cert(cmd) => cert::run(cmd),
        Command::Capture(cmd) => capture::run(cmd),
        Command::Control(args) => control::run(*args),
        Command::Up(args) => up::run(*args),
        Command::Call(args) => call::run(*args),
        Command::Status(args) => status::run(args),
        Command::ProxyConfig(args) => proxy_config::run(*args),
        Command::Mtls(cmd) => mtls::run(cmd),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(2)
        }
    }
}
