//! `meshward capture install|remove|show` with the real `nft`, in network
//! namespaces each test creates (and always deletes). These tests need
//! root (`ip netns`, nftables); without it they fail, saying so.
//!
//! What runs inside a namespace is this test binary itself, started by
//! `ip netns exec` as a probe (the ignored test `probe`, told what to do by
//! the `MESHWARD_CAPTURE_PROBE` variable): a TCP listener that answers
//! with its name and the connection's original destination
//! (SO_ORIGINAL_DST), a client that connects and prints the answer, or a
//! wrapper that runs a program as another user.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use socket2::{Domain, SockRef, Socket, Type};

const PROBE: &str = "MESHWARD_CAPTURE_PROBE";

// ---- network namespaces ----

/// A network namespace of this test, deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new(tag: &str) -> Netns {
        let name = format!("mwcap-{tag}-{}", std::process::id());
        // A namespace left by a crashed run of the same pid.
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .expect("running `ip` (install iproute2)");
        assert!(
            out.status.success(),
            "cannot create network namespace {name}: these tests need root (CAP_SYS_ADMIN and CAP_NET_ADMIN): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n NS ARGS`, which must succeed.
    fn ip(&self, args: &[&str]) {
        let out = Command::new("ip")
            .args(["-n", &self.name])
            .args(args)
            .output()
            .expect("running ip");
        assert!(
            out.status.success(),
            "ip -n {} {}: {}",
            self.name,
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `program args` inside this namespace.
    fn command(&self, program: &str, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]).args(args);
        c
    }

    /// `meshward args` inside this namespace.
    fn meshward(&self, args: &[&str]) -> Output {
        let bin = support::bin();
        self.command(bin.to_str().expect("utf-8 path"), args)
            .output()
            .expect("running meshward")
    }

    /// `meshward args`, which must succeed; its stdout.
    fn meshward_ok(&self, args: &[&str]) -> String {
        let out = self.meshward(args);
        let (stdout, stderr) = support::output_text(&out);
        assert!(
            out.status.success(),
            "meshward {} in {}: {}\n{stdout}{stderr}",
            args.join(" "),
            self.name,
            out.status
        );
        stdout
    }

    /// `nft list ruleset` here.
    fn ruleset(&self) -> String {
        let out = self
            .command("nft", &["list", "ruleset"])
            .output()
            .expect("running nft (install nftables)");
        assert!(out.status.success(), "nft list ruleset: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// This test binary as a probe, inside this namespace.
    fn probe(&self, args: &[&str]) -> Command {
        let exe = std::env::current_exe().expect("the test binary");
        let mut c = self.command(
            exe.to_str().expect("utf-8 path"),
            &[
                "--exact",
                "probe",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ],
        );
        c.env(PROBE, args.join(" "));
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// A long-running probe, killed on drop.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts a listener probe named `name` on `addr` in `ns`; returns once it
/// listens.
fn listen(ns: &Netns, name: &str, addr: &str) -> Running {
    start(ns, &["listen", name, addr])
}

/// Starts the probe `args` in `ns`; returns once it says it is ready.
fn start(ns: &Netns, args: &[&str]) -> Running {
    let mut child = ns
        .probe(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starting the listener probe");
    let stdout = child.stdout.take().expect("piped stdout");
    let running = Running(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(said) = said(&line) {
                let _ = tx.send(said.to_string());
            }
        }
    });
    match rx.recv_timeout(support::patience()) {
        Ok(line) if line == "PROBE ready" => running,
        other => panic!("probe {args:?} in {} did not start: {other:?}", ns.name),
    }
}

/// Starts a UDP listener probe named `name` on `addr` in `ns`; returns
/// once it is bound.
fn listen_udp(ns: &Netns, name: &str, addr: &str) -> Running {
    start(ns, &["udp-listen", name, addr])
}

/// Connects from `ns` to `to` as `uid`/`gid` (with socket mark `mark`
/// when given); the listener's answer: `NAME ORIGINAL_DST`.
fn connect(ns: &Netns, uid: u32, gid: u32, mark: Option<u32>, to: &str) -> String {
    connect_from(ns, uid, gid, mark, "-", to)
}

/// Sends a datagram from `ns` to `to` as `uid`/`gid` (with socket mark
/// `mark` when given); the listener's answer: its name.
fn ask_udp(ns: &Netns, uid: u32, gid: u32, mark: Option<u32>, to: &str) -> String {
    let (uid, gid) = (uid.to_string(), gid.to_string());
    let mark = mark.map_or("-".to_string(), |m| m.to_string());
    let out = ns
        .probe(&["as", &uid, &gid, "self", "udp-ask", to, &mark])
        .output()
        .expect("running the client probe");
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .find_map(|l| said(l)?.strip_prefix("PROBE reply "))
        .map(str::to_string)
        .unwrap_or_else(|| panic!("UDP to {to} in {}: no reply\n{stdout}", ns.name))
}

/// [`connect`], from source address `from` (`-`: the kernel's choice).
fn connect_from(ns: &Netns, uid: u32, gid: u32, mark: Option<u32>, from: &str, to: &str) -> String {
    let (uid, gid) = (uid.to_string(), gid.to_string());
    let mark = mark.map_or("-".to_string(), |m| m.to_string());
    let out = ns
        .probe(&["as", &uid, &gid, "self", "connect", to, &mark, from])
        .output()
        .expect("running the client probe");
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .find_map(|l| said(l)?.strip_prefix("PROBE reply "))
        .map(str::to_string)
        .unwrap_or_else(|| {
            panic!(
                "connect to {to} as {uid}:{gid} (mark {mark}) in {}: no reply\n{stdout}{}",
                ns.name,
                String::from_utf8_lossy(&out.stderr)
            )
        })
}

// ---- the probe ----

/// What a probe said on `line` (the test harness may print before it on
/// the same line).
fn said(line: &str) -> Option<&str> {
    line.find("PROBE ").map(|i| &line[i..])
}

/// Not a test: what runs inside the namespaces (see the file's doc).
#[test]
#[ignore = "a helper the other tests start inside their network namespaces"]
fn probe() {
    let args =
        std::env::var(PROBE).expect("run by the other tests with MESHWARD_CAPTURE_PROBE set");
    let args: Vec<&str> = args.split(' ').collect();
    match args.as_slice() {
        ["listen", name, addr] => probe_listen(name, addr.parse().expect("listen address")),
        ["udp-listen", name, addr] => probe_udp_listen(name, addr.parse().expect("listen address")),
        ["udp-ask", to, mark] => {
            let reply = probe_udp_ask(to.parse().expect("address"), mark.parse().ok());
            println!(
                "PROBE reply {}",
                reply.unwrap_or_else(|e| format!("error {e}"))
            );
        }
        ["connect", to, mark, from] => {
            let reply = probe_connect(
                to.parse().expect("address"),
                mark.parse().ok(),
                from.parse().ok(),
            );
            println!(
                "PROBE reply {}",
                reply.unwrap_or_else(|e| format!("error {e}"))
            );
        }
        ["as", uid, gid, program, rest @ ..] => {
            let mut cmd = if *program == "self" {
                let exe = std::env::current_exe().expect("the test binary");
                let mut c = Command::new(exe);
                c.args([
                    "--exact",
                    "probe",
                    "--ignored",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(PROBE, rest.join(" "));
                c
            } else {
                let mut c = Command::new(program);
                c.args(rest).env_remove(PROBE);
                c
            };
            let status = cmd
                .uid(uid.parse().expect("uid"))
                .gid(gid.parse().expect("gid"))
                .status()
                .expect("running the program as another user");
            std::process::exit(status.code().unwrap_or(1));
        }
        other => panic!("unknown probe {other:?}"),
    }
}

fn probe_listen(name: &str, addr: SocketAddr) {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None).expect("socket");
    if addr.is_ipv6() {
        socket.set_only_v6(true).expect("IPV6_V6ONLY");
    }
    socket.set_reuse_address(true).expect("SO_REUSEADDR");
    socket.bind(&addr.into()).expect("bind");
    socket.listen(64).expect("listen");
    let listener: TcpListener = socket.into();
    println!("PROBE ready");
    std::io::stdout().flush().expect("stdout");
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let sock = SockRef::from(&stream);
        let original = if addr.is_ipv6() {
            sock.original_dst_v6()
        } else {
            sock.original_dst_v4()
        };
        let original = original
            .ok()
            .and_then(|a| a.as_socket())
            .map_or("-".to_string(), |a| a.to_string());
        let _ = writeln!(stream, "{name} {original}");
    }
}

fn probe_udp_listen(name: &str, addr: SocketAddr) {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, None).expect("socket");
    if addr.is_ipv6() {
        socket.set_only_v6(true).expect("IPV6_V6ONLY");
    }
    socket.bind(&addr.into()).expect("bind");
    let socket: std::net::UdpSocket = socket.into();
    println!("PROBE ready");
    std::io::stdout().flush().expect("stdout");
    let mut buf = [0u8; 512];
    while let Ok((_, from)) = socket.recv_from(&mut buf) {
        let _ = socket.send_to(name.as_bytes(), from);
    }
}

fn probe_udp_ask(to: SocketAddr, mark: Option<u32>) -> std::io::Result<String> {
    let socket = Socket::new(Domain::for_address(to), Type::DGRAM, None)?;
    if let Some(mark) = mark {
        socket.set_mark(mark)?;
    }
    socket.connect(&to.into())?;
    let socket: std::net::UdpSocket = socket.into();
    socket.set_read_timeout(Some(Duration::from_secs(5)))?;
    socket.send(b"query")?;
    let mut buf = [0u8; 512];
    let n = socket.recv(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

fn probe_connect(
    to: SocketAddr,
    mark: Option<u32>,
    from: Option<std::net::IpAddr>,
) -> std::io::Result<String> {
    let socket = Socket::new(Domain::for_address(to), Type::STREAM, None)?;
    if let Some(mark) = mark {
        socket.set_mark(mark)?;
    }
    if let Some(from) = from {
        socket.bind(&SocketAddr::new(from, 0).into())?;
    }
    socket.connect_timeout(&to.into(), Duration::from_secs(5))?;
    let mut stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    Ok(reply.trim().to_string())
}

// ---- the tests ----

#[test]
fn install_is_idempotent_and_remove_restores_the_ruleset() {
    let ns = Netns::new("idem");
    // A table of the test's own, so that "as it was" means something.
    let own = ns
        .command("nft", &["-f", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            c.stdin
                .take()
                .expect("stdin")
                .write_all(b"table ip mine {\n chain input {\n  type filter hook input priority 0; policy accept;\n  tcp dport 9 counter drop\n }\n}\n")?;
            c.wait()
        })
        .expect("running nft");
    assert!(own.success());
    let before = ns.ruleset();
    assert!(before.contains("table ip mine"));
    assert!(
        ns.meshward_ok(&["capture", "show"])
            .contains("no traffic capture installed")
    );

    let said = ns.meshward_ok(&["capture", "install"]);
    assert!(
        said.contains("installed traffic capture (table inet meshward): outbound TCP -> :15001, inbound TCP -> :15006, DNS -> :15053"),
        "{said}"
    );
    let installed = ns.ruleset();
    assert!(installed.contains("table inet meshward"), "{installed}");
    assert!(installed.contains("table ip mine"), "{installed}");
    let shown = ns.meshward_ok(&["capture", "show"]);
    assert!(shown.starts_with("table inet meshward {"), "{shown}");
    assert!(shown.contains("redirect to :15001"), "{shown}");

    ns.meshward_ok(&["capture", "install"]);
    assert_eq!(ns.ruleset(), installed, "installing twice changes nothing");

    // Different settings replace the rules, they do not add to them.
    ns.meshward_ok(&["capture", "install", "--exclude-outbound-ports", "5432"]);
    let replaced = ns.ruleset();
    assert!(replaced.contains("tcp dport 5432 return"), "{replaced}");
    assert_eq!(replaced.matches("table inet meshward").count(), 1);

    let said = ns.meshward_ok(&["capture", "remove"]);
    assert!(said.contains("removed traffic capture"), "{said}");
    assert_eq!(
        ns.ruleset(),
        before,
        "remove leaves the namespace as it was"
    );
    let said = ns.meshward_ok(&["capture", "remove"]);
    assert!(said.contains("nothing to remove"), "{said}");
    assert_eq!(ns.ruleset(), before);
}

#[test]
fn without_cap_net_admin_the_error_says_so() {
    let ns = Netns::new("nocap");
    let bin = support::bin();
    for cmd in [["capture", "install"], ["capture", "remove"]] {
        let mut args = vec!["as", "65534", "65534", bin.to_str().expect("utf-8 path")];
        args.extend(cmd);
        let out = ns.probe(&args).output().expect("running the probe");
        let (stdout, stderr) = support::output_text(&out);
        assert_eq!(out.status.code(), Some(2), "{stdout}{stderr}");
        assert!(
            stderr.contains("permission denied; changing traffic capture needs CAP_NET_ADMIN in the workload's network namespace"),
            "{stderr}"
        );
    }
    assert!(!ns.ruleset().contains("meshward"));
}

#[test]
fn without_nft_the_error_says_what_to_install() {
    let out = Command::new(support::bin())
        .args(["capture", "show"])
        .env("PATH", "/nonexistent")
        .output()
        .expect("running meshward");
    let (_, stderr) = support::output_text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("the `nft` command was not found; install the nftables package"),
        "{stderr}"
    );
}

const WORKLOAD: &str = "apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: catalog
  namespace: production
  annotations:
    traffic.sidecar.istio.io/excludeOutboundPorts: \"PORTS\"
    traffic.sidecar.istio.io/includeInboundPorts: \"8080\"
spec:
  address: 127.0.1.2
  labels: {app: catalog}
  serviceAccount: catalog
  ports: {http: 8080}
";

fn workload_dir(ports: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(
        dir.path().join("workload.yaml"),
        WORKLOAD.replace("PORTS", ports),
    )
    .expect("writing the WorkloadEntry");
    dir
}

#[test]
fn annotations_apply_and_flags_override_them() {
    let dir = workload_dir("5432,6379");
    let config = dir.path().to_str().expect("utf-8 path");
    let run = |extra: &[&str]| {
        let mut args = vec!["capture", "install", "--dry-run", "-c", config];
        args.extend(["--workload", "production/catalog"]);
        args.extend(extra);
        support::stdout_of(&args)
    };
    let script = run(&[]);
    assert!(
        script.contains("tcp dport { 5432, 6379 } return # excludeOutboundPorts"),
        "{script}"
    );
    assert!(
        script.contains("tcp dport 8080 redirect to :15006"),
        "{script}"
    );
    let script = run(&[
        "--exclude-outbound-ports",
        "3306",
        "--include-inbound-ports",
        "*",
    ]);
    assert!(script.contains("tcp dport 3306 return"), "{script}");
    assert!(!script.contains("5432"), "{script}");
    assert!(
        script.contains("meta l4proto tcp redirect to :15006"),
        "{script}"
    );
}

#[test]
fn a_bad_annotation_is_refused_with_its_name() {
    let dir = workload_dir("5432,postgres");
    let config = dir.path().to_str().expect("utf-8 path");
    let out = Command::new(support::bin())
        .args(["capture", "install", "--dry-run", "-c", config])
        .args(["--workload", "production/catalog"])
        .output()
        .expect("running meshward");
    let (stdout, stderr) = support::output_text(&out);
    assert_eq!(out.status.code(), Some(2), "{stdout}{stderr}");
    assert!(stdout.is_empty(), "nothing printed to run: {stdout}");
    assert!(
        stderr.contains("WorkloadEntry production/catalog: annotation traffic.sidecar.istio.io/excludeOutboundPorts: \"postgres\" is not a port (1-65535)"),
        "{stderr}"
    );
    let out = Command::new(support::bin())
        .args(["capture", "install", "--dry-run", "-c", config])
        .args(["--workload", "production/nothere"])
        .output()
        .expect("running meshward");
    let (_, stderr) = support::output_text(&out);
    assert!(
        stderr.contains("no WorkloadEntry production/nothere"),
        "{stderr}"
    );
}

/// A client namespace (10.201.0.1, 10.201.1.1, fd00:201::1) joined by a
/// veth to a server namespace (10.201.0.2, 10.201.1.2, fd00:201::2).
fn pair(tag: &str) -> (Netns, Netns) {
    let client = Netns::new(&format!("{tag}c"));
    let server = Netns::new(&format!("{tag}s"));
    client.ip(&[
        "link",
        "add",
        "va",
        "type",
        "veth",
        "peer",
        "name",
        "vb",
        "netns",
        &server.name,
    ]);
    for (ns, dev, host) in [(&client, "va", "1"), (&server, "vb", "2")] {
        ns.ip(&["addr", "add", &format!("10.201.0.{host}/24"), "dev", dev]);
        ns.ip(&["addr", "add", &format!("10.201.1.{host}/24"), "dev", dev]);
        ns.ip(&[
            "addr",
            "add",
            &format!("fd00:201::{host}/64"),
            "dev",
            dev,
            "nodad",
        ]);
        ns.ip(&["link", "set", dev, "up"]);
    }
    (client, server)
}

/// Outbound: with capture installed in the client namespace, its
/// connections land on the outbound capture port with their original
/// destination, except the proxy's own and the excluded ones.
#[test]
fn captured_connections_reach_the_proxy_port_with_their_original_destination() {
    let (client, server) = pair("out");
    let _servers = [
        listen(&server, "server", "0.0.0.0:8080"),
        listen(&server, "server", "0.0.0.0:8081"),
        listen(&server, "server", "[::]:8080"),
    ];
    let _capture = [
        listen(&client, "capture", "0.0.0.0:15001"),
        listen(&client, "capture", "[::]:15001"),
    ];
    let direct = connect(&client, 65534, 65534, None, "10.201.0.2:8080");
    assert!(direct.starts_with("server "), "before install: {direct}");

    client.meshward_ok(&[
        "capture",
        "install",
        "--exclude-outbound-ports",
        "8081",
        "--exclude-outbound-ip-ranges",
        "10.201.1.0/24",
    ]);

    let captured = |reply: String, dst: &str| {
        assert_eq!(
            reply,
            format!("capture {dst}"),
            "captured, original destination kept"
        );
    };
    let bypassed = |reply: String, why: &str| {
        assert!(reply.starts_with("server "), "{why}: {reply}");
    };
    captured(
        connect(&client, 65534, 65534, None, "10.201.0.2:8080"),
        "10.201.0.2:8080",
    );
    captured(
        connect(&client, 0, 0, None, "10.201.0.2:8080"),
        "10.201.0.2:8080",
    );
    captured(
        connect(&client, 65534, 65534, None, "[fd00:201::2]:8080"),
        "[fd00:201::2]:8080",
    );
    bypassed(
        connect(&client, 1337, 65534, None, "10.201.0.2:8080"),
        "proxy uid",
    );
    bypassed(
        connect(&client, 65534, 1337, None, "10.201.0.2:8080"),
        "proxy gid",
    );
    bypassed(
        connect(&client, 0, 0, Some(1337), "10.201.0.2:8080"),
        "proxy mark",
    );
    bypassed(
        connect(&client, 1337, 1337, None, "[fd00:201::2]:8080"),
        "proxy over IPv6",
    );
    bypassed(
        connect(&client, 65534, 65534, None, "10.201.0.2:8081"),
        "excluded port",
    );
    bypassed(
        connect(&client, 65534, 65534, None, "10.201.1.2:8080"),
        "excluded range",
    );

    client.meshward_ok(&["capture", "remove"]);
    bypassed(
        connect(&client, 65534, 65534, None, "10.201.0.2:8080"),
        "after remove",
    );
}

/// Inbound and loopback, as Istio: connections arriving for the
/// workload's ports go to the inbound capture port, the proxy's own ports
/// are left alone, the application calling itself is not captured, the
/// proxy calling the workload's own address goes inbound, and the proxy's
/// passthrough from 127.0.0.6 reaches the application.
#[test]
fn inbound_and_loopback_are_handled_as_istio_does() {
    let (client, server) = pair("in");
    let _listeners = [
        listen(&client, "app", "0.0.0.0:8080"),
        listen(&client, "inbound", "0.0.0.0:15006"),
        listen(&client, "outbound", "0.0.0.0:15001"),
        listen(&client, "health", "0.0.0.0:15021"),
    ];
    client.meshward_ok(&["capture", "install"]);

    assert_eq!(
        connect(&server, 0, 0, None, "10.201.0.1:8080"),
        "inbound 10.201.0.1:8080",
        "inbound to a workload port"
    );
    assert!(
        connect(&server, 0, 0, None, "10.201.0.1:15021").starts_with("health "),
        "the proxy's own port is not captured"
    );
    assert!(
        connect(&client, 65534, 65534, None, "10.201.0.1:8080").starts_with("app "),
        "the application calling itself"
    );
    assert!(
        connect(&client, 65534, 65534, None, "127.0.0.1:8080").starts_with("app "),
        "the application calling localhost"
    );
    assert_eq!(
        connect(&client, 1337, 1337, None, "10.201.0.1:8080"),
        "inbound 10.201.0.1:8080",
        "the proxy calling its own workload's address goes inbound"
    );
    assert!(
        connect_from(&client, 1337, 1337, None, "127.0.0.6", "10.201.0.1:8080").starts_with("app "),
        "the proxy's inbound passthrough from 127.0.0.6"
    );
    assert!(
        connect(&client, 1337, 1337, None, "127.0.0.1:8080").starts_with("app "),
        "the proxy to the application on localhost"
    );
    client.meshward_ok(&["capture", "remove"]);
    assert!(connect(&server, 0, 0, None, "10.201.0.1:8080").starts_with("app "));
}

/// DNS: the application's queries, over UDP and TCP, land on the DNS
/// port; the proxy's own reach the resolver; `--capture-dns false` leaves
/// DNS alone.
#[test]
fn dns_queries_reach_the_dns_port_except_the_proxys() {
    let (client, server) = pair("dns");
    let _listeners = [
        listen_udp(&server, "resolver", "0.0.0.0:53"),
        listen(&server, "resolver-tcp", "0.0.0.0:53"),
        // On loopback, where the redirect sends the queries: a wildcard UDP
        // socket would answer from the interface's address, which
        // conntrack cannot match to the query (the answer is dropped).
        listen_udp(&client, "dns-proxy", "127.0.0.1:15053"),
        listen_udp(&client, "dns-proxy", "[::1]:15053"),
        listen_udp(&server, "resolver", "[::]:53"),
        listen(&client, "dns-proxy-tcp", "0.0.0.0:15053"),
    ];
    client.meshward_ok(&["capture", "install"]);
    let resolver = "10.201.0.2:53";
    assert_eq!(ask_udp(&client, 65534, 65534, None, resolver), "dns-proxy");
    assert_eq!(ask_udp(&client, 0, 0, None, resolver), "dns-proxy");
    assert_eq!(ask_udp(&client, 1337, 65534, None, resolver), "resolver");
    assert_eq!(ask_udp(&client, 65534, 1337, None, resolver), "resolver");
    assert_eq!(ask_udp(&client, 0, 0, Some(1337), resolver), "resolver");
    let resolver6 = "[fd00:201::2]:53";
    assert_eq!(ask_udp(&client, 65534, 65534, None, resolver6), "dns-proxy");
    assert_eq!(ask_udp(&client, 1337, 1337, None, resolver6), "resolver");
    assert_eq!(
        connect(&client, 65534, 65534, None, resolver),
        "dns-proxy-tcp 10.201.0.2:53"
    );
    assert!(connect(&client, 1337, 1337, None, resolver).starts_with("resolver-tcp "));

    client.meshward_ok(&["capture", "install", "--capture-dns", "false"]);
    assert_eq!(ask_udp(&client, 65534, 65534, None, resolver), "resolver");
    assert_eq!(ask_udp(&client, 65534, 65534, None, resolver6), "resolver");
}
