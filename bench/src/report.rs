//! Markdown output: one table per scenario, then the targets of issue 4
//! (meshward / Envoy ratios and whether each is met).

use std::fmt::Write as _;

use crate::load::LoadResult;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetKind {
    Direct,
    /// Two plain TCP relays (`meshward-relay`): the kernel's floor.
    Relay,
    Envoy,
    Meshward,
    /// A second meshward binary (`--baseline`), e.g. the previous commit's
    /// build, measured in the same rounds for an A/B comparison.
    Baseline,
    /// The meshward pair with the client's side captured: the load
    /// generator dials the service's address and the kernel redirects it
    /// to the client proxy's capture listener (`--netns` only).
    Captured,
}

impl TargetKind {
    pub fn label(self) -> &'static str {
        match self {
            TargetKind::Direct => "no proxy",
            TargetKind::Relay => "plain TCP relay pair",
            TargetKind::Envoy => "Envoy pair",
            TargetKind::Meshward => "meshward pair",
            TargetKind::Baseline => "meshward pair, baseline build",
            TargetKind::Captured => "meshward pair, client captured",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// Open loop, keep-alive, fixed rate.
    KeepAlive { rate: u32, connections: usize },
    /// Closed loop, keep-alive, as fast as possible.
    MaxThroughput { connections: usize },
    /// Open loop, a new connection per request.
    NoKeepAlive { rate: u32 },
}

impl Scenario {
    pub fn title(self) -> String {
        match self {
            Scenario::KeepAlive { rate, connections } => format!(
                "HTTP/1.1 keep-alive, fixed {rate} requests/s (open loop, {connections} connections)"
            ),
            Scenario::MaxThroughput { connections } => format!(
                "HTTP/1.1 keep-alive, maximum throughput (closed loop, {connections} connections)"
            ),
            Scenario::NoKeepAlive { rate } => format!(
                "No keep-alive: a new connection per request, fixed {rate} requests/s (open loop)"
            ),
        }
    }
}

/// One proxy process' usage over a measured run.
#[derive(Debug, Clone)]
pub struct ProcUsage {
    pub role: String,
    pub cpu_secs: f64,
    pub peak_rss_kib: u64,
    /// The scheduler's counts over the run, all threads.
    pub sched: crate::procs::Sched,
}

/// One target in one scenario.
#[derive(Debug)]
pub struct Measurement {
    pub target: TargetKind,
    pub load: LoadResult,
    pub procs: Vec<ProcUsage>,
    /// The machine during the run: CPUs busy (all processes) and CPUs
    /// stolen by the hypervisor, on average.
    pub machine: (f64, f64),
}

impl Measurement {
    /// CPU seconds of all the target's proxy processes per 1,000 requests.
    pub fn cpu_per_1k(&self) -> Option<f64> {
        if self.procs.is_empty() || self.load.ok == 0 {
            return None;
        }
        let cpu: f64 = self.procs.iter().map(|p| p.cpu_secs).sum();
        Some(cpu * 1000.0 / self.load.ok as f64)
    }

    /// The scheduler's view of the run, per request, both proxies summed:
    /// context switches (voluntary + involuntary), µs waiting for a CPU
    /// and µs on one. Switches per request depend on the proxy's wake-up
    /// pattern, hardly on the machine's load; waiting time only on the
    /// load. So a CPU figure that grows with these unchanged is the
    /// machine's, and one that grows with more switches is the proxy's.
    pub fn sched_per_request(&self) -> Option<String> {
        if self.procs.is_empty() || self.load.ok == 0 {
            return None;
        }
        let n = self.load.ok as f64;
        let sum = |f: fn(&crate::procs::Sched) -> u64| -> f64 {
            self.procs.iter().map(|p| f(&p.sched) as f64).sum::<f64>() / n
        };
        let threads: Vec<String> = self
            .procs
            .iter()
            .map(|p| p.sched.threads.to_string())
            .collect();
        Some(format!(
            "{:.2} + {:.2} switches, {:.2} migrations, {:.0} µs waiting, {:.0} µs running per request; threads {}; machine {:.2} CPUs busy, {:.2} stolen",
            sum(|s| s.voluntary),
            sum(|s| s.involuntary),
            sum(|s| s.migrations),
            sum(|s| s.wait_ns) / 1000.0,
            sum(|s| s.run_ns) / 1000.0,
            threads.join(" / "),
            self.machine.0,
            self.machine.1,
        ))
    }

    fn rss_mib(&self, role: &str) -> Option<f64> {
        self.procs
            .iter()
            .find(|p| p.role == role)
            .map(|p| p.peak_rss_kib as f64 / 1024.0)
    }

    pub fn rss_sum_mib(&self) -> Option<f64> {
        (!self.procs.is_empty()).then(|| {
            self.procs
                .iter()
                .map(|p| p.peak_rss_kib as f64 / 1024.0)
                .sum()
        })
    }
}

#[derive(Debug)]
pub struct ScenarioResult {
    pub scenario: Scenario,
    pub rows: Vec<Measurement>,
    /// Targets that were not measured, with the reason.
    pub skipped: Vec<(TargetKind, String)>,
}

impl ScenarioResult {
    pub fn row(&self, t: TargetKind) -> Option<&Measurement> {
        self.rows.iter().find(|m| m.target == t)
    }

    /// Added latency at quantile `q` (µs) of `t` vs. no proxy.
    pub fn added_us(&self, t: TargetKind, q: f64) -> Option<f64> {
        let base = self.row(TargetKind::Direct)?;
        let m = self.row(t)?;
        Some(m.load.quantile_us(q) - base.load.quantile_us(q))
    }
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "–".to_owned(), |v| format!("{v:.digits$}"))
}

pub fn scenario_table(r: &ScenarioResult) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "### {}\n", r.scenario.title());
    s.push_str(
        "| target | requests/s | p50 µs | p90 µs | p99 µs | added p50 µs | added p90 µs | added p99 µs \
         | errors | CPU s / 1k req (client+server) | CPU s / 1k req client / server | peak RSS MiB client / server |\n",
    );
    s.push_str(
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for m in &r.rows {
        let l = &m.load;
        let added = |q| {
            if m.target == TargetKind::Direct {
                "–".to_owned()
            } else {
                opt(r.added_us(m.target, q), 0)
            }
        };
        let per_role = |role: &str| {
            m.procs
                .iter()
                .find(|p| p.role == role)
                .filter(|_| l.ok > 0)
                .map(|p| p.cpu_secs * 1000.0 / l.ok as f64)
        };
        let errors = if l.dropped > 0 {
            format!("{} (+{} dropped)", l.errors, l.dropped)
        } else {
            l.errors.to_string()
        };
        let _ = writeln!(
            s,
            "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {} | {} | {} | {} | {} | {} / {} | {} / {} |",
            m.target.label(),
            l.rps(),
            l.quantile_us(0.5),
            l.quantile_us(0.9),
            l.quantile_us(0.99),
            added(0.5),
            added(0.9),
            added(0.99),
            errors,
            opt(m.cpu_per_1k(), 3),
            opt(per_role("client"), 3),
            opt(per_role("server"), 3),
            opt(m.rss_mib("client"), 1),
            opt(m.rss_mib("server"), 1),
        );
    }
    for (t, why) in &r.skipped {
        let _ = writeln!(
            s,
            "| {} | skipped: {} | | | | | | | | | | |",
            t.label(),
            why
        );
    }
    if let Some(e) = r
        .rows
        .iter()
        .find_map(|m| m.load.first_error.as_ref().map(|e| (m.target, e)))
    {
        let _ = writeln!(s, "\nFirst error ({}): `{}`", e.0.label(), e.1);
    }
    s.push('\n');
    s
}

/// CPU per 1,000 requests above the floor (the plain TCP relay pair):
/// each proxy pair's own work, with the kernel's cost of moving the bytes
/// taken out. Keep-alive scenarios only: without keep-alive the relays
/// open a connection between them per request where the proxies reuse a
/// pooled one, so they are no floor. Empty without a relay row.
/// Information, not a target.
pub fn floor_table(results: &[ScenarioResult]) -> String {
    let mut rows = String::new();
    for r in results {
        if matches!(r.scenario, Scenario::NoKeepAlive { .. }) {
            continue;
        }
        let cpu = |t| r.row(t).and_then(Measurement::cpu_per_1k);
        let Some(floor) = cpu(TargetKind::Relay) else {
            continue;
        };
        let above = |t| cpu(t).map(|c| c - floor);
        let (envoy, meshward) = (above(TargetKind::Envoy), above(TargetKind::Meshward));
        let ratio = match (meshward, envoy) {
            (Some(m), Some(e)) if e > f64::EPSILON => Some(m / e),
            _ => None,
        };
        let _ = writeln!(
            rows,
            "| {} | {} | {} | {} | {} |",
            r.scenario.title(),
            opt(Some(floor), 3),
            opt(envoy, 3),
            opt(meshward, 3),
            opt(ratio, 2),
        );
    }
    if rows.is_empty() {
        return rows;
    }
    format!(
        "### CPU above the floor (plain TCP relay pair)\n\n\
         CPU s per 1,000 requests of each pair minus the relay pair's: what the proxies' own work \
         (TLS, HTTP, policy, telemetry) costs on top of what the kernel charges any proxy pair to \
         move the same bytes. Keep-alive runs only (without keep-alive, the relays open a \
         connection between them per request, where proxies reuse a pooled one). Information only; \
         the targets are on the totals.\n\n\
         | scenario | relay pair (floor) | Envoy above floor | meshward above floor | ratio |\n\
         | --- | ---: | ---: | ---: | ---: |\n{rows}\n"
    )
}

/// A target of issue 4: the ratio meshward / Envoy and its bound.
struct Goal {
    what: &'static str,
    scenario: String,
    meshward: Option<f64>,
    envoy: Option<f64>,
    unit: &'static str,
    /// The ratio must be at most (true) or at least (false) `bound`.
    at_most: bool,
    bound: f64,
}

pub fn targets_table(results: &[ScenarioResult]) -> String {
    let mut goals = Vec::new();
    for r in results {
        let sc = match r.scenario {
            Scenario::KeepAlive { rate, .. } => format!("keep-alive {rate} rps"),
            Scenario::MaxThroughput { .. } => "max throughput".to_owned(),
            Scenario::NoKeepAlive { rate } => format!("no keep-alive {rate} rps"),
        };
        let cpu = |t| r.row(t).and_then(Measurement::cpu_per_1k);
        match r.scenario {
            Scenario::KeepAlive { .. } => {
                goals.push(Goal {
                    what: "added p90 latency",
                    scenario: sc.clone(),
                    meshward: r.added_us(TargetKind::Meshward, 0.9),
                    envoy: r.added_us(TargetKind::Envoy, 0.9),
                    unit: "µs",
                    at_most: true,
                    bound: 0.5,
                });
                goals.push(Goal {
                    what: "CPU s per 1,000 requests (pair)",
                    scenario: sc,
                    meshward: cpu(TargetKind::Meshward),
                    envoy: cpu(TargetKind::Envoy),
                    unit: "s",
                    at_most: true,
                    bound: 0.3,
                });
            }
            Scenario::MaxThroughput { .. } => {
                let rps = |t| r.row(t).map(|m| m.load.rps());
                goals.push(Goal {
                    what: "max throughput",
                    scenario: sc,
                    meshward: rps(TargetKind::Meshward),
                    envoy: rps(TargetKind::Envoy),
                    unit: "req/s",
                    at_most: false,
                    bound: 1.5,
                });
            }
            Scenario::NoKeepAlive { .. } => {
                goals.push(Goal {
                    what: "added p90 latency, no keep-alive",
                    scenario: sc.clone(),
                    meshward: r.added_us(TargetKind::Meshward, 0.9),
                    envoy: r.added_us(TargetKind::Envoy, 0.9),
                    unit: "µs",
                    at_most: true,
                    bound: 1.0,
                });
                goals.push(Goal {
                    what: "CPU s per 1,000 requests, no keep-alive",
                    scenario: sc,
                    meshward: cpu(TargetKind::Meshward),
                    envoy: cpu(TargetKind::Envoy),
                    unit: "s",
                    at_most: true,
                    bound: 1.0,
                });
            }
        }
    }
    // Peak RSS: the largest pair total over all runs.
    let peak = |t| {
        results
            .iter()
            .filter_map(|r| r.row(t).and_then(Measurement::rss_sum_mib))
            .reduce(f64::max)
    };
    goals.push(Goal {
        what: "peak RSS (client + server, max over runs)",
        scenario: "all".to_owned(),
        meshward: peak(TargetKind::Meshward),
        envoy: peak(TargetKind::Envoy),
        unit: "MiB",
        at_most: true,
        bound: 0.2,
    });

    let mut s = String::from("### Targets (issue 4): meshward / Envoy\n\n");
    s.push_str("| metric | scenario | meshward | Envoy | ratio | target | met |\n");
    s.push_str("| --- | --- | ---: | ---: | ---: | --- | --- |\n");
    for g in goals {
        let digits = if g.unit == "s" { 3 } else { 1 };
        let ratio = match (g.meshward, g.envoy) {
            (Some(m), Some(e)) if e.abs() > f64::EPSILON => Some(m / e),
            _ => None,
        };
        let met = match ratio {
            None => "pending".to_owned(),
            Some(r) if (g.at_most && r <= g.bound) || (!g.at_most && r >= g.bound) => {
                "yes".to_owned()
            }
            Some(_) => "**no**".to_owned(),
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} {} | {} {} | {} | {} {}x | {} |",
            g.what,
            g.scenario,
            opt(g.meshward, digits),
            g.unit,
            opt(g.envoy, digits),
            g.unit,
            opt(ratio, 2),
            if g.at_most { "≤" } else { "≥" },
            g.bound,
            met,
        );
    }
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measured(target: TargetKind, ok: u64, cpu_secs: f64) -> Measurement {
        let mut load = LoadResult::new();
        load.ok = ok;
        let role = |role: &str| ProcUsage {
            role: role.to_owned(),
            cpu_secs: cpu_secs / 2.0,
            peak_rss_kib: 1024,
            sched: crate::procs::Sched::default(),
        };
        Measurement {
            target,
            load,
            procs: vec![role("client"), role("server")],
            machine: (0.0, 0.0),
        }
    }

    fn scenario(scenario: Scenario, cpu: [f64; 3]) -> ScenarioResult {
        let [relay, envoy, meshward] = cpu;
        ScenarioResult {
            scenario,
            rows: vec![
                measured(TargetKind::Relay, 1000, relay),
                measured(TargetKind::Envoy, 1000, envoy),
                measured(TargetKind::Meshward, 1000, meshward),
            ],
            skipped: Vec::new(),
        }
    }

    #[test]
    fn the_floor_table_takes_the_relay_pair_out_of_keep_alive_runs_only() {
        let results = [
            scenario(
                Scenario::KeepAlive {
                    rate: 1000,
                    connections: 8,
                },
                [0.1, 0.5, 0.14],
            ),
            scenario(Scenario::NoKeepAlive { rate: 500 }, [0.3, 0.6, 0.2]),
        ];
        let table = floor_table(&results);
        assert!(
            table.contains("| 0.100 | 0.400 | 0.040 | 0.10 |"),
            "{table}"
        );
        assert!(!table.contains("No keep-alive"), "{table}");
        // Without a relay row there is no floor to show.
        let mut without = scenario(
            Scenario::MaxThroughput { connections: 32 },
            [0.1, 0.5, 0.14],
        );
        without.rows.remove(0);
        assert_eq!(floor_table(&[without]), "");
    }
}
