//! The processes of a mesh `meshward up` runs: started with their output in
//! a log file, stopped with SIGTERM (then SIGKILL), watched for an early
//! exit; and the waits for readiness and configuration sync.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

use crate::OpsError;
use crate::admin::{Side, get, get_json};

/// How often readiness is polled.
const POLL: Duration = Duration::from_millis(50);

/// A process of the mesh, killed if dropped.
#[derive(Debug)]
pub struct Child {
    what: String,
    log: PathBuf,
    child: tokio::process::Child,
}

impl Child {
    /// Starts `binary args`, stdout and stderr to `log`.
    pub fn spawn(
        what: &str,
        binary: &Path,
        args: &[String],
        log: &Path,
    ) -> Result<Child, OpsError> {
        let file =
            std::fs::File::create(log).map_err(|e| OpsError::io(log.display().to_string(), e))?;
        let err = file
            .try_clone()
            .map_err(|e| OpsError::io(log.display().to_string(), e))?;
        let child = Command::new(binary)
            .args(args)
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| OpsError::io(format!("start the {what} ({})", binary.display()), e))?;
        Ok(Child {
            what: what.to_string(),
            log: log.to_path_buf(),
            child,
        })
    }

    /// Asks the process to stop (SIGTERM).
    pub fn terminate(&mut self) {
        if let Some(pid) = self
            .child
            .id()
            .and_then(|p| rustix::process::Pid::from_raw(p as i32))
        {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
    }

    /// Waits up to `grace` for the process to exit, then kills it.
    pub async fn wait(&mut self, grace: Duration) {
        if tokio::time::timeout(grace, self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }

    /// When the process has exited: what, its status and its log's tail.
    pub fn exited(&mut self) -> Option<String> {
        let status = self.child.try_wait().ok().flatten()?;
        Some(format!(
            "the {} exited ({status}); the end of its log ({}):\n{}",
            self.what,
            self.log.display(),
            tail(&self.log, 20)
        ))
    }
}

/// The last `n` lines of a file.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Waits until `admin`'s `/healthz/ready` answers 200, failing if the
/// process exits or `timeout` passes.
pub async fn wait_ready(
    child: &mut Child,
    side: Side,
    admin: SocketAddr,
    timeout: Duration,
) -> Result<(), OpsError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(why) = child.exited() {
            return Err(OpsError::Process(why));
        }
        let last = match get(side, admin, "/healthz/ready").await {
            Ok((s, _)) if s.is_success() => return Ok(()),
            Ok((s, body)) => format!("{s}: {}", String::from_utf8_lossy(&body).trim()),
            Err(e) => e.to_string(),
        };
        if tokio::time::Instant::now() >= deadline {
            return Err(OpsError::Process(format!(
                "the {} is not ready after {}s ({last}); the end of its log ({}):\n{}",
                child.what,
                timeout.as_secs(),
                child.log.display(),
                tail(&child.log, 20)
            )));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Waits until the control plane records a connected proxy for each of
/// `workloads` that has acknowledged the version it was sent (each proxy's
/// version is the hash of its own view).
pub async fn wait_synced(
    control_admin: SocketAddr,
    workloads: &BTreeSet<String>,
    timeout: Duration,
) -> Result<(), OpsError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let connections = get_json(Side::Control, control_admin, "/debug/connections").await?;
        let synced: BTreeSet<String> = connections["proxies"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| {
                p["connected"] == true
                    && p["version_sent"].is_string()
                    && p["version_acked"] == p["version_sent"]
            })
            .filter_map(|p| p["workload"].as_str().map(str::to_string))
            .collect();
        let missing: Vec<&String> = workloads.difference(&synced).collect();
        if missing.is_empty() {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(OpsError::Process(format!(
                "not in sync with the control plane after {}s: {}",
                timeout.as_secs(),
                missing
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        tokio::time::sleep(POLL).await;
    }
}
