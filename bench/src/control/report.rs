//! Measurements of the control process (`/proc`, its `/metrics`), the
//! machine, and the plain-text table.

use super::*;

pub(crate) fn median(sorted: &[f64]) -> f64 {
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

pub(crate) fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// A `/proc/PID/status` field in KiB (`VmRSS:`, `VmHWM:`).
pub(crate) fn proc_status(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// User plus system CPU seconds of a process (`/proc/PID/stat`, read as
/// the proxy benchmark reads it).
pub(crate) fn proc_cpu_seconds(pid: u32) -> Option<f64> {
    crate::procs::usage(pid, crate::procs::clock_ticks())
        .ok()
        .map(|u| u.cpu_secs)
}

pub(crate) async fn metrics_text(control: &Control) -> Option<String> {
    let (status, body) =
        meshward_test_support::http::get(control.admin, "localhost", "/metrics", &[]).await?;
    (status == 200).then_some(body)
}

/// The value of the first metric line starting with `prefix`.
pub(crate) async fn metric_value(control: &Control, prefix: &str) -> Option<f64> {
    let text = metrics_text(control).await?;
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// A histogram's count and sum (and the mean) from `/metrics`.
pub(crate) async fn metric_histogram(control: &Control, name: &str) -> Value {
    let Some(text) = metrics_text(control).await else {
        return Value::Null;
    };
    let find = |suffix: &str| -> Option<f64> {
        let prefix = format!("{name}{suffix}");
        text.lines()
            .find(|l| l.starts_with(&prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    };
    match (find("_count"), find("_sum")) {
        (Some(count), Some(sum)) => json!({
            "count": count,
            "sum_s": round3(sum),
            "mean_ms": if count > 0.0 { round3(sum / count * 1000.0) } else { 0.0 },
        }),
        _ => Value::Null,
    }
}

/// The 1-, 5- and 15-minute load averages (other load on the machine
/// shows in the numbers).
pub(crate) fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

pub(crate) fn machine() -> Value {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_default();
    json!({ "cpus": cpus, "cpu_model": model, "loadavg_start": loadavg() })
}

/// The plain-text report: one row per metric, with its target.
pub(crate) fn table(report: &Value) -> String {
    let mut rows: Vec<(String, String, String)> = Vec::new();
    let fmt = |v: &Value| match v {
        Value::Null => "n/a".to_string(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    if let Some(p) = report.get("push") {
        rows.push((
            "push: proxies connected (workloads)".into(),
            format!("{} ({})", fmt(&p["proxies"]), fmt(&p["workloads"])),
            String::new(),
        ));
        rows.push((
            "push: all subscribed and ACKed, s".into(),
            fmt(&p["subscribe_all_s"]),
            String::new(),
        ));
        rows.push((
            "push: change → all ACKed, median ms".into(),
            fmt(&p["push_all_acked_median_ms"]),
            "≤ 1000".into(),
        ));
        rows.push((
            "push: change → all ACKed, max ms".into(),
            fmt(&p["push_all_acked_max_ms"]),
            "≤ 1000".into(),
        ));
        rows.push((
            "push: rounds, ms".into(),
            fmt(&p["push_all_acked_ms"]),
            String::new(),
        ));
        rows.push((
            "push: largest response payload, bytes".into(),
            fmt(&p["response_payload_max_bytes"]),
            String::new(),
        ));
        rows.push((
            "push: pilot_xds (connected)".into(),
            fmt(&p["pilot_xds"]),
            String::new(),
        ));
        rows.push((
            "memory: control RSS with N connected, MiB".into(),
            fmt(&p["control_rss_connected_mib"]),
            "≤ 100".into(),
        ));
    }
    if let Some(i) = report.get("issuance") {
        rows.push((
            "issuance: proof (connections)".into(),
            format!("{} ({})", fmt(&i["proof"]), fmt(&i["connections"])),
            String::new(),
        ));
        rows.push((
            "issuance: certificates/s".into(),
            fmt(&i["certificates_per_s"]),
            "≥ 2000".into(),
        ));
        rows.push((
            "issuance: certificates (requests)".into(),
            format!("{} ({})", fmt(&i["certificates"]), fmt(&i["requests"])),
            String::new(),
        ));
        rows.push((
            "issuance: outcomes".into(),
            fmt(&i["outcomes"]),
            String::new(),
        ));
        rows.push((
            "issuance: latency p50 / p99 ms".into(),
            format!(
                "{} / {}",
                fmt(&i["latency_p50_ms"]),
                fmt(&i["latency_p99_ms"])
            ),
            String::new(),
        ));
        rows.push((
            "issuance: control CPU s (ms/cert)".into(),
            format!(
                "{} ({})",
                fmt(&i["control_cpu_s"]),
                fmt(&i["control_cpu_ms_per_certificate"])
            ),
            String::new(),
        ));
        rows.push((
            "issuance: harness CPU s".into(),
            fmt(&i["harness_cpu_s"]),
            String::new(),
        ));
    }
    rows.push((
        "memory: control peak RSS (VmHWM), KiB".into(),
        fmt(&report["control_peak_rss_kib"]),
        String::new(),
    ));
    let w0 = rows.iter().map(|r| r.0.chars().count()).max().unwrap_or(0);
    let w1 = rows.iter().map(|r| r.1.chars().count()).max().unwrap_or(0);
    let mut out = format!(
        "meshward control benchmarks ({} CPUs, {}; load average {} before, {} after)\n",
        fmt(&report["machine"]["cpus"]),
        fmt(&report["machine"]["cpu_model"]),
        fmt(&report["machine"]["loadavg_start"]),
        fmt(&report["machine"]["loadavg_end"]),
    );
    for (name, value, target) in rows {
        out.push_str(&format!("{name:<w0$}  {value:>w1$}  {target}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&[]), 0.0);
        assert_eq!(median(&[1.0, 2.0, 9.0]), 2.0);
        assert_eq!(median(&[1.0, 2.0, 4.0, 9.0]), 3.0);
    }

    #[test]
    fn this_process_has_cpu_time_and_memory() {
        assert!(proc_cpu_seconds(std::process::id()).is_some());
        assert!(proc_status(std::process::id(), "VmRSS:").is_some_and(|k| k > 0));
        assert_eq!(proc_status(std::process::id(), "NoSuchField:"), None);
    }

    #[test]
    fn the_table_names_every_target() {
        let report = json!({
            "machine": {"cpus": 2, "cpu_model": "x", "loadavg_start": "1 1 1", "loadavg_end": "1 1 1"},
            "push": {"proxies": 10, "workloads": 2, "push_all_acked_median_ms": 5.0,
                     "push_all_acked_max_ms": 6.0, "control_rss_connected_mib": 20.0},
            "issuance": {"certificates_per_s": 100.0},
            "control_peak_rss_kib": 30000,
        });
        let t = table(&report);
        for needle in ["≤ 1000", "≤ 100", "≥ 2000", "10 (2)", "n/a"] {
            assert!(t.contains(needle), "{needle} missing from:\n{t}");
        }
    }
}
