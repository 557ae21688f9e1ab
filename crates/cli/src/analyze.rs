//! `meshward analyze PATH...`: the counterpart of `istioctl analyze`. The
//! checks live in `meshward_policy::analyze`; this module loads the
//! configuration, prints the messages as istioctl does and picks the exit
//! status.
//!
//! Exit status, as istioctl's: 0 when nothing at or above
//! `--failure-threshold` was found; 79 when something was (in every output
//! format; istioctl only sets it for its text format); 65 when a file could
//! not be read or parsed and nothing else was found. A resource that fails
//! validation is an IST0106 error message, so exit status 79.
//!
//! Offline, [`run`] loads the files and calls [`run_on`] with no facts; a
//! live path (the control plane's config and connected proxies) builds the
//! `ConfigSet` and the `Facts` itself and calls [`run_on`] the same way.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::bail;
use meshward_config::ConfigSet;
use meshward_policy::analyze::{Facts, Level, Message, analyze, codes, compares_with_workloads};
use meshward_policy::matcher::Glob;

use crate::output;

/// Issues at or above the failure threshold were found (istioctl's
/// `ExitAnalyzerFoundIssues`).
pub const EXIT_FOUND_ISSUES: u8 = 79;
/// Some files could not be read or parsed (istioctl's `ExitDataError`).
pub const EXIT_UNPARSED: u8 = 65;

/// How messages are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// istioctl's text lines (`log` in istioctl).
    #[value(alias = "log")]
    Text,
    /// A list of objects with istioctl's keys, plus `field`.
    Json,
    /// The same list as YAML.
    Yaml,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Files or directories of Istio resources (multi-document YAML).
    #[arg(value_name = "PATH")]
    pub paths: Vec<PathBuf>,
    /// Mesh settings: a file holding Istio's meshConfig block, Helm values
    /// with `meshConfig:`, or an IstioOperator with `spec.meshConfig`.
    #[arg(long, alias = "meshConfigFile", value_name = "FILE")]
    pub mesh_config: Option<PathBuf>,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value = "text")]
    pub output: Format,
    /// The level (Info, Warning, Error) from which messages make the exit
    /// status non-zero (79).
    #[arg(long, value_parser = level, default_value = "Error", value_name = "LEVEL")]
    pub failure_threshold: Level,
    /// The level (Info, Warning, Error) from which messages are printed.
    #[arg(long, value_parser = level, default_value = "Info", value_name = "LEVEL")]
    pub output_threshold: Level,
    /// Leave out a code for some resources: `CODE=Kind namespace/name`
    /// (or istioctl's `Kind name.namespace`), `*` matching any run of
    /// characters, e.g. `IST0127=AuthorizationPolicy staging/*`. Repeatable.
    /// A resource may also carry the annotation
    /// `galley.istio.io/analyze-suppress: "CODE,..."`.
    #[arg(long, short = 'S', value_parser = suppression, value_name = "CODE=RESOURCE")]
    pub suppress: Vec<Suppression>,
    /// Analyze what the running control plane serves (`/debug/configz`),
    /// knowing which workloads have a proxy connected, instead of files.
    #[arg(long, conflicts_with_all = ["paths", "mesh_config"])]
    pub live: bool,
    #[command(flatten)]
    pub control: crate::live::ControlArgs,
}

/// One `--suppress` value.
#[derive(Debug, Clone)]
pub struct Suppression {
    code: String,
    resource: Glob,
}

impl Suppression {
    /// Whether `m` is suppressed: its code, and its resource as
    /// `Kind namespace/name` or `Kind name.namespace`.
    fn covers(&self, m: &Message) -> bool {
        if m.code != self.code {
            return false;
        }
        let dotted = m
            .resource
            .split_once(' ')
            .and_then(|(kind, key)| {
                let (ns, name) = key.split_once('/')?;
                Some(format!("{kind} {name}.{ns}"))
            })
            .unwrap_or_default();
        self.resource.matches(&m.resource) || self.resource.matches(&dotted)
    }
}

fn suppression(s: &str) -> Result<Suppression, String> {
    let (code, resource) = s
        .split_once('=')
        .ok_or_else(|| format!("\"{s}\" is not CODE=RESOURCE"))?;
    if !codes::ALL.iter().any(|c| c.code == code) {
        eprintln!(
            "warning: supplied message code '{code}' is an unknown message code and will not have any effect"
        );
    }
    Ok(Suppression {
        code: code.to_string(),
        resource: Glob::star(resource),
    })
}

fn level(s: &str) -> Result<Level, String> {
    Level::parse(s).ok_or_else(|| format!("\"{s}\" is not one of Info, Warning, Error"))
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    if args.live {
        return live(&args);
    }
    if args.paths.is_empty() {
        bail!("name the files or directories to analyze, or pass --live");
    }
    let analyzed = analyzed_files(&args.paths);
    match output::load(&args.paths, args.mesh_config.as_ref()) {
        Ok(loaded) => {
            output::print_warnings(&loaded.warnings);
            Ok(run_on(&loaded.config, &Facts::default(), &args, &analyzed))
        }
        Err(diags) => {
            output::print_warnings(&diags);
            let (messages, unparsed) = Message::from_load_errors(&diags);
            for d in &unparsed {
                eprintln!("{d}");
            }
            if !messages.is_empty() {
                eprintln!(
                    "error: {} invalid resource(s) (IST0106); the other checks need a valid configuration and did not run",
                    messages.len()
                );
            }
            let code = report(&messages, &args, &analyzed, unparsed.len());
            Ok(code)
        }
    }
}

/// Analyzes a loaded configuration with what is known of the running mesh,
/// prints the messages, and returns the exit status. `analyzed` names what
/// was analyzed, for the line printed when nothing is found (files, or a
/// description of a live mesh).
/// `--live`: the configuration the control plane serves, with the
/// workloads whose proxies are connected to it.
fn live(args: &Args) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Runtime::new()?;
    let live = rt.block_on(args.control.live())?;
    let with_proxy = live
        .proxies
        .iter()
        .filter(|p| p.connected)
        .filter_map(|p| {
            let (ns, name) = p.workload.split_once('/')?;
            Some((ns.to_string(), name.to_string()))
        })
        .collect();
    let facts = Facts {
        workloads_with_proxy: Some(with_proxy),
    };
    let analyzed = [format!(
        "the configuration the control plane at {} serves",
        live.control_admin
    )];
    Ok(run_on(&live.config, &facts, args, &analyzed))
}

pub fn run_on(config: &ConfigSet, facts: &Facts, args: &Args, analyzed: &[String]) -> ExitCode {
    if !compares_with_workloads(config) {
        eprintln!(
            "note: the configuration describes no WorkloadEntry, so selectors, principals and namespaces were not checked against workloads (IST0127, IST0167, IST0101, MW0101, MW0102)"
        );
    }
    let messages = analyze(config, facts);
    report(&messages, args, analyzed, 0)
}

/// Prints `messages` in the chosen format and picks the exit status.
fn report(messages: &[Message], args: &Args, analyzed: &[String], unparsed: usize) -> ExitCode {
    let messages: Vec<&Message> = messages
        .iter()
        .filter(|m| !args.suppress.iter().any(|s| s.covers(m)))
        .collect();
    let shown: Vec<&Message> = messages
        .iter()
        .copied()
        .filter(|m| m.level >= args.output_threshold)
        .collect();
    match args.output {
        Format::Text => {
            for m in &shown {
                println!("{m}");
            }
        }
        Format::Json => println!("{}", json(&shown)),
        Format::Yaml => print!("{}", yaml(&shown)),
    }
    if shown.is_empty() {
        let target = match analyzed {
            [one] => format!(" {one}"),
            many => format!(":\n  - {}\n", many.join("\n  - ")),
        };
        if unparsed > 0 {
            let files = if unparsed == 1 { "file" } else { "files" };
            eprintln!(
                "No validation issues found when analyzing{} (but {unparsed} {files} could not be parsed).",
                target.trim_end()
            );
        } else if target.ends_with('\n') {
            eprint!("\u{2714} No validation issues found when analyzing{target}");
        } else {
            eprintln!("\u{2714} No validation issues found when analyzing{target}.");
        }
    }
    if messages.iter().any(|m| m.level >= args.failure_threshold) {
        ExitCode::from(EXIT_FOUND_ISSUES)
    } else if unparsed > 0 {
        ExitCode::from(EXIT_UNPARSED)
    } else {
        ExitCode::SUCCESS
    }
}

/// The files read for `paths`, as istioctl lists them.
fn analyzed_files(paths: &[PathBuf]) -> Vec<String> {
    let mut files = BTreeSet::new();
    let mut out = Vec::new();
    for p in paths {
        let found = meshward_config::config_files(p).unwrap_or_else(|_| vec![p.clone()]);
        for f in found {
            let name = f.display().to_string();
            if files.insert(name.clone()) {
                out.push(name);
            }
        }
    }
    out
}

/// One message as istioctl's JSON has it (keys in its alphabetical order),
/// plus `field`.
fn fields(m: &Message) -> serde_json::Map<String, serde_json::Value> {
    let mut o = serde_json::Map::new();
    o.insert("code".into(), m.code.into());
    if let Some(url) = m.documentation_url() {
        o.insert("documentationUrl".into(), url.into());
    }
    if let Some(field) = &m.field {
        o.insert("field".into(), field.clone().into());
    }
    o.insert("level".into(), m.level.as_str().into());
    o.insert("message".into(), m.message.clone().into());
    o.insert("origin".into(), m.resource.clone().into());
    o.insert("reference".into(), m.origin.clone().into());
    o
}

fn json(messages: &[&Message]) -> String {
    let list: Vec<serde_json::Value> = messages
        .iter()
        .map(|m| serde_json::Value::Object(fields(m)))
        .collect();
    // A list of maps of strings always serializes.
    serde_json::to_string_pretty(&list).unwrap_or_default()
}

/// YAML by hand: a list of maps of strings, each value a double-quoted
/// scalar (JSON's string escapes are YAML's).
fn yaml(messages: &[&Message]) -> String {
    if messages.is_empty() {
        return "[]\n".to_string();
    }
    let mut out = String::new();
    for m in messages {
        for (i, (k, v)) in fields(m).iter().enumerate() {
            let lead = if i == 0 { "- " } else { "  " };
            out.push_str(&format!("{lead}{k}: {v}\n"));
        }
    }
    out
}
