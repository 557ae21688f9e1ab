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
#[derive(Debug)]
pub enum ForwardError {
    /// Reading from the sending side failed.
    Read(io::Error),
    /// The sending side closed before the body ended.
    Truncated,
    /// The chunked encoding is invalid.
    Body(codec::BodyError),
    /// Writing to the receiving side failed.
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

/// Appends a response the proxy makes itself (a deny, an error).
pub fn local_reply(status: u16, body: &str, close: bool, out: &mut Vec<u8>) {
    local_reply_with(status, body, &[], close, out);
}

/// [`local_reply`] with more header fields (names and values the proxy
/// made: no CR or LF).
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

/// The body of the `403` for an upgrade to anything but WebSocket (Envoy
/// answers these `403` too: only `websocket` upgrades are enabled in an
/// Istio sidecar).
pub const UPGRADE_REFUSED: &str = "upgrade refused: only websocket upgrades are proxied";

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

/// Envoy's body for a request whose upstream connection broke before the
/// response head.
pub const UPSTREAM_RESET: &str = "upstream connect error or disconnect/reset before headers";

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
    Refused(Failure),
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
            Err(ForwardError::Body(_)) => return Sent::Refused(BAD_BODY),
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
    Refused(Failure),
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
    pub flags: &'static str,
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
            Ok(_) => "-",
            Err(ForwardError::Write(_)) => "DC",
            Err(_) => "UPE",
        },
    }
}

/// How a tunnel (an upgraded connection) ended.
#[derive(Debug)]
pub struct Tunneled {
    /// `-`, or Envoy's flag for the side that broke: `DC` (downstream),
    /// `UPE` (upstream).
    pub flags: &'static str,
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
        return Tunneled::broken("DC", &e, early);
    }
    if !down_buf.is_empty() {
        let sent = write_flush(up, down_buf).await;
        down_buf.clear();
        if let Err(e) = sent {
            return Tunneled::broken("UPE", &e, early);
        }
    }
    let activity = Activity::new();
    let mut down = Counted::new(down, &activity);
    let mut up = Counted::new(up, &activity);
    let result = tokio::select! {
        r = tokio::io::copy_bidirectional(&mut down, &mut up) => r.map(|_| "forwarded".to_string()),
        () = activity.idle(idle_timeout) => Ok(idle_reason(idle_timeout)),
        reason = stop => Ok(reason),
    };
    let bytes = (early.0 + down.bytes_read(), early.1 + up.bytes_read());
    match result {
        Ok(reason) => Tunneled {
            flags: "-",
            reason,
            bytes,
        },
        Err(e) => Tunneled::broken("-", &e, bytes),
    }
}

impl Tunneled {
    fn broken(flags: &'static str, e: &io::Error, bytes: (u64, u64)) -> Tunneled {
        Tunneled {
            flags,
            reason: format!("tunnel broke off: {e}"),
            bytes,
        }
    }
}

async fn write_flush<W: AsyncWrite + Unpin>(w: &mut W, bytes: &[u8]) -> io::Result<()> {
    w.write_all(bytes).await?;
    w.flush().await
}

/// A request body whose chunked encoding is invalid.
pub const BAD_BODY: Failure = (400, "DPE", "bad request body");

/// What the proxy answers when an upstream response cannot be forwarded:
/// status, response flags (Envoy's) and body.
pub type Failure = (u16, &'static str, &'static str);

/// An upstream response that is not valid HTTP/1.x (or a protocol switch
/// nobody asked for).
pub const BAD_RESPONSE: Failure = (502, "UPE", "upstream sent an invalid response");
/// An upstream response head that started but did not finish in time.
pub const UPSTREAM_TIMEOUT: Failure = (504, "UT", "upstream request timeout");

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
            return Err(NoResponse::Refused(UPSTREAM_TIMEOUT));
        }
        Err(ReadError::Truncated | ReadError::Head(_)) => {
            return Err(NoResponse::Refused(BAD_RESPONSE));
        }
    };
    match resp.status() {
        101 if upgrade => Ok(Some(resp)),
        // The upgrade fields were not forwarded: a switch is a
        // protocol error.
        101 => Err(NoResponse::Refused(BAD_RESPONSE)),
        100..=199 => {
            let mut out = Vec::with_capacity(64);
            codec::write_response(&resp, false, &mut out);
            if down.write_all(&out).await.is_err() || down.flush().await.is_err() {
                return Err(NoResponse::Refused(BAD_RESPONSE));
            }
            Ok(None)
        }
        _ => Ok(Some(resp)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(raw: &str) -> RequestHead {
        let mut buf = BytesMut::from(raw);
        RequestHead::parse(&mut buf)
            .expect("valid head")
            .expect("complete head")
    }

    #[test]
    fn targets_in_each_form() {
        let h = head("GET /a?b HTTP/1.1\r\nHost: svc:80\r\n\r\n");
        let t = target(&h).unwrap();
        assert_eq!((t.host, &*t.path, t.absolute), ("svc:80", "/a?b", false));

        let h = head("GET http://other:8080/x HTTP/1.1\r\nHost: svc\r\n\r\n");
        let t = target(&h).unwrap();
        assert_eq!((t.host, &*t.path, t.absolute), ("other:8080", "/x", true));

        let h = head("GET HTTP://other?q=1 HTTP/1.1\r\nHost: svc\r\n\r\n");
        let t = target(&h).unwrap();
        assert_eq!((t.host, &*t.path), ("other", "/?q=1"));

        let h = head("OPTIONS * HTTP/1.1\r\nHost: svc\r\n\r\n");
        assert_eq!(target(&h).unwrap().path, "*");

        for bad in [
            "CONNECT svc:443 HTTP/1.1\r\nHost: svc:443\r\n\r\n",
            "CONNECT /x HTTP/1.1\r\nHost: svc\r\n\r\n",
            "GET http://user@svc/ HTTP/1.1\r\nHost: svc\r\n\r\n",
            "GET http:///x HTTP/1.1\r\nHost: svc\r\n\r\n",
            "GET ftp://svc/x HTTP/1.1\r\nHost: svc\r\n\r\n",
        ] {
            assert!(target(&head(bad)).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn a_forwarded_head_gets_the_proxys_fields_in_place_of_the_originals() {
        let rewrite = |raw: &str, xfcc: Option<&[u8]>| {
            let h = head(raw);
            let t = target(&h).unwrap();
            let r = Rewrite::new(&h, &t, xfcc, h.upgrade());
            let added: Vec<String> = r
                .added()
                .iter()
                .map(|(n, v)| format!("{n}: {}", String::from_utf8_lossy(v)))
                .collect();
            (added, r.drop)
        };
        let (added, drop) = rewrite(
            "GET /a HTTP/1.1\r\nHost: svc\r\nX-Forwarded-Client-Cert: forged\r\n\r\n",
            Some(b"By=me"),
        );
        assert_eq!(added, ["x-forwarded-client-cert: By=me"]);
        assert_eq!(drop, [XFCC]);
        // An absolute-form target's authority becomes the Host.
        let (added, drop) = rewrite("GET http://other:81/a HTTP/1.1\r\nHost: svc\r\n\r\n", None);
        assert_eq!(added, ["host: other:81"]);
        assert_eq!(drop, [XFCC, "host"]);
        // A WebSocket handshake keeps its upgrade fields; h2c does not.
        let (added, _) = rewrite(
            "GET /ws HTTP/1.1\r\nHost: svc\r\nConnection: Upgrade\r\nUpgrade: WebSocket\r\n\r\n",
            None,
        );
        assert_eq!(added, ["connection: upgrade", "upgrade: WebSocket"]);
        let (added, _) = rewrite(
            "GET / HTTP/1.1\r\nHost: svc\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n",
            None,
        );
        assert!(added.is_empty(), "{added:?}");
    }

    #[tokio::test]
    async fn forward_takes_exactly_the_body_and_leaves_the_next_request() {
        let mut src: &[u8] = b"lo wor";
        let mut buf = BytesMut::from(&b"hel"[..]);
        let mut dst = Vec::new();
        let mut out = b"HEAD\r\n".to_vec();
        let mut n = 0;
        forward(
            &mut src,
            &mut buf,
            &mut dst,
            Framing::Length(5),
            &mut out,
            &mut n,
        )
        .await
        .unwrap();
        assert_eq!(n, 5);
        assert_eq!(dst, b"HEAD\r\nhello");
        assert_eq!(&buf[..], b" wor", "bytes after the body stay buffered");
    }

    #[tokio::test]
    async fn bytes_after_a_response_make_its_connection_unusable() {
        for (extra, reusable) in [(&b""[..], true), (&b"HTTP/1.1 200 OK\r\n"[..], false)] {
            let mut head_buf = BytesMut::from(&b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n"[..]);
            let resp = ResponseHead::parse(&mut head_buf).unwrap().unwrap();
            let mut up_buf = BytesMut::from(&[&b"ok"[..], extra].concat()[..]);
            let mut up: &[u8] = b"";
            let mut down = Vec::new();
            let r = relay(
                &mut up,
                &mut up_buf,
                &mut down,
                &resp,
                ("GET", false, &[]),
                &mut Vec::new(),
            )
            .await;
            assert_eq!(
                (r.status, r.flags, r.reusable),
                (200, "-", reusable),
                "{extra:?}"
            );
            assert!(down.ends_with(b"\r\n\r\nok"));
        }
    }

    #[tokio::test]
    async fn forward_reports_a_truncated_body() {
        let mut src: &[u8] = b"";
        let mut buf = BytesMut::from(&b"abc"[..]);
        let mut dst = Vec::new();
        let mut n = 0;
        let r = forward(
            &mut src,
            &mut buf,
            &mut dst,
            Framing::Length(10),
            &mut Vec::new(),
            &mut n,
        )
        .await;
        assert!(matches!(r, Err(ForwardError::Truncated)), "{r:?}");
        assert_eq!(n, 3, "what got through is counted");
    }

    #[tokio::test]
    async fn forward_chunked_stops_at_the_last_chunk() {
        let body = b"3\r\nabc\r\n0\r\n\r\nGET / HTTP/1.1\r\n";
        let mut src: &[u8] = &body[5..];
        let mut buf = BytesMut::from(&body[..5]);
        let mut dst = Vec::new();
        let mut n = 0;
        forward(
            &mut src,
            &mut buf,
            &mut dst,
            Framing::Chunked,
            &mut Vec::new(),
            &mut n,
        )
        .await
        .unwrap();
        assert_eq!(n, 3, "the payload, not the chunk lines");
        assert_eq!(dst, &body[..13]);
        assert_eq!(&buf[..], b"GET / HTTP/1.1\r\n");
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_left_unfinished_times_out_but_an_idle_connection_does_not() {
        let (mut client, mut server) = tokio::io::duplex(1024);
        let mut buf = BytesMut::new();
        // Nothing sent: waiting has no limit (paused time would otherwise
        // jump straight to any timer).
        let idle = tokio::time::timeout(
            HEAD_TIMEOUT * 10,
            read_head(&mut server, &mut buf, RequestHead::parse, None),
        )
        .await;
        assert!(idle.is_err(), "still waiting after ten head timeouts");
        client.write_all(b"GET / HTTP/1.1\r\nHost:").await.unwrap();
        let started = tokio::time::Instant::now();
        let r = read_head(&mut server, &mut buf, RequestHead::parse, None).await;
        assert!(matches!(r, Err(ReadError::Timeout)), "{r:?}");
        assert_eq!(started.elapsed(), HEAD_TIMEOUT);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_is_closed_without_an_answer() {
        let (mut client, mut server) = tokio::io::duplex(1024);
        let mut buf = BytesMut::new();
        let timeout = std::time::Duration::from_secs(3600);
        let mut idle = IdleTimer::new(timeout);
        let peer = "127.0.0.1:1".parse().unwrap();
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        let head = next_request(&mut server, &mut buf, peer, &mut idle).await;
        assert_eq!(head.map(|h| h.method().to_string()).as_deref(), Some("GET"));
        let started = tokio::time::Instant::now();
        assert!(
            next_request(&mut server, &mut buf, peer, &mut idle)
                .await
                .is_none()
        );
        assert_eq!(started.elapsed(), timeout);
        drop(server);
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.unwrap();
        assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));
    }

    fn switch() -> ResponseHead {
        let mut buf = BytesMut::from(
            &b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"[..],
        );
        ResponseHead::parse(&mut buf).unwrap().unwrap()
    }

    /// A tunnel for `switch()` between `up` and `down`, with the bytes
    /// each side sent early, in a task.
    fn spawn_tunnel<F>(
        mut up: tokio::io::DuplexStream,
        mut down: tokio::io::DuplexStream,
        (up_early, down_early): (&'static [u8], &'static [u8]),
        ends: (std::time::Duration, F),
    ) -> tokio::task::JoinHandle<Tunneled>
    where
        F: std::future::Future<Output = String> + Send + 'static,
    {
        tokio::spawn(async move {
            let mut up_buf = BytesMut::from(up_early);
            let mut down_buf = BytesMut::from(down_early);
            let resp = switch();
            tunnel(
                &mut up,
                &mut up_buf,
                &mut down,
                &mut down_buf,
                &resp,
                ends,
                &mut Vec::new(),
            )
            .await
        })
    }

    /// Reads exactly `n` bytes.
    async fn take<S: AsyncRead + Unpin>(s: &mut S, n: usize) -> String {
        let mut b = vec![0u8; n];
        s.read_exact(&mut b).await.unwrap();
        String::from_utf8(b).unwrap()
    }

    #[tokio::test]
    async fn a_tunnel_carries_early_bytes_both_ways_and_half_closes() {
        let (up, mut app) = tokio::io::duplex(1024);
        let (down, mut client) = tokio::io::duplex(1024);
        let hour = std::time::Duration::from_secs(3600);
        let ends = (hour, std::future::pending::<String>());
        let tunnel = spawn_tunnel(up, down, (b"app-first", b"client-first"), ends);
        let head =
            "HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n";
        assert_eq!(
            take(&mut client, head.len() + 9).await,
            format!("{head}app-first")
        );
        assert_eq!(take(&mut app, 12).await, "client-first");
        client.write_all(b"ping").await.unwrap();
        assert_eq!(take(&mut app, 4).await, "ping");
        app.write_all(b"pong").await.unwrap();
        assert_eq!(take(&mut client, 4).await, "pong");
        // The client is done sending: the application sees the end, and
        // can still answer.
        client.shutdown().await.unwrap();
        let mut rest = Vec::new();
        app.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        app.write_all(b"bye").await.unwrap();
        drop(app);
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"bye");
        let t = tunnel.await.unwrap();
        assert_eq!((t.flags, t.reason.as_str()), ("-", "forwarded"));
        assert_eq!(t.bytes, (12 + 4, 9 + 4 + 3));
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_tunnel_is_closed_after_the_idle_timeout() {
        let (up, mut app) = tokio::io::duplex(1024);
        let (down, mut client) = tokio::io::duplex(1024);
        let timeout = std::time::Duration::from_secs(600);
        let started = tokio::time::Instant::now();
        let ends = (timeout, std::future::pending::<String>());
        let tunnel = spawn_tunnel(up, down, (b"", b""), ends);
        let mut head = [0u8; 12];
        client.read_exact(&mut head).await.unwrap();
        // Traffic halfway through restarts the wait.
        tokio::time::sleep(timeout / 2).await;
        client.write_all(b"x").await.unwrap();
        assert_eq!(take(&mut app, 1).await, "x");
        let moved = tokio::time::Instant::now();
        let t = tunnel.await.unwrap();
        assert!(t.reason.starts_with("idle_timeout"), "{}", t.reason);
        assert!(moved.elapsed() >= timeout, "{:?}", moved.elapsed());
        assert!(started.elapsed() < timeout * 2, "{:?}", started.elapsed());
    }

    #[tokio::test]
    async fn a_tunnel_ends_when_told_to_with_the_reason() {
        let (up, mut app) = tokio::io::duplex(1024);
        let (down, mut client) = tokio::io::duplex(1024);
        let (tell, told) = tokio::sync::oneshot::channel::<()>();
        let stop = async move {
            let _ = told.await;
            "policy_changed".to_string()
        };
        let tunnel = spawn_tunnel(
            up,
            down,
            (b"", b""),
            (std::time::Duration::from_secs(3600), stop),
        );
        let mut head = [0u8; 12];
        client.read_exact(&mut head).await.unwrap();
        client.write_all(b"x").await.unwrap();
        assert_eq!(take(&mut app, 1).await, "x");
        tell.send(()).unwrap();
        let t = tunnel.await.unwrap();
        assert_eq!((t.flags, t.reason.as_str()), ("-", "policy_changed"));
        // Both connections are closed with it.
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        app.read_to_end(&mut rest).await.unwrap();
    }

    #[tokio::test]
    async fn the_h2_preface_is_recognised_across_reads() {
        let mut src: &[u8] = &H2_PREFACE[3..];
        let mut buf = BytesMut::from(&H2_PREFACE[..3]);
        assert_eq!(sniff_h2(&mut src, &mut buf).await.unwrap(), Some(true));
        let mut src: &[u8] = b"T / HTTP/1.1\r\n";
        let mut buf = BytesMut::from(&b"GE"[..]);
        assert_eq!(sniff_h2(&mut src, &mut buf).await.unwrap(), Some(false));
        assert_eq!(&buf[..], b"GE", "nothing is consumed");
        let mut src: &[u8] = b"";
        let mut buf = BytesMut::new();
        assert_eq!(sniff_h2(&mut src, &mut buf).await.unwrap(), None);
    }
}
