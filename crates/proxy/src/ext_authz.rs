//! CUSTOM authorization: the checks of `envoyExtAuthzHttp` and
//! `envoyExtAuthzGrpc` providers, as Envoy's ext_authz filter makes them in
//! an Istio sidecar.
//!
//! HTTP: for a request that a CUSTOM policy matches, the proxy sends the
//! provider a request with the same method, the provider's `pathPrefix`
//! and the request's path, the request's `Host`, the headers the provider
//! lists (`includeRequestHeadersInCheck`) and the fixed ones it adds, and
//! no body. A `200` allows the request (the listed headers of the answer go
//! on to the application and back to the client); any other answer denies
//! it and is what the client gets (status, body, listed headers).
//!
//! gRPC: `envoy.service.auth.v3.Authorization/Check` with the request's
//! attributes (peers with their addresses and SPIFFE IDs, method, path,
//! host, all headers); status code 0 allows, with the answer's header
//! edits, any other denies with the answer's HTTP response (403 unless it
//! says otherwise).
//!
//! Either way, a provider that cannot be reached, fails or is too slow
//! gives `statusOnError` (default 403), or lets the request through with
//! `failOpen`. The check goes through the proxy's own outbound path: the
//! provider is a service of the mesh, reached with mTLS when it has a
//! proxy.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue};
use http_body_util::{BodyExt, Full};
use meshward_config::model::{ExtAuthz, header_listed};

use crate::outbound::Outbound;
use crate::snapshot::Snapshot;

pub mod proto;

/// Largest answer body of a denying provider passed on to the client.
pub const MAX_DENY_BODY: usize = 64 * 1024;

/// A header field.
pub type Field = (HeaderName, HeaderValue);

/// Header fields as name and value.
pub type Fields = Vec<Field>;

/// Whether a provider's answer may add, replace or remove header `name`:
/// never the framing, hop-by-hop, routing and identity headers the proxy
/// owns (a second `Content-Length` would smuggle a request or response).
pub fn editable(name: &HeaderName) -> bool {
    !meshward_config::model::security::PROXY_OWNED_HEADERS.contains(&name.as_str())
}

/// `fields` as the HTTP/1.1 writer takes them.
pub fn field_refs(fields: &[Field]) -> Vec<(&str, &[u8])> {
    fields
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_bytes()))
        .collect()
}

/// What the provider decided.
#[derive(Debug)]
pub enum Outcome {
    /// Go on with the forwarded request's headers edited (`remove` these,
    /// then `set` these, replacing, and `append` these) and `downstream`
    /// added to the response.
    Allow {
        remove: Vec<HeaderName>,
        set: Fields,
        append: Fields,
        downstream: Fields,
    },
    /// Answer the client with this instead.
    Deny {
        status: u16,
        headers: Fields,
        body: Bytes,
    },
    /// The provider could not decide (the reason); `allow` when the
    /// provider fails open, else answer `status`.
    Failed {
        reason: String,
        allow: bool,
        status: u16,
    },
}

impl Outcome {
    /// Whether the request goes on.
    pub fn allows(&self) -> bool {
        matches!(
            self,
            Outcome::Allow { .. } | Outcome::Failed { allow: true, .. }
        )
    }

    /// The access log's words for it.
    pub fn reason(&self, provider: &str) -> String {
        let words = crate::outcome::ExtAuthzWords(provider);
        match self {
            Outcome::Allow { .. } => words.allowed(),
            Outcome::Deny { status, .. } => words.denied(Some(*status)),
            Outcome::Failed { reason, allow, .. } => words.failed(reason, *allow),
        }
    }
}

/// The request or connection being checked.
#[derive(Debug)]
pub struct Check<'a> {
    /// The HTTP request; `None` for a TCP connection, which only gRPC
    /// providers check (as Envoy's network ext_authz filter does).
    pub http: Option<HttpCheck<'a>>,
    /// The peer, and its SPIFFE ID when it used mTLS.
    pub source: (std::net::SocketAddr, Option<&'a str>),
    /// This workload's address and SPIFFE ID.
    pub destination: (std::net::SocketAddr, &'a str),
}

/// The HTTP request being checked.
#[derive(Debug)]
pub struct HttpCheck<'a> {
    pub method: &'a str,
    pub host: &'a str,
    /// Path and query, as authorization saw them (normalized).
    pub path: &'a str,
    /// Every header field of the request.
    pub headers: Vec<(&'a str, &'a [u8])>,
    /// `HTTP/1.1` or `HTTP/2`.
    pub protocol: &'static str,
}

/// Asks provider `name` about `check`.
pub async fn check(
    outbound: &Outbound,
    snap: &Arc<Snapshot>,
    name: &str,
    check: Check<'_>,
) -> Outcome {
    let provider = snap.config.mesh.provider(name);
    let (Some(p), Some(service), Some(port)) = (
        provider.and_then(|p| p.authz.as_ref()),
        provider.and_then(|p| p.service.as_deref()),
        provider.and_then(|p| p.port),
    ) else {
        // The policy engine denies a CUSTOM rule whose provider is not an
        // authorization provider before this is reached.
        return failed(format!("no authorization provider \"{name}\""), None);
    };
    // Istio's `[<namespace>/]<hostname>`: the host names the service.
    let service = service.rsplit_once('/').map_or(service, |(_, host)| host);
    let timeout = Duration::from_millis(p.timeout_ms);
    let asked = if provider.is_some_and(|p| p.kind == "envoyExtAuthzGrpc") {
        tokio::time::timeout(timeout, grpc_check(outbound, snap, (service, port), &check)).await
    } else {
        tokio::time::timeout(
            timeout,
            http_check(outbound, snap, (service, port), p, &check),
        )
        .await
    };
    match asked {
        Ok(Ok(outcome)) => outcome,
        Ok(Err(e)) => failed(format!("check failed: {e}"), Some(p)),
        Err(_) => failed(format!("no answer within {timeout:?}"), Some(p)),
    }
}

/// An `envoyExtAuthzHttp` check: a `200` allows, anything else denies.
async fn http_check(
    outbound: &Outbound,
    snap: &Arc<Snapshot>,
    (service, port): (&str, u16),
    p: &ExtAuthz,
    check: &Check<'_>,
) -> Result<Outcome, String> {
    let Some(http) = &check.http else {
        return Err("an HTTP provider cannot check a TCP connection".into());
    };
    let req = check_request(p, http)?;
    let resp = outbound.send(snap, service, port, req, false).await?;
    let status = resp.status().as_u16();
    // As Envoy: a 5xx is the provider failing, not a denial.
    if resp.status().is_server_error() {
        return Err(format!("the provider answered {status}"));
    }
    let headers = resp.headers().clone();
    let body = http_body_util::Limited::new(resp.into_body(), MAX_DENY_BODY)
        .collect()
        .await
        .map_err(|e| format!("reading the answer: {e}"))?
        .to_bytes();
    let pick = |list: &[String]| picked(&headers, |n| header_listed(list, n));
    Ok(if status == 200 {
        Outcome::Allow {
            remove: headers_to_remove(&headers),
            set: pick(&p.headers_to_upstream_on_allow),
            append: Vec::new(),
            downstream: pick(&p.headers_to_downstream_on_allow),
        }
    } else {
        Outcome::Deny {
            status,
            headers: denial_headers(p, &headers),
            body,
        }
    })
}

/// The request headers an allowing HTTP provider names in
/// `x-envoy-auth-headers-to-remove` (comma-separated, as Envoy reads it).
fn headers_to_remove(answer: &http::HeaderMap) -> Vec<HeaderName> {
    answer
        .get_all("x-envoy-auth-headers-to-remove")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().to_ascii_lowercase().as_bytes()).ok())
        .filter(editable)
        .collect()
}

/// The editable fields of `headers` whose names `keep` accepts.
fn picked(headers: &http::HeaderMap, keep: impl Fn(&str) -> bool) -> Fields {
    headers
        .iter()
        .filter(|(n, _)| keep(n.as_str()) && editable(n))
        .map(|(n, v)| (n.clone(), v.clone()))
        .collect()
}

/// The fields of a denying HTTP provider's answer that the client gets, as
/// Envoy picks them: with no `headersToDownstreamOnDeny`, all of them;
/// otherwise those listed, and always `Location` and `WWW-Authenticate`
/// (a login redirect or challenge must reach the client). Never the ones
/// the proxy owns (framing, hop-by-hop, `Host`).
fn denial_headers(p: &ExtAuthz, headers: &http::HeaderMap) -> Fields {
    let list = &p.headers_to_downstream_on_deny;
    picked(headers, |n| {
        list.is_empty() || n == "location" || n == "www-authenticate" || header_listed(list, n)
    })
}

/// Largest gRPC answer read.
const MAX_GRPC_ANSWER: usize = 1024 * 1024;

/// An `envoyExtAuthzGrpc` check: `Authorization/Check` over HTTP/2 with
/// the request's attributes; status code 0 allows (with the answer's
/// header edits), any other denies (with its HTTP response, 403 by
/// default).
async fn grpc_check(
    outbound: &Outbound,
    snap: &Arc<Snapshot>,
    (service, port): (&str, u16),
    check: &Check<'_>,
) -> Result<Outcome, String> {
    use prost::Message as _;
    let msg = grpc_request(check)?.encode_to_vec();
    let mut framed = Vec::with_capacity(5 + msg.len());
    framed.push(0);
    framed.extend_from_slice(&u32::try_from(msg.len()).unwrap_or(u32::MAX).to_be_bytes());
    framed.extend_from_slice(&msg);
    let req = http::Request::post(proto::CHECK_PATH)
        .header(http::header::HOST, service)
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers")
        .body(
            Full::new(Bytes::from(framed))
                .map_err(|never| match never {})
                .boxed(),
        )
        .map_err(|e| e.to_string())?;
    let resp = outbound.send(snap, service, port, req, true).await?;
    if resp.status() != http::StatusCode::OK {
        return Err(format!("HTTP status {}", resp.status()));
    }
    let head = resp.headers().clone();
    let collected = http_body_util::Limited::new(resp.into_body(), MAX_GRPC_ANSWER)
        .collect()
        .await
        .map_err(|e| format!("reading the answer: {e}"))?;
    let trailers = collected.trailers().cloned().unwrap_or_default();
    let body = collected.to_bytes();
    // grpc-status is in the trailers, or in the head of a trailers-only
    // answer.
    let field = |name: &str| {
        trailers
            .get(name)
            .or_else(|| head.get(name))
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let code = field("grpc-status");
    if code != "0" {
        return Err(format!(
            "gRPC status {}{}",
            if code.is_empty() { "missing" } else { &code },
            match field("grpc-message") {
                m if m.is_empty() => String::new(),
                m => format!(": {m}"),
            }
        ));
    }
    let answer = match body.as_ref() {
        [0, len @ ..] if len.len() >= 4 => {
            let n = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
            let rest = &len[4..];
            if rest.len() != n {
                return Err("a truncated or extra gRPC message".into());
            }
            proto::CheckResponse::decode(rest).map_err(|e| format!("bad CheckResponse: {e}"))?
        }
        [1, ..] => return Err("a compressed gRPC message (not supported)".into()),
        _ => return Err("no CheckResponse in the answer".into()),
    };
    Ok(grpc_outcome(answer))
}

/// The CheckRequest of `check`, with Envoy's attributes: the peers, and
/// the request when there is one. A request header whose value is not
/// UTF-8 cannot be put in the message (its `headers` are proto3 strings):
/// the check fails rather than ask the provider about a value other than
/// the one the application would get.
fn grpc_request(check: &Check<'_>) -> Result<proto::CheckRequest, String> {
    let peer = |addr: std::net::SocketAddr, principal: Option<&str>| proto::Peer {
        address: Some(proto::Address {
            socket_address: Some(proto::SocketAddress {
                address: addr.ip().to_string(),
                port_value: u32::from(addr.port()),
            }),
        }),
        principal: principal.unwrap_or_default().to_string(),
    };
    Ok(proto::CheckRequest {
        attributes: Some(proto::AttributeContext {
            source: Some(peer(check.source.0, check.source.1)),
            destination: Some(peer(check.destination.0, Some(check.destination.1))),
            request: check.http.as_ref().map(grpc_http_request).transpose()?,
        }),
    })
}

/// The `request` attributes of an HTTP check.
fn grpc_http_request(check: &HttpCheck<'_>) -> Result<proto::Request, String> {
    let mut headers = std::collections::HashMap::new();
    for (name, value) in &check.headers {
        let value = std::str::from_utf8(value).map_err(|_| {
            format!("request header {name} is not UTF-8: it cannot be sent in a CheckRequest")
        })?;
        headers
            .entry(name.to_ascii_lowercase())
            .and_modify(|v: &mut String| {
                v.push(',');
                v.push_str(value);
            })
            .or_insert_with(|| value.to_string());
    }
    headers.insert(":authority".into(), check.host.to_string());
    headers.insert(":method".into(), check.method.to_string());
    headers.insert(":path".into(), check.path.to_string());
    let size = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(-1);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Ok(proto::Request {
        time: Some(proto::Timestamp {
            seconds: i64::try_from(now.as_secs()).unwrap_or(i64::MAX),
            nanos: i32::try_from(now.subsec_nanos()).unwrap_or(0),
        }),
        http: Some(proto::HttpRequest {
            id: headers.get("x-request-id").cloned().unwrap_or_default(),
            method: check.method.to_string(),
            path: check.path.to_string(),
            host: check.host.to_string(),
            scheme: "http".into(),
            size,
            protocol: check.protocol.to_string(),
            headers,
        }),
    })
}

/// What a CheckResponse says.
fn grpc_outcome(answer: proto::CheckResponse) -> Outcome {
    let fields = |list: &[proto::HeaderValueOption]| -> Vec<(Field, bool)> {
        list.iter()
            .filter_map(|o| {
                let h = o.header.as_ref()?;
                let name = HeaderName::from_bytes(h.key.as_bytes())
                    .ok()
                    .filter(editable)?;
                let value = if h.value.is_empty() {
                    HeaderValue::from_bytes(&h.raw_value).ok()?
                } else {
                    HeaderValue::from_str(&h.value).ok()?
                };
                // Envoy appends when `append` is true and otherwise
                // replaces (its default for these headers).
                let append = o.append.as_ref().is_some_and(|a| a.value);
                Some(((name, value), append))
            })
            .collect()
    };
    let code = answer.status.as_ref().map_or(0, |s| s.code);
    if code == 0 {
        let ok = answer.ok_response.unwrap_or_default();
        let (append, set): (Vec<_>, Vec<_>) =
            fields(&ok.headers).into_iter().partition(|(_, a)| *a);
        Outcome::Allow {
            remove: ok
                .headers_to_remove
                .iter()
                .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
                .filter(editable)
                .collect(),
            set: set.into_iter().map(|(f, _)| f).collect(),
            append: append.into_iter().map(|(f, _)| f).collect(),
            downstream: fields(&ok.response_headers_to_add)
                .into_iter()
                .map(|(f, _)| f)
                .collect(),
        }
    } else {
        let denied = answer.denied_response.unwrap_or_default();
        let status = denied
            .status
            .and_then(|s| u16::try_from(s.code).ok())
            .filter(|c| (200..=599).contains(c))
            .unwrap_or(403);
        Outcome::Deny {
            status,
            headers: fields(&denied.headers)
                .into_iter()
                .map(|(f, _)| f)
                .collect(),
            body: Bytes::from(denied.body),
        }
    }
}

fn failed(reason: String, p: Option<&ExtAuthz>) -> Outcome {
    tracing::warn!(target: "meshward::ext_authz", "{reason}");
    Outcome::Failed {
        reason,
        allow: p.is_some_and(|p| p.fail_open),
        status: p.map_or(403, |p| p.status_on_error),
    }
}

/// The check request: the method, `pathPrefix` + path, `Host`, the listed
/// headers and the fixed ones, no body.
fn check_request(
    p: &ExtAuthz,
    c: &HttpCheck<'_>,
) -> Result<http::Request<crate::http::Body>, String> {
    let mut req = http::Request::builder()
        .method(c.method)
        .uri(format!("{}{}", p.path_prefix, c.path))
        .header(http::header::HOST, c.host)
        .header(http::header::CONTENT_LENGTH, "0");
    for (name, value) in &c.headers {
        let skip = ["host", "content-length", "transfer-encoding", "connection"];
        if header_listed(&p.include_request_headers, name)
            && !skip.iter().any(|s| s.eq_ignore_ascii_case(name))
        {
            req = req.header(*name, *value);
        }
    }
    for (name, value) in &p.include_additional_headers {
        req = req.header(name.as_str(), value.as_str());
    }
    let body = Full::new(Bytes::new())
        .map_err(|never| match never {})
        .boxed();
    req.body(body)
        .map_err(|e| format!("cannot make the check request: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider() -> ExtAuthz {
        ExtAuthz {
            path_prefix: "/check".into(),
            include_request_headers: vec!["authorization".into(), "x-auth-*".into()],
            include_additional_headers: [("x-from".to_string(), "mesh".to_string())].into(),
            ..ExtAuthz::default()
        }
    }

    #[test]
    fn an_allowing_answer_may_name_request_headers_to_remove() {
        let mut answer = http::HeaderMap::new();
        answer.append(
            "x-envoy-auth-headers-to-remove",
            HeaderValue::from_static("Cookie, x-debug"),
        );
        answer.append(
            "x-envoy-auth-headers-to-remove",
            HeaderValue::from_static("content-length,bad name"),
        );
        let names: Vec<String> = headers_to_remove(&answer)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(names, ["cookie", "x-debug"], "never the framing");
    }

    #[test]
    fn a_denial_passes_all_its_headers_unless_some_are_listed() {
        let mut answer = http::HeaderMap::new();
        for (n, v) in [
            ("location", "/login"),
            ("www-authenticate", "Bearer"),
            ("set-cookie", "a=1"),
            ("x-deny-reason", "no"),
            ("content-length", "5"),
            ("connection", "close"),
            ("host", "evil"),
        ] {
            answer.append(n, HeaderValue::from_static(v));
        }
        let names =
            |fields: Fields| -> Vec<String> { fields.iter().map(|(n, _)| n.to_string()).collect() };
        // Nothing listed: every header but the proxy's own.
        let all = denial_headers(&ExtAuthz::default(), &answer);
        assert_eq!(
            names(all),
            [
                "location",
                "www-authenticate",
                "set-cookie",
                "x-deny-reason"
            ]
        );
        // Listed: those, plus Location and WWW-Authenticate.
        let listed = ExtAuthz {
            headers_to_downstream_on_deny: vec!["x-deny-*".into(), "host".into()],
            ..ExtAuthz::default()
        };
        assert_eq!(
            names(denial_headers(&listed, &answer)),
            ["location", "www-authenticate", "x-deny-reason"]
        );
    }

    #[test]
    fn the_check_request_carries_what_the_provider_lists() {
        let c = HttpCheck {
            method: "DELETE",
            host: "orders.shop",
            path: "/api/v1/orders/7?x=1",
            headers: vec![
                ("Authorization", b"Bearer t"),
                ("x-auth-user", b"alice"),
                ("cookie", b"secret"),
                ("content-length", b"12"),
                ("host", b"other"),
            ],
            protocol: "HTTP/1.1",
        };
        let req = check_request(&provider(), &c).unwrap();
        assert_eq!(req.method(), "DELETE");
        assert_eq!(req.uri(), "/check/api/v1/orders/7?x=1");
        let h = req.headers();
        assert_eq!(h["host"], "orders.shop");
        assert_eq!(h["content-length"], "0");
        assert_eq!(h["authorization"], "Bearer t");
        assert_eq!(h["x-auth-user"], "alice");
        assert_eq!(h["x-from"], "mesh");
        assert!(!h.contains_key("cookie"), "not listed");
        assert_eq!(h.get_all("host").iter().count(), 1);
        assert_eq!(h.get_all("content-length").iter().count(), 1);
    }

    /// A check from `spiffe://cluster.local/ns/a/sa/b` at 10.0.0.1:5000 to
    /// `spiffe://cluster.local/ns/c/sa/d` at 10.0.0.2:8080.
    fn between(http: Option<HttpCheck<'_>>) -> Check<'_> {
        Check {
            http,
            source: (
                "10.0.0.1:5000".parse().unwrap(),
                Some("spiffe://cluster.local/ns/a/sa/b"),
            ),
            destination: (
                "10.0.0.2:8080".parse().unwrap(),
                "spiffe://cluster.local/ns/c/sa/d",
            ),
        }
    }

    #[test]
    fn the_grpc_check_request_of_a_tcp_connection_carries_the_peers_only() {
        let a = grpc_request(&between(None)).unwrap().attributes.unwrap();
        assert_eq!(
            a.source.unwrap().principal,
            "spiffe://cluster.local/ns/a/sa/b"
        );
        let dest = a.destination.unwrap();
        assert_eq!(dest.principal, "spiffe://cluster.local/ns/c/sa/d");
        let addr = dest.address.unwrap().socket_address.unwrap();
        assert_eq!((addr.address.as_str(), addr.port_value), ("10.0.0.2", 8080));
        assert!(a.request.is_none());
    }

    #[test]
    fn the_grpc_check_request_carries_the_attributes() {
        let c = between(Some(HttpCheck {
            method: "POST",
            host: "orders.shop",
            path: "/api?x=1",
            headers: vec![
                ("X-Tag", b"a"),
                ("x-tag", b"b"),
                ("content-length", b"12"),
                ("x-request-id", b"r-1"),
            ],
            protocol: "HTTP/2",
        }));
        let a = grpc_request(&c).unwrap().attributes.unwrap();
        let source = a.source.unwrap();
        assert_eq!(source.principal, "spiffe://cluster.local/ns/a/sa/b");
        let addr = source.address.unwrap().socket_address.unwrap();
        assert_eq!((addr.address.as_str(), addr.port_value), ("10.0.0.1", 5000));
        assert_eq!(
            a.destination.unwrap().principal,
            "spiffe://cluster.local/ns/c/sa/d"
        );
        let http = a.request.unwrap().http.unwrap();
        assert_eq!(
            (http.method.as_str(), http.path.as_str(), http.host.as_str()),
            ("POST", "/api?x=1", "orders.shop")
        );
        assert_eq!(
            (http.size, http.protocol.as_str(), http.id.as_str()),
            (12, "HTTP/2", "r-1")
        );
        assert_eq!(http.headers["x-tag"], "a,b");
        assert_eq!(http.headers[":path"], "/api?x=1");
        assert_eq!(http.headers[":authority"], "orders.shop");
    }

    #[test]
    fn a_header_that_is_not_utf8_fails_the_grpc_check_instead_of_being_altered() {
        let c = between(Some(HttpCheck {
            method: "GET",
            host: "orders.shop",
            path: "/",
            headers: vec![("x-user", b"alice\xff"), ("x-bad", b"\xfe")],
            protocol: "HTTP/1.1",
        }));
        let e = grpc_request(&c).unwrap_err();
        assert!(e.contains("x-user") && e.contains("not UTF-8"), "{e}");
    }

    fn option(key: &str, value: &str, append: Option<bool>) -> proto::HeaderValueOption {
        proto::HeaderValueOption {
            header: Some(proto::HeaderValue {
                key: key.into(),
                value: value.into(),
                raw_value: Vec::new(),
            }),
            append: append.map(|value| proto::BoolValue { value }),
            append_action: 0,
        }
    }

    #[test]
    fn grpc_answers_become_outcomes() {
        let ok = proto::CheckResponse {
            status: Some(proto::RpcStatus {
                code: 0,
                message: String::new(),
            }),
            ok_response: Some(proto::OkHttpResponse {
                headers: vec![
                    option("x-user", "alice", None),
                    option("x-tag", "t", Some(true)),
                    option("bad header", "x", None),
                    // Never from a provider: framing, routing, identity.
                    option("content-length", "0", None),
                    option("Transfer-Encoding", "chunked", Some(true)),
                    option("host", "elsewhere", None),
                    option("x-forwarded-client-cert", "By=me", None),
                ],
                headers_to_remove: vec!["x-drop".into(), "content-length".into()],
                response_headers_to_add: vec![
                    option("x-session", "s1", None),
                    option("content-length", "5", None),
                ],
            }),
            denied_response: None,
        };
        let Outcome::Allow {
            remove,
            set,
            append,
            downstream,
        } = grpc_outcome(ok)
        else {
            panic!("allowed")
        };
        assert_eq!(remove, ["x-drop"]);
        assert_eq!(
            set,
            [(
                HeaderName::from_static("x-user"),
                HeaderValue::from_static("alice")
            )]
        );
        assert_eq!(
            append,
            [(
                HeaderName::from_static("x-tag"),
                HeaderValue::from_static("t")
            )]
        );
        assert_eq!(downstream.len(), 1);
        // No status at all is OK too.
        assert!(grpc_outcome(proto::CheckResponse::default()).allows());

        let denied = |status: Option<i32>| proto::CheckResponse {
            status: Some(proto::RpcStatus {
                code: 7,
                message: "no".into(),
            }),
            denied_response: Some(proto::DeniedHttpResponse {
                status: status.map(|code| proto::HttpStatus { code }),
                headers: vec![option("location", "/login", None)],
                body: "go login".into(),
            }),
            ok_response: None,
        };
        let Outcome::Deny {
            status,
            headers,
            body,
        } = grpc_outcome(denied(Some(302)))
        else {
            panic!("denied")
        };
        assert_eq!((status, &body[..]), (302, &b"go login"[..]));
        assert_eq!(headers[0].1, "/login");
        // Without an HTTP status (or an impossible one): 403.
        for s in [None, Some(0), Some(42)] {
            assert!(matches!(
                grpc_outcome(denied(s)),
                Outcome::Deny { status: 403, .. }
            ));
        }
    }

    #[test]
    fn outcomes_say_whether_the_request_goes_on() {
        let allow = Outcome::Allow {
            remove: Vec::new(),
            set: Vec::new(),
            append: Vec::new(),
            downstream: Vec::new(),
        };
        assert!(allow.allows());
        let deny = Outcome::Deny {
            status: 302,
            headers: Vec::new(),
            body: Bytes::new(),
        };
        assert!(!deny.allows());
        assert_eq!(deny.reason("oauth"), "ext_authz oauth: denied (302)");
        let open = failed(
            "down".into(),
            Some(&ExtAuthz {
                fail_open: true,
                ..ExtAuthz::default()
            }),
        );
        assert!(open.allows());
        assert_eq!(open.reason("p"), "ext_authz p: down (failOpen)");
        let closed = failed(
            "down".into(),
            Some(&ExtAuthz {
                status_on_error: 503,
                ..ExtAuthz::default()
            }),
        );
        assert!(matches!(
            closed,
            Outcome::Failed {
                allow: false,
                status: 503,
                ..
            }
        ));
    }
}
