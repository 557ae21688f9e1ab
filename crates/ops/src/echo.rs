//! The echo application `meshward up` starts for a workload that declares
//! no application of its own: on an HTTP port it answers every request with
//! `200` and a JSON description of what arrived (so a caller sees the
//! identity the sidecar forwarded in `x-forwarded-client-cert`); on a TCP
//! port it sends back what it receives.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::OpsError;

/// How much of a request body is read (counted, never kept) before the
/// echo answers anyway.
const MAX_BODY_READ: usize = 64 << 20;

/// Whether a workload port carries HTTP, by Istio's port-name convention
/// (as the proxy decides it without a ServiceEntry protocol).
pub fn is_http_port(name: &str) -> bool {
    meshward_config::model::AppProtocol::select(name, None).is_http()
}

/// A running echo application.
#[derive(Debug)]
pub struct Echo {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Echo {
    /// Listens on `addr` (port 0: any) for `workload` (`namespace/name`),
    /// as an HTTP (HTTP/1.1 and HTTP/2 cleartext) or a TCP echo.
    pub async fn start(addr: SocketAddr, workload: &str, http: bool) -> Result<Echo, OpsError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| OpsError::io(format!("echo application of {workload}: bind {addr}"), e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| OpsError::io("echo application: local address", e))?;
        let workload = workload.to_string();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, peer)) = listener.accept().await else {
                    continue;
                };
                let workload = workload.clone();
                tokio::spawn(async move {
                    if http {
                        serve_http(stream, peer, workload).await
                    } else {
                        let (mut r, mut w) = stream.into_split();
                        let _ = tokio::io::copy(&mut r, &mut w).await;
                    }
                });
            }
        });
        Ok(Echo { addr, task })
    }
}

async fn serve_http(stream: tokio::net::TcpStream, peer: SocketAddr, workload: String) {
    let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
        let workload = workload.clone();
        async move { Ok::<_, Infallible>(answer(req, peer, &workload).await) }
    });
    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

async fn answer(
    req: Request<hyper::body::Incoming>,
    peer: SocketAddr,
    workload: &str,
) -> Response<Full<Bytes>> {
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let method = req.method().to_string();
    let path = req.uri().to_string();
    let host = header("host").or_else(|| req.uri().authority().map(|a| a.to_string()));
    let xfcc = header("x-forwarded-client-cert");
    let request_id = header("x-request-id");
    let mut body = req.into_body();
    let mut body_bytes = 0usize;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => body_bytes += f.data_ref().map_or(0, |d| d.len()),
            Err(_) => break,
        }
        if body_bytes > MAX_BODY_READ {
            break;
        }
    }
    let text = json!({
        "workload": workload,
        "method": method,
        "path": path,
        "host": host,
        "peer": peer.to_string(),
        "x-forwarded-client-cert": xfcc,
        "x-request-id": request_id,
        "body_bytes": body_bytes,
    })
    .to_string()
        + "\n";
    Response::builder()
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(text)))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}
