//! Proxy-vs-Envoy benchmark harness (issue 4, item 7).
//!
//! Runs the same loopback HTTP/1.1 traffic through no proxy, an Envoy pair
//! configured like Istio sidecars and a meshward pair, and reports added
//! latency, throughput, CPU per 1,000 requests and peak RSS per proxy, with
//! the meshward / Envoy ratios. See `bench/README.md`.
//!
//! It must not talk to anything but 127.0.0.1, and every loop it runs is
//! bounded in count and time.

#![forbid(unsafe_code)]

mod certs;
mod envoy;
mod load;
mod meshward;
mod netns;
mod procs;
mod report;
mod run;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// Same traffic through no proxy, an Istio-like Envoy pair and a meshward
/// pair, side by side, on loopback.
#[derive(Debug, Parser)]
#[command(name = "meshward-bench", version)]
pub struct Args {
    /// Also write the Markdown report to this file.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Smoke test: 2 s runs, 0.5 s warm-ups.
    #[arg(long)]
    quick: bool,
    /// Length of each measured run, in seconds.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Warm-up before each measured run (same load, not recorded), in seconds.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Rounds per scenario: every target runs once per round, rounds
    /// interleaved, and the round with each target's median CPU per 1,000
    /// requests (median p90 latency for the direct run) is reported; every
    /// round's CPU figure is listed in the notes. For noisy machines.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Request rate of the keep-alive open-loop run.
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    /// Keep-alive connections of the fixed-rate run.
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// Keep-alive connections of the maximum-throughput run.
    #[arg(long, default_value_t = 32)]
    max_connections: usize,
    /// Request rate of the no-keep-alive run.
    #[arg(long, default_value_t = 500)]
    no_keepalive_rate: u32,
    /// Most requests in flight in the no-keep-alive run; more are dropped.
    #[arg(long, default_value_t = 256)]
    max_in_flight: usize,
    /// Response body size in bytes.
    #[arg(long, default_value_t = 1024)]
    body_bytes: usize,
    /// Targets to run, comma-separated: direct, relay (two plain TCP
    /// relays: the floor any proxy pair pays), envoy, meshward, captured
    /// (the meshward pair with the client's traffic captured; needs
    /// --netns).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "direct,relay,envoy,meshward"
    )]
    targets: Vec<String>,
    /// Scenarios to run, comma-separated: keepalive, max, no-keepalive.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "keepalive,max,no-keepalive"
    )]
    scenarios: Vec<String>,
    /// The Envoy binary (default: what bench/install-envoy.sh prints).
    #[arg(long, env = "ENVOY_BIN")]
    envoy: Option<PathBuf>,
    /// The meshward binary (default: `meshward` next to this binary, else on PATH).
    #[arg(long, env = "MESHWARD_BIN")]
    meshward: Option<PathBuf>,
    /// A second meshward binary, e.g. a build of the previous commit,
    /// measured as one more target (after the meshward pair, in every
    /// round) with the same flags: an interleaved A/B comparison on one
    /// machine state. The notes give meshward / baseline CPU by round.
    #[arg(long, env = "MESHWARD_BASELINE_BIN")]
    baseline: Option<PathBuf>,
    /// Extra argument for both meshward proxies (repeatable), e.g.
    /// `--meshward-arg=--no-watch`.
    #[arg(long = "meshward-arg", value_name = "ARG", allow_hyphen_values = true)]
    meshward_args: Vec<String>,
    /// Fail (instead of skipping) when the meshward proxy is not available.
    #[arg(long)]
    require_meshward: bool,
    /// How long a proxy may take to become ready, in seconds.
    #[arg(long, default_value_t = 30.0)]
    ready_timeout: f64,
    /// Per-request timeout, in seconds.
    #[arg(long, default_value_t = 5.0)]
    request_timeout: f64,
    /// Keep the work directory (configs, certificates, proxy logs).
    #[arg(long)]
    keep_workdir: bool,
    /// Run everything in a network namespace of the harness's own (root):
    /// needed by the `captured` target, which installs a redirect rule.
    #[arg(long)]
    netns: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.netns && std::env::var_os(netns::INSIDE).is_none() {
        return netns::rerun_inside().unwrap_or_else(|e| {
            eprintln!("meshward-bench: {e:#}");
            ExitCode::FAILURE
        });
    }
    match run::run(args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(2),
        Err(e) => {
            eprintln!("meshward-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
