//! `meshward proxy-config secret|listeners|endpoints|authz WORKLOAD`, as
//! `istioctl proxy-config`.

use std::process::ExitCode;

use meshward_ops::proxy_config::{Section, show};

use crate::live::ControlArgs;
use crate::output::Format;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// What to show.
    #[arg(value_enum)]
    section: SectionArg,
    /// The workload, NAMESPACE/NAME (or a NAME only one namespace has).
    workload: String,
    #[command(flatten)]
    control: ControlArgs,
    /// Output format (`secret -o json` has istioctl's shape).
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Text)]
    output: Format,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum SectionArg {
    /// The workload certificate chain (`default`) and the trust roots (`ROOTCA`).
    Secret,
    /// The listeners, with each inbound port's protocol and mTLS mode.
    Listeners,
    /// The services it routes to, their endpoints and how each is secured.
    Endpoints,
    /// The authorization policies it enforces, in evaluation order.
    Authz,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let section = match args.section {
        SectionArg::Secret => Section::Secret,
        SectionArg::Listeners => Section::Listeners,
        SectionArg::Endpoints => Section::Endpoints,
        SectionArg::Authz => Section::Authz,
    };
    let rt = tokio::runtime::Runtime::new()?;
    let shown = rt.block_on(async {
        let live = args.control.live().await?;
        Ok::<_, anyhow::Error>(show(&live, &args.workload, section).await?)
    })?;
    match args.output {
        Format::Json => println!("{}", serde_json::to_string_pretty(&shown.json)?),
        Format::Text => print!("{}", shown.text),
    }
    Ok(ExitCode::SUCCESS)
}
