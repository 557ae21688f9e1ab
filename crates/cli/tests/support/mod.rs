//! Test mesh builder for end-to-end tests: a CA, workloads with real
//! `meshward proxy` processes on 127.0.0.1, in-process echo applications,
//! and HTTP clients. Children are killed on drop and their output is
//! printed when a test fails.

#![allow(dead_code)]

pub mod dns;
pub mod tls;

use std::collections::BTreeMap;
use std::io::Read;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};

/// The `meshward` binary the tests run: this build's, or the one
/// `MESHWARD_TEST_BIN` names. `scripts/release.sh` runs the suite against
/// its profiling build, so that every feature the tests reach is in the
/// profile that optimizes the release binary.
pub fn bin() -> PathBuf {
    std::env::var_os("MESHWARD_TEST_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_meshward")))
}

/// How long readiness and eventual-consistency waits may take.
pub fn patience() -> Duration {
    Duration::from_secs(
        std::env::var("MESHWARD_TEST_PATIENCE_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(20),
    )
}

/// Polls `check` until it returns `Some`, or panics with `what`.
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + patience();
    let mut delay = Duration::from_millis(10);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(200));
    }
}

/// A free port on 127.0.0.1 for configuration that must name one.
///
/// Ports come from below the kernel's ephemeral range (32768+), so a port
/// handed out here cannot be taken meanwhile by a socket bound to port 0 or
/// by an outgoing connection; a per-process counter (offset by the process
/// id) keeps the tests of one binary apart, and each port is checked free.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let base = 20_000 + (std::process::id() % 500) as u16 * 20;
    loop {
        let offset = NEXT.fetch_add(1, Ordering::Relaxed) % 12_000;
        let port = 20_000 + (base - 20_000 + offset) % 12_000;
        if StdListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

pub fn run_ok(args: &[&str]) {
    stdout_of(args);
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

/// A request as the echo application saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: BTreeMap<String, String>,
}

/// An in-process HTTP/1.1 application that answers `200 <name>` and records
/// what it received.
pub struct App {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for App {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl App {
    pub async fn start(name: &'static str) -> App {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let seen2 = Arc::clone(&seen);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let seen = Arc::clone(&seen2);
                tokio::spawn(async move {
                    let svc = service_fn(move |req: http::Request<Incoming>| {
                        let seen = Arc::clone(&seen);
                        async move {
                            // Repeated fields joined with ", ", in order.
                            let mut headers: BTreeMap<String, String> = BTreeMap::new();
                            for (k, v) in req.headers() {
                                let v = v.to_str().unwrap_or_default();
                                headers
                                    .entry(k.as_str().to_string())
                                    .and_modify(|joined| {
                                        joined.push_str(", ");
                                        joined.push_str(v);
                                    })
                                    .or_insert_with(|| v.to_string());
                            }
                            seen.lock().unwrap().push(Seen {
                                method: req.method().to_string(),
                                path: req.uri().to_string(),
                                headers,
                            });
                            Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                                Bytes::from(name),
                            )))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        App { addr, seen, task }
    }

    pub fn last(&self) -> Option<Seen> {
        self.seen.lock().unwrap().last().cloned()
    }
}

/// A running `meshward proxy`.
pub struct ProxyProcess {
    pub name: String,
    pub admin: SocketAddr,
    /// The Prometheus-only endpoint (`--metrics`).
    pub metrics: SocketAddr,
    child: Child,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
}

impl ProxyProcess {
    pub fn access_log(&self) -> Vec<serde_json::Value> {
        self.stdout
            .lock()
            .unwrap()
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
        self.stderr
            .lock()
            .unwrap()
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
        stop(&mut self.child)
    }

    pub fn logs(&self) -> String {
        format!(
            "--- {} stdout ---\n{}\n--- {} stderr ---\n{}",
            self.name,
            self.stdout.lock().unwrap(),
            self.name,
            self.stderr.lock().unwrap()
        )
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

impl Drop for ProxyProcess {
    /// Stops the proxy as an orchestrator does (SIGTERM, which the proxy
    /// handles), and kills it if it has not exited within `patience()`.
    fn drop(&mut self) {
        stop(&mut self.child);
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
    }
}

/// SIGTERM, then SIGKILL if the process is still running after
/// `patience()`; reaps it either way and returns how it exited.
pub fn stop(child: &mut Child) -> std::process::ExitStatus {
    if matches!(child.try_wait(), Ok(None)) {
        let termed = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        let deadline = Instant::now() + patience();
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
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let mut child = Command::new(bin())
            .args([
                "proxy",
                "--config",
                self.config_dir().to_str().unwrap(),
                "--workload",
                workload,
                "--certs",
                certs.to_str().unwrap(),
                "--admin",
                &admin.to_string(),
                "--metrics",
                &metrics.to_string(),
                "--log",
                &std::env::var("MESHWARD_TEST_LOG").unwrap_or_else(|_| "info".to_string()),
                "--worker-threads",
                "1",
            ])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = pump(child.stdout.take().unwrap());
        let stderr = pump(child.stderr.take().unwrap());
        let mut p = ProxyProcess {
            name: workload.to_string(),
            admin,
            metrics,
            child,
            stdout,
            stderr,
        };
        let deadline = Instant::now() + patience();
        loop {
            if let Some((200, _)) = get(admin, "admin", "/healthz/ready", &[]).await {
                return p;
            }
            if let Ok(Some(status)) = p.child.try_wait() {
                panic!(
                    "proxy {workload} exited ({status}) before it was ready\n{}",
                    p.logs()
                );
            }
            if Instant::now() > deadline {
                panic!("proxy {workload} did not become ready\n{}", p.logs());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// One HTTP/1.1 request on a new connection: `(status, body)`.
pub async fn get(
    addr: SocketAddr,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Option<(u16, String)> {
    request(addr, "GET", host, path, headers).await.ok()
}

pub async fn request(
    addr: SocketAddr,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(u16, String), String> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    send_on(&mut send, method, host, path, headers).await
}

/// A request on an existing connection.
pub async fn send_on(
    send: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(u16, String), String> {
    let mut req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", host);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(Bytes::new())).unwrap();
    // A kept-alive connection may still be finishing the previous exchange.
    send.ready().await.map_err(|e| e.to_string())?;
    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// A kept-alive HTTP/1.1 connection.
pub async fn connect(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    send
}

pub fn executor() -> TokioExecutor {
    TokioExecutor::new()
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

/// An in-process TCP echo server.
pub struct Echo {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Echo {
    pub async fn start() -> Echo {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        Echo { addr, task }
    }
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

/// An mTLS connection to `addr` with the credentials in `dir`, trusting `root`.
pub async fn mtls_connect(
    dir: &std::path::Path,
    root: &std::path::Path,
    addr: SocketAddr,
    alpn: &[u8],
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
    use meshward_identity::verify::TrustDomains;
    let creds = meshward_identity::WorkloadCredentials::from_dir(dir).map_err(|e| e.to_string())?;
    let bundle = meshward_identity::TrustBundle::from_pem_file(root).map_err(|e| e.to_string())?;
    let verifier = meshward_identity::SpiffeServerVerifier::new(
        meshward_identity::SvidVerifier::new(bundle, TrustDomains::any()),
    );
    let mut config = meshward_identity::client_config(
        verifier,
        meshward_identity::CredentialResolver::fixed(creds),
    )
    .map_err(|e| e.to_string())?;
    config.alpn_protocols = vec![alpn.to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(
            rustls_pki_types::ServerName::IpAddress(addr.ip().into()),
            tcp,
        )
        .await
        .map_err(|e| e.to_string())
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
/// directly) and its application.
pub fn orders_workload(port: u16, app: SocketAddr) -> String {
    format!(
        r#"apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: orders
  namespace: production
  annotations: {{meshward.io/app-ports: "http=127.0.0.1:{app}"}}
spec:
  address: 127.0.0.1
  labels: {{app: orders}}
  serviceAccount: orders
  ports: {{http: {port}}}
"#,
        app = app.port()
    )
}

/// An HTTP/2 client connection (prior knowledge) over `io`, plain TCP or
/// TLS; its connection task is spawned.
pub async fn h2_handshake<T>(io: T) -> hyper::client::conn::http2::SendRequest<Full<Bytes>>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (send, conn) = hyper::client::conn::http2::handshake(executor(), TokioIo::new(io))
        .await
        .unwrap();
    tokio::spawn(conn);
    send
}
