//! Child processes (proxies, Envoys, relays) that are stopped on drop as
//! an orchestrator stops them, SIGTERM then SIGKILL, and whose output is
//! printed when the test that started them fails.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::wait::patience;

/// Where a child's output goes.
#[derive(Debug)]
enum Output {
    /// Read into memory as it comes (a test parses access-log lines).
    Captured {
        stdout: Arc<Mutex<String>>,
        stderr: Arc<Mutex<String>>,
    },
    /// stdout and stderr together in a file (long runs, large logs).
    File(PathBuf),
}

/// A running child process, stopped (and reaped) on drop.
#[derive(Debug)]
pub struct Process {
    pub name: String,
    child: Child,
    output: Output,
    grace: Duration,
}

impl Process {
    /// Starts `cmd` with its stdout and stderr read into memory.
    pub fn spawn_captured(name: &str, mut cmd: Command) -> std::io::Result<Process> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let stdout = pump(child.stdout.take().expect("stdout is piped"));
        let stderr = pump(child.stderr.take().expect("stderr is piped"));
        Ok(Process {
            name: name.to_owned(),
            child,
            output: Output::Captured { stdout, stderr },
            grace: patience(),
        })
    }

    /// Starts `cmd` with its stdout and stderr written to `log`.
    pub fn spawn_logged(name: &str, mut cmd: Command, log: &Path) -> std::io::Result<Process> {
        let out = File::create(log)?;
        let err = out.try_clone()?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()?;
        Ok(Process {
            name: name.to_owned(),
            child,
            output: Output::File(log.to_owned()),
            grace: patience(),
        })
    }

    /// How long a SIGTERM is given before SIGKILL (default: [`patience`]).
    pub fn with_grace(mut self, grace: Duration) -> Process {
        self.grace = grace;
        self
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// How the process exited, if it has.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// `Err` (with the tail of its output) if the process has exited.
    pub fn check_alive(&mut self) -> Result<(), String> {
        match self.exited() {
            Some(status) => Err(format!(
                "{} exited ({status}); its output:\n{}",
                self.name,
                self.tail(40)
            )),
            None => Ok(()),
        }
    }

    /// What the process wrote to stdout so far (with a log file: the file).
    pub fn stdout(&self) -> String {
        match &self.output {
            Output::Captured { stdout, .. } => stdout.lock().unwrap().clone(),
            Output::File(path) => std::fs::read_to_string(path).unwrap_or_default(),
        }
    }

    /// What the process wrote to stderr so far (with a log file: the file).
    pub fn stderr(&self) -> String {
        match &self.output {
            Output::Captured { stderr, .. } => stderr.lock().unwrap().clone(),
            Output::File(path) => std::fs::read_to_string(path).unwrap_or_default(),
        }
    }

    /// All of its output, headed by its name.
    pub fn logs(&self) -> String {
        match &self.output {
            Output::Captured { stdout, stderr } => format!(
                "--- {} stdout ---\n{}\n--- {} stderr ---\n{}",
                self.name,
                stdout.lock().unwrap(),
                self.name,
                stderr.lock().unwrap()
            ),
            Output::File(path) => format!(
                "--- {} log ({}) ---\n{}",
                self.name,
                path.display(),
                std::fs::read_to_string(path).unwrap_or_default()
            ),
        }
    }

    /// The last `lines` lines of its output, indented.
    pub fn tail(&self, lines: usize) -> String {
        let text = match &self.output {
            Output::Captured { stdout, stderr } => {
                format!("{}{}", stdout.lock().unwrap(), stderr.lock().unwrap())
            }
            Output::File(path) => std::fs::read_to_string(path).unwrap_or_default(),
        };
        let all: Vec<&str> = text.lines().collect();
        let mut out = String::new();
        for l in &all[all.len().saturating_sub(lines)..] {
            out.push_str("    ");
            out.push_str(l);
            out.push('\n');
        }
        out
    }

    /// Stops the process as an orchestrator does (see [`stop`]) and returns
    /// how it exited.
    pub fn terminate(&mut self) -> ExitStatus {
        stop(&mut self.child, self.grace)
    }
}

impl Drop for Process {
    /// A graceful stop lets the process finish its work (a profiling build
    /// writes its profile on exit).
    fn drop(&mut self) {
        stop(&mut self.child, self.grace);
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
    }
}

/// SIGTERM, then SIGKILL if the process is still running after `grace`;
/// reaps it either way and returns how it exited.
pub fn stop(child: &mut Child, grace: Duration) -> ExitStatus {
    if matches!(child.try_wait(), Ok(None)) {
        let termed = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        let deadline = Instant::now() + grace;
        while termed && matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let _ = child.kill();
    child.wait().expect("reaping a child process")
}

fn pump(mut r: impl Read + Send + 'static) -> Arc<Mutex<String>> {
    let out: Arc<Mutex<String>> = Arc::default();
    let out2 = Arc::clone(&out);
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        while let Ok(n) = r.read(&mut buf) {
            if n == 0 {
                break;
            }
            out2.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    out
}
