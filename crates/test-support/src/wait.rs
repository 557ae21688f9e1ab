//! Bounded waits: every loop here ends after a deadline, so a test that
//! waits for something that never happens fails with what it waited for
//! instead of hanging.

use std::future::Future;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::time::{Duration, Instant};

/// How long readiness and eventual-consistency waits may take
/// (`MESHWARD_TEST_PATIENCE_SECS`, default 20).
pub fn patience() -> Duration {
    Duration::from_secs(
        std::env::var("MESHWARD_TEST_PATIENCE_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(20),
    )
}

/// Polls `check` until it returns `Some`, or panics with `what` after
/// [`patience`].
pub async fn eventually<T, F, Fut>(what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    match within(patience(), check).await {
        Some(v) => v,
        None => panic!("timed out waiting for: {what}"),
    }
}

/// Polls `check` (backing off from 10 to 200 ms) until it returns `Some`
/// or `limit` has passed (`None`).
pub async fn within<T, F, Fut>(limit: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    let mut delay = Duration::from_millis(10);
    loop {
        if let Some(v) = check().await {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(200));
    }
}

/// Waits until something accepts TCP connections on `addr`.
pub async fn for_port(addr: SocketAddr, limit: Duration) -> Result<(), String> {
    within(limit, || async {
        tokio::net::TcpStream::connect(addr).await.ok().map(drop)
    })
    .await
    .ok_or_else(|| format!("nothing listens on {addr} after {limit:?}"))
}

/// Waits until `GET path` on the admin address answers 200. `admin` is
/// asked on every attempt (an Envoy writes its address to a file once it
/// has bound it); `alive` fails the wait at once when the process behind
/// it has exited. The error says what the last attempt saw.
pub async fn for_admin_ready(
    mut admin: impl FnMut() -> Option<SocketAddr>,
    path: &str,
    limit: Duration,
    poll: Duration,
    mut alive: impl FnMut() -> Result<(), String>,
) -> Result<(), String> {
    let attempts = (limit.as_secs_f64() / poll.as_secs_f64()).ceil().max(1.0) as u32;
    let mut last = "no admin address yet".to_owned();
    for _ in 0..attempts {
        alive()?;
        if let Some(addr) = admin() {
            match tokio::time::timeout(
                Duration::from_secs(1),
                crate::http::get(addr, "admin", path, &[]),
            )
            .await
            {
                Ok(Some((200, _))) => return Ok(()),
                Ok(Some((status, _))) => last = format!("{path} returned {status}"),
                Ok(None) => last = format!("GET {path} on {addr} failed"),
                Err(_) => last = format!("GET {path} on {addr} timed out"),
            }
        }
        tokio::time::sleep(poll).await;
    }
    Err(format!("not ready after {limit:?} ({last})"))
}

/// A free port on 127.0.0.1 for configuration that must name one.
///
/// Ports come from below the kernel's ephemeral range (32768+), so a port
/// handed out here cannot be taken meanwhile by a socket bound to port 0 or
/// by an outgoing connection; a per-process counter (offset by the process
/// id) keeps the tests of one binary apart, and each port is checked free.
pub fn free_port() -> u16 {
    free_ports(1).expect("a free port between 20000 and 32000")[0]
}

/// `n` distinct free ports (see [`free_port`]); `Err` when fewer are free.
pub fn free_ports(n: usize) -> Result<Vec<u16>, String> {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let base = 20_000 + (std::process::id() % 500) as u16 * 20;
    let mut ports = Vec::with_capacity(n);
    for _ in 0..12_000 {
        if ports.len() == n {
            break;
        }
        let offset = NEXT.fetch_add(1, Ordering::Relaxed) % 12_000;
        let port = 20_000 + (base - 20_000 + offset) % 12_000;
        if StdListener::bind(("127.0.0.1", port)).is_ok() {
            ports.push(port);
        }
    }
    if ports.len() == n {
        Ok(ports)
    } else {
        Err(format!(
            "no {n} free loopback ports between 20000 and 32000"
        ))
    }
}
