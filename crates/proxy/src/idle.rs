//! Idle timeouts. Like Envoy's defaults in an Istio sidecar, a downstream
//! HTTP connection with no request in flight, and a TCP connection with no
//! bytes in either direction, is closed after [`DEFAULT_IDLE_TIMEOUT`]
//! (one hour; `meshward proxy --idle-timeout`). An HTTP/2 connection is
//! shut down gracefully (GOAWAY, then close).
//!
//! Each connection registers one timer, re-armed only when it fires early
//! (at most once per timeout period). What remains per request is a clock
//! read and a poll of that timer: about 55 instructions in the
//! server-side proxy (`docs/PERFORMANCE.md`).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Envoy's default idle timeout for HTTP and TCP connections.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

/// The longest idle timeout: a year is "never" for a connection, and the
/// bound keeps every deadline computed from it representable. Longer
/// values are refused by the CLI and cut to this by [`crate::start`].
pub const MAX_IDLE_TIMEOUT: Duration = Duration::from_secs(365 * 86_400);

/// The access-log reason for a TCP connection closed after `timeout` idle
/// ([`crate::outcome::Close::IdleTimeout`]).
pub fn idle_reason(timeout: Duration) -> String {
    crate::outcome::Close::idle(timeout)
}

/// The idle timer of one connection that waits for requests.
#[derive(Debug)]
pub struct IdleTimer {
    timeout: Duration,
    sleep: Pin<Box<Sleep>>,
}

impl IdleTimer {
    pub fn new(timeout: Duration) -> IdleTimer {
        IdleTimer {
            timeout,
            sleep: Box::pin(tokio::time::sleep(timeout)),
        }
    }

    /// Runs `fut` (waiting for the next request); `None` when it has not
    /// finished `timeout` after the call began.
    pub async fn wait<F: Future>(&mut self, fut: F) -> Option<F::Output> {
        let due = Instant::now() + self.timeout;
        let mut fut = std::pin::pin!(fut);
        loop {
            tokio::select! {
                biased;
                out = &mut fut => return Some(out),
                () = self.sleep.as_mut() => {
                    // Armed for an earlier wait: re-arm for this one.
                    if Instant::now() >= due {
                        return None;
                    }
                    self.sleep.as_mut().reset(due);
                }
            }
        }
    }
}

/// When a connection last carried bytes (or, for [`Streams`], last ended a
/// request). Shared by the [`Counted`] streams of both sides of a TCP
/// connection and [`Activity::idle`].
#[derive(Debug)]
pub struct Activity {
    start: Instant,
    /// Milliseconds after `start` of the last read that returned bytes.
    last_ms: AtomicU64,
}

impl Activity {
    pub fn new() -> Arc<Activity> {
        Arc::new(Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        })
    }

    fn touch(&self) {
        let ms = self
            .start
            .elapsed()
            .as_millis()
            .try_into()
            .unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }

    /// Completes once no bytes have moved for `timeout`.
    pub async fn idle(&self, timeout: Duration) {
        loop {
            let due = self.last() + timeout;
            if Instant::now() >= due {
                return;
            }
            tokio::time::sleep_until(due).await;
        }
    }
}

/// The requests in flight on one connection served by hyper (HTTP/2, or
/// HTTP/1.x to an HTTP/2 application), and when the last one ended. A
/// request is in flight from its head until its response body is done.
#[derive(Debug)]
pub struct Streams {
    open: AtomicU64,
    activity: Arc<Activity>,
}

impl Streams {
    pub fn new() -> Arc<Streams> {
        Arc::new(Streams {
            open: AtomicU64::new(0),
            activity: Activity::new(),
        })
    }

    /// A request begins; it ends when the guard (or the body it wraps) is
    /// dropped.
    pub fn start(self: &Arc<Self>) -> StreamGuard {
        self.open.fetch_add(1, Ordering::Relaxed);
        StreamGuard(Arc::clone(self))
    }

    /// Completes once no request has been in flight for `timeout`.
    pub async fn idle(&self, timeout: Duration) {
        loop {
            let due = if self.open.load(Ordering::Relaxed) == 0 {
                let due = self.activity.last() + timeout;
                if Instant::now() >= due {
                    return;
                }
                due
            } else {
                Instant::now() + timeout
            };
            tokio::time::sleep_until(due).await;
        }
    }
}

/// One request in flight on a [`Streams`] connection.
#[derive(Debug)]
pub struct StreamGuard(Arc<Streams>);

impl StreamGuard {
    /// The response body, holding the request in flight until it is done.
    pub fn hold<B>(self, body: B) -> Held<B> {
        Held { body, _guard: self }
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.activity.touch();
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A response body that keeps its request in flight (see [`Streams`]).
#[derive(Debug)]
pub struct Held<B> {
    body: B,
    _guard: StreamGuard,
}

impl<B: http_body::Body + Unpin> http_body::Body for Held<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// A stream that counts the bytes read from it and records the time of
/// each read in its connection's [`Activity`].
#[derive(Debug)]
pub struct Counted<S> {
    inner: S,
    activity: Arc<Activity>,
    read: u64,
}

impl<S> Counted<S> {
    pub fn new(inner: S, activity: &Arc<Activity>) -> Counted<S> {
        Counted {
            inner,
            activity: Arc::clone(activity),
            read: 0,
        }
    }

    /// Bytes read so far.
    pub fn bytes_read(&self) -> u64 {
        self.read
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.read += n as u64;
            self.activity.touch();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const T: Duration = Duration::from_secs(3600);

    #[tokio::test(start_paused = true)]
    async fn a_wait_ends_one_timeout_after_it_began() {
        let mut idle = IdleTimer::new(T);
        // Forty minutes of work before the first wait: the timer armed at
        // creation fires early and is re-armed for the wait.
        tokio::time::sleep(Duration::from_secs(40 * 60)).await;
        let began = Instant::now();
        assert_eq!(idle.wait(std::future::pending::<()>()).await, None);
        assert_eq!(began.elapsed(), T);
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_that_finishes_returns_its_output() {
        let mut idle = IdleTimer::new(T);
        let out = idle
            .wait(async {
                tokio::time::sleep(T - Duration::from_secs(1)).await;
                7
            })
            .await;
        assert_eq!(out, Some(7));
        // The next wait gets a full timeout of its own.
        let began = Instant::now();
        assert_eq!(idle.wait(std::future::pending::<()>()).await, None);
        assert_eq!(began.elapsed(), T);
    }

    #[tokio::test(start_paused = true)]
    async fn traffic_either_way_postpones_the_tcp_timeout() {
        let activity = Activity::new();
        let (a, mut a_peer) = tokio::io::duplex(64);
        let (b, mut b_peer) = tokio::io::duplex(64);
        let mut a = Counted::new(a, &activity);
        let mut b = Counted::new(b, &activity);
        let began = Instant::now();
        let traffic = async {
            let mut byte = [0u8; 1];
            tokio::time::sleep(T / 2).await;
            a_peer.write_all(b"x").await.unwrap();
            a.read_exact(&mut byte).await.unwrap();
            tokio::time::sleep(T / 2).await;
            b_peer.write_all(b"yz").await.unwrap();
            b.read_exact(&mut [0u8; 2]).await.unwrap();
            std::future::pending::<()>().await
        };
        tokio::select! {
            () = activity.idle(T) => {}
            () = traffic => unreachable!(),
        }
        // Idle one full timeout after the last bytes, which moved at T.
        assert_eq!(began.elapsed(), T * 2);
        assert_eq!((a.bytes_read(), b.bytes_read()), (1, 2));
    }

    #[tokio::test(start_paused = true)]
    async fn an_http2_connection_is_idle_once_no_request_has_been_in_flight_for_the_timeout() {
        let streams = Streams::new();
        let began = Instant::now();
        // A request that lasts 90 minutes (a long gRPC stream), its
        // response body held until the end; then nothing.
        let guard = streams.start();
        let body = guard.hold(http_body_util::Empty::<bytes::Bytes>::new());
        let request = async {
            tokio::time::sleep(T + T / 2).await;
            drop(body);
            std::future::pending::<()>().await
        };
        tokio::select! {
            () = streams.idle(T) => {}
            () = request => unreachable!(),
        }
        assert_eq!(began.elapsed(), T + T / 2 + T);
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_tcp_connection_is_idle_after_one_timeout() {
        let activity = Activity::new();
        let began = Instant::now();
        activity.idle(T).await;
        assert_eq!(began.elapsed(), T);
    }
}
