//! `meshward policy test` and `meshward policy eval`.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};
use meshward_policy::suite::{parse_suite, run_suite};
use meshward_policy::{HttpAttributes, JwtAuth, PolicyEngine, Request, Verdict};

use crate::output::{self, ConfigArgs, WorkloadArgs};

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Run policy test cases (files or directories of .yaml suites).
    Test(TestArgs),
    /// Answer one what-if question: is this request allowed?
    Eval(Box<EvalArgs>),
}

#[derive(Debug, clap::Args)]
pub struct TestArgs {
    /// Test files, or directories holding them.
    #[arg(required = true, value_name = "FILE_OR_DIR")]
    paths: Vec<PathBuf>,
    /// Also print the checks that pass.
    #[arg(long, short = 'v')]
    verbose: bool,
}

#[derive(Debug, clap::Args)]
pub struct EvalArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// The destination workload as namespace/name (a WorkloadEntry, or
    /// app=name labels); or use --namespace and --label.
    #[arg(long, short = 'w', value_name = "NS/NAME")]
    workload: Option<String>,
    #[command(flatten)]
    target: WorkloadArgs,
    /// The caller's mTLS identity (`cluster.local/ns/NS/sa/SA`, `spiffe://` optional); omit for plaintext.
    #[arg(long = "from", value_name = "PRINCIPAL")]
    principal: Option<String>,
    /// The caller as NS/SA, turned into a principal of the mesh trust domain.
    #[arg(long = "from-sa", value_name = "NS/SA", conflicts_with = "principal")]
    from_sa: Option<String>,
    /// Address of the directly connected peer.
    #[arg(long, default_value = "10.0.0.1")]
    source_ip: IpAddr,
    /// Original client address (X-Forwarded-For), if different.
    #[arg(long)]
    remote_ip: Option<IpAddr>,
    /// Workload address the traffic is sent to.
    #[arg(long)]
    destination_ip: Option<IpAddr>,
    /// http or tcp.
    #[arg(long, default_value = "http", value_parser = ["http", "tcp"])]
    protocol: String,
    /// Workload port the traffic arrives on.
    #[arg(long, short = 'p')]
    port: u16,
    #[arg(long, short = 'X', default_value = "GET")]
    method: String,
    #[arg(long, default_value = "/")]
    path: String,
    /// Host header (default: the workload's name).
    #[arg(long)]
    host: Option<String>,
    /// A request header, `name: value`; repeat for several.
    #[arg(long = "header", short = 'H', value_name = "NAME: VALUE")]
    headers: Vec<String>,
    /// Claims of a JWT that RequestAuthentication accepted, as a JSON object (iss, sub, aud, azp, ...).
    #[arg(long, value_name = "JSON")]
    jwt_claims: Option<String>,
    /// TLS server name of the connection.
    #[arg(long)]
    sni: Option<String>,
    /// What the external authorizer answers when a CUSTOM policy matches.
    #[arg(long, default_value = "deny", value_parser = ["allow", "deny"])]
    ext_authz: String,
}

pub fn run(cmd: Command) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::Test(args) => test(args),
        Command::Eval(args) => eval(*args),
    }
}

fn collect(path: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    if meta.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()?;
        entries.sort();
        for e in entries {
            if e.is_dir() || e.extension().is_some_and(|x| x == "yaml" || x == "yml") {
                collect(&e, out)?;
            }
        }
    } else {
        out.push(path.to_path_buf());
    }
    Ok(())
}

fn test(args: TestArgs) -> anyhow::Result<ExitCode> {
    let mut files = Vec::new();
    for p in &args.paths {
        collect(p, &mut files)?;
    }
    if files.is_empty() {
        bail!("no test files found");
    }
    let (mut passed, mut failed) = (0usize, 0usize);
    for file in &files {
        let name = file.display().to_string();
        let text = std::fs::read_to_string(file).with_context(|| format!("cannot read {name}"))?;
        let suite = match parse_suite(&name, &text) {
            Ok(s) => s,
            Err(diags) => {
                print!("{diags}");
                println!("FAIL {name}: the test file is invalid");
                failed += 1;
                continue;
            }
        };
        let base = file.parent().map(Path::to_path_buf).unwrap_or_default();
        let load_paths =
            move |loader: &mut meshward_config::Loader, p: &str| loader.add_path(&base.join(p));
        for r in run_suite(&suite, &load_paths) {
            if r.passed {
                passed += 1;
                if args.verbose {
                    println!("ok   {name}: {} / {}: {}", r.case, r.check, r.actual);
                }
            } else {
                failed += 1;
                println!(
                    "FAIL {name}: {} / {}: expected {}, got {}",
                    r.case, r.check, r.expected, r.actual
                );
                for line in r.explanation.lines() {
                    println!("       {line}");
                }
            }
        }
    }
    println!("{passed} passed, {failed} failed");
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn eval(args: EvalArgs) -> anyhow::Result<ExitCode> {
    let loaded = output::load_or_fail(&args.config)?;
    let engine = PolicyEngine::new(Arc::new(loaded.config));
    let workload =
        output::resolve_workload(engine.config(), args.workload.as_deref(), &args.target)?;
    let principal = match (&args.principal, &args.from_sa) {
        (Some(p), _) => Some(p.strip_prefix("spiffe://").unwrap_or(p).to_string()),
        (None, Some(sa)) => {
            let (ns, sa) = sa.split_once('/').context("--from-sa must be NS/SA")?;
            Some(format!("{}/ns/{ns}/sa/{sa}", engine.mesh().trust_domain))
        }
        (None, None) => None,
    };
    let mut headers: BTreeMap<String, String> = BTreeMap::new();
    for h in &args.headers {
        let (n, v) = h
            .split_once(':')
            .with_context(|| format!("header \"{h}\" must be written \"name: value\""))?;
        headers
            .entry(n.trim().to_ascii_lowercase())
            .and_modify(|e| {
                e.push(',');
                e.push_str(v.trim());
            })
            .or_insert_with(|| v.trim().to_string());
    }
    let auth = match &args.jwt_claims {
        Some(json) => {
            let value: serde_json::Value =
                serde_json::from_str(json).context("--jwt-claims is not valid JSON")?;
            let serde_json::Value::Object(claims) = value else {
                bail!("--jwt-claims must be a JSON object")
            };
            Some(JwtAuth::from_claims(claims))
        }
        None => None,
    };
    let default_host = args
        .workload
        .as_deref()
        .and_then(|w| w.split_once('/'))
        .map(|(ns, n)| format!("{n}.{ns}.svc.cluster.local"));
    let host = args.host.clone().or(default_host).unwrap_or_default();
    let http = (args.protocol == "http").then(|| HttpAttributes {
        method: &args.method,
        path: &args.path,
        host: &host,
        headers: &headers,
        auth: auth.as_ref(),
    });
    if http.is_none() && auth.is_some() {
        bail!("--jwt-claims needs --protocol http");
    }
    let req = Request {
        principal: principal.as_deref(),
        source_ip: args.source_ip,
        remote_ip: args.remote_ip,
        destination_ip: args.destination_ip,
        port: args.port,
        sni: args.sni.as_deref(),
        http,
    };
    let policy = engine.workload(&workload);
    let decision = policy.decide(&req);
    let verdict = decision.with_ext_authz_result(args.ext_authz == "allow");
    println!("{verdict}");
    println!("  workload: {workload}");
    println!(
        "  mTLS on port {}: {} ({})",
        args.port,
        policy.mtls(args.port).mode,
        policy.mtls(args.port).source
    );
    println!("  {decision}");
    if decision.ext_authz.is_some() {
        println!(
            "  external authorizer answer assumed: {} (--ext-authz)",
            args.ext_authz
        );
    }
    Ok(if verdict == Verdict::Allow {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
