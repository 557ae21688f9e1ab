use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::pool::{SWEEP_MIN, TARGET_TTL, Target, Targets};

fn target(port: u16) -> Target {
    Target {
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        tls: None,
        h2: true,
        connect_timeout: Duration::from_secs(10),
    }
}

#[test]
fn connector_keys_unused_for_a_while_are_forgotten() {
    let mut t = Targets::default();
    let start = Instant::now();
    // A workload whose upstream keys keep changing: one new key every
    // second for an hour, the first one still in use all along.
    for i in 0..3600u16 {
        let now = start + Duration::from_secs(u64::from(i));
        t.register("steady", &target(1), now);
        t.register(&format!("k{i}"), &target(i), now);
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
            .all(|(_, used)| now.duration_since(*used) < TARGET_TTL * 3),
        "stale keys survive sweeps"
    );
}

#[test]
fn a_small_set_of_keys_is_never_swept() {
    let mut t = Targets::default();
    let start = Instant::now();
    for i in 0..10u16 {
        t.register(&format!("k{i}"), &target(i), start);
    }
    // Days later, a new key: the map is below the sweep size.
    t.register("new", &target(99), start + Duration::from_secs(86_400));
    assert_eq!(t.by_key.len(), 11);
}
