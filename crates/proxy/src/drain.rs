//! Draining on shutdown, as Istio's sidecar does on SIGTERM
//! (`terminationDrainDuration`): the listeners stop accepting, every open
//! connection is told to finish (HTTP/2: GOAWAY; HTTP/1.1: `Connection:
//! close` on its next response, and closed at once when idle), requests in
//! flight and TCP connections run on until the deadline, and what is left
//! then is cut.
//!
//! One signal carries all of it: every accepted data-plane connection runs
//! under a [`Guard`], which counts it as open and cuts it at the deadline;
//! the HTTP serving loops ask [`Drain::is_draining`] when they write a
//! response head and wait on [`Drain::draining`] while idle.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::watch;

/// Where the proxy is in its shutdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Serving,
    /// Connections are finishing; no new ones are accepted.
    Draining,
    /// The deadline has passed: what is still open is cut.
    Closing,
}

/// The drain signal of one proxy. Cloning it is cheap; all clones share
/// one signal.
#[derive(Debug, Clone)]
pub struct Drain {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    phase: watch::Sender<Phase>,
    /// Connections running under a [`Guard`].
    open: AtomicUsize,
}

impl Default for Drain {
    fn default() -> Self {
        Drain::new()
    }
}

impl Drain {
    pub fn new() -> Drain {
        Drain {
            inner: Arc::new(Inner {
                phase: watch::Sender::new(Phase::Serving),
                open: AtomicUsize::new(0),
            }),
        }
    }

    /// Registers an accepted connection: it counts as open until the
    /// guard (or the future [`Guard::run`] made of it) is dropped.
    pub fn guard(&self) -> Guard {
        self.inner.open.fetch_add(1, Ordering::Relaxed);
        Guard {
            rx: self.inner.phase.subscribe(),
            inner: Arc::clone(&self.inner),
        }
    }

    /// Whether the drain has begun: responses close their connection.
    pub fn is_draining(&self) -> bool {
        *self.inner.phase.borrow() != Phase::Serving
    }

    /// Completes once the drain has begun.
    pub async fn draining(&self) {
        let mut rx = self.inner.phase.subscribe();
        // An error means the sender is gone, which `self` prevents.
        let _ = rx.wait_for(|p| *p != Phase::Serving).await;
    }

    /// How many connections are open.
    pub fn open(&self) -> usize {
        self.inner.open.load(Ordering::Relaxed)
    }

    /// Begins the drain; `false` if it had begun already.
    pub(crate) fn begin(&self) -> bool {
        self.inner.phase.send_if_modified(|p| {
            if *p == Phase::Serving {
                *p = Phase::Draining;
                true
            } else {
                false
            }
        })
    }

    /// The deadline has passed: every connection still open is cut.
    pub(crate) fn cut(&self) {
        self.inner.phase.send_replace(Phase::Closing);
    }

    /// Completes once no connection is open (every guard dropped).
    pub(crate) async fn all_closed(&self) {
        // Every guard holds a receiver; the transient ones of
        // [`Drain::draining`] live inside guarded connections.
        self.inner.phase.closed().await;
    }
}

/// One open connection (see [`Drain::guard`]).
#[derive(Debug)]
pub struct Guard {
    rx: watch::Receiver<Phase>,
    inner: Arc<Inner>,
}

impl Guard {
    /// Runs `conn` (a connection's whole life) until it ends, or until
    /// the drain deadline cuts it: it is dropped then, closing its
    /// sockets.
    pub async fn run<F: Future<Output = ()>>(mut self, conn: F) {
        tokio::select! {
            () = conn => {}
            _ = self.rx.wait_for(|p| *p == Phase::Closing) => {
                tracing::debug!("connection cut: the drain deadline has passed");
            }
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.inner.open.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn guarded_connections_are_counted_and_cut_at_the_deadline() {
        let drain = Drain::new();
        let quick = drain.guard();
        let slow = drain.guard();
        assert_eq!(drain.open(), 2);
        let quick = tokio::spawn(quick.run(async {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }));
        let slow = tokio::spawn(slow.run(std::future::pending()));
        assert!(!drain.is_draining());
        assert!(drain.begin());
        assert!(!drain.begin(), "a second begin is no change");
        assert!(drain.is_draining());
        drain.draining().await;
        quick.await.unwrap();
        assert_eq!(drain.open(), 1);
        let closed = tokio::time::timeout(Duration::from_secs(5), drain.all_closed()).await;
        assert!(closed.is_err(), "the slow connection is still open");
        drain.cut();
        slow.await.unwrap();
        assert_eq!(drain.open(), 0);
        drain.all_closed().await;
    }
}
