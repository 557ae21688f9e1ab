//! `meshward describe WORKLOAD`: as `istioctl x describe` and `istioctl x
//! authz check`. Without `--config` it asks the workload's running proxy
//! (found through the control plane) what it enforces; with `--config` it
//! computes the same offline from the files.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use meshward_ops::admin::{Side, get_json};
use meshward_policy::PolicyEngine;
use serde_json::Value;

use crate::live::ControlArgs;
use crate::output::{self, ConfigArgs, WorkloadArgs};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The workload as namespace/name: a WorkloadEntry, or else the
    /// workload with label app=name in that namespace.
    #[arg(value_name = "NS/NAME")]
    workload: String,
    /// Offline: files or directories of Istio resources. Without it, the
    /// running proxy of the workload is asked.
    #[arg(long = "config", short = 'c', value_name = "PATH")]
    config: Vec<PathBuf>,
    /// Offline: mesh settings (as for `validate`).
    #[arg(long, value_name = "FILE", requires = "config")]
    mesh_config: Option<PathBuf>,
    #[command(flatten)]
    target: WorkloadArgs,
    #[command(flatten)]
    control: ControlArgs,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    if args.config.is_empty() {
        return live(&args);
    }
    let config_args = ConfigArgs {
        config: args.config.clone(),
        mesh_config: args.mesh_config.clone(),
    };
    let loaded = output::load_or_fail(&config_args)?;
    let engine = PolicyEngine::new(Arc::new(loaded.config));
    let workload = output::resolve_workload(engine.config(), Some(&args.workload), &args.target)?;
    let policy = engine.workload(&workload);
    let config = engine.config();
    println!("Workload {}: {workload}", args.workload);
    println!(
        "  identity: spiffe://{}",
        workload.principal(&config.mesh.trust_domain)
    );

    // Ports: those the workload or its services declare, plus port-level overrides.
    let mut ports: BTreeSet<u16> = policy.peer_modes().ports.keys().copied().collect();
    for e in config
        .workload_entries
        .iter()
        .filter(|e| e.meta.namespace == workload.namespace && e.spec.labels == workload.labels)
    {
        ports.extend(e.spec.ports.values().copied());
    }
    for se in config
        .service_entries
        .iter()
        .filter(|s| s.meta.namespace == workload.namespace)
    {
        let selects = se
            .spec
            .workload_selector
            .as_ref()
            .is_some_and(|sel| sel.iter().all(|(k, v)| workload.labels.get(k) == Some(v)));
        if selects {
            ports.extend(
                se.spec
                    .ports
                    .iter()
                    .map(|p| p.target_port.unwrap_or(p.number)),
            );
        }
    }
    println!("\nPeer authentication (inbound mTLS):");
    let d = &policy.peer_modes().workload;
    println!("  all ports: {} ({})", d.mode, d.source);
    for port in ports {
        let d = policy.mtls(port);
        println!("  port {port}: {} ({})", d.mode, d.source);
    }

    println!("\nAuthorization policies, in evaluation order:");
    let policies = policy.policies();
    if policies.is_empty() {
        println!("  none: every request is allowed");
    }
    for p in &policies {
        let spec = config
            .authorization_policies
            .iter()
            .find(|r| r.meta.namespace == p.namespace && r.meta.name == p.name);
        let rules = spec.map_or(0, |r| r.spec.rules.len());
        let scope = if p.namespace == config.mesh.root_namespace {
            " (mesh-wide, root namespace)"
        } else {
            ""
        };
        let dry = if p.dry_run {
            " [dry-run: evaluated, not enforced]"
        } else {
            ""
        };
        let origin = spec
            .map(|r| format!("{}:{}", r.origin.file, r.origin.line))
            .unwrap_or_default();
        println!(
            "  {:<6} {p}{scope}{dry}: {rules} rule(s), {origin}",
            p.action.as_str()
        );
    }
    let has_allow = policies
        .iter()
        .any(|p| p.action == meshward_config::model::Action::Allow && !p.dry_run);
    if has_allow {
        println!("  => requests that match no ALLOW rule are denied");
    }
    if let Some(problem) = policy.custom_problem() {
        println!(
            "  => the CUSTOM policies cannot be enforced ({problem}): what their rules match is denied"
        );
    }

    let ras: Vec<_> = engine.request_authentications(&workload).collect();
    println!("\nRequest authentication (JWT):");
    if ras.is_empty() {
        println!("  none");
    }
    for r in ras {
        let issuers: Vec<&str> = r.spec.jwt_rules.iter().map(|j| j.issuer.as_str()).collect();
        println!("  {}: issuers {}", r.key(), issuers.join(", "));
    }
    Ok(ExitCode::SUCCESS)
}

/// Asks the workload's running proxy: the mTLS mode of each port it
/// listens on, the authorization policies and JWT rules it enforces, and
/// the DestinationRule of each service it routes to.
fn live(args: &Args) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Runtime::new()?;
    let (live, proxy, dump) = rt.block_on(async {
        let live = args.control.live().await?;
        let proxy = live.proxy(&args.workload)?.clone();
        let admin = proxy
            .admin
            .expect("reachable proxies have an admin address");
        let dump = get_json(Side::Proxy, admin, "/config_dump").await?;
        Ok::<_, anyhow::Error>((live, proxy, dump))
    })?;
    let s = |v: &Value| v.as_str().unwrap_or("-").to_string();
    println!(
        "Workload {} (its running proxy, admin {}, configuration version {})",
        proxy.workload,
        proxy.admin.map(|a| a.to_string()).unwrap_or_default(),
        dump["version"]
    );
    println!("  identity: {}", s(&dump["identity"]));
    println!("\nPeer authentication (inbound mTLS), as the proxy enforces it:");
    for p in dump["inbound"].as_array().into_iter().flatten() {
        println!(
            "  port {} ({}): {} ({})",
            p["port"],
            s(&p["name"]),
            s(&p["mtls_mode"]),
            s(&p["mtls_source"])
        );
    }
    println!("\nAuthorization policies, in evaluation order:");
    let policies = dump["authorization_policies"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if policies.is_empty() {
        println!("  none: every request is allowed");
    }
    for p in &policies {
        let (ns, name) = (s(&p["namespace"]), s(&p["name"]));
        let (rules, origin) = live.authorization_policy(&ns, &name);
        let scope = if ns == live.config.mesh.root_namespace {
            " (mesh-wide, root namespace)"
        } else {
            ""
        };
        let dry = if p["dry_run"] == true {
            " [dry-run: evaluated, not enforced]"
        } else {
            ""
        };
        println!(
            "  {:<6} {ns}/{name}{scope}{dry}: {rules} rule(s), {origin}",
            s(&p["action"])
        );
    }
    if policies
        .iter()
        .any(|p| p["action"] == "ALLOW" && p["dry_run"] != true)
    {
        println!("  => requests that match no ALLOW rule are denied");
    }
    if let Some(problem) = dump["custom_problem"].as_str() {
        println!(
            "  => the CUSTOM policies cannot be enforced ({problem}): what their rules match is denied"
        );
    }
    println!("\nRequest authentication (JWT):");
    let jwt = dump["request_authentication"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if jwt.is_empty() {
        println!("  none");
    }
    for j in &jwt {
        println!(
            "  {}: issuer {}, {} key(s) from {}{}",
            s(&j["policy"]),
            s(&j["issuer"]),
            j["keys"]["keys"],
            s(&j["keys"]["source"]),
            j["keys"]["error"]
                .as_str()
                .map(|e| format!(" ({e})"))
                .unwrap_or_default()
        );
    }
    println!("\nDestination rules for its outbound traffic:");
    let services = dump["services"].as_array().cloned().unwrap_or_default();
    if services.is_empty() {
        println!("  no services");
    }
    for svc in &services {
        let tls = match svc["tls"].as_str() {
            Some(mode) => mode.to_string(),
            None => "auto-mTLS".to_string(),
        };
        match svc["destination_rule"].as_str() {
            Some(dr) => println!("  {}: DestinationRule {dr}, TLS {tls}", s(&svc["host"])),
            None => println!("  {}: none (TLS {tls})", s(&svc["host"])),
        }
    }
    Ok(ExitCode::SUCCESS)
}
