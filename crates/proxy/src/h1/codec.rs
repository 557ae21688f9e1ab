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
mod tests {
    use super::*;

    fn req(s: &[u8]) -> Result<Option<RequestHead>, HeadError> {
        RequestHead::parse(&mut BytesMut::from(s))
    }

    fn req_ok(s: &[u8]) -> RequestHead {
        req(s).expect("valid").expect("complete")
    }

    fn req_err(s: &[u8]) -> HeadError {
        req(s).expect_err("must be refused")
    }

    fn res(s: &[u8]) -> Result<Option<ResponseHead>, HeadError> {
        ResponseHead::parse(&mut BytesMut::from(s))
    }

    fn res_ok(s: &[u8]) -> ResponseHead {
        res(s).expect("valid").expect("complete")
    }

    fn with_cl(values: &[&str]) -> Vec<u8> {
        let mut s = b"POST / HTTP/1.1\r\nHost: a\r\n".to_vec();
        for v in values {
            s.extend_from_slice(format!("Content-Length: {v}\r\n").as_bytes());
        }
        s.extend_from_slice(b"\r\n");
        s
    }

    fn with_te(version: &str, values: &[&str]) -> Vec<u8> {
        let mut s = format!("POST / HTTP/{version}\r\nHost: a\r\n").into_bytes();
        for v in values {
            s.extend_from_slice(format!("Transfer-Encoding: {v}\r\n").as_bytes());
        }
        s.extend_from_slice(b"\r\n");
        s
    }

    fn write_req(
        head: &RequestHead,
        drop: &[&str],
        extra: &[(&str, &[u8])],
        close: bool,
    ) -> String {
        let mut out = Vec::new();
        write_request(head, head.target(), drop, extra, close, &mut out);
        String::from_utf8(out).unwrap()
    }

    fn write_res(head: &ResponseHead, close: bool) -> String {
        let mut out = Vec::new();
        write_response(head, close, &mut out);
        String::from_utf8(out).unwrap()
    }

    // ---- request parsing ----

    #[test]
    fn simple_get_leaves_pipelined_request_in_buf() {
        let first = b"GET /a?b=c HTTP/1.1\r\nHost: example.com\r\nAccept: */*\r\n\r\n";
        let second = b"GET /next HTTP/1.1\r\nHost: example.com\r\n\r\n";
        let mut buf = BytesMut::from(&[&first[..], &second[..]].concat()[..]);
        let head = RequestHead::parse(&mut buf).unwrap().unwrap();
        assert_eq!(head.method(), "GET");
        assert_eq!(head.target(), "/a?b=c");
        assert_eq!(head.version(), Version::Http11);
        assert_eq!(head.header("HOST"), Some(&b"example.com"[..]));
        assert_eq!(head.header("accept"), Some(&b"*/*"[..]));
        assert_eq!(head.header("missing"), None);
        assert_eq!(head.framing(), Framing::Empty);
        assert!(head.keep_alive());
        assert!(!head.expects_continue());
        assert_eq!(&buf[..], &second[..]);
        let next = RequestHead::parse(&mut buf).unwrap().unwrap();
        assert_eq!(next.target(), "/next");
        assert!(buf.is_empty());
    }

    #[test]
    fn headers_returns_all_values_in_order() {
        let head =
            req_ok(b"GET / HTTP/1.1\r\nX-A: 1\r\nHost: h\r\nx-a: 2\r\nX-B: 3\r\nX-A: \r\n\r\n");
        let all: Vec<&[u8]> = head.headers("x-A").collect();
        assert_eq!(all, vec![&b"1"[..], b"2", b""]);
        assert_eq!(head.headers("nope").count(), 0);
        assert_eq!(head.header("x-b"), Some(&b"3"[..]));
    }

    #[test]
    fn partial_heads_at_every_split_point() {
        let full = b"POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\n";
        for k in 0..full.len() {
            let mut buf = BytesMut::from(&full[..k]);
            assert!(
                RequestHead::parse(&mut buf).unwrap().is_none(),
                "split at {k}"
            );
            assert_eq!(buf.len(), k, "nothing consumed at {k}");
        }
        let mut buf = BytesMut::from(&[&full[..], b"abc"].concat()[..]);
        let head = RequestHead::parse(&mut buf).unwrap().unwrap();
        assert_eq!(head.framing(), Framing::Length(3));
        assert_eq!(&buf[..], b"abc");

        let full = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
        for k in 0..full.len() {
            let mut buf = BytesMut::from(&full[..k]);
            assert!(
                ResponseHead::parse(&mut buf).unwrap().is_none(),
                "split at {k}"
            );
            assert_eq!(buf.len(), k);
        }
        assert_eq!(res_ok(full).framing("GET"), Framing::Length(0));
    }

    #[test]
    fn too_large() {
        // Incomplete and already MAX_HEAD bytes.
        let mut s = b"GET / HTTP/1.1\r\nHost: h\r\nX-Big: ".to_vec();
        s.resize(MAX_HEAD, b'a');
        assert_eq!(req_err(&s), HeadError::TooLarge);
        assert_eq!(HeadError::TooLarge.status(), 431);
        // One byte less: read more.
        assert!(req(&s[..MAX_HEAD - 1]).unwrap().is_none());
        // Complete, but longer than MAX_HEAD.
        let mut big = s.clone();
        big.extend_from_slice(b"aaaa\r\n\r\n");
        assert_eq!(req_err(&big), HeadError::TooLarge);
        let mut r = b"HTTP/1.1 200 OK\r\nX-Big: ".to_vec();
        r.resize(MAX_HEAD + 10, b'a');
        r.extend_from_slice(b"\r\n\r\n");
        assert_eq!(res(&r).unwrap_err(), HeadError::TooLarge);
        // Exactly MAX_HEAD bytes is fine.
        let mut exact = b"GET / HTTP/1.1\r\nHost: h\r\nX-Big: ".to_vec();
        exact.resize(MAX_HEAD - 4, b'a');
        exact.extend_from_slice(b"\r\n\r\n");
        let mut buf = BytesMut::from(&exact[..]);
        let head = RequestHead::parse(&mut buf).unwrap().unwrap();
        assert_eq!(head.header("x-big").unwrap().len(), MAX_HEAD - 4 - 32);
        assert!(buf.is_empty());
    }

    #[test]
    fn too_many_headers() {
        let mut s = b"GET / HTTP/1.1\r\nHost: h\r\n".to_vec();
        for i in 1..MAX_HEADERS {
            s.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
        }
        let mut ok = s.clone();
        ok.extend_from_slice(b"\r\n");
        assert_eq!(req_ok(&ok).headers.len(), MAX_HEADERS);
        s.extend_from_slice(b"X-Last: v\r\n\r\n");
        let e = req_err(&s);
        assert_eq!(e, HeadError::TooManyHeaders);
        assert_eq!(e.status(), 431);
    }

    #[test]
    fn host_rules() {
        assert!(matches!(
            req_err(b"GET / HTTP/1.1\r\n\r\n"),
            HeadError::Invalid(_)
        ));
        let e = req_err(b"GET / HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n");
        assert!(matches!(e, HeadError::Invalid(_)));
        assert_eq!(e.status(), 400);
        assert!(matches!(
            req_err(b"GET / HTTP/1.0\r\nHost: a\r\nHOST: a\r\n\r\n"),
            HeadError::Invalid(_)
        ));
        let h10 = req_ok(b"GET / HTTP/1.0\r\n\r\n");
        assert_eq!(h10.version(), Version::Http10);
        assert_eq!(h10.header("host"), None);
        assert_eq!(
            req_ok(b"GET / HTTP/1.0\r\nHost: a\r\n\r\n").header("host"),
            Some(&b"a"[..])
        );
    }

    #[test]
    fn connect_is_parsed() {
        let head = req_ok(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n");
        assert_eq!(head.method(), "CONNECT");
        assert_eq!(head.target(), "example.com:443");
    }

    #[test]
    fn malformed_heads_are_invalid() {
        for bad in [
            &b"GET  / HTTP/1.1\r\nHost: h\r\n\r\n"[..],
            b"GET / HTTP/2.0\r\nHost: h\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost : h\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: h\r\nX-A: a\r\n folded\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: h\r\nX-A: a\rb\r\n\r\n",
            b"GET / HTTP/1.1\r\nHo(st: h\r\n\r\n",
            b"G\x01T / HTTP/1.1\r\nHost: h\r\n\r\n",
        ] {
            let e = req_err(bad);
            assert!(
                matches!(e, HeadError::Invalid(_)),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
            assert_eq!(e.status(), 400);
        }
        assert!(matches!(
            res(b"HTTP/1.1 099 Odd\r\n\r\n"),
            Err(HeadError::Invalid(_))
        ));
        assert!(matches!(
            res(b"HTTP/1.1 2000 OK\r\n\r\n"),
            Err(HeadError::Invalid(_))
        ));
        assert!(matches!(
            res(b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\n\r\n"),
            Err(HeadError::Invalid(_))
        ));
    }

    // ---- Content-Length ----

    #[test]
    fn content_length_accepted() {
        for (values, n) in [
            (&["5"][..], 5),
            (&["5, 5"], 5),
            (&["5", "5"], 5),
            (&[" 5 "], 5),
            (&["5,5,\t5"], 5),
            (&["0"], 0),
            (&["0000000000000000005"], 5),
            (&["9999999999999999999"], 9_999_999_999_999_999_999),
        ] {
            let head = req_ok(&with_cl(values));
            assert_eq!(head.framing(), Framing::Length(n), "{values:?}");
        }
    }

    #[test]
    fn content_length_refused() {
        for values in [
            &["5, 6"][..],
            &["5", "6"],
            &["-1"],
            &["+5"],
            &["5 5"],
            &["5,"],
            &[""],
            &["0x5"],
            &["5a"],
            &["18446744073709551615"],
            &["00000000000000000005"],
        ] {
            assert!(
                matches!(req_err(&with_cl(values)), HeadError::Invalid(_)),
                "{values:?}"
            );
            let mut r = b"HTTP/1.1 200 OK\r\n".to_vec();
            for v in values {
                r.extend_from_slice(format!("Content-Length: {v}\r\n").as_bytes());
            }
            r.extend_from_slice(b"\r\n");
            assert!(
                matches!(res(&r), Err(HeadError::Invalid(_))),
                "response {values:?}"
            );
        }
    }

    // ---- Transfer-Encoding ----

    #[test]
    fn request_transfer_encoding() {
        assert_eq!(
            req_ok(&with_te("1.1", &["chunked"])).framing(),
            Framing::Chunked
        );
        assert_eq!(
            req_ok(&with_te("1.1", &["CHUNKED"])).framing(),
            Framing::Chunked
        );
        // Empty list elements are no codings (RFC 9110 section 5.6.1).
        assert_eq!(
            req_ok(&with_te("1.1", &[", chunked ,"])).framing(),
            Framing::Chunked
        );
        // Anything but `chunked` alone is refused, as Envoy refuses it
        // (501): `identity` smuggles past parsers that read it as "no
        // coding", and a coding before `chunked` is one the application
        // might not undo.
        for values in [
            &["identity, chunked"][..],
            &["identity", "chunked"],
            &["gzip, chunked"],
            &["gzip", "chunked"],
            &["gzip,, chunked ,"],
            &["gzip"],
            &["identity"],
            &["chunked, gzip"],
            &["chunked", "gzip"],
            &["chunked, chunked"],
            &["chunked", "chunked"],
            &["chunked;x=1"],
            &[""],
            &["xchunked"],
        ] {
            let e = req_err(&with_te("1.1", values));
            assert_eq!(e, HeadError::UnsupportedTransferEncoding, "{values:?}");
            assert_eq!(e.status(), 501);
        }
        assert!(matches!(
            req_err(&with_te("1.0", &["chunked"])),
            HeadError::Invalid(_)
        ));
        let te_cl = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n";
        assert!(matches!(req_err(te_cl), HeadError::Invalid(_)));
        let cl_te = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(matches!(req_err(cl_te), HeadError::Invalid(_)));
    }

    #[test]
    fn response_framing() {
        let chunked = res_ok(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n");
        assert_eq!(chunked.framing("GET"), Framing::Chunked);
        assert_eq!(chunked.framing("HEAD"), Framing::Empty);
        let te_cl =
            res_ok(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!(te_cl.framing("POST"), Framing::Chunked);
        let gzip =
            res_ok(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nContent-Length: 3\r\n\r\n");
        assert_eq!(gzip.framing("GET"), Framing::UntilClose);
        let cl = res_ok(b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n");
        assert_eq!(cl.framing("GET"), Framing::Length(12));
        assert_eq!(cl.framing("HEAD"), Framing::Empty);
        assert_eq!(
            res_ok(b"HTTP/1.1 200 OK\r\n\r\n").framing("GET"),
            Framing::UntilClose
        );
        let cl204 = b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n";
        assert_eq!(res_ok(cl204).framing("GET"), Framing::Empty);
        let cl304 = b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n";
        assert_eq!(res_ok(cl304).framing("GET"), Framing::Empty);
        for s in [
            &b"HTTP/1.1 100 Continue\r\n\r\n"[..],
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n",
            b"HTTP/1.1 103 Early Hints\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            assert_eq!(res_ok(s).framing("GET"), Framing::Empty);
        }
        assert_eq!(
            res_ok(b"HTTP/1.1 205 Reset\r\nContent-Length: 0\r\n\r\n").framing("GET"),
            Framing::Length(0)
        );
        for bad in [
            &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            assert!(matches!(res(bad), Err(HeadError::Invalid(_))));
        }
        let r = res_ok(b"HTTP/1.0 404 Not Found\r\nServer: x\r\n\r\nrest");
        assert_eq!(r.status(), 404);
        assert_eq!(r.version(), Version::Http10);
        assert_eq!(r.header("server"), Some(&b"x"[..]));
    }

    // ---- Connection, Expect ----

    #[test]
    fn upgrade_requests_are_told_apart() {
        let ask = |version: &str, fields: &str| {
            let raw = format!("GET /ws HTTP/{version}\r\nHost: h\r\n{fields}\r\n");
            req_ok(raw.as_bytes()).upgrade()
        };
        for (version, fields, expected) in [
            (
                "1.1",
                "Connection: Upgrade\r\nUpgrade: websocket\r\n",
                Upgrade::WebSocket,
            ),
            (
                "1.1",
                "connection: keep-alive, UPGRADE\r\nupgrade:  WebSocket \r\n",
                Upgrade::WebSocket,
            ),
            // h2c goes on as HTTP/1.1, without its upgrade fields.
            (
                "1.1",
                "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n",
                Upgrade::Absent,
            ),
            (
                "1.1",
                "Connection: upgrade\r\nUpgrade: foo/2\r\n",
                Upgrade::Unsupported,
            ),
            (
                "1.1",
                "Connection: upgrade\r\nUpgrade: websocket, foo\r\n",
                Upgrade::Unsupported,
            ),
            (
                "1.1",
                "Connection: upgrade\r\nUpgrade: websocket\r\nUpgrade: websocket\r\n",
                Upgrade::Unsupported,
            ),
            // Without the Connection token, Upgrade is a hop-by-hop field
            // like any other: dropped.
            ("1.1", "Upgrade: websocket\r\n", Upgrade::Absent),
            ("1.1", "Connection: upgrade\r\n", Upgrade::Absent),
            (
                "1.0",
                "Connection: upgrade\r\nUpgrade: websocket\r\n",
                Upgrade::Absent,
            ),
        ] {
            assert_eq!(ask(version, fields), expected, "{version} {fields:?}");
        }
    }

    #[test]
    fn a_switch_keeps_its_upgrade_fields_and_nothing_else_does() {
        let head = res_ok(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n",
        );
        assert_eq!(
            write_res(&head, true),
            "HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\
             connection: upgrade\r\nupgrade: websocket\r\n\r\n"
        );
        let head = res_ok(b"HTTP/1.1 200 OK\r\nUpgrade: websocket\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(
            write_res(&head, false),
            "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
        );
    }

    #[test]
    fn keep_alive_rules() {
        for (version, conn, expected) in [
            ("1.1", None, true),
            ("1.1", Some("close"), false),
            ("1.1", Some("Close"), false),
            ("1.1", Some("keep-alive"), true),
            ("1.1", Some("upgrade, CLOSE"), false),
            ("1.1", Some("closed"), true),
            ("1.0", None, false),
            ("1.0", Some("keep-alive"), true),
            ("1.0", Some("Keep-Alive"), true),
            ("1.0", Some("keep-alive, close"), false),
            ("1.0", Some("x"), false),
        ] {
            let c = conn
                .map(|c| format!("Connection: {c}\r\n"))
                .unwrap_or_default();
            let head = req_ok(format!("GET / HTTP/{version}\r\nHost: h\r\n{c}\r\n").as_bytes());
            assert_eq!(head.keep_alive(), expected, "request {version} {conn:?}");
            let r = res_ok(format!("HTTP/{version} 200 OK\r\n{c}\r\n").as_bytes());
            assert_eq!(r.keep_alive(), expected, "response {version} {conn:?}");
        }
        let two = req_ok(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\nConnection: close\r\n\r\n");
        assert!(!two.keep_alive());
        let split = req_ok(b"GET / HTTP/1.0\r\nConnection: foo\r\nConnection: keep-alive\r\n\r\n");
        assert!(split.keep_alive());
    }

    #[test]
    fn expect_continue() {
        assert!(
            req_ok(b"POST / HTTP/1.1\r\nHost: h\r\nExpect: 100-Continue \r\n\r\n")
                .expects_continue()
        );
        assert!(
            !req_ok(b"POST / HTTP/1.1\r\nHost: h\r\nExpect: 100-continue-x\r\n\r\n")
                .expects_continue()
        );
        assert!(!req_ok(b"POST / HTTP/1.1\r\nHost: h\r\n\r\n").expects_continue());
    }

    // ---- writers ----

    #[test]
    fn write_request_filters_and_normalises() {
        let head = req_ok(
            b"POST /x HTTP/1.1\r\n\
              Host: h\r\n\
              X-Keep: 1\r\n\
              Connection: keep-alive, X-Secret, te\r\n\
              Keep-Alive: timeout=5\r\n\
              Proxy-Connection: keep-alive\r\n\
              Content-Length: 4, 4\r\n\
              Upgrade: h2c\r\n\
              Expect: 100-continue\r\n\
              TE: trailers\r\n\
              x-secret: s\r\n\
              X-Authz: spoofed\r\n\
              Content-Length: 4\r\n\
              x-LAST: v\r\n\r\n",
        );
        let out = write_req(
            &head,
            &["x-authz"],
            &[("x-forwarded-proto", b"https"), ("X-Id", b"7")],
            false,
        );
        assert_eq!(
            out,
            "POST /x HTTP/1.1\r\n\
             Host: h\r\n\
             X-Keep: 1\r\n\
             content-length: 4\r\n\
             TE: trailers\r\n\
             x-LAST: v\r\n\
             x-forwarded-proto: https\r\n\
             X-Id: 7\r\n\r\n"
        );
        let closed = write_req(&head, &[], &[], true);
        assert!(
            closed.ends_with("X-Authz: spoofed\r\nx-LAST: v\r\nconnection: close\r\n\r\n"),
            "{closed}"
        );
        let mut out = Vec::new();
        write_request(&head, "http://h/x", &[], &[], false, &mut out);
        assert!(out.starts_with(b"POST http://h/x HTTP/1.1\r\n"));
    }

    #[test]
    fn write_request_te_and_framing_headers() {
        let head = req_ok(b"GET / HTTP/1.0\r\nte: gzip\r\nHOST: h\r\n\r\n");
        assert_eq!(
            write_req(&head, &[], &[], false),
            "GET / HTTP/1.0\r\nHOST: h\r\n\r\n"
        );
        let te_dropped = req_ok(b"GET / HTTP/1.1\r\nHost: h\r\nTE: trailers\r\n\r\n");
        assert_eq!(
            write_req(&te_dropped, &["te"], &[], false),
            "GET / HTTP/1.1\r\nHost: h\r\n\r\n"
        );
        // Framing and routing fields survive Connection tokens.
        let head = req_ok(
            b"POST / HTTP/1.1\r\nHost: h\r\nConnection: transfer-encoding, host, content-length\r\n\
              Transfer-Encoding: chunked\r\n\r\n",
        );
        assert_eq!(head.framing(), Framing::Chunked);
        assert_eq!(
            write_req(&head, &[], &[], false),
            "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
        );
        let head = req_ok(b"POST / HTTP/1.1\r\nContent-Length: 007\r\nConnection: content-length\r\nHost: h\r\n\r\n");
        assert_eq!(
            write_req(&head, &[], &[], false),
            "POST / HTTP/1.1\r\ncontent-length: 7\r\nHost: h\r\n\r\n"
        );
    }

    #[test]
    fn write_response_filters_and_normalises() {
        let head = res_ok(
            b"HTTP/1.1 200 Fine Thanks\r\nServer: s\r\nConnection: X-Hop\r\nX-Hop: 1\r\n\
              Content-Length: 10\r\nKeep-Alive: timeout=1\r\nContent-Length: 10\r\nX-Other: 2\r\n\r\n",
        );
        assert_eq!(
            write_res(&head, false),
            "HTTP/1.1 200 Fine Thanks\r\nServer: s\r\ncontent-length: 10\r\nX-Other: 2\r\n\r\n"
        );
        assert!(write_res(&head, true).ends_with("X-Other: 2\r\nconnection: close\r\n\r\n"));
        // Chunked wins over Content-Length.
        let head =
            res_ok(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!(
            write_res(&head, false),
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        );
        // So does another coding (the body runs until close).
        let head =
            res_ok(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nContent-Length: 3\r\n\r\n");
        assert_eq!(
            write_res(&head, true),
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nconnection: close\r\n\r\n"
        );
        // Kept as information where there is no body.
        let head = res_ok(b"HTTP/1.0 304 Not Modified\r\nContent-Length: 5,5\r\n\r\n");
        assert_eq!(
            write_res(&head, false),
            "HTTP/1.0 304 Not Modified\r\ncontent-length: 5\r\n\r\n"
        );
        // Reasons: empty, absent, with obs-text.
        assert_eq!(
            write_res(&res_ok(b"HTTP/1.1 200 \r\n\r\n"), false),
            "HTTP/1.1 200 \r\n\r\n"
        );
        assert_eq!(
            write_res(&res_ok(b"HTTP/1.1 200\r\n\r\n"), false),
            "HTTP/1.1 200 \r\n\r\n"
        );
        assert_eq!(
            write_res(&res_ok(b"HTTP/1.1 200 \xe9t\xe9\r\n\r\n"), false),
            "HTTP/1.1 200 \r\n\r\n"
        );
        assert_eq!(
            write_res(&res_ok(b"HTTP/1.1 999 X\r\n\r\n"), false),
            "HTTP/1.1 999 X\r\n\r\n"
        );
    }

    #[test]
    fn written_heads_reparse() {
        let head = req_ok(b"PUT /u HTTP/1.1\nHost: h\nContent-Length: 2\nConnection: close\n\n");
        let mut out = Vec::new();
        write_request(&head, head.target(), &[], &[], !head.keep_alive(), &mut out);
        let again = req_ok(&out);
        assert_eq!(again.framing(), Framing::Length(2));
        assert!(!again.keep_alive());
        assert_eq!(again.method(), "PUT");
    }

    // ---- chunked bodies ----

    /// Scans `body` whole and one byte at a time; both must agree.
    fn scan(body: &[u8]) -> Result<(usize, bool), BodyError> {
        let whole = ChunkedScanner::default().scan(body);
        let mut s = ChunkedScanner::default();
        let mut bytewise = Ok((body.len(), false));
        for (i, b) in body.iter().enumerate() {
            match s.scan(std::slice::from_ref(b)) {
                Ok((1, true)) => {
                    bytewise = Ok((i + 1, true));
                    break;
                }
                Ok((1, false)) => {}
                Ok(other) => panic!("one byte scanned as {other:?}"),
                Err(e) => {
                    bytewise = Err(e);
                    break;
                }
            }
        }
        assert_eq!(whole, bytewise, "{:?}", String::from_utf8_lossy(body));
        whole
    }

    fn invalid(body: &[u8]) {
        assert!(scan(body).is_err(), "{:?}", String::from_utf8_lossy(body));
    }

    #[test]
    fn chunked_simple_and_leftovers() {
        let body = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n";
        assert_eq!(scan(body), Ok((body.len(), true)));
        let mut more = body.to_vec();
        more.extend_from_slice(b"GET / HTTP/1.1\r\n");
        assert_eq!(scan(&more), Ok((body.len(), true)));
        assert_eq!(scan(b"0\r\n\r\n"), Ok((5, true)));
        assert_eq!(scan(b"A\r\n0123456789\r\n0\r\n\r\n"), Ok((20, true)));
        assert_eq!(scan(b"a\r\n0123456789\r\n00\r\n\r\n"), Ok((21, true)));
        assert_eq!(scan(b"5\r\nhel"), Ok((6, false)));
        assert_eq!(scan(b""), Ok((0, false)));
    }

    #[test]
    fn chunked_resumes_across_calls_and_after_done() {
        let mut s = ChunkedScanner::default();
        assert_eq!(s.scan(b"10\r\n0123456"), Ok((11, false)));
        assert_eq!(s.scan(b"789abcdef"), Ok((9, false)));
        assert_eq!(s.scan(b"\r"), Ok((1, false)));
        assert_eq!(s.scan(b"\n0\r\n\r\nNEXT"), Ok((6, true)));
        assert_eq!(s.scan(b"more"), Ok((0, true)));
        let mut s = ChunkedScanner::default();
        assert!(s.scan(b"x").is_err());
        assert!(s.scan(b"0\r\n\r\n").is_err());
    }

    #[test]
    fn chunked_big_size_bulk_skip() {
        let mut s = ChunkedScanner::default();
        assert_eq!(s.scan(b"ffffffffffffffff\r\n"), Ok((18, false)));
        assert_eq!(s.scan(&[0u8; 8192]), Ok((8192, false)));
        assert_eq!(s.scan(b"\r\n\r\n"), Ok((4, false)));
    }

    #[test]
    fn chunked_extensions() {
        assert_eq!(scan(b"3;name=value\r\nabc\r\n0\r\n\r\n"), Ok((24, true)));
        assert_eq!(
            scan(b"3 ;a\r\nabc\r\n0 \t; last ; q=\"x y;\"\r\n\r\n").map(|r| r.1),
            Ok(true)
        );
        assert_eq!(scan(b"3;\r\nabc\r\n0\r\n\r\n").map(|r| r.1), Ok(true));
        let mut long = b"1;".to_vec();
        long.resize(MAX_CHUNK_EXT + 1, b'a');
        long.extend_from_slice(b"\r\nx\r\n0\r\n\r\n");
        assert_eq!(scan(&long).map(|r| r.1), Ok(true));
        let mut too_long = b"1;".to_vec();
        too_long.resize(MAX_CHUNK_EXT + 2, b'a');
        too_long.extend_from_slice(b"\r\nx\r\n0\r\n\r\n");
        invalid(&too_long);
        invalid(b"3 \r\nabc\r\n0\r\n\r\n");
        invalid(b"3;a\x01\r\nabc\r\n0\r\n\r\n");
        invalid(b"3;a\x7f\r\nabc\r\n0\r\n\r\n");
        invalid(b"3;a\xff\r\nabc\r\n0\r\n\r\n");
        invalid(b"3;a\nabc\r\n0\r\n\r\n");
    }

    #[test]
    fn chunked_trailers() {
        let body = b"1\r\nx\r\n0\r\nX-Sum: abc\r\nx-b:\r\nY:  \t v\xff\r\n\r\n";
        assert_eq!(scan(body), Ok((body.len(), true)));
        invalid(b"0\r\nX-Sum: a\r\n folded\r\n\r\n");
        invalid(b"0\r\n\tfolded\r\n\r\n");
        invalid(b"0\r\n: nameless\r\n\r\n");
        invalid(b"0\r\nNo colon\r\n\r\n");
        invalid(b"0\r\nNoColon\r\n\r\n");
        invalid(b"0\r\nX: a\nY: b\r\n\r\n");
        invalid(b"0\r\nX: a\x00\r\n\r\n");
        invalid(b"0\r\nX: a\r\n\n");
        invalid(b"0\r\n\n");
        let mut big = b"0\r\nX-Big: ".to_vec();
        big.resize(MAX_TRAILERS - 4 + 3, b'a');
        let mut fits = big.clone();
        fits.extend_from_slice(b"\r\n\r\n");
        assert_eq!(fits.len() - 3, MAX_TRAILERS);
        assert_eq!(scan(&fits), Ok((fits.len(), true)));
        big.extend_from_slice(b"a\r\n\r\n");
        invalid(&big);
    }

    #[test]
    fn chunked_invalid_sizes_and_line_ends() {
        invalid(b"g\r\n");
        invalid(b"\r\n");
        invalid(b" 5\r\nhello\r\n0\r\n\r\n");
        invalid(b"-5\r\nhello\r\n0\r\n\r\n");
        invalid(b"+5\r\nhello\r\n0\r\n\r\n");
        invalid(b"0x5\r\nhello\r\n0\r\n\r\n");
        invalid(b"00000000000000005\r\nhello\r\n0\r\n\r\n");
        invalid(b"10000000000000000\r\n");
        assert_eq!(scan(b"0000000000000000\r\n\r\n"), Ok((20, true)));
        invalid(b"5\nhello\r\n0\r\n\r\n");
        invalid(b"5\rhello\r\n0\r\n\r\n");
        invalid(b"5\r\nhello\n0\r\n\r\n");
        invalid(b"5\r\nhelloX\r\n0\r\n\r\n");
        invalid(b"5\r\nhello\rX0\r\n\r\n");
        invalid(b"5\r\nhello0\r\n\r\n");
        invalid(b"0\r\n\rX");
        invalid(b"0\n\n");
    }
}
