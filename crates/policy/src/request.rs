//! The facts a decision is made on: who connects, from where, to which
//! port, and for HTTP the request line, headers and a validated JWT.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::net::IpAddr;

/// Request headers, looked up by lower-case name.
///
/// Values are the bytes as received: HTTP allows bytes that are not UTF-8
/// in a field value (obs-text), and a proxy that skipped them would treat
/// a header as absent while forwarding it, so a DENY on it would not
/// deny. Matchers compare bytes, as Envoy's do.
pub trait Headers: Sync {
    /// The value of a header; repeated headers are joined with `,` as Envoy
    /// does before matching. `name` is lower case.
    fn header(&self, name: &str) -> Option<Cow<'_, [u8]>>;
}

/// Headers as a map from lower-case name to value.
impl Headers for BTreeMap<String, String> {
    fn header(&self, name: &str) -> Option<Cow<'_, [u8]>> {
        self.get(name).map(|v| Cow::Borrowed(v.as_bytes()))
    }
}

/// Headers as name/value pairs; names are compared case-insensitively.
impl Headers for [(String, String)] {
    fn header(&self, name: &str) -> Option<Cow<'_, [u8]>> {
        join_values(
            self.iter()
                .filter(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_bytes()),
        )
    }
}

/// The values of a repeated header joined with `,` (borrowed when there is
/// only one), as Envoy presents them to matchers.
pub fn join_values<'a>(mut values: impl Iterator<Item = &'a [u8]>) -> Option<Cow<'a, [u8]>> {
    let first = values.next()?;
    match values.next() {
        None => Some(Cow::Borrowed(first)),
        Some(second) => {
            let mut joined = Vec::with_capacity(first.len() + 1 + second.len());
            joined.extend_from_slice(first);
            joined.push(b',');
            joined.extend_from_slice(second);
            for v in values {
                joined.push(b',');
                joined.extend_from_slice(v);
            }
            Some(Cow::Owned(joined))
        }
    }
}

/// No headers at all.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoHeaders;

impl Headers for NoHeaders {
    fn header(&self, _: &str) -> Option<Cow<'_, [u8]>> {
        None
    }
}

/// The outcome of a successful JWT validation (RequestAuthentication).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JwtAuth {
    /// The `iss` claim.
    pub issuer: String,
    /// The `sub` claim.
    pub subject: String,
    /// The `aud` claim.
    pub audiences: Vec<String>,
    /// The `azp` claim.
    pub presenter: Option<String>,
    /// The whole payload.
    pub claims: serde_json::Map<String, serde_json::Value>,
}

impl JwtAuth {
    /// Builds the facts from a verified token payload.
    pub fn from_claims(claims: serde_json::Map<String, serde_json::Value>) -> JwtAuth {
        let s = |k: &str| claims.get(k).and_then(|v| v.as_str()).map(str::to_string);
        let audiences = match claims.get("aud") {
            Some(serde_json::Value::String(a)) => vec![a.clone()],
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect(),
            _ => Vec::new(),
        };
        JwtAuth {
            issuer: s("iss").unwrap_or_default(),
            subject: s("sub").unwrap_or_default(),
            audiences,
            presenter: s("azp"),
            claims,
        }
    }

    /// Facts given as a request principal `<iss>/<sub>`, split at the last
    /// `/` (the issuer may contain `/`, the subject then may not).
    pub fn from_principal(principal: &str) -> JwtAuth {
        let (issuer, subject) = principal.rsplit_once('/').unwrap_or((principal, ""));
        JwtAuth {
            issuer: issuer.to_string(),
            subject: subject.to_string(),
            ..JwtAuth::default()
        }
    }

    /// The request principal, `<iss>/<sub>`.
    pub fn principal(&self) -> String {
        format!("{}/{}", self.issuer, self.subject)
    }
}

/// HTTP attributes of a request.
#[derive(Clone, Copy)]
pub struct HttpAttributes<'a> {
    pub method: &'a str,
    /// The request target as received; normalized before matching.
    pub path: &'a str,
    /// `Host` / `:authority`, port included when the client sent one.
    pub host: &'a str,
    pub headers: &'a dyn Headers,
    pub auth: Option<&'a JwtAuth>,
}

impl std::fmt::Debug for HttpAttributes<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpAttributes")
            .field("method", &self.method)
            .field("path", &self.path)
            .field("host", &self.host)
            .field("auth", &self.auth.map(|a| (&a.issuer, &a.subject)))
            .finish_non_exhaustive()
    }
}

/// Everything known about one connection (TCP) or request (HTTP).
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The mTLS peer identity without `spiffe://`
    /// (`cluster.local/ns/foo/sa/bar`); `None` for plaintext.
    pub principal: Option<&'a str>,
    /// The directly connected peer address.
    pub source_ip: IpAddr,
    /// The original client address (X-Forwarded-For / PROXY protocol), if known.
    pub remote_ip: Option<IpAddr>,
    pub destination_ip: Option<IpAddr>,
    /// The workload port the traffic arrives on.
    pub port: u16,
    pub sni: Option<&'a str>,
    /// `None` for a TCP connection.
    pub http: Option<HttpAttributes<'a>>,
}

impl Request<'_> {
    pub fn remote_ip(&self) -> IpAddr {
        self.remote_ip.unwrap_or(self.source_ip)
    }
}
