//! A mesh run by `meshward control`: control-plane processes over one
//! config directory and one CA directory, and proxies that get their
//! identity and configuration from them (`meshward proxy --control`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use meshward_test_support::Process;

use super::*;

/// A running `meshward control`.
pub struct ControlProcess {
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
    process: Process,
}

impl ControlProcess {
    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        get(self.admin, "admin", path, &[])
            .await
            .unwrap_or((0, String::new()))
    }

    /// `/debug/connections`: every proxy the control plane knows.
    pub async fn connections(&self) -> Vec<serde_json::Value> {
        let (_, body) = self.admin_get("/debug/connections").await;
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        v.as_array()
            .cloned()
            .or_else(|| v["proxies"].as_array().cloned())
            .unwrap_or_default()
    }

    pub async fn metrics(&self) -> String {
        self.admin_get("/metrics").await.1
    }

    pub fn logs(&self) -> String {
        self.process.logs()
    }

    /// SIGTERM, as an orchestrator stops it.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        self.process.terminate()
    }
}

/// Where the control plane's CA comes from.
pub enum CaDir {
    /// `--state DIR`: a self-signed root created on first start.
    State,
    /// `--ca DIR`: a plug-in CA in the cacerts layout, made with `meshward ca init`.
    PlugIn,
}

/// A mesh with a control plane: config directory, CA directory, tokens.
pub struct ControlMesh {
    pub mesh: Mesh,
    ca: CaDir,
    /// Starts proxies with `--cert-ttl` when set.
    pub cert_ttl: Option<&'static str>,
}

impl ControlMesh {
    pub fn new(ca: CaDir) -> ControlMesh {
        // Mesh::new makes `ca/` with `meshward ca init` (a root and an
        // intermediate): the plug-in CA.
        let mesh = Mesh::new();
        ControlMesh {
            mesh,
            ca,
            cert_ttl: None,
        }
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.mesh.path(p)
    }

    /// The CA flag for `control` and `control token`.
    fn ca_args(&self) -> [String; 2] {
        match self.ca {
            CaDir::State => ["--state".into(), self.path("state").display().to_string()],
            CaDir::PlugIn => ["--ca".into(), self.path("ca").display().to_string()],
        }
    }

    /// The roots a new proxy trusts before its first push.
    pub fn root_cert(&self) -> PathBuf {
        match self.ca {
            CaDir::State => self.path("state/root-cert.pem"),
            CaDir::PlugIn => self.path("ca/root-cert.pem"),
        }
    }

    /// Starts `meshward control` on `grpc` (a fresh port when `None`) and
    /// waits until it is ready.
    pub async fn control(&self, grpc: Option<SocketAddr>) -> ControlProcess {
        self.control_with(grpc, &[]).await
    }

    pub async fn control_with(&self, grpc: Option<SocketAddr>, extra: &[&str]) -> ControlProcess {
        let grpc = grpc.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], free_port())));
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let mut cmd = Command::new(bin());
        cmd.arg("control")
            .args(["--config", self.mesh.config_dir().to_str().unwrap()])
            .args(self.ca_args())
            .args(["--listen", &grpc.to_string(), "--admin", &admin.to_string()])
            .args([
                "--log",
                &std::env::var("MESHWARD_TEST_LOG").unwrap_or_else(|_| "info".to_string()),
            ])
            .args(extra);
        let process = spawn_ready("control plane", cmd, admin).await;
        ControlProcess {
            grpc,
            admin,
            process,
        }
    }

    /// `meshward control token` for NS/SA, written to a file.
    pub fn token(&self, ns: &str, sa: &str) -> PathBuf {
        let ca = self.ca_args();
        let token = stdout_of(&[
            "control",
            "token",
            &ca[0],
            &ca[1],
            "--namespace",
            ns,
            "--service-account",
            sa,
        ]);
        let file = self.path(&format!("tokens/{ns}-{sa}"));
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(&file, token.trim()).unwrap();
        file
    }

    /// Starts `meshward proxy --control` for `workload` with a token for
    /// `sa`, and waits until it is ready (certificate and configuration
    /// received).
    pub async fn proxy(
        &self,
        controls: &[&ControlProcess],
        workload: &str,
        sa: &str,
    ) -> ProxyProcess {
        self.proxy_with(controls, workload, sa, &[]).await
    }

    pub async fn proxy_with(
        &self,
        controls: &[&ControlProcess],
        workload: &str,
        sa: &str,
        extra: &[&str],
    ) -> ProxyProcess {
        let (ns, _) = workload.split_once('/').unwrap();
        let token = self.token(ns, sa);
        let addrs = controls
            .iter()
            .map(|c| c.grpc.to_string())
            .collect::<Vec<_>>()
            .join(",");
        let mut args: Vec<String> = vec![
            "--token-file".into(),
            token.display().to_string(),
            "--root-cert".into(),
            self.root_cert().display().to_string(),
        ];
        if let Some(ttl) = self.cert_ttl {
            args.extend(["--cert-ttl".into(), ttl.into()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.mesh
            .spawn_proxy(workload, &["--control", &addrs], &args)
            .await
    }
}

/// Sends requests in a loop until stopped, counting failures.
pub struct Traffic {
    pub ok: Arc<AtomicU64>,
    pub failed: Arc<AtomicU64>,
    pub errors: Arc<std::sync::Mutex<Vec<String>>>,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Traffic {
    /// GETs `path` on `host` through the outbound listener `via`, every
    /// few milliseconds, each on a new connection every `fresh`-th request
    /// so that new mTLS sessions keep being made.
    pub fn start(via: SocketAddr, host: &'static str, path: &'static str) -> Traffic {
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let (o, f, e) = (ok.clone(), failed.clone(), errors.clone());
        let task = tokio::spawn(async move {
            loop {
                let r = get(via, host, path, &[]).await;
                match r {
                    Some((200, _)) => {
                        o.fetch_add(1, Ordering::Relaxed);
                    }
                    other => {
                        f.fetch_add(1, Ordering::Relaxed);
                        let mut errs = e.lock().unwrap();
                        if errs.len() < 20 {
                            errs.push(format!("{other:?}"));
                        }
                    }
                }
                tokio::select! {
                    _ = stopped.changed() => break,
                    _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                }
            }
        });
        Traffic {
            ok,
            failed,
            errors,
            stop,
            task,
        }
    }

    /// Stops the loop and returns (ok, failed, first errors).
    pub async fn stop(self) -> (u64, u64, Vec<String>) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        let errors = self.errors.lock().unwrap().clone();
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            errors,
        )
    }
}

/// The serial of the certificate a proxy serves now (`/certs`).
pub async fn serving_serial(p: &ProxyProcess) -> Option<String> {
    let (_, body) = p.admin_get("/certs").await;
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    v["chain"]["certificates"][0]["serial"]
        .as_str()
        .map(str::to_string)
}
