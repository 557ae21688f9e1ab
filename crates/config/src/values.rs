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

/// HTTP methods are case-sensitive tokens; Istio's examples and Envoy's
/// matching use the upper-case form. A lower-case method could never match a
/// real request, so it is refused rather than silently ignored. A leading or
/// trailing `*` (prefix/suffix match) and `*` alone are allowed.
pub fn check_method(text: &str) -> Result<(), String> {
    let core = text.trim_start_matches('*').trim_end_matches('*');
    if text == "*" {
        return Ok(());
    }
    if core.is_empty() {
        return Err("empty method".to_string());
    }
    if core.chars().any(|c| c.is_ascii_lowercase()) {
        return Err(format!(
            "\"{text}\" is not an HTTP method (methods are upper case, e.g. \"{}\")",
            text.to_ascii_uppercase()
        ));
    }
    if !core
        .bytes()
        .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
    {
        return Err(format!("\"{text}\" is not an HTTP method"));
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
    RequestAuthPrincipal,
    RequestAuthAudiences,
    RequestAuthPresenter,
    /// `request.auth.claims[a][b]`: the path into nested claims.
    RequestAuthClaims(Vec<String>),
    DestinationIp,
    DestinationPort,
    ConnectionSni,
    /// `experimental.envoy.filters.*`: accepted, but meshward cannot evaluate
    /// it, so an ALLOW rule using it never matches and a DENY rule always does.
    Experimental(String),
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
}

pub fn parse_condition_key(key: &str) -> Result<ConditionKey, String> {
    if let Some(rest) = key
        .strip_prefix("request.experimental.inline.headers")
        .or_else(|| key.strip_prefix("request.headers"))
    {
        let name = bracketed(rest, key)?;
        if name.len() != 1 || name[0].is_empty() {
            return Err(format!(
                "invalid key \"{key}\": expected request.headers[<header-name>]"
            ));
        }
        return Ok(ConditionKey::RequestHeader(name[0].to_ascii_lowercase()));
    }
    if let Some(rest) = key.strip_prefix("request.auth.claims") {
        let path = bracketed(rest, key)?;
        if path.is_empty() || path.iter().any(|p| p.is_empty()) {
            return Err(format!(
                "invalid key \"{key}\": expected request.auth.claims[<claim>] or request.auth.claims[<claim>][<nested>]"
            ));
        }
        return Ok(ConditionKey::RequestAuthClaims(path));
    }
    if let Some(rest) = key.strip_prefix("experimental.envoy.filters.") {
        if rest.is_empty() {
            return Err(format!("invalid key \"{key}\""));
        }
        return Ok(ConditionKey::Experimental(key.to_string()));
    }
    Ok(match key {
        "source.ip" => ConditionKey::SourceIp,
        "remote.ip" => ConditionKey::RemoteIp,
        "source.namespace" => ConditionKey::SourceNamespace,
        "source.principal" => ConditionKey::SourcePrincipal,
        "source.serviceAccount" => ConditionKey::SourceServiceAccount,
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

/// Splits `[a][b]` into `["a", "b"]`.
fn bracketed(rest: &str, key: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut s = rest;
    while !s.is_empty() {
        let inner = s
            .strip_prefix('[')
            .and_then(|t| t.split_once(']'))
            .ok_or_else(|| format!("invalid key \"{key}\": unbalanced brackets"))?;
        if inner.0.contains('[') {
            return Err(format!("invalid key \"{key}\": unbalanced brackets"));
        }
        out.push(inner.0.to_string());
        s = inner.1;
    }
    if out.is_empty() {
        return Err(format!("invalid key \"{key}\": missing [...]"));
    }
    Ok(out)
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
        assert!(
            check_method("get")
                .unwrap_err()
                .contains("not an HTTP method")
        );
        assert!(check_method("GE T").is_err());
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
    }
}
