//! `meshward call FROM URL`: one request as a workload, through its
//! sidecar, and the decision its destination recorded.

use std::process::ExitCode;

use anyhow::Context;
use meshward_ops::call::{CallSpec, Reply, call};

use crate::live::ControlArgs;
use crate::output::Format;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The calling workload, NAMESPACE/NAME (or a NAME only one namespace has).
    from: String,
    /// `http://HOST[:PORT]/PATH` or `tcp://HOST:PORT`: HOST is a service's host name, as the
    /// application would put it in `Host`.
    url: String,
    /// The request method.
    #[arg(short = 'X', long = "request", default_value = "GET")]
    method: String,
    /// A request header, `Name: value` (repeatable).
    #[arg(short = 'H', long = "header", value_name = "HEADER")]
    headers: Vec<String>,
    /// The request body.
    #[arg(short = 'd', long = "data")]
    data: Option<String>,
    #[command(flatten)]
    control: ControlArgs,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Text)]
    output: Format,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let mut headers = Vec::new();
    for h in &args.headers {
        let (k, v) = h
            .split_once(':')
            .with_context(|| format!("header {h:?} is not `Name: value`"))?;
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    let spec = CallSpec {
        from: args.from,
        url: args.url,
        method: args.method.to_ascii_uppercase(),
        headers,
        body: args.data.map(String::into_bytes),
    };
    let rt = tokio::runtime::Runtime::new()?;
    let outcome = rt.block_on(async {
        let live = args.control.live().await?;
        Ok::<_, anyhow::Error>(call(&live, &spec).await?)
    })?;
    match args.output {
        Format::Json => println!("{}", serde_json::to_string_pretty(&outcome.to_json())?),
        Format::Text => print!("{}", outcome.render()),
    }
    Ok(match outcome.reply {
        Reply::Response { .. } | Reply::Bytes { .. } => ExitCode::SUCCESS,
        Reply::Failed(_) => ExitCode::from(1),
    })
}
