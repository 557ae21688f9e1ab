//! `Proxy::drain` in process, as a caller other than the CLI uses it:
//! the inbound listeners stop accepting (the outbound ones go on, as in
//! Istio's inbound-only drain), readiness says `draining`, an open TCP
//! connection carries bytes until the deadline and is cut then, and the
//! report says what happened. (The HTTP behaviours, with real processes
//! and signals: `crates/cli/tests/drain.rs`.)

mod support;

use std::time::Instant;

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_refuses_new_connections_and_cuts_open_ones_at_the_deadline() {
    let h = Harness::start("").await;
    let frontend = h.issue("frontend");
    let mut open = h.connect_as(&frontend).await;
    echo_back(&mut open, "before").await.unwrap();
    let admin = h.proxy.admin_addr().unwrap();
    let (inbound, outbound) = (h.inbound, h.outbound);
    let Harness { proxy, .. } = h;

    let deadline = Duration::from_secs(3);
    let started = Instant::now();
    let drain = tokio::spawn(proxy.drain(deadline));
    eventually("the inbound listener closed", || async {
        tokio::net::TcpStream::connect(inbound)
            .await
            .is_err()
            .then_some(())
    })
    .await;
    // The application may still call out while it finishes its requests.
    tokio::net::TcpStream::connect(outbound)
        .await
        .expect("the outbound listener keeps accepting during the drain");
    let (status, body) = get(admin, "admin", "/healthz/ready", &[]).await.unwrap();
    assert_eq!((status, body.as_str()), (503, "not ready: draining\n"));
    // The open connection carries bytes until the deadline.
    echo_back(&mut open, "during").await.unwrap();
    assert!(started.elapsed() < deadline, "too slow to tell");

    let drained = tokio::time::timeout(patience(), drain)
        .await
        .expect("the drain ends after its deadline")
        .unwrap();
    assert!(drained.open_at_start >= 1, "{drained:?}");
    assert_eq!(drained.cut, 1, "{drained:?}");
    assert!(drained.elapsed >= deadline, "{drained:?}");
    assert!(closed(&mut open).await, "cut at the deadline");
}

/// With nothing open a drain returns at once; a configuration change
/// applied after it binds no listener again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_with_nothing_open_returns_at_once_and_listeners_stay_closed() {
    let h = Harness::start("").await;
    let admin = h.proxy.admin_addr().unwrap();
    let (ports, inbound) = (h.ports(), h.inbound);
    let Harness { proxy, source, .. } = h;
    let drained = tokio::time::timeout(patience(), proxy.drain(Duration::from_secs(3600)))
        .await
        .expect("nothing to wait for");
    assert_eq!((drained.open_at_start, drained.cut), (0, 0), "{drained:?}");

    let version = || async move {
        let (_, body) = get(admin, "admin", "/config_dump", &[]).await.unwrap();
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["version"]
            .as_u64()
            .unwrap()
    };
    // Two changes one after the other: the applier reconciles the
    // listeners after it swaps the first in, and before it takes the
    // second.
    for sa in ["intruder", "stranger"] {
        let before = version().await;
        source
            .push_yaml(&[("mesh.yaml", &config(&ports, &deny_from(sa)))])
            .unwrap();
        eventually("the change applied", || async move {
            (version().await > before).then_some(())
        })
        .await;
    }
    assert!(
        tokio::net::TcpStream::connect(inbound).await.is_err(),
        "a listener was bound again"
    );
}
