//! `meshward mtls report`: the migration report (see
//! `meshward_ops::report`).

use std::process::ExitCode;
use std::time::Duration;

use meshward_ops::report::{ReportOptions, report};

use crate::live::ControlArgs;
use crate::output::Format;

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Per source, destination and port: connections and requests over
    /// mTLS and in plaintext, the plaintext callers, the workloads without
    /// a proxy, and with --if-strict what STRICT would refuse.
    Report(ReportArgs),
}

#[derive(Debug, clap::Args)]
pub struct ReportArgs {
    /// Only traffic into this namespace.
    #[arg(long, short = 'n')]
    namespace: Option<String>,
    /// Only traffic this recent (e.g. 10m; the proxies keep 60 one-minute
    /// buckets). Default: since each proxy started.
    #[arg(long, value_parser = parse_since)]
    since: Option<Duration>,
    /// List the plaintext flows that STRICT mTLS in this namespace would refuse.
    #[arg(long, value_name = "NS")]
    if_strict: Option<String>,
    #[command(flatten)]
    control: ControlArgs,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Text)]
    output: Format,
}

fn parse_since(s: &str) -> Result<Duration, String> {
    let d = meshward_identity::duration::parse_duration(s).map_err(|e| e.to_string())?;
    if d.is_zero() || d > Duration::from_secs(3600) {
        return Err(
            "must be between 1s and 60m (the proxies keep one hour of one-minute buckets)".into(),
        );
    }
    Ok(d)
}

pub fn run(cmd: Command) -> anyhow::Result<ExitCode> {
    let Command::Report(args) = cmd;
    let options = ReportOptions {
        namespace: args.namespace,
        since: args.since,
        if_strict: args.if_strict,
    };
    let rt = tokio::runtime::Runtime::new()?;
    let r = rt.block_on(async {
        let live = args.control.live().await?;
        Ok::<_, anyhow::Error>(report(&live, options).await)
    })?;
    match args.output {
        Format::Json => println!("{}", serde_json::to_string_pretty(&r.to_json())?),
        Format::Text => print!("{}", r.render()),
    }
    Ok(ExitCode::SUCCESS)
}
