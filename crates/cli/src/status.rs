//! `meshward status`, as `istioctl proxy-status`.

use std::process::ExitCode;

use crate::live::ControlArgs;
use crate::output::Format;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    control: ControlArgs,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Text)]
    output: Format,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Runtime::new()?;
    let (live, rows) = rt.block_on(async {
        let live = args.control.live().await?;
        let rows = meshward_ops::status::status(&live).await;
        Ok::<_, anyhow::Error>((live, rows))
    })?;
    match args.output {
        Format::Json => println!(
            "{}",
            serde_json::to_string_pretty(&meshward_ops::status::to_json(&live, &rows))?
        ),
        Format::Text => print!("{}", meshward_ops::status::render(&live, &rows)),
    }
    Ok(ExitCode::SUCCESS)
}
