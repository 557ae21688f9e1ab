//! `meshward describe WORKLOAD --config PATH`: the offline counterpart of
//! `istioctl x describe` and `istioctl x authz check`.

use std::collections::BTreeSet;
use std::process::ExitCode;
use std::sync::Arc;

use meshward_policy::PolicyEngine;

use crate::output::{self, ConfigArgs, WorkloadArgs};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The workload as namespace/name: a WorkloadEntry, or else the
    /// workload with label app=name in that namespace.
    #[arg(value_name = "NS/NAME")]
    workload: String,
    #[command(flatten)]
    config: ConfigArgs,
    #[command(flatten)]
    target: WorkloadArgs,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let loaded = output::load_or_fail(&args.config)?;
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
