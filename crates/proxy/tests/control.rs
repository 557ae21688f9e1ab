//! The control-plane source (`source::control`) against the real control
//! plane (`meshward_control::start`, in process: `control_plane::Replica`),
//! over real TLS on loopback: a watched config directory written by the
//! test, a self-signed or plug-in CA directory, bootstrap tokens minted
//! with the CA's key. The proxy runs in process; the tests assert what a
//! peer of the proxy sees (connections allowed or refused), what
//! `/config_dump` and the metrics say, and what the control plane shows
//! (its registry of proxies, its metrics, its log of issued certificates).
//! One test uses a fake config stream (`control_plane::FakeStream`) for
//! what the real control plane never pushes: a version the proxy's loader
//! refuses.

mod control_plane;
mod support;

use control_plane::FakeStream;
use control_plane::mesh::*;
use meshward_identity::ca::{CA_CERT_FILE, CA_KEY_FILE, CERT_CHAIN_FILE, ROOT_CERT_FILE};
use meshward_proxy::source::control::{self, ControlError, ControlOptions};
use meshward_proxy::source::{Published, SourceState};
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_certificate_is_obtained_with_the_token_and_renewed_over_mtls() {
    let mesh = Mesh::new().await;
    let plane = mesh.plane().await;
    // A host name resolves.
    let address = format!("localhost:{}", plane.addr.port());
    let proxy = mesh.proxy_at(vec![address.clone()]).await;

    // Traffic flows with the issued certificate and the pushed config.
    let frontend = mesh.caller("frontend");
    assert!(mesh.passes(&frontend).await);
    let dump = source(&proxy).await;
    assert_eq!(dump["kind"], "control", "{dump}");
    assert_eq!(dump["config"]["state"], "ok", "{dump}");
    assert_eq!(dump["certs"]["state"], "ok", "{dump}");
    assert_eq!(dump["config"]["paths"][0], address, "{dump}");
    let subscribed = plane.connected().expect("the proxy subscribed");

    // The first certificate was issued for the token (written with a
    // trailing newline, which the proxy trims: a header cannot carry it).
    // The token is for the first certificate only: renewals prove the
    // identity with the current certificate. A 4 s certificate is renewed
    // after 2-2.4 s: wait for two renewals.
    std::fs::remove_file(mesh.dir.path().join("token")).unwrap();
    until("two renewals", async || plane.issued().len() >= 3).await;
    let issued = plane.issued();
    assert_eq!(issued[0], ("token".to_string(), orders_id()), "{issued:?}");
    for i in &issued[1..] {
        assert_eq!(i, &("renewal".to_string(), orders_id()), "{issued:?}");
    }

    // The proxy presents the renewed certificate; its expiry is exported,
    // within the 4 s it asked for.
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
    assert_eq!(source(&proxy).await["certs"]["state"], "ok");

    // The config stream was subscribed once, over mTLS as orders, and
    // survived the rotations; it ACKed the version sent.
    let version = acked(&plane, None).await;
    let proxies = plane.registry.list();
    assert_eq!(proxies.len(), 1, "{proxies:?}");
    let p = &proxies[0];
    assert!(p.connected);
    assert_eq!(p.identity, orders_id());
    assert_eq!(p.workload, format!("{NS}/orders"));
    assert!(
        p.node_id.starts_with(&format!("{NS}/orders~")),
        "{}",
        p.node_id
    );
    assert_eq!(
        p.connected_since, subscribed.connected_since,
        "subscribed again"
    );
    assert_eq!(p.version_acked.as_deref(), Some(version.as_str()));
    assert!(p.last_nack.is_none(), "{:?}", p.last_nack);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_is_applied_and_acked_and_one_the_proxy_cannot_apply_is_nacked() {
    let mesh = Mesh::new().await;
    mesh.serve(&deny_from("intruder"));
    let plane = mesh.plane().await;
    let proxy = mesh.proxy(&[plane.addr]).await;
    let (frontend, intruder) = (mesh.caller("frontend"), mesh.caller("intruder"));
    assert!(mesh.passes(&frontend).await);
    assert!(!mesh.passes(&intruder).await);
    let v1 = acked(&plane, None).await;

    // A new policy written to the directory: applied, ACKed.
    let both = format!("{}{}", deny_from("intruder"), deny_from("frontend"));
    mesh.serve(&both);
    until("frontend denied by version 2", async || {
        !mesh.passes(&frontend).await
    })
    .await;
    let v2 = acked(&plane, Some(&v1)).await;

    // A change that does not validate is refused by the control plane
    // whole: nothing is pushed, version 2 stays.
    let broken = mesh::authorization_policy(NS, "broken", "  action: DENY\n  rules: 7");
    mesh.write_config("broken.yaml", &broken);
    until("the change refused", async || {
        plane.metrics.config_rejected.get() > 0
    })
    .await;
    let p = plane.connected().unwrap();
    assert_eq!(p.version_sent.as_deref(), Some(v2.as_str()));
    assert!(!mesh.passes(&frontend).await, "version 2 is still enforced");
    std::fs::remove_file(mesh.dir.path().join("config/broken.yaml")).unwrap();

    // Valid resources this proxy cannot apply (its outbound listener
    // annotation is no address): NACKed with the proxy's reason, which
    // the control plane keeps; version 2 keeps being enforced.
    let unusable = WorkloadEntry::new(NS, "orders")
        .port("tcp", mesh.ports.tcp.0.port())
        .port("http", mesh.ports.http.0.port())
        .app_ports(&[("tcp", mesh.ports.tcp.1), ("http", mesh.ports.http.1)])
        .annotation("meshward.io/outbound", "nowhere")
        .yaml();
    mesh.write_config(
        "mesh.yaml",
        &format!("{}{unusable}{both}", mesh::mesh_strict()),
    );
    until("the version NACKed", async || {
        plane.connected().is_some_and(|p| p.last_nack.is_some())
    })
    .await;
    let p = plane.connected().unwrap();
    let nack = p.last_nack.unwrap();
    assert_eq!(Some(&nack.version), p.version_sent.as_ref());
    assert_ne!(nack.version, v2);
    assert!(
        nack.error.contains("the proxy cannot apply it")
            && nack.error.contains("meshward.io/outbound")
            && nack.error.contains("nowhere"),
        "{}",
        nack.error
    );
    assert_eq!(p.version_acked.as_deref(), Some(v2.as_str()));
    until("the refusal shown", async || {
        source(&proxy).await["config"]["state"] == "refused"
    })
    .await;
    let dump = source(&proxy).await;
    assert!(
        dump["config"]["error"]
            .as_str()
            .unwrap()
            .contains("meshward.io/outbound"),
        "{dump}"
    );
    assert!(!mesh.passes(&frontend).await, "version 2 is still enforced");
    assert!(!mesh.passes(&intruder).await);

    // A good version after them applies.
    mesh.serve("");
    until("frontend allowed by the good version", async || {
        mesh.passes(&frontend).await
    })
    .await;
    assert!(mesh.passes(&intruder).await);
    acked(&plane, Some(&v2)).await;
    assert_eq!(source(&proxy).await["config"]["state"], "ok");
}

/// The proxy's loader refuses what the real control plane never pushes (it
/// validates first): the fake stream pushes it, to see the proxy's NACK as
/// it is on the wire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pushed_version_the_proxy_refuses_is_nacked_and_the_last_good_one_stays() {
    let mesh = Mesh::with_plug_in_ca().await;
    let fake = FakeStream::start(&mesh.ca_dir()).await;
    let push = |extra: &str| fake.push(&[("mesh.yaml", &config(&mesh.ports, extra))]);
    push(&deny_from("intruder"));
    let proxy = mesh.proxy(&[fake.addr]).await;
    let (frontend, intruder) = (mesh.caller("frontend"), mesh.caller("intruder"));
    assert!(mesh.passes(&frontend).await);
    assert!(!mesh.passes(&intruder).await);

    // The subscription names the node and carries no version or nonce;
    // the ACK names the version and the nonce it answers.
    let first = &fake.requests()[0];
    let node = first.node.as_ref().unwrap();
    assert_eq!(node.workload, format!("{NS}/orders"));
    assert!(node.id.starts_with(&format!("{NS}/orders~")), "{}", node.id);
    assert_eq!(
        (first.version_info.as_str(), first.response_nonce.as_str()),
        ("", "")
    );
    until("version 1 ACKed", async || !answers(&fake).is_empty()).await;
    let ack = &answers(&fake)[0];
    assert_eq!(ack.version_info, "1");
    assert_eq!(ack.response_nonce, "nonce-1");
    assert!(ack.error_detail.is_none());

    let v2 = push(&format!(
        "{}{}",
        deny_from("intruder"),
        deny_from("frontend")
    ));
    until("frontend denied by version 2", async || {
        !mesh.passes(&frontend).await
    })
    .await;
    until("version 2 ACKed", async || {
        answers(&fake)
            .iter()
            .any(|a| a.version_info == v2.to_string() && a.error_detail.is_none())
    })
    .await;

    // A document that does not validate: NACKed with the diagnostics,
    // naming its origin; version 2 keeps being enforced.
    let broken = mesh::authorization_policy(NS, "broken", "  action: DENY\n  rules: 7");
    let v3 = fake.push(&[
        ("mesh.yaml", &config(&mesh.ports, "")),
        ("broken.yaml", &broken),
    ]);
    let nack_of = async |v: u64| {
        let nonce = format!("nonce-{v}");
        until("the version NACKed", async || {
            answers(&fake).iter().any(|a| a.response_nonce == nonce)
        })
        .await;
        answers(&fake)
            .into_iter()
            .find(|a| a.response_nonce == nonce)
            .unwrap()
    };
    let nack = nack_of(v3).await;
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
    assert!(
        dump["config"]["error"]
            .as_str()
            .unwrap()
            .contains("broken.yaml"),
        "{dump}"
    );
    assert!(!mesh.passes(&frontend).await, "version 2 is still enforced");
    assert!(!mesh.passes(&intruder).await);

    // Valid resources without this proxy's WorkloadEntry: NACKed with the
    // proxy's reason.
    let v4 = fake.push(&[("mesh.yaml", &mesh::mesh_strict())]);
    let nack = nack_of(v4).await;
    assert_eq!(nack.version_info, v2.to_string());
    let error = nack.error_detail.expect("a NACK carries the error").message;
    assert!(
        error.contains("the proxy cannot apply it") && error.contains("orders"),
        "{error}"
    );
    assert!(!mesh.passes(&frontend).await, "version 2 is still enforced");

    // A good version after them applies.
    let v5 = push("");
    until("frontend allowed by version 5", async || {
        mesh.passes(&frontend).await
    })
    .await;
    assert!(mesh.passes(&intruder).await);
    until("version 5 ACKed", async || {
        answers(&fake)
            .iter()
            .any(|a| a.version_info == v5.to_string() && a.error_detail.is_none())
    })
    .await;
    assert_eq!(source(&proxy).await["config"]["state"], "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pushed_trust_bundle_replaces_the_roots_the_proxy_trusts() {
    let mesh = Mesh::with_plug_in_ca().await;
    let plane = mesh.plane().await;
    // A certificate for an hour: no renewal during the test.
    let mut o = mesh.options(&[plane.addr]);
    o.cert_ttl = Some(Duration::from_secs(3600));
    let proxy = mesh.start_proxy(o).await;
    let old_caller = mesh.caller("frontend");
    let new_root = NewRoot::generate(mesh.dir.path().join("new-ca"), false);
    let new_caller = write_workload(
        &new_root.ca,
        &mesh.dir.path().join("new-frontend"),
        "frontend",
    );
    assert!(mesh.passes(&old_caller).await);
    assert!(
        !mesh.passes(&new_caller).await,
        "an unknown root is refused"
    );
    let before = acked(&plane, None).await;

    // The new root joins root-cert.pem: the control plane pushes both.
    let old_pem = std::fs::read_to_string(mesh.dir.path().join("root-cert.pem")).unwrap();
    mesh.replace(
        &mesh.ca_dir().join(ROOT_CERT_FILE),
        format!("{old_pem}{}", new_root.pem).as_bytes(),
    );
    until("the new root trusted", async || {
        mesh.passes(&new_caller).await
    })
    .await;
    assert!(mesh.passes(&old_caller).await);
    assert_eq!(source(&proxy).await["certs"]["state"], "ok");
    let both = acked(&plane, Some(&before)).await;

    // The CA switched to the new root and the old root retired at once,
    // before this proxy was issued a certificate under the new one: the
    // pushed bundle would not verify the proxy's own certificate. NACKed,
    // saying so: the proxy keeps both roots, its peers keep working.
    mesh.install_ca_files(&new_root.dir, &[CERT_CHAIN_FILE, CA_KEY_FILE, CA_CERT_FILE]);
    mesh.replace(&mesh.ca_dir().join(ROOT_CERT_FILE), new_root.pem.as_bytes());
    until("the early retirement NACKed", async || {
        plane.connected().is_some_and(|p| p.last_nack.is_some())
    })
    .await;
    let p = plane.connected().unwrap();
    let nack = p.last_nack.unwrap();
    assert!(
        nack.error
            .contains("would not verify this proxy's own certificate"),
        "{}",
        nack.error
    );
    assert_eq!(p.version_acked.as_deref(), Some(both.as_str()));
    until("the refusal shown", async || {
        source(&proxy).await["config"]["state"] == "refused"
    })
    .await;
    assert!(mesh.passes(&old_caller).await);
    assert!(mesh.passes(&new_caller).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn it_fails_over_past_dead_addresses_and_to_the_other_replica_when_one_dies() {
    let mesh = Mesh::with_plug_in_ca().await;
    let dead = SocketAddr::from(([127, 0, 0, 1], free_port()));
    // Two replicas over the same plug-in CA and config directory.
    let a = mesh.plane().await;
    let b = mesh.plane().await;
    // Whichever address it starts at, it gets its certificate and
    // configuration.
    let proxy = mesh.proxy(&[dead, a.addr, b.addr]).await;
    let frontend = mesh.caller("frontend");
    assert!(mesh.passes(&frontend).await);

    // Kill the replica the stream is on: the proxy goes on serving and
    // follows the other one.
    until("the subscription recorded", async || {
        a.connected().is_some() || b.connected().is_some()
    })
    .await;
    let survivor = if a.connected().is_some() {
        a.stop();
        b
    } else {
        b.stop();
        a
    };
    assert!(mesh.passes(&frontend).await);
    mesh.serve(&deny_from("frontend"));
    until(
        "the policy pushed by the surviving replica enforced",
        async || !mesh.passes(&frontend).await,
    )
    .await;
    acked(&survivor, None).await;
    assert_eq!(source(&proxy).await["config"]["state"], "ok");
    // Failing over to a live replica is not an outage.
    let metrics = admin(&proxy, "/stats/prometheus").await;
    assert!(
        metrics.contains("meshward_config_source_lost_total{source=\"config\"} 0"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn it_keeps_serving_while_the_control_plane_is_down_and_resyncs_when_it_returns() {
    let mesh = Mesh::new().await;
    mesh.serve(&deny_from("intruder"));
    let plane = mesh.plane().await;
    let proxy = mesh.proxy(&[plane.addr]).await;
    let (frontend, intruder) = (mesh.caller("frontend"), mesh.caller("intruder"));
    assert!(mesh.passes(&frontend).await);

    let addr = plane.stop();
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

    // A change made while it was down reaches the proxy when it returns
    // (the same root, kept in its state directory).
    mesh.serve(&deny_from("frontend"));
    let back = mesh.plane_at(addr).await;
    until("resynced: the new policy enforced", async || {
        !mesh.passes(&frontend).await
    })
    .await;
    assert!(mesh.passes(&intruder).await);
    until("the config source ok again", async || {
        source(&proxy).await["config"]["state"] == "ok"
    })
    .await;
    acked(&back, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_token_is_shown_and_the_proxy_waits_for_a_good_one() {
    let mesh = Mesh::new().await;
    let plane = mesh.plane().await;
    // A token for the right identity, signed by another CA.
    let forged = meshward_control::token::mint(&other_ca(), NS, "orders", None).unwrap();
    let good = std::fs::read_to_string(mesh.dir.path().join("token")).unwrap();
    std::fs::write(mesh.dir.path().join("token"), &forged).unwrap();
    let mut feed = control::start(mesh.options(&[plane.addr])).unwrap();
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
    assert!(refused.1.contains("Unauthenticated"), "{}", refused.1);
    assert!(
        refused.1.contains("bootstrap token refused")
            && refused.1.contains("signature does not verify"),
        "{}",
        refused.1
    );
    let signature = forged.rsplit('.').next().unwrap();
    assert!(
        !refused.1.contains(signature),
        "the token is never shown: {}",
        refused.1
    );
    assert!(plane.metrics.authentication_failure_count.get() >= 1);
    assert!(plane.issued().is_empty());

    // The token file is read again on the next attempt.
    std::fs::write(mesh.dir.path().join("token"), good).unwrap();
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
    assert_eq!(got, orders_id());
    assert_eq!(plane.issued(), vec![("token".to_string(), orders_id())]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_options_fail_at_start_saying_what_is_wrong() {
    let mesh = Mesh::new().await;
    let addr = SocketAddr::from(([127, 0, 0, 1], 15012));
    let start = |o: ControlOptions| control::start(o).map(drop).unwrap_err();

    // A token of another namespace.
    let other = mesh.dir.path().join("other-token");
    std::fs::write(
        &other,
        meshward_control::token::mint(&mesh.ca, "staging", "orders", None).unwrap(),
    )
    .unwrap();
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
    let plane = mesh.plane().await;
    let mut o = mesh.options(&[plane.addr]);
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
    assert_eq!(
        plane.metrics.csr_count.get(),
        0,
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
    let plane = mesh.plane().await;
    let _proxy = mesh.proxy(&[plane.addr]).await;
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

/// The root rotation of DESIGN section 6, as the proxy lives it, driven
/// through the plug-in CA directory as an operator does: a new root added
/// to `root-cert.pem` (the bundle pushed grows); the signing CA replaced by
/// an intermediate under it (the running control plane reloads it and
/// re-issues its own certificate); certificates rotated; the old root
/// retired. A peer under the new CA talks to the proxy throughout without
/// a failed request; a peer still under the old root is refused at the
/// end; the proxy keeps renewing from the control plane, now verified by
/// the new root alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_root_rotation_reaches_the_proxy_without_a_failed_request() {
    use std::sync::atomic::{AtomicBool, Ordering};

    let mesh = Mesh::with_plug_in_ca().await;
    let plane = mesh.plane().await;
    let proxy = mesh.proxy(&[plane.addr]).await;
    let new_ca = NewRoot::generate(mesh.dir.path().join("new-ca"), true);
    let old_root = std::fs::read_to_string(mesh.dir.path().join("root-cert.pem")).unwrap();
    let both = mesh.dir.path().join("both-roots.pem");
    std::fs::write(&both, format!("{old_root}{}", new_ca.pem)).unwrap();
    let old_peer = mesh.caller("reports");
    let new_peer = write_workload(
        &new_ca.ca,
        &mesh.dir.path().join("new-frontend"),
        "frontend",
    );

    // 1. The new root joins the bundle.
    mesh.replace(
        &mesh.ca_dir().join(ROOT_CERT_FILE),
        format!("{old_root}{}", new_ca.pem).as_bytes(),
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

    // 2. The CA signs under the new root (the control plane picks the
    // directory up); the proxy renews under it.
    mesh.install_ca_files(&new_ca.dir, &[CERT_CHAIN_FILE, CA_KEY_FILE, CA_CERT_FILE]);
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
    mesh.replace(&mesh.ca_dir().join(ROOT_CERT_FILE), new_ca.pem.as_bytes());
    until("the old root's peers refused", async || {
        !mesh.passes_trusting(&old_peer, &both).await
    })
    .await;
    let before = plane.issued().len();
    until("a renewal after the retirement", async || {
        plane.issued().len() > before
    })
    .await;
    let dump = source(&proxy).await;
    assert_eq!(dump["certs"]["state"], "ok", "{dump}");
    assert_eq!(dump["config"]["state"], "ok", "{dump}");
    let p = plane.connected().unwrap();
    assert!(p.last_nack.is_none(), "{:?}", p.last_nack);

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
    let dead = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let live = mesh.plane().await;
    let mut o = mesh.options(&[dead, live.addr]);
    o.first_address = Some(0);
    let proxy = mesh.start_proxy(o).await;
    assert!(mesh.passes(&mesh.caller("frontend")).await);
    assert_eq!(
        live.issued().first(),
        Some(&("token".to_string(), orders_id()))
    );
    assert!(live.connected().is_some());
    let dump = source(&proxy).await;
    assert_eq!(dump["config"]["state"], "ok", "{dump}");
    assert_eq!(dump["certs"]["state"], "ok", "{dump}");
}

/// The proxy tells the control plane where its admin listener is bound
/// (an ephemeral port here): `/debug/connections` shows it with the
/// workload and identity, and the CLI reaches the proxy's debug endpoints
/// there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_plane_shows_where_each_proxy_s_admin_listener_is() {
    let mesh = Mesh::new().await;
    let plane = mesh.plane().await;
    let proxy = mesh.proxy(&[plane.addr]).await;
    acked(&plane, None).await;
    let bound = proxy.admin_addr().unwrap().to_string();
    let connections = || async {
        let (status, body) = get(plane.admin, "localhost", "/debug/connections", &[])
            .await
            .unwrap();
        assert_eq!(status, 200, "{body}");
        serde_json::from_str::<serde_json::Value>(&body).unwrap()
    };
    let shown = eventually("the admin address on /debug/connections", || async {
        let v = connections().await;
        let p = v["proxies"].as_array()?.first()?.clone();
        (p["admin"] == bound.as_str()).then_some(p)
    })
    .await;
    assert_eq!(shown["workload"], format!("{NS}/orders"), "{shown}");
    assert_eq!(shown["identity"], orders_id(), "{shown}");
    let (status, certs) = get(proxy.admin_addr().unwrap(), "admin", "/certs", &[])
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert!(certs.contains(&orders_id()), "{certs}");

    // The control plane's configuration, as served, loads back.
    let (status, body) = get(plane.admin, "localhost", "/debug/configz", &[])
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let served = meshward_control::Configz::from_json(&body)
        .unwrap()
        .load()
        .unwrap();
    assert!(
        served
            .config
            .workload_entries
            .iter()
            .any(|w| w.meta.namespace == NS && w.meta.name == "orders")
    );
}
