//! Decision and compile cost at mesh sizes of 10, 1,000 and 10,000
//! AuthorizationPolicies, in a realistic mix: most select other workloads,
//! a few tens apply to the target (some DENY, some with `when` conditions).
//!
//! Run: cargo bench -p meshward-policy --bench authz

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use meshward_config::{ConfigSet, Loader};
use meshward_policy::{HttpAttributes, PolicyEngine, Request, Workload};

/// Policies that apply to the target workload (production, app=target).
const APPLYING: usize = 30;

fn policy_yaml(i: usize, total: usize) -> String {
    // The first APPLYING policies (or all, for tiny meshes) select the target.
    let applies = i < APPLYING.min(total);
    let (ns, selector) = if applies {
        match i % 5 {
            0 => ("istio-system".to_string(), "app: target".to_string()),
            1 => ("production".to_string(), String::new()),
            _ => ("production".to_string(), "app: target".to_string()),
        }
    } else {
        (format!("ns-{}", i % 100), format!("app: svc-{i}"))
    };
    let selector = if selector.is_empty() {
        String::new()
    } else {
        format!("  selector:\n    matchLabels:\n      {selector}\n")
    };
    let body = match i % 4 {
        // DENY on an admin path from a namespace.
        0 => format!(
            "  action: DENY\n  rules:\n  - from:\n    - source:\n        namespaces: [\"untrusted-{i}\"]\n    to:\n    - operation:\n        paths: [\"/admin/{i}/*\"]\n"
        ),
        // ALLOW with a header condition.
        1 => format!(
            "  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/team-{i}/sa/client\"]\n    when:\n    - key: request.headers[x-team]\n      values: [\"team-{i}\"]\n"
        ),
        // ALLOW by principal, method and path prefix.
        2 => format!(
            "  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/production/sa/caller-{i}\"]\n    to:\n    - operation:\n        methods: [\"GET\", \"POST\"]\n        paths: [\"/api/v{i}/*\"]\n"
        ),
        // ALLOW for an IP range and port.
        _ => format!(
            "  rules:\n  - from:\n    - source:\n        ipBlocks: [\"10.{}.0.0/16\"]\n    to:\n    - operation:\n        ports: [\"{}\"]\n",
            i % 250,
            9000 + i % 1000
        ),
    };
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: p-{i}\n  namespace: {ns}\nspec:\n{selector}{body}---\n"
    )
}

fn mesh_yaml(total: usize) -> String {
    let mut text = String::new();
    for i in 0..total {
        text.push_str(&policy_yaml(i, total));
    }
    // The policy the benchmarked request matches, last in evaluation order.
    text.push_str(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: frontend\n  namespace: production\nspec:\n  selector:\n    matchLabels:\n      app: target\n  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/production/sa/frontend\"]\n    to:\n    - operation:\n        methods: [\"GET\"]\n        paths: [\"/api/v1/products/*\"]\n",
    );
    text
}

fn load(total: usize) -> ConfigSet {
    let mut loader = Loader::new();
    loader.add_source("bench.yaml", &mesh_yaml(total));
    match loader.finish() {
        Ok(l) => l.config,
        Err(d) => panic!("benchmark config invalid:\n{d}"),
    }
}

fn target() -> Workload {
    Workload {
        namespace: "production".into(),
        service_account: "target".into(),
        labels: BTreeMap::from([
            ("app".into(), "target".into()),
            ("version".into(), "v1".into()),
        ]),
    }
}

fn bench_decide(c: &mut Criterion) {
    let mut group = c.benchmark_group("decide_http");
    for total in [10usize, 1_000, 10_000] {
        let engine = PolicyEngine::new(Arc::new(load(total)));
        let policy = engine.workload(&target());
        let headers: BTreeMap<String, String> = BTreeMap::from([
            ("x-team".into(), "frontend".into()),
            ("user-agent".into(), "bench".into()),
        ]);
        let http = HttpAttributes {
            method: "GET",
            path: "/api/v1/products/42",
            host: "target.production.svc.cluster.local",
            headers: &headers,
            auth: None,
        };
        let req = Request {
            principal: Some("cluster.local/ns/production/sa/frontend"),
            source_ip: "10.1.2.3".parse().unwrap(),
            remote_ip: None,
            destination_ip: None,
            port: 8080,
            sni: None,
            http: Some(http),
        };
        assert!(policy.decide(&req).is_allowed(), "{}", policy.decide(&req));
        group.bench_with_input(BenchmarkId::from_parameter(total), &req, |b, req| {
            b.iter(|| black_box(policy.decide(black_box(req))))
        });
    }
    group.finish();
}

fn bench_compile(c: &mut Criterion) {
    let mut group = c.benchmark_group("compile");
    group.sample_size(10);
    for total in [10usize, 1_000, 10_000] {
        let config = Arc::new(load(total));
        group.bench_with_input(BenchmarkId::new("engine", total), &config, |b, config| {
            b.iter(|| {
                let engine = PolicyEngine::new(Arc::clone(config));
                black_box(engine.workload(&target()))
            })
        });
        let text = mesh_yaml(total);
        group.bench_with_input(
            BenchmarkId::new("parse_validate", total),
            &text,
            |b, text| {
                b.iter(|| {
                    let mut loader = Loader::new();
                    loader.add_source("bench.yaml", text);
                    black_box(loader.finish().is_ok())
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, bench_decide, bench_compile);
criterion_main!(benches);
