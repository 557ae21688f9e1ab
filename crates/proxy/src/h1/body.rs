//! Request bodies on the fast path where the two sides may not agree on
//! when a request ends: forwarding a body while watching the upstream for
//! an early answer (a refusal sent before the body was read), and
//! discarding what a client still sends after its request was answered
//! early, so that the answer is not lost to a connection reset.

use std::io;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::codec::{ChunkedScanner, Framing};
use super::{ForwardError, fill, forward};

/// Whether a request framed so has body bytes to come.
pub fn has_body(framing: Framing) -> bool {
    !matches!(framing, Framing::Empty | Framing::Length(0))
}

/// What is left unread of a request body when its connection must close.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unread {
    /// Nothing: the body was read whole, or the client is gone.
    Nothing,
    /// All of it (framed so): the request was answered before its body
    /// was touched.
    All(Framing),
    /// Part of it, or an unknown amount.
    Rest,
}

impl Unread {
    /// The body of a request framed so, untouched, if it has one.
    pub fn all(framing: Framing) -> Unread {
        if has_body(framing) {
            Unread::All(framing)
        } else {
            Unread::Nothing
        }
    }

    /// Part of the body of a request framed so, if it has one.
    pub fn rest(framing: Framing) -> Unread {
        if has_body(framing) {
            Unread::Rest
        } else {
            Unread::Nothing
        }
    }
}

/// Ends a downstream connection after its last response: with what the
/// client may still send of a request body read and discarded first
/// ([`linger`]), else with a plain shutdown.
pub async fn end_connection<S>(io: &mut S, buf: &mut BytesMut, unread: Unread)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match unread {
        Unread::Nothing => {
            let _ = io.shutdown().await;
        }
        Unread::All(framing) => linger(io, buf, Some(framing)).await,
        Unread::Rest => linger(io, buf, None).await,
    }
}

/// Answers a request with a proxy-made response and ends its connection,
/// discarding its body first ([`end_connection`]).
pub async fn refuse<S>(io: &mut S, buf: &mut BytesMut, status: u16, body: &str, framing: Framing)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if super::reply(io, status, body, true).await.is_ok() {
        end_connection(io, buf, Unread::all(framing)).await;
    }
}

/// At most this much of a request body is read and thrown away after a
/// response that ends the connection ([`linger`]): enough for the bodies
/// a client sends before it reads (5 MiB in the attack this answers), far
/// less than an upload worth waiting for.
pub const LINGER_MAX_BYTES: u64 = 16 * 1024 * 1024;
/// [`linger`] gives up when the client sends nothing for this long
/// (Envoy's `delayed_close_timeout` default: after that, Envoy closes too).
pub const LINGER_QUIET: std::time::Duration = std::time::Duration::from_secs(1);
/// ... and in any case after this long.
pub const LINGER_MAX_TIME: std::time::Duration = std::time::Duration::from_secs(10);

/// Ends a downstream connection that was answered (with `connection:
/// close`) before its request body was read in full. Closing at once would
/// make the kernel reset the connection as soon as more body bytes arrive,
/// and a reset can destroy the response before the client has read it:
/// the client would see a broken connection (or, through a client-side
/// proxy, a `503`) instead of the refusal. So, as Envoy's delayed close
/// does, this shuts down the sending side (the client sees the response
/// end), then reads and discards what the client still sends until the
/// body ends (`rest`: the framing of a body nothing was read of; `None`
/// when unknown: until the client closes), the client closes, or one of
/// the bounds above is reached. The caller then drops the connection.
pub async fn linger<S>(io: &mut S, buf: &mut BytesMut, rest: Option<Framing>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if io.shutdown().await.is_err() {
        return;
    }
    let until = tokio::time::Instant::now() + LINGER_MAX_TIME;
    let mut remaining = match rest {
        Some(Framing::Length(n)) => n,
        _ => 0,
    };
    let mut chunked = ChunkedScanner::default();
    let mut discarded = 0u64;
    loop {
        let (take, done) = match rest {
            Some(Framing::Empty) => return,
            Some(Framing::Length(_)) => {
                let take = usize::try_from(remaining).map_or(buf.len(), |r| r.min(buf.len()));
                remaining -= take as u64;
                (take, remaining == 0)
            }
            Some(Framing::Chunked) => match chunked.scan(buf) {
                Ok(r) => r,
                Err(_) => return,
            },
            Some(Framing::UntilClose) | None => (buf.len(), false),
        };
        buf.advance(take);
        discarded += take as u64;
        if done || discarded >= LINGER_MAX_BYTES {
            return;
        }
        let quiet = LINGER_QUIET.min(until.saturating_duration_since(tokio::time::Instant::now()));
        match tokio::time::timeout(quiet, fill(io, buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return,
        }
    }
}

/// Where a request body being forwarded is: what its framing still
/// expects.
#[derive(Debug)]
pub(super) struct BodyState {
    framing: Framing,
    /// Bytes still to come of a `Content-Length` body.
    remaining: u64,
    chunked: ChunkedScanner,
    /// [`forward_request`] has run before for this body.
    started: bool,
}

impl BodyState {
    pub(super) fn new(framing: Framing) -> BodyState {
        BodyState {
            framing,
            remaining: match framing {
                Framing::Length(n) => n,
                _ => 0,
            },
            chunked: ChunkedScanner::default(),
            started: false,
        }
    }
}

/// How a request body went upstream.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum BodySent {
    /// All of it.
    Whole,
    /// The upstream began to answer first (what it sent is in its buffer).
    /// What was taken of the body but not written yet is left in `out`,
    /// to go first if the body goes on (after an interim response).
    Answered,
}

/// [`forward`] for a request body going upstream, watching the upstream
/// for an early answer while the body is written and while more of it is
/// awaited. Picks up where `body` says an earlier call stopped.
pub(super) async fn forward_request<D, U>(
    down: &mut D,
    down_buf: &mut BytesMut,
    up: &mut U,
    up_buf: &mut BytesMut,
    body: &mut BodyState,
    out: &mut Vec<u8>,
    sent: &mut u64,
) -> Result<BodySent, ForwardError>
where
    D: AsyncRead + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    if !body.started && matches!(body.framing, Framing::Empty | Framing::Length(0)) {
        // No body: nothing to watch for.
        return forward(down, down_buf, up, body.framing, out, sent)
            .await
            .map(|()| BodySent::Whole);
    }
    body.started = true;
    loop {
        let payload_before = body.chunked.data_bytes();
        let (take, done) = match body.framing {
            Framing::Empty => (0, true),
            Framing::Length(_) => {
                let take = usize::try_from(body.remaining)
                    .map_or(down_buf.len(), |r| r.min(down_buf.len()));
                (take, body.remaining == take as u64)
            }
            Framing::Chunked => body.chunked.scan(down_buf).map_err(ForwardError::Body)?,
            Framing::UntilClose => (down_buf.len(), false),
        };
        // The piece goes whole or its unwritten rest waits in `out`: either
        // way it is taken from the body now.
        let complete = if out.is_empty() {
            let (written, complete) = write_watching(up, up_buf, &down_buf[..take])
                .await
                .map_err(ForwardError::Write)?;
            out.extend_from_slice(&down_buf[written..take]);
            complete
        } else {
            out.extend_from_slice(&down_buf[..take]);
            let (written, complete) = write_watching(up, up_buf, out)
                .await
                .map_err(ForwardError::Write)?;
            out.drain(..written);
            complete
        };
        down_buf.advance(take);
        if let Framing::Length(_) = body.framing {
            body.remaining -= take as u64;
        }
        *sent += match body.framing {
            Framing::Chunked => body.chunked.data_bytes() - payload_before,
            _ => take as u64,
        };
        if !complete {
            return Ok(BodySent::Answered);
        }
        if done {
            return Ok(BodySent::Whole);
        }
        // Wait for more of the body, or for the upstream to answer.
        tokio::select! {
            biased;
            answer = std::future::poll_fn(|cx| poll_probe(up, up_buf, cx)) => {
                answered(answer).map_err(ForwardError::Write)?;
                return Ok(BodySent::Answered);
            }
            read = fill(down, down_buf) => {
                if read.map_err(ForwardError::Read)? == 0 {
                    return Err(ForwardError::Truncated);
                }
            }
        }
    }
}

/// Writes `data` to `up` and flushes it, unless `up` starts answering
/// first (its bytes are appended to `up_buf`). Returns how many bytes of
/// `data` were written, and whether all of them were (and flushed).
async fn write_watching<U>(
    up: &mut U,
    up_buf: &mut BytesMut,
    data: &[u8],
) -> io::Result<(usize, bool)>
where
    U: AsyncRead + AsyncWrite + Unpin,
{
    use std::task::Poll;
    let mut written = 0;
    std::future::poll_fn(|cx| {
        // Listening first, on every wake-up: an answer stops the body.
        if let Poll::Ready(answer) = poll_probe(up, up_buf, cx) {
            return Poll::Ready(answered(answer).map(|()| (written, false)));
        }
        while written < data.len() {
            match std::pin::Pin::new(&mut *up).poll_write(cx, &data[written..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => written += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        std::pin::Pin::new(&mut *up)
            .poll_flush(cx)
            .map_ok(|()| (written, true))
    })
    .await
}

/// Bytes read at a time while watching an upstream for an early answer
/// (the rest of the answer is read as any response is).
const PROBE: usize = 1024;

/// Polls `up` once for bytes, appending what comes to `buf`. Pending
/// (nothing yet) is the usual answer, and costs no system call once the
/// socket is known not to be readable.
fn poll_probe<U: AsyncRead + Unpin>(
    up: &mut U,
    buf: &mut BytesMut,
    cx: &mut std::task::Context<'_>,
) -> std::task::Poll<io::Result<usize>> {
    let mut probe = [0u8; PROBE];
    let mut read = tokio::io::ReadBuf::new(&mut probe);
    match std::pin::Pin::new(up).poll_read(cx, &mut read) {
        std::task::Poll::Ready(Ok(())) => {
            buf.extend_from_slice(read.filled());
            std::task::Poll::Ready(Ok(read.filled().len()))
        }
        std::task::Poll::Ready(Err(e)) => std::task::Poll::Ready(Err(e)),
        std::task::Poll::Pending => std::task::Poll::Pending,
    }
}

/// What a probe read means while a body is going: bytes are an answer; the
/// end of the stream or an error is a lost connection.
fn answered(read: io::Result<usize>) -> io::Result<()> {
    match read? {
        0 => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "closed before responding",
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::h1::codec::RequestHead;
    use crate::h1::{Sent, read_head, send};
    use tokio::io::AsyncReadExt;

    /// Sends a `POST` with a `len`-byte body through [`send`], the
    /// upstream being `app`'s other end. Returns the outcome and what
    /// went downstream.
    async fn send_post(up: &mut tokio::io::DuplexStream, len: usize) -> (Sent, Vec<u8>, u64) {
        let (mut client, mut down) = tokio::io::duplex(64 * 1024);
        let writer = tokio::spawn(async move {
            // Write until the proxy stops reading; errors are expected.
            let chunk = vec![b'x'; 8 * 1024];
            let mut left = len;
            while left > 0 {
                let n = left.min(chunk.len());
                if client.write_all(&chunk[..n]).await.is_err() {
                    break;
                }
                left -= n;
            }
            let mut got = Vec::new();
            let _ = client.read_to_end(&mut got).await;
            got
        });
        let mut out =
            format!("POST / HTTP/1.1\r\nhost: a\r\ncontent-length: {len}\r\n\r\n").into_bytes();
        let mut sent_bytes = 0;
        let sent = send(
            up,
            &mut BytesMut::new(),
            &mut down,
            &mut BytesMut::new(),
            (Framing::Length(len as u64), false),
            &mut out,
            &mut sent_bytes,
        )
        .await;
        drop(down);
        (sent, writer.await.unwrap(), sent_bytes)
    }

    #[tokio::test]
    async fn an_answer_before_the_body_has_gone_stops_the_body() {
        let (mut up, mut app) = tokio::io::duplex(16 * 1024);
        // The application refuses at once and never reads the body.
        app.write_all(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 2\r\n\r\nno")
            .await
            .unwrap();
        let (sent, _, sent_bytes) = send_post(&mut up, 4 * 1024 * 1024).await;
        let Sent::Early(resp) = sent else {
            panic!("{sent:?}")
        };
        assert_eq!(resp.status(), 403);
        assert!(sent_bytes < 4 * 1024 * 1024, "{sent_bytes}");
    }

    #[tokio::test]
    async fn an_interim_answer_lets_the_body_go_on() {
        let len = 1024 * 1024;
        let (mut up, mut app) = tokio::io::duplex(16 * 1024);
        let server = tokio::spawn(async move {
            let mut buf = BytesMut::new();
            let head = read_head(&mut app, &mut buf, RequestHead::parse, None)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(head.framing(), Framing::Length(len as u64));
            app.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                .await
                .unwrap();
            let mut body = buf.len();
            let mut chunk = vec![0u8; 8192];
            while body < len {
                let n = app.read(&mut chunk).await.unwrap();
                assert!(n > 0, "the body broke off at {body}");
                body += n;
            }
            app.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                .await
                .unwrap();
            body
        });
        let (sent, _, sent_bytes) = send_post(&mut up, len).await;
        let Sent::Response(resp) = sent else {
            panic!("{sent:?}")
        };
        assert_eq!(resp.status(), 200);
        assert_eq!(sent_bytes, len as u64);
        assert_eq!(server.await.unwrap(), len, "every body byte, once");
    }

    #[tokio::test]
    async fn linger_reads_the_rest_of_the_body_then_lets_go() {
        // A body of known length: read to its end, then done, while the
        // client keeps the connection open.
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        let len = 3 * 1024 * 1024;
        let writer = tokio::spawn(async move {
            client.write_all(&vec![b'x'; len]).await.unwrap();
            let mut rest = Vec::new();
            client.read_to_end(&mut rest).await.unwrap();
            client
        });
        let mut buf = BytesMut::new();
        linger(&mut server, &mut buf, Some(Framing::Length(len as u64))).await;
        // The client saw the end of the stream (the shutdown), and wrote
        // everything without an error.
        let _client = writer.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn linger_gives_up_on_a_silent_client() {
        let (_client, mut server) = tokio::io::duplex(1024);
        let started = tokio::time::Instant::now();
        linger(&mut server, &mut BytesMut::new(), None).await;
        assert_eq!(started.elapsed(), LINGER_QUIET);
    }

    #[tokio::test]
    async fn linger_stops_after_its_byte_bound() {
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        let writer = tokio::spawn(async move {
            let chunk = vec![b'x'; 64 * 1024];
            let mut sent = 0u64;
            while client.write_all(&chunk).await.is_ok() {
                sent += chunk.len() as u64;
            }
            sent
        });
        linger(&mut server, &mut BytesMut::new(), None).await;
        drop(server);
        let sent = writer.await.unwrap();
        assert!(
            (LINGER_MAX_BYTES..LINGER_MAX_BYTES + 256 * 1024).contains(&sent),
            "{sent}"
        );
    }
}
