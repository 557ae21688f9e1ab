//! The closed set of ways a request or connection ends: Envoy's response
//! flags, the reasons the proxy refuses, and the reasons it closes. The
//! status code, the metric labels (`response_flags`) and the access-log
//! fields (`response_flags`, `decision`, `reason`, `policy`, `rule`) are
//! all derived from one of these values, so the words for one outcome
//! cannot drift apart between the HTTP/1.1 path, the HTTP/2 path and the
//! TCP path. No other module writes a flag or reason string.

use std::fmt;
use std::time::Duration;

use crate::telemetry::AccessRecord;

/// Envoy's response flags, those meshward sets (`-`: none).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Flag {
    /// `-`: nothing went wrong in the proxy.
    None,
    /// `UAEX`: refused by the external authorizer, or refused by the
    /// inbound connection checks (PeerAuthentication, TLS).
    ExtAuthzDenied,
    /// `UF`: the upstream (or the application) could not be connected to.
    UpstreamConnectFailure,
    /// `UH`: no healthy upstream host.
    NoHealthyUpstream,
    /// `NR`: no route.
    NoRoute,
    /// `DC`: the downstream connection ended the exchange.
    DownstreamTermination,
    /// `UC`: the upstream connection ended before a response.
    UpstreamTermination,
    /// `UT`: the upstream did not answer in time.
    UpstreamTimeout,
    /// `DPE`: the downstream broke the HTTP protocol.
    DownstreamProtocolError,
    /// `UPE`: the upstream broke the HTTP protocol.
    UpstreamProtocolError,
}

impl Flag {
    /// Every flag.
    #[cfg(test)]
    pub const ALL: [Flag; 10] = [
        Flag::None,
        Flag::ExtAuthzDenied,
        Flag::UpstreamConnectFailure,
        Flag::NoHealthyUpstream,
        Flag::NoRoute,
        Flag::DownstreamTermination,
        Flag::UpstreamTermination,
        Flag::UpstreamTimeout,
        Flag::DownstreamProtocolError,
        Flag::UpstreamProtocolError,
    ];

    /// Envoy's spelling, as the metric label and the access log show it.
    pub const fn as_str(self) -> &'static str {
        match self {
            Flag::None => "-",
            Flag::ExtAuthzDenied => "UAEX",
            Flag::UpstreamConnectFailure => "UF",
            Flag::NoHealthyUpstream => "UH",
            Flag::NoRoute => "NR",
            Flag::DownstreamTermination => "DC",
            Flag::UpstreamTermination => "UC",
            Flag::UpstreamTimeout => "UT",
            Flag::DownstreamProtocolError => "DPE",
            Flag::UpstreamProtocolError => "UPE",
        }
    }
}

impl fmt::Display for Flag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A response the proxy makes itself when a request cannot be routed or
/// forwarded, or the exchange with the upstream fails: the status, flag
/// and body are one value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalFailure {
    /// Outbound: no service for the host, or no such port: `404 NR`.
    NoRoute,
    /// Outbound: the service has no endpoint to send to: `503 UH`.
    NoHealthyUpstream,
    /// Outbound: the service's TLS settings cannot be used: `503 NR`.
    UnusableTls,
    /// The upstream could not be connected to: `503 UF`.
    ConnectFailed,
    /// The upstream connection broke before the response head: `503 UC`.
    Reset,
    /// The downstream broke off while its request was sent: `400 DC`
    /// (nothing can be answered).
    DownstreamBroke,
    /// The request body broke HTTP/1.1 framing: `400 DPE`.
    BadBody,
    /// The upstream's response head broke HTTP/1.1: `502 UPE`.
    BadResponse,
    /// No response head in time: `504 UT`.
    Timeout,
    /// Outbound, HTTP/1.x to an HTTP/2 upstream: a request body too large
    /// to be read whole first: `413 DPE`.
    BodyTooLarge,
    /// Outbound, HTTP/1.x to an HTTP/2 upstream: a chunked request body,
    /// which is not bridged: `411 DPE`.
    LengthRequired,
    /// Outbound, HTTP/1.x to an HTTP/2 upstream: a method HTTP/2 cannot
    /// carry: `400 DPE`.
    BadMethod,
    /// Outbound, HTTP/1.x to an HTTP/2 upstream: a path that makes no
    /// URI: `400 DPE`.
    BadPath,
    /// Outbound, HTTP/2 from the application: a path that makes no URI:
    /// `400`, flag `-` (as it has always been logged, unlike
    /// [`LocalFailure::BadPath`]).
    BadH2Path,
}

impl LocalFailure {
    #[cfg(test)]
    pub const ALL: [LocalFailure; 14] = [
        LocalFailure::NoRoute,
        LocalFailure::NoHealthyUpstream,
        LocalFailure::UnusableTls,
        LocalFailure::ConnectFailed,
        LocalFailure::Reset,
        LocalFailure::DownstreamBroke,
        LocalFailure::BadBody,
        LocalFailure::BadResponse,
        LocalFailure::Timeout,
        LocalFailure::BodyTooLarge,
        LocalFailure::LengthRequired,
        LocalFailure::BadMethod,
        LocalFailure::BadPath,
        LocalFailure::BadH2Path,
    ];

    pub const fn status(self) -> u16 {
        match self {
            LocalFailure::NoRoute => 404,
            LocalFailure::NoHealthyUpstream
            | LocalFailure::UnusableTls
            | LocalFailure::ConnectFailed
            | LocalFailure::Reset => 503,
            LocalFailure::DownstreamBroke
            | LocalFailure::BadBody
            | LocalFailure::BadMethod
            | LocalFailure::BadPath
            | LocalFailure::BadH2Path => 400,
            LocalFailure::BadResponse => 502,
            LocalFailure::Timeout => 504,
            LocalFailure::BodyTooLarge => 413,
            LocalFailure::LengthRequired => 411,
        }
    }

    pub const fn flag(self) -> Flag {
        match self {
            LocalFailure::NoRoute | LocalFailure::UnusableTls => Flag::NoRoute,
            LocalFailure::NoHealthyUpstream => Flag::NoHealthyUpstream,
            LocalFailure::ConnectFailed => Flag::UpstreamConnectFailure,
            LocalFailure::Reset => Flag::UpstreamTermination,
            LocalFailure::DownstreamBroke => Flag::DownstreamTermination,
            LocalFailure::BadBody
            | LocalFailure::BodyTooLarge
            | LocalFailure::LengthRequired
            | LocalFailure::BadMethod
            | LocalFailure::BadPath => Flag::DownstreamProtocolError,
            LocalFailure::BadResponse => Flag::UpstreamProtocolError,
            LocalFailure::Timeout => Flag::UpstreamTimeout,
            LocalFailure::BadH2Path => Flag::None,
        }
    }

    /// Envoy's body for it.
    pub const fn body(self) -> &'static str {
        match self {
            LocalFailure::NoRoute | LocalFailure::NoHealthyUpstream | LocalFailure::UnusableTls => {
                "no healthy upstream"
            }
            LocalFailure::ConnectFailed => "upstream connect error",
            LocalFailure::Reset => "upstream connect error or disconnect/reset before headers",
            LocalFailure::DownstreamBroke => "",
            LocalFailure::BadBody => "bad request body",
            LocalFailure::BadResponse => "upstream sent an invalid response",
            LocalFailure::Timeout => "upstream request timeout",
            LocalFailure::BodyTooLarge => "request body too large",
            LocalFailure::LengthRequired => "length required",
            LocalFailure::BadMethod => "bad request method",
            LocalFailure::BadPath | LocalFailure::BadH2Path => "bad request path",
        }
    }

    /// The outbound access log's reason for it when no error met says
    /// more: the outbound path logs the error (the route's, the
    /// connection's) where there is one, and this where there is none.
    pub const fn reason(self) -> &'static str {
        match self {
            LocalFailure::DownstreamBroke => "downstream closed in the request body",
            LocalFailure::BodyTooLarge => "request body too large for an HTTP/2 upstream",
            LocalFailure::LengthRequired => "chunked request body to an HTTP/2 upstream",
            LocalFailure::BadMethod => "invalid method",
            LocalFailure::BadH2Path => "bad path",
            LocalFailure::NoRoute
            | LocalFailure::NoHealthyUpstream
            | LocalFailure::UnusableTls
            | LocalFailure::ConnectFailed
            | LocalFailure::Reset
            | LocalFailure::BadBody
            | LocalFailure::BadResponse
            | LocalFailure::Timeout
            | LocalFailure::BadPath => self.body(),
        }
    }
}

/// Why a request was refused before it reached the application (the
/// admission verdict's outcome, [`crate::admission`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The path cannot be normalized: `400`, as Envoy's path
    /// normalization answers (the policy engine denies such a path too).
    InvalidPath,
    /// RequestAuthentication refused the token: `401`, before
    /// authorization saw the request.
    Unauthenticated {
        /// Envoy's message (the body).
        message: &'static str,
        /// The RequestAuthentication whose rule refused it.
        policy: Option<String>,
    },
    /// The external provider of a CUSTOM policy refused it, or could not
    /// be asked and fails closed: its status, `UAEX`.
    ExtAuthz {
        status: u16,
        /// The provider's words ([`ExtAuthzWords`]).
        words: String,
        /// The AuthorizationPolicy and rule that asked.
        policy: String,
        rule: usize,
    },
    /// A DENY policy matched, or no ALLOW policy did: `403`.
    Rbac,
    /// Allowed, but an upgrade the proxy does not carry: `403`.
    UpgradeRefused,
}

impl Refusal {
    /// The body of the `403` for an upgrade to anything but WebSocket
    /// (Envoy answers these `403` too: only `websocket` upgrades are
    /// enabled in an Istio sidecar).
    pub const UPGRADE_REFUSED: &'static str =
        "upgrade refused: only websocket upgrades are proxied";

    /// The status of the answer.
    pub fn status(&self) -> u16 {
        match self {
            Refusal::InvalidPath => 400,
            Refusal::Unauthenticated { .. } => 401,
            Refusal::ExtAuthz { status, .. } => *status,
            Refusal::Rbac | Refusal::UpgradeRefused => 403,
        }
    }

    pub fn flag(&self) -> Flag {
        match self {
            Refusal::ExtAuthz { .. } => Flag::ExtAuthzDenied,
            _ => Flag::None,
        }
    }

    /// The proxy's own body for it (`None`: the external provider's body
    /// is sent).
    pub fn body(&self) -> Option<&'static str> {
        match self {
            Refusal::InvalidPath => Some("invalid request path"),
            Refusal::Unauthenticated { message, .. } => Some(message),
            Refusal::ExtAuthz { .. } => None,
            Refusal::Rbac => Some("RBAC: access denied"),
            Refusal::UpgradeRefused => Some(Refusal::UPGRADE_REFUSED),
        }
    }

    /// The access log's `reason` for this refusal, where it is not the
    /// policy decision's (`None`: a DENY or missing ALLOW, or a path
    /// the decision itself refused).
    pub fn reason(&self) -> Option<String> {
        match self {
            Refusal::InvalidPath | Refusal::Rbac => None,
            Refusal::UpgradeRefused => Some(Refusal::UPGRADE_REFUSED.to_string()),
            Refusal::Unauthenticated { message, .. } => {
                Some(format!("RequestAuthentication: {message}"))
            }
            Refusal::ExtAuthz { words, .. } => Some(words.clone()),
        }
    }

    /// Sets the access-log fields this refusal decides (the rest comes
    /// from the policy decision).
    pub fn log(&self, record: &mut AccessRecord) {
        if let Some(reason) = self.reason() {
            record.reason = reason;
        }
        match self {
            Refusal::InvalidPath | Refusal::Rbac | Refusal::UpgradeRefused => {}
            Refusal::Unauthenticated { policy, .. } => {
                record.decision = Decision::Deny.as_str();
                record.policy.clone_from(policy);
                record.rule = None;
            }
            Refusal::ExtAuthz { policy, rule, .. } => {
                record.decision = Decision::Deny.as_str();
                record.policy = Some(policy.clone());
                record.rule = Some(*rule);
            }
        }
    }
}

/// The access log's `decision` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Deny,
    /// Outbound: the proxy could not carry an allowed request.
    Error,
}

impl Decision {
    pub const fn as_str(self) -> &'static str {
        match self {
            Decision::Allow => "allow",
            Decision::Deny => "deny",
            Decision::Error => "error",
        }
    }

    /// `allow` or `deny`, as the policy decided.
    pub fn of(allowed: bool) -> Decision {
        if allowed {
            Decision::Allow
        } else {
            Decision::Deny
        }
    }

    /// Outbound, where no policy decides: `allow` when the proxy carried
    /// the request or connection (flag `-`), else `error`.
    pub fn carried(flag: Flag) -> Decision {
        if flag == Flag::None {
            Decision::Allow
        } else {
            Decision::Error
        }
    }
}

/// An external provider's words for the access log.
#[derive(Debug, Clone, Copy)]
pub struct ExtAuthzWords<'a>(pub &'a str);

impl ExtAuthzWords<'_> {
    pub fn allowed(self) -> String {
        format!("ext_authz {}: allowed", self.0)
    }

    /// A refusal with this status (HTTP); `None`: a connection, which has
    /// no status to tell.
    pub fn denied(self, status: Option<u16>) -> String {
        match status {
            Some(status) => format!("ext_authz {}: denied ({status})", self.0),
            None => format!("ext_authz {}: denied", self.0),
        }
    }

    /// The provider could not decide, for `why`; `fail_open`: the request
    /// went on anyway.
    pub fn failed(self, why: &str, fail_open: bool) -> String {
        format!(
            "ext_authz {}: {why}{}",
            self.0,
            if fail_open { " (failOpen)" } else { "" }
        )
    }
}

/// Why a connection was refused before any decision could be made: its
/// PeerAuthentication mode or its TLS handshake. Flag `UAEX`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnRefusal {
    /// Plaintext on a STRICT port.
    PlaintextRejected,
    /// Not a TLS ClientHello.
    TlsError,
    /// The ClientHello or the handshake took too long.
    TlsTimeout,
    /// The handshake failed (a peer certificate refused, typically).
    TlsHandshakeFailed,
    /// The peer's certificate has no usable SPIFFE ID.
    NoPeerIdentity,
}

impl ConnRefusal {
    #[cfg(test)]
    pub const ALL: [ConnRefusal; 5] = [
        ConnRefusal::PlaintextRejected,
        ConnRefusal::TlsError,
        ConnRefusal::TlsTimeout,
        ConnRefusal::TlsHandshakeFailed,
        ConnRefusal::NoPeerIdentity,
    ];

    /// The access log's `reason`.
    pub const fn as_str(self) -> &'static str {
        match self {
            ConnRefusal::PlaintextRejected => "plaintext_rejected",
            ConnRefusal::TlsError => "tls_error",
            ConnRefusal::TlsTimeout => "tls_timeout",
            ConnRefusal::TlsHandshakeFailed => "tls_handshake_failed",
            ConnRefusal::NoPeerIdentity => "no_peer_identity",
        }
    }

    pub const fn flag(self) -> Flag {
        Flag::ExtAuthzDenied
    }
}

/// Why the proxy closed a connection (or a tunnel) it had allowed; the
/// access-log reason starts with its code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Close {
    /// No bytes either way for the idle timeout.
    IdleTimeout,
    /// A policy change denies it now.
    PolicyChanged,
}

impl Close {
    pub const fn as_str(self) -> &'static str {
        match self {
            Close::IdleTimeout => "idle_timeout",
            Close::PolicyChanged => "policy_changed",
        }
    }

    /// The close reason a logged reason starts with, if any.
    pub fn of(reason: &str) -> Option<Close> {
        [Close::IdleTimeout, Close::PolicyChanged]
            .into_iter()
            .find(|c| reason.starts_with(c.as_str()))
    }

    /// The access-log reason of a connection closed after `timeout` idle.
    pub fn idle(timeout: Duration) -> String {
        format!(
            "{}: no bytes either way for {}s",
            Close::IdleTimeout.as_str(),
            timeout.as_secs()
        )
    }

    /// The access-log reason of a `what` ("connection", "WebSocket")
    /// closed because the new policy denies it.
    pub fn policy_changed(what: &str) -> String {
        format!(
            "{}: the new policy denies this {what}",
            Close::PolicyChanged.as_str()
        )
    }
}

/// The access-log reason of an exchange or tunnel that ended normally.
pub const FORWARDED: &str = "forwarded";

/// The outbound access-log reason of an exchange the client broke off
/// (flag `DC`).
pub const DOWNSTREAM_CLOSED: &str = "downstream closed";

/// How an inbound request ended, beyond its status: its response flag and
/// what the access log says beyond the policy decision derive from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestEnd {
    /// The exchange with the application ended with this flag (`-`:
    /// normally; else what broke, or the proxy's answer for it).
    Exchanged(Flag),
    /// Admission refused it.
    Refused(Refusal),
    /// Allowed, but the application could not be connected to (why):
    /// [`LocalFailure::ConnectFailed`].
    Unreachable(String),
    /// A WebSocket tunnel that ended so: its flag, and its reason (a
    /// policy change that closed it is a deny).
    Tunnel { flag: Flag, reason: String },
}

impl RequestEnd {
    pub fn flag(&self) -> Flag {
        match self {
            RequestEnd::Exchanged(flag) | RequestEnd::Tunnel { flag, .. } => *flag,
            RequestEnd::Refused(r) => r.flag(),
            RequestEnd::Unreachable(_) => LocalFailure::ConnectFailed.flag(),
        }
    }

    /// Sets the access-log fields this end decides, over those of the
    /// decision (and of an allowing provider's words).
    pub fn log(&self, record: &mut AccessRecord) {
        record.response_flags = self.flag().as_str();
        match self {
            RequestEnd::Exchanged(_) => {}
            RequestEnd::Refused(r) => r.log(record),
            RequestEnd::Unreachable(why) => record.reason = format!("{}; {why}", record.reason),
            RequestEnd::Tunnel { reason, .. } => {
                if Close::of(reason) == Some(Close::PolicyChanged) {
                    record.decision = Decision::Deny.as_str();
                    record.reason.clone_from(reason);
                }
            }
        }
    }
}

/// How an allowed TCP connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TcpEnd {
    /// Both sides finished.
    Done,
    /// Closed by the proxy ([`Close`]), with the full reason.
    Closed(Close, String),
    /// The application could not be reached, or the copy failed (the
    /// reason).
    Failed(String),
}

impl TcpEnd {
    /// Envoy's flag: `UF` for anything but a clean end or the idle
    /// timeout (a policy change included, as before the outcome types).
    pub fn flag(&self) -> Flag {
        match self {
            TcpEnd::Done | TcpEnd::Closed(Close::IdleTimeout, _) => Flag::None,
            TcpEnd::Closed(Close::PolicyChanged, _) | TcpEnd::Failed(_) => {
                Flag::UpstreamConnectFailure
            }
        }
    }

    /// Sets the access-log fields this end decides.
    pub fn log(&self, record: &mut AccessRecord) {
        record.response_flags = self.flag().as_str();
        match self {
            TcpEnd::Done => {}
            TcpEnd::Closed(close, reason) => {
                if *close == Close::PolicyChanged {
                    record.decision = Decision::Deny.as_str();
                }
                record.reason.clone_from(reason);
            }
            TcpEnd::Failed(reason) => record.reason.clone_from(reason),
        }
    }
}

#[cfg(test)]
mod tests;
