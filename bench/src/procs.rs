//! The resource usage of the proxies (child processes, started with
//! `meshward_test_support::Process`), read from `/proc`: CPU time (utime +
//! stime), peak RSS (VmHWM, reset per run through `/proc/PID/clear_refs`),
//! and the scheduler's counts summed over the process' threads (context
//! switches, time waiting to run), which say whether a CPU figure moved
//! because of the proxy or because of the machine.

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
    pub sched: Sched,
}

/// The scheduler's counters of a process, summed over its live threads
/// (`/proc/PID/task/TID/{status,schedstat}`; a thread that exited between
/// two readings drops out, which the proxies' fixed sets of threads do not
/// do). Zero where the kernel does not expose them.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Sched {
    /// Time on a CPU, in nanoseconds (schedstat field 1).
    pub run_ns: u64,
    /// Time runnable but waiting for a CPU, in nanoseconds (schedstat
    /// field 2): what CPU contention costs in latency, not in CPU.
    pub wait_ns: u64,
    /// Context switches because the thread blocked (went to sleep).
    pub voluntary: u64,
    /// Context switches because the thread was preempted.
    pub involuntary: u64,
    /// Moves of a thread from one CPU to another.
    pub migrations: u64,
    pub threads: u64,
}

impl Sched {
    /// The counts from `before` to `self` (threads: the later count).
    pub fn since(&self, before: &Sched) -> Sched {
        Sched {
            run_ns: self.run_ns.saturating_sub(before.run_ns),
            wait_ns: self.wait_ns.saturating_sub(before.wait_ns),
            voluntary: self.voluntary.saturating_sub(before.voluntary),
            involuntary: self.involuntary.saturating_sub(before.involuntary),
            migrations: self.migrations.saturating_sub(before.migrations),
            threads: self.threads,
        }
    }
}

/// Sums the scheduler counters over the threads of `pid`.
pub fn sched(pid: u32) -> Sched {
    let mut total = Sched::default();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return total;
    };
    for task in tasks.flatten() {
        let dir = task.path();
        total.threads += 1;
        if let Ok(stat) = std::fs::read_to_string(dir.join("schedstat")) {
            let mut f = stat
                .split_whitespace()
                .map(|v| v.parse::<u64>().unwrap_or(0));
            total.run_ns += f.next().unwrap_or(0);
            total.wait_ns += f.next().unwrap_or(0);
        }
        if let Ok(status) = std::fs::read_to_string(dir.join("status")) {
            for line in status.lines() {
                let count = |v: &str| v.trim().parse::<u64>().unwrap_or(0);
                if let Some(v) = line.strip_prefix("voluntary_ctxt_switches:") {
                    total.voluntary += count(v);
                } else if let Some(v) = line.strip_prefix("nonvoluntary_ctxt_switches:") {
                    total.involuntary += count(v);
                }
            }
        }
        if let Ok(sched) = std::fs::read_to_string(dir.join("sched")) {
            let migrations = sched
                .lines()
                .find_map(|l| l.strip_prefix("se.nr_migrations"))
                .and_then(|v| v.trim().trim_start_matches(':').trim().parse::<u64>().ok());
            total.migrations += migrations.unwrap_or(0);
        }
    }
    total
}

/// The whole machine's CPU time from `/proc/stat` (first line), in clock
/// ticks: what every process used, and what the hypervisor took from this
/// VM's virtual CPUs while they had work ("steal").
#[derive(Debug, Clone, Copy, Default)]
pub struct Machine {
    pub busy: u64,
    pub steal: u64,
}

impl Machine {
    pub fn read() -> Machine {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        // cpu user nice system idle iowait irq softirq steal guest guest_nice
        let f: Vec<u64> = stat
            .lines()
            .next()
            .unwrap_or("")
            .split_whitespace()
            .skip(1)
            .map(|v| v.parse().unwrap_or(0))
            .collect();
        let at = |i: usize| f.get(i).copied().unwrap_or(0);
        Machine {
            busy: at(0) + at(1) + at(2) + at(5) + at(6),
            steal: at(7),
        }
    }

    /// (busy, stolen) CPUs on average from `before` to `self`, over
    /// `secs` seconds.
    pub fn cores_since(&self, before: &Machine, secs: f64, clk_tck: f64) -> (f64, f64) {
        let per = |a: u64, b: u64| a.saturating_sub(b) as f64 / clk_tck / secs.max(1e-9);
        (per(self.busy, before.busy), per(self.steal, before.steal))
    }
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
        sched: sched(pid),
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
        assert!(u.sched.threads >= 1);
    }
}
