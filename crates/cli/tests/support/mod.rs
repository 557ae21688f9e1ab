//! Test mesh builder for end-to-end tests: real `meshward proxy`
//! processes on 127.0.0.1 with certificates from `meshward ca`, built on
//! the shared pieces of `meshward_test_support` (echo applications, HTTP
//! clients, bounded waits, child processes stopped on drop with their
//! output printed when a test fails), which are re-exported here.

// Each test binary uses a part of this module.
#![allow(dead_code, unused_imports)]

pub mod control;
pub mod dns;
pub mod tls;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use meshward_test_support::http::{connect, executor, get, h2_handshake, request, send_on};
pub use meshward_test_support::mesh::{self, WorkloadEntry};
pub use meshward_test_support::tls::mtls_connect;
pub use meshward_test_support::{App, Echo, Seen, eventually, free_port, patience};
use meshward_test_support::{Process, wait};

/// The `meshward` binary the tests run: this build's, or the one
/// `MESHWARD_TEST_BIN` names. `scripts/release.sh` runs the suite against
/// its profiling build, so that every feature the tests reach is in the
/// profile that optimizes the release binary.
pub fn bin() -> PathBuf {
    std::env::var_os("MESHWARD_TEST_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_meshward")))
}

pub fn run_ok(args: &[&str]) {
    stdout_of(args);
}

/// A finished command's stdout and stderr, as text.
pub fn output_text(o: &std::process::Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Runs `meshward` with `args`, which must succeed, and returns what it
/// printed.
pub fn stdout_of(args: &[&str]) -> String {
    let out = Command::new(bin()).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "meshward {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `meshward describe <workload>` of the configuration `yaml`, written to
/// `mesh.yaml` in `dir`.
pub fn describe(dir: &Path, workload: &str, yaml: &str) -> String {
    std::fs::write(dir.join("mesh.yaml"), yaml).unwrap();
    stdout_of(&["describe", workload, "-c", dir.to_str().unwrap()])
}

/// A running `meshward proxy`.
pub struct ProxyProcess {
    pub name: String,
    pub admin: SocketAddr,
    /// The Prometheus-only endpoint (`--metrics`).
    pub metrics: SocketAddr,
    process: Process,
}

impl ProxyProcess {
    pub fn access_log(&self) -> Vec<serde_json::Value> {
        self.process
            .stdout()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The first access log line matching `pred`, waiting for it: lines
    /// reach the test through a pipe, a little after the proxy wrote them.
    pub async fn log_line(
        &self,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        eventually(&format!("access log line of {}: {what}", self.name), || {
            let found = self.access_log().into_iter().find(|l| pred(l));
            async move { found }
        })
        .await
    }

    /// The proxy's own log events so far (JSON lines on stderr).
    pub fn events(&self) -> Vec<serde_json::Value> {
        self.process
            .stderr()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The first log event matching `pred`, waiting for it.
    pub async fn event(
        &self,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        eventually(&format!("log event of {}: {what}", self.name), || {
            let found = self.events().into_iter().find(|e| pred(e));
            async move { found }
        })
        .await
    }

    /// The first TCP access-log line whose reason starts with `reason`.
    pub async fn tcp_log_line(&self, what: &str, reason: &str) -> serde_json::Value {
        self.log_line(what, |l| {
            l["kind"] == "tcp" && l["reason"].as_str().is_some_and(|r| r.starts_with(reason))
        })
        .await
    }

    /// Stops the proxy as an orchestrator does, with SIGTERM, and returns
    /// how it exited (killed, if it was still running after `patience()`).
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        self.process.terminate()
    }

    pub fn logs(&self) -> String {
        self.process.logs()
    }

    /// Sends `signal` (`TERM`, `INT`) to the proxy without waiting.
    pub fn signal(&self, signal: &str) {
        let sent = Command::new("kill")
            .args([format!("-{signal}"), self.process.pid().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(sent, "kill -{signal} {}", self.name);
    }

    /// How the proxy exited, waiting at most `limit` for it; `None` if it
    /// is still running then. (A child's exit has no readiness signal to
    /// wait on here: it is polled every 10 ms.)
    pub async fn exit_within(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + limit;
        loop {
            if let Some(status) = self.process.exited() {
                return Some(status);
            }
            if std::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        get(self.admin, "admin", path, &[])
            .await
            .unwrap_or((0, String::new()))
    }

    pub async fn config_version(&self) -> u64 {
        let (_, body) = self.admin_get("/config_dump").await;
        serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["version"].as_u64())
            .unwrap_or(0)
    }
}

/// A test mesh: CA, config directory, certificates per workload.
pub struct Mesh {
    pub dir: tempfile::TempDir,
}

impl Mesh {
    pub fn new() -> Mesh {
        let dir = tempfile::tempdir().unwrap();
        let m = Mesh { dir };
        std::fs::create_dir_all(m.config_dir()).unwrap();
        run_ok(&["ca", "init", "--out", m.path("ca").to_str().unwrap()]);
        m
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    pub fn config_dir(&self) -> PathBuf {
        self.path("config")
    }

    pub fn write_config(&self, file: &str, yaml: &str) {
        // Write then rename, so a watcher never sees half a file.
        let tmp = self.path(&format!(".{file}.tmp"));
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(&tmp, self.config_dir().join(file)).unwrap();
    }

    /// Issues `spiffe://cluster.local/ns/NS/sa/SA` into `certs/NAME`.
    /// Writes `yaml` as config file `file` and waits until every proxy in
    /// `proxies` has loaded a newer configuration than it had.
    pub async fn apply(&self, file: &str, yaml: &str, proxies: &[&ProxyProcess]) {
        let mut before = Vec::new();
        for p in proxies {
            before.push(p.config_version().await);
        }
        self.write_config(file, yaml);
        for (p, v) in proxies.iter().zip(before) {
            eventually(&format!("{} to load {file}", p.name), || async {
                (p.config_version().await > v).then_some(())
            })
            .await;
        }
    }

    pub fn issue(&self, name: &str, ns: &str, sa: &str) -> PathBuf {
        self.issue_from("ca", name, ns, sa)
    }

    pub fn issue_from(&self, ca: &str, name: &str, ns: &str, sa: &str) -> PathBuf {
        let out = self.path(&format!("certs/{name}"));
        let id = format!("spiffe://cluster.local/ns/{ns}/sa/{sa}");
        run_ok(&[
            "ca",
            "issue",
            "--ca",
            self.path(ca).to_str().unwrap(),
            "--id",
            &id,
            "--out",
            out.to_str().unwrap(),
            "--force",
        ]);
        out
    }

    /// Starts a proxy for workload `ns/name` and waits until it is ready.
    pub async fn proxy(&self, workload: &str, certs: &Path) -> ProxyProcess {
        self.proxy_with(workload, certs, &[]).await
    }

    /// [`Mesh::proxy`] with extra command-line arguments.
    pub async fn proxy_with(&self, workload: &str, certs: &Path, extra: &[&str]) -> ProxyProcess {
        let config = self.config_dir();
        let source = [
            "--config",
            config.to_str().unwrap(),
            "--certs",
            certs.to_str().unwrap(),
        ];
        self.spawn_proxy(workload, &source, extra).await
    }

    /// Starts `meshward proxy` for `workload` with its source's arguments
    /// (files or control plane) and `extra`, and waits until it is ready.
    pub async fn spawn_proxy(
        &self,
        workload: &str,
        source: &[&str],
        extra: &[&str],
    ) -> ProxyProcess {
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let mut cmd = Command::new(bin());
        cmd.arg("proxy")
            .args(source)
            .args([
                "--workload",
                workload,
                "--admin",
                &admin.to_string(),
                "--metrics",
                &metrics.to_string(),
                "--log",
                &std::env::var("MESHWARD_TEST_LOG").unwrap_or_else(|_| "info".to_string()),
                "--worker-threads",
                "1",
            ])
            .args(extra);
        let process = spawn_ready(&format!("proxy {workload}"), cmd, admin).await;
        ProxyProcess {
            name: workload.to_string(),
            admin,
            metrics,
            process,
        }
    }
}

/// Spawns `cmd` (named `name` in failures) and waits until its admin
/// endpoint at `admin` answers `/healthz/ready` with 200.
pub async fn spawn_ready(name: &str, cmd: Command, admin: SocketAddr) -> Process {
    let mut process = Process::spawn_captured(name, cmd).unwrap();
    let ready = wait::for_admin_ready(
        || Some(admin),
        "/healthz/ready",
        patience(),
        Duration::from_millis(20),
        || process.check_alive(),
    )
    .await;
    if let Err(e) = ready {
        panic!("{name}: {e}\n{}", process.logs());
    }
    process
}

/// The value of a Prometheus sample whose labels include all of `labels`
/// (a metric without labels: its one sample).
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| {
            l.starts_with(name)
                && (l[name.len()..].starts_with('{') || l[name.len()..].starts_with(' '))
        })
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Sends `msg` over TCP and reads the same number of bytes back; `Err` when
/// the connection is closed first.
pub async fn tcp_roundtrip(addr: SocketAddr, msg: &[u8]) -> Result<Vec<u8>, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    s.write_all(msg).await.map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; msg.len()];
    tokio::time::timeout(patience(), s.read_exact(&mut buf))
        .await
        .map_err(|_| "timeout".to_string())?
        .map_err(|e| e.to_string())?;
    Ok(buf)
}

pub type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// A WebSocket handshake for `path` on a new connection to `addr`, with
/// `host` as `Host`. `Err`: the HTTP status that refused it.
pub async fn ws_connect_to(addr: SocketAddr, host: &str, path: &str) -> Result<Ws, u16> {
    use tokio_tungstenite::tungstenite::Error;
    let s = tokio::net::TcpStream::connect(addr).await.unwrap();
    match tokio_tungstenite::client_async(format!("ws://{host}{path}"), s).await {
        Ok((ws, resp)) => {
            assert_eq!(resp.status(), 101);
            Ok(ws)
        }
        Err(Error::Http(resp)) => Err(resp.status().as_u16()),
        Err(e) => panic!("WebSocket handshake for {path} failed: {e}"),
    }
}

/// The next text message.
pub async fn ws_text(ws: &mut Ws) -> String {
    use futures_util::StreamExt;
    match ws.next().await {
        Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t))) => t.as_str().to_owned(),
        other => panic!("expected a text message, got {other:?}"),
    }
}

/// A raw HTTP/1.1 connection: bytes out, responses read off the wire.
pub struct Raw {
    pub s: tokio::net::TcpStream,
    pub buf: Vec<u8>,
}

/// A response as read off the wire.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub head: String,
    pub body: String,
}

impl Raw {
    pub async fn connect(addr: SocketAddr) -> Raw {
        Raw {
            s: tokio::net::TcpStream::connect(addr).await.unwrap(),
            buf: Vec::new(),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        use tokio::io::AsyncWriteExt;
        self.s.write_all(bytes).await.unwrap();
    }

    /// Reads more bytes; false at end of stream.
    pub async fn more(&mut self) -> bool {
        use tokio::io::AsyncReadExt;
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout(patience(), self.s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => false,
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
            Err(_) => panic!("no response within {:?}", patience()),
        }
    }

    /// Reads one response (Content-Length, chunked or until close).
    pub async fn response(&mut self) -> Resp {
        let end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            assert!(self.more().await, "closed before a response head");
        };
        let head = String::from_utf8(self.buf.drain(..end).collect()).unwrap();
        let status = head[9..12].parse().unwrap();
        let lower = head.to_ascii_lowercase();
        let length = lower
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .map(|v| v.trim().parse::<usize>().unwrap());
        let mut body = Vec::new();
        if lower.contains("transfer-encoding: chunked") {
            loop {
                let line_end = loop {
                    if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                        break i;
                    }
                    assert!(self.more().await, "closed in a chunk size");
                };
                let size_line =
                    String::from_utf8(self.buf.drain(..line_end + 2).collect()).unwrap();
                let size = usize::from_str_radix(size_line.trim(), 16).unwrap();
                while self.buf.len() < size + 2 {
                    assert!(self.more().await, "closed in a chunk");
                }
                body.extend(self.buf.drain(..size));
                self.buf.drain(..2);
                if size == 0 {
                    break;
                }
            }
        } else if let Some(n) = length {
            while self.buf.len() < n {
                assert!(self.more().await, "closed in the body");
            }
            body.extend(self.buf.drain(..n));
        } else if status >= 200 && status != 204 && status != 304 {
            while self.more().await {}
            body.append(&mut self.buf);
        }
        Resp {
            status,
            head,
            body: String::from_utf8(body).unwrap(),
        }
    }

    /// Whether the peer closes the connection (reads nothing more).
    pub async fn closed(&mut self) -> bool {
        !self.more().await && self.buf.is_empty()
    }
}

/// The lines of a `meshward` command's stderr that meshward wrote: a
/// profiling build (`scripts/release.sh` runs the suite with one) adds
/// `LLVM Profile ...` lines of its runtime, which are not the command's.
pub fn own_lines(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter(|l| !l.starts_with("LLVM Profile "))
        .collect()
}

/// The orders workload (PERMISSIVE, so the test can call its proxy
/// directly) and its application, without the document separator (the
/// callers add their own).
pub fn orders_workload(port: u16, app: SocketAddr) -> String {
    let doc = WorkloadEntry::new("production", "orders")
        .app_ports(&[("http", app)])
        .port("http", port)
        .yaml();
    doc.strip_suffix("---\n").unwrap_or(&doc).to_owned()
}

/// What the WebSocket application saw of each handshake: the path and the
/// `x-forwarded-client-cert` the server proxy added (empty without mTLS).
pub type Handshakes = Arc<Mutex<Vec<(String, String)>>>;

/// A real WebSocket server (tokio-tungstenite): greets every connection
/// with `hello <path>`, answers a text message with `echo: <text>`, sends
/// binary messages back as they came, and completes the close handshake.
pub async fn websocket_app() -> (SocketAddr, Handshakes, tokio::task::JoinHandle<()>) {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Handshakes = Arc::default();
    let seen2 = Arc::clone(&seen);
    let task = tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                return;
            };
            let seen = Arc::clone(&seen2);
            tokio::spawn(async move {
                let path = Arc::new(Mutex::new(String::new()));
                let path2 = Arc::clone(&path);
                // The callback's type is tungstenite's (its error is an
                // HTTP response).
                #[allow(clippy::result_large_err)]
                let callback = move |req: &Request, resp: Response| {
                    let xfcc = req
                        .headers()
                        .get("x-forwarded-client-cert")
                        .map(|v| v.to_str().unwrap().to_owned())
                        .unwrap_or_default();
                    *path2.lock().unwrap() = req.uri().path().to_owned();
                    seen.lock()
                        .unwrap()
                        .push((req.uri().path().to_owned(), xfcc));
                    Ok(resp)
                };
                let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(s, callback).await else {
                    return;
                };
                let hello = format!("hello {}", path.lock().unwrap());
                if ws.send(Message::text(hello)).await.is_err() {
                    return;
                }
                while let Some(Ok(msg)) = ws.next().await {
                    let answer = match msg {
                        Message::Text(t) => Message::text(format!("echo: {}", t.as_str())),
                        Message::Binary(b) => Message::Binary(b),
                        _ => continue,
                    };
                    if ws.send(answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, seen, task)
}
