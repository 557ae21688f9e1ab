//! The control-plane source (`source::control`) against a small in-test
//! control plane (`control_plane/`): Istio's CA service and meshward's
//! config stream over real TLS on loopback, real signing. The proxy runs
//! in process; the tests assert what a peer of the proxy sees (connections
//! allowed or refused), what `/config_dump` and the metrics say, and what
//! the control plane received (how each CSR was authenticated, every ACK
//! and NACK).

mod control_plane;
mod support;

use control_plane::{Ca, Plane, Seen, Server, token};
use meshward_proxy::source::control::{self, ControlError, ControlOptions};
use meshward_proxy::source::{Published, SourceState};
use support::*;

const TOKEN_TTL_ASKED: Duration = Duration::from_secs(4);

/// A mesh around the orders proxy: its applications, its control plane,
/// the callers' credentials.
struct Mesh {
    plane: Arc<Plane>,
    dir: tempfile::TempDir,
    ports: Ports,
    /// The orders applications, serving as long as the mesh.
    _apps: (Echo, App),
}

impl Mesh {
    async fn new() -> Mesh {
        let plane = Plane::new();
        let echo = Echo::start().await;
        let app = App::start("orders").await;
        let ports = Ports {
            tcp: (SocketAddr::from(([127, 0, 0, 1], free_port())), echo.addr),
            http: (SocketAddr::from(([127, 0, 0, 1], free_port())), app.addr),
            outbound: SocketAddr::from(([127, 0, 0, 1], free_port())),
        };
        let t = token(NS, "orders");
        plane.allow_token(&t, NS, "orders");
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), format!("{t}\n")).unwrap();
        std::fs::write(dir.path().join("root-cert.pem"), plane.ca.root_pem()).unwrap();
        Mesh {
            plane,
            dir,
            ports,
            _apps: (echo, app),
        }
    }

    /// The control plane serves the orders mesh with `extra`; returns
    /// the version.
    fn serve(&self, extra: &str) -> u64 {
        self.plane
            .push(&[("mesh.yaml", &config(&self.ports, extra))], &[])
    }

    fn options(&self, addresses: &[SocketAddr]) -> ControlOptions {
        self.options_at(addresses.iter().map(|a| a.to_string()).collect())
    }

    fn options_at(&self, addresses: Vec<String>) -> ControlOptions {
        let mut o = ControlOptions::new(
            addresses,
            format!("{NS}/orders"),
            self.dir.path().join("token"),
            self.dir.path().join("root-cert.pem"),
        );
        o.cert_ttl = Some(TOKEN_TTL_ASKED);
        o.max_backoff = Duration::from_millis(500);
        o
    }

    async fn proxy(&self, addresses: &[SocketAddr]) -> Proxy {
        self.proxy_at(addresses.iter().map(|a| a.to_string()).collect())
            .await
    }

    async fn proxy_at(&self, addresses: Vec<String>) -> Proxy {
        let feed = control::start(self.options_at(addresses)).unwrap();
        let options = Options {
            workload: format!("{NS}/orders"),
            admin: SocketAddr::from(([127, 0, 0, 1], 0)),
            metrics: None,
            access_log: AccessLogTo::Off,
            idle_timeout: meshward_proxy::DEFAULT_IDLE_TIMEOUT,
            dns: meshward_proxy::DnsConfig::System,
        };
        tokio::time::timeout(patience(), meshward_proxy::start(feed, options))
            .await
            .expect("the proxy started from the control plane in time")
            .unwrap()
    }

    /// Credentials for `production/<sa>` from the mesh CA.
    fn caller(&self, sa: &str) -> WorkloadCerts {
        self.plane
            .ca
            .write_workload(&self.dir.path().join(format!("caller-{sa}")), NS, sa)
    }

    /// Whether `caller` gets an echo through the orders TCP port (the
    /// proxy's certificate verified with the mesh's first root).
    async fn passes(&self, caller: &WorkloadCerts) -> bool {
        self.passes_trusting(caller, &self.dir.path().join("root-cert.pem"))
            .await
    }

    /// As [`Mesh::passes`], verifying the proxy with the roots in `roots`.
    async fn passes_trusting(&self, caller: &WorkloadCerts, roots: &std::path::Path) -> bool {
        match mtls_connect(&caller.dir, roots, self.ports.tcp.0, b"istio").await {
            Ok(mut c) => echo_back(&mut c, "ping").await.is_ok(),
            Err(_) => false,
        }
    }
}

async fn admin(proxy: &Proxy, path: &str) -> String {
    let (status, body) = get(proxy.admin_addr().unwrap(), "admin", path, &[])
        .await
        .unwrap();
    assert_eq!(status, 200, "{path}: {body}");
    body
}

async fn source(proxy: &Proxy) -> serde_json::Value {
    serde_json::from_str::<serde_json::Value>(&admin(proxy, "/config_dump").await).unwrap()
        ["source"]
        .clone()
}

/// The ACKs and NACKs the control plane received (not the subscriptions).
fn answers(plane: &Plane) -> Vec<meshward_proto::config::ConfigRequest> {
    plane
        .requests()
        .into_iter()
        .map(|(_, r)| r)
        .filter(|r| !r.response_nonce.is_empty())
        .collect()
}

/// Polls `check` until it holds, failing the test after the patience.
async fn until(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = std::time::Instant::now() + patience();
    while !check().await {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_certificate_is_obtained_with_the_token_and_renewed_over_mtls() {
    let mesh = Mesh::new().await;
    mesh.serve("");
    let server = Server::start(&mesh.plane, "a", "127.0.0.1:0".parse().unwrap());
    // A host name resolves.
    let address = format!("localhost:{}", server.addr.port());
    let proxy = mesh.proxy_at(vec![address.clone()]).await;

    // Traffic flows with the issued certificate and the pushed config.
    let frontend = mesh.caller("frontend");
    assert!(mesh.passes(&frontend).await);
    let dump = source(&proxy).await;
    assert_eq!(dump["kind"], "control", "{dump}");
    assert_eq!(dump["config"]["state"], "ok", "{dump}");
    assert_eq!(dump["certs"]["state"], "ok", "{dump}");
    assert_eq!(dump["config"]["paths"][0], address, "{dump}");

    // A 4 s certificate is renewed after 2-2.4 s: wait for two renewals.
    until("two renewals", async || {
        mesh.plane
            .seen()
            .iter()
            .filter(|s| matches!(s, Seen::Csr { .. }))
            .count()
            >= 3
    })
    .await;
    let csrs: Vec<_> = mesh
        .plane
        .seen()
        .into_iter()
        .filter_map(|s| match s {
            Seen::Csr {
                client_cert,
                bearer,
                validity,
                ..
            } => Some((client_cert, bearer, validity)),
            _ => None,
        })
        .collect();
    let orders = format!("spiffe://cluster.local/ns/{NS}/sa/orders");
    // The first: the token, trimmed, and no client certificate.
    assert_eq!(csrs[0].0, None);
    assert_eq!(csrs[0].1.as_deref(), Some(token(NS, "orders").as_str()));
    // Renewals: the current certificate, and no token.
    for (cert, bearer, _) in &csrs[1..] {
        assert_eq!(cert.as_ref().map(|c| c.as_str()), Some(orders.as_str()));
        assert_eq!(bearer, &None);
    }
    assert!(csrs.iter().all(|c| c.2 == 4), "{csrs:?}");

    // The proxy presents the renewed certificate; its expiry is exported.
    let metrics = admin(&proxy, "/stats/prometheus").await;
    let left: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("istio_agent_cert_expiry_seconds "))
        .expect("istio_agent_cert_expiry_seconds")
        .trim()
        .parse()
        .unwrap();
    assert!((0.0..=4.0).contains(&left), "{left}");
    assert!(mesh.passes(&frontend).await);

    // The config stream was subscribed once, over mTLS, and survived the
    // rotations; it ACKed version 1.
    let subscriptions: Vec<_> = mesh
        .plane
        .seen()
        .into_iter()
        .filter_map(|s| match s {
            Seen::Subscribed { peer, .. } => Some(peer),
            _ => None,
        })
        .collect();
    assert_eq!(subscriptions.len(), 1, "{subscriptions:?}");
    assert_eq!(
        subscriptions[0].as_ref().map(|p| p.as_str()),
        Some(orders.as_str())
    );
    let first = &mesh.plane.requests()[0].1;
    let node = first.node.as_ref().unwrap();
    assert_eq!(node.workload, format!("{NS}/orders"));
    assert!(node.id.starts_with(&format!("{NS}/orders~")), "{}", node.id);
    assert_eq!(
        (first.version_info.as_str(), first.response_nonce.as_str()),
        ("", "")
    );
    let acks = answers(&mesh.plane);
    assert_eq!(acks[0].version_info, "1");
    assert_eq!(acks[0].response_nonce, "nonce-1");
    assert!(acks[0].error_detail.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_is_applied_and_acked_and_a_bad_one_nacked_while_the_last_good_one_stays() {
    let mesh = Mesh::new().await;
    mesh.serve(&deny_from("intruder"));
    let server = Server::start(&mesh.plane, "a", "127.0.0.1:0".parse().unwrap());
    let proxy = mesh.proxy(&[server.addr]).await;
    let (frontend, intruder) = (mesh.caller("frontend"), mesh.caller("intruder"));
    assert!(mesh.passes(&frontend).await);
    assert!(!mesh.passes(&intruder).await);

    // A new policy: applied, ACKed.
    let v2 = mesh.serve(&format!(
        "{}{}",
        deny_from("intruder"),
        deny_from("frontend")
    ));
    until("frontend denied by version 2", async || {
        !mesh.passes(&frontend).await
    })
    .await;
    until("version 2 ACKed", async || {
        answers(&mesh.plane)
            .iter()
            .any(|a| a.version_info == v2.to_string() && a.error_detail.is_none())
    })
    .await;

    // A document that does not validate: NACKed with the diagnostics,
    // naming its origin; version 2 keeps being enforced.
    let broken = mesh::authorization_policy(NS, "broken", "  action: DENY\n  rules: 7");
    let v3 = mesh.plane.push(
        &[
            ("mesh.yaml", &config(&mesh.ports, "")),
            ("broken.yaml", &broken),
        ],
        &[],
    );
    until("version 3 NACKed", async || {
        answers(&mesh.plane)
            .iter()
            .any(|a| a.response_nonce == format!("nonce-{v3}"))
    })
    .await;
    let nack = answers(&mesh.plane)
        .into_iter()
        .find(|a| a.response_nonce == format!("nonce-{v3}"))
        .unwrap();
    assert_eq!(
        nack.version_info,
        v2.to_string(),
        "a NACK names the version applied"
    );
    let error = nack.error_detail.expect("a NACK carries the error");
    assert_eq!(error.code, 3);
    assert!(error.message.contains("broken.yaml:1"), "{}", error.message);
    assert!(error.message.contains("rules"), "{}", error.message);
    // The NACK is sent as the refusal is published; the proxy records it
    // as it applies it.
    until("the refusal shown", async || {
        source(&proxy).await["config"]["state"] == "refused"
    })
    .await;
    let dump = source(&proxy).await;
    assert_eq!(dump["config"]["state"], "refused", "{dump}");
    assert!(
        dump["config"]["error"]
            .as_str()
            .unwrap()
            .contains("broken.yaml"),
        "{dump}"
    );
    assert!(!mesh.passes(&frontend).await, "version 2 is still enforced");
    assert!(!mesh.passes(&intruder).await);

    // Valid resources this proxy cannot apply (no WorkloadEntry for it):
    // NACKed with the proxy's reason.
    let v4 = mesh.plane.push(&[("mesh.yaml", &mesh::mesh_strict())], &[]);
    until("version 4 NACKed", async || {
        answers(&mesh.plane)
            .iter()
            .any(|a| a.response_nonce == format!("nonce-{v4}"))
    })
    .await;
    let nack = answers(&mesh.plane)
        .into_iter()
        .find(|a| a.response_nonce == format!("nonce-{v4}"))
        .unwrap();
    assert_eq!(nack.version_info, v2.to_string());
    let error = nack.error_detail.expect("a NACK carries the error").message;
    assert!(
        error.contains("the proxy cannot apply it") && error.contains("orders"),
        "{error}"
    );
    assert!(!mesh.passes(&frontend).await, "version 2 is still enforced");

    // A good version after them applies.
    let v5 = mesh.serve("");
    until("frontend allowed by version 5", async || {
        mesh.passes(&frontend).await
    })
    .await;
    assert!(mesh.passes(&intruder).await);
    until("version 5 ACKed", async || {
        answers(&mesh.plane)
            .iter()
            .any(|a| a.version_info == v5.to_string() && a.error_detail.is_none())
    })
    .await;
    assert_eq!(source(&proxy).await["config"]["state"], "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pushed_trust_bundle_replaces_the_roots_the_proxy_trusts() {
    let mesh = Mesh::new().await;
    mesh.serve("");
    let server = Server::start(&mesh.plane, "a", "127.0.0.1:0".parse().unwrap());
    let proxy = mesh.proxy(&[server.addr]).await;
    let old_caller = mesh.caller("frontend");
    let new_ca = Ca::generate();
    let new_caller = new_ca.write_workload(&mesh.dir.path().join("new-frontend"), NS, "frontend");
    assert!(mesh.passes(&old_caller).await);
    assert!(
        !mesh.passes(&new_caller).await,
        "an unknown root is refused"
    );

    // Add the new root (to what the config stream and the CA send).
    let config = config(&mesh.ports, "");
    let both = [mesh.plane.ca.root_pem(), new_ca.root_pem()];
    *mesh.plane.ca_roots.lock().unwrap() = both.to_vec();
    mesh.plane.push(&[("mesh.yaml", &config)], &both);
    until("the new root trusted", async || {
        mesh.passes(&new_caller).await
    })
    .await;
    assert!(mesh.passes(&old_caller).await);
    assert_eq!(source(&proxy).await["certs"]["state"], "ok");

    // A bundle without the root of the proxy's own certificate (retired
    // too early, before the proxy was issued one under the new root) is
    // NACKed, saying so: the proxy keeps both roots, its peers keep
    // working.
    let early = mesh
        .plane
        .push(&[("mesh.yaml", &config)], &[new_ca.root_pem()]);
    until("the early retirement NACKed", async || {
        answers(&mesh.plane)
            .iter()
            .any(|a| a.response_nonce == format!("nonce-{early}"))
    })
    .await;
    let nack = answers(&mesh.plane)
        .into_iter()
        .find(|a| a.response_nonce == format!("nonce-{early}"))
        .unwrap();
    let error = nack.error_detail.expect("a NACK").message;
    assert!(
        error.contains("would not verify this proxy's own certificate"),
        "{error}"
    );
    assert_eq!(nack.version_info, (early - 1).to_string());
    until("the refusal shown", async || {
        source(&proxy).await["config"]["state"] == "refused"
    })
    .await;
    assert!(mesh.passes(&old_caller).await);
    assert!(mesh.passes(&new_caller).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn it_fails_over_past_dead_addresses_and_to_the_other_replica_when_one_dies() {
    let mesh = Mesh::new().await;
    mesh.serve("");
    let dead = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let a = Server::start(&mesh.plane, "a", "127.0.0.1:0".parse().unwrap());
    let b = Server::start(&mesh.plane, "b", "127.0.0.1:0".parse().unwrap());
    // Whichever address it starts at, it gets its certificate and
    // configuration.
    let proxy = mesh.proxy(&[dead, a.addr, b.addr]).await;
    let frontend = mesh.caller("frontend");
    assert!(mesh.passes(&frontend).await);

    // Kill the replica the stream is on: the proxy goes on serving and
    // follows the other one.
    until("the subscription recorded", async || {
        !mesh.plane.requests().is_empty()
    })
    .await;
    let on = match mesh.plane.requests().last().unwrap().0 {
        "a" => "a",
        _ => "b",
    };
    let survivor = if on == "a" {
        drop(a);
        b
    } else {
        drop(b);
        a
    };
    assert!(mesh.passes(&frontend).await);
    mesh.serve(&deny_from("frontend"));
    until(
        "the policy pushed by the surviving replica enforced",
        async || !mesh.passes(&frontend).await,
    )
    .await;
    let other = if on == "a" { "b" } else { "a" };
    until("ACKed to the other replica", async || {
        mesh.plane.requests().iter().any(|(server, r)| {
            *server == other && r.error_detail.is_none() && !r.response_nonce.is_empty()
        })
    })
    .await;
    assert_eq!(source(&proxy).await["config"]["state"], "ok");
    // Failing over to a live replica is not an outage.
    let metrics = admin(&proxy, "/stats/prometheus").await;
    assert!(
        metrics.contains("meshward_config_source_lost_total{source=\"config\"} 0"),
        "{metrics}"
    );
    drop(survivor);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn it_keeps_serving_while_the_control_plane_is_down_and_resyncs_when_it_returns() {
    let mesh = Mesh::new().await;
    mesh.serve(&deny_from("intruder"));
    let server = Server::start(&mesh.plane, "a", "127.0.0.1:0".parse().unwrap());
    let proxy = mesh.proxy(&[server.addr]).await;
    let (frontend, intruder) = (mesh.caller("frontend"), mesh.caller("intruder"));
    assert!(mesh.passes(&frontend).await);

    let addr = server.stop();
    until("the config source shown lost", async || {
        source(&proxy).await["config"]["state"] == "lost"
    })
    .await;
    let dump = source(&proxy).await;
    assert!(
        dump["config"]["error"]
            .as_str()
            .unwrap()
            .contains(&addr.to_string()),
        "{dump}"
    );
    let metrics = admin(&proxy, "/stats/prometheus").await;
    assert!(
        metrics.contains("meshward_config_source_up{source=\"config\"} 0"),
        "{metrics}"
    );
    // Serving goes on with the configuration applied.
    assert!(mesh.passes(&frontend).await);
    assert!(!mesh.passes(&intruder).await);

    // A change made while it was down reaches the proxy when it returns.
    mesh.serve(&deny_from("frontend"));
    let _back = Server::start(&mesh.plane, "a", addr);
    until("resynced: the new policy enforced", async || {
        !mesh.passes(&frontend).await
    })
    .await;
    assert!(mesh.passes(&intruder).await);
    until("the config source ok again", async || {
        source(&proxy).await["config"]["state"] == "ok"
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_token_is_shown_and_the_proxy_waits_for_a_good_one() {
    let mesh = Mesh::new().await;
    mesh.serve("");
    let server = Server::start(&mesh.plane, "a", "127.0.0.1:0".parse().unwrap());
    // A token of the right namespace the CA does not know.
    std::fs::write(
        mesh.dir.path().join("token"),
        token(NS, "orders") + "-forged",
    )
    .unwrap();
    let mut feed = control::start(mesh.options(&[server.addr])).unwrap();
    let refused = tokio::time::timeout(patience(), async {
        loop {
            feed.credentials.changed().await.unwrap();
            if let Published::Problem { state, error, .. } = &*feed.credentials.borrow_and_update()
            {
                return (*state, error.clone());
            }
        }
    })
    .await
    .expect("the refusal published");
    assert_eq!(refused.0, SourceState::Refused);
    assert!(refused.1.contains("PermissionDenied"), "{}", refused.1);
    assert!(
        refused.1.contains("unknown bootstrap token"),
        "{}",
        refused.1
    );
    assert!(
        !refused.1.contains("forged"),
        "the token is never shown: {}",
        refused.1
    );

    // The token file is read again on the next attempt.
    std::fs::write(mesh.dir.path().join("token"), token(NS, "orders")).unwrap();
    let got = tokio::time::timeout(patience(), async {
        loop {
            feed.credentials.changed().await.unwrap();
            if let Published::Update { content, .. } = &*feed.credentials.borrow_and_update() {
                return content.credentials.id().to_string();
            }
        }
    })
    .await
    .expect("a certificate once the token is good");
    assert_eq!(got, format!("spiffe://cluster.local/ns/{NS}/sa/orders"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_options_fail_at_start_saying_what_is_wrong() {
    let mesh = Mesh::new().await;
    let addr = SocketAddr::from(([127, 0, 0, 1], 15012));
    let start = |o: ControlOptions| control::start(o).map(drop).unwrap_err();

    // A token of another namespace.
    let other = mesh.dir.path().join("other-token");
    std::fs::write(&other, token("staging", "orders")).unwrap();
    let mut o = mesh.options(&[addr]);
    o.token_file = other;
    let e = start(o);
    assert!(matches!(e, ControlError::TokenNamespace { .. }), "{e}");
    assert!(e.to_string().contains("\"staging\""), "{e}");

    let mut o = mesh.options(&[addr]);
    o.token_file = mesh.dir.path().join("missing");
    let e = start(o);
    assert!(
        e.to_string().contains("cannot read the bootstrap token"),
        "{e}"
    );

    let not_jwt = mesh.dir.path().join("not-jwt");
    std::fs::write(&not_jwt, "hello").unwrap();
    let mut o = mesh.options(&[addr]);
    o.token_file = not_jwt;
    assert!(start(o).to_string().contains("not a JWT"));

    let mut o = mesh.options(&[addr]);
    o.addresses = vec!["127.0.0.1".to_string()];
    let e = start(o);
    assert!(e.to_string().contains("\"127.0.0.1\""), "{e}");
    let mut o = mesh.options(&[]);
    o.addresses = vec![];
    assert!(matches!(start(o), ControlError::NoAddress));

    let empty = mesh.dir.path().join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    let mut o = mesh.options(&[addr]);
    o.root_cert = empty;
    let e = start(o);
    assert!(e.to_string().contains("empty.pem"), "{e}");

    let mut o = mesh.options(&[addr]);
    o.control_identity = "istiod".to_string();
    assert!(matches!(start(o), ControlError::ControlIdentity { .. }));

    let mut o = mesh.options(&[addr]);
    o.workload = "orders".to_string();
    assert!(matches!(start(o), ControlError::Workload { .. }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_plane_with_another_identity_is_not_trusted() {
    let mesh = Mesh::new().await;
    mesh.serve("");
    let server = Server::start(&mesh.plane, "a", "127.0.0.1:0".parse().unwrap());
    let mut o = mesh.options(&[server.addr]);
    o.control_identity = "istio-system/other".to_string();
    let mut feed = control::start(o).unwrap();
    let lost = tokio::time::timeout(patience(), async {
        loop {
            feed.credentials.changed().await.unwrap();
            if let Published::Problem { state, error, .. } = &*feed.credentials.borrow_and_update()
            {
                return (*state, error.clone());
            }
        }
    })
    .await
    .expect("the failure published");
    assert_eq!(lost.0, SourceState::Lost);
    assert!(
        lost.1
            .contains("spiffe://cluster.local/ns/istio-system/sa/istiod")
            && lost.1.contains("not one of the expected identities"),
        "{}",
        lost.1
    );
    assert!(
        !mesh
            .plane
            .seen()
            .iter()
            .any(|s| matches!(s, Seen::Csr { .. })),
        "no CSR reached a server of the wrong identity"
    );
}

/// `istio_agent_cert_expiry_seconds` is the proxy's, whatever its source:
/// here the in-process one (the files source goes through the same state).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_certificate_expiry_is_exported_for_every_source() {
    let h = Harness::start("").await;
    let metrics = h.admin("/stats/prometheus").await;
    assert!(
        metrics.contains("# TYPE istio_agent_cert_expiry_seconds gauge"),
        "{metrics}"
    );
    let left: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("istio_agent_cert_expiry_seconds "))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // The harness's certificates live an hour.
    assert!((3500.0..=3600.0).contains(&left), "{left}");
}

/// Renewals every 2-2.4 s under continuous traffic: no request fails, and
/// the proxy presents each new certificate on new handshakes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_under_traffic_without_a_failed_request() {
    let mesh = Mesh::new().await;
    mesh.serve("");
    let server = Server::start(&mesh.plane, "a", "127.0.0.1:0".parse().unwrap());
    let _proxy = mesh.proxy(&[server.addr]).await;
    let frontend = mesh.caller("frontend");
    let root = mesh.dir.path().join("root-cert.pem");
    let mut presented_leaves = std::collections::BTreeSet::new();
    let (mut ok, mut failed) = (0, Vec::new());
    let end = std::time::Instant::now() + Duration::from_secs(7);
    while std::time::Instant::now() < end {
        match mtls_connect(&frontend.dir, &root, mesh.ports.tcp.0, b"istio").await {
            Ok(mut c) => {
                presented_leaves.insert(presented(&c));
                match echo_back(&mut c, "ping").await {
                    Ok(()) => ok += 1,
                    Err(e) => failed.push(e),
                }
            }
            Err(e) => failed.push(e),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        failed.is_empty(),
        "{} of {} failed: {failed:?}",
        failed.len(),
        ok + failed.len()
    );
    assert!(
        presented_leaves.len() >= 3,
        "{} certificates presented in 7 s",
        presented_leaves.len()
    );
}

/// The root rotation of DESIGN section 6, as the proxy lives it: a new
/// root added to the pushed bundle; the CA switched to an intermediate
/// under it (the control plane restarted with it); certificates rotated;
/// the old root retired. A peer under the new CA talks to the proxy
/// throughout without a failed request; a peer still under the old root
/// is refused at the end; the proxy keeps renewing from the control plane,
/// now verified by the new root alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_root_rotation_reaches_the_proxy_without_a_failed_request() {
    use std::sync::atomic::{AtomicBool, Ordering};

    let mesh = Mesh::new().await;
    mesh.serve("");
    let server = Server::start(&mesh.plane, "a", "127.0.0.1:0".parse().unwrap());
    let proxy = mesh.proxy(&[server.addr]).await;
    let config = config(&mesh.ports, "");
    let new_ca = Arc::new(Ca::intermediate_under_new_root());
    let (old_root, new_root) = (mesh.plane.ca.root_pem(), new_ca.root_pem());
    let both = mesh.dir.path().join("both-roots.pem");
    std::fs::write(&both, format!("{old_root}{new_root}")).unwrap();
    let old_peer = mesh.caller("reports");
    let new_peer = new_ca.write_workload(&mesh.dir.path().join("new-frontend"), NS, "frontend");

    // 1. The new root joins the bundle.
    *mesh.plane.ca_roots.lock().unwrap() = vec![old_root.clone(), new_root.clone()];
    mesh.plane.push(
        &[("mesh.yaml", &config)],
        &[old_root.clone(), new_root.clone()],
    );
    until("the new root trusted", async || {
        mesh.passes_trusting(&new_peer, &both).await
    })
    .await;

    // Traffic from the new peer from now on.
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let traffic = {
        let (stop, failures) = (Arc::clone(&stop), Arc::clone(&failures));
        let (dir, both, port) = (new_peer.dir.clone(), both.clone(), mesh.ports.tcp.0);
        tokio::spawn(async move {
            let mut sent = 0;
            while !stop.load(Ordering::Relaxed) {
                sent += 1;
                match mtls_connect(&dir, &both, port, b"istio").await {
                    Ok(mut c) => {
                        if let Err(e) = echo_back(&mut c, "ping").await {
                            failures.lock().unwrap().push(e);
                        }
                    }
                    Err(e) => failures.lock().unwrap().push(e),
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            sent
        })
    };

    // 2. The CA signs under the new root; the control plane restarts with
    // a certificate of it. The proxy resubscribes and renews under it.
    mesh.plane.switch_ca(Arc::clone(&new_ca));
    let addr = server.stop();
    let _server = Server::start(&mesh.plane, "a", addr);
    until(
        "the proxy presenting a certificate under the new root",
        async || {
            match mtls_connect(&new_peer.dir, &both, mesh.ports.tcp.0, b"istio").await {
                // Leaf and intermediate: the new CA's chain (the old root
                // signed leaves directly).
                Ok(c) => c.get_ref().1.peer_certificates().unwrap().len() == 2,
                Err(_) => false,
            }
        },
    )
    .await;

    // 3. The old root retired.
    *mesh.plane.ca_roots.lock().unwrap() = vec![new_root.clone()];
    mesh.plane
        .push(&[("mesh.yaml", &config)], std::slice::from_ref(&new_root));
    until("the old root's peers refused", async || {
        !mesh.passes_trusting(&old_peer, &both).await
    })
    .await;
    let csrs = || {
        mesh.plane
            .seen()
            .iter()
            .filter(|s| matches!(s, Seen::Csr { .. }))
            .count()
    };
    let before = csrs();
    until("a renewal after the retirement", async || csrs() > before).await;
    let dump = source(&proxy).await;
    assert_eq!(dump["certs"]["state"], "ok", "{dump}");
    assert_eq!(dump["config"]["state"], "ok", "{dump}");

    stop.store(true, Ordering::Relaxed);
    let sent = traffic.await.unwrap();
    let failures = failures.lock().unwrap();
    assert!(sent > 20, "only {sent} requests");
    assert!(
        failures.is_empty(),
        "{} of {sent} failed: {failures:?}",
        failures.len()
    );
}

/// The first address is dead: the first CA call fails over to the next
/// one, which the stream then starts from; the proxy starts as if nothing
/// happened. (The stream's own failover: the replica test above.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_first_address_fails_over_to_the_next_one() {
    let mesh = Mesh::new().await;
    mesh.serve("");
    let dead = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let live = Server::start(&mesh.plane, "live", "127.0.0.1:0".parse().unwrap());
    let mut o = mesh.options(&[dead, live.addr]);
    o.first_address = Some(0);
    let feed = control::start(o).unwrap();
    let options = Options {
        workload: format!("{NS}/orders"),
        admin: SocketAddr::from(([127, 0, 0, 1], 0)),
        metrics: None,
        access_log: AccessLogTo::Off,
        idle_timeout: meshward_proxy::DEFAULT_IDLE_TIMEOUT,
        dns: meshward_proxy::DnsConfig::System,
    };
    let proxy = tokio::time::timeout(patience(), meshward_proxy::start(feed, options))
        .await
        .expect("started through the second address")
        .unwrap();
    assert!(mesh.passes(&mesh.caller("frontend")).await);
    let seen = mesh.plane.seen();
    assert!(
        seen.iter()
            .any(|s| matches!(s, Seen::Csr { server: "live", .. }))
    );
    assert!(
        seen.iter()
            .any(|s| matches!(s, Seen::Subscribed { server: "live", .. }))
    );
    let dump = source(&proxy).await;
    assert_eq!(dump["config"]["state"], "ok", "{dump}");
    assert_eq!(dump["certs"]["state"], "ok", "{dump}");
}
