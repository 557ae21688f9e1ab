//! Child processes (the proxies) and their resource usage, read from
//! `/proc`: CPU time (utime + stime) and peak RSS (VmHWM, reset per run
//! through `/proc/PID/clear_refs`).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result, bail};

/// A child process that is killed (and reaped) on drop. Its stdout and
/// stderr go to a log file that is printed when a run fails.
#[derive(Debug)]
pub struct Proc {
    pub name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command, log_dir: &Path) -> Result<Self> {
        let log = log_dir.join(format!("{name}.log"));
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .with_context(|| format!("starting {name}: {cmd:?}"))?;
        Ok(Self {
            name: name.to_owned(),
            child,
            log,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails (with the log's tail) if the process has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited ({status}); its log ({}):\n{}",
                self.name,
                self.log.display(),
                self.log_tail(40)
            );
        }
        Ok(())
    }

    /// The last `lines` lines of the process' output.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        let start = all.len().saturating_sub(lines);
        let mut out = String::new();
        for l in &all[start..] {
            out.push_str("    ");
            out.push_str(l);
            out.push('\n');
        }
        out
    }

    pub fn usage(&self, clk_tck: f64) -> Result<Usage> {
        usage(self.pid(), clk_tck)
    }

    /// Resets VmHWM to the current RSS so that the next reading is the
    /// peak of the coming run (Linux >= 4.0). Returns false if the kernel
    /// refused, in which case VmHWM is the peak since process start.
    pub fn reset_peak_rss(&self) -> bool {
        std::fs::write(format!("/proc/{}/clear_refs", self.pid()), "5").is_ok()
    }
}

impl Drop for Proc {
    /// Stops the process as an orchestrator does: SIGTERM, then SIGKILL if
    /// it has not exited within a few seconds. A graceful exit lets a
    /// profiling build (`scripts/release.sh`) write its profile.
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let termed = Command::new("kill")
                .args(["-TERM", &self.pid().to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if termed {
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
                while matches!(self.child.try_wait(), Ok(None))
                    && std::time::Instant::now() < deadline
                {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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
