//! CUSTOM authorization: the check an `envoyExtAuthzHttp` provider makes,
//! as Envoy's ext_authz filter makes it in an Istio sidecar.
//!
//! For a request that a CUSTOM policy matches, the proxy sends the
//! provider a request with the same method, the provider's `pathPrefix`
//! and the request's path, the request's `Host`, the headers the provider
//! lists (`includeRequestHeadersInCheck`) and the fixed ones it adds, and
//! no body. A `200` allows the request (the listed headers of the answer go
//! on to the application and back to the client); any other answer denies
//! it and is what the client gets (status, body, listed headers). A
//! provider that cannot be reached, fails or is too slow gives
//! `statusOnError` (default 403), or lets the request through with
//! `failOpen`. The check goes through the proxy's own outbound path: the
//! provider is a service of the mesh, reached with mTLS when it has a
//! proxy.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue};
use http_body_util::{BodyExt, Full};
use meshward_config::model::{ExtAuthz, header_listed};

use crate::snapshot::Snapshot;
use crate::state::State;

/// Largest answer body of a denying provider passed on to the client.
pub const MAX_DENY_BODY: usize = 64 * 1024;

/// A header field.
pub type Field = (HeaderName, HeaderValue);

/// Header fields as name and value.
pub type Fields = Vec<Field>;

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
    /// Go on: set `upstream` on the forwarded request, add `downstream` to
    /// the response.
    Allow {
        upstream: Fields,
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

    /// What the client gets instead of the application's answer, for an
    /// outcome that stops the request: status, header fields, body.
    pub fn refusal(&self) -> Option<(u16, &[Field], &[u8])> {
        match self {
            Outcome::Allow { .. } | Outcome::Failed { allow: true, .. } => None,
            Outcome::Deny {
                status,
                headers,
                body,
            } => Some((*status, headers, body)),
            Outcome::Failed { status, .. } => Some((*status, &[], b"")),
        }
    }

    /// The access log's words for it.
    pub fn reason(&self, provider: &str) -> String {
        match self {
            Outcome::Allow { .. } => format!("ext_authz {provider}: allowed"),
            Outcome::Deny { status, .. } => format!("ext_authz {provider}: denied ({status})"),
            Outcome::Failed { reason, allow, .. } => format!(
                "ext_authz {provider}: {reason}{}",
                if *allow { " (failOpen)" } else { "" }
            ),
        }
    }
}

/// The request being checked.
#[derive(Debug)]
pub struct Check<'a> {
    pub method: &'a str,
    pub host: &'a str,
    /// Path and query as the request had them.
    pub path: &'a str,
    /// Every header field of the request.
    pub headers: Vec<(&'a str, &'a [u8])>,
}

/// Asks provider `name` about `check`.
pub async fn check(state: &State, snap: &Arc<Snapshot>, name: &str, check: Check<'_>) -> Outcome {
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
    if provider.is_some_and(|p| p.kind != "envoyExtAuthzHttp") {
        // Fail closed, whatever failOpen says: the check was never made.
        return failed(
            "envoyExtAuthzGrpc providers are not supported yet".into(),
            None,
        );
    }
    let req = match check_request(p, &check) {
        Ok(req) => req,
        Err(e) => return failed(e, Some(p)),
    };
    let ask = async {
        let resp = state.outbound.send(state, snap, service, port, req).await?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = http_body_util::Limited::new(resp.into_body(), MAX_DENY_BODY)
            .collect()
            .await
            .map_err(|e| format!("reading the answer: {e}"))?
            .to_bytes();
        Ok::<_, String>((status, headers, body))
    };
    let timeout = Duration::from_millis(p.timeout_ms);
    let (status, headers, body) = match tokio::time::timeout(timeout, ask).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(e)) => return failed(format!("check failed: {e}"), Some(p)),
        Err(_) => return failed(format!("no answer within {timeout:?}"), Some(p)),
    };
    let pick = |list: &[String]| -> Fields {
        headers
            .iter()
            .filter(|(n, _)| header_listed(list, n.as_str()))
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect()
    };
    if status == 200 {
        Outcome::Allow {
            upstream: pick(&p.headers_to_upstream_on_allow),
            downstream: pick(&p.headers_to_downstream_on_allow),
        }
    } else {
        Outcome::Deny {
            status,
            headers: pick(&p.headers_to_downstream_on_deny),
            body,
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
    c: &Check<'_>,
) -> Result<http::Request<crate::http_in::Body>, String> {
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
    fn the_check_request_carries_what_the_provider_lists() {
        let c = Check {
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

    #[test]
    fn outcomes_say_whether_the_request_goes_on() {
        let allow = Outcome::Allow {
            upstream: Vec::new(),
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
