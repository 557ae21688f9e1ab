use std::net::SocketAddr;
use std::time::{Duration, Instant};

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::pool::{Origin, Pool, SWEEP_MIN, TARGET_TTL, Target, Targets, Upstream};
use super::route::{Shape, service, still_made};
use crate::snapshot::Snapshot;

/// An origin that names no route of any configuration.
fn origin_of(key: &str) -> Arc<Origin> {
    Arc::new(Origin {
        key: key.into(),
        host: "nowhere".into(),
        port_hint: None,
        endpoint: [127, 0, 0, 1].into(),
        spec: 0,
        version: 1,
    })
}

fn target(port: u16) -> Target {
    Target {
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        source: None,
        tls: None,
        h2: true,
        connect_timeout: Duration::from_secs(10),
        generation: 1,
    }
}

/// A TLS target whose client config is made by TLS state `generation`.
fn tls_target(generation: u64) -> Target {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let name =
        rustls_pki_types::ServerName::IpAddress(std::net::IpAddr::from([127, 0, 0, 1]).into());
    Target {
        tls: Some((Arc::new(config), name)),
        generation,
        ..target(443)
    }
}

/// The client config a key's target connects with.
fn config_of(t: &Targets, key: &str) -> Arc<rustls::ClientConfig> {
    Arc::clone(&t.get(key).unwrap().tls.unwrap().0)
}

#[test]
fn a_key_connects_with_the_newest_client_config_registered_for_it() {
    // A mesh key names no client config: after a certificate rotation,
    // the routes made from the new TLS state register the same key.
    let mut t = Targets::default();
    let origin = origin_of("k");
    let now = Instant::now();
    let before = tls_target(1);
    let after = tls_target(2);
    drop(t.register("k", &before, &origin, now));
    drop(t.register("k", &after, &origin, now));
    let newest = after.tls.as_ref().unwrap().0.clone();
    assert!(
        Arc::ptr_eq(&config_of(&t, "k"), &newest),
        "new connections would present the certificate of before the rotation"
    );
    // A request routed before the rotation that registers late does not
    // put the older config back.
    drop(t.register("k", &before, &origin, now));
    assert!(Arc::ptr_eq(&config_of(&t, "k"), &newest));
}

#[test]
fn connector_keys_unused_for_a_while_are_forgotten() {
    let mut t = Targets::default();
    let start = Instant::now();
    // A workload whose upstream keys keep changing: one new key every
    // second for an hour, the first one still in use all along.
    for i in 0..3600u16 {
        let now = start + Duration::from_secs(u64::from(i));
        t.register("steady", &target(1), &origin_of("steady"), now);
        t.register(&format!("k{i}"), &target(i), &origin_of("k"), now);
    }
    let now = start + Duration::from_secs(3599);
    // Only keys used within the TTL (and those added since the last
    // sweep) remain, and the steady one always does.
    assert!(t.by_key.len() < 2 * (TARGET_TTL.as_secs() as usize + 1) + SWEEP_MIN);
    assert_eq!(t.get("steady").map(|t| t.addr.port()), Some(1));
    assert_eq!(t.get("k3599").map(|t| t.addr.port()), Some(3599));
    assert!(t.get("k0").is_none(), "a key unused for an hour is kept");
    assert!(
        t.by_key
            .values()
            .all(|k| now.duration_since(k.used) < TARGET_TTL * 3),
        "stale keys survive sweeps"
    );
}

#[test]
fn a_small_set_of_keys_is_never_swept() {
    let mut t = Targets::default();
    let start = Instant::now();
    for i in 0..10u16 {
        t.register(&format!("k{i}"), &target(i), &origin_of("k"), start);
    }
    // Days later, a new key: the map is below the sweep size.
    t.register(
        "new",
        &target(99),
        &origin_of("new"),
        start + Duration::from_secs(86_400),
    );
    assert_eq!(t.by_key.len(), 11);
}

const MESH: &str = r#"
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: api
  namespace: prod
  annotations: {meshward.io/outbound: "127.0.0.1:15001"}
spec: {address: 127.0.0.1, labels: {app: api}, serviceAccount: api}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: orders, namespace: prod}
spec:
  hosts: [orders.prod.svc.cluster.local]
  ports: [{number: 80, name: http}]
  resolution: STATIC
  endpoints: [{address: 10.0.0.1}, {address: 10.0.0.2}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ratings, namespace: prod}
spec:
  hosts: [ratings.prod.svc.cluster.local]
  ports: [{number: 80, name: http}]
  resolution: STATIC
  endpoints: [{address: 10.0.0.9}]
"#;

/// A snapshot of `yaml` for the workload `prod/api`.
fn snapshot(yaml: &str, version: u64) -> Arc<Snapshot> {
    let mut loader = meshward_config::Loader::new();
    loader.add_source("test.yaml", yaml);
    let config = loader.finish().unwrap_or_else(|d| panic!("{d}")).config;
    let snap = Snapshot::build(
        Arc::new(config),
        "prod/api",
        version,
        &crate::jwt::JwksStore::default(),
        &crate::dns::DnsStore::default(),
    )
    .unwrap();
    Arc::new(snap)
}

/// The origins of the routes `snap` makes for `host`, one per endpoint,
/// as `Outbound::prepare` makes them (plaintext: no client config).
fn origins(snap: &Snapshot, host: &str) -> Vec<Arc<Origin>> {
    let (svc, port, endpoints) = service(snap, host, None).unwrap();
    endpoints
        .iter()
        .map(|ep| {
            let shape = Shape::of(snap, host, svc, port, ep).unwrap();
            Arc::new(Origin {
                key: format!("m{:016x}.mesh:{}", shape.key.0, shape.addr.port()).into(),
                host: host.into(),
                port_hint: None,
                endpoint: ep.address,
                spec: shape.key.0,
                version: snap.version,
            })
        })
        .collect()
}

const ORDERS: &str = "orders.prod.svc.cluster.local";
const RATINGS: &str = "ratings.prod.svc.cluster.local";

#[test]
fn a_route_is_still_made_only_while_its_service_endpoint_and_settings_are() {
    let before = snapshot(MESH, 1);
    let [one, two] = <[Arc<Origin>; 2]>::try_from(origins(&before, ORDERS)).unwrap();
    let ratings = origins(&before, RATINGS).remove(0);
    assert!(still_made(&before, &one) && still_made(&before, &two));
    // An unrelated change (another service's endpoint) keeps them.
    let same = snapshot(&MESH.replace("10.0.0.9", "10.0.0.8"), 2);
    assert!(still_made(&same, &one) && still_made(&same, &two));
    assert!(!still_made(&same, &ratings), "ratings' endpoint has gone");
    // One endpoint of orders gone: its route goes, the other's stays.
    let churned = snapshot(&MESH.replace("{address: 10.0.0.1}, ", ""), 3);
    assert!(!still_made(&churned, &one));
    assert!(still_made(&churned, &two));
    // The service gone: all its routes go.
    let cut = MESH
        .find(
            "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: orders",
        )
        .unwrap();
    let rest = &MESH[cut..];
    let end = rest[4..].find("---").unwrap() + 4;
    let without = format!("{}{}", &MESH[..cut], &rest[end..]);
    let gone = snapshot(&without, 4);
    assert!(!still_made(&gone, &one) && !still_made(&gone, &two));
    assert!(still_made(&gone, &ratings));
    // Same endpoint, new settings (port): the old key is not made any more.
    let moved = snapshot(&MESH.replace("[{number: 80, name: http}]\n  resolution: STATIC\n  endpoints: [{address: 10.0.0.1}", "[{number: 80, name: http, targetPort: 8080}]\n  resolution: STATIC\n  endpoints: [{address: 10.0.0.1}"), 5);
    assert!(!still_made(&moved, &one));
}

#[test]
fn targets_of_routes_gone_are_forgotten_unless_a_request_holds_them() {
    let before = snapshot(MESH, 1);
    let orders = origins(&before, ORDERS);
    let ratings = origins(&before, RATINGS).remove(0);
    let mut t = Targets::default();
    let now = Instant::now();
    let idle = [&orders[0], &ratings].map(|o| {
        drop(t.register(&o.key, &target(80), o, now));
        o.key.clone()
    });
    // A request registered orders' second endpoint and has not connected
    // yet when the configuration changes.
    let in_flight = t.register(&orders[1].key, &target(80), &orders[1], now);
    let after = snapshot(&MESH.replace("orders.prod", "payments.prod"), 2);
    let mut keep = |o: &Arc<Origin>| still_made(&after, o);
    assert_eq!(t.retain(&mut keep), 1, "orders' idle key is forgotten");
    assert!(t.get(&idle[0]).is_none());
    assert!(t.get(&idle[1]).is_some(), "ratings is still configured");
    assert!(
        t.get(&orders[1].key).is_some(),
        "the request in flight can still connect"
    );
    drop(in_flight);
    assert_eq!(t.retain(&mut keep), 1, "once done, its key goes too");
    assert!(t.get(&orders[1].key).is_none());
    assert_eq!(t.by_key.len(), 1);
}

/// A connected pair: the proxy's upstream end and the server's end.
async fn pair() -> (Upstream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (up, server) = tokio::join!(TcpStream::connect(l.local_addr().unwrap()), l.accept());
    (Upstream::Plain(up.unwrap(), false), server.unwrap().0)
}

#[tokio::test]
async fn idle_connections_of_routes_gone_are_closed_and_one_in_use_carries_on() {
    let before = snapshot(MESH, 1);
    let orders = origins(&before, ORDERS).remove(0);
    let ratings = origins(&before, RATINGS).remove(0);
    let pool = Pool::default();
    let (idle_up, mut idle_server) = pair().await;
    let (kept_up, _kept_server) = pair().await;
    pool.checkin(&orders, idle_up, |_| true);
    pool.checkin(&ratings, kept_up, |_| true);
    // Another orders connection is carrying a request (checked out).
    let (busy_up, mut busy_server) = pair().await;
    pool.checkin(&orders, busy_up, |_| true);
    let mut busy = pool.checkout(&orders.key).unwrap();
    assert_eq!(pool.idle_count(), 2);

    let after = snapshot(&MESH.replace("orders.prod", "payments.prod"), 2);
    let mut keep = |o: &Arc<Origin>| still_made(&after, o);
    assert_eq!(pool.retain(&mut keep), 1, "orders' idle connection");
    assert_eq!(pool.idle_count(), 1, "ratings' stays");
    assert!(pool.checkout(&orders.key).is_none());
    let mut b = [0u8; 1];
    assert_eq!(idle_server.read(&mut b).await.unwrap(), 0, "closed");

    // The request in flight is not disturbed: its connection still works.
    busy.write_all(b"x").await.unwrap();
    busy_server.read_exact(&mut b).await.unwrap();
    busy_server.write_all(b"y").await.unwrap();
    busy.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"y");
    // Returned once the request is done, it is closed, not pooled: its
    // route has gone.
    pool.checkin(&orders, busy, |o| still_made(&after, o));
    assert_eq!(pool.idle_count(), 1);
    assert_eq!(busy_server.read(&mut b).await.unwrap(), 0, "closed");
}

/// A drain closes every idle pooled connection at once (its server sees
/// the end), whatever its route.
#[tokio::test]
async fn a_drain_closes_every_idle_connection() {
    let snap = snapshot(MESH, 1);
    let orders = origins(&snap, ORDERS).remove(0);
    let ratings = origins(&snap, RATINGS).remove(0);
    let pool = Pool::default();
    let (a, mut a_server) = pair().await;
    let (b, mut b_server) = pair().await;
    pool.checkin(&orders, a, |_| true);
    pool.checkin(&ratings, b, |_| true);
    assert_eq!(pool.clear(), 2);
    assert_eq!(pool.idle_count(), 0);
    let mut byte = [0u8; 1];
    assert_eq!(a_server.read(&mut byte).await.unwrap(), 0, "closed");
    assert_eq!(b_server.read(&mut byte).await.unwrap(), 0, "closed");
}
