//! Admission: whether an inbound request or connection may reach the
//! application, decided once for every transport. The HTTP/1.1 fast path
//! and the hyper (HTTP/2) path both call [`admit_http`], the TCP path
//! calls [`admit_tcp`]; they only carry out the verdict (write the
//! refusal, or forward with the header edits). So a fix to request
//! authentication, the authorization decision, the CUSTOM check or the
//! refusal lands on every path at once.
//!
//! The order is Envoy's filter order in an Istio sidecar: path
//! normalization, RequestAuthentication (`jwt_authn`), the CUSTOM
//! provider (`ext_authz`, asked before the DENY and ALLOW policies count),
//! then RBAC.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use meshward_policy::{Decision, HttpAttributes, Request};

use crate::ext_authz::{self, Fields};
use crate::jwt;
use crate::outcome::{self, ExtAuthzWords, Flag, Refusal};
use crate::peers::{UNKNOWN, WorkloadLabels, WorkloadMeta};
use crate::snapshot::Snapshot;
use crate::state::State;
use crate::telemetry::{AccessRecord, TrafficLabels, now_rfc3339, principal_parts};

#[cfg(test)]
mod tests;

/// Facts about one accepted inbound connection.
#[derive(Debug)]
pub struct Conn {
    pub peer: SocketAddr,
    pub local: SocketAddr,
    pub port: u16,
    pub app: SocketAddr,
    /// The application speaks cleartext HTTP/2 on this port (gRPC).
    pub app_h2: bool,
    /// How long connecting to the application may take
    /// (`meshConfig.connectTimeout`).
    pub app_connect_timeout: Duration,
    /// `spiffe://...` of the mTLS peer.
    pub identity: Option<String>,
    /// SHA-256 of the peer's leaf certificate, hex (for XFCC).
    pub cert_hash: Option<String>,
    pub sni: Option<String>,
    pub mtls: bool,
    /// The workload the peer is, resolved once from its identity and
    /// address ([`crate::peers::Registry::resolve`]).
    pub source: Option<Arc<WorkloadMeta>>,
    /// This connection's entry of the flow table (`None` past its bound).
    pub flow: Option<Arc<crate::flows::Flow>>,
    /// Request metric handles of this connection, by response code.
    pub handles: crate::telemetry::HandleCache,
    /// The outbound side, through which the external authorization
    /// checks of this connection and its requests reach their provider.
    pub ext_authz: Arc<crate::outbound::Outbound>,
}

impl crate::conns::ConnFacts for Conn {
    fn principal(&self) -> Option<&str> {
        Conn::principal(self)
    }
    fn peer_ip(&self) -> std::net::IpAddr {
        self.peer.ip()
    }
    fn local_ip(&self) -> std::net::IpAddr {
        self.local.ip()
    }
    fn port(&self) -> u16 {
        self.port
    }
    fn sni(&self) -> Option<&str> {
        self.sni.as_deref()
    }
}

impl Conn {
    /// An access record of this connection (reporter destination), with the
    /// decision's fields when there is one, and a deny otherwise.
    pub fn record(
        &self,
        own_identity: &str,
        kind: &'static str,
        started: Instant,
        d: Option<&Decision>,
    ) -> AccessRecord {
        let (decision, reason) = d.map_or((outcome::Decision::Deny.as_str(), String::new()), |d| {
            decision_words(d)
        });
        AccessRecord {
            time: now_rfc3339(),
            kind,
            reporter: "destination",
            src_addr: self.peer.to_string(),
            src_identity: self.identity.clone(),
            dst_addr: self.local.to_string(),
            dst_service: None,
            dst_identity: Some(own_identity.to_string()),
            tls_mode: self.tls_mode(),
            method: None,
            path: None,
            authority: None,
            request_id: None,
            response_code: None,
            response_flags: Flag::None.as_str(),
            decision,
            reason,
            policy: d
                .and_then(|d| d.decided_by.as_ref())
                .map(|r| r.policy.to_string()),
            rule: d.and_then(|d| d.decided_by.as_ref()).map(|r| r.rule),
            explanation: d.map(ToString::to_string).unwrap_or_default(),
            duration_ms: started.elapsed().as_secs_f64() * 1000.0,
            bytes_sent: 0,
            bytes_received: 0,
        }
    }

    /// The `tls.mode` of this connection, as the access log and the spans
    /// show it.
    pub fn tls_mode(&self) -> &'static str {
        TrafficLabels::security(self.mtls)
    }

    /// The facts a decision about this connection (and, for HTTP, one of
    /// its requests) is made on. No forwarded client address is trusted.
    pub fn facts<'a>(&'a self, http: Option<HttpAttributes<'a>>) -> Request<'a> {
        Request {
            principal: self.principal(),
            source_ip: self.peer.ip(),
            remote_ip: None,
            destination_ip: Some(self.local.ip()),
            port: self.port,
            sni: self.sni.as_deref(),
            http,
        }
    }

    /// The external authorization check of this connection (`http`: of one
    /// of its requests) to this workload, `own_identity`.
    pub fn ext_check<'a>(
        &'a self,
        own_identity: &'a str,
        http: Option<ext_authz::HttpCheck<'a>>,
    ) -> ext_authz::Check<'a> {
        ext_authz::Check {
            http,
            source: (self.peer, self.identity.as_deref()),
            destination: (self.local, own_identity),
        }
    }

    /// The principal as policies spell it (no `spiffe://`).
    pub fn principal(&self) -> Option<&str> {
        self.identity
            .as_deref()
            .map(|i| i.strip_prefix("spiffe://").unwrap_or(i))
    }

    /// Labels for this connection (reporter destination); the response code
    /// and protocol are filled in per request. The source is the workload
    /// resolved when the connection was identified ([`Conn::source`]).
    pub fn labels(&self, state: &State, protocol: &'static str) -> TrafficLabels {
        let snap = state.snapshot();
        let src_ns = match (&self.source, &self.identity) {
            (Some(_), _) => None,
            (None, Some(id)) => Some(principal_parts(id).0),
            (None, None) => None,
        };
        let source = WorkloadLabels::of(self.source.as_deref(), src_ns.as_deref());
        let destination = WorkloadLabels::of(Some(&snap.own), None);
        let service = match snap
            .inbound_port(self.port)
            .and_then(|p| p.service.as_ref())
        {
            Some(s) => [s.host.clone(), s.name.clone(), s.namespace.clone()],
            None => [
                UNKNOWN.to_string(),
                snap.workload_short_name().to_string(),
                snap.workload.namespace.clone(),
            ],
        };
        TrafficLabels::new(
            "destination",
            source,
            destination,
            (
                self.identity.clone().unwrap_or_else(|| UNKNOWN.to_string()),
                snap.identity.clone(),
            ),
            service,
            (protocol, self.mtls),
        )
    }
}

/// The access-log `decision` and `reason` of a decision of meshward's own
/// policies (what an external provider said is added by the caller).
pub fn decision_words(d: &Decision) -> (&'static str, String) {
    (
        outcome::Decision::of(d.is_allowed()).as_str(),
        d.reason.code().to_string(),
    )
}

/// Request headers as admission reads them: the policy engine's view
/// (repeated fields joined), and every field in order for the external
/// provider. The HTTP/1.1 codec's head and hyper's `HeaderMap` both
/// implement it.
pub trait RequestHeaders: meshward_policy::Headers {
    fn fields(&self) -> Vec<(&str, &[u8])>;
}

impl RequestHeaders for crate::h1::HeaderView<'_> {
    fn fields(&self) -> Vec<(&str, &[u8])> {
        self.0.iter().collect()
    }
}

impl RequestHeaders for crate::http::HeaderView<'_> {
    fn fields(&self) -> Vec<(&str, &[u8])> {
        self.0
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_bytes()))
            .collect()
    }
}

/// The request head admission decides on.
#[derive(Debug)]
pub struct HttpRequest<'a, 'h, H: ?Sized> {
    pub method: &'a str,
    /// The request target as received (path and query).
    pub path: &'a str,
    /// `Host` or `:authority`.
    pub host: &'a str,
    pub headers: &'h H,
    /// `HTTP/1.1` or `HTTP/2`, as the external provider is told.
    pub protocol: &'static str,
    /// The request asks for an upgrade the proxy does not carry (anything
    /// but WebSocket, on the HTTP/1.1 path).
    pub unsupported_upgrade: bool,
}

/// What admission decided about one request.
#[derive(Debug)]
pub enum Verdict<'a> {
    Admitted(Admitted<'a>),
    Refused(Refused),
}

/// A request that goes on to the application.
#[derive(Debug)]
pub struct Admitted<'a> {
    pub decision: Decision,
    /// The path to forward: the one the decision saw (normalized).
    pub forward: Cow<'a, str>,
    /// RequestAuthentication's facts (kept for a re-check on policy change).
    pub auth: Option<Box<meshward_policy::JwtAuth>>,
    /// Header edits of RequestAuthentication and of an allowing provider.
    pub edits: Option<HeaderEdits>,
    /// The CUSTOM provider that let the request through.
    pub ext: Option<ExtApproval>,
}

/// An external provider's approval.
#[derive(Debug)]
pub struct ExtApproval {
    /// The provider's name (a connection it approved is re-checked with
    /// it when policies change).
    pub provider: String,
    /// Its words, for the access log.
    pub words: String,
    /// Fields it adds to the response.
    pub downstream: Fields,
}

/// A request answered by the proxy instead of the application.
#[derive(Debug)]
pub struct Refused {
    pub outcome: Refusal,
    pub reply: Reply,
    /// The authorization decision, when there was one (not after a `401`).
    pub decision: Option<Decision>,
    /// What an allowing provider said, when the request was refused after
    /// it (by RBAC, or an upgrade), for the access log.
    pub ext_allowed: Option<String>,
}

/// The answer to a refused request; its status is the outcome's.
#[derive(Debug)]
pub enum Reply {
    /// A `text/plain` body of the proxy's, and for a `401` the
    /// `www-authenticate` challenge.
    Local {
        body: &'static str,
        challenge: Option<String>,
    },
    /// The external provider's own refusal: its header fields and body.
    Provider { fields: Fields, body: Bytes },
}

/// Header names to remove from a request, and fields to add.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct HeaderEdits {
    pub remove: Vec<String>,
    pub add: Vec<(String, String)>,
}

/// Decides one request on `conn`: RequestAuthentication, the CUSTOM
/// provider, the authorization decision. Records `decision`, `policy` and
/// `reason` on the current span.
pub async fn admit_http<'a, H>(
    snap: &Arc<Snapshot>,
    conn: &Conn,
    req: &HttpRequest<'a, '_, H>,
) -> Verdict<'a>
where
    H: RequestHeaders,
{
    let authn = snap.jwt.authenticate(req.headers, req.path);
    let decision = authn.as_ref().ok().map(|a| {
        snap.policy.decide(&conn.facts(Some(HttpAttributes {
            method: req.method,
            path: req.path,
            host: req.host,
            headers: req.headers,
            auth: a.auth.as_deref(),
        })))
    });
    // The application gets the path the decision saw. A path that cannot
    // be normalized is denied by the policy engine too, and answered 400
    // as Envoy does.
    let forward = snap.policy.forwarded_target(req.path);
    // CUSTOM first: the external provider is asked before the DENY and
    // ALLOW policies count, as Istio orders them.
    let ext = match (
        &forward,
        decision.as_ref().and_then(|d| d.ext_authz.as_ref()),
    ) {
        (Ok(path), Some(x)) => {
            let check = conn.ext_check(
                &snap.identity,
                Some(ext_authz::HttpCheck {
                    method: req.method,
                    host: req.host,
                    path,
                    headers: req.headers.fields(),
                    protocol: req.protocol,
                }),
            );
            Some(ext_authz::check(&conn.ext_authz, snap, &x.provider, check).await)
        }
        _ => None,
    };
    let verdict = decide_http(req, authn, decision, forward, ext);
    if let Some(span) = crate::telemetry::current_span() {
        record_span(&span, &verdict);
    }
    verdict
}

/// The verdict from what admission found out: the pure part of
/// [`admit_http`], tested on its own.
fn decide_http<'a, H: ?Sized>(
    req: &HttpRequest<'a, '_, H>,
    authn: Result<jwt::Authenticated, jwt::Rejected>,
    decision: Option<Decision>,
    forward: Result<Cow<'a, str>, meshward_policy::PathError>,
    ext: Option<ext_authz::Outcome>,
) -> Verdict<'a> {
    // The provider was asked only when the decision named one.
    let provider = decision.as_ref().and_then(|d| d.ext_authz.as_ref());
    let words = ext
        .as_ref()
        .zip(provider)
        .map(|(o, x)| o.reason(&x.provider));
    // A refusing provider answers first: it was asked only when the path
    // and the token were good.
    let refused_by_provider = match ext {
        Some(ext_authz::Outcome::Deny {
            status,
            headers,
            body,
        }) => Err((status, headers, body)),
        Some(ext_authz::Outcome::Failed {
            allow: false,
            status,
            ..
        }) => Err((status, Vec::new(), Bytes::new())),
        other => Ok(other),
    };
    let ext = match refused_by_provider {
        Ok(ext) => ext,
        Err((status, fields, body)) => {
            let (policy, rule) = provider.map_or_else(Default::default, |x| {
                (x.policy.policy.to_string(), x.policy.rule)
            });
            return Verdict::Refused(Refused {
                outcome: Refusal::ExtAuthz {
                    status,
                    words: words.unwrap_or_default(),
                    policy,
                    rule,
                },
                reply: Reply::Provider { fields, body },
                decision,
                ext_allowed: None,
            });
        }
    };
    let approved = provider.map(|x| x.provider.clone());
    let (forward, authn, decision) = match (forward, authn, decision) {
        (Ok(forward), Ok(authn), Some(decision))
            if decision.is_allowed() && !req.unsupported_upgrade =>
        {
            (forward, authn, decision)
        }
        (forward, authn, decision) => {
            let outcome = match (&forward, &authn, &decision) {
                (Err(e), ..) => {
                    tracing::debug!(error = %e, "invalid request path");
                    Refusal::InvalidPath
                }
                (Ok(_), Err(r), _) => Refusal::Unauthenticated {
                    message: r.message,
                    policy: r.policy.clone(),
                },
                (Ok(_), Ok(_), Some(d)) if d.is_allowed() => Refusal::UpgradeRefused,
                // Denied (a decision is always made for a good token).
                (Ok(_), Ok(_), _) => Refusal::Rbac,
            };
            let reply = Reply::Local {
                body: outcome.body().unwrap_or_default(),
                challenge: matches!(outcome, Refusal::Unauthenticated { .. })
                    .then(|| jwt::challenge(req.host, req.path)),
            };
            return Verdict::Refused(Refused {
                outcome,
                reply,
                decision,
                ext_allowed: words,
            });
        }
    };
    let edits = request_edits(&authn, ext.as_ref());
    let ext = ext.zip(approved).map(|(o, provider)| ExtApproval {
        provider,
        words: words.unwrap_or_default(),
        downstream: match o {
            ext_authz::Outcome::Allow { downstream, .. } => downstream,
            _ => Vec::new(),
        },
    });
    Verdict::Admitted(Admitted {
        decision,
        forward,
        auth: authn.auth,
        edits,
        ext,
    })
}

/// Records a verdict's `decision`, `policy` and `reason` on `span` (a
/// request's).
fn record_span(span: &tracing::Span, verdict: &Verdict<'_>) {
    match verdict {
        Verdict::Admitted(a) => record_decision(span, Some(&a.decision), None),
        Verdict::Refused(r) => record_decision(span, r.decision.as_ref(), Some(&r.outcome)),
    }
}

/// Records `decision` (the policy's) and the refusal that followed, if
/// any, on `span`.
fn record_decision(span: &tracing::Span, decision: Option<&Decision>, refusal: Option<&Refusal>) {
    if let Some(d) = decision {
        let (words, reason) = decision_words(d);
        span.record("decision", words);
        span.record("reason", reason);
        if let Some(by) = &d.decided_by {
            span.record("policy", tracing::field::display(&by.policy));
        }
    }
    // As the access log shows it (`Refusal::log`).
    if let Some(r) = refusal {
        if matches!(
            r,
            Refusal::Unauthenticated { .. } | Refusal::ExtAuthz { .. }
        ) {
            span.record("decision", outcome::Decision::Deny.as_str());
        }
        if let Some(reason) = r.reason() {
            span.record("reason", reason);
        }
    }
}

/// The header edits of a request that goes on, when it has any:
/// RequestAuthentication's (tokens not forwarded, output headers a client
/// sent, then payload and claims) and an allowing external provider's (its
/// removals, its replacements, its additions). Both transports apply them
/// the same way: every name removed from the request as received, then
/// every field added.
fn request_edits(
    authn: &jwt::Authenticated,
    ext: Option<&ext_authz::Outcome>,
) -> Option<HeaderEdits> {
    let jwt = (!authn.remove.is_empty()).then_some(authn);
    let ext = match ext {
        Some(ext_authz::Outcome::Allow {
            remove,
            set,
            append,
            ..
        }) if !(remove.is_empty() && set.is_empty() && append.is_empty()) => {
            Some((remove, set, append))
        }
        _ => None,
    };
    if jwt.is_none() && ext.is_none() {
        return None;
    }
    let (mut remove, mut add) =
        jwt.map_or_else(Default::default, |a| (a.remove.clone(), a.add.clone()));
    if let Some((gone, set, append)) = ext {
        remove.extend(gone.iter().map(|n| n.as_str().to_string()));
        remove.extend(set.iter().map(|(n, _)| n.as_str().to_string()));
        for (n, v) in set.iter().chain(append) {
            if let Ok(v) = v.to_str() {
                add.push((n.as_str().to_string(), v.to_string()));
            }
        }
    }
    Some(HeaderEdits { remove, add })
}

/// What admission decided about one connection (the TCP path).
#[derive(Debug)]
pub enum TcpVerdict {
    Admitted {
        decision: Decision,
        /// The CUSTOM provider that let it through: its name (for the
        /// re-check on policy change) and words (for the access log).
        ext: Option<(String, String)>,
    },
    Refused {
        decision: Decision,
        /// [`Refusal::ExtAuthz`] or [`Refusal::Rbac`].
        outcome: Refusal,
        /// What an allowing provider said before RBAC refused.
        ext_allowed: Option<String>,
    },
}

/// Decides one connection: the authorization decision and, for a CUSTOM
/// policy with a gRPC provider that matches it, the provider first (as
/// Envoy's network ext_authz filter does).
pub async fn admit_tcp(snap: &Arc<Snapshot>, conn: &Conn) -> TcpVerdict {
    let decision = snap.policy.decide(&conn.facts(None));
    let ext = match &decision.ext_authz {
        Some(x) => {
            let check = conn.ext_check(&snap.identity, None);
            Some(ext_authz::check(&conn.ext_authz, snap, &x.provider, check).await)
        }
        None => None,
    };
    let verdict = decide_tcp(decision, ext);
    if let Some(span) = crate::telemetry::current_span() {
        match &verdict {
            TcpVerdict::Admitted { decision, .. } => record_decision(&span, Some(decision), None),
            TcpVerdict::Refused {
                decision, outcome, ..
            } => record_decision(&span, Some(decision), Some(outcome)),
        }
    }
    verdict
}

/// The pure part of [`admit_tcp`].
fn decide_tcp(decision: Decision, ext: Option<ext_authz::Outcome>) -> TcpVerdict {
    let x = decision.ext_authz.as_ref();
    match (ext, x) {
        (Some(o), Some(x)) if !o.allows() => {
            // A connection has no HTTP status to tell.
            let words = match o {
                ext_authz::Outcome::Deny { .. } => ExtAuthzWords(&x.provider).denied(None),
                o => o.reason(&x.provider),
            };
            let outcome = Refusal::ExtAuthz {
                status: 0,
                words,
                policy: x.policy.policy.to_string(),
                rule: x.policy.rule,
            };
            TcpVerdict::Refused {
                decision,
                outcome,
                ext_allowed: None,
            }
        }
        (o, x) => {
            let ext = o
                .zip(x)
                .map(|(o, x)| (x.provider.clone(), o.reason(&x.provider)));
            if decision.is_allowed() {
                TcpVerdict::Admitted { decision, ext }
            } else {
                TcpVerdict::Refused {
                    decision,
                    outcome: Refusal::Rbac,
                    ext_allowed: ext.map(|(_, words)| words),
                }
            }
        }
    }
}
