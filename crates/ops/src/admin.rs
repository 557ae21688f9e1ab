//! A small HTTP/1.1 client for the admin endpoints of the control plane and
//! the proxies (plain HTTP on a local or trusted address, as istioctl
//! reaches Envoy's admin port).

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;

use crate::OpsError;

/// How long one admin request may take, connection included.
pub const TIMEOUT: Duration = Duration::from_secs(5);
/// The largest admin response read.
const MAX_BODY: usize = 32 << 20;

/// Which side an admin endpoint belongs to, for error messages.
#[derive(Debug, Clone, Copy)]
pub enum Side {
    Control,
    Proxy,
}

impl Side {
    fn what(self) -> &'static str {
        match self {
            Side::Control => "control plane admin",
            Side::Proxy => "proxy admin",
        }
    }
}

/// `GET path` on `addr`: the status and body.
pub async fn get(
    side: Side,
    addr: SocketAddr,
    path: &str,
) -> Result<(StatusCode, Bytes), OpsError> {
    let err = |reason: String| OpsError::Admin {
        what: side.what(),
        addr,
        path: path.to_string(),
        reason,
    };
    let fetch = async {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| err(format!("cannot connect: {e}")))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| err(e.to_string()))?;
        tokio::spawn(conn);
        let req = Request::get(path)
            .header(hyper::header::HOST, addr.to_string())
            .body(Empty::<Bytes>::new())
            .map_err(|e| err(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| err(e.to_string()))?;
        let status = resp.status();
        let body = http_body_util::Limited::new(resp.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| err(e.to_string()))?
            .to_bytes();
        Ok((status, body))
    };
    tokio::time::timeout(TIMEOUT, fetch)
        .await
        .map_err(|_| err(format!("no answer within {}s", TIMEOUT.as_secs())))?
}

/// `GET path` on `addr`, expecting `200` with a JSON body.
pub async fn get_json(
    side: Side,
    addr: SocketAddr,
    path: &str,
) -> Result<serde_json::Value, OpsError> {
    get_as(side, addr, path).await
}

/// `GET path` on `addr`, expecting `200` with a JSON body of type `T`.
pub async fn get_as<T: serde::de::DeserializeOwned>(
    side: Side,
    addr: SocketAddr,
    path: &str,
) -> Result<T, OpsError> {
    let (status, body) = get(side, addr, path).await?;
    let err = |reason: String| OpsError::Admin {
        what: side.what(),
        addr,
        path: path.to_string(),
        reason,
    };
    if status != StatusCode::OK {
        return Err(err(format!(
            "{status}: {}",
            String::from_utf8_lossy(&body).trim()
        )));
    }
    serde_json::from_slice(&body).map_err(|e| err(format!("not what was expected: {e}")))
}

/// Percent-encodes a query parameter value.
pub fn query_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b':' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}
