//! `meshward up [DIR]`: a whole mesh on this host (see `meshward_ops::up`),
//! the table of its workloads, the example calls and their results; then
//! it runs until interrupted. `--check` stops after the calls, exit status
//! 0 when each got what it expects.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use meshward_ops::up::{self, UpOptions};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The configuration directory (WorkloadEntries, ServiceEntries,
    /// policies), watched by the control plane. Default: the built-in
    /// example, the shop of examples/shop.
    dir: Option<PathBuf>,
    /// Make the example calls, stop the mesh, and exit 0 only when each
    /// got the result it expects.
    #[arg(long)]
    check: bool,
    /// The example calls (`calls: [{from, url, method, expect}]`, as
    /// examples/shop/calls.yaml). Default: the built-in example's when
    /// running it, else none.
    #[arg(long, value_name = "FILE")]
    calls: Option<PathBuf>,
    /// Where the CA, tokens and logs go (kept). Default: a temporary
    /// directory removed at exit.
    #[arg(long, value_name = "DIR")]
    state: Option<PathBuf>,
    /// The control plane's gRPC address.
    #[arg(long, default_value_t = meshward_control::DEFAULT_LISTEN)]
    control_listen: SocketAddr,
    /// The control plane's admin address (the other live commands ask it).
    #[arg(long, default_value_t = meshward_control::DEFAULT_ADMIN)]
    control_admin: SocketAddr,
    /// How long the mesh may take to be ready.
    #[arg(long, default_value = "60s", value_parser = parse_timeout)]
    ready_timeout: Duration,
}

fn parse_timeout(s: &str) -> Result<Duration, String> {
    meshward_identity::duration::parse_duration(s).map_err(|e| e.to_string())
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let opts = UpOptions {
        binary: std::env::current_exe().context("cannot find the meshward executable")?,
        config: args.dir,
        calls: args.calls,
        state: args.state,
        control_listen: args.control_listen,
        control_admin: args.control_admin,
        ready_timeout: args.ready_timeout,
    };
    let calls = up::example_calls(&opts)?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let mut signals = crate::process::Signals::new()?;
        let mut out = std::io::stdout();
        let mesh = tokio::select! {
            m = up::start(&opts, &mut out) => m?,
            s = signals.next() => {
                eprintln!("{}: stopped while starting", s.name());
                return Ok(ExitCode::from(1));
            }
        };
        let mut mesh = mesh;
        let _ = writeln!(out, "\n{}", mesh.table().await?);
        let failed = if calls.is_empty() {
            0
        } else {
            let _ = writeln!(out, "Example calls:");
            let failed = up::run_calls(mesh.control_admin, &calls, &mut out).await?;
            let _ = writeln!(out);
            failed
        };
        if args.check {
            mesh.stop().await;
            if failed > 0 {
                let _ = writeln!(out, "{failed} of {} example calls did not get the expected result", calls.len());
                return Ok(ExitCode::from(1));
            }
            let _ = writeln!(out, "all {} example calls got the expected result", calls.len());
            return Ok(ExitCode::SUCCESS);
        }
        let admin = if mesh.control_admin == meshward_control::DEFAULT_ADMIN {
            String::new()
        } else {
            format!(" --control-admin {}", mesh.control_admin)
        };
        let _ = writeln!(
            out,
            "The mesh runs until Ctrl-C. In another terminal:\n  meshward call{admin} production/frontend http://product-catalog.production.svc.cluster.local:8080/api/v1/products\n  meshward status{admin}\n  meshward proxy-config secret{admin} production/orders\n  meshward mtls report{admin}\n  meshward analyze --live{admin}\nConfiguration: {} (edits apply live); logs: {}",
            mesh.config_dir.display(),
            mesh.logs.display()
        );
        let _ = out.flush();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let code = loop {
            tokio::select! {
                s = signals.next() => {
                    eprintln!("{}: stopping the mesh", s.name());
                    break ExitCode::SUCCESS;
                }
                _ = tick.tick() => {
                    if let Some(why) = mesh.exited() {
                        eprintln!("error: {why}");
                        break ExitCode::from(1);
                    }
                }
            }
        };
        mesh.stop().await;
        Ok::<_, anyhow::Error>(code)
    })
}
