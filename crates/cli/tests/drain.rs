//! End to end: `meshward proxy` drains on SIGTERM as Istio's sidecar does
//! (`terminationDrainDuration`). Real proxy processes on 127.0.0.1: one
//! workload whose outbound listener routes to its own service, so one
//! process has an inbound port and an outbound listener, in front of an
//! application whose `/sleep/MS` answers after MS milliseconds. Checked:
//! requests in flight finish (HTTP/1.1 with `Connection: close`, HTTP/2
//! after a GOAWAY, no stream reset), new inbound connections are refused, idle
//! keep-alive connections close at once, `/healthz/ready` says
//! `draining`, what outlives the deadline is cut, the flag wins over the
//! mesh setting, a second signal exits at once, and the exit status.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use meshward_test_support::app::{Protocol, Server, serve};
use support::*;
use tokio::sync::watch;

const HOST: &str = "orders.production.svc.cluster.local";

/// The application: `/sleep/MS` answers `slept MS` after MS milliseconds.
/// `started` counts the requests it has received, so that a test signals
/// the proxy only once its request is in flight.
struct SlowApp {
    addr: SocketAddr,
    started: watch::Receiver<usize>,
    _server: Server,
}

async fn slow_app() -> SlowApp {
    let (tx, started) = watch::channel(0usize);
    let tx = Arc::new(tx);
    let server = serve(Protocol::Http1, move |req: http::Request<Incoming>| {
        let tx = Arc::clone(&tx);
        async move {
            tx.send_modify(|n| *n += 1);
            let ms: u64 = req
                .uri()
                .path()
                .strip_prefix("/sleep/")
                .and_then(|ms| ms.parse().ok())
                .unwrap_or(0);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            http::Response::new(Full::new(Bytes::from(format!("slept {ms}"))))
        }
    })
    .await;
    SlowApp {
        addr: server.addr,
        started,
        _server: server,
    }
}

impl SlowApp {
    /// Waits until the application has received `n` requests in all.
    async fn started(&mut self, n: usize) {
        let waited = tokio::time::timeout(patience(), self.started.wait_for(|s| *s >= n)).await;
        assert!(
            matches!(waited, Ok(Ok(_))),
            "the application did not receive {n} requests"
        );
    }
}

/// A running proxy for `production/orders`, with the application behind
/// it.
struct Drainee {
    _mesh: Mesh,
    proxy: ProxyProcess,
    /// Its inbound port (PERMISSIVE: plaintext accepted).
    inbound: SocketAddr,
    /// Its outbound listener, which routes `HOST` to `inbound` (mTLS).
    outbound: SocketAddr,
    /// Its TCP port, in front of a TCP echo.
    tcp: SocketAddr,
    app: SlowApp,
    _echo: Echo,
}

/// Starts the proxy with the mesh settings `mesh_spec` (if any) and the
/// extra arguments `args`.
async fn drainee(mesh_spec: Option<&str>, args: &[&str]) -> Drainee {
    let app = slow_app().await;
    let echo = Echo::start().await;
    let mesh = Mesh::new();
    let inbound = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let outbound = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let tcp = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut yaml = WorkloadEntry::new("production", "orders")
        .app_ports(&[("http", app.addr), ("tcp", echo.addr)])
        .port("http", inbound.port())
        .port("tcp", tcp.port())
        .outbound(outbound.port())
        .yaml();
    yaml.push_str(&mesh::service_entry(
        "production",
        "orders",
        "orders",
        &format!(
            "{{number: {}, name: http, protocol: HTTP}}, {{number: {}, name: tcp, protocol: TCP}}",
            inbound.port(),
            tcp.port()
        ),
    ));
    yaml.push_str(&mesh::peer_authentication(
        "production",
        "default",
        "PERMISSIVE",
    ));
    if let Some(spec) = mesh_spec {
        yaml.push_str(&mesh::mesh_config(spec));
    }
    mesh.write_config("mesh.yaml", &yaml);
    let certs = mesh.issue("orders", "production", "orders");
    let proxy = mesh.proxy_with("production/orders", &certs, args).await;
    Drainee {
        _mesh: mesh,
        proxy,
        inbound,
        outbound,
        tcp,
        app,
        _echo: echo,
    }
}

/// A log event of the proxy's with this message.
fn is_event(e: &serde_json::Value, message: &str) -> bool {
    e["fields"]["message"] == message
}

/// Waits for the `draining` event: from then on the listeners are closed.
async fn draining_event(p: &ProxyProcess) -> serde_json::Value {
    p.event("draining", |e| is_event(e, "draining")).await
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

async fn refused(addr: SocketAddr) -> bool {
    matches!(
        tokio::net::TcpStream::connect(addr).await,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
    )
}

/// Requests in flight at SIGTERM finish (inbound and outbound, HTTP/1.1,
/// each answered with `Connection: close`); an idle keep-alive connection
/// is closed at once; new connections are refused on the inbound port
/// while the outbound listener keeps accepting;
/// `/healthz/ready` answers 503 `draining` while the admin port serves;
/// the proxy exits 0 as soon as the last request is done, long before
/// its deadline. The deadline comes from the flag (30 s), not from the
/// mesh setting (1 s), which would have cut the requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_in_flight_finish_and_new_connections_are_refused() {
    let spec = "  defaultConfig:\n    terminationDrainDuration: 1s\n";
    let mut d = drainee(Some(spec), &["--drain-duration", "30s"]).await;

    // An idle keep-alive connection, which has carried one request.
    let mut idle = Raw::connect(d.inbound).await;
    idle.send(format!("GET /sleep/0 HTTP/1.1\r\nHost: {HOST}\r\n\r\n").as_bytes())
        .await;
    let r = idle.response().await;
    assert_eq!((r.status, r.body.as_str()), (200, "slept 0"));
    assert_eq!(header(&r.head, "connection"), None, "{}", r.head);

    // Two slow requests in flight: one to the inbound port, one through
    // the outbound listener (which goes on to the inbound port, mTLS).
    let mut direct = Raw::connect(d.inbound).await;
    direct
        .send(format!("GET /sleep/3000 HTTP/1.1\r\nHost: {HOST}\r\n\r\n").as_bytes())
        .await;
    let mut routed = Raw::connect(d.outbound).await;
    routed
        .send(format!("GET /sleep/3000 HTTP/1.1\r\nHost: {HOST}\r\n\r\n").as_bytes())
        .await;
    d.app.started(3).await;

    let signalled = Instant::now();
    d.proxy.signal("TERM");
    let event = draining_event(&d.proxy).await;
    assert_eq!(event["fields"]["deadline_ms"], 30_000, "{event}");
    assert!(
        event["fields"]["connections"].as_u64() >= Some(3),
        "the idle and the two busy downstream connections are open: {event}"
    );

    assert!(refused(d.inbound).await, "inbound still accepts");
    assert!(
        !refused(d.outbound).await,
        "the outbound listener keeps accepting: the application may still call out"
    );
    assert_eq!(
        d.proxy.admin_get("/healthz/ready").await,
        (503, "not ready: draining\n".to_string())
    );
    let closed = tokio::time::timeout(Duration::from_secs(2), idle.closed()).await;
    assert_eq!(
        closed,
        Ok(true),
        "the idle keep-alive connection is closed at once"
    );

    for (name, c) in [("inbound", &mut direct), ("outbound", &mut routed)] {
        let r = c.response().await;
        assert_eq!(
            (r.status, r.body.as_str()),
            (200, "slept 3000"),
            "{name}: {}",
            r.head
        );
        assert_eq!(header(&r.head, "connection"), Some("close"), "{name}");
        assert!(c.closed().await, "{name}: closed after its response");
    }

    let status = d.proxy.exit_within(patience()).await;
    let elapsed = signalled.elapsed();
    assert!(
        status.is_some_and(|s| s.success()),
        "exit status {status:?}"
    );
    assert!(
        elapsed < Duration::from_secs(15),
        "exits once the requests are done, not at the deadline: {elapsed:?}"
    );
    let drained = d.proxy.event("drained", |e| is_event(e, "drained")).await;
    assert_eq!(drained["fields"]["cut"], 0, "{drained}");
}

/// An HTTP/2 connection receives GOAWAY: its stream in flight finishes
/// (200, whole body, no reset), no new stream is accepted, and the
/// connection then closes cleanly. (SIGINT here: it drains as SIGTERM
/// does.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_connection_gets_goaway_and_its_stream_finishes() {
    let mut d = drainee(None, &["--drain-duration", "30s"]).await;
    let tcp = tokio::net::TcpStream::connect(d.inbound).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake(executor(), TokioIo::new(tcp))
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    let req = |path: &str| {
        http::Request::builder()
            .uri(format!("http://{HOST}{path}"))
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    let warm = send.send_request(req("/sleep/0")).await.unwrap();
    assert_eq!(warm.status(), 200);
    let in_flight = send.send_request(req("/sleep/2000"));
    let in_flight = tokio::spawn(in_flight);
    d.app.started(2).await;

    d.proxy.signal("INT");
    draining_event(&d.proxy).await;
    let resp = tokio::time::timeout(patience(), in_flight)
        .await
        .expect("the stream in flight is answered")
        .unwrap()
        .expect("the stream in flight is not reset");
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "slept 2000");

    // The connection ends cleanly (GOAWAY, then close), with no error.
    let ended = tokio::time::timeout(patience(), conn).await;
    assert!(
        matches!(ended, Ok(Ok(Ok(())))),
        "the HTTP/2 connection ends gracefully: {ended:?}"
    );
    assert!(
        send.send_request(req("/sleep/0")).await.is_err(),
        "no new stream after GOAWAY"
    );
    let status = d.proxy.exit_within(patience()).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "exit status {status:?}"
    );
}

/// A request that outlives the deadline (here the mesh setting's 2 s, no
/// flag) is cut, and so is a TCP connection, which carries bytes until
/// then; the proxy exits 0 shortly after the deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_past_the_deadline_is_cut_and_the_proxy_exits() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let spec = "  defaultConfig:\n    terminationDrainDuration: 2s\n";
    let mut d = drainee(Some(spec), &[]).await;
    let mut slow = Raw::connect(d.inbound).await;
    slow.send(format!("GET /sleep/60000 HTTP/1.1\r\nHost: {HOST}\r\n\r\n").as_bytes())
        .await;
    d.app.started(1).await;
    let mut tcp = tokio::net::TcpStream::connect(d.tcp).await.unwrap();
    let mut echoed = [0u8; 4];
    tcp.write_all(b"ping").await.unwrap();
    tcp.read_exact(&mut echoed).await.unwrap();

    let signalled = Instant::now();
    d.proxy.signal("TERM");
    let event = draining_event(&d.proxy).await;
    assert_eq!(event["fields"]["deadline_ms"], 2000, "{event}");
    // The TCP connection still carries bytes during the drain.
    tcp.write_all(b"pong").await.unwrap();
    tcp.read_exact(&mut echoed).await.unwrap();
    assert_eq!(&echoed, b"pong");
    assert!(
        signalled.elapsed() < Duration::from_secs(2),
        "too slow to tell"
    );
    assert!(slow.closed().await, "cut without an answer");
    let end = tokio::time::timeout(patience(), tcp.read(&mut echoed)).await;
    assert!(
        matches!(end, Ok(Ok(0)) | Ok(Err(_))),
        "the TCP connection is cut: {end:?}"
    );
    let status = d.proxy.exit_within(patience()).await;
    let elapsed = signalled.elapsed();
    assert!(
        status.is_some_and(|s| s.success()),
        "exit status {status:?}"
    );
    assert!(
        elapsed >= Duration::from_secs(2),
        "not before the deadline: {elapsed:?}"
    );
    assert!(
        elapsed < Duration::from_secs(7),
        "shortly after the deadline: {elapsed:?}"
    );
    let drained = d.proxy.event("drained", |e| is_event(e, "drained")).await;
    assert_eq!(drained["fields"]["cut"], 2, "{drained}");
}

/// A second signal during the drain exits at once, with the status a
/// shell gives a process that signal ended (130 for SIGINT).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_at_once() {
    let mut d = drainee(None, &["--drain-duration", "60s"]).await;
    let mut slow = Raw::connect(d.inbound).await;
    slow.send(format!("GET /sleep/60000 HTTP/1.1\r\nHost: {HOST}\r\n\r\n").as_bytes())
        .await;
    d.app.started(1).await;
    d.proxy.signal("TERM");
    draining_event(&d.proxy).await;
    let second = Instant::now();
    d.proxy.signal("INT");
    let status = d.proxy.exit_within(patience()).await;
    assert_eq!(status.and_then(|s| s.code()), Some(130), "{status:?}");
    assert!(
        second.elapsed() < Duration::from_secs(5),
        "at once: {:?}",
        second.elapsed()
    );
}

/// A proxy stopped while it starts (here: its first DNS lookup, to a
/// name server that never answers, takes up to 10 s) has nothing to
/// drain: it exits 0 at once instead of being killed by the signal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_stopped_before_it_is_ready_exits_zero() {
    let silent = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mesh = Mesh::new();
    let mut yaml = WorkloadEntry::new("production", "orders").yaml();
    yaml.push_str(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\n\
         metadata: {name: external, namespace: production}\n\
         spec:\n  hosts: [api.example.com]\n  ports: [{number: 80, name: http}]\n  \
         resolution: DNS\n  location: MESH_EXTERNAL\n",
    );
    mesh.write_config("mesh.yaml", &yaml);
    let certs = mesh.issue("orders", "production", "orders");
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut cmd = std::process::Command::new(bin());
    cmd.args(["proxy", "--config"])
        .arg(mesh.config_dir())
        .args(["--workload", "production/orders", "--certs"])
        .arg(&certs)
        .args(["--admin", &admin.to_string(), "--worker-threads", "1"])
        .args(["--dns-server", &silent.local_addr().unwrap().to_string()]);
    let mut process = meshward_test_support::Process::spawn_captured("orders", cmd).unwrap();
    eventually("the proxy starting (admin: 503 starting)", || async move {
        let ready = get(admin, "admin", "/healthz/ready", &[]).await;
        (ready == Some((503, "not ready: starting\n".to_string()))).then_some(())
    })
    .await;
    let signalled = Instant::now();
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &process.pid().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let status = eventually("the proxy to exit", || {
        let status = process.exited();
        async move { status }
    })
    .await;
    assert!(status.success(), "{status}\n{}", process.logs());
    assert!(
        signalled.elapsed() < Duration::from_secs(5),
        "at once, not after the lookup: {:?}",
        signalled.elapsed()
    );
    assert!(
        process
            .stderr()
            .contains("stopped before the proxy was ready"),
        "{}",
        process.logs()
    );
}

#[test]
fn an_invalid_drain_duration_is_refused_before_anything_starts() {
    for (value, says) in [
        ("2h", "at most 1h"),
        ("3601s", "at most 1h"),
        ("soon", "invalid duration"),
        ("", "invalid duration"),
    ] {
        let out = std::process::Command::new(bin())
            .args(["proxy", "-c", "none", "-w", "a/b", "--certs", "none"])
            .args(["--drain-duration", value])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{value}: {err}");
        assert!(
            err.contains("--drain-duration") && err.contains(says),
            "{value}: {err}"
        );
    }
}
