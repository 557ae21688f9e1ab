//! HTTP/1.x message heads and body framing for the proxy's HTTP/1.1 fast
//! path (RFC 9112). Heads are parsed with `httparse` and kept as the raw
//! bytes plus offsets, so nothing is copied or allocated per header; bodies
//! are forwarded as they arrive, and this module says where each one ends.
//!
//! Security rules (request smuggling): everything ambiguous is refused, not
//! repaired. See the docs of [`RequestHead::parse`] and
//! [`ResponseHead::parse`].

use std::mem::MaybeUninit;
use std::ops::Range;

use bytes::{Bytes, BytesMut};

/// Largest request or response head accepted (Envoy's default is 60 KiB).
pub const MAX_HEAD: usize = 60 * 1024;
/// Most header fields in one head (Envoy's default is 100).
pub const MAX_HEADERS: usize = 100;
/// Largest trailer section of a chunked body.
pub const MAX_TRAILERS: usize = 60 * 1024;

/// HTTP/1.0 or HTTP/1.1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    Http10,
    Http11,
}

/// Where a message body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body.
    Empty,
    /// Exactly this many bytes (may be 0).
    Length(u64),
    /// `Transfer-Encoding: ...chunked`: forwarded as is, ended by the last
    /// chunk and the trailer section (see [`ChunkedScanner`]).
    Chunked,
    /// Responses only: the body runs until the server closes.
    UntilClose,
}

/// Why a head was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    #[error("message head larger than {MAX_HEAD} bytes")]
    TooLarge,
    #[error("more than {MAX_HEADERS} header fields")]
    TooManyHeaders,
    #[error("invalid message head: {0}")]
    Invalid(&'static str),
    /// A request `Transfer-Encoding` other than `chunked` alone.
    #[error("unsupported transfer encoding")]
    UnsupportedTransferEncoding,
}

impl HeadError {
    /// The status a proxy answers a bad request head with: 431 for size
    /// limits, 501 for a transfer coding other than `chunked` (as Envoy
    /// answers, and RFC 9112 section 6.1 advises), 400 otherwise.
    pub fn status(&self) -> u16 {
        match self {
            HeadError::TooLarge | HeadError::TooManyHeaders => 431,
            HeadError::UnsupportedTransferEncoding => 501,
            HeadError::Invalid(_) => 400,
        }
    }
}

/// Why a chunked body was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error("invalid chunked body: {0}")]
    Invalid(&'static str),
}

/// What a request asks to switch to (`Connection: upgrade` with an
/// `Upgrade` field, HTTP/1.1 only), as the proxy treats it. An Istio
/// sidecar's Envoy enables the `websocket` upgrade only: other protocols
/// are refused with `403`, except `h2c`, whose upgrade fields are dropped
/// so that the request goes on as plain HTTP/1.1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upgrade {
    /// No upgrade asked for (or an `h2c` one, dropped): the request is
    /// forwarded as HTTP/1.1.
    Absent,
    /// A WebSocket handshake: forwarded with its upgrade fields; a `101`
    /// answer turns the connection into a byte tunnel.
    WebSocket,
    /// Any other protocol: refused.
    Unsupported,
}

/// A parsed request head: the raw bytes and offsets into them.
#[derive(Debug, Clone)]
pub struct RequestHead {
    raw: Bytes,
    method: Range<usize>,
    target: Range<usize>,
    version: Version,
    headers: Vec<(Range<usize>, Range<usize>)>,
    content_length: Option<u64>,
    chunked: bool,
}

/// A parsed response head.
#[derive(Debug, Clone)]
pub struct ResponseHead {
    raw: Bytes,
    status: u16,
    reason: Range<usize>,
    version: Version,
    headers: Vec<(Range<usize>, Range<usize>)>,
    content_length: Option<u64>,
    /// `Transfer-Encoding` present, and its last coding is `chunked`.
    chunked: bool,
    /// `Transfer-Encoding` present.
    has_te: bool,
}

impl RequestHead {
    /// Parses a request head at the start of `buf`. On success the head's
    /// bytes are split off `buf` (what follows stays in `buf`). `Ok(None)`:
    /// incomplete, read more (unless `buf` already holds `MAX_HEAD` bytes,
    /// which is `Err(TooLarge)`).
    ///
    /// Refused as [`HeadError::Invalid`]: an HTTP/1.1 request without
    /// exactly one `Host`, an HTTP/1.0 one with several; `Content-Length`
    /// values that are not all the same 1 to 19 digits; any
    /// `Transfer-Encoding` together with `Content-Length` or in HTTP/1.0.
    /// Refused as [`HeadError::UnsupportedTransferEncoding`]: any
    /// `Transfer-Encoding` but the single coding `chunked` (in any case,
    /// with empty list elements ignored). RFC 9112 lets a request carry
    /// other codings before `chunked` (`gzip, chunked`), but Envoy refuses
    /// them (501), and `identity, chunked` is how request smuggling gets
    /// past parsers that take `identity` to mean "no coding": with one
    /// reading only, proxy and application cannot disagree.
    pub fn parse(buf: &mut BytesMut) -> Result<Option<RequestHead>, HeadError> {
        // Slots httparse fills as it parses: nothing to initialize first.
        let mut slots = [const { MaybeUninit::uninit() }; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut []);
        // Never look further than MAX_HEAD bytes: a head that does not end
        // within them is too large anyway.
        let window = &buf[..buf.len().min(MAX_HEAD)];
        let Some(len) = head_len(req.parse_with_uninit_headers(window, &mut slots), buf.len())?
        else {
            return Ok(None);
        };
        let base: &[u8] = window;
        let version = map_version(req.version)?;
        let method = req.method.ok_or(HeadError::Invalid("no method"))?;
        let target = req.path.ok_or(HeadError::Invalid("no request-target"))?;
        let method = offset(base, method.as_bytes()).ok_or(HeadError::Invalid("method"))?;
        let target = offset(base, target.as_bytes()).ok_or(HeadError::Invalid("request-target"))?;
        let headers = header_offsets(base, req.headers)?;

        let fields = FramingFields::scan(base, &headers);
        match (version, fields.hosts) {
            (_, 2..) => return Err(HeadError::Invalid("more than one Host")),
            (Version::Http11, 0) => return Err(HeadError::Invalid("no Host")),
            _ => {}
        }
        let content_length = fields.content_length?;
        let te = fields.transfer_encoding;
        if te.present {
            if content_length.is_some() {
                return Err(HeadError::Invalid("Transfer-Encoding with Content-Length"));
            }
            if version == Version::Http10 {
                return Err(HeadError::Invalid("Transfer-Encoding in HTTP/1.0"));
            }
            if !(te.chunked && te.codings == 1) {
                return Err(HeadError::UnsupportedTransferEncoding);
            }
        }

        let raw = buf.split_to(len).freeze();
        Ok(Some(RequestHead {
            raw,
            method,
            target,
            version,
            headers,
            content_length,
            chunked: te.chunked,
        }))
    }

    pub fn method(&self) -> &str {
        // httparse only accepts token bytes (ASCII) in the method.
        std::str::from_utf8(&self.raw[self.method.clone()]).unwrap_or("")
    }

    /// The request-target as sent (origin-form, absolute-form, ...).
    pub fn target(&self) -> &str {
        // httparse checked the target is UTF-8 (in fact visible ASCII).
        std::str::from_utf8(&self.raw[self.target.clone()]).unwrap_or("")
    }

    pub fn version(&self) -> Version {
        self.version
    }

    /// The first value of a header (name case-insensitive).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        values(&self.raw, &self.headers, name).next()
    }

    /// Every value of a header, in order.
    pub fn headers<'a, 'n>(
        &'a self,
        name: &'n str,
    ) -> impl Iterator<Item = &'a [u8]> + use<'a, 'n> {
        values(&self.raw, &self.headers, name)
    }

    /// Every header field, in order: name (as sent) and value.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.headers.iter().map(|(n, v)| {
            // httparse accepts only token characters in names: ASCII.
            (
                std::str::from_utf8(&self.raw[n.clone()]).unwrap_or(""),
                &self.raw[v.clone()],
            )
        })
    }

    /// The body framing (request rules).
    pub fn framing(&self) -> Framing {
        if self.chunked {
            Framing::Chunked
        } else if let Some(n) = self.content_length {
            Framing::Length(n)
        } else {
            Framing::Empty
        }
    }

    /// Whether the client keeps the connection open after this exchange.
    pub fn keep_alive(&self) -> bool {
        keep_alive(&self.raw, &self.headers, self.version)
    }

    /// What the request asks to upgrade to. Only an HTTP/1.1 request with
    /// the `upgrade` token in `Connection` and exactly one `Upgrade` field
    /// asks; `websocket` is compared case-insensitively, as Envoy does.
    pub fn upgrade(&self) -> Upgrade {
        if self.version != Version::Http11
            || !connection_tokens(&self.raw, &self.headers)
                .any(|t| t.eq_ignore_ascii_case(b"upgrade"))
        {
            return Upgrade::Absent;
        }
        let mut fields = values(&self.raw, &self.headers, "upgrade");
        let (Some(value), None) = (fields.next(), fields.next()) else {
            return if self.header("upgrade").is_some() {
                Upgrade::Unsupported
            } else {
                Upgrade::Absent
            };
        };
        let value = trim_ows(value);
        if value.eq_ignore_ascii_case(b"websocket") {
            Upgrade::WebSocket
        } else if value.eq_ignore_ascii_case(b"h2c") {
            Upgrade::Absent
        } else {
            Upgrade::Unsupported
        }
    }

    /// `Expect: 100-continue`.
    pub fn expects_continue(&self) -> bool {
        values(&self.raw, &self.headers, "expect")
            .any(|v| trim_ows(v).eq_ignore_ascii_case(b"100-continue"))
    }
}

impl ResponseHead {
    /// Parses a response head at the start of `buf`, like
    /// [`RequestHead::parse`].
    ///
    /// Refused as [`HeadError::Invalid`]: a status code below 100;
    /// `Content-Length` values that are not all the same 1 to 19 digits;
    /// `chunked` anywhere but once, last, in `Transfer-Encoding`.
    pub fn parse(buf: &mut BytesMut) -> Result<Option<ResponseHead>, HeadError> {
        let mut slots = [const { MaybeUninit::uninit() }; MAX_HEADERS];
        let mut res = httparse::Response::new(&mut []);
        let window = &buf[..buf.len().min(MAX_HEAD)];
        let Some(len) = head_len(
            httparse::ParserConfig::default()
                .parse_response_with_uninit_headers(&mut res, window, &mut slots),
            buf.len(),
        )?
        else {
            return Ok(None);
        };
        let base: &[u8] = window;
        let version = map_version(res.version)?;
        let status = res.code.ok_or(HeadError::Invalid("no status code"))?;
        if status < 100 {
            return Err(HeadError::Invalid("status code below 100"));
        }
        // httparse gives a static "" (not a view of the buffer) for an
        // absent reason or one with obs-text: both are forwarded empty.
        let reason = res
            .reason
            .and_then(|r| offset(base, r.as_bytes()))
            .unwrap_or(0..0);
        let headers = header_offsets(base, res.headers)?;
        let fields = FramingFields::scan(base, &headers);
        let content_length = fields.content_length?;
        let te = fields.transfer_encoding;
        if te.chunked_codings > 1 || (te.chunked_codings == 1 && !te.chunked) {
            return Err(HeadError::Invalid(
                "chunked not once and last in Transfer-Encoding",
            ));
        }

        let raw = buf.split_to(len).freeze();
        Ok(Some(ResponseHead {
            raw,
            status,
            reason,
            version,
            headers,
            content_length,
            chunked: te.chunked,
            has_te: te.present,
        }))
    }

    pub fn status(&self) -> u16 {
        self.status
    }

    pub fn version(&self) -> Version {
        self.version
    }

    /// The first value of a header (name case-insensitive).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        values(&self.raw, &self.headers, name).next()
    }

    /// The body framing of this response to a request with `method`.
    pub fn framing(&self, method: &str) -> Framing {
        if method == "HEAD"
            || (100..200).contains(&self.status)
            || self.status == 204
            || self.status == 304
        {
            Framing::Empty
        } else if self.chunked {
            Framing::Chunked
        } else if self.has_te {
            Framing::UntilClose
        } else if let Some(n) = self.content_length {
            Framing::Length(n)
        } else {
            Framing::UntilClose
        }
    }

    /// Whether the server keeps the connection open after this response.
    pub fn keep_alive(&self) -> bool {
        keep_alive(&self.raw, &self.headers, self.version)
    }
}

/// Appends a request head to forward to `out`.
///
/// Headers keep their order and bytes, minus the hop-by-hop ones (and those
/// the `Connection` header names), those named in `drop`, and the
/// `Content-Length` fields, replaced by one normalised field when the
/// framing is [`Framing::Length`]. `extra` follows, then
/// `connection: close` when `close`. `extra` must be valid field names and
/// values: they are written as they are.
pub fn write_request(
    head: &RequestHead,
    target: &str,
    drop: &[&str],
    extra: &[(&str, &[u8])],
    close: bool,
    out: &mut Vec<u8>,
) {
    out.reserve(head.raw.len() + target.len() + 64);
    out.extend_from_slice(&head.raw[head.method.clone()]);
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.push(b' ');
    out.extend_from_slice(version_str(head.version));
    out.extend_from_slice(b"\r\n");
    let length = match head.framing() {
        Framing::Length(n) => Some(n),
        _ => None,
    };
    write_fields(&head.raw, &head.headers, drop, length, out);
    for (name, value) in extra {
        debug_assert!(
            !name
                .bytes()
                .chain(value.iter().copied())
                .any(|b| b == b'\r' || b == b'\n')
        );
        write_field(out, name.as_bytes(), value);
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Appends a response head to forward to `out`.
///
/// Like [`write_request`]; `Content-Length` is dropped whenever
/// `Transfer-Encoding` is present (RFC 9112 section 6.3), otherwise
/// normalised to one field. A `101` (forwarded only when the proxy tunnels
/// an upgrade it asked for) keeps its `Upgrade` fields, with
/// `connection: upgrade`.
pub fn write_response(head: &ResponseHead, close: bool, out: &mut Vec<u8>) {
    write_response_with(head, close, &[], out);
}

/// [`write_response`] with fields the proxy adds (an external
/// authorization provider's `headersToDownstreamOnAllow`).
pub fn write_response_with(
    head: &ResponseHead,
    close: bool,
    extra: &[(&str, &[u8])],
    out: &mut Vec<u8>,
) {
    out.reserve(head.raw.len() + 32);
    out.extend_from_slice(version_str(head.version));
    out.push(b' ');
    // Three digits: parse refused codes below 100, httparse reads three.
    let status = head.status;
    out.extend_from_slice(&[
        b'0' + (status / 100 % 10) as u8,
        b'0' + (status / 10 % 10) as u8,
        b'0' + (status % 10) as u8,
    ]);
    out.push(b' ');
    out.extend_from_slice(&head.raw[head.reason.clone()]);
    out.extend_from_slice(b"\r\n");
    // With Transfer-Encoding, chunked or not, Content-Length is not the
    // framing and must not reach the client (it would desync it).
    let length = if head.has_te {
        None
    } else {
        head.content_length
    };
    write_fields(&head.raw, &head.headers, &[], length, out);
    for (name, value) in extra {
        write_field(out, name.as_bytes(), value);
    }
    if head.status == 101 {
        // The switch itself: its upgrade fields are the point of it.
        out.extend_from_slice(b"connection: upgrade\r\n");
        for value in values(&head.raw, &head.headers, "upgrade") {
            write_field(out, b"upgrade", value);
        }
    } else if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Finds the end of a chunked body in the bytes that follow its head.
#[derive(Debug, Default)]
pub struct ChunkedScanner {
    state: Chunk,
    /// Bytes of the current chunk line's extensions.
    ext_len: usize,
    /// Bytes of the trailer section so far.
    trailer_len: usize,
    /// Chunk data bytes so far (the body's payload, without its framing).
    data: u64,
}

/// Where a [`ChunkedScanner`] is in the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Chunk {
    /// At the start of a chunk line.
    #[default]
    SizeStart,
    /// In the chunk-size, after `digits` hex digits.
    Size {
        size: u64,
        digits: u8,
    },
    /// Whitespace after the size: must lead to `;`.
    SizeBws {
        size: u64,
    },
    /// In the chunk extensions.
    Ext {
        size: u64,
    },
    /// CR of the chunk line seen.
    SizeLf {
        size: u64,
    },
    /// This many data bytes to go.
    Data {
        left: u64,
    },
    DataCr,
    DataLf,
    /// Start of a trailer field line or of the final CRLF.
    TrailerStart,
    TrailerName,
    TrailerValue,
    TrailerLf,
    /// CR of the final line seen.
    EndLf,
    Done,
    Failed,
}

impl ChunkedScanner {
    /// Scans the next bytes of the body. Returns how many of them belong to
    /// the body and whether it ended within them.
    /// Chunk data bytes scanned so far: the payload, without chunk lines
    /// and trailers.
    pub fn data_bytes(&self) -> u64 {
        self.data
    }

    pub fn scan(&mut self, data: &[u8]) -> Result<(usize, bool), BodyError> {
        match self.state {
            Chunk::Done => return Ok((0, true)),
            Chunk::Failed => return Err(BodyError::Invalid("body already refused")),
            _ => {}
        }
        match self.run(data) {
            Ok(r) => Ok(r),
            Err(e) => {
                self.state = Chunk::Failed;
                Err(BodyError::Invalid(e))
            }
        }
    }

    fn run(&mut self, data: &[u8]) -> Result<(usize, bool), &'static str> {
        let mut i = 0;
        while i < data.len() {
            if let Chunk::Data { left } = self.state {
                // Bulk skip: no per-byte work over chunk data.
                let avail = data.len() - i;
                let take = usize::try_from(left).map_or(avail, |l| l.min(avail));
                i += take;
                self.data += take as u64;
                // take <= left, both fit in u64.
                let left = left - take as u64;
                self.state = if left == 0 {
                    Chunk::DataCr
                } else {
                    Chunk::Data { left }
                };
                continue;
            }
            let b = data[i];
            i += 1;
            self.state = match self.state {
                Chunk::SizeStart => match hex(b) {
                    Some(d) => Chunk::Size {
                        size: u64::from(d),
                        digits: 1,
                    },
                    None => return Err("bad chunk size"),
                },
                Chunk::Size { size, digits } => {
                    if let Some(d) = hex(b) {
                        // 16 hex digits fill a u64 exactly: no overflow.
                        if digits >= 16 {
                            return Err("chunk size too large");
                        }
                        Chunk::Size {
                            size: size << 4 | u64::from(d),
                            digits: digits + 1,
                        }
                    } else {
                        self.after_size(size, b)?
                    }
                }
                Chunk::SizeBws { size } => match b {
                    b' ' | b'\t' => Chunk::SizeBws { size },
                    b';' => self.after_size(size, b)?,
                    _ => return Err("whitespace after chunk size"),
                },
                Chunk::Ext { size } => match b {
                    b'\r' => Chunk::SizeLf { size },
                    b'\t' | b' '..=b'~' => {
                        self.ext_len += 1;
                        if self.ext_len > MAX_CHUNK_EXT {
                            return Err("chunk extensions too long");
                        }
                        Chunk::Ext { size }
                    }
                    _ => return Err("bad byte in chunk extensions"),
                },
                Chunk::SizeLf { size } => match b {
                    b'\n' if size == 0 => Chunk::TrailerStart,
                    b'\n' => Chunk::Data { left: size },
                    _ => return Err("chunk line not ended by CRLF"),
                },
                Chunk::Data { .. } | Chunk::Done | Chunk::Failed => {
                    unreachable!("handled above")
                }
                Chunk::DataCr => match b {
                    b'\r' => Chunk::DataLf,
                    _ => return Err("chunk data not followed by CRLF"),
                },
                Chunk::DataLf => match b {
                    b'\n' => Chunk::SizeStart,
                    _ => return Err("chunk data not followed by CRLF"),
                },
                Chunk::TrailerStart => {
                    self.count_trailer()?;
                    match b {
                        b'\r' => Chunk::EndLf,
                        b' ' | b'\t' => return Err("obs-fold in trailers"),
                        _ if is_tchar(b) => Chunk::TrailerName,
                        _ => return Err("bad trailer field name"),
                    }
                }
                Chunk::TrailerName => {
                    self.count_trailer()?;
                    match b {
                        b':' => Chunk::TrailerValue,
                        _ if is_tchar(b) => Chunk::TrailerName,
                        _ => return Err("bad trailer field name"),
                    }
                }
                Chunk::TrailerValue => {
                    self.count_trailer()?;
                    match b {
                        b'\r' => Chunk::TrailerLf,
                        b'\t' | b' '..=b'~' | 0x80.. => Chunk::TrailerValue,
                        _ => return Err("bad byte in trailer field value"),
                    }
                }
                Chunk::TrailerLf => {
                    self.count_trailer()?;
                    match b {
                        b'\n' => Chunk::TrailerStart,
                        _ => return Err("trailer line not ended by CRLF"),
                    }
                }
                Chunk::EndLf => {
                    self.count_trailer()?;
                    match b {
                        b'\n' => {
                            self.state = Chunk::Done;
                            return Ok((i, true));
                        }
                        _ => return Err("trailer section not ended by CRLF"),
                    }
                }
            };
        }
        Ok((data.len(), false))
    }

    /// The byte `b` ends the hex digits of a chunk size.
    fn after_size(&mut self, size: u64, b: u8) -> Result<Chunk, &'static str> {
        match b {
            b'\r' => Ok(Chunk::SizeLf { size }),
            b' ' | b'\t' => Ok(Chunk::SizeBws { size }),
            b';' => {
                self.ext_len = 1;
                Ok(Chunk::Ext { size })
            }
            _ => Err("bad chunk size"),
        }
    }

    fn count_trailer(&mut self) -> Result<(), &'static str> {
        self.trailer_len += 1;
        if self.trailer_len > MAX_TRAILERS {
            Err("trailer section too large")
        } else {
            Ok(())
        }
    }
}

/// A header field: the offsets of its name and value in the raw head.
type Field = (Range<usize>, Range<usize>);

/// Longest chunk extensions on one chunk line, from the first `;`.
const MAX_CHUNK_EXT: usize = 4096;

/// The hop-by-hop fields never forwarded (`te` is, as `te: trailers`).
const HOP_BY_HOP: [&[u8]; 6] = [
    b"connection",
    b"keep-alive",
    b"proxy-connection",
    b"upgrade",
    b"expect",
    b"te",
];

/// Fields a `Connection` token cannot remove: they frame the message or
/// route it, and dropping them would desync or misroute the next hop.
const NOT_CONNECTION_LISTED: [&[u8]; 3] = [b"host", b"content-length", b"transfer-encoding"];

fn map_httparse(e: httparse::Error) -> HeadError {
    HeadError::Invalid(match e {
        httparse::Error::TooManyHeaders => return HeadError::TooManyHeaders,
        httparse::Error::HeaderName => "header name",
        httparse::Error::HeaderValue => "header value",
        httparse::Error::NewLine => "line ending",
        httparse::Error::Status => "status line",
        httparse::Error::Token => "request line",
        httparse::Error::Version => "version",
    })
}

fn map_version(v: Option<u8>) -> Result<Version, HeadError> {
    match v {
        Some(0) => Ok(Version::Http10),
        Some(1) => Ok(Version::Http11),
        _ => Err(HeadError::Invalid("version")),
    }
}

fn version_str(v: Version) -> &'static [u8] {
    match v {
        Version::Http10 => b"HTTP/1.0",
        Version::Http11 => b"HTTP/1.1",
    }
}

/// Where `part`, a view of `base`, lies in it; `None` if it is not one.
fn offset(base: &[u8], part: &[u8]) -> Option<Range<usize>> {
    let start = (part.as_ptr() as usize).checked_sub(base.as_ptr() as usize)?;
    let end = start.checked_add(part.len())?;
    (end <= base.len()).then_some(start..end)
}

fn header_offsets(base: &[u8], headers: &[httparse::Header<'_>]) -> Result<Vec<Field>, HeadError> {
    headers
        .iter()
        .map(|h| {
            let name = offset(base, h.name.as_bytes()).ok_or(HeadError::Invalid("header name"))?;
            let value = offset(base, h.value).ok_or(HeadError::Invalid("header value"))?;
            Ok((name, value))
        })
        .collect()
}

/// The length of a complete head from httparse's answer; `None` while it is
/// incomplete. A head longer than [`MAX_HEAD`], or not complete within
/// that many buffered bytes, is too large.
fn head_len(parsed: httparse::Result<usize>, buffered: usize) -> Result<Option<usize>, HeadError> {
    match parsed {
        Ok(httparse::Status::Complete(len)) if len > MAX_HEAD => Err(HeadError::TooLarge),
        Ok(httparse::Status::Complete(len)) => Ok(Some(len)),
        Ok(httparse::Status::Partial) if buffered >= MAX_HEAD => Err(HeadError::TooLarge),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(e) => Err(map_httparse(e)),
    }
}

/// The values of the headers named `name`, in order.
fn values<'a, 'n>(
    raw: &'a [u8],
    headers: &'a [Field],
    name: &'n str,
) -> impl Iterator<Item = &'a [u8]> + use<'a, 'n> {
    headers
        .iter()
        .filter(move |(n, _)| raw[n.clone()].eq_ignore_ascii_case(name.as_bytes()))
        .map(move |(_, v)| &raw[v.clone()])
}

fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// The elements of a comma-separated list value, trimmed (empty ones kept).
fn list(v: &[u8]) -> impl Iterator<Item = &[u8]> {
    v.split(|&b| b == b',').map(trim_ows)
}

/// What the fields that frame or route a message say, found in one pass
/// over the fields (names compared by length first).
struct FramingFields {
    /// `Host` fields.
    hosts: usize,
    /// Refused: values that are not all the same 1 to 19 digits.
    content_length: Result<Option<u64>, HeadError>,
    transfer_encoding: TransferEncoding,
}

impl FramingFields {
    fn scan(raw: &[u8], headers: &[Field]) -> FramingFields {
        let mut hosts = 0;
        let mut length = Ok(None);
        let mut te = TransferEncoding {
            present: false,
            chunked: false,
            codings: 0,
            chunked_codings: 0,
        };
        for (n, v) in headers {
            let name = &raw[n.clone()];
            let value = &raw[v.clone()];
            match name.len() {
                4 if name.eq_ignore_ascii_case(b"host") => hosts += 1,
                14 if name.eq_ignore_ascii_case(b"content-length") => {
                    if let Ok(found) = &mut length
                        && let Err(e) = content_length(value, found)
                    {
                        length = Err(e);
                    }
                }
                17 if name.eq_ignore_ascii_case(b"transfer-encoding") => {
                    te.present = true;
                    for coding in list(value).filter(|c| !c.is_empty()) {
                        te.chunked = coding.eq_ignore_ascii_case(b"chunked");
                        te.chunked_codings += usize::from(te.chunked);
                        te.codings += 1;
                    }
                }
                _ => {}
            }
        }
        FramingFields {
            hosts,
            content_length: length,
            transfer_encoding: te,
        }
    }
}

/// Adds one `Content-Length` field's `value` to what earlier ones said
/// (`found`): every element must be the same 1 to 19 digits.
fn content_length(value: &[u8], found: &mut Option<u64>) -> Result<(), HeadError> {
    for e in list(value) {
        if e.is_empty() || e.len() > 19 || !e.iter().all(u8::is_ascii_digit) {
            return Err(HeadError::Invalid("Content-Length"));
        }
        // At most 19 digits: below 10^19 < u64::MAX, no overflow.
        let n = e.iter().fold(0u64, |n, &d| n * 10 + u64::from(d - b'0'));
        if found.is_some_and(|f| f != n) {
            return Err(HeadError::Invalid("differing Content-Length values"));
        }
        *found = Some(n);
    }
    Ok(())
}

struct TransferEncoding {
    present: bool,
    /// The last coding is `chunked`.
    chunked: bool,
    /// Codings, in all `Transfer-Encoding` fields.
    codings: usize,
    /// Codings that are `chunked`.
    chunked_codings: usize,
}

/// The tokens of every `Connection` header.
fn connection_tokens<'a>(
    raw: &'a [u8],
    headers: &'a [Field],
) -> impl Iterator<Item = &'a [u8]> + 'a {
    values(raw, headers, "connection")
        .flat_map(list)
        .filter(|t| !t.is_empty())
}

fn keep_alive(raw: &[u8], headers: &[Field], version: Version) -> bool {
    let mut close = false;
    let mut keep = false;
    for t in connection_tokens(raw, headers) {
        close |= t.eq_ignore_ascii_case(b"close");
        keep |= t.eq_ignore_ascii_case(b"keep-alive");
    }
    match version {
        Version::Http11 => !close,
        Version::Http10 => keep && !close,
    }
}

pub(crate) fn write_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Writes the fields to forward: all but hop-by-hop, `Connection`-listed
/// and `drop`ped ones; `Content-Length` replaced by one `length` field at
/// the place of the first (none when `length` is `None`).
fn write_fields(
    raw: &[u8],
    headers: &[Field],
    drop: &[&str],
    length: Option<u64>,
    out: &mut Vec<u8>,
) {
    let listed: Vec<&[u8]> = connection_tokens(raw, headers).collect();
    let mut length = length;
    for (n, v) in headers {
        let name = &raw[n.clone()];
        let value = &raw[v.clone()];
        let is = |s: &[u8]| name.eq_ignore_ascii_case(s);
        if is(b"content-length") {
            if let Some(len) = length.take() {
                let mut digits = [0u8; 20];
                write_field(out, b"content-length", format_u64(len, &mut digits));
            }
            continue;
        }
        let te_trailers = is(b"te") && trim_ows(value).eq_ignore_ascii_case(b"trailers");
        if te_trailers {
            if drop.iter().any(|d| is(d.as_bytes())) {
                continue;
            }
            write_field(out, name, value);
            continue;
        }
        if HOP_BY_HOP.iter().any(|h| is(h))
            || drop.iter().any(|d| is(d.as_bytes()))
            || (!NOT_CONNECTION_LISTED.iter().any(|h| is(h)) && listed.iter().any(|t| is(t)))
        {
            continue;
        }
        write_field(out, name, value);
    }
}

/// `n` in decimal, in `buf`.
fn format_u64(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[i..];
        }
    }
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// RFC 9110 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

#[cfg(test)]
mod tests;
