//! SPIFFE IDs and trust domains.
//!
//! Parsing follows the SPIFFE ID specification: scheme `spiffe` (lower case),
//! a trust domain of lower-case letters, digits, `.`, `-` and `_` (at most 255
//! bytes, no port, no user info), and an optional path of non-empty segments of
//! letters, digits, `.`, `-` and `_` (no `.`/`..` segments, no trailing slash,
//! no query or fragment), at most 2048 bytes in all. The parser works on bytes,
//! never indexes out of range and never panics, whatever the input: it is fed
//! by peers' certificates and CSRs.
//!
//! Mesh workloads use the Istio form `spiffe://TD/ns/NAMESPACE/sa/SERVICE_ACCOUNT`;
//! [`SpiffeId::parse_workload`] accepts only that form.

use std::fmt;
use std::str::FromStr;

/// The longest SPIFFE ID accepted, in bytes (SPIFFE spec: URIs longer than
/// 2048 bytes are not SPIFFE IDs).
pub const MAX_SPIFFE_ID_LEN: usize = 2048;
/// The longest trust domain accepted, in bytes.
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// Istio's default trust domain (`meshConfig.trustDomain` when unset). A
/// plug-in CA whose certificate names no trust domain signs for this one, as
/// istiod does: Istio takes the trust domain from the mesh config, never
/// from the CA certificate.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

const SCHEME: &str = "spiffe://";

/// Why a string is not a valid SPIFFE ID or trust domain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SpiffeIdError {
    #[error("SPIFFE ID is empty")]
    Empty,
    #[error("SPIFFE ID is longer than {MAX_SPIFFE_ID_LEN} bytes")]
    TooLong,
    #[error("SPIFFE ID must start with \"spiffe://\"")]
    WrongScheme,
    #[error("trust domain is empty")]
    EmptyTrustDomain,
    #[error("trust domain is longer than {MAX_TRUST_DOMAIN_LEN} bytes")]
    TrustDomainTooLong,
    #[error(
        "trust domain contains {found:?}: only lower-case letters, digits, '.', '-' and '_' are allowed (no port, no user info)"
    )]
    BadTrustDomainChar { found: char },
    #[error("path segment is empty (\"//\" or trailing \"/\")")]
    EmptySegment,
    #[error("path segment \".\" or \"..\" is not allowed")]
    DotSegment,
    #[error(
        "path contains {found:?}: only letters, digits, '.', '-', '_' and '/' are allowed (no query, no fragment, no percent-encoding)"
    )]
    BadPathChar { found: char },
    #[error("not a workload identity: the path must be /ns/NAMESPACE/sa/SERVICE_ACCOUNT")]
    NotWorkloadPath,
}

/// A validated SPIFFE trust domain, e.g. `cluster.local`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Validates a bare trust domain name (no scheme).
    pub fn new(name: &str) -> Result<Self, SpiffeIdError> {
        validate_trust_domain(name)?;
        Ok(Self(name.to_owned()))
    }

    /// [`DEFAULT_TRUST_DOMAIN`], Istio's default trust domain.
    pub fn istio_default() -> Self {
        // A constant valid name (the unit test `istio_default_is_valid` checks it).
        Self(DEFAULT_TRUST_DOMAIN.to_owned())
    }

    /// The trust domain name, e.g. `cluster.local`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The trust domain's own SPIFFE ID, `spiffe://TD` (used as the URI SAN
    /// of CA certificates).
    pub fn id_uri(&self) -> String {
        format!("{SCHEME}{}", self.0)
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

/// A validated SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    uri: String,
    // Byte offset in `uri` where the path starts (== uri.len() when there is no path).
    path_start: usize,
}

impl SpiffeId {
    /// Parses any SPIFFE ID (with or without a path).
    pub fn parse(s: &str) -> Result<Self, SpiffeIdError> {
        if s.is_empty() {
            return Err(SpiffeIdError::Empty);
        }
        if s.len() > MAX_SPIFFE_ID_LEN {
            return Err(SpiffeIdError::TooLong);
        }
        let rest = s.strip_prefix(SCHEME).ok_or(SpiffeIdError::WrongScheme)?;
        let (td, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        validate_trust_domain(td)?;
        if !path.is_empty() {
            validate_path(path)?;
        }
        Ok(Self {
            uri: s.to_owned(),
            path_start: SCHEME.len() + td.len(),
        })
    }

    /// Parses a SPIFFE ID and requires the workload form
    /// `spiffe://TD/ns/NAMESPACE/sa/SERVICE_ACCOUNT`.
    pub fn parse_workload(s: &str) -> Result<Self, SpiffeIdError> {
        let id = Self::parse(s)?;
        if id.workload_parts().is_none() {
            return Err(SpiffeIdError::NotWorkloadPath);
        }
        Ok(id)
    }

    /// Builds the workload identity `spiffe://TD/ns/NAMESPACE/sa/SA`.
    pub fn workload(
        trust_domain: &TrustDomain,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeIdError> {
        Self::parse_workload(&format!(
            "{SCHEME}{}/ns/{namespace}/sa/{service_account}",
            trust_domain.as_str()
        ))
    }

    /// The trust domain name.
    pub fn trust_domain_str(&self) -> &str {
        // Invariant: `path_start` was computed by `parse` as SCHEME.len() + td.len(),
        // both within `uri` and on char boundaries (SCHEME and td are ASCII).
        self.uri
            .get(SCHEME.len()..self.path_start)
            .unwrap_or_default()
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> TrustDomain {
        TrustDomain(self.trust_domain_str().to_owned())
    }

    /// The path, e.g. `/ns/default/sa/api` (empty for a trust domain ID).
    pub fn path(&self) -> &str {
        self.uri.get(self.path_start..).unwrap_or_default()
    }

    /// Namespace, for workload IDs.
    pub fn namespace(&self) -> Option<&str> {
        self.workload_parts().map(|(ns, _)| ns)
    }

    /// Service account, for workload IDs.
    pub fn service_account(&self) -> Option<&str> {
        self.workload_parts().map(|(_, sa)| sa)
    }

    /// The whole URI, `spiffe://...`.
    pub fn as_str(&self) -> &str {
        &self.uri
    }

    /// The Istio principal form used by AuthorizationPolicy `principals`:
    /// the URI without the `spiffe://` scheme, e.g. `cluster.local/ns/default/sa/api`.
    pub fn principal(&self) -> &str {
        self.uri.get(SCHEME.len()..).unwrap_or_default()
    }

    fn workload_parts(&self) -> Option<(&str, &str)> {
        let mut it = self.path().strip_prefix('/')?.split('/');
        match (it.next(), it.next(), it.next(), it.next(), it.next()) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa), None) => Some((ns, sa)),
            _ => None,
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

fn validate_trust_domain(td: &str) -> Result<(), SpiffeIdError> {
    if td.is_empty() {
        return Err(SpiffeIdError::EmptyTrustDomain);
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(SpiffeIdError::TrustDomainTooLong);
    }
    if let Some(found) = td
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '.' | '-' | '_'))
    {
        return Err(SpiffeIdError::BadTrustDomainChar { found });
    }
    Ok(())
}

/// `path` starts with '/'.
fn validate_path(path: &str) -> Result<(), SpiffeIdError> {
    for segment in path.split('/').skip(1) {
        if segment.is_empty() {
            return Err(SpiffeIdError::EmptySegment);
        }
        if segment == "." || segment == ".." {
            return Err(SpiffeIdError::DotSegment);
        }
        if let Some(found) = segment
            .chars()
            .find(|c| !matches!(c, 'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' | '_'))
        {
            return Err(SpiffeIdError::BadPathChar { found });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn istio_default_is_valid() {
        assert_eq!(
            TrustDomain::new(DEFAULT_TRUST_DOMAIN),
            Ok(TrustDomain::istio_default())
        );
    }

    #[test]
    fn parses_workload_ids() {
        let id = SpiffeId::parse_workload("spiffe://cluster.local/ns/default/sa/api").unwrap();
        assert_eq!(id.trust_domain_str(), "cluster.local");
        assert_eq!(id.namespace(), Some("default"));
        assert_eq!(id.service_account(), Some("api"));
        assert_eq!(id.path(), "/ns/default/sa/api");
        assert_eq!(id.principal(), "cluster.local/ns/default/sa/api");
        let td = SpiffeId::parse("spiffe://example.org").unwrap();
        assert_eq!(td.path(), "");
        assert_eq!(td.namespace(), None);
    }

    #[test]
    fn rejects_invalid_ids() {
        use SpiffeIdError::*;
        let cases: &[(&str, SpiffeIdError)] = &[
            ("", Empty),
            ("http://cluster.local/ns/a/sa/b", WrongScheme),
            ("SPIFFE://cluster.local", WrongScheme),
            ("spiffe://", EmptyTrustDomain),
            ("spiffe:///ns/a", EmptyTrustDomain),
            ("spiffe://Cluster.local", BadTrustDomainChar { found: 'C' }),
            ("spiffe://td:8080/x", BadTrustDomainChar { found: ':' }),
            ("spiffe://user@td/x", BadTrustDomainChar { found: '@' }),
            ("spiffe://td/", EmptySegment),
            ("spiffe://td//a", EmptySegment),
            ("spiffe://td/a/", EmptySegment),
            ("spiffe://td/a/../b", DotSegment),
            ("spiffe://td/./b", DotSegment),
            ("spiffe://td/a?x=1", BadPathChar { found: '?' }),
            ("spiffe://td/a#f", BadPathChar { found: '#' }),
            ("spiffe://td/a%20", BadPathChar { found: '%' }),
            ("spiffe://td/é", BadPathChar { found: 'é' }),
        ];
        for (input, want) in cases {
            assert_eq!(SpiffeId::parse(input).unwrap_err(), *want, "{input}");
        }
        assert_eq!(
            SpiffeId::parse(&format!("spiffe://{}", "a".repeat(256))).unwrap_err(),
            TrustDomainTooLong
        );
        assert_eq!(
            SpiffeId::parse(&format!("spiffe://td/{}", "a".repeat(2100))).unwrap_err(),
            TooLong
        );
        for not_workload in [
            "spiffe://td",
            "spiffe://td/ns/a",
            "spiffe://td/ns/a/sa/b/c",
            "spiffe://td/sa/a/ns/b",
        ] {
            assert_eq!(
                SpiffeId::parse_workload(not_workload).unwrap_err(),
                NotWorkloadPath,
                "{not_workload}"
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn never_panics(s in "\\PC*") {
            let _ = SpiffeId::parse(&s);
            let _ = SpiffeId::parse_workload(&s);
            let _ = TrustDomain::new(&s);
        }

        #[test]
        fn never_panics_near_valid(td in "[a-z0-9._:@-]{0,20}", path in "[a-zA-Z0-9./?%-]{0,40}") {
            let s = format!("spiffe://{td}{path}");
            if let Ok(id) = SpiffeId::parse(&s) {
                proptest::prop_assert_eq!(id.as_str(), s.as_str());
                proptest::prop_assert!(s.contains(id.trust_domain_str()));
            }
        }
    }
}
