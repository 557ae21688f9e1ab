//! Value matchers with Istio's semantics: exact, `prefix*`, `*suffix`, `*`
//! (presence), globs for namespaces, path templates and CIDR blocks.

use std::net::IpAddr;

use ipnet::IpNet;

/// Istio's string matcher (`StringMatcher` in pilot's authz/matcher).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StrMatch {
    Exact(Box<str>),
    Prefix(Box<str>),
    Suffix(Box<str>),
    /// `*`: any non-empty value.
    NonEmpty,
}

impl StrMatch {
    pub fn new(pattern: &str) -> StrMatch {
        if pattern == "*" {
            StrMatch::NonEmpty
        } else if let Some(rest) = pattern.strip_prefix('*') {
            StrMatch::Suffix(rest.into())
        } else if let Some(rest) = pattern.strip_suffix('*') {
            StrMatch::Prefix(rest.into())
        } else {
            StrMatch::Exact(pattern.into())
        }
    }

    /// Lower-cases the pattern, for matching against lower-cased input.
    pub fn new_ignore_case(pattern: &str) -> StrMatch {
        StrMatch::new(&pattern.to_ascii_lowercase())
    }

    #[inline]
    pub fn matches(&self, value: &str) -> bool {
        self.matches_bytes(value.as_bytes())
    }

    /// The same match on raw bytes (a header value need not be UTF-8).
    #[inline]
    pub fn matches_bytes(&self, value: &[u8]) -> bool {
        match self {
            StrMatch::Exact(p) => value == p.as_bytes(),
            StrMatch::Prefix(p) => value.starts_with(p.as_bytes()),
            StrMatch::Suffix(p) => value.ends_with(p.as_bytes()),
            StrMatch::NonEmpty => !value.is_empty(),
        }
    }

    /// Case-insensitive match; the pattern must have been built with
    /// [`StrMatch::new_ignore_case`].
    #[inline]
    pub fn matches_ignore_case(&self, value: &str) -> bool {
        let v = value.as_bytes();
        match self {
            StrMatch::Exact(p) => value.eq_ignore_ascii_case(p),
            StrMatch::Prefix(p) => {
                v.len() >= p.len() && v[..p.len()].eq_ignore_ascii_case(p.as_bytes())
            }
            StrMatch::Suffix(p) => {
                v.len() >= p.len() && v[v.len() - p.len()..].eq_ignore_ascii_case(p.as_bytes())
            }
            StrMatch::NonEmpty => !value.is_empty(),
        }
    }
}

/// One element of a glob: literal text, or a run of any characters with a
/// minimum length (0 for `.*`, 1 for `.+`).
#[derive(Debug, Clone, PartialEq, Eq)]
enum GlobPart {
    Lit(Box<str>),
    Any { min: usize },
}

/// A full-match glob, the equivalent of the anchored regular expressions
/// Istio generates for namespaces and service accounts, with every literal
/// taken literally (the 2026 regex-quoting fixes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob(Vec<GlobPart>);

impl Glob {
    /// `*` in `pattern` matches any run of characters, including `/` and the
    /// empty run.
    pub fn star(pattern: &str) -> Glob {
        let mut parts = Vec::new();
        for (i, lit) in pattern.split('*').enumerate() {
            if i > 0 {
                parts.push(GlobPart::Any { min: 0 });
            }
            if !lit.is_empty() {
                parts.push(GlobPart::Lit(lit.into()));
            }
        }
        Glob(parts)
    }

    fn lit(mut self, s: &str) -> Glob {
        self.0.push(GlobPart::Lit(s.into()));
        self
    }

    fn any(mut self, min: usize) -> Glob {
        self.0.push(GlobPart::Any { min });
        self
    }

    pub fn matches(&self, value: &str) -> bool {
        glob_match(&self.0, value.as_bytes())
    }
}

fn glob_match(parts: &[GlobPart], v: &[u8]) -> bool {
    match parts.split_first() {
        None => v.is_empty(),
        Some((GlobPart::Lit(l), rest)) => {
            v.starts_with(l.as_bytes()) && glob_match(rest, &v[l.len()..])
        }
        Some((GlobPart::Any { min }, rest)) => {
            if rest.is_empty() {
                return v.len() >= *min;
            }
            // Try each split point; the patterns are short (a handful of
            // parts), so backtracking stays cheap.
            (*min..=v.len()).any(|i| glob_match(rest, &v[i..]))
        }
    }
}

/// `namespaces` value: Istio matches the peer principal against
/// `.*/ns/<value>/.*` with each `*` of the value turned into `.*`.
pub fn namespace_glob(value: &str) -> Glob {
    let mut g = Glob(vec![GlobPart::Any { min: 0 }]).lit("/ns/");
    g.0.extend(Glob::star(value).0);
    g.lit("/").any(0)
}

/// A namespace matcher: a plain substring search for the common literal
/// value (`.*/ns/foo/.*` is "contains `/ns/foo/`"), a glob otherwise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NamespaceMatch {
    Contains(Box<str>),
    Glob(Glob),
}

impl NamespaceMatch {
    pub fn new(value: &str) -> NamespaceMatch {
        if value.contains('*') {
            NamespaceMatch::Glob(namespace_glob(value))
        } else {
            NamespaceMatch::Contains(format!("/ns/{value}/").into())
        }
    }

    #[inline]
    pub fn matches(&self, principal: &str) -> bool {
        match self {
            NamespaceMatch::Contains(needle) => principal.contains(&**needle),
            NamespaceMatch::Glob(g) => g.matches(principal),
        }
    }
}

/// `serviceAccounts` value `ns/sa`: Istio matches the peer SPIFFE ID against
/// `spiffe://.+/ns/<ns>/(.+/|)sa/<sa>(/.+)?`. Principals here carry no
/// `spiffe://` prefix, so the trust domain is the leading `.+`.
pub fn service_account_globs(namespace: &str, name: &str) -> [Glob; 4] {
    let base = |mid: bool, tail: bool| {
        let mut g = Glob(vec![GlobPart::Any { min: 1 }]).lit(&format!("/ns/{namespace}/"));
        if mid {
            g = g.any(1).lit("/");
        }
        g = g.lit(&format!("sa/{name}"));
        if tail {
            g = g.lit("/").any(1);
        }
        g
    };
    [
        base(false, false),
        base(true, false),
        base(false, true),
        base(true, true),
    ]
}

/// A `trustDomains` value (Istio 1.30+), matched against the peer's
/// principal (its SPIFFE ID without `spiffe://`) as Istio's
/// `srcTrustDomainGenerator` does: `*` is any peer with an identity; a
/// plain value is the principal's prefix up to its first `/`; one `*` at
/// the start or the end stands for any run of characters other than `/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrustDomainMatch {
    Any,
    Exact(Box<str>),
    /// `pre` + `[^/]*` + `post`, then `/`.
    Glob {
        pre: Box<str>,
        post: Box<str>,
    },
}

impl TrustDomainMatch {
    pub fn new(value: &str) -> TrustDomainMatch {
        if value == "*" {
            TrustDomainMatch::Any
        } else if let Some((pre, post)) = value.split_once('*') {
            TrustDomainMatch::Glob {
                pre: pre.into(),
                post: post.into(),
            }
        } else {
            TrustDomainMatch::Exact(value.into())
        }
    }

    #[inline]
    pub fn matches(&self, principal: &str) -> bool {
        match self {
            TrustDomainMatch::Any => true,
            TrustDomainMatch::Exact(td) => principal
                .strip_prefix(&**td)
                .is_some_and(|rest| rest.starts_with('/')),
            TrustDomainMatch::Glob { pre, post } => {
                let Some(rest) = principal.strip_prefix(&**pre) else {
                    return false;
                };
                // `[^/]*` may end anywhere up to the first `/`.
                let limit = rest.find('/').unwrap_or(rest.len());
                (0..=limit).any(|k| {
                    rest[k..]
                        .strip_prefix(&**post)
                        .is_some_and(|tail| tail.starts_with('/'))
                })
            }
        }
    }
}

/// A path value: Istio's string forms, or a `{*}`/`{**}` template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathMatch {
    Str(StrMatch),
    Template(Vec<TemplatePart>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplatePart {
    Lit(Box<str>),
    /// `{*}`: exactly one non-empty segment.
    Segment,
    /// `{**}`: any remainder, including `/`.
    Rest,
}

impl PathMatch {
    pub fn new(pattern: &str) -> PathMatch {
        if !(pattern.contains("{*}") || pattern.contains("{**}")) {
            return PathMatch::Str(StrMatch::new(pattern));
        }
        let mut parts = Vec::new();
        let mut rest = pattern;
        while !rest.is_empty() {
            if let Some(r) = rest.strip_prefix("{**}") {
                parts.push(TemplatePart::Rest);
                rest = r;
            } else if let Some(r) = rest.strip_prefix("{*}") {
                parts.push(TemplatePart::Segment);
                rest = r;
            } else {
                let end = rest.find('{').unwrap_or(rest.len());
                let end = if end == 0 { 1 } else { end };
                parts.push(TemplatePart::Lit(rest[..end].into()));
                rest = &rest[end..];
            }
        }
        PathMatch::Template(parts)
    }

    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Str(m) => m.matches(path),
            PathMatch::Template(parts) => template_match(parts, path.as_bytes()),
        }
    }
}

fn template_match(parts: &[TemplatePart], v: &[u8]) -> bool {
    match parts.split_first() {
        None => v.is_empty(),
        Some((TemplatePart::Lit(l), rest)) => {
            v.starts_with(l.as_bytes()) && template_match(rest, &v[l.len()..])
        }
        Some((TemplatePart::Segment, rest)) => {
            let seg_end = v.iter().position(|b| *b == b'/').unwrap_or(v.len());
            // One segment, non-empty; later parts must match what follows it.
            (1..=seg_end).rev().any(|i| template_match(rest, &v[i..]))
        }
        Some((TemplatePart::Rest, rest)) => (0..=v.len()).any(|i| template_match(rest, &v[i..])),
    }
}

/// Parses an IP or CIDR that validation already accepted; `None` only if a
/// caller bypassed validation, which the compiler treats as "never matches".
pub fn ip_block(text: &str) -> Option<IpNet> {
    meshward_config::values::parse_ip_block(text).ok()
}

/// Whether `ip` lies in `net`, host bits of the block ignored. IPv4-mapped
/// IPv6 addresses are compared as IPv4.
#[inline]
pub fn ip_in(net: &IpNet, ip: IpAddr) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    net.trunc().contains(&ip)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn string_forms() {
        assert!(StrMatch::new("/api/*").matches("/api/x"));
        assert!(StrMatch::new("/api/*").matches("/api/"));
        assert!(!StrMatch::new("/api/*").matches("/api"));
        assert!(StrMatch::new("*.png").matches("/a.png"));
        assert!(StrMatch::new("*").matches("x"));
        assert!(!StrMatch::new("*").matches(""));
        assert!(StrMatch::new("GET").matches("GET"));
        assert!(!StrMatch::new("GET").matches("get"));
        let host = StrMatch::new_ignore_case("*.Example.com");
        assert!(host.matches_ignore_case("SHOP.EXAMPLE.COM"));
        assert!(!host.matches_ignore_case("example.com"));
    }

    #[test]
    fn namespaces() {
        let g = namespace_glob("prod");
        assert!(g.matches("cluster.local/ns/prod/sa/x"));
        assert!(!g.matches("cluster.local/ns/production/sa/x"));
        assert!(!g.matches("cluster.local/ns/prodXsa/x"));
        let g = namespace_glob("team-*");
        assert!(g.matches("td/ns/team-a/sa/x"));
        assert!(!g.matches("td/ns/other/sa/x"));
        let g = namespace_glob("*");
        assert!(g.matches("td/ns/a/sa/b"));
        let g = namespace_glob("a.b");
        assert!(!g.matches("td/ns/aXb/sa/c"));
    }

    #[test]
    fn service_accounts() {
        let any = |p: &str| {
            service_account_globs("cert-manager.io", "sa")
                .iter()
                .any(|g| g.matches(p))
        };
        assert!(any("td/ns/cert-manager.io/sa/sa"));
        assert!(!any("td/ns/cert-managerXio/sa/sa"));
        assert!(any("td/ns/cert-manager.io/x/y/sa/sa/z"));
        assert!(!any("td/ns/cert-manager.io/sa/sa2"));
        assert!(!any("/ns/cert-manager.io/sa/sa"));
    }

    #[test]
    fn trust_domains() {
        let p = "td.example/ns/a/sa/b";
        assert!(TrustDomainMatch::new("*").matches(p));
        assert!(TrustDomainMatch::new("td.example").matches(p));
        assert!(!TrustDomainMatch::new("td.exam").matches(p));
        // Istio's plain form is the prefix `spiffe://<value>/`, so a `/` in
        // a `source.trustDomain` value (allowed there) reaches into the path.
        assert!(TrustDomainMatch::new("td.example/ns").matches(p));
        assert!(TrustDomainMatch::new("*.example").matches(p));
        assert!(TrustDomainMatch::new("td.*").matches(p));
        assert!(!TrustDomainMatch::new("*.other").matches(p));
        // `[^/]*` never crosses into the path, and literals are literal.
        assert!(!TrustDomainMatch::new("*ns").matches(p));
        assert!(!TrustDomainMatch::new("tdXexample").matches(p));
    }

    #[test]
    fn templates() {
        let t = PathMatch::new("/api/{*}/items");
        assert!(t.matches("/api/v1/items"));
        assert!(!t.matches("/api/v1/v2/items"));
        assert!(!t.matches("/api//items"));
        let t = PathMatch::new("/files/{**}");
        assert!(t.matches("/files/a/b/c.txt"));
        assert!(t.matches("/files/"));
        let t = PathMatch::new("/{*}/x/{**}/end");
        assert!(t.matches("/a/x/b/c/end"));
        assert!(!t.matches("/a/y/b/end"));
    }

    #[test]
    fn cidrs() {
        let net = ip_block("10.1.2.3/16").unwrap();
        assert!(ip_in(&net, "10.1.99.1".parse().unwrap()));
        assert!(!ip_in(&net, "10.2.0.1".parse().unwrap()));
        let net = ip_block("1.2.3.4").unwrap();
        assert!(ip_in(&net, "::ffff:1.2.3.4".parse().unwrap()));
    }
}
