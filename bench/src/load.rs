//! The load generator: hyper HTTP/1.1 clients on the caller's tokio
//! runtime (the harness runs it on a single-threaded runtime on the main
//! thread). Three shapes:
//!
//! - [`fixed_rate`]: open loop at a constant rate over a fixed pool of
//!   keep-alive connections. Connection `j` of `C` sends requests
//!   `j, j+C, j+2C, ...` at their intended times `i / rate` (as wrk2 does).
//!   Latency is charged from the intended send time whenever the connection
//!   was still busy with the previous response then (no coordinated
//!   omission); when the connection was free, it is charged from the actual
//!   send time, so that the tokio timer's ~1 ms granularity is not counted
//!   as proxy latency.
//! - [`max_throughput`]: closed loop, N keep-alive connections each sending
//!   back to back.
//! - [`no_keepalive`]: open loop at a constant rate, each request on a new
//!   TCP connection with `Connection: close` (connection setup cost).
//!
//! Every loop is bounded by the run's duration plus a drain timeout, and
//! every request by a timeout.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep_until, timeout};

/// Where and how requests are sent.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    /// `Host` header value.
    pub host: String,
    pub request_timeout: Duration,
    /// Body length every response must have.
    pub body_len: usize,
}

/// What one run measured.
#[derive(Debug)]
pub struct LoadResult {
    /// Successful (2xx, full body) responses within the window.
    pub ok: u64,
    /// Failed requests: I/O errors, timeouts, non-2xx, short bodies.
    pub errors: u64,
    /// Requests the open-loop generator could not start (in-flight cap).
    pub dropped: u64,
    pub elapsed: Duration,
    /// Latency in nanoseconds, successful requests only.
    pub hist: Histogram<u64>,
    pub first_error: Option<String>,
}

impl LoadResult {
    pub(crate) fn new() -> Self {
        Self {
            ok: 0,
            errors: 0,
            dropped: 0,
            elapsed: Duration::ZERO,
            hist: new_hist(),
            first_error: None,
        }
    }

    fn merge(&mut self, other: LoadResult) {
        self.ok += other.ok;
        self.errors += other.errors;
        self.dropped += other.dropped;
        // Both histograms share the same bounds, so adding cannot fail.
        let _ = self.hist.add(&other.hist);
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }

    fn record(&mut self, outcome: Result<()>, latency: Duration) {
        match outcome {
            Ok(()) => {
                self.ok += 1;
                let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
                self.hist.saturating_record(ns.max(1));
            }
            Err(e) => {
                self.errors += 1;
                if self.first_error.is_none() {
                    self.first_error = Some(format!("{e:#}"));
                }
            }
        }
    }

    pub fn rps(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// A latency quantile in microseconds.
    pub fn quantile_us(&self, q: f64) -> f64 {
        self.hist.value_at_quantile(q) as f64 / 1000.0
    }
}

fn new_hist() -> Histogram<u64> {
    // 1 ns .. 100 s, 3 significant digits: the bounds are constant and valid.
    Histogram::new_with_bounds(1, 100_000_000_000, 3).expect("valid histogram bounds")
}

type Sender = SendRequest<Empty<Bytes>>;

async fn connect(addr: SocketAddr) -> Result<Sender> {
    let stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// Sends one request and reads the whole response.
async fn send(sender: &mut Sender, t: &Target, method: Method, close: bool) -> Result<StatusCode> {
    sender.ready().await?;
    let mut req = Request::builder()
        .method(method)
        .uri("/bench")
        .header(header::HOST, &t.host);
    if close {
        req = req.header(header::CONNECTION, "close");
    }
    let resp = sender.send_request(req.body(Empty::new())?).await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    if status.is_success() && body.len() != t.body_len {
        bail!("short body: {} of {} bytes", body.len(), t.body_len);
    }
    Ok(status)
}

fn expect_success(status: StatusCode) -> Result<()> {
    if status.is_success() {
        Ok(())
    } else {
        bail!("HTTP status {status}")
    }
}

/// One request on a new connection (readiness probes and policy checks).
pub async fn one_shot(t: &Target, method: Method) -> Result<StatusCode> {
    timeout(t.request_timeout, async {
        let mut s = connect(t.addr).await?;
        send(&mut s, t, method, true).await
    })
    .await
    .context("request timed out")?
}

/// Open loop at `rate` requests/s over `conns` keep-alive connections.
pub async fn fixed_rate(
    t: &Target,
    rate: u32,
    conns: usize,
    duration: Duration,
) -> Result<LoadResult> {
    let conns = conns.max(1);
    let total = (f64::from(rate) * duration.as_secs_f64()).round() as u64;
    let per_req = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
    let mut senders = Vec::with_capacity(conns);
    for _ in 0..conns {
        senders.push(connect(t.addr).await?);
    }
    // Drain: requests still in flight this long after the window are failed.
    let start = Instant::now() + Duration::from_millis(5);
    let hard_end = start + duration + t.request_timeout;
    let mut set = JoinSet::new();
    for (j, mut sender) in senders.into_iter().enumerate() {
        let t = t.clone();
        set.spawn(async move {
            let mut res = LoadResult::new();
            let mut prev_done = start;
            let mut i = j as u64;
            while i < total {
                let intended = start + per_req * u32::try_from(i).unwrap_or(u32::MAX);
                if Instant::now() >= hard_end {
                    res.errors += total.saturating_sub(i).div_ceil(conns as u64);
                    break;
                }
                sleep_until(intended).await;
                let sent = Instant::now();
                // Busy connection at the intended time: the wait is the
                // system's fault and is charged; otherwise the timer's
                // lateness is ours and is not.
                let charged_from = if prev_done > intended { intended } else { sent };
                let outcome = timeout(t.request_timeout, send(&mut sender, &t, Method::GET, false))
                    .await
                    .context("request timed out")
                    .and_then(|r| r.and_then(expect_success));
                let done = Instant::now();
                let failed = outcome.is_err();
                res.record(outcome, done - charged_from);
                prev_done = done;
                if failed {
                    match connect(t.addr).await {
                        Ok(s) => sender = s,
                        Err(e) => {
                            res.record(Err(e), Duration::ZERO);
                            break;
                        }
                    }
                }
                i += conns as u64;
            }
            res
        });
    }
    let mut out = LoadResult::new();
    while let Some(r) = set.join_next().await {
        out.merge(r.context("load task panicked")?);
    }
    out.elapsed = duration;
    Ok(out)
}

/// Closed loop: `conns` keep-alive connections, each sending back to back
/// for `duration`.
pub async fn max_throughput(t: &Target, conns: usize, duration: Duration) -> Result<LoadResult> {
    let mut senders = Vec::with_capacity(conns);
    for _ in 0..conns.max(1) {
        senders.push(connect(t.addr).await?);
    }
    let start = Instant::now();
    let end = start + duration;
    let mut set = JoinSet::new();
    for mut sender in senders {
        let t = t.clone();
        set.spawn(async move {
            let mut res = LoadResult::new();
            while Instant::now() < end {
                let sent = Instant::now();
                let outcome = timeout(t.request_timeout, send(&mut sender, &t, Method::GET, false))
                    .await
                    .context("request timed out")
                    .and_then(|r| r.and_then(expect_success));
                let done = Instant::now();
                if done > end && outcome.is_ok() {
                    break; // completed outside the window: not counted
                }
                let failed = outcome.is_err();
                res.record(outcome, done - sent);
                if failed {
                    match connect(t.addr).await {
                        Ok(s) => sender = s,
                        Err(e) => {
                            res.record(Err(e), Duration::ZERO);
                            break;
                        }
                    }
                }
            }
            res
        });
    }
    let mut out = LoadResult::new();
    while let Some(r) = set.join_next().await {
        out.merge(r.context("load task panicked")?);
    }
    out.elapsed = duration;
    Ok(out)
}

/// Open loop at `rate` requests/s, each on a new connection with
/// `Connection: close`. At most `max_in_flight` requests are outstanding;
/// beyond that a request is counted as dropped rather than queued.
pub async fn no_keepalive(
    t: &Target,
    rate: u32,
    duration: Duration,
    max_in_flight: usize,
) -> Result<LoadResult> {
    let total = (f64::from(rate) * duration.as_secs_f64()).round() as u64;
    let per_req = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
    let start = Instant::now() + Duration::from_millis(5);
    let mut out = LoadResult::new();
    let mut set: JoinSet<(Result<()>, Duration)> = JoinSet::new();
    let mut i = 0u64;
    while i < total {
        let next = start + per_req * u32::try_from(i).unwrap_or(u32::MAX);
        tokio::select! {
            biased;
            Some(r) = set.join_next(), if !set.is_empty() => {
                let (outcome, lat) = r.context("load task panicked")?;
                out.record(outcome, lat);
            }
            _ = sleep_until(next) => {
                i += 1;
                if set.len() >= max_in_flight {
                    out.dropped += 1;
                    continue;
                }
                let t = t.clone();
                set.spawn(async move {
                    let sent = Instant::now();
                    let outcome = one_shot(&t, Method::GET).await.and_then(expect_success);
                    (outcome, sent.elapsed())
                });
            }
        }
    }
    // Every task carries its own request timeout, so this drain is bounded.
    while let Some(r) = set.join_next().await {
        let (outcome, lat) = r.context("load task panicked")?;
        out.record(outcome, lat);
    }
    out.elapsed = duration;
    Ok(out)
}
