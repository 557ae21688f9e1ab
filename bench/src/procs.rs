//! The resource usage of the proxies (child processes, started with
//! `meshward_test_support::Process`), read from `/proc`: CPU time (utime +
//! stime) and peak RSS (VmHWM, reset per run through
//! `/proc/PID/clear_refs`).

use std::process::Command;

use anyhow::{Context, Result};

/// Resets VmHWM to the current RSS of `pid` so that the next reading is
/// the peak of the coming run (Linux >= 4.0). Returns false if the kernel
/// refused, in which case VmHWM is the peak since process start.
pub fn reset_peak_rss(pid: u32) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

/// A reading of one process' counters.
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    /// utime + stime, in seconds.
    pub cpu_secs: f64,
    /// VmHWM, in KiB.
    pub peak_rss_kib: u64,
}

pub fn usage(pid: u32, clk_tck: f64) -> Result<Usage> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) may contain spaces: fields are counted
    // after its closing parenthesis. utime and stime are fields 14 and 15.
    let rest = stat
        .rfind(')')
        .map(|i| &stat[i + 1..])
        .context("malformed /proc/PID/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| -> Result<f64> {
        let v: u64 = fields
            .get(i)
            .context("short /proc/PID/stat")?
            .parse()
            .context("bad /proc/PID/stat field")?;
        Ok(v as f64)
    };
    // `rest` starts at field 3 (state), so field N is at index N - 3.
    let cpu_secs = (tick(11)? + tick(12)?) / clk_tck;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let peak_rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmHWM in /proc/PID/status")?;
    Ok(Usage {
        cpu_secs,
        peak_rss_kib,
    })
}

/// Clock ticks per second for /proc times (`getconf CLK_TCK`; 100 on every
/// mainstream Linux build if getconf is missing).
pub fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_usage() {
        let u = usage(std::process::id(), clock_ticks()).unwrap();
        assert!(u.peak_rss_kib > 0);
        assert!(u.cpu_secs >= 0.0);
    }
}
