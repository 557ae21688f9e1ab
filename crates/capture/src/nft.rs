//! Running the real `nft` command in the current network namespace.

use std::io::{self, Write};
use std::process::{Command, Stdio};

use crate::rules::{TABLE, nft_ruleset};
use crate::spec::{CaptureSpec, SpecError};

/// Why capture could not be installed, removed or shown.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaptureError {
    /// The settings cannot be used.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// There is no `nft` to run.
    #[error(
        "cannot {action}: the `nft` command was not found; install the nftables package \
         (Debian/Ubuntu: apt-get install nftables; Fedora/RHEL: dnf install nftables)"
    )]
    NftMissing {
        /// What was being done.
        action: &'static str,
    },
    /// The kernel refused: no CAP_NET_ADMIN here.
    #[error(
        "cannot {action}: permission denied; changing traffic capture needs CAP_NET_ADMIN in the \
         workload's network namespace (run it as root, or give this step the NET_ADMIN capability); \
         nft said: {stderr}"
    )]
    PermissionDenied {
        /// What was being done.
        action: &'static str,
        /// What nft printed.
        stderr: String,
    },
    /// `nft` failed otherwise; its message is quoted.
    #[error("cannot {action}: nft failed ({status}): {stderr}")]
    Nft {
        /// What was being done.
        action: &'static str,
        /// How nft exited.
        status: String,
        /// What nft printed.
        stderr: String,
    },
    /// `nft` could not be run or talked to.
    #[error("cannot {action}: running nft: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The error.
        source: io::Error,
    },
}

/// Installs the capture `spec` describes in the current network namespace,
/// in one transaction that replaces any capture installed before
/// (idempotent). Needs CAP_NET_ADMIN there.
pub fn install(spec: &CaptureSpec) -> Result<(), CaptureError> {
    spec.validate()?;
    nft(
        &["-f", "-"],
        Some(&nft_ruleset(spec)),
        "install traffic capture",
    )?;
    Ok(())
}

/// Checks the script for `spec` with `nft --check` (the kernel validates
/// it; nothing is changed). Needs CAP_NET_ADMIN.
pub fn check(spec: &CaptureSpec) -> Result<(), CaptureError> {
    spec.validate()?;
    nft(
        &["--check", "-f", "-"],
        Some(&nft_ruleset(spec)),
        "check the capture rules",
    )?;
    Ok(())
}

/// Removes capture from the current network namespace: deletes table
/// `inet meshward` and nothing else. Returns whether it was there; when
/// it was not, nothing changes and this succeeds.
pub fn remove() -> Result<bool, CaptureError> {
    let action = "remove traffic capture";
    let present = installed(action)?;
    // Add-then-delete in one transaction: succeeds whether or not the
    // table exists (nft 1.0.6 has no `destroy`).
    let script = format!("add table inet {TABLE}\ndelete table inet {TABLE}\n");
    nft(&["-f", "-"], Some(&script), action)?;
    Ok(present)
}

/// The capture rules installed in the current network namespace, as `nft
/// list` prints them; `None` when there are none.
pub fn show() -> Result<Option<String>, CaptureError> {
    let action = "show traffic capture";
    if !installed(action)? {
        return Ok(None);
    }
    nft(&["list", "table", "inet", TABLE], None, action).map(Some)
}

/// Whether table `inet meshward` exists.
fn installed(action: &'static str) -> Result<bool, CaptureError> {
    let tables = nft(&["list", "tables"], None, action)?;
    let wanted = format!("table inet {TABLE}");
    Ok(tables.lines().any(|l| l.trim() == wanted))
}

/// Runs `nft ARGS`, feeding `stdin`; returns its standard output.
fn nft(args: &[&str], stdin: Option<&str>, action: &'static str) -> Result<String, CaptureError> {
    let io_err = |source| CaptureError::Io { action, source };
    let mut child = Command::new("nft")
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => CaptureError::NftMissing { action },
            _ => io_err(e),
        })?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // nft reads the whole script before it answers, so writing first
        // cannot deadlock on its output; dropping the pipe ends the file.
        // A broken pipe means nft stopped early: its status says why.
        if let Err(e) = pipe.write_all(text.as_bytes())
            && e.kind() != io::ErrorKind::BrokenPipe
        {
            return Err(io_err(e));
        }
    }
    let out = child.wait_with_output().map_err(io_err)?;
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    if stderr.contains("Operation not permitted") || stderr.contains("Permission denied") {
        return Err(CaptureError::PermissionDenied { action, stderr });
    }
    Err(CaptureError::Nft {
        action,
        status: out.status.to_string(),
        stderr,
    })
}
