//! The HTTP/1.x fast path's connection to the application: one per
//! downstream connection, opened on first use, reused, and retried once
//! when the application had closed it.

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::admission::Conn;
use crate::h1::codec::Framing;
use crate::h1::{self, Sent};
use crate::outcome::{Close, Flag, LocalFailure};

/// How one forwarded exchange ended.
pub(super) enum Exchange {
    /// A WebSocket handshake was answered `101` and the tunnel it opened
    /// has ended; the downstream connection closes.
    Tunneled(h1::Tunneled),
    /// The response was forwarded; `close`: the downstream connection must
    /// close after it; `early`: it came before the request body had all
    /// gone (the rest was not read).
    Done {
        status: u16,
        close: bool,
        early: bool,
    },
    /// No response came: answer with this status, flags and body, then
    /// close.
    NoResponse(u16, Flag, &'static str),
    /// The application could not be connected to (why): `503 UF`, close.
    Unreachable(String),
    /// The exchange broke after the response started (or while the request
    /// body was read): nothing more can be sent; close.
    Aborted(u16, Flag),
}

/// The connection to the application of one downstream connection.
pub(super) struct AppConn {
    stream: Option<TcpStream>,
    buf: BytesMut,
    /// The stream served an earlier request (it may have been closed by the
    /// application since).
    reused: bool,
    /// How long an upgraded connection may stay silent.
    idle_timeout: std::time::Duration,
    /// Once the proxy drains, every response says `Connection: close`.
    drain: crate::drain::Drain,
}

impl AppConn {
    pub(super) fn new(idle_timeout: std::time::Duration, drain: crate::drain::Drain) -> AppConn {
        AppConn {
            stream: None,
            buf: BytesMut::new(),
            reused: false,
            idle_timeout,
            drain,
        }
    }

    /// Forwards one request (head written by `write_head`, body framed by
    /// `framing`) and its response. A request without a body on a reused
    /// connection that the application had closed is retried once on a new
    /// connection. With `tunnel` (a WebSocket handshake, and the signal of
    /// a policy change that denies it), a `101` turns both connections
    /// into a tunnel, which ends them. `sizes` gets the body bytes
    /// forwarded each way (a tunnel's bytes, for a tunnel).
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn exchange<S>(
        &mut self,
        conn: &Conn,
        down: &mut S,
        down_buf: &mut BytesMut,
        out: &mut Vec<u8>,
        write_head: impl Fn(&mut Vec<u8>),
        (framing, tunnel): (Framing, Option<&tokio::sync::Notify>),
        (method, close_down, extra): (&str, bool, &[(&str, &[u8])]),
        sizes: &mut (u64, u64),
    ) -> Exchange
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let mut retried = false;
        let (resp, early) = loop {
            if self.stream.is_none() {
                match crate::connect::app(conn.app, conn.app_connect_timeout).await {
                    Ok(s) => {
                        self.stream = Some(s);
                        self.buf.clear();
                        self.reused = false;
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, app = %conn.app, "application unreachable");
                        return Exchange::Unreachable(format!(
                            "application at {} unreachable: {e}",
                            conn.app
                        ));
                    }
                }
            }
            let Some(up) = self.stream.as_mut() else {
                unreachable!("connected above")
            };
            out.clear();
            write_head(out);
            let can_retry = self.reused && !retried && framing == Framing::Empty;
            let upgrade = tunnel.is_some();
            let sent = h1::send(
                up,
                &mut self.buf,
                down,
                down_buf,
                (framing, upgrade),
                out,
                &mut sizes.0,
            );
            match sent.await {
                Sent::Response(resp) => break (resp, false),
                Sent::Early(resp) => break (resp, true),
                Sent::Lost(_) if can_retry => {
                    retried = true;
                    self.stream = None;
                }
                Sent::Lost(_) => {
                    self.stream = None;
                    let reset = LocalFailure::Reset;
                    return Exchange::NoResponse(reset.status(), reset.flag(), reset.body());
                }
                Sent::Refused(failure) => {
                    self.stream = None;
                    return Exchange::NoResponse(failure.status(), failure.flag(), failure.body());
                }
                Sent::DownstreamBroke => {
                    self.stream = None;
                    let broke = LocalFailure::DownstreamBroke;
                    return Exchange::Aborted(broke.status(), broke.flag());
                }
            }
        };
        let Some(up) = self.stream.as_mut() else {
            unreachable!("the response was read from it")
        };
        if let Some(revoked) = tunnel.filter(|_| resp.status() == 101) {
            let stop = async {
                revoked.notified().await;
                Close::policy_changed("WebSocket")
            };
            let ends = (self.idle_timeout, stop);
            let t = h1::tunnel(up, &mut self.buf, down, down_buf, &resp, ends, out).await;
            self.stream = None;
            *sizes = t.bytes;
            tracing::debug!(app = %conn.app, reason = %t.reason, bytes = ?t.bytes, "tunnel closed");
            return Exchange::Tunneled(t);
        }
        // After an early answer, neither connection can carry another
        // request: the body was cut short. Draining is asked when the
        // response head is written: a request in flight when the drain
        // began gets its answer with `Connection: close`.
        let close_down = close_down || early || self.drain.is_draining();
        let r = h1::relay(
            up,
            &mut self.buf,
            down,
            &resp,
            (method, close_down, extra),
            out,
        )
        .await;
        sizes.1 = r.bytes;
        self.reused = true;
        if !r.reusable || early {
            self.stream = None;
        }
        match r.flags {
            Flag::None => Exchange::Done {
                status: r.status,
                close: r.close,
                early,
            },
            flag => Exchange::Aborted(r.status, flag),
        }
    }
}
