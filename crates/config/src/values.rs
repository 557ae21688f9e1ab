//! Parsing and checking of the value syntaxes Istio's resources use: IP
//! addresses and CIDR blocks, ports, HTTP methods, paths and path templates,
//! and the keys of `when` conditions.

use std::net::IpAddr;

use ipnet::IpNet;

/// Parses `1.2.3.4`, `1.2.3.0/24`, `2001:db8::/48` or `::1`. A single address
/// becomes a host-length block. Host bits under the mask are allowed (as in
/// Istio, which parses with Go's `netip.ParsePrefix`) and ignored when matching.
pub fn parse_ip_block(text: &str) -> Result<IpNet, String> {
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Ok(IpNet::from(ip));
    }
    match text.split_once('/') {
        Some((addr, len)) => {
            let ip: IpAddr = addr
                .parse()
                .map_err(|_| format!("\"{text}\" is not a valid IP address or CIDR block"))?;
            let max = if ip.is_ipv4() { 32 } else { 128 };
            let len: u8 = len
                .parse()
                .ok()
                .filter(|l: &u8| *l <= max && !len.starts_with('+'))
                .ok_or_else(|| format!("\"{text}\" has an invalid prefix length (0-{max})"))?;
            IpNet::new(ip, len).map_err(|e| format!("\"{text}\": {e}"))
        }
        None => Err(format!(
            "\"{text}\" is not a valid IP address or CIDR block"
        )),
    }
}

/// Parses a port number written as a string, as in `ports: ["8080"]`.
/// Istio accepts 0-65535 here (0 never matches a real connection).
/// A DNS name as Istio's `ValidateFQDN` accepts it: at most 255
/// characters, labels of letters, digits and inner `-` (at most 63 each),
/// a top-level label that is not all digits, and an optional final `.`.
pub fn check_fqdn(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("empty domain name not allowed".to_string());
    }
    if name.len() > 255 {
        return Err(format!("domain name \"{name}\" too long (max 255)"));
    }
    let trimmed = name.strip_suffix('.').unwrap_or(name);
    let labels: Vec<&str> = trimmed.split('.').collect();
    let top = labels.last().copied().unwrap_or_default();
    if !top.is_empty() && top.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "domain name \"{name}\" invalid (top level domain \"{top}\" cannot be all-numeric)"
        ));
    }
    for label in labels {
        let b = label.as_bytes();
        let ok = !b.is_empty()
            && b.len() <= 63
            && b[0].is_ascii_alphanumeric()
            && b[b.len() - 1].is_ascii_alphanumeric()
            && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-');
        if !ok {
            return Err(format!(
                "domain name \"{name}\" invalid (label \"{label}\" invalid)"
            ));
        }
    }
    Ok(())
}

pub fn parse_port(text: &str) -> Result<u16, String> {
    match text.parse::<u32>() {
        Ok(p) if p <= 65535 && !text.starts_with('+') => Ok(p as u16),
        Ok(_) => Err(format!("port {text} is out of range (0-65535)")),
        Err(_) => Err(format!("\"{text}\" is not a port number")),
    }
}

/// What a value check found: a value Istio refuses (`Reject`), or one it
/// applies but that cannot do what it looks like it does (`Warn`). A warned
/// value is kept and decided exactly as Istio decides it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lint {
    Warn(String),
    Reject(String),
}

impl From<String> for Lint {
    fn from(message: String) -> Lint {
        Lint::Reject(message)
    }
}

/// Istio's string forms (`*` alone, `*suffix`, `prefix*`, exact) treat only
/// a `*` at the very start (else the very end) as a wildcard; any other `*`
/// is a literal character (`a*b` matches only the text `a*b`). That holds
/// for principals, request principals, hosts, methods and paths alike
/// (pilot's `StringMatcherWithPrefix`, `HeaderMatcher`, `HostMatcher`,
/// `requestPrincipalGenerator`). Warns about such a literal `*`.
pub fn check_literal_star(text: &str) -> Result<(), Lint> {
    let stars = text.matches('*').count();
    let wildcards = usize::from(text == "*" || text.starts_with('*') || text.ends_with('*'));
    if stars <= wildcards {
        return Ok(());
    }
    let message = if wildcards == 0 {
        format!(
            "\"{text}\": '*' is a wildcard only at the start or the end of a value; \
             here it is a literal character, as in Istio, so this matches only the exact text \"{text}\""
        )
    } else {
        let which = if text.starts_with('*') {
            "leading"
        } else {
            "trailing"
        };
        format!(
            "\"{text}\": only the {which} '*' is a wildcard; any other '*' is a literal character, as in Istio"
        )
    };
    Err(Lint::Warn(message))
}

/// HTTP methods: Istio accepts any non-empty string and compares it with
/// the request's method exactly (a `:method` header matcher), with its `*`
/// forms. Requests carry methods in upper case, so a lower-case method, or
/// one that is not an HTTP token, never matches: a warning, not an error.
pub fn check_method(text: &str) -> Result<(), Lint> {
    check_literal_star(text)?;
    let core = text.trim_start_matches('*').trim_end_matches('*');
    if core.bytes().any(|b| b.is_ascii_lowercase()) {
        return Err(Lint::Warn(format!(
            "\"{text}\" never matches: methods are case-sensitive and requests use upper case (\"{}\")",
            text.to_ascii_uppercase()
        )));
    }
    if !core
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'+-.^_`|~".contains(&b))
    {
        return Err(Lint::Warn(format!(
            "\"{text}\" never matches: it is not an HTTP method (a method is a token such as \"GET\")"
        )));
    }
    Ok(())
}

/// Checks a path or path template (`/api/{*}/items/{**}`), as Istio's
/// `CheckValidPathTemplate` does: `{*}` stands for exactly one segment and
/// `{**}` for any remainder; no operator may follow `{**}`; braces are only
/// allowed as those two operators; in a template every other segment is a
/// plain, non-empty path segment (no `*`).
pub fn check_path(text: &str) -> Result<(), String> {
    if text.is_empty() {
        return Err("empty path".to_string());
    }
    let has_template = text.contains("{*}") || text.contains("{**}");
    let trimmed = text.trim_matches('/');
    let mut seen_glob = false;
    for seg in trimmed.split('/') {
        match seg {
            "{*}" | "{**}" if seen_glob => {
                return Err(format!(
                    "invalid path \"{text}\": {{**}} must be the last operator"
                ));
            }
            "{*}" => {}
            "{**}" => seen_glob = true,
            _ if seg.contains('{') || seg.contains('}') => {
                return Err(format!(
                    "invalid path \"{text}\": '{{' or '}}' is only allowed in the operators {{*}} and {{**}}"
                ));
            }
            _ if has_template && !is_pchar_segment(seg) => {
                return Err(format!(
                    "invalid path template \"{text}\": segment \"{seg}\" is not a plain path segment"
                ));
            }
            _ => {}
        }
    }
    Ok(())
}

fn is_pchar_segment(seg: &str) -> bool {
    !seg.is_empty()
        && seg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~%!$&'()+,;:@=".contains(&b))
}

/// The attribute a `when` condition tests.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ConditionKey {
    /// `request.headers[name]`, with the name lower-cased.
    RequestHeader(String),
    SourceIp,
    RemoteIp,
    SourceNamespace,
    SourcePrincipal,
    /// `source.serviceAccount` (`ns/sa` or `sa`).
    SourceServiceAccount,
    /// `source.trustDomain` (Istio 1.30+).
    SourceTrustDomain,
    RequestAuthPrincipal,
    RequestAuthAudiences,
    RequestAuthPresenter,
    /// `request.auth.claims[a][b]`: the path into nested claims.
    RequestAuthClaims(Vec<String>),
    DestinationIp,
    DestinationPort,
    ConnectionSni,
    /// `experimental.envoy.filters.*[...]`: accepted, but meshward cannot
    /// evaluate it, so an ALLOW rule using it never matches and a DENY rule
    /// ignores the condition.
    Experimental(String),
    /// A key Istio's validation admits (it has the `a[b]` shape and a known
    /// prefix) but its RBAC generator cannot translate, such as
    /// `request.headersX[a]`. istiod then skips the rule of an ALLOW policy
    /// and drops the condition from a DENY, AUDIT or CUSTOM one
    /// (`rule.checkError` in pilot's authz model); meshward does the same.
    Untranslatable(String),
}

impl ConditionKey {
    /// Whether the attribute exists only on HTTP requests.
    pub fn is_http_only(&self) -> bool {
        matches!(
            self,
            ConditionKey::RequestHeader(_)
                | ConditionKey::RequestAuthPrincipal
                | ConditionKey::RequestAuthAudiences
                | ConditionKey::RequestAuthPresenter
                | ConditionKey::RequestAuthClaims(_)
        )
    }

    /// Whether the attribute comes from a validated JWT.
    pub fn needs_jwt(&self) -> bool {
        matches!(
            self,
            ConditionKey::RequestAuthPrincipal
                | ConditionKey::RequestAuthAudiences
                | ConditionKey::RequestAuthPresenter
                | ConditionKey::RequestAuthClaims(_)
        )
    }

    /// What a user should know about a key that loads but cannot be
    /// evaluated as written.
    pub fn warning(&self) -> Option<String> {
        match self {
            ConditionKey::Experimental(key) => Some(format!(
                "meshward cannot evaluate \"{key}\": an ALLOW rule using it never matches, \
                 a DENY, AUDIT or CUSTOM rule ignores the condition"
            )),
            ConditionKey::Untranslatable(key) => Some(format!(
                "Istio cannot translate \"{key}\" (expected a name in brackets after the attribute): \
                 an ALLOW rule using it never matches, a DENY, AUDIT or CUSTOM rule ignores the condition"
            )),
            _ => None,
        }
    }
}

/// Parses a `when` key as Istio does: its validation (`ValidateAttribute`)
/// decides what is refused, its generator (pilot's authz model) what the
/// key means.
pub fn parse_condition_key(key: &str) -> Result<ConditionKey, String> {
    if let Some(rest) = key.strip_prefix("request.headers") {
        check_map_key(key)?;
        return Ok(match name_in_brackets(rest) {
            Some(name) => ConditionKey::RequestHeader(name.to_ascii_lowercase()),
            None => ConditionKey::Untranslatable(key.to_string()),
        });
    }
    if let Some(rest) = key.strip_prefix("request.auth.claims") {
        check_map_key(key)?;
        return Ok(match names_in_nested_brackets(rest) {
            Some(path) => ConditionKey::RequestAuthClaims(path),
            None => ConditionKey::Untranslatable(key.to_string()),
        });
    }
    if key.starts_with("experimental.envoy.filters.") {
        check_map_key(key)?;
        return Ok(ConditionKey::Experimental(key.to_string()));
    }
    Ok(match key {
        "source.ip" => ConditionKey::SourceIp,
        "remote.ip" => ConditionKey::RemoteIp,
        "source.namespace" => ConditionKey::SourceNamespace,
        "source.principal" => ConditionKey::SourcePrincipal,
        "source.serviceAccount" => ConditionKey::SourceServiceAccount,
        "source.trustDomain" => ConditionKey::SourceTrustDomain,
        "request.auth.principal" => ConditionKey::RequestAuthPrincipal,
        "request.auth.audiences" => ConditionKey::RequestAuthAudiences,
        "request.auth.presenter" => ConditionKey::RequestAuthPresenter,
        "destination.ip" => ConditionKey::DestinationIp,
        "destination.port" => ConditionKey::DestinationPort,
        "connection.sni" => ConditionKey::ConnectionSni,
        "" => return Err("key must not be empty".to_string()),
        "destination.namespace" => {
            return Err(
                "attribute destination.namespace is replaced by metadata.namespace".to_string(),
            );
        }
        "destination.name" | "destination.user" => {
            return Err(format!(
                "attribute {key} is deprecated (only supported in v1alpha1)"
            ));
        }
        _ if key.starts_with("destination.labels") => {
            return Err(format!(
                "attribute {key} is replaced by the workload selector"
            ));
        }
        _ => return Err(format!("unknown condition key \"{key}\"")),
    })
}

/// Istio's `validateMapKey`: the key ends with `]` and has a `[` after its
/// first character with at least one character between them.
fn check_map_key(key: &str) -> Result<(), String> {
    match key.find('[') {
        Some(open) if key.ends_with(']') && open > 0 && open + 2 < key.len() => Ok(()),
        _ => Err(format!(
            "invalid key \"{key}\": expected <attribute>[<name>], e.g. request.headers[x-user]"
        )),
    }
}

/// Istio's `extractNameInBrackets`: `[name]` gives `name` (one bracket of
/// each side removed, whatever is inside).
fn name_in_brackets(s: &str) -> Option<&str> {
    s.strip_prefix('[')?.strip_suffix(']')
}

/// Istio's `extractNameInNestedBrackets`: `[a][b]` gives `a`, `b`; where the
/// text is not a run of bracketed names it falls back to
/// [`name_in_brackets`] of the whole text.
fn names_in_nested_brackets(s: &str) -> Option<Vec<String>> {
    let bytes = s.as_bytes();
    let end_bracket = |begin: usize| -> Option<usize> {
        if bytes.get(begin) != Some(&b'[') {
            return None;
        }
        for (i, b) in bytes.iter().enumerate().skip(begin + 1) {
            match b {
                b'[' => return None,
                b']' => return Some(i),
                _ => {}
            }
        }
        None
    };
    let mut names = Vec::new();
    let mut begin = 0;
    while begin < s.len() {
        match end_bracket(begin) {
            Some(end) => {
                names.push(s[begin + 1..end].to_string());
                begin = end + 1;
            }
            None => return name_in_brackets(s).map(|n| vec![n.to_string()]),
        }
    }
    Some(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_blocks() {
        assert_eq!(parse_ip_block("1.2.3.4").unwrap().to_string(), "1.2.3.4/32");
        assert_eq!(parse_ip_block("5.6.7.0/24").unwrap().prefix_len(), 24);
        assert!(parse_ip_block("2001:db8::/48").is_ok());
        assert!(parse_ip_block("10.0.0.300").is_err());
        assert!(parse_ip_block("10.0.0.0/33").is_err());
        assert!(parse_ip_block("10.0.0.0/").is_err());
        assert!(check_fqdn("api.external-service.com").is_ok());
        assert!(check_fqdn("api.example.com.").is_ok());
        assert!(check_fqdn("db").is_ok());
        assert!(check_fqdn("*.example.com").is_err());
        assert!(check_fqdn("10.0.0.1").unwrap_err().contains("all-numeric"));
        assert!(check_fqdn("a..b").is_err());
        assert!(check_fqdn("-a.b").is_err());
        assert!(check_fqdn("").is_err());
        assert!(parse_ip_block("").is_err());
        assert!(parse_ip_block("a.b.c.d/8").is_err());
    }

    #[test]
    fn ports() {
        assert_eq!(parse_port("8080"), Ok(8080));
        assert_eq!(parse_port("0"), Ok(0));
        assert!(parse_port("80-90").is_err());
        assert!(parse_port("65536").is_err());
        assert!(parse_port("http").is_err());
        assert!(parse_port("-1").is_err());
    }

    #[test]
    fn methods() {
        assert!(check_method("GET").is_ok());
        assert!(check_method("*").is_ok());
        assert!(check_method("P*").is_ok());
        let warned = |m: &str| match check_method(m) {
            Err(Lint::Warn(w)) => w,
            other => panic!("{m}: {other:?}"),
        };
        assert!(warned("get").contains("never matches: methods are case-sensitive"));
        assert!(warned("GE T").contains("not an HTTP method"));
        assert!(warned("G*T").contains("literal character"));
        assert!(warned("*GE*").contains("only the leading '*' is a wildcard"));
        assert!(warned("GE**").contains("only the trailing '*' is a wildcard"));
        assert!(check_method("*ET").is_ok());
    }

    #[test]
    fn literal_stars() {
        for ok in ["*", "a", "*a", "a*", "/api/*", "*.example.com"] {
            assert_eq!(check_literal_star(ok), Ok(()), "{ok}");
        }
        for warned in ["a*b", "**", "*a*", "a**", "cluster.local/ns/*/sa/x"] {
            assert!(
                matches!(check_literal_star(warned), Err(Lint::Warn(_))),
                "{warned}"
            );
        }
    }

    #[test]
    fn paths() {
        assert!(check_path("/a/{*}/b").is_ok());
        assert!(check_path("/a/{**}").is_ok());
        assert!(check_path("/a/{**}/b").is_ok());
        assert!(check_path("/a/{**}/{*}").is_err());
        assert!(check_path("/a{b").is_err());
        assert!(check_path("/a/{*}/b*").is_err());
        assert!(check_path("/a//{*}").is_err());
        assert!(check_path("/a/{*}*").is_err());
        assert!(check_path("/a/{x}").is_err());
        assert!(check_path("/api/*").is_ok());
        assert!(check_path("").is_err());
    }

    #[test]
    fn keys() {
        assert_eq!(
            parse_condition_key("request.headers[X-Foo]"),
            Ok(ConditionKey::RequestHeader("x-foo".into()))
        );
        assert_eq!(
            parse_condition_key("request.auth.claims[a][b]"),
            Ok(ConditionKey::RequestAuthClaims(vec![
                "a".into(),
                "b".into()
            ]))
        );
        assert!(parse_condition_key("request.headers").is_err());
        assert!(parse_condition_key("request.headers[]").is_err());
        assert!(parse_condition_key("request.headers[a").is_err());
        assert!(parse_condition_key("request.auth.claims[]").is_err());
        assert!(parse_condition_key("source.user").is_err());
        assert!(parse_condition_key("").is_err());
        assert!(parse_condition_key("experimental.envoy.filters.a.b").is_err());
        assert!(parse_condition_key("request.experimental.inline.headers[a]").is_err());
        // Istio admits these shapes and reads them its own way.
        assert_eq!(
            parse_condition_key("request.headers[a][b]"),
            Ok(ConditionKey::RequestHeader("a][b".into()))
        );
        assert_eq!(
            parse_condition_key("request.auth.claims[a][]"),
            Ok(ConditionKey::RequestAuthClaims(vec!["a".into(), "".into()]))
        );
        assert_eq!(
            parse_condition_key("request.auth.claims[a[b]]"),
            Ok(ConditionKey::RequestAuthClaims(vec!["a[b]".into()]))
        );
        assert_eq!(
            parse_condition_key("request.headersX[a]"),
            Ok(ConditionKey::Untranslatable("request.headersX[a]".into()))
        );
        assert_eq!(
            parse_condition_key("request.auth.claimsX[a]"),
            Ok(ConditionKey::Untranslatable(
                "request.auth.claimsX[a]".into()
            ))
        );
        assert_eq!(
            parse_condition_key("source.trustDomain"),
            Ok(ConditionKey::SourceTrustDomain)
        );
    }
}
