//! Small HTTP clients on new or kept-alive connections, for tests and
//! readiness probes.

use std::net::{IpAddr, SocketAddr};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};

/// One HTTP/1.1 request on a new connection: `(status, body)`.
pub async fn get(
    addr: SocketAddr,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Option<(u16, String)> {
    request(addr, "GET", host, path, headers).await.ok()
}

/// One HTTP/1.1 request with `method` on a new connection.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(u16, String), String> {
    request_from(None, addr, method, host, path, headers).await
}

/// A TCP connection to `addr` from local address `from` (any port) when
/// given: a loopback address such as `127.0.4.1` stands for a workload's
/// address, as Linux routes all of 127.0.0.0/8 to `lo`.
pub async fn tcp_from(
    from: Option<IpAddr>,
    addr: SocketAddr,
) -> Result<tokio::net::TcpStream, String> {
    let Some(from) = from else {
        return tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string());
    };
    let socket = if from.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .map_err(|e| e.to_string())?;
    socket
        .bind(SocketAddr::new(from, 0))
        .map_err(|e| format!("binding {from}: {e}"))?;
    socket.connect(addr).await.map_err(|e| e.to_string())
}

/// [`request`] from local address `from` when given ([`tcp_from`]).
pub async fn request_from(
    from: Option<IpAddr>,
    addr: SocketAddr,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(u16, String), String> {
    let stream = tcp_from(from, addr).await?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    send_on(&mut send, method, host, path, headers).await
}

/// A request on an existing connection.
pub async fn send_on(
    send: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(u16, String), String> {
    let mut req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", host);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(Bytes::new())).unwrap();
    // A kept-alive connection may still be finishing the previous exchange.
    send.ready().await.map_err(|e| e.to_string())?;
    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// A kept-alive HTTP/1.1 connection.
pub async fn connect(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    send
}

pub fn executor() -> TokioExecutor {
    TokioExecutor::new()
}

/// An HTTP/2 client connection (prior knowledge) over `io`, plain TCP or
/// TLS; its connection task is spawned.
pub async fn h2_handshake<T>(io: T) -> hyper::client::conn::http2::SendRequest<Full<Bytes>>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (send, conn) = hyper::client::conn::http2::handshake(executor(), TokioIo::new(io))
        .await
        .unwrap();
    tokio::spawn(conn);
    send
}
