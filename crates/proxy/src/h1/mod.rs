//! The HTTP/1.1 fast path, used by the inbound and outbound HTTP listeners
//! for HTTP/1.x traffic (HTTP/2 goes through hyper).
//!
//! A request is read head first; the head is parsed in place
//! ([`codec`]), decided on (authorization inbound, routing outbound),
//! written upstream rewritten (hop-by-hop headers dropped, the proxy's own
//! headers added), and its body is forwarded byte for byte as it arrives,
//! framed by `Content-Length` or chunked encoding. The response comes back
//! the same way. One task serves a downstream connection and its upstream
//! connection; nothing is buffered beyond what one read returns, and a head
//! and the first body bytes go out in one write (one TLS record, one
//! syscall). Every ambiguity in framing is refused (see [`codec`]), so the
//! proxy and the application can never disagree on where a request ends.

mod body;
pub mod codec;

use body::{BodySent, BodyState, forward_request};
pub use body::{
    LINGER_MAX_BYTES, LINGER_MAX_TIME, LINGER_QUIET, Unread, end_connection, has_body, linger,
    refuse,
};

use std::borrow::Cow;
use std::io;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use codec::{ChunkedScanner, Framing, HeadError, RequestHead, ResponseHead};

use crate::idle::{Activity, Counted, IdleTimer, idle_reason};
use crate::outcome::{FORWARDED, Flag, LocalFailure};

/// Read buffer size of each side of a connection.
pub const READ_BUF: usize = 16 * 1024;

/// How long the rest of a started message head may take (hyper's default
/// header read timeout).
pub const HEAD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The HTTP/2 connection preface (prior knowledge).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Why reading a head failed.
#[derive(Debug)]
pub enum ReadError {
    /// The head is invalid or too large.
    Head(HeadError),
    /// The peer closed the connection in the middle of a head.
    Truncated,
    /// The rest of a started head did not arrive within [`HEAD_TIMEOUT`].
    Timeout,
    /// No head began within the connection's idle timeout.
    Idle,
    Io(io::Error),
}

/// Why forwarding a body failed, and on which side.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// Reading from the sending side failed.
    #[error("reading the body: {0}")]
    Read(io::Error),
    /// The sending side closed before the body ended.
    #[error("the sender closed before the body ended")]
    Truncated,
    /// The chunked encoding is invalid.
    #[error("invalid chunked body: {0:?}")]
    Body(codec::BodyError),
    /// Writing to the receiving side failed.
    #[error("writing the body: {0}")]
    Write(io::Error),
}

/// Reads more bytes into `buf`; 0 means end of stream.
async fn fill<S: AsyncRead + Unpin>(io: &mut S, buf: &mut BytesMut) -> io::Result<usize> {
    if buf.capacity() - buf.len() < READ_BUF / 4 {
        buf.reserve(READ_BUF);
    }
    io.read_buf(buf).await
}

/// Reads until `parse` finds a complete head in `buf`. `Ok(None)`: the peer
/// closed cleanly before sending anything. Waiting for a head to begin is
/// limited by `idle` (a kept-alive connection with no request in flight),
/// or not at all without one; once part of a head has arrived, the rest
/// must follow within [`HEAD_TIMEOUT`] (a peer dribbling a head cannot
/// hold the connection forever). That timer exists only while a head is
/// incomplete, which it rarely is: a head usually arrives in one read.
pub async fn read_head<S, H>(
    io: &mut S,
    buf: &mut BytesMut,
    parse: fn(&mut BytesMut) -> Result<Option<H>, HeadError>,
    mut idle: Option<&mut IdleTimer>,
) -> Result<Option<H>, ReadError>
where
    S: AsyncRead + Unpin,
{
    let mut deadline = None;
    loop {
        if !buf.is_empty()
            && let Some(head) = parse(buf).map_err(ReadError::Head)?
        {
            return Ok(Some(head));
        }
        let read = if buf.is_empty() {
            match idle.as_deref_mut() {
                Some(idle) => idle.wait(fill(io, buf)).await.ok_or(ReadError::Idle)?,
                None => fill(io, buf).await,
            }
        } else {
            let deadline =
                *deadline.get_or_insert_with(|| tokio::time::Instant::now() + HEAD_TIMEOUT);
            tokio::time::timeout_at(deadline, fill(io, buf))
                .await
                .map_err(|_| ReadError::Timeout)?
        };
        if read.map_err(ReadError::Io)? == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(ReadError::Truncated)
            };
        }
    }
}

/// Reads the next request of a downstream connection. `None`: the
/// connection is done: the peer closed it, it stayed idle past `idle`'s
/// timeout, or its head was refused (the answer, `400`, `431` or `408`,
/// has been sent; the caller closes).
pub async fn next_request<S>(
    io: &mut S,
    buf: &mut BytesMut,
    peer: std::net::SocketAddr,
    idle: &mut IdleTimer,
) -> Option<RequestHead>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (status, body) = match read_head(io, buf, RequestHead::parse, Some(idle)).await {
        Ok(head) => return head,
        Err(ReadError::Idle) => {
            tracing::debug!(peer = %peer, "idle timeout: closing the connection");
            return None;
        }
        Err(ReadError::Io(_) | ReadError::Truncated) => return None,
        Err(ReadError::Timeout) => (408, "request timeout"),
        Err(ReadError::Head(e)) => {
            tracing::debug!(peer = %peer, error = %e, "bad request head");
            (e.status(), "bad request")
        }
    };
    if reply(io, status, body, true).await.is_ok() {
        // The rest of the head, and any body, are still coming.
        linger(io, buf, None).await;
    }
    None
}

/// [`next_request`] for a proxy that may drain ([`crate::drain`]): once
/// the drain has begun, a keep-alive connection waiting for its next
/// request is closed at once (`None`), unless bytes of one have come
/// already (they are in `buf`, or readable now): a request the client has
/// begun to send is read and served (its response says `Connection:
/// close`). A connection only gets here after its first bytes have come
/// (see [`sniff_h2`]).
pub async fn next_request_draining<S>(
    io: &mut S,
    buf: &mut BytesMut,
    peer: std::net::SocketAddr,
    idle: &mut IdleTimer,
    drain: &crate::drain::Drain,
) -> Option<RequestHead>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if !drain.is_draining() {
        tokio::select! {
            biased;
            head = next_request(io, buf, peer, idle) => return head,
            // `read_head` keeps what it has read in `buf`: a head begun
            // before the drain is read on below.
            () = drain.draining() => {}
        }
    }
    if buf.is_empty() {
        // Whatever is readable now, without waiting (a zero timeout polls
        // the read once).
        let now = tokio::time::timeout(std::time::Duration::ZERO, fill(io, buf)).await;
        if !matches!(now, Ok(Ok(n)) if n > 0) {
            tracing::debug!(peer = %peer, "draining: closing an idle connection");
            return None;
        }
    }
    next_request(io, buf, peer, idle).await
}

/// Writes `out` (a head, possibly empty) and then the body framed by
/// `framing`: first the bytes already in `buf`, then what `src` sends, until
/// the body ends. Bytes after the body (a pipelined request) stay in `buf`.
/// The first body bytes go out in the same write as the head. The body's
/// payload bytes forwarded (a chunked body's data, without its chunk lines
/// and trailers) are added to `sent` as they go, so a body that breaks off
/// counts what got through.
pub async fn forward<R, W>(
    src: &mut R,
    buf: &mut BytesMut,
    dst: &mut W,
    framing: Framing,
    out: &mut Vec<u8>,
    sent: &mut u64,
) -> Result<(), ForwardError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut remaining = match framing {
        Framing::Length(n) => n,
        _ => 0,
    };
    let mut chunked = ChunkedScanner::default();
    loop {
        let payload_before = chunked.data_bytes();
        let (take, done) = match framing {
            Framing::Empty => (0, true),
            Framing::Length(_) => {
                let take = usize::try_from(remaining).map_or(buf.len(), |r| r.min(buf.len()));
                remaining -= take as u64;
                (take, remaining == 0)
            }
            Framing::Chunked => chunked.scan(buf).map_err(ForwardError::Body)?,
            Framing::UntilClose => (buf.len(), false),
        };
        if out.is_empty() {
            if take > 0 {
                dst.write_all(&buf[..take])
                    .await
                    .map_err(ForwardError::Write)?;
            }
        } else {
            out.extend_from_slice(&buf[..take]);
            dst.write_all(out).await.map_err(ForwardError::Write)?;
            out.clear();
        }
        buf.advance(take);
        *sent += match framing {
            Framing::Chunked => chunked.data_bytes() - payload_before,
            _ => take as u64,
        };
        dst.flush().await.map_err(ForwardError::Write)?;
        if done {
            return Ok(());
        }
        if fill(src, buf).await.map_err(ForwardError::Read)? == 0 {
            return if framing == Framing::UntilClose {
                Ok(())
            } else {
                Err(ForwardError::Truncated)
            };
        }
    }
}

/// Reads the first bytes of a connection and says whether they are the
/// HTTP/2 preface. What was read stays in `buf`. `Ok(None)`: the peer
/// closed before sending anything.
pub async fn sniff_h2<S: AsyncRead + Unpin>(
    io: &mut S,
    buf: &mut BytesMut,
) -> io::Result<Option<bool>> {
    loop {
        let n = buf.len().min(H2_PREFACE.len());
        if buf[..n] != H2_PREFACE[..n] {
            return Ok(Some(false));
        }
        if n == H2_PREFACE.len() {
            return Ok(Some(true));
        }
        if fill(io, buf).await? == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Ok(Some(false))
            };
        }
    }
}

/// Appends a response the proxy makes itself (a deny, an error), with
/// more header fields (names and values the proxy made: no CR or LF).
pub fn local_reply_with(
    status: u16,
    body: &str,
    fields: &[(&str, &str)],
    close: bool,
    out: &mut Vec<u8>,
) {
    use std::io::Write as _;
    let reason = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("");
    // Writing into a Vec cannot fail.
    let _ = write!(
        out,
        "HTTP/1.1 {status} {reason}\r\ncontent-length: {}\r\ncontent-type: text/plain\r\n",
        body.len(),
    );
    for (name, value) in fields {
        debug_assert!(!name.contains(['\r', '\n']) && !value.contains(['\r', '\n']));
        let _ = write!(out, "{name}: {value}\r\n");
    }
    let _ = write!(
        out,
        "{}\r\n{body}",
        if close { "connection: close\r\n" } else { "" },
    );
}

/// Writes a proxy-made response and flushes it.
pub async fn reply<W: AsyncWrite + Unpin>(
    io: &mut W,
    status: u16,
    body: &str,
    close: bool,
) -> io::Result<()> {
    reply_with(io, status, body, &[], close).await
}

/// Writes a response made of another's parts (an external authorization
/// provider's refusal): `status`, `fields`, `body`.
pub async fn reply_fields<W: AsyncWrite + Unpin>(
    io: &mut W,
    status: u16,
    fields: &[(&str, &[u8])],
    body: &[u8],
    close: bool,
) -> io::Result<()> {
    use std::io::Write as _;
    let reason = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("");
    let mut out = Vec::with_capacity(128 + body.len());
    // Writing into a Vec cannot fail.
    let _ = write!(
        out,
        "HTTP/1.1 {status} {reason}\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (name, value) in fields {
        let framing = ["content-length", "transfer-encoding", "connection"];
        if !framing.iter().any(|f| f.eq_ignore_ascii_case(name)) {
            codec::write_field(&mut out, name.as_bytes(), value);
        }
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    io.write_all(&out).await?;
    io.flush().await
}

/// [`reply`] with more header fields.
pub async fn reply_with<W: AsyncWrite + Unpin>(
    io: &mut W,
    status: u16,
    body: &str,
    fields: &[(&str, &str)],
    close: bool,
) -> io::Result<()> {
    let mut out = Vec::with_capacity(128 + body.len());
    local_reply_with(status, body, fields, close, &mut out);
    io.write_all(&out).await?;
    io.flush().await
}

/// The host and path a request is for, as authorization and routing see
/// them, and the request-target to forward.
#[derive(Debug)]
pub struct Target<'a> {
    /// The authority of an absolute-form target, else the `Host` header.
    pub host: &'a str,
    /// Path and query (origin-form), or `*`.
    pub path: Cow<'a, str>,
    /// The target came in absolute-form: the forwarded request uses
    /// origin-form and the authority as `Host` (RFC 9112 section 3.2.2).
    pub absolute: bool,
}

/// Splits a request's target. `CONNECT` (tunnels are not proxied),
/// authority-form and anything else that is not origin-, absolute- or
/// asterisk-form is an error (the proxy answers 405).
pub fn target(head: &RequestHead) -> Result<Target<'_>, &'static str> {
    if head.method() == "CONNECT" {
        return Err("CONNECT is not supported");
    }
    let raw = head.target();
    if raw.starts_with('/') || raw == "*" {
        let host = match head.header("host") {
            Some(h) => std::str::from_utf8(h).map_err(|_| "Host is not valid UTF-8")?,
            None => "",
        };
        return Ok(Target {
            host,
            path: Cow::Borrowed(raw),
            absolute: false,
        });
    }
    let rest = strip_prefix_ignore_case(raw, "http://")
        .or_else(|| strip_prefix_ignore_case(raw, "https://"))
        .ok_or("unsupported request-target form")?;
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    if authority.is_empty() || authority.contains('@') {
        return Err("invalid authority in the request-target");
    }
    let path = match path.as_bytes().first() {
        None => Cow::Borrowed("/"),
        Some(b'?') => Cow::Owned(format!("/{path}")),
        Some(_) => Cow::Borrowed(path),
    };
    Ok(Target {
        host: authority,
        path,
        absolute: true,
    })
}

fn strip_prefix_ignore_case<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

/// Request headers as the policy engine reads them.
#[derive(Debug)]
pub struct HeaderView<'a>(pub &'a RequestHead);

impl meshward_policy::Headers for HeaderView<'_> {
    fn header(&self, name: &str) -> Option<Cow<'_, [u8]>> {
        meshward_policy::join_values(self.0.headers(name))
    }
}

/// Answers `Expect: 100-continue` when `head` asks for it: the proxy sends
/// it itself, as Envoy does by default, and does not forward the
/// expectation. Flushed, so a client waiting for it sends its body now.
pub async fn answer_continue<W: AsyncWrite + Unpin>(
    io: &mut W,
    head: &RequestHead,
) -> io::Result<()> {
    if !head.expects_continue() {
        return Ok(());
    }
    io.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await?;
    io.flush().await
}

/// The header the server-side proxy sets to the client certificate it
/// verified; whatever a request brings of it is dropped.
pub const XFCC: &str = "x-forwarded-client-cert";

/// What the proxy changes in a request head it forwards, beyond what
/// [`codec::write_request`] drops of hop-by-hop fields: fields it adds,
/// and original fields it drops because it sets them.
#[derive(Debug)]
pub struct Rewrite<'a> {
    added: [(&'a str, &'a [u8]); 4],
    len: usize,
    /// Always `x-forwarded-client-cert` (only the proxy's own is ever
    /// forwarded), and `host` when the proxy sets it.
    pub drop: &'static [&'static str],
}

impl<'a> Rewrite<'a> {
    /// For `head` going to `target`: `xfcc`, the proxy's own
    /// `x-forwarded-client-cert` value, if it sets one; `Host` from the
    /// target's authority when the request-target was absolute or the head
    /// had none; and for a WebSocket handshake its upgrade fields
    /// (`connection: upgrade` and the `Upgrade` value), which are
    /// hop-by-hop and so dropped from the original.
    pub fn new(
        head: &'a RequestHead,
        target: &Target<'a>,
        xfcc: Option<&'a [u8]>,
        upgrade: codec::Upgrade,
    ) -> Rewrite<'a> {
        let mut r = Rewrite {
            added: [("", b""); 4],
            len: 0,
            drop: &[XFCC],
        };
        if let Some(value) = xfcc {
            r.add(XFCC, value);
        }
        if target.absolute || head.header("host").is_none() {
            r.add("host", target.host.as_bytes());
            r.drop = &[XFCC, "host"];
        }
        if upgrade == codec::Upgrade::WebSocket {
            r.add("connection", b"upgrade");
            r.add("upgrade", head.header("upgrade").unwrap_or(b"websocket"));
        }
        r
    }

    fn add(&mut self, name: &'a str, value: &'a [u8]) {
        self.added[self.len] = (name, value);
        self.len += 1;
    }

    /// The fields to add, in order.
    pub fn added(&self) -> &[(&'a str, &'a [u8])] {
        &self.added[..self.len]
    }

    /// The fields to drop and to add.
    pub fn edits(&self) -> FieldEdits<'_> {
        FieldEdits {
            drop: Cow::Borrowed(self.drop),
            added: Cow::Borrowed(self.added()),
        }
    }

    /// The same, and also `remove` and `add` (RequestAuthentication's:
    /// tokens not forwarded, output headers).
    pub fn with<'b>(&'b self, remove: &'b [String], add: &'b [(String, String)]) -> FieldEdits<'b> {
        FieldEdits {
            drop: self
                .drop
                .iter()
                .copied()
                .chain(remove.iter().map(String::as_str))
                .collect(),
            added: self
                .added()
                .iter()
                .copied()
                .chain(add.iter().map(|(h, v)| (h.as_str(), v.as_bytes())))
                .collect(),
        }
    }
}

/// Header field names to drop from a request head and fields to add.
#[derive(Debug)]
pub struct FieldEdits<'a> {
    pub drop: Cow<'a, [&'a str]>,
    pub added: Cow<'a, [(&'a str, &'a [u8])]>,
}

/// How sending one request upstream ended.
#[derive(Debug)]
pub enum Sent {
    /// The final response head (interim ones went downstream already).
    Response(ResponseHead),
    /// The upstream answered before the request body had all gone (a
    /// refusal, typically): the rest of the body was not sent, and the
    /// response head is this one. Relay it, then close both connections:
    /// neither can carry another request.
    Early(ResponseHead),
    /// The upstream connection failed or closed before any byte of a
    /// response: a request without a body may go again on a new connection.
    /// The error is kept whole, so that a TLS failure behind it (a TLS 1.3
    /// server refuses a client certificate only after the client's side of
    /// the handshake is done, in the first read) can be told apart.
    Lost(io::Error),
    /// Answer this instead, then close.
    Refused(LocalFailure),
    /// The downstream side broke while its body was read: nothing more can
    /// be sent to it.
    DownstreamBroke,
}

/// How long a response may take to show up after writing the request
/// failed: the upstream may have answered and closed (a refusal of a large
/// body), and its answer can still be read. A broken connection answers a
/// read at once (data, end or error), so this only bounds the odd case.
const ANSWER_AFTER_WRITE_ERROR: std::time::Duration = std::time::Duration::from_secs(1);

/// Writes a request (`out` holds its head) and its body upstream (its
/// bytes added to `request_bytes`), then reads the response head, passing
/// interim responses downstream. With `upgrade` (a WebSocket handshake was
/// sent), a `101` is the final response. While the body goes, the upstream
/// is watched: a response that starts before the body ends stops the body
/// ([`Sent::Early`]), as Envoy's router stops sending when the upstream
/// answers early, so that a refusal reaches the client instead of a
/// failed write (`503`).
pub async fn send<U, D>(
    up: &mut U,
    up_buf: &mut BytesMut,
    down: &mut D,
    down_buf: &mut BytesMut,
    (framing, upgrade): (Framing, bool),
    out: &mut Vec<u8>,
    request_bytes: &mut u64,
) -> Sent
where
    U: AsyncRead + AsyncWrite + Unpin,
    D: AsyncRead + AsyncWrite + Unpin,
{
    let mut body = BodyState::new(framing);
    loop {
        match forward_request(down, down_buf, up, up_buf, &mut body, out, request_bytes).await {
            Ok(BodySent::Whole) => break,
            Ok(BodySent::Answered) => {}
            Err(ForwardError::Write(e)) => {
                // The upstream may have answered and closed while the body
                // was going: its answer is still readable.
                let answer = tokio::time::timeout(
                    ANSWER_AFTER_WRITE_ERROR,
                    read_one_response(up, up_buf, down, upgrade),
                )
                .await;
                return match answer {
                    Ok(Ok(Some(resp))) => Sent::Early(resp),
                    _ => Sent::Lost(e),
                };
            }
            Err(ForwardError::Body(_)) => return Sent::Refused(LocalFailure::BadBody),
            Err(ForwardError::Read(_) | ForwardError::Truncated) => return Sent::DownstreamBroke,
        }
        // The upstream spoke before the body ended: an interim response
        // (the body goes on) or the final one (it stops).
        match read_one_response(up, up_buf, down, upgrade).await {
            Ok(Some(resp)) => return Sent::Early(resp),
            Ok(None) => {}
            Err(NoResponse::Lost(e)) => return Sent::Lost(e),
            Err(NoResponse::Refused(failure)) => return Sent::Refused(failure),
        }
    }
    match read_response(up, up_buf, down, upgrade).await {
        Ok(resp) => Sent::Response(resp),
        Err(NoResponse::Lost(e)) => Sent::Lost(e),
        Err(NoResponse::Refused(failure)) => Sent::Refused(failure),
    }
}

/// Why no final response head came.
#[derive(Debug)]
pub enum NoResponse {
    /// The connection closed or failed first.
    Lost(io::Error),
    /// Answer this instead, then close.
    Refused(LocalFailure),
}

/// How relaying a response ended.
#[derive(Debug)]
pub struct Relayed {
    pub status: u16,
    /// The downstream connection must close after this response.
    pub close: bool,
    /// The upstream connection can carry another request.
    pub reusable: bool,
    /// `-`, or Envoy's flag for what broke: `DC` (downstream), `UPE`
    /// (upstream body).
    pub flags: Flag,
    /// Body bytes forwarded.
    pub bytes: u64,
}

/// Forwards `resp` and its body from `up` to `down` (with
/// `connection: close` when `close_down`, or when the body runs until the
/// upstream closes), with the fields in `extra` added to its head.
pub async fn relay<U, D>(
    up: &mut U,
    up_buf: &mut BytesMut,
    down: &mut D,
    resp: &ResponseHead,
    (method, close_down, extra): (&str, bool, &[(&str, &[u8])]),
    out: &mut Vec<u8>,
) -> Relayed
where
    U: AsyncRead + Unpin,
    D: AsyncWrite + Unpin,
{
    let framing = resp.framing(method);
    let close = close_down || framing == Framing::UntilClose;
    out.clear();
    codec::write_response_with(resp, close, extra, out);
    let mut bytes = 0;
    let result = forward(up, up_buf, down, framing, out, &mut bytes).await;
    Relayed {
        bytes,
        status: resp.status(),
        close,
        // Bytes after the response that nobody asked for mean the two sides
        // disagree on framing: such a connection carries nothing more.
        reusable: result.is_ok()
            && resp.keep_alive()
            && framing != Framing::UntilClose
            && up_buf.is_empty(),
        flags: match result {
            Ok(_) => Flag::None,
            Err(ForwardError::Write(_)) => Flag::DownstreamTermination,
            Err(_) => Flag::UpstreamProtocolError,
        },
    }
}

/// How a tunnel (an upgraded connection) ended.
#[derive(Debug)]
pub struct Tunneled {
    /// `-`, or Envoy's flag for the side that broke: `DC` (downstream),
    /// `UPE` (upstream).
    pub flags: Flag,
    /// `forwarded`, the idle timeout's reason, or the error.
    pub reason: String,
    /// Bytes from the client (after the request head) and from the
    /// application (after the `101` head).
    pub bytes: (u64, u64),
}

/// Turns an upgraded exchange into a tunnel: forwards the `101` head
/// `resp` with the bytes the application sent after it, sends upstream
/// the bytes the client sent early, then copies bytes both ways (a side
/// that closes is shut down on the other) until both sides are done,
/// nothing has moved for `idle_timeout`, or `stop` completes (with the
/// reason to log). Neither connection can carry anything else afterwards.
pub async fn tunnel<U, D, F>(
    up: &mut U,
    up_buf: &mut BytesMut,
    down: &mut D,
    down_buf: &mut BytesMut,
    resp: &ResponseHead,
    (idle_timeout, stop): (std::time::Duration, F),
    out: &mut Vec<u8>,
) -> Tunneled
where
    U: AsyncRead + AsyncWrite + Unpin,
    D: AsyncRead + AsyncWrite + Unpin,
    F: std::future::Future<Output = String>,
{
    let early = (down_buf.len() as u64, up_buf.len() as u64);
    out.clear();
    codec::write_response(resp, false, out);
    out.extend_from_slice(up_buf);
    up_buf.clear();
    if let Err(e) = write_flush(down, out).await {
        return Tunneled::broken(Flag::DownstreamTermination, &e, early);
    }
    if !down_buf.is_empty() {
        let sent = write_flush(up, down_buf).await;
        down_buf.clear();
        if let Err(e) = sent {
            return Tunneled::broken(Flag::UpstreamProtocolError, &e, early);
        }
    }
    let activity = Activity::new();
    let mut down = Counted::new(down, &activity);
    let mut up = Counted::new(up, &activity);
    let result = tokio::select! {
        r = tokio::io::copy_bidirectional(&mut down, &mut up) => r.map(|_| FORWARDED.to_string()),
        () = activity.idle(idle_timeout) => Ok(idle_reason(idle_timeout)),
        reason = stop => Ok(reason),
    };
    let bytes = (early.0 + down.bytes_read(), early.1 + up.bytes_read());
    match result {
        Ok(reason) => Tunneled {
            flags: Flag::None,
            reason,
            bytes,
        },
        Err(e) => Tunneled::broken(Flag::None, &e, bytes),
    }
}

impl Tunneled {
    fn broken(flag: Flag, e: &io::Error, bytes: (u64, u64)) -> Tunneled {
        Tunneled {
            flags: flag,
            reason: format!("tunnel broke off: {e}"),
            bytes,
        }
    }
}

async fn write_flush<W: AsyncWrite + Unpin>(w: &mut W, bytes: &[u8]) -> io::Result<()> {
    w.write_all(bytes).await?;
    w.flush().await
}

/// Reads a final response head from `up`, passing interim (1xx) responses
/// through to `down`; a `101` is final when `upgrade` (the request asked
/// for it), and a protocol error otherwise.
pub async fn read_response<U, D>(
    up: &mut U,
    buf: &mut BytesMut,
    down: &mut D,
    upgrade: bool,
) -> Result<ResponseHead, NoResponse>
where
    U: AsyncRead + Unpin,
    D: AsyncWrite + Unpin,
{
    loop {
        if let Some(resp) = read_one_response(up, buf, down, upgrade).await? {
            return Ok(resp);
        }
    }
}

/// Reads one response head from `up`: `Some` when it is final, `None` when
/// it was an interim one (passed through to `down`).
async fn read_one_response<U, D>(
    up: &mut U,
    buf: &mut BytesMut,
    down: &mut D,
    upgrade: bool,
) -> Result<Option<ResponseHead>, NoResponse>
where
    U: AsyncRead + Unpin,
    D: AsyncWrite + Unpin,
{
    let resp = match read_head(up, buf, ResponseHead::parse, None).await {
        Ok(Some(resp)) => resp,
        Ok(None) => {
            return Err(NoResponse::Lost(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed before responding",
            )));
        }
        Err(ReadError::Io(e)) => return Err(NoResponse::Lost(e)),
        // No idle timer here: waiting for a response has no limit.
        Err(ReadError::Timeout | ReadError::Idle) => {
            return Err(NoResponse::Refused(LocalFailure::Timeout));
        }
        Err(ReadError::Truncated | ReadError::Head(_)) => {
            return Err(NoResponse::Refused(LocalFailure::BadResponse));
        }
    };
    match resp.status() {
        101 if upgrade => Ok(Some(resp)),
        // The upgrade fields were not forwarded: a switch is a
        // protocol error.
        101 => Err(NoResponse::Refused(LocalFailure::BadResponse)),
        100..=199 => {
            let mut out = Vec::with_capacity(64);
            codec::write_response(&resp, false, &mut out);
            if down.write_all(&out).await.is_err() || down.flush().await.is_err() {
                return Err(NoResponse::Refused(LocalFailure::BadResponse));
            }
            Ok(None)
        }
        _ => Ok(Some(resp)),
    }
}

#[cfg(test)]
mod tests;
