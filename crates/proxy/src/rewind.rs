//! Reading a TLS ClientHello without losing it: the bytes are kept and
//! replayed in front of the stream, so the connection can still be either
//! terminated or passed through untouched.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// Largest ClientHello accepted (post-quantum key shares make them ~1.5 KB;
/// TLS allows up to 16 KB records).
const MAX_HELLO: usize = 64 * 1024;

/// What the ClientHello says, and its bytes.
#[derive(Debug)]
pub struct Hello {
    pub bytes: Vec<u8>,
    pub sni: Option<String>,
    /// Offers an `istio*` ALPN value, as mesh sidecars do.
    pub mesh_alpn: bool,
}

/// Reads until a complete ClientHello has arrived (it may span reads).
pub async fn read_client_hello<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Hello, String> {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut bytes = Vec::new();
    let mut chunk = vec![0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("connection closed during the ClientHello".to_string());
        }
        bytes.extend_from_slice(&chunk[..n]);
        if bytes.len() > MAX_HELLO {
            return Err("ClientHello too large".to_string());
        }
        let mut rd = &chunk[..n];
        while !rd.is_empty() {
            acceptor.read_tls(&mut rd).map_err(|e| e.to_string())?;
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => {
                let hello = accepted.client_hello();
                let sni = hello.server_name().map(str::to_string);
                let mesh_alpn = hello
                    .alpn()
                    .is_some_and(|mut alpn| alpn.any(|p| p.starts_with(b"istio")));
                return Ok(Hello {
                    bytes,
                    sni,
                    mesh_alpn,
                });
            }
            Ok(None) => continue,
            Err((e, _alert)) => return Err(e.to_string()),
        }
    }
}

/// A stream that first yields `prefix`, then the inner stream's bytes.
#[derive(Debug)]
pub struct Rewind<S> {
    prefix: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S> Rewind<S> {
    pub fn new(prefix: Vec<u8>, inner: S) -> Self {
        Rewind {
            prefix,
            pos: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.pos < self.prefix.len() {
            let n = (self.prefix.len() - self.pos).min(buf.remaining());
            let start = self.pos;
            buf.put_slice(&self.prefix[start..start + n]);
            self.pos += n;
            if self.pos == self.prefix.len() {
                self.prefix = Vec::new();
                self.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
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
}
