//! `meshward call FROM URL`: one request as workload FROM, through its
//! sidecar's outbound listener (or, for a workload without a proxy,
//! straight from its address, in plaintext), and the decision the
//! destination's proxy recorded for it (found by the request's
//! `x-request-id`, or, when the connection was refused before any request,
//! by the caller's address and port).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpSocket;

use crate::OpsError;
use crate::admin::{Side, get_json, query_value};
use crate::live::Live;
use crate::mesh::{self, Destination};

/// How much of the response body is kept and shown.
const BODY_HEAD: usize = 1024;
/// How long the access-log entries are looked for after the response.
const LOG_WAIT: Duration = Duration::from_secs(3);

/// One request to send.
#[derive(Debug, Clone)]
pub struct CallSpec {
    /// The calling workload, `NAMESPACE/NAME` or a unique `NAME`.
    pub from: String,
    /// `http://HOST[:PORT]/PATH[?QUERY]`.
    pub url: String,
    pub method: String,
    pub headers: Vec<(String, String)>,
    pub body: Option<Vec<u8>>,
}

/// What a call speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// One HTTP/1.1 request.
    Http,
    /// A TCP connection: the body is sent, the write side closed, and
    /// what comes back is the reply.
    Tcp,
}

/// A parsed `http://` or `tcp://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    pub scheme: Scheme,
    pub host: String,
    pub port: u16,
    /// Path and query, at least `/`.
    pub path: String,
}

impl Url {
    /// Parses `http://HOST[:PORT][/PATH][?QUERY]` or `tcp://HOST:PORT`.
    pub fn parse(s: &str) -> Result<Url, OpsError> {
        let bad = |why: &str| OpsError::Invalid(format!("URL {s:?}: {why}"));
        let (scheme, rest) = if let Some(rest) = s.strip_prefix("http://") {
            (Scheme::Http, rest)
        } else if let Some(rest) = s.strip_prefix("tcp://") {
            (Scheme::Tcp, rest)
        } else {
            return Err(bad(
                "must start with http:// or tcp:// (the sidecar secures the connection; the application speaks plaintext to it)",
            ));
        };
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) if rest.as_bytes()[i] == b'/' => (&rest[..i], rest[i..].to_string()),
            Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
            None => (rest, "/".to_string()),
        };
        let (host, port) = match (authority.rsplit_once(':'), scheme) {
            (Some((h, p)), _) => (h, p.parse::<u16>().map_err(|_| bad("bad port"))?),
            (None, Scheme::Http) => (authority, 80),
            (None, Scheme::Tcp) => return Err(bad("tcp:// needs a port")),
        };
        if scheme == Scheme::Tcp && path != "/" {
            return Err(bad("a tcp:// URL has no path"));
        }
        if host.is_empty() || host.contains(['@', ' ', '[', ']']) {
            return Err(bad("bad host"));
        }
        if path.bytes().any(|b| b.is_ascii_control() || b == b' ') {
            return Err(bad("the path must not hold spaces or control characters"));
        }
        Ok(Url {
            scheme,
            host: host.to_ascii_lowercase(),
            port,
            path,
        })
    }

    /// `host` or `host:port` as `Host` carries it.
    pub fn authority(&self) -> String {
        if self.port == 80 {
            self.host.clone()
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// The response, or why there was none.
#[derive(Debug, Clone)]
pub enum Reply {
    Response {
        status: u16,
        reason: String,
        /// The first bytes of the body (lossy UTF-8).
        body_head: String,
        body_len: usize,
    },
    /// A TCP call: what came back before the destination closed.
    Bytes { head: String, len: usize },
    /// The connection failed or closed before a response.
    Failed(String),
}

/// What happened to one call.
#[derive(Debug, Clone)]
pub struct CallOutcome {
    /// `namespace/name` of the caller.
    pub from: String,
    pub from_has_proxy: bool,
    pub method: String,
    pub url: String,
    pub request_id: String,
    pub reply: Reply,
    /// The service and workloads the URL names, when the mesh knows it.
    pub destination: Option<Destination>,
    /// The caller's sidecar's access-log entry (reporter source).
    pub source_entry: Option<Value>,
    /// The destination proxy's access-log entry (reporter destination),
    /// with `workload` added: the proxy that recorded it.
    pub destination_entry: Option<Value>,
}

impl CallOutcome {
    /// `allow`, `deny` or `error` as the destination recorded it.
    pub fn decision(&self) -> Option<&str> {
        self.destination_entry.as_ref()?["decision"].as_str()
    }

    /// `mutual_tls` or `none`: as the destination saw the connection, else
    /// as the caller's sidecar sent it, else `none` for a caller without a
    /// proxy.
    pub fn tls(&self) -> Option<&str> {
        self.destination_entry
            .as_ref()
            .and_then(|e| e["tls.mode"].as_str())
            .or_else(|| self.source_entry.as_ref()?["tls.mode"].as_str())
            .or((!self.from_has_proxy).then_some("none"))
    }

    /// The policy that decided, `namespace/name`.
    pub fn policy(&self) -> Option<&str> {
        self.destination_entry.as_ref()?["policy"].as_str()
    }

    /// The status code, when a response came.
    pub fn status(&self) -> Option<u16> {
        match &self.reply {
            Reply::Response { status, .. } => Some(*status),
            Reply::Bytes { .. } | Reply::Failed(_) => None,
        }
    }

    /// The call as JSON (`meshward call -o json`).
    pub fn to_json(&self) -> Value {
        let reply = match &self.reply {
            Reply::Response {
                status,
                reason,
                body_head,
                body_len,
            } => {
                json!({"status": status, "reason": reason, "body_head": body_head, "body_bytes": body_len})
            }
            Reply::Bytes { head, len } => json!({"reply_head": head, "reply_bytes": len}),
            Reply::Failed(e) => json!({"error": e}),
        };
        json!({
            "from": self.from,
            "method": self.method,
            "url": self.url,
            "request_id": self.request_id,
            "response": reply,
            "destination": self.destination.as_ref().map(|d| json!({
                "service": d.service,
                "workloads": d.endpoints.iter().map(|(w, _)| w.key()).collect::<Vec<_>>(),
            })),
            "decision": self.decision(),
            "policy": self.policy(),
            "tls": self.tls(),
            "recorded": {"source": self.source_entry, "destination": self.destination_entry},
        })
    }

    /// The call as text: the response, then the decision.
    pub fn render(&self) -> String {
        let mut out = format!("{} -> {} {}\n", self.from, self.method, self.url);
        match &self.reply {
            Reply::Response {
                status,
                reason,
                body_head,
                body_len,
            } => {
                out.push_str(&format!("HTTP {status} {reason}\n"));
                if !body_head.is_empty() {
                    out.push_str(body_head.trim_end());
                    out.push('\n');
                    if *body_len > body_head.len() {
                        out.push_str(&format!("... ({body_len} bytes in all)\n"));
                    }
                }
            }
            Reply::Bytes { head, len } => {
                out.push_str(&format!("connected; {len} bytes came back\n"));
                if !head.is_empty() {
                    out.push_str(head.trim_end());
                    out.push('\n');
                }
            }
            Reply::Failed(e) => out.push_str(&format!("no response: {e}\n")),
        }
        out.push('\n');
        match &self.destination_entry {
            Some(e) => {
                let by = e["workload"].as_str().unwrap_or("?");
                let decision = e["decision"].as_str().unwrap_or("?").to_uppercase();
                let policy = match (e["policy"].as_str(), e["rule"].as_u64()) {
                    (Some(p), Some(r)) => format!(" by {p} (rule {r})"),
                    (Some(p), None) => format!(" by {p}"),
                    _ => String::new(),
                };
                out.push_str(&format!("decision: {decision}{policy}, recorded by {by}\n"));
                if let Some(x) = e["explanation"].as_str().filter(|x| !x.is_empty()) {
                    out.push_str(&format!("  {x}\n"));
                } else if let Some(r) = e["reason"].as_str().filter(|r| !r.is_empty()) {
                    out.push_str(&format!("  reason: {r}\n"));
                }
                let id = |k: &str| e[k].as_str().unwrap_or("none (plaintext)").to_string();
                out.push_str(&format!("  source:      {}", id("src.identity")));
                out.push_str(&format!(" ({})\n", e["src.addr"].as_str().unwrap_or("?")));
                out.push_str(&format!("  destination: {}\n", id("dst.identity")));
                out.push_str(&format!(
                    "  tls:         {}\n",
                    e["tls.mode"].as_str().unwrap_or("?")
                ));
            }
            None => {
                let why = match &self.destination {
                    Some(d)
                        if !d.endpoints.is_empty()
                            && d.endpoints.iter().all(|(w, _)| !w.has_proxy) =>
                    {
                        "the destination runs without a proxy: nothing decided or recorded there"
                            .to_string()
                    }
                    None => format!(
                        "no service of the mesh is {}: not a mesh destination",
                        self.url
                    ),
                    _ => "the destination's proxy recorded nothing for this request".to_string(),
                };
                out.push_str(&format!("decision: none ({why})\n"));
                if let Some(tls) = self.tls() {
                    out.push_str(&format!("  tls:         {tls}\n"));
                }
            }
        }
        out
    }
}

/// Sends `spec` and finds what the proxies recorded.
pub async fn call(live: &Live, spec: &CallSpec) -> Result<CallOutcome, OpsError> {
    let url = Url::parse(&spec.url)?;
    let workloads = live.workloads();
    let from = mesh::find(&workloads, &spec.from)?.clone();
    let destination = mesh::destination(&live.config, &url.host, url.port);
    let request_id = request_id();
    // Where the request goes: the caller's sidecar, or (without one) an
    // endpoint of the service, from the caller's own address.
    let (target, bind): (SocketAddr, Option<IpAddr>) = if from.has_proxy {
        let proxy = live.proxy(&from.key())?;
        (outbound_listener(proxy, &from.key(), &url).await?, None)
    } else {
        let d = destination.as_ref().ok_or_else(|| {
            OpsError::NotFound(format!(
                "{} runs without a proxy, and no ServiceEntry of the mesh has host {} with port {}",
                from.key(),
                url.host,
                url.port
            ))
        })?;
        let (w, port) = d
            .endpoints
            .iter()
            .find(|(w, _)| w.address.is_some())
            .ok_or_else(|| {
                OpsError::NotFound(format!(
                    "service {} has no workload with an address",
                    d.service
                ))
            })?;
        (
            SocketAddr::new(w.address.expect("filtered"), *port),
            from.address,
        )
    };
    let (reply, local) = send(target, bind, &url, spec, &request_id).await;
    let mut outcome = CallOutcome {
        from: from.key(),
        from_has_proxy: from.has_proxy,
        method: spec.method.clone(),
        url: spec.url.clone(),
        request_id,
        reply,
        destination,
        source_entry: None,
        destination_entry: None,
    };
    find_entries(live, &mut outcome, local).await;
    Ok(outcome)
}

/// The outbound listener of `proxy` for `url`, from its `/config_dump`:
/// the HTTP one, or the TCP one for that service.
async fn outbound_listener(
    proxy: &crate::live::ProxyRecord,
    key: &str,
    url: &Url,
) -> Result<SocketAddr, OpsError> {
    let admin = proxy
        .admin
        .expect("reachable proxies have an admin address");
    let dump = get_json(Side::Proxy, admin, "/config_dump").await?;
    if url.scheme == Scheme::Tcp {
        return dump["outbound"]["tcp"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|t| {
                t["host"].as_str() == Some(url.host.as_str())
                    && t["port"].as_u64() == Some(u64::from(url.port))
            })
            .and_then(|t| t["listen"].as_str()?.parse().ok())
            .ok_or_else(|| {
                OpsError::NotFound(format!(
                    "the proxy of {key} has no TCP listener for {}:{} (annotation meshward.io/tcp-outbound)",
                    url.host, url.port
                ))
            });
    }
    dump["outbound"]["http"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| {
            OpsError::NotFound(format!(
                "the proxy of {key} has no outbound HTTP listener (annotation meshward.io/outbound, or `meshward proxy --outbound`)"
            ))
        })
}

/// Sends the request; the reply and the local address of the connection.
async fn send(
    target: SocketAddr,
    bind: Option<IpAddr>,
    url: &Url,
    spec: &CallSpec,
    request_id: &str,
) -> (Reply, Option<SocketAddr>) {
    let attempt = async {
        let socket = if target.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .map_err(|e| (e.to_string(), None))?;
        if let Some(ip) = bind {
            socket.bind(SocketAddr::new(ip, 0)).map_err(|e| {
                (
                    format!("cannot bind to the caller's address {ip}: {e}"),
                    None,
                )
            })?;
        }
        let stream = socket
            .connect(target)
            .await
            .map_err(|e| (format!("cannot connect to {target}: {e}"), None))?;
        let local = stream.local_addr().ok();
        if url.scheme == Scheme::Tcp {
            return tcp_exchange(stream, spec.body.as_deref().unwrap_or_default())
                .await
                .map(|r| (r, local))
                .map_err(|e| (e, local));
        }
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| (e.to_string(), local))?;
        tokio::spawn(conn);
        let mut req = Request::builder()
            .method(spec.method.as_str())
            .uri(url.path.as_str())
            .header(hyper::header::HOST, url.authority())
            .header("x-request-id", request_id);
        for (k, v) in &spec.headers {
            req = req.header(k.as_str(), v.as_str());
        }
        let body = Full::new(Bytes::from(spec.body.clone().unwrap_or_default()));
        let req = req
            .body(body)
            .map_err(|e| (format!("bad request: {e}"), local))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| (connection_error(&e), local))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let head = &body[..body.len().min(BODY_HEAD)];
        Ok::<_, (String, Option<SocketAddr>)>((
            Reply::Response {
                status: status.as_u16(),
                reason: status.canonical_reason().unwrap_or("").to_string(),
                body_head: String::from_utf8_lossy(head).into_owned(),
                body_len: body.len(),
            },
            local,
        ))
    };
    match tokio::time::timeout(Duration::from_secs(30), attempt).await {
        Ok(Ok(r)) => r,
        Ok(Err((e, local))) => (Reply::Failed(e), local),
        Err(_) => (Reply::Failed("no response within 30s".into()), None),
    }
}

/// Sends `body`, closes the write side, and reads what comes back until
/// the destination closes (at most 64 KiB kept).
async fn tcp_exchange(mut stream: tokio::net::TcpStream, body: &[u8]) -> Result<Reply, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let closed =
        |e: std::io::Error| format!("the connection failed: {e} (refused by the destination?)");
    stream.write_all(body).await.map_err(closed)?;
    stream.shutdown().await.map_err(closed)?;
    let mut back = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => {
                if back.len() < 64 << 10 {
                    back.extend_from_slice(&buf[..n]);
                }
            }
            Err(e) if back.is_empty() => return Err(closed(e)),
            Err(_) => break,
        }
    }
    if back.is_empty() && !body.is_empty() {
        return Err(
            "the connection was closed with nothing sent back (refused by the destination?)".into(),
        );
    }
    Ok(Reply::Bytes {
        head: String::from_utf8_lossy(&back[..back.len().min(BODY_HEAD)]).into_owned(),
        len: back.len(),
    })
}

fn connection_error(e: &hyper::Error) -> String {
    if e.is_incomplete_message() || e.is_closed() {
        "the connection was closed before a response (refused by the destination)".to_string()
    } else {
        let mut s = e.to_string();
        let mut src = std::error::Error::source(e);
        while let Some(inner) = src {
            s.push_str(&format!(": {inner}"));
            src = inner.source();
        }
        s
    }
}

/// Looks up, in the proxies' recent access logs, the entries of this call.
async fn find_entries(live: &Live, outcome: &mut CallOutcome, local: Option<SocketAddr>) {
    let want_source = outcome.from_has_proxy;
    let want_destination = outcome
        .destination
        .as_ref()
        .is_some_and(|d| d.endpoints.iter().any(|(w, _)| w.has_proxy));
    let deadline = tokio::time::Instant::now() + LOG_WAIT;
    loop {
        for (proxy, admin) in live.reachable() {
            let mut queries = vec![format!(
                "/access_log?request_id={}",
                query_value(&outcome.request_id)
            )];
            if !outcome.from_has_proxy
                && let Some(local) = local
            {
                queries.push(format!(
                    "/access_log?src={}",
                    query_value(&local.to_string())
                ));
            }
            for q in queries {
                let Ok(v) = get_json(Side::Proxy, admin, &q).await else {
                    continue;
                };
                for e in v["entries"].as_array().into_iter().flatten() {
                    let mut e = e.clone();
                    e["workload"] = json!(proxy.workload);
                    match e["reporter"].as_str() {
                        Some("source") if outcome.source_entry.is_none() => {
                            outcome.source_entry = Some(e)
                        }
                        Some("destination") if outcome.destination_entry.is_none() => {
                            outcome.destination_entry = Some(e)
                        }
                        _ => {}
                    }
                }
            }
        }
        let done = (!want_source || outcome.source_entry.is_some())
            && (!want_destination || outcome.destination_entry.is_some());
        if done || tokio::time::Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A random request id in the UUID v4 format.
fn request_id() -> String {
    let a = fastrand::u64(..);
    let b = fastrand::u64(..);
    let v = (a & 0xffff_ffff_ffff_0fff) | 0x0000_0000_0000_4000;
    let w = (b & 0x3fff_ffff_ffff_ffff) | 0x8000_0000_0000_0000;
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        v >> 32,
        (v >> 16) & 0xffff,
        v & 0xffff,
        w >> 48,
        w & 0xffff_ffff_ffff
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = Url::parse("http://Orders.production.svc.cluster.local:8080/api/v1/orders/7?x=1")
            .unwrap();
        assert_eq!(u.host, "orders.production.svc.cluster.local");
        assert_eq!(u.port, 8080);
        assert_eq!(u.path, "/api/v1/orders/7?x=1");
        assert_eq!(u.authority(), "orders.production.svc.cluster.local:8080");
        let u = Url::parse("http://billing").unwrap();
        assert_eq!(
            (u.port, u.path.as_str(), u.authority().as_str()),
            (80, "/", "billing")
        );
        assert_eq!(Url::parse("http://a?q").unwrap().path, "/?q");
        for bad in [
            "https://a/",
            "a/b",
            "http://:80/",
            "http://a:x/",
            "http://a/b c",
            "http://u@a/",
        ] {
            assert!(Url::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn request_ids_are_uuid_v4_shaped() {
        let id = request_id();
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
        assert!(matches!(&id[19..20], "8" | "9" | "a" | "b"), "{id}");
        assert_ne!(id, request_id());
    }
}
